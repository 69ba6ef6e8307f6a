//! A small TCP state machine for the flow table: enough to know when a connection is being
//! opened, is up, or is going away, which sets its idle timeout. Sequence numbers are not
//! checked (the host's own conntrack and the endpoints do that).

pub const SYN_SENT: u8 = 1;
pub const SYN_RECV: u8 = 2;
pub const ESTABLISHED: u8 = 3;
pub const FIN_WAIT: u8 = 4;
pub const CLOSED: u8 = 5;

/// Bits of the TCP header's flags byte (offset 13).
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// A connection request: SYN without ACK.
#[inline(always)]
pub const fn is_connection_request(flags: u8) -> bool {
    flags & (SYN | ACK) == SYN
}

/// The state after a packet with `flags`; `from_opener` tells whether the side that opened
/// the connection sent it.
#[inline(always)]
pub const fn next_state(state: u8, flags: u8, from_opener: bool) -> u8 {
    if flags & RST != 0 {
        return CLOSED;
    }
    if flags & FIN != 0 {
        return if state == CLOSED { CLOSED } else { FIN_WAIT };
    }
    match state {
        SYN_SENT if !from_opener && flags & (SYN | ACK) == SYN | ACK => SYN_RECV,
        SYN_RECV if from_opener && flags & (SYN | ACK) == ACK => ESTABLISHED,
        _ => state,
    }
}

/// A state in which a new SYN for the same addresses and ports starts a new connection.
#[inline(always)]
pub const fn is_reusable(state: u8) -> bool {
    state == FIN_WAIT || state == CLOSED
}

/// Idle timeout of each state (Linux conntrack's defaults, rounded).
#[inline(always)]
pub const fn timeout_ns(state: u8) -> u64 {
    const S: u64 = 1_000_000_000;
    match state {
        SYN_SENT => 120 * S,
        SYN_RECV => 60 * S,
        ESTABLISHED => 5 * 24 * 3600 * S,
        FIN_WAIT => 120 * S,
        _ => 10 * S,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_way_handshake_establishes() {
        let s = next_state(SYN_SENT, SYN | ACK, false);
        assert_eq!(s, SYN_RECV);
        assert_eq!(next_state(s, ACK, true), ESTABLISHED);
    }

    #[test]
    fn handshake_needs_the_right_sides() {
        // A SYN-ACK from the opener or an ACK from the responder does not advance.
        assert_eq!(next_state(SYN_SENT, SYN | ACK, true), SYN_SENT);
        assert_eq!(next_state(SYN_RECV, ACK, false), SYN_RECV);
    }

    #[test]
    fn fin_and_rst_end_the_connection() {
        assert_eq!(next_state(ESTABLISHED, FIN | ACK, false), FIN_WAIT);
        assert_eq!(next_state(ESTABLISHED, RST, true), CLOSED);
        assert_eq!(next_state(CLOSED, FIN, true), CLOSED);
        assert!(is_reusable(FIN_WAIT) && is_reusable(CLOSED) && !is_reusable(ESTABLISHED));
        assert!(timeout_ns(CLOSED) < timeout_ns(FIN_WAIT));
        assert!(timeout_ns(FIN_WAIT) < timeout_ns(ESTABLISHED));
    }

    #[test]
    fn only_a_bare_syn_requests_a_connection() {
        assert!(is_connection_request(SYN));
        assert!(!is_connection_request(SYN | ACK));
        assert!(!is_connection_request(ACK));
    }
}
