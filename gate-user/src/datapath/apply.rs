//! The agent's whole desired state, written in the one order that never opens more than the
//! rules say, not even for a moment: the block list first (a block takes effect before
//! anything it covers opens), new access lists, the allow entries that point at them, the
//! published host ports, then the access lists nothing points at any more.

use std::collections::{BTreeMap, BTreeSet};

use gate_common::{AllowKey, AllowValue};

use super::{AllowSync, Datapath, Result};
use crate::policy::{Admission, Prefix};

/// An allow map's content.
pub type AllowEntries = BTreeMap<AllowKey, AllowValue>;

/// What the maps the agent owns should hold.
pub struct Desired<'a> {
    /// The block list in force.
    pub blocks: &'a BTreeSet<Prefix>,
    /// Who may connect to each destination.
    pub entries: &'a BTreeMap<AllowKey, Admission>,
    /// Stale allow entries to keep for now (an agent that just started keeps what its
    /// predecessor allowed for containers no engine has reported yet).
    pub keep_stale: &'a dyn Fn(&AllowValue) -> bool,
    /// The published host ports, from the allow map's content; `None` leaves them as they
    /// are (until every engine has reported).
    pub host_ports: Option<&'a dyn Fn(&AllowEntries) -> AllowEntries>,
}

/// What applying changed beyond the maps.
#[derive(Debug, Default)]
pub struct Applied {
    /// Connections from newly blocked sources, ended.
    pub ended: usize,
    /// Allow entries that did not fit.
    pub allow: AllowSync,
}

/// A step of [`Datapath::apply`] that failed, for the error chain.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("writing the block list")]
    Blocks(#[source] super::DatapathError),
    #[error("writing the access lists")]
    AccessLists(#[source] super::DatapathError),
    #[error("writing the allow map")]
    Allow(#[source] super::DatapathError),
    #[error("writing the published host ports")]
    HostPorts(#[source] super::DatapathError),
    #[error("removing unused access lists")]
    Cleanup(#[source] super::DatapathError),
}

impl Datapath {
    /// Makes the maps hold `desired`, in the order above.
    pub fn apply(&mut self, desired: &Desired<'_>) -> Result<Applied, ApplyError> {
        let ended = self
            .sync_blocks(desired.blocks)
            .map_err(ApplyError::Blocks)?;
        let allow = self
            .write_access_lists(desired.entries)
            .map_err(ApplyError::AccessLists)?;
        let fitted = self
            .sync_allow(&allow, desired.keep_stale)
            .map_err(ApplyError::Allow)?;
        if let Some(host_ports) = desired.host_ports {
            self.sync_host_ports(&host_ports(&allow))
                .map_err(ApplyError::HostPorts)?;
        }
        self.remove_unused_access_lists()
            .map_err(ApplyError::Cleanup)?;
        Ok(Applied {
            ended,
            allow: fitted,
        })
    }
}
