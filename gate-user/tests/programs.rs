//! The gate's programs, loaded into the real kernel and run on crafted frames through
//! BPF_PROG_TEST_RUN: every decision of the datapath, IPv4 and IPv6, and bad frames.
//! Needs root (and bpffs on /sys/fs/bpf); skipped with a message otherwise.

mod support;

use gate_common::{FlowKey, ipv4_mapped, tcp};
use support::*;

#[test]
fn a_full_allow_map_applies_every_removal_and_leaves_out_what_does_not_fit() {
    let capacities = Capacities {
        allow: 2,
        ..Capacities::default()
    };
    let Some(mut gate) = Gate::load_with(GateConfig::default(), capacities) else {
        return;
    };
    let mut sport = 40000;
    let mut syn = |gate: &Gate, port| {
        sport += 1;
        gate.toward(&tcp4(REMOTE4, CONTAINER4, sport, port, SYN))
    };
    gate.rules
        .allow(target("10.99.0.2"), spec("80-81"), Access::default())
        .expect("allow");
    assert_eq!(gate.sync(), AllowSync::default(), "two entries fit in two");
    // One more than the map holds: saved, left out, reported by rule.
    gate.rules
        .allow(target("10.99.0.2"), spec("82"), Access::default())
        .expect("allow");
    let sync = gate.sync();
    assert_eq!(sync.not_fitted.into_iter().collect::<Vec<_>>(), [(1, 1)]);
    assert_eq!(gate.datapath.allow_entries().expect("entries"), 2);
    assert_eq!(syn(&gate, 80), Verdict::Pass);
    assert_eq!(syn(&gate, 81), Verdict::Pass);
    assert_eq!(syn(&gate, 82), Verdict::Drop, "left out: not enforced");
    // A deny while the map is full: its removal comes first, then the entry that waited
    // takes the freed room.
    gate.deny("10.99.0.2", "81");
    assert_eq!(syn(&gate, 81), Verdict::Drop, "denied");
    assert_eq!(syn(&gate, 82), Verdict::Pass, "fits now");
    assert_eq!(syn(&gate, 80), Verdict::Pass);
    assert_eq!(gate.sync(), AllowSync::default());
}

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

#[test]
fn published_host_ports_reached_through_local_sockets_are_gated() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    use gate_common::{AllowKey, AllowValue, NO_RULE, PROTO_TCP, PROTO_UDP};
    let host_v4 = [10, 98, 0, 1];
    let entries = [
        // Published on every address, not admitted.
        (AllowKey::new([0; 16], PROTO_TCP, 18101), NO_RULE),
        (AllowKey::new([0; 16], PROTO_UDP, 18101), NO_RULE),
        // Published on every address, admitted by rule 3.
        (AllowKey::new([0; 16], PROTO_TCP, 18102), 3),
        // Published on the host's 10.98.0.1 only, admitted by rule 4 there.
        (AllowKey::new(ipv4_mapped(host_v4), PROTO_TCP, 18103), 4),
        (AllowKey::new([0; 16], PROTO_TCP, 18103), NO_RULE),
    ]
    .into_iter()
    .map(|(key, rule_id)| (key, AllowValue::any_source(rule_id)))
    .collect();
    gate.datapath.sync_host_ports(&entries).expect("host ports");
    let lookup = |protocol: u8, remote: &str, local: &str| {
        gate.lookup(sys::SkLookupRun {
            protocol,
            remote: remote.parse().expect("remote"),
            local: local.parse().expect("local"),
        })
    };
    // The userland proxy's paths: IPv6 from outside, IPv4 hairpin from a bridge.
    assert_eq!(
        lookup(PROTO_TCP, "[fd98::2]:40000", "[fd98::1]:18101"),
        Verdict::Drop
    );
    assert_eq!(
        lookup(PROTO_TCP, "10.99.0.3:40000", "10.99.0.1:18101"),
        Verdict::Drop
    );
    assert_eq!(
        lookup(PROTO_UDP, "[fd98::2]:40000", "[fd98::1]:18101"),
        Verdict::Drop
    );
    assert_eq!(gate.counter("not_allowed"), 3);
    // Admitted, counted for its rule.
    assert_eq!(
        lookup(PROTO_TCP, "[fd98::2]:40000", "[fd98::1]:18102"),
        Verdict::Pass
    );
    assert_eq!(gate.counter("host_port_allowed"), 1);
    assert_eq!(gate.datapath.rule_stats(3).expect("stats").packets, 1);
    // The exact host address decides before the every-address entry.
    assert_eq!(
        lookup(PROTO_TCP, "10.98.0.2:40000", "10.98.0.1:18103"),
        Verdict::Pass
    );
    assert_eq!(
        lookup(PROTO_TCP, "[fd98::2]:40000", "[fd98::1]:18103"),
        Verdict::Drop
    );
    // Not a published port: the host's own services are none of the gate's business.
    assert_eq!(
        lookup(PROTO_TCP, "[fd98::2]:40000", "[fd98::1]:22"),
        Verdict::Pass
    );
}

#[test]
fn audit_mode_passes_unpublished_host_port_connections_and_counts_them() {
    let Some(mut gate) = Gate::load(GateConfig {
        audit: true,
        ..GateConfig::default()
    }) else {
        return;
    };
    use gate_common::{AllowKey, AllowValue, NO_RULE, PROTO_TCP};
    let entries = [(
        AllowKey::new([0; 16], PROTO_TCP, 18101),
        AllowValue::any_source(NO_RULE),
    )]
    .into_iter()
    .collect();
    gate.datapath.sync_host_ports(&entries).expect("host ports");
    let verdict = gate.lookup(sys::SkLookupRun {
        protocol: PROTO_TCP,
        remote: "[fd98::2]:40000".parse().expect("remote"),
        local: "[fd98::1]:18101".parse().expect("local"),
    });
    assert_eq!(verdict, Verdict::Pass);
    assert_eq!(gate.counter("not_allowed"), 1);
    assert_eq!(gate.counter("audit_passed"), 1);
}

/// Removes a test's pin directory, whatever is in it, on drop.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_pinned_map_with_another_layout_is_refused_not_reused_or_replaced() {
    if !portgate_test_support::require_root("pins maps, loads eBPF programs") {
        return;
    }
    if std::process::Command::new("bpftool")
        .arg("version")
        .output()
        .is_err()
    {
        portgate_test_support::skip("bpftool not found (apt-get install bpftool)");
        return;
    }
    let dir = PathBuf::from(format!("/sys/fs/bpf/pgprog-{}-foreign", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let _ = std::fs::remove_dir_all(&dir);
    let maps = dir.join(gate_common::LAYOUT_VERSION).join("maps");
    std::fs::create_dir_all(&maps).expect("create the maps directory");
    // Where this layout's allow map is pinned, a map of another layout (a u32 key and value,
    // 8 entries), with an entry in it.
    let pin = maps.join(gate_common::map_names::ALLOW);
    let pin_str = pin.to_str().expect("UTF-8 path");
    bpftool_json(&[
        "map", "create", pin_str, "type", "hash", "key", "4", "value", "4", "entries", "8", "name",
        "ALLOW",
    ]);
    bpftool_json(&[
        "map", "update", "pinned", pin_str, "key", "1", "0", "0", "0", "value", "2", "0", "0", "0",
    ]);
    let show = || bpftool_json(&["map", "show", "pinned", pin_str]);
    let before = show();
    let dump = || bpftool_json(&["map", "dump", "pinned", pin_str]);
    let entries = dump();

    match Datapath::load(&dir, GateConfig::default()) {
        Ok(_) => panic!("a pinned map of another layout was reused"),
        Err(datapath::DatapathError::IncompatibleMap { path, detail }) => {
            assert_eq!(path, pin, "{detail}");
        }
        Err(other) => panic!("expected IncompatibleMap, got: {other}"),
    }

    // Not replaced: the same map (same id, type, sizes), with its entry.
    let after = show();
    assert_eq!(after["id"], before["id"], "replaced: {before} -> {after}");
    for field in ["type", "key", "value", "max_entries", "name"] {
        assert_eq!(after[field], before[field], "{field}: {before} -> {after}");
    }
    assert_eq!(dump(), entries, "the map's contents changed");
    // Not reused: nothing was loaded or pinned next to it.
    let pinned: Vec<_> = std::fs::read_dir(dir.join(gate_common::LAYOUT_VERSION))
        .expect("read the layout directory")
        .flat_map(|entry| {
            let entry = entry.expect("entry");
            std::fs::read_dir(entry.path())
                .map(|d| d.map(|e| e.expect("entry").path()).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(pinned, [pin], "only the foreign map may be pinned");
}

#[test]
fn rules_with_sources_admit_only_those_sources_ipv4_and_ipv6() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow_with("10.99.0.2", "80", from(&["10.98.0.0/16"]));
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN)),
        Verdict::Pass
    );
    let outsider = [192, 0, 2, 1];
    assert_eq!(
        gate.toward(&tcp4(outsider, CONTAINER4, 40000, 80, SYN)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("source_not_allowed"), 1);
    assert_eq!(
        gate.counter("flow_created"),
        1,
        "no state for the refused source"
    );

    gate.allow_with("fd99::2", "80", from(&["fd98::/16"]));
    assert_eq!(
        gate.toward(&tcp6(REMOTE6, CONTAINER6, 40000, 80, SYN)),
        Verdict::Pass
    );
    let mut outsider6 = REMOTE6;
    outsider6[0] = 0x20;
    assert_eq!(
        gate.toward(&tcp6(outsider6, CONTAINER6, 40000, 80, SYN)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("source_not_allowed"), 2);

    // Every IPv6 source is not every IPv4 source: the trie keeps IPv4 as ::ffff:a.b.c.d.
    gate.allow_with("10.99.0.2", "81", from(&["::/0"]));
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 81, SYN)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("source_not_allowed"), 3);
    // ... while 0.0.0.0/0 next to it admits them.
    gate.allow_with("10.99.0.2", "81", from(&["0.0.0.0/0"]));
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40001, 81, SYN)),
        Verdict::Pass
    );

    // Rules add up: a second rule with another source opens the port to it as well.
    gate.allow_with("10.99.0.2", "80", from(&["192.0.2.0/24"]));
    assert_eq!(
        gate.toward(&tcp4(outsider, CONTAINER4, 40002, 80, SYN)),
        Verdict::Pass
    );
    // And a rule without sources opens it to everyone.
    let elsewhere = [203, 0, 113, 9];
    assert_eq!(
        gate.toward(&tcp4(elsewhere, CONTAINER4, 40003, 80, SYN)),
        Verdict::Drop
    );
    gate.allow("10.99.0.2", "80");
    assert_eq!(
        gate.toward(&tcp4(elsewhere, CONTAINER4, 40004, 80, SYN)),
        Verdict::Pass
    );
}

#[test]
fn rules_with_an_interface_admit_only_what_came_in_on_it() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    let via = Access {
        via: Some(VIA.into()),
        ..Access::default()
    };
    gate.allow_with("10.99.0.2", "80", via.clone());
    let syn = tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN);
    assert_eq!(gate.toward_via_other(&syn), Verdict::Drop);
    assert_eq!(gate.counter("interface_not_allowed"), 1);
    assert_eq!(gate.toward(&syn), Verdict::Pass);

    // Interface and sources together: both must hold.
    let both = Access {
        via: Some(VIA.into()),
        ..from(&["10.98.0.0/16"])
    };
    gate.allow_with("10.99.0.2", "443", both);
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40001, 443, SYN)),
        Verdict::Pass
    );
    assert_eq!(
        gate.toward(&tcp4([192, 0, 2, 1], CONTAINER4, 40001, 443, SYN)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("source_not_allowed"), 1);
    assert_eq!(
        gate.toward_via_other(&tcp4(REMOTE4, CONTAINER4, 40002, 443, SYN)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("interface_not_allowed"), 2);

    // A rule whose interface does not exist admits nobody (it is not taken for "any").
    let missing = Access {
        via: Some("nonexistent0".into()),
        ..Access::default()
    };
    gate.allow_with("10.99.0.2", "8080", missing);
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40003, 8080, SYN)),
        Verdict::Drop
    );
}

#[test]
fn the_block_list_overrides_every_allow_and_is_replaced_at_once() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    // A connection established before the block.
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN)),
        Verdict::Pass
    );
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 40000, SYN_ACK));

    assert_eq!(gate.block(&["10.98.0.0/24", "2001:db8::/32"]), 1);
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40001, 80, SYN)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("blocked"), 1);
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, ACK)),
        Verdict::Drop,
        "a block ends established connections too"
    );
    assert_eq!(gate.counter("cut"), 1);
    // Sources do not help a blocked address either.
    gate.allow_with("10.99.0.2", "443", from(&["10.98.0.2"]));
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40002, 443, SYN)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("blocked"), 2);

    // One entry more or less; then a replacement that drops the 10.98.0.0/24 entry.
    gate.block(&["10.98.0.0/24", "2001:db8::/32", "192.0.2.0/24"]);
    assert_eq!(
        gate.toward(&tcp4([192, 0, 2, 5], CONTAINER4, 40003, 80, SYN)),
        Verdict::Drop
    );
    gate.block(&["198.51.100.0/24", "203.0.113.7"]);
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40004, 80, SYN)),
        Verdict::Pass
    );
    assert_eq!(
        gate.toward(&tcp4([192, 0, 2, 5], CONTAINER4, 40005, 80, SYN)),
        Verdict::Pass
    );
    assert_eq!(
        gate.toward(&tcp4([203, 0, 113, 7], CONTAINER4, 40006, 80, SYN)),
        Verdict::Drop
    );
    // The old generation is gone from the trie: only the two entries in force remain.
    assert_eq!(bpftool_entries(&gate, gate_common::map_names::BLOCKED), 2);
    gate.block(&[]);
    assert_eq!(
        gate.toward(&tcp4([203, 0, 113, 7], CONTAINER4, 40007, 80, SYN)),
        Verdict::Pass
    );
    assert_eq!(bpftool_entries(&gate, gate_common::map_names::BLOCKED), 0);
}

#[test]
fn a_replaced_set_changes_every_rule_and_keeps_established_connections() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.set("office", &["10.98.0.2"]);
    gate.allow_with("10.99.0.2", "80", from(&["office"]));
    gate.allow_with("10.99.0.2", "443", from(&["office"]));
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN)),
        Verdict::Pass
    );
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 40000, SYN_ACK));
    let newcomer = [192, 0, 2, 1];
    assert_eq!(
        gate.toward(&tcp4(newcomer, CONTAINER4, 40000, 443, SYN)),
        Verdict::Drop
    );

    gate.set("office", &["192.0.2.0/24"]);
    for port in [80, 443] {
        assert_eq!(
            gate.toward(&tcp4(newcomer, CONTAINER4, 40001, port, SYN)),
            Verdict::Pass,
            "port {port} follows the set"
        );
        assert_eq!(
            gate.toward(&tcp4(REMOTE4, CONTAINER4, 40002, port, SYN)),
            Verdict::Drop,
            "port {port}: the removed source is refused"
        );
    }
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, ACK)),
        Verdict::Pass,
        "the removed source's established connection continues"
    );
    // One list per rule, each the set's prefix and the marker: the old lists are gone.
    assert_eq!(bpftool_entries(&gate, gate_common::map_names::SOURCES), 4);
}

#[test]
fn published_host_ports_apply_sources_and_the_block_list() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    use gate_common::{AllowKey, PROTO_TCP};
    gate.allow_with("10.99.0.2", "80", from(&["fd98::/16"]));
    let container_key = AllowKey::new(ipv4_mapped(CONTAINER4), PROTO_TCP, 80);
    let value = gate
        .datapath
        .allow_value(&container_key)
        .expect("allow map")
        .expect("entry");
    let entries = [(AllowKey::new([0; 16], PROTO_TCP, 18201), value)].into();
    gate.datapath.sync_host_ports(&entries).expect("host ports");
    let lookup = |gate: &Gate, remote: &str| {
        gate.lookup(sys::SkLookupRun {
            protocol: PROTO_TCP,
            remote: remote.parse().expect("remote"),
            local: "[fd98::1]:18201".parse().expect("local"),
        })
    };
    assert_eq!(lookup(&gate, "[fd98::2]:40000"), Verdict::Pass);
    assert_eq!(lookup(&gate, "[2001:db8::2]:40000"), Verdict::Drop);
    assert_eq!(gate.counter("source_not_allowed"), 1);
    gate.block(&["fd98::2"]);
    assert_eq!(lookup(&gate, "[fd98::2]:40001"), Verdict::Drop);
    assert_eq!(gate.counter("blocked"), 1);
}

#[test]
fn the_uplink_program_refuses_unadmitted_published_ports_before_conntrack() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    use gate_common::{AllowKey, AllowValue, NO_RULE, PROTO_TCP, PROTO_UDP};
    let host = [10, 98, 0, 1];
    let elsewhere = [10, 97, 0, 9];
    gate.datapath
        .sync_local_addrs(&[ipv4_mapped(host)].into())
        .expect("local addresses");
    gate.allow_with("10.99.0.2", "80", from(&["10.98.0.0/16"]));
    let restricted = gate
        .datapath
        .allow_value(&AllowKey::new(ipv4_mapped(CONTAINER4), PROTO_TCP, 80))
        .expect("allow map")
        .expect("entry");
    let entries = [
        (
            AllowKey::new([0; 16], PROTO_TCP, 8080),
            AllowValue::any_source(NO_RULE),
        ),
        (
            AllowKey::new([0; 16], PROTO_UDP, 8080),
            AllowValue::any_source(NO_RULE),
        ),
        (AllowKey::new([0; 16], PROTO_TCP, 8081), restricted),
        (
            AllowKey::new(ipv4_mapped(host), PROTO_TCP, 8082),
            AllowValue::any_source(0),
        ),
    ]
    .into();
    gate.datapath.sync_host_ports(&entries).expect("host ports");
    let uplink =
        |gate: &Gate, frame: &[u8]| gate.run(program_names::FROM_UPLINKS, frame, FORWARDED);

    // A published port no rule admits: refused, counted as a drop made before conntrack.
    assert_eq!(
        uplink(&gate, &tcp4(REMOTE4, host, 40000, 8080, SYN)),
        Verdict::Drop
    );
    assert_eq!(
        uplink(&gate, &udp4(REMOTE4, host, 40000, 8080)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("not_allowed"), 2);
    assert_eq!(gate.counter("dropped_before_conntrack"), 2);
    assert_eq!(gate.counter("flow_created"), 0);
    // What is not a new connection, or not to this host, or not published, passes on.
    assert_eq!(
        uplink(&gate, &tcp4(REMOTE4, host, 40000, 8080, ACK)),
        Verdict::Pass
    );
    assert_eq!(
        uplink(&gate, &tcp4(REMOTE4, host, 40000, 8080, SYN_ACK)),
        Verdict::Pass
    );
    assert_eq!(
        uplink(&gate, &tcp4(REMOTE4, elsewhere, 40000, 8080, SYN)),
        Verdict::Pass
    );
    assert_eq!(
        uplink(&gate, &tcp4(REMOTE4, host, 40000, 22, SYN)),
        Verdict::Pass
    );
    // The rule's sources and the block list decide as they do on the bridge.
    assert_eq!(
        uplink(&gate, &tcp4(REMOTE4, host, 40001, 8081, SYN)),
        Verdict::Pass
    );
    assert_eq!(
        uplink(&gate, &tcp4([192, 0, 2, 1], host, 40001, 8081, SYN)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("source_not_allowed"), 1);
    assert_eq!(
        uplink(&gate, &tcp4(REMOTE4, host, 40002, 8082, SYN)),
        Verdict::Pass
    );
    gate.block(&["10.98.0.0/24"]);
    assert_eq!(
        uplink(&gate, &tcp4(REMOTE4, host, 40003, 8082, SYN)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("blocked"), 1);
    assert_eq!(gate.counter("dropped_before_conntrack"), 4);
}

#[test]
fn the_uplink_program_only_counts_in_audit_mode() {
    let Some(mut gate) = Gate::load(GateConfig {
        audit: true,
        ..GateConfig::default()
    }) else {
        return;
    };
    use gate_common::{AllowKey, AllowValue, NO_RULE, PROTO_TCP};
    let host = [10, 98, 0, 1];
    gate.datapath
        .sync_local_addrs(&[ipv4_mapped(host)].into())
        .expect("local addresses");
    let entries = [(
        AllowKey::new([0; 16], PROTO_TCP, 8080),
        AllowValue::any_source(NO_RULE),
    )]
    .into();
    gate.datapath.sync_host_ports(&entries).expect("host ports");
    let frame = tcp4(REMOTE4, host, 40000, 8080, SYN);
    assert_eq!(
        gate.run(program_names::FROM_UPLINKS, &frame, FORWARDED),
        Verdict::Pass
    );
    assert_eq!(gate.counter("not_allowed"), 1);
    assert_eq!(gate.counter("audit_passed"), 1);
    assert_eq!(gate.counter("dropped_before_conntrack"), 0);
}

/// Four times the table's capacity of new connections, from outside to an allowed port and
/// from the container to many destinations: the 50 idle established connections all survive
/// (a new connection lives in the unreplied table until its first reply).
#[test]
fn a_flood_of_new_connections_evicts_no_established_one() {
    let capacities = Capacities {
        flows: 4_096,
        ..Capacities::default()
    };
    let Some(mut gate) = Gate::load_with(GateConfig::default(), capacities) else {
        return;
    };
    gate.allow("10.99.0.2", "80/tcp");
    let remote = |i: u32| [10, 98, (i >> 8) as u8, i as u8];
    for i in 0..50 {
        assert_eq!(
            gate.toward(&tcp4(remote(i), CONTAINER4, 40000, 80, SYN)),
            Verdict::Pass
        );
        gate.sent_by_container(&tcp4(CONTAINER4, remote(i), 80, 40000, SYN_ACK));
        assert_eq!(
            gate.toward(&tcp4(remote(i), CONTAINER4, 40000, 80, ACK)),
            Verdict::Pass
        );
    }
    assert_eq!(
        gate.datapath.tracked_flows().expect("count"),
        50,
        "counted in batches"
    );
    // Answered, as a listening container answers SYNs from forged sources, and as the
    // destinations a scanning container reaches answer it; never continued.
    let flood = 4 * capacities.flows;
    let source = |i: u32| [10, 200 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
    let destination = |i: u32| [10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
    for i in 0..flood {
        assert_eq!(
            gate.toward(&tcp4(source(i), CONTAINER4, 40000, 80, SYN)),
            Verdict::Pass
        );
        gate.sent_by_container(&tcp4(CONTAINER4, source(i), 80, 40000, SYN_ACK));
        gate.sent_by_container(&tcp4(CONTAINER4, destination(i), 50000, 443, SYN));
        assert_eq!(
            gate.toward(&tcp4(destination(i), CONTAINER4, 443, 50000, SYN_ACK)),
            Verdict::Pass
        );
    }
    // An LRU map evicts a little before it is full (each CPU keeps free entries of its own).
    let tracked = gate.datapath.tracked_flows().expect("count");
    assert!(
        tracked >= capacities.flows as usize * 3 / 4,
        "the flood filled the replied table ({tracked} flows tracked)"
    );
    let survivors = (0..50)
        .filter(|i| gate.toward(&tcp4(remote(*i), CONTAINER4, 40000, 80, ACK)) == Verdict::Pass)
        .count();
    assert_eq!(
        survivors, 50,
        "established connections evicted by the flood"
    );
    // The latest new connections are still tracked: their handshakes complete.
    let last = flood - 1;
    assert_eq!(
        gate.toward(&tcp4(source(last), CONTAINER4, 40000, 80, ACK)),
        Verdict::Pass
    );
    gate.sent_by_container(&tcp4(CONTAINER4, destination(last), 50000, 443, ACK));
    assert_eq!(
        gate.toward(&tcp4(destination(last), CONTAINER4, 443, 50000, ACK)),
        Verdict::Pass
    );
}

/// A closed connection's port pair reused for a new one: the new connection gets its own
/// state (the closed one, in the replied table, must not shadow it).
#[test]
fn a_reused_port_pair_is_a_new_connection() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    let handshake = |gate: &Gate| {
        assert_eq!(
            gate.toward(&tcp4(REMOTE4, CONTAINER4, 41500, 80, SYN)),
            Verdict::Pass
        );
        gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 41500, SYN_ACK));
        assert_eq!(
            gate.toward(&tcp4(REMOTE4, CONTAINER4, 41500, 80, ACK)),
            Verdict::Pass
        );
    };
    handshake(&gate);
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 41500, RST));
    handshake(&gate);
    assert_eq!(gate.counter("flow_created"), 2);
    // The new connection is the tracked one: a reset ends it, and then a bare ACK is refused.
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 41500, RST));
    gate.expire_flows();
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 41500, 80, ACK)),
        Verdict::Drop
    );
}

/// An upgrade across layouts: the flows an older layout's tables track (here another gate's
/// tables, moved to where an older layout's are pinned) are copied into this layout's, so the
/// established connection passes the new programs; a table of another shape is left alone.
#[test]
fn an_older_layouts_tracked_flows_are_adopted() {
    let Some(mut older) = Gate::load(GateConfig::default()) else {
        return;
    };
    older.allow("10.99.0.2", "80");
    assert_eq!(
        older.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN)),
        Verdict::Pass
    );
    older.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 40000, SYN_ACK));
    // A connection request that got no answer yet.
    assert_eq!(
        older.toward(&tcp4(REMOTE4, CONTAINER4, 40001, 80, SYN)),
        Verdict::Pass
    );

    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    let ack = tcp4(REMOTE4, CONTAINER4, 40000, 80, ACK);
    assert_eq!(gate.toward(&ack), Verdict::Drop, "not tracked here yet");
    let old_maps = gate.dir.join("v1").join("maps");
    std::fs::create_dir_all(old_maps.parent().expect("v1")).expect("v1");
    std::fs::rename(
        older.dir.join(gate_common::LAYOUT_VERSION).join("maps"),
        &old_maps,
    )
    .expect("move the older gate's maps to where an older layout's are");
    // And a layout whose flow table has another shape.
    let odd = gate.dir.join("v0").join("maps");
    std::fs::create_dir_all(&odd).expect("v0");
    let odd_flows = odd.join(gate_common::map_names::FLOWS);
    let odd_str = odd_flows.to_str().expect("UTF-8 path");
    bpftool_json(&[
        "map", "create", odd_str, "type", "lru_hash", "key", "4", "value", "4", "entries", "8",
        "name", "FLOWS",
    ]);
    bpftool_json(&[
        "map", "update", "pinned", odd_str, "key", "1", "0", "0", "0", "value", "2", "0", "0", "0",
    ]);
    let odd_map = bpftool_json(&["map", "show", "pinned", odd_str]);
    assert_eq!(
        (&odd_map["type"], &odd_map["bytes_key"]),
        (&serde_json::json!("lru_hash"), &serde_json::json!(4)),
        "the odd table is pinned, with its own shape: {odd_map}"
    );

    let adopted = gate.datapath.adopt_flows(&gate.dir).expect("adopt");
    assert_eq!(adopted, 2, "the answered and the unanswered connection");
    assert_eq!(gate.toward(&ack), Verdict::Pass, "the adopted connection");
    assert_eq!(
        gate.datapath.tracked_flows().expect("flows"),
        2,
        "one in each table"
    );
    assert_eq!(
        gate.datapath.adopt_flows(&gate.dir).expect("adopt again"),
        0,
        "a flow tracked here already is not replaced"
    );
    datapath::retire_other_layouts(&gate.dir).expect("retire");
    assert!(!old_maps.exists(), "the older layout's pins are gone");
    assert_eq!(gate.toward(&ack), Verdict::Pass);
}

/// `--max-rules 100000`: the per-rule counters are sized at load time; a saved rule with the
/// last saved id counts in its slot, read in a batch like the others, and a pinned counters
/// map of another size is refused.
#[test]
fn rule_counters_are_sized_by_max_rules_and_read_in_batches() {
    let capacities = Capacities {
        rules: 100_000,
        ..Capacities::default()
    };
    let Some(mut gate) = Gate::load_with(GateConfig::default(), capacities) else {
        return;
    };
    assert_eq!(
        bpftool_json(&[
            "map",
            "show",
            "pinned",
            gate.dir
                .join(gate_common::LAYOUT_VERSION)
                .join("maps")
                .join(gate_common::map_names::RULE_STATS)
                .to_str()
                .expect("UTF-8 path"),
        ])["max_entries"],
        200_000,
        "saved and derived rules' slots"
    );
    let rule = |id: u32, address: &str| gate_user::policy::Rule {
        id,
        target: target(address),
        ports: spec("80"),
        access: Access::default(),
    };
    gate.rules =
        gate_user::policy::RuleSet::new(vec![rule(0, "10.99.0.3"), rule(99_999, "10.99.0.2")])
            .with_limit(100_000);
    gate.sync();
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN)),
        Verdict::Pass
    );
    let stats = gate
        .datapath
        .rule_stats_of([0, 99_999, 150_000, 250_000])
        .expect("stats");
    assert_eq!(stats[&99_999].packets, 1, "{stats:?}");
    assert_eq!(stats[&0].packets, 0);
    assert_eq!(stats[&150_000].packets, 0, "a derived slot, unused");
    assert!(!stats.contains_key(&250_000), "beyond the slots: nothing");
    assert_eq!(
        gate.datapath.rule_stats(99_999).expect("stats"),
        stats[&99_999]
    );
    // Another size on the same pins: refused, not reused.
    match Datapath::load_with(&gate.dir, GateConfig::default(), Capacities::default()) {
        Err(datapath::DatapathError::IncompatibleMap { path, detail }) => {
            assert!(
                path.ends_with(gate_common::map_names::RULE_STATS),
                "{path:?}: {detail}"
            );
        }
        Err(other) => panic!("expected IncompatibleMap, got: {other}"),
        Ok(_) => panic!("counters of another size were reused"),
    }
}
