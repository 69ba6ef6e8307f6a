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
//! | `portgate_rootless_published_port` | user, container, engine, published | 1 per published port of a rootless container the gate judges |
//! | `portgate_rootless_user_followed` | user | 1 per user whose rootless Podman the agent reads, 0 when it cannot |
//! | `portgate_drop_events_reported_total` | | drop events the agent read from the kernel |
//! | `portgate_drop_events_suppressed_total` | | drop events lost to the rate limit or a full queue |
//!
//! Gauges: `portgate_tracked_connections`, `portgate_tracked_connections_capacity`,
//! `portgate_allow_entries`, `portgate_allow_entries_capacity`,
//! `portgate_allow_entries_not_fitted`, `portgate_ungated_containers`,
//! `portgate_rules{source,state}`,
//! `portgate_bridge_attached{bridge}` (0/1), `portgate_engine_connected{engine}` (0/1),
//! `portgate_engine_containers{engine}`,
//! `portgate_netfilter_delegation_installed{bridge,backend,chain}` (0/1),
//! `portgate_audit_mode` (0/1), `portgate_host_traffic_gated` (0/1). Info:
//! `portgate_build_info{version}` (always 1).
//!
//! Every label value is bounded: bridges, engines, reasons and rules are the agent's own
//! (rule ids are below the agent's rule slots, `--max-rules`); no label carries a peer address or a source port.
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

mod families;
mod server;
#[cfg(test)]
mod tests;
mod text_format;

use prometheus_client::registry::Registry;

use crate::api::{RuleView, Status};

use self::families::Snapshot;
pub use self::{
    server::{Body, serve, written},
    text_format::to_text_format,
};

/// The content type of [`encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type for clients that do not ask for OpenMetrics.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The path metrics are served on.
pub const PATH: &str = "/metrics";
/// The exposition of one scrape, in the OpenMetrics text format ([`OPENMETRICS_CONTENT_TYPE`]),
/// ending in `# EOF`.
pub fn encode(status: &Status, rules: &[RuleView]) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("portgate");
    registry.register_collector(Box::new(Snapshot::new(status, rules)));
    let mut out = String::with_capacity(8 * 1024 + rules.len() * 512);
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}
