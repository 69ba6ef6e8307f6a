//! `portgate deny` on ports that no saved rule opens but a container's label (or the default
//! policy) does: the operator's word, saved, which closes those ports while it stands. Saved
//! rules and the policy file are the operator's word too, so a denial closes only what a
//! container brings by itself.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use gate_common::AllowKey;
use serde::{Deserialize, Serialize};

use super::{PortSpec, Ports, ResolvedRule, Target, Workload, map_addr};

/// Ports on a target that labels and the default policy may not open.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Denial {
    pub target: Target,
    pub ports: Ports,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.target, self.ports)
    }
}

/// The denials in force, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Denials(Vec<Denial>);

impl Denials {
    pub fn new(mut denials: Vec<Denial>) -> Self {
        denials.sort();
        denials.dedup();
        Self(denials)
    }

    pub fn list(&self) -> &[Denial] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether one denial already closes all of `ports` on `target`.
    pub fn covers(&self, target: &Target, ports: Ports) -> bool {
        self.0.iter().any(|d| {
            d.target == *target
                && match (d.ports, ports) {
                    (Ports::Spec(have), Ports::Spec(want)) => have.contains(&want),
                    (have, want) => have == want,
                }
        })
    }

    /// Denies `ports` on `target` (nothing changes where a denial covers them already).
    pub fn add(&mut self, target: Target, ports: Ports) {
        if !self.covers(&target, ports) {
            self.0.push(Denial { target, ports });
            self.0.sort();
        }
    }

    /// Lifts what the denials of `target` say about `ports` (a range loses that part);
    /// whether anything was lifted. Only the same kind of ports: an allow of `80/tcp` does
    /// not lift a denial of the published ports, nor the other way round.
    pub fn lift(&mut self, target: &Target, ports: Ports) -> bool {
        let mut lifted = false;
        let mut kept = Vec::with_capacity(self.0.len() + 1);
        for denial in std::mem::take(&mut self.0) {
            match (denial.ports, ports) {
                _ if denial.target != *target => kept.push(denial),
                (Ports::Spec(have), Ports::Spec(want)) if have.overlaps(&want) => {
                    lifted = true;
                    kept.extend(subtract(have, want).into_iter().map(|spec| Denial {
                        target: denial.target.clone(),
                        ports: Ports::Spec(spec),
                    }));
                }
                (Ports::Published, Ports::Published) => lifted = true,
                _ => kept.push(denial),
            }
        }
        *self = Self::new(kept);
        lifted
    }

    /// The destinations (allow-map keys) the denials close, on these containers.
    pub fn keys(&self, containers: &[Workload]) -> BTreeSet<AllowKey> {
        let mut keys = BTreeSet::new();
        for denial in &self.0 {
            match (&denial.target, denial.ports) {
                (Target::Address(address), Ports::Spec(spec)) => {
                    keys.extend(spec.allow_keys(*address))
                }
                (Target::Address(_), Ports::Published) => {}
                (Target::Container(name), ports) => {
                    for container in containers.iter().filter(|c| c.is_named(name)) {
                        let specs: Vec<PortSpec> = match ports {
                            Ports::Spec(spec) => vec![spec],
                            Ports::Published => container
                                .published
                                .iter()
                                .map(|p| single(p.protocol, p.container_port))
                                .collect(),
                        };
                        for (address, spec) in container_destinations(container, &specs) {
                            keys.extend(spec.allow_keys(address));
                        }
                    }
                }
                (Target::HostPort { protocol, port }, _) => {
                    for container in containers {
                        let specs: Vec<PortSpec> = container
                            .published
                            .iter()
                            .filter(|p| p.protocol == *protocol && p.host_port == *port)
                            .map(|p| single(p.protocol, p.container_port))
                            .collect();
                        for (address, spec) in container_destinations(container, &specs) {
                            keys.extend(spec.allow_keys(address));
                        }
                    }
                }
            }
        }
        keys
    }
}

/// What of `have` is left once `want` is taken out: nothing, one piece or two.
pub fn subtract(have: PortSpec, want: PortSpec) -> Vec<PortSpec> {
    if !have.overlaps(&want) {
        return vec![have];
    }
    let below = (have.port_start < want.port_start).then(|| PortSpec {
        port_end: want.port_start - 1,
        ..have
    });
    let above = (have.port_end > want.port_end).then(|| PortSpec {
        port_start: want.port_end + 1,
        ..have
    });
    below.into_iter().chain(above).collect()
}

/// After a denial closed some of a derived rule's destinations: the rule lists only the
/// ports still open on at least one of its addresses, and says why when none is.
pub fn narrow(rule: &mut ResolvedRule, denied: &BTreeSet<AllowKey>) {
    let open = |spec: &PortSpec, port: u16| {
        rule.addresses.iter().any(|address| {
            let key = AllowKey::new(map_addr(*address), spec.protocol.number(*address), port);
            !denied.contains(&key)
        })
    };
    let mut specs = Vec::new();
    for spec in &rule.specs {
        let mut run: Option<PortSpec> = None;
        for port in spec.ports() {
            match (&mut run, open(spec, port)) {
                (Some(r), true) => r.port_end = port,
                (None, true) => run = Some(single(spec.protocol, port)),
                (Some(_), false) => specs.extend(run.take()),
                (None, false) => {}
            }
        }
        specs.extend(run);
    }
    rule.specs = specs;
    if rule.specs.is_empty() {
        rule.host_ports.clear();
        rule.problem = Some(format!(
            "closed by `portgate deny` (`portgate allow {} {}` lifts it)",
            rule.target, rule.ports
        ));
    }
}

fn single(protocol: super::Protocol, port: u16) -> PortSpec {
    PortSpec {
        protocol,
        port_start: port,
        port_end: port,
    }
}

fn container_destinations<'a>(
    container: &'a Workload,
    specs: &'a [PortSpec],
) -> impl Iterator<Item = (IpAddr, PortSpec)> + 'a {
    container
        .addresses
        .iter()
        .flat_map(move |address| specs.iter().map(move |spec| (*address, *spec)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Protocol, Published};

    fn spec(s: &str) -> Ports {
        Ports::Spec(s.parse().expect("spec"))
    }

    fn target(s: &str) -> Target {
        s.parse().expect("target")
    }

    #[test]
    fn add_covers_and_lift_splits_ranges_of_the_same_kind() {
        let mut denials = Denials::default();
        denials.add(target("web"), spec("8000-8010"));
        denials.add(target("web"), spec("8005"));
        assert_eq!(denials.list().len(), 1, "covered: nothing added");
        assert!(denials.covers(&target("web"), spec("8001-8002")));
        assert!(!denials.covers(&target("web"), spec("8001/udp")));
        assert!(!denials.covers(&target("db"), spec("8001")));
        assert!(!denials.lift(&target("web"), Ports::Published));
        assert!(!denials.lift(&target("db"), spec("8005")));
        assert!(denials.lift(&target("web"), spec("8005")));
        let left: Vec<String> = denials.list().iter().map(ToString::to_string).collect();
        assert_eq!(left, ["web 8000-8004/tcp", "web 8006-8010/tcp"]);
        denials.add(target("web"), Ports::Published);
        assert!(denials.lift(&target("web"), Ports::Published));
        assert!(denials.lift(&target("web"), spec("1-65535")));
        assert!(denials.is_empty());
    }

    #[test]
    fn keys_follow_the_target_to_the_running_containers() {
        let web = Workload {
            id: format!("{:0>64}", "web"),
            name: "web".into(),
            addresses: vec![
                "172.17.0.2".parse().expect("ip"),
                "fd00::2".parse().expect("ip"),
            ],
            published: vec![Published {
                host_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp,
            }],
            allow_label: Some("80/tcp".into()),
            allow_label_origin: None,
        };
        let keys = |denials: Vec<Denial>| {
            Denials::new(denials)
                .keys(std::slice::from_ref(&web))
                .into_iter()
                .map(|k| (super::super::addr_from_map(k.addr).to_string(), k.port))
                .collect::<Vec<_>>()
        };
        let both = vec![("172.17.0.2".to_owned(), 80), ("fd00::2".to_owned(), 80)];
        let denial = |t: Target, p: Ports| Denial {
            target: t,
            ports: p,
        };
        assert_eq!(keys(vec![denial(target("web"), spec("80"))]), both);
        assert_eq!(keys(vec![denial(target("web"), Ports::Published)]), both);
        let host_port = Target::HostPort {
            protocol: Protocol::Tcp,
            port: 8080,
        };
        assert_eq!(keys(vec![denial(host_port, Ports::Published)]), both);
        assert_eq!(
            keys(vec![denial(target("172.17.0.2"), spec("80"))]),
            both[..1]
        );
        assert!(keys(vec![denial(target("db"), spec("80"))]).is_empty());
    }
}
