//! Who may connect: address prefixes, named sets of them, the block list, and the access
//! lists the kernel reads for rules that name sources or interfaces.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use gate_common::{Addr, NO_RULE};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{PolicyError, map_addr};

/// An address prefix: `10.0.0.0/8`, `2001:db8::/32`, or one address (`192.0.2.7`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    /// Host bits zero.
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// Refuses a prefix with host bits set (`10.0.0.1/8`): it is a typo more often than not.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, PolicyError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(PolicyError::Prefix(format!("{addr}/{len}")));
        }
        let prefix = Self {
            addr: mask(addr, len),
            len,
        };
        if prefix.addr != addr {
            return Err(PolicyError::HostBits {
                given: format!("{addr}/{len}"),
                meant: prefix.to_string(),
            });
        }
        Ok(prefix)
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.addr.is_ipv4() && mask(addr, self.len) == self.addr
    }

    /// The prefix as the kernel's tries hold it: the address in map form (IPv4 mapped into
    /// IPv6) and the number of its leading bits that count.
    pub fn map_key(&self) -> (Addr, u32) {
        let offset = if self.addr.is_ipv4() { 96 } else { 0 };
        (map_addr(self.addr), offset + u32::from(self.len))
    }

    /// The prefix of a trie key, back (IPv4 when the bits lie in the IPv4-mapped range).
    pub fn from_map_key(addr: Addr, bits: u32) -> Option<Self> {
        let v6 = std::net::Ipv6Addr::from(addr);
        match v6.to_ipv4_mapped() {
            Some(v4) if bits >= 96 => Self::new(v4.into(), u8::try_from(bits - 96).ok()?).ok(),
            _ => Self::new(v6.into(), u8::try_from(bits).ok()?).ok(),
        }
    }

    /// An IPv6 prefix short enough to cover the IPv4-mapped range (`::/0` ... `::/80`), where
    /// the tries keep IPv4 addresses: it must not admit IPv4 sources.
    fn covers_mapped_ipv4(&self) -> bool {
        self.addr.is_ipv6() && self.len <= 96 && self.contains(mapped_ipv4_range().addr)
    }
}

/// `::ffff:0.0.0.0/96`, where the tries hold IPv4 addresses.
fn mapped_ipv4_range() -> Prefix {
    Prefix {
        addr: IpAddr::V6(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)),
        len: 96,
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((bits & mask).into())
        }
    }
}

impl FromStr for Prefix {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PolicyError::Prefix(s.to_owned());
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len = match len {
            Some(len) => len.parse().map_err(|_| bad())?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Self::new(addr, len)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.len == host {
            self.addr.fmt(f)
        } else {
            write!(f, "{}/{}", self.addr, self.len)
        }
    }
}

impl Serialize for Prefix {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One entry of a rule's sources (`--from`): a prefix, or the name of a set.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceSpec {
    Prefix(Prefix),
    Set(String),
}

impl FromStr for SourceSpec {
    type Err = PolicyError;

    /// A set name starts with a letter; anything else is a prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if is_set_name(s) {
            return Ok(Self::Set(s.to_owned()));
        }
        s.parse().map(Self::Prefix)
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Prefix(prefix) => prefix.fmt(f),
            Self::Set(name) => f.write_str(name),
        }
    }
}

impl Serialize for SourceSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SourceSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A set name: a letter, then letters, digits, `_`, `.` or `-` (so it never reads as an
/// address: IPv6 addresses that start with a letter hold a colon).
pub fn is_set_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Named sets of prefixes, shared by the rules that name them.
pub type SourceSets = BTreeMap<String, BTreeSet<Prefix>>;

/// The prefixes `specs` stand for, with the sets expanded; a set that does not exist adds
/// nothing (the rule then admits fewer, never more).
pub fn expand(specs: &[SourceSpec], sets: &SourceSets) -> BTreeSet<Prefix> {
    let mut prefixes = BTreeSet::new();
    for spec in specs {
        match spec {
            SourceSpec::Prefix(prefix) => {
                prefixes.insert(*prefix);
            }
            SourceSpec::Set(name) => {
                prefixes.extend(sets.get(name).into_iter().flatten().copied());
            }
        }
    }
    prefixes
}

/// What a rule that names sources or interfaces opens, for one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restriction {
    pub rule_id: u32,
    /// Where connections must come in (ifindex); None: any interface. An interface that
    /// does not exist makes the rule admit nothing: `Some(None)` is not representable, the
    /// resolver leaves such a rule out.
    pub ifindex: Option<u32>,
    /// Who may connect; empty: anyone (on `ifindex`).
    pub prefixes: BTreeSet<Prefix>,
}

/// A destination's access list as the kernel holds it (keys without the list's id):
/// (ifindex or 0, address, bits of the address) → the admitting rule, or `NO_RULE` for a
/// marker (the list names the interface, not the source).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccessList(pub BTreeMap<(u32, Addr, u32), u32>);

impl AccessList {
    /// The list of the `restrictions` on one destination, each rule in id order (where two
    /// rules name the same source on the same interface, the lower id admits).
    pub fn build(restrictions: &[&Restriction]) -> Self {
        let mut sorted: Vec<&&Restriction> = restrictions.iter().collect();
        sorted.sort_by_key(|r| r.rule_id);
        let mut entries = BTreeMap::new();
        // An admitting entry replaces a marker; between two rules, the first (lower id) stays.
        let mut admit = |key, rule_id| {
            let slot = entries.entry(key).or_insert(NO_RULE);
            if *slot == NO_RULE {
                *slot = rule_id;
            }
        };
        let mut markers = Vec::new();
        for restriction in &sorted {
            let ifindex = restriction.ifindex.unwrap_or(0);
            if restriction.prefixes.is_empty() {
                // Anyone on this interface: the interface key itself admits.
                admit((ifindex, [0; 16], 0), restriction.rule_id);
                continue;
            }
            for prefix in &restriction.prefixes {
                let (addr, bits) = prefix.map_key();
                admit((ifindex, addr, bits), restriction.rule_id);
            }
            // This interface is named; a source the prefixes miss meets the marker.
            markers.push((ifindex, [0; 16], 0));
            if restriction.prefixes.iter().any(Prefix::covers_mapped_ipv4) {
                // `::/0` must not admit IPv4 sources, which the trie keeps in `::ffff:0:0/96`.
                let range = mapped_ipv4_range();
                markers.push((ifindex, map_addr(range.addr), u32::from(range.len)));
            }
        }
        for key in markers {
            entries.entry(key).or_insert(NO_RULE);
        }
        Self(entries)
    }

    /// The entry a source arriving on `ifindex` meets, as the kernel looks it up: the
    /// longest prefix on that interface, then on any interface.
    pub fn lookup(&self, ifindex: u32, source: IpAddr) -> (Option<u32>, Option<u32>) {
        let addr = map_addr(source);
        let longest = |on: u32| {
            self.0
                .iter()
                .filter(|((i, prefix, bits), _)| *i == on && covers(prefix, *bits, &addr))
                .max_by_key(|((_, _, bits), _)| *bits)
                .map(|(_, rule)| *rule)
        };
        (longest(ifindex), longest(0))
    }
}

/// Whether the first `bits` of `prefix` equal those of `addr`.
fn covers(prefix: &Addr, bits: u32, addr: &Addr) -> bool {
    let p = u128::from_be_bytes(*prefix);
    let a = u128::from_be_bytes(*addr);
    let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
    p & mask == a & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().expect("prefix")
    }

    #[test]
    fn prefixes_parse_print_and_refuse_host_bits() {
        assert_eq!(p("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(p("192.0.2.7").to_string(), "192.0.2.7");
        assert_eq!(p("2001:db8::/32").to_string(), "2001:db8::/32");
        assert!(matches!(
            "10.0.0.1/8".parse::<Prefix>(),
            Err(PolicyError::HostBits { .. })
        ));
        assert!(matches!(
            "10.0.0.0/33".parse::<Prefix>(),
            Err(PolicyError::Prefix(_))
        ));
        assert!(p("10.0.0.0/8").contains("10.9.8.7".parse().expect("ip")));
        assert!(!p("10.0.0.0/8").contains("11.0.0.1".parse().expect("ip")));
        assert!(!p("::/0").contains("10.0.0.1".parse().expect("ip")));
        for text in [
            "10.0.0.0/8",
            "192.0.2.7",
            "2001:db8::/32",
            "::/0",
            "0.0.0.0/0",
        ] {
            let (addr, bits) = p(text).map_key();
            assert_eq!(Prefix::from_map_key(addr, bits), Some(p(text)), "{text}");
        }
    }

    #[test]
    fn source_specs_are_prefixes_or_set_names() {
        assert_eq!(
            "office".parse::<SourceSpec>(),
            Ok(SourceSpec::Set("office".into()))
        );
        assert_eq!(
            "fd00::1".parse::<SourceSpec>(),
            Ok(SourceSpec::Prefix(p("fd00::1")))
        );
        assert!("1office".parse::<SourceSpec>().is_err());
    }

    fn restriction(rule_id: u32, ifindex: Option<u32>, prefixes: &[&str]) -> Restriction {
        Restriction {
            rule_id,
            ifindex,
            prefixes: prefixes.iter().map(|s| p(s)).collect(),
        }
    }

    #[test]
    fn access_lists_admit_listed_sources_and_mark_the_rest() {
        let list = AccessList::build(&[&restriction(3, None, &["10.0.0.0/8"])]);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(list.lookup(7, ip("10.1.2.3")), (None, Some(3)));
        assert_eq!(list.lookup(7, ip("192.0.2.1")), (None, Some(NO_RULE)));

        let via = AccessList::build(&[&restriction(4, Some(9), &[])]);
        assert_eq!(via.lookup(9, ip("192.0.2.1")), (Some(4), None));
        assert_eq!(via.lookup(8, ip("192.0.2.1")), (None, None));

        let v6_any = AccessList::build(&[&restriction(5, None, &["::/0"])]);
        assert_eq!(v6_any.lookup(1, ip("2001:db8::1")), (None, Some(5)));
        assert_eq!(
            v6_any.lookup(1, ip("10.0.0.1")),
            (None, Some(NO_RULE)),
            "::/0 must not admit IPv4"
        );
    }
}
