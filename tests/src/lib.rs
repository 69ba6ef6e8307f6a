//! Test harness for portgate's end-to-end tests.
//!
//! Real over mock: a [`Sandbox`] is three real network namespaces (a host with a bridge, a
//! client routed through the host, a container on the bridge), an [`Agent`] is the real
//! `portgate` binary loading its programs into the real kernel, and the servers and clients
//! in [`net`] are plain `std::net` sockets opened inside those namespaces. Traffic never
//! leaves the namespaces a sandbox created.
//!
//! Everything here needs root; [`require_root`] lets a test skip, saying why.

pub mod agent;
pub mod engines;
pub mod fake_engine;
pub mod net;
pub mod sandbox;

pub use agent::{Agent, portgate_bin};
pub use net::{TcpEchoServer, UdpEchoServer};
pub use sandbox::Sandbox;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The skip policy of every test crate (`portgate-test-support`): `skip(why)` prints
/// `skipped: <test>: <why>` past libtest's capture, or fails the test where skips are
/// failures (`PORTGATE_REQUIRE_ROOT`, `PORTGATE_REQUIRE_ENGINES` or `CI` set, as in CI).
/// `not_applicable(why)` prints `not applicable: <test>: <why>` the same way, and never
/// fails: for a test whose subject this machine's engine set does not have.
pub use portgate_test_support::{current_test_name, not_applicable, skip};

/// Whether the test may run. When not root, skips the test saying why and returns false
/// (or fails it where skips are failures, see [`skip`]): a skip is never silently a pass.
pub fn require_root() -> bool {
    portgate_test_support::require_root("loads eBPF programs, creates network namespaces")
}

/// A name unique to this process and call: `pgt-<pid>-<n>`. Leftovers of a killed run carry
/// a dead pid, which is how [`sandbox::reap_stale`] recognises them.
pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "pgt-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command; panics with its output unless it succeeds; returns its stdout.
pub fn run_ok(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    if !output.status.success() {
        panic!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}
