//! How much of the machine something other than the bench used during a measurement: on a
//! shared 2-CPU machine, a compiler starting next door halves every figure, so each cell
//! records this and the bench measures a disturbed cell again.
//!
//! Foreign CPU = busy time of all CPUs (/proc/stat: user, nice, system, irq, softirq)
//! − the bench's own (its threads and its reaped children: wrk, iperf3, the agent, ...)
//! − ksoftirqd (packet processing the bench's traffic pushed out of its own context).
//! Tick-sampled, so only a rough figure, good enough to tell a quiet machine from a busy one.
//! Hypervisor steal time is reported apart.
use std::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    at: Instant,
    busy_secs: f64,
    steal_secs: f64,
    ours_secs: f64,
    softirqd_secs: f64,
}

/// Shares of the whole machine (all CPUs) during an interval.
#[derive(Clone, Copy, Debug, Default)]
pub struct Share {
    pub foreign: f64,
    pub steal: f64,
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

fn rusage_secs(who: libc::c_int) -> f64 {
    // SAFETY: `rusage` is plain integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into the struct we pass.
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// utime + stime of every ksoftirqd thread, in seconds.
pub fn softirqd_secs() -> f64 {
    softirqd_secs_at(ticks_per_sec())
}

fn softirqd_secs_at(hz: f64) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut total = 0.0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..." — comm may hold spaces, so split after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.contains("(ksoftirqd/") {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the comm: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
        let field = |i: usize| {
            fields
                .get(i - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        total += (field(14) + field(15)) / hz;
    }
    total
}

impl Snapshot {
    pub fn age(&self) -> std::time::Duration {
        self.at.elapsed()
    }
}

pub fn snapshot() -> Snapshot {
    let hz = ticks_per_sec();
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let at = |i: usize| cpu.get(i).copied().unwrap_or(0.0) / hz;
    // user nice system idle iowait irq softirq steal
    Snapshot {
        at: Instant::now(),
        busy_secs: at(0) + at(1) + at(2) + at(5) + at(6),
        steal_secs: at(7),
        ours_secs: rusage_secs(libc::RUSAGE_SELF) + rusage_secs(libc::RUSAGE_CHILDREN),
        softirqd_secs: softirqd_secs_at(hz),
    }
}

pub fn share(before: &Snapshot, after: &Snapshot) -> Share {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let capacity = after.at.duration_since(before.at).as_secs_f64() * cpus;
    if capacity <= 0.0 {
        return Share::default();
    }
    let foreign = (after.busy_secs - before.busy_secs)
        - (after.ours_secs - before.ours_secs)
        - (after.softirqd_secs - before.softirqd_secs);
    Share {
        foreign: (foreign / capacity).clamp(0.0, 1.0),
        steal: ((after.steal_secs - before.steal_secs) / capacity).clamp(0.0, 1.0),
    }
}
