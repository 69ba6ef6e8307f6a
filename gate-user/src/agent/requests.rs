//! Answers to the control socket's requests: allow, deny, set, block, explain, mode, list,
//! status.

use std::collections::BTreeSet;

use anyhow::{Context as _, bail};
use gate_common::{AllowKey, AllowValue};
use tracing::{error, info};

use super::{
    Agent,
    reconcile::{host_ports, not_fitted_warning, unix_now},
};
use crate::{
    api::{Changed, Reply, Request, Response},
    datapath::GateConfig,
    policy::{
        Access, Admission, Denial, Denials, LabelOrigin, Origin, PolicyError, Ports, Prefix, Saved,
        SourceSpec, Target, Workload, check_interface, is_set_name, rule_target,
    },
    runtime::Container,
};

/// The access of an allow request: its sources parsed, its interface checked, its
/// duration turned into an end time.
fn access(
    from: Vec<String>,
    via: Option<String>,
    for_seconds: Option<u64>,
) -> anyhow::Result<Access> {
    let from = from
        .iter()
        .map(|s| s.parse::<SourceSpec>())
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(name) = &via {
        check_interface(name)?;
    }
    if for_seconds == Some(0) {
        bail!("--for needs a duration above zero, e.g. 2h or 30m");
    }
    Ok(Access {
        from,
        via,
        expires: for_seconds.map(|secs| unix_now().saturating_add(secs)),
    })
}

impl Agent {
    pub(super) fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Allow {
                target,
                ports,
                published,
                host_port,
                from,
                via,
                for_seconds,
            } => access(from, via, for_seconds).and_then(|access| {
                self.change(RuleChange {
                    target,
                    ports,
                    published,
                    host_port,
                    access,
                    allow: true,
                    cut: false,
                })
            }),
            Request::Deny {
                target,
                ports,
                published,
                host_port,
                cut,
            } => self.change(RuleChange {
                target,
                ports,
                published,
                host_port,
                access: Access::default(),
                allow: false,
                cut,
            }),
            Request::Set {
                name,
                prefixes,
                delete,
            } => self.set(&name, &prefixes, delete),
            Request::Block {
                prefixes,
                remove,
                replace,
            } => self.block(&prefixes, remove, replace),
            Request::Explain {
                source,
                target,
                port,
                via,
            } => self
                .explain(&source, &target, &port, via.as_deref())
                .map(Reply::Explained),
            Request::List => {
                let (mut list, views) = self.list();
                list.rules = views.build(|_| true);
                Ok(Reply::List(Box::new(list)))
            }
            Request::Status => self.status().map(|s| Reply::Status(Box::new(s))),
            Request::Mode { audit } => self.set_mode(audit),
            Request::Reload => self.reload().map(|message| self.changed(message)),
            // Served by `serve`, which hands the connection to a streaming task.
            Request::Watch => Err(anyhow::anyhow!("watch is a streaming request")),
        };
        match result {
            Ok(reply) => Response::Ok(reply),
            Err(err) => Response::Error(format!("{err:#}")),
        }
    }

    /// Reads the policy file again and applies it; a file that does not parse changes
    /// nothing.
    pub(super) fn reload(&mut self) -> anyhow::Result<String> {
        let file = super::read_policy_file(&self.options, &self.saved)?;
        let message = format!(
            "policy file {}: {} rules, {} sets, {} blocks",
            self.options.policy_file.display(),
            file.rules.len(),
            file.sets.len(),
            file.blocks.len()
        );
        let previous = std::mem::replace(&mut self.file, file);
        if let Err(err) = self.reconcile() {
            self.file = previous;
            self.reconcile()?;
            return Err(err.context("applying the policy file"));
        }
        info!("{message}");
        Ok(message)
    }

    /// Refuses to change through the control socket what the policy file owns.
    fn owned_by_file(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "{what} comes from the policy file {}: edit it, then `portgate reload`",
            self.options.policy_file.display()
        )
    }

    /// Switches between enforce and audit; the flow table is untouched, so tracked
    /// connections carry on either way.
    pub(super) fn set_mode(&mut self, audit: bool) -> anyhow::Result<Reply> {
        let gate = GateConfig {
            audit,
            ..self.options.gate
        };
        self.datapath.set_config(gate)?;
        self.options.gate = gate;
        let mode = if audit {
            "audit: nothing is dropped, would-be drops are counted"
        } else {
            "enforce"
        };
        let message = format!("mode {mode}; tracked connections kept");
        info!("{message}");
        Ok(Reply::Changed(Changed {
            message,
            rules: Vec::new(),
            warnings: Vec::new(),
        }))
    }

    /// Saves `next` and makes the maps follow it. If that fails, the previous state is
    /// restored in both places.
    pub(super) fn commit(&mut self, next: Saved) -> anyhow::Result<()> {
        self.commit_adding(next, None)
    }

    /// [`commit`](Self::commit), for a change that adds the rule `added`: where that rule
    /// only opens new destinations to anyone, only its entries are written (see
    /// `Resolved::add_open_address_rule`), so an allow costs the same with 100 000 entries
    /// as with 10; anything else reconciles everything.
    fn commit_adding(&mut self, next: Saved, added: Option<u32>) -> anyhow::Result<()> {
        let old_ids: BTreeSet<u32> = self.saved.rules.rules().iter().map(|r| r.id).collect();
        let new_ids: BTreeSet<u32> = next
            .rules
            .rules()
            .iter()
            .map(|r| r.id)
            .filter(|id| !old_ids.contains(id))
            .collect();
        self.store.save(&next)?;
        let previous = std::mem::replace(&mut self.saved, next);
        let applied = self
            .datapath
            .reset_rule_stats(&new_ids)
            .map_err(anyhow::Error::from)
            .and_then(|()| match added.filter(|id| new_ids.contains(id)) {
                Some(id) if self.add_open_rule(id)? => Ok(()),
                _ => self.reconcile(),
            });
        if let Err(err) = applied {
            error!("applying the change failed, restoring the previous state: {err:#}");
            self.saved = previous;
            self.store.save(&self.saved)?;
            self.reconcile()?;
            return Err(err);
        }
        Ok(())
    }

    /// Writes the entries of the saved rule `id` alone, where it adds destinations no other
    /// rule opens, to anyone; false (nothing changed) where a reconcile is needed.
    fn add_open_rule(&mut self, id: u32) -> anyhow::Result<bool> {
        let all_known = self.engines.values().all(|s| s.snapshot.is_some());
        if !all_known || self.allow_sync.not_fitted_entries() != 0 {
            return Ok(false);
        }
        let Some(rule) = self.saved.rules.rules().iter().find(|r| r.id == id) else {
            return Ok(false);
        };
        // (An answer being written on another thread keeps the resolution it was given.)
        let resolved = std::sync::Arc::make_mut(&mut self.resolved);
        let Some(keys) = resolved.add_open_address_rule(rule, unix_now()) else {
            return Ok(false);
        };
        let entries: Vec<(AllowKey, AllowValue)> = keys
            .into_iter()
            .map(|key| (key, AllowValue::any_source(id)))
            .collect();
        // The resolution holds the rule now: on any failure below, a reconcile rebuilds it.
        if !self.datapath.add_allow(&entries)? {
            return Ok(false);
        }
        // An address rule may admit a container port that a host port maps to.
        let host_ports = match self.datapath.allow_written() {
            Some(allow) => host_ports(&self.containers(), allow),
            None => return Ok(false),
        };
        self.datapath
            .sync_host_ports(&host_ports)
            .context("writing the published host ports")?;
        Ok(true)
    }

    /// Applies an allow or deny: saved first, then written to the map.
    pub(super) fn change(&mut self, change: RuleChange) -> anyhow::Result<Reply> {
        let RuleChange {
            target,
            ports,
            published,
            host_port,
            access,
            allow,
            cut,
        } = change;
        let (target, ports) = rule_target(
            Some(target.as_str()),
            ports.as_deref(),
            published,
            host_port.as_deref(),
        )?;
        for spec in &access.from {
            if let SourceSpec::Set(name) = spec
                && !self.saved.sets.contains_key(name)
                && !self.file.sets.contains_key(name)
            {
                return Err(PolicyError::NoSuchSet(name.clone()).into());
            }
        }
        let mut next = self.saved.clone();
        let mut added = None;
        let mut message = if allow {
            let id = next.rules.allow(target.clone(), ports, access.clone())?;
            added = Some(id);
            let until = access
                .expires
                .map(|at| {
                    format!(
                        " until {}",
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_secs(at)
                        )
                    )
                })
                .unwrap_or_default();
            let mut message = format!("allowed {target} {ports}{access}{until} (rule {id})");
            // An allow for anyone, for good, is the operator's word on those ports again; a
            // narrower one leaves the denial closing what labels would open to everyone.
            if access == Access::default() && next.denials.lift(&target, ports) {
                added = None;
                message.push_str(&format!("; lifted the deny of {target} {ports}"));
            }
            message
        } else {
            self.deny(&mut next, &target, ports)?
        };
        let before = std::sync::Arc::clone(&self.resolved);
        self.commit_adding(next, added)?;
        if !allow {
            let changed = super::cut::changed_rules(&before, &self.resolved);
            if cut {
                let ended = self.cut_unadmitted(&changed)?;
                message.push_str(&format!("; {ended} established connections ended"));
            } else {
                message.push_str("; established connections continue (--cut ends them)");
            }
            message.push_str(&self.still_open(&target, ports));
        }
        info!("{message}");
        let rules = self.views(|r| r.target == target);
        if allow && !matches!(target, Target::Address(_)) && !rules.iter().any(|r| r.active) {
            message.push_str("; no such container is running: the rule waits for it (inactive)");
        }
        for rule in &rules {
            if let Some(problem) = &rule.problem {
                message.push_str(&format!("; rule {}: {problem}", rule.id));
            }
        }
        let warnings = not_fitted_warning(&self.allow_sync, self.datapath.capacities().allow)
            .into_iter()
            .collect();
        Ok(Reply::Changed(Changed {
            message,
            rules,
            warnings,
        }))
    }

    /// A deny in `next`: removes the saved rules that cover the ports, and where a label or
    /// the default policy opens them, saves a denial that closes them while it stands. The
    /// message, or why nothing changed.
    fn deny(&self, next: &mut Saved, target: &Target, ports: Ports) -> anyhow::Result<String> {
        let derived = self.derived_opening(target, ports);
        let in_file = self
            .file
            .rules
            .iter()
            .any(|r| r.target == *target && r.ports == ports);
        match next.rules.deny(target, ports) {
            Err(PolicyError::NotAllowed(_)) if in_file => {
                return Err(self.owned_by_file(&format!("the rule for {target} {ports}")));
            }
            Err(PolicyError::NotAllowed(_)) if !derived.is_empty() => {}
            Err(PolicyError::NotAllowed(what)) if next.denials.covers(target, ports) => {
                bail!(
                    "{what} is denied already (`portgate allow {target} {ports}` lifts the deny)"
                );
            }
            result => {
                result?;
            }
        }
        let mut message = format!("denied {target} {ports}");
        if !derived.is_empty() {
            next.denials.add(target.clone(), ports);
            message.push_str(&format!(
                ": closes what {} opened, while the deny stands (`portgate allow {target} {ports}` lifts it)",
                derived.join(", ")
            ));
        }
        Ok(message)
    }

    /// After a deny: the rules that still open some of `ports` on `target` (another
    /// target's saved rule, the policy file), as a note for the reply; empty when none.
    fn still_open(&self, target: &Target, ports: Ports) -> String {
        let workloads: Vec<Workload> = self.containers().iter().map(Container::workload).collect();
        let denial = Denial {
            target: target.clone(),
            ports,
        };
        let ids: BTreeSet<u32> = Denials::new(vec![denial])
            .keys(&workloads)
            .iter()
            .filter_map(|key| self.resolved.entries.get(key))
            .flat_map(|admission| match admission {
                Admission::Any(id) => vec![*id],
                Admission::Restricted(list) => list.iter().map(|r| r.rule_id).collect(),
            })
            .collect();
        let rules: Vec<String> = self
            .resolved
            .rules
            .iter()
            .filter(|r| ids.contains(&r.id))
            .map(|r| {
                let what = match r.source {
                    Origin::Cli => "saved: deny it too",
                    Origin::File => "the policy file's: edit it",
                    Origin::Label => "a label",
                    Origin::DefaultPolicy => "the default policy",
                };
                format!("rule {} ({} {}, {what})", r.id, r.target, r.ports)
            })
            .collect();
        if rules.is_empty() {
            return String::new();
        }
        format!("; still open by {}", rules.join(", "))
    }

    /// What opens some of `ports` on `target` now that a container brings by itself (its
    /// label, the default policy), in words: "the image label of web".
    fn derived_opening(&self, target: &Target, ports: Ports) -> Vec<String> {
        let workloads: Vec<Workload> = self.containers().iter().map(Container::workload).collect();
        let denial = Denial {
            target: target.clone(),
            ports,
        };
        let denied = self.saved.denials.keys(&workloads);
        let keys: BTreeSet<AllowKey> = Denials::new(vec![denial])
            .keys(&workloads)
            .difference(&denied)
            .copied()
            .collect();
        let mut opening: Vec<String> = self
            .resolved
            .rules
            .iter()
            .filter(|r| matches!(r.source, Origin::Label | Origin::DefaultPolicy))
            .filter(|r| r.problem.is_none() && r.opens_any_of(&keys))
            .map(|r| {
                let container = r.containers.join(", ");
                match (r.source, r.label_origin) {
                    (Origin::Label, Some(LabelOrigin::Image)) => {
                        format!("the image label of {container}")
                    }
                    (Origin::Label, _) => format!("the label of {container}"),
                    _ => format!("--default-policy published for {container}"),
                }
            })
            .collect();
        opening.dedup();
        opening
    }

    /// Creates, replaces or deletes a named set; every rule that names it follows at once.
    fn set(&mut self, name: &str, prefixes: &[String], delete: bool) -> anyhow::Result<Reply> {
        if !is_set_name(name) {
            bail!("invalid set name {name:?}: a letter, then letters, digits, '_', '.' or '-'");
        }
        if self.file.sets.contains_key(name) {
            return Err(self.owned_by_file(&format!("set {name}")));
        }
        let mut next = self.saved.clone();
        let message = if delete {
            let users = next.rules.using_set(name);
            if !users.is_empty() {
                let rules: Vec<String> = users.iter().map(ToString::to_string).collect();
                return Err(PolicyError::SetInUse {
                    name: name.to_owned(),
                    rules: rules.join(", "),
                }
                .into());
            }
            if next.sets.remove(name).is_none() {
                return Err(PolicyError::NoSuchSet(name.to_owned()).into());
            }
            format!("deleted set {name}")
        } else {
            let parsed = parse_prefixes(prefixes)?;
            let count = parsed.len();
            next.sets.insert(name.to_owned(), parsed);
            let users = next.rules.using_set(name).len();
            format!(
                "set {name}: {count} prefixes, used by {users} rules; established connections continue"
            )
        };
        self.commit(next)?;
        info!("{message}");
        Ok(self.changed(message))
    }

    /// Adds to, removes from, or replaces the block list.
    fn block(&mut self, prefixes: &[String], remove: bool, replace: bool) -> anyhow::Result<Reply> {
        let parsed = parse_prefixes(prefixes)?;
        let mut next = self.saved.clone();
        let mut message = if replace {
            next.blocks = parsed;
            format!("block list replaced: {} entries", next.blocks.len())
        } else if remove {
            let missing: Vec<String> = parsed
                .iter()
                .filter(|p| !next.blocks.contains(p))
                .map(ToString::to_string)
                .collect();
            if let Some(owned) = parsed.iter().find(|p| self.file.blocks.contains(p)) {
                return Err(self.owned_by_file(&format!("the block of {owned}")));
            }
            if !missing.is_empty() {
                bail!("not on the block list: {}", missing.join(", "));
            }
            next.blocks.retain(|p| !parsed.contains(p));
            format!("unblocked {}", prefixes.join(" "))
        } else {
            next.blocks.extend(parsed);
            format!(
                "blocked {}: new connections from there are dropped whatever allows them",
                prefixes.join(" ")
            )
        };
        let cut_before = self.datapath.flows_cut();
        self.commit(next)?;
        if !remove {
            let ended = self.datapath.flows_cut() - cut_before;
            message.push_str(&format!("; {ended} live connections from there ended"));
        }
        info!("{message}");
        Ok(self.changed(message))
    }

    fn changed(&self, message: String) -> Reply {
        Reply::Changed(Changed {
            message,
            rules: Vec::new(),
            warnings: Vec::new(),
        })
    }
}

/// An allow or deny as asked.
pub(super) struct RuleChange {
    pub target: String,
    pub ports: Option<String>,
    pub published: bool,
    pub host_port: Option<String>,
    pub access: Access,
    pub allow: bool,
    /// For a deny: also end the connections the removed rules admitted.
    pub cut: bool,
}

fn parse_prefixes(prefixes: &[String]) -> Result<BTreeSet<Prefix>, PolicyError> {
    prefixes.iter().map(|p| p.parse()).collect()
}
