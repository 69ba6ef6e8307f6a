//! `cargo xtask setup [--check]`: what building and testing portgate need on Debian 12.
//!
//! Steps, each reported as "ok: ..." (present) or "installing ..." (changed):
//! 1. apt packages: Debian's Rust with its prebuilt BPF `core`, LLVM 22 for bpf-linker, the
//!    network tools the tests and the demo use, and the container engines the engine tests run;
//! 2. bpf-linker 0.13.0, built against Debian's LLVM 22;
//! 3. `rustup toolchain link debian /usr`, so gate-user's build.rs can select Debian's compiler;
//! 4. (report only) which toolchain gate-user's build.rs will use for the eBPF object;
//! 5. bpffs mounted at /sys/fs/bpf;
//! 6. the Debian sid root the engine tests' `sid` set runs Docker 28 and Podman 5 from
//!    (debootstrap, cached at /var/cache/portgate/sid-root; see sid_root.rs).
use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};

use portgate_cmd as proc;

use crate::sid_root;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Report only; fail if anything is missing.
    Check,
    /// Install what is missing (root only).
    Install,
}

/// The apt packages `cargo build` needs.
const BUILD_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];

/// The apt packages the tests, the demo and the bench use, besides the build's.
const TOOL_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    "tcpdump",
    "iperf3",
    "socat",
    "netcat-openbsd",
    "iputils-ping",
    "wrk",
    // The container engines the end-to-end engine tests start themselves (tests/src/engines.rs:
    // dockerd, containerd, podman, and a static busybox for the local image). Installed, never
    // started or enabled here.
    "docker.io",
    "containerd",
    "runc",
    "tini",
    "podman",
    "conmon",
    "golang-github-containers-common",
    // Podman's netavark backend (bridge podman0); without it, and with
    // --no-install-recommends, Podman falls back to CNI and a cni-podman0 bridge.
    "netavark",
    "aardvark-dns",
    "busybox-static",
    // The `cni` engine set: Podman 4.3 on its CNI backend (bridge cni-podman0).
    "containernetworking-plugins",
    // Rootless Podman (the rootless engine tests): newuidmap/newgidmap, and the two network
    // helpers that publish a rootless container's ports from the host (Podman 4's
    // slirp4netns with rootlessport, Podman 5's pasta).
    "uidmap",
    "slirp4netns",
    "passt",
    // Builds the Debian sid root of the `sid` engine set (Docker 28, Podman 5).
    "debootstrap",
    // A real Prometheus server and promtool, for the metrics tests.
    "prometheus",
    // systemd-analyze, which verifies the package's unit (no systemd PID 1 needed), and
    // dpkg's helpers that the package's maintainer scripts call.
    "systemd",
    "init-system-helpers",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// `cargo xtask deb` builds the Debian package with it.
pub const CARGO_DEB_VERSION: &str = "3.8.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Name of the rustup toolchain linked to Debian's Rust in /usr (gate-user's build.rs uses it).
const DEBIAN_TOOLCHAIN: &str = "debian";
const BPFFS: &str = "/sys/fs/bpf";

pub fn run(mode: Mode) -> Result<()> {
    let root = proc::is_root();
    let install = mode == Mode::Install && root;
    match (mode, root) {
        (Mode::Check, _) => println!("== setup --check: reporting only, changing nothing"),
        (Mode::Install, true) => println!("== setup: installing what is missing"),
        (Mode::Install, false) => println!("== setup: not root, so reporting only"),
    }
    let mut progress = Progress {
        install,
        ..Progress::default()
    };
    apt_packages(&mut progress)?;
    cargo_tools(&mut progress)?;
    let toolchains = debian_toolchain(&mut progress)?;
    // Which toolchain builds the eBPF object (report only).
    if let Some(list) = &toolchains {
        println!("info: {}", bpf_toolchain_note(list));
    }
    bpffs(&mut progress)?;
    // Needs debootstrap, from the apt packages.
    sid(&mut progress)?;
    progress.finish(mode)
}

/// What setup found in place, installed, and could not install.
#[derive(Default)]
struct Progress {
    install: bool,
    missing: Vec<String>,
    changed: Vec<String>,
    present: usize,
}

impl Progress {
    fn present(&mut self, line: &str) {
        println!("ok: {line}");
        self.present += 1;
    }

    /// Installs `what` with `how` (saying `installing`), or, without the right to, notes it
    /// as missing (saying `missing`).
    fn need(
        &mut self,
        what: String,
        installing: &str,
        missing: &str,
        how: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if self.install {
            println!("{installing}");
            how()?;
            self.changed.push(what);
        } else {
            println!("missing: {missing}");
            self.missing.push(what);
        }
        Ok(())
    }

    fn finish(self, mode: Mode) -> Result<()> {
        let present = self.present;
        if !self.missing.is_empty() {
            println!(
                "setup: {present} present, missing: {}",
                self.missing.join("; ")
            );
            if mode == Mode::Install {
                bail!(
                    "setup must run as root to install what is missing: run `cargo xtask setup` as root"
                );
            }
            bail!(
                "setup --check: {} missing; run `cargo xtask setup` as root",
                self.missing.len()
            );
        }
        if self.changed.is_empty() {
            println!("setup: everything already in place ({present} checks ok), nothing changed");
        } else {
            println!(
                "setup: {present} already in place, installed: {}",
                self.changed.join(", ")
            );
        }
        Ok(())
    }
}

fn apt_packages(progress: &mut Progress) -> Result<()> {
    let packages: Vec<&str> = BUILD_PACKAGES
        .iter()
        .chain(TOOL_PACKAGES)
        .copied()
        .collect();
    let absent = missing_packages(&packages)?;
    for pkg in packages
        .iter()
        .filter(|pkg| !absent.iter().any(|a| a == *pkg))
    {
        progress.present(&format!("{pkg} already installed"));
    }
    if absent.is_empty() {
        return Ok(());
    }
    let list = absent.join(" ");
    progress.need(
        format!("apt packages ({list})"),
        &format!("installing apt packages: {list}"),
        &format!("apt packages {list}"),
        || {
            apt_get(&["update"])?;
            let mut args = vec!["install", "-y", "--no-install-recommends"];
            args.extend(absent.iter().map(String::as_str));
            apt_get(&args)
        },
    )
}

/// A tool `cargo install` builds: its name, the version wanted, the version found, how to
/// install it, and a note for the log.
type CargoTool = (
    &'static str,
    &'static str,
    Option<String>,
    fn() -> Result<()>,
    &'static str,
);

/// bpf-linker, and cargo-deb for `cargo xtask deb`.
fn cargo_tools(progress: &mut Progress) -> Result<()> {
    let tools: [CargoTool; 2] = [
        (
            "bpf-linker",
            BPF_LINKER_VERSION,
            bpf_linker_version(),
            install_bpf_linker,
            "against Debian's LLVM 22",
        ),
        (
            "cargo-deb",
            CARGO_DEB_VERSION,
            cargo_deb_version(),
            install_cargo_deb,
            "",
        ),
    ];
    for (name, version, found, install, how) in tools {
        if found
            .as_deref()
            .is_some_and(|f| reports_version(f, version))
        {
            progress.present(&format!("{name} {version} already installed"));
            continue;
        }
        let found = found.map_or_else(|| "not found".to_owned(), |v| format!("found {v:?}"));
        let how = if how.is_empty() {
            String::new()
        } else {
            format!(" {how}")
        };
        progress.need(
            format!("{name} {version}"),
            &format!("installing {name} {version}{how} ({found}; builds for a minute or more)"),
            &format!("{name} {version} ({found})"),
            install,
        )?;
    }
    Ok(())
}

/// The rustup toolchain `debian` -> /usr; returns rustup's toolchains, when rustup is there.
fn debian_toolchain(progress: &mut Progress) -> Result<Option<Vec<String>>> {
    let list = match rustup_toolchains() {
        Ok(list) => list,
        // Setup does not install rustup itself; without install rights, report it with the rest.
        Err(err) if !progress.install => {
            println!("missing: {err:#}");
            progress.missing.push("rustup".to_owned());
            return Ok(None);
        }
        Err(err) => return Err(err),
    };
    if list.iter().any(|t| t == DEBIAN_TOOLCHAIN) {
        progress.present(&format!(
            "rustup toolchain `{DEBIAN_TOOLCHAIN}` already linked"
        ));
    } else {
        progress.need(
            format!("rustup toolchain `{DEBIAN_TOOLCHAIN}`"),
            &format!("installing: rustup toolchain link {DEBIAN_TOOLCHAIN} /usr (Debian's Rust with the prebuilt BPF core)"),
            &format!("rustup toolchain `{DEBIAN_TOOLCHAIN}` (rustup toolchain link {DEBIAN_TOOLCHAIN} /usr)"),
            || proc::run(Command::new("rustup").args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"])),
        )?;
    }
    Ok(Some(list))
}

fn bpffs(progress: &mut Progress) -> Result<()> {
    if bpffs_mounted()? {
        progress.present(&format!("bpffs already mounted at {BPFFS}"));
        return Ok(());
    }
    progress.need(
        format!("bpffs at {BPFFS}"),
        &format!("installing: mount -t bpf bpf {BPFFS}"),
        &format!("bpffs is not mounted at {BPFFS} (mount -t bpf bpf {BPFFS})"),
        || proc::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS])),
    )
}

/// The Debian sid root the `sid` engine set runs from.
fn sid(progress: &mut Progress) -> Result<()> {
    let root = sid_root::path();
    let Some(why) = sid_root::incomplete(&root) else {
        progress.present(&format!(
            "Debian sid root {} already built ({})",
            root.display(),
            sid_root::versions(&root)
        ));
        return Ok(());
    };
    progress.need(
        format!("Debian sid root {}", root.display()),
        &format!("installing: the Debian sid root {} ({why})", root.display()),
        &format!(
            "the Debian sid root {} is {why} (`cargo xtask setup` builds it)",
            root.display()
        ),
        || sid_root::build(&root),
    )
}

/// A quick check of what `cargo build` needs; the list is empty when nothing is missing.
pub fn missing_for_build() -> Result<Vec<String>> {
    let mut missing: Vec<String> = missing_packages(BUILD_PACKAGES)?
        .into_iter()
        .map(|p| format!("apt package {p}"))
        .collect();
    if !bpf_linker_version().is_some_and(|v| reports_version(&v, BPF_LINKER_VERSION)) {
        missing.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    }
    let toolchains = rustup_toolchains()?;
    if !toolchains.iter().any(|t| t == DEBIAN_TOOLCHAIN) && !nightly_has_rust_src(&toolchains) {
        missing.push(format!("rustup toolchain `{DEBIAN_TOOLCHAIN}`"));
    }
    Ok(missing)
}

/// The packages of `packages` that dpkg does not report as installed.
fn missing_packages(packages: &[&str]) -> Result<Vec<String>> {
    let mut cmd = Command::new("dpkg-query");
    cmd.arg("-W")
        .arg("-f=${Package}\\t${Status}\\n")
        .args(packages);
    // Exit status 1 only means that some package is unknown to dpkg; stdout still lists the rest.
    let out = proc::capture(&mut cmd, Duration::from_secs(60))
        .context("cannot query dpkg: this setup supports Debian 12 (bookworm) only")?;
    let installed: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|line| {
            let (name, status) = line.split_once('\t')?;
            // "install ok installed" (or "hold ok installed"): the last word is the state.
            (status.split_whitespace().last() == Some("installed")).then_some(name)
        })
        .collect();
    Ok(packages
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| (*p).to_owned())
        .collect())
}

fn apt_get(args: &[&str]) -> Result<()> {
    proc::run(
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn bpf_linker_version() -> Option<String> {
    proc::output_if_ok("bpf-linker", &["--version"]).map(|v| v.trim().to_owned())
}

/// Whether `bpf-linker --version` output names exactly `version` ("bpf-linker 0.13.0").
fn reports_version(output: &str, version: &str) -> bool {
    output.split_whitespace().any(|word| word == version)
}

fn install_bpf_linker() -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        // Outside the workspace, so that its .cargo/config.toml plays no part.
        .current_dir("/")
        .env_remove("RUSTC_BOOTSTRAP")
        .env_remove("RUSTUP_TOOLCHAIN");
    proc::run(&mut cmd).context("building bpf-linker failed (it needs llvm-22-dev, libpolly-22-dev, zlib1g-dev, libzstd-dev)")?;
    match bpf_linker_version() {
        Some(v) if reports_version(&v, BPF_LINKER_VERSION) => Ok(()),
        found => bail!(
            "bpf-linker was installed but `bpf-linker --version` reports {found:?}: is ~/.cargo/bin first on PATH?"
        ),
    }
}

/// `cargo deb --version` ("cargo-deb 3.8.0"), if installed.
pub fn cargo_deb_version() -> Option<String> {
    proc::output_if_ok("cargo", &["deb", "--version"]).map(|v| v.trim().to_owned())
}

fn install_cargo_deb() -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ])
    .current_dir("/")
    .env_remove("RUSTC_BOOTSTRAP")
    .env_remove("RUSTUP_TOOLCHAIN");
    proc::run(&mut cmd).context("building cargo-deb failed")?;
    match cargo_deb_version() {
        Some(v) if reports_version(&v, CARGO_DEB_VERSION) => Ok(()),
        found => bail!(
            "cargo-deb was installed but `cargo deb --version` reports {found:?}: is ~/.cargo/bin first on PATH?"
        ),
    }
}

/// Names of rustup's toolchains ("stable-x86_64-unknown-linux-gnu", "debian", ...).
fn rustup_toolchains() -> Result<Vec<String>> {
    let mut cmd = Command::new("rustup");
    cmd.args(["toolchain", "list"]);
    let out = proc::capture(&mut cmd, Duration::from_secs(60)).context(
        "cannot run rustup: install it first (https://rustup.rs) and put ~/.cargo/bin on PATH",
    )?;
    if !out.status.success() {
        bail!("`rustup toolchain list` failed: {}", out.stderr.trim());
    }
    Ok(out
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Mirrors gate-user's build.rs: rustup's nightly, if it has rust-src.
fn nightly_has_rust_src(toolchains: &[String]) -> bool {
    if !toolchains
        .iter()
        .any(|t| t == "nightly" || t.starts_with("nightly-"))
    {
        return false;
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env("RUSTUP_AUTO_INSTALL", "0");
    proc::capture(&mut cmd, Duration::from_secs(60))
        .ok()
        .filter(|out| out.status.success())
        .is_some_and(|out| {
            Path::new(out.stdout.trim())
                .join("lib/rustlib/src/rust/library/core")
                .exists()
        })
}

fn bpf_toolchain_note(toolchains: &[String]) -> String {
    if let Ok(custom) = std::env::var("PORTGATE_BPF_TOOLCHAIN") {
        return format!(
            "PORTGATE_BPF_TOOLCHAIN={custom}: gate-user's build.rs builds the eBPF object with that toolchain"
        );
    }
    if nightly_has_rust_src(toolchains) {
        "rustup's nightly has rust-src: gate-user's build.rs builds the eBPF object with it \
         (the usual aya path, -Z build-std=core)"
            .to_owned()
    } else {
        format!(
            "rustup's nightly has no rust-src: gate-user's build.rs builds the eBPF object with the \
             `{DEBIAN_TOOLCHAIN}` toolchain (Debian's Rust and its prebuilt BPF core)"
        )
    }
}

fn bpffs_mounted() -> Result<bool> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    Ok(mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_match_is_exact() {
        assert!(reports_version("bpf-linker 0.13.0", "0.13.0"));
        assert!(!reports_version("bpf-linker 0.13.01", "0.13.0"));
        assert!(!reports_version("bpf-linker 0.9.13", "0.13.0"));
    }
}
