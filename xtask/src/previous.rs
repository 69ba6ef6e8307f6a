//! `cargo xtask build-previous`: the `portgate` binary of the previous release, built from
//! this repository's own history, for the upgrade test (`tests/tests/upgrade.rs`), which runs
//! it as `$PORTGATE_PREVIOUS_BIN`.
//!
//! The commit is exported with `git archive` into `<target>/previous-release/<commit>/src`
//! and built there (debug profile) with its own `Cargo.lock` and
//! `CARGO_TARGET_DIR=<target>/previous-release/target`, so the dependencies stay cached
//! between runs; the binary is copied to `<target>/previous-release/portgate-<commit>`, and a
//! later run that finds that file builds nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use portgate_cmd as proc;

/// The previous release: the last commit whose pins have layout `v2`
/// (`gate_common::LAYOUT_VERSION`; the next layout, `v3`, came with the rules that say who may
/// connect, dc99591). Its agent saves rules in format version 1. Change it when a release
/// changes the layout again (`git log -S'LAYOUT_VERSION: &str' -- gate-common/src/lib.rs`).
pub const COMMIT: &str = "318d2dc68dfa8feb3b6376bd20bd799fac7734fd";

/// The environment variable that names the binary for the tests.
pub const ENV: &str = "PORTGATE_PREVIOUS_BIN";

pub fn run() -> Result<()> {
    let bin = build()?;
    println!("{}", bin.display());
    Ok(())
}

/// Where the binary of [`COMMIT`] is (or will be), under `target`.
pub fn bin_path(target: &Path) -> PathBuf {
    target
        .join("previous-release")
        .join(format!("portgate-{COMMIT}"))
}

/// Builds the previous release's binary unless it is there already; returns its path.
pub fn build() -> Result<PathBuf> {
    let target = proc::target_dir()?;
    let bin = bin_path(&target);
    if bin.is_file() {
        println!(
            "ok: the previous release's portgate ({}) is built: {}",
            short(),
            bin.display()
        );
        return Ok(bin);
    }
    require_commit()?;
    let base = target.join("previous-release");
    let src = base.join(COMMIT).join("src");
    // A partial export of an interrupted run is exported again, from scratch.
    if src.exists() {
        std::fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let archive = base.join(COMMIT).join("src.tar");
    let mut export = git();
    export
        .args(["archive", "--format=tar", "--output"])
        .arg(&archive)
        .arg(COMMIT);
    proc::run(&mut export)?;
    let mut untar = Command::new("tar");
    untar.arg("-xf").arg(&archive).arg("-C").arg(&src);
    proc::run(&mut untar)?;
    std::fs::remove_file(&archive).with_context(|| format!("removing {}", archive.display()))?;

    let started = Instant::now();
    let cargo_target = base.join("target");
    let mut cargo = proc::cargo();
    // Run in the exported tree, so that its own workspace, lock file and .cargo/config.toml
    // apply (cargo also reads this repository's .cargo/config.toml above it, which sets the
    // same).
    cargo
        .current_dir(&src)
        .args(["build", "--locked", "-p", "gate-user", "--bin", "portgate"])
        .env("CARGO_TARGET_DIR", &cargo_target);
    proc::run(&mut cargo).with_context(|| {
        format!(
            "building the previous release ({}) in {}",
            short(),
            src.display()
        )
    })?;
    let built = cargo_target.join("debug/portgate");
    let partial = base.join(format!("portgate-{COMMIT}.partial"));
    std::fs::copy(&built, &partial)
        .with_context(|| format!("copying {} to {}", built.display(), partial.display()))?;
    std::fs::rename(&partial, &bin)
        .with_context(|| format!("renaming {} to {}", partial.display(), bin.display()))?;
    println!(
        "built the previous release's portgate ({}) in {}: {}",
        short(),
        seconds(started.elapsed()),
        bin.display()
    );
    Ok(bin)
}

/// Fails with one line saying how to fix it when the history lacks [`COMMIT`] (a shallow
/// clone, as some CI checkouts make).
fn require_commit() -> Result<()> {
    let mut check = git();
    check
        .args(["cat-file", "-e"])
        .arg(format!("{COMMIT}^{{commit}}"));
    let found = proc::capture(&mut check, Duration::from_secs(30))?;
    if found.status.success() {
        return Ok(());
    }
    let mut is_shallow = git();
    is_shallow.args(["rev-parse", "--is-shallow-repository"]);
    let shallow = proc::capture(&mut is_shallow, Duration::from_secs(30))
        .is_ok_and(|out| out.status.success() && out.stdout.trim() == "true");
    bail!(
        "the previous release's commit {COMMIT} is not in this clone's history{}: run `git fetch \
         --unshallow` (or clone without --depth), then again",
        if shallow { " (a shallow clone)" } else { "" }
    );
}

fn git() -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(proc::workspace_root());
    cmd
}

fn short() -> &'static str {
    &COMMIT[..7]
}

fn seconds(took: Duration) -> String {
    format!("{:.0} s", took.as_secs_f64())
}
