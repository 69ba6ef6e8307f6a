//! The harness of the netfilter tests: network namespaces of the test's own, the module
//! called from a thread inside one, a router namespace with a DNATed container behind a
//! bridge, and clients routed through it.

#![allow(
    dead_code,
    reason = "each test crate that includes this module uses a part of it"
)]

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use gate_user::netfilter::{self, Delegation, DelegationStatus};

pub const BR: &str = "pgbr0";
/// The client address the operator's own rules drop, in the tests that have one.
pub const BLOCKED: &str = "10.97.0.2";

/// A network namespace of this test process, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// None when the test cannot run here, after saying so (a failure in CI instead: see
    /// `portgate_test_support::skip`).
    pub fn new() -> Option<Self> {
        if !portgate_test_support::require_root("network namespaces, iptables, nft") {
            return None;
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pgnf-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ns = Netns { name };
        run(Command::new("ip").args(["netns", "add", &ns.name]));
        Some(ns)
    }

    /// Runs `f` on a thread inside this namespace (and checks that the processes it starts
    /// are inside it too).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        let handle = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        let inode = handle.metadata().expect("stat netns").ino();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    portgate_bpf_sys::netns::enter(&handle)
                        .unwrap_or_else(|e| panic!("setns({}): {e}", self.name));
                    let child = run(Command::new("readlink").arg("/proc/self/ns/net"));
                    assert_eq!(
                        child.trim(),
                        format!("net:[{inode}]"),
                        "a child of the setns thread must be in the test's namespace"
                    );
                    f()
                })
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// `ip netns exec NS ARGS...`; panics on failure; returns stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// Feeds `input` to `ip netns exec NS ARGS...`.
    pub fn exec_stdin(&self, args: &[&str], input: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let status = child.wait().expect("wait");
        assert!(status.success(), "{args:?} <<< {input}: {status}");
    }

    /// The `-A` lines of `TOOL -S CHAIN`.
    pub fn rules(&self, tool: &str, chain: &str) -> Vec<String> {
        self.exec(&[tool, "-w", "-S", chain])
            .lines()
            .filter(|line| line.starts_with("-A "))
            .map(str::to_owned)
            .collect()
    }

    pub fn ensure(&self, delegation: &mut Delegation, bridges: &[&str]) -> Vec<DelegationStatus> {
        let bridges: Vec<String> = bridges.iter().map(|b| (*b).to_owned()).collect();
        self.run(|| delegation.ensure(&bridges)).expect("ensure")
    }

    pub fn check_and_restore(&self, delegation: &mut Delegation) -> usize {
        self.run(|| delegation.check_and_restore())
            .expect("check_and_restore")
    }

    pub fn remove_all(&self) -> usize {
        self.run(netfilter::remove_all).expect("remove_all")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Our rule as `iptables -S` prints it.
pub fn ours(chain: &str, bridge: &str) -> String {
    format!(
        "-A {chain} -o {bridge} -m conntrack --ctstate DNAT -m comment --comment \"portgate: delegate {bridge} to the eBPF gate\" -j ACCEPT"
    )
}

pub fn status(bridge: &str, backend: &str, chain: &str) -> DelegationStatus {
    DelegationStatus {
        bridge: bridge.to_owned(),
        backend: backend.to_owned(),
        chain: chain.to_owned(),
        installed: true,
        replies: false,
    }
}

/// The chain's rules as `nft -a` prints them, without handles.
pub fn nft_rules(ns: &Netns, family: &str, table: &str, chain: &str) -> Vec<String> {
    ns.exec(&["nft", "list", "chain", family, table, chain])
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with("table ")
                && !line.starts_with("chain ")
                && !line.starts_with("type ")
                && *line != "}"
        })
        .map(str::to_owned)
        .collect()
}

pub fn ours_nft(bridge: &str) -> String {
    format!(
        "oifname \"{bridge}\" ct status dnat accept comment \"portgate: delegate {bridge} to the eBPF gate\""
    )
}

/// A TCP server in a namespace that answers "hello" to every connection.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns.run(|| TcpListener::bind(addr)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.write_all(b"hello");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects from the client namespace: Ok(greeting), or the error (a timeout when dropped).
pub fn connect(client: &Netns, addr: &str) -> std::io::Result<String> {
    let addr: SocketAddr = addr.parse().expect("address");
    client.run(|| {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(1500))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut greeting = String::new();
        stream.read_to_string(&mut greeting)?;
        Ok(greeting)
    })
}

pub fn timed_out(result: &std::io::Result<String>) -> bool {
    matches!(result, Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock))
}

/// A router namespace with bridge `pgbr0` (10.99.0.1) and a container (10.99.0.2, port 80
/// answers "hello") published as 10.98.0.1:8080 by DNAT, and two clients routed through
/// it: 10.98.0.2 and `BLOCKED` (10.97.0.2). Its filter rules are up to each test.
pub struct Router {
    _server: Server,
    pub router: Netns,
    pub client: Netns,
    pub blocked: Netns,
    pub container: Netns,
}

pub const PUBLISHED: &str = "10.98.0.1:8080";

impl Router {
    pub fn new() -> Option<Self> {
        let router = Netns::new()?;
        let (client, blocked, container) = (Netns::new()?, Netns::new()?, Netns::new()?);
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        let (r, k) = (router.name.as_str(), container.name.as_str());
        ip(&["-n", r, "link", "add", BR, "type", "bridge"]);
        ip(&["-n", r, "addr", "add", "10.99.0.1/24", "dev", BR]);
        ip(&["-n", r, "link", "set", BR, "up"]);
        ip(&[
            "-n", r, "link", "add", "vk", "type", "veth", "peer", "name", "eth0", "netns", k,
        ]);
        ip(&["-n", r, "link", "set", "vk", "master", BR, "up"]);
        ip(&["-n", k, "addr", "add", "10.99.0.2/24", "dev", "eth0"]);
        ip(&["-n", k, "link", "set", "eth0", "up"]);
        ip(&["-n", k, "link", "set", "lo", "up"]);
        ip(&["-n", k, "route", "add", "default", "via", "10.99.0.1"]);
        for (peer, link, net) in [(&client, "vc", "10.98.0"), (&blocked, "vb", "10.97.0")] {
            let c = peer.name.as_str();
            ip(&[
                "-n", r, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", c,
            ]);
            ip(&["-n", r, "addr", "add", &format!("{net}.1/24"), "dev", link]);
            ip(&["-n", r, "link", "set", link, "up"]);
            ip(&[
                "-n",
                c,
                "addr",
                "add",
                &format!("{net}.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", c, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                c,
                "route",
                "add",
                "default",
                "via",
                &format!("{net}.1"),
            ]);
        }
        router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        router.exec(&[
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "10.98.0.1",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "DNAT",
            "--to-destination",
            "10.99.0.2:80",
        ]);
        let server = Server::start(&container, "10.99.0.2:80".parse().expect("address"));
        Some(Router {
            _server: server,
            router,
            client,
            blocked,
            container,
        })
    }

    /// After `ensure`: the client reaches the published port, the blocked client does not;
    /// then, the operator's DROP lifted by the command `lift` (run in the router), the
    /// blocked client does too: its path works, only the DROP stopped it.
    pub fn assert_only_the_operators_drop_holds(&self, lift: &[&str]) {
        assert_eq!(
            connect(&self.client, PUBLISHED).expect("published port from the client"),
            "hello"
        );
        let blocked = connect(&self.blocked, PUBLISHED);
        assert!(
            timed_out(&blocked),
            "the operator's DROP for {BLOCKED} must still drop it, got {blocked:?}"
        );
        self.router.exec(lift);
        assert_eq!(
            connect(&self.blocked, PUBLISHED).unwrap_or_else(|e| panic!(
                "published port from {BLOCKED} once the operator's DROP is gone ({lift:?}): {e}"
            )),
            "hello"
        );
    }
}

/// Docker's chains, with `bridge` one of Docker's (Docker routes it to its DOCKER chain), as
/// Docker creates them; the jump to DOCKER-USER is up to the test.
pub fn docker_owns(ns: &Netns, bridge: &str) {
    ns.exec(&["iptables-nft", "-N", "DOCKER-USER"]);
    ns.exec(&["iptables-nft", "-N", "DOCKER"]);
    ns.exec(&[
        "iptables-nft",
        "-A",
        "FORWARD",
        "-o",
        bridge,
        "-j",
        "DOCKER",
    ]);
}
