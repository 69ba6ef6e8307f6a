//! The agent under faults and bad input: garbage on the control socket, slow and many
//! clients, a broken or unwritable rules file, and many restarts (SIGTERM and SIGKILL) while
//! traffic runs. Real namespaces and the real agent. Need root.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use portgate_tests::agent::rules;
use portgate_tests::net::{
    SHOULD_ANSWER, assert_tcp_answers, assert_tcp_times_out, exchange, paced_download, sa,
    tcp_connect,
};
use portgate_tests::{Agent, Sandbox, TcpEchoServer, require_root, run_ok};

macro_rules! require_root {
    () => {
        if !require_root() {
            return;
        }
    };
}

/// Sends `bytes` on the control socket, closes its writing side, and returns the answer.
fn raw_request(agent: &Agent, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(&agent.socket).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    // A large request may be cut short by the agent (it stops reading at its limit).
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn bad_control_requests_get_errors_and_change_nothing() {
    require_root!();
    let sb = Sandbox::new();
    let agent = Agent::start(&sb);
    agent.allow("10.99.0.2", "80/tcp");
    let before = agent.list_json();

    let oversized = format!(
        "{{\"op\":\"block\",\"prefixes\":[{}]}}",
        vec!["\"10.0.0.1\""; 1_000_000].join(",")
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        (
            "truncated",
            br#"{"op":"allow","target":"10.99.0.2","po"#.to_vec(),
        ),
        ("malformed", b"not json at all".to_vec()),
        ("unknown op", br#"{"op":"format_disk"}"#.to_vec()),
        (
            "wrong types",
            br#"{"op":"allow","target":7,"ports":[],"published":"yes"}"#.to_vec(),
        ),
        ("binary", (0..=255u8).cycle().take(4096).collect()),
        ("oversized", oversized.into_bytes()),
    ];
    for (what, bytes) in cases {
        let answer = raw_request(&agent, &bytes);
        assert!(
            answer.contains("\"error\""),
            "{what}: the agent should answer with an error, got {answer:?}"
        );
    }
    // A slow client that never finishes its request does not hold up the others.
    let slow = UnixStream::connect(&agent.socket).expect("connect");
    let started = Instant::now();
    agent.cli_ok(&["status", "--json"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a slow client held up status for {:?}",
        started.elapsed()
    );
    // Many clients at once each get their answer.
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..32)
            .map(|_| scope.spawn(|| agent.cli(&["list", "--json"]).status.success()))
            .collect();
        let answered = handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .filter(|ok| *ok)
            .count();
        assert_eq!(answered, 32, "every concurrent client should be answered");
    });
    drop(slow);
    assert_eq!(
        rules(&agent.list_json()),
        rules(&before),
        "bad requests must change nothing"
    );
}

/// Starts the agent and waits for it to exit on its own (it must not start serving).
fn assert_refuses_to_start(agent: &mut Agent, what: &str) {
    agent.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.is_running() {
        assert!(
            Instant::now() < deadline,
            "{what}: the agent should refuse to start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_broken_rules_file_stops_the_agent_with_a_clear_error_and_stays_as_it_was() {
    require_root!();
    let sb = Sandbox::new();
    let cases: [(&str, &[u8], &str); 4] = [
        ("zero bytes", b"", "corrupt"),
        (
            "truncated",
            br#"{"version": 2, "rules": [{"id": 0, "tar"#,
            "corrupt",
        ),
        (
            "wrong version",
            br#"{"version": 99, "rules": []}"#,
            "format version 99",
        ),
        ("not JSON", b"\x00\x01\x02", "corrupt"),
    ];
    for (what, content, expected) in cases {
        let mut agent = Agent::new(&sb, &[]);
        std::fs::create_dir_all(&agent.state_dir).expect("state dir");
        let file = agent.state_dir.join("rules.json");
        std::fs::write(&file, content).expect("write the broken file");
        assert_refuses_to_start(&mut agent, what);
        let log = agent.log_text();
        assert!(
            log.contains(expected) && log.contains("rules.json"),
            "{what}: the error should name the file and say {expected:?}: {log}"
        );
        assert_eq!(
            std::fs::read(&file).expect("read"),
            content,
            "{what}: the file must stay as it was"
        );
    }
    // Unreadable: a directory where the file should be.
    let mut agent = Agent::new(&sb, &[]);
    std::fs::create_dir_all(agent.state_dir.join("rules.json")).expect("dir");
    assert_refuses_to_start(&mut agent, "unreadable");
    assert!(
        agent.log_text().contains("cannot read rules"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn a_full_disk_during_a_save_keeps_the_old_rules_and_opens_nothing() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _other = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:81"));
    let mut agent = Agent::new(&sb, &[]);
    std::fs::create_dir_all(&agent.state_dir).expect("state dir");
    let state = agent.state_dir.display().to_string();
    run_ok(Command::new("mount").args(["-t", "tmpfs", "-o", "size=64k", "tmpfs", &state]));
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").args(["-l", &self.0]).status();
        }
    }
    let _unmount = Unmount(state.clone());
    agent.spawn();
    agent.wait_ready();
    agent.allow("10.99.0.2", "80/tcp");
    let saved = std::fs::read(agent.state_dir.join("rules.json")).expect("saved rules");
    // Fill the disk.
    let filler = agent.state_dir.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 64 * 1024]);

    let output = agent.cli(&["allow", "10.99.0.2", "81/tcp"]);
    assert!(!output.status.success(), "a save on a full disk must fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot write rules"), "{stderr}");
    assert_eq!(
        std::fs::read(agent.state_dir.join("rules.json")).expect("rules"),
        saved,
        "the old file stays intact"
    );
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:81"));
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    assert_eq!(
        rules(&agent.list_json()).len(),
        1,
        "the agent kept the old rules"
    );
    // Room again: the same change goes through.
    std::fs::remove_file(&filler).expect("free the disk");
    agent.cli_ok(&["allow", "10.99.0.2", "81/tcp"]);
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:81"));
    agent.stop();
}

fn restarts() -> usize {
    std::env::var("PORTGATE_FAULT_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

/// Restarts, SIGTERM and SIGKILL mixed, while an established connection talks and a paced
/// download runs (both must lose nothing), new connections to the allowed port keep coming
/// (each must be answered: the gate enforces without the agent), and the blocked port is
/// tried (it must never answer).
#[test]
fn many_restarts_under_traffic_lose_nothing_and_open_nothing() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _blocked = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:22"));
    let mut agent = Agent::start(&sb);
    agent.allow("10.99.0.2", "80/tcp");
    agent.allow("10.99.0.2", "8080/tcp");
    let mut established =
        tcp_connect(&sb, &sb.client, sa("10.99.0.2:80"), SHOULD_ANSWER).expect("connect");
    let download_stop = AtomicBool::new(false);

    let stop = Arc::new(AtomicBool::new(false));
    let (answered, refused, blocked_answered) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let download = std::thread::scope(|scope| {
        let download = scope.spawn(|| paced_download(&sb, &download_stop));
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let ok = tcp_connect(&sb, &sb.client, sa("10.99.0.2:80"), Duration::from_secs(3))
                    .and_then(|mut stream| exchange(&mut stream, "new"))
                    .is_ok();
                let counter = if ok { &answered } else { &refused };
                counter.fetch_add(1, Ordering::SeqCst);
                if tcp_connect(
                    &sb,
                    &sb.client,
                    sa("10.99.0.2:22"),
                    Duration::from_millis(200),
                )
                .is_ok()
                {
                    blocked_answered.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        for round in 0..restarts() {
            if round % 2 == 0 {
                agent.stop();
            } else {
                agent.kill();
            }
            let message = format!("round {round}");
            assert_eq!(
                exchange(&mut established, &message).expect("the established connection"),
                message
            );
            agent.spawn();
            agent.wait_ready();
        }
        stop.store(true, Ordering::SeqCst);
        download_stop.store(true, Ordering::SeqCst);
        download.join().expect("download")
    });
    let (sent, received) = download;
    assert_eq!(
        received, sent,
        "the download lost bytes across the restarts"
    );
    assert!(sent > 0);
    let (answered, refused) = (
        answered.load(Ordering::SeqCst),
        refused.load(Ordering::SeqCst),
    );
    eprintln!(
        "{} restarts: {answered} new connections answered, {refused} not; download {sent} bytes, all received",
        restarts()
    );
    assert_eq!(
        refused, 0,
        "new connections to the allowed port must be answered throughout"
    );
    assert!(answered > 0);
    assert_eq!(
        blocked_answered.load(Ordering::SeqCst),
        0,
        "the blocked port must never answer"
    );
}
