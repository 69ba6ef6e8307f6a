//! The delegation rules on a host where Docker's DOCKER-USER exists, with real DNATed traffic
//! through a router namespace whose FORWARD drops: a bridge that is not Docker's gets its
//! rule in FORWARD, after the operator's own rules there (DOCKER-USER, which FORWARD jumps to
//! first, would skip them); Docker's own bridges keep theirs in DOCKER-USER. And the replies
//! rule of an nftables-only engine's bridge lets replies out, never a container's own
//! connection to a port forward elsewhere.
//!
//! Same harness as `netfilter.rs`: namespaces of the test's own, never the host's firewall.

mod netns;

use gate_user::netfilter::{self, Delegation, DelegationStatus};
use netns::*;

/// What Docker's iptables setup leaves in `filter` (Docker 20.10's layout): DOCKER-USER with
/// its RETURN, jumped to first from FORWARD, policy DROP.
fn docker_owns_forward(ns: &Netns) {
    for args in [
        &["-P", "FORWARD", "DROP"][..],
        &["-N", "DOCKER"],
        &["-N", "DOCKER-USER"],
        &["-A", "DOCKER-USER", "-j", "RETURN"],
        &["-A", "FORWARD", "-j", "DOCKER-USER"],
    ] {
        let mut command = vec!["iptables-nft"];
        command.extend(args);
        ns.exec(&command);
    }
}

/// The measured hole: a Podman or hand-made bridge on a host that also runs Docker. Its rule
/// in DOCKER-USER accepted the operator's dropped source before FORWARD's DROP was reached.
#[test]
fn an_operators_drop_in_forward_holds_for_a_bridge_docker_does_not_own() {
    let Some(net) = Router::new() else { return };
    docker_owns_forward(&net.router);
    // The operator's restriction, appended to FORWARD; then the bridge's own outbound accept
    // (netavark's iptables driver adds one like it).
    net.router
        .exec(&["iptables-nft", "-A", "FORWARD", "-s", BLOCKED, "-j", "DROP"]);
    net.router
        .exec(&["iptables-nft", "-A", "FORWARD", "-i", BR, "-j", "ACCEPT"]);
    let mut delegation = Delegation::new();
    let statuses = net.router.ensure(&mut delegation, &[BR]);
    net.assert_only_the_operators_drop_holds(&[
        "iptables-nft",
        "-D",
        "FORWARD",
        "-s",
        BLOCKED,
        "-j",
        "DROP",
    ]);
    assert_eq!(statuses, [status(BR, "iptables-nft", "FORWARD")]);
    assert_eq!(
        net.router.rules("iptables-nft", "DOCKER-USER"),
        ["-A DOCKER-USER -j RETURN"]
    );
    assert_eq!(
        net.router.rules("iptables-nft", "FORWARD").last(),
        Some(&ours("FORWARD", BR)),
        "after every rule of the host's"
    );
}

/// Docker's bridge (Docker routes it to its DOCKER chain) keeps its rule in DOCKER-USER, next
/// to a bridge that is not Docker's in FORWARD; a rule an older portgate put in DOCKER-USER
/// for the other bridge moves to FORWARD (inserted there before the old one goes).
#[test]
fn docker_bridges_in_docker_user_and_the_others_in_forward() {
    let Some(ns) = Netns::new() else { return };
    const OTHER: &str = "pgbr1";
    docker_owns_forward(&ns);
    ns.exec(&["iptables-nft", "-A", "FORWARD", "-o", BR, "-j", "DOCKER"]);
    // Left by an older portgate: every bridge's rule in DOCKER-USER.
    let old: Vec<String> = ours("DOCKER-USER", OTHER)
        .split('"')
        .enumerate()
        .flat_map(|(i, part)| {
            if i % 2 == 1 {
                vec![part.to_owned()]
            } else {
                part.split_whitespace().map(str::to_owned).collect()
            }
        })
        .collect();
    let mut insert = vec!["iptables-nft", "-I", "DOCKER-USER", "1"];
    insert.extend(old[2..].iter().map(String::as_str));
    ns.exec(&insert);

    let mut delegation = Delegation::new();
    let statuses = ns.ensure(&mut delegation, &[BR, OTHER]);
    assert_eq!(
        statuses,
        [
            status(BR, "iptables-nft", "DOCKER-USER"),
            status(OTHER, "iptables-nft", "FORWARD")
        ]
    );
    assert_eq!(
        ns.rules("iptables-nft", "DOCKER-USER"),
        [
            ours("DOCKER-USER", BR),
            "-A DOCKER-USER -j RETURN".to_owned()
        ]
    );
    assert_eq!(
        ns.rules("iptables-nft", "FORWARD"),
        [
            "-A FORWARD -j DOCKER-USER".to_owned(),
            format!("-A FORWARD -o {BR} -j DOCKER"),
            ours("FORWARD", OTHER)
        ]
    );
    assert_eq!(ns.check_and_restore(&mut delegation), 0, "in place");
    assert_eq!(ns.remove_all(), 2);
}

/// The replies rule of an nftables-only engine's bridge (netavark's nftables driver) matches
/// replies only: the published port answers through a FORWARD that drops, but a container's
/// own connection to a port forward of the operator's (a DNAT to a host outside the gated
/// bridges) still meets the FORWARD drop.
#[test]
fn the_replies_rule_lets_no_container_reach_a_port_forward_elsewhere() {
    let Some(net) = Router::new() else { return };
    net.router.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    // The operator's port forward: 10.98.0.1:9090 -> the client's 10.98.0.2:9000.
    net.router.exec(&[
        "iptables-nft",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        "10.98.0.1",
        "-p",
        "tcp",
        "--dport",
        "9090",
        "-j",
        "DNAT",
        "--to-destination",
        "10.98.0.2:9000",
    ]);
    let _forwarded = Server::start(&net.client, "10.98.0.2:9000".parse().expect("address"));
    let mut delegation = Delegation::new();
    let replies = netfilter::replies_key(BR);
    net.router.ensure(&mut delegation, &[BR, &replies]);

    assert_eq!(
        connect(&net.client, PUBLISHED).expect("published port with the replies rule"),
        "hello"
    );
    let from_container = connect(&net.container, "10.98.0.1:9090");
    assert!(
        timed_out(&from_container),
        "a container's connection to a DNATed port elsewhere must meet FORWARD's DROP, got \
         {from_container:?}"
    );
    assert_eq!(
        net.router.rules("iptables-nft", "FORWARD"),
        [
            ours("FORWARD", BR),
            format!(
                "-A FORWARD -i {BR} -m conntrack --ctstate DNAT --ctdir REPLY -m comment \
                 --comment \"portgate: delegate {BR} replies to the eBPF gate\" -j ACCEPT"
            )
        ]
    );
}

/// The same in native nftables: `ct direction reply` on the replies rule.
#[test]
fn the_replies_rule_matches_replies_only_in_native_nftables() {
    let Some(net) = Router::new() else { return };
    net.router.exec_stdin(
        &["nft", "-f", "-"],
        r#"table inet pgfw {
    chain forward {
        type filter hook forward priority 0; policy drop;
    }
    chain prerouting {
        type nat hook prerouting priority -100;
        ip daddr 10.98.0.1 tcp dport 9090 dnat ip to 10.98.0.2:9000
    }
}
"#,
    );
    let _forwarded = Server::start(&net.client, "10.98.0.2:9000".parse().expect("address"));
    let mut delegation = Delegation::new();
    let replies = netfilter::replies_key(BR);
    let statuses = net.router.ensure(&mut delegation, &[BR, &replies]);
    assert_eq!(
        statuses,
        [
            status(BR, "nftables", "inet pgfw forward"),
            DelegationStatus {
                replies: true,
                ..status(BR, "nftables", "inet pgfw forward")
            }
        ]
    );
    assert_eq!(
        connect(&net.client, PUBLISHED).expect("published port with the replies rule"),
        "hello"
    );
    let from_container = connect(&net.container, "10.98.0.1:9090");
    assert!(
        timed_out(&from_container),
        "a container's connection to a DNATed port elsewhere must meet the chain's drop, got \
         {from_container:?}"
    );
    assert_eq!(
        nft_rules(&net.router, "inet", "pgfw", "forward"),
        [
            ours_nft(BR),
            format!(
                "iifname \"{BR}\" ct status dnat ct direction reply accept comment \
                 \"portgate: delegate {BR} replies to the eBPF gate\""
            )
        ]
    );
}
