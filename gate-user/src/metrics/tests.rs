//! The exposition, checked line by line and with promtool.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};

use gate_common::counters;
use hyper::{HeaderMap, header};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use super::{
    server::{SCRAPE_TIMEOUT, accepts_gzip, accepts_openmetrics},
    *,
};
use crate::{
    api::{BridgeDrops, BridgeStatus, DropEventStats, EngineStatus, Fill, Flows, NetfilterStatus},
    policy::Origin,
};

fn status() -> Status {
    let mut counters: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (index, name, kind) in counters::ALL {
        let kind = match kind {
            counters::Kind::Pass => "pass",
            counters::Kind::Drop => "drop",
            counters::Kind::Event => "event",
        };
        counters
            .entry(kind.into())
            .or_default()
            .insert((*name).into(), 100 + u64::from(*index));
    }
    Status {
        mode: "enforce".into(),
        gate_host_traffic: false,
        bpffs: "/sys/fs/bpf/portgate".into(),
        state_file: "/var/lib/portgate/rules.json".into(),
        bridges: vec![
            BridgeStatus {
                name: "docker0".into(),
                ifindex: 3,
                attached: true,
            },
            BridgeStatus {
                name: "podman0".into(),
                ifindex: 4,
                attached: false,
            },
        ],
        rules: 3,
        allow_entries: Fill {
            used: 12,
            capacity: 262_144,
            not_fitted: 3,
            not_fitted_rules: vec![8192],
        },
        flows: Flows {
            tracked: 7,
            capacity: 262_144,
            cut: 3,
        },
        engines: vec![EngineStatus {
            engine: "docker".into(),
            socket: "/var/run/docker.sock".into(),
            connected: true,
            containers: 2,
            syncs: 5,
            events: 3,
            last_error: None,
            version: Some("28.5.2".into()),
            network_backend: None,
            firewall: Some("iptables".into()),
        }],
        netfilter: vec![NetfilterStatus {
            bridge: "docker0".into(),
            backend: "iptables-legacy".into(),
            chain: "DOCKER-USER".into(),
            installed: true,
            replies: false,
        }],
        counters,
        bridge_drops: vec![
            BridgeDrops {
                bridge: "docker0".into(),
                reason: "not_allowed".into(),
                packets: 9,
            },
            BridgeDrops {
                bridge: "docker0".into(),
                reason: "tcp_no_state".into(),
                packets: 2,
            },
        ],
        drop_events: DropEventStats {
            reported: 8,
            suppressed: 1,
        },
        version: "1.2.3".into(),
        labels: true,
        label_policy: crate::policy::LabelPolicy::Container,
        ignored_labels: Vec::new(),
        published_ports: crate::api::PublishedPorts {
            gated: 3,
            ungated: 1,
        },
        ungated: vec![crate::api::UngatedContainer {
            container: "dns".into(),
            engine: "docker".into(),
            network_mode: "host".into(),
            reason: "host network".into(),
            networks: vec![],
            addresses: vec![],
            published: vec![],
            exposed: vec!["53/udp".into()],
        }],
        label_errors: vec![],
        blocks: 0,
        uplinks: vec![],
        rootless: vec![crate::api::RootlessContainer {
            container: "alice/web".into(),
            user: "alice".into(),
            engine: "podman-rootless".into(),
            id: "77e5b7dfff34".into(),
            published: vec!["8080->80/tcp".into()],
            gated: true,
            stand_in_address: "fd70:6f72:7467:6174:77e5:b7df:ff34:0".into(),
        }],
        rootless_users: vec![crate::api::RootlessUserView {
            user: "bob".into(),
            uid: 1002,
            helpers: vec!["conmon".into()],
            listening: vec![],
            containers: 0,
            followed: true,
            error: Some("`podman ps` as user bob failed".into()),
        }],
    }
}

fn rule(id: u32, source: Origin, active: bool, protocol: &str, ports: (u16, u16)) -> RuleView {
    RuleView {
        id,
        target: if active {
            "web".into()
        } else {
            "gone\"db\\x".into()
        },
        container: active.then(|| "web".into()),
        published: protocol == "published",
        source,
        active,
        address: "172.17.0.2".into(),
        addresses: vec!["172.17.0.2".into()],
        ports: vec![],
        host_ports: vec![],
        protocol: protocol.into(),
        port_start: ports.0,
        port_end: ports.1,
        packets: 10 * u64::from(id) + 1,
        bytes: 1000 * u64::from(id) + 60,
        label_origin: None,
        gated: Some(true),
        from: vec![],
        via: None,
        expires: None,
        expires_in_seconds: None,
        problem: None,
    }
}

fn rules() -> Vec<RuleView> {
    vec![
        rule(0, Origin::Cli, true, "tcp", (80, 80)),
        rule(1, Origin::Cli, false, "udp", (8000, 8010)),
        rule(8192, Origin::Label, true, "icmp", (0, 0)),
    ]
}

fn exposition() -> String {
    encode(&status(), &rules()).expect("encode")
}

/// The value of the sample named `name` whose labels include every `labels` pair.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .find(|line| wanted.iter().all(|w| line.contains(w.as_str())))
        .map(|line| line.rsplit(' ').next().unwrap().parse().unwrap())
}

#[test]
fn exposition_is_openmetrics_with_portgate_names() {
    let text = exposition();
    assert!(text.ends_with("# EOF\n"), "{text}");
    let mut declared = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                declared.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{name} declared twice"
            );
            assert!(name.starts_with("portgate_"), "{name}");
            if kind == "counter" {
                assert!(
                    !name.ends_with("_total"),
                    "OpenMetrics declares counters without _total: {name}"
                );
            }
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (_, help) = rest.split_once(' ').unwrap();
            assert!(
                !help.contains(['\\', '"']),
                "help must need no escaping: {help}"
            );
        }
    }
    // Every sample belongs to a declared family, with the suffix its type demands.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = declared
            .iter()
            .find(|(family, kind)| match kind.as_str() {
                "counter" => name == format!("{family}_total"),
                "info" => name == format!("{family}_info"),
                _ => name == family.as_str(),
            })
            .unwrap_or_else(|| panic!("sample of an undeclared family: {line}"));
        assert!(name.starts_with(family.0.as_str()));
    }
    let expected = [
        ("portgate_rule_packets", "counter"),
        ("portgate_rule_bytes", "counter"),
        ("portgate_packets", "counter"),
        ("portgate_drops", "counter"),
        ("portgate_connections_accepted", "counter"),
        ("portgate_datapath_events", "counter"),
        ("portgate_tracked_connections", "gauge"),
        ("portgate_tracked_connections_capacity", "gauge"),
        ("portgate_connections_cut", "counter"),
        ("portgate_allow_entries", "gauge"),
        ("portgate_allow_entries_capacity", "gauge"),
        ("portgate_allow_entries_not_fitted", "gauge"),
        ("portgate_ungated_containers", "gauge"),
        ("portgate_rules", "gauge"),
        ("portgate_bridge_attached", "gauge"),
        ("portgate_engine_connected", "gauge"),
        ("portgate_engine_containers", "gauge"),
        ("portgate_engine_syncs", "counter"),
        ("portgate_engine_events", "counter"),
        ("portgate_rootless_published_port", "gauge"),
        ("portgate_rootless_user_followed", "gauge"),
        ("portgate_netfilter_delegation_installed", "gauge"),
        ("portgate_drop_events_reported", "counter"),
        ("portgate_drop_events_suppressed", "counter"),
        ("portgate_audit_mode", "gauge"),
        ("portgate_host_traffic_gated", "gauge"),
        ("portgate_build", "info"),
    ];
    let expected: BTreeMap<String, String> = expected
        .iter()
        .map(|(n, k)| ((*n).to_owned(), (*k).to_owned()))
        .collect();
    assert_eq!(declared, expected);
    assert!(
        text.contains("# UNIT portgate_rule_bytes bytes\n"),
        "{text}"
    );
    assert!(
        text.contains("\nportgate_tracked_connections 7\n"),
        "samples without labels have no braces: {text}"
    );
    assert!(!text.contains("{}"), "{text}");
}

#[test]
fn values_and_labels() {
    let text = exposition();
    let v = |name, labels: &[(&str, &str)]| {
        value(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    };
    let rule0 = [
        ("rule", "0"),
        ("source", "cli"),
        ("target", "web"),
        ("container", "web"),
        ("address", "172.17.0.2"),
        ("port", "80"),
        ("protocol", "tcp"),
    ];
    assert_eq!(v("portgate_rule_packets_total", &rule0), 1);
    assert_eq!(v("portgate_rule_bytes_total", &rule0), 60);
    assert_eq!(
        v(
            "portgate_rule_packets_total",
            &[("rule", "1"), ("port", "8000-8010"), ("container", "")]
        ),
        11
    );
    assert_eq!(
        v(
            "portgate_rule_bytes_total",
            &[
                ("rule", "8192"),
                ("source", "label"),
                ("port", ""),
                ("protocol", "icmp")
            ]
        ),
        8_192_060
    );
    // Label values are escaped.
    assert!(text.contains(r#"target="gone\"db\\x""#), "{text}");

    let new_allowed = 100 + u64::from(counters::PASS_NEW_ALLOWED);
    assert_eq!(v("portgate_connections_accepted_total", &[]), new_allowed);
    assert_eq!(v("portgate_connections_cut_total", &[]), 3);
    assert_eq!(
        v(
            "portgate_packets_total",
            &[("verdict", "pass"), ("reason", "new_allowed")]
        ),
        new_allowed
    );
    assert_eq!(
        v(
            "portgate_packets_total",
            &[("verdict", "drop"), ("reason", "not_allowed")]
        ),
        100 + u64::from(counters::DROP_NOT_ALLOWED)
    );
    assert_eq!(
        v(
            "portgate_datapath_events_total",
            &[("event", "flow_insert_failed")]
        ),
        100 + u64::from(counters::FLOW_INSERT_FAILED)
    );
    assert_eq!(
        value(
            &text,
            "portgate_packets_total",
            &[("reason", "flow_created")]
        ),
        None
    );

    assert_eq!(
        v(
            "portgate_drops_total",
            &[("bridge", "docker0"), ("reason", "not_allowed")]
        ),
        9
    );
    assert_eq!(
        v(
            "portgate_drops_total",
            &[("bridge", "docker0"), ("reason", "tcp_no_state")]
        ),
        2
    );
    // Every bridge and drop reason is there from the start.
    assert_eq!(
        v(
            "portgate_drops_total",
            &[("bridge", "podman0"), ("reason", "not_allowed")]
        ),
        0
    );
    assert_eq!(
        v(
            "portgate_drops_total",
            &[("bridge", "docker0"), ("reason", "fragment")]
        ),
        0
    );
    let drop_reasons = counters::ALL
        .iter()
        .filter(|c| c.2 == counters::Kind::Drop)
        .count();
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("portgate_drops_total{"))
            .count(),
        2 * drop_reasons
    );

    assert_eq!(v("portgate_tracked_connections", &[]), 7);
    assert_eq!(v("portgate_tracked_connections_capacity", &[]), 262_144);
    assert_eq!(v("portgate_allow_entries", &[]), 12);
    assert_eq!(v("portgate_allow_entries_capacity", &[]), 262_144);
    assert_eq!(v("portgate_allow_entries_not_fitted", &[]), 3);
    assert_eq!(v("portgate_ungated_containers", &[]), 1);
    assert_eq!(
        v("portgate_rules", &[("source", "cli"), ("state", "active")]),
        1
    );
    assert_eq!(
        v(
            "portgate_rules",
            &[("source", "cli"), ("state", "inactive")]
        ),
        1
    );
    assert_eq!(
        v(
            "portgate_rules",
            &[("source", "label"), ("state", "active")]
        ),
        1
    );
    assert_eq!(
        v(
            "portgate_rules",
            &[("source", "default-policy"), ("state", "inactive")]
        ),
        0
    );
    assert_eq!(v("portgate_bridge_attached", &[("bridge", "docker0")]), 1);
    assert_eq!(v("portgate_bridge_attached", &[("bridge", "podman0")]), 0);
    assert_eq!(v("portgate_engine_connected", &[("engine", "docker")]), 1);
    assert_eq!(v("portgate_engine_containers", &[("engine", "docker")]), 2);
    assert_eq!(v("portgate_engine_syncs_total", &[("engine", "docker")]), 5);
    assert_eq!(
        v(
            "portgate_rootless_published_port",
            &[
                ("user", "alice"),
                ("container", "alice/web"),
                ("engine", "podman-rootless"),
                ("published", "8080->80/tcp")
            ]
        ),
        1
    );
    assert_eq!(v("portgate_rootless_user_followed", &[("user", "bob")]), 0);
    assert_eq!(
        v("portgate_engine_events_total", &[("engine", "docker")]),
        3
    );
    assert_eq!(
        v(
            "portgate_netfilter_delegation_installed",
            &[
                ("bridge", "docker0"),
                ("backend", "iptables-legacy"),
                ("chain", "DOCKER-USER")
            ]
        ),
        1
    );
    assert_eq!(v("portgate_drop_events_reported_total", &[]), 8);
    assert_eq!(v("portgate_drop_events_suppressed_total", &[]), 1);
    assert_eq!(v("portgate_audit_mode", &[]), 0);
    assert_eq!(v("portgate_host_traffic_gated", &[]), 0);
    assert_eq!(v("portgate_build_info", &[("version", "1.2.3")]), 1);
}

#[test]
fn empty_agent_still_describes_every_family() {
    let mut status = status();
    status.bridges.clear();
    status.bridge_drops.clear();
    status.engines.clear();
    status.netfilter.clear();
    status.mode = "audit".into();
    let text = encode(&status, &[]).unwrap();
    assert!(text.contains("# TYPE portgate_rule_packets counter\n"));
    let samples = |name: &str| text.lines().filter(|l| l.starts_with(name)).count();
    assert_eq!(samples("portgate_rule_packets_total"), 0, "{text}");
    assert_eq!(samples("portgate_drops_total"), 0, "{text}");
    assert_eq!(value(&text, "portgate_audit_mode", &[]), Some(1));
    assert_eq!(
        value(
            &text,
            "portgate_rules",
            &[("source", "cli"), ("state", "active")]
        ),
        Some(0)
    );
}

#[test]
fn text_format_declares_sample_names() {
    let text = to_text_format(&exposition());
    assert!(
        !text.contains("# EOF") && !text.contains("# UNIT"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE portgate_rule_packets_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# HELP portgate_rule_bytes_total Bytes "),
        "{text}"
    );
    assert!(
        text.contains("# TYPE portgate_rule_bytes_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE portgate_build_info gauge\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE portgate_tracked_connections gauge\n"),
        "{text}"
    );
    assert!(
        text.contains("portgate_build_info{version=\"1.2.3\"} 1\n"),
        "{text}"
    );
    // Samples are untouched.
    let samples = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(samples(&text), samples(&exposition()));
}

/// `promtool check metrics` (Prometheus's linter: names, `_total`, units, help) on what
/// `curl` or promtool itself would get.
#[test]
fn promtool_check_metrics_passes() {
    let text = to_text_format(&exposition());
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) => {
            portgate_test_support::skip(format_args!(
                "promtool not runnable ({err}); apt-get install prometheus"
            ));
            return;
        }
    };
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed ({}): {}{}\n--- exposition ---\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn openmetrics_negotiation() {
    let accept = |v: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, v.parse().unwrap());
        accepts_openmetrics(&headers)
    };
    assert!(accept(
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    ));
    assert!(accept(
        "Application/OpenMetrics-Text; version=1.0.0; charset=utf-8"
    ));
    assert!(!accept("*/*"));
    assert!(!accept("text/plain;version=0.0.4"));
    assert!(!accept("application/openmetrics-text;q=0"));
    assert!(!accepts_openmetrics(&HeaderMap::new()));
}

/// A raw HTTP/1.0 exchange; returns (status line, headers, body).
async fn http(addr: std::net::SocketAddr, request: &str) -> (String, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        body.to_owned(),
    )
}

/// Starts `serve` on a loopback port, with `agent` answering scrapes.
async fn server(
    agent: impl FnOnce(mpsc::Receiver<oneshot::Sender<Body>>) + Send + 'static,
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(serve(listener, tx));
    agent(rx);
    addr
}

#[tokio::test]
async fn serves_metrics_in_both_formats() {
    let addr = server(|mut scrapes| {
        tokio::spawn(async move {
            while let Some(reply) = scrapes.recv().await {
                let _ = reply.send(written(encode(&status(), &rules()).unwrap()));
            }
        });
    })
    .await;
    let (status_line, headers, body) = http(
        addr,
        "GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
    )
    .await;
    assert!(status_line.contains(" 200 "), "{status_line}");
    assert!(
        headers
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{headers}"
    );
    assert_eq!(body, exposition());

    let (status_line, headers, body) =
        http(addr, "GET /metrics HTTP/1.0\r\nAccept: */*\r\n\r\n").await;
    assert!(status_line.contains(" 200 "), "{status_line}");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{headers}"
    );
    assert_eq!(body, to_text_format(&exposition()));

    let (status_line, _, body) = http(addr, "HEAD /metrics HTTP/1.0\r\n\r\n").await;
    assert!(status_line.contains(" 200 "), "{status_line}");
    assert!(body.is_empty());

    let (status_line, _, _) = http(addr, "GET / HTTP/1.0\r\n\r\n").await;
    assert!(status_line.contains(" 404 "), "{status_line}");
    let (status_line, _, _) = http(addr, "GET /metricsx HTTP/1.0\r\n\r\n").await;
    assert!(status_line.contains(" 404 "), "{status_line}");
    let (status_line, headers, _) =
        http(addr, "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n").await;
    assert!(status_line.contains(" 405 "), "{status_line}");
    assert!(headers.contains("allow: get, head"), "{headers}");
}

#[tokio::test]
async fn gzip_for_clients_that_accept_it() {
    let addr = server(|mut scrapes| {
        tokio::spawn(async move {
            while let Some(reply) = scrapes.recv().await {
                let _ = reply.send(written(encode(&status(), &rules()).unwrap()));
            }
        });
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    assert!(head.contains("content-encoding: gzip"), "{head}");
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(&response[split + 4..]),
        &mut text,
    )
    .unwrap();
    assert_eq!(text, to_text_format(&exposition()));

    let accept = |value: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT_ENCODING, value.parse().unwrap());
        accepts_gzip(&headers)
    };
    assert!(accept("gzip"));
    assert!(accept("deflate, gzip;q=1.0, *;q=0.5"));
    assert!(!accept("gzip;q=0"));
    assert!(!accept("identity"));
    assert!(!accepts_gzip(&HeaderMap::new()));
}

#[tokio::test]
async fn agent_failures_are_5xx() {
    // The agent loop is gone.
    let addr = server(drop).await;
    let (status_line, _, _) = http(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
    assert!(status_line.contains(" 503 "), "{status_line}");

    // The agent could not read the datapath: it answers with an empty body.
    let addr = server(|mut scrapes| {
        tokio::spawn(async move {
            while let Some(reply) = scrapes.recv().await {
                let _ = reply.send(written(String::new()));
            }
        });
    })
    .await;
    let (status_line, _, _) = http(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
    assert!(status_line.contains(" 500 "), "{status_line}");

    // The agent takes the request and never answers.
    let addr = server(|mut scrapes| {
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(reply) = scrapes.recv().await {
                held.push(reply);
            }
        });
    })
    .await;
    let started = std::time::Instant::now();
    let (status_line, _, _) = http(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
    assert!(status_line.contains(" 503 "), "{status_line}");
    assert!(started.elapsed() >= SCRAPE_TIMEOUT);
}

#[test]
fn label_names_are_unique_per_family() {
    let text = exposition();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('{'))
    {
        let inner = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
        let names: Vec<&str> = inner
            .split("\",")
            .map(|kv| kv.split('=').next().unwrap())
            .collect();
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "{line}");
    }
}
