//! Where a delegation rule goes: the chains that need it, our rules found there, and the
//! place after the host's own rules (shared by the iptables and nftables backends).

use std::collections::BTreeSet;

use super::split_key;

/// A chain, as a backend names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Location {
    /// An iptables chain in the filter table.
    Chain(String),
    Nft {
        family: String,
        table: String,
        chain: String,
    },
}

impl Location {
    pub(super) fn display(&self) -> String {
        match self {
            Location::Chain(chain) => chain.clone(),
            Location::Nft {
                family,
                table,
                chain,
            } => format!("{family} {table} {chain}"),
        }
    }
}

/// How to delete a rule: its specification (iptables) or its handle (nftables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RuleId {
    Spec(Vec<String>),
    Handle(u64),
}

/// A rule carrying one of our comments.
#[derive(Debug, Clone)]
pub(super) struct OwnRule {
    pub(super) location: Location,
    pub(super) bridge: String,
    pub(super) id: RuleId,
}

/// One backend's state, read just before acting on it.
#[derive(Debug)]
pub(super) struct Survey {
    pub(super) tool: std::path::PathBuf,
    /// nftables: whether `nft` speaks JSON (commands are sent as JSON then).
    pub(super) json: bool,
    /// The chains where each gated bridge needs its rule (empty: FORWARD would not drop).
    pub(super) targets: Vec<Target>,
    pub(super) own: Vec<OwnRule>,
}

/// A chain that needs the rule, and where in it the rule belongs: after every rule of the
/// host's own, just before the chain's terminal rule (the one that ends it unconditionally)
/// or at the end when it has none. The host's rules thus decide first; the gate can only
/// narrow what they let through.
#[derive(Debug)]
pub(super) struct Target {
    pub(super) location: Location,
    /// Where a new rule is put.
    pub(super) position: Position,
    /// Our rules (indexes into `Survey::own`) already in that place: only rules of ours
    /// between them and the terminal rule (or the end).
    pub(super) placed: Vec<usize>,
    /// Our rules after the terminal rule, which no packet reaches.
    pub(super) unreachable: Vec<usize>,
    /// Which bridges' rules belong in this chain.
    pub(super) scope: Scope,
}

/// The bridges whose rules a target chain holds (by bridge name, replies rules included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Scope {
    All,
    Only(BTreeSet<String>),
    Except(BTreeSet<String>),
}

impl Scope {
    pub(super) fn holds(&self, key: &str) -> bool {
        let bridge = split_key(key).0;
        match self {
            Scope::All => true,
            Scope::Only(bridges) => bridges.contains(bridge),
            Scope::Except(bridges) => !bridges.contains(bridge),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Position {
    End,
    /// iptables: before the rule with this number (1-based).
    BeforeNumber(usize),
    /// nftables: before the rule with this handle.
    BeforeHandle(u64),
}

/// One rule of a target chain, in the chain's order, as far as placement is concerned.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    /// Index into `Survey::own` when the rule carries one of our comments.
    pub(super) own: Option<usize>,
    /// Ends the chain unconditionally (a RETURN, DROP or REJECT, whichever count there).
    pub(super) terminal: bool,
}

/// Where the rule belongs among `slots`: the index of the terminal rule (None: the end),
/// our rules already in place and our rules past the terminal rule.
pub(super) fn layout(slots: &[Slot]) -> (Option<usize>, Vec<usize>, Vec<usize>) {
    let terminal = slots.iter().position(|slot| slot.terminal);
    let end = terminal.unwrap_or(slots.len());
    let start = slots[..end]
        .iter()
        .rposition(|slot| slot.own.is_none())
        .map_or(0, |i| i + 1);
    let placed = slots[start..end]
        .iter()
        .filter_map(|slot| slot.own)
        .collect();
    let unreachable = slots
        .get(end + 1..)
        .unwrap_or_default()
        .iter()
        .filter_map(|slot| slot.own)
        .collect();
    (terminal, placed, unreachable)
}

/// What to do about one bridge's rule in one target chain.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// Put a new rule at the target's position (the one there is missing or misplaced).
    pub(super) insert: bool,
    /// Our rules there (indexes into `Survey::own`) to leave alone; the others are deleted.
    pub(super) keep: Vec<usize>,
}
