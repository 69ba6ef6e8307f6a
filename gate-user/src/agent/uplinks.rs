//! The early drop on the interfaces traffic arrives on (`--uplink`): which interfaces, and
//! the host's own addresses it needs to know what is addressed to this host.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use tracing::warn;

use super::Agent;
use crate::{datapath::sys, policy::map_addr, ports};

impl Agent {
    /// The uplinks to gate now, by ifindex: the explicit ones that exist, and with
    /// `--uplink auto` every candidate interface.
    fn wanted_uplinks(&self) -> BTreeMap<u32, String> {
        let mut wanted: BTreeMap<u32, String> = self
            .options
            .uplinks
            .iter()
            .filter_map(|name| Some((sys::ifindex(name)?, name.clone())))
            .collect();
        if self.options.auto_uplinks {
            wanted.extend(ports::uplink_candidates().into_iter().map(|(n, i)| (i, n)));
        }
        wanted
    }

    /// Writes the host's own addresses, which the early drop and the macvlan gate need to
    /// tell what is addressed to this host.
    pub(super) fn sync_local_addrs(&mut self) -> anyhow::Result<()> {
        let addresses: BTreeSet<_> = sys::local_addresses()
            .context("reading the host's addresses")?
            .into_iter()
            .map(map_addr)
            .collect();
        self.datapath
            .sync_local_addrs(&addresses)
            .context("writing the host's addresses")
    }

    /// Writes the host's addresses, attaches `from_uplinks` where it is wanted and not yet
    /// attached, and detaches it where it is no longer wanted. With `strict`, an uplink
    /// that fails to attach is an error (start-up); later it is logged and retried.
    pub(super) fn sync_uplinks(&mut self, strict: bool) -> anyhow::Result<()> {
        if self.options.uplinks.is_empty() && !self.options.auto_uplinks {
            // The macvlan gate needs them too, kept fresh on every tick.
            if !self.datapath.macvlan_parents().is_empty() {
                self.sync_local_addrs()?;
            }
            return Ok(());
        }
        self.sync_local_addrs()?;
        let wanted = self.wanted_uplinks();
        let attached = self.datapath.uplinks().clone();
        for (ifindex, name) in &wanted {
            if attached.get(ifindex) == Some(name) {
                continue;
            }
            match self.datapath.attach_uplink(name, *ifindex) {
                Ok(()) => {}
                Err(err) if !strict => {
                    warn!("uplink {name}: {:#}; retrying", anyhow::Error::from(err))
                }
                Err(err) => return Err(anyhow::Error::from(err).context(format!("uplink {name}"))),
            }
        }
        let gone: BTreeSet<u32> = attached
            .iter()
            .filter(|(ifindex, name)| wanted.get(ifindex) != Some(*name))
            .map(|(ifindex, _)| *ifindex)
            .collect();
        self.datapath.forget_uplinks(&gone)?;
        Ok(())
    }
}
