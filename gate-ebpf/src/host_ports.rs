//! `host_ports`: the socket lookup in the host's network namespace. A new connection to a
//! published host port that reaches a local socket (Docker's userland proxy, a rootless
//! relay) instead of being DNATed is judged here, by the rule of the container port it
//! relays to; a relay's port no engine has published is refused.

use super::*;

pub(crate) const AF_INET: u32 = 2;

pub(crate) const AF_INET6: u32 = 10;

pub(crate) const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn host_ports(ctx: SkLookupContext) -> u32 {
    let config = config();
    let flags = config.flags;
    // SAFETY: the context pointer is valid for the whole program run.
    let lookup = unsafe { &*ctx.lookup };
    // From the host itself (through lo): as for any host traffic, not gated here; with
    // --gate-host-traffic the relayed connection meets `toward_containers` instead.
    if lookup.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    let proto = lookup.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return SK_PASS;
    }
    let (local, remote) = match lookup.family {
        AF_INET => (
            ipv4_mapped(lookup.local_ip4.to_ne_bytes()),
            ipv4_mapped(lookup.remote_ip4.to_ne_bytes()),
        ),
        AF_INET6 => (ipv6(&lookup.local_ip6), ipv6(&lookup.remote_ip6)),
        _ => return SK_PASS,
    };
    let port = lookup.local_port as u16;
    // SAFETY: plain map lookups; values are copied out at once.
    let published = unsafe {
        HOST_PORTS
            .get(AllowKey::new(local, proto, port))
            .or_else(|| HOST_PORTS.get(AllowKey::new([0; 16], proto, port)))
            .copied()
    };
    let verdict = match published {
        Some(published) if published.rule_id == NO_RULE => Err(DROP_NOT_ALLOWED),
        Some(published) => admits(&config, &published, &remote, lookup.ingress_ifindex),
        // A relay into a container that no engine has published (yet): closed until the
        // agent knows which container it leads to and what admits it.
        None if relays::is_relay_port(proto, port) => Err(DROP_RELAY_UNPUBLISHED),
        None => return SK_PASS, // not a published port
    };
    let reason = match verdict {
        Ok(rule_id) => {
            count(PASS_HOST_PORT);
            add_rule_stats(rule_id, 0);
            return SK_PASS;
        }
        Err(reason) => reason,
    };
    let packet = Transport {
        src: remote,
        dst: local,
        proto,
        src_port: u16::from_be(lookup.remote_port),
        dst_port: port,
        tcp_flags: 0,
        icmp: Icmp::None,
        part: Part::Whole,
        fragment_id: 0,
    };
    if !dropped(lookup.ingress_ifindex, &packet, reason, flags) {
        return SK_PASS;
    }
    let black_hole = if proto == PROTO_TCP { 0 } else { 1 };
    match BLACK_HOLE.redirect_sk_lookup(&ctx, black_hole, 0) {
        Ok(()) => SK_PASS,
        Err(_) => SK_DROP,
    }
}

/// An IPv6 address from the context's four words. Each is read at its constant offset: the
/// verifier refuses context reads through a computed pointer.
#[inline(always)]
pub(crate) fn ipv6(words: &[u32; 4]) -> Addr {
    // SAFETY: reads of the context's own fields.
    let words = unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    };
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&words[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&words[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&words[2].to_ne_bytes());
    addr[12..16].copy_from_slice(&words[3].to_ne_bytes());
    addr
}
