//! The Debian sid root the engine tests' `sid` set runs Docker 28 and Podman 5 from
//! (tests/src/engines/sets.rs): built once by debootstrap, cached outside the checkout.
//!
//! An interrupted build never looks complete: debootstrap fills `<root>.partial-<pid>`, the
//! marker file [`COMPLETE_MARKER`] is written last, and only then is the directory renamed
//! to the root's path. A root without the marker (or without the engines' binaries) is built
//! again.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use portgate_cmd as proc;

/// Where the root lives unless `PORTGATE_SID_ROOT` says otherwise (the tests read the same
/// variable).
pub const DEFAULT_ROOT: &str = "/var/cache/portgate/sid-root";
/// Written into the root last, before the rename (the tests check for it too).
pub const COMPLETE_MARKER: &str = "etc/portgate-sid-root.complete";
/// What the root holds: the engines of Debian's unstable suite and what they run.
pub const PACKAGES: &[&str] = &[
    "docker.io",
    "docker-cli",
    "podman",
    "netavark",
    "aardvark-dns",
    "iptables",
    "nftables",
    "containerd",
    "runc",
    "busybox-static",
    "iproute2",
    "ca-certificates",
    // Rootless Podman 5: newuidmap/newgidmap and pasta (its default network), slirp4netns.
    "uidmap",
    "passt",
    "slirp4netns",
];
/// The binaries the tests run from the root.
const PROGRAMS: &[&str] = &[
    "usr/sbin/dockerd",
    "usr/bin/docker",
    "usr/bin/containerd",
    "usr/bin/podman",
    // Rootless Podman: a root cached before these were in PACKAGES is rebuilt.
    "usr/bin/newuidmap",
    "usr/bin/pasta",
    "usr/bin/slirp4netns",
];
const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
/// debootstrap of sid takes a few minutes here; a hung mirror must not hang setup forever.
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// The root's path: `PORTGATE_SID_ROOT`, else [`DEFAULT_ROOT`].
pub fn path() -> PathBuf {
    std::env::var_os("PORTGATE_SID_ROOT")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_ROOT), PathBuf::from)
}

/// Why the root at `root` is not usable, if it is not.
pub fn incomplete(root: &Path) -> Option<String> {
    if !root.exists() {
        return Some("missing".to_owned());
    }
    if !root.join(COMPLETE_MARKER).is_file() {
        return Some(format!("incomplete (no {COMPLETE_MARKER})"));
    }
    PROGRAMS
        .iter()
        .find(|p| !root.join(p).is_file())
        .map(|p| format!("incomplete (no /{p})"))
}

/// The versions of the engines in a complete root, for the setup report.
pub fn versions(root: &Path) -> String {
    let mut cmd = Command::new("chroot");
    cmd.arg(root)
        .args(["dpkg-query", "-W", "-f=${Package} ${Version}, "])
        .args(["docker.io", "podman", "netavark", "containerd"]);
    proc::capture(&mut cmd, Duration::from_secs(60))
        .ok()
        .filter(|out| out.status.success())
        .map(|out| out.stdout.trim().trim_end_matches(',').to_owned())
        .unwrap_or_else(|| "versions unknown".to_owned())
}

/// The Debian mirror the host's apt uses (deb822 `URIs:` or a one-line `deb` entry of the
/// main archive), else deb.debian.org.
fn mirror() -> String {
    let mut texts = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            texts.extend(std::fs::read_to_string(entry.path()));
        }
    }
    texts.extend(std::fs::read_to_string("/etc/apt/sources.list"));
    texts
        .iter()
        .flat_map(|t| t.lines())
        .flat_map(|line| {
            let line = line.trim();
            let words: Vec<&str> = if let Some(uris) = line.strip_prefix("URIs:") {
                uris.split_whitespace().collect()
            } else if line.starts_with("deb ") {
                line.split_whitespace()
                    .filter(|w| w.starts_with("http"))
                    .take(1)
                    .collect()
            } else {
                Vec::new()
            };
            words.into_iter().map(str::to_owned).collect::<Vec<_>>()
        })
        .find(|uri| uri.trim_end_matches('/').ends_with("/debian"))
        .unwrap_or_else(|| FALLBACK_MIRROR.to_owned())
}

/// Whether anything is mounted at or under `path` (a root the tests are using).
fn has_mounts(path: &Path) -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    Ok(mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| Path::new(p).starts_with(path)))
}

/// Removes a directory tree that is not (and never was) a mounted root, staying on its file
/// system.
fn remove_tree(path: &Path) -> Result<()> {
    if has_mounts(path)? {
        bail!(
            "{} has file systems mounted under it (the sid engine set's daemons may be running): \
             stop them and unmount it first",
            path.display()
        );
    }
    proc::run(
        Command::new("rm")
            .arg("-rf")
            .arg("--one-file-system")
            .arg(path),
    )
}

/// Builds the root at `root` (which is missing or incomplete), printing debootstrap's
/// progress.
pub fn build(root: &Path) -> Result<()> {
    let parent = root
        .parent()
        .with_context(|| format!("{} has no parent directory", root.display()))?;
    let name = root
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", root.display()))?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    if root.exists() && has_mounts(root)? {
        bail!(
            "{} is incomplete but has file systems mounted under it (the sid engine set's \
             daemons may be running): stop them and unmount it first",
            root.display()
        );
    }
    // Leftovers of interrupted builds (whose process is gone) take room and nothing else.
    for entry in std::fs::read_dir(parent)
        .with_context(|| format!("cannot list {}", parent.display()))?
        .flatten()
    {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&format!("{name}.partial-")) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|pid| Path::new("/proc").join(pid.to_string()).exists());
        if !alive {
            println!("removing an interrupted build: {}", entry.path().display());
            remove_tree(&entry.path())?;
        }
    }
    let partial = parent.join(format!("{name}.partial-{}", std::process::id()));
    let mirror = mirror();
    println!(
        "building the Debian sid root for the engine tests into {} (debootstrap from {mirror}; a few minutes, about 800 MB)",
        partial.display()
    );
    let mut cmd = Command::new("debootstrap");
    cmd.args([
        "--variant=minbase",
        &format!("--include={}", PACKAGES.join(",")),
    ])
    .args(["sid"])
    .arg(&partial)
    .arg(&mirror);
    println!("$ {}", proc::display(&cmd));
    // debootstrap prints one line per step (I: Retrieving..., I: Unpacking...): its progress.
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{}`", proc::display(&cmd)))?;
    wait(&cmd, child)?;
    let missing: Vec<&str> = PROGRAMS
        .iter()
        .copied()
        .filter(|p| !partial.join(p).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "debootstrap finished but {} lacks {}",
            partial.display(),
            missing.join(", ")
        );
    }
    let versions = versions(&partial);
    std::fs::write(
        partial.join(COMPLETE_MARKER),
        format!("built by `cargo xtask setup` from {mirror}: {versions}\n"),
    )
    .with_context(|| format!("cannot write {}", partial.join(COMPLETE_MARKER).display()))?;
    if root.exists() {
        let stale = parent.join(format!("{name}.stale-{}", std::process::id()));
        std::fs::rename(root, &stale).with_context(|| {
            format!(
                "cannot move the incomplete {} aside to {}",
                root.display(),
                stale.display()
            )
        })?;
        remove_tree(&stale)?;
    }
    std::fs::rename(&partial, root)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), root.display()))?;
    println!("built {}: {versions}", root.display());
    Ok(())
}

fn wait(cmd: &Command, mut child: std::process::Child) -> Result<()> {
    let deadline = std::time::Instant::now() + DEBOOTSTRAP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("waiting for debootstrap")? {
            return proc::check_status(cmd, status);
        }
        if std::time::Instant::now() > deadline {
            // Killing an exited-but-unreaped child is harmless.
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{}` did not finish within {} min",
                proc::display(cmd),
                DEBOOTSTRAP_TIMEOUT.as_secs() / 60
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
