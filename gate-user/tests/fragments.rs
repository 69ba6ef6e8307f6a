//! Fragmented datagrams through the real programs (BPF_PROG_TEST_RUN): the first fragment,
//! which carries the ports, decides; later ones follow it, and nothing else passes as one.
//! Needs root; skipped with a message otherwise.

mod support;

use support::*;

/// A `size`-byte UDP datagram from the remote to the container's port `dport`, cut into
/// fragments on a 1500-byte MTU: IPv4 then IPv6.
fn datagrams(dport: u16, size: usize, id: u16) -> [Vec<Vec<u8>>; 2] {
    let data = vec![0x5a; size];
    [
        fragmented::ipv4(&udp4_carrying(REMOTE4, CONTAINER4, 5000, dport, &data), id),
        fragmented::ipv6(
            &udp6_carrying(REMOTE6, CONTAINER6, 5000, dport, &data),
            u32::from(id),
        ),
    ]
}

#[test]
fn later_fragments_follow_an_admitted_first_fragment_in_either_order() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "53/udp");
    gate.allow("fd99::2", "53/udp");
    let mut later_fragments = 0;
    for (size, id) in [(3000, 1), (9000, 2)] {
        for fragments in datagrams(53, size, id) {
            assert!(fragments.len() >= 3, "{size} bytes is at least 3 fragments");
            assert_eq!(gate.toward(&fragments[0]), Verdict::Pass, "first fragment");
            // The rest in reverse order, as some stacks send them.
            for fragment in fragments[1..].iter().rev() {
                assert_eq!(gate.toward(fragment), Verdict::Pass, "later fragment");
            }
            later_fragments += fragments.len() as u64 - 1;
        }
    }
    assert_eq!(gate.counter("fragment_followed"), later_fragments);
    assert_eq!(gate.counter("fragment"), 0);
}

#[test]
fn a_fragmented_datagram_to_a_closed_port_is_dropped_whole() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "53/udp");
    gate.allow("fd99::2", "53/udp");
    for fragments in datagrams(54, 3000, 3) {
        for fragment in &fragments {
            assert_eq!(gate.toward(fragment), Verdict::Drop);
        }
    }
    assert_eq!(gate.counter("not_allowed"), 2, "each first fragment");
    assert_eq!(gate.counter("fragment"), 4, "each later one");
}

#[test]
fn a_later_fragment_before_its_first_is_dropped() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "53/udp");
    gate.allow("fd99::2", "53/udp");
    for fragments in datagrams(53, 3000, 4) {
        // The ports that decide are in the first fragment: none seen yet, nothing passes.
        assert_eq!(gate.toward(&fragments[1]), Verdict::Drop);
        assert_eq!(gate.toward(&fragments[0]), Verdict::Pass);
        assert_eq!(gate.toward(&fragments[1]), Verdict::Pass, "sent again");
    }
    assert_eq!(gate.counter("fragment"), 2);
}

#[test]
fn forged_fragments_cannot_ride_an_admitted_datagram() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "53/udp");
    let admitted = fragmented::ipv4(&udp4_carrying(REMOTE4, CONTAINER4, 5000, 53, &[0; 3000]), 9);
    assert_eq!(gate.toward(&admitted[0]), Verdict::Pass);
    let forge = |src: [u8; 4], dst: [u8; 4], proto: u8, id: u16| {
        let mut fragment = admitted[1].clone();
        fragment[14 + 9] = proto;
        fragment[18..20].copy_from_slice(&id.to_be_bytes());
        fragment[26..30].copy_from_slice(&src);
        fragment[30..34].copy_from_slice(&dst);
        fragment
    };
    let other_container = [10, 99, 0, 3];
    let elsewhere = [10, 98, 0, 9];
    for (what, fragment) in [
        (
            "to another container",
            forge(REMOTE4, other_container, 17, 9),
        ),
        ("from another source", forge(elsewhere, CONTAINER4, 17, 9)),
        ("another protocol", forge(REMOTE4, CONTAINER4, 6, 9)),
        ("another datagram", forge(REMOTE4, CONTAINER4, 17, 10)),
    ] {
        assert_eq!(gate.toward(&fragment), Verdict::Drop, "{what}");
    }
    assert_eq!(gate.counter("fragment"), 4);
    // A TCP fragment at offset 8 could only rewrite the header's flags (RFC 1858).
    let mut overlapping = forge(REMOTE4, CONTAINER4, 6, 9);
    overlapping[20..22].copy_from_slice(&0x2001u16.to_be_bytes());
    assert_eq!(gate.toward(&overlapping), Verdict::Drop);
    assert_eq!(gate.counter("malformed"), 1);
    // A "first" fragment to a port no rule opens is judged on its own.
    let mut other_port = admitted[0].clone();
    other_port[36..38].copy_from_slice(&54u16.to_be_bytes());
    assert_eq!(gate.toward(&other_port), Verdict::Drop);
}

#[test]
fn fragmented_replies_to_a_containers_own_flow_pass() {
    let Some(gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    // The container asks (a DNS query, itself fragmented: its first fragment opens the
    // flow), the answer comes back in fragments: no rule needed, IPv4 and IPv6.
    let query4 = fragmented::ipv4(
        &udp4_carrying(CONTAINER4, REMOTE4, 40000, 53, &[1; 2000]),
        5,
    );
    let query6 = fragmented::ipv6(
        &udp6_carrying(CONTAINER6, REMOTE6, 40000, 53, &[1; 2000]),
        5,
    );
    for fragment in query4.iter().chain(&query6) {
        gate.sent_by_container(fragment);
    }
    let answers = [
        fragmented::ipv4(
            &udp4_carrying(REMOTE4, CONTAINER4, 53, 40000, &[2; 9000]),
            6,
        ),
        fragmented::ipv6(
            &udp6_carrying(REMOTE6, CONTAINER6, 53, 40000, &[2; 9000]),
            6,
        ),
    ];
    for answer in answers {
        for fragment in &answer {
            assert_eq!(gate.toward(fragment), Verdict::Pass);
        }
    }
    assert_eq!(gate.counter("fragment"), 0);
}
