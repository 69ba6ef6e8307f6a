//! `cargo xtask lint`: rustfmt and clippy over every crate, warnings denied.
//!
//! The lints themselves are the root Cargo.toml's `[workspace.lints]` (every crate opts in)
//! and clippy.toml; this runs them:
//!
//! 1. `cargo fmt --all -- --check`;
//! 2. `cargo clippy --workspace --exclude gate-ebpf --all-targets -- -D warnings`: the host
//!    crates, their tests, benches and build scripts;
//! 3. `cargo clippy -p gate-ebpf --all-targets -- -D warnings`: the eBPF crate, checked for
//!    the host on its own (with the rest of the workspace, cargo would unify gate-common's
//!    `user` feature, and with it std, into it). What only the BPF target compiles is checked
//!    by rustc in the real build (gate-user's build.rs shows its warnings).
//!
//! Every check runs, also after one failed; the task fails if any did.
use std::process::Command;

use anyhow::{Result, bail};

use portgate_cmd as proc;

use crate::setup;

pub fn run() -> Result<()> {
    // clippy runs gate-user's build script, which builds the eBPF object.
    let missing = setup::missing_for_build()?;
    let mut failed: Vec<&str> = Vec::new();
    for (name, mut cmd) in checks() {
        if name != "rustfmt" && !missing.is_empty() {
            eprintln!(
                "error: {name} needs the build prerequisites (missing: {}); run `cargo xtask setup`",
                missing.join(", ")
            );
            failed.push(name);
            continue;
        }
        if let Err(err) = proc::run(&mut cmd) {
            eprintln!("error: {err:#}");
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    println!("lint: rustfmt and clippy found nothing");
    Ok(())
}

fn checks() -> Vec<(&'static str, Command)> {
    let cargo = |args: &[&str]| {
        let mut cmd = proc::cargo();
        cmd.args(args);
        cmd
    };
    vec![
        ("rustfmt", cargo(&["fmt", "--all", "--", "--check"])),
        (
            "clippy (host crates)",
            cargo(&[
                "clippy",
                "--workspace",
                "--exclude",
                "gate-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        ),
        (
            "clippy (gate-ebpf)",
            cargo(&[
                "clippy",
                "-p",
                "gate-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        ),
    ]
}
