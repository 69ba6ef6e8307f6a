//! Which tracked connections a change of the rules ends: those that removed or changed rules
//! admitted and the rules in force no longer admit (`deny --cut`, the end of a `--for`). A
//! block ends its sources' connections itself (`Datapath::sync_blocks`).

use std::collections::BTreeSet;

use anyhow::Context as _;
use gate_common::{AllowKey, FlowKey, ORIGIN_REMOTE, PROTO_ICMP, PROTO_ICMPV6};

use super::Agent;
use crate::policy::{Admission, RuleSet, addr_from_map};

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

/// The ids of the rules in `before` that `after` no longer holds as they were (removed, or
/// narrowed by a deny that split their ports).
pub(super) fn changed_rules(before: &RuleSet, after: &RuleSet) -> BTreeSet<u32> {
    before
        .rules()
        .iter()
        .filter(|rule| !after.rules().contains(rule))
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
