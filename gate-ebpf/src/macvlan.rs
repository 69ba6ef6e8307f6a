//! The gate on macvlan parents: `toward_macvlan` judges what arrives for a macvlan
//! container (a frame to another MAC than the parent's), `from_macvlan` tracks what they
//! send, with the bridge programs' code.

use super::*;

/// The parent interfaces of macvlan networks, by ifindex: their own MAC address (padded to
/// 8 bytes). A frame to another unicast MAC is for a macvlan container; the parent's own
/// frames are the host's. Written by the agent before it attaches the programs; not pinned
/// (a new agent writes its own before it takes the links over).
#[map]
pub(crate) static MACVLAN_PARENTS: HashMap<u32, [u8; 8]> =
    HashMap::with_max_entries(MACVLAN_PARENTS_CAPACITY, 0);

/// Whether the frame on macvlan parent `ifindex` is a macvlan container's: `mac` (the
/// destination on ingress, the source on egress) is unicast and not the parent's own. On a
/// parent the agent did not describe, every unicast frame is (fail closed).
#[inline(always)]
pub(crate) fn is_macvlan_containers(mac: &[u8; 6], ifindex: u32) -> bool {
    if mac[0] & 1 != 0 {
        return false; // broadcast, multicast
    }
    // SAFETY: the value is copied out at once.
    match unsafe { MACVLAN_PARENTS.get(ifindex) }.copied() {
        Some(own) => own[..6] != mac[..],
        None => true,
    }
}

/// Ingress of a macvlan parent: frames for its macvlan containers meet the gate as on a
/// bridge; the host's own traffic on that interface passes untouched.
#[classifier]
pub fn toward_macvlan(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some((dst, _)) = macs(&ctx) else {
        return PASS;
    };
    let group = dst[0] & 1 != 0;
    if !group && !is_macvlan_containers(&dst, ifindex) {
        return PASS; // the parent's own
    }
    let mut packet = Transport::new();
    let mut notes = 0;
    let parsed = parse(&ctx, &mut packet, &mut notes);
    // A broadcast or multicast frame is the host's too, unless it carries a datagram for a
    // container's own address (Linux's UDP and ICMP accept those whatever the frame).
    let theirs = if group {
        is_bound(&packet.dst, ifindex)
    } else {
        !is_this_hosts(parsed, &packet, true)
    };
    if !theirs {
        return PASS;
    }
    note(notes);
    let config = config();
    let verdict = decide(&ctx, &config, parsed, &packet);
    conclude(&ctx, &config, &packet, verdict)
}

/// Whether a frame of another MAC than a macvlan parent's is the host's own, to (`incoming`)
/// or from one of its addresses ([`LOCAL_ADDRS`]): a macvlan interface of the host itself on
/// that parent, the usual way for the host to reach its macvlan containers. Incoming frames
/// are told by their destination, so a forged source admits nothing.
#[inline(always)]
pub(crate) fn is_this_hosts(parsed: Parsed, packet: &Transport, incoming: bool) -> bool {
    let own = match parsed {
        // The embedded packet's sender is the error's destination.
        Parsed::IcmpErrorToSender if incoming => &packet.src,
        _ if incoming => &packet.dst,
        _ => &packet.src,
    };
    // SAFETY: plain map lookup.
    unsafe { LOCAL_ADDRS.get(own) }.is_some()
}

/// Egress of a macvlan parent: what its macvlan containers send is tracked as from a bridge
/// port; the host's own traffic passes untouched.
#[classifier]
pub fn from_macvlan(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if !macs(&ctx).is_some_and(|(_, src)| is_macvlan_containers(&src, ifindex)) {
        return PASS;
    }
    let mut packet = Transport::new();
    let mut notes = 0;
    let parsed = parse(&ctx, &mut packet, &mut notes);
    if is_this_hosts(parsed, &packet, false) {
        return PASS;
    }
    track_from_container(&ctx, parsed, &packet)
}
