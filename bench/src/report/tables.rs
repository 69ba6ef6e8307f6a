//! The report's tables: the data path at each load, the bare host, floods, sources, the
//! kernel's run-time statistics.

use super::*;

pub(super) fn cell(stat: Option<Stat>, ratio: Option<f64>) -> String {
    match stat {
        None => "–".into(),
        Some(s) => {
            let mut text = format!("{} ({}–{})", num(s.median), num(s.min), num(s.max));
            if let Some(r) = ratio {
                let _ = write!(text, " **{r:.2}×**");
            }
            text
        }
    }
}

/// The data path, the control plane, the program's cost: everything but the flood.
pub(super) fn data_path_sections(results: &Results, plot_file: &str) -> String {
    let mut md = data_path_section(results, plot_file);
    md.push_str(&control_plane_section(results));
    md.push_str(&program_cost_section(results));
    md
}

/// The data-path tables, one per metric, and the bare host's.
fn data_path_section(results: &Results, plot_file: &str) -> String {
    let ns = &results.meta.ns;
    let mut md = String::new();

    let _ = writeln!(
        md,
        "![portgate, iptables, nftables and no filter against N]({plot_file})\n"
    );
    let _ = writeln!(md, "## Data path on a container host (conntrack on)\n");
    let _ = writeln!(
        md,
        "N is the number of allowed (address, protocol, port) entries: published ports in \
         Docker's DOCKER chain (the ports the traffic uses last), elements of the nftables set, \
         allow-map entries of portgate. The host namespace publishes ports with DNAT, as \
         Docker does, so conntrack tracks in every column (see \"How it is measured\").\n"
    );
    for metric in Metric::DATA_PATH {
        let _ = writeln!(md, "### {}\n", metric.title());
        table_header(&mut md);
        for &n in ns {
            let mut row = format!("| {} |", int(n));
            for filter in Filter::ALL {
                let ratio = (filter != Filter::None)
                    .then(|| results.ratio(n, filter, metric))
                    .flatten();
                let _ = write!(row, " {} |", cell(results.stat(n, filter, metric), ratio));
            }
            let _ = writeln!(md, "{row}");
        }
        if metric == Metric::Cps {
            let errors: Vec<String> = results
                .wrk_errors
                .iter()
                .filter(|(_, e)| **e > 0)
                .map(|((n, f), e)| format!("{} at N={}: {e}", f.label(), int(*n)))
                .collect();
            if !errors.is_empty() {
                let _ = writeln!(md, "\nwrk reported socket errors: {}.", errors.join(", "));
            }
        }
        if metric == Metric::Udp || metric == Metric::UdpNew {
            let sent = if metric == Metric::Udp {
                &results.udp_sent
            } else {
                &results.udp_new_sent
            };
            let offered: Vec<f64> = sent.values().flatten().copied().collect();
            if let Some(s) = Stat::of(&offered) {
                let _ = writeln!(
                    md,
                    "\nThe flood offered {}–{} datagrams/s (all cells); what arrives is counted.",
                    num(s.min),
                    num(s.max)
                );
            }
        }
        md.push('\n');
    }

    md.push_str(&bare_section(results));
    md
}

/// Loading N rules, and allow → first packet.
fn control_plane_section(results: &Results) -> String {
    let ns = &results.meta.ns;
    let mut md = String::new();
    let _ = writeln!(md, "## Control plane\n");
    let _ = writeln!(
        md,
        "| N | load N rules: iptables | nftables | portgate (agent start to ready) | allow → first packet: iptables | nftables | portgate | portgate agent RSS (MiB) |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in ns {
        let c = |f, metric| cell(results.stat(n, f, metric), None);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            int(n),
            c(Filter::Iptables, Metric::Load),
            c(Filter::Nftables, Metric::Load),
            c(Filter::Portgate, Metric::Load),
            c(Filter::Iptables, Metric::AllowFirst),
            c(Filter::Nftables, Metric::AllowFirst),
            c(Filter::Portgate, Metric::AllowFirst),
            c(Filter::Portgate, Metric::Rss),
        );
    }
    let _ = writeln!(
        md,
        "\nTimes in milliseconds. \"Allow → first packet\": from the start of the command that \
         allows one more UDP port (Docker-style `iptables -A DOCKER ...`, `nft add element ...`, \
         `portgate allow ...`) until the first datagram reaches the server, while the client \
         sends one every 100 µs. The commands alone took (median ms): {}.\n",
        ns.iter()
            .map(|&n| {
                let parts: Vec<String> = [Filter::Iptables, Filter::Nftables, Filter::Portgate]
                    .iter()
                    .map(|&f| {
                        let v = results
                            .stat(n, f, Metric::AllowCmd)
                            .map_or(f64::NAN, |s| s.median);
                        format!("{} {}", f.label(), num(v))
                    })
                    .collect();
                format!("N={}: {}", int(n), parts.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    );

    if let (Some(&lo), Some(&hi)) = (ns.first(), ns.last())
        && let (Some(a), Some(b)) = (
            results.stat(lo, Filter::Portgate, Metric::AllowFirst),
            results.stat(hi, Filter::Portgate, Metric::AllowFirst),
        )
        && hi > lo
        && b.median > 3.0 * a.median
        && b.median > 20.0
    {
        let _ = writeln!(
            md,
            "portgate's allow → first packet grows with N ({} ms at N={}, {} ms at N={}): on \
             every change the agent reads the whole allow map back and compares it with the \
             desired entries (`Datapath::sync_allow`), so one more port costs O(N) system calls.\n",
            num(a.median),
            int(lo),
            num(b.median),
            int(hi)
        );
    }
    md
}

/// The program's own cost per packet, sources, and the live path's run-time statistics.
fn program_cost_section(results: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## The program's own cost per packet (BPF_PROG_TEST_RUN)\n"
    );
    let _ = writeln!(
        md,
        "| N allow entries | new connection, N flows | tracked, N flows | new connection, 1 M flows | tracked, 1 M flows | floor |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|");
    for p in &results.prog {
        let fill = |i: usize| p.fills.get(i).copied().unwrap_or((0, f64::NAN, f64::NAN));
        let (_, new0, tr0) = fill(0);
        let (_, new1, tr1) = fill(1);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            int(p.allow_entries),
            num(new0),
            num(tr0),
            num(new1),
            num(tr1),
            num(p.floor_ns)
        );
    }
    if let Some(p) = results.prog.first() {
        let fills: Vec<String> = results
            .prog
            .iter()
            .map(|p| {
                p.fills
                    .iter()
                    .map(|f| int(f.0))
                    .collect::<Vec<_>>()
                    .join(" / ")
            })
            .collect();
        let _ = writeln!(
            md,
            "\nNanoseconds per packet, medians of {} runs per N and column, each on its own \
             frame (`repeat` 1: a SYN's second run would find its own flow): SYNs to an allowed \
             port from sources never seen (the new-connection path: flow lookup misses, allow \
             lookup, flow insert), and ACKs of established flows picked across the whole table \
             (the tracked path). One gate, loaded by the agent, serves every N: the bench \
             resizes its allow map between N (the decoys of a smaller N are a prefix of a \
             larger N's), so the 1 M-flow column uses the very same tracking map at every N, \
             measured in {} rounds over N in rotated order. The N-flow columns fill that map \
             as N grows. \"Floor\": the same call on a frame the program passes at once (sent \
             by the host itself): the kernel's clock reads around one run plus the program's \
             entry. Flows in the tracking map after each column, per N: {} (capacity {}).\n",
            p.samples,
            results.meta.repeats,
            fills.join("; "),
            int(crate::test_run::PROG_FLOW_CAPACITY as usize)
        );
    }

    md.push_str(&sources_section(&results.sources));
    md.push_str(&inpath_section(results));
    md
}

/// The second table: no filter and portgate in a bare host namespace (no conntrack).
pub(super) fn bare_section(results: &Results) -> String {
    let mut md = String::new();
    let ns = &results.meta.ns;
    if !results
        .samples
        .iter()
        .any(|s| Metric::BARE.contains(&s.metric))
    {
        return md;
    }
    let _ = writeln!(md, "## Data path without conntrack (bare host namespace)\n");
    let _ = writeln!(
        md,
        "No netfilter rule at all in the host namespace, so no conntrack: what portgate costs \
         where it is the only filter and nothing tracks connections. iptables and nftables \
         need conntrack and are not measured here. Ratios to no filter, bare, in the same run.\n"
    );
    let _ = writeln!(
        md,
        "| N | new TCP connections/s: no filter | portgate | UDP datagrams/s: no filter | portgate | TCP throughput (Gbit/s): no filter | portgate |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|");
    for &n in ns {
        let mut row = format!("| {} |", int(n));
        for metric in Metric::BARE {
            let _ = write!(
                row,
                " {} | {} |",
                cell(results.stat(n, Filter::None, metric), None),
                cell(
                    results.stat(n, Filter::Portgate, metric),
                    results.ratio(n, Filter::Portgate, metric)
                )
            );
        }
        let _ = writeln!(md, "{row}");
    }
    md.push('\n');
    md
}

/// `--flood`: allowed connections under a SYN flood to a blocked published port.
pub(super) fn flood_section(results: &Results) -> String {
    let mut md = String::new();
    let stats = flood_stats(results);
    if stats.is_empty() {
        return md;
    }
    let cells = results.flood.len() / stats.len().max(1);
    let _ = writeln!(md, "## SYN flood to a blocked published port\n");
    let _ = writeln!(
        md,
        "A container host (DNAT, conntrack on) with N={}; the client connects to the allowed \
         published port (wrk, new connections/s) while the bench's raw frame generator floods \
         the published port that no rule allows with SYNs at full speed, from one source \
         (10.98.0.2, ports cycled) or from random sources (198.18.0.0/15). portgate follows \
         a fake Docker engine of the bench that publishes the two DNATed ports (the early drop \
         learns published host ports from the engine); `--uplink` gates the host's \
         client-facing link, vcli. Medians of {cells} cell(s) per row.\n",
        flood::FLOOD_N
    );
    let _ = writeln!(
        md,
        "| filter | allowed conn/s, no flood | under the flood: one source | random sources | SYN/s: one | random | CPU ns per SYN: one | random | conntrack entries before → after: one | random |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (variant, st) in &stats {
        let f = |i: usize| st.floods.get(i).copied();
        let mut row = format!("| {} | {} |", variant.label(), num(st.idle_cps));
        for i in 0..2 {
            let _ = write!(
                row,
                " {} |",
                f(i).map_or("–".into(), |x| format!(
                    "{} **{:.2}×**",
                    num(x.5),
                    x.5 / st.idle_cps
                ))
            );
        }
        for i in 0..2 {
            let _ = write!(row, " {} |", f(i).map_or("–".into(), |x| num(x.1)));
        }
        for i in 0..2 {
            let _ = write!(
                row,
                " {} |",
                f(i).map_or("–".into(), |x| format!(
                    "{} **{:.1}× control**",
                    num(x.2),
                    x.2 / st.control_ns
                ))
            );
        }
        for i in 0..2 {
            let _ = write!(
                row,
                " {} |",
                f(i).map_or("–".into(), |x| format!("{} → {}", num(x.3), num(x.4)))
            );
        }
        let _ = writeln!(md, "{row}");
    }
    let controls: Vec<String> = stats
        .iter()
        .map(|(v, st)| {
            format!(
                "{} {} ns at {} frames/s",
                v.label(),
                num(st.control_ns),
                num(st.control_rate)
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "\nCPU per SYN: the generator thread's CPU time (CLOCK_THREAD_CPUTIME_ID) plus the \
         ksoftirqd threads', during the flood alone, over the SYNs sent: the host processes \
         each frame in the softirq the sending system call runs (the veth peer's backlog), so \
         its cost lands on that thread (on kernels without IRQ_TIME_ACCOUNTING, as here), and other \
         processes' time does not count. It includes the generator's own sendmmsg, as the \
         control does. The control, \
         measured in every cell: the same random-source flood with a destination MAC address \
         that is not the host's, which the host's link drops (PACKET_OTHERHOST) before any \
         netfilter hook, per frame: {}. The conntrack table (nf_conntrack_count of the host \
         namespace, at most nf_conntrack_max = {}) keeps what the one-source flood left for \
         the random one, as a host would.\n",
        controls.join("; "),
        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".into())
    );
    md
}

/// The new-connection path when rules name sources or a block list is in force, against
/// the plain rule.
pub(super) fn sources_section(sources: &SourceCost) -> String {
    let mut md = String::new();
    let Some((_, plain)) = sources.cases.first() else {
        return md;
    };
    let _ = writeln!(
        md,
        "## Rules with sources, and the block list
"
    );
    let _ = writeln!(md, "| new connection | ns | vs the plain rule |");
    let _ = writeln!(md, "|---|---:|---:|");
    for (case, ns) in &sources.cases {
        let _ = writeln!(md, "| {case} | {} | {:.2}x |", num(*ns), ns / plain);
    }
    let flat = sources
        .cases
        .get(1)
        .zip(sources.cases.get(2))
        .map(|((_, one), (_, many))| many / one);
    let _ = writeln!(
        md,
        "\nThe same SYNs as the new-connection path above (the largest N, a million flows), \
         medians of {} runs per case in interleaved rounds. A rule with sources adds one \
         lookup in the access lists (an LPM trie) for new connections only; the set of \
         10 000 holds 9 999 decoy addresses on the same path through the trie as the \
         admitting prefix. The block list holds 100 000 addresses the SYNs never come from. \
         10 000 prefixes against 1: {}.\n",
        sources.samples,
        flat.map_or("-".to_owned(), |r| format!("{r:.2}x (goal: within 1.20x)"))
    );
    md
}

pub(super) fn table_header(md: &mut String) {
    let _ = writeln!(md, "| N | {} |", Filter::ALL.map(|f| f.label()).join(" | "));
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|");
}

pub(super) fn inpath_section(results: &Results) -> String {
    let mut md = String::new();
    let Some((n, loads)) = &results.inpath else {
        return md;
    };
    let _ = writeln!(md, "## The gate in the real data path\n");
    let _ = writeln!(
        md,
        "One more portgate cell at N={}, with the kernel's BPF run-time statistics on \
         (BPF_ENABLE_STATS; they add two clock reads to every run, so this cell is not part \
         of the figures above): how often each program ran per unit of each load, for how \
         long, and the slowdown that predicts.\n",
        int(*n)
    );
    let _ = writeln!(
        md,
        "| load | toward_containers (bridge egress): runs per unit × ns per run | from_containers (bridge ports' ingress): runs per unit × ns per run | gate ns per unit on the limiting CPU | CPU ns per unit without a filter | predicted slowdown |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for load in loads {
        let prog = |i: usize| {
            load.programs
                .get(i)
                .map_or("–".to_owned(), |(_, runs, ns)| {
                    format!("{:.2} × {}", *runs as f64 / load.units.max(1e-9), num(*ns))
                })
        };
        let gate = gate_ns_on_limit(load);
        let base = unit_cpu_ns(results, *n, load.metric);
        let _ = writeln!(
            md,
            "| {} (per {}) | {} | {} | {} | {} | {} |",
            load.metric.short(),
            load.unit,
            prog(0),
            prog(1),
            num(gate),
            base.map_or("–".into(), num),
            base.map_or("–".into(), |b| format!("{:.1} %", gate / b * 100.0)),
        );
    }
    let _ = writeln!(
        md,
        "\nThe limiting CPU: a datagram or a megabyte of the single stream occupies the \
         sender's CPU, which also forwards it and runs the egress program, for 1/rate (the \
         ingress program runs on the other CPU, for the answers and ACKs); a short connection \
         keeps both CPUs busy for 2/rate, and both programs count.\n"
    );
    md
}
