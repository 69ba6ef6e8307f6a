//! The metric families of one scrape, built from the agent's status and rule views.

use std::collections::BTreeMap;

use gate_common::counters;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, MetricEncoder},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Unit,
};

use crate::{
    api::{RuleView, Status},
    policy::Origin,
};

/// Everything one scrape reports, owned so that a registry can hold it.
#[derive(Debug)]
pub(super) struct Snapshot {
    families: Vec<Family>,
    version: String,
}

#[derive(Debug)]
struct Family {
    /// Without the `portgate_` prefix, the unit and (counters) `_total`.
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: Kind,
    samples: Vec<(Labels, u64)>,
}

type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Counter,
    Gauge,
}

impl Family {
    fn new(kind: Kind, name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            unit: None,
            kind,
            samples: Vec::new(),
        }
    }

    fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(Kind::Counter, name, help)
    }

    fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(Kind::Gauge, name, help)
    }

    fn unit(mut self, unit: Unit) -> Self {
        self.unit = Some(unit);
        self
    }

    fn sample(mut self, labels: Labels, value: u64) -> Self {
        self.samples.push((labels, value));
        self
    }

    fn samples(mut self, samples: impl IntoIterator<Item = (Labels, u64)>) -> Self {
        self.samples.extend(samples);
        self
    }
}

fn flag(on: bool) -> u64 {
    u64::from(on)
}

fn source_name(source: Origin) -> &'static str {
    match source {
        Origin::Cli => "cli",
        Origin::Label => "label",
        Origin::DefaultPolicy => "default-policy",
        Origin::File => "file",
    }
}

/// `80`, `8000-8010`, or empty for rules without ports (ICMP echo, `--published`).
fn port_label(rule: &RuleView) -> String {
    match (rule.port_start, rule.port_end) {
        (0, _) => String::new(),
        (start, end) if start == end => start.to_string(),
        (start, end) => format!("{start}-{end}"),
    }
}

impl Snapshot {
    pub(super) fn new(status: &Status, rules: &[RuleView]) -> Self {
        let mut families = rule_families(rules);
        families.extend(datapath_families(status));
        families.extend(table_families(status));
        families.extend(host_families(status));
        Self {
            families,
            version: status.version.clone(),
        }
    }
}

/// Per-rule traffic, and rules by source and state.
fn rule_families(rules: &[RuleView]) -> Vec<Family> {
    let mut rule_counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for source in [
        Origin::Cli,
        Origin::Label,
        Origin::DefaultPolicy,
        Origin::File,
    ] {
        for state in ["active", "inactive"] {
            rule_counts.insert((source_name(source), state), 0);
        }
    }
    for rule in rules {
        let state = if rule.active { "active" } else { "inactive" };
        *rule_counts
            .entry((source_name(rule.source), state))
            .or_default() += 1;
    }
    let rule_labels = |rule: &RuleView| -> Labels {
        vec![
            ("rule", rule.id.to_string()),
            ("source", source_name(rule.source).to_owned()),
            ("target", rule.target.clone()),
            ("container", rule.container.clone().unwrap_or_default()),
            ("address", rule.address.clone()),
            ("port", port_label(rule)),
            ("protocol", rule.protocol.clone()),
            ("from", rule.from.join(",")),
            ("via", rule.via.clone().unwrap_or_default()),
        ]
    };
    vec![
        Family::counter(
            "rule_packets",
            "Packets of the connections each rule admitted, both directions, on all gated bridges together (the datapath counts per rule, not per bridge). port is empty for ICMP echo and --published rules; address is the first address the rule resolves to, or its target while inactive; from (prefixes and set names, comma-separated) and via are empty for rules that admit anyone.",
        )
        .samples(rules.iter().map(|r| (rule_labels(r), r.packets))),
        Family::counter(
            "rule",
            "Bytes (IP packet length) of the connections each rule admitted, both directions, on all gated bridges together. Labels as for portgate_rule_packets_total.",
        )
        .unit(Unit::Bytes)
        .samples(rules.iter().map(|r| (rule_labels(r), r.bytes))),
        Family::gauge(
            "rules",
            "Rules by source (cli, label, default-policy, file) and state: active rules open at least one port on at least one address; inactive ones wait for their container.",
        )
        .samples(
            rule_counts
                .into_iter()
                .map(|((source, state), n)| (vec![("source", source.to_owned()), ("state", state.to_owned())], n)),
        ),
    ]
}

/// Verdicts, drops per bridge, datapath events, drop events.
fn datapath_families(status: &Status) -> Vec<Family> {
    let counter = |kind: &str, name: &str| {
        status
            .counters
            .get(kind)
            .and_then(|c| c.get(name))
            .copied()
            .unwrap_or(0)
    };
    let verdicts = ["pass", "drop"].into_iter().flat_map(|verdict| {
        status
            .counters
            .get(verdict)
            .into_iter()
            .flatten()
            .map(move |(reason, value)| {
                (
                    vec![("verdict", verdict.to_owned()), ("reason", reason.clone())],
                    *value,
                )
            })
    });
    let events = status
        .counters
        .get("event")
        .into_iter()
        .flatten()
        .map(|(event, value)| (vec![("event", event.clone())], *value));

    // Every (bridge, drop reason) from the start, so that rate() and increase() see the
    // first drop; summed in case two entries carry one name (a re-created bridge).
    let mut drops: BTreeMap<(String, String), u64> = BTreeMap::new();
    for bridge in &status.bridges {
        for (_, reason, kind) in counters::ALL {
            if *kind == counters::Kind::Drop {
                drops
                    .entry((bridge.name.clone(), (*reason).to_owned()))
                    .or_default();
            }
        }
    }
    for d in &status.bridge_drops {
        *drops
            .entry((d.bridge.clone(), d.reason.clone()))
            .or_default() += d.packets;
    }
    vec![
        Family::counter(
            "packets",
            "Packets the datapath gave a verdict, by verdict (pass or drop) and reason, on all gated bridges. In audit mode, drop counts what enforce mode would have dropped (those packets passed).",
        )
        .samples(verdicts),
        Family::counter(
            "drops",
            "Packets dropped (in audit mode: that enforce mode would have dropped) per gated bridge and reason.",
        )
        .samples(
            drops
                .into_iter()
                .map(|((bridge, reason), n)| (vec![("bridge", bridge), ("reason", reason)], n)),
        ),
        Family::counter(
            "connections_accepted",
            "New connections (TCP SYN, first UDP datagram, ICMP echo request) admitted because an allow rule matched.",
        )
        .sample(vec![], counter("pass", counters::ALL[counters::PASS_NEW_ALLOWED as usize].1)),
        Family::counter(
            "datapath_events",
            "Datapath events that are not verdicts: flow_created and flow_insert_failed (tracking table), audit_passed, ip_options, ipv6_extensions.",
        )
        .samples(events),
        Family::counter("drop_events_reported", "Drop events the agent read from the datapath.")
            .sample(vec![], status.drop_events.reported),
        Family::counter(
            "drop_events_suppressed",
            "Drop events lost: suppressed by the datapath's rate limit, or while the agent was behind.",
        )
        .sample(vec![], status.drop_events.suppressed),
    ]
}

/// The connection tracking table and the allow map.
fn table_families(status: &Status) -> Vec<Family> {
    vec![
        Family::gauge(
            "tracked_connections",
            "Entries in the connection tracking table, including idle ones not yet evicted.",
        )
        .sample(vec![], status.flows.tracked as u64),
        Family::gauge(
            "tracked_connections_capacity",
            "Entries the connection tracking table holds; when full, the least recently used go first.",
        )
        .sample(vec![], u64::from(status.flows.capacity)),
        Family::counter(
            "connections_cut",
            "Established connections the agent ended: blocked sources, deny --cut, the end of a rule's --for (their later packets count as drops with reason cut).",
        )
        .sample(vec![], status.flows.cut),
        Family::gauge("allow_entries", "Entries in the allow map: (address, protocol, port) triples the rules open now.")
            .sample(vec![], status.allow_entries.used as u64),
        Family::gauge("allow_entries_capacity", "Entries the allow map holds.")
            .sample(vec![], u64::from(status.allow_entries.capacity)),
        Family::gauge(
            "allow_entries_not_fitted",
            "Entries the rules want that did not fit in the full allow map, so are not enforced (see --max-allow).",
        )
        .sample(vec![], status.allow_entries.not_fitted as u64),
    ]
}

/// What is gated on this host: bridges, engines, rootless engines, the netfilter
/// delegation, and the agent's mode.
fn host_families(status: &Status) -> Vec<Family> {
    let mut attached: BTreeMap<&str, bool> = BTreeMap::new();
    for bridge in &status.bridges {
        *attached.entry(bridge.name.as_str()).or_default() |= bridge.attached;
    }
    let engine = |name: &str| vec![("engine", name.to_owned())];
    vec![
        Family::gauge(
            "ungated_containers",
            "Running containers whose ports the gate does not (fully) see: on the host network, a macvlan or ipvlan network, or a bridge that is not gated.",
        )
        .sample(vec![], status.ungated.len() as u64),
        Family::gauge("bridge_attached", "1 when the gate's programs are attached to the bridge, else 0.")
            .samples(attached.into_iter().map(|(bridge, on)| (vec![("bridge", bridge.to_owned())], flag(on)))),
        Family::gauge("engine_connected", "1 while the agent reaches the container engine's API, else 0.")
            .samples(status.engines.iter().map(|e| (engine(&e.engine), flag(e.connected)))),
        Family::gauge("engine_containers", "Running containers in the engine's last snapshot.")
            .samples(status.engines.iter().map(|e| (engine(&e.engine), e.containers as u64))),
        Family::counter(
            "engine_syncs",
            "Snapshots of the engine's containers taken (at connect, after events, periodically).",
        )
        .samples(status.engines.iter().map(|e| (engine(&e.engine), e.syncs))),
        Family::counter("engine_events", "Snapshots taken because the engine reported an event.")
            .samples(status.engines.iter().map(|e| (engine(&e.engine), e.events))),
        Family::gauge(
            "rootless_published_port",
            "Each published port of a container of a user's rootless engine (a listening socket of the host): 1 when the gate judges connections to it, else 0.",
        )
        .samples(status.rootless.iter().flat_map(|c| {
            c.published.iter().map(|published| {
                let labels = vec![
                    ("user", c.user.clone()),
                    ("container", c.container.clone()),
                    ("engine", c.engine.clone()),
                    ("published", published.clone()),
                ];
                (labels, flag(c.gated))
            })
        })),
        Family::gauge(
            "rootless_user_followed",
            "1 for each user whose rootless engine the agent reads, 0 for one it cannot read (or does not follow: rootless Docker).",
        )
        .samples(status.rootless_users.iter().map(|u| {
            (vec![("user", u.user.clone())], flag(u.followed && u.error.is_none()))
        })),
        Family::gauge(
            "netfilter_delegation_installed",
            "1 when the netfilter rule that hands a bridge's published ports to the gate is in place, else 0.",
        )
        .samples(status.netfilter.iter().map(|n| {
            let mut labels = vec![
                ("bridge", n.bridge.clone()),
                ("backend", n.backend.clone()),
                ("chain", n.chain.clone()),
            ];
            // Only bridges of nftables-only engines have a replies rule; the rule toward
            // the bridge keeps the labels it always had.
            if n.replies {
                labels.push(("rule", "replies".to_owned()));
            }
            (labels, flag(n.installed))
        })),
        Family::gauge("audit_mode", "1 in audit mode (would-be drops are counted and passed), 0 when enforcing.")
            .sample(vec![], flag(status.mode == "audit")),
        Family::gauge("host_traffic_gated", "1 when connections from the host's own stack are gated too, else 0.")
            .sample(vec![], flag(status.gate_host_traffic)),
    ]
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.families {
            let metric_type = match family.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut metric = encoder.encode_descriptor(
                family.name,
                family.help,
                family.unit.as_ref(),
                metric_type,
            )?;
            let encode = |value: u64, sample: MetricEncoder| match family.kind {
                Kind::Counter => ConstCounter::new(value).encode(sample),
                Kind::Gauge => ConstGauge::new(value).encode(sample),
            };
            match family.samples.as_slice() {
                // Without labels: `name 1`, not `name{} 1`.
                [(labels, value)] if labels.is_empty() => encode(*value, metric)?,
                samples => {
                    for (labels, value) in samples {
                        encode(*value, metric.encode_family(labels)?)?;
                    }
                }
            }
        }
        let info = Info::new(vec![("version", self.version.clone())]);
        let metric = encoder.encode_descriptor(
            "build",
            "The running portgate agent's version; always 1.",
            None,
            info.metric_type(),
        )?;
        info.encode(metric)
    }
}
