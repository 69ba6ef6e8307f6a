//! The port gate: TC programs on each container bridge, its ports, uplinks and macvlan
//! parents; a socket lookup and socket hooks in the host's network namespace.
//!
//! - `toward_containers` (bridge egress) decides what enters the bridge: tracked flows and
//!   ICMP errors about them pass, new connections pass only to an allowed (address,
//!   protocol, port), everything else is dropped and counted. A connection request is
//!   judged by the rules in force even where a flow is tracked; the later fragments of a
//!   datagram follow its first fragment.
//! - `from_containers` (ingress of each bridge port, a container's veth) tracks the
//!   connections containers open from their own addresses, so that their replies pass. It
//!   drops only packets of connections the agent ended (cut). Bound to the port, so that a
//!   container cannot open, answer or end a flow in the name of another container (a forged
//!   source would otherwise admit that flow's replies).
//! - `host_ports` (socket lookup in the host's network namespace) gates new connections to
//!   published host ports that reach a local socket instead of being DNATed: Docker's
//!   userland proxy (IPv6 on IPv4-only networks, hairpin), which relays them from the host's
//!   own stack, where `toward_containers` would take them for host traffic.
//!
//! - `relay_bound4`, `relay_bound6`, `relay_adopted` (cgroup socket hooks, see [`relays`])
//!   record the ports container relays listen on, so that `host_ports` refuses one that no
//!   engine has published: a container started while no agent runs is closed on that path too.
//!
//! - `from_uplinks` (ingress of the interfaces traffic arrives on, `--uplink`) refuses new
//!   connections to published host ports that the policy does not admit, before netfilter
//!   and conntrack see them, so a flood leaves no conntrack entries behind. What it cannot
//!   decide without state passes on: `toward_containers` stays the authority.
//!
//! Everything that can be decided in user space (rules, ranges, names) is; the kernel side
//! only looks things up.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, sk_action::SK_DROP, sk_action::SK_PASS},
    helpers::bpf_ktime_get_coarse_ns,
    macros::{classifier, map, sk_lookup},
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockMap,
        lpm_trie::Key,
    },
    programs::{SkLookupContext, TcContext},
};
use aya_log_ebpf::warn;
use gate_common::{
    ALLOW_CAPACITY, ANY_SOURCE, Addr, AllowKey, AllowValue, BLOCK_FIXED_BITS, BLOCKED_CAPACITY,
    BRIDGE_DROPS_CAPACITY, BlockKey, BridgeDropKey, CONFIG_AUDIT, CONFIG_GATE_HOST, Config,
    DROP_EVENTS_BYTES, DROP_EVENTS_PER_SECOND, DropEvent, EventBudget, FLOW_CAPACITY, FLOW_CUT,
    FLOW_REPLIED, FRAGMENT_TIMEOUT_NS, FRAGMENTS_CAPACITY, FlowKey, FlowState, FragmentKey,
    FragmentState, HOST_PORTS_CAPACITY, LOCAL_ADDRS_CAPACITY, MACVLAN_PARENTS_CAPACITY, MAX_RULES,
    NEW_FLOW_SHARE, NO_RULE, ORIGIN_CONTAINER, ORIGIN_REMOTE, PORT_ADDRS_CAPACITY, PROTO_TCP,
    PROTO_UDP, PortAddrKey, RuleStats, SOURCE_KEY_BITS, SOURCES_CAPACITY, SourceKey, SourceValue,
    counters::*, ipv4_mapped, tcp,
};
mod fragments;
mod host_ports;
mod macvlan;
mod observe;
mod relays;
mod uplinks;

use fragments::*;
use observe::*;

use gate_ebpf::{
    Icmp, NOTE_IP_OPTIONS, NOTE_IPV6_EXTENSIONS, Parsed, Part, Transport, macs, parse,
};

#[map]
static ALLOW: HashMap<AllowKey, AllowValue> = HashMap::with_max_entries(ALLOW_CAPACITY, 0);

/// Tracked flows that both sides have spoken in.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(FLOW_CAPACITY, 0);

/// Tracked flows that have not been answered yet, moved to [`FLOWS`] by their first reply:
/// a flood of new connections (to an allowed port, or from a container) evicts only its
/// own kind, never an established connection.
#[map]
static NEW_FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(FLOW_CAPACITY / NEW_FLOW_SHARE, 0);

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Published host ports, keyed by (host address or all-zero for every address, protocol,
/// host port): the rule that admits the container port they map to, or [`NO_RULE`].
#[map]
static HOST_PORTS: HashMap<AllowKey, AllowValue> =
    HashMap::with_max_entries(HOST_PORTS_CAPACITY, 0);

/// The addresses each bridge port's container may open connections from.
#[map]
static PORT_ADDRS: HashMap<PortAddrKey, u8> = HashMap::with_max_entries(PORT_ADDRS_CAPACITY, 0);

/// The agent's black-hole sockets (TCP listener, UDP), whose socket filter discards every
/// packet: a refused connection assigned to one vanishes without an answer, as a drop on the
/// bridge does. Without them (no agent) the lookup fails, and the kernel refuses (RST or ICMP
/// port unreachable): still closed, only not silent.
#[map]
static BLACK_HOLE: SockMap = SockMap::with_max_entries(2, 0);

/// The access lists of rules that name sources or interfaces (see [`SourceKey`]).
#[map]
static SOURCES: LpmTrie<SourceKey, SourceValue> = LpmTrie::with_max_entries(SOURCES_CAPACITY, 0);

/// Sources never admitted, whatever allows them: prefixes under the generation in force.
#[map]
static BLOCKED: LpmTrie<BlockKey, u8> = LpmTrie::with_max_entries(BLOCKED_CAPACITY, 0);

/// The host's own addresses: where a published host port is a destination.
#[map]
static LOCAL_ADDRS: HashMap<Addr, u8> = HashMap::with_max_entries(LOCAL_ADDRS_CAPACITY, 0);

const NS_PER_SECOND: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC_COARSE: a few nanoseconds instead of a clock-source read per packet. A
/// tick (4 ms at HZ=250) of resolution is plenty for idle timeouts of ten seconds and more, a
/// refresh every second and drop events.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: reading the clock has no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}
/// How stale a tracked flow's timestamp may get before a packet refreshes it.
const REFRESH_NS: u64 = NS_PER_SECOND;

/// "Next" in a TCX chain (pass, unless a later program decides otherwise); with legacy tc,
/// the default action, which passes.
const PASS: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT;

enum Verdict {
    Pass(u32),
    Drop(u32),
}

/// The config; a missing entry reads as all-zero: enforce, no block list.
#[inline(always)]
fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or(Config {
        flags: 0,
        block_generation: 0,
        netns_cookie: 0,
    })
}

#[classifier]
pub fn toward_containers(ctx: TcContext) -> i32 {
    let config = config();
    // Sent by the host itself (no receiving interface): not forwarded from outside.
    // SAFETY: the context pointer is valid for the whole program run.
    let ingress_ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if ingress_ifindex == 0 && config.flags & CONFIG_GATE_HOST == 0 {
        count(PASS_HOST);
        return PASS;
    }
    let mut packet = Transport::new();
    let mut notes = 0;
    let parsed = parse(&ctx, &mut packet, &mut notes);
    note(notes);
    let verdict = decide(&ctx, &config, parsed, &packet);
    conclude(&ctx, &config, &packet, verdict)
}

/// Counts a verdict on a frame toward containers, and reports a drop.
#[inline(always)]
fn conclude(ctx: &TcContext, config: &Config, packet: &Transport, verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Pass(counter) => {
            count(counter);
            PASS
        }
        Verdict::Drop(reason) => {
            // SAFETY: the context pointer is valid for the whole program run.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            if dropped(ifindex, packet, reason, config.flags) {
                DROP
            } else {
                PASS
            }
        }
    }
}

/// Counts a drop and reports it; false in audit mode, where the packet passes.
#[inline(always)]
fn dropped(ifindex: u32, packet: &Transport, reason: u32, flags: u32) -> bool {
    count(reason);
    let audit = flags & CONFIG_AUDIT != 0;
    record_drop(ifindex, packet, reason, audit);
    if audit {
        count(AUDIT_PASSED);
    }
    !audit
}

#[classifier]
pub fn from_containers(ctx: TcContext) -> i32 {
    let mut packet = Transport::new();
    let mut notes = 0;
    let parsed = parse(&ctx, &mut packet, &mut notes);
    track_from_container(&ctx, parsed, &packet)
}

/// Tracks what a container sends; drops only packets of connections the agent ended.
#[inline(always)]
fn track_from_container(ctx: &TcContext, parsed: Parsed, packet: &Transport) -> i32 {
    let Some(reason) = try_from_containers(ctx, parsed, packet) else {
        count(PASS_FROM_CONTAINER);
        return PASS;
    };
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if dropped(ifindex, packet, reason, config().flags) {
        DROP
    } else {
        PASS
    }
}

/// The verdict on a parsed frame entering toward containers.
fn decide(ctx: &TcContext, config: &Config, parsed: Parsed, packet: &Transport) -> Verdict {
    // SAFETY: the context pointer is valid for the whole program run.
    let ingress_ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    match parsed {
        Parsed::NotIp => Verdict::Pass(PASS_NOT_IP),
        Parsed::Packet => toward_container(ctx, config, ingress_ifindex, packet),
        // The embedded packet is one the container sent: it matches a live flow as sent.
        Parsed::IcmpErrorToSender if is_tracked(&container_sent(packet), packet.proto) => {
            Verdict::Pass(PASS_RELATED)
        }
        Parsed::IcmpErrorToSender | Parsed::IcmpErrorForeign => Verdict::Drop(DROP_ICMP_UNTRACKED),
        Parsed::Malformed => Verdict::Drop(DROP_MALFORMED),
        Parsed::Fragment => later_fragment(packet, ctx.len()),
        Parsed::UnsupportedHeader => Verdict::Drop(DROP_UNSUPPORTED_HEADER),
    }
}

/// Whether `key` is a tracked flow that is still live (an expired entry the LRU has not yet
/// evicted admits nothing).
#[inline(always)]
fn is_tracked(key: &FlowKey, proto: u8) -> bool {
    let now = now_ns();
    // SAFETY: the value is read at once.
    tracked_flow(key).is_some_and(|(flow, _)| unsafe { &*flow }.is_live(proto, now))
}

/// The tracked flow of `key`, and whether it is an unreplied one ([`NEW_FLOWS`]). A flow
/// that another CPU is promoting is in [`FLOWS`] before it leaves [`NEW_FLOWS`], so a
/// lookup that misses both because it ran in between finds it in [`FLOWS`] the second time.
#[inline(always)]
fn tracked_flow(key: &FlowKey) -> Option<(*mut FlowState, bool)> {
    if let Some(flow) = FLOWS.get_ptr_mut(key) {
        return Some((flow, false));
    }
    if let Some(flow) = NEW_FLOWS.get_ptr_mut(key) {
        return Some((flow, true));
    }
    FLOWS.get_ptr_mut(key).map(|flow| (flow, false))
}

/// Moves a flow that was just answered from [`NEW_FLOWS`] to [`FLOWS`].
#[inline(always)]
fn promote(key: &FlowKey, flow: &FlowState) {
    if FLOWS.insert(key, flow, 0).is_ok() {
        let _ = NEW_FLOWS.remove(key);
    }
}

#[inline(never)]
fn toward_container(
    ctx: &TcContext,
    config: &Config,
    ingress_ifindex: u32,
    packet: &Transport,
) -> Verdict {
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
    let now = now_ns();
    // An entry of the replied table that this packet does not continue (expired, closed,
    // a reused port pair) must go when a new flow opens: lookups find that table first.
    let mut stale_replied = false;
    if let Some((flow, unreplied)) = tracked_flow(&key) {
        // SAFETY: the map value stays valid for this program run; concurrent updates of
        // a flow's fields race benignly (last writer wins, as in Cilium's conntrack).
        let flow = unsafe { &mut *flow };
        // A flow a container opened with an echo request admits echo replies, not requests.
        let echo_request_in = packet.icmp == Icmp::EchoRequest && flow.origin == ORIGIN_CONTAINER;
        if continues(flow, packet, now) && !echo_request_in {
            if flow.flags & FLOW_CUT != 0 {
                // Ended by the agent: only a new request of the remote's own (a TCP SYN does
                // not get here: a cut flow is closed), judged below, replaces it.
                if !packet.opens_connection() || flow.origin != ORIGIN_REMOTE {
                    return Verdict::Drop(DROP_CUT);
                }
            } else {
                if judged_again(flow, packet, unreplied) {
                    let rule_id = match allowed(config, ingress_ifindex, packet) {
                        Ok(rule_id) => rule_id,
                        Err(reason) => return Verdict::Drop(reason),
                    };
                    if flow.rule_id != rule_id {
                        flow.rule_id = rule_id;
                    }
                }
                follow(flow, packet, false, now, ctx.len());
                if unreplied && flow.flags & FLOW_REPLIED != 0 {
                    promote(&key, flow);
                }
                remember_fragment(packet, flow.rule_id, now);
                return Verdict::Pass(PASS_TRACKED);
            }
        }
        stale_replied = !unreplied;
    }
    if !packet.opens_connection() {
        return Verdict::Drop(if packet.proto == PROTO_TCP {
            DROP_TCP_NO_STATE
        } else {
            DROP_NOT_ALLOWED
        });
    }
    let rule_id = match allowed(config, ingress_ifindex, packet) {
        Ok(rule_id) => rule_id,
        Err(reason) => return Verdict::Drop(reason),
    };
    open_flow(
        ctx,
        &key,
        stale_replied,
        ORIGIN_REMOTE,
        rule_id,
        packet,
        now,
    );
    add_rule_stats(rule_id, ctx.len());
    remember_fragment(packet, rule_id, now);
    Verdict::Pass(PASS_NEW_ALLOWED)
}

/// Whether a packet toward a container that continues a tracked flow must still be judged
/// by the rules in force, as a new connection would be: every TCP connection request (a
/// peer could otherwise keep a half-open or silently dead entry to get past a `deny`), and
/// what a remote sends to open a flow it opened itself, until the container answers (UDP
/// datagrams, echo requests: a peer keeps such an entry alive just by sending).
#[inline(always)]
fn judged_again(flow: &FlowState, packet: &Transport, unreplied: bool) -> bool {
    packet.opens_connection()
        && (packet.proto == PROTO_TCP
            || flow.origin == ORIGIN_REMOTE && (unreplied || packet.icmp == Icmp::EchoRequest))
}

/// The verdict of the rules in force on a new connection: the allow map, the block list,
/// the access lists. The admitting rule, or the drop reason.
#[inline(never)]
fn allowed(config: &Config, ingress_ifindex: u32, packet: &Transport) -> Result<u32, u32> {
    // Echo requests are allowed per address: port 0.
    let port = if packet.icmp == Icmp::None {
        packet.dst_port
    } else {
        0
    };
    // SAFETY: plain map lookup; the value is read at once (its rule id copied out).
    let Some(allow) = (unsafe { ALLOW.get(AllowKey::new(packet.dst, packet.proto, port)) }) else {
        return Err(DROP_NOT_ALLOWED);
    };
    admits(config, allow, &packet.src, ingress_ifindex)
}

/// Whether a new connection from `src`, arrived on `ifindex`, may reach an allowed
/// destination: not from a blocked source, and admitted by the destination's access list if
/// it has one. The admitting rule, or the drop reason.
#[inline(always)]
fn admits(config: &Config, allow: &AllowValue, src: &Addr, ifindex: u32) -> Result<u32, u32> {
    if config.block_generation != 0 {
        let key = Key::new(
            BLOCK_FIXED_BITS + 128,
            BlockKey {
                generation: config.block_generation,
                addr: *src,
            },
        );
        if BLOCKED.get(&key).is_some() {
            return Err(DROP_BLOCKED);
        }
    }
    if allow.access == ANY_SOURCE {
        return Ok(allow.rule_id);
    }
    let mut key = Key::new(
        SOURCE_KEY_BITS,
        SourceKey {
            access: allow.access,
            ifindex,
            addr: *src,
        },
    );
    // On this interface, then on any: the first entry with a rule admits; a marker says the
    // list names the interface but not this source.
    let on_interface = SOURCES.get(&key).map(|v| v.rule_id);
    if let Some(rule_id) = on_interface.filter(|id| *id != NO_RULE) {
        return Ok(rule_id);
    }
    key.data.ifindex = 0;
    let on_any = SOURCES.get(&key).map(|v| v.rule_id);
    if let Some(rule_id) = on_any.filter(|id| *id != NO_RULE) {
        return Ok(rule_id);
    }
    if on_interface.is_some() || on_any.is_some() {
        Err(DROP_SOURCE_NOT_ALLOWED)
    } else {
        Err(DROP_INTERFACE_NOT_ALLOWED)
    }
}

/// Tracks what a container opens; the drop reason of a packet of a connection the agent
/// ended, None for everything else (what cannot be parsed passes untracked).
fn try_from_containers(ctx: &TcContext, parsed: Parsed, packet: &Transport) -> Option<u32> {
    if parsed != Parsed::Packet {
        return None;
    }
    let key = container_sent(packet);
    let now = now_ns();
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mut stale_replied = false;
    if let Some((flow, unreplied)) = tracked_flow(&key) {
        // SAFETY: as in `toward_container`.
        let flow = unsafe { &mut *flow };
        if continues(flow, packet, now) {
            if flow.flags & FLOW_CUT != 0 {
                return Some(DROP_CUT);
            }
            // Only the flow's own container may change its state: a neighbour forging its
            // address (an RST in its name) must not end or answer its connections.
            if changes_state(flow, packet) && !is_bound(&packet.src, ifindex) {
                count(FOREIGN_SOURCE);
                return None;
            }
            follow(flow, packet, true, now, ctx.len());
            if unreplied && flow.flags & FLOW_REPLIED != 0 {
                promote(&key, flow);
            }
            return None;
        }
        stale_replied = !unreplied;
    }
    if !packet.opens_connection() {
        return None;
    }
    // Only from the container's own addresses on this port: a forged source would open a
    // flow in another container's name, whose "replies" would then pass unasked.
    if !is_bound(&packet.src, ifindex) {
        count(FOREIGN_SOURCE);
        return None;
    }
    open_flow(
        ctx,
        &key,
        stale_replied,
        ORIGIN_CONTAINER,
        NO_RULE,
        packet,
        now,
    );
    None
}

/// Whether `addr` is an address of the container behind bridge port `ifindex`.
#[inline(always)]
fn is_bound(addr: &Addr, ifindex: u32) -> bool {
    let binding = PortAddrKey {
        addr: *addr,
        ifindex,
    };
    // SAFETY: plain map lookup.
    unsafe { PORT_ADDRS.get(binding) }.is_some()
}

/// Whether a container's packet on a tracked flow would change more than its timestamp:
/// open, close or reset a TCP connection, or answer a flow a remote opened.
#[inline(always)]
fn changes_state(flow: &FlowState, packet: &Transport) -> bool {
    packet.tcp_flags & (tcp::SYN | tcp::FIN | tcp::RST) != 0
        || flow.origin == ORIGIN_REMOTE && flow.flags & FLOW_REPLIED == 0
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
    if now.saturating_sub(flow.last_seen_ns) >= REFRESH_NS {
        flow.last_seen_ns = now;
    }
    add_rule_stats(flow.rule_id, len);
}

#[inline(always)]
fn open_flow(
    ctx: &TcContext,
    key: &FlowKey,
    stale_replied: bool,
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
    if stale_replied {
        let _ = FLOWS.remove(key);
    }
    match NEW_FLOWS.insert(key, state, 0) {
        Ok(()) => count(FLOW_CREATED),
        Err(err) => {
            count(FLOW_INSERT_FAILED);
            warn!(ctx, "portgate: flow table insert failed: {}", err);
        }
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
