//! Containers on macvlan networks: the gate goes on each parent interface a running
//! container's macvlan network names, and each container's macvlan addresses are bound to
//! that parent (as a bridge port's container's are to its port), so that what it opens is
//! tracked and nothing else opens in its name.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use gate_common::PortAddrKey;
use tracing::warn;

use super::Agent;

/// Macvlan parents by ifindex: name, and the addresses of the containers behind it.
pub(super) type MacvlanParents = BTreeMap<u32, (String, Vec<std::net::IpAddr>)>;

/// Each macvlan container's addresses, bound to its parent interface.
pub(super) fn bindings(parents: &MacvlanParents) -> impl Iterator<Item = PortAddrKey> + '_ {
    parents.iter().flat_map(|(ifindex, (_, addresses))| {
        addresses.iter().map(|addr| PortAddrKey {
            addr: map_addr(*addr),
            ifindex: *ifindex,
        })
    })
}
use crate::{datapath::sys, policy::map_addr};

impl Agent {
    /// The parents of the running containers' macvlan networks that exist here, by ifindex,
    /// with the addresses of the containers behind each.
    pub(super) fn macvlan_parents(&self) -> MacvlanParents {
        let mut parents = MacvlanParents::new();
        for container in self.containers() {
            for attachment in &container.networks {
                if attachment.driver.as_deref() != Some("macvlan") {
                    continue;
                }
                let Some(parent) = &attachment.parent else {
                    continue;
                };
                let Some(ifindex) = sys::ifindex(parent) else {
                    continue;
                };
                let entry = parents
                    .entry(ifindex)
                    .or_insert_with(|| (parent.clone(), Vec::new()));
                entry.1.extend(attachment.addresses.iter().copied());
            }
        }
        parents
    }

    /// Attaches the gate to the macvlan parents that running containers use (`wanted`) and
    /// detaches it from those no container uses any more. Called after the bindings are
    /// written: a parent is gated from the first frame, and its containers' connections
    /// tracked.
    pub(super) fn sync_macvlan(&mut self, wanted: &MacvlanParents) -> anyhow::Result<()> {
        let attached = self.datapath.macvlan_parents().clone();
        for (ifindex, (parent, _)) in wanted {
            if attached.get(ifindex) == Some(parent) {
                continue;
            }
            // The host's own macvlan interfaces on the parent are not containers: the
            // program must know the host's addresses from its first frame.
            self.sync_local_addrs()?;
            let Some(mac) = sys::mac_address(parent) else {
                warn!("macvlan parent {parent}: no MAC address; retrying");
                continue;
            };
            if let Err(err) = self.datapath.attach_macvlan(parent, *ifindex, mac) {
                warn!(
                    "macvlan parent {parent}: {:#}; retrying",
                    anyhow::Error::from(err)
                );
            }
        }
        let gone: BTreeSet<u32> = attached
            .iter()
            .filter(|(ifindex, name)| wanted.get(ifindex).map(|(n, _)| n) != Some(*name))
            .map(|(ifindex, _)| *ifindex)
            .collect();
        self.datapath
            .forget_macvlan(&gone)
            .context("detaching the gate from unused macvlan parents")
    }
}
