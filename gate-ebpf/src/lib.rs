//! Packet parsing for the gate's TC programs: from an Ethernet frame to the few fields the
//! decision needs. Reads are bounds-checked against the packet's linear data, or go through
//! `bpf_skb_load_bytes` beyond it, so a short or non-linear packet gives an error, never an
//! out-of-bounds access.
#![no_std]

use aya_ebpf::programs::TcContext;
use gate_common::{
    Addr, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ipv4_mapped, is_ipv4_mapped, tcp,
};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::{Icmpv4Hdr, Icmpv6Hdr},
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

/// IPv6 extension headers walked before giving up (the verifier needs a bound).
const MAX_IPV6_EXTENSIONS: usize = 4;

/// Why a packet could not be matched.
#[derive(Clone, Copy)]
pub enum ParseError {
    /// Truncated or inconsistent headers.
    Malformed,
    /// A later IP fragment: no transport header to match (its datagram's identity is in the
    /// `Transport`).
    Fragment,
    /// Too many IPv6 extension headers, or none that leads to a transport header.
    UnsupportedHeader,
}

/// Notable things seen while parsing, for counters. Bits.
pub const NOTE_IP_OPTIONS: u8 = 1;
pub const NOTE_IPV6_EXTENSIONS: u8 = 2;

/// What kind of ICMP message a packet carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Icmp {
    /// Not ICMP.
    None,
    EchoRequest,
    EchoReply,
    /// Neighbour discovery or multicast listener messages (ICMPv6).
    Neighbor,
    /// Another informational message (timestamp, router advertisement for IPv4...).
    Other,
}

/// Which part of an IP datagram a packet carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// A whole datagram (including an IPv6 atomic fragment).
    Whole,
    /// The first fragment: it carries the transport header and decides for the datagram.
    First,
    /// A later fragment: no transport header; it follows its first fragment's verdict.
    Later,
}

/// The transport-level identity of a packet. For ICMP echo, both ports hold the identifier.
#[derive(Clone, Copy)]
pub struct Transport {
    pub src: Addr,
    pub dst: Addr,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte, 0 for other protocols.
    pub tcp_flags: u8,
    pub icmp: Icmp,
    pub part: Part,
    /// The datagram's identification, for fragments (IPv4: 16 bits; IPv6: 32).
    pub fragment_id: u32,
}

impl Transport {
    /// Whether this packet may open a new connection: a TCP SYN without ACK, any UDP datagram,
    /// an ICMP echo request.
    #[inline(always)]
    pub fn opens_connection(&self) -> bool {
        match self.proto {
            PROTO_TCP => tcp::is_connection_request(self.tcp_flags),
            PROTO_UDP => true,
            _ => self.icmp == Icmp::EchoRequest,
        }
    }
}

impl Transport {
    const EMPTY: Self = Self {
        src: [0; 16],
        dst: [0; 16],
        proto: 0,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        icmp: Icmp::None,
        part: Part::Whole,
        fragment_id: 0,
    };

    pub const fn new() -> Self {
        Self::EMPTY
    }

    /// Starts the transport part over for a header of protocol `proto`.
    #[inline(always)]
    fn reset_transport(&mut self, proto: u8) {
        self.proto = proto;
        self.src_port = 0;
        self.dst_port = 0;
        self.tcp_flags = 0;
        self.icmp = Icmp::None;
    }
}

impl Default for Transport {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// What `parse` found. The transport fields go to the caller's `Transport`, written in place
/// to keep the BPF stack small; a plain `u8` so it returns in a register.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not IPv4 or IPv6.
    NotIp,
    /// A TCP, UDP or ICMP packet, or another IP protocol (ports 0).
    Packet,
    /// An ICMP error going back to the sender of the packet it embeds (as a genuine error
    /// does). The transport describes that embedded packet, as it was sent.
    IcmpErrorToSender,
    /// An ICMP error about a packet someone else sent.
    IcmpErrorForeign,
    Malformed,
    Fragment,
    UnsupportedHeader,
}

impl From<ParseError> for Parsed {
    fn from(err: ParseError) -> Self {
        match err {
            ParseError::Malformed => Parsed::Malformed,
            ParseError::Fragment => Parsed::Fragment,
            ParseError::UnsupportedHeader => Parsed::UnsupportedHeader,
        }
    }
}

/// Reads a `T` at `offset`: straight from the packet where its linear part holds it (headers
/// almost always are), through `bpf_skb_load_bytes` otherwise, which copies from anywhere in
/// the packet and fails past its end.
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, ParseError> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: within the linear data, checked against its end just above (the verifier
        // checks the same); unaligned, as headers may be.
        return Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    ctx.load::<T>(offset).map_err(|_| ParseError::Malformed)
}

/// The frame's destination and source MAC addresses.
#[inline(always)]
pub fn macs(ctx: &TcContext) -> Option<([u8; 6], [u8; 6])> {
    let eth: EthHdr = load(ctx, 0).ok()?;
    Some((eth.dst_addr, eth.src_addr))
}

/// Parses the frame in `ctx` into `t`; `notes` collects `NOTE_*` bits. A function of its own
/// (not inlined) so its stack frame is separate from the decision's.
#[inline(never)]
pub fn parse(ctx: &TcContext, t: &mut Transport, notes: &mut u8) -> Parsed {
    let parsed = match load::<EthHdr>(ctx, 0).map(|eth| eth.ether_type()) {
        Ok(Ok(EtherType::Ipv4)) => parse_ipv4(ctx, EthHdr::LEN, t, notes),
        Ok(Ok(EtherType::Ipv6)) => parse_ipv6(ctx, EthHdr::LEN, t, notes),
        Ok(_) => Ok(Parsed::NotIp),
        Err(err) => Err(err),
    };
    parsed.unwrap_or_else(Parsed::from)
}

#[inline(always)]
fn parse_ipv4(
    ctx: &TcContext,
    offset: usize,
    t: &mut Transport,
    notes: &mut u8,
) -> Result<Parsed, ParseError> {
    let ip: Ipv4Hdr = load(ctx, offset)?;
    let header_len = ip.ihl() as usize;
    if ip.version() != 4 || header_len < Ipv4Hdr::LEN {
        return Err(ParseError::Malformed);
    }
    if header_len > Ipv4Hdr::LEN {
        *notes |= NOTE_IP_OPTIONS;
    }
    t.src = ipv4_mapped(ip.src_addr);
    t.dst = ipv4_mapped(ip.dst_addr);
    // More-fragments flag (0x2000) and fragment offset (0x1fff, in 8 octets).
    let frags = u16::from_be_bytes(ip.frags);
    if frags & 0x3fff != 0 {
        t.fragment_id = u16::from_be_bytes(ip.id) as u32;
        let offset = frags & 0x1fff;
        if offset != 0 {
            // RFC 1858: a TCP fragment at offset 8 can only be rewriting the header's flags.
            if ip.proto == PROTO_TCP && offset == 1 {
                return Err(ParseError::Malformed);
            }
            t.reset_transport(ip.proto);
            t.part = Part::Later;
            return Err(ParseError::Fragment);
        }
        t.part = Part::First;
    }
    let l4 = offset + header_len;
    let icmp_type = transport(ctx, l4, ip.proto, t)?;
    // Destination unreachable, source quench, time exceeded, parameter problem.
    if ip.proto == PROTO_ICMP && matches!(icmp_type, 3 | 4 | 11 | 12) {
        return embedded_ipv4(ctx, l4 + Icmpv4Hdr::LEN, t);
    }
    Ok(Parsed::Packet)
}

#[inline(always)]
fn parse_ipv6(
    ctx: &TcContext,
    offset: usize,
    t: &mut Transport,
    notes: &mut u8,
) -> Result<Parsed, ParseError> {
    // Version and flow label, payload length, next header, hop limit.
    let fixed: [u8; 8] = load(ctx, offset)?;
    if fixed[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    t.src = load(ctx, offset + 8)?;
    t.dst = load(ctx, offset + 24)?;
    // An IPv4-mapped address would alias an IPv4 key of the allow and flow maps.
    if is_ipv4_mapped(&t.src) || is_ipv4_mapped(&t.dst) {
        return Err(ParseError::Malformed);
    }
    let mut next = fixed[6];
    let mut l4 = offset + Ipv6Hdr::LEN;
    let mut walked = 0;
    loop {
        match next {
            // Hop-by-hop, routing, destination options: (next header, length in 8 octets - 1).
            0 | 43 | 60 => {
                let h: [u8; 2] = load(ctx, l4)?;
                next = h[0];
                l4 += (h[1] as usize + 1) * 8;
            }
            // Authentication header: length in 4 octets - 2.
            51 => {
                let h: [u8; 2] = load(ctx, l4)?;
                next = h[0];
                l4 += (h[1] as usize + 2) * 4;
            }
            // Fragment header: an offset (0xfff8) or the more-fragments bit (1) makes it a
            // real fragment; without both it is an atomic fragment, a whole datagram.
            44 => {
                let h: [u8; 8] = load(ctx, l4)?;
                let frags = u16::from_be_bytes([h[2], h[3]]);
                next = h[0];
                l4 += 8;
                if frags & 0xfff9 != 0 {
                    t.fragment_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                    if frags & 0xfff8 != 0 {
                        t.reset_transport(next);
                        t.part = Part::Later;
                        return Err(ParseError::Fragment);
                    }
                    t.part = Part::First;
                }
            }
            // No next header.
            59 => return Err(ParseError::UnsupportedHeader),
            _ => break,
        }
        *notes |= NOTE_IPV6_EXTENSIONS;
        walked += 1;
        if walked >= MAX_IPV6_EXTENSIONS {
            return Err(ParseError::UnsupportedHeader);
        }
    }
    let icmp_type = transport(ctx, l4, next, t)?;
    // Destination unreachable, packet too big, time exceeded, parameter problem.
    if next == PROTO_ICMPV6 && matches!(icmp_type, 1..=4) {
        return embedded_ipv6(ctx, l4 + Icmpv6Hdr::LEN, t);
    }
    Ok(Parsed::Packet)
}

/// Reads the transport header at `offset` into `t`; returns the ICMP type (0 otherwise).
#[inline(always)]
fn transport(
    ctx: &TcContext,
    offset: usize,
    proto: u8,
    t: &mut Transport,
) -> Result<u8, ParseError> {
    t.reset_transport(proto);
    match proto {
        PROTO_TCP => {
            let h: TcpHdr = load(ctx, offset)?;
            if h.doff() < 5 {
                return Err(ParseError::Malformed);
            }
            t.src_port = u16::from_be_bytes(h.source);
            t.dst_port = u16::from_be_bytes(h.dest);
            t.tcp_flags = tcp_flags(&h);
            Ok(0)
        }
        PROTO_UDP => {
            let h: UdpHdr = load(ctx, offset)?;
            t.src_port = u16::from_be_bytes(h.src);
            t.dst_port = u16::from_be_bytes(h.dst);
            Ok(0)
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            // Type, code, checksum, then identifier and sequence for echo.
            let h: [u8; 8] = load(ctx, offset)?;
            icmp_fields(proto, &h, t);
            Ok(h[0])
        }
        _ => Ok(0),
    }
}

/// Fills the ICMP kind and, for echo, the identifier as both ports.
#[inline(always)]
fn icmp_fields(proto: u8, h: &[u8; 8], t: &mut Transport) {
    t.icmp = icmp_kind(proto, h[0]);
    if matches!(t.icmp, Icmp::EchoRequest | Icmp::EchoReply) {
        let id = u16::from_be_bytes([h[4], h[5]]);
        t.src_port = id;
        t.dst_port = id;
    }
}

#[inline(always)]
fn icmp_kind(proto: u8, icmp_type: u8) -> Icmp {
    match (proto, icmp_type) {
        (PROTO_ICMP, 8) | (PROTO_ICMPV6, 128) => Icmp::EchoRequest,
        (PROTO_ICMP, 0) | (PROTO_ICMPV6, 129) => Icmp::EchoReply,
        // MLD query/report/done, router/neighbour solicitation/advertisement, redirect, MLDv2.
        (PROTO_ICMPV6, 130..=137 | 143) => Icmp::Neighbor,
        _ => Icmp::Other,
    }
}

#[inline(always)]
fn tcp_flags(h: &TcpHdr) -> u8 {
    let mut flags = 0;
    if h.fin() != 0 {
        flags |= tcp::FIN;
    }
    if h.syn() != 0 {
        flags |= tcp::SYN;
    }
    if h.rst() != 0 {
        flags |= tcp::RST;
    }
    if h.ack() != 0 {
        flags |= tcp::ACK;
    }
    flags
}

/// Replaces `t` with the IPv4 packet embedded in an ICMP error at `offset`.
#[inline(always)]
fn embedded_ipv4(ctx: &TcContext, offset: usize, t: &mut Transport) -> Result<Parsed, ParseError> {
    let ip: Ipv4Hdr = load(ctx, offset)?;
    let header_len = ip.ihl() as usize;
    if ip.version() != 4 || header_len < Ipv4Hdr::LEN {
        return Err(ParseError::Malformed);
    }
    let sender = ipv4_mapped(ip.src_addr);
    let to_its_sender = sender == t.dst;
    t.src = sender;
    t.dst = ipv4_mapped(ip.dst_addr);
    embedded_transport(ctx, offset + header_len, ip.proto, t)?;
    Ok(if to_its_sender {
        Parsed::IcmpErrorToSender
    } else {
        Parsed::IcmpErrorForeign
    })
}

/// Replaces `t` with the IPv6 packet embedded in an ICMPv6 error at `offset`. Extension
/// headers inside are not walked: such errors match no flow.
#[inline(always)]
fn embedded_ipv6(ctx: &TcContext, offset: usize, t: &mut Transport) -> Result<Parsed, ParseError> {
    let fixed: [u8; 8] = load(ctx, offset)?;
    if fixed[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let sender: Addr = load(ctx, offset + 8)?;
    let to_its_sender = sender == t.dst;
    t.src = sender;
    t.dst = load(ctx, offset + 24)?;
    embedded_transport(ctx, offset + Ipv6Hdr::LEN, fixed[6], t)?;
    Ok(if to_its_sender {
        Parsed::IcmpErrorToSender
    } else {
        Parsed::IcmpErrorForeign
    })
}

/// ICMP errors carry at least the first 8 bytes of the transport header: enough for ports
/// and echo identifiers, not for TCP flags.
#[inline(always)]
fn embedded_transport(
    ctx: &TcContext,
    offset: usize,
    proto: u8,
    t: &mut Transport,
) -> Result<(), ParseError> {
    let h: [u8; 8] = load(ctx, offset)?;
    t.reset_transport(proto);
    match proto {
        PROTO_TCP | PROTO_UDP => {
            t.src_port = u16::from_be_bytes([h[0], h[1]]);
            t.dst_port = u16::from_be_bytes([h[2], h[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => icmp_fields(proto, &h, t),
        _ => {}
    }
    Ok(())
}
