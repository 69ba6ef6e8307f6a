//! A ruleset saved while the agent runs (`iptables-save > rules.v4`, `nft list ruleset >
//! nftables.conf`) holds the delegation rule and brings it back at the next boot, without a
//! gate: then the published port answers anyone through FORWARD DROP. `portgate doctor`
//! flags the saved rules (file and line) and, once restored without a gate, the live rule;
//! `portgate uninstall` says where the saved rulesets still hold one and leaves them as
//! they are. The host state is real: a sandbox's host namespace, real rules, real files in a
//! temporary directory (`PORTGATE_SAVED_RULESETS`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use portgate_tests::net::{assert_tcp_answers, assert_tcp_times_out};
use portgate_tests::sandbox::{BRIDGE, CONTAINER_V4, HOST_V4};
use portgate_tests::{Agent, Sandbox, TcpEchoServer, require_root, run_ok};
use serde_json::Value;

const COMMENT: &str = "portgate: delegate pgbr0 to the eBPF gate";

/// `portgate ARGS...` in the agent's namespace, the saved rulesets named by
/// `PORTGATE_SAVED_RULESETS` (a binary without that option ignores it).
fn portgate(agent: &Agent<'_>, sb: &Sandbox, saved: &str, args: &[&str]) -> Output {
    sb.command_in(&sb.host, &agent.bin)
        .arg("--socket")
        .arg(&agent.socket)
        .args(args)
        .arg("--bpffs")
        .arg(&agent.bpffs)
        .env("PORTGATE_SAVED_RULESETS", saved)
        .env_remove("PORTGATE_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("run portgate")
}

/// `portgate doctor --json`: its exit status and report.
fn doctor(agent: &Agent<'_>, sb: &Sandbox, saved: &str) -> (Option<i32>, Value) {
    let out = portgate(agent, sb, saved, &["doctor", "--json"]);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

/// The doctor's netfilter findings about `pgbr0`, as (level, detail).
fn netfilter_findings(report: &Value) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["check"] == "netfilter" && f["subject"] == BRIDGE)
        .map(|f| {
            (
                f["level"].as_str().unwrap_or_default().to_owned(),
                f["detail"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The operator's nftables firewall: a forward chain with policy drop that lets the bridge's
/// own traffic out.
const NFT_TABLE: &str = r#"table inet pgfw {
    chain forward {
        type filter hook forward priority 0; policy drop;
        iifname "pgbr0" accept
    }
}
"#;

/// `nft -f FILE` in the sandbox's host namespace.
fn nft_file(sb: &Sandbox, file: &Path) {
    run_ok(sb.command_in(&sb.host, "nft").arg("-f").arg(file));
}

/// `file:line` of the line holding the delegation comment.
fn where_saved(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read the saved ruleset");
    let line = text
        .lines()
        .position(|l| l.contains(COMMENT))
        .unwrap_or_else(|| panic!("{} holds no delegation rule:\n{text}", path.display()));
    format!("{}:{}", path.display(), line + 1)
}

#[test]
fn saved_rulesets_are_flagged_by_doctor_and_named_by_uninstall() {
    if !require_root() {
        return;
    }
    let sb = Sandbox::new();
    let host = |args: &[&str]| run_ok(sb.command_in(&sb.host, args[0]).args(&args[1..]));
    // Two firewalls that drop forwarded traffic, each accepting the bridge's own traffic out
    // (as the engines' rules do): iptables, and an nftables table of the operator's.
    host(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    host(&[
        "iptables-nft",
        "-A",
        "FORWARD",
        "-i",
        BRIDGE,
        "-j",
        "ACCEPT",
    ]);
    let script = tempfile::NamedTempFile::new().expect("temporary file");
    std::fs::write(script.path(), NFT_TABLE).expect("write the nft script");
    nft_file(&sb, script.path());
    host(&[
        "iptables-nft",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        HOST_V4,
        "-p",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "DNAT",
        "--to-destination",
        &format!("{CONTAINER_V4}:80"),
    ]);
    let _server = TcpEchoServer::start(
        &sb,
        &sb.container,
        format!("{CONTAINER_V4}:80").parse().expect("address"),
    );
    let published: SocketAddr = format!("{HOST_V4}:8080").parse().expect("address");

    let mut agent = Agent::start(&sb);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host(&["iptables-nft", "-S", "FORWARD"]).contains(COMMENT) {
        assert!(
            Instant::now() < deadline,
            "the agent installed no delegation rule"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.allow(CONTAINER_V4, "80/tcp");
    assert_tcp_answers(&sb, &sb.client, published);

    // The operator saves the rulesets while the agent runs.
    let rules_v4 = agent.dir.path().join("rules.v4");
    let nftables_conf = agent.dir.path().join("nftables.conf");
    std::fs::write(&rules_v4, host(&["iptables-nft-save"])).expect("write rules.v4");
    std::fs::write(
        &nftables_conf,
        host(&["nft", "list", "table", "inet", "pgfw"]),
    )
    .expect("write nftables.conf");
    let saved = format!("{}:{}", rules_v4.display(), nftables_conf.display());
    let (in_v4, in_nft) = (where_saved(&rules_v4), where_saved(&nftables_conf));

    // Agent running: the live rule is fine, the saved ones are named.
    let (_, report) = doctor(&agent, &sb, &saved);
    let findings = netfilter_findings(&report);
    for place in [&in_v4, &in_nft] {
        assert!(
            findings
                .iter()
                .any(|(level, detail)| level == "warning" && detail.contains(place.as_str())),
            "doctor should name {place}: {findings:#?}"
        );
    }
    assert!(
        !findings.iter().any(|(level, _)| level == "unprotected"),
        "the gated bridge's live rule is no finding: {findings:#?}"
    );

    // Uninstall: the live rule goes, the files stay as they are, and it says where they hold it.
    agent.stop();
    let before = (
        std::fs::read_to_string(&rules_v4).expect("read"),
        std::fs::read_to_string(&nftables_conf).expect("read"),
    );
    let out = portgate(&agent, &sb, &saved, &["uninstall"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "uninstall: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for place in [&in_v4, &in_nft] {
        assert!(
            stdout.contains(place.as_str()),
            "uninstall should name {place}:\n{stdout}"
        );
    }
    assert_eq!(
        (
            std::fs::read_to_string(&rules_v4).expect("read"),
            std::fs::read_to_string(&nftables_conf).expect("read")
        ),
        before,
        "uninstall must not edit saved rulesets"
    );
    assert!(!host(&["iptables-nft", "-S", "FORWARD"]).contains(COMMENT));
    assert_tcp_times_out(&sb, &sb.client, published);

    // The next boot restores both: the rules are back without a gate, and the published
    // port answers anyone. The doctor flags exactly that.
    host(&["nft", "delete", "table", "inet", "pgfw"]);
    run_ok(
        sb.command_in(&sb.host, "iptables-nft-restore")
            .stdin(std::fs::File::open(&rules_v4).expect("open rules.v4")),
    );
    nft_file(&sb, &nftables_conf);
    assert_tcp_answers(&sb, &sb.client, published);
    let (code, report) = doctor(&agent, &sb, &saved);
    let findings = netfilter_findings(&report);
    for chain in ["FORWARD", "inet pgfw forward"] {
        assert!(
            findings.iter().any(|(level, detail)| level == "unprotected"
                && detail.contains("no gate is attached")
                && detail.contains(chain)),
            "doctor should flag the restored rule in {chain} of a bridge without a gate: \
             {findings:#?}"
        );
    }
    assert_eq!(
        code,
        Some(2),
        "doctor's exit status with something unprotected"
    );
}
