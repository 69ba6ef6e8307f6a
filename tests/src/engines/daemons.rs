//! Engines: the daemons and the image.

use super::*;

/// The engine environment of this process: the engine set `PORTGATE_ENGINE_SET` names (see
/// [`EngineSet`]). See the module documentation.
pub struct Engines {
    pub set: EngineSet,
    /// The chroot the daemons and CLIs run in (sid), None for the host's own.
    pub root: Option<PathBuf>,
    /// The `docker` CLI (Debian's, /usr/bin/docker, when present: it matches the daemon).
    pub docker: PathBuf,
    pub podman: PathBuf,
    dockerd: PathBuf,
    containerd: PathBuf,
    /// The sockets as the host (and so the agent) reaches them.
    pub docker_socket: PathBuf,
    pub podman_socket: PathBuf,
    containerd_socket: PathBuf,
    /// `CONTAINERS_CONF` for the host's podman (the set's network backend).
    containers_conf: Option<PathBuf>,
    /// `docker version` and `podman version`, as printed.
    pub docker_version: String,
    pub podman_version: String,
    started: Mutex<Started>,
}

/// The daemons this process started (and so may stop).
#[derive(Default)]
pub(super) struct Started {
    containerd: Option<Child>,
    dockerd: Option<Child>,
    podman: Option<Child>,
}

pub(super) enum State {
    Ready(Box<Engines>),
    Skip(String),
    Failed(String),
}

impl Engines {
    /// The engine environment, started on first use. None (after printing "skipped: <test>:
    /// <reason>") when the tests cannot run here: not root, or an engine of the set is not
    /// installed (or the sid root not built). With `PORTGATE_REQUIRE_ENGINES=1` that fails the
    /// test instead (for CI, where `cargo xtask setup` installs them). Panics when an
    /// installed engine fails to start, with the reason and where its log is.
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
        let set = EngineSet::from_env().map_err(|e| InitError::Failed(anyhow!(e)))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(InitError::Skip(
                "needs root (starts container engines, creates network namespaces)".into(),
            ));
        }
        hold_host_lock().map_err(InitError::Failed)?;
        let skip = |why: String| InitError::Skip(format!("engine set {}: {why}", set.name()));
        if !is_static_busybox(Path::new("/bin/busybox")) {
            return Err(skip(
                "no static /bin/busybox for the test image (apt-get install busybox-static)".into(),
            ));
        }
        let mut engines = match set.root() {
            Some(root) => {
                check_sid_root(&root).map_err(skip)?;
                Engines {
                    set,
                    docker: "/usr/bin/docker".into(),
                    podman: "/usr/bin/podman".into(),
                    dockerd: "/usr/sbin/dockerd".into(),
                    containerd: "/usr/bin/containerd".into(),
                    docker_socket: root.join("run/docker.sock"),
                    podman_socket: root.join("run/podman/podman.sock"),
                    containerd_socket: root.join("run/containerd/containerd.sock"),
                    containers_conf: None,
                    root: Some(root),
                    docker_version: String::new(),
                    podman_version: String::new(),
                    started: Mutex::new(Started::default()),
                }
            }
            None => {
                let find = |name: &str, package: &str| {
                    find_program(name).ok_or_else(|| {
                        skip(format!(
                            "`{name}` not found (apt-get install {package}; `cargo xtask setup` does)"
                        ))
                    })
                };
                let dockerd = find("dockerd", "docker.io")?;
                let containerd = find("containerd", "containerd")?;
                let podman = find("podman", "podman")?;
                if set == EngineSet::Cni {
                    let plugins = ["/usr/lib/cni/bridge", "/opt/cni/bin/bridge"];
                    if !plugins.iter().any(|p| Path::new(p).is_file()) {
                        return Err(skip(
                            "no CNI bridge plugin (apt-get install containernetworking-plugins; \
                             `cargo xtask setup` does)"
                                .into(),
                        ));
                    }
                }
                // Debian's docker.io CLI matches its daemon; another `docker` earlier in PATH may not.
                let docker = ["/usr/bin/docker"]
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.is_file())
                    .or_else(|| find_program("docker"))
                    .ok_or_else(|| {
                        skip("`docker` CLI not found (apt-get install docker.io)".into())
                    })?;
                Engines {
                    set,
                    root: None,
                    docker,
                    podman,
                    dockerd,
                    containerd,
                    docker_socket: DOCKER_SOCKET.into(),
                    podman_socket: PODMAN_SOCKET.into(),
                    containerd_socket: CONTAINERD_SOCKET.into(),
                    containers_conf: None,
                    docker_version: String::new(),
                    podman_version: String::new(),
                    started: Mutex::new(Started::default()),
                }
            }
        };
        eprintln!("engine set {}", set.name());
        engines.start().map_err(InitError::Failed)?;
        eprintln!(
            "engine set {}: {} / {}",
            set.name(),
            first_version(&engines.docker_version, "Version:"),
            first_version(&engines.podman_version, "Version:")
        );
        Ok(engines)
    }

    /// A command for one of the set's programs: in the sid root (chroot), or the host's.
    fn program(&self, path: &Path) -> Command {
        let mut command = match &self.root {
            Some(root) => {
                let mut c = Command::new("chroot");
                c.arg(root).arg(path);
                c
            }
            None => Command::new(path),
        };
        command.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        // Podman 5 warns on every call on this machine's hybrid cgroups.
        command.env("PODMAN_IGNORE_CGROUPSV1_WARNING", "1");
        if let Some(conf) = &self.containers_conf {
            command.env("CONTAINERS_CONF", conf);
        }
        command
    }

    fn start(&mut self) -> Result<()> {
        stop_other_sets(self.set)?;
        let logs = self.set.logs();
        match &self.root {
            Some(root) => {
                // A dockerd of the host's would hold docker0 (and its containers' rules).
                if socket_accepts(DOCKER_SOCKET) {
                    bail!(
                        "a dockerd the harness did not start answers on {DOCKER_SOCKET}; the sid \
                         engine set needs docker0 for its own dockerd: stop it first"
                    );
                }
                mount_root(root)?;
                write_root_containers_conf(root)?;
            }
            None => {
                self.containers_conf = write_host_containers_conf(self.set)?;
            }
        }
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        // containerd first: dockerd is pointed at its socket.
        if !socket_accepts_path(&self.containerd_socket) {
            let child = spawn_daemon(self.program(&self.containerd), &logs.containerd)?;
            started.containerd = Some(child);
            wait_until(Duration::from_secs(30), || {
                socket_accepts_path(&self.containerd_socket)
            })
            .with_context(|| {
                format!(
                    "containerd did not open {}; log {}:\n{}",
                    self.containerd_socket.display(),
                    logs.containerd.display(),
                    tail(&logs.containerd)
                )
            })?;
        }
        if !self.docker_answers() {
            started.dockerd = Some(self.spawn_dockerd()?);
            self.wait_docker()?;
        }
        if !socket_accepts_path(&self.podman_socket) {
            let dir = self.podman_socket.parent().context("podman socket dir")?;
            std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
            let _ = std::fs::remove_file(&self.podman_socket);
            let mut command = self.program(&self.podman);
            command.args([
                "system",
                "service",
                "--time=0",
                &format!("unix://{PODMAN_SOCKET}"),
            ]);
            started.podman = Some(spawn_daemon(command, &logs.podman)?);
            wait_until(Duration::from_secs(30), || {
                socket_accepts_path(&self.podman_socket)
            })
            .with_context(|| {
                format!(
                    "podman system service did not open {}; log {}:\n{}",
                    self.podman_socket.display(),
                    logs.podman.display(),
                    tail(&logs.podman)
                )
            })?;
        }
        drop(started);
        self.check_podman_backend()?;

        self.docker_version = output_text(
            self.program(&self.docker).arg("version"),
            Duration::from_secs(20),
        )?;
        self.podman_version = output_text(
            self.program(&self.podman).arg("version"),
            Duration::from_secs(20),
        )?;
        self.reap_stale_containers();
        reap_stale();
        self.ensure_image()?;
        Ok(())
    }

    /// Fails when the Podman service (perhaps one the harness did not start, which it reuses)
    /// runs another network backend than the set's: its containers would be on the wrong
    /// bridge.
    fn check_podman_backend(&self) -> Result<()> {
        let wanted = if self.set == EngineSet::Cni {
            "cni"
        } else {
            "netavark"
        };
        let output = run_timeout(
            self.program(&self.podman).args([
                "--url",
                &format!("unix://{PODMAN_SOCKET}"),
                "info",
                "--format",
                "{{.Host.NetworkBackend}}",
            ]),
            Duration::from_secs(30),
        )?;
        let backend = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if backend != wanted {
            bail!(
                "the Podman service on {} runs network backend {backend:?} ({}), engine set {} \
                 needs {wanted}: stop that service (it was not started for this set) and run \
                 again",
                self.podman_socket.display(),
                String::from_utf8_lossy(&output.stderr).trim(),
                self.set.name()
            );
        }
        Ok(())
    }

    fn spawn_dockerd(&self) -> Result<Child> {
        let mut command = self.program(&self.dockerd);
        // The socket's path inside the root (or the host).
        command.arg(format!("--containerd={CONTAINERD_SOCKET}"));
        spawn_daemon(command, &self.set.logs().dockerd)
    }

    /// The dockerd pidfile, as the host sees it.
    fn dockerd_pidfile(&self) -> PathBuf {
        match &self.root {
            Some(root) => root.join("run/docker.pid"),
            None => PathBuf::from("/var/run/docker.pid"),
        }
    }

    fn docker_answers(&self) -> bool {
        run_timeout(
            self.program(&self.docker).arg("info"),
            Duration::from_secs(10),
        )
        .is_ok_and(|o| o.status.success())
    }

    fn wait_docker(&self) -> Result<()> {
        let log = self.set.logs().dockerd;
        wait_until(DOCKER_START_TIMEOUT, || self.docker_answers()).with_context(|| {
            format!(
                "dockerd did not answer `docker info` within {DOCKER_START_TIMEOUT:?}; log {}:\n{}",
                log.display(),
                tail(&log)
            )
        })
    }

    /// Builds `local/busybox:latest` for Docker (`docker import` of a rootfs holding only the
    /// static busybox and a few applet links) unless present, and gives Podman the same image.
    fn ensure_image(&self) -> Result<()> {
        let inspect = run_timeout(
            self.program(&self.docker).args(["image", "inspect", IMAGE]),
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
            let import = self
                .program(&self.docker)
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
            self.program(&self.podman).args(["image", "exists", IMAGE]),
            Duration::from_secs(20),
        )?;
        if !exists.status.success() {
            let mut save = self
                .program(&self.docker)
                .args(["save", IMAGE])
                .stdout(Stdio::piped())
                .spawn()
                .context("spawn docker save")?;
            let saved = save.stdout.take().context("docker save stdout")?;
            let load = self
                .program(&self.podman)
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
        let mut command = self.program(match engine {
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
        let pid: u32 = std::fs::read_to_string(self.dockerd_pidfile())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        pid_alive(pid).then_some(pid)
    }

    /// Whether this process may kill and restart dockerd: it started it, or a previous test
    /// run did (its output goes to the set's dockerd log), or `PORTGATE_TESTS_MAY_RESTART_DOCKERD=1`
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
            return Err(format!(
                "no dockerd pid ({})",
                self.dockerd_pidfile().display()
            ));
        };
        let output = std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap_or_default();
        if output == self.set.logs().dockerd {
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
        let _ = std::fs::remove_file(self.dockerd_pidfile());
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

pub(super) enum InitError {
    Skip(String),
    Failed(anyhow::Error),
}

/// Where engine test processes take turns: they share the host's daemons, bridges and
/// forwarding settings.
const HOST_LOCK: &str = "/run/lock/portgate-engine-tests.lock";

/// Waits for, then holds until this process ends, the host-wide lock of the engine tests
/// (flock on a file opened close-on-exec, so the daemons the tests start do not inherit it).
fn hold_host_lock() -> Result<()> {
    static HELD: OnceLock<std::fs::File> = OnceLock::new();
    if HELD.get().is_some() {
        return Ok(());
    }
    std::fs::create_dir_all("/run/lock").context("mkdir /run/lock")?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(HOST_LOCK)
        .with_context(|| format!("open {HOST_LOCK}"))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("waiting for another engine test process ({HOST_LOCK})");
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("flock {HOST_LOCK}: {}", io::Error::last_os_error());
        }
    }
    let _ = HELD.set(file);
    Ok(())
}
