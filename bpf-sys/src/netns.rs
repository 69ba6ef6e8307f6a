//! Network namespaces, entered the one way portgate enters them: `setns(2)` on a thread of
//! its own, or in a child just before `exec`, and nothing else. Unlike `ip netns exec` that
//! keeps the mount namespace, so /sys/fs/bpf stays visible. Sockets created inside belong to
//! the namespace for their whole life, whichever thread uses them later.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd as _},
        unix::process::CommandExt as _,
    },
    path::Path,
    process::Command,
};

/// Moves the calling thread into the network namespace `namespace` (an open
/// `/run/netns/NAME` or `/proc/PID/ns/net`).
pub fn enter(namespace: impl AsFd) -> io::Result<()> {
    let fd = namespace.as_fd().as_raw_fd();
    // SAFETY: setns on a valid namespace descriptor; it affects only the calling thread.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs `f` on a fresh thread inside the network namespace at `path`. A panic in `f` is
/// propagated.
pub fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let namespace = File::open(path)?;
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || {
            enter(&namespace)?;
            drop(namespace);
            Ok(f())
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Makes `command` run inside the network namespace `namespace` (a `File`, or an `Arc` of
/// one the caller shares): the child enters it just before `exec`.
pub fn command_in(
    command: &mut Command,
    namespace: impl AsFd + Send + Sync + 'static,
) -> &mut Command {
    // SAFETY: the closure only makes the async-signal-safe setns system call, on a
    // descriptor the closure owns.
    unsafe {
        command.pre_exec(move || enter(&namespace));
    }
    command
}
