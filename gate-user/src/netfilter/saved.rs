//! Delegation rules outside the keeper's care: rules in the kernel (for `portgate doctor`, which
//! flags those of bridges no gate is attached to) and rules in saved rulesets. A ruleset saved
//! while the agent runs (`netfilter-persistent save`, `nft list ruleset > /etc/nftables.conf`)
//! holds the delegation rule and restores it at the next boot, before the agent gates the
//! bridge, or for good once portgate is gone; such a rule accepts every DNATed connection to
//! the bridge that the host's own rules before it let through. portgate never edits those
//! files: it says where they hold one.

use std::path::{Path, PathBuf};

use super::{
    Backend, COMMENT_PREFIX, COMMENT_SUFFIX, NetfilterError, bridge_of_comment, split_key,
};

/// Where the usual services keep the rulesets they restore at boot: Debian's
/// netfilter-persistent (`rules.v4`, `rules.v6`), the nftables service, Red Hat's
/// iptables-services.
pub const SAVED_RULESETS: &[&str] = &[
    "/etc/iptables/rules.v4",
    "/etc/iptables/rules.v6",
    "/etc/nftables.conf",
    "/etc/sysconfig/iptables",
    "/etc/sysconfig/ip6tables",
    "/etc/sysconfig/nftables.conf",
];

/// A delegation rule in a saved ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    pub path: PathBuf,
    /// 1-based.
    pub line: usize,
    pub bridge: String,
    /// The bridge's replies rule rather than its rule toward the bridge.
    pub replies: bool,
}

/// Every delegation rule (found by its comment) in the files of `paths` that exist and can be
/// read, in file order.
pub fn saved_rules(paths: &[PathBuf]) -> Vec<SavedRule> {
    let mut found = Vec::new();
    for path in paths {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        found.extend(rules_in(path, &text));
    }
    found
}

fn rules_in(path: &Path, text: &str) -> Vec<SavedRule> {
    text.lines()
        .enumerate()
        .filter_map(|(number, line)| {
            let key = comment_in(line)?;
            let (bridge, replies) = split_key(&key);
            Some(SavedRule {
                path: path.to_owned(),
                line: number + 1,
                bridge: bridge.to_owned(),
                replies,
            })
        })
        .collect()
}

/// The rule key of the delegation comment in an `iptables-save` or `nft list ruleset` line.
fn comment_in(line: &str) -> Option<String> {
    let start = line.find(COMMENT_PREFIX)?;
    let rest = &line[start..];
    let end = rest.find(COMMENT_SUFFIX)? + COMMENT_SUFFIX.len();
    bridge_of_comment(&rest[..end])
}

/// A delegation rule in the kernel's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRule {
    pub bridge: String,
    pub replies: bool,
    /// As in [`super::DelegationStatus`]: e.g. "iptables-nft", "nftables".
    pub backend: String,
    pub chain: String,
}

/// Every delegation rule in every backend of this network namespace, whoever installed it.
pub fn live_rules() -> Result<Vec<LiveRule>, NetfilterError> {
    let mut rules = Vec::new();
    for backend in Backend::all() {
        let Some(survey) = backend.survey()? else {
            continue;
        };
        rules.extend(survey.own.iter().map(|rule| {
            let (bridge, replies) = split_key(&rule.bridge);
            LiveRule {
                bridge: bridge.to_owned(),
                replies,
                backend: backend.name().to_owned(),
                chain: rule.location.display(),
            }
        }));
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_rules_in_iptables_save_and_nft_listings() {
        let text = r#"*filter
:FORWARD DROP [0:0]
-A FORWARD -s 10.0.0.1/32 -j DROP
-A FORWARD -o podman0 -m conntrack --ctstate DNAT -m comment --comment "portgate: delegate podman0 to the eBPF gate" -j ACCEPT
-A FORWARD -i podman0 -m conntrack --ctstate DNAT --ctdir REPLY -m comment --comment "portgate: delegate podman0 replies to the eBPF gate" -j ACCEPT
-A FORWARD -m comment --comment "portgate: delegate a b to the eBPF gate" -j ACCEPT
COMMIT
		oifname "br-0123456789ab" ct status dnat accept comment "portgate: delegate br-0123456789ab to the eBPF gate"
"#;
        let found = rules_in(Path::new("/x"), text);
        let summary: Vec<(usize, &str, bool)> = found
            .iter()
            .map(|rule| (rule.line, rule.bridge.as_str(), rule.replies))
            .collect();
        assert_eq!(
            summary,
            [
                (4, "podman0", false),
                (5, "podman0", true),
                (8, "br-0123456789ab", false)
            ]
        );
    }
}
