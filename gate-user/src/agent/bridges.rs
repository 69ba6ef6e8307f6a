//! Which bridges and bridge ports the gate is on: the explicit and engine bridges, their
//! ports bound to the addresses of the containers behind them.

use std::collections::BTreeSet;

use anyhow::Context as _;
use gate_common::PortAddrKey;
use tracing::{info, warn};

use super::Agent;
use crate::runtime::bridges;
use crate::{datapath::sys, netfilter, policy::map_addr, ports};

impl Agent {
    /// The bridges to gate now: the explicit ones, and with `--bridge auto` the default and
    /// engine bridges that exist.
    pub(super) fn wanted_bridges(&self) -> BTreeSet<String> {
        let mut wanted: BTreeSet<String> = self.options.bridges.iter().cloned().collect();
        if self.options.auto_bridges {
            let engine_bridges = self
                .engines
                .values()
                .filter_map(|s| s.snapshot.as_ref())
                .flat_map(|s| s.bridges.iter().cloned());
            wanted.extend(
                bridges::DEFAULTS
                    .iter()
                    .map(|b| (*b).to_owned())
                    .chain(engine_bridges),
            );
            wanted.extend(bridges::engine_named_bridges());
        }
        wanted
    }

    /// Attaches to wanted bridges that exist and are not attached (new, or re-created), then
    /// makes sure their netfilter delegation is in place. With `strict`, any failure is an
    /// error (start-up); later, a failing bridge is logged and retried on the next tick.
    pub(super) fn attach_bridges(&mut self, strict: bool) -> anyhow::Result<()> {
        let mut changed = false;
        for name in self.wanted_bridges() {
            let Some(ifindex) = sys::ifindex(&name) else {
                continue;
            };
            let current = self.datapath.bridges().iter().find(|b| b.name == name);
            if current.is_some_and(|b| b.ifindex == ifindex && self.datapath.is_attached(b)) {
                continue;
            }
            match self.datapath.attach(&name) {
                Ok(()) => changed = true,
                Err(err) if !strict => warn!("{:#}; retrying", anyhow::Error::from(err)),
                Err(err) => return Err(err.into()),
            }
        }
        let keys = self.delegation_keys();
        if changed || strict || keys != self.delegated {
            if let Some(delegation) = &self.delegation {
                delegation.ensure(keys.clone());
            }
            self.delegated = keys;
        }
        Ok(())
    }

    /// The delegation rules the gated bridges need: each bridge's rule toward it, and the
    /// replies rule of the bridges whose engine accepts their traffic only in nftables tables
    /// of its own (netavark's nftables driver): nothing else would let the replies of the
    /// connections the gate admits through a FORWARD chain that drops.
    fn delegation_keys(&self) -> Vec<String> {
        let nftables_only: BTreeSet<&str> = self
            .engines
            .values()
            .filter_map(|s| s.snapshot.as_ref())
            .filter(|s| s.info.nftables_only())
            .flat_map(|s| s.bridges.iter().map(String::as_str))
            .collect();
        let mut keys = Vec::new();
        for bridge in self.datapath.bridges() {
            keys.push(bridge.name.clone());
            if nftables_only.contains(bridge.name.as_str()) {
                keys.push(netfilter::replies_key(&bridge.name));
            }
        }
        keys
    }

    /// Binds each port of the gated bridges to the addresses of the container behind it, and
    /// attaches `from_containers` to ports that do not have it yet. Bindings are written
    /// before a port's program is attached, and a port that is not found opens nothing (fail
    /// closed). Runs on each tick and after each engine sync, where containers come and go.
    pub(super) fn sync_ports(&mut self) -> anyhow::Result<()> {
        let ports: Vec<ports::Port> = self
            .datapath
            .bridges()
            .iter()
            .flat_map(|b| ports::bridge_ports(&b.name))
            .collect();
        let current: BTreeSet<u32> = ports.iter().map(|p| p.ifindex).collect();
        let known: BTreeSet<u32> = self.datapath.ports().keys().copied().collect();
        if current == known && !self.ports_stale {
            return Ok(());
        }
        let addresses = ports::port_addresses(&ports);
        let mut bindings: BTreeSet<PortAddrKey> = addresses
            .iter()
            .flat_map(|(ifindex, addrs)| {
                addrs.iter().map(|addr| PortAddrKey {
                    addr: map_addr(*addr),
                    ifindex: *ifindex,
                })
            })
            .collect();
        let macvlan_parents = self.macvlan_parents();
        bindings.extend(super::macvlan::bindings(&macvlan_parents));
        self.datapath
            .sync_port_addrs(&bindings)
            .context("binding bridge ports to their containers' addresses")?;
        for port in ports.iter().filter(|p| !known.contains(&p.ifindex)) {
            match self.datapath.attach_port(&port.name, port.ifindex) {
                Ok(()) => info!(
                    port = port.name,
                    addresses = ?addresses.get(&port.ifindex),
                    "bridge port tracked"
                ),
                // Until the next round it opens nothing (fail closed); its container may be
                // just going.
                Err(err) => warn!(
                    "bridge port {}: {:#}; retrying",
                    port.name,
                    anyhow::Error::from(err)
                ),
            }
        }
        self.datapath.forget_ports(&(&known - &current))?;
        self.sync_macvlan(&macvlan_parents)?;
        // A port whose container was not found yet is looked at again on the next round.
        self.ports_stale = ports.iter().any(|p| !addresses.contains_key(&p.ifindex));
        Ok(())
    }

    /// The name of a gated bridge, uplink, macvlan parent or bridge port (drops are counted
    /// per interface).
    pub(super) fn bridge_name(&self, ifindex: u32) -> String {
        self.datapath
            .bridges()
            .iter()
            .find(|b| b.ifindex == ifindex)
            .map(|b| b.name.clone())
            .or_else(|| self.datapath.uplinks().get(&ifindex).cloned())
            .or_else(|| self.datapath.macvlan_parents().get(&ifindex).cloned())
            // A bridge port: its container's packets of a cut connection.
            .or_else(|| self.datapath.ports().get(&ifindex).cloned())
            .unwrap_or_else(|| format!("ifindex {ifindex}"))
    }
}
