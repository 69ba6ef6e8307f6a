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
    derived_ids: BTreeMap<(String, Origin, Ports, Access), u32>,
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
        // The file's rules keep their ids while the file keeps them (by what they say).
        let mut wanted = BTreeSet::new();
        for rule in &context.file_rules {
            wanted.insert((
                rule.target.to_string(),
                Origin::File,
                rule.ports,
                rule.access.clone(),
            ));
        }
        for container in containers {
            let (derived, label_error) =
                derived_rules(container, context.default_published, self.labels);
            for (source, ports, access) in derived {
                wanted.insert((container.id.clone(), source, ports, access));
            }
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
            let (_, source, ports, access) = &key;
            if *source == Origin::File {
                let Some(rule) = file_rules.get(&(key.0.clone(), *ports, access)) else {
                    continue;
                };
                let matched = matching(&rule.target, containers);
                let mut one = resolve_one(id, Origin::File, &rule.target, rule.ports, &matched);
                one.access = rule.access.clone();
                resolved.rules.push(one);
                continue;
            }
            let Some(container) = containers.iter().find(|c| c.id == key.0) else {
                continue;
            };
            let target = Target::Container(container.name.clone());
            let mut rule = resolve_one(id, *source, &target, *ports, &[container]);
            if *source == Origin::Label {
                rule.label_origin = container.allow_label_origin;
            }
            rule.access = access.clone();
            resolved.rules.push(rule);
        }
        if skipped > 0 {
            warn!(
                skipped,
                slots = self.slots.len(),
                "no free rule slot for rules of containers or the policy file (agent --max-rules); skipped"
            );
        }
        resolved.rules.sort_by_key(|r| r.id);
        // The operator's denials close what containers bring by themselves.
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
        resolved
    }
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
mod tests {
    use super::*;

    fn context(default_published: bool) -> Context {
        Context {
            default_published,
            ..Context::default()
        }
    }
    use crate::policy::{Protocol, Published, parse_address};
    use gate_common::{PROTO_ICMP, PROTO_TCP, ipv4_mapped};

    fn container(
        name: &str,
        address: &str,
        published: &[(u16, u16)],
        label: Option<&str>,
    ) -> Workload {
        Workload {
            id: format!("{name:0>64}"),
            name: name.to_owned(),
            addresses: vec![parse_address(address).expect("address")],
            published: published
                .iter()
                .map(|(host_port, container_port)| Published {
                    host_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
                    host_port: *host_port,
                    container_port: *container_port,
                    protocol: Protocol::Tcp,
                })
                .collect(),
            allow_label: label.map(str::to_owned),
            allow_label_origin: label.map(|_| LabelOrigin::Container),
        }
    }

    fn rules(list: &[(&str, &str)]) -> RuleSet {
        let mut rules = RuleSet::default();
        for (target, ports) in list {
            let ports = if *ports == "published" {
                Ports::Published
            } else {
                Ports::Spec(ports.parse().expect("spec"))
            };
            rules
                .allow(target.parse().expect("target"), ports, Access::default())
                .expect("allow");
        }
        rules
    }

    #[test]
    fn an_added_open_address_rule_resolves_as_a_full_resolution_would() {
        let web = container("web", "10.0.0.9", &[(8080, 80)], Some("53/udp"));
        let before = rules(&[("10.0.0.2", "80-81"), ("web", "80")]);
        let mut resolver = Resolver::default();
        let mut incremental =
            resolver.resolve(&before, std::slice::from_ref(&web), &context(false));
        let mut after = before.clone();
        let id = after
            .allow(
                "10.0.0.3".parse().expect("target"),
                Ports::Spec("443-444".parse().expect("spec")),
                Access::default(),
            )
            .expect("allow");
        let rule = after.rules().iter().find(|r| r.id == id).expect("rule");
        let keys = incremental
            .add_open_address_rule(rule, 0)
            .expect("an open address rule to new destinations");
        assert_eq!(keys.len(), 2);
        let full = resolver.resolve(&after, &[web], &context(false));
        assert_eq!(incremental.entries, full.entries);
        let ids = |r: &Resolved| {
            r.rules
                .iter()
                .map(|r| (r.id, r.addresses.clone(), r.specs.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&incremental), ids(&full));

        // Where the rule would change another admission, or needs an access list, nothing
        // changes and the caller resolves everything.
        let overlapping = Rule {
            id: 900,
            target: "10.0.0.2".parse().expect("target"),
            ports: Ports::Spec("81-82".parse().expect("spec")),
            access: Access::default(),
        };
        let restricted = Rule {
            id: 901,
            target: "10.0.0.4".parse().expect("target"),
            ports: Ports::Spec("80".parse().expect("spec")),
            access: Access {
                from: vec!["192.0.2.0/24".parse().expect("source")],
                ..Access::default()
            },
        };
        let container_rule = Rule {
            id: 902,
            target: "db".parse().expect("target"),
            ports: Ports::Spec("5432".parse().expect("spec")),
            access: Access::default(),
        };
        for rule in [overlapping, restricted, container_rule, rule.clone()] {
            assert!(
                incremental.add_open_address_rule(&rule, 0).is_none(),
                "{rule}"
            );
        }
        assert_eq!(incremental.entries, full.entries);
    }

    #[test]
    fn address_rules_map_addresses_protocols_and_ports() {
        let resolved = Resolver::default().resolve(
            &rules(&[("10.0.0.2", "80-81"), ("10.0.0.2", "icmp")]),
            &[],
            &context(false),
        );
        assert_eq!(resolved.entries.len(), 3);
        let v4 = ipv4_mapped([10, 0, 0, 2]);
        assert_eq!(
            resolved.entries[&AllowKey::new(v4, PROTO_TCP, 81)],
            Admission::Any(0)
        );
        assert_eq!(
            resolved.entries[&AllowKey::new(v4, PROTO_ICMP, 0)],
            Admission::Any(1)
        );
        assert!(resolved.rules.iter().all(ResolvedRule::is_active));
    }

    #[test]
    fn container_rules_follow_the_container() {
        let set = rules(&[("web", "80")]);
        let mut resolver = Resolver::default();
        let before = resolver.resolve(&set, &[], &context(false));
        assert!(
            !before.rules[0].is_active(),
            "kept, inactive, while the container is not running"
        );
        assert!(before.entries.is_empty());

        let web = container("web", "172.17.0.2", &[(8080, 80)], None);
        let running = resolver.resolve(&set, &[web], &context(false));
        assert!(running.rules[0].is_active());
        assert_eq!(running.rules[0].host_ports, [8080]);
        assert!(running.entries.contains_key(&AllowKey::new(
            ipv4_mapped([172, 17, 0, 2]),
            PROTO_TCP,
            80
        )));

        // Restarted with a new address: the entry moves.
        let moved = resolver.resolve(
            &set,
            &[container("web", "172.17.0.3", &[(8080, 80)], None)],
            &context(false),
        );
        let keys: Vec<_> = moved.entries.keys().collect();
        assert_eq!(
            keys,
            [&AllowKey::new(ipv4_mapped([172, 17, 0, 3]), PROTO_TCP, 80)]
        );
    }

    #[test]
    fn published_rules_open_exactly_the_published_ports() {
        let set = rules(&[("web", "published")]);
        let web = container("web", "172.17.0.2", &[(8080, 80), (8443, 443)], None);
        let resolved = Resolver::default().resolve(&set, &[web], &context(false));
        let ports: Vec<u16> = resolved.entries.keys().map(|k| k.port).collect();
        assert_eq!(ports, [80, 443]);
        assert_eq!(resolved.rules[0].host_ports, [8080, 8443]);
    }

    #[test]
    fn labels_and_default_policy_add_rules_with_stable_ids() {
        let db = container("db", "10.88.0.5", &[], Some("5432/tcp, 53/udp"));
        let web = container("web", "10.88.0.6", &[(8081, 80)], None);
        let mut resolver = Resolver::default();
        let first = resolver.resolve(
            &RuleSet::default(),
            &[db.clone(), web.clone()],
            &context(true),
        );
        assert!(first.label_errors.is_empty());
        let sources: Vec<Origin> = first.rules.iter().map(|r| r.source).collect();
        assert_eq!(
            sources,
            [Origin::Label, Origin::Label, Origin::DefaultPolicy]
        );
        assert!(first.rules.iter().all(|r| r.id >= DEFAULT_SAVED_RULES));
        assert_eq!(first.new_ids.len(), 3);
        assert_eq!(first.entries.len(), 3);

        let again = resolver.resolve(&RuleSet::default(), &[db.clone(), web], &context(true));
        let ids = |r: &Resolved| r.rules.iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(&again), ids(&first));
        assert!(again.new_ids.is_empty());

        // The web container stops: its derived rule goes.
        let after = resolver.resolve(&RuleSet::default(), &[db], &context(true));
        assert_eq!(after.rules.len(), 2);
    }

    #[test]
    fn labels_carry_sources_and_a_label_that_does_not_parse_opens_nothing() {
        let items = parse_label("5432/tcp from 10.0.0.0/8 office via wg0, 80/tcp").expect("label");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].1.from.len(), 2);
        assert_eq!(items[0].1.via.as_deref(), Some("wg0"));
        assert!(!items[1].1.is_restricted());
        for bad in [
            "5432/tcp, bogus",
            "80 from 10.0.0.1/8",
            "80 to 10.0.0.0/8",
            "80 via",
        ] {
            assert!(parse_label(bad).is_err(), "{bad}");
        }

        let db = container("db", "10.88.0.5", &[], Some("5432/tcp, bogus"));
        let resolved = Resolver::default().resolve(&RuleSet::default(), &[db], &context(false));
        assert!(resolved.rules.is_empty(), "no rule from a broken label");
        assert!(resolved.entries.is_empty());
        assert_eq!(resolved.label_errors.len(), 1);
        assert!(
            resolved.label_errors[0].1.contains("bogus"),
            "{:?}",
            resolved.label_errors
        );
    }

    #[test]
    fn restricted_rules_add_up_and_an_open_rule_wins() {
        let mut set = RuleSet::default();
        let spec = || Ports::Spec("80".parse().expect("spec"));
        let from = |s: &str| Access {
            from: vec![s.parse().expect("source")],
            ..Access::default()
        };
        set.allow("10.0.0.2".parse().expect("t"), spec(), from("192.0.2.0/24"))
            .expect("allow");
        set.allow("10.0.0.2".parse().expect("t"), spec(), from("office"))
            .expect("allow");
        let via = Access {
            via: Some("wg9".into()),
            ..Access::default()
        };
        set.allow("10.0.0.2".parse().expect("t"), spec(), via)
            .expect("allow");
        let mut ctx = context(false);
        ctx.sets
            .insert("office".into(), ["198.51.100.7".parse().expect("p")].into());
        let resolved = Resolver::default().resolve(&set, &[], &ctx);
        let key = AllowKey::new(ipv4_mapped([10, 0, 0, 2]), PROTO_TCP, 80);
        let Admission::Restricted(list) = &resolved.entries[&key] else {
            panic!("restricted: {:?}", resolved.entries[&key]);
        };
        assert_eq!(
            list.len(),
            2,
            "the rule on a missing interface admits nothing"
        );
        assert!(
            resolved.rules[2]
                .problem
                .as_deref()
                .is_some_and(|p| p.contains("wg9"))
        );
        assert!(!resolved.rules[2].is_active());

        set.allow("10.0.0.2".parse().expect("t"), spec(), Access::default())
            .expect("allow");
        let resolved = Resolver::default().resolve(&set, &[], &ctx);
        assert_eq!(resolved.entries[&key], Admission::Any(3));

        let expired = Access {
            expires: Some(10),
            ..Access::default()
        };
        let mut later = RuleSet::default();
        later
            .allow("10.0.0.3".parse().expect("t"), spec(), expired)
            .expect("allow");
        ctx.now = 10;
        assert!(
            Resolver::default()
                .resolve(&later, &[], &ctx)
                .entries
                .is_empty()
        );
    }

    /// `web` publishing `bindings`: (host address, host port, container port), all TCP.
    fn published_on(bindings: &[(&str, u16, u16)]) -> Workload {
        let mut web = container("web", "172.17.0.2", &[], None);
        web.published = bindings
            .iter()
            .map(|(host_ip, host_port, container_port)| Published {
                host_ip: host_ip.parse().expect("host address"),
                host_port: *host_port,
                container_port: *container_port,
                protocol: Protocol::Tcp,
            })
            .collect();
        web
    }

    #[test]
    fn loopback_only_ports_are_left_to_the_host_unless_allowed_explicitly() {
        let port = |p: u16| AllowKey::new(ipv4_mapped([172, 17, 0, 2]), PROTO_TCP, p);
        // `-p 127.0.0.1:8080:80` (and its IPv6 twin): for the host itself only.
        let local = published_on(&[("127.0.0.1", 8080, 80), ("::1", 8080, 80)]);

        let by_published = Resolver::default().resolve(
            &rules(&[("web", "published")]),
            std::slice::from_ref(&local),
            &context(false),
        );
        assert!(
            !by_published.entries.contains_key(&port(80)),
            "--published must not admit a loopback-only port: {:?}",
            by_published.entries
        );
        assert!(!by_published.rules[0].is_active());

        let by_policy = Resolver::default().resolve(
            &RuleSet::default(),
            std::slice::from_ref(&local),
            &context(true),
        );
        assert!(
            by_policy.entries.is_empty(),
            "the default policy must not admit a loopback-only port: {:?}",
            by_policy.entries
        );

        // Asked for by name and port, it is admitted: the operator said so.
        let explicit = Resolver::default().resolve(
            &rules(&[("web", "80")]),
            std::slice::from_ref(&local),
            &context(false),
        );
        assert_eq!(explicit.entries.get(&port(80)), Some(&Admission::Any(0)));
        assert_eq!(explicit.rules[0].host_ports, [8080]);

        // Published on loopback and on every address: reachable from outside, so admitted.
        let both = published_on(&[("127.0.0.1", 8080, 80), ("0.0.0.0", 9090, 80)]);
        for (set, default_published) in [
            (rules(&[("web", "published")]), false),
            (RuleSet::default(), true),
        ] {
            let resolved = Resolver::default().resolve(
                &set,
                std::slice::from_ref(&both),
                &context(default_published),
            );
            let ports: Vec<u16> = resolved.entries.keys().map(|k| k.port).collect();
            assert_eq!(ports, [80], "default_published {default_published}");
        }
    }

    #[test]
    fn labels_off_ignores_them_and_label_rules_say_where_the_label_came_from() {
        let mut from_image = container("app", "10.88.0.7", &[], Some("22/tcp"));
        from_image.allow_label_origin = Some(LabelOrigin::Image);
        let set = rules(&[("app", "80")]);
        let image = Resolver::new(LabelPolicy::Image).resolve(
            &set,
            std::slice::from_ref(&from_image),
            &context(false),
        );
        let label_rules: Vec<&ResolvedRule> = image
            .rules
            .iter()
            .filter(|r| r.source == Origin::Label)
            .collect();
        assert_eq!(label_rules.len(), 1);
        assert_eq!(label_rules[0].label_origin, Some(LabelOrigin::Image));
        assert_eq!(
            image.rules[0].label_origin, None,
            "a saved rule has no label"
        );
        assert_eq!(image.entries.len(), 2);
        assert!(
            image.ignored_labels.is_empty(),
            "--labels image ignores none"
        );

        let off = Resolver::new(LabelPolicy::Off).resolve(&set, &[from_image], &context(false));
        assert!(
            off.rules.iter().all(|r| r.source != Origin::Label),
            "--labels off: no label rules"
        );
        assert!(off.ignored_labels.is_empty(), "off says so once, in status");
        let ports: Vec<u16> = off.entries.keys().map(|k| k.port).collect();
        assert_eq!(ports, [80], "saved rules still apply");
        // The default policy does not depend on labels.
        let web = container("web", "10.88.0.6", &[(8081, 80)], Some("443"));
        let policy =
            Resolver::new(LabelPolicy::Off).resolve(&RuleSet::default(), &[web], &context(true));
        let sources: Vec<Origin> = policy.rules.iter().map(|r| r.source).collect();
        assert_eq!(sources, [Origin::DefaultPolicy]);
    }

    #[test]
    fn by_default_only_labels_set_on_the_container_open_ports() {
        let own = container("own", "10.88.0.5", &[], Some("80/tcp"));
        let mut image = container("img", "10.88.0.6", &[], Some("80/tcp"));
        image.allow_label_origin = Some(LabelOrigin::Image);
        let mut unknown = container("unk", "10.88.0.7", &[], Some("80/tcp"));
        unknown.allow_label_origin = None;
        let resolved = Resolver::default().resolve(
            &RuleSet::default(),
            &[own, image, unknown],
            &context(false),
        );
        let opened: Vec<String> = resolved
            .entries
            .keys()
            .map(|k| crate::policy::addr_from_map(k.addr).to_string())
            .collect();
        assert_eq!(
            opened,
            ["10.88.0.5"],
            "only the container's own label opens"
        );
        let ignored: Vec<(&str, Option<LabelOrigin>)> = resolved
            .ignored_labels
            .iter()
            .map(|i| (i.container.as_str(), i.origin))
            .collect();
        assert_eq!(
            ignored,
            [("img", Some(LabelOrigin::Image)), ("unk", None)],
            "each one the agent warns about"
        );
        let warning = resolved.ignored_labels[0].warning();
        assert!(
            warning.contains("container img")
                && warning.contains("--labels image")
                && warning.contains("portgate.allow=80/tcp")
                && !warning.contains('\n'),
            "{warning}"
        );
    }

    #[test]
    fn a_denial_closes_label_and_default_policy_ports_but_not_saved_rules() {
        let web = container("web", "172.17.0.2", &[(8080, 80)], Some("80-82/tcp"));
        let db = container("db", "172.17.0.3", &[(5432, 5432)], None);
        let mut ctx = context(true);
        ctx.denials.add(
            "web".parse().expect("target"),
            Ports::Spec("81".parse().expect("spec")),
        );
        ctx.denials
            .add("db".parse().expect("target"), Ports::Published);
        let saved = rules(&[("172.17.0.3", "5432")]);
        let resolved = Resolver::default().resolve(&saved, &[web, db], &ctx);
        let open: Vec<(String, u16)> = resolved
            .entries
            .keys()
            .map(|k| (crate::policy::addr_from_map(k.addr).to_string(), k.port))
            .collect();
        assert_eq!(
            open,
            [
                ("172.17.0.2".to_owned(), 80),
                ("172.17.0.2".to_owned(), 82),
                ("172.17.0.3".to_owned(), 5432),
            ],
            "81 closed; db's published port stays open by the saved rule"
        );
        let label = resolved
            .rules
            .iter()
            .find(|r| r.source == Origin::Label)
            .expect("label rule");
        let specs: Vec<String> = label.specs.iter().map(ToString::to_string).collect();
        assert_eq!(specs, ["80/tcp", "82/tcp"], "the label lists what is open");
        assert!(label.is_active());
        let db_policy = resolved
            .rules
            .iter()
            .find(|r| r.source == Origin::DefaultPolicy && r.containers == ["db"])
            .expect("db's default-policy rule");
        assert!(!db_policy.is_active());
        assert!(
            db_policy
                .problem
                .as_deref()
                .is_some_and(|p| p.contains("portgate deny")),
            "{db_policy:?}"
        );
        assert_eq!(
            resolved.entries[&AllowKey::new(ipv4_mapped([172, 17, 0, 3]), PROTO_TCP, 5432)],
            Admission::Any(0)
        );
    }

    #[test]
    fn derived_rules_take_the_slots_given_and_what_does_not_fit_is_skipped() {
        let file_rule = |address: &str| FileRule {
            target: address.parse().expect("target"),
            ports: Ports::Spec("80".parse().expect("spec")),
            access: Access::default(),
        };
        let mut ctx = context(false);
        ctx.file_rules = (1..=3).map(|i| file_rule(&format!("10.0.0.{i}"))).collect();
        let mut resolver = Resolver::default().with_slots(100..102);
        let resolved = resolver.resolve(&RuleSet::default(), &[], &ctx);
        let ids: Vec<u32> = resolved.rules.iter().map(|r| r.id).collect();
        assert_eq!(ids, [100, 101], "two slots, three file rules: one skipped");
        assert_eq!(resolved.entries.len(), 2);
        // The same file again: the same ids, nothing new.
        let again = resolver.resolve(&RuleSet::default(), &[], &ctx);
        assert_eq!(again.rules.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
        assert!(again.new_ids.is_empty());
    }

    #[test]
    fn saved_rules_win_where_they_overlap_derived_ones() {
        let web = container("web", "172.17.0.2", &[(8080, 80)], Some("80"));
        let resolved =
            Resolver::default().resolve(&rules(&[("web", "80")]), &[web], &context(false));
        let key = AllowKey::new(ipv4_mapped([172, 17, 0, 2]), PROTO_TCP, 80);
        assert_eq!(resolved.entries[&key], Admission::Any(0));
    }
}
