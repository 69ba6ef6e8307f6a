//! Rules that say who may connect, end to end: sources (addresses, prefixes, named sets),
//! the interface a connection came in on, the block list, rules that expire, the policy
//! file, and `explain` agreeing with what real traffic gets. Real namespaces and the real
//! agent; the client has two addresses of each family and the remote namespace comes in on
//! another interface. Need root; without it each test says it is skipped.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use portgate_tests::agent::{counter, find_rule, rules};
use portgate_tests::net::{exchange, sa, tcp_answers_from, tcp_connect_from};
use portgate_tests::sandbox::{
    CLIENT_V4, CLIENT_V6, CLIENT2_V4, CLIENT2_V6, CONTAINER_V4, CONTAINER_V6, REMOTE_V4, TUNNEL,
};
use portgate_tests::{Agent, Sandbox, TcpEchoServer, require_root};
use serde_json::Value;

macro_rules! require_root {
    () => {
        if !require_root() {
            return;
        }
    };
}

fn web4() -> SocketAddr {
    sa("10.99.0.2:80")
}

fn web6() -> SocketAddr {
    sa("[fd99::2]:80")
}

fn drops(agent: &Agent, reason: &str) -> u64 {
    counter(&agent.status_json(), "drop", reason)
}

fn explain(agent: &Agent, args: &[&str]) -> Value {
    let mut all = vec!["explain"];
    all.extend_from_slice(args);
    all.push("--json");
    serde_json::from_str(&agent.cli_ok(&all)).expect("explain --json")
}

#[test]
fn sources_admit_only_the_clients_they_name_ipv4_and_ipv6() {
    require_root!();
    let sb = Sandbox::new();
    let _web4 = TcpEchoServer::start(&sb, &sb.container, web4());
    let _web6 = TcpEchoServer::start(&sb, &sb.container, web6());
    let agent = Agent::start(&sb);
    agent.cli_ok(&["allow", CONTAINER_V4, "80", "--from", CLIENT_V4]);
    agent.cli_ok(&["allow", CONTAINER_V6, "80", "--from", "fd98::/64"]);

    assert!(tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()));
    assert!(
        !tcp_answers_from(&sb, &sb.client, CLIENT2_V4, web4()),
        "another source on the same way in must time out"
    );
    assert!(tcp_answers_from(&sb, &sb.client, CLIENT_V6, web6()));
    assert!(!tcp_answers_from(&sb, &sb.client, CLIENT2_V6, web6()));
    assert!(drops(&agent, "source_not_allowed") >= 2);

    let list = agent.list_json();
    let rule = find_rule(&list, CONTAINER_V4, "tcp", 80, 80).expect("the IPv4 rule");
    assert_eq!(rule["from"], serde_json::json!([CLIENT_V4]), "{rule}");

    // explain reads the same maps: it agrees with the traffic above.
    let admitted = explain(&agent, &[CLIENT_V4, CONTAINER_V4, "80"]);
    assert_eq!(admitted["verdict"], "admitted", "{admitted}");
    let refused = explain(&agent, &[CLIENT2_V4, CONTAINER_V4, "80"]);
    assert_eq!(refused["reason"], "source_not_allowed", "{refused}");
    let unlisted = explain(&agent, &[CLIENT_V4, CONTAINER_V4, "81"]);
    assert_eq!(unlisted["reason"], "not_allowed", "{unlisted}");

    // A rule without sources next to it opens the port to everyone.
    agent.cli_ok(&["allow", CONTAINER_V4, "80"]);
    assert!(tcp_answers_from(&sb, &sb.client, CLIENT2_V4, web4()));
}

#[test]
fn via_admits_only_connections_that_came_in_on_that_interface() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, web4());
    let agent = Agent::start(&sb);
    agent.cli_ok(&["allow", CONTAINER_V4, "80", "--via", TUNNEL]);

    assert!(tcp_answers_from(&sb, &sb.remote, REMOTE_V4, web4()));
    assert!(
        !tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()),
        "a connection that came in on another interface must time out"
    );
    assert!(drops(&agent, "interface_not_allowed") >= 1);
    let refused = explain(&agent, &[CLIENT_V4, CONTAINER_V4, "80", "--via", "vcli"]);
    assert_eq!(refused["reason"], "interface_not_allowed", "{refused}");
    let admitted = explain(&agent, &[REMOTE_V4, CONTAINER_V4, "80", "--via", TUNNEL]);
    assert_eq!(admitted["verdict"], "admitted", "{admitted}");

    // A rule on an interface that does not exist admits nobody, and says so.
    agent.cli_ok(&["allow", CONTAINER_V4, "81", "--via", "nothere0"]);
    let list = agent.list_json();
    let rule = rules(&list)
        .iter()
        .find(|r| r["port_start"] == 81)
        .expect("the rule on port 81");
    assert!(
        rule["problem"]
            .as_str()
            .is_some_and(|p| p.contains("nothere0")),
        "{rule}"
    );
    assert_eq!(rule["active"], false, "{rule}");
}

#[test]
fn a_replaced_set_refuses_new_connections_from_removed_sources_and_keeps_established_ones() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, web4());
    let agent = Agent::start(&sb);
    agent.cli_ok(&["set", "office", CLIENT_V4]);
    agent.cli_ok(&["allow", CONTAINER_V4, "80", "--from", "office"]);

    let source = CLIENT_V4.parse().expect("address");
    let mut established = tcp_connect_from(&sb, &sb.client, source, web4(), Duration::from_secs(5))
        .expect("the set's member connects");
    assert_eq!(
        exchange(&mut established, "before").expect("echo"),
        "before"
    );
    assert!(!tcp_answers_from(&sb, &sb.client, CLIENT2_V4, web4()));

    agent.cli_ok(&["set", "office", CLIENT2_V4]);
    assert_eq!(
        exchange(&mut established, "after").expect("the established connection continues"),
        "after"
    );
    assert!(
        !tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()),
        "a new connection from the removed source must time out"
    );
    assert!(tcp_answers_from(&sb, &sb.client, CLIENT2_V4, web4()));

    // A set in use cannot go; an unknown set cannot be named.
    let refused = agent.cli(&["set", "office", "--delete"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("used by rule"));
    let unknown = agent.cli(&["allow", CONTAINER_V4, "443", "--from", "nosuchset"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no set named"));
}

#[test]
fn the_block_list_overrides_every_allow_and_is_replaced_from_a_file_at_once() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, web4());
    let agent = Agent::start(&sb);
    agent.cli_ok(&["allow", CONTAINER_V4, "80"]);
    agent.cli_ok(&["allow", CONTAINER_V4, "80", "--from", CLIENT2_V4]);
    agent.cli_ok(&["block", CLIENT2_V4]);

    assert!(
        !tcp_answers_from(&sb, &sb.client, CLIENT2_V4, web4()),
        "a blocked source must time out whatever allows it"
    );
    assert!(tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()));
    assert!(drops(&agent, "blocked") >= 1);
    let blocked = explain(&agent, &[CLIENT2_V4, CONTAINER_V4, "80"]);
    assert_eq!(blocked["reason"], "blocked", "{blocked}");

    // A file with comments replaces the whole list.
    let file = agent.dir.path().join("blocklist.txt");
    std::fs::write(
        &file,
        format!("# from the IDS\n{CLIENT_V4}  # noisy\n\n192.0.2.0/24\n"),
    )
    .expect("write the block list");
    agent.cli_ok(&["block", "--replace", "-f", &file.display().to_string()]);
    assert!(!tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()));
    assert!(tcp_answers_from(&sb, &sb.client, CLIENT2_V4, web4()));

    // A bad line changes nothing, and the error names it.
    std::fs::write(&file, "10.98.0.0/24\n10.98.0.1/8\n").expect("write");
    let refused = agent.cli(&["block", "--replace", "-f", &file.display().to_string()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("blocklist.txt:2"), "{stderr}");
    assert_eq!(
        agent.list_json()["blocks"],
        serde_json::json!([CLIENT_V4, "192.0.2.0/24"])
    );

    agent.cli_ok(&["unblock", CLIENT_V4]);
    assert!(tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()));
}

#[test]
fn a_rule_for_a_while_expires_by_itself_and_survives_a_restart_until_then() {
    require_root!();
    // Long enough that the restart ends well before it, short enough for a test. The agent
    // keeps expiries in whole Unix seconds: the rule ends between 9 and 10 s after `allow`.
    const FOR_SECS: u64 = 10;
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, web4());
    let _ssh = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:22"));
    let mut agent = Agent::start(&sb);
    let allowed_at = Instant::now();
    agent.cli_ok(&[
        "allow",
        CONTAINER_V4,
        "80",
        "--for",
        &format!("{FOR_SECS}s"),
    ]);
    agent.cli_ok(&["allow", CONTAINER_V4, "22", "--for", "1h"]);
    assert!(tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()));
    let left = |list: &Value| {
        find_rule(list, CONTAINER_V4, "tcp", 80, 80)
            .unwrap_or_else(|| panic!("the rule for port 80 is listed: {list}"))
            ["expires_in_seconds"]
            .as_u64()
            .unwrap_or_else(|| panic!("the rule for port 80 has a time left: {list}"))
    };
    let list = agent.list_json();
    let before = left(&list);
    assert!(
        (FOR_SECS - 2..=FOR_SECS).contains(&before),
        "{FOR_SECS}s just asked for: {list}"
    );

    agent.restart();
    let restarted_in = allowed_at.elapsed();
    assert!(
        restarted_in < Duration::from_secs(FOR_SECS - 4),
        "the restart took {restarted_in:?}, too close to the rule's {FOR_SECS}s to check it survived"
    );
    // The restarted agent still has the rule, with the time it had left, and applies it.
    let list = agent.list_json();
    let after = left(&list);
    assert!(
        after <= before && after + restarted_in.as_secs() + 2 >= before,
        "{before}s left before the restart, {after}s after it ({restarted_in:?} later): {list}"
    );
    assert!(
        tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()),
        "port 80 answers right after the restart, its rule still running ({:?} of {FOR_SECS}s)",
        allowed_at.elapsed()
    );

    // Then it ends by itself, about on time: not before its time, nor long after.
    let deadline = Duration::from_secs(FOR_SECS + 5);
    let closed_at = loop {
        let asked_at = allowed_at.elapsed();
        if !tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()) {
            break asked_at;
        }
        assert!(
            asked_at < deadline,
            "port 80 still answers {asked_at:?} after a rule for {FOR_SECS}s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        closed_at >= Duration::from_secs(FOR_SECS - 1),
        "port 80 closed {closed_at:?} after a rule for {FOR_SECS}s"
    );
    let list = agent.list_json();
    assert_eq!(
        rules(&list).len(),
        1,
        "only the hour-long rule is left: {list}"
    );
    assert!(tcp_answers_from(
        &sb,
        &sb.client,
        CLIENT_V4,
        sa("10.99.0.2:22")
    ));
}

#[test]
fn the_policy_file_applies_reloads_and_a_broken_file_changes_nothing() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, web4());
    let mut agent = Agent::new(&sb, &[]);
    let policy = agent.policy_path();
    let write = |text: String| std::fs::write(&policy, text).expect("write the policy file");
    write(format!(
        "[sets]\noffice = [\"{CLIENT_V4}\"]\n\n[[allow]]\ntarget = \"{CONTAINER_V4}\"\nports = \"80/tcp\"\nfrom = [\"office\"]\n"
    ));
    agent.spawn();
    agent.wait_ready();
    assert!(tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()));
    assert!(!tcp_answers_from(&sb, &sb.client, CLIENT2_V4, web4()));
    let list = agent.list_json();
    assert_eq!(rules(&list)[0]["source"], "file", "{list}");

    // The file owns its rules and sets.
    let denied = agent.cli(&["deny", CONTAINER_V4, "80"]);
    assert!(String::from_utf8_lossy(&denied.stderr).contains("policy file"));
    let set = agent.cli(&["set", "office", CLIENT2_V4]);
    assert!(String::from_utf8_lossy(&set.stderr).contains("policy file"));

    // check says what a change would do; reload applies it.
    write(format!(
        "block = [\"192.0.2.0/24\"]\n[sets]\noffice = [\"{CLIENT2_V4}\"]\n\n[[allow]]\ntarget = \"{CONTAINER_V4}\"\nports = \"80/tcp\"\nfrom = [\"office\"]\n"
    ));
    let check = agent.cli_ok(&["check", &policy.display().to_string()]);
    assert!(
        check.contains(&format!("~ set office: {CLIENT_V4} -> {CLIENT2_V4}")),
        "{check}"
    );
    assert!(check.contains("+ block 192.0.2.0/24"), "{check}");
    assert!(
        tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()),
        "check applies nothing"
    );
    agent.cli_ok(&["reload"]);
    assert!(!tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()));
    assert!(tcp_answers_from(&sb, &sb.client, CLIENT2_V4, web4()));

    // A broken file: reload and check name the line, nothing changes.
    write("[[allow]]\ntarget = \"web\"\nports = \"80/tcp\"\nfrom = [\"10.0.0.1/8\"]\n".to_owned());
    let broken = agent.cli(&["reload"]);
    assert!(!broken.status.success());
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(stderr.contains("line 4"), "{stderr}");
    assert!(
        !agent
            .cli(&["check", &policy.display().to_string()])
            .status
            .success()
    );
    assert!(
        tcp_answers_from(&sb, &sb.client, CLIENT2_V4, web4()),
        "still the last good file"
    );

    // SIGHUP reloads as well.
    write(format!(
        "[[allow]]\ntarget = \"{CONTAINER_V4}\"\nports = \"80/tcp\"\n"
    ));
    let pid = agent.pid().expect("agent pid");
    // SAFETY: a signal to the agent process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !tcp_answers_from(&sb, &sb.client, CLIENT_V4, web4()) {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not apply the file"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(agent.is_running(), "SIGHUP must not stop the agent");
}
