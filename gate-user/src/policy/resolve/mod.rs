//! Rules × containers → the allow map. Saved rules name an address or a container; the
//! running containers add rules of their own (the `portgate.allow` label, the default
//! policy). The result says, per rule, what it resolved to, and holds the map's content.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use gate_common::{AllowKey, MAX_RULES};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{ALLOW_LABEL, Denials, IgnoredLabel, LabelOrigin, LabelPolicy, PolicyError, Workload};
use super::{
    Access, DEFAULT_SAVED_RULES, FileRule, PortSpec, Ports, Restriction, Rule, RuleSet, SourceSets,
    Target, expand,
};

/// Where a rule comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// `portgate allow`, saved.
    Cli,
    /// A container's `portgate.allow` label, while it runs.
    Label,
    /// `--default-policy published`, while the container runs.
    DefaultPolicy,
    /// The policy file, while it says so.
    File,
}

/// A rule as it stands now.
#[derive(Clone, Debug)]
pub struct ResolvedRule {
    pub id: u32,
    pub source: Origin,
    pub target: Target,
    pub ports: Ports,
    /// Names of the running containers the target matched.
    pub containers: Vec<String>,
    pub addresses: Vec<IpAddr>,
    /// The port specs in force (a `--published` rule: one per published port).
    pub specs: Vec<PortSpec>,
    /// Host ports that the engines map to this rule's container ports.
    pub host_ports: Vec<u16>,
    /// For a label rule: whether the label is the image's or was set on the container.
    pub label_origin: Option<LabelOrigin>,
    pub access: Access,
    /// Why the rule admits less than it says, e.g. its `--via` interface does not exist.
    pub problem: Option<String>,
}

impl ResolvedRule {
    /// A rule is active when it opens at least one port on at least one address.
    pub fn is_active(&self) -> bool {
        !self.addresses.is_empty() && !self.specs.is_empty() && self.problem.is_none()
    }

    /// Whether the rule's destinations include one of `keys`.
    pub fn opens_any_of(&self, keys: &BTreeSet<AllowKey>) -> bool {
        allow_keys(self).any(|key| keys.contains(&key))
    }
}

/// Who may open connections to one destination (address, protocol, port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Anyone, by this rule (the lowest id among the rules that admit anyone).
    Any(u32),
    /// Only what these rules' sources and interfaces admit (possibly nobody: every rule
    /// names an interface that does not exist).
    Restricted(Vec<Restriction>),
}

impl Admission {
    /// Whether `source` may connect on some interface.
    pub fn admits_from(&self, source: IpAddr) -> bool {
        match self {
            Self::Any(_) => true,
            Self::Restricted(list) => list
                .iter()
                .any(|r| r.prefixes.is_empty() || r.prefixes.iter().any(|p| p.contains(source))),
        }
    }

    /// The rule counted for the destination as a whole: the admitting one, or the lowest id.
    pub fn rule_id(&self) -> u32 {
        match self {
            Self::Any(id) => *id,
            Self::Restricted(list) => list
                .iter()
                .map(|r| r.rule_id)
                .min()
                .unwrap_or(gate_common::NO_RULE),
        }
    }
}

/// What rules are resolved against besides the containers.
#[derive(Debug, Default)]
pub struct Context {
    /// `--default-policy published`.
    pub default_published: bool,
    pub sets: SourceSets,
    /// Interface names to ifindexes, for `--via`.
    pub interfaces: BTreeMap<String, u32>,
    /// Unix seconds: rules whose time is up open nothing.
    pub now: u64,
    /// The policy file's rules.
    pub file_rules: Vec<FileRule>,
    /// What `portgate deny` closed that labels or the default policy open.
    pub denials: Denials,
}

#[derive(Clone, Debug, Default)]
pub struct Resolved {
    pub rules: Vec<ResolvedRule>,
    /// Who may connect to each destination: the allow map's content before the access lists
    /// get their ids.
    pub entries: BTreeMap<AllowKey, Admission>,
    /// Containers whose `portgate.allow` label does not parse (it opens nothing), and why.
    pub label_errors: Vec<(String, String)>,
    /// Containers whose label is (or may be) their image's, which `--labels container`
    /// does not honour.
    pub ignored_labels: Vec<IgnoredLabel>,
    /// Ids given to derived rules in this round: their counters must start from zero.
    pub new_ids: BTreeSet<u32>,
}

/// Keeps the ids of derived rules stable while their container runs, so their counters
/// accumulate across re-syncs.
#[derive(Debug)]
pub struct Resolver {
    derived_ids: BTreeMap<DerivedKey, u32>,
    /// Which containers' `portgate.allow` labels open ports (`agent --labels`).
    labels: LabelPolicy,
    /// The rule ids derived rules take (those above the saved rules').
    slots: std::ops::Range<u32>,
}

impl Default for Resolver {
    /// Labels set on the container honoured, the image's not (the agent's default).
    fn default() -> Self {
        Self::new(LabelPolicy::default())
    }
}

impl Resolver {
    /// A resolver that honours the `portgate.allow` labels `labels` says.
    pub fn new(labels: LabelPolicy) -> Self {
        Self {
            derived_ids: BTreeMap::new(),
            labels,
            slots: DEFAULT_SAVED_RULES..MAX_RULES,
        }
    }

    /// The same resolver, giving derived rules the ids of `slots`.
    pub fn with_slots(mut self, slots: std::ops::Range<u32>) -> Self {
        self.slots = slots;
        self
    }

    /// How many derived rules fit.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Resolves the saved rules, then the rules derived from the policy file and the
    /// containers (labels, the default policy), then who may connect to each destination.
    pub fn resolve(
        &mut self,
        rules: &RuleSet,
        containers: &[Workload],
        context: &Context,
    ) -> Resolved {
        let mut resolved = Resolved::default();
        for rule in rules.rules() {
            let matched = matching(&rule.target, containers);
            let mut one = resolve_one(rule.id, Origin::Cli, &rule.target, rule.ports, &matched);
            one.access = rule.access.clone();
            resolved.rules.push(one);
        }
        let wanted = self.wanted_derived(containers, context, &mut resolved);
        self.resolve_derived(wanted, containers, context, &mut resolved);
        resolved.rules.sort_by_key(|r| r.id);
        admit_all(&mut resolved, containers, context);
        resolved
    }

    /// The derived rules wanted now, each by what identifies it across resolutions; notes
    /// the labels that do not parse and those `--labels container` ignores.
    fn wanted_derived(
        &self,
        containers: &[Workload],
        context: &Context,
        resolved: &mut Resolved,
    ) -> BTreeSet<DerivedKey> {
        // The file's rules keep their ids while the file keeps them (by what they say).
        let mut wanted: BTreeSet<DerivedKey> = context
            .file_rules
            .iter()
            .map(|rule| DerivedKey {
                owner: rule.target.to_string(),
                origin: Origin::File,
                ports: rule.ports,
                access: rule.access.clone(),
            })
            .collect();
        for container in containers {
            let (derived, label_error) =
                derived_rules(container, context.default_published, self.labels);
            wanted.extend(
                derived
                    .into_iter()
                    .map(|(origin, ports, access)| DerivedKey {
                        owner: container.id.clone(),
                        origin,
                        ports,
                        access,
                    }),
            );
            if let Some(error) = label_error {
                resolved.label_errors.push((container.name.clone(), error));
            }
            if let Some(label) = &container.allow_label
                && self.labels == LabelPolicy::Container
                && !self.labels.honours(container.allow_label_origin)
            {
                resolved.ignored_labels.push(IgnoredLabel {
                    container_id: container.id.clone(),
                    container: container.name.clone(),
                    label: label.clone(),
                    origin: container.allow_label_origin,
                });
            }
        }
        wanted
    }

    /// Gives each wanted derived rule its id (the one it had, else the lowest free slot;
    /// none left: skipped, with a warning) and resolves it.
    fn resolve_derived(
        &mut self,
        wanted: BTreeSet<DerivedKey>,
        containers: &[Workload],
        context: &Context,
        resolved: &mut Resolved,
    ) {
        self.derived_ids.retain(|key, _| wanted.contains(key));
        // The file's rules by what they say, and the free ids in order: one pass each, so
        // that a file of many rules resolves in N log N, not N².
        let file_rules: BTreeMap<(String, Ports, &Access), &FileRule> = context
            .file_rules
            .iter()
            .map(|r| ((r.target.to_string(), r.ports, &r.access), r))
            .collect();
        let used: BTreeSet<u32> = self.derived_ids.values().copied().collect();
        let mut free = self.slots.clone().filter(|id| !used.contains(id));
        let mut skipped = 0usize;
        for key in wanted {
            let id = match self.derived_ids.get(&key) {
                Some(id) => *id,
                None => match free.next() {
                    Some(id) => {
                        self.derived_ids.insert(key.clone(), id);
                        resolved.new_ids.insert(id);
                        id
                    }
                    None => {
                        skipped += 1;
                        continue;
                    }
                },
            };
            if key.origin == Origin::File {
                let Some(rule) = file_rules.get(&(key.owner.clone(), key.ports, &key.access))
                else {
                    continue;
                };
                let matched = matching(&rule.target, containers);
                let mut one = resolve_one(id, Origin::File, &rule.target, rule.ports, &matched);
                one.access = rule.access.clone();
                resolved.rules.push(one);
                continue;
            }
            let Some(container) = containers.iter().find(|c| c.id == key.owner) else {
                continue;
            };
            let target = Target::Container(container.name.clone());
            let mut rule = resolve_one(id, key.origin, &target, key.ports, &[container]);
            if key.origin == Origin::Label {
                rule.label_origin = container.allow_label_origin;
            }
            rule.access = key.access;
            resolved.rules.push(rule);
        }
        if skipped > 0 {
            warn!(
                skipped,
                slots = self.slots.len(),
                "no free rule slot for rules of containers or the policy file (agent --max-rules); skipped"
            );
        }
    }
}

/// Who may connect to each destination, from every resolved rule. The operator's denials
/// close what containers bring by themselves (labels, the default policy).
fn admit_all(resolved: &mut Resolved, containers: &[Workload], context: &Context) {
    let denied = context.denials.keys(containers);
    for rule in &mut resolved.rules {
        let restriction = match restriction(rule, context) {
            Ok(restriction) => restriction,
            Err(problem) => {
                rule.problem = Some(problem);
                continue;
            }
        };
        let closable = matches!(rule.source, Origin::Label | Origin::DefaultPolicy);
        let mut closed = false;
        for key in allow_keys(rule) {
            if closable && denied.contains(&key) {
                closed = true;
                continue;
            }
            admit(&mut resolved.entries, key, rule.id, restriction.as_ref());
        }
        if closed {
            super::denials::narrow(rule, &denied);
        }
    }
}

/// What identifies a derived rule across resolutions, so that it keeps its id (and its
/// counters) while it is wanted: its owner (the container's id, or for a policy file rule
/// its target as written), where it comes from, and what it opens to whom.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct DerivedKey {
    owner: String,
    origin: Origin,
    ports: Ports,
    access: Access,
}

impl Resolved {
    /// Adds the saved `rule`, new since this resolution, as [`Resolver::resolve`] would,
    /// without resolving every other rule again: where it names an address, admits anyone
    /// and opens only destinations no other rule opens, no other admission changes. The
    /// destinations it opens, or None (nothing changed) where the whole resolution is
    /// needed. Keeps `portgate allow` flat in the number of rules.
    pub fn add_open_address_rule(&mut self, rule: &Rule, now: u64) -> Option<Vec<AllowKey>> {
        // The rules are in id order (`resolve` sorts them).
        let at = self.rules.partition_point(|r| r.id < rule.id);
        if !matches!(rule.target, Target::Address(_))
            || rule.access.is_restricted()
            || rule.access.is_due(now)
            || self.rules.get(at).is_some_and(|r| r.id == rule.id)
        {
            return None;
        }
        let mut one = resolve_one(rule.id, Origin::Cli, &rule.target, rule.ports, &[]);
        one.access = rule.access.clone();
        let keys: Vec<AllowKey> = allow_keys(&one).collect();
        if keys.iter().any(|key| self.entries.contains_key(key)) {
            return None;
        }
        for key in &keys {
            self.entries.insert(*key, Admission::Any(rule.id));
        }
        self.rules.insert(at, one);
        Some(keys)
    }
}

/// The destinations (allow-map keys) a resolved rule opens.
fn allow_keys(rule: &ResolvedRule) -> impl Iterator<Item = AllowKey> + '_ {
    rule.addresses
        .iter()
        .flat_map(move |address| rule.specs.iter().flat_map(|spec| spec.allow_keys(*address)))
}

/// The running containers a rule's target names.
fn matching<'a>(target: &Target, containers: &'a [Workload]) -> Vec<&'a Workload> {
    match target {
        Target::Address(_) => Vec::new(),
        Target::Container(name) => containers.iter().filter(|c| c.is_named(name)).collect(),
        Target::HostPort { protocol, port } => containers
            .iter()
            .filter(|c| {
                c.published
                    .iter()
                    .any(|p| p.protocol == *protocol && p.host_port == *port)
            })
            .collect(),
    }
}

/// What a rule's access says for the kernel: None when it admits anyone; an error (the
/// rule then opens nothing) when its time is up or a `--via` interface is missing, so it
/// is never taken for one that admits anyone.
fn restriction(rule: &mut ResolvedRule, context: &Context) -> Result<Option<Restriction>, String> {
    let access = &rule.access;
    if access.is_due(context.now) {
        return Err("expired".to_owned());
    }
    if !access.is_restricted() {
        return Ok(None);
    }
    let ifindex = match &access.via {
        None => None,
        Some(name) => match context.interfaces.get(name) {
            Some(ifindex) => Some(*ifindex),
            None => return Err(format!("interface {name} does not exist: admits nobody")),
        },
    };
    let prefixes = expand(&access.from, &context.sets);
    if !access.from.is_empty() && prefixes.is_empty() {
        return Err("its sources are empty sets: admits nobody".to_owned());
    }
    Ok(Some(Restriction {
        rule_id: rule.id,
        ifindex,
        prefixes,
    }))
}

/// Adds one rule's admission of one destination: a rule that admits anyone wins over
/// restricted ones (the lowest such id counts); restricted ones add up.
fn admit(
    entries: &mut BTreeMap<AllowKey, Admission>,
    key: AllowKey,
    rule_id: u32,
    restriction: Option<&Restriction>,
) {
    let entry = entries
        .entry(key)
        .or_insert_with(|| Admission::Restricted(Vec::new()));
    match (entry, restriction) {
        (Admission::Any(_), _) => {}
        (entry @ Admission::Restricted(_), None) => *entry = Admission::Any(rule_id),
        (Admission::Restricted(list), Some(restriction)) => list.push(restriction.clone()),
    }
}

/// The rules a container brings by itself, and the error of a label that does not parse
/// (which then opens nothing).
fn derived_rules(
    container: &Workload,
    default_published: bool,
    labels: LabelPolicy,
) -> (Vec<(Origin, Ports, Access)>, Option<String>) {
    let mut derived = Vec::new();
    let mut label_error = None;
    let honoured = labels.honours(container.allow_label_origin);
    if let Some(label) = container.allow_label.as_ref().filter(|_| honoured) {
        match parse_label(label) {
            Ok(items) => derived.extend(
                items
                    .into_iter()
                    .map(|(spec, access)| (Origin::Label, Ports::Spec(spec), access)),
            ),
            Err(err) => label_error = Some(format!("label {ALLOW_LABEL}={label}: {err}")),
        }
    }
    if default_published && !container.published.is_empty() {
        derived.push((Origin::DefaultPolicy, Ports::Published, Access::default()));
    }
    (derived, label_error)
}

/// The `portgate.allow` label: items separated by commas, each
/// `PORTS [from SOURCE...] [via IFACE]`, e.g. `5432/tcp from 10.0.0.0/8 office, 80/tcp`.
pub fn parse_label(label: &str) -> Result<Vec<(PortSpec, Access)>, PolicyError> {
    let mut items = Vec::new();
    for item in label.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let mut words = item.split_whitespace();
        let spec: PortSpec = words.next().unwrap_or_default().parse()?;
        let mut access = Access::default();
        let mut in_from = false;
        while let Some(word) = words.next() {
            match word {
                "from" => in_from = true,
                "via" => {
                    let name = words
                        .next()
                        .ok_or_else(|| PolicyError::Interface(String::new()))?;
                    super::check_interface(name)?;
                    access.via = Some(name.to_owned());
                    in_from = false;
                }
                _ if in_from => access.from.push(word.parse()?),
                _ => return Err(PolicyError::Label(word.to_owned())),
            }
        }
        items.push((spec, access));
    }
    Ok(items)
}

fn resolve_one(
    id: u32,
    source: Origin,
    target: &Target,
    ports: Ports,
    containers: &[&Workload],
) -> ResolvedRule {
    let mut addresses: Vec<IpAddr> = match target {
        Target::Address(address) => vec![*address],
        Target::Container(_) | Target::HostPort { .. } => containers
            .iter()
            .flat_map(|c| c.addresses.iter().copied())
            .collect(),
    };
    addresses.sort();
    addresses.dedup();
    // A host-port rule takes only the mapping of its host port.
    let published = containers
        .iter()
        .flat_map(|c| c.published.iter())
        .filter(|p| match target {
            Target::HostPort { protocol, port } => p.protocol == *protocol && p.host_port == *port,
            _ => true,
        });
    let mut specs: Vec<PortSpec> = match ports {
        Ports::Spec(spec) => vec![spec],
        // A port published on a loopback address only is for the host itself, which reaches
        // it without a rule (unless host traffic is gated): a neighbour sending to 127.0.0.1
        // with the host's MAC address must not be admitted by `--published` (moby#45610).
        Ports::Published => published
            .clone()
            .filter(|p| !p.is_loopback_only())
            .map(|p| PortSpec {
                protocol: p.protocol,
                port_start: p.container_port,
                port_end: p.container_port,
            })
            .collect(),
    };
    specs.sort();
    specs.dedup();
    let mut host_ports: Vec<u16> = published
        .filter(|p| {
            specs.iter().any(|s| {
                s.protocol == p.protocol
                    && s.port_start <= p.container_port
                    && p.container_port <= s.port_end
            })
        })
        .map(|p| p.host_port)
        .collect();
    host_ports.sort();
    host_ports.dedup();
    ResolvedRule {
        id,
        source,
        target: target.clone(),
        ports,
        containers: containers.iter().map(|c| c.name.clone()).collect(),
        addresses,
        specs,
        host_ports,
        label_origin: None,
        access: Access::default(),
        problem: None,
    }
}

#[cfg(test)]
mod tests;
