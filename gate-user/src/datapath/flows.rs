//! Ending tracked connections: a block, `deny --cut` and the end of a rule's `--for` mark
//! the flows they end as cut ([`FLOW_CUT`]). Until such an entry expires, the programs drop
//! its packets both ways (counted `cut`), and only a new connection request, judged by the
//! rules in force, replaces it. Marking instead of deleting matters: without the entry, a
//! container's next packet to the peer would open a new flow in its own name, and the
//! peer's packets would pass again as its replies.

use aya::maps::{HashMap, MapError};
use gate_common::{FLOW_CUT, FlowKey, FlowState, PROTO_TCP, map_names, tcp};

use super::{Datapath, Result, map_err};

/// `bpf_map_update_elem` flag: only if the key is there (an entry evicted meanwhile stays
/// gone).
const BPF_EXIST: u64 = 2;

impl Datapath {
    /// Marks every tracked flow that `ends` selects as cut; returns how many it marked.
    /// Two passes over both tables: a flow that a program moved from the unreplied table to
    /// the replied one during the first pass is caught by the second.
    pub fn cut_flows(&mut self, ends: impl Fn(&FlowKey, &FlowState) -> bool) -> Result<usize> {
        let now = monotonic_coarse_ns();
        let mut cut = 0;
        for _pass in 0..2 {
            for name in [map_names::FLOWS, map_names::NEW_FLOWS] {
                cut += self.cut_in(name, &ends, now)?;
            }
        }
        self.flows_cut += cut as u64;
        Ok(cut)
    }

    fn cut_in(
        &mut self,
        name: &'static str,
        ends: &impl Fn(&FlowKey, &FlowState) -> bool,
        now: u64,
    ) -> Result<usize> {
        let mut table: HashMap<_, FlowKey, FlowState> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        // An entry evicted while this runs is just not visited.
        let doomed: Vec<(FlowKey, FlowState)> = table
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(key, state)| state.flags & FLOW_CUT == 0 && ends(key, state))
            .collect();
        let mut cut = 0;
        for (key, mut state) in doomed {
            state.flags |= FLOW_CUT;
            // A closed TCP connection's short timeout, from now: the mark outlives the
            // packets in flight, then the entry goes.
            if key.proto == PROTO_TCP {
                state.tcp_state = tcp::CLOSED;
            }
            state.last_seen_ns = now;
            match table.insert(key, state, BPF_EXIST) {
                Ok(()) => cut += 1,
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(err) => return Err(map_err(name)(err)),
            }
        }
        Ok(cut)
    }
}

/// The clock the programs read (`bpf_ktime_get_coarse_ns`): CLOCK_MONOTONIC_COARSE.
fn monotonic_coarse_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}
