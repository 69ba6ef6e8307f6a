//! The netfilter delegation on real engines: the rule per bridge, restored when a firewall
//! reload deletes it, the replies rule of nftables-only engines, and containers' own traffic
//! left alone.

use super::*;

/// The comment of the delegation rule for `bridge` (docs-contract.md).
fn delegation_comment(bridge: &str) -> String {
    format!("portgate: delegate {bridge} to the eBPF gate")
}

/// The comment of the replies rule for `bridge`.
fn replies_comment(bridge: &str) -> String {
    format!("portgate: delegate {bridge} replies to the eBPF gate")
}

/// Every rule in the root namespace's filter table that portgate installed.
pub(crate) fn portgate_rules() -> Vec<String> {
    let output = std::process::Command::new("iptables")
        .arg("-S")
        .output()
        .expect("run iptables -S");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.contains("portgate"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn deleted_delegation_rule_is_restored() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let (lport, dport) = (free_port(), free_port());
    let (lname, dname) = (unique("label-p"), unique("web-d"));
    let _labelled = engines.run_httpd(
        Engine::Podman,
        &lname,
        lport,
        &["--label", "portgate.allow=80/tcp"],
    );
    let _docker = engines.run_httpd(
        Engine::Docker,
        &dname,
        dport,
        &["--label", "portgate.allow=80/tcp"],
    );
    let agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker", "podman"]);
    sc.assert_answers_within(
        sc.published(lport),
        &body_of(&lname),
        FOLLOW_TIMEOUT,
        "labelled Podman container",
    );

    // A replies rule exactly where the engine accepts its bridge's traffic only in nftables
    // tables of its own (Podman 5's netavark), and nowhere else. The keeper installs it after
    // Podman's first sync, which the published port may answer before: wait for it.
    let wants_replies = engines.set == EngineSet::Sid;
    let replies_installed = |status: &serde_json::Value| -> Vec<String> {
        status["netfilter"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["replies"] == true && n["installed"] == true)
            .filter_map(|n| n["bridge"].as_str().map(str::to_owned))
            .collect()
    };
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    let status = loop {
        let status = agent.status_json();
        if !wants_replies || !replies_installed(&status).is_empty() || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let netfilter = status["netfilter"]
        .as_array()
        .unwrap_or_else(|| panic!("status --json has no netfilter array: {status}"));
    let podman0 = netfilter
        .iter()
        .find(|n| n["bridge"] == engines.set.podman_bridge())
        .unwrap_or_else(|| {
            panic!(
                "no delegation rule for {} under FORWARD DROP: {status}",
                engines.set.podman_bridge()
            )
        });
    assert_eq!(
        podman0["installed"], true,
        "podman0's delegation rule: {status}"
    );
    let with_replies = replies_installed(&status);
    let expected: Vec<String> = if wants_replies {
        vec![engines.set.podman_bridge().to_owned()]
    } else {
        Vec::new()
    };
    assert_eq!(
        with_replies,
        expected,
        "bridges with a replies rule on engine set {}: {status}",
        engines.set.name()
    );
    for entry in netfilter {
        let bridge = entry["bridge"].as_str().expect("bridge");
        let chain = entry["chain"].as_str().expect("chain");
        let backend = entry["backend"].as_str().unwrap_or("iptables");
        let bin = match backend {
            "iptables-legacy" => "iptables-legacy",
            _ => "iptables",
        };
        // A replies rule (bridges of nftables-only engines) lets the bridge's replies out.
        let replies = entry["replies"] == true;
        let (comment, interface) = if replies {
            (replies_comment(bridge), format!("-i {bridge}"))
        } else {
            (delegation_comment(bridge), format!("-o {bridge}"))
        };
        let find = || {
            iptables_rules(bin, chain)
                .into_iter()
                .find(|l| l.contains(&format!("\"{comment}\"")) && l.contains(&interface))
        };
        let rule = find().unwrap_or_else(|| {
            panic!(
                "{bridge}: status says {entry} but `{bin} -S {chain}` has no rule with \
                 {comment:?}: {:?}",
                iptables_rules(bin, chain)
            )
        });
        assert!(
            rule.contains("DNAT") && rule.contains("-j ACCEPT"),
            "{bridge}: the delegation rule should accept only DNATed connections: {rule}"
        );
        iptables_delete(bin, &rule);
        assert!(
            find().is_none(),
            "{bridge}: deleting {rule} did not remove it"
        );
        let deleted = Instant::now();
        let deadline = deleted + Duration::from_secs(6);
        while find().is_none() {
            assert!(
                Instant::now() < deadline,
                "{bridge}: the agent did not restore {rule:?} in {bin} {chain} within 6 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "{bridge}: restored {:?} after the delete",
            deleted.elapsed()
        );
    }
    sc.assert_answers(
        sc.published(lport),
        &body_of(&lname),
        "labelled Podman container after the delegation rule was restored",
    );
    sc.assert_answers_within(
        sc.published(dport),
        &body_of(&dname),
        FOLLOW_TIMEOUT,
        "labelled Docker container after the delegation rule was restored",
    );
}

/// Containers reach the outside with no rule of portgate's. On the sid set, Podman 5's
/// netavark accepts its containers' traffic only in its own nftables table, so the host's
/// iptables FORWARD policy DROP drops it, agent or not (netavark#977): the test shows that,
/// then adds the operator's rule that netavark's iptables driver used to add itself and
/// checks that the gate lets the traffic through.
#[test]
fn containers_reach_the_outside_with_no_rule() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let server = PongServer::start(
        &sc.client,
        std::net::SocketAddr::from((sc.client_addr, 9000)),
    );
    let agent = EngineAgent::start(engines, &[]);
    let status = agent.wait_engines_connected(&["docker", "podman"]);
    let reach = |engine: Engine| {
        let name = unique(&format!("nc-{}", engine.name()));
        let script = format!(
            "echo hello-from-{} | /bin/busybox nc -w 5 {} 9000",
            engine.name(),
            sc.client_addr
        );
        let output = engines.run_to_completion(
            engine,
            &name,
            &[IMAGE, "/bin/sh", "-c", &script],
            Duration::from_secs(60),
        );
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        (stdout, output)
    };
    let mut _operator_rule = None;
    if engines.set == EngineSet::Sid {
        let (stdout, _) = reach(Engine::Podman);
        assert_ne!(
            stdout, "pong hello-from-podman",
            "Podman 5 (netavark's nftables driver) under iptables FORWARD DROP: its outbound \
             traffic should be dropped by the host's chain, not accepted (status: {})",
            status["engines"]
        );
        // What netavark's iptables driver adds itself: the bridge's traffic out, and what
        // comes back for it.
        let bridge = engines.set.podman_bridge();
        let comment = ["-m", "comment", "--comment", "pge operator: netavark#977"];
        let out = [&["-i", bridge][..], &comment, &["-j", "ACCEPT"]].concat();
        let back = [
            &[
                "-o",
                bridge,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
            ][..],
            &comment,
            &["-j", "ACCEPT"],
        ]
        .concat();
        _operator_rule = Some([
            OperatorRule::insert("iptables", "FORWARD", &out),
            OperatorRule::insert("iptables", "FORWARD", &back),
        ]);
    }
    for engine in [Engine::Docker, Engine::Podman] {
        let (stdout, output) = reach(engine);
        assert_eq!(
            stdout,
            format!("pong hello-from-{}", engine.name()),
            "a {} container's connection to the outside ({}:9000) should get its reply \
             ({}; stderr: {})",
            engine.name(),
            sc.client_addr,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(
        server.accepted(),
        2,
        "the outside server should have seen both containers"
    );
}

/// The replies rule a Podman 5 bridge gets (netavark's nftables driver) lets replies out and
/// nothing else: a Podman container cannot reach an operator's port forward (a DNAT on the
/// host to the client namespace, outside the gated bridges) through the iptables FORWARD
/// DROP, while a Docker container, which Docker's own rules let out, can (the forward works).
#[test]
fn replies_rule_lets_no_podman_container_through_a_port_forward() {
    let (_serial, engines) = setup!();
    if engines.set != EngineSet::Sid {
        portgate_tests::not_applicable(format_args!(
            "engine set {}: its Podman keeps its rules in iptables, so the agent adds no \
             replies rule",
            engines.set.name()
        ));
        return;
    }
    let sc = Scenario::new();
    let server = PongServer::start(
        &sc.client,
        std::net::SocketAddr::from((sc.client_addr, 9000)),
    );
    let forward_port = free_port().to_string();
    let target = format!("{}:9000", sc.client_addr);
    let host = sc.host_addr.to_string();
    let _forward = OperatorRule::insert(
        "iptables",
        "PREROUTING",
        &[
            "-t",
            "nat",
            "-d",
            &host,
            "-p",
            "tcp",
            "--dport",
            &forward_port,
            "-j",
            "DNAT",
            "--to-destination",
            &target,
        ],
    );
    // A Podman container with a published port: netavark sets up its nftables table, which
    // tells the agent that Podman's bridge needs the replies rule.
    let (pport, pname) = (free_port(), unique("fwd-web-p"));
    let _podman = engines.run_httpd(Engine::Podman, &pname, pport, &[]);
    let reach = |engine: Engine| {
        let script = format!(
            "echo hello-from-{} | /bin/busybox nc -w 5 {host} {forward_port}",
            engine.name()
        );
        let name = unique(&format!("fwd-{}", engine.name()));
        let output = engines.run_to_completion(
            engine,
            &name,
            &[IMAGE, "/bin/sh", "-c", &script],
            Duration::from_secs(60),
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    // The control: without the agent, nothing lets a Podman container's connection through
    // FORWARD DROP (a leftover NETAVARK_FORWARD of Podman 4.3 would).
    assert_ne!(
        reach(Engine::Podman),
        "pong hello-from-podman",
        "without the agent, a Podman 5 container should not get through FORWARD DROP: \
         another rule accepts it ({:?})",
        iptables_rules("iptables", "FORWARD")
    );
    let agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker", "podman"]);
    // The keeper adds the replies rule after Podman's sync that saw netavark's table.
    let bridge = engines.set.podman_bridge();
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    while !iptables_rules("iptables", "FORWARD")
        .iter()
        .any(|rule| rule.contains(&format!("\"{}\"", replies_comment(bridge))))
    {
        assert!(
            Instant::now() < deadline,
            "no replies rule for {bridge}: {:?}",
            iptables_rules("iptables", "FORWARD")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        reach(Engine::Docker),
        "pong hello-from-docker",
        "a Docker container through the port forward (Docker's rules let it out)"
    );
    assert_ne!(
        reach(Engine::Podman),
        "pong hello-from-podman",
        "a Podman container reached the port forward {host}:{forward_port} -> {target} \
         through FORWARD DROP: the replies rule must match replies only ({:?})",
        iptables_rules("iptables", "FORWARD")
    );
    assert_eq!(server.accepted(), 1, "only Docker's container got through");
    // Where the rules are: Docker's bridge in DOCKER-USER, Podman's at the end of FORWARD
    // (after the operator's rules there, which DOCKER-USER would skip).
    let status = agent.status_json();
    for entry in status["netfilter"].as_array().into_iter().flatten() {
        let wanted = match entry["bridge"].as_str() {
            Some("docker0") => "DOCKER-USER",
            Some(b) if b == bridge => "FORWARD",
            _ => continue,
        };
        assert_eq!(entry["chain"], wanted, "{entry}");
    }
}

/// A host firewall written for nftables: a forward chain of the operator's own with policy
/// drop (netavark#977's situation), on top of the scenario's iptables FORWARD DROP. An accept
/// in another base chain (Docker's iptables rules, netavark's own table) does not skip it, so
/// without the agent every engine's published ports time out. The agent puts its rule in
/// that chain too, and `allow` opens exactly the allowed ports.
#[test]
fn nftables_forward_policy_drop_is_delegated_too() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let (dport, pport) = (free_port(), free_port());
    let (dname, pname) = (unique("nft-d"), unique("nft-p"));
    let _docker = engines.run_httpd(Engine::Docker, &dname, dport, &[]);
    let _podman = engines.run_httpd(Engine::Podman, &pname, pport, &[]);
    let table =
        OperatorNftTable::forward_drop(&unique("fw"), &["ct state established,related accept"]);
    sc.assert_times_out(
        sc.published(dport),
        "Docker's published port under an nftables forward chain with policy drop, no agent",
    );
    sc.assert_times_out(
        sc.published(pport),
        "Podman's published port under an nftables forward chain with policy drop, no agent",
    );

    let agent = EngineAgent::start(engines, &[]);
    let status = agent.wait_engines_connected(&["docker", "podman"]);
    let chain = table.status_chain();
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    loop {
        let status = agent.status_json();
        let delegated: BTreeSet<String> = status["netfilter"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["chain"] == chain.as_str() && n["installed"] == true)
            .filter(|n| n["replies"] != true)
            .filter_map(|n| n["bridge"].as_str().map(str::to_owned))
            .collect();
        let wanted = BTreeSet::from(["docker0".to_owned(), engines.set.podman_bridge().to_owned()]);
        if wanted.is_subset(&delegated) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status should show the delegation rules of {wanted:?} in {chain}: {}",
            status["netfilter"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("engines: {}", status["engines"]);
    sc.assert_times_out(sc.published(dport), "Docker's published port, no rule");
    sc.assert_times_out(sc.published(pport), "Podman's published port, no rule");
    agent.allow(&dname, "80/tcp");
    agent.allow(&pname, "80/tcp");
    sc.assert_answers(
        sc.published(dport),
        &body_of(&dname),
        "Docker's published port after allow, under the nftables drop policy",
    );
    sc.assert_answers(
        sc.published(pport),
        &body_of(&pname),
        "Podman's published port after allow, under the nftables drop policy",
    );
    drop(agent);
    drop(table);
}
