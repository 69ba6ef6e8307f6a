//! `portgate doctor` on a real Docker host: a container on the host network is reported
//! unprotected, with its ports; one on a macvlan network is gated on the network's parent
//! (no finding, and the parent is the gate's); the gated bridge and the followed engine are
//! ok; the exit status says so (2). With the agent stopped, the
//! doctor says the agent is not running and that the gate stays attached.

use std::process::{Command, Output};

use portgate_tests::engines::{Engine, EngineAgent, Engines, IMAGE, free_port, unique};
use portgate_tests::{Agent, run_ok};
use serde_json::Value;

/// The macvlan network and its parent (one end of a veth pair: nothing leaves the host), removed
/// on drop.
struct Lan {
    network: String,
    parent: String,
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
        let _ = Command::new("ip")
            .args(["link", "delete", &self.parent])
            .output();
    }
}

fn doctor(agent: &Agent, json: bool) -> Output {
    let mut command = Command::new(&agent.bin);
    command
        .arg("--socket")
        .arg(&agent.socket)
        .arg("doctor")
        .arg("--bpffs")
        .arg(&agent.bpffs);
    if json {
        command.arg("--json");
    }
    command.output().expect("run portgate doctor")
}

fn findings<'a>(report: &'a Value, check: &str, subject: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["check"] == check && f["subject"] == subject)
        .collect()
}

#[test]
fn doctor_reports_host_network_containers_unprotected_and_macvlan_ones_gated() {
    let Some(engines) = Engines::get() else {
        return;
    };
    if engines.root.is_some() {
        // Not a skip: the doctor's engine checks are the host's default sockets.
        portgate_tests::not_applicable(
            "the doctor test runs on the host's own engines (engine set debian12)",
        );
        return;
    }
    let id = unique("");
    let lan = Lan {
        network: format!("{id}-lan"),
        parent: format!("pgd{}", std::process::id()),
    };
    let peer = format!("{}p", lan.parent);
    run_ok(Command::new("ip").args([
        "link",
        "add",
        &lan.parent,
        "type",
        "veth",
        "peer",
        "name",
        &peer,
    ]));
    run_ok(Command::new("ip").args(["link", "set", &lan.parent, "up"]));
    engines.cli_ok(
        Engine::Docker,
        &[
            "network",
            "create",
            "-d",
            "macvlan",
            "--subnet",
            "10.123.45.0/24",
            "-o",
            &format!("parent={}", lan.parent),
            &lan.network,
        ],
    );
    let (host_name, nas_name, web_name) = (unique("dns"), unique("nas"), unique("web"));
    let _host = engines.docker_run(
        &host_name,
        &[
            "--network",
            "host",
            "--expose",
            "53/udp",
            IMAGE,
            "sleep",
            "1000",
        ],
    );
    let _nas = engines.docker_run(
        &nas_name,
        &[
            "--network",
            &lan.network,
            "--ip",
            "10.123.45.50",
            "--expose",
            "445/tcp",
            IMAGE,
            "sleep",
            "1000",
        ],
    );
    let web_port = free_port();
    let _web = engines.run_httpd(Engine::Docker, &web_name, web_port, &[]);
    // No metrics: another agent on this machine may serve the default address.
    let mut agent = EngineAgent::start(engines, &["--metrics-addr", "off"]);
    agent.wait_engines_connected(&["docker"]);

    let out = doctor(&agent, true);
    assert_eq!(
        out.status.code(),
        Some(2),
        "doctor's exit status with unprotected containers; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("doctor --json");
    assert_eq!(report["protected"], false, "{report:#}");
    let host = findings(&report, "container", &host_name);
    assert!(
        host.len() == 1
            && host[0]["level"] == "unprotected"
            && host[0]["detail"].as_str().unwrap().contains("host network")
            && host[0]["detail"].as_str().unwrap().contains("53/udp")
            && host[0]["advice"].is_string(),
        "host-network container: {host:#?}"
    );
    assert!(
        findings(&report, "container", &nas_name).is_empty(),
        "the macvlan container is gated on its network's parent: {report:#}"
    );
    assert!(
        findings(&report, "container", &web_name).is_empty(),
        "the container on the gated bridge is not a finding: {report:#}"
    );
    let docker0 = findings(&report, "bridge", "docker0");
    assert!(
        docker0.len() == 1 && docker0[0]["level"] == "ok",
        "docker0: {docker0:#?}"
    );
    let engine = findings(&report, "engine", "docker");
    assert!(
        engine.len() == 1 && engine[0]["level"] == "ok",
        "docker: {engine:#?}"
    );
    let me = findings(&report, "agent", "portgate agent");
    assert!(me.len() == 1 && me[0]["level"] == "ok", "agent: {me:#?}");
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["check"] == "kernel" && f["subject"] == "tcx"),
        "kernel features: {report:#}"
    );

    // The human report says the same, one line per finding.
    let text = String::from_utf8_lossy(&doctor(&agent, false).stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("UNPROTECTED") && l.contains(host_name.as_str())),
        "no UNPROTECTED line for {host_name}:\n{text}"
    );
    assert!(
        !text.lines().any(|l| l.contains(nas_name.as_str())),
        "no line for the gated macvlan container {nas_name}:\n{text}"
    );

    // Without the agent: not running, and the gate stays attached to docker0.
    agent.stop();
    let out = doctor(&agent, true);
    assert_eq!(out.status.code(), Some(2));
    let report: Value = serde_json::from_slice(&out.stdout).expect("doctor --json");
    let me = findings(&report, "agent", "portgate agent");
    assert!(
        me.len() == 1
            && me[0]["level"] == "unprotected"
            && me[0]["detail"]
                .as_str()
                .unwrap()
                .contains("stays attached to docker0"),
        "agent stopped: {me:#?}"
    );
    let docker0 = findings(&report, "bridge", "docker0");
    assert!(
        docker0.len() == 1 && docker0[0]["level"] == "ok",
        "docker0 stays gated (pinned) without the agent: {docker0:#?}"
    );
    let hooks = findings(&report, "relays", "relay hooks");
    assert!(
        hooks.len() == 1 && hooks[0]["level"] == "ok",
        "the relay hooks stay pinned without the agent: {hooks:#?}"
    );
    // Their pins gone (as after a failed attach), doctor says what that leaves open.
    for link in ["relay-bound4", "relay-bound6", "relay-adopted"] {
        let pin = agent
            .bpffs
            .join(gate_common::LAYOUT_VERSION)
            .join("links")
            .join(link);
        std::fs::remove_file(&pin).expect("remove a relay hook's pin");
    }
    let report: Value =
        serde_json::from_slice(&doctor(&agent, true).stdout).expect("doctor --json");
    let hooks = findings(&report, "relays", "relay hooks");
    assert!(
        hooks.len() == 1 && hooks[0]["level"] == "unprotected",
        "without the relay hooks doctor says unprotected: {hooks:#?}"
    );
}
