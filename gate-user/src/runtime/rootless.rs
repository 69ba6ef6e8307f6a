//! Rootless Podman: each user's containers, read with that user's own `podman ps`.
//!
//! A rootless container publishes through a listening socket of the host, owned by the
//! user's relay (`rootlessport` with slirp4netns, `pasta` with Podman 5, or `slirp4netns`'s
//! own port handler). The gate's socket lookup judges every new connection to a host port
//! listed in its host-port map, so following these containers is enough to gate them: their
//! published ports become host-port entries like any other engine's.
//!
//! The users are found in /proc (processes of a uid other than 0 named as Podman's helpers).
//! For each, the watcher runs `podman ps --format json` as that user (its uid, gid, HOME and
//! XDG_RUNTIME_DIR) when the user's helper processes or their listening sockets change, and
//! every [`RESYNC_EVERY`] besides. A published port is taken only while a relay of that user
//! listens on it: what a user's Podman says cannot make the gate close a port of another
//! program. A failure to read one user's Podman is a warning; that user's last snapshot
//! stays in force and `status`/`doctor` say why.
//!
//! Each container gets a stand-in address, [`stand_in`], in a fixed ULA prefix: only a key
//! for the allow map, so that rules resolve against it as against a container address. No
//! traffic is ever sent to it; the ports are judged at the host's socket.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Container, Engine, RuntimeEvent, Snapshot, label_origin};
use crate::{policy::ALLOW_LABEL, procfs};

/// Rootless Podman's relays: from a listening socket of the host into the user's container.
pub const RELAYS: [&str; 6] = [
    "rootlessport",
    "pasta",
    "pasta.avx2",
    "passt",
    "passt.avx2",
    "slirp4netns",
];
/// Podman's container monitor: a user running it (or a relay) is followed.
const CONMON: &str = "conmon";
/// Rootless Docker's relay: found, reported, not followed.
pub const ROOTLESS_DOCKER: &str = "rootlesskit";
/// How often /proc is looked at.
const POLL: Duration = Duration::from_secs(1);
/// A user's Podman is read again after this long even when nothing changed.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// How soon a user's Podman is read again while a relay listens on a port that no known
/// container publishes.
const UNACCOUNTED_EVERY: Duration = Duration::from_secs(1);
/// How soon a user's Podman is read again after a failed read.
const RETRY_EVERY: Duration = Duration::from_secs(5);
/// How long one `podman ps` may take.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(20);
/// The stand-in addresses' prefix: fd70:6f72:7467:6174::/64 ("portgate" in ASCII).
pub const STAND_IN_PREFIX: [u16; 4] = [0xfd70, 0x6f72, 0x7467, 0x6174];

/// How to run each user's Podman.
#[derive(Clone, Debug)]
pub struct RootlessOptions {
    /// The `podman` program (as found in the root directory, if any).
    pub podman: PathBuf,
    /// A root directory to run it in (its own mount namespace, pivoted into the directory),
    /// for a Podman installed in one; the users are then those of its /etc/passwd.
    pub root: Option<PathBuf>,
}

/// What the watcher knows about one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootlessUser {
    pub user: String,
    pub uid: u32,
    /// The helpers seen (program names), sorted.
    pub helpers: Vec<String>,
    /// The ports the user's relays listen on: (protocol, port).
    pub listening: BTreeSet<(String, u16)>,
    pub containers: usize,
    /// Why the user's containers are not (or no longer) known, if they are not.
    pub error: Option<String>,
    /// Whether the agent follows it (false: rootless Docker).
    pub followed: bool,
}

/// One pass over /proc: each user's helper processes and relay sockets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Seen {
    /// (pid, program) of the helpers.
    helpers: BTreeSet<(u32, String)>,
    listening: BTreeSet<(String, u16)>,
}

fn scan() -> BTreeMap<u32, Seen> {
    let sockets = procfs::listening_sockets();
    let mut users: BTreeMap<u32, Seen> = BTreeMap::new();
    for dir in procfs::process_dirs() {
        let Some(comm) = procfs::comm(&dir) else {
            continue;
        };
        let helper = comm == CONMON || RELAYS.contains(&comm.as_str()) || comm == ROOTLESS_DOCKER;
        if !helper {
            continue;
        }
        let Some(uid) = procfs::process_uid(&dir).filter(|uid| *uid != 0) else {
            continue; // rootful Podman's helpers: the engine's API says what they serve
        };
        let pid = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let seen = users.entry(uid).or_default();
        if RELAYS.contains(&comm.as_str()) || comm == ROOTLESS_DOCKER {
            for inode in procfs::socket_inodes(&dir) {
                if let Some((proto, port)) = sockets.get(&inode) {
                    seen.listening.insert(((*proto).to_owned(), *port));
                }
            }
        }
        seen.helpers.insert((pid, comm));
    }
    users
}

/// A user's state in the watcher.
#[derive(Debug)]
struct Followed {
    seen: Seen,
    read_at: Option<Instant>,
    containers: Vec<Container>,
    error: Option<String>,
    /// Reads in a row that left a relay's port unaccounted for.
    unaccounted_reads: u32,
}

/// Follows every user's rootless Podman forever, sending a snapshot of all of them after
/// each change. The first snapshot goes out after the first pass (each user's Podman read
/// once), so that the agent does not wait for the rootless engine longer than that.
pub async fn watch(options: RootlessOptions, events: mpsc::Sender<RuntimeEvent>) {
    let mut users: BTreeMap<u32, Followed> = BTreeMap::new();
    let mut image_labels: BTreeMap<(u32, String), Option<BTreeMap<String, String>>> =
        BTreeMap::new();
    let mut first = true;
    loop {
        let scanned = tokio::task::spawn_blocking(scan).await.unwrap_or_default();
        let mut changed = first;
        users.retain(|uid, _| {
            let keep = scanned.contains_key(uid);
            changed |= !keep;
            keep
        });
        for (uid, seen) in scanned {
            let docker = seen.helpers.iter().any(|(_, c)| c == ROOTLESS_DOCKER);
            let state = users.entry(uid).or_insert_with(|| Followed {
                seen: Seen::default(),
                read_at: None,
                containers: Vec::new(),
                error: None,
                unaccounted_reads: 0,
            });
            // A relay listening on a port no known container publishes: the container is
            // still starting (pasta listens before Podman calls it running), so the port is
            // not gated yet; read again soon rather than at the next resync.
            let unaccounted = state.unaccounted(&seen);
            if !unaccounted || state.seen != seen {
                state.unaccounted_reads = 0;
            }
            let every = if unaccounted {
                // Backing off: a port that stays unaccounted (another Podman of the same
                // user, say) must not cost a `podman ps` every second.
                (UNACCOUNTED_EVERY * 2u32.pow(state.unaccounted_reads.min(5))).min(RESYNC_EVERY)
            } else if state.error.is_some() {
                RETRY_EVERY
            } else {
                RESYNC_EVERY
            };
            let due = state.read_at.is_none_or(|at| at.elapsed() >= every);
            let podman = seen.helpers.iter().any(|(_, c)| c != ROOTLESS_DOCKER);
            if state.seen == seen && !due {
                continue;
            }
            changed |= state.seen != seen;
            state.seen = seen;
            state.read_at = Some(Instant::now());
            state.unaccounted_reads += u32::from(unaccounted);
            if !podman && docker {
                continue; // rootless Docker only: reported, not followed
            }
            match read_user(&options, uid, &state.seen, &mut image_labels).await {
                Ok(containers) => {
                    changed |= state.containers != containers || state.error.is_some();
                    state.containers = containers;
                    state.error = None;
                }
                Err(err) => {
                    let error = format!("{err:#}");
                    if state.error.as_ref() != Some(&error) {
                        warn!(
                            uid,
                            "cannot read the rootless Podman of user {uid}; keeping its last containers: {error}"
                        );
                        changed = true;
                    }
                    state.error = Some(error);
                }
            }
        }
        image_labels.retain(|(uid, _), _| users.contains_key(uid));
        if changed {
            let snapshot = snapshot_of(&options, &users);
            if first {
                info!(
                    users = snapshot.rootless.len(),
                    containers = snapshot.containers.len(),
                    "rootless Podman followed"
                );
            }
            let event = RuntimeEvent::Synced {
                engine: Engine::RootlessPodman,
                snapshot,
                after_event: !first,
            };
            if events.send(event).await.is_err() {
                return; // the agent is shutting down
            }
            first = false;
        }
        tokio::time::sleep(POLL).await;
    }
}

impl Followed {
    /// Whether a relay of the user listens on a port that none of its known containers
    /// publishes.
    fn unaccounted(&self, seen: &Seen) -> bool {
        seen.listening.iter().any(|(proto, port)| {
            !self.containers.iter().any(|c| {
                c.published
                    .iter()
                    .any(|p| p.host_port == *port && p.protocol.to_string() == *proto)
            })
        })
    }
}

fn snapshot_of(options: &RootlessOptions, users: &BTreeMap<u32, Followed>) -> Snapshot {
    let mut containers: Vec<Container> = users
        .values()
        .flat_map(|u| u.containers.iter().cloned())
        .collect();
    containers.sort_by(|a, b| a.name.cmp(&b.name));
    let rootless = users
        .iter()
        .map(|(uid, state)| {
            let helpers: BTreeSet<String> =
                state.seen.helpers.iter().map(|(_, c)| c.clone()).collect();
            let followed = helpers.iter().any(|c| c != ROOTLESS_DOCKER);
            RootlessUser {
                user: user_of(options, *uid).map_or_else(|| uid.to_string(), |u| u.name),
                uid: *uid,
                helpers: helpers.into_iter().collect(),
                listening: state.seen.listening.clone(),
                containers: state.containers.len(),
                error: state.error.clone(),
                followed,
            }
        })
        .collect();
    Snapshot {
        containers,
        rootless,
        ..Snapshot::default()
    }
}

/// Why a user's Podman could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RootlessError {
    #[error("user {0} is not in /etc/passwd")]
    NoSuchUser(u32),
    #[error("running {program} as user {user}: {source}")]
    Spawn {
        program: String,
        user: String,
        source: std::io::Error,
    },
    #[error("`podman ps` as user {0} took longer than {PODMAN_TIMEOUT:?}")]
    Timeout(String),
    #[error("`podman ps` as user {user} failed ({status}): {stderr}")]
    Failed {
        user: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("`podman ps` as user {user} printed what is not its JSON: {source}")]
    Parse {
        user: String,
        source: serde_json::Error,
    },
}

/// One user's running containers, with their published ports as far as a relay of the user
/// listens on them.
async fn read_user(
    options: &RootlessOptions,
    uid: u32,
    seen: &Seen,
    image_labels: &mut BTreeMap<(u32, String), Option<BTreeMap<String, String>>>,
) -> Result<Vec<Container>, RootlessError> {
    let user = user_of(options, uid).ok_or(RootlessError::NoSuchUser(uid))?;
    let out = run_as(options, &user, &["ps", "--format", "json"]).await?;
    let entries: Vec<PsEntry> = parse_ps(&out).map_err(|source| RootlessError::Parse {
        user: user.name.clone(),
        source,
    })?;
    let mut containers = Vec::new();
    for entry in entries {
        let Some(mut container) = entry.into_container(&user.name) else {
            continue;
        };
        container.published.retain(|p| {
            seen.listening
                .contains(&(p.protocol.to_string(), p.host_port))
        });
        if let Some(image) = container
            .image
            .clone()
            .filter(|_| container.labels.contains_key(ALLOW_LABEL))
        {
            let key = (uid, image.clone());
            if !image_labels.contains_key(&key) {
                let labels = match run_as(options, &user, &["image", "inspect", &image]).await {
                    Ok(text) => parse_image_labels(&text),
                    Err(err) => {
                        warn!(
                            user = user.name,
                            image, "cannot inspect image; its labels' origin is unknown: {err}"
                        );
                        None
                    }
                };
                image_labels.insert(key.clone(), labels);
            }
            container.allow_label_origin = image_labels
                .get(&key)
                .and_then(Option::as_ref)
                .and_then(|labels| {
                    let labels = labels.clone().into_iter().collect();
                    label_origin(&container.labels, &labels, ALLOW_LABEL)
                });
        }
        containers.push(container);
    }
    containers.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(containers)
}

/// The user with `uid`, from the passwd file of the root Podman runs in.
fn user_of(options: &RootlessOptions, uid: u32) -> Option<procfs::User> {
    match &options.root {
        Some(root) => procfs::user_in(&std::fs::read_to_string(root.join("etc/passwd")).ok()?, uid),
        None => procfs::user(uid),
    }
}

/// Runs the Podman program as `user` (in the root directory, if any): its stdout.
async fn run_as(
    options: &RootlessOptions,
    user: &procfs::User,
    args: &[&str],
) -> Result<String, RootlessError> {
    let mut command = tokio::process::Command::new(&options.podman);
    command
        .args(args)
        .env_clear()
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("XDG_RUNTIME_DIR", format!("/run/user/{}", user.uid))
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("PODMAN_IGNORE_CGROUPSV1_WARNING", "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let (uid, gid, home) = (user.uid, user.gid, user.home.clone());
    let root = options.root.clone();
    // SAFETY: the closure runs in the child between fork and exec, and only makes
    // async-signal-safe system calls on data prepared before the fork.
    unsafe {
        let root = root.map(|r| std::ffi::CString::new(r.into_os_string().into_encoded_bytes()));
        let home = std::ffi::CString::new(home.into_os_string().into_encoded_bytes());
        command.pre_exec(move || drop_to(root.as_ref(), home.as_ref().ok(), uid, gid));
    }
    let spawn_error = |source| RootlessError::Spawn {
        program: options.podman.display().to_string(),
        user: user.name.clone(),
        source,
    };
    let child = command.output();
    let output = tokio::time::timeout(PODMAN_TIMEOUT, child)
        .await
        .map_err(|_| RootlessError::Timeout(user.name.clone()))?
        .map_err(spawn_error)?;
    if !output.status.success() {
        return Err(RootlessError::Failed {
            user: user.name.clone(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// In the child: into the root directory, then the user's ids, then its home.
///
/// The root directory is entered with `pivot_root` in a mount namespace of the child's own,
/// not `chroot`: the kernel refuses user namespaces (which rootless Podman creates and
/// joins) to a process whose root is not its mount namespace's root.
fn drop_to(
    root: Option<&Result<std::ffi::CString, std::ffi::NulError>>,
    home: Option<&std::ffi::CString>,
    uid: u32,
    gid: u32,
) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls on NUL-terminated strings that outlive them.
    unsafe {
        if let Some(root) = root {
            let root = root
                .as_ref()
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
            let none = std::ptr::null::<libc::c_char>();
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                root.as_ptr(),
                root.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            check(libc::chdir(root.as_ptr()))?;
            // pivot_root(".", "."): the old root ends up on top of the new one, and goes.
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            )?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))?;
        }
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setgid(gid))?;
        check(libc::setuid(uid))?;
        if let Some(home) = home {
            let _ = libc::chdir(home.as_ptr());
        }
    }
    Ok(())
}

mod ps;
use self::ps::parse_image_labels;
pub use self::ps::{PsEntry, is_stand_in, parse_ps, stand_in};

#[cfg(test)]
mod tests;
