//! The gate's cost in the real data path: the kernel's own run-time statistics of the two
//! programs (BPF_ENABLE_STATS, held only for this diagnostic cell, so it never slows down the
//! measured ones), read around each load. Divided by the connections or datagrams the load
//! carried, it says how many nanoseconds of CPU the gate adds to each, which the data-path
//! ratios can be checked against. The statistics add two clock reads to every run.
use std::{
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};
use gate_common::program_names;
use portgate_bpf_sys::sys_bpf;

use super::{
    Plan, WRK_CONNECTIONS, WRK_THREADS,
    filters::{self, Filter, Setup},
    report::Metric,
    test_run::obj_get,
    topo::Topology,
    traffic,
};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;
/// Offsets of run_time_ns and run_cnt in the kernel's struct bpf_prog_info.
const RUN_TIME_OFFSET: usize = 192;
const RUN_CNT_OFFSET: usize = 200;
const PROG_INFO_LEN: usize = 232;

#[repr(C)]
#[derive(Default)]
struct EnableStatsAttr {
    kind: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Run-time statistics stay on while the returned descriptor is open.
fn enable_stats() -> Result<OwnedFd> {
    let mut attr = EnableStatsAttr {
        kind: BPF_STATS_RUN_TIME,
    };
    let fd = sys_bpf(BPF_ENABLE_STATS, &mut attr).context("BPF_ENABLE_STATS")?;
    // SAFETY: BPF_ENABLE_STATS returned a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// (run_time_ns, run_cnt) of a program.
fn run_stats(prog: &OwnedFd) -> Result<(u64, u64)> {
    let mut info = [0u8; PROG_INFO_LEN];
    let mut attr = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: PROG_INFO_LEN as u32,
        info: info.as_mut_ptr() as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    let word = |at: usize| {
        let mut b = [0u8; size_of::<u64>()];
        b.copy_from_slice(&info[at..at + 8]);
        u64::from_ne_bytes(b)
    };
    Ok((word(RUN_TIME_OFFSET), word(RUN_CNT_OFFSET)))
}

/// One load's share of the gate: runs of each program and their average time.
#[derive(Clone, Debug)]
pub struct InPath {
    /// The data-path figure this load is.
    pub metric: Metric,
    /// Connections (wrk), megabytes (iperf3) or datagrams (UDP) the load carried.
    pub units: f64,
    pub unit: &'static str,
    /// (program, runs, average ns per run)
    pub programs: Vec<(&'static str, u64, f64)>,
}

impl InPath {
    /// Nanoseconds of gate per unit (connection or datagram).
    pub fn ns_per_unit(&self) -> f64 {
        let total: f64 = self
            .programs
            .iter()
            .map(|(_, runs, ns)| *runs as f64 * ns)
            .sum();
        if self.units > 0.0 {
            total / self.units
        } else {
            f64::NAN
        }
    }
}

pub fn measure(plan: &Plan, setup: &Setup, cell: &str, n: usize) -> Result<Vec<InPath>> {
    let topo = Topology::create(cell)?;
    // As the measured cells of the main tables: a container host, conntrack on.
    topo.container_host()?;
    let servers = traffic::Servers::start(&topo)?;
    let installed = filters::install(Filter::Portgate, n, &topo, setup, cell)?;
    let bpffs = &installed.agent.as_ref().context("no agent")?.bpffs;
    let root = Path::new(bpffs)
        .join(gate_common::LAYOUT_VERSION)
        .join("programs");
    let progs = [
        program_names::TOWARD_CONTAINERS,
        program_names::FROM_CONTAINERS,
    ]
    .map(|name| obj_get(&root.join(name)).map(|fd| (name, fd)));
    let progs: Vec<(&'static str, OwnedFd)> = progs.into_iter().collect::<Result<_>>()?;
    // Let the first connection's neighbour resolution happen outside the measured loads.
    let _ = traffic::http_get_once(&topo, filters::HTTP_PORT, Duration::from_secs(2))?;
    let stats = enable_stats()?;
    let snapshot =
        || -> Result<Vec<(u64, u64)>> { progs.iter().map(|(_, fd)| run_stats(fd)).collect() };
    let diff = |before: &[(u64, u64)], after: &[(u64, u64)]| -> Vec<(&'static str, u64, f64)> {
        progs
            .iter()
            .zip(before.iter().zip(after))
            .map(|((name, _), (b, a))| {
                let runs = a.1 - b.1;
                let ns = if runs > 0 {
                    (a.0 - b.0) as f64 / runs as f64
                } else {
                    f64::NAN
                };
                (*name, runs, ns)
            })
            .collect()
    };
    let mut out = Vec::new();

    let before = snapshot()?;
    let wrk = traffic::wrk(
        &topo,
        &traffic::wrk_args(WRK_THREADS, WRK_CONNECTIONS, plan.wrk_secs),
        plan.wrk_secs,
    )?;
    let after = snapshot()?;
    out.push(InPath {
        metric: Metric::Cps,
        units: wrk.requests_per_sec * f64::from(plan.wrk_secs),
        unit: "connection",
        programs: diff(&before, &after),
    });

    let before = snapshot()?;
    let gbps = traffic::iperf(
        &topo,
        &traffic::iperf_args(plan.iperf_secs),
        plan.iperf_secs,
    )?;
    let after = snapshot()?;
    out.push(InPath {
        metric: Metric::Tput,
        units: gbps * 1e9 / 8.0 * f64::from(plan.iperf_secs) / 1e6,
        unit: "MB",
        programs: diff(&before, &after),
    });

    let before = snapshot()?;
    let sink_before = servers
        .sink
        .received
        .load(std::sync::atomic::Ordering::Relaxed);
    let flood = traffic::udp_flood(&topo, &servers.sink, plan.udp)?;
    let after = snapshot()?;
    let delivered = servers
        .sink
        .received
        .load(std::sync::atomic::Ordering::Relaxed)
        - sink_before;
    let _ = flood;
    out.push(InPath {
        metric: Metric::Udp,
        units: delivered as f64,
        unit: "datagram",
        programs: diff(&before, &after),
    });
    drop(stats);
    drop(progs);
    drop(installed);
    drop(servers);
    drop(topo);
    let _ = std::fs::remove_dir_all(setup.work_dir.join(cell));
    Ok(out)
}
