//! The real `portgate` agent, run in a sandbox's host namespace (or the root namespace, for
//! the engine tests) with its own pin directory, state directory and control socket, and the
//! CLI that talks to it.

use std::fs::OpenOptions;
use std::marker::PhantomData;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sandbox::{BRIDGE, Sandbox, netns_command};
use crate::unique_name;

/// How long the agent may take to answer `status` after it was started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `portgate` binary: `$PORTGATE_BIN`, else `<workspace>/target/debug/portgate`.
/// (`CARGO_BIN_EXE_portgate` does not exist here: the binary belongs to package gate-user.)
pub fn portgate_bin() -> PathBuf {
    let path = match std::env::var_os("PORTGATE_BIN") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/portgate"),
    };
    if !path.is_file() {
        panic!(
            "the portgate binary is missing at {}: run `cargo build -p gate-user` first \
             (or set PORTGATE_BIN)",
            path.display()
        );
    }
    path
}

/// A running (or stopped) `portgate agent`, in a sandbox's host namespace or in the root
/// namespace. Dropping it kills the agent, runs `portgate uninstall` on its pin directory and
/// removes what is left of it.
pub struct Agent<'a> {
    /// The network namespace the agent and its CLI run in; `None`: the root namespace.
    netns: Option<String>,
    /// `--bridge ... --runtime ...`: what the agent gates.
    base_args: Vec<String>,
    _sandbox: PhantomData<&'a Sandbox>,
    pub bin: PathBuf,
    /// Holds the state directory, the control socket and the log.
    pub dir: tempfile::TempDir,
    /// The agent's pin directory on bpffs (`--bpffs`), unique to this agent.
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// The agent's stdout and stderr, across restarts.
    pub log: PathBuf,
    extra_args: Vec<String>,
    /// Whether the binary has `--policy` (releases before the policy file do not).
    policy_flag: bool,
    child: Option<Child>,
}

impl<'a> Agent<'a> {
    /// Starts `portgate agent --bridge pgbr0` in the sandbox's host namespace and waits until
    /// it is ready.
    pub fn start(sandbox: &'a Sandbox) -> Self {
        Self::start_with(sandbox, &[])
    }

    /// Like [`Agent::start`], with extra arguments for `portgate agent` (e.g. `--mode audit`).
    pub fn start_with(sandbox: &'a Sandbox, extra_args: &[&str]) -> Self {
        let mut agent = Self::new(sandbox, extra_args);
        agent.spawn();
        agent.wait_ready();
        agent
    }

    /// An agent that is not running yet: paths chosen, nothing started.
    pub fn new(sandbox: &'a Sandbox, extra_args: &[&str]) -> Self {
        // No engines in a sandbox, unless a test asks for one.
        let base_args: &[&str] = if extra_args.contains(&"--runtime") {
            &["--bridge", BRIDGE]
        } else {
            &["--bridge", BRIDGE, "--runtime", "none"]
        };
        Self::with(
            Some(sandbox.host.clone()),
            base_args,
            extra_args,
            &unique_name(),
        )
    }

    /// An agent in the root namespace (not started), gating what `base_args` say (e.g.
    /// `--bridge auto --runtime auto`), its pins under `/sys/fs/bpf/<pin_name>`.
    pub fn in_root_namespace(
        base_args: &[&str],
        extra_args: &[&str],
        pin_name: &str,
    ) -> Agent<'static> {
        Agent::with(None, base_args, extra_args, pin_name)
    }

    fn with(
        netns: Option<String>,
        base_args: &[&str],
        extra_args: &[&str],
        pin_name: &str,
    ) -> Self {
        let bin = portgate_bin();
        let dir = tempfile::Builder::new()
            .prefix("pgt-agent-")
            .tempdir()
            .expect("tempdir");
        let strings = |args: &[&str]| args.iter().map(|s| s.to_string()).collect();
        Agent {
            netns,
            base_args: strings(base_args),
            _sandbox: PhantomData,
            bin,
            bpffs: Path::new("/sys/fs/bpf").join(pin_name),
            state_dir: dir.path().join("state"),
            socket: dir.path().join("portgate.sock"),
            log: dir.path().join("agent.log"),
            dir,
            extra_args: strings(extra_args),
            policy_flag: true,
            child: None,
        }
    }

    /// The test's own policy file (empty unless the test writes it), so that the host's
    /// /etc/portgate/policy.toml never leaks into a test; none when the test names one.
    fn policy_args(&self) -> Vec<std::ffi::OsString> {
        if !self.policy_flag || self.extra_args.iter().any(|a| a == "--policy") {
            return Vec::new();
        }
        let path = self.policy_path();
        if !path.exists() {
            std::fs::write(&path, "").expect("write the empty policy file");
        }
        vec!["--policy".into(), path.into()]
    }

    /// Runs `bin` from now on, for the agent (from its next [`Agent::spawn`]) and the CLI, on
    /// the same state, pins and socket: another release's binary, for an upgrade.
    /// `policy_flag`: whether that binary has `--policy` (a release before the policy file
    /// does not, and then reads no policy file at all).
    pub fn use_bin(&mut self, bin: &Path, policy_flag: bool) {
        self.bin = bin.to_owned();
        self.policy_flag = policy_flag;
    }

    /// Where this agent's policy file is (see [`Agent::policy_args`]).
    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    /// Starts the agent process (without waiting for it to be ready).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open agent log");
        let log_err = log.try_clone().expect("clone log fd");
        let mut command = self.portgate();
        command
            .arg("agent")
            .args(&self.base_args)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .args(self.policy_args())
            .args(&self.extra_args)
            .stdout(log)
            .stderr(log_err);
        // If the test process dies without its Drops (killed), the agent goes with it instead
        // of gating bridges for nobody; the next run removes its pins.
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        self.child = Some(child);
    }

    /// Polls `portgate status` until it succeeds; panics (with the agent's log) when the
    /// agent exits first or [`READY_TIMEOUT`] passes.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "agent exited ({status}) before it was ready; log:\n{}",
                    self.log_text()
                );
            }
            let output = self.cli(&["status"]);
            if output.status.success() {
                return;
            }
            let last = String::from_utf8_lossy(&output.stderr).into_owned();
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "agent not ready after {READY_TIMEOUT:?} (last `status`: {last}); log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Sends SIGTERM and waits; asserts the agent exits cleanly (status 0).
    pub fn stop(&mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "agent should exit 0 on SIGTERM, exited {status}; log:\n{}",
            self.log_text()
        );
    }

    /// Sends SIGTERM and waits up to [`STOP_TIMEOUT`]; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent not running");
        // SAFETY: kill on the pid of our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for agent") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "agent did not exit within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the agent (asserting a clean exit), starts it again, waits until ready.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready();
    }

    /// Kills the agent with SIGKILL, if running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `portgate --socket S ARGS...`, run in the agent's namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.portgate()
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run portgate")
    }

    /// Like [`Agent::cli`], asserting success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "`portgate {}` failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `portgate allow TARGET PORTSPEC`, asserting success.
    pub fn allow(&self, target: &str, portspec: &str) {
        self.cli_ok(&["allow", target, portspec]);
    }

    /// `portgate deny TARGET PORTSPEC`, asserting success.
    pub fn deny(&self, target: &str, portspec: &str) {
        self.cli_ok(&["deny", target, portspec]);
    }

    /// `portgate list --json`, parsed.
    pub fn list_json(&self) -> Value {
        parse_json("list --json", &self.cli_ok(&["list", "--json"]))
    }

    /// `portgate status --json`, parsed.
    pub fn status_json(&self) -> Value {
        parse_json("status --json", &self.cli_ok(&["status", "--json"]))
    }

    /// `portgate uninstall --bpffs DIR`, run in the agent's namespace.
    pub fn uninstall(&self) -> Output {
        self.portgate()
            .arg("uninstall")
            .arg("--bpffs")
            .arg(&self.bpffs)
            .output()
            .expect("run portgate")
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn portgate(&self) -> Command {
        let mut command = match &self.netns {
            Some(ns) => netns_command(ns, &self.bin),
            None => Command::new(&self.bin),
        };
        command.env_remove("PORTGATE_SOCKET").stdin(Stdio::null());
        command
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        // On failure, or when asked (PGT_SHOW_LOGS=1, with --nocapture), show what the agent said.
        if std::thread::panicking() || std::env::var_os("PGT_SHOW_LOGS").is_some() {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            eprintln!(
                "--- portgate agent log ({}; {}) ---\n{}",
                self.log.display(),
                exited.map_or_else(
                    || "still running".to_owned(),
                    |s| format!("already exited: {s}")
                ),
                self.log_text()
            );
        }
        self.kill();
        if std::env::var_os("PGT_SHOW_LOGS").is_some() {
            let _ = Command::new("find")
                .arg(&self.bpffs)
                .arg(&self.state_dir)
                .status();
        }
        if self.bpffs.exists() {
            let _ = self.uninstall();
        }
        remove_pins(&self.bpffs);
    }
}

/// Removes a pin directory that `portgate uninstall` left (best effort). Runs
/// `portgate uninstall` on it first when the binary is around.
pub fn remove_pins(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let bin = std::env::var_os("PORTGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/portgate"));
    if bin.is_file() {
        let _ = Command::new(bin)
            .arg("uninstall")
            .arg("--bpffs")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn parse_json(what: &str, text: &str) -> Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("`portgate {what}` is not JSON ({e}): {text}"))
}

/// A counter from `status --json`: `counters.<kind>.<name>`, e.g. ("drop", "not_allowed").
pub fn counter(status: &Value, kind: &str, name: &str) -> u64 {
    status["counters"][kind][name]
        .as_u64()
        .unwrap_or_else(|| panic!("status --json has no counters.{kind}.{name}: {status}"))
}

/// The rules of `list --json`.
pub fn rules(list: &Value) -> &Vec<Value> {
    list["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("list --json has no \"rules\" array: {list}"))
}

/// The rule of `list --json` for exactly (address, protocol, port range), if listed.
pub fn find_rule<'v>(
    list: &'v Value,
    address: &str,
    protocol: &str,
    port_start: u64,
    port_end: u64,
) -> Option<&'v Value> {
    rules(list).iter().find(|r| {
        r["address"] == address
            && r["protocol"] == protocol
            && r["port_start"] == port_start
            && r["port_end"] == port_end
    })
}

/// `packets` and `bytes` of a listed rule.
pub fn rule_counters(rule: &Value) -> (u64, u64) {
    let get = |k: &str| {
        rule[k]
            .as_u64()
            .unwrap_or_else(|| panic!("rule without {k}: {rule}"))
    };
    (get("packets"), get("bytes"))
}
