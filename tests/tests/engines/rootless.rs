//! Rootless Podman, run by a real ordinary user the test creates: its published ports are
//! listening sockets of the host (`rootlessport` on Podman 4 with slirp4netns, `pasta` on
//! Podman 5), closed until a rule opens them, over IPv4 and IPv6.
//!
//! On the sid set the user's Podman runs from the sid root, entered with `pivot_root` in a
//! mount namespace of its own: the kernel refuses user namespaces to a chrooted process.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use portgate_tests::agent::Agent;
use portgate_tests::engines::{PODMAN_ULIMITS, httpd_script, run_timeout};
use serde_json::Value;

use super::*;

/// The program that runs a command as the user: `setpriv` to its ids, a clean environment
/// with its HOME and XDG_RUNTIME_DIR, its home as working directory.
const AS_USER: &str = r#"cd "$HOME" && exec "$@""#;
/// Enters the root directory `$1` in a mount namespace of its own (see the module doc).
const INTO_ROOT: &str = r#"root=$1; shift; mount --make-rprivate / && mount --rbind "$root" "$root" && cd "$root" && pivot_root . . && umount -l . && cd / && exec "$@""#;
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A user of the host (or of the sid root) with subordinate ids, removed with everything it
/// ran on drop (also when the test fails).
struct RootlessUser {
    name: String,
    uid: u32,
    /// The sid root the user lives in, or None for the host.
    root: Option<PathBuf>,
}

impl RootlessUser {
    /// A new user `pgr<pid>`; None (after saying why) when this host cannot run rootless
    /// Podman.
    fn create(engines: &Engines) -> Option<Self> {
        let root = engines.root.clone();
        let within = |p: &str| match &root {
            Some(r) => r.join(p.trim_start_matches('/')),
            None => PathBuf::from(p),
        };
        let podman_net = if root.is_some() {
            "/usr/bin/pasta"
        } else {
            "/usr/bin/slirp4netns"
        };
        for needed in ["/usr/bin/newuidmap", "/usr/bin/newgidmap", podman_net] {
            if !within(needed).is_file() {
                portgate_tests::skip(format!(
                    "rootless Podman needs {} (apt-get install uidmap slirp4netns passt{}; `cargo xtask setup` does)",
                    within(needed).display(),
                    if root.is_some() {
                        " in the sid root"
                    } else {
                        ""
                    }
                ));
                return None;
            }
        }
        reap_stale_users(root.as_deref());
        let name = format!("pgr{}", std::process::id());
        let mut useradd = match &root {
            Some(r) => {
                let mut c = Command::new("chroot");
                c.arg(r).arg("useradd");
                c
            }
            None => Command::new("useradd"),
        };
        portgate_tests::run_ok(useradd.args(["-m", "-s", "/bin/sh", &name]));
        let passwd = std::fs::read_to_string(within("/etc/passwd")).expect("passwd");
        let uid = passwd
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f[0] == name).then(|| f[2].parse::<u32>().expect("uid"))
            })
            .expect("the new user's uid");
        let user = RootlessUser {
            name,
            uid,
            root: root.clone(),
        };
        // Subordinate ids: useradd gives them on Debian; add a range where it did not.
        for file in ["/etc/subuid", "/etc/subgid"] {
            let path = within(file);
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if !text
                .lines()
                .any(|l| l.starts_with(&format!("{}:", user.name)))
            {
                let start = 2_000_000 + (std::process::id() % 1000) * 65536;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&path)
                    .expect("open subordinate ids");
                writeln!(f, "{}:{start}:65536", user.name).expect("write subordinate ids");
            }
        }
        let runtime_dir = within(&format!("/run/user/{uid}"));
        std::fs::create_dir_all(&runtime_dir).expect("XDG_RUNTIME_DIR");
        portgate_tests::run_ok(
            Command::new("chown")
                .arg(format!("{uid}:{uid}"))
                .arg(&runtime_dir),
        );
        portgate_tests::run_ok(Command::new("chmod").arg("700").arg(&runtime_dir));
        // Debian ships /dev/net/tun 0666; this machine has it 0600 (slirp4netns and pasta
        // open it as the user).
        portgate_tests::run_ok(Command::new("chmod").args(["666", "/dev/net/tun"]));
        Some(user)
    }

    fn within(&self, path: &str) -> PathBuf {
        match &self.root {
            Some(r) => r.join(path.trim_start_matches('/')),
            None => PathBuf::from(path),
        }
    }

    /// `podman ARGS` as the user.
    fn podman(&self, args: &[&str]) -> Output {
        let home = format!("/home/{}", self.name);
        let ids = [
            format!("--reuid={}", self.uid),
            format!("--regid={}", self.uid),
        ];
        let env = [
            format!("HOME={home}"),
            format!("USER={}", self.name),
            format!("XDG_RUNTIME_DIR=/run/user/{}", self.uid),
            format!("PATH={PATH}"),
            "PODMAN_IGNORE_CGROUPSV1_WARNING=1".to_owned(),
        ];
        let mut command = match &self.root {
            Some(root) => {
                let mut c = Command::new("unshare");
                c.args(["-m", "sh", "-c", INTO_ROOT, "sh"]).arg(root);
                c
            }
            None => Command::new("env"),
        };
        command
            .args(["setpriv", &ids[0], &ids[1], "--clear-groups", "env", "-i"])
            .args(&env)
            .args(["sh", "-c", AS_USER, "sh", "/usr/bin/podman"])
            .args(args)
            .stdin(std::process::Stdio::null());
        run_timeout(&mut command, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("podman {args:?} as {}: {e:#}", self.name))
    }

    fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "podman {args:?} as {} failed ({}): {}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `podman run -d --name NAME -p PORT:80 ... IMAGE httpd` serving [`body_of`]`(label)`.
    fn run_httpd(&self, name: &str, body: &str, port: u16, options: &[&str]) -> String {
        let publish = format!("{port}:80");
        let script = httpd_script(body, &[80], 0);
        let mut args = vec!["run", "-d", "--name", name];
        args.extend_from_slice(PODMAN_ULIMITS);
        args.extend_from_slice(&["-p", &publish]);
        args.extend_from_slice(options);
        args.extend_from_slice(&[IMAGE, "/bin/sh", "-c", &script]);
        let id = self.podman_ok(&args);
        wait_host_serving(port, &body_of(body));
        id.lines().last().unwrap_or_default().to_owned()
    }
}

impl Drop for RootlessUser {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-af", "-t", "0"]);
        remove_user(&self.name, self.uid, self.root.as_deref());
    }
}

/// Ends every process of `uid` (by PID), deletes the user, its ids and runtime directory.
fn remove_user(name: &str, uid: u32, root: Option<&Path>) {
    for _ in 0..20 {
        let pids: Vec<String> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter(|e| {
                std::fs::read_to_string(e.path().join("status")).is_ok_and(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Uid:"))
                        .and_then(|l| l.split_whitespace().next())
                        == Some(uid.to_string().as_str())
                })
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if pids.is_empty() {
            break;
        }
        let _ = Command::new("kill").arg("-9").args(&pids).output();
        std::thread::sleep(Duration::from_millis(200));
    }
    let within = |p: &str| match root {
        Some(r) => r.join(p.trim_start_matches('/')),
        None => PathBuf::from(p),
    };
    let mut userdel = match root {
        Some(r) => {
            let mut c = Command::new("chroot");
            c.arg(r).arg("userdel");
            c
        }
        None => Command::new("userdel"),
    };
    let _ = userdel.args(["-r", "-f", name]).output();
    for file in ["/etc/subuid", "/etc/subgid"] {
        let path = within(file);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let kept: String = text
                .lines()
                .filter(|l| !l.starts_with(&format!("{name}:")))
                .map(|l| format!("{l}\n"))
                .collect();
            let _ = std::fs::write(&path, kept);
        }
    }
    let _ = std::fs::remove_dir_all(within(&format!("/run/user/{uid}")));
}

/// Users `pgr<pid>` of runs that were killed.
fn reap_stale_users(root: Option<&Path>) {
    let passwd = root.map_or_else(|| PathBuf::from("/etc/passwd"), |r| r.join("etc/passwd"));
    let text = std::fs::read_to_string(passwd).unwrap_or_default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        let (Some(name), Some(uid)) = (f.first(), f.get(2).and_then(|u| u.parse().ok())) else {
            continue;
        };
        let Some(pid) = name.strip_prefix("pgr").and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_user(name, uid, root);
        }
    }
}

/// `GET /` on the host's loopback (not gated: host traffic) until it serves `body`.
fn wait_host_serving(port: u16, body: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        let got = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })();
        match got {
            Ok(text) if text.contains(body) => return,
            Ok(text) => last = text,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("the rootless container on port {port} does not serve {body:?} on loopback: {last}");
}

/// What `portgate watch --json` reports while `during` runs (and a moment after).
fn watch_events(agent: &Agent<'_>, during: impl FnOnce()) -> Vec<Value> {
    let mut child = Command::new(portgate_tests::agent::portgate_bin())
        .arg("--socket")
        .arg(&agent.socket)
        .args(["watch", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start portgate watch");
    let stdout = child.stdout.take().expect("watch stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(event) = serde_json::from_str::<Value>(&line)
                && tx.send(event).is_err()
            {
                return;
            }
        }
    });
    // The agent subscribes the client when it reads the request.
    std::thread::sleep(Duration::from_millis(300));
    during();
    std::thread::sleep(Duration::from_millis(500));
    let _ = child.kill();
    let _ = child.wait();
    rx.try_iter().collect()
}

/// `GET /metrics` of the agent.
fn metrics(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// The entry of `status --json` or `list --json` `rootless[]` for `container`.
fn rootless_entry(json: &Value, container: &str) -> Option<Value> {
    json["rootless"]
        .as_array()?
        .iter()
        .find(|c| c["container"] == container)
        .cloned()
}

/// Waits until the agent lists `container` with `published` as a gated rootless port.
fn wait_listed(
    agent: &portgate_tests::agent::Agent<'_>,
    container: &str,
    published: &str,
) -> Value {
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    loop {
        let status = agent.status_json();
        if let Some(entry) = rootless_entry(&status, container)
            && entry["published"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p == published))
        {
            return entry;
        }
        assert!(
            Instant::now() < deadline,
            "the agent does not list rootless container {container} with {published} after {FOLLOW_TIMEOUT:?}: {}\nlog:\n{}",
            status["rootless"],
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The host ports of the test's three containers, and the agent's metrics port.
struct Ports {
    web: u16,
    lab: u16,
    hp: u16,
    metrics: u16,
}

#[test]
fn rootless_podman_ports_are_closed_until_allowed() {
    let (_serial, engines) = setup!();
    let Some(user) = RootlessUser::create(engines) else {
        return;
    };
    // The harness's busybox image, into the user's own storage.
    let tar = format!("/tmp/{}-image.tar", user.name);
    engines.cli_ok(Engine::Podman, &["save", "-o", &tar, IMAGE]);
    portgate_tests::run_ok(Command::new("chmod").arg("644").arg(user.within(&tar)));
    user.podman_ok(&["load", "-i", &tar]);
    let _ = std::fs::remove_file(user.within(&tar));

    let sc = Scenario::new();
    let ports = Ports {
        web: free_port(),
        lab: free_port(),
        hp: free_port(),
        metrics: free_port(),
    };
    let (port, lport, hport, mport) = (ports.web, ports.lab, ports.hp, ports.metrics);
    user.run_httpd("web", "web", port, &[]);
    user.run_httpd("lab", "lab", lport, &["--label", "portgate.allow=80/tcp"]);
    user.run_httpd("hp", "hp", hport, &[]);
    // The control: without the agent, the relay's socket answers everyone, both families.
    sc.assert_answers(
        sc.published(port),
        &body_of("web"),
        "rootless, no agent (IPv4)",
    );
    sc.assert_answers(
        sc.published6(port),
        &body_of("web"),
        "rootless, no agent (IPv6)",
    );

    let metrics_addr = format!("127.0.0.1:{mport}");
    // The early drop on the client's link: it reads the same host-port map.
    let mut extra = vec!["--metrics-addr", &metrics_addr, "--uplink", &sc.host_if];
    let root_text = engines
        .root
        .as_ref()
        .map(|r| r.to_string_lossy().into_owned());
    if let Some(root) = &root_text {
        extra.extend_from_slice(&[
            "--rootless-podman-root",
            root,
            "--rootless-podman",
            "/usr/bin/podman",
        ]);
    }
    let mut agent = EngineAgent::start(engines, &extra);
    closed_without_rule(&sc, &user, &agent, &ports);
    opened_by_rules(&sc, &user, &agent, &ports);
    follows_the_container(&sc, &user, &agent, &ports);
    reported(&user, &agent, &ports);
    started_while_no_agent_runs(&sc, &user, &mut agent);
}

/// A rootless container started while no agent runs: its relay's port was recorded by the
/// gate's hooks, so it is refused over IPv4 and IPv6 until the agent is back and a rule
/// allows it.
fn started_while_no_agent_runs(sc: &Scenario, user: &RootlessUser, agent: &mut Agent<'_>) {
    agent.stop();
    let port = free_port();
    user.run_httpd("late", "late", port, &[]);
    wait_host_serving(port, &body_of("late"));
    for addr in [sc.published(port), sc.published6(port)] {
        assert!(
            sc.get(addr, Duration::from_secs(3)).is_err(),
            "a rootless container started while no agent runs answered at {addr}"
        );
    }
    agent.spawn();
    agent.wait_ready();
    agent.wait_engines_connected(&["podman-rootless"]);
    sc.assert_times_out(
        sc.published6(port),
        "rootless, started with no agent, agent back",
    );
    agent.allow(&format!("{}/late", user.name), "80/tcp");
    sc.assert_answers(
        sc.published(port),
        &body_of("late"),
        "rootless late, after allow",
    );
    sc.assert_answers(
        sc.published6(port),
        &body_of("late"),
        "rootless late, IPv6, after allow",
    );
}

/// With the agent and no rule: closed over IPv4 and IPv6, refused already on the uplink.
fn closed_without_rule(sc: &Scenario, user: &RootlessUser, agent: &Agent<'_>, ports: &Ports) {
    let (port, hport) = (ports.web, ports.hp);
    let web = format!("{}/web", user.name);
    // Until every engine has reported, the host ports stay as the last agent left them.
    agent.wait_engines_connected(&["docker", "podman"]);
    let start = Instant::now();
    while start.elapsed() < FOLLOW_TIMEOUT
        && sc
            .get(sc.published(port), Duration::from_millis(500))
            .is_ok()
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    sc.assert_times_out(sc.published(port), "rootless, agent, no rule (IPv4)");
    agent.wait_engines_connected(&["podman-rootless"]);
    let entry = wait_listed(agent, &web, &format!("{port}->80/tcp"));
    assert_eq!(entry["user"], user.name.as_str(), "{entry}");
    assert_eq!(entry["engine"], "podman-rootless", "{entry}");
    assert_eq!(entry["gated"], true, "{entry}");
    sc.assert_times_out(sc.published6(port), "rootless, agent, no rule (IPv6)");
    let status = agent.status_json();
    assert!(
        status["counters"]["event"]["dropped_before_conntrack"].as_u64() > Some(0),
        "the uplink refuses the rootless port before conntrack: {}",
        status["counters"]
    );
    sc.assert_times_out(
        sc.published(hport),
        "rootless, agent, no rule (host-port container)",
    );
}

/// Its own label, its name with its user, --host-port; sources and the block list apply.
fn opened_by_rules(sc: &Scenario, user: &RootlessUser, agent: &Agent<'_>, ports: &Ports) {
    let (port, lport, hport, mport) = (ports.web, ports.lab, ports.hp, ports.metrics);
    let web = format!("{}/web", user.name);
    // Its own label opens it.
    sc.assert_answers_within(
        sc.published(lport),
        &body_of("lab"),
        FOLLOW_TIMEOUT,
        "rootless, label",
    );
    sc.assert_answers(
        sc.published6(lport),
        &body_of("lab"),
        "rootless, label (IPv6)",
    );

    // Sources apply: a rule for other sources leaves it closed to this client.
    agent.cli_ok(&["allow", &web, "80/tcp", "--from", "192.0.2.0/24"]);
    sc.assert_times_out(
        sc.published(port),
        "rootless, allowed for other sources only",
    );
    agent.deny(&web, "80/tcp");

    // By name, with its user.
    agent.allow(&web, "80/tcp");
    sc.assert_answers(
        sc.published(port),
        &body_of("web"),
        "rootless, allowed by name (IPv4)",
    );
    sc.assert_answers(
        sc.published6(port),
        &body_of("web"),
        "rootless, allowed by name (IPv6)",
    );
    let list = agent.list_json();
    let rules = container_rules(&list, &web);
    assert_eq!(rules.len(), 1, "{list}");
    assert_eq!(rules[0]["gated"], true, "{list}");
    assert_eq!(
        host_ports(&rules),
        BTreeSet::from([u64::from(port)]),
        "{list}"
    );
    assert!(
        rootless_entry(&list, &web).is_some(),
        "list names the rootless container: {list}"
    );

    // By host port.
    agent.cli_ok(&["allow", "--host-port", &hport.to_string()]);
    sc.assert_answers(
        sc.published(hport),
        &body_of("hp"),
        "rootless, allowed by --host-port",
    );
    // The block list applies.
    let client = format!("{}/32", sc.client_addr);
    agent.cli_ok(&["block", &client]);
    sc.assert_times_out(sc.published(hport), "rootless, client blocked");
    agent.cli_ok(&["unblock", &client]);
    sc.assert_answers(
        sc.published(hport),
        &body_of("hp"),
        "rootless, client unblocked",
    );

    // The metrics name the user's ports.
    let text = metrics(mport);
    let line = format!(
        "portgate_rootless_published_port{{user=\"{}\",container=\"{web}\",engine=\"podman-rootless\",published=\"{port}->80/tcp\"}} 1",
        user.name
    );
    assert!(text.contains(&line), "metrics lack {line}:\n{text}");
}

/// The rule follows the container across `podman restart` and a re-create; deny closes it.
fn follows_the_container(sc: &Scenario, user: &RootlessUser, agent: &Agent<'_>, ports: &Ports) {
    let (port, hport) = (ports.web, ports.hp);
    let web = format!("{}/web", user.name);
    user.podman_ok(&["restart", "-t", "0", "web"]);
    wait_host_serving(port, &body_of("web"));
    sc.assert_answers_within(
        sc.published(port),
        &body_of("web"),
        FOLLOW_TIMEOUT,
        "rootless, after podman restart",
    );
    user.podman_ok(&["rm", "-f", "-t", "0", "web"]);
    let id = user.run_httpd("web", "web", port, &[]);
    // Until the agent has read the new container, its port is not in the host-port map
    // (the relay listens before Podman calls the container running).
    let entry = wait_listed(agent, &web, &format!("{port}->80/tcp"));
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    let mut entry = entry;
    while entry["id"] != id.as_str() {
        assert!(
            Instant::now() < deadline,
            "the agent lists {entry}, not the re-created {id}"
        );
        std::thread::sleep(Duration::from_millis(250));
        entry = wait_listed(agent, &web, &format!("{port}->80/tcp"));
    }
    sc.assert_answers_within(
        sc.published(port),
        &body_of("web"),
        FOLLOW_TIMEOUT,
        "rootless, re-created",
    );
    sc.assert_answers(
        sc.published6(port),
        &body_of("web"),
        "rootless, re-created (IPv6)",
    );

    // deny closes it again; the other containers keep their rules.
    agent.deny(&web, "80/tcp");
    // `watch` names the rootless container a refused attempt was for.
    let events = watch_events(agent, || {
        sc.assert_times_out(sc.published(port), "rootless, denied (IPv4)");
    });
    assert!(
        events
            .iter()
            .any(|e| e["container"] == web.as_str() && e["destination_port"] == port),
        "watch names {web} for the refused attempt on {port}: {events:?}"
    );
    sc.assert_times_out(sc.published6(port), "rootless, denied (IPv6)");
    sc.assert_answers(
        sc.published(hport),
        &body_of("hp"),
        "rootless, --host-port after the deny",
    );
}

/// doctor and status name the user's ports as gated.
fn reported(user: &RootlessUser, agent: &Agent<'_>, ports: &Ports) {
    let port = ports.web;
    // doctor names the user's ports as gated, and nothing of the user's as unprotected.
    let doctor = agent.cli(&["doctor"]);
    let doctor = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert!(
        doctor.contains(&format!("{}:{port}/tcp", user.name))
            && !doctor
                .lines()
                .any(|l| l.starts_with("UNPROTECTED") && l.contains(&user.name)),
        "doctor:\n{doctor}"
    );
    let status = agent.status_json();
    assert!(
        status["rootless_users"].as_array().is_some_and(|u| u
            .iter()
            .any(|u| u["user"] == user.name.as_str() && u["error"].is_null())),
        "{status}"
    );
}
