//! Developer tasks for portgate: `cargo xtask setup | build | build-previous | lint | test | deb |
//! fuzz | soak | demo | bench`.
//!
//! Everything here shells out to the tools a developer would type by hand (apt-get, cargo,
//! rustup, ip, socat), printing each command before it runs.
mod deb;
mod demo;
mod lint;
mod previous;
mod setup;
mod sid_root;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portgate_cmd as proc;

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for portgate",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian 12, as root); idempotent.
    Setup {
        /// Only report what is present or missing; change nothing; fail if anything is missing.
        #[arg(long)]
        check: bool,
    },
    /// Build the default workspace members (the eBPF object is built by gate-user's build.rs).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// rustfmt check and clippy (warnings denied) over every crate and target.
    Lint,
    /// Run setup, lint, build, and every test: unit, program and end-to-end (the CI command;
    /// root).
    Test {
        /// Run the engine tests against these engine sets only (debian12, cni, sid;
        /// repeatable); default: every set, one after the other.
        #[arg(long = "engine-set", value_name = "SET")]
        engine_sets: Vec<String>,
        /// Passed to every `cargo test -p portgate-tests ... -- --test-threads=2 ...`
        /// (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the previous release's `portgate` (the last commit of the previous pin layout,
    /// from this repository's history) for the upgrade test, unless it is built already;
    /// prints its path.
    BuildPrevious,
    /// Build the Debian package (cargo-deb): binary, systemd unit and the engines' drop-ins,
    /// completions, man pages; prints its path.
    Deb,
    /// Fuzz the gate's programs in the kernel (BPF_PROG_TEST_RUN) for longer than `test`
    /// does: mutated and random frames, the gate's invariants checked after each (root).
    Fuzz {
        /// Frames to run.
        #[arg(long, default_value_t = 5_000_000)]
        frames: u64,
        /// The seed; default: from the clock (printed, to reproduce a failure).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// The load test for longer than `test` runs it: allowed new connections at 10 000/s
    /// through the gate for a minute, with a few rules and with 100 000, the agent's CPU,
    /// RSS and the answer times of list, status and a scrape printed (root; release build;
    /// about 3 min).
    Soak {
        /// Seconds of traffic per variant.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Target rate of new connections per second.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
    },
    /// Build portgate and show the gate dropping, allowing and answering in a sandbox of
    /// network namespaces (root).
    Demo,
    /// Measure portgate against no filter, iptables (Docker's DOCKER chain) and an nftables set
    /// in network namespaces, on a container host (DNAT, conntrack on) and bare: data path,
    /// control plane, the program's cost per packet, a SYN flood to a blocked published port
    /// (--flood alone); writes docs/benchmarks.md and docs/benchmarks.svg (root; about 35 min,
    /// --quick under 4, --flood about 4).
    Bench(portgate_bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup { check } => setup::run(if check {
            setup::Mode::Check
        } else {
            setup::Mode::Install
        }),
        Task::Build { release } => build(release),
        Task::Lint => lint::run(),
        Task::Test { engine_sets, args } => test::run(&args, &engine_sets),
        Task::BuildPrevious => previous::run(),
        Task::Deb => deb::run(),
        Task::Demo => demo::run(),
        Task::Fuzz { frames, seed } => fuzz(frames, seed),
        Task::Soak { secs, rate } => soak(secs, rate),
        Task::Bench(args) => portgate_bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask build [--release]`: a quick check of the build prerequisites (full setup only
/// when something is missing), then `cargo build [--release]` of the default members.
fn build(release: bool) -> anyhow::Result<()> {
    let missing = setup::missing_for_build()?;
    if missing.is_empty() {
        println!(
            "ok: build prerequisites present (bpf-linker, Debian BPF toolchain packages, rustup links)"
        );
    } else {
        println!(
            "missing for the build: {}; running setup",
            missing.join(", ")
        );
        setup::run(setup::Mode::Install)?;
    }
    let mut cmd = proc::cargo();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    proc::run(&mut cmd)
}

/// `cargo xtask fuzz`: the fuzz test with more frames and a seed of its own. A failing
/// frame is saved under target/fuzz/ (the test names it).
fn fuzz(frames: u64, seed: Option<u64>) -> anyhow::Result<()> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    println!(
        "fuzzing {frames} frames with seed {seed} (reproduce: cargo xtask fuzz --frames {frames} --seed {seed})"
    );
    let mut cmd = proc::cargo();
    cmd.args([
        "test",
        "--release",
        "-p",
        "gate-user",
        "--test",
        "fuzz",
        "--",
        "--nocapture",
    ])
    .env("PORTGATE_FUZZ_FRAMES", frames.to_string())
    .env("PORTGATE_FUZZ_SEED", seed.to_string())
    .env("PORTGATE_REQUIRE_ROOT", "1");
    proc::run(&mut cmd)
}

/// `cargo xtask soak`: the load test (tests/tests/load.rs) with longer traffic, against the
/// release build (what a host runs: a debug agent's answer times say little). The figures
/// go to stderr as the test prints them.
fn soak(secs: u64, rate: u64) -> anyhow::Result<()> {
    proc::run(proc::cargo().args(["build", "--release", "-p", "gate-user"]))?;
    let bin = proc::target_dir()?.join("release/portgate");
    println!(
        "soak: {secs} s of new connections at a target of {rate}/s, with a few rules and with 100 000, agent {}",
        bin.display()
    );
    let mut cmd = proc::cargo();
    cmd.args([
        "test",
        "-p",
        "portgate-tests",
        "--test",
        "load",
        "--",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("PORTGATE_SOAK_SECS", secs.to_string())
    .env("PORTGATE_LOAD_RATE", rate.to_string())
    .env("PORTGATE_BIN", bin)
    .env("PORTGATE_REQUIRE_ROOT", "1");
    proc::run(&mut cmd)
}
