//! Every path in stays closed unless allowed: a container acting in another container's name,
//! IPv4-mapped IPv6, and the gate's own pins removed while it runs. Real namespaces, a real
//! bridge, the real agent in the real kernel. Need root; without it each test says it is
//! skipped.

use std::{net::SocketAddrV4, time::Duration};

use portgate_tests::agent::counter;
use portgate_tests::net::{
    NO_REPLY, SHOULD_ANSWER, assert_tcp_answers, assert_tcp_times_out, sa, send_forged_udp,
    udp_request_from,
};
use portgate_tests::sandbox::{BRIDGE, CLIENT_V4, CONTAINER_V4};
use portgate_tests::{Agent, Sandbox, TcpEchoServer, UdpEchoServer, require_root};

macro_rules! require_root {
    () => {
        if !require_root() {
            return;
        }
    };
}

/// The neighbour container forges one datagram "from" the container's port 5353 to the
/// client's port 40000. Before the gate bound flows to bridge ports, that opened a flow in
/// the container's name, and the client's "reply" from 40000 reached the container's UDP
/// service on 5353 with no rule at all.
#[test]
fn a_forged_source_opens_no_path_into_another_container() {
    require_root!();
    let sb = Sandbox::new();
    let _service = UdpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:5353"));
    let agent = Agent::start(&sb);
    let container: SocketAddrV4 = format!("{CONTAINER_V4}:5353").parse().expect("addr");
    let client: SocketAddrV4 = format!("{CLIENT_V4}:40000").parse().expect("addr");

    send_forged_udp(&sb, &sb.neighbour, container, client, b"forged");
    let reply = udp_request_from(
        &sb,
        &sb.client,
        sa("10.98.0.2:40000"),
        sa("10.99.0.2:5353"),
        b"in through a forged flow?",
        NO_REPLY,
    );
    assert_eq!(
        reply, None,
        "the client reached the container's port 5353 through a flow the neighbour forged"
    );
    let status = agent.status_json();
    assert!(
        counter(&status, "event", "foreign_source") >= 1,
        "the forged packet should be counted as foreign_source: {status}"
    );

    // Control: the same exchange, opened by the container itself, is a tracked flow.
    let _outside = UdpEchoServer::start(&sb, &sb.client, sa("10.98.0.2:40001"));
    let answered = udp_request_from(
        &sb,
        &sb.container,
        sa("10.99.0.2:5354"),
        sa("10.98.0.2:40001"),
        b"from the container itself",
        SHOULD_ANSWER,
    );
    assert!(
        answered.is_some(),
        "the container's own UDP request should get its reply"
    );
}

/// While the agent runs it holds its links: removing their pins detaches nothing, even for a
/// moment, and the agent pins them again.
#[test]
fn removing_the_link_pins_never_opens_the_gate() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _ssh = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:22"));
    let agent = Agent::start(&sb);
    agent.allow("10.99.0.2", "80/tcp");
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));

    let links = agent.bpffs.join(gate_common::LAYOUT_VERSION).join("links");
    let pins: Vec<_> = std::fs::read_dir(&links)
        .expect("the agent's link pins")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(!pins.is_empty(), "no link pins under {}", links.display());
    for pin in &pins {
        std::fs::remove_file(pin).expect("remove a link pin");
    }
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:22"));
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));

    // Pinned again within a tick or two, so the gate also outlives this agent.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pins.iter().any(|p| !p.exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not pin its links again: {:?}",
            pins.iter().filter(|p| !p.exists()).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut agent = agent;
    agent.kill();
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:22"));
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
}

/// The bridge deleted and made again (an engine or network restart does this): the agent
/// attaches to the new one by itself, says so, and the gate is as it was.
#[test]
fn a_recreated_bridge_is_gated_again_by_itself() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _ssh = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:22"));
    let agent = Agent::start(&sb);
    agent.allow("10.99.0.2", "80/tcp");
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));

    let ip = |args: &[&str]| {
        portgate_tests::run_ok(
            std::process::Command::new("ip")
                .args(["-n", &sb.host])
                .args(args),
        )
    };
    ip(&["link", "del", BRIDGE]);
    ip(&["link", "add", BRIDGE, "type", "bridge"]);
    for port in ["vctr", "vnbr"] {
        ip(&["link", "set", port, "master", BRIDGE]);
    }
    ip(&["addr", "add", "10.99.0.1/24", "dev", BRIDGE]);
    ip(&["-6", "addr", "add", "fd99::1/64", "dev", BRIDGE, "nodad"]);
    ip(&["link", "set", BRIDGE, "up"]);

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agent.log_text().matches("gate attached").nth(1).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not attach to the new bridge: {}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:22"));
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
}
