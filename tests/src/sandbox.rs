//! Three network namespaces wired like a container host:
//!
//! ```text
//!  client ns                host ns (ip_forward=1)                     container ns
//!  eth0 10.98.0.2/24  ───  vcli 10.98.0.1/24                           eth0 10.99.0.2/24
//!       fd98::2/64              fd98::1/64                                  fd99::2/64
//!  lo   10.96.0.3/32       pgbr0 10.99.0.1/24, fd99::1/64 ── vctr ───  (veth)
//!       fd96::3/128                                    └── vnbr ───  neighbour ns
//!                                                                      eth0 10.99.0.3/24
//!  remote ns                                                                fd99::3/64
//!  eth0 10.97.0.2/24  ───  vwg 10.97.0.1/24
//!       fd97::2/64              fd97::1/64
//! ```
//!
//! The client has a second address of each family on its loopback, routed through it by
//! the host: another source on the same way in, never picked unless bound. The remote
//! namespace comes in on another interface (`vwg`, standing for a tunnel such as wg0).
//!
//! The neighbour is a second container on the same bridge: the one that tries to act in the
//! container's name.
//!
//! The client's default routes point at the host, the container's at the bridge, so client
//! to container traffic is forwarded by the host and leaves through the bridge's TC egress
//! hook, exactly like traffic from outside to a published container port. Interface names
//! live inside the sandbox's own namespaces, so the fixed names and addresses don't collide
//! between sandboxes running in parallel.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use crate::{run_ok, unique_name};

pub use portgate_test_support::topology::{
    BRIDGE, BRIDGE_V4, BRIDGE_V6, CLIENT_V4, CLIENT_V6, CONTAINER_V4, CONTAINER_V6, HOST_V4,
    HOST_V6,
};
pub const NEIGHBOUR_V4: &str = "10.99.0.3";
pub const NEIGHBOUR_V6: &str = "fd99::3";
/// The client's second addresses.
pub const CLIENT2_V4: &str = "10.96.0.3";
pub const CLIENT2_V6: &str = "fd96::3";
/// The host's side of the second way in, and the remote namespace behind it.
pub const TUNNEL: &str = "vwg";
pub const TUNNEL_HOST_V4: &str = "10.97.0.1";
pub const TUNNEL_HOST_V6: &str = "fd97::1";
pub const REMOTE_V4: &str = "10.97.0.2";
pub const REMOTE_V6: &str = "fd97::2";

/// A host, a client and a container namespace, deleted on drop (also when a test panics).
pub struct Sandbox {
    /// Unique prefix of everything this sandbox names, `pgt-<pid>-<n>`.
    pub id: String,
    /// Name of the host namespace (holds the bridge; the agent runs here).
    pub host: String,
    /// Name of the client namespace ("outside").
    pub client: String,
    /// Name of the container namespace (on the bridge).
    pub container: String,
    /// Name of a second container's namespace on the same bridge.
    pub neighbour: String,
    /// Name of a namespace that reaches the host through [`TUNNEL`], another interface.
    pub remote: String,
}

impl Sandbox {
    /// Creates the namespaces and wires them. Panics with the failing command's output when
    /// anything goes wrong (after deleting what was created).
    pub fn new() -> Self {
        reap_stale();
        let id = unique_name();
        let sandbox = Sandbox {
            host: format!("{id}-h"),
            client: format!("{id}-c"),
            container: format!("{id}-k"),
            neighbour: format!("{id}-n"),
            remote: format!("{id}-r"),
            id,
        };
        // From here on, a panic drops `sandbox`, which deletes whatever was created.
        sandbox.setup();
        sandbox
    }

    fn setup(&self) {
        let (h, c, k, n, r) = (
            self.host.as_str(),
            self.client.as_str(),
            self.container.as_str(),
            self.neighbour.as_str(),
            self.remote.as_str(),
        );
        for ns in [h, c, k, n, r] {
            run_ok(Command::new("ip").args(["netns", "add", ns]));
        }
        for ns in [h, c, k, n, r] {
            ip(ns, &["link", "set", "lo", "up"]);
            // Addresses are usable at once: no duplicate address detection, not even for the
            // link-local ones that neighbour discovery uses.
            sysctl(
                ns,
                &[
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
            );
        }
        sysctl(
            h,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        );

        // Client <-> host.
        ip(
            h,
            &[
                "link", "add", "vcli", "type", "veth", "peer", "name", "eth0", "netns", c,
            ],
        );
        addr(
            h,
            "vcli",
            &format!("{HOST_V4}/24"),
            &format!("{HOST_V6}/64"),
        );
        addr(
            c,
            "eth0",
            &format!("{CLIENT_V4}/24"),
            &format!("{CLIENT_V6}/64"),
        );

        addr(
            c,
            "lo",
            &format!("{CLIENT2_V4}/32"),
            &format!("{CLIENT2_V6}/128"),
        );

        // Remote <-> host, the second way in.
        ip(
            h,
            &[
                "link", "add", TUNNEL, "type", "veth", "peer", "name", "eth0", "netns", r,
            ],
        );
        addr(
            h,
            TUNNEL,
            &format!("{TUNNEL_HOST_V4}/24"),
            &format!("{TUNNEL_HOST_V6}/64"),
        );
        addr(
            r,
            "eth0",
            &format!("{REMOTE_V4}/24"),
            &format!("{REMOTE_V6}/64"),
        );

        // Host bridge <-> container.
        ip(h, &["link", "add", BRIDGE, "type", "bridge"]);
        ip(
            h,
            &[
                "link", "add", "vctr", "type", "veth", "peer", "name", "eth0", "netns", k,
            ],
        );
        ip(h, &["link", "set", "vctr", "master", BRIDGE]);
        ip(
            h,
            &[
                "link", "add", "vnbr", "type", "veth", "peer", "name", "eth0", "netns", n,
            ],
        );
        ip(h, &["link", "set", "vnbr", "master", BRIDGE]);
        addr(
            h,
            BRIDGE,
            &format!("{BRIDGE_V4}/24"),
            &format!("{BRIDGE_V6}/64"),
        );
        addr(
            k,
            "eth0",
            &format!("{CONTAINER_V4}/24"),
            &format!("{CONTAINER_V6}/64"),
        );
        addr(
            n,
            "eth0",
            &format!("{NEIGHBOUR_V4}/24"),
            &format!("{NEIGHBOUR_V6}/64"),
        );

        for (ns, dev) in [
            (h, "vcli"),
            (h, TUNNEL),
            (r, "eth0"),
            (h, "vctr"),
            (h, "vnbr"),
            (h, BRIDGE),
            (c, "eth0"),
            (k, "eth0"),
            (n, "eth0"),
        ] {
            ip(ns, &["link", "set", dev, "up"]);
        }
        ip(c, &["route", "add", "default", "via", HOST_V4]);
        ip(c, &["-6", "route", "add", "default", "via", HOST_V6]);
        ip(h, &["route", "add", CLIENT2_V4, "via", CLIENT_V4]);
        ip(h, &["-6", "route", "add", CLIENT2_V6, "via", CLIENT_V6]);
        ip(r, &["route", "add", "default", "via", TUNNEL_HOST_V4]);
        ip(r, &["-6", "route", "add", "default", "via", TUNNEL_HOST_V6]);
        ip(k, &["route", "add", "default", "via", BRIDGE_V4]);
        ip(k, &["-6", "route", "add", "default", "via", BRIDGE_V6]);
        ip(n, &["route", "add", "default", "via", BRIDGE_V4]);
        ip(n, &["-6", "route", "add", "default", "via", BRIDGE_V6]);
    }

    /// Path of a namespace's handle, `/run/netns/NAME`.
    pub fn netns_path(ns: &str) -> PathBuf {
        Path::new("/run/netns").join(ns)
    }

    /// Runs `f` on a fresh thread that has entered network namespace `ns` (one of
    /// [`Sandbox::host`], [`Sandbox::client`], [`Sandbox::container`]); see [`in_netns`].
    pub fn in_netns<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> T {
        in_netns(ns, f)
    }

    /// A command that runs `program` inside network namespace `ns`; see [`netns_command`].
    pub fn command_in(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(ns, program)
    }

    /// Runs `ping -c 1 -W <wait_secs> <address>` in `ns`; true when the echo was answered.
    pub fn ping(&self, ns: &str, address: &str, wait_secs: u32) -> bool {
        let output = self
            .command_in(ns, "ping")
            .args(["-n", "-c", "1", "-W", &wait_secs.to_string(), address])
            .output()
            .expect("run ping (iputils-ping installed?)");
        output.status.success()
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Best effort: a namespace that was never created just fails to delete.
        for ns in [
            &self.remote,
            &self.neighbour,
            &self.container,
            &self.client,
            &self.host,
        ] {
            if Self::netns_path(ns).exists() {
                let _ = Command::new("ip").args(["netns", "delete", ns]).output();
            }
        }
    }
}

/// Deletes namespaces and bpffs pin directories named `pgt-<pid>-...` whose process is gone:
/// the leftovers of a test run that was killed before its Drops ran. Once per process.
pub fn reap_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (dir, is_netns) in [("/run/netns", true), ("/sys/fs/bpf", false)] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(pid) = stale_owner(&name) else {
                    continue;
                };
                if Path::new("/proc").join(pid.to_string()).exists() {
                    continue;
                }
                if is_netns {
                    let _ = Command::new("ip").args(["netns", "delete", &name]).output();
                } else {
                    crate::agent::remove_pins(&entry.path());
                }
            }
        }
    });
}

/// The pid in a name made by [`unique_name`].
fn stale_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("pgt-")?;
    let pid = rest.split('-').next()?.parse().ok()?;
    (pid != std::process::id()).then_some(pid)
}

/// `ip -n NS ARGS...`
fn ip(ns: &str, args: &[&str]) {
    run_ok(Command::new("ip").args(["-n", ns]).args(args));
}

/// `ip netns exec NS sysctl -qw SETTINGS...`
fn sysctl(ns: &str, settings: &[&str]) {
    run_ok(
        Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-qw"])
            .args(settings),
    );
}

/// One IPv4 and one IPv6 address (without duplicate address detection) on `dev`.
fn addr(ns: &str, dev: &str, v4: &str, v6: &str) {
    ip(ns, &["addr", "add", v4, "dev", dev]);
    ip(ns, &["-6", "addr", "add", v6, "dev", dev, "nodad"]);
}

/// Runs `f` on a fresh thread that has entered network namespace `ns` (`/run/netns/NS`).
/// Sockets created in `f` belong to that namespace for their whole life, whichever thread
/// uses them later. A panic in `f` is propagated.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    portgate_bpf_sys::netns::run_in(&Sandbox::netns_path(ns), f)
        .unwrap_or_else(|e| panic!("enter network namespace {ns}: {e}"))
}

/// A command that runs `program` inside network namespace `ns`. It enters the namespace with
/// `setns` just before `exec`, and nothing else: unlike `ip netns exec` it keeps the mount
/// namespace, so /sys/fs/bpf stays visible.
pub fn netns_command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let handle = File::open(Sandbox::netns_path(ns))
        .unwrap_or_else(|e| panic!("open network namespace {ns}: {e}"));
    let mut command = Command::new(program);
    portgate_bpf_sys::netns::command_in(&mut command, handle);
    command
}
