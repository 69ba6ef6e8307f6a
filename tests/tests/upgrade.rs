//! Upgrades and downgrades between real releases: the previous release's agent
//! (`$PORTGATE_PREVIOUS_BIN`, built from this repository's history by `cargo xtask
//! build-previous`; its pins have an older layout and its rules file an older format) is
//! replaced by this one on the same state directory and pin directory, the way a package
//! upgrade does it, while a client keeps opening new connections every 20 ms to a port no
//! rule allows (it must never answer) and to one a rule allows. Real namespaces, the real
//! binaries. Need root.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use portgate_tests::agent::{find_rule, portgate_bin};
use portgate_tests::net::{SHOULD_ANSWER, exchange, sa, tcp_connect};
use portgate_tests::sandbox::BRIDGE;
use portgate_tests::{Agent, Sandbox, TcpEchoServer, require_root, skip};

/// The variable `cargo xtask test` sets to the previous release's binary.
const PREVIOUS_BIN: &str = "PORTGATE_PREVIOUS_BIN";
/// The allowed port (an echo server answers) and the one no rule allows (a server listens
/// there too: a connection that got through would be answered).
const ALLOWED: &str = "10.99.0.2:80";
const NOT_ALLOWED: &str = "10.99.0.2:22";
/// How often the prober opens a new connection to each port.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// How long a probe waits for its SYN to be answered: less than the first retransmission
/// (1 s), so that each probe is one SYN.
const PROBE_TIMEOUT: Duration = Duration::from_millis(900);
/// The time between stopping the old agent and starting the new one (a package manager
/// unpacking the new binary).
const UNPACK_GAP: Duration = Duration::from_millis(1000);

/// The previous release's binary; `None` after a skip (a failure in CI) saying why.
fn previous_bin() -> Option<PathBuf> {
    let Some(path) = std::env::var_os(PREVIOUS_BIN).map(PathBuf::from) else {
        skip(format_args!(
            "{PREVIOUS_BIN} is not set: `cargo xtask build-previous` builds the previous \
             release's portgate and prints its path (cargo xtask test sets it)"
        ));
        return None;
    };
    if !path.is_file() {
        skip(format_args!(
            "{PREVIOUS_BIN}={} does not exist: run `cargo xtask build-previous`",
            path.display()
        ));
        return None;
    }
    Some(path)
}

macro_rules! setup {
    () => {{
        if !require_root() {
            return;
        }
        match previous_bin() {
            Some(path) => path,
            None => return,
        }
    }};
}

/// How one probe ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// The SYN was answered: the connection opened.
    Answered,
    /// Refused (a RST): something answered, so the packet got through too.
    Refused,
    /// No answer within [`PROBE_TIMEOUT`]: dropped.
    TimedOut,
}

#[derive(Clone, Copy, Debug)]
struct Probe {
    /// Index into the prober's targets.
    target: usize,
    /// When it was sent, from the prober's start.
    at: Duration,
    outcome: Outcome,
}

/// Opens a new TCP connection to each target every [`PROBE_EVERY`] from a namespace, without
/// waiting for the previous ones (non-blocking connects), until stopped.
struct Prober {
    started: Instant,
    stop: Arc<AtomicBool>,
    probes: Arc<Mutex<Vec<Probe>>>,
    thread: Option<JoinHandle<()>>,
}

impl Prober {
    fn start(ns: &str, targets: Vec<SocketAddr>) -> Self {
        let netns = File::open(Sandbox::netns_path(ns)).expect("open the client's namespace");
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, probes) = (stop.clone(), probes.clone());
            std::thread::spawn(move || {
                // SAFETY: setns on a valid namespace fd, for this thread only.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    panic!("setns: {}", io::Error::last_os_error());
                }
                probe_loop(&targets, started, &stop, &probes);
            })
        };
        Prober {
            started,
            stop,
            probes,
            thread: Some(thread),
        }
    }

    /// The time since the prober started (the probes' clock).
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops probing, waits for the pending probes, returns every probe.
    fn finish(mut self) -> Vec<Probe> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the prober panicked");
        }
        std::mem::take(&mut *self.probes.lock().expect("probes"))
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn probe_loop(
    targets: &[SocketAddr],
    started: Instant,
    stop: &AtomicBool,
    probes: &Mutex<Vec<Probe>>,
) {
    let mut pending: Vec<(usize, Duration, socket2::Socket)> = Vec::new();
    let mut next = Instant::now();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if !stopping && Instant::now() >= next {
            next += PROBE_EVERY;
            for (target, addr) in targets.iter().enumerate() {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(*addr),
                    socket2::Type::STREAM,
                    None,
                )
                .expect("socket");
                socket.set_nonblocking(true).expect("non-blocking");
                match socket.connect(&(*addr).into()) {
                    Ok(()) => record(probes, target, started.elapsed(), Outcome::Answered),
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                        pending.push((target, started.elapsed(), socket));
                    }
                    Err(e) => panic!("connect to {addr}: {e}"),
                }
            }
        }
        if stopping && pending.is_empty() {
            return;
        }
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|(_, _, socket)| libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfds of the length passed.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 2) };
        if ready < 0 {
            panic!("poll: {}", io::Error::last_os_error());
        }
        if fds.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
        let now = started.elapsed();
        let mut still = Vec::with_capacity(pending.len());
        for (index, (target, at, socket)) in pending.drain(..).enumerate() {
            let revents = fds[index].revents;
            if revents != 0 {
                let outcome = match socket.take_error().expect("SO_ERROR") {
                    None => Outcome::Answered,
                    Some(e) if e.kind() == ErrorKind::ConnectionRefused => Outcome::Refused,
                    Some(e) => panic!("probe to {}: {e}", targets[target]),
                };
                record(probes, target, at, outcome);
            } else if now - at >= PROBE_TIMEOUT {
                record(probes, target, at, Outcome::TimedOut);
            } else {
                still.push((target, at, socket));
            }
        }
        pending = still;
    }
}

fn record(probes: &Mutex<Vec<Probe>>, target: usize, at: Duration, outcome: Outcome) {
    probes.lock().expect("probes").push(Probe {
        target,
        at,
        outcome,
    });
}

/// The probes' outcomes to one target in a time window (by the time they were sent).
#[derive(Debug, Default)]
struct Tally {
    sent: usize,
    answered: usize,
    refused: usize,
    timed_out: usize,
}

fn tally(probes: &[Probe], target: usize, from: Duration, to: Duration) -> Tally {
    let mut t = Tally::default();
    for p in probes
        .iter()
        .filter(|p| p.target == target && p.at >= from && p.at < to)
    {
        t.sent += 1;
        match p.outcome {
            Outcome::Answered => t.answered += 1,
            Outcome::Refused => t.refused += 1,
            Outcome::TimedOut => t.timed_out += 1,
        }
    }
    t
}

/// The layout directories (`v2`, `v3`, ...) under an agent's pin directory.
fn layouts(bpffs: &Path) -> BTreeSet<String> {
    std::fs::read_dir(bpffs)
        .unwrap_or_else(|e| panic!("{}: {e}", bpffs.display()))
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            name.strip_prefix('v')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

/// The files (pins) under an agent's pin directory, relative to it.
fn pin_files(bpffs: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, base, out);
            } else {
                out.push(path.strip_prefix(base).unwrap_or(&path).to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(bpffs, bpffs, &mut out);
    out.sort();
    out
}

/// The ids of the programs attached (TCX) to the sandbox bridge's egress and to the
/// container's bridge port's ingress, asked of the kernel in the host namespace.
fn attached(sb: &Sandbox) -> (Vec<u32>, Vec<u32>) {
    sb.in_netns(&sb.host, || {
        let ifindex = |name: &str| {
            let name = std::ffi::CString::new(name).expect("name");
            // SAFETY: a valid NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(index, 0, "no interface {name:?} in the host namespace");
            index
        };
        let query = |dev: &str, hook: u32| {
            portgate_bpf_sys::tcx_programs(ifindex(dev), hook)
                .unwrap_or_else(|e| panic!("BPF_PROG_QUERY on {dev}: {e}"))
        };
        (
            query(BRIDGE, portgate_bpf_sys::BPF_TCX_EGRESS),
            query("vctr", portgate_bpf_sys::BPF_TCX_INGRESS),
        )
    })
}

/// The `version` of the agent's rules file.
fn rules_file_version(agent: &Agent) -> u64 {
    let path = agent.state_dir.join("rules.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("rules.json is JSON");
    json["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("rules.json has no version: {text}"))
}

/// An established connection through the gate, and whether it still carries a request.
fn still_talks(stream: &mut std::net::TcpStream, message: &str) -> Result<(), String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    match exchange(stream, message) {
        Ok(reply) if reply == message => Ok(()),
        Ok(reply) => Err(format!("a wrong echo: {reply:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Starts the agent and waits until it answers `status` (Ok) or exits (Err: the last `error`
/// line of its log).
fn ready_or_refused(agent: &mut Agent) -> Result<(), String> {
    let before = agent.log_text().len();
    agent.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if !agent.is_running() {
            agent.kill(); // reaps it
            let log = agent.log_text();
            return Err(log[before..]
                .lines()
                .rfind(|l| l.contains("error"))
                .unwrap_or("(no error in the log)")
                .to_owned());
        }
        if agent.cli(&["status"]).status.success() {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "the agent neither started nor exited; log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the agent and waits for it to exit on its own; returns the last `error:` line of
/// its log (what a user sees).
fn refusal(agent: &mut Agent, what: &str) -> String {
    let before = agent.log_text().len();
    agent.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.is_running() {
        assert!(
            Instant::now() < deadline,
            "{what}: the agent should have refused to start; log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.kill(); // reaps it
    let log = agent.log_text();
    log[before..]
        .lines()
        .rfind(|l| l.contains("error"))
        .unwrap_or_else(|| panic!("{what}: no error in the log:\n{}", &log[before..]))
        .to_owned()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// SIGTERM, as the package's prerm/systemd does.
    Term,
    /// SIGKILL: the old agent crashed before the upgrade.
    Kill,
}

fn upgrade(previous: &Path, how: Stop) {
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa(ALLOWED));
    let closed = TcpEchoServer::start(&sb, &sb.container, sa(NOT_ALLOWED));
    let mut agent = Agent::new(&sb, &[]);
    agent.use_bin(previous, false);
    agent.spawn();
    agent.wait_ready();
    agent.allow("10.99.0.2", "80/tcp");
    let old_layouts = layouts(&agent.bpffs);
    assert_eq!(
        old_layouts.len(),
        1,
        "the previous release pins one layout: {old_layouts:?}"
    );
    assert!(
        !old_layouts.contains(gate_common::LAYOUT_VERSION),
        "the previous release should have an older pin layout than {}: {old_layouts:?}",
        gate_common::LAYOUT_VERSION
    );
    let old_format = rules_file_version(&agent);
    let mut established = tcp_connect(&sb, &sb.client, sa(ALLOWED), SHOULD_ANSWER)
        .expect("connect through the old gate");
    still_talks(&mut established, "before").expect("the established connection, before");

    let prober = Prober::start(&sb.client, vec![sa(ALLOWED), sa(NOT_ALLOWED)]);
    std::thread::sleep(Duration::from_secs(2));
    let stopped_at = prober.now();
    match how {
        Stop::Term => agent.stop(),
        Stop::Kill => agent.kill(),
    }
    std::thread::sleep(UNPACK_GAP);
    let started_at = prober.now();
    agent.use_bin(&portgate_bin(), true);
    agent.spawn();
    agent.wait_ready();
    let ready_at = prober.now();
    std::thread::sleep(Duration::from_secs(3));
    let end = prober.now();
    let probes = prober.finish();

    let connection = still_talks(&mut established, "after");
    let list = agent.list_json();
    let new_layouts = layouts(&agent.bpffs);
    let (egress, ingress) = attached(&sb);

    let phases = [
        ("old agent", Duration::ZERO, stopped_at),
        ("no agent", stopped_at, started_at),
        ("new agent starting", started_at, ready_at),
        ("new agent ready", ready_at, end),
    ];
    eprintln!(
        "upgrade ({how:?}) from the previous release (layout {old_layouts:?}, rules file \
         format {old_format}); the new agent took {:.0} ms to be ready",
        (ready_at - started_at).as_secs_f64() * 1000.0
    );
    for (name, from, to) in phases {
        let allowed = tally(&probes, 0, from, to);
        let not_allowed = tally(&probes, 1, from, to);
        eprintln!(
            "  {name:<20} {:>6.2}-{:>6.2} s: allowed port {}/{} answered ({} timed out, {} \
             refused); not-allowed port {}/{} answered or refused",
            from.as_secs_f64(),
            to.as_secs_f64(),
            allowed.answered,
            allowed.sent,
            allowed.timed_out,
            allowed.refused,
            not_allowed.answered + not_allowed.refused,
            not_allowed.sent
        );
    }
    eprintln!("  established connection after the upgrade: {connection:?}");
    eprintln!(
        "  pins: {old_layouts:?} -> {new_layouts:?}; attached: {} on {BRIDGE} egress, {} on \
         vctr ingress",
        egress.len(),
        ingress.len()
    );

    let not_allowed = tally(&probes, 1, Duration::ZERO, end);
    assert!(not_allowed.sent > 200, "too few probes: {not_allowed:?}");
    assert_eq!(
        (not_allowed.answered, not_allowed.refused),
        (0, 0),
        "the port no rule allows must never answer, before, during or after the upgrade"
    );
    assert_eq!(
        closed.accepted(),
        0,
        "no connection reached the closed port"
    );
    let after = tally(&probes, 0, ready_at, end);
    assert!(
        after.sent > 50,
        "too few probes after the upgrade: {after:?}"
    );
    assert_eq!(
        after.answered, after.sent,
        "the allowed port must answer once the new agent is ready: {after:?}"
    );
    let overall = tally(&probes, 0, Duration::ZERO, end);
    assert_eq!(
        overall.answered, overall.sent,
        "the pinned gate enforces without an agent: the allowed port should answer throughout \
         the switch: {overall:?}"
    );

    assert!(
        find_rule(&list, "10.99.0.2", "tcp", 80, 80).is_some(),
        "the rule survives the upgrade: {list}"
    );
    assert!(
        [1, 2].contains(&rules_file_version(&agent)),
        "the rules file stays readable"
    );
    assert_eq!(
        new_layouts,
        BTreeSet::from([gate_common::LAYOUT_VERSION.to_owned()]),
        "only the new layout's pins are left"
    );
    assert_eq!(
        (egress.len(), ingress.len()),
        (1, 1),
        "one set of programs on the bridge and its port"
    );
    assert_eq!(
        connection,
        Ok(()),
        "the established connection survives the upgrade"
    );
    agent.stop();
}

#[test]
fn an_upgrade_from_the_previous_release_keeps_the_gate_closed_and_the_rules() {
    let previous = setup!();
    upgrade(&previous, Stop::Term);
}

#[test]
fn an_upgrade_after_the_previous_agent_was_killed_keeps_the_gate_closed() {
    let previous = setup!();
    upgrade(&previous, Stop::Kill);
}

/// Back to the previous release on the new agent's pins and state: with the rules file as
/// the new agent found it (format 1), then after the new agent saved it (format 2, which the
/// previous release cannot read). The port no rule allows never answers.
#[test]
fn a_downgrade_to_the_previous_release_never_opens_the_gate() {
    let previous = setup!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa(ALLOWED));
    let closed = TcpEchoServer::start(&sb, &sb.container, sa(NOT_ALLOWED));
    let current = portgate_bin();
    let mut agent = Agent::new(&sb, &[]);
    agent.use_bin(previous.as_path(), false);
    agent.spawn();
    agent.wait_ready();
    agent.allow("10.99.0.2", "80/tcp");
    let prober = Prober::start(&sb.client, vec![sa(ALLOWED), sa(NOT_ALLOWED)]);

    // Up.
    agent.stop();
    agent.use_bin(&current, true);
    agent.spawn();
    agent.wait_ready();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(rules_file_version(&agent), 1, "nothing saved yet");
    // Down, on a rules file the previous release reads.
    agent.stop();
    agent.use_bin(&previous, false);
    let first = match ready_or_refused(&mut agent) {
        Ok(()) => {
            let layouts = layouts(&agent.bpffs);
            let list = agent.list_json();
            assert!(
                find_rule(&list, "10.99.0.2", "tcp", 80, 80).is_some(),
                "the previous release kept the rule: {list}"
            );
            agent.stop();
            let left: Vec<PathBuf> = pin_files(&agent.bpffs)
                .into_iter()
                .filter(|p| p.starts_with(gate_common::LAYOUT_VERSION))
                .collect();
            format!(
                "started and gates; pins now {layouts:?}, of {} left: {left:?}",
                gate_common::LAYOUT_VERSION
            )
        }
        Err(error) => format!("refused: {error}"),
    };
    std::thread::sleep(Duration::from_secs(1));
    let after_first = prober.now();

    // Up again, and a change that saves the rules in the new format.
    agent.use_bin(&current, true);
    agent.spawn();
    agent.wait_ready();
    agent.allow("10.99.0.2", "443/tcp");
    assert_eq!(
        rules_file_version(&agent),
        2,
        "a save writes the new format"
    );
    std::thread::sleep(Duration::from_secs(1));
    agent.stop();
    // Down, on a rules file the previous release cannot read.
    agent.use_bin(&previous, false);
    let second = refusal(&mut agent, "the previous release on a format 2 rules file");
    let refused_at = prober.now();
    std::thread::sleep(Duration::from_secs(2));
    let layouts_after = layouts(&agent.bpffs);
    let pins_after = pin_files(&agent.bpffs);
    let (egress, ingress) = attached(&sb);
    let end = prober.now();
    let probes = prober.finish();

    let not_allowed = tally(&probes, 1, Duration::ZERO, end);
    let allowed = tally(&probes, 0, Duration::ZERO, end);
    let allowed_after_refusal = tally(&probes, 0, refused_at, end);
    eprintln!("downgrade on a format 1 rules file: {first}");
    eprintln!("downgrade on a format 2 rules file: {second}");
    eprintln!(
        "  probes: not-allowed port {}/{} answered or refused; allowed port {}/{} answered \
         ({} timed out; {}/{} after the refusal); pins after the refusal {layouts_after:?}, \
         attached {}+{}; first downgrade done at {:.1} s",
        not_allowed.answered + not_allowed.refused,
        not_allowed.sent,
        allowed.answered,
        allowed.sent,
        allowed.timed_out,
        allowed_after_refusal.answered,
        allowed_after_refusal.sent,
        egress.len(),
        ingress.len(),
        after_first.as_secs_f64()
    );
    assert!(not_allowed.sent > 200, "too few probes: {not_allowed:?}");
    assert_eq!(
        (not_allowed.answered, not_allowed.refused),
        (0, 0),
        "the port no rule allows must never answer across the downgrades"
    );
    assert_eq!(
        closed.accepted(),
        0,
        "no connection reached the closed port"
    );
    assert!(
        second.contains("format version 2"),
        "the previous release should say it cannot read the rules file: {second}"
    );
    assert_eq!(
        allowed_after_refusal.answered, allowed_after_refusal.sent,
        "the refused downgrade leaves the pinned gate enforcing the rules"
    );
    assert!(
        pins_after
            .iter()
            .all(|p| p.starts_with(gate_common::LAYOUT_VERSION)),
        "the refused downgrade pinned nothing (it may leave its empty directories): {pins_after:?}"
    );
    assert_eq!((egress.len(), ingress.len()), (1, 1));

    // And forward again: the current agent takes over its own pins.
    agent.use_bin(&current, true);
    agent.spawn();
    agent.wait_ready();
    assert!(find_rule(&agent.list_json(), "10.99.0.2", "tcp", 443, 443).is_some());
    assert_eq!(
        layouts(&agent.bpffs),
        BTreeSet::from([gate_common::LAYOUT_VERSION.to_owned()]),
        "the current agent retires what the previous release left"
    );
    agent.stop();
}
