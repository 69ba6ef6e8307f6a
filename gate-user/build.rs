//! Builds the eBPF object (`gate-ebpf`, for the BPF target), for `include_bytes_aligned!` in
//! the datapath.
//!
//! Toolchain for the BPF target, in order: `PORTGATE_BPF_TOOLCHAIN` if set; rustup's
//! `nightly` when it has `rust-src` (the usual aya recipe, with `-Z build-std`); otherwise the
//! `debian` toolchain that `cargo xtask setup` links to Debian's Rust, whose prebuilt BPF
//! `core` needs no `rust-src`.
//!
//! The build step is aya-build 0.2.0's `build_ebpf`, done here so that its output can be
//! handled: the same `rustup run <toolchain> cargo build --package gate-ebpf --bins --release
//! --target bpfel-unknown-none` with the same flags, `RUSTC_BOOTSTRAP` rule (`-Z
//! build-std=core` when it names the package or is `1`, or on a nightly compiler), target
//! directory and output file. aya-build forwards every line the nested cargo prints
//! (`Compiling ...`) as a `cargo:warning`; here a successful build is quiet (only compiler
//! diagnostics and cargo's own warnings are forwarded), and a failed one shows everything
//! the nested cargo printed.
use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

const PACKAGE: &str = "gate-ebpf";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Just the message (a returned error would come with a backtrace of this script).
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PORTGATE_BPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if let Some(skip) = env::var_os("AYA_BUILD_SKIP")
        && (skip == "1" || skip.eq_ignore_ascii_case("true"))
    {
        println!(
            "cargo:warning=AYA_BUILD_SKIP={}; skipping eBPF build",
            skip.display()
        );
        return Ok(());
    }
    let toolchain = env::var("PORTGATE_BPF_TOOLCHAIN").unwrap_or_else(|_| default_toolchain());
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("gate-user has no parent directory"))?
        .join(PACKAGE);
    // The build-dependency on gate-ebpf covers its library; this covers its binary too.
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    build_ebpf(&toolchain, &out_dir)
}

/// aya-build 0.2.0's `build_ebpf` for one package, without default arguments.
fn build_ebpf(toolchain: &str, out_dir: &Path) -> anyhow::Result<()> {
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb-unknown-none",
        Ok("little") => "bpfel-unknown-none",
        other => bail!("unsupported target endianness {other:?}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64".to_owned()
    } else {
        arch
    };
    let tool = Tool::new(toolchain);

    let use_build_std = match env::var_os("RUSTC_BOOTSTRAP") {
        Some(value) if value == "1" || value == PACKAGE => true,
        Some(value) if value == "-1" => false,
        _ => tool.rustc_is_nightly()?,
    };

    let mut cmd = nested_build(&tool, target, &arch, use_build_std, out_dir);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let (executables, said) = read_cargo_json(&String::from_utf8_lossy(&output.stdout));

    if !output.status.success() {
        // Cargo shows a failed build script's stderr in full, under `--- stderr`: cargo's
        // progress, then the compiler's messages, then cargo's summary.
        eprintln!("{cmd:?} failed ({}); it printed:", output.status);
        let (progress, summary): (Vec<&str>, Vec<&str>) =
            stderr.lines().partition(|line| is_progress(line));
        for line in progress
            .into_iter()
            .chain(said.iter().map(String::as_str))
            .chain(summary)
        {
            eprintln!("{line}");
        }
        bail!("building the eBPF programs ({PACKAGE}) failed; its output is above");
    }
    // Success: forward what a reader needs (warnings), not cargo's progress lines.
    let not_progress = stderr
        .lines()
        .filter(|line| !line.trim().is_empty() && !is_progress(line));
    for line in said.iter().map(String::as_str).chain(not_progress) {
        println!("cargo:warning={line}");
    }

    if !executables.iter().any(|(name, _)| name == PACKAGE) {
        bail!("{cmd:?} succeeded but reported no `{PACKAGE}` binary");
    }
    for (name, executable) in executables {
        let dst = out_dir.join(&name);
        fs::copy(&executable, &dst).with_context(|| {
            format!("cannot copy {} to {}", executable.display(), dst.display())
        })?;
    }
    Ok(())
}

/// The nested `cargo build` of the eBPF object, with `tool`'s toolchain.
fn nested_build(
    tool: &Tool,
    target: &str,
    arch: &str,
    use_build_std: bool,
    out_dir: &Path,
) -> Command {
    let mut cmd = tool.command("cargo");
    cmd.args([
        "build",
        "--package",
        PACKAGE,
        "--bins",
        "--message-format=json",
        "--release",
        "--target",
        target,
    ]);
    if use_build_std {
        cmd.args(["-Z", "build-std=core"]);
    }
    cmd.args(["--features", ""]);
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
    );
    // The toolchain chosen above, not the one building this script.
    cmd.env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    // A target directory of its own (cargo would wait for its own lock on the outer one),
    // apart from the object copied to OUT_DIR.
    cmd.arg("--target-dir")
        .arg(out_dir.join("aya-build").join("target").join(PACKAGE));
    cmd
}

/// The executables cargo built, and what cargo and rustc said, in order: compiler messages
/// and lines that are not JSON (cargo's own lines, on stderr, follow).
fn read_cargo_json(stdout: &str) -> (Vec<(String, PathBuf)>, Vec<String>) {
    let mut executables = Vec::new();
    let mut said: Vec<String> = Vec::new();
    for line in stdout.lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            said.push(line.to_owned());
            continue;
        };
        match message["reason"].as_str() {
            Some("compiler-artifact") => {
                if let (Some(name), Some(executable)) = (
                    message["target"]["name"].as_str(),
                    message["executable"].as_str(),
                ) {
                    executables.push((name.to_owned(), PathBuf::from(executable)));
                }
            }
            Some("compiler-message") => {
                if let Some(rendered) = message["message"]["rendered"].as_str() {
                    said.extend(rendered.trim_end().lines().map(str::to_owned));
                }
            }
            _ => {}
        }
    }
    (executables, said)
}

/// A status line of cargo's (`   Compiling gate-ebpf v0.1.0 (...)`, `    Finished ...`).
fn is_progress(line: &str) -> bool {
    const STATUS: [&str; 13] = [
        "Adding",
        "Blocking",
        "Building",
        "Checking",
        "Compiling",
        "Downloaded",
        "Downloading",
        "Finished",
        "Fresh",
        "Locking",
        "Running",
        "Updating",
        "Waiting",
    ];
    line.starts_with(' ')
        && line
            .split_whitespace()
            .next()
            .is_some_and(|word| STATUS.contains(&word))
}

/// Runs a toolchain's programs: `rustup run <toolchain> <program>`, or the program from PATH
/// (with a warning) when there is no rustup, as aya-build does.
struct Tool {
    prefix: Vec<OsString>,
}

impl Tool {
    fn new(toolchain: &str) -> Self {
        let prefix = match which::which("rustup") {
            Ok(rustup) => vec![rustup.into_os_string(), "run".into(), toolchain.into()],
            Err(err) => {
                println!("cargo:warning=which(rustup)={err}; proceeding with current toolchain");
                Vec::new()
            }
        };
        Self { prefix }
    }

    fn command(&self, program: &str) -> Command {
        match self.prefix.split_first() {
            None => Command::new(program),
            Some((wrapper, args)) => {
                let mut cmd = Command::new(wrapper);
                cmd.args(args).arg(program);
                cmd
            }
        }
    }

    /// Whether the toolchain's rustc is a nightly (its release, `rustc -vV`, ends in
    /// `-nightly`), as rustc_version decides.
    fn rustc_is_nightly(&self) -> anyhow::Result<bool> {
        let mut cmd = self.command("rustc");
        cmd.arg("-vV");
        let output = cmd
            .output()
            .with_context(|| format!("cannot run {cmd:?}"))?;
        if !output.status.success() {
            bail!(
                "{cmd:?} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let release = stdout
            .lines()
            .find_map(|line| line.strip_prefix("release: "))
            .ok_or_else(|| anyhow!("{cmd:?} printed no release: {stdout}"))?;
        let pre = release.split_once('-').map_or("", |(_, pre)| pre);
        Ok(pre.split('.').next() == Some("nightly"))
    }
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
