//! Which container ports the gate sees. The gate sits on bridges and on macvlan networks'
//! parent interfaces: a container on the host network, on an ipvlan network, on a macvlan
//! network without a parent the agent knows, or on a bridge the agent does not gate, is
//! reachable without passing it. `status` names those containers with their ports, `list`
//! says per rule whether its addresses are behind a gated bridge.

use std::{collections::BTreeSet, net::IpAddr};

use crate::{
    api::{PublishedPorts, RootlessContainer, UngatedContainer},
    policy::{Published, ResolvedRule},
    runtime::{Attachment, Container, rootless::is_stand_in},
};

/// Whether traffic to a container's addresses on this network crosses a gated bridge (or
/// a gated macvlan parent: `gated_bridges` names both).
fn is_gated(attachment: &Attachment, gated_bridges: &BTreeSet<String>) -> bool {
    let macvlan = attachment.driver.as_deref() == Some("macvlan");
    let gate_at = attachment
        .bridge
        .as_ref()
        .or(attachment.parent.as_ref().filter(|_| macvlan));
    gate_at.is_some_and(|name| gated_bridges.contains(name))
}

/// Why the gate does not see this network's traffic.
fn why_not(attachment: &Attachment) -> String {
    match (attachment.driver.as_deref(), &attachment.bridge) {
        (_, Some(bridge)) => format!(
            "network {} (bridge {bridge}): not gated",
            attachment.network
        ),
        (Some(driver), None) => format!(
            "network {} ({driver}): no bridge for the gate",
            attachment.network
        ),
        (None, None) => format!(
            "network {} (driver unknown): no bridge for the gate",
            attachment.network
        ),
    }
}

fn published_text(p: &Published) -> String {
    let spec = format!("{}->{}/{}", p.host_port, p.container_port, p.protocol);
    if p.host_ip.is_unspecified() {
        spec
    } else {
        let host = match p.host_ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        format!("{host}:{spec}")
    }
}

/// The container as `status` lists it when the gate does not see (all of) it; none when it
/// does, or when it has no network of its own (`none`, or another container's).
pub fn ungated(
    container: &Container,
    gated_bridges: &BTreeSet<String>,
) -> Option<UngatedContainer> {
    let exposed = container.exposed.iter().map(ToString::to_string).collect();
    let entry =
        |reason: String, networks: Vec<&Attachment>, published: Vec<String>| UngatedContainer {
            container: container.name.clone(),
            engine: container.engine.to_string(),
            network_mode: container.network_mode.clone(),
            reason,
            networks: networks.iter().map(|a| a.network.clone()).collect(),
            addresses: networks
                .iter()
                .flat_map(|a| &a.addresses)
                .map(ToString::to_string)
                .collect(),
            published,
            exposed,
        };
    if container.is_host_network() {
        let reason = "host network: its ports are the host's own, behind no bridge".to_owned();
        let published = container.published.iter().map(published_text).collect();
        return Some(entry(reason, Vec::new(), published));
    }
    // `--network none` (Docker's "null" driver): nothing to reach.
    let (gated, ungated): (Vec<&Attachment>, Vec<&Attachment>) = container
        .networks
        .iter()
        .filter(|a| a.driver.as_deref() != Some("null") && container.network_mode != "none")
        .partition(|a| is_gated(a, gated_bridges));
    if ungated.is_empty() {
        return None;
    }
    let reason = ungated
        .iter()
        .map(|a| why_not(a))
        .collect::<Vec<_>>()
        .join("; ");
    // The engines publish ports to a bridge network's address: through the gate whenever the
    // container is on a gated bridge at all.
    let published = if gated.is_empty() {
        container.published.iter().map(published_text).collect()
    } else {
        Vec::new()
    };
    Some(entry(reason, ungated, published))
}

/// The published ports of `containers` that the gate sees, and those it does not.
pub fn published_ports(
    containers: &[Container],
    gated_bridges: &BTreeSet<String>,
) -> PublishedPorts {
    let mut ports = PublishedPorts::default();
    for container in containers {
        // A rootless container's ports are host sockets: the socket lookup judges them.
        let gated = !container.is_host_network()
            && (container.is_rootless()
                || container
                    .networks
                    .iter()
                    .any(|a| is_gated(a, gated_bridges)));
        let count = container.published.len();
        if gated {
            ports.gated += count;
        } else {
            ports.ungated += count;
        }
    }
    ports
}

/// Whether the gate sees traffic to what `rule` opens: true when every address is on a
/// gated bridge, false when one is not (or its container is on the host network); none when
/// no container owns the rule's addresses (an address rule for something else).
pub fn rule_gated(
    rule: &ResolvedRule,
    containers: &[Container],
    gated_bridges: &BTreeSet<String>,
) -> Option<bool> {
    let on_host_network = containers
        .iter()
        .filter(|c| rule.containers.contains(&c.name))
        .any(Container::is_host_network);
    if on_host_network {
        return Some(false);
    }
    let verdicts: Vec<Option<bool>> = rule
        .addresses
        .iter()
        .map(|address| {
            if is_stand_in(address) {
                return Some(true); // a rootless container's: judged at the host's socket
            }
            containers
                .iter()
                .flat_map(|c| &c.networks)
                .find(|a| a.addresses.contains(address))
                .map(|a| is_gated(a, gated_bridges))
        })
        .collect();
    if verdicts.contains(&Some(false)) {
        Some(false)
    } else if !verdicts.is_empty() && verdicts.iter().all(|v| *v == Some(true)) {
        Some(true)
    } else {
        None
    }
}

/// The rootless engines' containers, with their published ports: gated (but on the host
/// network), since the agent's socket lookup judges every listening socket of the host whose
/// port it lists.
pub fn rootless(containers: &[Container]) -> Vec<RootlessContainer> {
    containers
        .iter()
        .filter(|c| c.is_rootless())
        .map(|c| RootlessContainer {
            container: c.name.clone(),
            user: c.user.clone().unwrap_or_default(),
            engine: c.engine.to_string(),
            id: c.id.clone(),
            published: c.published.iter().map(published_text).collect(),
            // On the host network its programs listen themselves, as the user: no relay,
            // nothing the agent knows as published (`ungated` names it).
            gated: !c.is_host_network(),
            stand_in_address: c
                .addresses
                .first()
                .map(ToString::to_string)
                .unwrap_or_default(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        policy::{PortSpec, Ports, Protocol, Resolver, RuleSet, Target},
        runtime::Engine,
    };

    fn attachment(network: &str, driver: &str, bridge: Option<&str>, address: &str) -> Attachment {
        Attachment {
            network: network.to_owned(),
            network_id: None,
            driver: Some(driver.to_owned()),
            bridge: bridge.map(str::to_owned),
            parent: None,
            addresses: if address.is_empty() {
                Vec::new()
            } else {
                vec![address.parse().expect("address")]
            },
        }
    }

    fn container(
        name: &str,
        mode: &str,
        networks: Vec<Attachment>,
        published: &[u16],
    ) -> Container {
        Container {
            engine: Engine::Docker,
            user: None,
            id: format!("{name:0>64}"),
            name: name.to_owned(),
            addresses: networks.iter().flat_map(|n| n.addresses.clone()).collect(),
            published: published
                .iter()
                .map(|port| Published {
                    host_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
                    host_port: 8000 + port,
                    container_port: *port,
                    protocol: Protocol::Tcp,
                })
                .collect(),
            labels: Default::default(),
            image: None,
            allow_label_origin: None,
            network_mode: mode.to_owned(),
            networks,
            exposed: vec!["53/udp".parse::<PortSpec>().expect("spec")],
        }
    }

    fn gated() -> BTreeSet<String> {
        BTreeSet::from(["docker0".to_owned()])
    }

    /// web on docker0 (gated), dns on the host network, nas on macvlan, api on a bridge
    /// the agent does not gate, both on docker0 and macvlan.
    fn host() -> Vec<Container> {
        vec![
            container(
                "web",
                "bridge",
                vec![attachment(
                    "bridge",
                    "bridge",
                    Some("docker0"),
                    "172.17.0.2",
                )],
                &[80],
            ),
            container(
                "dns",
                "host",
                vec![attachment("host", "host", None, "")],
                &[],
            ),
            container(
                "nas",
                "lan",
                vec![attachment("lan", "macvlan", None, "192.168.1.50")],
                &[],
            ),
            container(
                "api",
                "backend",
                vec![attachment(
                    "backend",
                    "bridge",
                    Some("br-0123456789ab"),
                    "172.18.0.2",
                )],
                &[443],
            ),
            container(
                "offline",
                "none",
                vec![attachment("none", "null", None, "")],
                &[],
            ),
            container(
                "both",
                "bridge",
                vec![
                    attachment("bridge", "bridge", Some("docker0"), "172.17.0.3"),
                    attachment("lan", "macvlan", None, "192.168.1.51"),
                ],
                &[8080],
            ),
        ]
    }

    #[test]
    fn status_names_what_the_gate_cannot_see() {
        let containers = host();
        let listed: Vec<UngatedContainer> = containers
            .iter()
            .filter_map(|c| ungated(c, &gated()))
            .collect();
        let names: Vec<&str> = listed.iter().map(|u| u.container.as_str()).collect();
        assert_eq!(
            names,
            ["dns", "nas", "api", "both"],
            "web is gated, offline has no network"
        );

        let dns = &listed[0];
        assert_eq!(dns.network_mode, "host");
        assert!(dns.reason.starts_with("host network"), "{}", dns.reason);
        assert_eq!(dns.exposed, ["53/udp"]);
        assert!(dns.addresses.is_empty());

        let nas = &listed[1];
        assert_eq!(nas.reason, "network lan (macvlan): no bridge for the gate");
        assert_eq!(nas.networks, ["lan"]);
        assert_eq!(nas.addresses, ["192.168.1.50"]);

        let api = &listed[2];
        assert_eq!(
            api.reason,
            "network backend (bridge br-0123456789ab): not gated"
        );
        assert_eq!(
            api.published,
            ["8443->443/tcp"],
            "DNATed to a bridge without gate"
        );

        // On a gated bridge too: published ports go through the gate, the macvlan side does not.
        let both = &listed[3];
        assert_eq!(both.networks, ["lan"]);
        assert_eq!(both.addresses, ["192.168.1.51"]);
        assert!(both.published.is_empty(), "{:?}", both.published);

        assert_eq!(
            published_ports(&containers, &gated()),
            PublishedPorts {
                gated: 2,
                ungated: 1
            }
        );
        // Gating the other bridge too: api is gated.
        let mut all = gated();
        all.insert("br-0123456789ab".to_owned());
        assert!(ungated(&containers[3], &all).is_none());
    }

    #[test]
    fn published_text_shows_a_specific_host_address() {
        let p = |host: &str| Published {
            host_ip: host.parse().expect("address"),
            host_port: 8080,
            container_port: 80,
            protocol: Protocol::Tcp,
        };
        assert_eq!(published_text(&p("0.0.0.0")), "8080->80/tcp");
        assert_eq!(published_text(&p("127.0.0.1")), "127.0.0.1:8080->80/tcp");
        assert_eq!(published_text(&p("::1")), "[::1]:8080->80/tcp");
    }

    /// alice's rootless web, publishing 8080 -> 80 through its relay.
    fn rootless_web() -> Container {
        let id = "77e5b7dfff342d86dc0ccfbb5870775afd04d790d7de4d74d95d57b3167c393e";
        Container {
            engine: Engine::RootlessPodman,
            user: Some("alice".to_owned()),
            name: "alice/web".to_owned(),
            addresses: vec![crate::runtime::rootless::stand_in(id)],
            network_mode: String::new(),
            networks: Vec::new(),
            ..container("x", "", Vec::new(), &[80])
        }
    }

    #[test]
    fn rootless_containers_are_gated_at_the_host_socket() {
        let web = rootless_web();
        let containers = [web.clone()];
        assert_eq!(ungated(&web, &BTreeSet::new()), None);
        let ports = published_ports(&containers, &BTreeSet::new());
        assert_eq!((ports.gated, ports.ungated), (1, 0));
        let listed = rootless(&containers);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].container, "alice/web");
        assert_eq!(listed[0].user, "alice");
        assert_eq!(listed[0].published, ["8080->80/tcp"]);
        assert!(listed[0].gated);
        assert!(
            listed[0]
                .stand_in_address
                .starts_with("fd70:6f72:7467:6174:")
        );

        let mut rules = RuleSet::default();
        rules
            .allow(
                "alice/web".parse::<Target>().expect("target"),
                Ports::Spec("80".parse().expect("spec")),
                crate::policy::Access::default(),
            )
            .expect("allow");
        let workloads: Vec<_> = containers.iter().map(Container::workload).collect();
        let resolved =
            Resolver::default().resolve(&rules, &workloads, &crate::policy::Context::default());
        assert_eq!(resolved.rules[0].containers, ["alice/web"]);
        assert_eq!(
            rule_gated(&resolved.rules[0], &containers, &BTreeSet::new()),
            Some(true)
        );

        // On the host network its programs listen as the user: not gated.
        let host = Container {
            network_mode: "host".to_owned(),
            ..rootless_web()
        };
        assert!(!rootless(std::slice::from_ref(&host))[0].gated);
        assert_eq!(published_ports(&[host], &BTreeSet::new()).ungated, 1);
    }

    #[test]
    fn rules_say_whether_the_gate_sees_their_addresses() {
        let containers = host();
        let mut rules = RuleSet::default();
        for target in [
            "web",
            "dns",
            "nas",
            "api",
            "offline",
            "both",
            "172.17.0.2",
            "10.1.2.3",
            "gone",
        ] {
            rules
                .allow(
                    target.parse::<Target>().expect("target"),
                    Ports::Spec("80".parse().expect("spec")),
                    crate::policy::Access::default(),
                )
                .expect("allow");
        }
        let workloads: Vec<_> = containers.iter().map(Container::workload).collect();
        let resolved =
            Resolver::default().resolve(&rules, &workloads, &crate::policy::Context::default());
        let gated: Vec<(String, Option<bool>)> = resolved
            .rules
            .iter()
            .map(|r| (r.target.to_string(), rule_gated(r, &containers, &gated())))
            .collect();
        let expected = [
            ("web", Some(true)),
            ("dns", Some(false)),
            ("nas", Some(false)),
            ("api", Some(false)),
            ("offline", None),
            ("both", Some(false)),
            ("172.17.0.2", Some(true)),
            ("10.1.2.3", None),
            ("gone", None),
        ];
        let expected: Vec<(String, Option<bool>)> = expected
            .iter()
            .map(|(t, g)| ((*t).to_owned(), *g))
            .collect();
        assert_eq!(gated, expected);
    }
}
