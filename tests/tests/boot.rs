//! The boot order, simulated with the real engines (the machines here have no systemd PID 1):
//! containers with `--restart always` and published ports exist (Docker's on docker0 and on a
//! user-defined network, Podman's); the engines shut down and their bridges are gone (a
//! reboot); the agent starts first (`--bridge auto`, as the unit runs it), then containerd
//! and dockerd, and Podman's service and podman-restart's
//! `podman start --all --filter restart-policy=always`, bring the containers back while a
//! client probes each published port every 20 ms, over IPv4 and (docker-proxy) IPv6. Not
//! one connection may be answered before `portgate allow`, nor a hairpin one from docker0;
//! afterwards they are.
//!
//! It stops and starts the machine's engines: its own test binary, so no other engine test
//! runs meanwhile.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use portgate_tests::engines::{
    Engine, EngineAgent, Engines, FOLLOW_TIMEOUT, IMAGE, Scenario, body_of, boot, free_port,
    hairpin_answers, httpd_script, unique,
};
use portgate_tests::{not_applicable, sandbox::in_netns, skip};

const PROBE_EVERY: Duration = Duration::from_millis(20);

/// A client probing one published port every [`PROBE_EVERY`], recording when a connection
/// was answered (established).
struct Probe {
    addr: SocketAddr,
    attempts: Arc<Mutex<u64>>,
    answers: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Probe {
    fn start(client_ns: &str, addr: SocketAddr) -> Self {
        let (attempts, answers, stop) = (
            Arc::new(Mutex::new(0)),
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let thread = {
            let (attempts, answers, stop, ns) = (
                attempts.clone(),
                answers.clone(),
                stop.clone(),
                client_ns.to_owned(),
            );
            std::thread::spawn(move || {
                in_netns(&ns, || {
                    while !stop.load(Ordering::SeqCst) {
                        let tick = Instant::now();
                        *attempts.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                        if TcpStream::connect_timeout(&addr, PROBE_EVERY).is_ok() {
                            answers
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Instant::now());
                        }
                        if let Some(rest) = PROBE_EVERY.checked_sub(tick.elapsed()) {
                            std::thread::sleep(rest);
                        }
                    }
                })
            })
        };
        Probe {
            addr,
            attempts,
            answers,
            stop,
            thread: Some(thread),
        }
    }

    fn attempts(&self) -> u64 {
        *self.attempts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answers(&self) -> Vec<Instant> {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A user-defined Docker network (its bridge is `br-<12 hex digits of its ID>`), removed on
/// drop.
struct Network {
    engines: &'static Engines,
    name: String,
}

impl Network {
    fn create(engines: &'static Engines, name: &str) -> Self {
        engines.cli_ok(Engine::Docker, &["network", "create", name]);
        Network {
            engines,
            name: name.to_owned(),
        }
    }

    fn bridge(&self) -> String {
        let id = self.engines.cli_ok(
            Engine::Docker,
            &["network", "inspect", "--format", "{{.Id}}", &self.name],
        );
        format!("br-{}", &id[..12])
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = self
            .engines
            .cli(Engine::Docker)
            .args(["network", "rm", &self.name])
            .output();
    }
}

/// Waits until the Docker container `name` serves port 80 on its (only) network address, from
/// the root namespace; returns the address.
fn wait_serving_on_network(engines: &Engines, name: &str) -> String {
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    loop {
        let address = engines.cli_ok(
            Engine::Docker,
            &[
                "inspect",
                "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                name,
            ],
        );
        if let Ok(ip) = address.parse::<std::net::Ipv4Addr>()
            && TcpStream::connect_timeout(&SocketAddr::from((ip, 80)), Duration::from_secs(1))
                .is_ok()
        {
            return address;
        }
        assert!(
            Instant::now() < deadline,
            "{name} does not serve port 80 on {address:?} after {FOLLOW_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn containers_restarted_at_boot_never_answer_before_allow() {
    let Some(engines) = Engines::get() else {
        return;
    };
    if engines.root.is_some() {
        // Not a skip: this set's engines run in a chroot the boot simulation does not stop.
        not_applicable("the boot simulation runs on the host's own engines (engine set debian12)");
        return;
    }
    if let Err(why) = engines.may_restart_dockerd() {
        skip(format_args!(
            "the boot simulation stops this machine's engines: {why}"
        ));
        return;
    }
    let sc = Scenario::new();
    let (dport, pport, nport) = (free_port(), free_port(), free_port());
    let (dname, pname, nname) = (unique("boot-d"), unique("boot-p"), unique("boot-n"));
    // Declared before its container, so that it is removed after it.
    let network = Network::create(engines, &unique("boot-net"));
    let _docker = engines.run_httpd(
        Engine::Docker,
        &dname,
        dport,
        &["--restart", "always", "--stop-timeout", "1"],
    );
    let _podman = engines.run_httpd(Engine::Podman, &pname, pport, &["--restart", "always"]);
    let script = httpd_script(&nname, &[80], 0);
    let _on_network = engines.docker_run(
        &nname,
        &[
            "--network",
            &network.name,
            "--restart",
            "always",
            "--stop-timeout",
            "1",
            "-p",
            &format!("{nport}:80"),
            IMAGE,
            "/bin/sh",
            "-c",
            &script,
        ],
    );
    wait_serving_on_network(engines, &nname);
    let network_bridge = network.bridge();

    // Shutdown: Podman's container stops with the machine, the daemons get SIGTERM (dockerd
    // stops its containers), and after the reboot no engine bridge exists.
    engines.cli_ok(Engine::Podman, &["stop", "-t", "1", &pname]);
    boot::shut_down_engines().unwrap();
    let mut removed = boot::remove_engine_bridges();
    portgate_tests::run_ok(std::process::Command::new("ip").args([
        "link",
        "delete",
        &network_bridge,
    ]));
    removed.push(network_bridge.clone());
    eprintln!("boot: engines stopped, bridges removed: {removed:?}");

    // Boot: the agent first, as the unit runs it; the probes from then on.
    let booted = Instant::now();
    // No metrics: another agent on this machine may serve the default address.
    let agent = EngineAgent::start(engines, &["--metrics-addr", "off"]);
    // IPv4 meets the bridge gate; IPv6 (the networks are IPv4-only) meets docker-proxy,
    // which binds before the agent's first sync has published anything.
    let probes = [
        Probe::start(&sc.client, sc.published(dport)),
        Probe::start(&sc.client, sc.published(pport)),
        Probe::start(&sc.client, sc.published(nport)),
        Probe::start(&sc.client, sc.published6(dport)),
        Probe::start(&sc.client, sc.published6(nport)),
    ];
    boot::start_docker(engines).unwrap();
    boot::start_podman(engines).unwrap();
    let docker_up = _docker.wait_serving(80);
    let podman_up = _podman.wait_serving(80);
    let network_up = wait_serving_on_network(engines, &nname);
    eprintln!(
        "boot: containers serving after {:?} (docker {docker_up}, podman {podman_up}, {network_bridge} {network_up})",
        booted.elapsed()
    );
    agent.wait_engines_connected(&["docker", "podman"]);
    // Keep probing a while with everything up.
    std::thread::sleep(Duration::from_secs(3));
    let allowed_at = Instant::now();
    for probe in &probes {
        let answered = probe.answers();
        assert!(
            answered.is_empty(),
            "{} answered {} of {} probes before `portgate allow`, the first {:?} after the agent started\nagent log:\n{}",
            probe.addr,
            answered.len(),
            probe.attempts(),
            answered[0] - booted,
            agent.log_text()
        );
    }
    let before: Vec<u64> = probes.iter().map(Probe::attempts).collect();
    assert!(
        !hairpin_answers(engines, dport, &body_of(&dname)),
        "a hairpin connection from docker0 answered before `portgate allow`"
    );

    // Allowed, both answer (the probes, and a full GET).
    agent.allow(&dname, "80/tcp");
    agent.allow(&pname, "80/tcp");
    agent.allow(&nname, "80/tcp");
    sc.assert_answers_within(
        sc.published(dport),
        &body_of(&dname),
        FOLLOW_TIMEOUT,
        "Docker's container after allow",
    );
    sc.assert_answers_within(
        sc.published(pport),
        &body_of(&pname),
        FOLLOW_TIMEOUT,
        "Podman's container after allow",
    );
    sc.assert_answers_within(
        sc.published(nport),
        &body_of(&nname),
        FOLLOW_TIMEOUT,
        "the container on a user-defined Docker network after allow",
    );
    assert!(
        hairpin_answers(engines, dport, &body_of(&dname)),
        "a hairpin connection from docker0 should answer after allow"
    );
    std::thread::sleep(Duration::from_millis(500));
    for probe in &probes {
        assert!(
            probe.answers().iter().any(|t| *t >= allowed_at),
            "{} never answered a probe after allow",
            probe.addr
        );
    }
    eprintln!(
        "boot: {before:?} probes every {PROBE_EVERY:?} before allow, none answered; answers after allow"
    );
}
