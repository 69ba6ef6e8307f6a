//! Which tracked connections a change of the rules ends: those that removed or changed rules
//! admitted and the rules in force no longer admit (`deny --cut`, the end of a `--for`). A
//! block ends its sources' connections itself (`Datapath::sync_blocks`).

use std::collections::BTreeSet;

use anyhow::Context as _;
use gate_common::{AllowKey, FlowKey, ORIGIN_REMOTE, PROTO_ICMP, PROTO_ICMPV6};

use super::Agent;
use crate::policy::{Admission, Resolved, ResolvedRule, addr_from_map};

impl Agent {
    /// Ends the connections from outside that the rules `ids` admitted and that no rule in
    /// force admits now; returns how many.
    pub(super) fn cut_unadmitted(&mut self, ids: &BTreeSet<u32>) -> anyhow::Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let resolved = std::sync::Arc::clone(&self.resolved);
        self.datapath
            .cut_flows(|key, state| {
                state.origin == ORIGIN_REMOTE
                    && ids.contains(&state.rule_id)
                    && !still_admitted(&resolved.entries, key)
            })
            .context("ending the connections the removed rules admitted")
    }
}

/// The ids of the rules, saved or derived (labels, the default policy), that the resolution
/// `after` no longer holds as `before` did: removed, narrowed by a deny that split their
/// ports, or closed by a denial of what a label opened.
pub(super) fn changed_rules(before: &Resolved, after: &Resolved) -> BTreeSet<u32> {
    let shape = |r: &ResolvedRule| (r.specs.clone(), r.addresses.clone(), r.access.clone());
    before
        .rules
        .iter()
        .filter(|old| {
            !after
                .rules
                .iter()
                .any(|new| new.id == old.id && new.is_active() && shape(new) == shape(old))
        })
        .map(|rule| rule.id)
        .collect()
}

/// Whether the rules in force would admit this flow's connection if it were new. The
/// interface it came in on is not recorded in the flow: a rule that admits its source on
/// any interface keeps it (an end errs on the side of keeping).
fn still_admitted(
    entries: &std::collections::BTreeMap<AllowKey, Admission>,
    key: &FlowKey,
) -> bool {
    // Echo requests are allowed per address (port 0); the flow keeps the echo identifier.
    let port = if matches!(key.proto, PROTO_ICMP | PROTO_ICMPV6) {
        0
    } else {
        key.container_port
    };
    entries
        .get(&AllowKey::new(key.container_addr, key.proto, port))
        .is_some_and(|admission| admission.admits_from(addr_from_map(key.remote_addr)))
}
