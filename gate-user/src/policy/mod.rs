//! The desired state: allow rules, their validation, and what they mean for the allow map.
//!
//! Rules come from three places: saved (`allow`, [`RuleSet`] in `rules.rs`), the policy file
//! (`file.rs`), and the containers themselves (labels, `--default-policy published`). The
//! resolver (`resolve/`) turns them, with the running containers (`workload.rs`), into who
//! may connect to each destination, in three phases: saved rules, derived rules (with ids
//! that stay while they are wanted), admissions.
//!
//! Who may connect, in the words of this module:
//! - [`SourceSpec`]: one source as written (an address, a prefix, a set's name, `any`);
//!   [`SourceSets`]: the named sets.
//! - [`Access`]: a rule's sources and interface as written (`from ... via ...`).
//! - [`Restriction`]: one rule's access, expanded (sets resolved, interface named by index).
//! - [`Admission`]: who may connect to one destination: anyone (by a rule), or the union of
//!   the restrictions of the rules that open it.
//! - [`AccessList`]: an admission's restrictions as the kernel's trie holds them, under an id.

mod denials;
mod file;
mod resolve;
mod rules;
mod sources;
mod store;
mod workload;

use std::{fmt, net::IpAddr, str::FromStr};

use gate_common::{
    ALLOW_CAPACITY, MAX_RULES, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ipv4_mapped,
};
use serde::{Deserialize, Serialize};

pub use denials::{Denial, Denials};
pub use file::{FileError, FilePolicy, FileRule};
pub use resolve::{Admission, Context, Origin, Resolved, ResolvedRule, Resolver};
pub use rules::{Rule, RuleSet};
pub use sources::{AccessList, Prefix, Restriction, SourceSets, SourceSpec, expand, is_set_name};
pub use store::{RuleStore, Saved, StoreError};
pub use workload::{ALLOW_LABEL, IgnoredLabel, LabelOrigin, LabelPolicy, Published, Workload};

/// Saved rules an agent holds by default (`agent --max-rules`): rule ids below the limit are
/// saved rules; as many again are for the rules the agent derives (labels, the default
/// policy, the policy file), which live only while their container or the file says so.
pub const DEFAULT_SAVED_RULES: u32 = MAX_RULES / 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "invalid address {0:?}: expected an IPv4 or IPv6 address such as 172.17.0.2 or fd00::2"
    )]
    Address(String),
    #[error(
        "invalid target {0:?}: expected an IP address or a container name or ID ([a-zA-Z0-9][a-zA-Z0-9_.-]*)"
    )]
    Target(String),
    #[error("--published needs a container, not an address")]
    PublishedNeedsContainer,
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
    #[error(
        "too many rules: the agent holds at most {limit} saved rules (agent --max-rules); nothing changed"
    )]
    TooManyRules { limit: u32 },
    #[error("the rules would need {needed} allow-map entries; the map holds {ALLOW_CAPACITY}")]
    TooManyEntries { needed: usize },
    #[error(
        "invalid source {0:?}: expected an address or prefix such as 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7, or a set name"
    )]
    Prefix(String),
    #[error("{given} has host bits set: did you mean {meant}?")]
    HostBits { given: String, meant: String },
    #[error("no set named {0:?}: create it with `portgate set {0} PREFIX...`")]
    NoSuchSet(String),
    #[error("set {name:?} is used by rule {rules}: deny those first")]
    SetInUse { name: String, rules: String },
    #[error("invalid interface name {0:?}")]
    Interface(String),
    #[error("give either PORTS or --published, not both")]
    PortsAndPublished,
    #[error("which ports? give PORTS (e.g. 80/tcp), --published or --host-port")]
    NoPorts,
    #[error("--host-port names the target itself: give no target, PORTS or --published")]
    HostPortAlone,
    #[error("--host-port takes one port and protocol, e.g. 8080/tcp; got {0:?}")]
    HostPortSpec(String),
    #[error(
        "unexpected {0:?}: a label item is PORTS [from SOURCE...] [via IFACE], items separated by commas"
    )]
    Label(String),
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
    pub fn number(self, address: IpAddr) -> u8 {
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

    pub fn overlaps(&self, other: &PortSpec) -> bool {
        self.protocol == other.protocol
            && self.port_start <= other.port_end
            && other.port_start <= self.port_end
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> {
        self.port_start..=self.port_end
    }

    /// The allow-map keys of these ports on `address`.
    pub fn allow_keys(&self, address: IpAddr) -> impl Iterator<Item = gate_common::AllowKey> {
        let (addr, proto) = (map_addr(address), self.protocol.number(address));
        self.ports()
            .map(move |port| gate_common::AllowKey::new(addr, proto, port))
    }

    fn len(&self) -> usize {
        usize::from(self.port_end - self.port_start) + 1
    }
}

impl FromStr for PortSpec {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("icmp") {
            return Ok(Self {
                protocol: Protocol::Icmp,
                port_start: 0,
                port_end: 0,
            });
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
        Ok(Self {
            protocol,
            port_start,
            port_end,
        })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            Protocol::Icmp => f.write_str("icmp"),
            _ if self.port_start == self.port_end => {
                write!(f, "{}/{}", self.port_start, self.protocol)
            }
            _ => write!(f, "{}-{}/{}", self.port_start, self.port_end, self.protocol),
        }
    }
}

pub fn parse_address(s: &str) -> Result<IpAddr, PolicyError> {
    s.parse().map_err(|_| PolicyError::Address(s.to_owned()))
}

/// What a rule applies to: a fixed address, a container that the engines resolve, or
/// whichever container publishes a host port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Address(IpAddr),
    /// A container name or ID (or ID prefix), as the user gave it.
    Container(String),
    /// `--host-port 8080/tcp`: the container port that host port maps to.
    HostPort {
        protocol: Protocol,
        port: u16,
    },
}

impl FromStr for Target {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(address) = s.parse() {
            return Ok(Self::Address(address));
        }
        // Looks like an address attempt (digits and dots, or a colon): say so, rather than
        // take it for a container name.
        if s.contains(':') || (!s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.')) {
            return Err(PolicyError::Address(s.to_owned()));
        }
        let name = s.strip_prefix('/').unwrap_or(s);
        let valid_name = |name: &str| {
            let mut chars = name.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        };
        // A rootless engine's container: `USER/NAME`.
        let valid = match name.split_once('/') {
            Some((user, container)) => valid_name(user) && valid_name(container),
            None => valid_name(name) && !name.starts_with('_'),
        };
        if valid {
            Ok(Self::Container(name.to_owned()))
        } else {
            Err(PolicyError::Target(s.to_owned()))
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address(address) => address.fmt(f),
            Self::Container(name) => f.write_str(name),
            Self::HostPort { protocol, port } => write!(f, "host-port {port}/{protocol}"),
        }
    }
}

/// The ports a rule opens: a fixed spec, or whatever the container publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ports {
    Spec(PortSpec),
    Published,
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Spec(spec) => spec.fmt(f),
            Self::Published => f.write_str("published ports"),
        }
    }
}

/// Who may use a rule, and for how long: any source on any interface, for good, unless
/// said otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Access {
    /// Sources that may connect (a union); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<SourceSpec>,
    /// The interface connections must come in on (`--via wg0`); none: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Unix time (seconds) at which the rule ends by itself (`--for 2h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

impl Access {
    /// Whether the rule admits only some sources or interfaces.
    pub fn is_restricted(&self) -> bool {
        !self.from.is_empty() || self.via.is_some()
    }

    /// Whether the rule's time is up at `now` (Unix seconds).
    pub fn is_due(&self, now: u64) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }

    /// Whether `other` admits the same connections (the expiry aside).
    fn same_reach(&self, other: &Access) -> bool {
        self.from == other.from && self.via == other.via
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.from.is_empty() {
            let from: Vec<String> = self.from.iter().map(ToString::to_string).collect();
            write!(f, " from {}", from.join(" "))?;
        }
        if let Some(via) = &self.via {
            write!(f, " via {via}")?;
        }
        Ok(())
    }
}

/// An interface name as the kernel takes it: 1 to 15 bytes, no `/`, whitespace or `:`.
pub fn check_interface(name: &str) -> Result<(), PolicyError> {
    let valid = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if valid {
        Ok(())
    } else {
        Err(PolicyError::Interface(name.to_owned()))
    }
}

/// What a rule applies to, from the words of `allow` (and of the policy file): a target
/// with PORTS or `published`, or a host port alone.
pub fn rule_target(
    target: Option<&str>,
    ports: Option<&str>,
    published: bool,
    host_port: Option<&str>,
) -> Result<(Target, Ports), PolicyError> {
    if let Some(text) = host_port {
        if target.is_some_and(|t| !t.is_empty()) || ports.is_some() || published {
            return Err(PolicyError::HostPortAlone);
        }
        let spec: PortSpec = text.parse()?;
        if spec.port_start != spec.port_end || spec.protocol == Protocol::Icmp {
            return Err(PolicyError::HostPortSpec(text.to_owned()));
        }
        let target = Target::HostPort {
            protocol: spec.protocol,
            port: spec.port_start,
        };
        return Ok((target, Ports::Published));
    }
    let target: Target = target.unwrap_or_default().parse()?;
    let ports = match (ports, published) {
        (Some(_), true) => return Err(PolicyError::PortsAndPublished),
        (None, false) => return Err(PolicyError::NoPorts),
        (Some(spec), false) => Ports::Spec(spec.parse()?),
        (None, true) => Ports::Published,
    };
    Ok((target, ports))
}

/// The address as stored in map keys.
pub fn map_addr(address: IpAddr) -> gate_common::Addr {
    match address {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address of a map key, back as an IP address (IPv4-mapped ones as IPv4).
pub fn addr_from_map(addr: gate_common::Addr) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Target {
        s.parse().expect("valid target")
    }

    #[test]
    fn port_specs_parse_with_tcp_as_default() {
        let p = |s: &str| s.parse::<PortSpec>().expect("valid");
        assert_eq!(
            p("80"),
            PortSpec {
                protocol: Protocol::Tcp,
                port_start: 80,
                port_end: 80
            }
        );
        assert_eq!(p("53/udp").protocol, Protocol::Udp);
        assert_eq!(
            p("8000-8010/TCP"),
            PortSpec {
                protocol: Protocol::Tcp,
                port_start: 8000,
                port_end: 8010
            }
        );
        assert_eq!(p("icmp").protocol, Protocol::Icmp);
        assert_eq!(p("8000-8010/tcp").to_string(), "8000-8010/tcp");
        assert_eq!(p("80").to_string(), "80/tcp");
    }

    #[test]
    fn bad_port_specs_name_the_problem() {
        assert_eq!("0".parse::<PortSpec>(), Err(PolicyError::Port("0".into())));
        assert_eq!(
            "70000".parse::<PortSpec>(),
            Err(PolicyError::Port("70000".into()))
        );
        assert_eq!(
            "80/sctp".parse::<PortSpec>(),
            Err(PolicyError::Protocol("sctp".into()))
        );
        assert_eq!(
            "90-80".parse::<PortSpec>(),
            Err(PolicyError::Range("90-80".into()))
        );
        assert_eq!("x".parse::<PortSpec>(), Err(PolicyError::Port("x".into())));
    }

    #[test]
    fn targets_are_addresses_or_container_names() {
        assert_eq!(
            target("10.0.0.2"),
            Target::Address(parse_address("10.0.0.2").expect("ip"))
        );
        assert_eq!(
            target("fd00::2"),
            Target::Address(parse_address("fd00::2").expect("ip"))
        );
        assert_eq!(target("web"), Target::Container("web".into()));
        assert_eq!(
            target("/my_app.1-2"),
            Target::Container("my_app.1-2".into())
        );
        assert_eq!(
            "10.0.0.256".parse::<Target>(),
            Err(PolicyError::Address("10.0.0.256".into()))
        );
        assert_eq!(
            "fd00::g".parse::<Target>(),
            Err(PolicyError::Address("fd00::g".into()))
        );
        assert!(matches!(
            "not an address!".parse::<Target>(),
            Err(PolicyError::Target(_))
        ));
        assert!(matches!(
            "-web".parse::<Target>(),
            Err(PolicyError::Target(_))
        ));
        // A rootless engine's container, named with its user.
        assert_eq!(target("alice/web"), Target::Container("alice/web".into()));
        assert_eq!(
            target("_svc-1/my_app.1"),
            Target::Container("_svc-1/my_app.1".into())
        );
        for bad in [
            "alice/",
            "/alice/",
            "alice//web",
            "a/b/c",
            "alice/-web",
            "_web",
        ] {
            assert!(
                matches!(bad.parse::<Target>(), Err(PolicyError::Target(_))),
                "{bad}"
            );
        }
    }
}
