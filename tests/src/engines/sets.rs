//! Engine sets: which Docker and Podman the engine tests run against.
//!
//! | set | Docker | Podman | firewall of Podman's bridge |
//! | --- | --- | --- | --- |
//! | `debian12` | docker.io 20.10 from the host | podman 4.3, netavark 1.4 | iptables (NETAVARK_FORWARD) |
//! | `cni` | docker.io 20.10 from the host | podman 4.3, CNI plugins | iptables (CNI-FORWARD, CNI-ADMIN), bridge `cni-podman0` |
//! | `sid` | docker.io 28.5 from a Debian sid root | podman 5.8, netavark 1.17 | nftables (`table inet netavark`) |
//!
//! `PORTGATE_ENGINE_SET` picks one per test process (default `debian12`); `cargo xtask test`
//! runs the engine tests once per set. The sets share docker0 and podman0's subnet, so one
//! process starts its set's daemons and first stops the daemons the harness started for any
//! other set (recognised by the log file their output goes to, which names the set).
//!
//! The sid set runs its daemons from a chroot (`PORTGATE_SID_ROOT`, else the root `cargo
//! xtask setup` builds at [`SID_ROOT`]) that shares the host's network namespace: its bridges,
//! netfilter rules and sockets are the host's, so the agent on the host gates them and talks
//! to `<root>/run/docker.sock` and `<root>/run/podman/podman.sock`.

use super::*;

/// Where `cargo xtask setup` keeps the Debian sid root (outside any checkout, built once).
pub const SID_ROOT: &str = "/var/cache/portgate/sid-root";
/// The file `cargo xtask setup` writes last into a complete root, before renaming it into
/// place (xtask/src/sid_root.rs).
pub const SID_ROOT_COMPLETE: &str = "etc/portgate-sid-root.complete";
/// Where the harness's Podman configuration files for the host's podman live.
const CONF_DIR: &str = "/run/portgate-tests";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineSet {
    /// Debian 12's docker.io 20.10 and podman 4.3 with netavark 1.4 (iptables).
    Debian12,
    /// Debian 12's docker.io 20.10 and podman 4.3 on the CNI backend (`cni-podman0`).
    Cni,
    /// Debian sid's docker.io 28.5 and podman 5.8 with netavark 1.17 (nftables), from a chroot.
    Sid,
}

pub const ALL_SETS: [EngineSet; 3] = [EngineSet::Debian12, EngineSet::Cni, EngineSet::Sid];

impl EngineSet {
    pub fn name(self) -> &'static str {
        match self {
            EngineSet::Debian12 => "debian12",
            EngineSet::Cni => "cni",
            EngineSet::Sid => "sid",
        }
    }

    /// The set `PORTGATE_ENGINE_SET` names (default `debian12`); Err for an unknown name.
    pub fn from_env() -> std::result::Result<Self, String> {
        let value = std::env::var("PORTGATE_ENGINE_SET").unwrap_or_default();
        let value = value.trim();
        if value.is_empty() {
            return Ok(EngineSet::Debian12);
        }
        ALL_SETS
            .into_iter()
            .find(|set| set.name() == value)
            .ok_or_else(|| {
                format!("PORTGATE_ENGINE_SET={value:?} is not an engine set (debian12, cni, sid)")
            })
    }

    /// The chroot the set's daemons and CLIs run in (sid only).
    pub fn root(self) -> Option<PathBuf> {
        (self == EngineSet::Sid).then(|| {
            std::env::var_os("PORTGATE_SID_ROOT")
                .map_or_else(|| PathBuf::from(SID_ROOT), PathBuf::from)
        })
    }

    /// The log files of this set's daemons; a daemon whose stdout is one of them was started
    /// by the harness for this set. Debian 12's and the CNI set share the host's containerd
    /// and dockerd.
    pub fn logs(self) -> DaemonLogs {
        match self {
            EngineSet::Debian12 | EngineSet::Cni => DaemonLogs {
                containerd: CONTAINERD_LOG.into(),
                dockerd: DOCKERD_LOG.into(),
                podman: if self == EngineSet::Cni {
                    "/tmp/portgate-tests-cni-podman.log".into()
                } else {
                    PODMAN_LOG.into()
                },
            },
            EngineSet::Sid => DaemonLogs {
                containerd: "/tmp/portgate-tests-sid-containerd.log".into(),
                dockerd: "/tmp/portgate-tests-sid-dockerd.log".into(),
                podman: "/tmp/portgate-tests-sid-podman.log".into(),
            },
        }
    }

    /// Podman's bridge for its default network.
    pub fn podman_bridge(self) -> &'static str {
        match self {
            EngineSet::Cni => "cni-podman0",
            EngineSet::Debian12 | EngineSet::Sid => "podman0",
        }
    }

    /// The configuration file the host's podman is pointed at (`CONTAINERS_CONF`), with the
    /// limits this machine can grant and the set's network backend. None for sid, whose
    /// podman reads the root's own /etc/containers/containers.conf.
    pub(super) fn host_containers_conf(self) -> Option<PathBuf> {
        match self {
            EngineSet::Sid => None,
            _ => Some(Path::new(CONF_DIR).join(format!("containers-{}.conf", self.name()))),
        }
    }

    /// The text of the set's containers.conf.
    pub(super) fn containers_conf_text(self) -> String {
        let mut text = String::from(
            "# Written by portgate's engine tests (tests/src/engines/sets.rs).\n\
             [containers]\n\
             default_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n",
        );
        match self {
            EngineSet::Debian12 => text.push_str("\n[network]\nnetwork_backend = \"netavark\"\n"),
            EngineSet::Cni => text.push_str("\n[network]\nnetwork_backend = \"cni\"\n"),
            // Podman 5's default runtime (crun) refuses this machine's hybrid cgroups.
            EngineSet::Sid => text.push_str(
                "\n[engine]\nruntime = \"runc\"\n\n[network]\nnetwork_backend = \"netavark\"\n",
            ),
        }
        text
    }
}

/// The log files a set's daemons write to.
pub struct DaemonLogs {
    pub containerd: PathBuf,
    pub dockerd: PathBuf,
    pub podman: PathBuf,
}

impl DaemonLogs {
    fn all(&self) -> [&Path; 3] {
        [&self.containerd, &self.dockerd, &self.podman]
    }
}

/// The pids of processes whose stdout is `log` (daemons the harness started).
pub(super) fn pids_logging_to(log: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !is_zombie(*pid))
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/fd/1")).is_ok_and(|p| p == log))
        .collect()
}

/// SIGTERM to `pid`, SIGKILL after `patience`; returns once it is gone (or a zombie).
pub(super) fn terminate(pid: u32, patience: Duration) {
    // SAFETY: kill has no memory-safety preconditions; pid is a daemon the harness started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    if wait_until(patience, || !pid_alive(pid) || is_zombie(pid)).is_err() {
        // SAFETY: as above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let _ = wait_until(Duration::from_secs(10), || {
            !pid_alive(pid) || is_zombie(pid)
        });
    }
}

/// Stops the daemons the harness started for every set other than `keep` (Podman's service
/// first, containerd last), then removes what they leave behind that would change what
/// `keep`'s engines see: netavark's nftables table, the CNI bridge, the sid root's mounts.
pub(super) fn stop_other_sets(keep: EngineSet) -> Result<()> {
    let keep_logs = keep.logs();
    for set in ALL_SETS.into_iter().filter(|s| *s != keep) {
        let logs = set.logs();
        let mut stopped = false;
        for log in [&logs.podman, &logs.dockerd, &logs.containerd] {
            if keep_logs.all().contains(&log.as_path()) {
                continue; // shared with the set we keep
            }
            for pid in pids_logging_to(log) {
                eprintln!(
                    "engine set {}: stopping pid {pid} (started for set {}, log {})",
                    keep.name(),
                    set.name(),
                    log.display()
                );
                // dockerd stops its containers first, which can take a while.
                terminate(pid, Duration::from_secs(40));
                stopped = true;
            }
        }
        if !stopped {
            continue;
        }
        match set {
            EngineSet::Sid => {
                // netavark's nftables table outlives the engine; its `ct state invalid drop`
                // would change what the other sets' tests see.
                let _ = Command::new("nft")
                    .args(["delete", "table", "inet", "netavark"])
                    .output();
                if let Some(root) = set.root() {
                    unmount_root(&root);
                }
            }
            EngineSet::Cni => {
                // The backends share no state: netavark would not reuse CNI's bridge.
                let _ = Command::new("ip")
                    .args(["link", "delete", "cni-podman0"])
                    .output();
            }
            EngineSet::Debian12 => {}
        }
    }
    Ok(())
}

/// Whether `path` is a mount point (listed in /proc/self/mountinfo).
pub(super) fn is_mount_point(path: &Path) -> bool {
    mount_points().iter().any(|p| p == path)
}

fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .collect()
}

/// Mounts what the sid root's daemons need: the root bound onto itself (dockerd wants its
/// root to be a mount point), /proc, /sys and /dev (recursive, as slaves, so that unmounting
/// them in the root never unmounts the host's), a tmpfs /run. Idempotent.
pub(super) fn mount_root(root: &Path) -> Result<()> {
    let mount = |args: &[&str], target: &Path| -> Result<()> {
        let output = Command::new("mount")
            .args(args)
            .arg(target)
            .output()
            .with_context(|| format!("run mount {args:?} {}", target.display()))?;
        if !output.status.success() {
            bail!(
                "mount {args:?} {}: {}",
                target.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    };
    let root_text = root.to_string_lossy().into_owned();
    if !is_mount_point(root) {
        mount(&["--bind", &root_text], root)?;
        mount(&["--make-private"], root)?;
    }
    let proc_dir = root.join("proc");
    if !is_mount_point(&proc_dir) {
        mount(&["-t", "proc", "proc"], &proc_dir)?;
    }
    for dir in ["sys", "dev"] {
        let target = root.join(dir);
        if !is_mount_point(&target) {
            mount(&["--rbind", &format!("/{dir}")], &target)?;
            mount(&["--make-rslave"], &target)?;
        }
    }
    let run = root.join("run");
    if !is_mount_point(&run) {
        mount(&["-t", "tmpfs", "tmpfs"], &run)?;
    }
    Ok(())
}

/// Unmounts everything under the sid root and the root itself (slaves: the host keeps its own).
pub(super) fn unmount_root(root: &Path) {
    let mut under: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(root))
        .collect();
    // Deepest first.
    under.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    under.dedup();
    for point in under {
        let _ = Command::new("umount").arg("-l").arg(&point).output();
    }
}

/// Why the sid root cannot be used (missing, or not completely built), if it cannot.
pub(super) fn check_sid_root(root: &Path) -> std::result::Result<(), String> {
    if !root.join(SID_ROOT_COMPLETE).is_file() {
        return Err(format!(
            "the Debian sid root {} is missing or incomplete (`cargo xtask setup` builds it; \
             PORTGATE_SID_ROOT names another)",
            root.display()
        ));
    }
    for program in [
        "usr/sbin/dockerd",
        "usr/bin/containerd",
        "usr/bin/podman",
        "usr/bin/docker",
    ] {
        if !root.join(program).is_file() {
            return Err(format!(
                "the Debian sid root {} has no /{program} (rebuild it: remove it and run \
                 `cargo xtask setup`)",
                root.display()
            ));
        }
    }
    Ok(())
}

/// The root's configuration for podman (runtime runc, the machine's limits), written when it
/// differs.
pub(super) fn write_root_containers_conf(root: &Path) -> Result<()> {
    let path = root.join("etc/containers/containers.conf");
    let text = EngineSet::Sid.containers_conf_text();
    if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    std::fs::create_dir_all(root.join("etc/containers"))?;
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
}

/// The host podman's configuration for `set`, written when it differs; returns its path.
pub(super) fn write_host_containers_conf(set: EngineSet) -> Result<Option<PathBuf>> {
    let Some(path) = set.host_containers_conf() else {
        return Ok(None);
    };
    let text = set.containers_conf_text();
    if !std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
        std::fs::create_dir_all(CONF_DIR).with_context(|| format!("mkdir {CONF_DIR}"))?;
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(Some(path))
}
