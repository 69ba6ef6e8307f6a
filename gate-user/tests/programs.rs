//! The gate's programs, loaded into the real kernel and run on crafted frames through
//! BPF_PROG_TEST_RUN: every decision of the datapath, IPv4 and IPv6, and bad frames.
//! Needs root (and bpffs on /sys/fs/bpf); skipped with a message otherwise.

mod support;

use gate_common::{FlowKey, ipv4_mapped, tcp};
use support::*;

#[test]
fn frames_that_are_not_ip_pass() {
    let Some(gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    assert_eq!(gate.toward(&arp), Verdict::Pass);
    assert_eq!(gate.counter("not_ip"), 1);
}

#[test]
fn new_connections_pass_only_to_allowed_ports_ipv4() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    let syn = tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN);
    assert_eq!(gate.toward(&syn), Verdict::Drop);
    assert_eq!(gate.counter("not_allowed"), 1);
    assert_eq!(
        gate.counter("flow_created"),
        0,
        "no state for a dropped packet"
    );

    gate.allow("10.99.0.2", "80/tcp");
    assert_eq!(gate.toward(&syn), Verdict::Pass);
    assert_eq!(gate.counter("new_allowed"), 1);
    // Another port, protocol or address is still closed.
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 81, SYN)),
        Verdict::Drop
    );
    assert_eq!(
        gate.toward(&udp4(REMOTE4, CONTAINER4, 40000, 80)),
        Verdict::Drop
    );
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, [10, 99, 0, 3], 40000, 80, SYN)),
        Verdict::Drop
    );

    // The handshake and the data of the admitted connection follow.
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 40000, SYN_ACK));
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, ACK)),
        Verdict::Pass
    );
    assert_eq!(gate.counter("tracked"), 1);
    let stats = gate.datapath.rule_stats(0).expect("stats");
    assert_eq!(stats.packets, 3, "SYN, SYN-ACK and ACK count for the rule");
    assert!(stats.bytes > 3 * 54);
}

#[test]
fn new_connections_pass_only_to_allowed_ports_ipv6() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    let syn = tcp6(REMOTE6, CONTAINER6, 40000, 443, SYN);
    assert_eq!(gate.toward(&syn), Verdict::Drop);
    gate.allow("fd99::2", "443");
    assert_eq!(gate.toward(&syn), Verdict::Pass);
    gate.sent_by_container(&tcp6(CONTAINER6, REMOTE6, 443, 40000, SYN_ACK));
    assert_eq!(
        gate.toward(&tcp6(REMOTE6, CONTAINER6, 40000, 443, ACK)),
        Verdict::Pass
    );
    // The IPv4 rule space is separate.
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 443, SYN)),
        Verdict::Drop
    );
}

#[test]
fn tcp_without_state_is_dropped() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    // An ACK or SYN-ACK that belongs to no connection: not a connection request.
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, ACK)),
        Verdict::Drop
    );
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN_ACK)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("tcp_no_state"), 2);
}

#[test]
fn replies_to_container_connections_pass() {
    let Some(gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    // TCP: the container connects out; the reply comes back with no rule at all.
    let reply = tcp4(REMOTE4, CONTAINER4, 443, 50000, SYN_ACK);
    assert_eq!(
        gate.toward(&reply),
        Verdict::Drop,
        "no reply before the request"
    );
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 50000, 443, SYN));
    assert_eq!(gate.toward(&reply), Verdict::Pass);
    // The reverse tuple of another port does not ride on it.
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 443, 50001, SYN_ACK)),
        Verdict::Drop
    );

    // UDP over IPv6.
    let answer = udp6(REMOTE6, CONTAINER6, 53, 50002);
    assert_eq!(gate.toward(&answer), Verdict::Drop);
    gate.sent_by_container(&udp6(CONTAINER6, REMOTE6, 50002, 53));
    assert_eq!(gate.toward(&answer), Verdict::Pass);

    // Ping out, both families.
    assert_eq!(
        gate.toward(&echo4(REMOTE4, CONTAINER4, 7, false)),
        Verdict::Drop
    );
    gate.sent_by_container(&echo4(CONTAINER4, REMOTE4, 7, true));
    assert_eq!(
        gate.toward(&echo4(REMOTE4, CONTAINER4, 7, false)),
        Verdict::Pass
    );
    gate.sent_by_container(&echo6(CONTAINER6, REMOTE6, 8, true));
    assert_eq!(
        gate.toward(&echo6(REMOTE6, CONTAINER6, 8, false)),
        Verdict::Pass
    );
    assert_eq!(gate.counter("tracked"), 4);
}

#[test]
fn ping_into_a_container_needs_an_icmp_rule() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    let ping4 = echo4(REMOTE4, CONTAINER4, 9, true);
    let ping6 = echo6(REMOTE6, CONTAINER6, 9, true);
    assert_eq!(gate.toward(&ping4), Verdict::Drop);
    assert_eq!(gate.toward(&ping6), Verdict::Drop);
    gate.allow("10.99.0.2", "icmp");
    gate.allow("fd99::2", "icmp");
    assert_eq!(gate.toward(&ping4), Verdict::Pass);
    assert_eq!(gate.toward(&ping6), Verdict::Pass);
}

#[test]
fn icmp_errors_pass_only_for_tracked_connections() {
    let Some(gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    let router4 = [10, 98, 0, 1];
    let request4 = udp4(CONTAINER4, REMOTE4, 50010, 53);
    let error4 = icmp4_error(router4, CONTAINER4, &request4);
    assert_eq!(gate.toward(&error4), Verdict::Drop);
    assert_eq!(gate.counter("icmp_untracked"), 1);
    gate.sent_by_container(&request4);
    assert_eq!(gate.toward(&error4), Verdict::Pass);
    assert_eq!(gate.counter("related"), 1);
    // An error sent to one container about another's packet is not related.
    let foreign = icmp4_error(router4, [10, 99, 0, 3], &request4);
    assert_eq!(gate.toward(&foreign), Verdict::Drop);

    let router6 = [0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let request6 = tcp6(CONTAINER6, REMOTE6, 50011, 443, SYN);
    let error6 = icmp6_error(router6, CONTAINER6, &request6);
    assert_eq!(gate.toward(&error6), Verdict::Drop);
    gate.sent_by_container(&request6);
    assert_eq!(gate.toward(&error6), Verdict::Pass);
}

#[test]
fn neighbour_discovery_passes() {
    let Some(gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    for icmp_type in [133, 134, 135, 136, 137] {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(REMOTE6, CONTAINER6, 255)
            .icmpv6_raw(icmp_type, 0, [0; 4])
            .write(&mut frame, &[0; 16])
            .expect("build frame");
        assert_eq!(
            gate.toward(&frame),
            Verdict::Pass,
            "ICMPv6 type {icmp_type}"
        );
    }
    assert_eq!(gate.counter("neighbor_discovery"), 5);
}

#[test]
fn host_traffic_passes_unless_gated() {
    let syn = tcp4([10, 99, 0, 1], CONTAINER4, 40000, 22, SYN);
    let Some(open) = Gate::load(GateConfig::default()) else {
        return;
    };
    assert_eq!(
        open.run(program_names::TOWARD_CONTAINERS, &syn, FROM_HOST),
        Verdict::Pass
    );
    assert_eq!(open.counter("host"), 1);
    let config = GateConfig {
        gate_host_traffic: true,
        ..Default::default()
    };
    let Some(gated) = Gate::load(config) else {
        return;
    };
    assert_eq!(
        gated.run(program_names::TOWARD_CONTAINERS, &syn, FROM_HOST),
        Verdict::Drop
    );
}

#[test]
fn fin_and_rst_end_a_connection() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    let open = |gate: &Gate, port| {
        assert_eq!(
            gate.toward(&tcp4(REMOTE4, CONTAINER4, port, 80, SYN)),
            Verdict::Pass
        );
        gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, port, SYN_ACK));
        assert_eq!(
            gate.toward(&tcp4(REMOTE4, CONTAINER4, port, 80, ACK)),
            Verdict::Pass
        );
    };
    let state = |port| {
        let key = FlowKey {
            container_addr: ipv4_mapped(CONTAINER4),
            remote_addr: ipv4_mapped(REMOTE4),
            container_port: 80,
            remote_port: port,
            proto: 6,
            _pad: [0; 3],
        };
        gate.flow(&key)
            .unwrap_or_else(|| panic!("the connection from port {port} is tracked"))
            .tcp_state
    };
    // One connection closed with FINs, one reset, one left up as the control.
    open(&gate, 41000);
    open(&gate, 41001);
    open(&gate, 41002);
    // A FIN keeps the closing handshake flowing.
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 41000, 80, FIN_ACK)),
        Verdict::Pass
    );
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 41000, FIN_ACK));
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 41000, 80, ACK)),
        Verdict::Pass
    );
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 41001, RST));
    assert_eq!(state(41000), tcp::FIN_WAIT, "after the FINs");
    assert_eq!(state(41001), tcp::CLOSED, "after the RST");
    assert_eq!(state(41002), tcp::ESTABLISHED, "the control");

    // Ended: a SYN on the same ports opens a new connection (judged, counted as new), where
    // on the control's ports it is still the same connection.
    let new_before = gate.counter("new_allowed");
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 41002, 80, SYN)),
        Verdict::Pass
    );
    assert_eq!(
        gate.counter("new_allowed"),
        new_before,
        "a SYN on a live connection's ports is that connection"
    );
    for (port, by) in [(41000, "FIN"), (41001, "RST")] {
        assert_eq!(
            gate.toward(&tcp4(REMOTE4, CONTAINER4, port, 80, SYN)),
            Verdict::Pass
        );
        assert_eq!(
            gate.counter("new_allowed"),
            new_before + u64::from(port - 40999),
            "the {by} ended the connection from port {port}: a SYN on its ports is a new one"
        );
    }

    open(&gate, 41003);
    gate.deny("10.99.0.2", "80");
    // Established connections outlive a deny...
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 41003, 80, ACK)),
        Verdict::Pass
    );
    // ...until reset; a new SYN on the same ports is then a new connection, and denied.
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 41003, RST));
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 41003, 80, SYN)),
        Verdict::Drop
    );
}

#[test]
fn range_rules_cover_each_port() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "8000-8002/udp");
    for port in 8000..=8002 {
        assert_eq!(
            gate.toward(&udp4(REMOTE4, CONTAINER4, 5000, port)),
            Verdict::Pass
        );
    }
    assert_eq!(
        gate.toward(&udp4(REMOTE4, CONTAINER4, 5000, 8003)),
        Verdict::Drop
    );
    assert_eq!(gate.datapath.rule_stats(0).expect("stats").packets, 3);
}

#[test]
fn truncated_and_malformed_frames_are_dropped() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    let syn = tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN);
    // (The kernel itself refuses to inject frames cut inside the IP header, as its receive
    // path drops them before forwarding; truncation is tested past the IP header.)
    // Cut inside the TCP header.
    assert_eq!(gate.toward(&syn[..14 + 20 + 10]), Verdict::Drop);
    // IHL claims options that run past the end of the packet.
    let mut long_ihl = syn[..14 + 20 + 12].to_vec();
    long_ihl[14] = 0x4f;
    assert_eq!(gate.toward(&long_ihl), Verdict::Drop);
    // IHL below 5.
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    assert_eq!(gate.toward(&bad_ihl), Verdict::Drop);
    // TCP data offset below 5.
    let mut bad_doff = syn.clone();
    bad_doff[14 + 20 + 12] = 0x40;
    assert_eq!(gate.toward(&bad_doff), Verdict::Drop);
    // IPv6 cut inside the TCP header; the version nibble wrong.
    let syn6 = tcp6(REMOTE6, CONTAINER6, 40000, 80, SYN);
    assert_eq!(gate.toward(&syn6[..14 + 40 + 10]), Verdict::Drop);
    let mut bad_version = syn6.clone();
    bad_version[14] = 0x40;
    assert_eq!(gate.toward(&bad_version), Verdict::Drop);
    // An extension header that runs past the end.
    let cut_ext = with_ipv6_extensions(syn6[..14 + 40].to_vec(), 0, &[6, 4]);
    assert_eq!(gate.toward(&cut_ext), Verdict::Drop);
    assert_eq!(gate.counter("malformed"), 7);
    assert_eq!(gate.counter("new_allowed"), 0);
}

#[test]
fn ip_options_and_extension_headers_are_followed() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    gate.allow("fd99::2", "80");
    // IPv4 with 4 bytes of options (NOPs): IHL 6.
    let mut with_options = tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN);
    with_options[14] = 0x46;
    let total = u16::from_be_bytes([with_options[16], with_options[17]]) + 4;
    with_options[16..18].copy_from_slice(&total.to_be_bytes());
    with_options.splice(34..34, [1, 1, 1, 0]);
    assert_eq!(gate.toward(&with_options), Verdict::Pass);
    assert_eq!(gate.counter("ip_options"), 1);

    // IPv6: hop-by-hop then destination options, then TCP.
    let syn6 = tcp6(REMOTE6, CONTAINER6, 40000, 80, SYN);
    let mut ext = ext_header(60).to_vec();
    ext.extend_from_slice(&ext_header(6));
    assert_eq!(
        gate.toward(&with_ipv6_extensions(syn6.clone(), 0, &ext)),
        Verdict::Pass
    );
    assert_eq!(gate.counter("ipv6_extensions"), 1);
    // An atomic fragment (offset 0, no more fragments) is a whole packet.
    let atomic = [6, 0, 0, 0, 0, 0, 0, 1];
    let syn6b = tcp6(REMOTE6, CONTAINER6, 40001, 80, SYN);
    assert_eq!(
        gate.toward(&with_ipv6_extensions(syn6b, 44, &atomic)),
        Verdict::Pass
    );

    // More extension headers than the program walks: unsupported, dropped.
    let mut chain = Vec::new();
    for _ in 0..4 {
        chain.extend_from_slice(&ext_header(60));
    }
    chain.extend_from_slice(&ext_header(6));
    assert_eq!(
        gate.toward(&with_ipv6_extensions(syn6, 60, &chain)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("unsupported_header"), 1);
}

#[test]
fn audit_mode_counts_but_passes() {
    let config = GateConfig {
        audit: true,
        ..Default::default()
    };
    let Some(gate) = Gate::load(config) else {
        return;
    };
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN)),
        Verdict::Pass
    );
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN)[..44]),
        Verdict::Pass
    );
    assert_eq!(gate.counter("not_allowed"), 1);
    assert_eq!(gate.counter("malformed"), 1);
    assert_eq!(gate.counter("audit_passed"), 2);
    assert_eq!(
        gate.counter("flow_created"),
        0,
        "audit creates no state for would-drops"
    );
}

#[test]
fn drops_are_counted_per_bridge_and_reported_within_a_budget() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    // The budget is per CPU, and a test run executes on the calling CPU: stay on one.
    // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of_val(&set), &set),
            0,
            "pin to CPU 0"
        );
    }
    let mut events = gate.datapath.take_drop_events().expect("ring buffer");
    let syn = tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN);
    // 150 drops in one burst on one CPU: over the budget of 100 events per second.
    let burst = gate_common::DROP_EVENTS_PER_SECOND + 50;
    let verdict = gate.run_repeated(program_names::TOWARD_CONTAINERS, &syn, FORWARDED, burst);
    assert_eq!(verdict, Verdict::Drop);
    let per_bridge: u64 = gate
        .datapath
        .bridge_drops()
        .expect("bridge drops")
        .iter()
        .filter(|(key, _)| key.reason == counters::DROP_NOT_ALLOWED)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(per_bridge, u64::from(burst));
    let mut reported = Vec::new();
    while let Some(item) = events.next() {
        reported.push(datapath::decode_drop_event(&item).expect("event"));
    }
    assert_eq!(reported.len(), gate_common::DROP_EVENTS_PER_SECOND as usize);
    let first = reported[0];
    assert_eq!(
        (first.src, first.dst),
        (
            gate_common::ipv4_mapped(REMOTE4),
            gate_common::ipv4_mapped(CONTAINER4)
        )
    );
    assert_eq!(
        (first.src_port, first.dst_port, first.proto),
        (40000, 80, 6)
    );
    assert_eq!(u32::from(first.reason), counters::DROP_NOT_ALLOWED);
    assert_eq!(first.audit, 0);
    // The next window's first event reports what was suppressed.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(gate.toward(&syn), Verdict::Drop);
    let next = datapath::decode_drop_event(&events.next().expect("an event after the pause"))
        .expect("event");
    assert_eq!(next.suppressed, 50);
}

/// Another container on the same bridge, whose address the test container may not use.
const OTHER4: [u8; 4] = [10, 99, 0, 3];
const OTHER6: [u8; 16] = [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];

#[test]
fn a_container_cannot_open_a_flow_in_another_containers_name() {
    let Some(gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    // A forged "request" from the other container's port 53 to the remote...
    gate.sent_by_container(&udp4(OTHER4, REMOTE4, 53, 40000));
    gate.sent_by_container(&udp6(OTHER6, REMOTE6, 53, 40000));
    gate.sent_by_container(&tcp4(OTHER4, REMOTE4, 22, 40001, SYN));
    assert_eq!(gate.counter("foreign_source"), 3);
    assert_eq!(gate.counter("flow_created"), 0);
    // ...admits nothing back to it: these are new connections to ports without a rule.
    assert_eq!(
        gate.toward(&udp4(REMOTE4, OTHER4, 40000, 53)),
        Verdict::Drop
    );
    assert_eq!(
        gate.toward(&udp6(REMOTE6, OTHER6, 40000, 53)),
        Verdict::Drop
    );
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, OTHER4, 40001, 22, SYN)),
        Verdict::Drop
    );
    // The container's own address still opens flows.
    gate.sent_by_container(&udp4(CONTAINER4, REMOTE4, 53, 40000));
    assert_eq!(
        gate.toward(&udp4(REMOTE4, CONTAINER4, 40000, 53)),
        Verdict::Pass
    );
}

#[test]
fn ipv4_mapped_ipv6_addresses_never_alias_ipv4_keys() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80/tcp");
    let mapped_container = ipv4_mapped(CONTAINER4);
    let mapped_remote = ipv4_mapped(REMOTE4);
    // IPv6 to ::ffff:10.99.0.2 port 80 would hit the IPv4 rule's key.
    assert_eq!(
        gate.toward(&tcp6(REMOTE6, mapped_container, 40000, 80, SYN)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("malformed"), 1);
    // A container "request" from ::ffff:10.99.0.2 would open the IPv4 flow's key.
    gate.sent_by_container(&udp6(mapped_container, mapped_remote, 53, 40000));
    assert_eq!(gate.counter("flow_created"), 0);
    assert_eq!(
        gate.toward(&udp4(REMOTE4, CONTAINER4, 40000, 53)),
        Verdict::Drop
    );
}

#[test]
fn a_containers_ping_admits_echo_replies_not_requests() {
    let Some(gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.sent_by_container(&echo4(CONTAINER4, REMOTE4, 21, true));
    gate.sent_by_container(&echo6(CONTAINER6, REMOTE6, 22, true));
    // Requests with the same identifier are new pings into the container: no icmp rule.
    assert_eq!(
        gate.toward(&echo4(REMOTE4, CONTAINER4, 21, true)),
        Verdict::Drop
    );
    assert_eq!(
        gate.toward(&echo6(REMOTE6, CONTAINER6, 22, true)),
        Verdict::Drop
    );
    assert_eq!(
        gate.toward(&echo4(REMOTE4, CONTAINER4, 21, false)),
        Verdict::Pass
    );
    assert_eq!(
        gate.toward(&echo6(REMOTE6, CONTAINER6, 22, false)),
        Verdict::Pass
    );
}

#[test]
fn an_icmp_error_about_an_expired_flow_is_dropped() {
    let Some(gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    let request = udp4(CONTAINER4, REMOTE4, 50020, 53);
    let error = icmp4_error([10, 98, 0, 1], CONTAINER4, &request);
    gate.sent_by_container(&request);
    assert_eq!(gate.toward(&error), Verdict::Pass, "live flow: related");
    gate.expire_flows();
    assert_eq!(
        gate.toward(&error),
        Verdict::Drop,
        "expired flow: unrelated"
    );
}
