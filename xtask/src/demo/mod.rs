//! `cargo xtask demo`: the gate dropping, allowing and answering, in a sandbox of network
//! namespaces that stands in for a container host.
//!
//! ```text
//!  pgd-client-PID          pgd-host-PID (ip_forward=1)                    pgd-ctr-PID
//!  eth0 10.98.0.2 ---veth--- veth-client 10.98.0.1
//!                            pgbr0 10.99.0.1 (bridge, gated) -- veth-ctr ---veth--- eth0 10.99.0.2:80
//! ```
//! The agent runs in the host namespace, entered with setns(2) rather than `ip netns exec`,
//! which would remount /sys and hide /sys/fs/bpf. Everything is removed afterwards, also on
//! errors and Ctrl-C (the signal only sets a flag; the guard's clean-up runs).
mod sandbox_setup;

use std::{
    fs::{self, File},
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use portgate_cmd as proc;

use crate::setup;

use portgate_test_support::topology::{
    BRIDGE, BRIDGE_V4 as BRIDGE_ADDR, CLIENT_V4 as CLIENT_ADDR, CONTAINER_V4 as CONTAINER_ADDR,
    HOST_V4 as HOST_ADDR,
};
const PORT: u16 = 80;
const BODY: &str = "hello from the container";
/// How long the client waits for the TCP handshake: a dropped SYN shows up as this timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(3);
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

pub fn run() -> Result<()> {
    if !proc::is_root() {
        bail!("the demo needs root: it creates network namespaces and loads eBPF programs");
    }
    heading("setup");
    setup::run(setup::Mode::Install)?;
    heading("building portgate (release)");
    proc::run(proc::cargo().args(["build", "--release", "--package", "gate-user"]))?;
    let portgate = proc::target_dir()?.join("release/portgate");
    if !portgate.is_file() {
        bail!("the build did not produce {}", portgate.display());
    }

    proc::catch_signals();
    let mut sandbox = Sandbox::new(portgate);
    let result = sandbox.play();
    if result.is_err() && proc::check_interrupted().is_ok() {
        sandbox.show_agent_log();
    }
    sandbox.cleanup();
    let checks = result?;

    heading("result");
    for check in &checks {
        println!(
            "{}  {}",
            if check.ok { "OK        " } else { "UNEXPECTED" },
            check.what
        );
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed > 0 {
        bail!(
            "demo failed: {failed} of {} observations did not match",
            checks.len()
        );
    }
    println!(
        "\nThe gate dropped the connection, answered it once allowed, and dropped it again after deny."
    );
    print_real_host_usage();
    Ok(())
}

fn print_real_host_usage() {
    println!(
        "
On a real container host, run the agent on the engines' bridges (foreground, logs on stderr);
it follows Docker and Podman and gates docker0, podman0 and their networks' bridges:
    sudo portgate agent --bridge auto
and allow connections to containers by name (the rule follows the container) or address:
    portgate allow web 80/tcp                 # the container's port, whatever host port maps to it
    portgate allow --published web            # exactly what `web` publishes
    portgate allow 10.88.0.5 8000-8010/tcp
    docker run --label portgate.allow=80/tcp ...   # or let a container allow itself
    portgate list
    portgate status
    portgate watch
    portgate deny web 80/tcp
Enforcement stays in place when the agent exits (fail closed); `portgate uninstall` removes it."
    );
}

fn heading(title: &str) {
    println!("\n==================== {title} ====================");
}

/// One observation the demo expects.
struct Check {
    what: String,
    ok: bool,
}

/// What a request from the client saw.
enum Outcome {
    Answered(String),
    TimedOut,
    Other(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Answered(body) => write!(f, "answered: {body:?}"),
            Outcome::TimedOut => {
                write!(
                    f,
                    "timed out: no answer to the SYN within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )
            }
            Outcome::Other(what) => write!(f, "{what}"),
        }
    }
}

/// The namespaces, processes and files of one demo run; [`Sandbox::cleanup`] (also run on drop)
/// removes all of them.
struct Sandbox {
    portgate: PathBuf,
    host: String,
    client: String,
    container: String,
    /// Namespaces created so far, in creation order.
    namespaces: Vec<String>,
    dir: PathBuf,
    bpffs: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    server: Option<Child>,
    agent: Option<Child>,
    agent_spawned: bool,
    cleaned: bool,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl Sandbox {
    fn new(portgate: PathBuf) -> Self {
        let id = std::process::id();
        let dir = PathBuf::from(format!("/tmp/portgate-demo-{id}"));
        Self {
            portgate,
            host: format!("pgd-host-{id}"),
            client: format!("pgd-client-{id}"),
            container: format!("pgd-ctr-{id}"),
            namespaces: Vec::new(),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/portgate-demo-{id}")),
            socket: dir.join("portgate.sock"),
            log: dir.join("agent.log"),
            dir,
            server: None,
            agent: None,
            agent_spawned: false,
            cleaned: false,
        }
    }

    fn play(&mut self) -> Result<Vec<Check>> {
        self.build_topology()?;
        self.start_server()?;

        heading("step 0: without portgate, the container answers");
        println!(
            "This only shows that the sandbox routes: the client reaches the container through the host."
        );
        let mut outcome = self.request()?;
        for _ in 0..4 {
            if matches!(outcome, Outcome::Answered(_)) {
                break;
            }
            println!("({outcome}; retrying while the links come up)");
            proc::sleep(Duration::from_secs(1))?;
            outcome = self.request()?;
        }
        println!("-> {outcome}");
        if !matches!(outcome, Outcome::Answered(_)) {
            bail!(
                "the sandbox does not work without portgate ({outcome}); this is not a portgate failure"
            );
        }

        self.start_agent()?;
        let mut checks = Vec::new();

        heading("step 1: no rule yet, the gate drops the connection");
        let outcome = self.request()?;
        println!("-> {outcome}");
        checks.push(Check {
            what: format!("1. before allow: dropped (observed: {outcome})"),
            ok: matches!(outcome, Outcome::TimedOut),
        });
        self.show_drop_counters()?;

        heading("step 2: allow the container's port");
        let allowed = self.portgate_cli(&["allow", CONTAINER_ADDR, "80/tcp"])?;
        checks.push(Check {
            what: "2. `portgate allow 10.99.0.2 80/tcp` succeeds".into(),
            ok: allowed,
        });

        heading("step 3: the same request is answered");
        let outcome = self.request()?;
        println!("-> {outcome}");
        checks.push(Check {
            what: format!("3. after allow: answered (observed: {outcome})"),
            ok: matches!(&outcome, Outcome::Answered(body) if body.contains(BODY)),
        });

        heading("step 4: the rule and its counters");
        self.portgate_cli(&["list"])?;

        heading("step 5: deny, and the gate drops new connections again");
        let denied = self.portgate_cli(&["deny", CONTAINER_ADDR, "80/tcp"])?;
        checks.push(Check {
            what: "5. `portgate deny 10.99.0.2 80/tcp` succeeds".into(),
            ok: denied,
        });
        let outcome = self.request()?;
        println!("-> {outcome}");
        checks.push(Check {
            what: format!("5. after deny: dropped (observed: {outcome})"),
            ok: matches!(outcome, Outcome::TimedOut),
        });
        self.show_drop_counters()?;
        Ok(checks)
    }

    /// `portgate --socket S ARGS`.
    fn portgate_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.portgate);
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd
    }

    /// Runs a CLI command, shows it and its output; returns whether it exited 0.
    fn portgate_cli(&self, args: &[&str]) -> Result<bool> {
        proc::check_interrupted()?;
        println!("$ portgate {}", args.join(" "));
        let out = proc::capture(&mut self.portgate_command(args), CLI_TIMEOUT)?;
        let text = out.combined();
        if !text.is_empty() {
            println!("{}", indent(&text));
        }
        if !out.status.success() {
            println!("(exited with {})", out.status);
        }
        Ok(out.status.success())
    }

    /// `portgate status --json`, reduced to its drop counters.
    fn show_drop_counters(&self) -> Result<()> {
        proc::check_interrupted()?;
        println!("$ portgate status --json   # the drop counters");
        let out = proc::capture(
            &mut self.portgate_command(&["status", "--json"]),
            CLI_TIMEOUT,
        )?;
        let drops = serde_json::from_str::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|status| {
                status
                    .pointer("/counters/drop")
                    .and_then(|d| d.as_object())
                    .cloned()
            });
        match drops {
            Some(drops) if out.status.success() => {
                let line: Vec<String> = drops
                    .iter()
                    .map(|(name, n)| format!("{name}={n}"))
                    .collect();
                println!("    drop: {}", line.join(" "));
                if drops
                    .get("not_allowed")
                    .and_then(|n| n.as_u64())
                    .is_some_and(|n| n > 0)
                {
                    println!(
                        "(the client's SYNs, with no allow rule, are counted under not_allowed)"
                    );
                }
            }
            _ => {
                // Not the documented JSON: show whatever it printed.
                println!("{}", indent(&out.combined()));
            }
        }
        Ok(())
    }

    /// An HTTP request from the client namespace to the container.
    fn request(&self) -> Result<Outcome> {
        proc::check_interrupted()?;
        println!(
            "$ (in {}) printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w {} {CONTAINER_ADDR} {PORT}",
            self.client,
            CONNECT_TIMEOUT.as_secs()
        );
        let addr = SocketAddr::from(([10, 99, 0, 2], PORT));
        in_netns_thread(&self.client, move || http_get(addr))
    }

    fn show_agent_log(&self) {
        if !self.agent_spawned {
            return;
        }
        println!("\n---- agent log ({}), last lines ----", self.log.display());
        match fs::read_to_string(&self.log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                for line in &lines[lines.len().saturating_sub(40)..] {
                    println!("{line}");
                }
            }
            Err(err) => println!("(cannot read it: {err})"),
        }
        println!("---- end of agent log ----");
    }

    /// Stops the processes and removes namespaces, pins and files; reports but survives errors.
    fn cleanup(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        heading("cleaning up");
        if let Some(agent) = self.agent.take() {
            println!("stopping the agent (SIGTERM)");
            match terminate(agent, false) {
                Ok(status) if status.success() => println!("agent exited cleanly ({status})"),
                Ok(status) => println!("warning: the agent exited with {status}"),
                Err(err) => println!("warning: {err:#}"),
            }
        }
        if self.agent_spawned {
            let mut cmd = Command::new(&self.portgate);
            cmd.arg("uninstall").arg("--bpffs").arg(&self.bpffs);
            println!("$ (in {}) {}", self.host, proc::display(&cmd));
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .stdin(Stdio::null());
            let result = if self.namespaces.contains(&self.host) {
                spawn_in_netns(&self.host, &mut cmd)
            } else {
                cmd.spawn().context("cannot run portgate uninstall")
            }
            .and_then(|child| proc::wait_captured(&cmd, child, CLI_TIMEOUT));
            match result {
                Ok(out) => {
                    if !out.combined().is_empty() {
                        println!("{}", indent(&out.combined()));
                    }
                    if !out.status.success() {
                        println!("warning: portgate uninstall failed ({})", out.status);
                    }
                }
                Err(err) => println!("warning: {err:#}"),
            }
        }
        if let Some(server) = self.server.take() {
            println!("stopping the HTTP server");
            if let Err(err) = terminate(server, true) {
                println!("warning: {err:#}");
            }
        }
        for ns in self.namespaces.drain(..).rev() {
            if let Err(err) = ip(&["netns", "delete", &ns]) {
                println!("warning: {err:#}");
            }
        }
        for path in [&self.bpffs, &self.dir] {
            if path.exists() {
                println!("$ rm -r {}", path.display());
                if let Err(err) = fs::remove_dir_all(path) {
                    println!("warning: cannot remove {}: {err}", path.display());
                }
            }
        }
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|line| format!("    {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `ip ARGS`, printed; fails with its stderr. (No check for Ctrl-C: clean-up uses it.)
fn ip(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    println!("$ {}", proc::display(&cmd));
    let out = proc::capture(&mut cmd, Duration::from_secs(30))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", proc::display(&cmd), out.stderr.trim());
    }
    Ok(())
}

/// [`ip`], but stops first when a signal arrived.
fn ip_checked(args: &[&str]) -> Result<()> {
    proc::check_interrupted()?;
    ip(args)
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

fn open_netns(ns: &str) -> Result<File> {
    let path = netns_path(ns);
    File::open(&path)
        .with_context(|| format!("cannot open the network namespace {}", path.display()))
}

/// Spawns `cmd` inside the network namespace `ns` (and nothing else: mounts stay as they are).
fn spawn_in_netns(ns: &str, cmd: &mut Command) -> Result<Child> {
    portgate_bpf_sys::netns::command_in(cmd, open_netns(ns)?);
    cmd.spawn()
        .with_context(|| format!("cannot start `{}` in {ns}", proc::display(cmd)))
}

/// Runs `f` on a thread that has entered the network namespace `ns`: sockets it creates belong
/// to that namespace. The thread ends with `f`, so no other code runs in the namespace.
fn in_netns_thread<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let file = open_netns(ns)?;
    let handle = thread::spawn(move || -> io::Result<T> {
        portgate_bpf_sys::netns::enter(&file)?;
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| anyhow!("the thread in {ns} panicked"))?
        .with_context(|| format!("cannot enter the network namespace {ns}"))
}

/// `GET /` over HTTP/1.0; a connect timeout means the SYN got no answer.
fn http_get(addr: SocketAddr) -> Outcome {
    let mut stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(stream) => stream,
        Err(err) if err.kind() == io::ErrorKind::TimedOut => return Outcome::TimedOut,
        Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
            return Outcome::Other(
                "connection refused (RST): not what a gate drop looks like".into(),
            );
        }
        Err(err) => return Outcome::Other(format!("connect failed: {err}")),
    };
    let exchange = stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .and_then(|()| stream.write_all(b"GET / HTTP/1.0\r\n\r\n"));
    if let Err(err) = exchange {
        return Outcome::Other(format!("connected, but sending failed: {err}"));
    }
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let error = loop {
        match stream.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => break Some(err),
        }
    };
    let text = String::from_utf8_lossy(&response);
    // The body follows the blank line after the headers.
    let body = text
        .split_once("\n\n")
        .or_else(|| text.split_once("\r\n\r\n"))
        .map_or(text.as_ref(), |(_, body)| body)
        .trim();
    if text.starts_with("HTTP/1.0 200") && !body.is_empty() {
        Outcome::Answered(body.to_owned())
    } else {
        match error {
            Some(err) => Outcome::Other(format!("connected, but no answer: {err}")),
            None => Outcome::Other(format!("connected, but an unexpected answer: {text:?}")),
        }
    }
}

/// SIGTERM (to the process group when `group`), then SIGKILL after 10 s.
fn terminate(mut child: Child, group: bool) -> Result<std::process::ExitStatus> {
    let pid = libc::pid_t::try_from(child.id()).context("process id out of range")?;
    if let Some(status) = child.try_wait().context("waiting for a child")? {
        return Ok(status);
    }
    let target = if group { -pid } else { pid };
    // SAFETY: kill has no memory-safety preconditions; the child is not yet reaped, so its pid
    // (and process group, which it leads) cannot have been reused.
    unsafe {
        libc::kill(target, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().context("waiting for a child")? {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(50));
    }
    println!("warning: pid {pid} still running 10 s after SIGTERM, sending SIGKILL");
    if group {
        // SAFETY: as above.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    child.kill().context("cannot kill a child")?;
    child.wait().context("waiting for a killed child")
}
