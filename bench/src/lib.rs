//! The bench behind `cargo xtask bench [--quick]`: portgate against what users would pick instead, on the same
//! machine in the same run: no filter (the ceiling), iptables (Docker's DOCKER chain, one
//! ACCEPT per published port, with the conntrack ESTABLISHED shortcut), an nftables set, and
//! portgate, for N allowed ports.
//!
//! Each measured cell (repeat, N, filter, mode) gets a fresh namespace topology (see [`topo`]):
//! the filter is installed in its host namespace, real servers run in the server namespace, real
//! load generators in the client namespace. In the container-host mode, the one the goals are
//! about, the host namespace publishes ports with DNAT as Docker does, so conntrack tracks
//! every variant, "no filter" and portgate included; the bare mode (no netfilter at all, no
//! conntrack) is measured for no filter and portgate as a second table. Cells are interleaved: every repeat walks all N,
//! and for each N all filters in an order rotated per repeat and N, so slow drifts of this
//! shared machine spread over all filters alike. Figures are medians with their range.
//!
//! `--flood` (and every full run, after the rest): allowed new connections with and without a
//! SYN flood to a published port that no rule allows, see [`flood`].
//!
//! Writes `benchmarks.md` and `benchmarks.svg` (docs/ for a full run, the target directory's
//! bench/ for `--quick`, or `--out DIR`). Everything it creates is named `pgb-<pid>-...` and
//! removed at the end, on errors and on Ctrl-C; a killed run's leftovers are removed by the
//! next one.
mod cell;
mod engine;
mod filters;
mod flood;
mod measure;
mod noise;
mod report;
mod run_time_stats;
mod test_run;
mod topo;
mod traffic;

use cell::{DISTURBED, MAX_ATTEMPTS, Mode, Outcome, Pacer, QUIET, run_cell};
use measure::{CELLS, data_path, floods, program_cost};

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use self::{
    filters::{Filter, Installed, Setup},
    report::{Meta, Metric, Results, Sample},
    topo::Topology,
};
use portgate_cmd as proc;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// The CI variant: N in {10, 1000}, 2 repeats of 1-second measurements, no flood, under 4
    /// minutes. Writes to <target>/bench/ unless --out is given (docs/ keeps the full run's
    /// results).
    #[arg(long)]
    pub quick: bool,
    /// Only the SYN-flood figures (every full run includes them after the rest; --quick
    /// leaves them out unless given both): allowed new connections with and without a flood
    /// to a blocked published port, CPU per flood SYN, the conntrack table's fill.
    #[arg(long)]
    pub flood: bool,
    /// Interleaved repeats of every measurement [default: 4, --quick: 2].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeats: Option<u32>,
    /// Values of N, comma-separated [default: 10,1000,10000,100000; --quick: 10,1000].
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub n: Vec<usize>,
    /// Directory for benchmarks.md and benchmarks.svg [default: docs/; --quick: <target>/bench].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The iptables backend of the Docker-style chain (Debian 12's `iptables` is nft).
    #[arg(long, value_enum, default_value_t = IptablesBackend::Nft)]
    pub iptables: IptablesBackend,
    /// Time budget in minutes [default: 35; --quick: 3.3]: the bench waits for a quieter
    /// machine and measures disturbed cells again only while the rest still fits in it.
    #[arg(long, value_name = "MIN")]
    pub budget: Option<f64>,
    /// Use this portgate binary instead of building target/release/portgate.
    #[arg(long, value_name = "PATH")]
    pub portgate: Option<PathBuf>,
    /// Only the program's own cost per packet (BPF_PROG_TEST_RUN), printed, no report
    /// written: a minute's check while changing the kernel programs.
    #[arg(long, conflicts_with = "flood")]
    pub program_cost: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IptablesBackend {
    Nft,
    Legacy,
}

/// Durations and sizes of one run.
struct Plan {
    quick: bool,
    ns: Vec<usize>,
    repeats: usize,
    wrk_secs: u32,
    iperf_secs: u32,
    udp: Duration,
    prog_samples: usize,
    /// Length of each load of a flood cell, and the flood cells per variant.
    flood_secs: u32,
    flood_repeats: usize,
    /// Whether this run measures the data path (not `--flood` alone) and the flood.
    data_path: bool,
    flood: bool,
    /// The whole run (after the build) must finish within this.
    budget: Duration,
}

const WRK_THREADS: u32 = 1;
const WRK_CONNECTIONS: u32 = 32;
const FULL_NS: [usize; 4] = [10, 1_000, 10_000, 100_000];
const QUICK_NS: [usize; 2] = [10, 1_000];
/// Tools the bench runs (setup installs them).
const TOOLS: [(&str, &str); 6] = [
    ("ip", "iproute2"),
    ("wrk", "wrk"),
    ("iperf3", "iperf3"),
    ("nft", "nftables"),
    ("iptables-nft-restore", "iptables"),
    ("iptables-legacy-restore", "iptables"),
];

impl Plan {
    fn new(args: &BenchArgs) -> Result<Self> {
        let ns = if !args.n.is_empty() {
            args.n.clone()
        } else if args.quick {
            QUICK_NS.to_vec()
        } else {
            FULL_NS.to_vec()
        };
        if let Some(bad) = ns
            .iter()
            .find(|&&n| !(filters::USED.len()..=200_000).contains(&n))
        {
            bail!("N={bad}: choose N from {} to 200000", filters::USED.len());
        }
        let mut ns = ns;
        ns.sort_unstable();
        ns.dedup();
        let default_repeats = if args.quick { 2 } else { 4 };
        Ok(Self {
            quick: args.quick,
            repeats: args.repeats.map_or(default_repeats, |r| r as usize),
            wrk_secs: if args.quick { 1 } else { 3 },
            iperf_secs: if args.quick { 1 } else { 3 },
            udp: Duration::from_secs(if args.quick { 1 } else { 2 }),
            prog_samples: if args.quick { 1_000 } else { 4_000 },
            flood_secs: if args.quick { 1 } else { 2 },
            flood_repeats: args
                .repeats
                .map_or(if args.quick { 1 } else { 2 }, |r| r as usize),
            data_path: !args.flood,
            flood: args.flood || !args.quick,
            budget: match args.budget {
                Some(min) if min > 0.0 => Duration::from_secs_f64(min * 60.0),
                _ => Duration::from_secs(if args.quick { 200 } else { 35 * 60 }),
            },
            ns,
        })
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !proc::is_root() {
        bail!(
            "the bench needs root: it creates network namespaces, installs firewall rules in them and loads eBPF programs"
        );
    }
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| which(tool).is_none())
        .map(|(tool, package)| format!("{tool} (apt package {package})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {}; run `cargo xtask setup`",
            missing.join(", ")
        );
    }
    let plan = Plan::new(&args)?;
    let portgate = match &args.portgate {
        Some(path) => path.clone(),
        None => {
            heading("building portgate (release)");
            proc::run(proc::cargo().args(["build", "--release", "--package", "gate-user"]))?;
            proc::target_dir()?.join("release/portgate")
        }
    };
    if !portgate.is_file() {
        bail!("no portgate binary at {}", portgate.display());
    }
    let out_dir = match &args.out {
        Some(dir) => dir.clone(),
        None if plan.quick => proc::target_dir()?.join("bench"),
        None => proc::workspace_root().join("docs"),
    };

    proc::catch_signals();
    topo::reap_stale();
    raise_nofile_limit();
    let pid = std::process::id();
    let work_dir = PathBuf::from(format!("/tmp/pgb-{pid}"));
    let _work_guard = RemoveDir(work_dir.clone());
    std::fs::create_dir_all(&work_dir)?;
    let setup = Setup {
        portgate,
        iptables: match args.iptables {
            IptablesBackend::Nft => "iptables-nft".into(),
            IptablesBackend::Legacy => "iptables-legacy".into(),
        },
        work_dir,
    };

    let started = Instant::now();
    if args.program_cost {
        let mut pacer = Pacer::new(started, plan.budget, 0);
        return program_cost(&plan, &setup, &mut Results::default(), &mut pacer);
    }
    let mut results = measure(&plan, &setup, started)?;

    results.meta = meta(&plan, &setup, started.elapsed());
    let (md, svg) = report::write(&results, &out_dir, "benchmarks")?;
    heading("result");
    println!("wrote {} and {}", md.display(), svg.display());
    let text = std::fs::read_to_string(&md)?;
    if let Some(goals) = text.split("## Goals").nth(1) {
        println!(
            "Goals{}",
            goals.split("## How it is measured").next().unwrap_or("")
        );
    }
    println!(
        "bench took {:.1} min",
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

/// Everything the run measures, within the plan's time budget.
fn measure(plan: &Plan, setup: &Setup, started: Instant) -> Result<Results> {
    let mut results = Results::default();
    let data_cells = if plan.data_path {
        plan.repeats * plan.ns.len() * CELLS.len()
    } else {
        0
    };
    let cells = data_cells
        + if plan.flood {
            plan.flood_repeats * flood::Variant::all(setup).len()
        } else {
            0
        };
    let mut pacer = Pacer::new(started, plan.budget, cells);
    if plan.data_path {
        data_path(plan, setup, &mut results, &mut pacer)?;
    }
    if plan.flood {
        floods(plan, setup, &mut results, &mut pacer)?;
    }
    Ok(results)
}

fn meta(plan: &Plan, setup: &Setup, elapsed: Duration) -> Meta {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let out = |program: &str, args: &[&str]| {
        proc::output_if_ok(program, args)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_owned())
        .unwrap_or_default();
    let root = proc::workspace_root();
    let root = root.to_string_lossy();
    let commit = out("git", &["-C", &root, "rev-parse", "--short", "HEAD"]);
    let dirty = !out(
        "git",
        &["-C", &root, "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty();
    let wrk_args = traffic::wrk_args(WRK_THREADS, WRK_CONNECTIONS, plan.wrk_secs).join(" ");
    let n_max = plan.ns.last().copied().unwrap_or(0);
    Meta {
        date: out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine: format!("{cpus} × {model}, {mem_gib:.0} GiB, {os} (a shared VM: expect noise)"),
        kernel: out("uname", &["-r"]),
        commit: format!("{commit}{}", if dirty { " (with uncommitted changes)" } else { "" }),
        mode: if plan.quick { "quick".into() } else { "full".into() },
        repeats: plan.repeats,
        ns: plan.ns.clone(),
        elapsed_secs: elapsed.as_secs_f64(),
        tools: vec![
            traffic::tool_version("wrk", "-v"),
            traffic::tool_version("iperf3", "--version"),
            traffic::tool_version(&setup.iptables, "--version"),
            traffic::tool_version("nft", "--version"),
        ],
        commands: vec![
            ("the whole bench".into(), format!("cargo xtask bench{}", if plan.quick { " --quick" } else { "" })),
            ("new TCP connections (client ns; a 4-thread HTTP/1.0 server of the bench in the server ns)".into(), format!("wrk {}", quote_args(&wrk_args))),
            ("TCP throughput (client ns; `iperf3 -s -B 10.99.0.2` in the server ns)".into(), format!("iperf3 {}", traffic::iperf_args(plan.iperf_secs).join(" "))),
            ("container host (host ns)".into(), format!("nft -f -   # table ip pgbhost {{ chain prerouting {{ type nat hook prerouting priority dstnat; ip daddr 10.98.0.1 tcp dport {} dnat to 10.99.0.2:80; ip daddr 10.98.0.1 tcp dport {} dnat to 10.99.0.2:{} }} }}", topo::PUBLISHED_HTTP_PORT, topo::PUBLISHED_BLOCKED_PORT, topo::BLOCKED_PORT)),
            ("new TCP connections through DNAT (client ns)".into(), format!("wrk {}", quote_args(&traffic::wrk_dnat_args(WRK_THREADS, WRK_CONNECTIONS, plan.wrk_secs).join(" ")))),
            ("SYN flood (client ns, the bench's raw frame generator)".into(), format!("AF_PACKET frames on eth0 to {} (the host's link) or {} (the control), TCP SYN to 10.98.0.1:{}, sources: 10.98.0.2 with ports cycled, or random from 198.18.0.0/15; flood cells {} s per load, N={}; portgate: agent ... --runtime docker --docker-socket DIR/docker.sock (the bench's fake engine) [--uplink vcli]", topo::mac_str(topo::HOST_MAC), topo::mac_str(topo::FOREIGN_MAC), topo::PUBLISHED_BLOCKED_PORT, plan.flood_secs, flood::FLOOD_N)),
            ("UDP (the bench's own flood and sink)".into(), format!("{} flows, {}-byte payloads (64-byte frames), {} s, at most 20 M datagrams; the sink answers each flow's first datagram", traffic::UDP_FLOWS, 18, plan.udp.as_secs())),
            ("iptables (host ns)".into(), format!("{}-restore rules   # FORWARD policy DROP; -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT; -o pgbr0 -j DOCKER; DOCKER: N x '-d ADDR/32 ! -i pgbr0 -o pgbr0 -p tcp -m tcp --dport P -j ACCEPT'", setup.iptables)),
            ("nftables (host ns)".into(), "nft -f rules   # set allowed { type ipv4_addr . inet_proto . inet_service; N elements }; forward: policy drop; ct state established,related accept; oifname pgbr0 ip daddr . meta l4proto . th dport @allowed accept".into()),
            ("portgate (host ns, entered with setns; rules.json written first)".into(), "portgate agent --bridge pgbr0 --runtime none --no-netfilter --metrics-addr off --bpffs /sys/fs/bpf/pgb-PID-CELL --state-dir DIR/state --socket DIR/portgate.sock".into()),
            ("allow → first packet".into(), format!("{}\nnft add element ip pgb allowed {{ 10.99.0.2 . udp . 9100 }}\nportgate allow 10.99.0.2 9100/udp", Installed::command_line(Filter::Iptables, setup))),
            ("program cost (agent with a larger flow table on a bridge without traffic, then stopped)".into(), format!("portgate agent --bridge pgbr1 --max-flows {} ...; BPF_PROG_TEST_RUN on the pinned toward_containers program", test_run::PROG_FLOW_CAPACITY)),
        ],
        notes: vec![
            "Topology of the end-to-end tests, built anew for every cell: client namespace 10.98.0.2 → host namespace 10.98.0.1 (routes; the filter under test) → bridge pgbr0 10.99.0.1 → server namespace 10.99.0.2. Traffic from the client is forwarded by the host and leaves through the bridge, as traffic from outside to a published container port does.".into(),
            format!("N allowed entries: N−3 decoys (TCP ports from 10000 on 10.99.0.2, then 10.99.0.3, ...), then the three the traffic uses ({}/tcp iperf3, {}/udp flood, {}/tcp HTTP), last in iptables' DOCKER chain. portgate gets them as range rules in its rules file, which expand to one allow-map entry per port. N={} means {} iptables rules.", filters::IPERF_PORT, filters::UDP_PORT, filters::HTTP_PORT, n_max, n_max),
            format!("Container host (the main tables and the goals): the host namespace publishes ports as Docker does, with DNAT in a nat prerouting chain (10.98.0.1:{} → 10.99.0.2:80, and 10.98.0.1:{} → 10.99.0.2:{}, a published port no filter allows). A nat chain makes conntrack track every packet in that namespace, for every filter, no filter and portgate included; each cell checks that the conntrack table has entries after the first load. The traffic goes to the container's address (as from a routed network or another host's overlay) except \"new TCP connections/s through DNAT\", which connects to the published host port. Bare (the second table): no netfilter rule at all in the host namespace, so no conntrack (checked: the table stays empty), for no filter and portgate only (iptables and nftables need conntrack).", topo::PUBLISHED_HTTP_PORT, topo::PUBLISHED_BLOCKED_PORT, topo::BLOCKED_PORT),
            "Many new UDP flows: the bench's raw frame generator (AF_PACKET on the client's link, sendmmsg batches of 64, real checksums) sends 18-byte datagrams to the allowed UDP port, each from a source (address in 198.18.0.0/15, port) no earlier datagram of the run used, so every datagram is a new flow for conntrack and for the gate; the sink does not answer them. The conntrack table (nf_conntrack_max entries) fills within seconds, after which the kernel evicts unreplied entries to make room (early drop), as it would on a host under such a load.".into(),
            "Each cell checks first that the HTTP server answers through the filter and that a connection to a port the filter does not allow is dropped (times out).".into(),
            "Cells are interleaved: each repeat walks every N, and for each N every filter, in an order rotated per repeat and N. The machine is a shared 2-CPU VM: load generator, servers and forwarding share the two CPUs, so absolute figures are low and noisy; compare within a row.".into(),
            "Load time: iptables-restore / nft -f wall time; portgate: from starting the agent to its control socket accepting (it loads and verifies the programs, attaches them and writes the allow map first).".into(),
            "Load generators (wrk, the iperf3 client, the UDP flood) are pinned to CPU 0 and the servers (the HTTP server, iperf3 -s, the UDP sink) to CPU 1, so the scheduler does not shuffle them; the forwarding of each direction runs in softirq on the sending side's CPU.".into(),
            format!("Other load: before each cell the bench waits (within its time budget) until other processes use under {:.0} % of the machine, and measures a cell again when they used more than {:.0} % of it during the cell (at most {} attempts, while the budget allows); the header says how much other load the kept cells saw.", QUIET * 100.0, DISTURBED * 100.0, MAX_ATTEMPTS),
            "iptables is Debian 12's default backend, iptables-nft, as Docker uses it there (`--iptables legacy` measures the x_tables backend instead).".into(),
        ],
    }
}

fn quote_args(args: &str) -> String {
    args.replace("Connection: close", "'Connection: close'")
}

/// A bar over the data-path cells on stderr; hidden when stderr is not a terminal (CI logs
/// keep the one line per cell printed above it).
fn progress_bar(cells: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(cells);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} cells  {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn heading(title: &str) {
    println!("\n==================== bench: {title} ====================");
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// The flood opens thousands of sockets.
fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
