//! Real container engines on the root namespace: Docker (containerd + dockerd) and Podman
//! (its Docker-compatible API service), the motivating scenario around them, and the real
//! agent gating their bridges.
//!
//! ```text
//!  client ns (pge-<pid>-<n>-c)        root ns (ip_forward=1, FORWARD policy DROP)
//!  eth0 10.98.X.2/24  ──── veth ────  pe<pid>-<n> 10.98.X.1/24
//!  default via 10.98.X.1              docker0 172.17.0.0/16 ── Docker containers
//!                                     podman0 10.88.0.0/16  ── Podman containers
//! ```
//!
//! A client reaches a container through a published port of the host, `10.98.X.1:PORT`, which
//! the engine DNATs to the container: exactly "a connection from outside to a published port".
//!
//! * [`Engines::get`] starts what is not running (containerd, dockerd, the Podman service),
//!   once per process, builds the local busybox image, and leaves the daemons running for
//!   other test binaries ([`Engines::stop_started`] stops what this process started).
//! * [`Scenario`] is the client namespace and the root namespace's forwarding settings,
//!   restored when the last scenario of the process is dropped (also on panic; a run that was
//!   killed is repaired by the next one).
//! * [`ContainerGuard`] removes its container on drop; [`EngineAgent`] is the real agent in
//!   the root namespace with its own pins, state and socket, uninstalled on drop.
//!
//! Names carry the owning pid (`pge-<pid>-<n>...`), so leftovers of a killed run are found
//! and removed by the next run.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use crate::agent::{Agent, remove_pins};
use crate::net::{SHOULD_ANSWER, SHOULD_TIME_OUT};
use crate::run_ok;
use crate::sandbox::in_netns;

/// The image every container runs: Debian's static busybox, nothing else.
pub const IMAGE: &str = "local/busybox:latest";
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
pub const PODMAN_SOCKET: &str = "/run/podman/podman.sock";
pub const CONTAINERD_LOG: &str = "/tmp/portgate-tests-containerd.log";
pub const DOCKERD_LOG: &str = "/tmp/portgate-tests-dockerd.log";
pub const PODMAN_LOG: &str = "/tmp/portgate-tests-podman.log";
pub const CONTAINERS_CONF: &str = "/etc/containers/containers.conf";
/// Podman's limits that this machine can grant (see shared/testbed.md), given on every run.
pub const PODMAN_ULIMITS: &[&str] = &[
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];
/// How long dockerd may take to answer `docker info` after it was started.
pub const DOCKER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an engine-driven change (an event, a label, a restart) may take to reach the gate.
pub const FOLLOW_TIMEOUT: Duration = Duration::from_secs(15);
/// The body every test httpd serves at `/`: `portgate-test <container name>`.
pub fn body_of(container: &str) -> String {
    format!("portgate-test {container}")
}

/// Which engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Podman,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }
}

/// A name unique to this process and call: `pge-<pid>-<n>`, optionally with a suffix.
pub fn unique(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    if label.is_empty() {
        format!("pge-{}-{n}", std::process::id())
    } else {
        format!("pge-{}-{n}-{label}", std::process::id())
    }
}

/// The pid in a name made by [`unique`] (also the root-side veth `pe<pid>-<n>`), unless it
/// is this process.
fn stale_owner(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix("pge-")
        .or_else(|| name.strip_prefix("pe"))?;
    let pid: u32 = rest.split('-').next()?.parse().ok()?;
    (pid != std::process::id()).then_some(pid)
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

// ---------------------------------------------------------------------------------------------
// Engines: the daemons and the image.
// ---------------------------------------------------------------------------------------------

/// The engine environment of this process. See the module documentation.
pub struct Engines {
    /// The `docker` CLI (Debian's, /usr/bin/docker, when present: it matches the daemon).
    pub docker: PathBuf,
    pub podman: PathBuf,
    dockerd: PathBuf,
    containerd: PathBuf,
    /// `docker version` and `podman version`, as printed.
    pub docker_version: String,
    pub podman_version: String,
    started: Mutex<Started>,
}

/// The daemons this process started (and so may stop).
#[derive(Default)]
struct Started {
    containerd: Option<Child>,
    dockerd: Option<Child>,
    podman: Option<Child>,
}

enum State {
    Ready(Box<Engines>),
    Skip(String),
    Failed(String),
}

impl Engines {
    /// The engine environment, started on first use. None (after printing "skipped: <test>:
    /// <reason>") when the tests cannot run here: not root, or an engine is not installed.
    /// With `PORTGATE_REQUIRE_ENGINES=1` a missing engine fails the test instead (for CI,
    /// where `cargo xtask setup` installs them). Panics when an installed engine fails to
    /// start, with the reason and where its log is.
    pub fn get() -> Option<&'static Engines> {
        static STATE: OnceLock<State> = OnceLock::new();
        match STATE.get_or_init(|| match Self::init() {
            Ok(engines) => State::Ready(Box::new(engines)),
            Err(InitError::Skip(reason)) => State::Skip(reason),
            Err(InitError::Failed(e)) => State::Failed(format!("{e:#}")),
        }) {
            State::Ready(engines) => Some(engines),
            State::Skip(reason) => {
                // Fails the test instead where skips are failures (CI).
                crate::skip(reason);
                None
            }
            State::Failed(message) => panic!("container engines could not be started: {message}"),
        }
    }

    fn init() -> std::result::Result<Engines, InitError> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(InitError::Skip(
                "needs root (starts container engines, creates network namespaces)".into(),
            ));
        }
        let find = |name: &str, package: &str| {
            find_program(name).ok_or_else(|| {
                InitError::Skip(format!(
                    "`{name}` not found (apt-get install {package}; `cargo xtask setup` does)"
                ))
            })
        };
        let dockerd = find("dockerd", "docker.io")?;
        let containerd = find("containerd", "containerd")?;
        let podman = find("podman", "podman")?;
        // Debian's docker.io CLI matches its daemon; another `docker` earlier in PATH may not.
        let docker = ["/usr/bin/docker"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .or_else(|| find_program("docker"))
            .ok_or_else(|| {
                InitError::Skip("`docker` CLI not found (apt-get install docker.io)".into())
            })?;
        if !is_static_busybox(Path::new("/bin/busybox")) {
            return Err(InitError::Skip(
                "no static /bin/busybox for the test image (apt-get install busybox-static)".into(),
            ));
        }
        let mut engines = Engines {
            docker,
            podman,
            dockerd,
            containerd,
            docker_version: String::new(),
            podman_version: String::new(),
            started: Mutex::new(Started::default()),
        };
        engines.start().map_err(InitError::Failed)?;
        Ok(engines)
    }

    fn start(&mut self) -> Result<()> {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        // containerd first: dockerd is pointed at its socket.
        if !socket_accepts(CONTAINERD_SOCKET) {
            let child = spawn_daemon(Command::new(&self.containerd), CONTAINERD_LOG)?;
            started.containerd = Some(child);
            wait_until(Duration::from_secs(30), || {
                socket_accepts(CONTAINERD_SOCKET)
            })
            .with_context(|| {
                format!(
                    "containerd did not open {CONTAINERD_SOCKET}; log {CONTAINERD_LOG}:\n{}",
                    tail(CONTAINERD_LOG)
                )
            })?;
        }
        if !self.docker_answers() {
            started.dockerd = Some(self.spawn_dockerd()?);
            self.wait_docker()?;
        }
        write_containers_conf()?;
        if !socket_accepts(PODMAN_SOCKET) {
            std::fs::create_dir_all("/run/podman").context("mkdir /run/podman")?;
            let _ = std::fs::remove_file(PODMAN_SOCKET);
            let mut command = Command::new(&self.podman);
            command.args([
                "system",
                "service",
                "--time=0",
                &format!("unix://{PODMAN_SOCKET}"),
            ]);
            started.podman = Some(spawn_daemon(command, PODMAN_LOG)?);
            wait_until(Duration::from_secs(30), || socket_accepts(PODMAN_SOCKET)).with_context(
                || {
                    format!(
                        "podman system service did not open {PODMAN_SOCKET}; log {PODMAN_LOG}:\n{}",
                        tail(PODMAN_LOG)
                    )
                },
            )?;
        }
        drop(started);

        self.docker_version = output_text(
            Command::new(&self.docker).arg("version"),
            Duration::from_secs(20),
        )?;
        self.podman_version = output_text(
            Command::new(&self.podman).arg("version"),
            Duration::from_secs(20),
        )?;
        self.reap_stale_containers();
        reap_stale();
        self.ensure_image()?;
        Ok(())
    }

    fn spawn_dockerd(&self) -> Result<Child> {
        let mut command = Command::new(&self.dockerd);
        command.arg(format!("--containerd={CONTAINERD_SOCKET}"));
        spawn_daemon(command, DOCKERD_LOG)
    }

    fn docker_answers(&self) -> bool {
        run_timeout(
            Command::new(&self.docker).arg("info"),
            Duration::from_secs(10),
        )
        .is_ok_and(|o| o.status.success())
    }

    fn wait_docker(&self) -> Result<()> {
        wait_until(DOCKER_START_TIMEOUT, || self.docker_answers()).with_context(|| {
            format!(
                "dockerd did not answer `docker info` within {DOCKER_START_TIMEOUT:?}; log {DOCKERD_LOG}:\n{}",
                tail(DOCKERD_LOG)
            )
        })
    }

    /// Builds `local/busybox:latest` for Docker (`docker import` of a rootfs holding only the
    /// static busybox and a few applet links) unless present, and gives Podman the same image.
    fn ensure_image(&self) -> Result<()> {
        let inspect = run_timeout(
            Command::new(&self.docker).args(["image", "inspect", IMAGE]),
            Duration::from_secs(20),
        )?;
        if !inspect.status.success() {
            let rootfs = tempfile::Builder::new().prefix("pge-rootfs-").tempdir()?;
            let bin = rootfs.path().join("bin");
            std::fs::create_dir_all(&bin)?;
            std::fs::create_dir_all(rootfs.path().join("www"))?;
            std::fs::create_dir_all(rootfs.path().join("tmp"))?;
            std::fs::copy("/bin/busybox", bin.join("busybox")).context("copy /bin/busybox")?;
            for applet in [
                "sh", "httpd", "nc", "sleep", "cat", "echo", "dd", "mkdir", "ls",
            ] {
                std::os::unix::fs::symlink("busybox", bin.join(applet))?;
            }
            std::fs::write(
                rootfs.path().join("www/index.html"),
                "portgate-test image\n",
            )?;
            let mut tar = Command::new("tar")
                .arg("-C")
                .arg(rootfs.path())
                .args(["-c", "."])
                .stdout(Stdio::piped())
                .spawn()
                .context("spawn tar")?;
            let tar_out = tar.stdout.take().context("tar stdout")?;
            let import = Command::new(&self.docker)
                .args(["import", "-", IMAGE])
                .stdin(Stdio::from(tar_out))
                .output()
                .context("docker import")?;
            let tar_status = tar.wait()?;
            if !tar_status.success() || !import.status.success() {
                bail!(
                    "building {IMAGE}: tar {tar_status}, docker import {}: {}",
                    import.status,
                    String::from_utf8_lossy(&import.stderr)
                );
            }
        }
        let exists = run_timeout(
            Command::new(&self.podman).args(["image", "exists", IMAGE]),
            Duration::from_secs(20),
        )?;
        if !exists.status.success() {
            let mut save = Command::new(&self.docker)
                .args(["save", IMAGE])
                .stdout(Stdio::piped())
                .spawn()
                .context("spawn docker save")?;
            let saved = save.stdout.take().context("docker save stdout")?;
            let load = Command::new(&self.podman)
                .arg("load")
                .stdin(Stdio::from(saved))
                .output()
                .context("podman load")?;
            let save_status = save.wait()?;
            if !save_status.success() || !load.status.success() {
                bail!(
                    "docker save {IMAGE} ({save_status}) | podman load ({}): {}",
                    load.status,
                    String::from_utf8_lossy(&load.stderr)
                );
            }
        }
        Ok(())
    }

    /// Removes containers named `pge-<pid>-...` whose process is gone (a killed run).
    fn reap_stale_containers(&self) {
        for engine in [Engine::Docker, Engine::Podman] {
            let Ok(output) = run_timeout(
                self.cli(engine)
                    .args(["ps", "-a", "--format", "{{.Names}}"]),
                Duration::from_secs(20),
            ) else {
                continue;
            };
            for name in String::from_utf8_lossy(&output.stdout).lines() {
                let name = name.trim();
                if stale_owner(name).is_some_and(|pid| !pid_alive(pid)) && name.starts_with("pge-")
                {
                    remove_container(self, engine, name);
                }
            }
        }
    }

    /// A command for an engine's CLI.
    pub fn cli(&self, engine: Engine) -> Command {
        let mut command = Command::new(match engine {
            Engine::Docker => &self.docker,
            Engine::Podman => &self.podman,
        });
        command.stdin(Stdio::null());
        command
    }

    /// Runs an engine CLI command, asserting success; returns its trimmed stdout.
    pub fn cli_ok(&self, engine: Engine, args: &[&str]) -> String {
        let output = run_timeout(self.cli(engine).args(args), Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("`{} {}`: {e:#}", engine.name(), args.join(" ")));
        assert!(
            output.status.success(),
            "`{} {}` failed ({}): {}{}",
            engine.name(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// `<engine> run -d --name NAME ARGS...` (Podman: with [`PODMAN_ULIMITS`]); the container
    /// is removed when the guard drops. Panics when the engine refuses.
    pub fn run(&'static self, engine: Engine, name: &str, args: &[&str]) -> ContainerGuard {
        let mut full: Vec<&str> = vec!["run", "-d", "--name", name];
        if engine == Engine::Podman {
            full.extend_from_slice(PODMAN_ULIMITS);
        }
        full.extend_from_slice(args);
        // The guard exists before the run, so a half-created container is removed too.
        let guard = ContainerGuard {
            engines: self,
            engine,
            name: name.to_owned(),
        };
        self.cli_ok(engine, &full);
        guard
    }

    pub fn docker_run(&'static self, name: &str, args: &[&str]) -> ContainerGuard {
        self.run(Engine::Docker, name, args)
    }

    pub fn podman_run(&'static self, name: &str, args: &[&str]) -> ContainerGuard {
        self.run(Engine::Podman, name, args)
    }

    /// A container serving [`body_of`]`(name)` at `/` on port 80, published as `host_port`,
    /// with extra run options (labels, restart policy...) before the image.
    pub fn run_httpd(
        &'static self,
        engine: Engine,
        name: &str,
        host_port: u16,
        options: &[&str],
    ) -> ContainerGuard {
        let publish = format!("{host_port}:80");
        let script = httpd_script(name, &[80], 0);
        let mut args: Vec<&str> = vec!["-p", &publish];
        args.extend_from_slice(options);
        args.extend_from_slice(&[IMAGE, "/bin/sh", "-c", &script]);
        let guard = self.run(engine, name, &args);
        guard.wait_serving(80);
        guard
    }

    /// Runs a container in the foreground (`run --rm`) and returns its output (stdout and
    /// status), waiting at most `timeout`.
    pub fn run_to_completion(
        &'static self,
        engine: Engine,
        name: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Output {
        let mut full: Vec<&str> = vec!["run", "--rm", "--name", name];
        if engine == Engine::Podman {
            full.extend_from_slice(PODMAN_ULIMITS);
        }
        full.extend_from_slice(args);
        let _guard = ContainerGuard {
            engines: self,
            engine,
            name: name.to_owned(),
        };
        run_timeout(self.cli(engine).args(&full), timeout)
            .unwrap_or_else(|e| panic!("`{} {}`: {e:#}", engine.name(), full.join(" ")))
    }

    /// The pid of the running dockerd (the one this process started, else the pidfile's).
    pub fn dockerd_pid(&self) -> Option<u32> {
        let started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(child) = &started.dockerd {
            return Some(child.id());
        }
        let pid: u32 = std::fs::read_to_string("/var/run/docker.pid")
            .ok()?
            .trim()
            .parse()
            .ok()?;
        pid_alive(pid).then_some(pid)
    }

    /// Whether this process may kill and restart dockerd: it started it, or a previous test
    /// run did (its output goes to [`DOCKERD_LOG`]), or `PORTGATE_TESTS_MAY_RESTART_DOCKERD=1`
    /// says any dockerd on this machine may be restarted. Err says why not.
    pub fn may_restart_dockerd(&self) -> std::result::Result<(), String> {
        if self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .dockerd
            .is_some()
            || std::env::var_os("PORTGATE_TESTS_MAY_RESTART_DOCKERD").is_some_and(|v| v != "0")
        {
            return Ok(());
        }
        let Some(pid) = self.dockerd_pid() else {
            return Err("no dockerd pid (/var/run/docker.pid)".into());
        };
        let output = std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap_or_default();
        if output == Path::new(DOCKERD_LOG) {
            Ok(())
        } else {
            Err(format!(
                "dockerd (pid {pid}, output to {}) was started outside the test harness; not \
                 killing it (PORTGATE_TESTS_MAY_RESTART_DOCKERD=1 allows it)",
                output.display()
            ))
        }
    }

    /// Kills dockerd with SIGKILL, like a crash: containers keep running under containerd,
    /// the engine's iptables rules stay. Returns once dockerd is gone.
    pub fn kill_dockerd(&self) {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = started.dockerd.take() {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        drop(started);
        // A dockerd a previous test run started (the test harness's own daemon).
        let pid = self.dockerd_pid().expect("dockerd is not running");
        // SAFETY: kill on the pid from dockerd's own pidfile, checked alive above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        wait_until(Duration::from_secs(10), || {
            !pid_alive(pid) || is_zombie(pid)
        })
        .unwrap_or_else(|_| panic!("dockerd {pid} did not die of SIGKILL"));
        // Nobody may reap it here (PID 1 is not an init on these machines): a zombie keeps
        // its pid "running", and a new dockerd would refuse to start over its pidfile.
        let _ = std::fs::remove_file("/var/run/docker.pid");
    }

    /// Starts dockerd again (after [`Engines::kill_dockerd`]) and waits until it answers.
    pub fn start_dockerd(&self) {
        let child = self.spawn_dockerd().unwrap_or_else(|e| panic!("{e:#}"));
        self.started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .dockerd = Some(child);
        self.wait_docker().unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Stops (SIGTERM, then SIGKILL after 30 s) the daemons this process started, newest
    /// first. Not called by the tests: the daemons outlive a test binary so the next one
    /// reuses them.
    pub fn stop_started(&self) {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        for child in [
            started.podman.take(),
            started.dockerd.take(),
            started.containerd.take(),
        ]
        .into_iter()
        .flatten()
        {
            let mut child = child;
            // SAFETY: kill on the pid of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

enum InitError {
    Skip(String),
    Failed(anyhow::Error),
}

/// The shell script of a test httpd: `/www/index.html` holds [`body_of`]`(name)`,
/// `/www/big` is a sparse file of `big_mib` MiB (when not 0), one httpd per port, the last
/// one in the foreground.
pub fn httpd_script(name: &str, ports: &[u16], big_mib: u32) -> String {
    let mut script = format!(
        "/bin/busybox mkdir -p /www && echo '{}' > /www/index.html",
        body_of(name)
    );
    if big_mib > 0 {
        script.push_str(&format!(
            " && /bin/busybox dd if=/dev/zero of=/www/big bs=1048576 count=0 seek={big_mib} 2>/dev/null"
        ));
    }
    for (i, port) in ports.iter().enumerate() {
        if i + 1 == ports.len() {
            script.push_str(&format!(" && exec /bin/busybox httpd -f -p {port} -h /www"));
        } else {
            script.push_str(&format!(" && /bin/busybox httpd -p {port} -h /www"));
        }
    }
    script
}

/// A container, removed (`rm -f`) on drop.
pub struct ContainerGuard {
    engines: &'static Engines,
    pub engine: Engine,
    pub name: String,
}

impl ContainerGuard {
    fn cli_ok(&self, args: &[&str]) -> String {
        self.engines.cli_ok(self.engine, args)
    }

    /// The container's address on its engine's default bridge (empty when not running).
    pub fn address(&self) -> String {
        self.cli_ok(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.IPAddress}}",
            &self.name,
        ])
    }

    /// The container's full ID.
    pub fn id(&self) -> String {
        self.cli_ok(&["inspect", "--format", "{{.Id}}", &self.name])
    }

    pub fn is_running(&self) -> bool {
        self.cli_ok(&["inspect", "--format", "{{.State.Running}}", &self.name]) == "true"
    }

    /// `restart -t 1` (busybox as PID 1 ignores SIGTERM; no need to wait 10 s for it).
    pub fn restart(&self) {
        self.cli_ok(&["restart", "-t", "1", &self.name]);
    }

    pub fn stop(&self) {
        self.cli_ok(&["stop", "-t", "1", &self.name]);
    }

    pub fn start(&self) {
        self.cli_ok(&["start", &self.name]);
    }

    pub fn logs(&self) -> String {
        run_timeout(
            self.engines.cli(self.engine).args(["logs", &self.name]),
            Duration::from_secs(20),
        )
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_else(|e| format!("(no logs: {e:#})"))
    }

    /// Waits until the container runs and accepts TCP on `port` from the root namespace
    /// (the host's own connections pass the gate). Panics after [`FOLLOW_TIMEOUT`].
    pub fn wait_serving(&self, port: u16) -> String {
        let deadline = Instant::now() + FOLLOW_TIMEOUT;
        let mut last: String;
        loop {
            if self.is_running() {
                let address = self.address();
                if let Ok(ip) = address.parse::<Ipv4Addr>() {
                    let sa = SocketAddr::from((ip, port));
                    match TcpStream::connect_timeout(&sa, Duration::from_secs(1)) {
                        Ok(_) => return address,
                        Err(e) => last = format!("connect {sa}: {e}"),
                    }
                } else {
                    last = format!("no address yet ({address:?})");
                }
            } else {
                last = "not running".into();
            }
            if Instant::now() > deadline {
                panic!(
                    "{} container {} does not serve port {port} after {FOLLOW_TIMEOUT:?} ({last}); logs:\n{}",
                    self.engine.name(),
                    self.name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        remove_container(self.engines, self.engine, &self.name);
    }
}

fn remove_container(engines: &Engines, engine: Engine, name: &str) {
    let mut command = engines.cli(engine);
    command.args(["rm", "-f"]);
    if engine == Engine::Podman {
        command.args(["-t", "0"]);
    }
    let _ = run_timeout(command.arg(name), Duration::from_secs(60));
}

/// A host port nobody uses: unique in this process, and free on the host right now.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Start somewhere that depends on the pid, so parallel runs tend to pick different ports.
    let _ = NEXT.compare_exchange(
        0,
        20000 + (std::process::id() % 500) as u16 * 40,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        if port >= 60000 {
            NEXT.store(20000, Ordering::SeqCst);
            continue;
        }
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scenario: a client namespace routed through the root namespace, FORWARD policy DROP.
// ---------------------------------------------------------------------------------------------

/// Where the root namespace's settings before the first scenario are kept, so that a run
/// killed before its Drops ran is repaired by the next one.
const ROOT_STATE_FILE: &str = "/run/portgate-tests-engines-root-state";

/// The client namespace and its veth to the root namespace. Dropping the last scenario of the
/// process restores `net.ipv4.ip_forward` and the FORWARD policies it changed.
pub struct Scenario {
    /// `pge-<pid>-<n>`.
    pub id: String,
    /// The client namespace, `<id>-c`.
    pub client: String,
    /// The root-side veth, `pe<pid>-<n>`.
    pub host_if: String,
    /// 10.98.X.1: the address clients use for published ports.
    pub host_addr: Ipv4Addr,
    /// 10.98.X.2: the client.
    pub client_addr: Ipv4Addr,
    /// fd98:X::1: the host's IPv6 address on the client's link.
    pub host_addr6: Ipv6Addr,
    /// fd98:X::2.
    pub client_addr6: Ipv6Addr,
    shared: bool,
}

#[derive(Default)]
struct RootShared {
    users: usize,
    /// (ip_forward, [(iptables binary, FORWARD policy)]) before the first scenario.
    saved: Option<(String, Vec<(String, String)>)>,
}

static ROOT_SHARED: Mutex<RootShared> = Mutex::new(RootShared {
    users: 0,
    saved: None,
});

impl Scenario {
    /// Creates the client namespace and veth, enables forwarding and sets FORWARD to DROP.
    /// Panics (after cleaning up) when a command fails.
    pub fn new() -> Self {
        reap_stale();
        let id = unique("");
        let n = id.rsplit('-').next().unwrap_or("0").to_owned();
        let x = pick_subnet(n.parse().unwrap_or(0));
        let mut scenario = Scenario {
            client: format!("{id}-c"),
            host_if: format!("pe{}-{n}", std::process::id()),
            host_addr: Ipv4Addr::new(10, 98, x, 1),
            client_addr: Ipv4Addr::new(10, 98, x, 2),
            host_addr6: Ipv6Addr::new(0xfd98, u16::from(x), 0, 0, 0, 0, 0, 1),
            client_addr6: Ipv6Addr::new(0xfd98, u16::from(x), 0, 0, 0, 0, 0, 2),
            id,
            shared: false,
        };
        root_acquire();
        scenario.shared = true;
        scenario.setup();
        scenario
    }

    fn setup(&self) {
        let c = self.client.as_str();
        let h = self.host_if.as_str();
        run_ok(Command::new("ip").args(["netns", "add", c]));
        run_ok(Command::new("ip").args(["-n", c, "link", "set", "lo", "up"]));
        run_ok(Command::new("ip").args([
            "link", "add", h, "type", "veth", "peer", "name", "eth0", "netns", c,
        ]));
        run_ok(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/24", self.host_addr),
            "dev",
            h,
        ]));
        run_ok(Command::new("ip").args([
            "-n",
            c,
            "addr",
            "add",
            &format!("{}/24", self.client_addr),
            "dev",
            "eth0",
        ]));
        run_ok(Command::new("ip").args([
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.host_addr6),
            "dev",
            h,
            "nodad",
        ]));
        run_ok(Command::new("ip").args([
            "-n",
            c,
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.client_addr6),
            "dev",
            "eth0",
            "nodad",
        ]));
        run_ok(Command::new("ip").args(["link", "set", h, "up"]));
        run_ok(Command::new("ip").args(["-n", c, "link", "set", "eth0", "up"]));
        run_ok(Command::new("ip").args([
            "-n",
            c,
            "route",
            "add",
            "default",
            "via",
            &self.host_addr.to_string(),
        ]));
        run_ok(Command::new("ip").args([
            "-n",
            c,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &self.host_addr6.to_string(),
        ]));
    }

    /// `10.98.X.1:PORT`: a published host port as the client reaches it.
    pub fn published(&self, host_port: u16) -> SocketAddr {
        SocketAddr::from((self.host_addr, host_port))
    }

    /// `[fd98:X::1]:PORT`: the same host port over IPv6 (Docker's userland proxy serves it on
    /// networks without IPv6).
    pub fn published6(&self, host_port: u16) -> SocketAddr {
        SocketAddr::from((self.host_addr6, host_port))
    }

    /// Runs `f` in the client namespace.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.client, f)
    }

    /// `GET /` from the client: the body, or why not.
    pub fn get(&self, addr: SocketAddr, timeout: Duration) -> io::Result<String> {
        http_get(&self.client, addr, "/", timeout)
    }

    /// Asserts that `GET /` from the client to `addr` answers with `expected` body.
    pub fn assert_answers(&self, addr: SocketAddr, expected: &str, what: &str) {
        match self.get(addr, SHOULD_ANSWER) {
            Ok(body) => assert_eq!(body.trim_end(), expected, "{what}: body from {addr}"),
            Err(e) => {
                // Diagnose: does it answer a little later (a race), or not at all?
                let later = self.poll_answer(addr, FOLLOW_TIMEOUT);
                panic!(
                    "{what}: {addr} should answer now, got: {e} ({:?}); {}",
                    e.kind(),
                    match later {
                        Some(after) => format!("it answered only {after:?} later"),
                        None => format!("it did not answer within {FOLLOW_TIMEOUT:?} either"),
                    }
                )
            }
        }
    }

    /// Polls `GET /` until it answers with `expected` or `within` passes; panics then.
    /// Returns how long it took.
    pub fn assert_answers_within(
        &self,
        addr: SocketAddr,
        expected: &str,
        within: Duration,
        what: &str,
    ) -> Duration {
        let start = Instant::now();
        let mut last: String;
        loop {
            match self.get(addr, SHOULD_TIME_OUT) {
                Ok(body) if body.trim_end() == expected => return start.elapsed(),
                Ok(body) => last = format!("wrong body {body:?}"),
                Err(e) => last = format!("{e} ({:?})", e.kind()),
            }
            if start.elapsed() > within {
                panic!(
                    "{what}: {addr} should answer within {within:?} with {expected:?}; last: {last}"
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn poll_answer(&self, addr: SocketAddr, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.get(addr, SHOULD_TIME_OUT).is_ok() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        None
    }

    /// Asserts that a connection from the client to `addr` gets no answer at all within
    /// [`SHOULD_TIME_OUT`] (dropped; a refusal would mean it reached something).
    pub fn assert_times_out(&self, addr: SocketAddr, what: &str) {
        let result = self.in_client(|| TcpStream::connect_timeout(&addr, SHOULD_TIME_OUT));
        match result {
            Ok(_) => {
                panic!("{what}: connection to {addr} was answered; it should time out (dropped)")
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) => panic!(
                "{what}: connection to {addr} should time out (dropped), got instead: {e} ({:?})",
                e.kind()
            ),
        }
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the root-side end.
        if Path::new("/run/netns").join(&self.client).exists() {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.client])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "delete", &self.host_if])
            .output();
        if self.shared {
            root_release();
        }
    }
}

/// A free X for 10.98.X.0/24 in the root namespace, derived from the scenario counter.
fn pick_subnet(n: u32) -> u8 {
    let addrs = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let start = (std::process::id().wrapping_mul(7).wrapping_add(n)) % 150;
    (0..150)
        .map(|i| 100 + ((start + i) % 150) as u8)
        .find(|x| !addrs.contains(&format!(" 10.98.{x}.")))
        .expect("no free 10.98.X.0/24 in 10.98.100-249 on the root namespace")
}

/// The iptables binaries whose FORWARD chain the scenario sets to DROP: `iptables` (whatever
/// it points at), and `iptables-legacy` when the legacy filter table holds an engine's chains
/// (Docker or netavark on the legacy backend).
fn forward_backends() -> Vec<String> {
    let mut backends = vec!["iptables".to_owned()];
    let legacy_in_use = std::fs::read_to_string("/proc/net/ip_tables_names")
        .is_ok_and(|names| names.lines().any(|l| l.trim() == "filter"));
    let main_is_legacy = Command::new("iptables")
        .arg("-V")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("legacy"));
    if legacy_in_use && !main_is_legacy && find_program("iptables-legacy").is_some() {
        let rules = Command::new("iptables-legacy")
            .args(["-S", "FORWARD"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if rules.contains("DOCKER") || rules.contains("NETAVARK") {
            backends.push("iptables-legacy".to_owned());
        }
    }
    backends
}

/// The policy of FORWARD (`ACCEPT` or `DROP`) through `iptables` binary `bin`.
pub fn forward_policy(bin: &str) -> String {
    let output = Command::new(bin)
        .args(["-S", "FORWARD"])
        .output()
        .unwrap_or_else(|e| panic!("run {bin} -S FORWARD: {e}"));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("-P FORWARD ").map(|p| p.trim().to_owned()))
        .unwrap_or_else(|| panic!("{bin} -S FORWARD shows no policy: {output:?}"))
}

fn set_forward_policy(bin: &str, policy: &str) {
    run_ok(Command::new(bin).args(["-P", "FORWARD", policy]));
}

fn read_ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "0".into())
}

fn write_ip_forward(value: &str) {
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", value) {
        panic!("set net.ipv4.ip_forward={value}: {e}");
    }
}

fn root_acquire() {
    let mut shared = ROOT_SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if shared.users == 0 {
        let ip_forward = read_ip_forward();
        let policies: Vec<(String, String)> = forward_backends()
            .into_iter()
            .map(|bin| {
                let policy = forward_policy(&bin);
                (bin, policy)
            })
            .collect();
        let mut text = format!("{}\n{ip_forward}\n", std::process::id());
        for (bin, policy) in &policies {
            text.push_str(&format!("{bin} {policy}\n"));
        }
        let _ = std::fs::write(ROOT_STATE_FILE, text);
        write_ip_forward("1");
        for (bin, _) in &policies {
            set_forward_policy(bin, "DROP");
        }
        shared.saved = Some((ip_forward, policies));
    }
    shared.users += 1;
}

fn root_release() {
    let mut shared = ROOT_SHARED.lock().unwrap_or_else(|e| e.into_inner());
    shared.users = shared.users.saturating_sub(1);
    if shared.users == 0
        && let Some((ip_forward, policies)) = shared.saved.take()
    {
        for (bin, policy) in &policies {
            let _ = Command::new(bin).args(["-P", "FORWARD", policy]).output();
        }
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", &ip_forward);
        let _ = std::fs::remove_file(ROOT_STATE_FILE);
    }
}

/// Once per process: removes the client namespaces, veths and pin directories of runs that
/// were killed, and puts back the root namespace's settings they had changed.
fn reap_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Ok(text) = std::fs::read_to_string(ROOT_STATE_FILE) {
            let mut lines = text.lines();
            let owner: Option<u32> = lines.next().and_then(|l| l.trim().parse().ok());
            if owner.is_some_and(|pid| pid != std::process::id() && !pid_alive(pid)) {
                if let Some(ip_forward) = lines.next() {
                    let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", ip_forward.trim());
                }
                for line in lines {
                    if let Some((bin, policy)) = line.split_once(' ') {
                        let _ = Command::new(bin)
                            .args(["-P", "FORWARD", policy.trim()])
                            .output();
                    }
                }
                let _ = std::fs::remove_file(ROOT_STATE_FILE);
            }
        }
        let dead = |name: &str| stale_owner(name).is_some_and(|pid| !pid_alive(pid));
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("pge-") && dead(&name) {
                    let _ = Command::new("ip").args(["netns", "delete", &name]).output();
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("pe") && !name.starts_with("pge") && dead(&name) {
                    let _ = Command::new("ip").args(["link", "delete", &name]).output();
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("pge-") && dead(&name) {
                    remove_pins(&entry.path());
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Namespaces and HTTP.
// ---------------------------------------------------------------------------------------------

/// `GET PATH HTTP/1.0` from namespace `ns` to `addr`; the body when the status is 200.
/// `timeout` bounds the connection request; reading may take [`SHOULD_ANSWER`].
pub fn http_get(ns: &str, addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<String> {
    let stream = in_netns(ns, || TcpStream::connect_timeout(&addr, timeout))?;
    http_exchange(stream, addr, path)
}

/// `GET PATH HTTP/1.0` from the host itself (the root namespace) to `addr`.
pub fn http_get_from_host(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<String> {
    http_exchange(TcpStream::connect_timeout(&addr, timeout)?, addr, path)
}

fn http_exchange(mut stream: TcpStream, addr: SocketAddr, path: &str) -> io::Result<String> {
    stream.set_read_timeout(Some(SHOULD_ANSWER))?;
    stream.set_write_timeout(Some(SHOULD_ANSWER))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: portgate-test\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no HTTP response from {addr}: {text:?}")))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(io::Error::other(format!("{addr}{path}: {status}")));
    }
    Ok(body.to_owned())
}

/// A download in a thread of the client namespace: `GET PATH`, reading at most
/// `bytes_per_sec` through a small receive buffer.
pub struct Download {
    pub received: Arc<AtomicU64>,
    thread: Option<JoinHandle<io::Result<(u64, u64)>>>,
}

impl Download {
    pub fn start(ns: &str, addr: SocketAddr, path: &str, bytes_per_sec: u64) -> Self {
        let mut stream = in_netns(ns, || TcpStream::connect_timeout(&addr, SHOULD_ANSWER))
            .unwrap_or_else(|e| panic!("download: connect {addr}: {e}"));
        let rcvbuf: libc::c_int = 64 * 1024;
        // SAFETY: setsockopt on an open socket with a pointer to a c_int of the given size.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&rcvbuf as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let received = Arc::new(AtomicU64::new(0));
        let request = format!("GET {path} HTTP/1.0\r\nHost: portgate-test\r\n\r\n");
        let counter = received.clone();
        let thread = std::thread::spawn(move || -> io::Result<(u64, u64)> {
            // A stall this long is a broken connection, not a slow one.
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(request.as_bytes())?;
            let mut reader = BufReader::with_capacity(16 * 1024, stream);
            let mut content_length = None;
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "eof in headers",
                    ));
                }
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    content_length = v.trim().parse::<u64>().ok();
                }
            }
            let content_length = content_length
                .ok_or_else(|| io::Error::other("no Content-Length in the response"))?;
            let start = Instant::now();
            let mut buf = vec![0u8; 16 * 1024];
            let mut total = 0u64;
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                counter.store(total, Ordering::SeqCst);
                let due = Duration::from_secs_f64(total as f64 / bytes_per_sec as f64);
                if let Some(ahead) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
            Ok((content_length, total))
        });
        Download {
            received,
            thread: Some(thread),
        }
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// Waits for the end: (Content-Length, bytes of body received), or the error that ended it.
    pub fn finish(mut self) -> io::Result<(u64, u64)> {
        match self.thread.take().expect("finished twice").join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// A TCP server in a namespace: reads one line per connection, answers `pong <line>`, closes.
pub struct PongServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
    listener_fd: i32,
    thread: Option<JoinHandle<()>>,
}

impl PongServer {
    pub fn start(ns: &str, addr: SocketAddr) -> Self {
        let listener = in_netns(ns, || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("listen on {addr} in {ns}: {e}"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let listener_fd = listener.as_raw_fd();
        let thread = {
            let (accepted, stopping) = (accepted.clone(), stopping.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                        let Ok(mut writer) = stream.try_clone() else {
                            return;
                        };
                        let mut line = String::new();
                        let _ = BufReader::new(stream).read_line(&mut line);
                        let _ = writer.write_all(format!("pong {}\n", line.trim_end()).as_bytes());
                        let _ = writer.shutdown(std::net::Shutdown::Both);
                    });
                }
            })
        };
        PongServer {
            addr,
            accepted,
            stopping,
            listener_fd,
            thread: Some(thread),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for PongServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: the listener is alive until the thread, joined below, returns.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent, in the root namespace.
// ---------------------------------------------------------------------------------------------

/// `portgate agent --bridge auto --runtime auto` in the root namespace, with its own pin
/// directory (`/sys/fs/bpf/pge-<pid>-<n>`), state directory and control socket. Dropping it
/// kills the agent and runs `portgate uninstall` (programs, pins, delegation rules).
pub struct EngineAgent;

impl EngineAgent {
    /// Starts the agent and waits until it answers `status`.
    pub fn start(extra_args: &[&str]) -> Agent<'static> {
        reap_stale();
        let mut agent = Agent::in_root_namespace(
            &["--bridge", "auto", "--runtime", "auto"],
            extra_args,
            &unique(""),
        );
        agent.spawn();
        agent.wait_ready();
        agent
    }
}

impl Agent<'_> {
    /// Waits until `status --json` lists every engine in `engines` as connected with at least
    /// one sync, and returns that status. Panics after [`FOLLOW_TIMEOUT`].
    pub fn wait_engines_connected(&self, engines: &[&str]) -> Value {
        let deadline = Instant::now() + FOLLOW_TIMEOUT;
        loop {
            let status = self.status_json();
            let ok = engines.iter().all(|name| {
                engine_status(&status, name).is_some_and(|e| {
                    e["connected"] == true && e["syncs"].as_u64().unwrap_or(0) >= 1
                })
            });
            if ok {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "engines {engines:?} not connected and synced after {FOLLOW_TIMEOUT:?}: {}\nlog:\n{}",
                    status["engines"],
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The entry of `status --json` `engines[]` for `engine` ("docker" or "podman").
pub fn engine_status<'v>(status: &'v Value, engine: &str) -> Option<&'v Value> {
    status["engines"]
        .as_array()?
        .iter()
        .find(|e| e["engine"] == engine)
}

/// The rules of `list --json` whose container is `name`.
pub fn container_rules<'v>(list: &'v Value, name: &str) -> Vec<&'v Value> {
    list["rules"]
        .as_array()
        .map(|rules| rules.iter().filter(|r| r["container"] == name).collect())
        .unwrap_or_default()
}

/// Every host port listed in `host_ports` of `rules`.
pub fn host_ports(rules: &[&Value]) -> BTreeSet<u64> {
    rules
        .iter()
        .flat_map(|r| r["host_ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_u64())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// iptables helpers.
// ---------------------------------------------------------------------------------------------

/// The rules (`-A ...` lines) of `chain` through iptables binary `bin`.
pub fn iptables_rules(bin: &str, chain: &str) -> Vec<String> {
    let output = Command::new(bin)
        .args(["-S", chain])
        .output()
        .unwrap_or_else(|e| panic!("run {bin} -S {chain}: {e}"));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_owned)
        .collect()
}

/// Splits an `iptables -S` line into arguments (double quotes group, as iptables prints them).
pub fn split_rule(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut has = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                has = true;
            }
            c if c.is_whitespace() && !quoted => {
                if has {
                    args.push(std::mem::take(&mut current));
                    has = false;
                }
            }
            c => {
                current.push(c);
                has = true;
            }
        }
    }
    if has {
        args.push(current);
    }
    args
}

/// Deletes one rule printed by `iptables -S` (`-A CHAIN SPEC` -> `-D CHAIN SPEC`).
pub fn iptables_delete(bin: &str, rule_line: &str) {
    let mut args = split_rule(rule_line);
    assert_eq!(
        args.first().map(String::as_str),
        Some("-A"),
        "not a rule: {rule_line}"
    );
    args[0] = "-D".into();
    run_ok(Command::new(bin).args(&args));
}

// ---------------------------------------------------------------------------------------------
// Processes.
// ---------------------------------------------------------------------------------------------

/// `name` in PATH, or in the sbin directories a root PATH may lack.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether `path` is an ELF executable without an interpreter (statically linked).
fn is_static_busybox(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        // PT_INTERP = 3
        o + 4 <= bytes.len()
            && u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) != 3
    })
}

fn socket_accepts(path: &str) -> bool {
    UnixStream::connect(path).is_ok()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Starts a daemon in its own session (so a ^C to the test run does not reach it), logging
/// to `log`, with the sbin directories in PATH (dockerd runs iptables).
fn spawn_daemon(mut command: Command, log: &str) -> Result<Child> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {log}"))?;
    let err = out.try_clone()?;
    let path = std::env::var("PATH").unwrap_or_default();
    command
        .env("PATH", format!("{path}:/usr/local/sbin:/usr/sbin:/sbin"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    command
        .spawn()
        .with_context(|| format!("spawn {command:?} (log {log})"))
}

fn tail(path: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow!("not ready after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs a command with a deadline (killing it then), collecting its output.
pub fn run_timeout(command: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {command:?}"))?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{command:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    })
}

fn output_text(command: &mut Command, timeout: Duration) -> Result<String> {
    let output = run_timeout(command, timeout)?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// Writes /etc/containers/containers.conf when there is none: the open-files and process
/// limits this machine can grant (shared/testbed.md), and netavark as the network backend
/// when it is installed (Podman's bridge is then `podman0`, as the agent expects).
fn write_containers_conf() -> Result<()> {
    if Path::new(CONTAINERS_CONF).exists() {
        return Ok(());
    }
    let mut text = String::from(
        "# Written by portgate's engine tests (tests/src/engines.rs).\n\
         [containers]\n\
         default_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n",
    );
    if ["/usr/lib/podman/netavark", "/usr/libexec/podman/netavark"]
        .iter()
        .any(|p| Path::new(p).is_file())
    {
        text.push_str("\n[network]\nnetwork_backend = \"netavark\"\n");
    }
    std::fs::create_dir_all("/etc/containers")?;
    std::fs::write(CONTAINERS_CONF, text).with_context(|| format!("write {CONTAINERS_CONF}"))?;
    Ok(())
}
