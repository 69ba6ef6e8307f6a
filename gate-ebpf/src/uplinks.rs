//! `from_uplinks`: the early drop on the interfaces traffic arrives on (`--uplink`), before
//! netfilter and conntrack see a refused new connection.

use super::*;

#[classifier]
pub fn from_uplinks(ctx: TcContext) -> i32 {
    let config = config();
    let mut packet = Transport::new();
    let mut notes = 0;
    // What does not parse is for the stack and the bridge gate to judge.
    if parse(&ctx, &mut packet, &mut notes) != Parsed::Packet {
        return PASS;
    }
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(reason) = refused_before_conntrack(&config, &packet, ifindex) else {
        return PASS;
    };
    if dropped(ifindex, &packet, reason, config.flags) {
        count(DROPPED_BEFORE_CONNTRACK);
        DROP
    } else {
        PASS
    }
}

/// The drop reason of a new connection to a published host port of this host that the
/// policy refuses: the same decision the bridge gate and `host_ports` would make later.
/// None for everything else (replies, tracked traffic, the host's own services).
#[inline(always)]
pub(crate) fn refused_before_conntrack(
    config: &Config,
    packet: &Transport,
    ifindex: u32,
) -> Option<u32> {
    if packet.proto != PROTO_TCP && packet.proto != PROTO_UDP || !packet.opens_connection() {
        return None;
    }
    // SAFETY: plain map lookups; values are copied out at once.
    unsafe {
        LOCAL_ADDRS.get(packet.dst)?;
        let published = HOST_PORTS
            .get(AllowKey::new(packet.dst, packet.proto, packet.dst_port))
            .or_else(|| HOST_PORTS.get(AllowKey::new([0; 16], packet.proto, packet.dst_port)))
            .copied()?;
        if published.rule_id == NO_RULE {
            return Some(DROP_NOT_ALLOWED);
        }
        admits(config, &published, &packet.src, ifindex).err()
    }
}
