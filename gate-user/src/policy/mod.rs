//! The desired state: allow rules, their validation, and what they mean for the allow map.

mod store;

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use gate_common::{
    ALLOW_CAPACITY, AllowKey, AllowValue, MAX_RULES, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP, ipv4_mapped,
};
use serde::{Deserialize, Serialize};

pub use store::{RuleStore, StoreError};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("invalid address {0:?}: expected an IPv4 or IPv6 address such as 172.17.0.2 or fd00::2")]
    Address(String),
    #[error("invalid port {0:?}: expected a number from 1 to 65535")]
    Port(String),
    #[error("invalid port range {0:?}: the first port must not be above the last")]
    Range(String),
    #[error("unknown protocol {0:?}: expected tcp or udp (or `icmp` alone for echo)")]
    Protocol(String),
    #[error("no rule allows {0}")]
    NotAllowed(String),
    #[error("{0} is already allowed")]
    AlreadyAllowed(String),
    #[error("too many rules: at most {MAX_RULES}")]
    TooManyRules,
    #[error("the rules would need {needed} allow-map entries; the map holds {ALLOW_CAPACITY}")]
    TooManyEntries { needed: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    /// ICMP or ICMPv6 echo, by the address family.
    Icmp,
}

impl Protocol {
    fn number(self, address: IpAddr) -> u8 {
        match (self, address) {
            (Self::Tcp, _) => PROTO_TCP,
            (Self::Udp, _) => PROTO_UDP,
            (Self::Icmp, IpAddr::V4(_)) => PROTO_ICMP,
            (Self::Icmp, IpAddr::V6(_)) => PROTO_ICMPV6,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
        })
    }
}

/// What a rule opens on an address: `80`, `80/tcp`, `53/udp`, `8000-8010/tcp`, or `icmp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port_start: u16,
    pub port_end: u16,
}

impl PortSpec {
    pub fn contains(&self, other: &PortSpec) -> bool {
        self.protocol == other.protocol
            && self.port_start <= other.port_start
            && other.port_end <= self.port_end
    }

    fn overlaps(&self, other: &PortSpec) -> bool {
        self.protocol == other.protocol
            && self.port_start <= other.port_end
            && other.port_start <= self.port_end
    }

    fn ports(&self) -> impl Iterator<Item = u16> {
        self.port_start..=self.port_end
    }

    fn len(&self) -> usize {
        usize::from(self.port_end - self.port_start) + 1
    }
}

impl FromStr for PortSpec {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("icmp") {
            return Ok(Self { protocol: Protocol::Icmp, port_start: 0, port_end: 0 });
        }
        let (ports, protocol) = match s.split_once('/') {
            Some((ports, proto)) => (ports, proto),
            None => (s, "tcp"),
        };
        let protocol = match protocol.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(PolicyError::Protocol(protocol.to_owned())),
        };
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(PolicyError::Port(p.to_owned())),
        };
        let (port_start, port_end) = match ports.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(ports)?, port(ports)?),
        };
        if port_start > port_end {
            return Err(PolicyError::Range(ports.to_owned()));
        }
        Ok(Self { protocol, port_start, port_end })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            Protocol::Icmp => f.write_str("icmp"),
            _ if self.port_start == self.port_end => write!(f, "{}/{}", self.port_start, self.protocol),
            _ => write!(f, "{}-{}/{}", self.port_start, self.port_end, self.protocol),
        }
    }
}

pub fn parse_address(s: &str) -> Result<IpAddr, PolicyError> {
    s.parse().map_err(|_| PolicyError::Address(s.to_owned()))
}

/// One allow rule: new connections to `address` on `spec` may pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Stable while the rule exists; indexes the per-rule counters.
    pub id: u32,
    pub address: IpAddr,
    #[serde(flatten)]
    pub spec: PortSpec,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.address, self.spec)
    }
}

/// The address as stored in map keys.
pub fn map_addr(address: IpAddr) -> gate_common::Addr {
    match address {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The set of allow rules, kept in id order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn new(mut rules: Vec<Rule>) -> Self {
        rules.sort_by_key(|r| r.id);
        Self { rules }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Adds a rule; returns its id. Ports already open on the address are refused only when
    /// the whole spec is already covered by one rule.
    pub fn allow(&mut self, address: IpAddr, spec: PortSpec) -> Result<u32, PolicyError> {
        if self.rules.iter().any(|r| r.address == address && r.spec.contains(&spec)) {
            return Err(PolicyError::AlreadyAllowed(format!("{address} {spec}")));
        }
        let id = self.free_id().ok_or(PolicyError::TooManyRules)?;
        let mut next = self.clone();
        next.rules.push(Rule { id, address, spec });
        next.rules.sort_by_key(|r| r.id);
        next.check_capacity()?;
        *self = next;
        Ok(id)
    }

    /// Removes `spec` on `address` from every rule that covers part of it, splitting ranges.
    /// Returns the ids of the rules removed (the first piece of a split keeps its id).
    pub fn deny(&mut self, address: IpAddr, spec: PortSpec) -> Result<Vec<u32>, PolicyError> {
        let mut next = Vec::with_capacity(self.rules.len() + 1);
        let mut removed = Vec::new();
        let mut touched = false;
        let mut pending_split = Vec::new();
        for rule in &self.rules {
            if rule.address != address || !rule.spec.overlaps(&spec) {
                next.push(rule.clone());
                continue;
            }
            touched = true;
            let below = (rule.spec.port_start < spec.port_start).then(|| PortSpec {
                port_end: spec.port_start - 1,
                ..rule.spec
            });
            let above = (rule.spec.port_end > spec.port_end).then(|| PortSpec {
                port_start: spec.port_end + 1,
                ..rule.spec
            });
            match (below, above) {
                (None, None) => removed.push(rule.id),
                (Some(keep), None) | (None, Some(keep)) => {
                    next.push(Rule { spec: keep, ..rule.clone() });
                }
                (Some(below), Some(above)) => {
                    next.push(Rule { spec: below, ..rule.clone() });
                    pending_split.push((rule.address, above));
                }
            }
        }
        if !touched {
            return Err(PolicyError::NotAllowed(format!("{address} {spec}")));
        }
        let mut result = RuleSet::new(next);
        for (address, spec) in pending_split {
            let id = result.free_id().ok_or(PolicyError::TooManyRules)?;
            result.rules.push(Rule { id, address, spec });
            result.rules.sort_by_key(|r| r.id);
        }
        *self = result;
        Ok(removed)
    }

    fn free_id(&self) -> Option<u32> {
        // Rules are sorted by id: the first gap is free.
        let mut candidate = 0;
        for rule in &self.rules {
            if rule.id != candidate {
                break;
            }
            candidate += 1;
        }
        (candidate < MAX_RULES).then_some(candidate)
    }

    fn check_capacity(&self) -> Result<(), PolicyError> {
        let needed: usize = self.rules.iter().map(|r| r.spec.len()).sum();
        if needed > ALLOW_CAPACITY as usize {
            return Err(PolicyError::TooManyEntries { needed });
        }
        Ok(())
    }

    /// The allow map's desired content. Where rules overlap, the lowest id admits.
    pub fn allow_entries(&self) -> BTreeMap<AllowKey, AllowValue> {
        let mut entries = BTreeMap::new();
        for rule in &self.rules {
            let addr = map_addr(rule.address);
            let proto = rule.spec.protocol.number(rule.address);
            for port in rule.spec.ports() {
                entries
                    .entry(AllowKey::new(addr, proto, port))
                    .or_insert(AllowValue { rule_id: rule.id });
            }
        }
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> PortSpec {
        s.parse().expect("valid spec")
    }

    fn addr(s: &str) -> IpAddr {
        parse_address(s).expect("valid address")
    }

    #[test]
    fn port_specs_parse_with_tcp_as_default() {
        assert_eq!(spec("80"), PortSpec { protocol: Protocol::Tcp, port_start: 80, port_end: 80 });
        assert_eq!(spec("53/udp").protocol, Protocol::Udp);
        assert_eq!(spec("8000-8010/TCP"), PortSpec { protocol: Protocol::Tcp, port_start: 8000, port_end: 8010 });
        assert_eq!(spec("icmp").protocol, Protocol::Icmp);
        assert_eq!(spec("8000-8010/tcp").to_string(), "8000-8010/tcp");
        assert_eq!(spec("80").to_string(), "80/tcp");
    }

    #[test]
    fn bad_port_specs_name_the_problem() {
        assert_eq!("0".parse::<PortSpec>(), Err(PolicyError::Port("0".into())));
        assert_eq!("70000".parse::<PortSpec>(), Err(PolicyError::Port("70000".into())));
        assert_eq!("80/sctp".parse::<PortSpec>(), Err(PolicyError::Protocol("sctp".into())));
        assert_eq!("90-80".parse::<PortSpec>(), Err(PolicyError::Range("90-80".into())));
        assert_eq!("x".parse::<PortSpec>(), Err(PolicyError::Port("x".into())));
        assert!(parse_address("10.0.0.256").is_err());
        assert!(parse_address("web").is_err());
    }

    #[test]
    fn allow_assigns_ids_and_refuses_duplicates() {
        let mut rules = RuleSet::default();
        assert_eq!(rules.allow(addr("10.0.0.2"), spec("80")), Ok(0));
        assert_eq!(rules.allow(addr("10.0.0.2"), spec("443")), Ok(1));
        assert!(matches!(rules.allow(addr("10.0.0.2"), spec("80/tcp")), Err(PolicyError::AlreadyAllowed(_))));
        // Same port, other protocol or address: a different rule.
        assert_eq!(rules.allow(addr("10.0.0.2"), spec("80/udp")), Ok(2));
        assert_eq!(rules.allow(addr("fd00::2"), spec("80")), Ok(3));
    }

    #[test]
    fn deny_splits_ranges_and_frees_ids() {
        let mut rules = RuleSet::default();
        rules.allow(addr("10.0.0.2"), spec("8000-8002")).expect("allow");
        assert_eq!(rules.deny(addr("10.0.0.2"), spec("8001")), Ok(vec![]));
        let specs: Vec<String> = rules.rules().iter().map(|r| r.spec.to_string()).collect();
        assert_eq!(specs, ["8000/tcp", "8002/tcp"]);
        assert_eq!(rules.deny(addr("10.0.0.2"), spec("8000-8002")), Ok(vec![0, 1]));
        assert!(rules.rules().is_empty());
        assert!(matches!(rules.deny(addr("10.0.0.2"), spec("80")), Err(PolicyError::NotAllowed(_))));
        assert_eq!(rules.allow(addr("10.0.0.2"), spec("80")), Ok(0));
    }

    #[test]
    fn failed_changes_leave_rules_unchanged() {
        let mut rules = RuleSet::default();
        rules.allow(addr("10.0.0.2"), spec("1-65535")).expect("allow");
        rules.allow(addr("10.0.0.3"), spec("1-65535")).expect("allow");
        rules.allow(addr("10.0.0.4"), spec("1-65535")).expect("allow");
        rules.allow(addr("10.0.0.5"), spec("1-65535")).expect("allow");
        let before = rules.clone();
        assert!(matches!(rules.allow(addr("10.0.0.6"), spec("1-100")), Err(PolicyError::TooManyEntries { .. })));
        assert_eq!(rules, before);
    }

    #[test]
    fn allow_entries_map_addresses_protocols_and_ports() {
        let mut rules = RuleSet::default();
        rules.allow(addr("10.0.0.2"), spec("80-81")).expect("allow");
        rules.allow(addr("fd00::2"), spec("icmp")).expect("allow");
        rules.allow(addr("10.0.0.2"), spec("icmp")).expect("allow");
        let entries = rules.allow_entries();
        assert_eq!(entries.len(), 4);
        let v4 = ipv4_mapped([10, 0, 0, 2]);
        assert_eq!(entries[&AllowKey::new(v4, PROTO_TCP, 81)], AllowValue { rule_id: 0 });
        assert_eq!(entries[&AllowKey::new(v4, PROTO_ICMP, 0)], AllowValue { rule_id: 2 });
        let v6 = map_addr(addr("fd00::2"));
        assert_eq!(entries[&AllowKey::new(v6, PROTO_ICMPV6, 0)], AllowValue { rule_id: 1 });
    }
}
