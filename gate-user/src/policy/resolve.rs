//! Rules × containers → the allow map. Saved rules name an address or a container; the
//! running containers add rules of their own (the `portgate.allow` label, the default
//! policy). The result says, per rule, what it resolved to, and holds the map's content.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use gate_common::{AllowKey, AllowValue, MAX_RULES};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{ALLOW_LABEL, LabelOrigin, Workload};
use super::{MAX_SAVED_RULES, PortSpec, Ports, RuleSet, Target, map_addr};

/// Where a rule comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// `portgate allow`, saved.
    Cli,
    /// A container's `portgate.allow` label, while it runs.
    Label,
    /// `--default-policy published`, while the container runs.
    DefaultPolicy,
}

/// A rule as it stands now.
#[derive(Clone, Debug)]
pub struct ResolvedRule {
    pub id: u32,
    pub source: Source,
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
}

impl ResolvedRule {
    /// A rule is active when it opens at least one port on at least one address.
    pub fn is_active(&self) -> bool {
        !self.addresses.is_empty() && !self.specs.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct Resolved {
    pub rules: Vec<ResolvedRule>,
    /// The allow map's desired content. Where rules overlap, the lowest id admits.
    pub entries: BTreeMap<AllowKey, AllowValue>,
    /// Ids given to derived rules in this round: their counters must start from zero.
    pub new_ids: BTreeSet<u32>,
}

/// Keeps the ids of derived rules stable while their container runs, so their counters
/// accumulate across re-syncs.
#[derive(Debug)]
pub struct Resolver {
    derived_ids: BTreeMap<(String, Source, Ports), u32>,
    /// Whether containers' `portgate.allow` labels open ports (`agent --labels on|off`).
    labels: bool,
}

impl Default for Resolver {
    /// Labels honoured.
    fn default() -> Self {
        Self::new(true)
    }
}

impl Resolver {
    /// A resolver that honours `portgate.allow` labels, or ignores them.
    pub fn new(labels: bool) -> Self {
        Self {
            derived_ids: BTreeMap::new(),
            labels,
        }
    }

    pub fn resolve(
        &mut self,
        rules: &RuleSet,
        containers: &[Workload],
        default_published: bool,
    ) -> Resolved {
        let mut resolved = Resolved::default();
        for rule in rules.rules() {
            let matched: Vec<&Workload> = match &rule.target {
                Target::Address(_) => Vec::new(),
                Target::Container(name) => containers.iter().filter(|c| c.is_named(name)).collect(),
            };
            resolved.rules.push(resolve_one(
                rule.id,
                Source::Cli,
                &rule.target,
                rule.ports,
                &matched,
            ));
        }
        let mut wanted = BTreeSet::new();
        for container in containers {
            for (source, ports) in derived_rules(container, default_published, self.labels) {
                wanted.insert((container.id.clone(), source, ports));
            }
        }
        self.derived_ids.retain(|key, _| wanted.contains(key));
        for (container_id, source, ports) in wanted {
            let key = (container_id, source, ports);
            let id = match self.derived_ids.get(&key) {
                Some(id) => *id,
                None => match self.free_id() {
                    Some(id) => {
                        self.derived_ids.insert(key.clone(), id);
                        resolved.new_ids.insert(id);
                        id
                    }
                    None => {
                        warn!("no free rule slot for a container-derived rule; skipped");
                        continue;
                    }
                },
            };
            let Some(container) = containers.iter().find(|c| c.id == key.0) else {
                continue;
            };
            let target = Target::Container(container.name.clone());
            let mut rule = resolve_one(id, source, &target, ports, &[container]);
            if source == Source::Label {
                rule.label_origin = container.allow_label_origin;
            }
            resolved.rules.push(rule);
        }
        resolved.rules.sort_by_key(|r| r.id);
        for rule in &resolved.rules {
            for address in &rule.addresses {
                let addr = map_addr(*address);
                for spec in &rule.specs {
                    let proto = spec.protocol.number(*address);
                    for port in spec.ports() {
                        resolved
                            .entries
                            .entry(AllowKey::new(addr, proto, port))
                            .or_insert(AllowValue { rule_id: rule.id });
                    }
                }
            }
        }
        resolved
    }

    fn free_id(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self.derived_ids.values().copied().collect();
        (MAX_SAVED_RULES..MAX_RULES).find(|id| !used.contains(id))
    }
}

/// The rules a container brings by itself.
fn derived_rules(
    container: &Workload,
    default_published: bool,
    labels: bool,
) -> Vec<(Source, Ports)> {
    let mut derived = Vec::new();
    if let Some(label) = container.allow_label.as_ref().filter(|_| labels) {
        for item in label.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.parse::<PortSpec>() {
                Ok(spec) => derived.push((Source::Label, Ports::Spec(spec))),
                Err(err) => warn!(
                    container = container.name,
                    "ignoring label {ALLOW_LABEL}={label}: {err}"
                ),
            }
        }
    }
    if default_published && !container.published.is_empty() {
        derived.push((Source::DefaultPolicy, Ports::Published));
    }
    derived
}

fn resolve_one(
    id: u32,
    source: Source,
    target: &Target,
    ports: Ports,
    containers: &[&Workload],
) -> ResolvedRule {
    let mut addresses: Vec<IpAddr> = match target {
        Target::Address(address) => vec![*address],
        Target::Container(_) => containers
            .iter()
            .flat_map(|c| c.addresses.iter().copied())
            .collect(),
    };
    addresses.sort();
    addresses.dedup();
    let published = containers.iter().flat_map(|c| c.published.iter());
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                .allow(target.parse().expect("target"), ports)
                .expect("allow");
        }
        rules
    }

    #[test]
    fn address_rules_map_addresses_protocols_and_ports() {
        let resolved = Resolver::default().resolve(
            &rules(&[("10.0.0.2", "80-81"), ("10.0.0.2", "icmp")]),
            &[],
            false,
        );
        assert_eq!(resolved.entries.len(), 3);
        let v4 = ipv4_mapped([10, 0, 0, 2]);
        assert_eq!(
            resolved.entries[&AllowKey::new(v4, PROTO_TCP, 81)],
            AllowValue { rule_id: 0 }
        );
        assert_eq!(
            resolved.entries[&AllowKey::new(v4, PROTO_ICMP, 0)],
            AllowValue { rule_id: 1 }
        );
        assert!(resolved.rules.iter().all(ResolvedRule::is_active));
    }

    #[test]
    fn container_rules_follow_the_container() {
        let set = rules(&[("web", "80")]);
        let mut resolver = Resolver::default();
        let before = resolver.resolve(&set, &[], false);
        assert!(
            !before.rules[0].is_active(),
            "kept, inactive, while the container is not running"
        );
        assert!(before.entries.is_empty());

        let web = container("web", "172.17.0.2", &[(8080, 80)], None);
        let running = resolver.resolve(&set, &[web], false);
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
            false,
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
        let resolved = Resolver::default().resolve(&set, &[web], false);
        let ports: Vec<u16> = resolved.entries.keys().map(|k| k.port).collect();
        assert_eq!(ports, [80, 443]);
        assert_eq!(resolved.rules[0].host_ports, [8080, 8443]);
    }

    #[test]
    fn labels_and_default_policy_add_rules_with_stable_ids() {
        let db = container("db", "10.88.0.5", &[], Some("5432/tcp, 53/udp, bogus"));
        let web = container("web", "10.88.0.6", &[(8081, 80)], None);
        let mut resolver = Resolver::default();
        let first = resolver.resolve(&RuleSet::default(), &[db.clone(), web.clone()], true);
        let sources: Vec<Source> = first.rules.iter().map(|r| r.source).collect();
        assert_eq!(
            sources,
            [Source::Label, Source::Label, Source::DefaultPolicy]
        );
        assert!(first.rules.iter().all(|r| r.id >= MAX_SAVED_RULES));
        assert_eq!(first.new_ids.len(), 3);
        assert_eq!(first.entries.len(), 3);

        let again = resolver.resolve(&RuleSet::default(), &[db.clone(), web], true);
        let ids = |r: &Resolved| r.rules.iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(&again), ids(&first));
        assert!(again.new_ids.is_empty());

        // The web container stops: its derived rule goes.
        let after = resolver.resolve(&RuleSet::default(), &[db], true);
        assert_eq!(after.rules.len(), 2);
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
            false,
        );
        assert!(
            !by_published.entries.contains_key(&port(80)),
            "--published must not admit a loopback-only port: {:?}",
            by_published.entries
        );
        assert!(!by_published.rules[0].is_active());

        let by_policy =
            Resolver::default().resolve(&RuleSet::default(), std::slice::from_ref(&local), true);
        assert!(
            by_policy.entries.is_empty(),
            "the default policy must not admit a loopback-only port: {:?}",
            by_policy.entries
        );

        // Asked for by name and port, it is admitted: the operator said so.
        let explicit = Resolver::default().resolve(
            &rules(&[("web", "80")]),
            std::slice::from_ref(&local),
            false,
        );
        assert_eq!(
            explicit.entries.get(&port(80)),
            Some(&AllowValue { rule_id: 0 })
        );
        assert_eq!(explicit.rules[0].host_ports, [8080]);

        // Published on loopback and on every address: reachable from outside, so admitted.
        let both = published_on(&[("127.0.0.1", 8080, 80), ("0.0.0.0", 9090, 80)]);
        for (set, default_published) in [
            (rules(&[("web", "published")]), false),
            (RuleSet::default(), true),
        ] {
            let resolved =
                Resolver::default().resolve(&set, std::slice::from_ref(&both), default_published);
            let ports: Vec<u16> = resolved.entries.keys().map(|k| k.port).collect();
            assert_eq!(ports, [80], "default_published {default_published}");
        }
    }

    #[test]
    fn labels_off_ignores_them_and_label_rules_say_where_the_label_came_from() {
        let mut from_image = container("app", "10.88.0.7", &[], Some("22/tcp"));
        from_image.allow_label_origin = Some(LabelOrigin::Image);
        let set = rules(&[("app", "80")]);
        let on = Resolver::default().resolve(&set, std::slice::from_ref(&from_image), false);
        let label_rules: Vec<&ResolvedRule> = on
            .rules
            .iter()
            .filter(|r| r.source == Source::Label)
            .collect();
        assert_eq!(label_rules.len(), 1);
        assert_eq!(label_rules[0].label_origin, Some(LabelOrigin::Image));
        assert_eq!(on.rules[0].label_origin, None, "a saved rule has no label");
        assert_eq!(on.entries.len(), 2);

        let off = Resolver::new(false).resolve(&set, &[from_image], false);
        assert!(
            off.rules.iter().all(|r| r.source != Source::Label),
            "--labels off: no label rules"
        );
        let ports: Vec<u16> = off.entries.keys().map(|k| k.port).collect();
        assert_eq!(ports, [80], "saved rules still apply");
        // The default policy does not depend on labels.
        let web = container("web", "10.88.0.6", &[(8081, 80)], Some("443"));
        let policy = Resolver::new(false).resolve(&RuleSet::default(), &[web], true);
        let sources: Vec<Source> = policy.rules.iter().map(|r| r.source).collect();
        assert_eq!(sources, [Source::DefaultPolicy]);
    }

    #[test]
    fn saved_rules_win_where_they_overlap_derived_ones() {
        let web = container("web", "172.17.0.2", &[(8080, 80)], Some("80"));
        let resolved = Resolver::default().resolve(&rules(&[("web", "80")]), &[web], false);
        let key = AllowKey::new(ipv4_mapped([172, 17, 0, 2]), PROTO_TCP, 80);
        assert_eq!(resolved.entries[&key], AllowValue { rule_id: 0 });
    }
}
