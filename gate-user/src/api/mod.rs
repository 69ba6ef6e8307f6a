//! The control socket: one JSON request per connection, one JSON response back.
//! The agent serves it (`server`), the CLI calls it (`client`).

pub mod client;
pub mod server;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/run/portgate/portgate.sock";
/// Requests are tiny; anything larger is refused.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Allow { address: String, ports: String },
    Deny { address: String, ports: String },
    List,
    Status,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(Reply),
    Error(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Changed(Changed),
    List(RuleList),
    Status(Box<Status>),
}

/// What `allow` or `deny` did.
#[derive(Debug, Serialize, Deserialize)]
pub struct Changed {
    pub message: String,
    pub rules: Vec<RuleView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RuleList {
    pub rules: Vec<RuleView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleView {
    pub id: u32,
    pub address: String,
    pub protocol: String,
    pub port_start: u16,
    pub port_end: u16,
    /// Packets of the connections this rule admitted, both directions.
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub mode: String,
    pub gate_host_traffic: bool,
    pub bpffs: String,
    pub state_file: String,
    pub bridges: Vec<BridgeStatus>,
    pub rules: usize,
    pub allow_entries: Fill,
    pub flows: Flows,
    /// Counters by kind ("pass", "drop", "event"), then by name.
    pub counters: BTreeMap<String, BTreeMap<String, u64>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BridgeStatus {
    pub name: String,
    pub ifindex: u32,
    pub attached: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Fill {
    pub used: usize,
    pub capacity: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Flows {
    /// Entries in the tracking table, including idle ones not yet evicted.
    pub tracked: usize,
    pub capacity: u32,
}
