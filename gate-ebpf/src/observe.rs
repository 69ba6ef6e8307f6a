//! What the programs report: counters, per-rule and per-bridge statistics, drop events.

use super::*;

#[map]
pub(crate) static RULE_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(MAX_RULES, 0);

#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNT, 0);

#[map]
pub(crate) static BRIDGE_DROPS: PerCpuHashMap<BridgeDropKey, u64> =
    PerCpuHashMap::with_max_entries(BRIDGE_DROPS_CAPACITY, 0);

#[map]
pub(crate) static DROP_EVENTS: RingBuf = RingBuf::with_byte_size(DROP_EVENTS_BYTES, 0);

#[map]
pub(crate) static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

/// Counts a drop for its bridge and reports it through the ring buffer, within this CPU's
/// budget of events per second; what is over budget is counted and reported with the next
/// event, so a flood cannot swamp the agent.
#[inline(never)]
pub(crate) fn record_drop(ifindex: u32, packet: &Transport, reason: u32, audit: bool) {
    let key = BridgeDropKey { ifindex, reason };
    match BRIDGE_DROPS.get_ptr_mut(key) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        Some(value) => unsafe { *value += 1 },
        None => {
            let _ = BRIDGE_DROPS.insert(key, 1, 0);
        }
    }
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, only this CPU writes it.
    let budget = unsafe { &mut *budget };
    let now = now_ns();
    if now.wrapping_sub(budget.window_start_ns) >= NS_PER_SECOND {
        budget.window_start_ns = now;
        budget.sent = 0;
    }
    if budget.sent >= DROP_EVENTS_PER_SECOND {
        budget.suppressed += 1;
        return;
    }
    let Some(mut entry) = DROP_EVENTS.reserve::<DropEvent>(0) else {
        // The agent is not keeping up (or not running): count it as suppressed.
        budget.suppressed += 1;
        return;
    };
    entry.write(DropEvent {
        timestamp_ns: now,
        src: packet.src,
        dst: packet.dst,
        ifindex,
        suppressed: budget.suppressed,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        reason: reason as u8,
        proto: packet.proto,
        audit: audit as u8,
        _pad: [0; 9],
    });
    entry.submit(0);
    budget.sent += 1;
    budget.suppressed = 0;
}

#[inline(always)]
pub(crate) fn add_rule_stats(rule_id: u32, len: u32) {
    if rule_id == NO_RULE {
        return;
    }
    if let Some(stats) = RULE_STATS.get_ptr_mut(rule_id) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        let stats = unsafe { &mut *stats };
        stats.packets += 1;
        stats.bytes += len as u64;
    }
}

#[inline(always)]
pub(crate) fn count(counter: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
pub(crate) fn note(notes: u8) {
    if notes & NOTE_IP_OPTIONS != 0 {
        count(SEEN_IP_OPTIONS);
    }
    if notes & NOTE_IPV6_EXTENSIONS != 0 {
        count(SEEN_IPV6_EXTENSIONS);
    }
}
