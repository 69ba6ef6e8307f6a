//! The namespace topology of the end-to-end tests, built fresh for every measured cell so that
//! no state (conntrack entries, TIME_WAIT sockets, neighbour caches) carries over from one
//! filter to the next:
//!
//! ```text
//!  client ns               host ns (ip_forward=1, the filter under test)    server ns
//!  eth0 10.98.0.2/24 ── vcli 10.98.0.1/24
//!                         pgbr0 10.99.0.1/24 (bridge) ── vctr ───────────── eth0 10.99.0.2/24
//!                         pgbr1 (down; holds the gate for the BPF_PROG_TEST_RUN figures)
//! ```
//! Every name starts with `pgb-<pid>-`; [`reap_stale`] removes the leftovers of a killed run.
//!
//! [`Topology::container_host`] makes the host namespace what a Docker or Podman host is:
//! published ports are DNAT (host 10.98.0.1:8080 -> 10.99.0.2:80, and 8081 -> :81, a
//! published port that no filter allows), so conntrack tracks every forwarded packet, whatever
//! the filter.
use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use portgate_cmd as proc;

pub use portgate_test_support::topology::BRIDGE;
/// A second bridge, never up: the program-cost agent attaches there.
pub const PROG_BRIDGE: &str = "pgbr1";
pub const HOST_ADDR: &str = portgate_test_support::topology::HOST_V4;
pub const CLIENT_ADDR: &str = portgate_test_support::topology::CLIENT_V4;
pub const BRIDGE_ADDR: &str = portgate_test_support::topology::BRIDGE_V4;
pub const SERVER_ADDR: &str = portgate_test_support::topology::CONTAINER_V4;
pub const SERVER_IP: [u8; 4] = [10, 99, 0, 2];
pub const HOST_IP: [u8; 4] = [10, 98, 0, 1];
pub const CLIENT_IP: [u8; 4] = [10, 98, 0, 2];
/// Fixed MAC addresses of the client's link, so the bench's raw frame generator can address
/// the host (and a foreign MAC, for the control that never reaches netfilter).
pub const HOST_MAC: [u8; 6] = [0x02, 0x70, 0x67, 0x62, 0x00, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x70, 0x67, 0x62, 0x00, 0x02];
pub const FOREIGN_MAC: [u8; 6] = [0x02, 0x70, 0x67, 0x62, 0x00, 0x99];
/// Published host ports (DNAT to the server) in container-host mode: one allowed (to the HTTP
/// server), one that no filter allows (the flood's target).
pub const PUBLISHED_HTTP_PORT: u16 = 8080;
pub const PUBLISHED_BLOCKED_PORT: u16 = 8081;
pub const BLOCKED_PORT: u16 = 81;

/// A network namespace this bench created, deleted on drop.
pub struct Netns {
    pub name: String,
    handle: std::sync::Arc<File>,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        run_quiet(Command::new("ip").args(["netns", "add", name]))?;
        let handle = File::open(netns_path(name))
            .with_context(|| format!("opening network namespace {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            handle: std::sync::Arc::new(handle),
        })
    }

    /// `program` run inside this namespace: setns(2) just before exec and nothing else, so
    /// unlike `ip netns exec` the mount namespace (and /sys/fs/bpf) stays as it is.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        portgate_bpf_sys::netns::command_in(&mut cmd, self.handle.clone());
        cmd
    }

    /// Runs `f` on a fresh thread inside this namespace; sockets it creates belong here for
    /// their whole life, whichever thread uses them later.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let handle = &self.handle;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    portgate_bpf_sys::netns::enter(handle.as_ref()).context("setns")?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_quiet(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(drop)
    }

    /// Sets `key=value` sysctls of this namespace: /proc/sys/net is the namespace of the
    /// thread that opens it.
    pub fn sysctl(&self, settings: &[&str]) -> Result<()> {
        for setting in settings {
            let (key, value) = setting
                .split_once('=')
                .with_context(|| format!("bad sysctl {setting:?}"))?;
            let path = Path::new("/proc/sys").join(key.replace('.', "/"));
            self.run(|| std::fs::write(&path, value))?
                .with_context(|| format!("setting {setting} in {}", self.name))?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Best effort: processes and sockets still inside keep the namespace alive, not us.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// The CPU of the load generators and the CPU of the servers, on a machine with at least two:
/// pinning keeps the scheduler from shuffling them, which on two CPUs is most of the noise.
pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;

fn cpu_set(cpu: usize) -> Option<libc::cpu_set_t> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return None;
    }
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu % cpus` is below the number of CPUs, within the set's bits.
    unsafe { libc::CPU_SET(cpu % cpus, &mut set) };
    Some(set)
}

/// Pins the calling thread to `cpu` (nothing on a single-CPU machine).
pub fn pin_thread(cpu: usize) {
    if let Some(set) = cpu_set(cpu) {
        // SAFETY: a valid cpu_set_t of the size passed; 0 is the calling thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    }
}

/// Makes `cmd` run pinned to `cpu`.
pub fn pin_command(cmd: &mut Command, cpu: usize) {
    if let Some(set) = cpu_set(cpu) {
        // SAFETY: the closure only makes the async-signal-safe sched_setaffinity call.
        unsafe {
            cmd.pre_exec(move || {
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                Ok(())
            });
        }
    }
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Runs a command, capturing its output; fails with that output unless it exits 0.
pub fn run_quiet(cmd: &mut Command) -> Result<proc::Captured> {
    let out = proc::capture(cmd, Duration::from_secs(120))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            proc::display(cmd),
            out.status,
            out.combined()
        );
    }
    Ok(out)
}

/// Runs a command to completion (blocking in wait(2), so the time is exact, unlike a polled
/// wait) and returns how long it took; fails with its output unless it exits 0.
pub fn run_timed(cmd: &mut Command) -> Result<Duration> {
    cmd.stdin(std::process::Stdio::null());
    let start = std::time::Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}`", proc::display(cmd)))?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            proc::display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

/// The three namespaces of one cell, wired; deleted on drop (server, client, host).
pub struct Topology {
    pub server: Netns,
    pub client: Netns,
    pub host: Netns,
}

impl Topology {
    pub fn create(prefix: &str) -> Result<Self> {
        let host = Netns::create(&format!("{prefix}-h"))?;
        let client = Netns::create(&format!("{prefix}-c"))?;
        let server = Netns::create(&format!("{prefix}-s"))?;
        let topo = Self {
            server,
            client,
            host,
        };
        topo.wire()
            .with_context(|| format!("building the namespaces {prefix}-{{h,c,s}}"))?;
        Ok(topo)
    }

    fn wire(&self) -> Result<()> {
        let (h, c, s) = (&self.host, &self.client, &self.server);
        for ns in [h, c, s] {
            ns.ip(&["link", "set", "lo", "up"])?;
        }
        h.ip(&[
            "link", "add", "vcli", "type", "veth", "peer", "name", "eth0", "netns", &c.name,
        ])?;
        h.ip(&["link", "set", "vcli", "address", &mac_str(HOST_MAC)])?;
        c.ip(&["link", "set", "eth0", "address", &mac_str(CLIENT_MAC)])?;
        h.ip(&["addr", "add", &format!("{HOST_ADDR}/24"), "dev", "vcli"])?;
        c.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "eth0"])?;
        h.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        h.ip(&["link", "add", PROG_BRIDGE, "type", "bridge"])?;
        h.ip(&[
            "link", "add", "vctr", "type", "veth", "peer", "name", "eth0", "netns", &s.name,
        ])?;
        h.ip(&["link", "set", "vctr", "master", BRIDGE])?;
        h.ip(&["addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", BRIDGE])?;
        s.ip(&["addr", "add", &format!("{SERVER_ADDR}/24"), "dev", "eth0"])?;
        for (ns, dev) in [
            (h, "vcli"),
            (h, "vctr"),
            (h, BRIDGE),
            (c, "eth0"),
            (s, "eth0"),
        ] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
        c.ip(&["route", "add", "default", "via", HOST_ADDR])?;
        s.ip(&["route", "add", "default", "via", BRIDGE_ADDR])?;
        // Strict reverse-path filtering would drop the generator's random sources before
        // conntrack; a container host routes them (its default route) anyway.
        h.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.vcli.rp_filter=0",
        ])?;
        // Short connections at tens of thousands per second: the client may reuse its ports
        // (the server closes first, so TIME_WAIT sits on the server side anyway).
        c.sysctl(&[
            "net.ipv4.ip_local_port_range=1024 65535",
            "net.ipv4.tcp_tw_reuse=1",
        ])?;
        s.sysctl(&[
            "net.core.somaxconn=4096",
            "net.ipv4.tcp_max_syn_backlog=4096",
        ])?;
        Ok(())
    }
}

impl Topology {
    /// Docker's port publishing in the host namespace: DNAT of the published host ports to
    /// the server in a nat prerouting chain. A nat chain makes conntrack track every packet of
    /// the namespace, as on a container host, whichever filter is installed beside it.
    pub fn container_host(&self) -> Result<()> {
        let rules = format!(
            "table ip pgbhost {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n\
             \x20   ip daddr {HOST_ADDR} tcp dport {PUBLISHED_HTTP_PORT} dnat to {SERVER_ADDR}:80\n\
             \x20   ip daddr {HOST_ADDR} tcp dport {PUBLISHED_BLOCKED_PORT} dnat to {SERVER_ADDR}:{BLOCKED_PORT}\n  }}\n}}\n"
        );
        let mut cmd = self.host.command("nft");
        cmd.args(["-f", "-"]);
        run_with_stdin(&mut cmd, &rules).context("installing the DNAT of the published ports")
    }

    /// Entries in the host namespace's conntrack table.
    pub fn conntrack_count(&self) -> Result<u64> {
        let text = self
            .host
            .run(|| std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count"))?
            .context("reading nf_conntrack_count in the host namespace")?;
        text.trim()
            .parse()
            .context("nf_conntrack_count is not a number")
    }
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    use std::io::Write as _;
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{}`", proc::display(cmd)))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            proc::display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn mac_str(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Deletes namespaces, bpffs directories and work directories named `pgb-<pid>...` whose
/// process is gone.
pub fn reap_stale() {
    let me = std::process::id();
    for dir in ["/run/netns", "/sys/fs/bpf", "/tmp"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("pgb-")
                .and_then(|rest| rest.split(['-', '.']).next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == me || Path::new("/proc").join(pid.to_string()).exists() {
                continue;
            }
            println!("removing the leftover {dir}/{name} of an interrupted bench");
            if dir == "/run/netns" {
                let _ = Command::new("ip").args(["netns", "delete", &name]).output();
            } else {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}
