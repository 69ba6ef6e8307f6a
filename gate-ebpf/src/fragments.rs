//! IP fragments: the later fragments of a datagram whose first fragment passed follow it.

use super::*;

/// Datagrams whose first fragment passed: their later fragments, which carry no ports,
/// follow it for [`FRAGMENT_TIMEOUT_NS`] (as Cilium's fragment tracking does). Not pinned:
/// an agent restart loses at most the datagrams in flight.
#[map]
pub(crate) static FRAGMENTS: LruHashMap<FragmentKey, FragmentState> =
    LruHashMap::with_max_entries(FRAGMENTS_CAPACITY, 0);

/// The datagram a fragment belongs to.
#[inline(always)]
pub(crate) fn fragment_key(packet: &Transport) -> FragmentKey {
    FragmentKey {
        src: packet.src,
        dst: packet.dst,
        id: packet.fragment_id,
        proto: packet.proto,
        _pad: [0; 3],
    }
}

/// After the first fragment of a datagram passed: lets its later fragments follow.
#[inline(always)]
pub(crate) fn remember_fragment(packet: &Transport, rule_id: u32, now: u64) {
    if packet.part != Part::First {
        return;
    }
    let state = FragmentState {
        first_seen_ns: now,
        rule_id,
        _pad: 0,
    };
    if FRAGMENTS.insert(fragment_key(packet), state, 0).is_err() {
        count(FLOW_INSERT_FAILED);
    }
}

/// A later fragment passes if its datagram's first fragment passed, not long ago. One that
/// comes before its first fragment is dropped (its datagram is lost, as with Cilium): the
/// ports that decide are in the first.
#[inline(always)]
pub(crate) fn later_fragment(packet: &Transport, len: u32) -> Verdict {
    let now = now_ns();
    // SAFETY: the value is copied out at once.
    match unsafe { FRAGMENTS.get(fragment_key(packet)) }.copied() {
        Some(first) if now.saturating_sub(first.first_seen_ns) <= FRAGMENT_TIMEOUT_NS => {
            add_rule_stats(first.rule_id, len);
            Verdict::Pass(PASS_FRAGMENT)
        }
        _ => Verdict::Drop(DROP_FRAGMENT),
    }
}
