//! Figures computed from the samples: flood medians, CPU per packet, predictions.

use super::*;

/// Medians over the flood cells of one variant.
pub(super) struct FloodStat {
    pub(super) idle_cps: f64,
    pub(super) control_ns: f64,
    pub(super) control_rate: f64,
    /// Per source kind: (SYNs/s, ns per SYN, conntrack before, after, conn/s under the flood).
    pub(super) floods: Vec<(Sources, f64, f64, f64, f64, f64)>,
}

pub(super) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    Stat::of(&v).map_or(f64::NAN, |s| s.median)
}

pub(super) fn flood_stats(results: &Results) -> Vec<(flood::Variant, FloodStat)> {
    let mut variants: Vec<flood::Variant> = results.flood.iter().map(|(v, _)| *v).collect();
    variants.sort();
    variants.dedup();
    variants
        .into_iter()
        .map(|variant| {
            let cells: Vec<&flood::Outcome> = results
                .flood
                .iter()
                .filter(|(v, _)| *v == variant)
                .map(|(_, o)| o)
                .collect();
            let kinds = [Sources::One, Sources::Random];
            let floods = kinds
                .iter()
                .map(|&kind| {
                    let of = |f: &dyn Fn(&flood::Phase, f64) -> f64| {
                        median(cells.iter().flat_map(|o| {
                            o.floods
                                .iter()
                                .filter(|(k, _, _)| *k == kind)
                                .map(|(_, p, cps)| f(p, *cps))
                        }))
                    };
                    (
                        kind,
                        of(&|p, _| p.sent_per_sec),
                        of(&|p, _| p.cpu_ns_per_frame),
                        of(&|p, _| p.ct_before as f64),
                        of(&|p, _| p.ct_after as f64),
                        of(&|_, cps| cps),
                    )
                })
                .collect();
            (
                variant,
                FloodStat {
                    idle_cps: median(cells.iter().map(|o| o.idle_cps)),
                    control_ns: median(cells.iter().map(|o| o.control.cpu_ns_per_frame)),
                    control_rate: median(cells.iter().map(|o| o.control.sent_per_sec)),
                    floods,
                },
            )
        })
        .collect()
}

/// CPU nanoseconds one unit of a load costs without a filter, on the CPU that limits it: a
/// datagram or a megabyte of the single stream occupies the sender's CPU (which also forwards
/// it, and runs the gate's egress program) for 1/rate; a short connection keeps both CPUs
/// busy for 2/rate.
pub(super) fn unit_cpu_ns(results: &Results, n: usize, metric: Metric) -> Option<f64> {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
    let none = results.stat(n, Filter::None, metric)?.median;
    match metric {
        Metric::Udp => Some(1e9 / none),
        Metric::Tput => Some(1e9 / (none * 1e9 / 8.0 / 1e6)),
        Metric::Cps => Some(cpus * 1e9 / none),
        _ => None,
    }
}

/// The slowdown the gate's own run time predicts for a data-path figure: gate time per unit
/// on the limiting CPU(s) over the unit's CPU time without a filter.
pub(super) fn predicted(results: &Results, metric: Metric) -> Option<f64> {
    let (n, loads) = results.inpath.as_ref()?;
    let load = loads.iter().find(|l| l.metric == metric)?;
    let gate = gate_ns_on_limit(load);
    let base = unit_cpu_ns(results, *n, metric)?;
    Some(gate / base)
}

/// Gate nanoseconds per unit on the CPU(s) that limit the load: both programs for short
/// connections (both CPUs are busy); the egress program alone for the single-CPU loads
/// (their bridge-port runs, for ACKs and answers, land on the other CPU).
pub(super) fn gate_ns_on_limit(load: &InPath) -> f64 {
    let per_unit = |i: usize| {
        load.programs.get(i).map_or(0.0, |(_, runs, ns)| {
            *runs as f64 * ns / load.units.max(1e-9)
        })
    };
    match load.metric {
        Metric::Cps => per_unit(0) + per_unit(1),
        _ => per_unit(0),
    }
}
