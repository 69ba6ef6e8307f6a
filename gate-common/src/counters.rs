//! Indices of the datapath's global per-CPU counters: one per verdict and reason.

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident = $idx:literal, $label:literal, $kind:ident;)*) => {
        $($(#[$doc])* pub const $name: u32 = $idx;)*
        /// Every counter: (index, stable name, kind).
        pub const ALL: &[(u32, &str, Kind)] = &[$(($idx, $label, Kind::$kind)),*];
        pub const COUNT: u32 = ALL.len() as u32;
    };
}

/// What a counter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Packets passed, by reason.
    Pass,
    /// Packets dropped (or, in audit mode, that would have been), by reason.
    Drop,
    /// Events that are neither: notable headers seen, flows created.
    Event,
}

counters! {
    /// Not IPv4 or IPv6 (ARP, LLDP...).
    PASS_NOT_IP = 0, "not_ip", Pass;
    /// Sent by the host's own stack, and host traffic is not gated.
    PASS_HOST = 1, "host", Pass;
    /// Part of a tracked connection.
    PASS_TRACKED = 2, "tracked", Pass;
    /// ICMP error about a tracked connection.
    PASS_RELATED = 3, "related", Pass;
    /// New connection to an allowed (address, protocol, port).
    PASS_NEW_ALLOWED = 4, "new_allowed", Pass;
    /// ICMPv6 neighbour discovery and multicast listener messages.
    PASS_NEIGHBOR = 5, "neighbor_discovery", Pass;
    /// Sent by a container (the bridge ports' program never drops).
    PASS_FROM_CONTAINER = 6, "from_container", Pass;
    /// New connection to a destination without an allow rule.
    DROP_NOT_ALLOWED = 7, "not_allowed", Drop;
    /// TCP segment that is neither a connection request nor part of a tracked connection.
    DROP_TCP_NO_STATE = 8, "tcp_no_state", Drop;
    /// Truncated or inconsistent headers.
    DROP_MALFORMED = 9, "malformed", Drop;
    /// A later IP fragment (no ports) of a datagram whose first fragment did not pass, or
    /// came after it, or long ago.
    DROP_FRAGMENT = 10, "fragment", Drop;
    /// More IPv6 extension headers than the program walks, or no upper-layer header.
    DROP_UNSUPPORTED_HEADER = 11, "unsupported_header", Drop;
    /// ICMP error that matches no tracked connection.
    DROP_ICMP_UNTRACKED = 12, "icmp_untracked", Drop;
    /// Would have been dropped, passed because the gate is in audit mode.
    AUDIT_PASSED = 13, "audit_passed", Event;
    /// IPv4 header with options (still evaluated normally).
    SEEN_IP_OPTIONS = 14, "ip_options", Event;
    /// IPv6 extension headers walked (still evaluated normally).
    SEEN_IPV6_EXTENSIONS = 15, "ipv6_extensions", Event;
    /// Tracking entries created.
    FLOW_CREATED = 16, "flow_created", Event;
    /// Tracking entry could not be written; the packet still gets its verdict.
    FLOW_INSERT_FAILED = 17, "flow_insert_failed", Event;
    /// New connection to a published host port through a local socket (Docker's userland
    /// proxy), admitted by the rule of the container port it relays to.
    PASS_HOST_PORT = 18, "host_port_allowed", Pass;
    /// A connection a container tried to open from an address that is not its own on its
    /// bridge port (forged, or not yet bound by the agent): passed, but not tracked.
    FOREIGN_SOURCE = 19, "foreign_source", Event;
    /// New connection from a source on the block list (whatever allows it).
    DROP_BLOCKED = 20, "blocked", Drop;
    /// New connection to an allowed destination whose rules name other sources.
    DROP_SOURCE_NOT_ALLOWED = 21, "source_not_allowed", Drop;
    /// New connection to an allowed destination whose rules name other interfaces.
    DROP_INTERFACE_NOT_ALLOWED = 22, "interface_not_allowed", Drop;
    /// Of the drops above, those `from_uplinks` made, before conntrack saw the packet.
    DROPPED_BEFORE_CONNTRACK = 23, "dropped_before_conntrack", Event;
    /// A later fragment of a datagram whose first fragment passed.
    PASS_FRAGMENT = 24, "fragment_followed", Pass;
    /// A packet of a connection the agent ended (a block, `deny --cut`, a rule's `--for`
    /// end), either way.
    DROP_CUT = 25, "cut", Drop;
    /// New connection to a port a container relay (docker-proxy, rootlessport, pasta...)
    /// listens on that no engine the agent follows has published: a container started
    /// while no agent ran, or before the agent's first sync.
    DROP_RELAY_UNPUBLISHED = 26, "relay_unpublished", Drop;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_in_order() {
        for (i, (idx, _, _)) in ALL.iter().enumerate() {
            assert_eq!(*idx as usize, i);
        }
    }
}
