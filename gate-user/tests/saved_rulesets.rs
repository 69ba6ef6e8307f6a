//! Delegation rules without a gate, as `portgate doctor` and `portgate uninstall` report them,
//! on a state built for real in namespaces of the test's own: the keeper's rules (iptables-nft
//! and an nftables table of the operator's) in a router namespace with no gate attached, as a
//! boot that restored a saved ruleset leaves them, and the rulesets saved into files
//! (`iptables-nft-save`, `nft list table`) in a temporary directory, named through
//! `PORTGATE_SAVED_RULESETS`. No agent and no eBPF: `tests/tests/saved_rulesets.rs` has the
//! whole story with the agent.
//!
//! The binary is this package's `portgate`, or `$PORTGATE_BIN` (an older one, to see the test
//! fail where it reports nothing).

mod netns;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use gate_user::netfilter::Delegation;
use netns::*;
use serde_json::Value;

fn portgate_bin() -> PathBuf {
    std::env::var_os("PORTGATE_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_portgate")),
        PathBuf::from,
    )
}

/// `portgate ARGS...` inside `ns`, with no agent and no pins, the saved rulesets in `saved`.
fn portgate(ns: &Netns, dir: &Path, saved: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(portgate_bin())
        .arg("--socket")
        .arg(dir.join("no-agent.sock"))
        .args(args)
        .arg("--bpffs")
        .arg(dir.join("no-pins"))
        .env("PORTGATE_SAVED_RULESETS", saved)
        .env_remove("PORTGATE_SOCKET")
        .output()
        .expect("run portgate")
}

/// `file:line` of the first line of `path` holding our comment for `BR`.
fn where_saved(path: &Path) -> String {
    let comment = format!("portgate: delegate {BR} to the eBPF gate");
    let text = std::fs::read_to_string(path).expect("read the saved ruleset");
    let line = text
        .lines()
        .position(|l| l.contains(&comment))
        .unwrap_or_else(|| panic!("{} holds no delegation rule:\n{text}", path.display()));
    format!("{}:{}", path.display(), line + 1)
}

#[test]
fn doctor_flags_a_rule_without_a_gate_and_both_name_saved_rulesets() {
    let Some(net) = Router::new() else { return };
    let ns = &net.router;
    ns.exec(&["iptables-nft", "-P", "FORWARD", "DROP"]);
    ns.exec(&["iptables-nft", "-A", "FORWARD", "-i", BR, "-j", "ACCEPT"]);
    ns.exec_stdin(
        &["nft", "-f", "-"],
        &format!(
            "table inet pgfw {{\n chain forward {{\n  type filter hook forward priority 0; \
             policy drop;\n  iifname \"{BR}\" accept\n }}\n}}\n"
        ),
    );
    // The rules as the agent installs them, and the rulesets saved meanwhile.
    let mut delegation = Delegation::new();
    ns.ensure(&mut delegation, &[BR]);
    let dir = tempfile::tempdir().expect("temporary directory");
    let (rules_v4, nftables_conf) = (
        dir.path().join("rules.v4"),
        dir.path().join("nftables.conf"),
    );
    std::fs::write(&rules_v4, ns.exec(&["iptables-nft-save"])).expect("write rules.v4");
    std::fs::write(
        &nftables_conf,
        ns.exec(&["nft", "list", "table", "inet", "pgfw"]),
    )
    .expect("write nftables.conf");
    let saved = format!("{}:{}", rules_v4.display(), nftables_conf.display());
    let (in_v4, in_nft) = (where_saved(&rules_v4), where_saved(&nftables_conf));

    // No gate is attached: the published port answers anyone through both drops.
    assert_eq!(
        connect(&net.client, PUBLISHED).expect("published port with the rules and no gate"),
        "hello"
    );
    let out = portgate(ns, dir.path(), &saved, &["doctor", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let findings: Vec<(&str, &str)> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["check"] == "netfilter" && f["subject"] == BR)
        .map(|f| {
            (
                f["level"].as_str().unwrap_or_default(),
                f["detail"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    for chain in ["iptables-nft FORWARD", "nftables inet pgfw forward"] {
        assert!(
            findings
                .iter()
                .any(|(level, detail)| *level == "unprotected"
                    && detail.contains(chain)
                    && detail.contains("no gate is attached")),
            "doctor should flag the rule in {chain}: {findings:#?}"
        );
    }
    for place in [&in_v4, &in_nft] {
        assert!(
            findings
                .iter()
                .any(|(level, detail)| *level == "warning" && detail.contains(place.as_str())),
            "doctor should name {place}: {findings:#?}"
        );
    }
    assert_eq!(out.status.code(), Some(2), "doctor's exit status");

    // Uninstall names the saved lines and leaves the files as they are.
    let before = std::fs::read_to_string(&rules_v4).expect("read");
    let out = portgate(ns, dir.path(), &saved, &["uninstall"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "uninstall: {stdout}");
    for place in [&in_v4, &in_nft] {
        assert!(
            stdout.contains(place.as_str()),
            "uninstall should name {place}:\n{stdout}"
        );
    }
    assert_eq!(std::fs::read_to_string(&rules_v4).expect("read"), before);
}
