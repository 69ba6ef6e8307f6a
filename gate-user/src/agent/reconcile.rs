//! Rules × containers → the kernel's maps: the allow map, and the published host ports the
//! socket lookup gates.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use gate_common::{AllowKey, AllowValue, NO_RULE};
use tracing::{info, warn};

use super::Agent;
use crate::{
    datapath::{AllowSync, Desired},
    policy::{Context, Target, Workload, map_addr},
    runtime::Container,
};

impl Agent {
    /// The interfaces the rules' `--via` name, that exist now, with their ifindex.
    pub(super) fn interfaces(&self) -> BTreeMap<String, u32> {
        let saved = self.saved.rules.rules().iter().map(|r| &r.access);
        let file = self.file.rules.iter().map(|r| &r.access);
        saved
            .chain(file)
            .filter_map(|access| access.via.as_ref())
            .filter_map(|name| Some((name.clone(), crate::datapath::sys::ifindex(name)?)))
            .collect()
    }

    /// Removes the saved rules whose time is up, and closes what they opened.
    pub(super) fn expire_rules(&mut self) -> anyhow::Result<()> {
        let now = unix_now();
        // Most ticks nothing is due: no copy of the saved state then.
        if !self.saved.rules.any_due(now) {
            return Ok(());
        }
        let mut next = self.saved.clone();
        let gone = next.rules.expire(now);
        info!(rules = ?gone, "rules expired");
        self.commit(next).context("removing expired rules")?;
        // Temporary access means temporary: what the rules admitted ends with them.
        let ended = self.cut_unadmitted(&gone.into_iter().collect())?;
        if ended > 0 {
            info!(
                connections = ended,
                "ended the connections of expired rules"
            );
        }
        Ok(())
    }

    pub(super) fn containers(&self) -> Vec<Container> {
        self.engines
            .values()
            .filter_map(|s| s.snapshot.as_ref())
            .flat_map(|s| s.containers.iter().cloned())
            .collect()
    }

    /// Resolves the rules against the containers and writes the allow map. Until every engine
    /// has reported, entries of rules that depend on containers (saved container rules,
    /// labels, the default policy) stay as they are: an agent that just started must not drop
    /// what its predecessor allowed for containers it has not seen yet. Everything else (an
    /// address rule, a denied rule) is exact at once.
    pub(super) fn reconcile(&mut self) -> anyhow::Result<()> {
        let workloads: Vec<Workload> = self.containers().iter().map(Container::workload).collect();
        let mut sets = self.saved.sets.clone();
        sets.extend(self.file.sets.clone());
        let context = Context {
            default_published: self.options.default_published,
            sets,
            interfaces: self.interfaces(),
            now: unix_now(),
            file_rules: self.file.rules.clone(),
            denials: self.saved.denials.clone(),
        };
        let resolved = self
            .resolver
            .resolve(&self.saved.rules, &workloads, &context);
        let all_known = self.engines.values().all(|s| s.snapshot.is_some());
        let container_rules: BTreeSet<u32> = self
            .saved
            .rules
            .rules()
            .iter()
            .filter(|r| matches!(r.target, Target::Container(_) | Target::HostPort { .. }))
            .map(|r| r.id)
            .collect();
        let saved_ids = self.options.capacities.saved_ids();
        let waits_for_engines = |value: &gate_common::AllowValue| {
            !all_known
                && (!saved_ids.contains(&value.rule_id) || container_rules.contains(&value.rule_id))
        };
        self.datapath.reset_rule_stats(&resolved.new_ids)?;
        let blocks = self
            .saved
            .blocks
            .union(&self.file.blocks)
            .copied()
            .collect();
        let containers = self.containers();
        let host_ports = |allow: &BTreeMap<AllowKey, AllowValue>| host_ports(&containers, allow);
        let applied = self.datapath.apply(&Desired {
            blocks: &blocks,
            entries: &resolved.entries,
            keep_stale: &waits_for_engines,
            // Until every engine has reported, the host ports stay as the last agent left them.
            host_ports: all_known.then_some(&host_ports as _),
        })?;
        if applied.ended > 0 {
            info!(
                connections = applied.ended,
                "ended the connections from newly blocked sources"
            );
        }
        let sync = applied.allow;
        self.via_interfaces = context.interfaces;
        if sync != self.allow_sync {
            match not_fitted_warning(&sync, self.datapath.capacities().allow) {
                Some(warning) => warn!("{warning}"),
                None => info!("every allow entry fits in the allow map again"),
            }
        }
        self.allow_sync = sync;
        self.warn_ignored_labels(&resolved);
        self.resolved = std::sync::Arc::new(resolved);
        // Containers changed: look at the bridge ports again.
        self.ports_stale = true;
        Ok(())
    }
}

impl Agent {
    /// Says in the log, once per container (at start, then as each new one appears), that
    /// its image's label opens nothing: such a label opened ports before `--labels container`
    /// became the default, and a port must not close without a word.
    fn warn_ignored_labels(&mut self, resolved: &crate::policy::Resolved) {
        let current: BTreeSet<&str> = resolved
            .ignored_labels
            .iter()
            .map(|i| i.container_id.as_str())
            .collect();
        self.warned_labels
            .retain(|id| current.contains(id.as_str()));
        for ignored in &resolved.ignored_labels {
            if self.warned_labels.insert(ignored.container_id.clone()) {
                warn!("{}", ignored.warning());
            }
        }
    }
}

/// Each published host port, with the rule that admits the container port it maps to, or
/// `NO_RULE`. Keyed as `host_ports` looks them up: the host address, or all-zero for a port
/// published on every address. Where several mappings share a key, one that is not admitted
/// closes it (fail closed).
pub(super) fn host_ports(
    containers: &[Container],
    allow: &BTreeMap<AllowKey, AllowValue>,
) -> BTreeMap<AllowKey, AllowValue> {
    let mut entries = BTreeMap::new();
    for container in containers {
        for published in &container.published {
            let host_addr = if published.host_ip.is_unspecified() {
                [0; 16]
            } else {
                map_addr(published.host_ip)
            };
            let proto = published.protocol.number(published.host_ip);
            let value = container
                .addresses
                .iter()
                .find_map(|addr| {
                    let key = AllowKey::new(
                        map_addr(*addr),
                        published.protocol.number(*addr),
                        published.container_port,
                    );
                    allow.get(&key).copied()
                })
                .unwrap_or(AllowValue::any_source(NO_RULE));
            let key = AllowKey::new(host_addr, proto, published.host_port);
            let entry = entries.entry(key).or_insert(value);
            if value.rule_id == NO_RULE {
                *entry = value;
            }
        }
    }
    entries
}

/// Says what the allow map left out, if anything: how many entries, of which rules.
pub(super) fn not_fitted_warning(sync: &AllowSync, capacity: u32) -> Option<String> {
    let entries = sync.not_fitted_entries();
    if entries == 0 {
        return None;
    }
    let rules: Vec<String> = sync.not_fitted.keys().map(ToString::to_string).collect();
    let (noun, verb) = if entries == 1 {
        ("entry", "is")
    } else {
        ("entries", "are")
    };
    let of = if rules.len() == 1 { "rule" } else { "rules" };
    Some(format!(
        "the allow map is full ({capacity} entries, --max-allow): {entries} allow {noun} of {of} {} did not fit and {verb} not enforced; deny what is no longer needed or raise --max-allow",
        rules.join(", ")
    ))
}

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
