//! Prometheus metrics on `/metrics`, encoded with the official Rust client
//! (`prometheus-client`).
//!
//! Nothing here counts anything itself. The datapath counts in per-CPU BPF maps, which the
//! programs update without any locking or sharing between CPUs; at scrape time the agent
//! sums them in user space (`Agent::status`, `Agent::list`) and hands the result to
//! [`encode`], which builds a fresh registry holding one collector of constant values. A
//! scrape therefore costs the datapath nothing, and no value can be older than the scrape.
//!
//! [`serve`] is the HTTP side: it asks the agent loop for a body through a channel, so the
//! datapath and the rules are read by the loop that owns them.
//!
//! # The metrics
//!
//! Counters (samples end in `_total`):
//!
//! | name | labels | what |
//! | --- | --- | --- |
//! | `portgate_rule_packets_total` | rule, source, target, container, address, port, protocol | packets of the connections a rule admitted, both directions |
//! | `portgate_rule_bytes_total` | the same | their bytes (IP packet length) |
//! | `portgate_packets_total` | verdict (`pass`, `drop`), reason | every verdict of the datapath, all bridges |
//! | `portgate_drops_total` | bridge, reason | drops (in audit mode: would-be drops) per bridge |
//! | `portgate_connections_accepted_total` | | new connections admitted by an allow rule |
//! | `portgate_datapath_events_total` | event | `flow_created`, `flow_insert_failed`, `audit_passed`, ... |
//! | `portgate_engine_syncs_total` | engine | container engine snapshots taken |
//! | `portgate_engine_events_total` | engine | snapshots taken because of engine events |
//! | `portgate_drop_events_reported_total` | | drop events the agent read from the kernel |
//! | `portgate_drop_events_suppressed_total` | | drop events lost to the rate limit or a full queue |
//!
//! Gauges: `portgate_tracked_connections`, `portgate_tracked_connections_capacity`,
//! `portgate_allow_entries`, `portgate_allow_entries_capacity`,
//! `portgate_allow_entries_not_fitted`, `portgate_rules{source,state}`,
//! `portgate_bridge_attached{bridge}` (0/1), `portgate_engine_connected{engine}` (0/1),
//! `portgate_engine_containers{engine}`,
//! `portgate_netfilter_delegation_installed{bridge,backend,chain}` (0/1),
//! `portgate_audit_mode` (0/1), `portgate_host_traffic_gated` (0/1). Info:
//! `portgate_build_info{version}` (always 1).
//!
//! Every label value is bounded: bridges, engines, reasons and rules are the agent's own
//! (rule ids are below `MAX_RULES`); no label carries a peer address or a source port.
//!
//! The per-rule counters have no bridge label on purpose: the datapath counts per rule only
//! (one slot per rule id, summed over CPUs), not per bridge. Per-bridge traffic is in
//! `portgate_drops_total`; a rule's address says where its container is.
//!
//! # Formats
//!
//! `prometheus-client` writes the OpenMetrics 1.0 text format, which is what Prometheus asks
//! for. Clients that do not ask for it (`curl`, `promtool check metrics`) get the classic
//! Prometheus text format 0.0.4, derived from the same encoding (see [`to_text_format`]), as
//! the Go client does.

use std::{collections::BTreeMap, convert::Infallible, fmt::Write as _, sync::Arc, time::Duration};

use gate_common::counters;
use http_body_util::Full;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, MetricEncoder},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::{Registry, Unit},
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::{
    api::{RuleView, Status},
    policy::Source,
};

/// The content type of [`encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type for clients that do not ask for OpenMetrics.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The path metrics are served on.
pub const PATH: &str = "/metrics";
/// How long a scrape waits for the agent loop before answering 503.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// A client must send its request headers within this time (also bounds idle connections).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The exposition of one scrape, in the OpenMetrics text format ([`OPENMETRICS_CONTENT_TYPE`]),
/// ending in `# EOF`.
pub fn encode(status: &Status, rules: &[RuleView]) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("portgate");
    registry.register_collector(Box::new(Snapshot::new(status, rules)));
    let mut out = String::with_capacity(8 * 1024 + rules.len() * 512);
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Serves `GET /metrics` (and `HEAD`) on `listener` until the listener fails for good. Each
/// scrape sends a oneshot sender through `scrape`; the agent loop answers with [`encode`]'s
/// output, or an empty string when it could not read the datapath (answered 500). When the
/// loop does not answer within 5 s, or is gone, the scrape gets 503. Other paths get 404.
pub async fn serve(
    listener: TcpListener,
    scrape: mpsc::Sender<oneshot::Sender<String>>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            unreachable!("the semaphore is never closed");
        };
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(err) if is_transient(&err) => {
                warn!("metrics: accept failed ({err}); retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
            Err(err) => return Err(err),
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(request, scrape.clone()));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(err) = connection.await {
                debug!("metrics: connection ended: {err}");
            }
            drop(slot);
        });
    }
}

/// Accept errors that say nothing about the listener itself.
fn is_transient(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        err.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | OutOfMemory
    ) || matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}

async fn respond(
    request: Request<Incoming>,
    scrape: mpsc::Sender<oneshot::Sender<String>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() != PATH {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are on /metrics\n",
        ));
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let openmetrics = accepts_openmetrics(request.headers());
    let (tx, rx) = oneshot::channel();
    let answer = tokio::time::timeout(SCRAPE_TIMEOUT, async {
        scrape.send(tx).await.ok()?;
        rx.await.ok()
    })
    .await;
    let body = match answer {
        Ok(Some(body)) if !body.is_empty() => body,
        Ok(Some(_)) => {
            return Ok(plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the agent could not read the datapath; see its log\n",
            ));
        }
        Ok(None) => {
            return Ok(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is not serving metrics\n",
            ));
        }
        Err(_) => {
            return Ok(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent did not answer in time\n",
            ));
        }
    };
    let (content_type, body) = if openmetrics {
        (OPENMETRICS_CONTENT_TYPE, body)
    } else {
        (TEXT_CONTENT_TYPE, to_text_format(&body))
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    Ok(response)
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether the request's `Accept` names `application/openmetrics-text` with a non-zero q.
/// Prometheus sends `application/openmetrics-text;version=1.0.0,...,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`.
fn accepts_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            media.eq_ignore_ascii_case("application/openmetrics-text")
                && parts
                    .filter_map(|p| p.split_once('='))
                    .filter(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                    .all(|(_, q)| q.trim().parse::<f32>().map_or(true, |q| q > 0.0))
        })
}

/// The same exposition in the classic Prometheus text format 0.0.4: counters are declared
/// under their sample name (`foo_total`), info metrics become gauges (`foo_info`), and the
/// OpenMetrics-only `# UNIT` and `# EOF` lines go. Samples stay as they are. (Help texts
/// never need escaping: they are this module's own, without `\`, `"` or newlines.)
pub fn to_text_format(openmetrics: &str) -> String {
    let kinds: BTreeMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let header = line
            .strip_prefix("# HELP ")
            .map(|rest| ("HELP", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("TYPE", rest)));
        let Some((keyword, rest)) = header else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
        let (suffix, kind) = match kinds.get(name).copied() {
            Some("counter") => ("_total", "counter"),
            Some("info") => ("_info", "gauge"),
            Some("unknown") => ("", "untyped"),
            Some(other) => ("", other),
            None => ("", ""),
        };
        let text = if keyword == "TYPE" { kind } else { text };
        let _ = writeln!(out, "# {keyword} {name}{suffix} {text}");
    }
    out
}

/// Everything one scrape reports, owned so that a registry can hold it.
#[derive(Debug)]
struct Snapshot {
    families: Vec<Family>,
    version: String,
}

#[derive(Debug)]
struct Family {
    /// Without the `portgate_` prefix, the unit and (counters) `_total`.
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: Kind,
    samples: Vec<(Labels, u64)>,
}

type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Counter,
    Gauge,
}

impl Family {
    fn new(kind: Kind, name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            unit: None,
            kind,
            samples: Vec::new(),
        }
    }

    fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(Kind::Counter, name, help)
    }

    fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(Kind::Gauge, name, help)
    }

    fn unit(mut self, unit: Unit) -> Self {
        self.unit = Some(unit);
        self
    }

    fn sample(mut self, labels: Labels, value: u64) -> Self {
        self.samples.push((labels, value));
        self
    }

    fn samples(mut self, samples: impl IntoIterator<Item = (Labels, u64)>) -> Self {
        self.samples.extend(samples);
        self
    }
}

fn flag(on: bool) -> u64 {
    u64::from(on)
}

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Cli => "cli",
        Source::Label => "label",
        Source::DefaultPolicy => "default-policy",
    }
}

/// `80`, `8000-8010`, or empty for rules without ports (ICMP echo, `--published`).
fn port_label(rule: &RuleView) -> String {
    match (rule.port_start, rule.port_end) {
        (0, _) => String::new(),
        (start, end) if start == end => start.to_string(),
        (start, end) => format!("{start}-{end}"),
    }
}

impl Snapshot {
    fn new(status: &Status, rules: &[RuleView]) -> Self {
        let counter = |kind: &str, name: &str| {
            status
                .counters
                .get(kind)
                .and_then(|c| c.get(name))
                .copied()
                .unwrap_or(0)
        };
        let verdicts = ["pass", "drop"].into_iter().flat_map(|verdict| {
            status
                .counters
                .get(verdict)
                .into_iter()
                .flatten()
                .map(move |(reason, value)| {
                    (
                        vec![("verdict", verdict.to_owned()), ("reason", reason.clone())],
                        *value,
                    )
                })
        });
        let events = status
            .counters
            .get("event")
            .into_iter()
            .flatten()
            .map(|(event, value)| (vec![("event", event.clone())], *value));

        // Every (bridge, drop reason) from the start, so that rate() and increase() see the
        // first drop; summed in case two entries carry one name (a re-created bridge).
        let mut drops: BTreeMap<(String, String), u64> = BTreeMap::new();
        for bridge in &status.bridges {
            for (_, reason, kind) in counters::ALL {
                if *kind == counters::Kind::Drop {
                    drops
                        .entry((bridge.name.clone(), (*reason).to_owned()))
                        .or_default();
                }
            }
        }
        for d in &status.bridge_drops {
            *drops
                .entry((d.bridge.clone(), d.reason.clone()))
                .or_default() += d.packets;
        }
        let mut attached: BTreeMap<&str, bool> = BTreeMap::new();
        for bridge in &status.bridges {
            *attached.entry(bridge.name.as_str()).or_default() |= bridge.attached;
        }
        let mut rule_counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for source in [Source::Cli, Source::Label, Source::DefaultPolicy] {
            for state in ["active", "inactive"] {
                rule_counts.insert((source_name(source), state), 0);
            }
        }
        for rule in rules {
            let state = if rule.active { "active" } else { "inactive" };
            *rule_counts
                .entry((source_name(rule.source), state))
                .or_default() += 1;
        }
        let rule_labels = |rule: &RuleView| -> Labels {
            vec![
                ("rule", rule.id.to_string()),
                ("source", source_name(rule.source).to_owned()),
                ("target", rule.target.clone()),
                ("container", rule.container.clone().unwrap_or_default()),
                ("address", rule.address.clone()),
                ("port", port_label(rule)),
                ("protocol", rule.protocol.clone()),
            ]
        };
        let engine = |name: &str| vec![("engine", name.to_owned())];

        let families = vec![
            Family::counter(
                "rule_packets",
                "Packets of the connections each rule admitted, both directions, on all gated bridges together (the datapath counts per rule, not per bridge). port is empty for ICMP echo and --published rules; address is the first address the rule resolves to, or its target while inactive.",
            )
            .samples(rules.iter().map(|r| (rule_labels(r), r.packets))),
            Family::counter(
                "rule",
                "Bytes (IP packet length) of the connections each rule admitted, both directions, on all gated bridges together. Labels as for portgate_rule_packets_total.",
            )
            .unit(Unit::Bytes)
            .samples(rules.iter().map(|r| (rule_labels(r), r.bytes))),
            Family::counter(
                "packets",
                "Packets the datapath gave a verdict, by verdict (pass or drop) and reason, on all gated bridges. In audit mode, drop counts what enforce mode would have dropped (those packets passed).",
            )
            .samples(verdicts),
            Family::counter(
                "drops",
                "Packets dropped (in audit mode: that enforce mode would have dropped) per gated bridge and reason.",
            )
            .samples(
                drops
                    .into_iter()
                    .map(|((bridge, reason), n)| (vec![("bridge", bridge), ("reason", reason)], n)),
            ),
            Family::counter(
                "connections_accepted",
                "New connections (TCP SYN, first UDP datagram, ICMP echo request) admitted because an allow rule matched.",
            )
            .sample(vec![], counter("pass", counters::ALL[counters::PASS_NEW_ALLOWED as usize].1)),
            Family::counter(
                "datapath_events",
                "Datapath events that are not verdicts: flow_created and flow_insert_failed (tracking table), audit_passed, ip_options, ipv6_extensions.",
            )
            .samples(events),
            Family::gauge(
                "tracked_connections",
                "Entries in the connection tracking table, including idle ones not yet evicted.",
            )
            .sample(vec![], status.flows.tracked as u64),
            Family::gauge(
                "tracked_connections_capacity",
                "Entries the connection tracking table holds; when full, the least recently used go first.",
            )
            .sample(vec![], u64::from(status.flows.capacity)),
            Family::gauge("allow_entries", "Entries in the allow map: (address, protocol, port) triples the rules open now.")
                .sample(vec![], status.allow_entries.used as u64),
            Family::gauge("allow_entries_capacity", "Entries the allow map holds.")
                .sample(vec![], u64::from(status.allow_entries.capacity)),
            Family::gauge(
                "allow_entries_not_fitted",
                "Entries the rules want that did not fit in the full allow map, so are not enforced (see --max-allow).",
            )
            .sample(vec![], status.allow_entries.not_fitted as u64),
            Family::gauge(
                "rules",
                "Rules by source (cli, label, default-policy) and state: active rules open at least one port on at least one address; inactive ones wait for their container.",
            )
            .samples(
                rule_counts
                    .into_iter()
                    .map(|((source, state), n)| (vec![("source", source.to_owned()), ("state", state.to_owned())], n)),
            ),
            Family::gauge("bridge_attached", "1 when the gate's programs are attached to the bridge, else 0.")
                .samples(attached.into_iter().map(|(bridge, on)| (vec![("bridge", bridge.to_owned())], flag(on)))),
            Family::gauge("engine_connected", "1 while the agent reaches the container engine's API, else 0.")
                .samples(status.engines.iter().map(|e| (engine(&e.engine), flag(e.connected)))),
            Family::gauge("engine_containers", "Running containers in the engine's last snapshot.")
                .samples(status.engines.iter().map(|e| (engine(&e.engine), e.containers as u64))),
            Family::counter(
                "engine_syncs",
                "Snapshots of the engine's containers taken (at connect, after events, periodically).",
            )
            .samples(status.engines.iter().map(|e| (engine(&e.engine), e.syncs))),
            Family::counter("engine_events", "Snapshots taken because the engine reported an event.")
                .samples(status.engines.iter().map(|e| (engine(&e.engine), e.events))),
            Family::gauge(
                "netfilter_delegation_installed",
                "1 when the netfilter rule that hands a bridge's published ports to the gate is in place, else 0.",
            )
            .samples(status.netfilter.iter().map(|n| {
                (
                    vec![
                        ("bridge", n.bridge.clone()),
                        ("backend", n.backend.clone()),
                        ("chain", n.chain.clone()),
                    ],
                    flag(n.installed),
                )
            })),
            Family::counter("drop_events_reported", "Drop events the agent read from the datapath.")
                .sample(vec![], status.drop_events.reported),
            Family::counter(
                "drop_events_suppressed",
                "Drop events lost: suppressed by the datapath's rate limit, or while the agent was behind.",
            )
            .sample(vec![], status.drop_events.suppressed),
            Family::gauge("audit_mode", "1 in audit mode (would-be drops are counted and passed), 0 when enforcing.")
                .sample(vec![], flag(status.mode == "audit")),
            Family::gauge("host_traffic_gated", "1 when connections from the host's own stack are gated too, else 0.")
                .sample(vec![], flag(status.gate_host_traffic)),
        ];
        Self {
            families,
            version: status.version.clone(),
        }
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.families {
            let metric_type = match family.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut metric = encoder.encode_descriptor(
                family.name,
                family.help,
                family.unit.as_ref(),
                metric_type,
            )?;
            let encode = |value: u64, sample: MetricEncoder| match family.kind {
                Kind::Counter => ConstCounter::new(value).encode(sample),
                Kind::Gauge => ConstGauge::new(value).encode(sample),
            };
            match family.samples.as_slice() {
                // Without labels: `name 1`, not `name{} 1`.
                [(labels, value)] if labels.is_empty() => encode(*value, metric)?,
                samples => {
                    for (labels, value) in samples {
                        encode(*value, metric.encode_family(labels)?)?;
                    }
                }
            }
        }
        let info = Info::new(vec![("version", self.version.clone())]);
        let metric = encoder.encode_descriptor(
            "build",
            "The running portgate agent's version; always 1.",
            None,
            info.metric_type(),
        )?;
        info.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::process::{Command, Stdio};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::api::{
        BridgeDrops, BridgeStatus, DropEventStats, EngineStatus, Fill, Flows, NetfilterStatus,
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
            },
            engines: vec![EngineStatus {
                engine: "docker".into(),
                socket: "/var/run/docker.sock".into(),
                connected: true,
                containers: 2,
                syncs: 5,
                events: 3,
                last_error: None,
            }],
            netfilter: vec![NetfilterStatus {
                bridge: "docker0".into(),
                backend: "iptables-legacy".into(),
                chain: "DOCKER-USER".into(),
                installed: true,
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
        }
    }

    fn rule(id: u32, source: Source, active: bool, protocol: &str, ports: (u16, u16)) -> RuleView {
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
        }
    }

    fn rules() -> Vec<RuleView> {
        vec![
            rule(0, Source::Cli, true, "tcp", (80, 80)),
            rule(1, Source::Cli, false, "udp", (8000, 8010)),
            rule(8192, Source::Label, true, "icmp", (0, 0)),
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
            ("portgate_allow_entries", "gauge"),
            ("portgate_allow_entries_capacity", "gauge"),
            ("portgate_allow_entries_not_fitted", "gauge"),
            ("portgate_rules", "gauge"),
            ("portgate_bridge_attached", "gauge"),
            ("portgate_engine_connected", "gauge"),
            ("portgate_engine_containers", "gauge"),
            ("portgate_engine_syncs", "counter"),
            ("portgate_engine_events", "counter"),
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
        agent: impl FnOnce(mpsc::Receiver<oneshot::Sender<String>>) + Send + 'static,
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
                    let _ = reply.send(encode(&status(), &rules()).unwrap());
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
            headers.contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            ),
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
    async fn agent_failures_are_5xx() {
        // The agent loop is gone.
        let addr = server(drop).await;
        let (status_line, _, _) = http(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
        assert!(status_line.contains(" 503 "), "{status_line}");

        // The agent could not read the datapath: it answers with an empty body.
        let addr = server(|mut scrapes| {
            tokio::spawn(async move {
                while let Some(reply) = scrapes.recv().await {
                    let _ = reply.send(String::new());
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
}
