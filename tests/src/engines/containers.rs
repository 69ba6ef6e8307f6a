//! Containers and networks the tests create on the engines, removed on drop; the httpd
//! script the containers serve; free host ports.

use super::*;

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
    pub(super) engines: &'static Engines,
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

pub(super) fn remove_container(engines: &Engines, engine: Engine, name: &str) {
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

/// A Docker network, removed (`network rm`) on drop; its containers must be gone by then.
pub struct DockerNetwork {
    engines: &'static Engines,
    pub name: String,
}

impl DockerNetwork {
    /// `docker network create ARGS... NAME`.
    pub fn create(engines: &'static Engines, name: &str, args: &[&str]) -> Self {
        let network = DockerNetwork {
            engines,
            name: name.to_owned(),
        };
        let mut full = vec!["network", "create"];
        full.extend_from_slice(args);
        full.push(name);
        engines.cli_ok(Engine::Docker, &full);
        network
    }

    /// The network's IPv4 subnet (the first of its IPAM configs).
    pub fn subnet(&self) -> String {
        self.engines
            .cli_ok(
                Engine::Docker,
                &[
                    "network",
                    "inspect",
                    "--format",
                    "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
                    &self.name,
                ],
            )
            .split_whitespace()
            .find(|s| s.contains('.'))
            .unwrap_or_else(|| panic!("network {} has no IPv4 subnet", self.name))
            .to_owned()
    }
}

impl Drop for DockerNetwork {
    fn drop(&mut self) {
        let _ = run_timeout(
            self.engines
                .cli(Engine::Docker)
                .args(["network", "rm", &self.name]),
            Duration::from_secs(60),
        );
    }
}

impl ContainerGuard {
    /// The container's address on `network` once it serves TCP `port` there (from the root
    /// namespace). Panics after [`FOLLOW_TIMEOUT`].
    pub fn wait_serving_on(&self, network: &str, port: u16) -> Ipv4Addr {
        let deadline = Instant::now() + FOLLOW_TIMEOUT;
        loop {
            let format =
                format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
            let address = self.cli_ok(&["inspect", "--format", &format, &self.name]);
            if let Ok(ip) = address.parse::<Ipv4Addr>()
                && TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(1))
                    .is_ok()
            {
                return ip;
            }
            if Instant::now() > deadline {
                panic!(
                    "container {} does not serve port {port} on {network} ({address:?}); logs:\n{}",
                    self.name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A Podman network, removed (`network rm -f`) on drop.
pub struct PodmanNetwork {
    engines: &'static Engines,
    pub name: String,
}

impl PodmanNetwork {
    pub fn create(engines: &'static Engines, name: &str) -> Self {
        let network = PodmanNetwork {
            engines,
            name: name.to_owned(),
        };
        engines.cli_ok(Engine::Podman, &["network", "create", name]);
        network
    }

    /// The Linux bridge Podman gave it (`network_interface`).
    pub fn bridge(&self) -> String {
        self.engines.cli_ok(
            Engine::Podman,
            &[
                "network",
                "inspect",
                "--format",
                "{{.NetworkInterface}}",
                &self.name,
            ],
        )
    }
}

impl Drop for PodmanNetwork {
    fn drop(&mut self) {
        let _ = run_timeout(
            self.engines
                .cli(Engine::Podman)
                .args(["network", "rm", "-f", &self.name]),
            Duration::from_secs(60),
        );
    }
}
