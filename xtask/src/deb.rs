//! `cargo xtask deb`: the Debian package (cargo-deb): a release build, the completions and
//! man pages generated from the clap definitions (`portgate generate`), then `cargo deb`.
//! Prints the package's path last.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use crate::setup;
use portgate_cmd as proc;

/// Where the package goes, under the target directory (one fixed name, for the tests).
pub const PATH: &str = "debian/portgate.deb";

pub fn run() -> Result<()> {
    let path = build()?;
    println!("{}", path.display());
    Ok(())
}

/// Builds the package and returns its path (`<target>/debian/portgate.deb`).
pub fn build() -> Result<PathBuf> {
    if !setup::cargo_deb_version()
        .is_some_and(|v| v.split_whitespace().any(|w| w == setup::CARGO_DEB_VERSION))
    {
        println!(
            "cargo-deb {} is missing; running setup",
            setup::CARGO_DEB_VERSION
        );
        setup::run(setup::Mode::Install)?;
    }
    let mut build = proc::cargo();
    build.args(["build", "--release", "-p", "gate-user"]);
    proc::run(&mut build)?;
    let target = proc::target_dir()?;
    let generated = target.join("release/packaging");
    let mut generate = std::process::Command::new(target.join("release/portgate"));
    generate.arg("generate").arg(&generated);
    proc::run(&mut generate).context("generating completions and man pages")?;
    let path = target.join(PATH);
    let mut deb = proc::cargo();
    deb.args(["deb", "-p", "gate-user", "--no-build", "--output"])
        .arg(&path);
    proc::run(&mut deb)?;
    if !path.is_file() {
        bail!("cargo deb wrote no package to {}", path.display());
    }
    Ok(path)
}
