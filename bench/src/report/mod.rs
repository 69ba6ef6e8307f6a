//! The benchmark's results: samples and their statistics, the markdown report (tables,
//! goals) and the SVG plot.

mod goals;
mod plot;
mod statistics;
mod tables;

use goals::goals;
use plot::plot;
use statistics::*;
use std::{collections::BTreeMap, fmt::Write as _, path::Path};
use tables::*;

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use super::{
    filters::Filter,
    flood::{self, Sources},
    run_time_stats::InPath,
    test_run::{ProgCost, SourceCost},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// New TCP connections per second (wrk, Connection: close).
    Cps,
    /// The same through the published host port (DNAT).
    DnatCps,
    /// UDP datagrams per second delivered.
    Udp,
    /// UDP datagrams per second delivered, each datagram a new flow.
    UdpNew,
    /// Single-stream TCP throughput, Gbit/s.
    Tput,
    /// Cps, Udp and Tput without conntrack (the bare host namespace).
    BareCps,
    BareUdp,
    BareTput,
    /// Time to load N rules, ms.
    Load,
    /// From the allow command's start to the first accepted datagram, ms.
    AllowFirst,
    /// The allow command alone, ms.
    AllowCmd,
    /// The agent's resident memory, MiB.
    Rss,
}

impl Metric {
    /// With conntrack (a container host): the figures the goals are about.
    pub const DATA_PATH: [Metric; 5] = [
        Metric::Cps,
        Metric::DnatCps,
        Metric::Udp,
        Metric::UdpNew,
        Metric::Tput,
    ];
    /// Without conntrack: no filter and portgate only.
    pub const BARE: [Metric; 3] = [Metric::BareCps, Metric::BareUdp, Metric::BareTput];

    fn title(self) -> &'static str {
        match self {
            Metric::Cps => "New TCP connections per second",
            Metric::DnatCps => {
                "New TCP connections per second through DNAT (a published host port)"
            }
            Metric::Udp => "UDP datagrams per second delivered (2 048 established flows)",
            Metric::UdpNew => "UDP datagrams per second delivered, each a new flow",
            Metric::Tput => "Single-stream TCP throughput (Gbit/s)",
            Metric::BareCps => "New TCP connections per second, no conntrack",
            Metric::BareUdp => "UDP datagrams per second delivered, no conntrack",
            Metric::BareTput => "Single-stream TCP throughput (Gbit/s), no conntrack",
            Metric::Load => "Time to load N rules (ms)",
            Metric::AllowFirst => "Allow → first accepted packet (ms)",
            Metric::AllowCmd => "The allow command alone (ms)",
            Metric::Rss => "Agent resident memory (MiB)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Metric::Cps => "new TCP connections/s",
            Metric::DnatCps => "new TCP connections/s through DNAT",
            Metric::Udp => "UDP datagrams/s",
            Metric::UdpNew => "UDP datagrams/s, new flows",
            Metric::Tput => "TCP throughput",
            Metric::BareCps => "new TCP connections/s, no conntrack",
            Metric::BareUdp => "UDP datagrams/s, no conntrack",
            Metric::BareTput => "TCP throughput, no conntrack",
            _ => self.title(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub n: usize,
    pub filter: Filter,
    pub metric: Metric,
    pub value: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[v.len() - 1],
        })
    }

    /// (max - min) / median.
    fn spread(&self) -> f64 {
        if self.median > 0.0 {
            (self.max - self.min) / self.median
        } else {
            0.0
        }
    }
}

/// Facts about the run, for the report's header.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    pub date: String,
    pub machine: String,
    pub kernel: String,
    pub commit: String,
    pub mode: String,
    pub repeats: usize,
    pub ns: Vec<usize>,
    pub elapsed_secs: f64,
    pub commands: Vec<(String, String)>,
    pub tools: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Default)]
pub struct Results {
    pub samples: Vec<Sample>,
    pub prog: Vec<ProgCost>,
    /// New connections to rules with sources, and under a block list.
    pub sources: SourceCost,
    /// wrk's socket errors and non-2xx responses, summed over repeats.
    pub wrk_errors: BTreeMap<(usize, Filter), u64>,
    /// UDP datagrams per second offered by the flood (median), for context.
    pub udp_sent: BTreeMap<(usize, Filter), Vec<f64>>,
    /// The same for the many-new-flows load.
    pub udp_new_sent: BTreeMap<(usize, Filter), Vec<f64>>,
    /// The flood cells, one per variant and repeat.
    pub flood: Vec<(flood::Variant, flood::Outcome)>,
    /// Share of the machine other processes used during each kept cell.
    pub foreign: Vec<f64>,
    /// Hypervisor steal time during each kept cell.
    pub steal: Vec<f64>,
    /// Cells measured again because other processes disturbed them.
    pub redone: usize,
    /// The programs' run time in the real data path, at one N.
    pub inpath: Option<(usize, Vec<InPath>)>,
    pub meta: Meta,
}

impl Results {
    pub fn stat(&self, n: usize, filter: Filter, metric: Metric) -> Option<Stat> {
        let values: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.n == n && s.filter == filter && s.metric == metric)
            .map(|s| s.value)
            .collect();
        Stat::of(&values)
    }

    fn ratio(&self, n: usize, filter: Filter, metric: Metric) -> Option<f64> {
        let base = self.stat(n, Filter::None, metric)?.median;
        let value = self.stat(n, filter, metric)?.median;
        (base > 0.0).then(|| value / base)
    }
}

/// 12345.6 -> "12 346"; small numbers keep some decimals.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    if v == v.trunc() && v.abs() >= 10.0 && v.abs() < 100.0 {
        return format!("{v:.0}");
    }
    let (digits, decimals) = if v.abs() >= 100.0 {
        (format!("{:.0}", v), 0)
    } else if v.abs() >= 10.0 {
        (format!("{:.1}", v), 1)
    } else {
        (format!("{:.2}", v), 2)
    };
    if decimals > 0 {
        return digits;
    }
    let neg = digits.starts_with('-');
    let d = digits.trim_start_matches('-');
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    if neg { format!("-{out}") } else { out }
}

/// An integer count: 100000 -> "100 000".
pub fn int(n: usize) -> String {
    num(n as f64)
}

pub fn markdown(results: &Results, plot_file: &str) -> String {
    let m = &results.meta;
    let ns = &m.ns;
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks: portgate against iptables and nftables\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench{}`; do not edit by hand, run it again. Every figure is \
         the median of {} interleaved repeats, with the range (min–max) in parentheses and, in \
         bold, its ratio to *no filter* at the same N in the same run.\n",
        if m.mode == "quick" { " --quick" } else { "" },
        m.repeats
    );
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| date | {} |", m.date);
    let _ = writeln!(md, "| machine | {} |", m.machine);
    let _ = writeln!(md, "| kernel | {} |", m.kernel);
    let _ = writeln!(md, "| commit | {} |", m.commit);
    let _ = writeln!(
        md,
        "| run | {} mode, N ∈ {{{}}}, {} repeats, {:.1} min in all |",
        m.mode,
        ns.iter().map(|n| int(*n)).collect::<Vec<_>>().join(", "),
        m.repeats,
        m.elapsed_secs / 60.0
    );
    let _ = writeln!(md, "| tools | {} |", m.tools.join("; "));
    if let (Some(f), Some(st)) = (Stat::of(&results.foreign), Stat::of(&results.steal)) {
        let _ = writeln!(
            md,
            "| other load | other processes used {:.0} % of the machine during the median cell (at most {:.0} %); {} disturbed cell(s) measured again; hypervisor steal {:.1} % (median) |",
            f.median * 100.0,
            f.max * 100.0,
            results.redone,
            st.median * 100.0
        );
    }
    md.push('\n');
    if !results.samples.is_empty() {
        md.push_str(&data_path_sections(results, plot_file));
    }
    md.push_str(&flood_section(results));
    md.push_str(&goals(results));

    let _ = writeln!(md, "## How it is measured\n");
    for note in &m.notes {
        let _ = writeln!(md, "- {note}");
    }
    let _ = writeln!(md, "\nCommands (in the namespaces the bench creates):\n");
    let _ = writeln!(md, "```");
    for (what, command) in &m.commands {
        let _ = writeln!(md, "# {what}\n{command}");
    }
    let _ = writeln!(md, "```");
    md
}

pub fn write(
    results: &Results,
    dir: &Path,
    name: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let svg = dir.join(format!("{name}.svg"));
    let md = dir.join(format!("{name}.md"));
    plot(results, &svg)?;
    std::fs::write(&md, markdown(results, &format!("{name}.svg")))
        .with_context(|| format!("writing {}", md.display()))?;
    Ok((md, svg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).expect("stat");
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[1.0, 4.0]).expect("stat").median, 2.5);
        assert!(Stat::of(&[]).is_none());
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(num(1234567.0), "1\u{202f}234\u{202f}567");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(0.5), "0.50");
    }

    #[test]
    fn report_and_plot_render_from_synthetic_results() {
        let mut r = Results::default();
        r.meta.ns = vec![10, 1000];
        r.meta.repeats = 2;
        for &n in &[10, 1000] {
            for f in Filter::ALL {
                let metrics = Metric::DATA_PATH
                    .iter()
                    .chain(&Metric::BARE)
                    .chain(&[Metric::Load, Metric::AllowFirst]);
                for &metric in metrics {
                    for v in [100.0, 110.0] {
                        r.samples.push(Sample {
                            n,
                            filter: f,
                            metric,
                            value: v,
                        });
                    }
                }
            }
            r.prog.push(ProgCost {
                n,
                allow_entries: n,
                floor_ns: 30.0,
                fills: vec![(n, 120.0, 80.0), (1_000_000, 200.0, 150.0)],
                samples: 10,
            });
        }
        let phase = |before, after| flood::Phase {
            sent_per_sec: 500_000.0,
            cpu_ns_per_frame: 1_000.0,
            ct_before: before,
            ct_after: after,
        };
        for (filter, uplink, after) in [
            (Filter::None, false, 262_144),
            (Filter::Portgate, false, 262_144),
            (Filter::Portgate, true, 5),
        ] {
            r.flood.push((
                flood::Variant { filter, uplink },
                flood::Outcome {
                    idle_cps: 10_000.0,
                    control: phase(0, 0),
                    floods: vec![
                        (Sources::One, phase(5, after), 9_000.0),
                        (Sources::Random, phase(after, after), 8_000.0),
                    ],
                },
            ));
        }
        let md = markdown(&r, "x.svg");
        assert!(md.contains("| 1\u{202f}000 |"), "{md}");
        assert!(md.contains("## Data path without conntrack"), "{md}");
        assert!(md.contains("| portgate --uplink | 10\u{202f}000 |"), "{md}");
        assert!(
            md.contains("with the early drop (`--uplink`): met (missed without it"),
            "{md}"
        );
        assert!(
            md.contains("6. **allow → first packet ≤ 10 ms at every N: missed**"),
            "{md}"
        );
        assert!(md.contains("**1.00×**"));
        assert!(md.contains("within 5 % of no filter on every data-path figure at every N: met"));
        let dir = std::env::temp_dir().join(format!("pgb-report-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        plot(&r, &dir.join("x.svg")).expect("plot");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
