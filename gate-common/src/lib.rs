//! Types and constants shared by the eBPF programs (`gate-ebpf`) and the agent (`gate-user`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields, so both sides agree
//! on the layout byte for byte and the kernel never hashes uninitialised padding.
#![no_std]

pub mod counters;
pub mod tcp;

/// Directory of the pins under the agent's bpffs directory; bumped whenever a map's layout or
/// the set of links changes, so an old agent's pins are never misread.
pub const LAYOUT_VERSION: &str = "v5";

/// Names of the maps in the eBPF object; also the file names of their pins.
pub mod map_names {
    pub const ALLOW: &str = "ALLOW";
    pub const FLOWS: &str = "FLOWS";
    pub const NEW_FLOWS: &str = "NEW_FLOWS";
    pub const RULE_STATS: &str = "RULE_STATS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const CONFIG: &str = "CONFIG";
    pub const BRIDGE_DROPS: &str = "BRIDGE_DROPS";
    pub const DROP_EVENTS: &str = "DROP_EVENTS";
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    pub const HOST_PORTS: &str = "HOST_PORTS";
    pub const PORT_ADDRS: &str = "PORT_ADDRS";
    pub const BLACK_HOLE: &str = "BLACK_HOLE";
    pub const SOURCES: &str = "SOURCES";
    pub const BLOCKED: &str = "BLOCKED";
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const MACVLAN_PARENTS: &str = "MACVLAN_PARENTS";
    pub const RELAY_COMMS: &str = "RELAY_COMMS";
    pub const RELAY_PORTS: &str = "RELAY_PORTS";
    /// Maps pinned so that they outlive the agent (the ring buffer and its budget are not:
    /// a new agent reads events from its own programs).
    pub const PINNED: [&str; 14] = [
        ALLOW,
        FLOWS,
        NEW_FLOWS,
        RULE_STATS,
        COUNTERS,
        CONFIG,
        BRIDGE_DROPS,
        HOST_PORTS,
        PORT_ADDRS,
        SOURCES,
        BLOCKED,
        LOCAL_ADDRS,
        RELAY_COMMS,
        RELAY_PORTS,
    ];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// Bridge egress: traffic entering the bridge, toward the containers. Decides.
    pub const TOWARD_CONTAINERS: &str = "toward_containers";
    /// Ingress of each bridge port (a container's veth): traffic leaving that container.
    /// Tracks what the container opens from its own addresses, never drops.
    pub const FROM_CONTAINERS: &str = "from_containers";
    /// Socket lookup in the host's network namespace: new connections to published host
    /// ports that reach a local socket (Docker's userland proxy) instead of being DNATed.
    pub const HOST_PORTS: &str = "host_ports";
    /// Ingress of the interfaces traffic arrives on (`--uplink`): refuses new connections
    /// to published host ports that the policy does not admit, before conntrack sees them.
    pub const FROM_UPLINKS: &str = "from_uplinks";
    /// Ingress of the parent interface of macvlan networks: what arrives for a macvlan
    /// container (a frame to another MAC than the parent's) is judged as on a bridge.
    pub const TOWARD_MACVLAN: &str = "toward_macvlan";
    /// Egress of a macvlan parent: tracks what macvlan containers open, as `from_containers`.
    pub const FROM_MACVLAN: &str = "from_macvlan";
    /// After an IPv4 bind anywhere on the host (the cgroup v2 root): records the ports a
    /// container relay (docker-proxy, rootlessport, pasta...) listens on in the host's
    /// network namespace, so that `host_ports` refuses them until an engine publishes them.
    pub const RELAY_BOUND4: &str = "relay_bound4";
    /// The same after an IPv6 bind.
    pub const RELAY_BOUND6: &str = "relay_bound6";
    /// On getsockopt anywhere on the host: records the port of a listener a relay adopted
    /// from another process (Docker 28's daemon binds, docker-proxy relays).
    pub const RELAY_ADOPTED: &str = "relay_adopted";
}

/// Capacity of the allow map: one entry per (address, protocol, port).
pub const ALLOW_CAPACITY: u32 = 262_144;
/// Capacity of the connection-tracking map of replied flows (LRU: the least recently used
/// flow goes first).
pub const FLOW_CAPACITY: u32 = 262_144;
/// The unreplied flows' map holds this share of [`FLOW_CAPACITY`] (at least
/// [`MIN_NEW_FLOWS`]): a flood of new connections churns it, never the replied flows.
pub const NEW_FLOW_SHARE: u32 = 4;
pub const MIN_NEW_FLOWS: u32 = 1_024;
/// Number of rule slots for per-rule counters; rule ids are `0..MAX_RULES`.
pub const MAX_RULES: u32 = 16_384;
/// Rule id of flows that no allow rule admitted (started by a container).
pub const NO_RULE: u32 = u32::MAX;
/// Capacity of the host-port map: one entry per (host address, protocol, published port).
pub const HOST_PORTS_CAPACITY: u32 = 16_384;
/// Capacity of the port-address bindings: one entry per (bridge port, container address).
pub const PORT_ADDRS_CAPACITY: u32 = 16_384;
/// Capacity of the access lists (an LPM trie): source prefixes and interfaces of the rules
/// that name them, over every list, including a replaced list's old entries while it changes.
pub const SOURCES_CAPACITY: u32 = 262_144;
/// Capacity of the block list (an LPM trie), twice the longest list: a replacement is
/// written beside the list in force, then switched to.
pub const BLOCKED_CAPACITY: u32 = 262_144;
/// Capacity of the host's own addresses (the destinations published host ports answer on).
pub const LOCAL_ADDRS_CAPACITY: u32 = 4_096;
/// Capacity of the fragment table: datagrams whose first fragment passed, whose later
/// fragments are still expected (Cilium's default).
pub const FRAGMENTS_CAPACITY: u32 = 8_192;
/// How long the later fragments of an admitted datagram may follow its first one (Linux
/// gives up reassembling after 30 s, `ipfrag_time`).
pub const FRAGMENT_TIMEOUT_NS: u64 = secs(30);
/// Capacity of the macvlan parents' table (ifindex -> the parent's own MAC address).
pub const MACVLAN_PARENTS_CAPACITY: u32 = 256;
/// Capacity of the container relays' process names (`comm`, 16 bytes with its NUL).
pub const RELAY_COMMS_CAPACITY: u32 = 64;
/// Capacity of the ports container relays have taken (protocol, port): every port of both
/// protocols fits.
pub const RELAY_PORTS_CAPACITY: u32 = 131_072;
/// Length of a process name in the kernel (`TASK_COMM_LEN`), NUL included.
pub const COMM_LEN: usize = 16;

/// Capacity of the per-bridge drop counters: (bridge, reason) pairs.
pub const BRIDGE_DROPS_CAPACITY: u32 = 4_096;
/// Size of the drop-event ring buffer.
pub const DROP_EVENTS_BYTES: u32 = 256 * 1024;
/// Drop events each CPU may report per second; the rest are counted as suppressed.
pub const DROP_EVENTS_PER_SECOND: u32 = 100;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// An address in map keys: IPv6, with IPv4 as IPv4-mapped (`::ffff:a.b.c.d`), so one key type
/// serves both families.
pub type Addr = [u8; 16];

/// Maps an IPv4 address (network byte order) into [`Addr`].
#[inline(always)]
pub const fn ipv4_mapped(v4: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Key of the allow map: a new connection to `addr`, `proto`, `port` may pass.
/// For ICMP echo, `port` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowKey {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl AllowKey {
    pub const fn new(addr: Addr, proto: u8, port: u16) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// [`AllowValue::access`] of a destination some rule opens to every source on every
/// interface: no access list to consult.
pub const ANY_SOURCE: u32 = 0;

/// Value of the allow map (and of the host-port map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AllowValue {
    /// Index into the per-rule counters: the rule that admits, when `access` is
    /// [`ANY_SOURCE`] (else the access list says which rule admits).
    pub rule_id: u32,
    /// [`ANY_SOURCE`], or the access list in [`SourceKey`]s that decides who may connect.
    pub access: u32,
}

impl AllowValue {
    /// Admits every source on every interface, by `rule_id`.
    pub const fn any_source(rule_id: u32) -> Self {
        Self {
            rule_id,
            access: ANY_SOURCE,
        }
    }
}

/// The data of a key of the access lists, an LPM trie (matched bit by bit from the first
/// byte). The list and the interface the connection came in on (0: any interface) are
/// always matched in full ([`SOURCE_FIXED_BITS`]); then a prefix of the source address.
/// A key of exactly [`SOURCE_FIXED_BITS`] holds either a rule that admits any source on that
/// interface, or a marker ([`NO_RULE`]): the list names the interface, not this source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub access: u32,
    pub ifindex: u32,
    pub addr: Addr,
}

/// Bits of a [`SourceKey`] before the address: the list and the interface.
pub const SOURCE_FIXED_BITS: u32 = 64;
/// Bits of a whole [`SourceKey`].
pub const SOURCE_KEY_BITS: u32 = SOURCE_FIXED_BITS + 128;

/// Value of the access lists: the rule that admits, or [`NO_RULE`] (a marker, see
/// [`SourceKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceValue {
    pub rule_id: u32,
}

/// The data of a key of the block list, an LPM trie: the list's generation
/// ([`Config::block_generation`]), then a prefix of the source address. A replaced list is
/// written under a new generation and switched to in one write of the config.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    pub generation: u32,
    pub addr: Addr,
}

/// Bits of a [`BlockKey`] before the address.
pub const BLOCK_FIXED_BITS: u32 = 32;

/// Key of the port-address bindings: `addr` is an address of the container behind the bridge
/// port `ifindex` (its veth), as configured on the container's side. A container opens
/// tracked connections only from these, so it cannot open one in another container's name.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortAddrKey {
    pub addr: Addr,
    pub ifindex: u32,
}

/// Whether an IPv6 address is IPv4-mapped (`::ffff:a.b.c.d`): such an address on the wire
/// would alias the IPv4 keys, so packets carrying one are refused.
#[inline(always)]
pub fn is_ipv4_mapped(addr: &Addr) -> bool {
    addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff
}

/// Key of the connection-tracking map, oriented from the container's side: the same key
/// whichever direction a packet travels, so each packet costs one lookup.
/// For ICMP echo both ports hold the echo identifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub container_addr: Addr,
    pub remote_addr: Addr,
    /// Host byte order.
    pub container_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Who opened a tracked connection.
pub const ORIGIN_REMOTE: u8 = 1;
pub const ORIGIN_CONTAINER: u8 = 2;

/// Set in [`FlowState::flags`] once the side that did not open the flow has sent a packet.
pub const FLOW_REPLIED: u8 = 1;
/// Set in [`FlowState::flags`] by the agent to end a connection (a block, `deny --cut`, the
/// end of a rule's `--for`): until the entry expires, its packets are dropped both ways and
/// only a new connection request, judged by the rules in force, replaces it.
pub const FLOW_CUT: u8 = 2;

/// Value of the connection-tracking map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowState {
    /// `bpf_ktime_get_ns` of the last packet.
    pub last_seen_ns: u64,
    /// The allow rule that admitted the flow, or [`NO_RULE`].
    pub rule_id: u32,
    /// One of [`tcp`]'s states; 0 for other protocols.
    pub tcp_state: u8,
    /// [`ORIGIN_REMOTE`] or [`ORIGIN_CONTAINER`].
    pub origin: u8,
    pub flags: u8,
    pub _pad: u8,
}

/// Seconds to nanoseconds.
const fn secs(s: u64) -> u64 {
    s * 1_000_000_000
}

/// Idle timeouts, close to Linux conntrack's defaults.
pub const UDP_TIMEOUT_NS: u64 = secs(30);
pub const UDP_REPLIED_TIMEOUT_NS: u64 = secs(180);
pub const ICMP_TIMEOUT_NS: u64 = secs(30);

impl FlowState {
    /// How long the flow may stay idle before it counts as gone.
    #[inline(always)]
    pub fn idle_timeout_ns(&self, proto: u8) -> u64 {
        match proto {
            PROTO_TCP => tcp::timeout_ns(self.tcp_state),
            PROTO_UDP if self.flags & FLOW_REPLIED != 0 => UDP_REPLIED_TIMEOUT_NS,
            PROTO_UDP => UDP_TIMEOUT_NS,
            _ => ICMP_TIMEOUT_NS,
        }
    }

    /// Saturating: another CPU may have refreshed `last_seen_ns` after `now_ns` was read,
    /// which makes the flow younger, never expired.
    #[inline(always)]
    pub fn is_live(&self, proto: u8, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) <= self.idle_timeout_ns(proto)
    }
}

/// Key of the fragment table: one IP datagram, as IPv4 and IPv6 identify its fragments.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: Addr,
    pub dst: Addr,
    /// The IPv4 identification (16 bits) or the IPv6 fragment header's identification.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of the fragment table: the first fragment passed at `first_seen_ns`, admitted as
/// part of a flow counted by `rule_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentState {
    pub first_seen_ns: u64,
    pub rule_id: u32,
    pub _pad: u32,
}

/// Per-rule counters (per CPU in the kernel; the agent sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Set in [`Config::flags`]: count what would be dropped, drop nothing.
pub const CONFIG_AUDIT: u32 = 1;
/// Set in [`Config::flags`]: gate traffic from the host's own stack too.
pub const CONFIG_GATE_HOST: u32 = 2;

/// The single entry of the config map. All zero (the state before the agent writes it)
/// means enforce and let the host's own traffic pass: the safe default.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub flags: u32,
    /// The block list in force: its entries' [`BlockKey::generation`]; 0 when there is none
    /// (new connections then skip the lookup).
    pub block_generation: u32,
    /// The network namespace `host_ports` gates (the host's): the only one whose relay
    /// binds are recorded. 0 until the agent writes it.
    pub netns_cookie: u64,
}

/// A port a container relay has taken (any address, either family): `host_ports` refuses
/// it unless an engine has published it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayPort {
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl RelayPort {
    pub const fn new(proto: u8, port: u16) -> Self {
        Self {
            port,
            proto,
            _pad: 0,
        }
    }
}

/// Key of the per-bridge drop counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BridgeDropKey {
    pub ifindex: u32,
    /// A `counters::DROP_*` index.
    pub reason: u32,
}

/// A dropped (or, in audit mode, would-be-dropped) packet, reported through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns` (monotonic, since boot).
    pub timestamp_ns: u64,
    pub src: Addr,
    pub dst: Addr,
    /// The bridge.
    pub ifindex: u32,
    /// Events this CPU suppressed (rate limit) since its previous report.
    pub suppressed: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// A `counters::DROP_*` index.
    pub reason: u8,
    /// IP protocol number; 0 when the packet could not be parsed that far.
    pub proto: u8,
    /// 1 when the gate was in audit mode and let the packet pass.
    pub audit: u8,
    pub _pad: [u8; 9],
}

/// Per-CPU state of the drop-event rate limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub window_start_ns: u64,
    pub sent: u32,
    pub suppressed: u32,
}

#[cfg(feature = "user")]
mod pod {
    // Each type is repr(C) and Copy, made of integers and byte arrays only, with explicit
    // padding fields (no implicit padding: `layouts_have_no_implicit_padding` checks the
    // sizes), so any bit pattern is a valid value and every byte is initialised.
    // SAFETY: see above; `AllowKey` is such a type.
    unsafe impl aya::Pod for super::AllowKey {}
    // SAFETY: see above; `AllowValue` is such a type.
    unsafe impl aya::Pod for super::AllowValue {}
    // SAFETY: see above; `FlowKey` is such a type.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: see above; `FlowState` is such a type.
    unsafe impl aya::Pod for super::FlowState {}
    // SAFETY: see above; `RuleStats` is such a type.
    unsafe impl aya::Pod for super::RuleStats {}
    // SAFETY: see above; `Config` is such a type.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: see above; `RelayPort` is such a type.
    unsafe impl aya::Pod for super::RelayPort {}
    // SAFETY: see above; `BridgeDropKey` is such a type.
    unsafe impl aya::Pod for super::BridgeDropKey {}
    // SAFETY: see above; `DropEvent` is such a type.
    unsafe impl aya::Pod for super::DropEvent {}
    // SAFETY: see above; `EventBudget` is such a type.
    unsafe impl aya::Pod for super::EventBudget {}
    // SAFETY: see above; `PortAddrKey` is such a type.
    unsafe impl aya::Pod for super::PortAddrKey {}
    // SAFETY: see above; `SourceKey` is such a type.
    unsafe impl aya::Pod for super::SourceKey {}
    // SAFETY: see above; `SourceValue` is such a type.
    unsafe impl aya::Pod for super::SourceValue {}
    // SAFETY: see above; `BlockKey` is such a type.
    unsafe impl aya::Pod for super::BlockKey {}
    // SAFETY: see above; `FragmentKey` is such a type.
    unsafe impl aya::Pod for super::FragmentKey {}
    // SAFETY: see above; `FragmentState` is such a type.
    unsafe impl aya::Pod for super::FragmentState {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<AllowKey>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<AllowValue>(), 8);
        assert_eq!(size_of::<SourceKey>(), 4 + 4 + 16);
        assert_eq!(size_of::<SourceValue>(), 4);
        assert_eq!(size_of::<BlockKey>(), 4 + 16);
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 3);
        assert_eq!(size_of::<FlowState>(), 8 + 4 + 4);
        assert_eq!(size_of::<RuleStats>(), 16);
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(size_of::<RelayPort>(), 2 + 1 + 1);
        assert_eq!(size_of::<BridgeDropKey>(), 8);
        assert_eq!(
            size_of::<DropEvent>(),
            8 + 16 + 16 + 4 + 4 + 2 + 2 + 1 + 1 + 1 + 9
        );
        assert_eq!(size_of::<EventBudget>(), 16);
        assert_eq!(size_of::<PortAddrKey>(), 16 + 4);
        assert_eq!(size_of::<FragmentKey>(), 16 + 16 + 4 + 1 + 3);
        assert_eq!(size_of::<FragmentState>(), 8 + 4 + 4);
    }

    #[test]
    fn ipv4_is_mapped_into_ipv6() {
        assert_eq!(
            ipv4_mapped([10, 0, 0, 2]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2]
        );
    }

    #[test]
    fn a_flow_refreshed_after_now_was_read_is_live() {
        let flow = FlowState {
            last_seen_ns: 5_000,
            rule_id: 0,
            tcp_state: 0,
            origin: ORIGIN_CONTAINER,
            flags: 0,
            _pad: 0,
        };
        // `now` read on one CPU just before another CPU wrote a newer timestamp.
        assert!(flow.is_live(PROTO_UDP, 4_999));
    }

    #[test]
    fn ipv4_mapped_addresses_are_recognised() {
        assert!(is_ipv4_mapped(&ipv4_mapped([172, 17, 0, 2])));
        let mut v6 = ipv4_mapped([172, 17, 0, 2]);
        v6[0] = 0xfd;
        assert!(!is_ipv4_mapped(&v6));
    }

    #[test]
    fn udp_flow_lives_longer_once_replied() {
        let mut flow = FlowState {
            last_seen_ns: 1_000,
            rule_id: 0,
            tcp_state: 0,
            origin: ORIGIN_CONTAINER,
            flags: 0,
            _pad: 0,
        };
        let later = 1_000 + secs(60);
        assert!(!flow.is_live(PROTO_UDP, later));
        flow.flags |= FLOW_REPLIED;
        assert!(flow.is_live(PROTO_UDP, later));
        assert!(!flow.is_live(PROTO_UDP, 1_000 + secs(181)));
    }
}
