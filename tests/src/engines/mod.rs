//! Real container engines on the root namespace: Docker (containerd + dockerd) and Podman
//! (its Docker-compatible API service), the motivating scenario around them, and the real
//! agent gating their bridges.
//!
//! ```text
//!  client ns (pge-<pid>-<n>-c)        root ns (ip_forward=1, FORWARD policy DROP)
//!  eth0 10.98.X.2/24  ──── veth ────  pe<pid>-<n> 10.98.X.1/24
//!  default via 10.98.X.1              docker0 172.17.0.0/16 ── Docker containers
//!                                     podman0 10.88.0.0/16  ── Podman containers
//!                                     (cni-podman0 on the CNI set)
//! ```
//!
//! A client reaches a container through a published port of the host, `10.98.X.1:PORT`, which
//! the engine DNATs to the container: exactly "a connection from outside to a published port".
//!
//! * [`Engines::get`] starts what is not running (containerd, dockerd, the Podman service) of
//!   the engine set `PORTGATE_ENGINE_SET` names ([`EngineSet`]: `debian12`, `cni`, `sid`;
//!   sets.rs), after stopping what the harness started for the other sets, once per
//!   process; builds the local busybox image, and leaves the daemons running for other test
//!   binaries ([`Engines::stop_started`] stops what this process started).
//! * [`Scenario`] is the client namespace and the root namespace's forwarding settings,
//!   restored when the last scenario of the process is dropped (also on panic; a run that was
//!   killed is repaired by the next one).
//! * [`ContainerGuard`] removes its container on drop; [`EngineAgent`] is the real agent in
//!   the root namespace with its own pins, state and socket, uninstalled on drop.
//!
//! Names carry the owning pid (`pge-<pid>-<n>...`), so leftovers of a killed run are found
//! and removed by the next run.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use crate::agent::{Agent, remove_pins};
use crate::net::{SHOULD_ANSWER, SHOULD_TIME_OUT};
use crate::run_ok;
use crate::sandbox::in_netns;

mod agent;
pub mod boot;
mod containers;
mod daemons;
mod firewall;
mod http;
mod process;
mod scenario;
mod sets;

pub use self::{
    agent::*, containers::*, daemons::*, firewall::*, http::*, process::*, scenario::*, sets::*,
};

/// The image every container runs: Debian's static busybox, nothing else.
pub const IMAGE: &str = "local/busybox:latest";
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
pub const PODMAN_SOCKET: &str = "/run/podman/podman.sock";
pub const CONTAINERD_LOG: &str = "/tmp/portgate-tests-containerd.log";
pub const DOCKERD_LOG: &str = "/tmp/portgate-tests-dockerd.log";
pub const PODMAN_LOG: &str = "/tmp/portgate-tests-podman.log";
/// Podman's limits that this machine can grant (see shared/testbed.md), given on every run.
pub const PODMAN_ULIMITS: &[&str] = &[
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];
/// How long dockerd may take to answer `docker info` after it was started.
pub const DOCKER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an engine-driven change (an event, a label, a restart) may take to reach the gate.
pub const FOLLOW_TIMEOUT: Duration = Duration::from_secs(15);
/// The body every test httpd serves at `/`: `portgate-test <container name>`.
pub fn body_of(container: &str) -> String {
    format!("portgate-test {container}")
}

/// Which engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Podman,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }
}

/// A name unique to this process and call: `pge-<pid>-<n>`, optionally with a suffix.
pub fn unique(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    if label.is_empty() {
        format!("pge-{}-{n}", std::process::id())
    } else {
        format!("pge-{}-{n}-{label}", std::process::id())
    }
}

/// The pid in a name made by [`unique`] (also the root-side veth `pe<pid>-<n>`), unless it
/// is this process.
pub(super) fn stale_owner(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix("pge-")
        .or_else(|| name.strip_prefix("pe"))?;
    let pid: u32 = rest.split('-').next()?.parse().ok()?;
    (pid != std::process::id()).then_some(pid)
}

pub(super) fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}
