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

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use gate_user::netfilter::{self, Delegation, DelegationStatus};

const BR: &str = "pgbr0";
/// The client address the operator's own rules drop, in the tests that have one.
const BLOCKED: &str = "10.97.0.2";

/// A network namespace of this test process, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// None when the test cannot run here, after saying so (a failure in CI instead: see
    /// `portgate_test_support::skip`).
    fn new() -> Option<Self> {
        if !portgate_test_support::require_root("network namespaces, iptables, nft") {
            return None;
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pgnf-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ns = Netns { name };
        run(Command::new("ip").args(["netns", "add", &ns.name]));
        Some(ns)
    }

    /// Runs `f` on a thread inside this namespace (and checks that the processes it starts
    /// are inside it too).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        let handle = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        let inode = handle.metadata().expect("stat netns").ino();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on a valid namespace fd; it affects only this thread,
                    // which ends with the scope.
                    if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        panic!("setns({}): {}", self.name, std::io::Error::last_os_error());
                    }
                    let child = run(Command::new("readlink").arg("/proc/self/ns/net"));
                    assert_eq!(
                        child.trim(),
                        format!("net:[{inode}]"),
                        "a child of the setns thread must be in the test's namespace"
                    );
                    f()
                })
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// `ip netns exec NS ARGS...`; panics on failure; returns stdout.
    fn exec(&self, args: &[&str]) -> String {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// Feeds `input` to `ip netns exec NS ARGS...`.
    fn exec_stdin(&self, args: &[&str], input: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let status = child.wait().expect("wait");
        assert!(status.success(), "{args:?} <<< {input}: {status}");
    }

    /// The `-A` lines of `TOOL -S CHAIN`.
    fn rules(&self, tool: &str, chain: &str) -> Vec<String> {
        self.exec(&[tool, "-w", "-S", chain])
            .lines()
            .filter(|line| line.starts_with("-A "))
            .map(str::to_owned)
            .collect()
    }

    fn ensure(&self, delegation: &mut Delegation, bridges: &[&str]) -> Vec<DelegationStatus> {
        let bridges: Vec<String> = bridges.iter().map(|b| (*b).to_owned()).collect();
        self.run(|| delegation.ensure(&bridges)).expect("ensure")
    }

    fn check_and_restore(&self, delegation: &mut Delegation) -> usize {
        self.run(|| delegation.check_and_restore())
            .expect("check_and_restore")
    }

    fn remove_all(&self) -> usize {
        self.run(netfilter::remove_all).expect("remove_all")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Our rule as `iptables -S` prints it.
fn ours(chain: &str, bridge: &str) -> String {
    format!(
        "-A {chain} -o {bridge} -m conntrack --ctstate DNAT -m comment --comment \"portgate: delegate {bridge} to the eBPF gate\" -j ACCEPT"
    )
}

fn status(bridge: &str, backend: &str, chain: &str) -> DelegationStatus {
    DelegationStatus {
        bridge: bridge.to_owned(),
        backend: backend.to_owned(),
        chain: chain.to_owned(),
        installed: true,
        replies: false,
    }
}

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
    ns.exec(&["iptables-nft", "-N", "DOCKER-USER"]);
    ns.exec(&["iptables-nft", "-A", "DOCKER-USER", "-j", "RETURN"]);
    ns.exec(&["iptables-nft", "-A", "FORWARD", "-j", "DOCKER-USER"]);
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
        ["-A FORWARD -j DOCKER-USER"]
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
    ns.exec(&["iptables-nft", "-N", "DOCKER-USER"]);
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
        ["-A FORWARD -j DOCKER-USER"]
    );
}

#[test]
fn a_reload_that_removes_the_rule_is_repaired() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    ns.exec(&["iptables-nft", "-N", "DOCKER-USER"]);
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
    ns.exec(&["iptables-nft", "-N", "DOCKER-USER"]);
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
    ns.exec(&["iptables-nft", "-N", "DOCKER-USER"]);
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

/// The chain's rules as `nft -a` prints them, without handles.
fn nft_rules(ns: &Netns, family: &str, table: &str, chain: &str) -> Vec<String> {
    ns.exec(&["nft", "list", "chain", family, table, chain])
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with("table ")
                && !line.starts_with("chain ")
                && !line.starts_with("type ")
                && *line != "}"
        })
        .map(str::to_owned)
        .collect()
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

fn ours_nft(bridge: &str) -> String {
    format!(
        "oifname \"{bridge}\" ct status dnat accept comment \"portgate: delegate {bridge} to the eBPF gate\""
    )
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

/// A TCP server in a namespace that answers "hello" to every connection.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns.run(|| TcpListener::bind(addr)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.write_all(b"hello");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects from the client namespace: Ok(greeting), or the error (a timeout when dropped).
fn connect(client: &Netns, addr: &str) -> std::io::Result<String> {
    let addr: SocketAddr = addr.parse().expect("address");
    client.run(|| {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(1500))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut greeting = String::new();
        stream.read_to_string(&mut greeting)?;
        Ok(greeting)
    })
}

fn timed_out(result: &std::io::Result<String>) -> bool {
    matches!(result, Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock))
}

/// A router namespace with bridge `pgbr0` (10.99.0.1) and a container (10.99.0.2, port 80
/// answers "hello") published as 10.98.0.1:8080 by DNAT, and two clients routed through
/// it: 10.98.0.2 and `BLOCKED` (10.97.0.2). Its filter rules are up to each test.
struct Router {
    _server: Server,
    router: Netns,
    client: Netns,
    blocked: Netns,
    _container: Netns,
}

const PUBLISHED: &str = "10.98.0.1:8080";

impl Router {
    fn new() -> Option<Self> {
        let router = Netns::new()?;
        let (client, blocked, container) = (Netns::new()?, Netns::new()?, Netns::new()?);
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        let (r, k) = (router.name.as_str(), container.name.as_str());
        ip(&["-n", r, "link", "add", BR, "type", "bridge"]);
        ip(&["-n", r, "addr", "add", "10.99.0.1/24", "dev", BR]);
        ip(&["-n", r, "link", "set", BR, "up"]);
        ip(&[
            "-n", r, "link", "add", "vk", "type", "veth", "peer", "name", "eth0", "netns", k,
        ]);
        ip(&["-n", r, "link", "set", "vk", "master", BR, "up"]);
        ip(&["-n", k, "addr", "add", "10.99.0.2/24", "dev", "eth0"]);
        ip(&["-n", k, "link", "set", "eth0", "up"]);
        ip(&["-n", k, "link", "set", "lo", "up"]);
        ip(&["-n", k, "route", "add", "default", "via", "10.99.0.1"]);
        for (peer, link, net) in [(&client, "vc", "10.98.0"), (&blocked, "vb", "10.97.0")] {
            let c = peer.name.as_str();
            ip(&[
                "-n", r, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", c,
            ]);
            ip(&["-n", r, "addr", "add", &format!("{net}.1/24"), "dev", link]);
            ip(&["-n", r, "link", "set", link, "up"]);
            ip(&[
                "-n",
                c,
                "addr",
                "add",
                &format!("{net}.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", c, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                c,
                "route",
                "add",
                "default",
                "via",
                &format!("{net}.1"),
            ]);
        }
        router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        router.exec(&[
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
            "8080",
            "-j",
            "DNAT",
            "--to-destination",
            "10.99.0.2:80",
        ]);
        let server = Server::start(&container, "10.99.0.2:80".parse().expect("address"));
        Some(Router {
            _server: server,
            router,
            client,
            blocked,
            _container: container,
        })
    }

    /// After `ensure`: the client reaches the published port, the blocked client does not.
    fn assert_only_the_operators_drop_holds(&self) {
        assert_eq!(
            connect(&self.client, PUBLISHED).expect("published port from the client"),
            "hello"
        );
        let blocked = connect(&self.blocked, PUBLISHED);
        assert!(
            timed_out(&blocked),
            "the operator's DROP for {BLOCKED} must still drop it, got {blocked:?}"
        );
    }
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
    net.assert_only_the_operators_drop_holds();
}

#[test]
fn an_operators_drop_in_docker_user_still_drops_published_ports() {
    let Some(net) = Router::new() else { return };
    for args in [
        &["-P", "FORWARD", "DROP"][..],
        &["-N", "DOCKER-USER"],
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
    net.assert_only_the_operators_drop_holds();
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
        ip saddr {BLOCKED} drop
        iifname "{BR}" accept
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
    net.assert_only_the_operators_drop_holds();
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
        "-A FORWARD -i {BR} -m conntrack --ctstate DNAT -m comment --comment \"portgate: delegate {BR} replies to the eBPF gate\" -j ACCEPT"
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
                "iifname \"{BR}\" ct status dnat accept comment \"portgate: delegate {BR} replies to the eBPF gate\""
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
