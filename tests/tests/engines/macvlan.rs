//! Containers on macvlan networks: gated on the parent interface, where their traffic
//! crosses the host's TC hooks without a bridge or netfilter.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;

#[test]
fn macvlan_containers_are_closed_until_allowed() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    // The client's own segment: the scenario's root-side veth is the network's parent, so
    // the client reaches the container directly, as a host on its LAN would.
    let x = sc.host_addr.octets()[2];
    let parent = format!("parent={}", sc.host_if);
    let (subnet, range) = (format!("10.98.{x}.0/24"), format!("10.98.{x}.64/26"));
    let network = DockerNetwork::create(
        engines,
        &unique("lan"),
        &[
            "-d",
            "macvlan",
            "--subnet",
            &subnet,
            "--ip-range",
            &range,
            "--gateway",
            &sc.host_addr.to_string(),
            "-o",
            &parent,
        ],
    );
    let (name, ip) = (unique("mv-web"), format!("10.98.{x}.70"));
    let script = httpd_script(&name, &[80, 81], 0);
    let _web = engines.docker_run(
        &name,
        &[
            "--network",
            &network.name,
            "--ip",
            &ip,
            IMAGE,
            "/bin/sh",
            "-c",
            &script,
        ],
    );
    let web: SocketAddr = format!("{ip}:80").parse().expect("address");
    let other: SocketAddr = format!("{ip}:81").parse().expect("address");
    let body = body_of(&name);
    // The control: without the gate, the segment reaches every port.
    sc.assert_answers_within(web, &body, Duration::from_secs(20), "macvlan, no agent");
    sc.assert_answers(other, &body, "macvlan port 81, no agent");

    let agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker"]);
    let start = Instant::now();
    while sc.get(web, Duration::from_millis(500)).is_ok() {
        assert!(
            start.elapsed() < FOLLOW_TIMEOUT,
            "the macvlan container still answers {FOLLOW_TIMEOUT:?} after the agent synced"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    sc.assert_times_out(web, "macvlan, no rule");
    sc.assert_times_out(other, "macvlan port 81, no rule");
    let status = agent.status_json();
    let ungated = status["ungated"].as_array().cloned().unwrap_or_default();
    assert!(
        !ungated.iter().any(|u| u["container"] == name.as_str()),
        "a gated macvlan container is not listed as ungated: {status}"
    );

    agent.allow(&name, "80/tcp");
    sc.assert_answers(web, &body, "macvlan after allow");
    sc.assert_times_out(other, "macvlan port 81, not allowed");
    let status = agent.status_json();
    assert!(
        status["counters"]["drop"]["not_allowed"].as_u64() > Some(0),
        "{status}"
    );
}
