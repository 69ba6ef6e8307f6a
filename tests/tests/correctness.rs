//! Correct under real traffic and under attack, end to end (sandbox, real agent, real
//! kernel): fragmented datagrams of admitted flows pass, with conntrack and without; a
//! connection request over a stale flow is judged by today's rules; a block ends live
//! sessions; `deny --cut` and the end of `--for` end what their rules admitted.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use portgate_tests::agent::counter;
use portgate_tests::net::{
    SHOULD_ANSWER, SHOULD_TIME_OUT, exchange, sa, send_syn, tcp_connect, tcp_connect_bound,
};
use portgate_tests::{Agent, Sandbox, TcpEchoServer, require_root, run_ok};

macro_rules! require_root {
    () => {
        if !require_root() {
            return;
        }
    };
}

/// A UDP echo server for datagrams of any size (up to 64 KiB).
struct BigUdpEcho {
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BigUdpEcho {
    fn start(sb: &Sandbox, ns: &str, addr: SocketAddr) -> Self {
        let socket = sb
            .in_netns(ns, || UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind udp {addr} in {ns}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set_read_timeout");
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let stopping = stopping.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stopping.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
        };
        Self {
            stopping,
            thread: Some(thread),
        }
    }
}

impl Drop for BigUdpEcho {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether a `size`-byte datagram from `ns` to `to` comes back whole (the MTU is 1500, so
/// both ways travel as fragments).
fn big_datagram_echoed(sb: &Sandbox, ns: &str, to: SocketAddr, size: usize) -> bool {
    let any = if to.is_ipv4() {
        sa("0.0.0.0:0")
    } else {
        sa("[::]:0")
    };
    let socket = sb.in_netns(ns, || UdpSocket::bind(any)).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("set_read_timeout");
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    socket.send_to(&payload, to).expect("send");
    let mut buf = vec![0u8; 65_536];
    match socket.recv_from(&mut buf) {
        Ok((n, _)) => {
            assert_eq!(&buf[..n], &payload[..], "echo of {size} bytes from {to}");
            true
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        Err(e) => panic!("datagram to {to}: {e}"),
    }
}

/// Turns on connection tracking in the sandbox's host namespace, as on every container host:
/// netfilter then reassembles datagrams and sends them on as fragments again.
fn with_conntrack(sb: &Sandbox) {
    let ruleset = "table inet pgct {\n chain forward {\n  type filter hook forward priority 0; policy accept;\n  ct state new,established,related counter accept\n }\n}\n";
    let path = std::env::temp_dir().join(format!("{}-conntrack.nft", sb.id));
    std::fs::write(&path, ruleset).expect("write ruleset");
    run_ok(sb.command_in(&sb.host, "nft").arg("-f").arg(&path));
    let _ = std::fs::remove_file(path);
}

#[test]
fn fragmented_datagrams_of_admitted_flows_pass_with_and_without_conntrack() {
    require_root!();
    let sb = Sandbox::new();
    let _echo = BigUdpEcho::start(&sb, &sb.container, sa("10.99.0.2:5353"));
    let _echo6 = BigUdpEcho::start(&sb, &sb.container, sa("[fd99::2]:5353"));
    let _closed = BigUdpEcho::start(&sb, &sb.container, sa("10.99.0.2:5354"));
    let _outside = BigUdpEcho::start(&sb, &sb.client, sa("10.98.0.2:7000"));
    let _outside6 = BigUdpEcho::start(&sb, &sb.client, sa("[fd98::2]:7000"));
    let agent = Agent::start(&sb);
    agent.allow("10.99.0.2", "5353/udp");
    agent.allow("fd99::2", "5353/udp");
    for conntrack in [false, true] {
        if conntrack {
            with_conntrack(&sb);
        }
        for size in [1000, 3000, 9000] {
            for to in ["10.99.0.2:5353", "[fd99::2]:5353"] {
                assert!(
                    big_datagram_echoed(&sb, &sb.client, sa(to), size),
                    "{size} bytes to {to} (conntrack: {conntrack}) should come back"
                );
            }
            // The container's own flow: its answer comes back in fragments.
            for to in ["10.98.0.2:7000", "[fd98::2]:7000"] {
                assert!(
                    big_datagram_echoed(&sb, &sb.container, sa(to), size),
                    "{size} bytes from the container to {to} (conntrack: {conntrack})"
                );
            }
        }
        assert!(
            !big_datagram_echoed(&sb, &sb.client, sa("10.99.0.2:5354"), 3000),
            "a port no rule opens stays closed to fragments (conntrack: {conntrack})"
        );
    }
    let status = agent.status_json();
    assert!(
        counter(&status, "pass", "fragment_followed") > 0,
        "{status}"
    );
    assert!(counter(&status, "drop", "fragment") > 0, "{status}");
}

#[test]
fn a_syn_over_a_stale_flow_is_judged_by_todays_rules() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:81"));
    let agent = Agent::start(&sb);
    agent.allow("10.99.0.2", "81");
    // The client's kernel would reset the container's answer to a SYN it did not send
    // through a socket: dropped, so the gate's entry stays half-open.
    let ruleset = "table inet norst {\n chain out {\n  type filter hook output priority 0;\n  tcp flags rst drop\n }\n}\n";
    let path = std::env::temp_dir().join(format!("{}-norst.nft", sb.id));
    std::fs::write(&path, ruleset).expect("write ruleset");
    run_ok(sb.command_in(&sb.client, "nft").arg("-f").arg(&path));
    let _ = std::fs::remove_file(path);
    let port = |p: u16| std::net::SocketAddrV4::new("10.98.0.2".parse().expect("ip"), p);
    send_syn(
        &sb,
        &sb.client,
        port(41001),
        "10.99.0.2:81".parse().expect("addr"),
    );
    std::thread::sleep(Duration::from_millis(300));
    agent.deny("10.99.0.2", "81");
    // Long enough for the container's half-open request to go, so only the gate decides.
    std::thread::sleep(Duration::from_secs(8));
    for local in ["10.98.0.2:41001", "10.98.0.2:41002"] {
        let result = tcp_connect_bound(
            &sb,
            &sb.client,
            sa(local),
            sa("10.99.0.2:81"),
            SHOULD_TIME_OUT,
        );
        assert!(
            matches!(&result, Err(e) if e.kind() == io::ErrorKind::TimedOut),
            "a connection from {local} after the deny must time out, got {result:?}"
        );
    }
}

/// An open connection to the container's echo server, and whether it still answers.
fn answers(stream: &mut std::net::TcpStream) -> bool {
    stream
        .set_read_timeout(Some(SHOULD_TIME_OUT))
        .expect("set_read_timeout");
    exchange(stream, "still there?").is_ok()
}

#[test]
fn a_block_ends_live_sessions_ipv4_and_ipv6() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _web6 = TcpEchoServer::start(&sb, &sb.container, sa("[fd99::2]:80"));
    let agent = Agent::start(&sb);
    agent.allow("10.99.0.2", "80");
    agent.allow("fd99::2", "80");
    let mut v4 = tcp_connect(&sb, &sb.client, sa("10.99.0.2:80"), SHOULD_ANSWER).expect("v4");
    let mut v6 = tcp_connect(&sb, &sb.client, sa("[fd99::2]:80"), SHOULD_ANSWER).expect("v6");
    assert!(
        answers(&mut v4) && answers(&mut v6),
        "answered before the block"
    );
    let said = agent.cli_ok(&["block", "10.98.0.2/32", "fd98::2/128"]);
    assert!(said.contains("2 live connections"), "{said}");
    assert!(
        !answers(&mut v4),
        "the IPv4 session must end with the block"
    );
    assert!(
        !answers(&mut v6),
        "the IPv6 session must end with the block"
    );
    let status = agent.status_json();
    assert!(counter(&status, "drop", "cut") > 0, "{status}");
    assert_eq!(status["flows"]["cut"], 2, "{status}");
    agent.cli_ok(&["unblock", "10.98.0.2/32", "fd98::2/128"]);
    let mut again = tcp_connect(&sb, &sb.client, sa("10.99.0.2:80"), SHOULD_ANSWER).expect("v4");
    assert!(answers(&mut again), "a new connection after the unblock");
}

#[test]
fn deny_keeps_established_connections_unless_cut_and_for_ends_them() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let agent = Agent::start(&sb);
    agent.allow("10.99.0.2", "80");
    let mut kept = tcp_connect(&sb, &sb.client, sa("10.99.0.2:80"), SHOULD_ANSWER).expect("a");
    assert!(answers(&mut kept));
    let said = agent.cli_ok(&["deny", "10.99.0.2", "80"]);
    assert!(said.contains("established connections continue"), "{said}");
    assert!(
        answers(&mut kept),
        "a plain deny keeps established connections"
    );

    agent.allow("10.99.0.2", "80");
    let mut cut = tcp_connect(&sb, &sb.client, sa("10.99.0.2:80"), SHOULD_ANSWER).expect("b");
    assert!(answers(&mut cut));
    let said = agent.cli_ok(&["deny", "10.99.0.2", "80", "--cut"]);
    assert!(said.contains("established connections ended"), "{said}");
    assert!(!answers(&mut cut), "deny --cut ends the connection");

    // Temporary access means temporary: the rule's end ends its connections.
    agent.cli_ok(&["allow", "10.99.0.2", "80", "--for", "3s"]);
    let mut temporary = tcp_connect(&sb, &sb.client, sa("10.99.0.2:80"), SHOULD_ANSWER).expect("c");
    assert!(answers(&mut temporary));
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        !answers(&mut temporary),
        "the end of --for ends the connection"
    );
    let mut buf = [0u8; 1];
    let _ = temporary.write_all(b"x");
    let _ = temporary.read(&mut buf);
}
