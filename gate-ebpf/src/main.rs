//! The port gate: two TC programs on each container bridge.
//!
//! - `toward_containers` (bridge egress) decides what enters the bridge: tracked flows and
//!   ICMP errors about them pass, new connections pass only to an allowed (address,
//!   protocol, port), everything else is dropped and counted.
//! - `from_containers` (bridge ingress) tracks the connections containers open, so that
//!   their replies pass. It never drops.
//!
//! Everything that can be decided in user space (rules, ranges, names) is; the kernel side
//! only looks things up.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TcContext,
};
use aya_log_ebpf::warn;
use gate_common::{
    ALLOW_CAPACITY, AllowKey, AllowValue, BRIDGE_DROPS_CAPACITY, BridgeDropKey, CONFIG_AUDIT,
    CONFIG_GATE_HOST, Config, DROP_EVENTS_BYTES, DROP_EVENTS_PER_SECOND, DropEvent, EventBudget,
    FLOW_CAPACITY, FLOW_REPLIED, FlowKey, FlowState, MAX_RULES, NO_RULE, ORIGIN_CONTAINER,
    ORIGIN_REMOTE, PROTO_TCP, RuleStats, counters::*, tcp,
};
use gate_ebpf::{Icmp, NOTE_IP_OPTIONS, NOTE_IPV6_EXTENSIONS, Parsed, Transport, parse};

#[map]
static ALLOW: HashMap<AllowKey, AllowValue> = HashMap::with_max_entries(ALLOW_CAPACITY, 0);

#[map]
static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(FLOW_CAPACITY, 0);

#[map]
static RULE_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(MAX_RULES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNT, 0);

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
static BRIDGE_DROPS: PerCpuHashMap<BridgeDropKey, u64> =
    PerCpuHashMap::with_max_entries(BRIDGE_DROPS_CAPACITY, 0);

#[map]
static DROP_EVENTS: RingBuf = RingBuf::with_byte_size(DROP_EVENTS_BYTES, 0);

#[map]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

const NS_PER_SECOND: u64 = 1_000_000_000;
/// How stale a tracked flow's timestamp may get before a packet refreshes it.
const REFRESH_NS: u64 = NS_PER_SECOND;

/// "Next" in a TCX chain (pass, unless a later program decides otherwise); with legacy tc,
/// the default action, which passes.
const PASS: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT as i32;

enum Verdict {
    Pass(u32),
    Drop(u32),
}

#[classifier]
pub fn toward_containers(ctx: TcContext) -> i32 {
    // A missing config entry reads as all-zero: enforce.
    let flags = CONFIG.get(0).map_or(0, |c| c.flags);
    let mut packet = Transport::new();
    match try_toward_containers(&ctx, flags, &mut packet) {
        Verdict::Pass(counter) => {
            count(counter);
            PASS
        }
        Verdict::Drop(reason) => {
            count(reason);
            let audit = flags & CONFIG_AUDIT != 0;
            record_drop(&ctx, &packet, reason, audit);
            if audit {
                count(AUDIT_PASSED);
                PASS
            } else {
                DROP
            }
        }
    }
}

#[classifier]
pub fn from_containers(ctx: TcContext) -> i32 {
    try_from_containers(&ctx);
    count(PASS_FROM_CONTAINER);
    PASS
}

fn try_toward_containers(ctx: &TcContext, flags: u32, packet: &mut Transport) -> Verdict {
    // Sent by the host itself (no receiving interface): not forwarded from outside.
    // SAFETY: the context pointer is valid for the whole program run.
    let ingress_ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if ingress_ifindex == 0 && flags & CONFIG_GATE_HOST == 0 {
        return Verdict::Pass(PASS_HOST);
    }
    let mut notes = 0;
    let parsed = parse(ctx, packet, &mut notes);
    note(notes);
    match parsed {
        Parsed::NotIp => Verdict::Pass(PASS_NOT_IP),
        Parsed::Packet => toward_container(ctx, packet),
        // The embedded packet is one the container sent: it matches a flow as sent.
        Parsed::IcmpErrorToSender if FLOWS.get_ptr(container_sent(packet)).is_some() => {
            Verdict::Pass(PASS_RELATED)
        }
        Parsed::IcmpErrorToSender | Parsed::IcmpErrorForeign => Verdict::Drop(DROP_ICMP_UNTRACKED),
        Parsed::Malformed => Verdict::Drop(DROP_MALFORMED),
        Parsed::Fragment => Verdict::Drop(DROP_FRAGMENT),
        Parsed::UnsupportedHeader => Verdict::Drop(DROP_UNSUPPORTED_HEADER),
    }
}

#[inline(never)]
fn toward_container(ctx: &TcContext, packet: &Transport) -> Verdict {
    if packet.icmp == Icmp::Neighbor {
        return Verdict::Pass(PASS_NEIGHBOR);
    }
    let key = FlowKey {
        container_addr: packet.dst,
        remote_addr: packet.src,
        container_port: packet.dst_port,
        remote_port: packet.src_port,
        proto: packet.proto,
        _pad: [0; 3],
    };
    // SAFETY: ktime has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(flow) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: the map value stays valid for this program run; concurrent updates of
        // a flow's fields race benignly (last writer wins, as in Cilium's conntrack).
        let flow = unsafe { &mut *flow };
        if continues(flow, packet, now) {
            follow(flow, packet, false, now, ctx.len());
            return Verdict::Pass(PASS_TRACKED);
        }
    }
    if !packet.opens_connection() {
        return Verdict::Drop(if packet.proto == PROTO_TCP {
            DROP_TCP_NO_STATE
        } else {
            DROP_NOT_ALLOWED
        });
    }
    // Echo requests are allowed per address: port 0.
    let port = if packet.icmp == Icmp::None {
        packet.dst_port
    } else {
        0
    };
    let Some(allow) = (unsafe { ALLOW.get(AllowKey::new(packet.dst, packet.proto, port)) }) else {
        return Verdict::Drop(DROP_NOT_ALLOWED);
    };
    let rule_id = allow.rule_id;
    open_flow(ctx, &key, ORIGIN_REMOTE, rule_id, packet, now);
    add_rule_stats(rule_id, ctx.len());
    Verdict::Pass(PASS_NEW_ALLOWED)
}

fn try_from_containers(ctx: &TcContext) {
    // Never drop what a container sends; what cannot be parsed is not tracked.
    let mut packet = Transport::new();
    let mut notes = 0;
    if parse(ctx, &mut packet, &mut notes) != Parsed::Packet {
        return;
    }
    let key = container_sent(&packet);
    // SAFETY: ktime has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(flow) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: as in `toward_container`.
        let flow = unsafe { &mut *flow };
        if continues(flow, &packet, now) {
            follow(flow, &packet, true, now, ctx.len());
            return;
        }
    }
    if packet.opens_connection() {
        open_flow(ctx, &key, ORIGIN_CONTAINER, NO_RULE, &packet, now);
    }
}

/// The flow key of a packet the container sent.
#[inline(always)]
fn container_sent(packet: &Transport) -> FlowKey {
    FlowKey {
        container_addr: packet.src,
        remote_addr: packet.dst,
        container_port: packet.src_port,
        remote_port: packet.dst_port,
        proto: packet.proto,
        _pad: [0; 3],
    }
}

/// Whether `packet` belongs to the tracked `flow`: the flow is not idle past its timeout, and
/// the packet is not a new SYN reusing the ports of a closing connection.
#[inline(always)]
fn continues(flow: &FlowState, packet: &Transport, now: u64) -> bool {
    let reopens = packet.proto == PROTO_TCP
        && tcp::is_connection_request(packet.tcp_flags)
        && tcp::is_reusable(flow.tcp_state);
    flow.is_live(packet.proto, now) && !reopens
}

/// Refreshes a tracked flow with a packet sent by the container (`from_container`) or to it.
/// The entry is shared by both directions, often on two CPUs: it is written only when
/// something changes, and its timestamp at most every [`REFRESH_NS`] (the shortest idle
/// timeout is ten times that), so a busy flow does not bounce its cache line between CPUs.
#[inline(always)]
fn follow(flow: &mut FlowState, packet: &Transport, from_container: bool, now: u64, len: u32) {
    let from_opener = (flow.origin == ORIGIN_CONTAINER) == from_container;
    if !from_opener && flow.flags & FLOW_REPLIED == 0 {
        flow.flags |= FLOW_REPLIED;
    }
    if packet.proto == PROTO_TCP {
        let state = tcp::next_state(flow.tcp_state, packet.tcp_flags, from_opener);
        if state != flow.tcp_state {
            flow.tcp_state = state;
        }
    }
    if now.wrapping_sub(flow.last_seen_ns) >= REFRESH_NS {
        flow.last_seen_ns = now;
    }
    add_rule_stats(flow.rule_id, len);
}

#[inline(always)]
fn open_flow(
    ctx: &TcContext,
    key: &FlowKey,
    origin: u8,
    rule_id: u32,
    packet: &Transport,
    now: u64,
) {
    let state = FlowState {
        last_seen_ns: now,
        rule_id,
        tcp_state: if packet.proto == PROTO_TCP {
            tcp::SYN_SENT
        } else {
            0
        },
        origin,
        flags: 0,
        _pad: 0,
    };
    match FLOWS.insert(key, &state, 0) {
        Ok(()) => count(FLOW_CREATED),
        Err(err) => {
            count(FLOW_INSERT_FAILED);
            warn!(ctx, "portgate: flow table insert failed: {}", err);
        }
    }
}

/// Counts a drop for its bridge and reports it through the ring buffer, within this CPU's
/// budget of events per second; what is over budget is counted and reported with the next
/// event, so a flood cannot swamp the agent.
#[inline(never)]
fn record_drop(ctx: &TcContext, packet: &Transport, reason: u32, audit: bool) {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let key = BridgeDropKey { ifindex, reason };
    match BRIDGE_DROPS.get_ptr_mut(&key) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        Some(value) => unsafe { *value += 1 },
        None => {
            let _ = BRIDGE_DROPS.insert(&key, &1, 0);
        }
    }
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, only this CPU writes it.
    let budget = unsafe { &mut *budget };
    // SAFETY: ktime has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
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
fn add_rule_stats(rule_id: u32, len: u32) {
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
fn count(counter: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn note(notes: u8) {
    if notes & NOTE_IP_OPTIONS != 0 {
        count(SEEN_IP_OPTIONS);
    }
    if notes & NOTE_IPV6_EXTENSIONS != 0 {
        count(SEEN_IPV6_EXTENSIONS);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
