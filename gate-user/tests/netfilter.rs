//! The netfilter delegation rules, in real network namespaces: every backend (iptables-legacy,
//! iptables-nft, ip6tables-*, native nftables), idempotence, restoring after a reload, moving
//! into DOCKER-USER, placement after the operator's own rules (and moving there when the
//! operator adds rules later), removal that spares foreign rules, and real DNATed traffic
//! through a FORWARD DROP router before and after, also from a source the operator drops.
//!
//! Netfilter state is per network namespace. Each test creates its own namespaces (removed on
//! drop) and calls the module from a thread that entered one with setns(2): the iptables and
//! nft processes it starts inherit that thread's namespace (checked on every call), so the
//! host's own firewall is never touched. Needs root; skipped with a message otherwise.

mod netns;

use gate_user::netfilter::{self, Delegation, DelegationStatus};
use netns::*;

#[test]
fn accept_policy_needs_nothing_and_creates_nothing() {
    let Some(ns) = Netns::new() else { return };
    let mut delegation = Delegation::new();
    let statuses = ns.ensure(&mut delegation, &[BR]);
    assert_eq!(
        statuses,
        [DelegationStatus {
            bridge: BR.to_owned(),
            backend: "none".to_owned(),
            chain: "not needed".to_owned(),
            installed: false,
            replies: false,
        }]
    );
    assert_eq!(delegation.status(), statuses);
    assert_eq!(ns.check_and_restore(&mut delegation), 0);
    // Looking did not create anything: no nftables table, no legacy table.
    assert_eq!(ns.exec(&["nft", "list", "ruleset"]).trim(), "");
    assert_eq!(ns.exec(&["cat", "/proc/net/ip_tables_names"]).trim(), "");
    assert_eq!(ns.exec(&["cat", "/proc/net/ip6_tables_names"]).trim(), "");
    assert_eq!(ns.remove_all(), 0);
}

#[test]
fn iptables_nft_drop_policy_gets_one_rule_at_the_end_of_forward() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    ns.exec(&["iptables-nft", "-A", "FORWARD", "-i", BR, "-j", "ACCEPT"]);
    let mut delegation = Delegation::new();
    let statuses = ns.ensure(&mut delegation, &[BR]);
    assert_eq!(statuses, [status(BR, "iptables-nft", "FORWARD")]);
    let expected = vec![format!("-A FORWARD -i {BR} -j ACCEPT"), ours("FORWARD", BR)];
    assert_eq!(ns.rules("iptables-nft", "FORWARD"), expected);
    // Idempotent: a second ensure and a check change nothing.
    assert_eq!(ns.ensure(&mut delegation, &[BR]), statuses);
    assert_eq!(ns.check_and_restore(&mut delegation), 0);
    assert_eq!(ns.rules("iptables-nft", "FORWARD"), expected);
    // Nothing anywhere else: no IPv6 rule (its policy accepts), no legacy table.
    assert!(ns.rules("ip6tables-nft", "FORWARD").is_empty());
    assert_eq!(ns.exec(&["cat", "/proc/net/ip_tables_names"]).trim(), "");
}

#[test]
fn docker_user_gets_the_rule_when_docker_owns_forward() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    docker_owns(&ns, BR);
    ns.exec(&["iptables-nft", "-A", "DOCKER-USER", "-j", "RETURN"]);
    ns.exec(&["iptables-nft", "-I", "FORWARD", "1", "-j", "DOCKER-USER"]);
    let mut delegation = Delegation::new();
    let statuses = ns.ensure(&mut delegation, &[BR]);
    assert_eq!(statuses, [status(BR, "iptables-nft", "DOCKER-USER")]);
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
            format!("-A FORWARD -o {BR} -j DOCKER")
        ]
    );
}

#[test]
fn moves_into_docker_user_when_docker_starts_later() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    let mut delegation = Delegation::new();
    assert_eq!(
        ns.ensure(&mut delegation, &[BR]),
        [status(BR, "iptables-nft", "FORWARD")]
    );
    // Docker starts: DOCKER-USER, jumped to first.
    docker_owns(&ns, BR);
    ns.exec(&["iptables-nft", "-I", "FORWARD", "1", "-j", "DOCKER-USER"]);
    assert_eq!(ns.check_and_restore(&mut delegation), 1);
    assert_eq!(
        delegation.status(),
        [status(BR, "iptables-nft", "DOCKER-USER")]
    );
    assert_eq!(
        ns.rules("iptables-nft", "DOCKER-USER"),
        [ours("DOCKER-USER", BR)]
    );
    assert_eq!(
        ns.rules("iptables-nft", "FORWARD"),
        [
            "-A FORWARD -j DOCKER-USER".to_owned(),
            format!("-A FORWARD -o {BR} -j DOCKER")
        ]
    );
}

#[test]
fn a_reload_that_removes_the_rule_is_repaired() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    docker_owns(&ns, BR);
    ns.exec(&["iptables-nft", "-A", "DOCKER-USER", "-j", "RETURN"]);
    ns.exec(&["iptables-nft", "-A", "FORWARD", "-j", "DOCKER-USER"]);
    let mut delegation = Delegation::new();
    ns.ensure(&mut delegation, &[BR]);
    let with_rule = ns.rules("iptables-nft", "DOCKER-USER");

    // A reload that flushes the chain.
    ns.exec(&["iptables-nft", "-F", "DOCKER-USER"]);
    ns.exec(&["iptables-nft", "-A", "DOCKER-USER", "-j", "RETURN"]);
    assert_eq!(ns.check_and_restore(&mut delegation), 1);
    assert_eq!(ns.rules("iptables-nft", "DOCKER-USER"), with_rule);
    assert_eq!(ns.check_and_restore(&mut delegation), 0);

    // A reload with iptables-restore of a ruleset saved without our rule.
    let saved = ns.exec(&["iptables-nft-save", "-t", "filter"]);
    let comment = netfilter::comment_for(BR);
    let without: String = saved
        .lines()
        .filter(|line| !line.contains(&comment))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_ne!(saved.lines().count(), without.lines().count());
    ns.exec_stdin(&["iptables-nft-restore"], &without);
    assert!(
        ns.rules("iptables-nft", "DOCKER-USER")
            .iter()
            .all(|line| !line.contains(&comment))
    );
    assert_eq!(ns.check_and_restore(&mut delegation), 1);
    assert_eq!(ns.rules("iptables-nft", "DOCKER-USER"), with_rule);
    assert_eq!(
        delegation.status(),
        [status(BR, "iptables-nft", "DOCKER-USER")]
    );
}

/// ensure() with a drop policy, then remove_all() leaves everything not ours alone.
fn install_and_remove(ns: &Netns, tool: &str, backend: &str) {
    ns.exec(&[tool, "-P", "FORWARD", "DROP"]);
    let foreign = [
        format!("-A FORWARD -o {BR} -m comment --comment \"someone else\" -j ACCEPT"),
        // Looks like ours but is not exactly our comment.
        format!(
            "-A FORWARD -o {BR} -m comment --comment \"portgate: delegate {BR} to a firewall\" -j ACCEPT"
        ),
        format!("-A FORWARD -o {BR} -m conntrack --ctstate DNAT -j ACCEPT"),
    ];
    for rule in &foreign {
        let words: Vec<String> = rule
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
        let mut args = vec![tool];
        args.extend(words.iter().map(String::as_str));
        ns.exec(&args);
    }
    let mut delegation = Delegation::new();
    let statuses = ns.ensure(&mut delegation, &[BR, "pgbr1"]);
    assert_eq!(
        statuses,
        [
            status(BR, backend, "FORWARD"),
            status("pgbr1", backend, "FORWARD")
        ]
    );
    // After every foreign rule (each bridge's rule appended, the policy being DROP).
    let mut expected = foreign.to_vec();
    expected.extend([ours("FORWARD", BR), ours("FORWARD", "pgbr1")]);
    assert_eq!(ns.rules(tool, "FORWARD"), expected);

    // A bridge no longer gated loses its rule.
    assert_eq!(
        ns.ensure(&mut delegation, &[BR]),
        [status(BR, backend, "FORWARD")]
    );
    let mut expected = foreign.to_vec();
    expected.push(ours("FORWARD", BR));
    assert_eq!(ns.rules(tool, "FORWARD"), expected);

    assert_eq!(ns.remove_all(), 1);
    assert_eq!(ns.rules(tool, "FORWARD"), foreign);
    assert!(
        ns.exec(&[tool, "-S", "FORWARD"])
            .contains("-P FORWARD DROP")
    );
    assert_eq!(ns.remove_all(), 0);
}

#[test]
fn remove_all_spares_foreign_rules_iptables_nft() {
    let Some(ns) = Netns::new() else { return };
    install_and_remove(&ns, "iptables-nft", "iptables-nft");
}

#[test]
fn iptables_legacy() {
    let Some(ns) = Netns::new() else { return };
    install_and_remove(&ns, "iptables-legacy", "iptables-legacy");
    // The nft side was left alone.
    assert!(ns.rules("iptables-nft", "FORWARD").is_empty());
}

#[test]
fn ip6tables_legacy_and_nft() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&["ip6tables-nft", "-P", "FORWARD", "DROP"]);
    ns.exec(&["ip6tables-legacy", "-P", "FORWARD", "DROP"]);
    let mut delegation = Delegation::new();
    let statuses = ns.ensure(&mut delegation, &[BR]);
    assert_eq!(
        statuses,
        [
            status(BR, "ip6tables-legacy", "FORWARD"),
            status(BR, "ip6tables-nft", "FORWARD")
        ]
    );
    for tool in ["ip6tables-legacy", "ip6tables-nft"] {
        assert_eq!(ns.rules(tool, "FORWARD"), [ours("FORWARD", BR)], "{tool}");
    }
    assert!(ns.rules("iptables-nft", "FORWARD").is_empty());
    ns.exec(&["ip6tables-legacy", "-F", "FORWARD"]);
    assert_eq!(ns.check_and_restore(&mut delegation), 1);
    assert_eq!(
        ns.rules("ip6tables-legacy", "FORWARD"),
        [ours("FORWARD", BR)]
    );
    assert_eq!(ns.remove_all(), 2);
    for tool in ["ip6tables-legacy", "ip6tables-nft"] {
        assert!(ns.rules(tool, "FORWARD").is_empty(), "{tool}");
    }
}

#[test]
fn firewalld_style_final_reject_counts_as_dropping() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&["iptables-nft", "-A", "FORWARD", "-s", BLOCKED, "-j", "DROP"]);
    ns.exec(&[
        "iptables-nft",
        "-A",
        "FORWARD",
        "-j",
        "REJECT",
        "--reject-with",
        "icmp-host-prohibited",
    ]);
    let mut delegation = Delegation::new();
    assert_eq!(
        ns.ensure(&mut delegation, &[BR]),
        [status(BR, "iptables-nft", "FORWARD")]
    );
    // After the operator's DROP, before the final REJECT it stands in for.
    assert_eq!(
        ns.rules("iptables-nft", "FORWARD"),
        [
            format!("-A FORWARD -s {BLOCKED}/32 -j DROP"),
            ours("FORWARD", BR),
            "-A FORWARD -j REJECT --reject-with icmp-host-prohibited".to_owned(),
        ]
    );
}

#[test]
fn docker_user_rule_goes_after_the_operators_rules() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    docker_owns(&ns, BR);
    ns.exec(&["iptables-nft", "-A", "DOCKER-USER", "-j", "RETURN"]);
    ns.exec(&["iptables-nft", "-A", "FORWARD", "-j", "DOCKER-USER"]);
    // Docker's documented way: the operator's restriction inserted at the top.
    ns.exec(&[
        "iptables-nft",
        "-I",
        "DOCKER-USER",
        "-s",
        BLOCKED,
        "-j",
        "DROP",
    ]);
    let mut delegation = Delegation::new();
    assert_eq!(
        ns.ensure(&mut delegation, &[BR]),
        [status(BR, "iptables-nft", "DOCKER-USER")]
    );
    let drop_blocked = format!("-A DOCKER-USER -s {BLOCKED}/32 -j DROP");
    let ret = "-A DOCKER-USER -j RETURN".to_owned();
    assert_eq!(
        ns.rules("iptables-nft", "DOCKER-USER"),
        [drop_blocked.clone(), ours("DOCKER-USER", BR), ret.clone()]
    );
    assert_eq!(ns.check_and_restore(&mut delegation), 0, "in place");

    // The operator later adds a rule between ours and the RETURN: ours moves after it.
    ns.exec(&[
        "iptables-nft",
        "-I",
        "DOCKER-USER",
        "3",
        "-s",
        "10.96.0.0/24",
        "-j",
        "DROP",
    ]);
    let drop_later = "-A DOCKER-USER -s 10.96.0.0/24 -j DROP".to_owned();
    assert_eq!(ns.check_and_restore(&mut delegation), 1);
    assert_eq!(
        ns.rules("iptables-nft", "DOCKER-USER"),
        [drop_blocked, drop_later, ours("DOCKER-USER", BR), ret]
    );
    assert_eq!(ns.check_and_restore(&mut delegation), 0, "in place");
    assert_eq!(
        delegation.status(),
        [status(BR, "iptables-nft", "DOCKER-USER")]
    );
}

#[test]
fn empty_docker_user_gets_the_rule_appended() {
    let Some(ns) = Netns::new() else { return };
    // Docker 28 may create DOCKER-USER without the RETURN.
    ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    docker_owns(&ns, BR);
    ns.exec(&["iptables-nft", "-A", "FORWARD", "-j", "DOCKER-USER"]);
    let mut delegation = Delegation::new();
    ns.ensure(&mut delegation, &[BR]);
    assert_eq!(
        ns.rules("iptables-nft", "DOCKER-USER"),
        [ours("DOCKER-USER", BR)]
    );
    // The operator appends a restriction: ours follows it.
    ns.exec(&[
        "iptables-nft",
        "-A",
        "DOCKER-USER",
        "-s",
        BLOCKED,
        "-j",
        "DROP",
    ]);
    assert_eq!(ns.check_and_restore(&mut delegation), 1);
    assert_eq!(
        ns.rules("iptables-nft", "DOCKER-USER"),
        [
            format!("-A DOCKER-USER -s {BLOCKED}/32 -j DROP"),
            ours("DOCKER-USER", BR)
        ]
    );
}

/// FORWARD with policy DROP and an operator's DROP: ours goes after it, and moves after a
/// rule appended later (two identical rules meanwhile: the old one is the one deleted).
fn forward_rule_follows_the_operators_rules(tool: &str) {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&[tool, "-P", "FORWARD", "DROP"]);
    ns.exec(&[tool, "-A", "FORWARD", "-s", BLOCKED, "-j", "DROP"]);
    let mut delegation = Delegation::new();
    assert_eq!(
        ns.ensure(&mut delegation, &[BR, "pgbr1"]),
        [
            status(BR, tool, "FORWARD"),
            status("pgbr1", tool, "FORWARD")
        ]
    );
    let drop_blocked = format!("-A FORWARD -s {BLOCKED}/32 -j DROP");
    assert_eq!(
        ns.rules(tool, "FORWARD"),
        [
            drop_blocked.clone(),
            ours("FORWARD", BR),
            ours("FORWARD", "pgbr1")
        ]
    );
    assert_eq!(ns.check_and_restore(&mut delegation), 0, "in place");

    ns.exec(&[tool, "-A", "FORWARD", "-s", "10.96.0.0/24", "-j", "DROP"]);
    let drop_later = "-A FORWARD -s 10.96.0.0/24 -j DROP".to_owned();
    assert_eq!(ns.check_and_restore(&mut delegation), 2, "both move");
    assert_eq!(
        ns.rules(tool, "FORWARD"),
        [
            drop_blocked.clone(),
            drop_later.clone(),
            ours("FORWARD", BR),
            ours("FORWARD", "pgbr1")
        ]
    );
    assert_eq!(ns.check_and_restore(&mut delegation), 0, "in place");

    assert_eq!(ns.remove_all(), 2);
    assert_eq!(ns.rules(tool, "FORWARD"), [drop_blocked, drop_later]);
}

#[test]
fn forward_rule_follows_the_operators_rules_iptables_nft() {
    forward_rule_follows_the_operators_rules("iptables-nft");
}

#[test]
fn forward_rule_follows_the_operators_rules_iptables_legacy() {
    forward_rule_follows_the_operators_rules("iptables-legacy");
}

#[test]
fn native_nftables_drop_chain() {
    let Some(ns) = Netns::new() else { return };
    ns.exec_stdin(
        &["nft", "-f", "-"],
        r#"table inet pgfw {
    chain forward {
        type filter hook forward priority 0; policy drop;
        iifname "pgbr0" accept comment "someone else"
    }
    chain other {
        type filter hook input priority 0; policy drop;
    }
}
"#,
    );
    // iptables-nft also drops: both need the rule (every base chain on the hook must accept).
    ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    let mut delegation = Delegation::new();
    let statuses = ns.ensure(&mut delegation, &[BR]);
    assert_eq!(
        statuses,
        [
            status(BR, "iptables-nft", "FORWARD"),
            status(BR, "nftables", "inet pgfw forward")
        ]
    );
    let ours_nft = format!(
        "oifname \"{BR}\" ct status dnat accept comment \"portgate: delegate {BR} to the eBPF gate\""
    );
    let foreign = "iifname \"pgbr0\" accept comment \"someone else\"".to_owned();
    assert_eq!(
        nft_rules(&ns, "inet", "pgfw", "forward"),
        [foreign.clone(), ours_nft.clone()]
    );
    assert!(nft_rules(&ns, "inet", "pgfw", "other").is_empty());
    assert_eq!(ns.ensure(&mut delegation, &[BR]), statuses, "idempotent");
    assert_eq!(
        nft_rules(&ns, "inet", "pgfw", "forward"),
        [foreign.clone(), ours_nft.clone()]
    );

    // A reload: the table is replaced by one without our rule (new handles).
    ns.exec_stdin(
        &["nft", "-f", "-"],
        r#"delete table inet pgfw
table inet pgfw {
    chain forward {
        type filter hook forward priority 0; policy drop;
        iifname "pgbr0" accept comment "someone else"
    }
}
"#,
    );
    assert_eq!(ns.check_and_restore(&mut delegation), 1);
    assert_eq!(
        nft_rules(&ns, "inet", "pgfw", "forward"),
        [foreign.clone(), ours_nft]
    );

    assert_eq!(ns.remove_all(), 2);
    assert_eq!(nft_rules(&ns, "inet", "pgfw", "forward"), [foreign]);
    assert!(ns.rules("iptables-nft", "FORWARD").is_empty());
}

#[test]
fn native_nftables_rule_goes_after_the_operators_rules() {
    let Some(ns) = Netns::new() else { return };
    ns.exec_stdin(
        &["nft", "-f", "-"],
        &format!(
            r#"table inet pgfw {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ip saddr {BLOCKED} drop
    }}
    chain rejecting {{
        type filter hook forward priority 10; policy accept;
        ip saddr {BLOCKED} drop
        reject
    }}
}}
"#
        ),
    );
    let mut delegation = Delegation::new();
    assert_eq!(
        ns.ensure(&mut delegation, &[BR]),
        [
            status(BR, "nftables", "inet pgfw forward"),
            status(BR, "nftables", "inet pgfw rejecting")
        ]
    );
    let drop_blocked = format!("ip saddr {BLOCKED} drop");
    // Policy drop: at the end; a final reject: just before it.
    assert_eq!(
        nft_rules(&ns, "inet", "pgfw", "forward"),
        [drop_blocked.clone(), ours_nft(BR)]
    );
    assert_eq!(
        nft_rules(&ns, "inet", "pgfw", "rejecting"),
        [drop_blocked.clone(), ours_nft(BR), "reject".to_owned()]
    );
    assert_eq!(ns.check_and_restore(&mut delegation), 0, "in place");

    // The operator appends a rule after ours: ours moves after it.
    ns.exec(&[
        "nft",
        "add",
        "rule",
        "inet",
        "pgfw",
        "forward",
        "ip",
        "saddr",
        "10.96.0.0/24",
        "drop",
    ]);
    assert_eq!(ns.check_and_restore(&mut delegation), 1);
    assert_eq!(
        nft_rules(&ns, "inet", "pgfw", "forward"),
        [
            drop_blocked.clone(),
            "ip saddr 10.96.0.0/24 drop".to_owned(),
            ours_nft(BR)
        ]
    );
    assert_eq!(ns.check_and_restore(&mut delegation), 0, "in place");
    assert_eq!(ns.remove_all(), 2);
    assert_eq!(
        nft_rules(&ns, "inet", "pgfw", "rejecting"),
        [drop_blocked, "reject".to_owned()]
    );
}

#[test]
fn invalid_bridge_names_are_refused_before_anything_changes() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    let mut delegation = Delegation::new();
    for bad in ["br+", "a b", "x\"y", ""] {
        let bridges = vec![BR.to_owned(), bad.to_owned()];
        let result = ns.run(|| delegation.ensure(&bridges));
        assert!(result.is_err(), "{bad:?} accepted");
    }
    assert!(ns.rules("iptables-nft", "FORWARD").is_empty());
}

#[test]
fn dnat_traffic_passes_a_forward_drop_router_only_with_the_rule() {
    let Some(net) = Router::new() else { return };
    // Podman's situation: a published port (DNAT), FORWARD DROP, and only the container's
    // own traffic accepted (netavark's `-s 10.88.0.0/16 -j ACCEPT`).
    net.router.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    net.router
        .exec(&["iptables-nft", "-A", "FORWARD", "-i", BR, "-j", "ACCEPT"]);
    assert!(
        timed_out(&connect(&net.client, PUBLISHED)),
        "published port must time out under FORWARD DROP without the rule"
    );

    let mut delegation = Delegation::new();
    assert_eq!(
        net.router.ensure(&mut delegation, &[BR]),
        [status(BR, "iptables-nft", "FORWARD")]
    );
    assert_eq!(
        connect(&net.client, PUBLISHED).expect("published port after ensure"),
        "hello"
    );
    // Narrow: the container's address itself, routed without DNAT, is still dropped.
    assert!(
        timed_out(&connect(&net.client, "10.99.0.2:80")),
        "routed traffic must still meet FORWARD DROP"
    );

    assert_eq!(net.router.remove_all(), 1);
    assert!(
        timed_out(&connect(&net.client, PUBLISHED)),
        "times out again after remove_all"
    );
}

#[test]
fn an_operators_drop_in_forward_still_drops_published_ports() {
    let Some(net) = Router::new() else { return };
    net.router.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    net.router
        .exec(&["iptables-nft", "-A", "FORWARD", "-s", BLOCKED, "-j", "DROP"]);
    net.router
        .exec(&["iptables-nft", "-A", "FORWARD", "-i", BR, "-j", "ACCEPT"]);
    let mut delegation = Delegation::new();
    assert_eq!(
        net.router.ensure(&mut delegation, &[BR]),
        [status(BR, "iptables-nft", "FORWARD")]
    );
    net.assert_only_the_operators_drop_holds(&[
        "iptables-nft",
        "-D",
        "FORWARD",
        "-s",
        BLOCKED,
        "-j",
        "DROP",
    ]);
}

#[test]
fn an_operators_drop_in_docker_user_still_drops_published_ports() {
    let Some(net) = Router::new() else { return };
    for args in [
        &["-P", "FORWARD", "DROP"][..],
        &["-N", "DOCKER-USER"],
        &["-N", "DOCKER"],
        &["-A", "FORWARD", "-o", BR, "-j", "DOCKER"],
        &["-A", "DOCKER-USER", "-j", "RETURN"],
        &["-A", "FORWARD", "-j", "DOCKER-USER"],
        &["-A", "FORWARD", "-i", BR, "-j", "ACCEPT"],
        &["-I", "DOCKER-USER", "-s", BLOCKED, "-j", "DROP"],
    ] {
        let mut command = vec!["iptables-nft"];
        command.extend(args);
        net.router.exec(&command);
    }
    let mut delegation = Delegation::new();
    assert_eq!(
        net.router.ensure(&mut delegation, &[BR]),
        [status(BR, "iptables-nft", "DOCKER-USER")]
    );
    net.assert_only_the_operators_drop_holds(&[
        "iptables-nft",
        "-D",
        "DOCKER-USER",
        "-s",
        BLOCKED,
        "-j",
        "DROP",
    ]);
}

#[test]
fn an_operators_drop_in_native_nftables_still_drops_published_ports() {
    let Some(net) = Router::new() else { return };
    net.router.exec_stdin(
        &["nft", "-f", "-"],
        &format!(
            r#"table inet pgfw {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ip saddr @blocked drop
        iifname "{BR}" accept
    }}
    set blocked {{
        type ipv4_addr
        elements = {{ {BLOCKED} }}
    }}
}}
"#
        ),
    );
    let mut delegation = Delegation::new();
    assert_eq!(
        net.router.ensure(&mut delegation, &[BR]),
        [status(BR, "nftables", "inet pgfw forward")]
    );
    net.assert_only_the_operators_drop_holds(&["nft", "flush", "set", "inet", "pgfw", "blocked"]);
}

#[test]
fn remove_for_takes_only_the_named_bridges_rules() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    let mut delegation = Delegation::new();
    ns.ensure(&mut delegation, &[BR, "pgother0"]);
    assert_eq!(ns.rules("iptables-nft", "FORWARD").len(), 2);
    let ours_only: std::collections::BTreeSet<String> = [BR.to_owned()].into();
    let removed = ns
        .run(|| netfilter::remove_for(&ours_only))
        .expect("remove_for");
    assert_eq!(removed, 1);
    assert_eq!(
        ns.rules("iptables-nft", "FORWARD"),
        [ours("FORWARD", "pgother0")]
    );
}

/// A bridge of an nftables-only engine (netavark's nftables driver) gets its replies rule
/// next to its rule toward the bridge, in iptables and in native nftables alike; another
/// bridge gets none; `remove_all` takes both.
#[test]
fn replies_rule_only_for_the_bridges_that_need_it() {
    let Some(ns) = Netns::new() else { return };
    const OTHER: &str = "pgbr1";
    ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    ns.exec_stdin(
        &["nft", "-f", "-"],
        r#"table inet pgfw {
    chain forward {
        type filter hook forward priority 0; policy drop;
    }
}
"#,
    );
    let mut delegation = Delegation::new();
    let replies = netfilter::replies_key(BR);
    let statuses = ns.ensure(&mut delegation, &[BR, &replies, OTHER]);
    let replies_status = |backend: &str, chain: &str| DelegationStatus {
        replies: true,
        ..status(BR, backend, chain)
    };
    assert_eq!(
        statuses,
        [
            status(BR, "iptables-nft", "FORWARD"),
            replies_status("iptables-nft", "FORWARD"),
            status(OTHER, "iptables-nft", "FORWARD"),
            status(BR, "nftables", "inet pgfw forward"),
            replies_status("nftables", "inet pgfw forward"),
            status(OTHER, "nftables", "inet pgfw forward"),
        ]
    );
    let replies_rule = format!(
        "-A FORWARD -i {BR} -m conntrack --ctstate DNAT --ctdir REPLY -m comment --comment \"portgate: delegate {BR} replies to the eBPF gate\" -j ACCEPT"
    );
    assert_eq!(
        ns.rules("iptables-nft", "FORWARD"),
        [
            ours("FORWARD", BR),
            replies_rule.clone(),
            ours("FORWARD", OTHER)
        ]
    );
    assert_eq!(
        nft_rules(&ns, "inet", "pgfw", "forward"),
        [
            ours_nft(BR),
            format!(
                "iifname \"{BR}\" ct status dnat ct direction reply accept comment \"portgate: delegate {BR} replies to the eBPF gate\""
            ),
            ours_nft(OTHER)
        ]
    );
    assert_eq!(ns.check_and_restore(&mut delegation), 0, "in place");

    // A firewall reload drops the replies rule: it comes back.
    ns.exec(&[
        "iptables-nft",
        "-D",
        "FORWARD",
        "-i",
        BR,
        "-m",
        "conntrack",
        "--ctstate",
        "DNAT",
        "--ctdir",
        "REPLY",
        "-m",
        "comment",
        "--comment",
        &format!("portgate: delegate {BR} replies to the eBPF gate"),
        "-j",
        "ACCEPT",
    ]);
    assert_eq!(ns.check_and_restore(&mut delegation), 1);
    assert!(ns.rules("iptables-nft", "FORWARD").contains(&replies_rule));

    // The engine no longer needs it: it goes, the rule toward the bridge stays.
    ns.ensure(&mut delegation, &[BR, OTHER]);
    assert_eq!(
        ns.rules("iptables-nft", "FORWARD"),
        [ours("FORWARD", BR), ours("FORWARD", OTHER)]
    );
    assert_eq!(
        nft_rules(&ns, "inet", "pgfw", "forward"),
        [ours_nft(BR), ours_nft(OTHER)]
    );
    ns.ensure(&mut delegation, &[BR, &replies]);
    assert_eq!(ns.remove_all(), 4);
    assert!(ns.rules("iptables-nft", "FORWARD").is_empty());
    assert!(nft_rules(&ns, "inet", "pgfw", "forward").is_empty());
}
