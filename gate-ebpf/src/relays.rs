//! Container relays: the processes that carry connections to a container from a listening
//! socket of the host (Docker's `docker-proxy`, rootless Podman's `rootlessport` and
//! `pasta`, `slirp4netns`, rootless Docker's `rootlesskit`).
//!
//! Only the engine API says which container a relayed port leads to and what admits it,
//! and the agent writes that into `HOST_PORTS`. A relay that starts while no agent runs
//! (stopped, restarting, at boot before its first sync) would be reachable through a port
//! `host_ports` does not know. These hooks, on the cgroup v2 root so that they see every
//! process, record each port a relay takes in the gated network namespace; `host_ports`
//! refuses such a port until an engine publishes it. They never refuse anything.
//!
//! A relay takes a port by binding it (`relay_bound4`, `relay_bound6`), or by adopting a
//! socket another process bound: Docker 28's daemon binds and hands the listener to
//! docker-proxy (`-use-listen-fd`), whose Go runtime asks the socket its type first
//! (`relay_adopted`, on getsockopt). A port taken while the map is full is not recorded.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{bpf_get_current_comm, bpf_get_netns_cookie},
    macros::{cgroup_sock, cgroup_sockopt, map},
    maps::HashMap,
    programs::{SockContext, SockoptContext},
};
use gate_common::{
    COMM_LEN, PROTO_TCP, PROTO_UDP, RELAY_COMMS_CAPACITY, RELAY_PORTS_CAPACITY, RelayPort,
};

/// The relays' process names (`comm`, NUL-padded), written by the agent.
#[map]
static RELAY_COMMS: HashMap<[u8; COMM_LEN], u8> =
    HashMap::with_max_entries(RELAY_COMMS_CAPACITY, 0);

/// The ports relays have taken. The kernel only adds: the agent removes a port no socket of
/// the host holds any more. Until then it stays refused unless published (fail closed).
#[map]
static RELAY_PORTS: HashMap<RelayPort, u8> = HashMap::with_max_entries(RELAY_PORTS_CAPACITY, 0);

/// Whether a relay has bound `port`.
#[inline(always)]
pub fn is_relay_port(proto: u8, port: u16) -> bool {
    // SAFETY: a plain map lookup.
    unsafe { RELAY_PORTS.get(RelayPort::new(proto, port)) }.is_some()
}

#[cgroup_sock(post_bind4)]
pub fn relay_bound4(ctx: SockContext) -> i32 {
    record(ctx.sock, ctx.sock.cast());
    PROCEED
}

#[cgroup_sock(post_bind6)]
pub fn relay_bound6(ctx: SockContext) -> i32 {
    record(ctx.sock, ctx.sock.cast());
    PROCEED
}

#[cgroup_sockopt(getsockopt)]
pub fn relay_adopted(ctx: SockoptContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let (level, optname, sock) = unsafe {
        let opt = &*ctx.sockopt;
        (opt.level, opt.optname, opt.__bindgen_anon_1.sk)
    };
    if level == SOL_SOCKET && optname == SO_TYPE && !sock.is_null() {
        record(sock, ctx.sockopt.cast());
    }
    PROCEED
}

/// What a cgroup socket hook returns to let the operation proceed.
const PROCEED: i32 = 1;
const SOL_SOCKET: i32 = 1;
const SO_TYPE: i32 = 3;

/// Records the port of `sock` when the current process is a relay and the socket is in the
/// gated namespace (`ctx`: the program's context, which the netns helper takes).
#[inline(always)]
fn record(sock: *mut bpf_sock, ctx: *mut c_void) {
    // SAFETY: the kernel hands a valid socket for the whole program run.
    let sock: &bpf_sock = unsafe { &*sock };
    let proto = sock.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP || sock.src_port == 0 {
        return;
    }
    let Ok(comm) = bpf_get_current_comm() else {
        return;
    };
    // SAFETY: a plain map lookup.
    if unsafe { RELAY_COMMS.get(comm) }.is_none() {
        return;
    }
    // SAFETY: the helper reads the program's context.
    if unsafe { bpf_get_netns_cookie(ctx) } != crate::config().netns_cookie {
        return; // the relay's end inside a container's namespace
    }
    let _ = RELAY_PORTS.insert(RelayPort::new(proto, sock.src_port as u16), 1, 0);
}
