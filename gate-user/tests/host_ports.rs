//! The gate's programs for published host ports, loaded into the real kernel and run through
//! BPF_PROG_TEST_RUN: the socket lookup (connections that reach a local socket: docker-proxy,
//! rootless relays) and the early drop on uplinks. Needs root; skipped with a message otherwise.

mod support;

use gate_common::ipv4_mapped;
use support::*;

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
