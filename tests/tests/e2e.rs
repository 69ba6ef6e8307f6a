//! End-to-end tests: real namespaces, a real bridge, the real agent in the real kernel.
//! Each test builds its own sandbox and agent, so tests run in parallel. Need root; without
//! it each test says it is skipped.

use portgate_tests::agent::{counter, find_rule, rule_counters, rules};
use portgate_tests::net::{
    SHOULD_ANSWER, assert_tcp_answers, assert_tcp_times_out, assert_udp_answers,
    assert_udp_no_reply, exchange, sa, tcp_connect,
};
use portgate_tests::sandbox::{BRIDGE, CLIENT_V4, CLIENT_V6, CONTAINER_V4, CONTAINER_V6};
use portgate_tests::{Agent, Sandbox, TcpEchoServer, UdpEchoServer, require_root};
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

/// Skips the test (saying why) unless running as root.
macro_rules! require_root {
    () => {
        if !require_root() {
            return;
        }
    };
}

#[test]
fn baseline_without_gate_everything_answers() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _web6 = TcpEchoServer::start(&sb, &sb.container, sa("[fd99::2]:80"));
    let _dns = UdpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:53"));
    let _outside = TcpEchoServer::start(&sb, &sb.client, sa("10.98.0.2:9000"));

    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    assert_tcp_answers(&sb, &sb.client, sa("[fd99::2]:80"));
    assert_udp_answers(&sb, &sb.client, sa("10.99.0.2:53"));
    assert_tcp_answers(&sb, &sb.container, sa("10.98.0.2:9000"));
    assert!(
        sb.ping(&sb.client, CONTAINER_V4, 2),
        "client should reach the container by ping"
    );
    assert!(
        sb.ping(&sb.client, CONTAINER_V6, 2),
        "client should reach the container by ping -6"
    );
    assert!(
        sb.ping(&sb.container, CLIENT_V4, 2),
        "container should reach the client by ping"
    );
    // Nothing listens on 81: without a gate the container's kernel refuses at once, which is
    // what tells a dropped connection (timeout) from a closed port.
    let refused = tcp_connect(&sb, &sb.client, sa("10.99.0.2:81"), SHOULD_ANSWER).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
}

/// (address, protocol, port_start, port_end) of every listed rule, sorted: what a user
/// reads in `portgate list`, without the counters.
fn rule_set(list: &serde_json::Value) -> Vec<(String, String, u64, u64)> {
    let mut set: Vec<_> = rules(list)
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap_or_default().to_owned(),
                r["protocol"].as_str().unwrap_or_default().to_owned(),
                r["port_start"].as_u64().unwrap_or(u64::MAX),
                r["port_end"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    set.sort();
    set
}

/// Whether any listed rule admits (address, protocol, port).
fn listed_covers(list: &serde_json::Value, address: &str, protocol: &str, port: u64) -> bool {
    rule_set(list)
        .iter()
        .any(|(a, p, s, e)| a == address && p == protocol && *s <= port && port <= *e)
}

/// Asserts a rule's packets and bytes moved since `before` (packets, bytes).
fn assert_rule_counters_moved(
    agent: &Agent,
    address: &str,
    proto: &str,
    port: u64,
    before: (u64, u64),
) {
    let list = agent.list_json();
    let rule = find_rule(&list, address, proto, port, port)
        .unwrap_or_else(|| panic!("rule {address} {port}/{proto} not listed: {list}"));
    let (packets, bytes) = rule_counters(rule);
    assert!(
        packets > before.0 && bytes > before.1,
        "rule {address} {port}/{proto}: counters should move with the traffic it admitted: \
         before {before:?}, after ({packets}, {bytes})"
    );
    // Every packet of a TCP/IP connection is at least 40 bytes of headers.
    assert!(
        bytes - before.1 >= 40 * (packets - before.0),
        "rule {address} {port}/{proto}: {} bytes for {} packets is too few",
        bytes - before.1,
        packets - before.0
    );
}

fn rule_counters_of(agent: &Agent, address: &str, proto: &str, port: u64) -> (u64, u64) {
    let list = agent.list_json();
    let rule = find_rule(&list, address, proto, port, port)
        .unwrap_or_else(|| panic!("rule {address} {port}/{proto} not listed: {list}"));
    rule_counters(rule)
}

/// Asserts a failed CLI call in the contract's form: non-zero exit, one line on stderr
/// starting with "error: ". Returns that line.
fn assert_cli_error(output: &std::process::Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "`{what}` should fail, exited {} (stderr: {stderr})",
        output.status
    );
    let message = stderr.trim_end();
    assert!(
        message.starts_with("error: ") && !message.contains('\n'),
        "`{what}`: expected one line on stderr starting with \"error: \", got:\n{stderr}"
    );
    message.to_owned()
}

#[test]
fn not_allowed_port_does_not_answer_and_counts_a_drop() {
    require_root!();
    let sb = Sandbox::new();
    let web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let agent = Agent::start(&sb);

    let status = agent.status_json();
    assert_eq!(status["mode"], "enforce", "{status}");
    let bridges = status["bridges"]
        .as_array()
        .unwrap_or_else(|| panic!("no bridges: {status}"));
    assert!(
        bridges
            .iter()
            .any(|b| b["name"] == "pgbr0" && b["attached"] == true),
        "pgbr0 should be listed as attached: {status}"
    );
    let dropped_before = counter(&status, "drop", "not_allowed");

    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:80"));
    assert_eq!(
        web.accepted(),
        0,
        "the container should never have seen the connection"
    );

    let dropped_after = counter(&agent.status_json(), "drop", "not_allowed");
    assert!(
        dropped_after > dropped_before,
        "drop counter not_allowed should move: before {dropped_before}, after {dropped_after}"
    );
}

#[test]
fn allowed_port_answers_and_its_rule_counts_the_traffic() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let other = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:81"));
    let agent = Agent::start(&sb);

    agent.allow(CONTAINER_V4, "80");
    let before = rule_counters_of(&agent, CONTAINER_V4, "tcp", 80);
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    assert_rule_counters_moved(&agent, CONTAINER_V4, "tcp", 80, before);

    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:81"));
    assert_eq!(
        other.accepted(),
        0,
        "port 81 has no rule: the container should not see it"
    );
}

#[test]
fn ipv6_allowed_port_answers_and_others_do_not() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("[fd99::2]:80"));
    let other = TcpEchoServer::start(&sb, &sb.container, sa("[fd99::2]:81"));
    let agent = Agent::start(&sb);

    assert_tcp_times_out(&sb, &sb.client, sa("[fd99::2]:80"));
    agent.allow(CONTAINER_V6, "80/tcp");
    let before = rule_counters_of(&agent, CONTAINER_V6, "tcp", 80);
    assert_tcp_answers(&sb, &sb.client, sa("[fd99::2]:80"));
    assert_rule_counters_moved(&agent, CONTAINER_V6, "tcp", 80, before);

    assert_tcp_times_out(&sb, &sb.client, sa("[fd99::2]:81"));
    assert_eq!(other.accepted(), 0);
}

#[test]
fn deny_closes_the_port_again() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let agent = Agent::start(&sb);

    agent.allow(CONTAINER_V4, "80");
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    agent.deny(CONTAINER_V4, "80");
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:80"));
    let list = agent.list_json();
    assert!(
        !listed_covers(&list, CONTAINER_V4, "tcp", 80),
        "denied rule still listed: {list}"
    );
}

#[test]
fn range_rule_admits_its_ports_and_deny_cuts_a_hole() {
    require_root!();
    let sb = Sandbox::new();
    let _servers: Vec<_> = (8000..=8003)
        .map(|port| TcpEchoServer::start(&sb, &sb.container, sa(&format!("10.99.0.2:{port}"))))
        .collect();
    let agent = Agent::start(&sb);
    let port = |p: u16| sa(&format!("10.99.0.2:{p}"));

    agent.allow(CONTAINER_V4, "8000-8002/tcp");
    let list = agent.list_json();
    assert!(
        find_rule(&list, CONTAINER_V4, "tcp", 8000, 8002).is_some(),
        "range not listed: {list}"
    );
    assert_tcp_answers(&sb, &sb.client, port(8001));
    assert_tcp_times_out(&sb, &sb.client, port(8003));

    agent.deny(CONTAINER_V4, "8001");
    assert_tcp_answers(&sb, &sb.client, port(8000));
    assert_tcp_answers(&sb, &sb.client, port(8002));
    assert_tcp_times_out(&sb, &sb.client, port(8001));
    let list = agent.list_json();
    assert!(
        !listed_covers(&list, CONTAINER_V4, "tcp", 8001),
        "8001 still listed: {list}"
    );
    assert!(
        listed_covers(&list, CONTAINER_V4, "tcp", 8000),
        "8000 no longer listed: {list}"
    );
    assert!(
        listed_covers(&list, CONTAINER_V4, "tcp", 8002),
        "8002 no longer listed: {list}"
    );
}

#[test]
fn udp_allowed_port_answers_and_others_get_no_reply() {
    require_root!();
    let sb = Sandbox::new();
    let _dns = UdpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:53"));
    let _dns6 = UdpEchoServer::start(&sb, &sb.container, sa("[fd99::2]:53"));
    let other = UdpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:54"));
    let agent = Agent::start(&sb);

    assert_udp_no_reply(&sb, &sb.client, sa("10.99.0.2:53"));
    agent.allow(CONTAINER_V4, "53/udp");
    agent.allow(CONTAINER_V6, "53/udp");
    let before = rule_counters_of(&agent, CONTAINER_V4, "udp", 53);
    assert_udp_answers(&sb, &sb.client, sa("10.99.0.2:53"));
    assert_udp_answers(&sb, &sb.client, sa("[fd99::2]:53"));
    let after = rule_counters_of(&agent, CONTAINER_V4, "udp", 53);
    assert!(
        after.0 >= before.0 + 2,
        "request and reply should count: {before:?} -> {after:?}"
    );

    assert_udp_no_reply(&sb, &sb.client, sa("10.99.0.2:54"));
    assert_eq!(
        other.received(),
        0,
        "54/udp has no rule: the container should not see it"
    );
    // A UDP rule does not open TCP on the same port.
    let _tcp53 = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:53"));
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:53"));
}

#[test]
fn container_initiated_traffic_needs_no_rule_but_inbound_ping_does() {
    require_root!();
    let sb = Sandbox::new();
    let _outside = TcpEchoServer::start(&sb, &sb.client, sa("10.98.0.2:9000"));
    let _outside_udp = UdpEchoServer::start(&sb, &sb.client, sa("10.98.0.2:9053"));
    let agent = Agent::start(&sb);

    // Replies to what the container started come back in, with no rule at all.
    assert_tcp_answers(&sb, &sb.container, sa("10.98.0.2:9000"));
    assert_udp_answers(&sb, &sb.container, sa("10.98.0.2:9053"));
    assert!(
        sb.ping(&sb.container, CLIENT_V4, 2),
        "ping from the container should be answered"
    );
    assert!(
        sb.ping(&sb.container, CLIENT_V6, 2),
        "ping -6 from the container should be answered"
    );

    // An echo request from outside is a new connection like any other.
    assert!(
        !sb.ping(&sb.client, CONTAINER_V4, 1),
        "ping to the container should be dropped"
    );
    agent.allow(CONTAINER_V4, "icmp");
    assert!(
        sb.ping(&sb.client, CONTAINER_V4, 2),
        "ping should be answered once icmp is allowed"
    );
}

#[test]
fn established_connection_survives_an_agent_restart() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _other = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:81"));
    let mut agent = Agent::start(&sb);
    agent.allow(CONTAINER_V4, "80");

    let mut conn = tcp_connect(&sb, &sb.client, sa("10.99.0.2:80"), SHOULD_ANSWER)
        .expect("connection to the allowed port");
    assert_eq!(
        exchange(&mut conn, "before").expect("echo before the restart"),
        "before"
    );

    agent.stop();
    // Fail closed: the gate keeps enforcing while no agent runs...
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:81"));
    // ...and keeps admitting what it admitted.
    assert_eq!(
        exchange(&mut conn, "stopped").expect("echo while the agent is stopped"),
        "stopped"
    );

    agent.spawn();
    agent.wait_ready();
    assert_eq!(
        exchange(&mut conn, "after").expect("echo after the restart"),
        "after"
    );
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:81"));
}

#[test]
fn killed_agent_keeps_enforcing_and_starts_again() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _other = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:81"));
    let mut agent = Agent::start(&sb);
    agent.allow(CONTAINER_V4, "80");

    // A crash (SIGKILL) leaves the socket file and the pins behind, and the gate in place.
    agent.kill();
    assert_cli_error(&agent.cli(&["status"]), "portgate status (agent killed)");
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:81"));

    agent.spawn();
    agent.wait_ready();
    assert!(find_rule(&agent.list_json(), CONTAINER_V4, "tcp", 80, 80).is_some());
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:81"));
}

#[test]
fn rules_persist_across_a_restart() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let mut agent = Agent::start(&sb);
    agent.allow(CONTAINER_V4, "80");
    agent.allow(CONTAINER_V4, "8000-8002/tcp");
    agent.allow(CONTAINER_V6, "53/udp");
    agent.allow(CONTAINER_V4, "icmp");
    let before = rule_set(&agent.list_json());
    assert_eq!(before.len(), 4, "four rules added: {before:?}");

    agent.restart();
    let after = rule_set(&agent.list_json());
    assert_eq!(after, before, "rules after the restart");
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    assert!(
        sb.ping(&sb.client, CONTAINER_V4, 2),
        "icmp rule should still admit pings"
    );
}

#[test]
fn bad_input_is_rejected_and_changes_nothing() {
    require_root!();
    let sb = Sandbox::new();
    let agent = Agent::start(&sb);
    agent.allow(CONTAINER_V4, "80");
    let before = agent.list_json();

    for args in [
        ["allow", CONTAINER_V4, "0"],
        ["allow", CONTAINER_V4, "70000"],
        ["allow", CONTAINER_V4, "80/sctp"],
        ["allow", "not an address!", "80"],
        ["allow", "10.99.0.256", "80"],
    ] {
        let what = format!("portgate {}", args.join(" "));
        let message = assert_cli_error(&agent.cli(&args), &what);
        eprintln!("{what} -> {message}");
        let after = agent.list_json();
        assert_eq!(
            after["rules"], before["rules"],
            "`{what}` changed the rules"
        );
    }
}

#[test]
fn cli_without_a_running_agent_fails_clearly() {
    // No root needed: nothing is loaded, nothing namespaced.
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nobody-listens.sock");
    for args in [
        &["status"][..],
        &["list", "--json"],
        &["allow", CONTAINER_V4, "80"],
    ] {
        let output = std::process::Command::new(portgate_tests::portgate_bin())
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env_remove("PORTGATE_SOCKET")
            .output()
            .expect("run portgate");
        let what = format!("portgate --socket {} {}", socket.display(), args.join(" "));
        let message = assert_cli_error(&output, &what);
        eprintln!("{what} -> {message}");
        assert!(
            message.contains(&*socket.to_string_lossy())
                || message.to_lowercase().contains("agent"),
            "`{what}`: the error should name the socket or the agent: {message}"
        );
        assert!(
            output.stdout.is_empty(),
            "`{what}` printed to stdout: {:?}",
            output.stdout
        );
    }
}

#[test]
fn audit_mode_lets_everything_through_and_counts_what_it_would_drop() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let agent = Agent::start_with(&sb, &["--mode", "audit"]);

    let status = agent.status_json();
    assert_eq!(status["mode"], "audit", "{status}");
    let audit_before = counter(&status, "event", "audit_passed");
    let not_allowed_before = counter(&status, "drop", "not_allowed");

    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));

    let status = agent.status_json();
    let audit_after = counter(&status, "event", "audit_passed");
    let not_allowed_after = counter(&status, "drop", "not_allowed");
    assert!(
        audit_after > audit_before,
        "audit_passed should move: {audit_before} -> {audit_after}"
    );
    assert!(
        not_allowed_after > not_allowed_before,
        "not_allowed should move in audit mode too: {not_allowed_before} -> {not_allowed_after}"
    );
}

#[test]
fn uninstall_removes_the_gate() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let mut agent = Agent::start(&sb);
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:80"));

    agent.stop();
    let message = assert_cli_error(&agent.cli(&["status"]), "portgate status (agent stopped)");
    eprintln!("portgate status (agent stopped) -> {message}");
    assert!(
        agent.bpffs.exists(),
        "pins should stay while the agent is stopped"
    );
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:80"));

    let output = agent.uninstall();
    assert!(
        output.status.success(),
        "portgate uninstall --bpffs {} failed ({}): {}",
        agent.bpffs.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !agent.bpffs.exists(),
        "pin dir {} should be gone",
        agent.bpffs.display()
    );
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
}

#[test]
fn deny_takes_effect_while_an_engine_is_unreachable() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    // An engine that never answers: container rules wait for it, address rules must not.
    let missing = sb.host.clone() + "-no-docker.sock";
    let missing = std::env::temp_dir().join(missing);
    let missing = missing.to_str().expect("utf-8 path");
    let agent = Agent::start_with(&sb, &["--runtime", "docker", "--docker-socket", missing]);
    let status = agent.status_json();
    assert_eq!(status["engines"][0]["connected"], false, "{status}");
    agent.allow(CONTAINER_V4, "80");
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    agent.deny(CONTAINER_V4, "80");
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:80"));
}

#[test]
fn a_full_allow_map_keeps_what_fits_says_what_does_not_and_deny_still_closes() {
    require_root!();
    let sb = Sandbox::new();
    let _servers: Vec<_> = (80..=82)
        .map(|port| TcpEchoServer::start(&sb, &sb.container, sa(&format!("10.99.0.2:{port}"))))
        .collect();
    let port = |p: u16| sa(&format!("10.99.0.2:{p}"));
    let agent = Agent::start_with(&sb, &["--max-allow", "2"]);
    agent.allow(CONTAINER_V4, "80");
    agent.allow(CONTAINER_V4, "81");
    assert_tcp_answers(&sb, &sb.client, port(80));
    assert_tcp_answers(&sb, &sb.client, port(81));

    // One entry more than the map holds: the rule is saved, and the caller is told what
    // did not fit.
    let output = agent.cli(&["allow", CONTAINER_V4, "82"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "allow beyond the capacity should keep the rule and warn, exited {}: {stderr}",
        output.status
    );
    assert!(
        stderr.starts_with("warning: ")
            && stderr.contains("1 allow entry")
            && stderr.contains("rule 2")
            && stderr.contains("did not fit"),
        "the warning should say how many entries of which rule did not fit: {stderr}"
    );
    assert_tcp_times_out(&sb, &sb.client, port(82));
    let status = agent.status_json();
    let fill = &status["allow_entries"];
    assert_eq!(fill["used"], 2, "{status}");
    assert_eq!(fill["capacity"], 2, "{status}");
    assert_eq!(fill["not_fitted"], 1, "{status}");
    assert_eq!(fill["not_fitted_rules"], serde_json::json!([2]), "{status}");
    let text = agent.cli_ok(&["status"]);
    assert!(
        text.contains("1 MORE DID NOT FIT"),
        "status should say what did not fit:\n{text}"
    );

    // A deny while the map is full is applied at once, and the entry that waited takes the
    // room it frees.
    agent.deny(CONTAINER_V4, "81");
    assert_tcp_times_out(&sb, &sb.client, port(81));
    assert_tcp_answers(&sb, &sb.client, port(82));
    assert_tcp_answers(&sb, &sb.client, port(80));
    let status = agent.status_json();
    assert_eq!(status["allow_entries"]["not_fitted"], 0, "{status}");
    assert!(!agent.cli_ok(&["status"]).contains("DID NOT FIT"));
}

#[test]
fn a_second_agent_refuses_before_it_touches_the_gate() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let agent = Agent::start(&sb);
    let pid = agent.pid().expect("the agent runs");
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:80"));

    let other_state = agent.dir.path().join("other-state");
    let other_socket = agent.dir.path().join("other.sock");
    let cases = [
        // Started again by mistake: everything the same, in audit mode.
        (
            "the same pins, state and socket",
            &agent.state_dir,
            &agent.socket,
            "state directory",
        ),
        // Only the pins shared: the maps and links are what must not be touched.
        (
            "the same pins only",
            &other_state,
            &other_socket,
            "pin directory",
        ),
    ];
    for (what, state_dir, socket, locked) in cases {
        let mut second = sb.command_in(&sb.host, &agent.bin);
        second
            .args([
                "agent",
                "--bridge",
                BRIDGE,
                "--runtime",
                "none",
                "--mode",
                "audit",
            ])
            .args(["--metrics-addr", "off", "--bpffs"])
            .arg(&agent.bpffs)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--socket")
            .arg(socket)
            .env_remove("PORTGATE_SOCKET")
            .stdin(std::process::Stdio::null());
        let output = portgate_tests::engines::run_timeout(&mut second, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("a second agent with {what} should refuse at once: {e}"));
        let message = assert_cli_error(&output, &format!("a second agent with {what}"));
        eprintln!("second agent with {what} -> {message}");
        assert!(
            message.contains(&format!("pid {pid}")) && message.contains(locked),
            "a second agent with {what}: the error should name the running agent (pid {pid}) \
             and the {locked}: {message}"
        );
        assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:80"));
        let status = agent.status_json();
        assert_eq!(
            status["mode"], "enforce",
            "after a second agent with {what}: {status}"
        );
        assert!(agent.cli(&["status"]).status.success());
    }
    assert!(!other_socket.exists(), "the second agent bound a socket");
    let lock = agent.state_dir.join("agent.lock");
    let mode = std::fs::metadata(&lock)
        .unwrap_or_else(|e| panic!("{}: {e}", lock.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{} is root-only", lock.display());

    // `uninstall` refuses too, also when the agent serves a socket it was not told about.
    let message = assert_cli_error(&agent.uninstall(), "portgate uninstall beside the agent");
    assert!(message.contains(&format!("pid {pid}")), "{message}");
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:80"));
    assert_eq!(agent.status_json()["bridges"][0]["attached"], true);

    // Control: the timeouts above were the running agent's gate, which still takes rules:
    // allowed, port 80 answers on the same path.
    agent.allow(CONTAINER_V4, "80/tcp");
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
}

#[test]
fn uninstall_removes_only_portgates_own_pins_and_the_pin_dirs_are_root_only() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let mut agent = Agent::start(&sb);
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:80"));
    let layout = agent.bpffs.join(gate_common::LAYOUT_VERSION);
    for dir in [
        agent.bpffs.clone(),
        layout.clone(),
        layout.join("maps"),
        layout.join("programs"),
        layout.join("links"),
    ] {
        let mode = std::fs::metadata(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{} should be root-only", dir.display());
    }

    // Another tool's maps, pinned beside portgate's and among them.
    let foreign = agent.bpffs.join("foreign");
    let among = layout.join("maps").join("theirs");
    for pin in [&foreign, &among] {
        portgate_tests::run_ok(
            std::process::Command::new("bpftool")
                .args(["map", "create"])
                .arg(pin)
                .args(["type", "array", "key", "4", "value", "4", "entries", "1"])
                .args(["name", "pgt_foreign"]),
        );
    }

    agent.stop();
    let output = agent.uninstall();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "portgate uninstall failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("uninstall -> {stdout}");
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    for pin in [&foreign, &among] {
        assert!(
            pin.exists(),
            "uninstall removed a foreign pin: {}",
            pin.display()
        );
        portgate_tests::run_ok(
            std::process::Command::new("bpftool")
                .args(["map", "show", "pinned"])
                .arg(pin),
        );
    }
    assert!(
        stdout.contains("left 2 entries") && stdout.contains(&*foreign.to_string_lossy()),
        "uninstall should say what it left: {stdout}"
    );
    let mut left: Vec<String> = walk(&agent.bpffs)
        .iter()
        .map(|p| {
            p.strip_prefix(&agent.bpffs)
                .unwrap_or(p)
                .display()
                .to_string()
        })
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "foreign".to_owned(),
            gate_common::LAYOUT_VERSION.to_owned(),
            format!("{}/maps", gate_common::LAYOUT_VERSION),
            format!("{}/maps/theirs", gate_common::LAYOUT_VERSION),
        ],
        "only the foreign pins and the directories holding them should be left"
    );
}

/// Every path under `dir`, directories included.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

/// A fake Docker with what a sandbox cannot run for real: `web` on the gated bridge, whose
/// `portgate.allow=80/tcp` label is its image's; `svc` on the same image, which sets the
/// label to a value of its own; `dns` on the host network; `nas` on a macvlan network.
fn fake_docker() -> portgate_tests::fake_engine::FakeEngine {
    use portgate_tests::fake_engine::{EngineState, FakeEngine};
    use serde_json::json;
    let image = format!("sha256:{}", "a".repeat(64));
    let container =
        |name: &str, mode: &str, labels: serde_json::Value, network: serde_json::Value| {
            json!({
                "Id": format!("{name:0>64}"),
                "Name": format!("/{name}"),
                "Image": image,
                "Config": {"Labels": labels, "ExposedPorts": {"80/tcp": {}, "53/udp": {}}},
                "HostConfig": {"NetworkMode": mode},
                "NetworkSettings": {"Ports": {}, "Networks": network},
            })
        };
    let mut web = container(
        "web",
        "bridge",
        json!({"portgate.allow": "80/tcp"}),
        json!({"bridge": {"NetworkID": "n-bridge", "IPAddress": CONTAINER_V4, "GlobalIPv6Address": CONTAINER_V6}}),
    );
    web["NetworkSettings"]["Ports"] =
        json!({"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]});
    FakeEngine::start(EngineState {
        networks: vec![
            json!({"Name": "bridge", "Id": "n-bridge", "Driver": "bridge",
                   "Options": {"com.docker.network.bridge.name": BRIDGE}}),
            json!({"Name": "host", "Id": "n-host", "Driver": "host"}),
            json!({"Name": "lan", "Id": "n-lan", "Driver": "macvlan"}),
        ],
        containers: vec![
            web,
            container(
                "svc",
                "bridge",
                json!({"portgate.allow": "81/tcp"}),
                json!({"bridge": {"NetworkID": "n-bridge", "IPAddress": "10.99.0.3"}}),
            ),
            container(
                "dns",
                "host",
                json!({}),
                json!({"host": {"NetworkID": "n-host", "IPAddress": ""}}),
            ),
            container(
                "nas",
                "lan",
                json!({}),
                json!({"lan": {"NetworkID": "n-lan", "IPAddress": "192.168.77.50"}}),
            ),
        ],
        images: [(
            image.clone(),
            json!({"Id": image, "Config": {"Labels": {"portgate.allow": "80/tcp"}}}),
        )]
        .into(),
    })
}

#[test]
fn labels_say_where_they_come_from_and_status_names_what_the_gate_cannot_see() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let docker = fake_docker();
    let socket = docker.socket.to_str().expect("utf-8 path").to_owned();
    let args = ["--runtime", "docker", "--docker-socket", &socket];
    let agent = Agent::start_with(&sb, &args);
    let status = agent.wait_engines_connected(&["docker"]);
    assert_eq!(status["engines"][0]["containers"], 4, "{status}");

    // The labels: web's is its image's, which the default does not honour (and says so);
    // svc's was set on the container.
    let list = agent.list_json();
    let label_rule = |list: &serde_json::Value, name: &str| {
        rules(list)
            .iter()
            .find(|r| r["source"] == "label" && r["container"] == name)
            .cloned()
    };
    assert!(label_rule(&list, "web").is_none(), "{list}");
    let svc = label_rule(&list, "svc").unwrap_or_else(|| panic!("no label rule for svc: {list}"));
    assert_eq!(svc["label_origin"], "container", "{list}");
    assert_eq!(status["label_policy"], "container", "{status}");
    assert_eq!(status["ignored_labels"][0]["container"], "web", "{status}");
    assert_eq!(status["ignored_labels"][0]["origin"], "image", "{status}");
    assert_eq!(list["ignored_labels"][0]["container"], "web", "{list}");
    assert!(
        agent
            .log_text()
            .contains("container web: its image's label portgate.allow=80/tcp opens nothing"),
        "{}",
        agent.log_text()
    );
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:80"));
    // One image inspect for the image web and svc share, per snapshot.
    let requests = docker.requests();
    let count = |prefix: &str| requests.iter().filter(|r| r.starts_with(prefix)).count();
    assert!(
        count("/images/") >= 1 && count("/images/") <= count("/containers/json"),
        "one image inspect per distinct image per snapshot: {requests:?}"
    );

    // What the gate cannot see, and why.
    let ungated = status["ungated"]
        .as_array()
        .unwrap_or_else(|| panic!("status --json has no ungated list: {status}"));
    let names: Vec<&str> = ungated
        .iter()
        .filter_map(|u| u["container"].as_str())
        .collect();
    assert_eq!(names, ["dns", "nas"], "{status}");
    assert_eq!(ungated[0]["network_mode"], "host", "{status}");
    assert_eq!(
        ungated[0]["exposed"],
        serde_json::json!(["53/udp", "80/tcp"])
    );
    assert_eq!(ungated[1]["networks"], serde_json::json!(["lan"]));
    assert_eq!(
        ungated[1]["addresses"],
        serde_json::json!(["192.168.77.50"])
    );
    assert!(
        ungated[1]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("macvlan")),
        "{status}"
    );
    assert_eq!(status["published_ports"]["gated"], 1, "{status}");
    assert_eq!(status["published_ports"]["ungated"], 0, "{status}");
    let text = agent.cli_ok(&["status"]);
    assert!(
        text.contains("UNGATED:  dns (docker): host network")
            && text.contains("UNGATED:  nas (docker): network lan (macvlan)"),
        "{text}"
    );
    // A rule for the host-network container says the gate does not see it.
    agent.allow("dns", "53/udp");
    let list = agent.list_json();
    let dns = rules(&list)
        .iter()
        .find(|r| r["target"] == "dns")
        .unwrap_or_else(|| panic!("no rule for dns: {list}"));
    assert_eq!(dns["gated"], false, "{dns}");
    drop(agent);

    // --labels image: the image's label opens its port, and list says whose it is.
    let mut image = args.to_vec();
    image.extend(["--labels", "image"]);
    let agent = Agent::start_with(&sb, &image);
    let status = agent.wait_engines_connected(&["docker"]);
    assert_eq!(status["label_policy"], "image", "{status}");
    let list = agent.list_json();
    let web = label_rule(&list, "web").unwrap_or_else(|| panic!("no label rule for web: {list}"));
    assert_eq!(web["label_origin"], "image", "{web}");
    assert_eq!(web["active"], true, "{web}");
    assert_eq!(web["gated"], true, "web is on the gated bridge: {web}");
    let text = agent.cli_ok(&["list"]);
    assert!(text.contains("active (image label)"), "{text}");
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    drop(agent);

    // --labels off: the label opens nothing.
    let mut off = args.to_vec();
    off.extend(["--labels", "off"]);
    let agent = Agent::start_with(&sb, &off);
    let status = agent.wait_engines_connected(&["docker"]);
    assert_eq!(status["labels"], false, "{status}");
    let list = agent.list_json();
    assert!(
        rules(&list).iter().all(|r| r["source"] != "label"),
        "--labels off lists no label rules: {list}"
    );
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:80"));
    assert!(agent.cli_ok(&["status"]).contains("labels:   off"));
}
