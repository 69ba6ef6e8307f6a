//! Seeing what the gate does: `portgate watch`, and switching between enforce and audit at
//! run time. Real namespaces, bridge, agent and kernel; root only.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use portgate_tests::agent::counter;
use portgate_tests::net::{
    SHOULD_ANSWER, assert_tcp_answers, assert_tcp_times_out, exchange, sa, tcp_connect,
};
use portgate_tests::{Agent, Sandbox, TcpEchoServer, UdpEchoServer, require_root};
use serde_json::Value;

macro_rules! require_root {
    () => {
        if !require_root() {
            return;
        }
    };
}

/// `portgate watch --json` running against the agent, its lines collected on a thread.
struct Watch {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Watch {
    fn start(agent: &Agent) -> Self {
        let mut child = std::process::Command::new(portgate_tests::agent::portgate_bin())
            .arg("--socket")
            .arg(&agent.socket)
            .args(["watch", "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start portgate watch");
        let stdout = child.stdout.take().expect("watch stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad watch line {line:?}: {e}"));
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        // The agent subscribes the client when it reads the request: give it a moment.
        thread::sleep(Duration::from_millis(300));
        Self { child, lines }
    }

    /// Events received within `wait`.
    fn collect(&self, wait: Duration) -> Vec<Value> {
        let deadline = Instant::now() + wait;
        let mut events = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(event) => events.push(event),
                Err(_) => break,
            }
        }
        events
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn watch_reports_the_blocked_attempts_with_their_reason() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _dns = UdpEchoServer::start(&sb, &sb.container, sa("[fd99::2]:53"));
    let agent = Agent::start(&sb);
    agent.allow("10.99.0.2", "80");
    let watch = Watch::start(&agent);

    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:81"));
    portgate_tests::net::assert_udp_no_reply(&sb, &sb.client, sa("[fd99::2]:53"));

    let events = watch.collect(Duration::from_secs(2));
    let tcp: Vec<&Value> = events
        .iter()
        .filter(|e| e["destination_port"] == 81)
        .collect();
    assert!(
        !tcp.is_empty(),
        "no event for the blocked TCP attempt: {events:#?}"
    );
    for event in &tcp {
        assert_eq!(event["reason"], "not_allowed");
        assert_eq!(event["protocol"], "tcp");
        assert_eq!(event["source"], "10.98.0.2");
        assert_eq!(event["destination"], "10.99.0.2");
        assert_eq!(event["bridge"], "pgbr0");
        assert_eq!(event["audit"], false);
    }
    let udp: Vec<&Value> = events
        .iter()
        .filter(|e| e["destination_port"] == 53)
        .collect();
    assert!(
        !udp.is_empty(),
        "no event for the blocked UDP datagram: {events:#?}"
    );
    assert_eq!(udp[0]["protocol"], "udp");
    assert_eq!(udp[0]["source"], "fd98::2");
    assert_eq!(udp[0]["destination"], "fd99::2");
    assert!(
        events.iter().all(|e| e["destination_port"] != 80),
        "the allowed connection was reported as dropped: {events:#?}"
    );

    // status carries the same drops, per bridge.
    let status = agent.status_json();
    let per_bridge = status["bridge_drops"].as_array().expect("bridge_drops");
    assert!(
        per_bridge.iter().any(|d| d["bridge"] == "pgbr0"
            && d["reason"] == "not_allowed"
            && d["packets"].as_u64() >= Some(2)),
        "{per_bridge:?}"
    );
    assert!(status["drop_events"]["reported"].as_u64() >= Some(tcp.len() as u64 + 1));
}

#[test]
fn switching_modes_keeps_tracked_connections() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _other = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:81"));
    let agent = Agent::start(&sb);
    agent.allow("10.99.0.2", "80");
    let mut allowed =
        tcp_connect(&sb, &sb.client, sa("10.99.0.2:80"), SHOULD_ANSWER).expect("connect :80");
    assert_eq!(exchange(&mut allowed, "one").expect("echo"), "one");

    // Audit: what enforce drops now answers, and is counted as a would-be drop.
    let out = agent.cli_ok(&["mode", "audit"]);
    assert!(out.contains("audit"), "{out}");
    assert_eq!(agent.status_json()["mode"], "audit");
    let mut audited = tcp_connect(&sb, &sb.client, sa("10.99.0.2:81"), SHOULD_ANSWER)
        .expect("connect :81 in audit");
    assert_eq!(exchange(&mut audited, "two").expect("echo"), "two");
    let status = agent.status_json();
    assert!(counter(&status, "event", "audit_passed") > 0);
    assert!(counter(&status, "drop", "not_allowed") > 0);
    assert_eq!(
        exchange(&mut allowed, "three").expect("echo across the switch"),
        "three"
    );

    // Back to enforce: new connections to 81 time out, the admitted one carries on.
    agent.cli_ok(&["mode", "enforce"]);
    assert_eq!(agent.status_json()["mode"], "enforce");
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:81"));
    assert_eq!(
        exchange(&mut allowed, "four").expect("echo after the switch back"),
        "four"
    );
}

#[test]
fn control_requests_are_answered_while_drop_events_stream() {
    require_root!();
    let sb = Sandbox::new();
    let agent = Agent::start(&sb);
    let mut watch = Watch::start(&agent);
    // A steady stream of blocked datagrams keeps the agent loop busy with drop events.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let socket = sb
            .in_netns(&sb.client, || std::net::UdpSocket::bind("10.98.0.2:0"))
            .expect("udp socket");
        thread::spawn(move || {
            let mut sent = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 50_000 {
                let _ = socket.send_to(b"x", "10.99.0.2:9");
                sent += 1;
                thread::sleep(Duration::from_micros(200));
            }
        })
    };
    // What the watcher got before the requests start does not count.
    thread::sleep(Duration::from_millis(200));
    let before = watch.lines.try_iter().count();
    let mut failures = Vec::new();
    for i in 0..60 {
        let output = agent.cli(&["status", "--json"]);
        if !output.status.success() {
            failures.push(format!(
                "#{i}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
    }
    // The events that reached the watcher while the requests were answered.
    let during: Vec<Value> = watch.lines.try_iter().collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().expect("flood thread");
    assert!(
        failures.is_empty(),
        "control requests lost while events streamed: {failures:?}"
    );
    let flood_events = during
        .iter()
        .filter(|e| {
            e["destination_port"] == 9 && e["protocol"] == "udp" && e["reason"] == "not_allowed"
        })
        .count();
    println!(
        "{} events while the requests ran ({before} before), {flood_events} of the flood",
        during.len()
    );
    assert!(
        flood_events >= 10,
        "the watcher got {flood_events} drop events of the flood while the requests ran: \
         {during:#?}"
    );
    assert!(
        watch
            .child
            .try_wait()
            .expect("poll portgate watch")
            .is_none(),
        "portgate watch ended while events streamed"
    );
    let status = agent.status_json();
    assert!(
        counter(&status, "drop", "not_allowed") > 100,
        "the flood was not dropped: {status}"
    );
}
