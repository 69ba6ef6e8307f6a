//! One cell of the bench: a filter and a load, measured while the machine is quiet enough
//! (the pacer), repeated when it was disturbed.

use super::*;

/// A cell is measured again when other processes used more than this share of the machine.
pub(crate) const DISTURBED: f64 = 0.10;
/// Before a cell, wait (within the time budget) while other processes use more than this.
pub(crate) const QUIET: f64 = 0.10;
pub(crate) const MAX_ATTEMPTS: usize = 3;

/// Keeps the run within its time budget: waits for a quiet machine and measures disturbed
/// cells again only while the remaining cells still fit.
pub(crate) struct Pacer {
    pub(crate) started: Instant,
    pub(crate) budget: Duration,
    pub(crate) cells: usize,
    pub(crate) done: usize,
    pub(crate) cell_times: Vec<Duration>,
    pub(crate) waited: Duration,
}

impl Pacer {
    pub(crate) fn new(started: Instant, budget: Duration, cells: usize) -> Self {
        Self {
            started,
            budget,
            cells,
            done: 0,
            cell_times: Vec::new(),
            waited: Duration::ZERO,
        }
    }

    pub(crate) fn cell_took(&mut self, took: Duration) {
        self.cell_times.push(took);
    }

    pub(crate) fn mean_cell(&self) -> Duration {
        if self.cell_times.is_empty() {
            return Duration::from_secs(10);
        }
        self.cell_times.iter().sum::<Duration>() / self.cell_times.len() as u32
    }

    pub(crate) fn remaining_estimate(&self) -> Duration {
        self.mean_cell() * (self.cells - self.done) as u32
    }

    /// Time left after the remaining cells (and half a minute for the report).
    pub(crate) fn slack(&self) -> Duration {
        self.budget
            .saturating_sub(self.started.elapsed())
            .saturating_sub(self.remaining_estimate())
            .saturating_sub(Duration::from_secs(30))
    }

    pub(crate) fn can_redo(&self) -> bool {
        self.slack() > self.mean_cell()
    }

    /// Waits in half-second steps while other processes keep the machine busy, as long as the
    /// budget allows.
    pub(crate) fn wait_for_quiet(&mut self) -> Result<()> {
        let mut told = false;
        loop {
            let before = noise::snapshot();
            proc::sleep(Duration::from_millis(500))?;
            let share = noise::share(&before, &noise::snapshot());
            if share.foreign <= QUIET || self.slack() < Duration::from_secs(1) {
                return Ok(());
            }
            if !told {
                println!(
                    "  waiting for a quieter machine: other processes use {:.0} % of it",
                    share.foreign * 100.0
                );
                told = true;
            }
            self.waited += Duration::from_millis(500);
        }
    }
}

/// Whether a cell's host namespace is a container host (DNAT, so conntrack) or bare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Host,
    Bare,
}

impl Mode {
    pub(crate) fn label(self, filter: Filter) -> String {
        match self {
            Mode::Host => filter.label().to_owned(),
            Mode::Bare => format!("{}, bare", filter.label()),
        }
    }
}

/// What one cell measured.
#[derive(Default)]
pub(crate) struct Outcome {
    pub(crate) cps: f64,
    /// New connections per second through the published port (DNAT); container host only.
    pub(crate) dnat_cps: Option<f64>,
    pub(crate) wrk_errors: u64,
    pub(crate) udp: traffic::FloodResult,
    pub(crate) udp_new: Option<traffic::FloodResult>,
    pub(crate) tput_gbps: f64,
    pub(crate) load: Option<Duration>,
    pub(crate) allow_first: Option<Duration>,
    pub(crate) allow_cmd: Option<Duration>,
    pub(crate) rss_kib: Option<u64>,
}

impl Outcome {
    pub(crate) fn summary(&self) -> String {
        let mut s = format!(
            "{:>7.0} conn/s  {:>8.0} dgram/s  {:>5.1} Gbit/s",
            self.cps, self.udp.delivered_per_sec, self.tput_gbps
        );
        if let Some(dnat) = self.dnat_cps {
            s.push_str(&format!("  DNAT {dnat:.0} conn/s"));
        }
        if let Some(new) = self.udp_new {
            s.push_str(&format!("  new flows {:.0} dgram/s", new.delivered_per_sec));
        }
        if let Some(load) = self.load {
            s.push_str(&format!("  load {:.0} ms", load.as_secs_f64() * 1e3));
        }
        if let Some(first) = self.allow_first {
            s.push_str(&format!(
                "  allow->packet {:.1} ms",
                first.as_secs_f64() * 1e3
            ));
        }
        if let Some(rss) = self.rss_kib {
            s.push_str(&format!("  rss {:.1} MiB", rss as f64 / 1024.0));
        }
        s
    }

    pub(crate) fn record(&self, results: &mut Results, n: usize, filter: Filter, mode: Mode) {
        let mut push = |metric, value: f64| {
            results.samples.push(Sample {
                n,
                filter,
                metric,
                value,
            })
        };
        if mode == Mode::Bare {
            push(Metric::BareCps, self.cps);
            push(Metric::BareUdp, self.udp.delivered_per_sec);
            push(Metric::BareTput, self.tput_gbps);
            return;
        }
        push(Metric::Cps, self.cps);
        push(Metric::Udp, self.udp.delivered_per_sec);
        push(Metric::Tput, self.tput_gbps);
        if let Some(v) = self.dnat_cps {
            push(Metric::DnatCps, v);
        }
        if let Some(v) = self.udp_new {
            push(Metric::UdpNew, v.delivered_per_sec);
            results
                .udp_new_sent
                .entry((n, filter))
                .or_default()
                .push(v.sent_per_sec);
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        if let Some(d) = self.load {
            push(Metric::Load, ms(d));
        }
        if let Some(d) = self.allow_first {
            push(Metric::AllowFirst, ms(d));
        }
        if let Some(d) = self.allow_cmd {
            push(Metric::AllowCmd, ms(d));
        }
        if let Some(kib) = self.rss_kib {
            push(Metric::Rss, kib as f64 / 1024.0);
        }
        *results.wrk_errors.entry((n, filter)).or_default() += self.wrk_errors;
        results
            .udp_sent
            .entry((n, filter))
            .or_default()
            .push(self.udp.sent_per_sec);
    }
}

/// One cell: a fresh topology (a container host's, or bare), the filter with N entries, the
/// loads, the allow probe.
pub(crate) fn run_cell(
    plan: &Plan,
    setup: &Setup,
    cell: &str,
    n: usize,
    filter: Filter,
    mode: Mode,
) -> Result<Outcome> {
    let topo = Topology::create(cell)?;
    if mode == Mode::Host {
        topo.container_host()?;
    }
    let servers = traffic::Servers::start(&topo)?;
    let installed = filters::install(filter, n, &topo, setup, cell)
        .with_context(|| format!("installing {} with N={n}", filter.label()))?;
    // The allowed port answers; for a filter, a port it does not allow times out.
    let mut answered = false;
    for _ in 0..20 {
        if traffic::http_get_once(&topo, filters::HTTP_PORT, Duration::from_secs(2))? {
            answered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !answered {
        bail!(
            "the HTTP server in the server namespace does not answer through {}",
            filter.label()
        );
    }
    if filter != Filter::None && !traffic::blocked_port_times_out(&topo)? {
        bail!(
            "{} does not drop a connection to a port it does not allow",
            filter.label()
        );
    }
    if mode == Mode::Host && !traffic::published_answers(&topo)? {
        bail!(
            "the HTTP server does not answer on the published port (DNAT) through {}",
            filter.label()
        );
    }
    let mut outcome = Outcome::default();
    // The control plane is the same in both modes: measured once, with the container host.
    if mode == Mode::Host {
        outcome.load = installed.load_time;
        if let Some(agent) = &installed.agent {
            outcome.rss_kib = Some(agent.rss_kib()?);
        }
    }

    let wrk = traffic::wrk(
        &topo,
        &traffic::wrk_args(WRK_THREADS, WRK_CONNECTIONS, plan.wrk_secs),
        plan.wrk_secs,
    )?;
    outcome.cps = wrk.requests_per_sec;
    outcome.wrk_errors = wrk.errors;
    proc::check_interrupted()?;
    // The mode is what it says: conntrack tracks in the container host and nowhere else.
    let tracked = topo.conntrack_count()?;
    match mode {
        Mode::Host if tracked == 0 => {
            bail!("no conntrack entries in the container host's namespace after wrk")
        }
        Mode::Bare if tracked > 0 => {
            bail!("{tracked} conntrack entries in the bare host namespace")
        }
        _ => {}
    }
    if mode == Mode::Host {
        let dnat = traffic::wrk(
            &topo,
            &traffic::wrk_dnat_args(WRK_THREADS, WRK_CONNECTIONS, plan.wrk_secs),
            plan.wrk_secs,
        )?;
        outcome.dnat_cps = Some(dnat.requests_per_sec);
        outcome.wrk_errors += dnat.errors;
        proc::check_interrupted()?;
    }
    outcome.tput_gbps = traffic::iperf(
        &topo,
        &traffic::iperf_args(plan.iperf_secs),
        plan.iperf_secs,
    )?;
    proc::check_interrupted()?;
    outcome.udp = traffic::udp_flood(&topo, &servers.sink, plan.udp)?;
    proc::check_interrupted()?;
    if mode == Mode::Host {
        outcome.udp_new = Some(flood::udp_new_flows(&topo, &servers.sink, plan.udp)?);
        proc::check_interrupted()?;
    }

    if filter != Filter::None && mode == Mode::Host {
        let (first, command) =
            traffic::allow_to_first_packet(&topo, || installed.allow_probe_port(&topo, setup))?;
        outcome.allow_first = Some(first);
        outcome.allow_cmd = Some(command);
    }
    // Agent first (it runs in the host namespace), then the servers, then the namespaces.
    drop(installed);
    drop(servers);
    drop(topo);
    let _ = std::fs::remove_dir_all(setup.work_dir.join(cell));
    Ok(outcome)
}
