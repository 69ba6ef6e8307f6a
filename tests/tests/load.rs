//! Load: as many allowed new TCP connections per second as the machine manages through the
//! gate (the target is 10 000/s), from the client namespace to a server in the container
//! namespace, while the agent is watched every 250 ms: its CPU (utime + stime from
//! /proc/PID/stat), its RSS (VmRSS), and the answer times of `portgate list --json`,
//! `portgate status --json` and a GET of /metrics, each asked again as soon as it answered
//! (after a 250 ms pause). Once with a handful of rules, once with 100 000 saved rules
//! (`--max-rules 100000`; the rules file 100 000 `portgate allow ADDRESS 80` leave behind),
//! whose loading is timed too.
//!
//! What a user would notice is asserted: every allowed connection is accepted and answered
//! (none refused, reset or timed out), the agent keeps answering (each answer within a
//! generous bound that only a hang exceeds: these are not performance assertions), its RSS
//! does not keep growing (where it settles at the end is at most a quarter above what it held
//! by the end of the warm-up), and a restart with 100 000 rules loads them all again. The
//! figures (connections/s reached, CPU, RSS, answer times'
//! medians, p99 and maximum, the size of a scrape) are printed.
//!
//! `PORTGATE_SOAK_SECS` sets how long the traffic runs (default 10 s); `cargo xtask soak`
//! runs this file with 60. `PORTGATE_LOAD_RATE` sets the target rate (default 10 000/s).
//! Needs root.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portgate_tests::sandbox::{CONTAINER_V4, in_netns};
use portgate_tests::{Agent, Sandbox, require_root};

/// Where the agent serves metrics, inside the sandbox's host namespace.
const METRICS_ADDR: &str = "127.0.0.1:9561";
/// The port the container serves and the rule allows.
const PORT: u16 = 80;
/// Client threads opening connections (each one connection at a time).
const CLIENTS: usize = 16;
/// An answer slower than this is a hang, not a slow machine: generous, since `cargo xtask
/// test` runs a debug build, on a machine other tests share, and with 100 000 rules a
/// `list --json` is 60 MB of JSON that the agent writes and the CLI reads and prints again.
const ANSWER_BOUND: Duration = Duration::from_secs(60);
/// One load test at a time: they measure the machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
/// Pause between two questions of one kind.
const PROBE_PAUSE: Duration = Duration::from_millis(250);
/// Samples before this are the warm-up (the flow table filling).
const WARM_UP: Duration = Duration::from_secs(2);
/// Saved rules in the many-rules variant.
const MANY_RULES: u32 = 100_000;
/// The RSS at the end, against what the agent held by the end of the warm-up, may be at
/// most this fraction (1/4) more: a leak of 60 bytes per connection (100 000 of them in the
/// default 10 s) exceeds it with a few rules, where the RSS is about 23 MB and flat.
const RSS_GROWTH_DIVISOR: u64 = 4;
/// The end of a run, over which the least RSS sampled is where it settled.
const SETTLE: Duration = Duration::from_secs(2);

fn traffic_secs() -> u64 {
    std::env::var("PORTGATE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

fn target_rate() -> u64 {
    std::env::var("PORTGATE_LOAD_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

/// Writes straight to stderr: libtest does not capture it, so the figures always show.
fn report(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// A server in the container namespace that answers each connection with one byte and
/// closes it first (so the clients, closing second, keep no TIME_WAIT and never run out
/// of ports).
struct ByteServer {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl ByteServer {
    fn start(sb: &Sandbox, addr: SocketAddr) -> Self {
        let listener: TcpListener = sb
            .in_netns(&sb.container, || {
                let socket = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                socket.set_reuse_address(true)?;
                socket.bind(&addr.into())?;
                socket.listen(4096)?;
                std::io::Result::Ok(socket.into())
            })
            .unwrap_or_else(|e| panic!("listen on {addr} in the container: {e}"));
        listener.set_nonblocking(true).expect("non-blocking");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let threads = (0..2)
            .map(|_| {
                let listener = listener.try_clone().expect("clone listener");
                let (stop, accepted) = (stop.clone(), accepted.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((mut stream, _)) => {
                                accepted.fetch_add(1, Ordering::Relaxed);
                                let _ = stream.set_nonblocking(false);
                                let _ = stream.write_all(b"x");
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_micros(200));
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(1)),
                        }
                    }
                })
            })
            .collect();
        ByteServer {
            stop,
            accepted,
            threads,
            addr,
        }
    }
}

impl Drop for ByteServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What the clients saw.
#[derive(Default)]
struct Traffic {
    ok: u64,
    failed: u64,
    /// The first few failures, for the message.
    errors: Vec<String>,
    elapsed: Duration,
}

/// Opens connections from the client namespace to `addr` for `secs`, paced at `rate` per
/// second over all clients; each must be accepted, answer its byte and close.
fn run_traffic(sb: &Sandbox, addr: SocketAddr, secs: u64, rate: u64) -> Traffic {
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let next_slot = AtomicU64::new(0);
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..CLIENTS {
            scope.spawn(|| {
                in_netns(&sb.client, || {
                    loop {
                        let slot = next_slot.fetch_add(1, Ordering::Relaxed);
                        let due = start + Duration::from_nanos(slot * 1_000_000_000 / rate);
                        let now = Instant::now();
                        if due >= end || now >= end {
                            return;
                        }
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        match one_connection(addr) {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let mut errors = errors.lock().unwrap_or_else(|e| e.into_inner());
                                if errors.len() < 5 {
                                    errors.push(e);
                                }
                            }
                        }
                    }
                })
            });
        }
    });
    Traffic {
        ok: ok.into_inner(),
        failed: failed.into_inner(),
        errors: errors.into_inner().unwrap_or_else(|e| e.into_inner()),
        elapsed: start.elapsed(),
    }
}

fn one_connection(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::with_capacity(1);
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    if answer != b"x" {
        return Err(format!("answer {answer:?}, expected \"x\""));
    }
    Ok(())
}

/// The agent's CPU time so far (utime + stime, in clock ticks) and RSS (kB).
fn cpu_and_rss(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("agent's stat");
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let after = &stat[stat.rfind(')').expect("stat has (comm)") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command.
    let ticks =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent's status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    (ticks, rss)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).unwrap_or(100).max(1)
}

/// `GET /metrics` in the host namespace: the time to the last byte, and the body's size.
fn scrape(sb: &Sandbox) -> Result<(Duration, usize), String> {
    sb.in_netns(&sb.host, || {
        let started = Instant::now();
        let mut stream = TcpStream::connect(METRICS_ADDR).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(ANSWER_BOUND))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .map_err(|e| format!("read: {e}"))?;
        let elapsed = started.elapsed();
        let text_start = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no HTTP header")?;
        if !response.starts_with(b"HTTP/1.0 200") && !response.starts_with(b"HTTP/1.1 200") {
            let head = String::from_utf8_lossy(&response[..text_start]).into_owned();
            return Err(format!("not 200: {head}"));
        }
        Ok((elapsed, response.len() - text_start - 4))
    })
}

/// Answer times of one kind of question, in the order asked.
#[derive(Default)]
struct Answers {
    times: Vec<Duration>,
    failures: Vec<String>,
    /// Bytes of the last answer (scrapes).
    size: usize,
}

impl Answers {
    fn summary(&self) -> String {
        let mut sorted = self.times.clone();
        sorted.sort();
        if sorted.is_empty() {
            return "no answers".to_owned();
        }
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        format!(
            "{} answers, median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            sorted.len(),
            ms(at(0.5)),
            ms(at(0.99)),
            ms(sorted[sorted.len() - 1])
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One `(cpu ticks, rss kB)` sample and when it was taken.
struct Sample {
    at: Duration,
    ticks: u64,
    rss_kb: u64,
}

/// What the watchers saw while the traffic ran.
struct Watched {
    samples: Vec<Sample>,
    list: Answers,
    status: Answers,
    scrape: Answers,
}

/// Runs the traffic while watching the agent; asserts and prints what a user would notice.
fn load_and_watch(sb: &Sandbox, agent: &Agent<'_>, label: &str) {
    let pid = agent.pid().expect("agent running");
    let server = ByteServer::start(sb, SocketAddr::from(([10, 99, 0, 2], PORT)));
    // Each question once before the traffic: the answer times of an idle agent, and the
    // memory a first answer takes is part of the warm-up, not growth.
    let idle = |args: &[&str]| {
        let asked = Instant::now();
        agent.cli_ok(args);
        asked.elapsed()
    };
    let (idle_list, idle_status) = (idle(&["list", "--json"]), idle(&["status", "--json"]));
    let (idle_scrape, _) = scrape(sb).expect("a scrape before the traffic");
    let (secs, rate) = (traffic_secs(), target_rate());
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let (traffic, watched) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let (ticks, rss_kb) = cpu_and_rss(pid);
                samples.push(Sample {
                    at: started.elapsed(),
                    ticks,
                    rss_kb,
                });
                std::thread::sleep(PROBE_PAUSE);
            }
            samples
        });
        let cli_prober = |args: &'static [&'static str]| {
            let done = &done;
            scope.spawn(move || {
                let mut answers = Answers::default();
                while !done.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    let output = agent.cli(args);
                    let took = asked.elapsed();
                    answers.times.push(took);
                    if !output.status.success() {
                        answers
                            .failures
                            .push(String::from_utf8_lossy(&output.stderr).into_owned());
                    } else if took > ANSWER_BOUND {
                        answers.failures.push(format!("answered after {took:?}"));
                    }
                    answers.size = output.stdout.len();
                    std::thread::sleep(PROBE_PAUSE);
                }
                answers
            })
        };
        let list = cli_prober(&["list", "--json"]);
        let status = cli_prober(&["status", "--json"]);
        let scraper = scope.spawn(|| {
            let mut answers = Answers::default();
            while !done.load(Ordering::Relaxed) {
                match scrape(sb) {
                    Ok((took, size)) => {
                        answers.times.push(took);
                        answers.size = size;
                        if took > ANSWER_BOUND {
                            answers.failures.push(format!("answered after {took:?}"));
                        }
                    }
                    Err(e) => answers.failures.push(e),
                }
                std::thread::sleep(PROBE_PAUSE);
            }
            answers
        });
        let traffic = run_traffic(sb, server.addr, secs, rate);
        done.store(true, Ordering::Relaxed);
        let watched = Watched {
            samples: sampler.join().expect("sampler"),
            list: list.join().expect("list prober"),
            status: status.join().expect("status prober"),
            scrape: scraper.join().expect("scraper"),
        };
        (traffic, watched)
    });
    let accepted = server.accepted.load(Ordering::Relaxed);
    drop(server);

    let per_second = traffic.ok as f64 / traffic.elapsed.as_secs_f64();
    let tick = clock_ticks();
    let warm: Vec<&Sample> = watched.samples.iter().filter(|s| s.at >= WARM_UP).collect();
    let cpu_percent: Vec<f64> = watched
        .samples
        .windows(2)
        .map(|w| {
            let busy = (w[1].ticks - w[0].ticks) as f64 / tick as f64;
            100.0 * busy / (w[1].at - w[0].at).as_secs_f64()
        })
        .collect();
    let whole_cpu = match (watched.samples.first(), watched.samples.last()) {
        (Some(a), Some(b)) if b.at > a.at => {
            100.0 * (b.ticks - a.ticks) as f64 / tick as f64 / (b.at - a.at).as_secs_f64()
        }
        _ => 0.0,
    };
    let max_cpu = cpu_percent.iter().copied().fold(0.0, f64::max);
    let rss: Vec<u64> = watched.samples.iter().map(|s| s.rss_kb).collect();
    // What the agent held by the end of the warm-up (its largest answers included: a list
    // or a scrape of many rules takes memory while it is written), against the end.
    let first_warm = watched
        .samples
        .iter()
        .take_while(|s| s.at <= warm.first().map_or(WARM_UP, |w| w.at))
        .map(|s| s.rss_kb)
        .max()
        .unwrap_or(0);
    let last = rss.last().copied().unwrap_or(0);
    // Where the RSS settled at the end: the least of the last samples, so that a large answer
    // being written just then (a list of many rules is 60 MB) does not count as growth.
    let settled = watched
        .samples
        .iter()
        .filter(|s| s.at + SETTLE >= watched.samples.last().map_or(Duration::ZERO, |l| l.at))
        .map(|s| s.rss_kb)
        .min()
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    report(&format!(
        "\nload figures ({label}; {secs} s at a target of {rate}/s, {CLIENTS} clients; machine load average {}):\n\
         \x20 idle agent, before the traffic: list --json {:.1} ms, status --json {:.1} ms, GET /metrics {:.1} ms\n\
         \x20 connections: {} accepted and answered, {} failed, {per_second:.0}/s reached (server accepted {accepted})\n\
         \x20 agent CPU: {whole_cpu:.1} % of one core over the run, max {max_cpu:.1} % per {} ms sample\n\
         \x20 agent RSS: first {} kB, largest by the end of the warm-up {first_warm} kB, max {} kB, settled at the end {settled} kB, last {last} kB\n\
         \x20 list --json: {} ({} bytes)\n\
         \x20 status --json: {}\n\
         \x20 GET /metrics: {} ({} bytes)\n",
        load.trim(),
        ms(idle_list),
        ms(idle_status),
        ms(idle_scrape),
        traffic.ok,
        traffic.failed,
        PROBE_PAUSE.as_millis(),
        rss.first().copied().unwrap_or(0),
        rss.iter().copied().max().unwrap_or(0),
        watched.list.summary(),
        watched.list.size,
        watched.status.summary(),
        watched.scrape.summary(),
        watched.scrape.size,
    ));

    assert_eq!(
        traffic.failed, 0,
        "{label}: every allowed connection must be accepted and answered; first failures: {:?}",
        traffic.errors
    );
    assert!(traffic.ok > 0, "{label}: no connection at all");
    for (what, answers) in [
        ("list --json", &watched.list),
        ("status --json", &watched.status),
        ("GET /metrics", &watched.scrape),
    ] {
        assert!(
            answers.failures.is_empty(),
            "{label}: `{what}` must keep answering within {ANSWER_BOUND:?}: {:?}",
            answers.failures
        );
        assert!(
            !answers.times.is_empty(),
            "{label}: `{what}` never answered"
        );
    }
    assert!(
        first_warm > 0 && settled > 0,
        "{label}: no RSS samples after the warm-up ({rss:?})"
    );
    assert!(
        settled <= first_warm + first_warm / RSS_GROWTH_DIVISOR,
        "{label}: the agent's RSS keeps growing: {first_warm} kB by the end of the warm-up, \
         {settled} kB at the end (least of the last {SETTLE:?}; more than 1/{RSS_GROWTH_DIVISOR} \
         more) ({rss:?})"
    );
    let status = agent.status_json();
    let accepted_by_gate = status["counters"]["pass"]["new_allowed"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        accepted_by_gate >= traffic.ok,
        "{label}: the gate admitted {accepted_by_gate} new connections, the clients saw {} answered",
        traffic.ok
    );
}

fn start_agent<'a>(sb: &'a Sandbox, extra: &[&str], before: impl FnOnce(&Agent<'a>)) -> Agent<'a> {
    let mut args = vec!["--no-netfilter", "--metrics-addr", METRICS_ADDR];
    args.extend_from_slice(extra);
    let mut agent = Agent::new(sb, &args);
    before(&agent);
    agent.spawn();
    agent.wait_ready();
    agent
}

#[test]
fn allowed_connections_at_full_rate_keep_the_agent_answering_and_bounded() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sb = Sandbox::new();
    let agent = start_agent(&sb, &[], |_| {});
    agent.allow(CONTAINER_V4, &PORT.to_string());
    load_and_watch(&sb, &agent, "a few rules");
}

/// The rules file 100 000 `portgate allow` calls leave: address rules 172.16.0.1, ... (port
/// 80/tcp each, none of them on the bridge), then the container's own rule.
fn many_rules_file(count: u32) -> String {
    let rule = |id: u32, address: std::net::Ipv4Addr| {
        format!(
            r#"{{"id":{id},"target":{{"address":"{address}"}},"ports":{{"spec":{{"protocol":"tcp","port_start":80,"port_end":80}}}}}}"#
        )
    };
    let base = u32::from(std::net::Ipv4Addr::new(172, 16, 0, 1));
    let mut rules: Vec<String> = (0..count - 1)
        .map(|i| rule(i, std::net::Ipv4Addr::from(base + i)))
        .collect();
    rules.push(rule(count - 1, CONTAINER_V4.parse().expect("address")));
    format!(r#"{{"version":2,"rules":[{}]}}"#, rules.join(","))
}

#[test]
fn with_100000_rules_list_status_and_scrapes_answer_and_the_agent_stays_bounded() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sb = Sandbox::new();
    let max = MANY_RULES.to_string();
    let started = Instant::now();
    let agent = start_agent(&sb, &["--max-rules", &max], |agent| {
        std::fs::create_dir_all(&agent.state_dir).expect("state dir");
        std::fs::write(
            agent.state_dir.join("rules.json"),
            many_rules_file(MANY_RULES),
        )
        .expect("write the rules file");
    });
    let loaded = started.elapsed();
    let status = agent.status_json();
    assert_eq!(status["rules"], MANY_RULES, "every saved rule is loaded");
    assert_eq!(
        status["allow_entries"]["used"], MANY_RULES,
        "{}",
        status["allow_entries"]
    );

    // One more does not fit: a clear one-line error, nothing changed.
    let refused = agent.cli(&["allow", "172.31.0.1", "80"]);
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && message.contains("--max-rules")
            && message.trim().lines().count() == 1,
        "a rule beyond --max-rules is refused in one line: {message}"
    );
    let asked = Instant::now();
    agent.deny("172.16.0.1", "80");
    let deny_took = asked.elapsed();
    let asked = Instant::now();
    agent.allow("172.31.0.1", "80");
    let allow_took = asked.elapsed();
    assert_eq!(agent.status_json()["rules"], MANY_RULES);
    report(&format!(
        "\n{MANY_RULES} saved rules: agent started and ready in {:.2} s (programs loaded, rules file read, allow map written); \
         then one deny {:.0} ms, one allow {:.0} ms (each saves the whole rules file)\n",
        loaded.as_secs_f64(),
        ms(deny_took),
        ms(allow_took)
    ));
    load_and_watch(&sb, &agent, "100 000 saved rules");
    // The restart reads them again and finds the pinned counters of the same size.
    let mut agent = agent;
    let asked = Instant::now();
    agent.restart();
    report(&format!(
        "restart with {MANY_RULES} saved rules (stop, start, ready): {:.2} s\n",
        asked.elapsed().as_secs_f64()
    ));
    // Every rule came back, in the allow map, and the container's own rule is applied.
    let status = agent.status_json();
    assert_eq!(
        status["rules"], MANY_RULES,
        "every saved rule is loaded again after the restart"
    );
    assert_eq!(
        status["allow_entries"]["used"], MANY_RULES,
        "after the restart: {}",
        status["allow_entries"]
    );
    let server = ByteServer::start(&sb, SocketAddr::from(([10, 99, 0, 2], PORT)));
    in_netns(&sb.client, || one_connection(server.addr))
        .unwrap_or_else(|e| panic!("the container's rule after the restart: {e}"));
}
