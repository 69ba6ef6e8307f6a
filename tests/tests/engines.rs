//! Engine tests: real Docker and Podman on this host, the motivating scenario (a client in
//! its own namespace routed through the host, FORWARD policy DROP), and the real agent with
//! `--bridge auto --runtime auto` in the root namespace.
//!
//! The tests share the root namespace (its FORWARD policy, docker0, podman0, the daemons), so
//! they run one at a time under [`SERIAL`]. Without root or without the engines installed each
//! test says it is skipped (`PORTGATE_REQUIRE_ENGINES=1` turns that into a failure).

use std::collections::BTreeSet;

use netfilter::portgate_rules;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use portgate_tests::engines::{
    DockerNetwork, Download, Engine, EngineAgent, EngineSet, Engines, FOLLOW_TIMEOUT, IMAGE,
    OperatorNftTable, OperatorRule, PodmanNetwork, PongServer, Scenario, body_of, container_rules,
    engine_status, free_port, host_ports, httpd_script, iptables_delete, iptables_rules,
    iptables_rules_in, unique,
};

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the global test lock (a failed test poisons it; the next one goes on anyway) and
/// the engine environment; returns from the test (skipped) when there is none.
macro_rules! setup {
    () => {{
        let serial: MutexGuard<'static, ()> = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let Some(engines) = Engines::get() else {
            return;
        };
        (serial, engines)
    }};
}

// After `setup!`, which they use.
#[path = "engines/labels.rs"]
mod labels;
#[path = "engines/macvlan.rs"]
mod macvlan;
#[path = "engines/netfilter.rs"]
mod netfilter;
#[path = "engines/proxy.rs"]
mod proxy;
#[path = "engines/rootless.rs"]
mod rootless;

#[test]
fn baseline_without_agent_docker_answers_and_podman_times_out() {
    let (_serial, engines) = setup!();
    let leftovers = portgate_rules();
    assert!(
        leftovers.is_empty(),
        "portgate rules are left in the root namespace (an agent still runs, or a test did not \
         uninstall): {leftovers:?}"
    );
    let sc = Scenario::new();
    let (dport, pport) = (free_port(), free_port());
    let (dname, pname) = (unique("web-d"), unique("web-p"));
    let _docker = engines.run_httpd(Engine::Docker, &dname, dport, &[]);
    let _podman = engines.run_httpd(Engine::Podman, &pname, pport, &[]);

    sc.assert_answers(
        sc.published(dport),
        &body_of(&dname),
        "Docker's published port, no gate (Docker's own ACCEPT rule lets it through)",
    );
    sc.assert_times_out(
        sc.published(pport),
        "Podman's published port, no gate (nothing accepts NEW connections: FORWARD DROP wins)",
    );
}

#[test]
fn default_deny_then_allow_by_name_by_label_and_deny() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let (dport, pport, lport) = (free_port(), free_port(), free_port());
    let (dname, pname, lname) = (unique("web-d"), unique("web-p"), unique("label-p"));
    let _docker = engines.run_httpd(Engine::Docker, &dname, dport, &[]);
    let _podman = engines.run_httpd(Engine::Podman, &pname, pport, &[]);
    let _labelled = engines.run_httpd(
        Engine::Podman,
        &lname,
        lport,
        &["--label", "portgate.allow=80/tcp"],
    );
    let agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker", "podman"]);

    sc.assert_times_out(
        sc.published(dport),
        "Docker's published port under default deny",
    );
    sc.assert_times_out(
        sc.published(pport),
        "Podman's published port under default deny",
    );

    // The label allows its container's port, with no CLI call at all.
    sc.assert_answers_within(
        sc.published(lport),
        &body_of(&lname),
        FOLLOW_TIMEOUT,
        "Podman container started with --label portgate.allow=80/tcp",
    );
    let list = agent.list_json();
    let labelled = container_rules(&list, &lname);
    assert!(
        labelled
            .iter()
            .any(|r| r["source"] == "label" && r["active"] == true && r["port_start"] == 80),
        "the label's rule should be listed (source label, active, port 80) for {lname}: {list}"
    );

    agent.allow(&dname, "80/tcp");
    sc.assert_answers(
        sc.published(dport),
        &body_of(&dname),
        "Docker container after `portgate allow NAME 80/tcp`",
    );
    agent.allow(&pname, "80/tcp");
    sc.assert_answers(
        sc.published(pport),
        &body_of(&pname),
        "Podman container after `portgate allow NAME 80/tcp`",
    );

    agent.deny(&dname, "80/tcp");
    sc.assert_times_out(
        sc.published(dport),
        "Docker container after `portgate deny NAME 80/tcp`",
    );
    sc.assert_answers(
        sc.published(pport),
        &body_of(&pname),
        "Podman container (still allowed) after denying the Docker one",
    );
    sc.assert_answers(
        sc.published(lport),
        &body_of(&lname),
        "labelled Podman container after denying the Docker one",
    );
}

#[test]
fn allow_published_opens_exactly_the_published_ports_and_lists_them() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let (p80, p81, ppod) = (free_port(), free_port(), free_port());
    let (dname, pname) = (unique("pub-d"), unique("pub-p"));
    let script = httpd_script(&dname, &[81, 80], 0);
    let (publish80, publish81) = (format!("{p80}:80"), format!("{p81}:81"));
    let docker = engines.docker_run(
        &dname,
        &[
            "-p", &publish80, "-p", &publish81, IMAGE, "/bin/sh", "-c", &script,
        ],
    );
    docker.wait_serving(80);
    docker.wait_serving(81);
    let _podman = engines.run_httpd(Engine::Podman, &pname, ppod, &[]);
    let agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker", "podman"]);

    sc.assert_times_out(sc.published(p80), "published 80 before allow --published");
    sc.assert_times_out(sc.published(p81), "published 81 before allow --published");

    agent.cli_ok(&["allow", "--published", &dname]);
    agent.cli_ok(&["allow", "--published", &pname]);
    let body = body_of(&dname);
    sc.assert_answers(
        sc.published(p80),
        &body,
        "Docker port 80 after allow --published",
    );
    sc.assert_answers(
        sc.published(p81),
        &body,
        "Docker port 81 after allow --published",
    );
    sc.assert_answers(
        sc.published(ppod),
        &body_of(&pname),
        "Podman port 80 after allow --published",
    );

    let list = agent.list_json();
    let rules = container_rules(&list, &dname);
    assert!(!rules.is_empty(), "no rule lists container {dname}: {list}");
    let address = docker.address();
    for rule in &rules {
        assert_eq!(rule["active"], true, "rule of a running container: {rule}");
        assert_eq!(rule["published"], true, "rule made by --published: {rule}");
        assert_eq!(rule["source"], "cli", "rule made by the CLI: {rule}");
        assert_eq!(rule["target"], dname.as_str(), "target as given: {rule}");
        let addresses: Vec<&str> = rule["addresses"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        assert!(
            addresses.contains(&address.as_str()),
            "rule should resolve to the container's address {address}: {rule}"
        );
    }
    let listed_host_ports = host_ports(&rules);
    assert_eq!(
        listed_host_ports,
        BTreeSet::from([u64::from(p80), u64::from(p81)]),
        "host_ports of {dname}'s rules: {list}"
    );
    let prules = container_rules(&list, &pname);
    assert_eq!(
        host_ports(&prules),
        BTreeSet::from([u64::from(ppod)]),
        "host_ports of {pname}'s rules: {list}"
    );

    agent.cli_ok(&["deny", "--published", &dname]);
    sc.assert_times_out(sc.published(p80), "published 80 after deny --published");
    sc.assert_times_out(sc.published(p81), "published 81 after deny --published");
    let list = agent.list_json();
    assert!(
        container_rules(&list, &dname).is_empty(),
        "deny --published should remove {dname}'s rules: {list}"
    );
    sc.assert_answers(
        sc.published(ppod),
        &body_of(&pname),
        "Podman container unaffected by denying the Docker one",
    );
}

#[test]
fn rule_follows_the_container_across_restarts() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let (aport, fport, lport) = (free_port(), free_port(), free_port());
    let (aname, fname, lname) = (unique("follow-d"), unique("filler-d"), unique("follow-p"));
    let allowed = engines.run_httpd(Engine::Docker, &aname, aport, &[]);
    let labelled = engines.run_httpd(
        Engine::Podman,
        &lname,
        lport,
        &["--label", "portgate.allow=80/tcp"],
    );
    let agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker", "podman"]);
    agent.allow(&aname, "80/tcp");
    sc.assert_answers(
        sc.published(aport),
        &body_of(&aname),
        "allowed Docker container",
    );
    sc.assert_answers_within(
        sc.published(lport),
        &body_of(&lname),
        FOLLOW_TIMEOUT,
        "labelled Podman container",
    );

    // Stop it, let another container start while its address is free, start it again: its
    // address may change, and the rule must follow the name, not the old address.
    let old_address = allowed.address();
    allowed.stop();
    let filler = engines.run_httpd(Engine::Docker, &fname, fport, &[]);
    let filler_address = filler.address();
    allowed.start();
    let new_address = allowed.wait_serving(80);
    eprintln!("{aname}: {old_address} -> {new_address}; filler {fname} got {filler_address}");
    // What the test is about: had the address stayed, a rule kept on the old address would
    // pass too.
    assert_ne!(
        new_address, old_address,
        "{aname} got its old address back after docker stop + start (filler {fname} got \
         {filler_address}): the rule following it shows nothing"
    );
    let took = sc.assert_answers_within(
        sc.published(aport),
        &body_of(&aname),
        FOLLOW_TIMEOUT,
        "allowed Docker container after docker stop + start (no CLI call)",
    );
    eprintln!("answered {took:?} after the start");
    sc.assert_times_out(
        sc.published(fport),
        &format!(
            "filler container (not allowed; it has {filler_address}, the allowed one had \
             {old_address})"
        ),
    );

    allowed.restart();
    allowed.wait_serving(80);
    sc.assert_answers_within(
        sc.published(aport),
        &body_of(&aname),
        FOLLOW_TIMEOUT,
        "allowed Docker container after docker restart",
    );

    labelled.restart();
    labelled.wait_serving(80);
    sc.assert_answers_within(
        sc.published(lport),
        &body_of(&lname),
        FOLLOW_TIMEOUT,
        "labelled Podman container after podman restart",
    );

    let list = agent.list_json();
    let rules = container_rules(&list, &aname);
    let address = allowed.address();
    assert!(
        rules.iter().any(|r| r["active"] == true
            && r["addresses"]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == address.as_str()))),
        "{aname}'s rule should be active on its current address {address}: {list}"
    );
    sc.assert_times_out(sc.published(fport), "filler container at the end");
}

#[test]
fn dockerd_restart_keeps_enforcement_and_the_agent_resyncs() {
    let (_serial, engines) = setup!();
    if let Err(why) = engines.may_restart_dockerd() {
        portgate_tests::skip(why);
        return;
    }
    let sc = Scenario::new();
    let (wport, dport, lport) = (free_port(), free_port(), free_port());
    let (wname, dname, lname) = (unique("always-w"), unique("always-d"), unique("label-p"));
    let allowed = engines.run_httpd(Engine::Docker, &wname, wport, &["--restart", "always"]);
    let denied = engines.run_httpd(Engine::Docker, &dname, dport, &["--restart", "always"]);
    let _labelled = engines.run_httpd(
        Engine::Podman,
        &lname,
        lport,
        &["--label", "portgate.allow=80/tcp"],
    );
    let agent = EngineAgent::start(engines, &[]);
    let status = agent.wait_engines_connected(&["docker", "podman"]);
    let syncs_before = engine_status(&status, "docker").expect("docker engine")["syncs"]
        .as_u64()
        .expect("syncs");
    agent.allow(&wname, "80/tcp");
    sc.assert_answers(
        sc.published(wport),
        &body_of(&wname),
        "allowed Docker container",
    );
    sc.assert_times_out(sc.published(dport), "not-allowed Docker container");
    sc.assert_answers_within(
        sc.published(lport),
        &body_of(&lname),
        FOLLOW_TIMEOUT,
        "labelled Podman container",
    );

    // dockerd crashes: containers keep running under containerd, Docker's NAT rules stay.
    engines.kill_dockerd();
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    loop {
        let status = agent.status_json();
        let docker = engine_status(&status, "docker").expect("docker engine listed");
        if docker["connected"] == false {
            eprintln!("while dockerd is down: {docker}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status should say docker is not connected within {FOLLOW_TIMEOUT:?} of dockerd's \
             death: {docker}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The gate keeps enforcing what it knew.
    sc.assert_answers(
        sc.published(wport),
        &body_of(&wname),
        "allowed Docker container while dockerd is down",
    );
    sc.assert_times_out(
        sc.published(dport),
        "not-allowed Docker container while dockerd is down",
    );
    sc.assert_answers(
        sc.published(lport),
        &body_of(&lname),
        "labelled Podman container while dockerd is down",
    );

    engines.start_dockerd();
    // Without live-restore, dockerd restarts the containers (--restart always).
    allowed.wait_serving(80);
    denied.wait_serving(80);
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    loop {
        let status = agent.status_json();
        let docker = engine_status(&status, "docker").expect("docker engine listed");
        let syncs = docker["syncs"].as_u64().unwrap_or(0);
        if docker["connected"] == true && syncs > syncs_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after dockerd is back the agent should reconnect and re-sync within \
             {FOLLOW_TIMEOUT:?} (syncs before: {syncs_before}): {docker}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    sc.assert_answers_within(
        sc.published(wport),
        &body_of(&wname),
        FOLLOW_TIMEOUT,
        "allowed Docker container after dockerd restarted it",
    );
    sc.assert_times_out(
        sc.published(dport),
        "not-allowed Docker container after dockerd restarted it",
    );
}

#[test]
fn download_survives_an_agent_restart() {
    const MIB: u64 = 1024 * 1024;
    const SIZE_MIB: u32 = 200;
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let (dport, pport) = (free_port(), free_port());
    let (dname, pname) = (unique("big-d"), unique("big-p"));
    let script_d = httpd_script(&dname, &[80], SIZE_MIB);
    let script_p = httpd_script(&pname, &[80], SIZE_MIB);
    let (pub_d, pub_p) = (format!("{dport}:80"), format!("{pport}:80"));
    let docker = engines.docker_run(&dname, &["-p", &pub_d, IMAGE, "/bin/sh", "-c", &script_d]);
    let podman = engines.podman_run(&pname, &["-p", &pub_p, IMAGE, "/bin/sh", "-c", &script_p]);
    docker.wait_serving(80);
    podman.wait_serving(80);
    let mut agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker", "podman"]);
    agent.allow(&dname, "80/tcp");
    agent.allow(&pname, "80/tcp");

    // 200 MiB each at 20 MiB/s: about 10 s, with the restart after the first 20 MiB.
    let through_docker = Download::start(&sc.client, sc.published(dport), "/big", 20 * MIB);
    let through_podman = Download::start(&sc.client, sc.published(pport), "/big", 20 * MIB);
    let deadline = Instant::now() + Duration::from_secs(20);
    while through_docker.received() < 20 * MIB || through_podman.received() < 20 * MIB {
        assert!(
            Instant::now() < deadline,
            "downloads did not get going: docker {} bytes, podman {} bytes",
            through_docker.received(),
            through_podman.received()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let at_restart = (through_docker.received(), through_podman.received());
    agent.restart();
    let after_restart = (through_docker.received(), through_podman.received());
    eprintln!(
        "received at SIGTERM {at_restart:?}, when the agent was ready again {after_restart:?}"
    );
    assert!(
        after_restart.0 < u64::from(SIZE_MIB) * MIB && after_restart.1 < u64::from(SIZE_MIB) * MIB,
        "the downloads should still be running after the restart: {after_restart:?}"
    );

    for (engine, download) in [("docker", through_docker), ("podman", through_podman)] {
        let (length, received) = download
            .finish()
            .unwrap_or_else(|e| panic!("download through {engine} broke: {e} ({:?})", e.kind()));
        assert_eq!(
            length,
            u64::from(SIZE_MIB) * MIB,
            "{engine}: Content-Length"
        );
        assert_eq!(received, length, "{engine}: bytes received");
    }
    // New connections still follow the rules after the restart.
    sc.assert_answers(
        sc.published(dport),
        &body_of(&dname),
        "Docker after the restart",
    );
    sc.assert_answers(
        sc.published(pport),
        &body_of(&pname),
        "Podman after the restart",
    );
}

/// Docker 28's networks without NAT protection: `gateway_mode_ipv4=routed` (no NAT; Docker
/// accepts routed traffic to published container ports) and `nat-unprotected` (every port of
/// the container is reachable by direct routing). The gate enforces on their bridges like on
/// any other: nothing answers until allowed, and only what is allowed. And on Docker 28's
/// default (`nat`) network, direct routing to a container is dropped in raw PREROUTING, before
/// the gate, even for an allowed port, while the published port answers. Docker 20.10 has none
/// of these modes: on the other sets the test says so and returns.
#[test]
fn docker28_routed_and_unprotected_networks_are_gated() {
    let (_serial, engines) = setup!();
    if engines.set != EngineSet::Sid {
        portgate_tests::not_applicable(format_args!(
            "engine set {}: its Docker has no gateway_mode_ipv4 (Docker 27 and later)",
            engines.set.name()
        ));
        return;
    }
    let sc = Scenario::new();
    // The client's default route is the host: it routes to container addresses directly.
    // The default network: Docker 28 drops direct routing in raw PREROUTING.
    let (dport, dname) = (free_port(), unique("nat-d"));
    let nat = engines.run_httpd(Engine::Docker, &dname, dport, &[]);
    let nat_address: std::net::Ipv4Addr = nat.address().parse().expect("docker0 address");
    let raw = iptables_rules_in("iptables", "raw", "PREROUTING");
    assert!(
        raw.iter()
            .any(|r| r.contains(&format!("-d {nat_address}/32")) && r.contains("-j DROP")),
        "Docker 28 should drop direct routing to {nat_address} in raw PREROUTING: {raw:?}"
    );

    let mut networks = Vec::new();
    let mut containers = Vec::new();
    let mut targets = Vec::new();
    for mode in ["routed", "nat-unprotected"] {
        let network = DockerNetwork::create(
            engines,
            &unique(mode),
            &[
                "-o",
                &format!("com.docker.network.bridge.gateway_mode_ipv4={mode}"),
            ],
        );
        let name = unique(&format!("web-{mode}"));
        let script = httpd_script(&name, &[81, 80], 0);
        let publish = format!("{}:80", free_port());
        let container = engines.docker_run(
            &name,
            &[
                "--network",
                &network.name,
                "-p",
                &publish,
                IMAGE,
                "/bin/sh",
                "-c",
                &script,
            ],
        );
        let address = container.wait_serving_on(&network.name, 80);
        container.wait_serving_on(&network.name, 81);
        eprintln!(
            "{mode}: {name} at {address} on {} ({})",
            network.name,
            network.subnet()
        );
        // Without the agent: the published container port answers by direct routing; the
        // unpublished one only where Docker does not protect it.
        sc.assert_answers(
            std::net::SocketAddr::from((address, 80)),
            &body_of(&name),
            &format!("{mode}: published port 80, routed directly, no agent"),
        );
        let unpublished = std::net::SocketAddr::from((address, 81));
        if mode == "routed" {
            sc.assert_times_out(unpublished, "routed: unpublished port 81, no agent");
        } else {
            sc.assert_answers(
                unpublished,
                &body_of(&name),
                "nat-unprotected: unpublished port 81, no agent",
            );
        }
        targets.push((mode, name, address));
        containers.push(container);
        networks.push(network);
    }

    let agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker", "podman"]);
    for (mode, _, address) in &targets {
        for port in [80, 81] {
            sc.assert_times_out(
                std::net::SocketAddr::from((*address, port)),
                &format!("{mode}: port {port} with the agent, no rule"),
            );
        }
    }
    for (mode, name, address) in &targets {
        agent.allow(name, "80/tcp");
        sc.assert_answers(
            std::net::SocketAddr::from((*address, 80)),
            &body_of(name),
            &format!("{mode}: port 80 after `portgate allow NAME 80/tcp`"),
        );
        sc.assert_times_out(
            std::net::SocketAddr::from((*address, 81)),
            &format!("{mode}: port 81, not allowed"),
        );
    }
    let (_, name, address) = &targets[1];
    agent.allow(name, "81/tcp");
    sc.assert_answers(
        std::net::SocketAddr::from((*address, 81)),
        &body_of(name),
        "nat-unprotected: port 81 after `portgate allow NAME 81/tcp`",
    );

    agent.allow(&dname, "80/tcp");
    sc.assert_answers(
        sc.published(dport),
        &body_of(&dname),
        "default network: published port after allow",
    );
    sc.assert_times_out(
        std::net::SocketAddr::from((nat_address, 80)),
        "default network: direct routing to an allowed port (raw PREROUTING drops it first)",
    );
    drop(agent);
    drop(containers);
    drop(networks);
}

/// What `status` says about each engine (version, Podman's network backend, the firewall it
/// writes to) is what the set runs; and a network made with `podman network create` (netavark
/// or CNI, its bridge named by Podman's own API) is found by `--bridge auto` and gated:
/// nothing answers until allowed.
#[test]
fn status_names_the_engines_and_podman_networks_are_gated() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let network = PodmanNetwork::create(engines, &unique("net"));
    let bridge = network.bridge();
    let (port, name) = (free_port(), unique("net-p"));
    let script = httpd_script(&name, &[80], 0);
    let publish = format!("{port}:80");
    let _web = engines.podman_run(
        &name,
        &[
            "--network",
            &network.name,
            "-p",
            &publish,
            IMAGE,
            "/bin/sh",
            "-c",
            &script,
        ],
    );
    let agent = EngineAgent::start(engines, &[]);
    let status = agent.wait_engines_connected(&["docker", "podman"]);
    let docker = engine_status(&status, "docker").expect("docker engine");
    let podman = engine_status(&status, "podman").expect("podman engine");
    let (docker_major, podman_major, backend, podman_firewall) = match engines.set {
        EngineSet::Debian12 => ("20.", "4.", "netavark", "iptables"),
        EngineSet::Cni => ("20.", "4.", "cni", "iptables"),
        EngineSet::Sid => ("28.", "5.", "netavark", "nftables"),
    };
    assert!(
        docker["version"]
            .as_str()
            .is_some_and(|v| v.starts_with(docker_major)),
        "docker's version on set {}: {docker}",
        engines.set.name()
    );
    assert_eq!(
        docker["firewall"], "iptables",
        "docker's firewall: {docker}"
    );
    assert!(
        podman["version"]
            .as_str()
            .is_some_and(|v| v.starts_with(podman_major)),
        "podman's version on set {}: {podman}",
        engines.set.name()
    );
    assert_eq!(podman["network_backend"], backend, "podman: {podman}");
    assert_eq!(podman["firewall"], podman_firewall, "podman: {podman}");
    if engines.set == EngineSet::Sid {
        // Docker 28 files its rules under DOCKER-FORWARD, and still jumps to DOCKER-USER
        // first: the delegation rule for docker0 goes there, before a RETURN if the chain
        // has one (Docker 28.3 and later create it without: moby#50098; an older daemon's
        // stays until the next reboot).
        let forward = iptables_rules("iptables", "FORWARD");
        assert!(
            forward.iter().any(|r| r == "-A FORWARD -j DOCKER-FORWARD"),
            "Docker 28's FORWARD: {forward:?}"
        );
        let deadline = Instant::now() + FOLLOW_TIMEOUT;
        let docker0 = loop {
            let status = agent.status_json();
            let found = status["netfilter"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["bridge"] == "docker0" && n["replies"] != true)
                .cloned();
            if let Some(found) = found {
                break found;
            }
            assert!(
                Instant::now() < deadline,
                "no delegation rule for docker0: {status}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(docker0["chain"], "DOCKER-USER", "docker0's rule: {docker0}");
        let user = iptables_rules("iptables", "DOCKER-USER");
        let ours = user
            .iter()
            .position(|r| r.contains("-o docker0") && r.contains("portgate: delegate docker0"))
            .unwrap_or_else(|| panic!("docker0's rule is not in DOCKER-USER: {user:?}"));
        if let Some(ret) = user.iter().position(|r| r == "-A DOCKER-USER -j RETURN") {
            assert!(
                ours < ret,
                "the delegation rule goes before DOCKER-USER's RETURN: {user:?}"
            );
        }
    }
    let text = agent.cli_ok(&["status"]);
    assert!(
        text.lines().any(|l| l.starts_with("engine:")
            && l.contains("podman")
            && l.contains(&format!("(firewall {podman_firewall})"))),
        "`status` should name podman's firewall: {text}"
    );

    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    while !agent.status_json()["bridges"].as_array().is_some_and(|b| {
        b.iter()
            .any(|b| b["name"] == bridge.as_str() && b["attached"] == true)
    }) {
        assert!(
            Instant::now() < deadline,
            "--bridge auto should gate {bridge} (podman network {}): {}",
            network.name,
            agent.status_json()["bridges"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    sc.assert_times_out(
        sc.published(port),
        &format!(
            "Podman container on network {} ({bridge}), no rule",
            network.name
        ),
    );
    agent.allow(&name, "80/tcp");
    sc.assert_answers(
        sc.published(port),
        &body_of(&name),
        &format!(
            "Podman container on network {} ({bridge}) after allow",
            network.name
        ),
    );
}

/// `--host-port` names the container port a host port maps to, on both engines, and labels
/// carry sources: one that names the client's address answers it, one that names another
/// prefix does not (counted `source_not_allowed`).
#[test]
fn host_port_rules_and_labels_with_sources_on_both_engines() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let (dport, pport) = (free_port(), free_port());
    let (dname, pname) = (unique("hp-d"), unique("hp-p"));
    let _docker = engines.run_httpd(Engine::Docker, &dname, dport, &[]);
    let _podman = engines.run_httpd(Engine::Podman, &pname, pport, &[]);
    let client_label = format!("portgate.allow=80/tcp from {}/32", sc.client_addr);
    let other_label = "portgate.allow=80/tcp from 192.0.2.0/24".to_owned();
    let mut labelled = Vec::new();
    for (engine, tag, label) in [
        (Engine::Docker, "lf-d", &client_label),
        (Engine::Podman, "lf-p", &client_label),
        (Engine::Docker, "lo-d", &other_label),
        (Engine::Podman, "lo-p", &other_label),
    ] {
        let (port, name) = (free_port(), unique(tag));
        let container = engines.run_httpd(engine, &name, port, &["--label", label]);
        labelled.push((engine, port, name, label == &client_label, container));
    }
    let agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker", "podman"]);

    for (port, name) in [(dport, &dname), (pport, &pname)] {
        sc.assert_times_out(sc.published(port), "a published port under default deny");
        agent.cli_ok(&["allow", "--host-port", &format!("{port}/tcp")]);
        sc.assert_answers(
            sc.published(port),
            &body_of(name),
            "after `portgate allow --host-port PORT/tcp`",
        );
        let list = agent.list_json();
        assert!(
            container_rules(&list, name)
                .iter()
                .any(|r| r["target"] == format!("host-port {port}/tcp") && r["active"] == true),
            "the host-port rule is listed as active for {name}: {list}"
        );
    }
    agent.cli_ok(&["deny", "--host-port", &format!("{dport}/tcp")]);
    sc.assert_times_out(sc.published(dport), "after `portgate deny --host-port`");

    for (engine, port, name, admits_client, _) in &labelled {
        if *admits_client {
            sc.assert_answers_within(
                sc.published(*port),
                &body_of(name),
                FOLLOW_TIMEOUT,
                &format!("{engine:?} container whose label names the client"),
            );
        } else {
            sc.assert_times_out(
                sc.published(*port),
                &format!("{engine:?} container whose label names another prefix"),
            );
        }
    }
    let status = agent.status_json();
    assert!(
        status["counters"]["drop"]["source_not_allowed"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "the refused connections count as source_not_allowed: {status}"
    );
}
