//! Netfilter delegation: the one firewall rule per gated bridge that hands the decision about
//! published ports to the gate, placed after the host's own rules and only where FORWARD
//! would drop. Why, where and how narrow: docs/netfilter.md.

mod exec;
mod keeper;
mod nft;
mod place;
mod saved;
mod xtables;

pub use keeper::NetfilterKeeper;
pub use saved::{LiveRule, SAVED_RULESETS, SavedRule, live_rules, saved_rules};
// The runtime asks nft whether netavark keeps its rules there.
pub(crate) use exec::find_binary;

use std::{collections::BTreeSet, io};

use place::{Location, OwnRule, Plan, Position, RuleId, Scope, Slot, Survey, Target, layout};
use serde::Serialize;
use tracing::{info, warn};

/// Every delegation comment is `COMMENT_PREFIX <bridge> COMMENT_SUFFIX`.
pub const COMMENT_PREFIX: &str = "portgate: delegate ";
pub const COMMENT_SUFFIX: &str = " to the eBPF gate";

/// Status when no backend's FORWARD path would drop: no rule is needed for the bridge.
pub const BACKEND_NONE: &str = "none";
pub const CHAIN_NOT_NEEDED: &str = "not needed";

/// The key suffix of a bridge's replies rule. `/` never occurs in an interface name, so a key
/// names exactly one rule: `podman0` (toward the bridge) or `podman0/replies`.
const REPLIES_KEY: &str = "/replies";
/// What the comment of a replies rule says after the bridge's name.
const REPLIES_WORD: &str = " replies";

/// The key of the replies rule of `bridge`, for [`Delegation::ensure`]: where the bridge's
/// engine accepts its traffic only in a table of its own (netavark's nftables driver, a
/// separate base chain on the forward hook), a FORWARD chain that would drop also drops the
/// replies of the connections the gate admitted, so they need a rule of their own:
///
/// ```text
/// -i <bridge> -m conntrack --ctstate DNAT --ctdir REPLY -m comment --comment "portgate: delegate <bridge> replies to the eBPF gate" -j ACCEPT
/// iifname "<bridge>" ct status dnat ct direction reply accept comment "..."
/// ```
///
/// Replies only: `--ctstate DNAT` alone holds for both directions of any DNATed connection,
/// also one a container opens to a port forward of the host's that leads elsewhere, which it
/// would let through a dropping FORWARD. In the reply direction it holds only for connections
/// to published ports that came in from outside, so the rule lets nothing out that was not let
/// in.
pub fn replies_key(bridge: &str) -> String {
    format!("{bridge}{REPLIES_KEY}")
}

/// The bridge a rule key names, and whether it is the replies rule.
pub(crate) fn split_key(key: &str) -> (&str, bool) {
    match key.strip_suffix(REPLIES_KEY) {
        Some(bridge) => (bridge, true),
        None => (key, false),
    }
}

/// The comment that marks (and identifies) the rule of `key` (a bridge, or
/// [`replies_key`] of one).
pub fn comment_for(key: &str) -> String {
    let (bridge, replies) = split_key(key);
    let word = if replies { REPLIES_WORD } else { "" };
    format!("{COMMENT_PREFIX}{bridge}{word}{COMMENT_SUFFIX}")
}

/// The rule key a delegation comment names, if `comment` is exactly one of ours.
pub fn bridge_of_comment(comment: &str) -> Option<String> {
    let middle = comment
        .strip_prefix(COMMENT_PREFIX)?
        .strip_suffix(COMMENT_SUFFIX)?;
    match middle.strip_suffix(REPLIES_WORD) {
        Some(bridge) if check_bridge(bridge).is_ok() => Some(replies_key(bridge)),
        _ => check_bridge(middle).ok().map(|()| middle.to_owned()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("unexpected output from `{command}`: {detail}")]
    Parse { command: String, detail: String },
    #[error("bridge name {name:?}: {reason}")]
    InvalidBridge { name: String, reason: &'static str },
    #[error("{0}")]
    Unsupported(String),
}

/// Where a bridge's rule is, per backend that needs one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DelegationStatus {
    pub bridge: String,
    /// "iptables-legacy", "iptables-nft", "ip6tables-legacy", "ip6tables-nft", "nftables"
    /// ("iptables"/"ip6tables" where only the plain binary exists), or "none" when no
    /// backend's FORWARD path would drop (then `chain` is "not needed" and `installed` false).
    /// `installed` false with a real backend means the rule is missing (an error was returned).
    pub backend: String,
    /// "FORWARD" or "DOCKER-USER" for iptables; "<family> <table> <chain>" for nftables.
    pub chain: String,
    pub installed: bool,
    /// The bridge's replies rule ([`replies_key`]) rather than its rule toward the bridge.
    pub replies: bool,
}

/// Remembers which bridges are delegated and what it installed, so that the periodic check
/// can put back what a firewall reload removed.
#[derive(Debug, Default)]
pub struct Delegation {
    bridges: Vec<String>,
    ensured: bool,
    statuses: Vec<DelegationStatus>,
}

impl Delegation {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes sure each bridge has its rule wherever FORWARD would drop; returns per-bridge
    /// status. `bridges` is the complete list of gated bridges, with [`replies_key`] of those
    /// that need a replies rule too: delegation rules not in it are removed. Every backend is handled even when one fails; the first error
    /// is returned (the others are logged) and `status()` still tells what was done.
    pub fn ensure(&mut self, bridges: &[String]) -> Result<Vec<DelegationStatus>, NetfilterError> {
        for bridge in bridges {
            check_bridge(split_key(bridge).0)?;
        }
        let mut unique = Vec::new();
        for bridge in bridges {
            if !unique.contains(bridge) {
                unique.push(bridge.clone());
            }
        }
        self.bridges = unique;
        self.ensured = true;
        let outcome = self.reconcile();
        self.statuses = outcome.statuses.clone();
        first_error(outcome.errors).map_or(Ok(outcome.statuses), Err)
    }

    /// Called every 2 s by the agent: re-checks each rule (`iptables -C`, the nftables
    /// listing) and re-inserts what a firewall reload removed, logging "restored" at warn
    /// level; follows a change of place (DOCKER-USER appeared, policy changed, a rule of the
    /// host's now follows ours). Returns how many rules it inserted (a move inserts one).
    /// Does nothing before the first `ensure`.
    pub fn check_and_restore(&mut self) -> Result<usize, NetfilterError> {
        if !self.ensured {
            return Ok(0);
        }
        let outcome = self.reconcile();
        self.statuses = outcome.statuses;
        first_error(outcome.errors).map_or(Ok(outcome.inserted), Err)
    }

    pub fn status(&self) -> Vec<DelegationStatus> {
        self.statuses.clone()
    }

    /// Brings every backend in line with `self.bridges`.
    fn reconcile(&self) -> Outcome {
        let previously: BTreeSet<(&str, &str, &str)> = self
            .statuses
            .iter()
            .filter(|status| status.installed)
            .map(|status| {
                (
                    status.backend.as_str(),
                    status.chain.as_str(),
                    status.bridge.as_str(),
                )
            })
            .collect();
        let mut outcome = Outcome::default();
        let mut surveyed_all = true;
        for backend in Backend::all() {
            let survey = match backend.survey() {
                Ok(Some(survey)) => survey,
                Ok(None) => continue,
                Err(error) => {
                    surveyed_all = false;
                    outcome.errors.push(error);
                    continue;
                }
            };
            let mut kept = vec![false; survey.own.len()];
            for target in &survey.targets {
                let chain = target.location.display();
                for bridge in self.bridges.iter().filter(|b| target.scope.holds(b)) {
                    let here: Vec<usize> = (0..survey.own.len())
                        .filter(|&i| {
                            survey.own[i].location == target.location
                                && survey.own[i].bridge == *bridge
                        })
                        .collect();
                    let was_installed =
                        previously.contains(&(backend.name(), chain.as_str(), bridge.as_str()));
                    let result = place_rule(
                        backend,
                        &survey,
                        target,
                        bridge,
                        &here,
                        &mut kept,
                        was_installed,
                    );
                    let installed = match result {
                        Ok(inserted) => {
                            outcome.inserted += usize::from(inserted);
                            true
                        }
                        Err(error) => {
                            outcome.errors.push(error);
                            false
                        }
                    };
                    let (name, replies) = split_key(bridge);
                    outcome.statuses.push(DelegationStatus {
                        bridge: name.to_owned(),
                        backend: backend.name().to_owned(),
                        chain: chain.clone(),
                        installed,
                        replies,
                    });
                }
            }
            // Ours but not wanted: duplicates, the old place after a move (within the chain or
            // to another one), no longer needed, or a bridge that is no longer gated.
            for (rule, _) in survey.own.iter().zip(&kept).filter(|(_, kept)| !**kept) {
                match backend.delete(&survey, rule) {
                    Ok(()) => info!(bridge = %rule.bridge, backend = backend.name(),
                        chain = %rule.location.display(), "delegation rule removed"),
                    Err(error) => outcome.errors.push(error),
                }
            }
        }
        if surveyed_all {
            for bridge in &self.bridges {
                let (name, replies) = split_key(bridge);
                if !outcome
                    .statuses
                    .iter()
                    .any(|status| status.bridge == name && status.replies == replies)
                {
                    outcome.statuses.push(DelegationStatus {
                        bridge: name.to_owned(),
                        backend: BACKEND_NONE.to_owned(),
                        chain: CHAIN_NOT_NEEDED.to_owned(),
                        installed: false,
                        replies,
                    });
                }
            }
        }
        outcome
    }
}

/// Puts the rule for `bridge` in place in `target`, marking in `kept` the rules of ours to
/// keep; `here` are our rules there for that bridge. Returns whether it inserted one.
fn place_rule(
    backend: Backend,
    survey: &Survey,
    target: &Target,
    bridge: &str,
    here: &[usize],
    kept: &mut [bool],
    was_installed: bool,
) -> Result<bool, NetfilterError> {
    let plan = backend.plan(survey, target, bridge, here)?;
    for &i in &plan.keep {
        kept[i] = true;
    }
    if !plan.insert {
        return Ok(false);
    }
    // The new rule goes in first; the old one, if any, is deleted after it (as unwanted):
    // never a moment without the rule. Should the insert fail, the old one stays.
    if let Err(error) = backend.insert(survey, target, bridge) {
        for &i in here {
            kept[i] = true;
        }
        return Err(error);
    }
    let chain = target.location.display();
    if !here.is_empty() {
        info!(bridge = %bridge, backend = backend.name(), chain = %chain,
            "delegation rule moved after the host's own rules");
    } else if was_installed {
        warn!(bridge = %bridge, backend = backend.name(), chain = %chain,
            "delegation rule restored (a firewall reload had removed it)");
    } else {
        info!(bridge = %bridge, backend = backend.name(), chain = %chain,
            "delegation rule installed");
    }
    Ok(true)
}

/// Removes every rule carrying a portgate delegation comment, in every backend; returns how
/// many. Rules without that comment are never touched.
pub fn remove_all() -> Result<usize, NetfilterError> {
    remove_where(|_| true)
}

/// Removes the delegation rules of `bridges` only (what one gate installed), in every
/// backend; other bridges' rules stay.
pub fn remove_for(bridges: &BTreeSet<String>) -> Result<usize, NetfilterError> {
    remove_where(|key| bridges.contains(split_key(key).0))
}

fn remove_where(wanted: impl Fn(&str) -> bool) -> Result<usize, NetfilterError> {
    let mut removed = 0;
    let mut errors = Vec::new();
    for backend in Backend::all() {
        let survey = match backend.survey() {
            Ok(Some(survey)) => survey,
            Ok(None) => continue,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        for rule in survey.own.iter().filter(|rule| wanted(&rule.bridge)) {
            match backend.delete(&survey, rule) {
                Ok(()) => {
                    removed += 1;
                    info!(bridge = %rule.bridge, backend = backend.name(),
                        chain = %rule.location.display(), "delegation rule removed");
                }
                Err(error) => errors.push(error),
            }
        }
    }
    first_error(errors).map_or(Ok(removed), Err)
}

/// Interface names the rule may carry: what Docker and Podman name bridges, nothing that
/// iptables or nft would read as a wildcard (`+`, `*`) or that needs quoting.
fn check_bridge(name: &str) -> Result<(), NetfilterError> {
    let reason = if name.is_empty() || name.len() > 15 {
        Some("must be 1 to 15 characters long")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Some("only letters, digits, '-', '_' and '.' are supported")
    } else if name.starts_with(['-', '.']) {
        Some("must not start with '-' or '.'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetfilterError::InvalidBridge {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn first_error(errors: Vec<NetfilterError>) -> Option<NetfilterError> {
    let mut errors = errors.into_iter();
    let first = errors.next()?;
    for other in errors {
        warn!(error = %other, "netfilter delegation");
    }
    Some(first)
}

#[derive(Debug, Default)]
struct Outcome {
    statuses: Vec<DelegationStatus>,
    inserted: usize,
    errors: Vec<NetfilterError>,
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Xtables(&'static xtables::Xtables),
    Nft,
}

impl Backend {
    fn all() -> impl Iterator<Item = Backend> {
        xtables::BACKENDS
            .iter()
            .map(Backend::Xtables)
            .chain([Backend::Nft])
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Xtables(backend) => backend.name,
            Backend::Nft => nft::BACKEND,
        }
    }

    fn survey(&self) -> Result<Option<Survey>, NetfilterError> {
        match self {
            Backend::Xtables(backend) => xtables::survey(backend),
            Backend::Nft => nft::survey(),
        }
    }

    /// Whether `target` needs a new rule for `bridge`, and which of `candidates` (our rules
    /// there for that bridge, indexes into `survey.own`) to keep.
    fn plan(
        &self,
        survey: &Survey,
        target: &Target,
        bridge: &str,
        candidates: &[usize],
    ) -> Result<Plan, NetfilterError> {
        match (self, &target.location) {
            (Backend::Xtables(_), Location::Chain(chain)) => {
                // `-C` decides, even when the listing showed nothing: should a future
                // iptables print our rule in a form not recognised above, the rule is still
                // found and never inserted twice.
                if !xtables::check(survey, chain, bridge)? {
                    // At most look-alikes with our comment: replaced (deleted as unwanted).
                    return Ok(Plan {
                        insert: true,
                        keep: Vec::new(),
                    });
                }
                let exact = RuleId::Spec(xtables::rule_spec(bridge));
                let copies: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|&i| survey.own[i].id == exact)
                    .collect();
                if copies.is_empty() {
                    // Present in a form the listing does not show as ours: left as it is.
                    return Ok(Plan {
                        insert: false,
                        keep: candidates.first().copied().into_iter().collect(),
                    });
                }
                // `-D` removes the first identical rule. So the last copy in place is kept
                // (or the new one, inserted after every misplaced copy), and copies past the
                // terminal rule are left alone: deleting them would take the live one first.
                let mut keep: Vec<usize> = copies
                    .iter()
                    .copied()
                    .filter(|i| target.unreachable.contains(i))
                    .collect();
                let placed = copies.iter().rev().find(|i| target.placed.contains(i));
                keep.extend(placed);
                Ok(Plan {
                    insert: placed.is_none(),
                    keep,
                })
            }
            _ => {
                // nftables deletes by handle: keep one copy in place, delete every other.
                let placed = candidates.iter().find(|i| target.placed.contains(i));
                Ok(Plan {
                    insert: placed.is_none(),
                    keep: placed.copied().into_iter().collect(),
                })
            }
        }
    }

    fn insert(&self, survey: &Survey, target: &Target, bridge: &str) -> Result<(), NetfilterError> {
        match (self, &target.location) {
            (Backend::Xtables(_), Location::Chain(chain)) => {
                xtables::insert(survey, chain, target.position, bridge)
            }
            (Backend::Nft, location) => nft::insert(survey, location, target.position, bridge),
            (Backend::Xtables(_), Location::Nft { .. }) => Ok(()),
        }
    }

    fn delete(&self, survey: &Survey, rule: &OwnRule) -> Result<(), NetfilterError> {
        match self {
            Backend::Xtables(_) => xtables::delete(survey, rule),
            Backend::Nft => nft::delete(survey, rule),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_round_trip() {
        assert_eq!(
            comment_for("podman0"),
            "portgate: delegate podman0 to the eBPF gate"
        );
        assert_eq!(
            bridge_of_comment(&comment_for("br-0123456789ab")).as_deref(),
            Some("br-0123456789ab")
        );
        assert_eq!(
            comment_for(&replies_key("podman0")),
            "portgate: delegate podman0 replies to the eBPF gate"
        );
        assert_eq!(
            bridge_of_comment(&comment_for(&replies_key("podman0"))),
            Some(replies_key("podman0"))
        );
        assert_eq!(split_key(&replies_key("podman0")), ("podman0", true));
        assert_eq!(split_key("podman0"), ("podman0", false));
        assert_eq!(
            bridge_of_comment("portgate: delegate a b to the eBPF gate"),
            None
        );
        assert_eq!(
            bridge_of_comment("portgate: delegate br0 to the eBPF gate!"),
            None
        );
        assert_eq!(bridge_of_comment("something else"), None);
    }

    #[test]
    fn bridge_names() {
        for ok in [
            "docker0",
            "podman0",
            "br-0123456789ab",
            "cni-podman0",
            "a.b_c",
        ] {
            assert!(check_bridge(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "br+",
            "br*",
            "-o",
            ".x",
            "a b",
            "a\"b",
            "sixteen-chars-xx",
        ] {
            assert!(check_bridge(bad).is_err(), "{bad}");
        }
    }
}
