//! The gate's programs with rules that name sources or interfaces, and the block list, loaded
//! into the real kernel and run through BPF_PROG_TEST_RUN. Needs root; skipped with a message
//! otherwise.

mod support;

use support::*;

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
