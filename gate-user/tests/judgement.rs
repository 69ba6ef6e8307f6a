//! What the flow table may not decide on its own, through the real programs
//! (BPF_PROG_TEST_RUN): a connection request is judged by the rules in force whatever the
//! table holds, a cut connection passes neither way, and only a flow's own container changes
//! its state. Needs root; skipped with a message otherwise.

mod support;

use gate_common::{FlowKey, ORIGIN_REMOTE, ipv4_mapped, tcp};
use support::*;

fn flow_key4(remote_port: u16, container_port: u16, proto: u8) -> FlowKey {
    FlowKey {
        container_addr: ipv4_mapped(CONTAINER4),
        remote_addr: ipv4_mapped(REMOTE4),
        container_port,
        remote_port,
        proto,
        _pad: [0; 3],
    }
}

/// A connection from the remote's `port` to the container's port 80: handshake done.
fn establish(gate: &Gate, port: u16) {
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, port, 80, SYN)),
        Verdict::Pass
    );
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, port, SYN_ACK));
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, port, 80, ACK)),
        Verdict::Pass
    );
}

#[test]
fn a_syn_over_a_stale_flow_is_judged_by_the_rules_in_force() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    // Half-open: the container answered, the client never completed (it dropped its RST).
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 41001, 80, SYN)),
        Verdict::Pass
    );
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 41001, SYN_ACK));
    establish(&gate, 41002);
    gate.deny("10.99.0.2", "80");
    // The established connection continues...
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 41002, 80, ACK)),
        Verdict::Pass
    );
    // ...but no SYN on either entry opens anything: the rule is gone.
    for port in [41001, 41002] {
        assert_eq!(
            gate.toward(&tcp4(REMOTE4, CONTAINER4, port, 80, SYN)),
            Verdict::Drop,
            "SYN from {port}"
        );
    }
    assert_eq!(gate.counter("not_allowed"), 2);
    // A bare SYN toward a port the container connected from is a request too.
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 40500, 443, SYN));
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 443, 40500, SYN)),
        Verdict::Drop
    );
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 443, 40500, SYN_ACK)),
        Verdict::Pass
    );
}

#[test]
fn unanswered_udp_and_echo_flows_let_nothing_new_in_after_a_change() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "5353/udp");
    gate.allow("10.99.0.2", "icmp");
    gate.allow("fd99::2", "5353/udp");
    let udp = udp4(REMOTE4, CONTAINER4, 6000, 5353);
    let udp6 = udp6(REMOTE6, CONTAINER6, 6000, 5353);
    let ping = echo4(REMOTE4, CONTAINER4, 77, true);
    for frame in [&udp, &udp6, &ping] {
        assert_eq!(gate.toward(frame), Verdict::Pass);
    }
    // An answered UDP flow is established: it continues after the deny, as in nftables.
    let answered = udp4(REMOTE4, CONTAINER4, 6001, 5353);
    assert_eq!(gate.toward(&answered), Verdict::Pass);
    gate.sent_by_container(&udp4(CONTAINER4, REMOTE4, 5353, 6001));
    gate.deny("10.99.0.2", "5353/udp");
    gate.deny("10.99.0.2", "icmp");
    gate.deny("fd99::2", "5353/udp");
    // Kept alive by the peer alone, the unanswered ones admit nothing more.
    for frame in [&udp, &udp6, &ping] {
        assert_eq!(gate.toward(frame), Verdict::Drop);
    }
    assert_eq!(gate.toward(&answered), Verdict::Pass);
    // A block applies the same way to an unanswered flow that a rule still admits.
    gate.allow("10.99.0.2", "5353/udp");
    assert_eq!(gate.toward(&udp), Verdict::Pass);
    gate.block(&["10.98.0.0/16"]);
    assert_eq!(gate.toward(&udp), Verdict::Drop);
    assert_eq!(gate.counter("blocked"), 1);
}

#[test]
fn a_block_ends_live_connections_both_ways() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    gate.allow("fd99::2", "80");
    establish(&gate, 42000);
    assert_eq!(
        gate.toward(&tcp6(REMOTE6, CONTAINER6, 42000, 80, SYN)),
        Verdict::Pass
    );
    gate.sent_by_container(&tcp6(CONTAINER6, REMOTE6, 80, 42000, SYN_ACK));
    // One the container opened to the same host, and one from a host that is not blocked.
    gate.sent_by_container(&udp4(CONTAINER4, REMOTE4, 40000, 53));
    assert_eq!(
        gate.toward(&udp4(REMOTE4, CONTAINER4, 53, 40000)),
        Verdict::Pass
    );
    let other = [10, 97, 0, 2];
    assert_eq!(
        gate.toward(&tcp4(other, CONTAINER4, 42001, 80, SYN)),
        Verdict::Pass
    );

    assert_eq!(gate.block(&["10.98.0.2", "fd98::/64"]), 3);
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 42000, 80, ACK)),
        Verdict::Drop
    );
    assert_eq!(
        gate.verdict_on_container_packet(&tcp4(CONTAINER4, REMOTE4, 80, 42000, ACK)),
        Verdict::Drop
    );
    assert_eq!(
        gate.toward(&tcp6(REMOTE6, CONTAINER6, 42000, 80, ACK)),
        Verdict::Drop
    );
    assert_eq!(
        gate.verdict_on_container_packet(&udp4(CONTAINER4, REMOTE4, 40000, 53)),
        Verdict::Drop
    );
    assert_eq!(
        gate.toward(&udp4(REMOTE4, CONTAINER4, 53, 40000)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("cut"), 5);
    // Another source is unaffected; a new SYN from the blocked one is refused as blocked.
    assert_eq!(
        gate.toward(&tcp4(other, CONTAINER4, 42001, 80, ACK)),
        Verdict::Pass
    );
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 42000, 80, SYN)),
        Verdict::Drop
    );
    assert_eq!(gate.counter("blocked"), 1);
    // Unblocked, a new connection replaces the cut one.
    assert_eq!(gate.block(&[]), 0);
    establish(&gate, 42000);
}

#[test]
fn a_cut_connection_passes_neither_way_until_a_new_one_is_admitted() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    establish(&gate, 43000);
    establish(&gate, 43001);
    // What `deny --cut` does once the rule is gone: end the flows of that rule.
    gate.deny("10.99.0.2", "80");
    let cut = gate
        .datapath
        .cut_flows(|key, state| state.origin == ORIGIN_REMOTE && key.remote_port == 43000)
        .expect("cut");
    assert_eq!(cut, 1);
    assert_eq!(gate.datapath.flows_cut(), 1);
    let state = gate
        .flow(&flow_key4(43000, 80, 6))
        .expect("still tracked, as cut");
    assert_eq!(state.tcp_state, tcp::CLOSED);
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 43000, 80, ACK)),
        Verdict::Drop
    );
    assert_eq!(
        gate.verdict_on_container_packet(&tcp4(CONTAINER4, REMOTE4, 80, 43000, ACK)),
        Verdict::Drop
    );
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 43001, 80, ACK)),
        Verdict::Pass,
        "not cut"
    );
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 43000, 80, SYN)),
        Verdict::Drop
    );
    gate.allow("10.99.0.2", "80");
    establish(&gate, 43000);
}

#[test]
fn a_neighbour_cannot_reset_or_answer_a_containers_connection() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    establish(&gate, 44000);
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 44001, 80, SYN)),
        Verdict::Pass
    );
    // The container now sits on another bridge port; test runs come from a neighbour's.
    gate.bind_container_to(99);
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 44000, RST));
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 44001, SYN_ACK));
    assert_eq!(gate.counter("foreign_source"), 2);
    let established = gate.flow(&flow_key4(44000, 80, 6)).expect("tracked");
    assert_eq!(
        established.tcp_state,
        tcp::ESTABLISHED,
        "not reset by the forgery"
    );
    let half_open = gate.flow(&flow_key4(44001, 80, 6)).expect("tracked");
    assert_eq!(
        half_open.tcp_state,
        tcp::SYN_SENT,
        "not answered by the forgery"
    );
    // Plain data from the neighbour changes nothing either way, and passes (never dropped).
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 44000, ACK));
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 44000, 80, ACK)),
        Verdict::Pass
    );
}
