//! `cargo xtask test [ARGS]`: setup, lint and every test, in stages, with a summary line per
//! stage.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use portgate_cmd as proc;

use crate::setup;

enum Outcome {
    Passed(Duration),
    Failed(Duration, String),
    Skipped(&'static str),
}

struct Stage {
    name: &'static str,
    /// Whether a failure makes the later stages pointless.
    blocks_later: bool,
    command: Option<Command>,
}

/// The engine sets the engine tests run against (tests/src/engines/sets.rs), in this order:
/// sid, then the CNI set, then Debian 12's (with every other end-to-end test; the same Docker
/// as the CNI set's, so only Podman's service restarts in between).
pub const ENGINE_SETS: [&str; 3] = ["sid", "cni", "debian12"];

pub fn run(extra_args: &[String], engine_sets: &[String]) -> Result<()> {
    for set in engine_sets {
        if !ENGINE_SETS.contains(&set.as_str()) {
            bail!(
                "--engine-set {set}: no such engine set (one of {})",
                ENGINE_SETS.join(", ")
            );
        }
    }
    let wanted = |set: &str| engine_sets.is_empty() || engine_sets.iter().any(|s| s == set);
    if !proc::is_root() {
        println!(
            "note: not running as root: the tests that load eBPF programs (gate-user's program \
             tests) or build network namespaces (portgate-tests) need root and will be skipped, \
             each printing `skipped: ...` (or fail, where PORTGATE_REQUIRE_ROOT, \
             PORTGATE_REQUIRE_ENGINES or CI is set); setup cannot install anything"
        );
    }

    let stages = vec![
        Stage {
            name: "setup",
            blocks_later: true,
            command: None,
        },
        Stage {
            // The first check (clippy needs what setup installs: it runs gate-user's build
            // script). A lint failure fails the run but blocks nothing: the tests still run.
            name: "lint (rustfmt, clippy)",
            blocks_later: false,
            command: Some(cargo(&["xtask", "lint"])),
        },
        Stage {
            name: "cargo build --release",
            blocks_later: true,
            command: Some(cargo(&["build", "--release"])),
        },
        Stage {
            name: "cargo build",
            blocks_later: true,
            command: Some(cargo(&["build"])),
        },
        Stage {
            name: "unit and program tests (gate-common, gate-user, bench, fake-docker)",
            blocks_later: false,
            command: Some(cargo(&[
                "test",
                "-p",
                "gate-common",
                "-p",
                "gate-user",
                "-p",
                "portgate-bench",
                "-p",
                "portgate-fake-docker",
            ])),
        },
        Stage {
            name: "engine tests, engine set sid (Docker 28, Podman 5)",
            blocks_later: false,
            command: wanted("sid").then(|| engine_tests("sid", extra_args)),
        },
        Stage {
            name: "engine tests, engine set cni (Podman 4.3 on CNI)",
            blocks_later: false,
            command: wanted("cni").then(|| engine_tests("cni", extra_args)),
        },
        Stage {
            // The previous release's binary the upgrade test starts first
            // (PORTGATE_PREVIOUS_BIN); built once, then cached under the target directory.
            name: "cargo xtask build-previous",
            blocks_later: false,
            command: Some(cargo(&["xtask", "build-previous"])),
        },
        Stage {
            // The package the end-to-end package test installs and removes (PORTGATE_DEB).
            name: "cargo xtask deb",
            blocks_later: false,
            command: Some(cargo(&["xtask", "deb"])),
        },
        Stage {
            name: "end-to-end tests (portgate-tests), engine set debian12",
            blocks_later: false,
            command: Some(end_to_end_tests(wanted("debian12"), extra_args)?),
        },
        Stage {
            // Keeps the benchmark harness working; its figures go to target/bench, not docs/.
            name: "bench --quick (harness check)",
            blocks_later: false,
            command: Some(cargo(&["xtask", "bench", "--quick"])),
        },
    ];

    let outcomes = run_stages(stages);
    summarize(&outcomes)
}

/// Runs the stages in order; a failed stage that blocks later ones skips the rest.
fn run_stages(mut stages: Vec<Stage>) -> Vec<(Stage, Outcome)> {
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut blocked = false;
    let total = stages.len();
    for (index, stage) in stages.iter_mut().enumerate() {
        if blocked {
            outcomes.push(Outcome::Skipped("an earlier stage failed"));
            continue;
        }
        if stage.command.is_none() && stage.name != "setup" {
            outcomes.push(Outcome::Skipped("not among the --engine-set sets"));
            continue;
        }
        println!(
            "\n==================== [{}/{total}] {} ====================",
            index + 1,
            stage.name
        );
        let started = Instant::now();
        let result = match stage.command.as_mut() {
            None => setup::run(setup::Mode::Install),
            Some(cmd) => proc::run(cmd),
        };
        let outcome = match result {
            Ok(()) => Outcome::Passed(started.elapsed()),
            Err(err) => {
                eprintln!("error: {err:#}");
                blocked = stage.blocks_later;
                Outcome::Failed(started.elapsed(), format!("{err:#}"))
            }
        };
        outcomes.push(outcome);
    }

    stages.into_iter().zip(outcomes).collect()
}

/// Prints a line per stage; an error when one failed.
fn summarize(outcomes: &[(Stage, Outcome)]) -> Result<()> {
    println!("\n==================== summary ====================");
    let mut failed = 0;
    for (stage, outcome) in outcomes {
        match outcome {
            Outcome::Passed(took) => {
                println!("PASS  {:<48} {:>6.1} s", stage.name, took.as_secs_f64())
            }
            Outcome::Failed(took, why) => {
                failed += 1;
                println!(
                    "FAIL  {:<48} {:>6.1} s  {why}",
                    stage.name,
                    took.as_secs_f64()
                );
            }
            Outcome::Skipped(why) => println!("SKIP  {:<48}          ({why})", stage.name),
        }
    }
    if failed > 0 {
        bail!("{failed} stage(s) failed");
    }
    Ok(())
}

/// The end-to-end tests on engine set debian12 (without it among the sets, every test
/// binary but the engines one), with the binaries they start.
fn end_to_end_tests(debian12: bool, extra_args: &[String]) -> Result<Command> {
    let mut cmd = cargo(&["test", "-p", "portgate-tests"]);
    // Without debian12 among the sets, every test binary but the engines one.
    if !debian12 {
        for name in test_binaries_but_engines()? {
            cmd.args(["--test", &name]);
        }
    }
    cmd.args(["--", "--test-threads=2"]).args(extra_args);
    // Last, so that the host is left with Debian 12's own engines running (this
    // set's start stops the daemons the other sets' stages started).
    cmd.env("PORTGATE_ENGINE_SET", "debian12");
    with_portgate_bin(&mut cmd);
    if std::env::var_os(crate::previous::ENV).is_none()
        && let Ok(target) = proc::target_dir()
    {
        cmd.env(crate::previous::ENV, crate::previous::bin_path(&target));
    }
    if std::env::var_os("PORTGATE_DEB").is_none()
        && let Ok(target) = proc::target_dir()
    {
        cmd.env("PORTGATE_DEB", target.join(crate::deb::PATH));
    }
    Ok(cmd)
}

/// The engine tests alone (one test process: the sets' tests share docker0 and podman0's
/// subnet, and run one at a time anyway) against engine set `set`.
fn engine_tests(set: &str, extra_args: &[String]) -> Command {
    let mut cmd = cargo(&["test", "-p", "portgate-tests", "--test", "engines", "--"]);
    // The engine tests take a lock of their own and run one at a time anyway.
    cmd.arg("--test-threads=2").args(extra_args);
    cmd.env("PORTGATE_ENGINE_SET", set);
    with_portgate_bin(&mut cmd);
    cmd
}

/// The names of the end-to-end test binaries (tests/tests/*.rs) other than `engines`.
fn test_binaries_but_engines() -> Result<Vec<String>> {
    let dir = proc::workspace_root().join("tests/tests");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(".rs")?.to_owned();
            (name != "engines").then_some(name)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// The tests run `$PORTGATE_BIN`, else <workspace>/target/debug/portgate; name the binary the
/// debug build stage produced, wherever the target directory is.
fn with_portgate_bin(cmd: &mut Command) {
    if std::env::var_os("PORTGATE_BIN").is_none()
        && let Ok(target) = proc::target_dir()
    {
        cmd.env("PORTGATE_BIN", target.join("debug/portgate"));
    }
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = proc::cargo();
    cmd.args(args);
    cmd
}
