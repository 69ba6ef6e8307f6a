//! The four ways of letting traffic in that the bench compares, each installed inside a
//! cell's host namespace (iptables and nftables are per network namespace; the root
//! namespace's firewall is never touched):
//! - none: no rule at all (the ceiling);
//! - iptables: Docker's layout, FORWARD policy DROP, the conntrack ESTABLISHED shortcut first,
//!   then a DOCKER chain with one ACCEPT per published port, walked in order;
//! - nftables: one set lookup on (address, protocol, port);
//! - portgate: the real agent, its rules file written beforehand.
//!
//! N allowed (address, protocol, port) entries: N-3 decoys, then the three ports the traffic
//! uses, last in iptables' chain.
use std::{
    fmt::Write as _,
    fs,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::topo::{BRIDGE, SERVER_ADDR, Topology, run_quiet, run_timed};
use portgate_cmd as proc;

pub const HTTP_PORT: u16 = 80;
pub const IPERF_PORT: u16 = 5201;
pub const UDP_PORT: u16 = 9000;
/// Not allowed at first: the control-plane probe allows it and waits for the first datagram.
pub const PROBE_PORT: u16 = 9100;
/// Decoy ports per container address (10.99.0.2, 10.99.0.3, ...), from 10000 up.
const DECOYS_PER_ADDRESS: usize = 50_000;
const DECOY_FIRST_PORT: u16 = 10_000;
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Filter {
    None,
    Iptables,
    Nftables,
    Portgate,
}

impl Filter {
    pub const ALL: [Filter; 4] = [
        Filter::None,
        Filter::Iptables,
        Filter::Nftables,
        Filter::Portgate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Filter::None => "no filter",
            Filter::Iptables => "iptables",
            Filter::Nftables => "nftables set",
            Filter::Portgate => "portgate",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One allowed (address, protocol, port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub addr: [u8; 4],
    pub proto: Proto,
    pub port: u16,
}

impl Entry {
    fn addr_str(&self) -> String {
        let [a, b, c, d] = self.addr;
        format!("{a}.{b}.{c}.{d}")
    }
}

/// The entries the traffic uses, in the order they end the chain.
pub const USED: [(Proto, u16); 3] = [
    (Proto::Tcp, IPERF_PORT),
    (Proto::Udp, UDP_PORT),
    (Proto::Tcp, HTTP_PORT),
];

/// N entries: decoys first (container addresses 10.99.0.2, .3, ... with ports from 10000),
/// the used ones last.
pub fn entries(n: usize) -> Vec<Entry> {
    assert!(n >= USED.len(), "N must be at least {}", USED.len());
    let decoys = n - USED.len();
    let mut out: Vec<Entry> = (0..decoys)
        .map(|i| Entry {
            addr: [10, 99, 0, 2 + (i / DECOYS_PER_ADDRESS) as u8],
            proto: Proto::Tcp,
            port: DECOY_FIRST_PORT + (i % DECOYS_PER_ADDRESS) as u16,
        })
        .collect();
    out.extend(USED.iter().map(|&(proto, port)| Entry {
        addr: super::topo::SERVER_IP,
        proto,
        port,
    }));
    out
}

/// `iptables-restore` input: Docker's FORWARD layout with a DOCKER chain of N ACCEPTs.
pub fn iptables_rules(entries: &[Entry]) -> String {
    let mut text = String::with_capacity(entries.len() * 96 + 512);
    text.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    text.push_str(":DOCKER - [0:0]\n");
    text.push_str("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    let _ = writeln!(text, "-A FORWARD -o {BRIDGE} -j DOCKER");
    let _ = writeln!(text, "-A FORWARD -i {BRIDGE} ! -o {BRIDGE} -j ACCEPT");
    for entry in entries {
        let _ = writeln!(text, "{}", docker_rule(entry));
    }
    text.push_str("COMMIT\n");
    text
}

/// Docker's rule for one published port, as `iptables-save` shows it.
fn docker_rule(entry: &Entry) -> String {
    let proto = entry.proto.name();
    format!(
        "-A DOCKER -d {}/32 ! -i {BRIDGE} -o {BRIDGE} -p {proto} -m {proto} --dport {} -j ACCEPT",
        entry.addr_str(),
        entry.port
    )
}

/// `nft -f` input: one set of (address . protocol . port), looked up once per new connection.
pub fn nft_rules(entries: &[Entry]) -> String {
    let mut text = String::with_capacity(entries.len() * 32 + 512);
    text.push_str("table ip pgb {\n  set allowed {\n    type ipv4_addr . inet_proto . inet_service\n    elements = {\n");
    for (i, entry) in entries.iter().enumerate() {
        let sep = if i + 1 == entries.len() { "" } else { "," };
        let _ = writeln!(
            text,
            "      {} . {} . {}{sep}",
            entry.addr_str(),
            entry.proto.name(),
            entry.port
        );
    }
    text.push_str("    }\n  }\n  chain forward {\n    type filter hook forward priority filter; policy drop;\n");
    text.push_str("    ct state established,related accept\n");
    let _ = writeln!(
        text,
        "    iifname \"{BRIDGE}\" oifname != \"{BRIDGE}\" accept"
    );
    let _ = writeln!(
        text,
        "    oifname \"{BRIDGE}\" ip daddr . meta l4proto . th dport @allowed accept"
    );
    text.push_str("  }\n}\n");
    text
}

/// portgate's rules file (format version 1): one range rule per decoy address, one rule per
/// used port. Ranges expand to one allow-map entry per port.
pub fn portgate_rules(entries: &[Entry]) -> serde_json::Value {
    let mut rules: Vec<serde_json::Value> = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let first = entries[i];
        let mut last = first;
        while i + 1 < entries.len() {
            let next = entries[i + 1];
            if next.addr == first.addr
                && next.proto == first.proto
                && u32::from(next.port) == u32::from(last.port) + 1
            {
                last = next;
                i += 1;
            } else {
                break;
            }
        }
        rules.push(serde_json::json!({
            "id": rules.len(),
            "target": { "address": first.addr_str() },
            "ports": { "spec": {
                "protocol": first.proto.name(),
                "port_start": first.port,
                "port_end": last.port,
            }},
        }));
        i += 1;
    }
    serde_json::json!({ "version": 1, "rules": rules })
}

/// What the bench needs to install filters.
pub struct Setup {
    pub portgate: PathBuf,
    /// `iptables-nft` or `iptables-legacy`.
    pub iptables: String,
    pub work_dir: PathBuf,
}

impl Setup {
    pub fn iptables_restore(&self) -> String {
        format!("{}-restore", self.iptables)
    }
}

/// A filter installed in a cell's host namespace.
pub struct Installed {
    pub filter: Filter,
    /// Wall time until the N rules were in force (portgate: agent start until its control
    /// socket accepts, the programs attached and the allow map written).
    pub load_time: Option<Duration>,
    pub agent: Option<Agent>,
}

pub fn install(
    filter: Filter,
    n: usize,
    topo: &Topology,
    setup: &Setup,
    cell: &str,
) -> Result<Installed> {
    install_with(filter, n, topo, setup, cell, &[])
}

/// [`install`], with more arguments for `portgate agent` (`--uplink IFACE`).
pub fn install_with(
    filter: Filter,
    n: usize,
    topo: &Topology,
    setup: &Setup,
    cell: &str,
    agent_args: &[String],
) -> Result<Installed> {
    let entries = entries(n);
    let dir = setup.work_dir.join(cell);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (load_time, agent) = match filter {
        Filter::None => (None, None),
        Filter::Iptables => {
            let file = dir.join("iptables.rules");
            fs::write(&file, iptables_rules(&entries))?;
            let mut cmd = topo.host.command(setup.iptables_restore());
            cmd.arg(&file);
            (Some(run_timed(&mut cmd)?), None)
        }
        Filter::Nftables => {
            let file = dir.join("nftables.rules");
            fs::write(&file, nft_rules(&entries))?;
            let mut cmd = topo.host.command("nft");
            cmd.arg("-f").arg(&file);
            (Some(run_timed(&mut cmd)?), None)
        }
        Filter::Portgate => {
            let state = dir.join("state");
            fs::create_dir_all(&state)?;
            fs::write(
                state.join("rules.json"),
                serde_json::to_vec_pretty(&portgate_rules(&entries))?,
            )?;
            let bpffs = PathBuf::from(format!("/sys/fs/bpf/{cell}"));
            let agent = Agent::start(topo, setup, &dir, &bpffs, BRIDGE, None, agent_args)?;
            let load = agent.started_in;
            let used = agent.allow_entries(setup)?;
            if used != n {
                bail!("the agent reports {used} allow-map entries, expected {n}");
            }
            (Some(load), Some(agent))
        }
    };
    Ok(Installed {
        filter,
        load_time,
        agent,
    })
}

impl Installed {
    /// Allows PROBE_PORT/udp the way a user of this filter would; returns when the command
    /// has finished.
    pub fn allow_probe_port(&self, topo: &Topology, setup: &Setup) -> Result<()> {
        let entry = Entry {
            addr: super::topo::SERVER_IP,
            proto: Proto::Udp,
            port: PROBE_PORT,
        };
        let mut cmd = match self.filter {
            Filter::None => bail!("nothing to allow without a filter"),
            Filter::Iptables => {
                // Docker appends one rule per published port.
                let mut cmd = topo.host.command(&setup.iptables);
                let rule = docker_rule(&entry);
                cmd.args(rule.split(' '));
                cmd
            }
            Filter::Nftables => {
                let mut cmd = topo.host.command("nft");
                cmd.args([
                    "add",
                    "element",
                    "ip",
                    "pgb",
                    "allowed",
                    &format!("{{ {SERVER_ADDR} . udp . {PROBE_PORT} }}"),
                ]);
                cmd
            }
            Filter::Portgate => {
                let agent = self.agent.as_ref().context("no agent")?;
                let mut cmd = std::process::Command::new(&setup.portgate);
                cmd.arg("--socket").arg(&agent.socket).args([
                    "allow",
                    SERVER_ADDR,
                    &format!("{PROBE_PORT}/udp"),
                ]);
                cmd
            }
        };
        run_timed(&mut cmd).map(drop)
    }

    pub fn command_line(filter: Filter, setup: &Setup) -> String {
        match filter {
            Filter::None => String::new(),
            Filter::Iptables => format!(
                "{} -A DOCKER -d {SERVER_ADDR}/32 ! -i {BRIDGE} -o {BRIDGE} -p udp -m udp --dport {PROBE_PORT} -j ACCEPT",
                setup.iptables
            ),
            Filter::Nftables => {
                format!("nft add element ip pgb allowed {{ {SERVER_ADDR} . udp . {PROBE_PORT} }}")
            }
            Filter::Portgate => format!("portgate allow {SERVER_ADDR} {PROBE_PORT}/udp"),
        }
    }
}

/// A `portgate agent` running in a cell's host namespace; stopped (SIGTERM) on drop, and its
/// bpffs directory removed.
pub struct Agent {
    child: Option<Child>,
    pub pid: u32,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    log: PathBuf,
    pub started_in: Duration,
}

impl Agent {
    /// Starts the agent on `bridge` and waits until its control socket accepts.
    pub fn start(
        topo: &Topology,
        setup: &Setup,
        dir: &Path,
        bpffs: &Path,
        bridge: &str,
        max_flows: Option<u32>,
        extra: &[String],
    ) -> Result<Self> {
        let socket = dir.join("portgate.sock");
        let log = dir.join("agent.log");
        let log_file = fs::File::create(&log)?;
        let mut cmd = topo.host.command(&setup.portgate);
        cmd.arg("--socket")
            .arg(&socket)
            .args(["agent", "--bridge", bridge])
            .args(["--no-netfilter", "--metrics-addr", "off"]);
        // No engine, unless the caller brings one (the flood cells' fake Docker).
        if !extra.iter().any(|a| a == "--runtime") {
            cmd.args(["--runtime", "none"]);
        }
        cmd.arg("--bpffs")
            .arg(bpffs)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        if let Some(flows) = max_flows {
            cmd.args(["--max-flows", &flows.to_string()]);
        }
        cmd.args(extra);
        let start = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting `{}`", proc::display(&cmd)))?;
        let mut agent = Self {
            pid: child.id(),
            child: Some(child),
            socket,
            bpffs: bpffs.to_owned(),
            log,
            started_in: Duration::ZERO,
        };
        loop {
            if UnixStream::connect(&agent.socket).is_ok() {
                agent.started_in = start.elapsed();
                return Ok(agent);
            }
            if let Some(child) = agent.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("the agent exited ({status}): {}", agent.log_tail());
            }
            if start.elapsed() > AGENT_READY_TIMEOUT {
                bail!(
                    "the agent was not ready within {AGENT_READY_TIMEOUT:?}: {}",
                    agent.log_tail()
                );
            }
            proc::check_interrupted()?;
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// `portgate status --json`.
    pub fn status(&self, setup: &Setup) -> Result<serde_json::Value> {
        let mut cmd = std::process::Command::new(&setup.portgate);
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(["status", "--json"]);
        let out = run_quiet(&mut cmd)?;
        serde_json::from_str(&out.stdout).context("parsing `portgate status --json`")
    }

    /// `allow_entries.used` of `portgate status --json`.
    pub fn allow_entries(&self, setup: &Setup) -> Result<usize> {
        let status = self.status(setup)?;
        status["allow_entries"]["used"]
            .as_u64()
            .map(|n| n as usize)
            .context("`portgate status --json` has no allow_entries.used")
    }

    /// The agent's resident memory, in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS in /proc/PID/status")
    }

    /// Stops the agent (SIGTERM; the programs stay pinned and attached).
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the agent did not stop within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
        // Removing the pins releases the links (and with them the programs) and the maps.
        // Never `portgate uninstall` here: it also removes delegation rules from the firewall
        // of whichever namespace it runs in.
        let _ = fs::remove_dir_all(&self.bpffs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_ports_come_last_and_n_is_exact() {
        for n in [3, 10, 1000, 100_000] {
            let e = entries(n);
            assert_eq!(e.len(), n);
            assert_eq!(e[n - 1].port, HTTP_PORT);
        }
        let e = entries(100_000);
        assert_eq!(e[0].addr, [10, 99, 0, 2]);
        assert_eq!(e[60_000].addr, [10, 99, 0, 3]);
    }

    #[test]
    fn portgate_rules_merge_ranges() {
        let rules = portgate_rules(&entries(100_000));
        let rules = rules["rules"].as_array().expect("rules");
        // Two decoy ranges, three used ports.
        assert_eq!(rules.len(), 5);
        assert_eq!(rules[0]["ports"]["spec"]["port_end"], 59_999);
        let total: u64 = rules
            .iter()
            .map(|r| {
                let spec = &r["ports"]["spec"];
                spec["port_end"].as_u64().unwrap_or(0) - spec["port_start"].as_u64().unwrap_or(0)
                    + 1
            })
            .sum();
        assert_eq!(total, 100_000);
    }

    #[test]
    fn rules_files_have_one_line_per_entry() {
        let e = entries(10);
        assert_eq!(iptables_rules(&e).matches("-A DOCKER").count(), 10);
        let nft = nft_rules(&e);
        assert_eq!(
            nft.lines()
                .filter(|l| l.trim_start().starts_with("10.99."))
                .count(),
            10
        );
        assert!(iptables_rules(&e).contains("--dport 80 -j ACCEPT\nCOMMIT"));
    }
}
