//! The report's goals: each target of the issue, met or not, with the figures behind it.

use super::*;

/// The goals, checked against this run's numbers.
pub(super) fn goals(results: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## Goals\n");
    if results.samples.is_empty() {
        md.push_str(&flood_goal(results));
        return md;
    }
    let _ = writeln!(
        md,
        "The data-path goals are about the container host (conntrack on) figures, \
         including new TCP connections through DNAT and many new UDP flows.\n"
    );
    md.push_str(&within_no_filter_goal(results));
    md.push_str(&against_other_filters_goal(results));
    md.push_str(&flat_in_n_goal(results));
    md.push_str(&program_goals(results));
    md.push_str(&flood_goal(results));
    md
}

/// Goal 1: portgate within 5 % of no filter on every data-path figure.
fn within_no_filter_goal(results: &Results) -> String {
    let ns = &results.meta.ns;
    let mut md = String::new();
    let mut misses = Vec::new();
    let mut checked = 0;
    let mut worst: BTreeMap<Metric, f64> = BTreeMap::new();
    for metric in Metric::DATA_PATH {
        for &n in ns {
            let (Some(pg), Some(none)) = (
                results.stat(n, Filter::Portgate, metric),
                results.stat(n, Filter::None, metric),
            ) else {
                continue;
            };
            checked += 1;
            let shortfall = 1.0 - pg.median / none.median;
            let w = worst.entry(metric).or_insert(f64::MIN);
            *w = w.max(shortfall);
            if shortfall > 0.05 {
                misses.push(format!(
                    "{} at N={}: {:.1} % below no filter ({} vs {}; the ranges of the repeats span {:.0} % for no filter, {:.0} % for portgate)",
                    metric.short(),
                    int(n),
                    shortfall * 100.0,
                    num(pg.median),
                    num(none.median),
                    none.spread() * 100.0,
                    pg.spread() * 100.0,
                ));
            }
        }
    }
    let _ = writeln!(
        md,
        "1. **portgate within 5 % of no filter on every data-path figure at every N: {}** ({} of {checked} figures within 5 %).",
        if misses.is_empty() && checked > 0 {
            "met"
        } else {
            "missed"
        },
        checked - misses.len()
    );
    for miss in &misses {
        let _ = writeln!(md, "   - {miss}");
    }
    if results.inpath.is_some() {
        let why: Vec<String> = Metric::DATA_PATH
            .iter()
            .filter_map(|&metric| {
                let p = predicted(results, metric)?;
                let w = worst.get(&metric).copied().unwrap_or(0.0);
                Some(format!(
                    "{}: {:.1} % predicted, at most {:.1} % measured",
                    metric.short(),
                    p * 100.0,
                    w * 100.0
                ))
            })
            .collect();
        let _ = writeln!(
            md,
            "\n   Why: the gate's own run time in the data path (previous section) predicts \
             these slowdowns: {}. Where the measured shortfall is of the predicted size, the \
             cost is the programs' work per packet (the flow-table lookup and update, the \
             per-CPU counters, the header loads); what goes beyond it, or below zero, is this \
             shared machine's noise, whose size each figure's range shows.\n",
            why.join("; ")
        );
    }
    md
}

/// Goal 2: at or above iptables and nftables.
fn against_other_filters_goal(results: &Results) -> String {
    let ns = &results.meta.ns;
    let mut md = String::new();
    let mut below = Vec::new();
    let mut checked = 0;
    for metric in Metric::DATA_PATH {
        for &n in ns {
            let Some(pg) = results.stat(n, Filter::Portgate, metric) else {
                continue;
            };
            for other in [Filter::Iptables, Filter::Nftables] {
                let Some(o) = results.stat(n, other, metric) else {
                    continue;
                };
                checked += 1;
                if pg.median < o.median {
                    let overlap = pg.max >= o.min;
                    below.push(format!(
                        "{} at N={}: {:.1} % below {} ({} vs {}){}",
                        metric.short(),
                        int(n),
                        (1.0 - pg.median / o.median) * 100.0,
                        other.label(),
                        num(pg.median),
                        num(o.median),
                        if overlap {
                            "; the repeats' ranges overlap"
                        } else {
                            "; the repeats' ranges do not overlap"
                        }
                    ));
                }
            }
        }
    }
    let within_noise = below
        .iter()
        .filter(|b| b.ends_with("ranges overlap"))
        .count();
    let _ = writeln!(
        md,
        "2. **portgate at or above iptables and nftables at every N: {}** ({} of {checked} comparisons at or above; of the {} below, {within_noise} within the overlap of the repeats' ranges).",
        if below.is_empty() && checked > 0 {
            "met"
        } else {
            "missed"
        },
        checked - below.len(),
        below.len()
    );
    for b in &below {
        let _ = writeln!(md, "   - {b}");
    }
    if let Some(&n) = ns.last()
        && let (Some(pg), Some(ipt)) = (
            results.stat(n, Filter::Portgate, Metric::Cps),
            results.stat(n, Filter::Iptables, Metric::Cps),
        )
        && pg.median > ipt.median
    {
        let _ = writeln!(
            md,
            "   - where the chain walk counts, new connections at N={}, portgate makes {:.0}× iptables' rate ({} vs {} connections/s).",
            int(n),
            pg.median / ipt.median,
            num(pg.median),
            num(ipt.median)
        );
    }
    if !below.is_empty() {
        let _ = writeln!(
            md,
            "\n   Why: iptables and nftables pay per packet for conntrack (a hash lookup and, \
             for new flows, an insert) and one rule or set lookup; the gate pays for its own \
             flow table and counters (previous section), which is of the same order at small N. \
             The chain walk that makes iptables slow only happens once per new connection, so \
             it shows in new connections per second as N grows, not in the established flows \
             of the UDP and throughput figures.\n"
        );
    }
    md
}

/// Goal 3: the program's cost per packet flat in N, at a fixed tracking-map fill.
fn flat_in_n_goal(results: &Results) -> String {
    let ns = &results.meta.ns;
    let mut md = String::new();
    let series = |fill: usize, pick: usize| -> Vec<(usize, f64)> {
        results
            .prog
            .iter()
            .filter_map(|p| {
                let f = p.fills.get(fill)?;
                Some((p.n, if pick == 1 { f.1 } else { f.2 }))
            })
            .collect()
    };
    let mut lines = Vec::new();
    let mut flat = true;
    for (path, pick) in [("new connection", 1usize), ("tracked", 2)] {
        let values: Vec<f64> = series(1, pick).iter().map(|v| v.1).collect();
        let (Some(lo), Some(hi)) = (
            values.iter().copied().reduce(f64::min),
            values.iter().copied().reduce(f64::max),
        ) else {
            continue;
        };
        // Flat: the largest within 15 % (or 20 ns, about one cache miss) of the smallest.
        let ok = hi <= lo * 1.15 || hi - lo <= 20.0;
        flat &= ok;
        lines.push(format!(
            "{path}, tracking map at 1 M flows: {}–{} ns from N={} to N={} ({:+.0} %){}",
            num(lo),
            num(hi),
            int(*ns.first().unwrap_or(&0)),
            int(*ns.last().unwrap_or(&0)),
            (hi / lo - 1.0) * 100.0,
            if ok { "" } else { " — not flat" }
        ));
    }
    let _ = writeln!(
        md,
        "3. **per-packet program cost flat in N: {}** (N allow entries, the tracking map at the same fill; flat: within 15 % or 20 ns).",
        if flat && !lines.is_empty() {
            "met"
        } else {
            "missed"
        }
    );
    for l in &lines {
        let _ = writeln!(md, "   - {l}");
    }
    let tracked_small = series(0, 2);
    if let (Some(first), Some(last)) = (tracked_small.first(), tracked_small.last())
        && tracked_small.len() > 1
    {
        let _ = writeln!(
            md,
            "\n   With the tracking map filled to N flows instead, the tracked path goes from {} ns \
             (N={}) to {} ns (N={}), and to about {} ns at 1 M flows: the flow table outgrowing \
             the CPU caches (each lookup then misses), which conntrack's table pays as well; the \
             allow map plays no part in it.\n",
            num(first.1),
            int(first.0),
            num(last.1),
            int(last.0),
            num(series(1, 2).last().map_or(f64::NAN, |v| v.1)),
        );
    }
    md
}

/// Goals 4 to 6: the program's cost per packet, and allow → first packet.
pub(super) fn program_goals(results: &Results) -> String {
    let mut md = String::new();
    // Net of the floor at the same N: what the program adds to a run that passes at once
    // (the clock reads around one run and the entry are the kernel's, not the gate's).
    let worst = |pick: fn(&(usize, f64, f64)) -> f64| {
        results
            .prog
            .iter()
            .flat_map(|p| {
                p.fills
                    .iter()
                    .map(move |f| (p.n, f.0, pick(f) - p.floor_ns, pick(f)))
            })
            .filter(|x| x.2.is_finite())
            .max_by(|a, b| a.2.total_cmp(&b.2))
    };
    for (goal, what, limit, pick) in [
        (
            4,
            "tracked packet",
            100.0,
            (|f: &(usize, f64, f64)| f.2) as fn(&_) -> f64,
        ),
        (5, "new connection", 300.0, |f: &(usize, f64, f64)| f.1),
    ] {
        if let Some((n, flows, net, raw)) = worst(pick) {
            let _ = writeln!(
                md,
                "{goal}. **program cost of a {what} ≤ {limit:.0} ns (BPF_PROG_TEST_RUN, net of the floor, every N and fill): {}** (at most {} ns net, {} ns measured, at N={} with {} flows).",
                if net <= limit { "met" } else { "missed" },
                num(net),
                num(raw),
                int(n),
                int(flows)
            );
        }
    }
    let allow: Vec<(usize, f64)> = results
        .meta
        .ns
        .iter()
        .filter_map(|&n| {
            Some((
                n,
                results
                    .stat(n, Filter::Portgate, Metric::AllowFirst)?
                    .median,
            ))
        })
        .collect();
    if let Some(&(n, ms)) = allow.iter().max_by(|a, b| a.1.total_cmp(&b.1)) {
        let _ = writeln!(
            md,
            "6. **allow → first packet ≤ 10 ms at every N: {}** (at most {} ms, at N={}).",
            if ms <= 10.0 { "met" } else { "missed" },
            num(ms),
            int(n)
        );
    }
    if md.contains("missed") {
        let _ = writeln!(
            md,
            "\n   What would close them: the gate's own flow table is paid on top of \
             conntrack's. Taking conntrack's verdict instead (its kfuncs, or the skb's \
             conntrack state) was weighed and left: conntrack also confirms a flow that a \
             container opened in another container's name (a forged source, which \
             `from_containers` refuses to track), so its \"established\" would readmit the \
             path that forgery opens, and its lookup costs about what the gate's own does. \
             Left to try: a 16-byte IPv4 flow key (a second pair of tables), fewer per-CPU \
             counter updates per packet. With a million flows every lookup misses the CPU \
             caches, which no hash table avoids. An allow that opens new destinations to \
             anyone writes only its own entries; a rule with sources, a container rule or a \
             deny still resolves every rule (O(N)).\n"
        );
    }
    md
}

/// Goal 7: a flood of unwanted SYNs grows the conntrack table by nothing and costs at most
/// 1.5x the control's CPU per SYN. Judged on portgate's early drop (`--uplink`, the answer
/// the issue asks for) when it was measured, on the bridge gate alone otherwise; both shown.
pub(super) fn flood_goal(results: &Results) -> String {
    let mut md = String::new();
    let stats = flood_stats(results);
    let portgate: Vec<&(flood::Variant, FloodStat)> = stats
        .iter()
        .filter(|(v, _)| v.filter == Filter::Portgate)
        .collect();
    if portgate.is_empty() {
        return md;
    }
    // The flood alone; a few entries of the checks and of wrk's TIME_WAIT may come and go.
    const GROWTH_SLACK: f64 = 64.0;
    let mut lines = Vec::new();
    let mut met_by = BTreeMap::new();
    for (variant, st) in &portgate {
        let mut met = true;
        for &(kind, _, ns, before, after, _) in &st.floods {
            let grows = after - before;
            let ratio = ns / st.control_ns;
            let ok = grows <= GROWTH_SLACK && ratio <= 1.5;
            met &= ok;
            lines.push(format!(
                "{}, {}: conntrack {} → {} ({:+.0}), {} ns per SYN = {:.1}× the control{}",
                variant.label(),
                kind.label(),
                num(before),
                num(after),
                grows,
                num(ns),
                ratio,
                if ok { "" } else { " — missed" }
            ));
        }
        met_by.insert(variant.uplink, met);
    }
    let (judged, verdict) = match (met_by.get(&true), met_by.get(&false)) {
        (Some(&early), Some(&late)) => (
            "with the early drop (`--uplink`)",
            format!(
                "{} ({} without it, the bridge gate alone)",
                if early { "met" } else { "missed" },
                if late { "met" } else { "missed" }
            ),
        ),
        (Some(&early), None) => (
            "with the early drop (`--uplink`)",
            if early { "met" } else { "missed" }.to_owned(),
        ),
        (None, late) => (
            "(this portgate has no `--uplink`: the bridge gate alone)",
            if late == Some(&true) { "met" } else { "missed" }.to_owned(),
        ),
    };
    let _ = writeln!(
        md,
        "7. **a flood of unwanted SYNs from any sources grows the conntrack table by nothing and costs ≤ 1.5× the control's CPU per SYN, {judged}: {verdict}**"
    );
    for l in &lines {
        let _ = writeln!(md, "   - {l}");
    }
    if met_by.get(&false) == Some(&false) {
        let _ = writeln!(
            md,
            "\n   Why the bridge gate alone misses: it decides at the bridge's egress, after \
             conntrack has created and confirmed the entry, so every SYN leaves one behind \
             (random sources fill the table toward nf_conntrack_max, after which the kernel \
             drops new connections for the whole host) and pays conntrack's work before the \
             drop. The early drop (`portgate agent --uplink IFACE`) decides new connections \
             to published host ports on the interface they arrive on, before conntrack.\n"
        );
    }
    if met_by.get(&true) == Some(&false) {
        let _ = writeln!(
            md,
            "\n   Why the early drop misses: the lines above say which part (the table's growth \
             or the CPU per SYN). Growth means SYNs pass the uplink program to conntrack: what \
             it cannot decide statelessly (a destination it does not know as the host's, a \
             port it does not know as published) goes on to the bridge gate; CPU above the \
             control is the program's own work per SYN on top of the frame's reception.\n"
        );
    }
    md
}
