//! The agent's Prometheus metrics, end to end: a real `prometheus` server scrapes a real agent
//! gating a real bridge, real traffic goes through, and Prometheus's HTTP API must show the
//! right series moved by the right amounts. Also: `promtool check metrics` on a scraped
//! body, the example alert rules loaded by Prometheus and unit-tested with `promtool test
//! rules`, and every query of the Grafana dashboard run against the real data.
//!
//! Root only (network namespaces, eBPF); each test prints `skipped: ...` otherwise, and also
//! when Debian's `prometheus` package (prometheus, promtool) is missing.
//!
//! ```text
//!  client ns 10.98.0.2 ── 10.98.0.1 host ns (agent :9560, prometheus :9090)
//!                                   pgbr0 10.99.0.1 ── container ns 10.99.0.2 (:80, :81)
//! ```
//!
//! The sandbox, the agent and the servers are the end-to-end tests' own (`portgate_tests`);
//! everything is removed by Drop guards, also on panic.

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use portgate_tests::{
    Agent, Sandbox, TcpEchoServer, require_root,
    sandbox::{BRIDGE, CLIENT_V4, CONTAINER_V4, in_netns, netns_command},
};
use serde_json::Value;

/// Inside the host namespace; nothing else listens there.
const METRICS_ADDR: &str = "127.0.0.1:9560";
const PROMETHEUS_ADDR: &str = "127.0.0.1:9090";

const CONNECTIONS_ALLOWED: usize = 3;
const ATTEMPTS_BLOCKED: usize = 4;

fn docs(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name)
}

/// The shared skip policy: seen past libtest's capture, a failure in CI.
fn skip(why: &str) {
    portgate_tests::skip(why);
}

/// Whether `program --version` runs.
fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A child process, terminated on drop; its output goes to `log`, shown when a test fails.
struct Process {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &'static str, mut command: Command, log: PathBuf) -> Self {
        let out = File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log fd");
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({command:?}): {e}"));
        Process {
            name,
            child: Some(child),
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the process has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            self.child = None;
            panic!("{} exited ({status}); log:\n{}", self.name, self.log_text());
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("PGM_SHOW_LOGS").is_some() {
            let _ = writeln!(
                io::stderr(),
                "--- {} log ---\n{}",
                self.name,
                self.log_text()
            );
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// HTTP and Prometheus's API.

/// A minimal HTTP/1.0 GET to `addr` from inside namespace `ns`: (status, headers, body).
fn http_get(ns: &str, addr: &str, path: &str, accept: &str) -> io::Result<(u16, String, String)> {
    let (addr, path, accept) = (addr.to_owned(), path.to_owned(), accept.to_owned());
    in_netns(ns, move || {
        let mut stream =
            TcpStream::connect_timeout(&addr.parse().expect("address"), Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, head.to_ascii_lowercase(), body.to_owned()))
    })
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus's HTTP API, reached from inside the host namespace.
struct Prometheus<'a> {
    ns: &'a str,
}

impl Prometheus<'_> {
    fn api(&self, path: &str) -> Value {
        let (status, _, body) = http_get(self.ns, PROMETHEUS_ADDR, path, "application/json")
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let json: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: {status} {e}: {body}"));
        assert_eq!(json["status"], "success", "GET {path}: {status} {json}");
        json["data"].clone()
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql)));
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query that must return exactly one series.
    fn value(&self, promql: &str) -> f64 {
        let result = self.query(promql);
        assert_eq!(
            result.len(),
            1,
            "{promql} should return one series: {result:?}"
        );
        result[0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{promql}: {result:?}"))
    }

    /// Waits until Prometheus holds a scrape of the agent taken after `after` (so it covers
    /// everything done before `after`).
    fn wait_for_scrape_after(&self, after: SystemTime) {
        let after = after
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let result = self.query(r#"timestamp(portgate_build_info{job="portgate"})"#);
            let newest = result
                .first()
                .and_then(|s| s["value"][1].as_str())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if newest > after {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no scrape of the agent after {after} (newest {newest})"
            );
            thread::sleep(Duration::from_millis(250));
        }
    }
}

// ---------------------------------------------------------------------------------------

/// What the rule `allow 10.99.0.2 80` is exported as.
/// (In the order the exposition writes them.)
const RULE: &str = r#"rule="0",source="cli",target="10.99.0.2",container="",address="10.99.0.2",port="80",protocol="tcp",from="",via="""#;

#[test]
fn prometheus_scrapes_the_agent() {
    if !require_root() {
        return;
    }
    if !installed("prometheus") || !installed("promtool") {
        skip(
            "prometheus and promtool are not installed (apt-get install prometheus; cargo xtask setup does)",
        );
        return;
    }
    let sb = Sandbox::new();
    let ns = &sb;
    let agent = Agent::start_with(&sb, &["--no-netfilter", "--metrics-addr", METRICS_ADDR]);
    let cli = |args: &[&str]| agent.cli(args);
    let dir = tempfile::Builder::new()
        .prefix("pgt-prometheus-")
        .tempdir()
        .expect("tempdir");

    // Prometheus, in the host namespace too, scraping the agent every second and loading
    // the example alert rules.
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: portgate\n    static_configs:\n      - targets: ['{METRICS_ADDR}']\n",
            docs("alerts.yml").display()
        ),
    )
    .unwrap();
    let mut prom_cmd = netns_command(&ns.host, "prometheus");
    prom_cmd
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={PROMETHEUS_ADDR}"))
        .arg("--log.level=warn");
    let mut prometheus = Process::spawn("prometheus", prom_cmd, dir.path().join("prometheus.log"));
    let prom = Prometheus { ns: &ns.host };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_get(&ns.host, PROMETHEUS_ADDR, "/-/ready", "*/*").is_ok_and(|r| r.0 == 200) {
        prometheus.assert_running();
        assert!(
            Instant::now() < deadline,
            "prometheus not ready in 30 s; log:\n{}",
            prometheus.log_text()
        );
        thread::sleep(Duration::from_millis(100));
    }

    // The exposition itself: OpenMetrics for Prometheus, the text format for everyone else,
    // which promtool's linter accepts.
    let (status, headers, body) = http_get(
        &ns.host,
        METRICS_ADDR,
        "/metrics",
        "application/openmetrics-text;version=1.0.0",
    )
    .unwrap();
    assert_eq!(status, 200, "{headers}{body}");
    assert!(
        headers
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{headers}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let (status, headers, text) = http_get(&ns.host, METRICS_ADDR, "/metrics", "*/*").unwrap();
    assert_eq!(status, 200, "{headers}{text}");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{headers}"
    );
    promtool_check_metrics(&text);
    assert_eq!(http_get(&ns.host, METRICS_ADDR, "/", "*/*").unwrap().0, 404);

    // Traffic: a server on 80 (allowed) and on 81 (not allowed) in the container.
    let open = TcpEchoServer::start(
        &sb,
        &sb.container,
        format!("{CONTAINER_V4}:80").parse().unwrap(),
    );
    let closed = TcpEchoServer::start(
        &sb,
        &sb.container,
        format!("{CONTAINER_V4}:81").parse().unwrap(),
    );
    let allowed = cli(&["allow", CONTAINER_V4, "80"]);
    assert!(
        allowed.status.success(),
        "allow: {}",
        String::from_utf8_lossy(&allowed.stderr)
    );

    prom.wait_for_scrape_after(SystemTime::now());
    let up = prom.value(r#"up{job="portgate"}"#);
    assert_eq!(up, 1.0, "targets: {}", prom.api("/api/v1/targets"));
    let before = Snapshot::take(&prom);
    assert_eq!(before.rule_packets, 0.0, "a new rule starts at zero");

    let started = Instant::now();
    in_netns(&ns.client, || {
        for i in 0..CONNECTIONS_ALLOWED {
            let addr: SocketAddr = format!("{CONTAINER_V4}:80").parse().unwrap();
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connection {i} to the allowed port: {e}"));
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let line = format!("hello {i} {}\n", "x".repeat(200));
            stream.write_all(line.as_bytes()).unwrap();
            let mut echoed = String::new();
            BufReader::new(&stream).read_line(&mut echoed).unwrap();
            assert_eq!(echoed, line);
        }
        for i in 0..ATTEMPTS_BLOCKED {
            let addr: SocketAddr = format!("{CONTAINER_V4}:81").parse().unwrap();
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                other => panic!("attempt {i} on the blocked port should time out, got {other:?}"),
            }
        }
    });
    assert_eq!(open.accepted(), CONNECTIONS_ALLOWED);
    assert_eq!(
        closed.accepted(),
        0,
        "the gate let a connection to :81 through"
    );
    // Let the closing handshakes finish before the scrape that must cover them.
    thread::sleep(Duration::from_millis(300));
    prom.wait_for_scrape_after(SystemTime::now());
    let after = Snapshot::take(&prom);
    let _ = writeln!(
        io::stderr(),
        "traffic took {:?}; before {before:?}; after {after:?}",
        started.elapsed()
    );

    assert_eq!(
        after.accepted - before.accepted,
        CONNECTIONS_ALLOWED as f64,
        "portgate_connections_accepted_total"
    );
    assert_eq!(
        after.pass_new_allowed - before.pass_new_allowed,
        CONNECTIONS_ALLOWED as f64,
        "portgate_packets_total{{verdict=\"pass\",reason=\"new_allowed\"}}"
    );
    assert!(
        after.flows_created - before.flows_created >= CONNECTIONS_ALLOWED as f64,
        "flow_created"
    );
    let drops = after.drops_not_allowed - before.drops_not_allowed;
    assert!(
        drops >= ATTEMPTS_BLOCKED as f64,
        "portgate_drops_total{{bridge=\"pgbr0\",reason=\"not_allowed\"}} rose by {drops}"
    );
    assert!(
        drops <= 4.0 * ATTEMPTS_BLOCKED as f64,
        "more drops than SYN retransmits explain: {drops}"
    );
    // The same packets, counted per bridge and globally.
    assert_eq!(
        after.drop_not_allowed - before.drop_not_allowed,
        drops,
        "global and per-bridge drops disagree"
    );
    // Each connection: at least SYN, ACK, data, FIN, ACK toward the container and as many back.
    let packets = after.rule_packets - before.rule_packets;
    let bytes = after.rule_bytes - before.rule_bytes;
    assert!(
        packets >= 6.0 * CONNECTIONS_ALLOWED as f64,
        "rule packets rose by {packets}"
    );
    assert!(
        bytes >= 40.0 * packets,
        "rule bytes {bytes} for {packets} packets"
    );
    // The data itself: the line went there and back on each connection.
    assert!(
        bytes >= (2 * CONNECTIONS_ALLOWED * 200) as f64,
        "rule bytes {bytes}"
    );

    // What Prometheus has matches what the agent reports over its control socket now.
    let status: Value =
        serde_json::from_slice(&cli(&["status", "--json"]).stdout).expect("status --json");
    assert_eq!(
        status["counters"]["pass"]["new_allowed"].as_f64(),
        Some(after.accepted)
    );
    let list: Value =
        serde_json::from_slice(&cli(&["list", "--json"]).stdout).expect("list --json");
    assert_eq!(
        list["rules"][0]["packets"].as_f64(),
        Some(after.rule_packets),
        "{list}"
    );
    assert_eq!(
        list["rules"][0]["bytes"].as_f64(),
        Some(after.rule_bytes),
        "{list}"
    );

    // Prometheus asked for and parsed OpenMetrics: only that format carries units.
    let metadata = prom.api("/api/v1/metadata?metric=portgate_rule_bytes");
    let family = &metadata["portgate_rule_bytes"][0];
    assert_eq!(family["type"], "counter", "{metadata}");
    assert_eq!(family["unit"], "bytes", "{metadata}");

    // Gauges.
    assert_eq!(
        prom.value(&format!(r#"portgate_bridge_attached{{bridge="{BRIDGE}"}}"#)),
        1.0
    );
    assert_eq!(
        prom.value(r#"portgate_rules{source="cli",state="active"}"#),
        1.0
    );
    assert_eq!(
        prom.value(r#"portgate_rules{source="cli",state="inactive"}"#),
        0.0
    );
    assert_eq!(prom.value("portgate_allow_entries"), 1.0);
    assert_eq!(
        prom.value("portgate_tracked_connections_capacity"),
        status["flows"]["capacity"].as_f64().unwrap()
    );
    assert_eq!(
        prom.value("portgate_allow_entries_capacity"),
        status["allow_entries"]["capacity"].as_f64().unwrap()
    );
    assert!(
        prom.value("portgate_tracked_connections")
            <= prom.value("portgate_tracked_connections_capacity")
    );
    assert_eq!(prom.value("portgate_audit_mode"), 0.0);
    assert_eq!(
        prom.value(&format!(
            r#"portgate_build_info{{version="{}"}}"#,
            status["version"].as_str().unwrap()
        )),
        1.0
    );
    assert!(
        prom.query("portgate_engine_connected").is_empty(),
        "--runtime none watches no engine"
    );
    // Label values stay bounded: no peer address or source port anywhere.
    let series = prom.api(&format!(
        "/api/v1/series?match[]={}",
        url_encode(r#"{job="portgate"}"#)
    ));
    let text = series.to_string();
    assert!(
        !text.contains(CLIENT_V4),
        "a label carries the client's address: {text}"
    );

    // Rates through PromQL, as the dashboard computes them.
    let accepted_rate = prom.value("sum(increase(portgate_connections_accepted_total[5m]))");
    assert!(
        accepted_rate > 0.0,
        "increase() of accepted connections: {accepted_rate}"
    );

    // The example alert rules loaded into this Prometheus, healthy, none firing.
    let rules = prom.api("/api/v1/rules");
    let group = &rules["groups"][0];
    assert_eq!(group["name"], "portgate", "{rules}");
    let names: Vec<&str> = group["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    for alert in [
        "PortgateGateDetached",
        "PortgateTrackingTableNearlyFull",
        "PortgateDropSpike",
        "PortgateEngineDisconnected",
    ] {
        assert!(names.contains(&alert), "{alert} missing from {names:?}");
    }
    for rule in group["rules"].as_array().unwrap() {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert_eq!(rule["state"], "inactive", "{rule}");
    }

    // Every query of the Grafana dashboard runs, and those about this setup return data.
    for (title, expr) in dashboard_queries() {
        let promql = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        let result = prom.query(&promql);
        let about_absent = ["engine", "drop_events", "flow_insert_failed"]
            .iter()
            .any(|w| promql.contains(w));
        assert!(
            about_absent || !result.is_empty(),
            "dashboard panel {title:?}: {promql} returned nothing"
        );
    }

    // A body scraped after the traffic still passes the linter.
    let (_, _, text) = http_get(&ns.host, METRICS_ADDR, "/metrics", "*/*").unwrap();
    assert!(
        text.contains(&format!("portgate_rule_packets_total{{{}}}", RULE)),
        "{text}"
    );
    promtool_check_metrics(&text);

    prometheus.assert_running();
    // Drop order: servers, Prometheus, the agent (uninstalled), then the sandbox.
}

/// Counter values read through Prometheus at one moment.
#[derive(Debug)]
struct Snapshot {
    accepted: f64,
    pass_new_allowed: f64,
    flows_created: f64,
    drops_not_allowed: f64,
    drop_not_allowed: f64,
    rule_packets: f64,
    rule_bytes: f64,
}

impl Snapshot {
    fn take(prom: &Prometheus) -> Self {
        Snapshot {
            accepted: prom.value("portgate_connections_accepted_total"),
            pass_new_allowed: prom
                .value(r#"portgate_packets_total{verdict="pass",reason="new_allowed"}"#),
            flows_created: prom.value(r#"portgate_datapath_events_total{event="flow_created"}"#),
            drops_not_allowed: prom.value(&format!(
                r#"portgate_drops_total{{bridge="{BRIDGE}",reason="not_allowed"}}"#
            )),
            drop_not_allowed: prom
                .value(r#"portgate_packets_total{verdict="drop",reason="not_allowed"}"#),
            rule_packets: prom.value(&format!("portgate_rule_packets_total{{{RULE}}}")),
            rule_bytes: prom.value(&format!("portgate_rule_bytes_total{{{RULE}}}")),
        }
    }
}

fn promtool_check_metrics(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("wait for promtool");
    assert!(
        output.status.success(),
        "promtool check metrics failed: {}{}\n--- exposition ---\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// (panel title, expr) of every query in docs/grafana-dashboard.json, rows included.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(docs("grafana-dashboard.json")).expect("read the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("target without expr: {target}"));
                out.push((
                    panel["title"].as_str().unwrap_or_default().to_owned(),
                    expr.to_owned(),
                ));
            }
            walk(&panel["panels"], out);
        }
    }
    let mut queries = Vec::new();
    walk(&dashboard["panels"], &mut queries);
    queries
}

/// The dashboard is importable as it stands: the fields Grafana needs, unique panel ids,
/// panels inside the 24-column grid, a Prometheus data source variable, and only portgate
/// metrics. Needs neither root nor Prometheus.
#[test]
fn grafana_dashboard_is_well_formed() {
    let text = std::fs::read_to_string(docs("grafana-dashboard.json")).expect("read the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "portgate");
    assert!(dashboard["title"].is_string() && dashboard["schemaVersion"].is_u64());
    assert!(
        dashboard["id"].is_null(),
        "an importable dashboard has no id"
    );
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(variables.iter().any(|v| v["type"] == "datasource"
        && v["query"] == "prometheus"
        && v["name"] == "datasource"));
    let mut ids = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id: {panel}"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && grid["h"].as_u64().unwrap() > 0,
            "panel outside the grid: {panel}"
        );
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
            assert!(
                !panel["targets"].as_array().unwrap().is_empty(),
                "{}",
                panel["title"]
            );
        }
    }
    let queries = dashboard_queries();
    let wanted = [
        "portgate_drops_total",
        "portgate_connections_accepted_total",
        "portgate_rule_bytes_total",
        "portgate_rule_packets_total",
        "portgate_tracked_connections",
        "portgate_tracked_connections_capacity",
        "portgate_bridge_attached",
        "portgate_engine_connected",
    ];
    for metric in wanted {
        assert!(
            queries.iter().any(|(_, q)| q.contains(metric)),
            "no panel shows {metric}"
        );
    }
    for (title, expr) in &queries {
        assert!(expr.contains("portgate_"), "{title}: {expr}");
    }
}

/// The example alerts are valid (`promtool check rules`) and fire when they should
/// (`promtool test rules` on synthetic series). Needs promtool, not root.
#[test]
fn alert_rules_fire_when_they_should() {
    if !installed("promtool") {
        skip("promtool is not installed (apt-get install prometheus; cargo xtask setup does)");
        return;
    }
    let alerts = docs("alerts.yml");
    let output = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&alerts)
        .output()
        .expect("run promtool");
    assert!(
        output.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let tests = dir.path().join("alerts_test.yml");
    let labels = r#"instance="h1:9560", job="portgate""#;
    std::fs::write(
        &tests,
        format!(
            r#"rule_files:
  - {alerts}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'portgate_bridge_attached{{{labels}, bridge="docker0"}}'
        values: '1 1 0 0 0 0'
      - series: 'portgate_bridge_attached{{{labels}, bridge="podman0"}}'
        values: '1x6'
      - series: 'portgate_tracked_connections{{{labels}}}'
        values: '100x3 950x10'
      - series: 'portgate_tracked_connections_capacity{{{labels}}}'
        values: '1000x14'
      - series: 'portgate_engine_connected{{{labels}, engine="docker"}}'
        values: '1 1 0 0 0 0'
      - series: 'up{{{labels}}}'
        values: '1x14'
    alert_rule_test:
      - eval_time: 2m
        alertname: PortgateGateDetached
        exp_alerts: []
      - eval_time: 4m
        alertname: PortgateGateDetached
        exp_alerts:
          - exp_labels: {{severity: critical, bridge: docker0, instance: "h1:9560", job: portgate}}
            exp_annotations:
              summary: "portgate is detached from bridge docker0 on h1:9560"
              description: "The gate's TC programs have not been attached to docker0 for 1 minute. The agent retries every 2 s; see its log (`journalctl -u portgate` or stderr) and `portgate status`."
      - eval_time: 5m
        alertname: PortgateEngineDisconnected
        exp_alerts:
          - exp_labels: {{severity: warning, engine: docker, instance: "h1:9560", job: portgate}}
            exp_annotations:
              summary: "portgate lost docker on h1:9560"
              description: "The agent has not reached the docker API for 2 minutes. It keeps enforcing what it last saw; containers started since then are not allowed by their labels until it reconnects."
      - eval_time: 6m
        alertname: PortgateTrackingTableNearlyFull
        exp_alerts: []
      - eval_time: 9m
        alertname: PortgateTrackingTableNearlyFull
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "h1:9560", job: portgate}}
            exp_annotations:
              summary: "portgate connection tracking table 95% full on h1:9560"
              description: "When the table is full the least recently used connections are evicted; a connection evicted while idle loses its state and its next packet is dropped (tcp_no_state). Raise `portgate agent --max-flows` (needs `portgate uninstall` first)."
      - eval_time: 9m
        alertname: PortgateAgentDown
        exp_alerts: []
  - interval: 1m
    input_series:
      # Quiet for 80 minutes (1 drop a minute), then 3000 a minute (50/s).
      - series: 'portgate_drops_total{{{labels}, bridge="docker0", reason="not_allowed"}}'
        values: '0+1x80 80+3000x20'
      # Steady 20/s all along: busy, but no spike.
      - series: 'portgate_drops_total{{{labels}, bridge="podman0", reason="not_allowed"}}'
        values: '0+1200x100'
    alert_rule_test:
      - eval_time: 80m
        alertname: PortgateDropSpike
        exp_alerts: []
      - eval_time: 92m
        alertname: PortgateDropSpike
        exp_alerts:
          - exp_labels: {{severity: warning, bridge: docker0, instance: "h1:9560"}}
            exp_annotations:
              summary: "portgate drops 50 packets/s on docker0 (h1:9560)"
              description: "Drops rose well above the usual level: a scan, a misconfigured client, or a rule that was removed while still needed. `portgate watch` shows who is dropped and why; `portgate_drops_total` by reason tells not_allowed from tcp_no_state."
  - interval: 15s
    input_series:
      - series: 'up{{{labels}}}'
        values: '1 1 0x20'
    alert_rule_test:
      - eval_time: 3m
        alertname: PortgateAgentDown
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "h1:9560", job: portgate}}
            exp_annotations:
              summary: "portgate agent on h1:9560 is not answering scrapes"
              description: "Prometheus could not scrape h1:9560 for 2 minutes. The datapath keeps enforcing the last allow list, but containers that start or change are not followed until the agent runs again."
"#,
            alerts = alerts.display()
        ),
    )
    .unwrap();
    let output = Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(&tests)
        .output()
        .expect("run promtool");
    assert!(
        output.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
