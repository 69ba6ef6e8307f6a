//! Running as a service: readiness for systemd (`Type=notify`, also around SIGHUP's reload), link
//! events from the kernel (a new bridge is gated at once, not on the next tick), and engines
//! whose API socket appears after the agent started (at boot the agent starts first).

use std::{
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixDatagram},
    },
    path::PathBuf,
};

use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{info, warn};

use super::{Agent, EngineState};
use crate::runtime::Engine;

/// Tells the service manager `state` (e.g. `READY=1`) through `$NOTIFY_SOCKET`, if it set
/// one. A datagram to a unix socket is the whole protocol (sd_notify(3)); an `@` names an
/// abstract socket.
pub(super) fn sd_notify(state: &str) -> io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let path = PathBuf::from(path);
    let addr = match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(&path)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// Logs instead of failing: a service manager that cannot be told is not a reason to stop
/// gating.
pub(super) fn notify(state: &str) {
    if let Err(err) = sd_notify(state) {
        warn!("telling the service manager {state:?} through $NOTIFY_SOCKET failed: {err}");
    }
}

impl Agent {
    /// A link came or went: gate a new bridge (and its ports) right away, so that a bridge
    /// an engine creates at boot is gated before its first container answers.
    pub(super) fn on_links_changed(&mut self) {
        if let Err(err) = self.attach_bridges(false).and_then(|()| self.sync_ports()) {
            warn!("{err:#}");
        }
    }

    /// `--runtime auto` engines whose socket did not exist at start and exists now: they are
    /// followed from here on. Returns them, for the caller to start their watchers.
    pub(super) fn engines_appeared(&mut self) -> Vec<(Engine, PathBuf)> {
        let (appeared, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.engines_later)
            .into_iter()
            .partition(|(_, socket)| socket.exists());
        self.engines_later = waiting;
        for (engine, socket) in &appeared {
            info!(%engine, socket = %socket.display(), "engine socket appeared; following it");
            self.engines
                .insert(*engine, EngineState::new(socket.clone()));
        }
        appeared
    }
}

/// Sends `()` whenever the kernel reports a link change (rtnetlink, RTMGRP_LINK); bursts
/// collapse into one. Ends (after a warning) when the socket cannot be read; the tick still
/// finds new bridges then, only later.
pub(super) async fn watch_links(changed: mpsc::Sender<()>) {
    let socket = match link_socket() {
        Ok(socket) => socket,
        Err(err) => {
            warn!("cannot follow link events (new bridges are found on the next tick): {err}");
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut guard = match socket.readable().await {
            Ok(guard) => guard,
            Err(err) => {
                warn!("link events unreadable: {err}");
                return;
            }
        };
        let mut any = false;
        loop {
            // SAFETY: `buf` is valid for writes of its length; the fd is open while `socket` lives.
            let n = unsafe {
                libc::recv(
                    socket.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n > 0 {
                any = true;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) => break,
                // The kernel dropped messages: something changed, look anyway.
                Some(libc::ENOBUFS) => any = true,
                Some(libc::EINTR) => {}
                _ => {
                    warn!("reading link events: {err}");
                    return;
                }
            }
        }
        guard.clear_ready();
        if any {
            match changed.try_send(()) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                Err(mpsc::error::TrySendError::Closed(())) => return,
            }
        }
    }
}

fn link_socket() -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain integers, for which all zeroes is valid.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = libc::RTMGRP_LINK as u32;
    // SAFETY: `addr` is a valid sockaddr_nl of the size passed.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the OwnedFd owns the socket, open and unchanged while it lives.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}
