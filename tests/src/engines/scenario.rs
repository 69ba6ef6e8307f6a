//! The scenario: a client namespace routed through the root namespace, FORWARD policy DROP.

use super::*;

/// Where the root namespace's settings before the first scenario are kept, so that a run
/// killed before its Drops ran is repaired by the next one.
pub(super) const ROOT_STATE_FILE: &str = "/run/portgate-tests-engines-root-state";

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
pub(super) struct RootShared {
    users: usize,
    /// (ip_forward, [(iptables binary, FORWARD policy)]) before the first scenario.
    saved: Option<(String, Vec<(String, String)>)>,
}

pub(super) static ROOT_SHARED: Mutex<RootShared> = Mutex::new(RootShared {
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
pub(super) fn pick_subnet(n: u32) -> u8 {
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
pub(super) fn forward_backends() -> Vec<String> {
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

pub(super) fn set_forward_policy(bin: &str, policy: &str) {
    run_ok(Command::new(bin).args(["-P", "FORWARD", policy]));
}

pub(super) fn read_ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "0".into())
}

pub(super) fn write_ip_forward(value: &str) {
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", value) {
        panic!("set net.ipv4.ip_forward={value}: {e}");
    }
}

pub(super) fn root_acquire() {
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

pub(super) fn root_release() {
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
pub(super) fn reap_stale() {
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
