//! A SYN flood to a published port that no rule admits, from random sources: with the early
//! drop on the interface it arrives on (`--uplink`), it leaves the host's conntrack table
//! where it was, while an allowed published port and the host's own service keep answering.
//! The control: without `--uplink` the same flood fills the table (the bridge gate drops
//! after conntrack confirmed each SYN), so the test can fail. Real namespaces, real DNAT,
//! the real agent with a fake engine for the published ports. Needs root.

use std::{net::SocketAddrV4, process::Command};

use portgate_tests::fake_engine::{EngineState, FakeEngine};
use portgate_tests::net::{assert_tcp_answers, sa, send_syn_flood};
use portgate_tests::sandbox::{BRIDGE, CONTAINER_V4, HOST_V4};
use portgate_tests::{Agent, Sandbox, TcpEchoServer, require_root, run_ok};
use serde_json::json;

const FLOOD: u32 = 3_000;

/// `web` publishes 8080 -> 80 (no rule admits it) and 8081 -> 81 (allowed by a rule).
fn fake_docker() -> FakeEngine {
    FakeEngine::start(EngineState {
        networks: vec![
            json!({"Name": "bridge", "Id": "n-bridge", "Driver": "bridge",
               "Options": {"com.docker.network.bridge.name": BRIDGE}}),
        ],
        containers: vec![json!({
            "Id": format!("{:0>64}", "web"),
            "Name": "/web",
            "Image": "sha256:none",
            "Config": {"Labels": {}},
            "HostConfig": {"NetworkMode": "bridge"},
            "NetworkSettings": {
                "Ports": {
                    "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}],
                    "81/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8081"}],
                },
                "Networks": {"bridge": {"NetworkID": "n-bridge", "IPAddress": CONTAINER_V4}},
            },
        })],
        images: Default::default(),
    })
}

fn in_host(sb: &Sandbox, args: &[&str]) -> String {
    run_ok(
        Command::new("ip")
            .args(["netns", "exec", &sb.host])
            .args(args),
    )
}

fn conntrack_count(sb: &Sandbox) -> u64 {
    in_host(sb, &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
        .trim()
        .parse()
        .expect("nf_conntrack_count")
}

/// The engines' DNAT for the two published ports, as Docker writes it.
fn publish(sb: &Sandbox) {
    for (host_port, port) in [("8080", "80"), ("8081", "81")] {
        in_host(
            sb,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                host_port,
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{CONTAINER_V4}:{port}"),
            ],
        );
    }
    // Spoofed sources must reach conntrack, not be dropped by reverse-path filtering.
    in_host(
        sb,
        &[
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.vcli.rp_filter=0",
        ],
    );
}

#[test]
fn a_syn_flood_to_a_refused_published_port_leaves_conntrack_alone_with_the_early_drop() {
    if !require_root() {
        return;
    }
    let sb = Sandbox::new();
    publish(&sb);
    let _blocked = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _allowed = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:81"));
    let _host_service = TcpEchoServer::start(&sb, &sb.host, sa("10.98.0.1:2222"));
    let docker = fake_docker();
    let socket = docker.socket.to_str().expect("utf-8 path").to_owned();
    let engine = ["--runtime", "docker", "--docker-socket", socket.as_str()];
    let target: SocketAddrV4 = format!("{HOST_V4}:8080").parse().expect("address");

    // The control: the bridge gate alone drops the flood after conntrack confirmed it.
    let mut late = Agent::start_with(&sb, &engine);
    late.wait_engines_connected(&["docker"]);
    late.cli_ok(&["allow", CONTAINER_V4, "81"]);
    let before = conntrack_count(&sb);
    send_syn_flood(&sb, &sb.client, target, FLOOD);
    let grown = conntrack_count(&sb).saturating_sub(before);
    assert!(
        grown >= u64::from(FLOOD) / 2,
        "control: without --uplink the flood should leave conntrack entries ({grown} new)"
    );
    late.stop();

    let mut args = engine.to_vec();
    args.extend(["--uplink", "vcli"]);
    let early = Agent::start_with(&sb, &args);
    early.wait_engines_connected(&["docker"]);
    early.cli_ok(&["allow", CONTAINER_V4, "81"]);
    let status = early.status_json();
    assert_eq!(status["uplinks"][0]["name"], "vcli", "{status}");
    let before = conntrack_count(&sb);
    send_syn_flood(&sb, &sb.client, target, FLOOD);
    // The allowed port and the host's own service answer during and after the flood.
    assert_tcp_answers(&sb, &sb.client, sa("10.98.0.1:8081"));
    assert_tcp_answers(&sb, &sb.client, sa("10.98.0.1:2222"));
    send_syn_flood(&sb, &sb.client, target, FLOOD);
    let grown = conntrack_count(&sb).saturating_sub(before);
    assert!(
        grown < 20,
        "with --uplink the flood must not reach conntrack ({grown} new entries)"
    );
    let status = early.status_json();
    let early_drops = status["counters"]["event"]["dropped_before_conntrack"]
        .as_u64()
        .expect("counter");
    assert!(
        early_drops >= u64::from(2 * FLOOD),
        "every flood SYN is counted as dropped before conntrack: {status}"
    );
}
