//! The gate on macvlan networks: their containers' traffic never crosses a bridge or the
//! host's netfilter, but it crosses the parent interface, whose TC ingress runs before the
//! macvlan driver hands a frame to its container and whose TC egress sees what containers
//! send out. `toward_macvlan` and `from_macvlan` judge and track there as on a bridge, for
//! frames to or from another MAC than the parent's own.

use std::collections::BTreeSet;

use aya::{maps::HashMap, programs::TcAttachType};
use gate_common::{map_names, program_names};
use tracing::info;

use super::{Datapath, Result, io_err, map_err, remove_if_present, sys};

/// Pin name suffixes of a parent's two links.
pub(super) const IN_SUFFIX: &str = "-macvlan-in";
pub(super) const OUT_SUFFIX: &str = "-macvlan-out";

impl Datapath {
    /// Gates the macvlan containers behind `parent`: its own MAC first (so the host's
    /// frames are told from theirs), then `toward_macvlan` on its ingress and `from_macvlan`
    /// on its egress, each first in its TCX chain.
    pub fn attach_macvlan(&mut self, parent: &str, ifindex: u32, mac: [u8; 6]) -> Result<()> {
        let name = map_names::MACVLAN_PARENTS;
        let mut own = [0u8; 8];
        own[..6].copy_from_slice(&mac);
        let mut parents: HashMap<_, u32, [u8; 8]> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        parents.insert(ifindex, own, 0).map_err(map_err(name))?;
        self.attach_tc(
            program_names::TOWARD_MACVLAN,
            parent,
            TcAttachType::Ingress,
            &format!("{parent}{IN_SUFFIX}"),
        )?;
        self.attach_tc(
            program_names::FROM_MACVLAN,
            parent,
            TcAttachType::Egress,
            &format!("{parent}{OUT_SUFFIX}"),
        )?;
        info!(parent, ifindex, "gate attached to a macvlan parent");
        self.macvlan_parents.insert(ifindex, parent.to_owned());
        Ok(())
    }

    /// Detaches the gate from parents that no macvlan container uses any more (or that are
    /// gone), and removes their pins.
    pub fn forget_macvlan(&mut self, gone: &BTreeSet<u32>) -> Result<()> {
        for ifindex in gone {
            let Some(parent) = self.macvlan_parents.remove(ifindex) else {
                continue;
            };
            for suffix in [IN_SUFFIX, OUT_SUFFIX] {
                let pin = self.pins.link(&format!("{parent}{suffix}"));
                self.links.remove(&pin);
                if pin.exists() {
                    sys::detach_pinned_link(&pin).map_err(io_err(&pin))?;
                }
                remove_if_present(&pin)?;
            }
        }
        Ok(())
    }

    /// Macvlan parents the gate is attached to, by ifindex.
    pub fn macvlan_parents(&self) -> &std::collections::BTreeMap<u32, String> {
        &self.macvlan_parents
    }
}
