//! The Debian package (`cargo xtask deb`) on this machine: it installs (binary on PATH, unit
//! and the engines' drop-ins verified by `systemd-analyze`, man pages, completions), the
//! installed agent tells the service manager it is ready only once the gate is attached, it
//! survives SIGHUP (ExecReload), and `dpkg -r` stops it and leaves no pins under
//! /sys/fs/bpf/portgate and no netfilter rules of portgate; `dpkg -P` leaves nothing.
//!
//! The "host" is a sandbox's host namespace (bridge, client, container): the agent, its
//! delegation rule (FORWARD policy DROP there) and `dpkg -r` all run in it, so the host's own
//! firewall is not touched. bpffs, /usr and /etc are the machine's. Needs root, dpkg and
//! systemd-analyze, and the package: `$PORTGATE_DEB`, else target/debian/portgate.deb
//! (`cargo xtask test` builds it first).

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portgate_tests::net::{assert_tcp_answers, assert_tcp_times_out, sa};
use portgate_tests::sandbox::{BRIDGE, CONTAINER_V4, HOST_V4};
use portgate_tests::{Sandbox, TcpEchoServer, require_root, skip};
use serde_json::Value;

const PINS: &str = "/sys/fs/bpf/portgate";
const SOCKET: &str = "/run/portgate/portgate.sock";
const STATE: &str = "/var/lib/portgate";
const UNIT: &str = "/lib/systemd/system/portgate.service";

fn find_deb() -> PathBuf {
    std::env::var_os("PORTGATE_DEB").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian/portgate.deb"),
        PathBuf::from,
    )
}

fn output(command: &mut Command) -> (bool, String) {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ok(command: &mut Command) -> String {
    let (success, text) = output(command);
    assert!(success, "{command:?} failed:\n{text}");
    text
}

fn is_installed() -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", "portgate"]))
        .1
        .contains("install ok installed")
}

/// Waits for one datagram on the notify socket and returns it.
fn next_notification(socket: &UnixDatagram, timeout: Duration) -> Option<String> {
    socket.set_read_timeout(Some(timeout)).ok()?;
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Waits for a notification containing `state`, returning everything received until then.
fn wait_notification(socket: &UnixDatagram, state: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Some(message) = next_notification(socket, deadline - Instant::now()) {
            let done = message.lines().any(|l| l == state);
            seen.push(message);
            if done {
                return seen;
            }
        }
    }
    panic!("no {state} on NOTIFY_SOCKET within {timeout:?}; got {seen:?}");
}

/// The agent, killed when the test fails before `dpkg -r` stopped it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().is_ok_and(|s| s.is_none()) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            // The gate stays after a kill (fail closed); a failed test does not leave it.
            let _ = Command::new("/usr/bin/portgate").arg("uninstall").output();
        }
    }
}

/// `podman generate systemd --new --name db` (Podman 4.3), trimmed.
const GENERATED_UNIT: &str = "[Unit]\nDescription=Podman container-db.service\nWants=network-online.target\nAfter=network-online.target\n\n[Service]\nEnvironment=PODMAN_SYSTEMD_UNIT=%n\nRestart=on-failure\nExecStart=/usr/bin/podman run --cidfile=%t/%n.ctr-id --rm --sdnotify=conmon -d --replace --name db -p 5432:5432 localhost/db\nExecStop=/usr/bin/podman stop --ignore -t 10 --cidfile=%t/%n.ctr-id\nType=notify\nNotifyAccess=all\n\n[Install]\nWantedBy=default.target\n";

/// The package's systemd generator, run as systemd runs it, on a Quadlet file and a
/// `podman generate systemd` unit: each gets a drop-in ordering it after portgate.service,
/// which systemd-analyze accepts with no cycle in a boot that wants them all.
fn container_units_wait_for_the_gate(dir: &Path) {
    let generator = "/lib/systemd/system-generators/portgate";
    let quadlet = dir.join("quadlet");
    let units = dir.join("units");
    let out = dir.join("generator");
    for d in [&quadlet, &units, &out] {
        std::fs::create_dir_all(d).expect("write the test units");
    }
    std::fs::write(
        quadlet.join("web.container"),
        "[Container]\nImage=localhost/web\nPublishPort=8080:80\n",
    )
    .expect("write the test units");
    std::fs::write(units.join("container-db.service"), GENERATED_UNIT)
        .expect("write the test units");
    let listed = ok(Command::new(generator)
        .arg(&out)
        .arg(dir.join("early"))
        .arg(dir.join("late"))
        .arg("--quadlet-dir")
        .arg(&quadlet)
        .arg("--unit-dir")
        .arg(&units));
    assert!(
        listed.contains("web.service") && listed.contains("container-db.service"),
        "{listed}"
    );
    for unit in ["web.service", "container-db.service"] {
        let drop_in = std::fs::read_to_string(out.join(format!("{unit}.d/portgate.conf")))
            .unwrap_or_else(|e| panic!("no drop-in for {unit}: {e}"));
        assert!(
            drop_in.contains("After=portgate.service")
                && drop_in.contains("Wants=portgate.service"),
            "{unit}'s drop-in:\n{drop_in}"
        );
    }
    // The generated service with its drop-in, found through the unit path as systemd would.
    let target = dir.join("pgt-containers.target");
    std::fs::write(
        &target,
        "[Unit]\nWants=portgate.service container-db.service\n",
    )
    .expect("write the test units");
    let path = format!("{}:{}:{}:", units.display(), out.display(), dir.display());
    let (verified, text) = output(
        Command::new("systemd-analyze")
            .env("SYSTEMD_UNIT_PATH", &path)
            .arg("verify")
            .arg(units.join("container-db.service"))
            .arg(&target),
    );
    assert!(
        verified && !text.contains("cycle") && !text.contains("portgate.conf"),
        "systemd-analyze verify of a container unit with its drop-in:\n{text}"
    );
}

#[test]
fn deb_installs_gates_once_ready_and_removes_cleanly() {
    if !require_root() {
        return;
    }
    for tool in ["dpkg", "systemd-analyze"] {
        if !output(Command::new("sh").args(["-c", &format!("command -v {tool}")])).0 {
            skip(format_args!(
                "`{tool}` not found (apt-get install systemd; `cargo xtask setup` does)"
            ));
            return;
        }
    }
    let deb = find_deb();
    if !deb.is_file() {
        skip(format_args!(
            "no package at {}: build it with `cargo xtask deb` (or set PORTGATE_DEB)",
            deb.display()
        ));
        return;
    }
    // This test removes the machine's default gate; it must not be someone's real one.
    assert!(
        !Path::new(PINS).exists() && std::os::unix::net::UnixStream::connect(SOCKET).is_err(),
        "{PINS} or {SOCKET} exists: a portgate gate is installed on this machine; the package test would remove it"
    );
    if is_installed() {
        ok(Command::new("dpkg").args(["-P", "portgate"]));
    }

    // Install.
    let started = Instant::now();
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(is_installed(), "dpkg -i did not leave portgate installed");
    eprintln!("package test: installed after {:?}", started.elapsed());
    let which = ok(Command::new("sh").args(["-c", "command -v portgate"]));
    assert_eq!(which.trim(), "/usr/bin/portgate", "portgate on PATH");
    let version = ok(Command::new("portgate").arg("--version"));
    assert!(
        version.starts_with("portgate "),
        "portgate --version: {version}"
    );
    for file in [
        UNIT,
        "/lib/systemd/system/docker.service.d/portgate.conf",
        "/lib/systemd/system/podman.service.d/portgate.conf",
        "/lib/systemd/system/podman.socket.d/portgate.conf",
        "/lib/systemd/system/podman-restart.service.d/portgate.conf",
        "/usr/share/man/man1/portgate.1",
        "/usr/share/man/man1/portgate-doctor.1",
        "/usr/share/bash-completion/completions/portgate",
        "/usr/share/zsh/vendor-completions/_portgate",
        "/usr/share/fish/vendor_completions.d/portgate.fish",
        "/etc/portgate/README",
        "/etc/systemd/system/multi-user.target.wants/portgate.service",
    ] {
        assert!(
            Path::new(file).exists(),
            "the package did not install {file}"
        );
    }
    let man = std::fs::read_to_string("/usr/share/man/man1/portgate-doctor.1").unwrap();
    assert!(
        man.contains(".TH portgate-doctor") && man.contains("json"),
        "portgate-doctor.1:\n{man}"
    );
    let completion = ok(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/portgate && complete -p portgate",
    ]));
    assert!(
        completion.contains("portgate"),
        "bash completion: {completion}"
    );

    // The unit, and a boot that wants it with every engine unit: no error, no ordering cycle.
    let (verified, text) = output(Command::new("systemd-analyze").args(["verify", UNIT]));
    assert!(
        verified && text.trim().is_empty(),
        "systemd-analyze verify {UNIT}:\n{text}"
    );
    let boot = tempfile::tempdir().unwrap();
    let target = boot.path().join("pgt-boot.target");
    std::fs::write(
        &target,
        "[Unit]\nWants=portgate.service docker.socket docker.service containerd.service \
         podman.socket podman.service podman-restart.service sockets.target basic.target \
         multi-user.target\n",
    )
    .unwrap();
    let (verified, text) = output(Command::new("systemd-analyze").arg("verify").arg(&target));
    assert!(
        verified && !text.contains("cycle") && !text.contains("portgate"),
        "systemd-analyze verify of a boot with portgate and the engines:\n{text}"
    );
    container_units_wait_for_the_gate(boot.path());
    eprintln!("package test: unit verified after {:?}", started.elapsed());

    // The installed agent, as the unit runs it, on a sandbox's host with FORWARD policy DROP.
    let sandbox = Sandbox::new();
    ok(sandbox
        .command_in(&sandbox.host, "iptables")
        .args(["-P", "FORWARD", "DROP"]));
    // Replies pass, as on any host with that policy (Docker and netavark add the same).
    ok(sandbox.command_in(&sandbox.host, "iptables").args([
        "-A",
        "FORWARD",
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ]));
    // A published port, as the engines make one: the host's 8080 DNATed to the container.
    ok(sandbox.command_in(&sandbox.host, "iptables").args([
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
        &format!("{CONTAINER_V4}:8080"),
    ]));
    let _server = TcpEchoServer::start(
        &sandbox,
        &sandbox.container,
        sa(&format!("{CONTAINER_V4}:8080")),
    );
    let published = sa(&format!("{HOST_V4}:8080"));
    let notify_path = boot.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let log = std::fs::File::create(boot.path().join("agent.log")).unwrap();
    let mut agent = KillOnDrop(
        sandbox
            .command_in(&sandbox.host, "/usr/bin/portgate")
            // As the unit runs it, but on the sandbox's bridge, following no engine of the machine.
            .args([
                "agent",
                "--bridge",
                "auto",
                "--bridge",
                BRIDGE,
                "--runtime",
                "none",
            ])
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let agent = &mut agent.0;
    let seen = wait_notification(&notify, "READY=1", Duration::from_secs(30));
    // READY means gated at that moment, not a little later: the agent is stopped (SIGSTOP)
    // as soon as READY=1 arrives, and what it had done by then is checked without it: the
    // gate's link on the bridge is pinned (the agent pins a link once it is attached), and
    // the published port is closed. (The delegation rule is a thread's, installed
    // independently: it is checked in the status below.)
    // SAFETY: kill has no memory preconditions; the pid is our child's, not yet reaped.
    assert_eq!(unsafe { libc::kill(agent.id() as i32, libc::SIGSTOP) }, 0);
    eprintln!("package test: READY=1 after {:?}", started.elapsed());
    let agent_log = || std::fs::read_to_string(boot.path().join("agent.log")).unwrap_or_default();
    let link = Path::new(PINS)
        .join(gate_common::LAYOUT_VERSION)
        .join("links")
        .join(format!("{BRIDGE}-egress"));
    assert!(
        link.exists(),
        "READY=1 ({seen:?}) before {BRIDGE} was attached: no {}\n{}",
        link.display(),
        agent_log()
    );
    assert_tcp_times_out(&sandbox, &sandbox.client, published);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(agent.id() as i32, libc::SIGCONT) }, 0);
    // And what the agent says: the bridge attached, new connections dropped.
    let status: Value = serde_json::from_str(&ok(sandbox
        .command_in(&sandbox.host, "portgate")
        .args(["status", "--json"])))
    .unwrap();
    assert!(
        status["bridges"].as_array().is_some_and(|b| b
            .iter()
            .any(|b| b["name"] == BRIDGE && b["attached"] == true)),
        "READY=1 ({seen:?}) before {BRIDGE} was attached: {}\n{}",
        status["bridges"],
        agent_log()
    );
    assert_tcp_times_out(&sandbox, &sandbox.client, published);
    assert!(
        status["netfilter"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["installed"] == true)),
        "no delegation rule under FORWARD policy DROP: {}",
        status["netfilter"]
    );
    ok(sandbox
        .command_in(&sandbox.host, "portgate")
        .args(["allow", CONTAINER_V4, "8080/tcp"]));
    assert_tcp_answers(&sandbox, &sandbox.client, published);

    // ExecReload: SIGHUP reloads (RELOADING=1, then READY=1) and the agent keeps running.
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    assert_eq!(unsafe { libc::kill(agent.id() as i32, libc::SIGHUP) }, 0);
    wait_notification(&notify, "READY=1", Duration::from_secs(10));
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the agent exited on SIGHUP:\n{}",
        agent_log()
    );
    assert_tcp_answers(&sandbox, &sandbox.client, published);
    assert!(
        Path::new(PINS).exists(),
        "no pins under {PINS} while the agent runs"
    );

    eprintln!("package test: SIGHUP handled after {:?}", started.elapsed());
    // Remove: prerm stops the agent and removes the gate, in the host where it runs.
    let removed = ok(sandbox
        .command_in(&sandbox.host, "dpkg")
        .args(["-r", "portgate"]));
    let exited = (0..100).find_map(|_| {
        let status = agent.try_wait().unwrap();
        if status.is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
        status
    });
    assert!(
        exited.is_some(),
        "dpkg -r left the agent running:\n{removed}"
    );
    assert!(
        !removed.contains("did not stop") && !removed.contains("failed"),
        "dpkg -r:\n{removed}"
    );
    assert!(!is_installed(), "dpkg -r left portgate installed");
    eprintln!("package test: removed after {:?}", started.elapsed());
    assert!(
        !Path::new("/usr/bin/portgate").exists(),
        "dpkg -r left /usr/bin/portgate"
    );
    assert!(
        !Path::new(PINS).exists(),
        "dpkg -r left pins under {PINS}:\n{removed}"
    );
    for (tool, args) in [("iptables", &["-S"][..]), ("nft", &["list", "ruleset"][..])] {
        let rules = ok(sandbox.command_in(&sandbox.host, tool).args(args));
        assert!(
            !rules.contains("portgate"),
            "dpkg -r left portgate's netfilter rules ({tool}):\n{rules}"
        );
    }
    assert_tcp_times_out(&sandbox, &sandbox.client, published); // FORWARD DROP rules again

    // Purge: nothing of portgate is left.
    ok(Command::new("dpkg").args(["-P", "portgate"]));
    for path in [
        STATE,
        "/etc/portgate",
        UNIT,
        "/etc/systemd/system/multi-user.target.wants/portgate.service",
        "/etc/systemd/system/portgate.service",
    ] {
        assert!(
            std::fs::symlink_metadata(path).is_err(),
            "dpkg -P left {path}"
        );
    }
    eprintln!("package test took {:?}", started.elapsed());
}
