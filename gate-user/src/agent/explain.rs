//! `portgate explain`: the verdict a new connection would get, read from the maps the
//! kernel reads (block list, allow map, access lists) in the order the programs read them,
//! without sending anything.

use std::net::IpAddr;

use anyhow::{Context as _, bail};
use gate_common::{ANY_SOURCE, AllowKey, NO_RULE};

use super::Agent;
use crate::{
    api::Explanation,
    datapath::{Lookup, sys},
    policy::{PortSpec, Protocol, SourceSpec, Target, map_addr},
};

impl Agent {
    pub(super) fn explain(
        &self,
        source: &str,
        target: &str,
        port: &str,
        via: Option<&str>,
    ) -> anyhow::Result<Explanation> {
        let source: IpAddr = source
            .parse()
            .with_context(|| format!("invalid source {source:?}: expected an IP address"))?;
        let spec: PortSpec = port.parse()?;
        if spec.port_start != spec.port_end {
            bail!("explain takes one port, e.g. 5432/tcp");
        }
        let ifindex = match via {
            Some(name) => sys::ifindex(name)
                .with_context(|| format!("interface {name}: no such interface"))?,
            None => 0,
        };
        let mut steps = Vec::new();
        let (address, container_port) = self.destination(&source, target, spec, &mut steps)?;
        let key = AllowKey::new(
            map_addr(address),
            spec.protocol.number(address),
            if spec.protocol == Protocol::Icmp {
                0
            } else {
                container_port
            },
        );
        let lookup = self
            .datapath
            .lookup_admission(&key, &map_addr(source), ifindex)?;
        let (reason, rule) = verdict(&lookup);
        match reason {
            "blocked" => {
                let entries: Vec<String> = self
                    .saved
                    .blocks
                    .iter()
                    .filter(|p| p.contains(source))
                    .map(ToString::to_string)
                    .collect();
                steps.push(format!("{source} is on the block list ({})", entries.join(", ")));
            }
            "not_allowed" => steps.push(format!(
                "no rule allows {address} {container_port}/{}",
                spec.protocol
            )),
            "source_not_allowed" => steps.push(format!(
                "the rules for {address} {container_port}/{} admit other sources",
                spec.protocol
            )),
            "interface_not_allowed" => steps.push(format!(
                "the rules for {address} {container_port}/{} admit connections on other interfaces{}",
                spec.protocol,
                if via.is_none() { " (give --via IFACE)" } else { "" }
            )),
            _ => {}
        }
        if let Some(id) = rule {
            steps.push(self.describe_rule(id, source));
        }
        Ok(Explanation {
            verdict: if rule.is_some() {
                "admitted"
            } else {
                "dropped"
            }
            .to_owned(),
            reason: reason.to_owned(),
            rule,
            destination: address.to_string(),
            destination_port: container_port,
            protocol: spec.protocol.to_string(),
            steps,
        })
    }

    /// The container address and port `target` stands for: a container (by name or
    /// address), or the host with a published host port.
    fn destination(
        &self,
        source: &IpAddr,
        target: &str,
        spec: PortSpec,
        steps: &mut Vec<String>,
    ) -> anyhow::Result<(IpAddr, u16)> {
        let containers = self.containers();
        let port = spec.port_start;
        let host_address = match target.parse::<Target>()? {
            Target::Container(name) if name == "host" => None,
            Target::Container(name) => {
                let container = containers
                    .iter()
                    .find(|c| c.is_named(&name))
                    .with_context(|| format!("no running container named {name}"))?;
                let address = container
                    .addresses
                    .iter()
                    .find(|a| a.is_ipv4() == source.is_ipv4())
                    .or(container.addresses.first())
                    .with_context(|| format!("container {name} has no address"))?;
                steps.push(format!("{name} is {address}"));
                return Ok((*address, port));
            }
            // One of the host's own addresses (it can be bound here) takes published ports;
            // any other address is a container's, known to an engine or not.
            Target::Address(address) if is_local(address) => Some(address),
            Target::Address(address) => return Ok((address, port)),
            Target::HostPort { .. } => bail!("give a container, a container address or the host"),
        };
        // The host: a published host port maps to a container port.
        for container in &containers {
            for published in &container.published {
                let on_address =
                    published.host_ip.is_unspecified() || Some(published.host_ip) == host_address;
                if on_address && published.host_port == port && published.protocol == spec.protocol
                {
                    let address = container
                        .addresses
                        .iter()
                        .find(|a| a.is_ipv4() == source.is_ipv4())
                        .or(container.addresses.first())
                        .with_context(|| format!("container {} has no address", container.name))?;
                    steps.push(format!(
                        "host port {port}/{} is published by {} to {address}:{}",
                        spec.protocol, container.name, published.container_port
                    ));
                    return Ok((*address, published.container_port));
                }
            }
        }
        bail!(
            "{target} is neither a running container nor a container address, and no container publishes host port {port}/{}",
            spec.protocol
        )
    }

    /// One line on the rule that admits `source`: its target, ports, and the set or prefix
    /// that names the source.
    fn describe_rule(&self, id: u32, source: IpAddr) -> String {
        let Some(rule) = self.resolved.rules.iter().find(|r| r.id == id) else {
            return format!("admitted by rule {id}");
        };
        let mut line = format!(
            "admitted by rule {id} ({} {}{}",
            rule.target, rule.ports, rule.access
        );
        let matched = rule.access.from.iter().find(|spec| match spec {
            SourceSpec::Prefix(prefix) => prefix.contains(source),
            SourceSpec::Set(name) => self
                .saved
                .sets
                .get(name)
                .is_some_and(|set| set.iter().any(|p| p.contains(source))),
        });
        line.push(')');
        if let Some(spec) = matched {
            line.push_str(&format!(", source in {spec}"));
        }
        line
    }
}

/// Whether `address` is one of this host's (network namespace's) addresses.
fn is_local(address: IpAddr) -> bool {
    std::net::UdpSocket::bind((address, 0)).is_ok()
}

/// The counter and the admitting rule, in the kernel's order (see `admits` in gate-ebpf).
fn verdict(lookup: &Lookup) -> (&'static str, Option<u32>) {
    if lookup.blocked {
        return ("blocked", None);
    }
    let Some(allow) = lookup.allow.filter(|v| v.rule_id != NO_RULE) else {
        return ("not_allowed", None);
    };
    if allow.access == ANY_SOURCE {
        return ("new_allowed", Some(allow.rule_id));
    }
    for found in [lookup.on_interface, lookup.on_any].into_iter().flatten() {
        if found != NO_RULE {
            return ("new_allowed", Some(found));
        }
    }
    if lookup.on_interface.is_some() || lookup.on_any.is_some() {
        ("source_not_allowed", None)
    } else {
        ("interface_not_allowed", None)
    }
}
