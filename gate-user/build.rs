//! Builds the eBPF object with aya-build, for `include_bytes_aligned!` in the datapath.
//!
//! Toolchain for the BPF target, in order: `PORTGATE_BPF_TOOLCHAIN` if set; rustup's
//! `nightly` when it has `rust-src` (the usual aya recipe, with `-Z build-std`); otherwise the
//! `debian` toolchain that `cargo xtask setup` links to Debian's Rust, whose prebuilt BPF
//! `core` needs no `rust-src`.
use std::{env, path::Path, process::Command};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PORTGATE_BPF_TOOLCHAIN");
    let toolchain = env::var("PORTGATE_BPF_TOOLCHAIN").unwrap_or_else(|_| default_toolchain());
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("gate-user has no parent directory"))?
        .join("gate-ebpf");
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [Package {
            name: "gate-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}

fn default_toolchain() -> String {
    let nightly_has_rust_src = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .is_some_and(|sysroot| {
            Path::new(&sysroot)
                .join("lib/rustlib/src/rust/library/core")
                .exists()
        });
    if nightly_has_rust_src {
        "nightly"
    } else {
        "debian"
    }
    .to_owned()
}
