//! Containers on macvlan networks: the gate goes on each parent interface a running
//! container's macvlan network names, and each container's macvlan addresses are bound to
//! that parent (as a bridge port's container's are to its port), so that what it opens is
//! tracked and nothing else opens in its name.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use gate_common::PortAddrKey;
use tracing::warn;

use super::Agent;
use crate::{datapath::sys, policy::map_addr};

impl Agent {
    /// The parents of the running containers' macvlan networks that exist here, by ifindex,
    /// with the addresses of the containers behind each.
    fn macvlan_parents(&self) -> BTreeMap<u32, (String, Vec<std::net::IpAddr>)> {
        let mut parents: BTreeMap<u32, (String, Vec<std::net::IpAddr>)> = BTreeMap::new();
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

    /// Each macvlan container's addresses, bound to its parent interface.
    pub(super) fn macvlan_bindings(&self) -> BTreeSet<PortAddrKey> {
        self.macvlan_parents()
            .into_iter()
            .flat_map(|(ifindex, (_, addresses))| {
                addresses.into_iter().map(move |addr| PortAddrKey {
                    addr: map_addr(addr),
                    ifindex,
                })
            })
            .collect()
    }

    /// Attaches the gate to the macvlan parents that running containers use and detaches it
    /// from those no container uses any more. Called after the bindings are written: a
    /// parent is gated from the first frame, and its containers' connections tracked.
    pub(super) fn sync_macvlan(&mut self) -> anyhow::Result<()> {
        let wanted = self.macvlan_parents();
        let attached = self.datapath.macvlan_parents().clone();
        if !wanted.is_empty() {
            // The host's own macvlan interfaces on a parent are not containers.
            self.sync_local_addrs()?;
        }
        for (ifindex, (parent, _)) in &wanted {
            if attached.get(ifindex) == Some(parent) {
                continue;
            }
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
