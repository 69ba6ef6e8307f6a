//! What `list`, `status`, `watch` and the metrics show, built from the agent's state.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use gate_common::{RuleStats, counters};

use super::Agent;
use crate::{
    api::{
        BridgeDrops, BridgeStatus, EngineStatus, Fill, Flows, IgnoredLabelView, LabelError,
        NetfilterStatus, PolicyFileView, RootlessUserView, RuleList, RuleView, Status,
    },
    exposure,
    policy::{Ports, Prefix, Resolved, ResolvedRule, SourceSets},
    runtime::Container,
};

/// What the rule views are built from, read by the agent loop (the counters in batches); the
/// views themselves, one per rule, are built where the answer is encoded (a blocking thread),
/// so that a `list` or a scrape of 100 000 rules does not hold up the loop.
pub(super) struct ViewInput {
    resolved: Arc<Resolved>,
    stats: BTreeMap<u32, RuleStats>,
    containers: Vec<Container>,
    gated_bridges: BTreeSet<String>,
}

impl ViewInput {
    pub(super) fn build(&self, filter: impl Fn(&ResolvedRule) -> bool) -> Vec<RuleView> {
        self.resolved
            .rules
            .iter()
            .filter(|r| filter(r))
            .map(|rule| {
                let stats = self.stats.get(&rule.id).copied().unwrap_or_default();
                let gated = exposure::rule_gated(rule, &self.containers, &self.gated_bridges);
                rule_view(rule, stats.packets, stats.bytes, gated)
            })
            .collect()
    }
}

impl Agent {
    /// What a scrape reports, read from the datapath; the text is written from it
    /// ([`crate::metrics::encode`]) on a blocking thread.
    pub(super) fn metrics_input(&self) -> anyhow::Result<(Status, ViewInput)> {
        Ok((self.status()?, self.view_input(|_| true)))
    }

    /// The input of the views of the rules `filter` picks.
    pub(super) fn view_input(&self, filter: impl Fn(&ResolvedRule) -> bool) -> ViewInput {
        let ids = self
            .resolved
            .rules
            .iter()
            .filter(|r| filter(r))
            .map(|r| r.id);
        let stats = self.datapath.rule_stats_of(ids).unwrap_or_else(|err| {
            tracing::warn!("reading the rule counters: {err}");
            BTreeMap::new()
        });
        ViewInput {
            resolved: self.resolved.clone(),
            stats,
            containers: self.containers(),
            gated_bridges: self.gated_bridges(),
        }
    }

    pub(super) fn views(&self, filter: impl Fn(&ResolvedRule) -> bool + Copy) -> Vec<RuleView> {
        self.view_input(filter).build(filter)
    }

    /// The bridges and macvlan parents the gate is attached to now.
    pub(super) fn gated_bridges(&self) -> BTreeSet<String> {
        let bridges = self
            .datapath
            .bridges()
            .iter()
            .filter(|b| self.datapath.is_attached(b))
            .map(|b| b.name.clone());
        bridges
            .chain(self.datapath.macvlan_parents().values().cloned())
            .collect()
    }

    /// `list`: everything but the rule views, with what builds them (see [`ViewInput`]).
    pub(super) fn list(&self) -> (RuleList, ViewInput) {
        let texts = |set: &BTreeSet<Prefix>| set.iter().map(ToString::to_string).collect();
        let sets = |sets: &SourceSets| {
            sets.iter()
                .map(|(name, prefixes)| (name.clone(), texts(prefixes)))
                .collect()
        };
        let file = &self.file;
        let policy_file = (!file.path.as_os_str().is_empty()).then(|| PolicyFileView {
            path: file.path.display().to_string(),
            sets: sets(&file.sets),
            blocks: texts(&file.blocks),
        });
        let mut all_sets = self.saved.sets.clone();
        all_sets.extend(file.sets.clone());
        let list = RuleList {
            rules: Vec::new(),
            sets: sets(&all_sets),
            blocks: texts(&self.saved.blocks.union(&file.blocks).copied().collect()),
            label_errors: self.label_errors(),
            ignored_labels: self.ignored_labels(),
            denials: self
                .saved
                .denials
                .list()
                .iter()
                .map(ToString::to_string)
                .collect(),
            policy_file,
            rootless: exposure::rootless(&self.containers()),
        };
        (list, self.view_input(|_| true))
    }

    fn label_errors(&self) -> Vec<LabelError> {
        self.resolved
            .label_errors
            .iter()
            .map(|(container, error)| LabelError {
                container: container.clone(),
                error: error.clone(),
            })
            .collect()
    }

    fn ignored_labels(&self) -> Vec<IgnoredLabelView> {
        self.resolved
            .ignored_labels
            .iter()
            .map(|ignored| IgnoredLabelView {
                container: ignored.container.clone(),
                label: ignored.label.clone(),
                origin: ignored.origin,
                warning: ignored.warning(),
            })
            .collect()
    }

    pub(super) fn status(&self) -> anyhow::Result<Status> {
        let (containers, gated_bridges) = (self.containers(), self.gated_bridges());
        Ok(Status {
            mode: if self.options.gate.audit {
                "audit"
            } else {
                "enforce"
            }
            .to_owned(),
            gate_host_traffic: self.options.gate.gate_host_traffic,
            bpffs: self.options.bpffs.display().to_string(),
            state_file: self.store.path().display().to_string(),
            bridges: self
                .datapath
                .bridges()
                .iter()
                .map(|b| BridgeStatus {
                    name: b.name.clone(),
                    ifindex: b.ifindex,
                    attached: self.datapath.is_attached(b),
                })
                .collect(),
            rules: self.resolved.rules.len(),
            allow_entries: Fill {
                used: self.datapath.allow_entries()?,
                capacity: self.datapath.capacities().allow,
                not_fitted: self.allow_sync.not_fitted_entries(),
                not_fitted_rules: self.allow_sync.not_fitted.keys().copied().collect(),
            },
            flows: Flows {
                tracked: self.datapath.tracked_flows()?,
                capacity: self.datapath.capacities().flows,
                cut: self.datapath.flows_cut(),
            },
            engines: self.engine_statuses(),
            bridge_drops: self
                .datapath
                .bridge_drops()?
                .into_iter()
                .map(|(key, packets)| BridgeDrops {
                    bridge: self.bridge_name(key.ifindex),
                    reason: counter_name(key.reason),
                    packets,
                })
                .collect(),
            drop_events: self.drop_events,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            labels: self.options.labels != crate::policy::LabelPolicy::Off,
            label_policy: self.options.labels,
            ignored_labels: self.ignored_labels(),
            published_ports: exposure::published_ports(&containers, &gated_bridges),
            ungated: containers
                .iter()
                .filter_map(|c| exposure::ungated(c, &gated_bridges))
                .collect(),
            netfilter: self.netfilter_statuses(),
            counters: self.counters_by_kind()?,
            label_errors: self.label_errors(),
            blocks: self.saved.blocks.union(&self.file.blocks).count(),
            uplinks: self
                .datapath
                .uplinks()
                .iter()
                .map(|(ifindex, name)| BridgeStatus {
                    name: name.clone(),
                    ifindex: *ifindex,
                    attached: true,
                })
                .collect(),
            rootless: exposure::rootless(&containers),
            rootless_users: self.rootless_users(),
        })
    }

    /// The datapath's counters by kind (pass, drop, event) and name.
    fn counters_by_kind(&self) -> anyhow::Result<BTreeMap<String, BTreeMap<String, u64>>> {
        let values = self.datapath.counters()?;
        let mut by_kind: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (index, name, kind) in counters::ALL {
            let kind = match kind {
                counters::Kind::Pass => "pass",
                counters::Kind::Drop => "drop",
                counters::Kind::Event => "event",
            };
            let value = values.get(*index as usize).copied().unwrap_or(0);
            by_kind
                .entry(kind.to_owned())
                .or_default()
                .insert((*name).to_owned(), value);
        }
        Ok(by_kind)
    }

    fn engine_statuses(&self) -> Vec<EngineStatus> {
        self.engines
            .iter()
            .map(|(engine, s)| {
                let info = s.snapshot.as_ref().map(|s| &s.info);
                EngineStatus {
                    engine: engine.to_string(),
                    socket: s.socket.display().to_string(),
                    connected: s.connected,
                    containers: s.snapshot.as_ref().map_or(0, |s| s.containers.len()),
                    syncs: s.syncs,
                    events: s.events,
                    last_error: s.last_error.clone(),
                    version: info.and_then(|i| i.version.clone()),
                    network_backend: info.and_then(|i| i.network_backend.clone()),
                    firewall: info.and_then(|i| i.firewall.clone()),
                }
            })
            .collect()
    }

    fn netfilter_statuses(&self) -> Vec<NetfilterStatus> {
        let Some(delegation) = &self.delegation else {
            return Vec::new();
        };
        delegation
            .status()
            .into_iter()
            .map(|n| NetfilterStatus {
                bridge: n.bridge,
                backend: n.backend,
                chain: n.chain,
                installed: n.installed,
                replies: n.replies,
            })
            .collect()
    }
}

impl Agent {
    /// The users whose rootless engines the watcher found, as it last saw them.
    fn rootless_users(&self) -> Vec<RootlessUserView> {
        self.engines
            .get(&crate::runtime::Engine::RootlessPodman)
            .and_then(|s| s.snapshot.as_ref())
            .map(|s| {
                s.rootless
                    .iter()
                    .map(|u| RootlessUserView {
                        user: u.user.clone(),
                        uid: u.uid,
                        helpers: u.helpers.clone(),
                        listening: u
                            .listening
                            .iter()
                            .map(|(proto, port)| format!("{port}/{proto}"))
                            .collect(),
                        containers: u.containers,
                        followed: u.followed,
                        error: u
                            .error
                            .clone()
                            .or_else(|| (!u.followed).then(|| ROOTLESS_DOCKER_ADVICE.to_owned())),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What it would take to gate a rootless Docker's ports.
pub const ROOTLESS_DOCKER_ADVICE: &str = "rootless Docker (rootlesskit) is not followed: its published ports are listening sockets of the host that nothing gates; run the containers with rootful Docker or Podman, or rootless Podman, which the agent follows, or filter the ports in the host's input firewall";

fn rule_view(rule: &ResolvedRule, packets: u64, bytes: u64, gated: Option<bool>) -> RuleView {
    let (protocol, port_start, port_end) = match rule.ports {
        Ports::Spec(spec) => (spec.protocol.to_string(), spec.port_start, spec.port_end),
        Ports::Published => ("published".to_owned(), 0, 0),
    };
    RuleView {
        id: rule.id,
        target: rule.target.to_string(),
        container: rule.containers.first().cloned(),
        published: rule.ports == Ports::Published,
        source: rule.source,
        active: rule.is_active(),
        address: rule
            .addresses
            .first()
            .map_or_else(|| rule.target.to_string(), ToString::to_string),
        addresses: rule.addresses.iter().map(ToString::to_string).collect(),
        ports: rule.specs.iter().map(ToString::to_string).collect(),
        host_ports: rule.host_ports.clone(),
        protocol,
        port_start,
        port_end,
        packets,
        bytes,
        label_origin: rule.label_origin,
        gated,
        from: rule.access.from.iter().map(ToString::to_string).collect(),
        via: rule.access.via.clone(),
        expires: rule.access.expires.map(|at| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(at);
            humantime::format_rfc3339_seconds(at).to_string()
        }),
        expires_in_seconds: rule
            .access
            .expires
            .map(|at| at.saturating_sub(super::reconcile::unix_now())),
        problem: rule.problem.clone(),
    }
}

pub(super) fn counter_name(index: u32) -> String {
    counters::ALL
        .iter()
        .find(|(i, _, _)| *i == index)
        .map_or_else(
            || format!("counter {index}"),
            |(_, name, _)| (*name).to_owned(),
        )
}

pub(super) fn protocol_name(proto: u8) -> String {
    match proto {
        gate_common::PROTO_TCP => "tcp".to_owned(),
        gate_common::PROTO_UDP => "udp".to_owned(),
        gate_common::PROTO_ICMP => "icmp".to_owned(),
        gate_common::PROTO_ICMPV6 => "icmpv6".to_owned(),
        other => other.to_string(),
    }
}
