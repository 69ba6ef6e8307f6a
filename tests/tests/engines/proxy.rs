//! Docker's userland proxy: published ports relayed from the host's own stack (IPv6 clients
//! on IPv4-only networks, hairpin), gated by the socket lookup, with and without an agent.

use portgate_tests::engines::hairpin_answers;

use super::*;

/// Docker's userland proxy relays a published port from the host's own stack, which the
/// bridge gate takes for host traffic: over IPv6 (Docker without IPv6 on the network) and
/// for hairpin traffic from another container. Both stay closed until the port is allowed;
/// the host itself keeps reaching it.
#[test]
fn docker_proxy_paths_stay_closed_until_allowed() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let port = free_port();
    let name = unique("web-proxy");
    let _web = engines.run_httpd(Engine::Docker, &name, port, &[]);
    let body = body_of(&name);
    let hairpin = |what: &str| {
        let answered = hairpin_answers(engines, port, &body);
        eprintln!("hairpin {what}: answered={answered}");
        answered
    };
    let from_host = || {
        portgate_tests::engines::http_get_from_host(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            "/",
            Duration::from_secs(3),
        )
    };
    // Without the agent, the proxy answers IPv6 and hairpin connections.
    sc.assert_answers(
        sc.published6(port),
        &body_of(&name),
        "IPv6 through docker-proxy, no agent",
    );
    assert!(
        hairpin("without the agent"),
        "hairpin without the agent should answer"
    );

    let agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker", "podman"]);
    // Host ports are written once the engine has reported.
    let start = Instant::now();
    while sc
        .get(sc.published6(port), Duration::from_millis(500))
        .is_ok()
    {
        assert!(
            start.elapsed() < FOLLOW_TIMEOUT,
            "IPv6 through docker-proxy still answers {FOLLOW_TIMEOUT:?} after the agent synced"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    sc.assert_times_out(sc.published6(port), "IPv6 through docker-proxy, no rule");
    sc.assert_times_out(sc.published(port), "IPv4 (DNAT), no rule");
    assert!(
        !hairpin("with no rule"),
        "hairpin through docker-proxy must not answer without a rule"
    );
    assert!(
        from_host().is_ok_and(|body| body.trim_end() == body_of(&name)),
        "the host itself should still reach 127.0.0.1:{port}: {:?}",
        from_host()
    );
    let status = agent.status_json();
    assert!(
        status["counters"]["drop"]["not_allowed"].as_u64() > Some(0),
        "the proxied attempts should count as not_allowed: {status}"
    );

    agent.allow(&name, "80/tcp");
    sc.assert_answers(sc.published6(port), &body_of(&name), "IPv6 after allow");
    sc.assert_answers(sc.published(port), &body_of(&name), "IPv4 after allow");
    assert!(hairpin("after allow"), "hairpin should answer once allowed");
    let status = agent.status_json();
    assert!(
        status["counters"]["pass"]["host_port_allowed"].as_u64() > Some(0),
        "admitted proxied connections should count as host_port_allowed: {status}"
    );
}

/// A container started while no agent runs (stopped, upgrading, at boot before the first
/// sync): the pinned gate's relay hooks saw docker-proxy take its port (binding it up to
/// Docker 27, adopting the daemon's listener in Docker 28), so IPv6 and hairpin connections
/// are refused, as IPv4 is on the bridge; `doctor` says so. The agent, back, keeps them
/// closed until a rule allows them.
#[test]
fn a_container_started_while_no_agent_runs_is_closed_on_every_path() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let mut agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker", "podman"]);
    agent.stop();

    let port = free_port();
    let name = unique("web-noagent");
    let _web = engines.run_httpd(Engine::Docker, &name, port, &[]);
    let body = body_of(&name);
    let answers = |addr| sc.get(addr, Duration::from_secs(3)).is_ok();
    assert!(
        !answers(sc.published6(port)),
        "IPv6 through docker-proxy answered a container started while no agent runs"
    );
    assert!(!answers(sc.published(port)), "IPv4 (DNAT) with no agent");
    assert!(
        !hairpin_answers(engines, port, &body),
        "hairpin through docker-proxy answered a container started while no agent runs"
    );
    let doctor = agent.cli(&[
        "doctor",
        "--json",
        "--bpffs",
        &agent.bpffs.to_string_lossy(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).expect("doctor --json");
    let findings: Vec<&serde_json::Value> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| {
            f["check"] == "docker_proxy"
                && f["subject"]
                    .as_str()
                    .is_some_and(|s| s.ends_with(&format!(":{port}/tcp")))
        })
        .collect();
    assert!(
        !findings.is_empty() && findings.iter().all(|f| f["level"] == "ok"),
        "doctor should say the proxied port {port} is refused until the agent is back: {findings:#?}"
    );

    agent.spawn();
    agent.wait_ready();
    agent.wait_engines_connected(&["docker", "podman"]);
    sc.assert_times_out(
        sc.published6(port),
        "IPv6 through docker-proxy, agent back, no rule",
    );
    assert!(
        !hairpin_answers(engines, port, &body),
        "hairpin must not answer without a rule"
    );
    agent.allow(&name, "80/tcp");
    sc.assert_answers(sc.published6(port), &body, "IPv6 after allow");
    sc.assert_answers(sc.published(port), &body, "IPv4 after allow");
    assert!(
        hairpin_answers(engines, port, &body),
        "hairpin should answer once allowed"
    );
}
