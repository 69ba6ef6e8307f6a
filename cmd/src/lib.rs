//! Running the commands a developer would type, for xtask and the bench: printing them, streaming or capturing their output, timeouts, signals.
use std::{
    ffi::OsStr,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    crate_dir.parent().unwrap_or(crate_dir).to_path_buf()
}

/// The cargo that runs this xtask (`$CARGO`), else `cargo` from PATH, in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Cargo's target directory for this workspace (honours CARGO_TARGET_DIR and config).
pub fn target_dir() -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let out = capture(&mut cmd, Duration::from_secs(60))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", display(&cmd), out.stderr.trim());
    }
    let meta: serde_json::Value =
        serde_json::from_str(&out.stdout).context("cannot parse the output of `cargo metadata`")?;
    meta.get("target_directory")
        .and_then(|dir| dir.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("`cargo metadata` reported no target_directory"))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A command as a user would type it: the variables it sets, then the program name (without
/// its directory) and the arguments.
pub fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let mut words: Vec<String> = cmd
        .get_envs()
        .filter_map(|(key, value)| value.map(|v| format!("{}={}", key.to_string_lossy(), quote(v))))
        .collect();
    words.push(quote(program.file_name().unwrap_or(program.as_os_str())));
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Prints the command, runs it with inherited stdio, fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    println!("$ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", display(cmd)))?;
    check_status(cmd, status)
}

pub fn check_status(cmd: &Command, status: ExitStatus) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("`{}` failed ({status})", display(cmd))
    }
}

pub struct Captured {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    /// stdout and stderr together, trimmed, for showing to the user.
    pub fn combined(&self) -> String {
        let mut text = self.stdout.trim_end().to_owned();
        let err = self.stderr.trim_end();
        if !err.is_empty() {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(err);
        }
        text
    }
}

/// Runs the command with captured output; kills it and fails after `timeout`.
pub fn capture(cmd: &mut Command, timeout: Duration) -> Result<Captured> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{}`", display(cmd)))?;
    wait_captured(cmd, child, timeout)
}

/// Waits for a child spawned with piped stdout/stderr; kills it and fails after `timeout`.
pub fn wait_captured(cmd: &Command, mut child: Child, timeout: Duration) -> Result<Captured> {
    let stdout = child.stdout.take().map(reader);
    let stderr = child.stderr.take().map(reader);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            break status;
        }
        if Instant::now() >= deadline {
            // Killing an exited-but-unreaped child is harmless; errors are irrelevant here.
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{}` did not finish within {} s",
                display(cmd),
                timeout.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let join = |handle: Option<thread::JoinHandle<String>>| {
        handle
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    };
    Ok(Captured {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    })
}

fn reader<R: Read + Send + 'static>(mut pipe: R) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just ends the captured text early.
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Output of a command as a string, if it runs and exits 0.
pub fn output_if_ok(program: &str, args: &[&str]) -> Option<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    capture(&mut cmd, Duration::from_secs(60))
        .ok()
        .filter(|out| out.status.success())
        .map(|out| out.stdout)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT, SIGTERM and SIGHUP only set a flag that long tasks check with
/// [`check_interrupted`], so that their clean-up still runs.
pub fn catch_signals() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted")
    } else {
        Ok(())
    }
}

/// Sleeps, but returns an error early when a signal arrived.
pub fn sleep(duration: Duration) -> Result<()> {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        check_interrupted()?;
        thread::sleep(
            Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
    check_interrupted()
}
