//! `cargo xtask test [ARGS]`: setup, lint and every test, in stages, with a summary line per
//! stage.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

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

pub fn run(extra_args: &[String]) -> Result<()> {
    if !proc::is_root() {
        println!(
            "note: not running as root: the tests that load eBPF programs (gate-user's program \
             tests) or build network namespaces (portgate-tests) need root and will be skipped, \
             each printing `skipped: ...` (or fail, where PORTGATE_REQUIRE_ROOT, \
             PORTGATE_REQUIRE_ENGINES or CI is set); setup cannot install anything"
        );
    }

    let mut stages = [
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
            name: "unit and program tests (gate-common, gate-user, bench)",
            blocks_later: false,
            command: Some(cargo(&[
                "test",
                "-p",
                "gate-common",
                "-p",
                "gate-user",
                "-p",
                "portgate-bench",
            ])),
        },
        Stage {
            // The package the end-to-end package test installs and removes (PORTGATE_DEB).
            name: "cargo xtask deb",
            blocks_later: false,
            command: Some(cargo(&["xtask", "deb"])),
        },
        Stage {
            name: "end-to-end tests (portgate-tests)",
            blocks_later: false,
            command: Some({
                let mut cmd = cargo(&["test", "-p", "portgate-tests", "--", "--test-threads=2"]);
                cmd.args(extra_args);
                // The tests run `$PORTGATE_BIN`, else <workspace>/target/debug/portgate; name the
                // binary the debug build stage produced, wherever the target directory is.
                if std::env::var_os("PORTGATE_BIN").is_none()
                    && let Ok(target) = proc::target_dir()
                {
                    cmd.env("PORTGATE_BIN", target.join("debug/portgate"));
                }
                if std::env::var_os("PORTGATE_DEB").is_none()
                    && let Ok(target) = proc::target_dir()
                {
                    cmd.env("PORTGATE_DEB", target.join(crate::deb::PATH));
                }
                cmd
            }),
        },
        Stage {
            // Keeps the benchmark harness working; its figures go to target/bench, not docs/.
            name: "bench --quick (harness check)",
            blocks_later: false,
            command: Some(cargo(&["xtask", "bench", "--quick"])),
        },
    ];

    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut blocked = false;
    let total = stages.len();
    for (index, stage) in stages.iter_mut().enumerate() {
        if blocked {
            outcomes.push(Outcome::Skipped("an earlier stage failed"));
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

    println!("\n==================== summary ====================");
    let mut failed = 0;
    for (stage, outcome) in stages.iter().zip(&outcomes) {
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

fn cargo(args: &[&str]) -> Command {
    let mut cmd = proc::cargo();
    cmd.args(args);
    cmd
}
