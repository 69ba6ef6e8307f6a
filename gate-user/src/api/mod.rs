//! The control socket: one JSON request per connection, one JSON response back.
//! The agent serves it (`server`), the CLI calls it (`client`).

pub mod client;
pub mod server;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::{LabelOrigin, LabelPolicy, Origin};

pub const DEFAULT_SOCKET: &str = "/run/portgate/portgate.sock";
/// The largest request: a block list of some 300 000 entries; anything larger is refused.
pub const MAX_REQUEST_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// `target`: an address or a container name or ID (none with `host_port`); `ports`,
    /// `published`, or `host_port` (e.g. "8080/tcp"). `from`: prefixes or set names;
    /// `via`: an interface; `for_seconds`: the rule ends by itself after that long.
    Allow {
        target: String,
        ports: Option<String>,
        published: bool,
        #[serde(default)]
        host_port: Option<String>,
        #[serde(default)]
        from: Vec<String>,
        #[serde(default)]
        via: Option<String>,
        #[serde(default)]
        for_seconds: Option<u64>,
    },
    Deny {
        target: String,
        ports: Option<String>,
        published: bool,
        #[serde(default)]
        host_port: Option<String>,
        /// Also end the established connections the removed rules admitted.
        #[serde(default)]
        cut: bool,
    },
    /// Creates or replaces the named set (`delete`: removes it; refused while rules use it).
    Set {
        name: String,
        prefixes: Vec<String>,
        #[serde(default)]
        delete: bool,
    },
    /// Adds `prefixes` to the block list (`remove`: takes them off; `replace`: the list
    /// becomes exactly `prefixes`, switched to at once).
    Block {
        prefixes: Vec<String>,
        #[serde(default)]
        remove: bool,
        #[serde(default)]
        replace: bool,
    },
    /// The verdict a new connection would get, from the maps the kernel reads.
    Explain {
        source: String,
        target: String,
        port: String,
        #[serde(default)]
        via: Option<String>,
    },
    /// Read the policy file again and apply it (as SIGHUP does).
    Reload,
    List,
    Status,
    /// Switch between enforce and audit at run time; tracked connections are kept.
    Mode {
        audit: bool,
    },
    /// Stream drop events as JSON lines until the client hangs up.
    Watch,
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
    List(Box<RuleList>),
    Status(Box<Status>),
    Explained(Explanation),
}

/// What `explain` found.
#[derive(Debug, Serialize, Deserialize)]
pub struct Explanation {
    /// "admitted" or "dropped".
    pub verdict: String,
    /// The counter the kernel would count: "new_allowed", "not_allowed", "blocked",
    /// "source_not_allowed", "interface_not_allowed".
    pub reason: String,
    /// The rule that admits, when one does.
    pub rule: Option<u32>,
    /// The container address and port the connection reaches (after a published mapping).
    pub destination: String,
    pub destination_port: u16,
    pub protocol: String,
    /// Each step, in words: the mapping, the block entry, the rule, the set.
    pub steps: Vec<String>,
}

/// What `allow` or `deny` did.
#[derive(Debug, Serialize, Deserialize)]
pub struct Changed {
    pub message: String,
    pub rules: Vec<RuleView>,
    /// What went only partly as asked, e.g. allow entries that did not fit in the map.
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RuleList {
    pub rules: Vec<RuleView>,
    /// Named source sets: name → prefixes.
    #[serde(default)]
    pub sets: BTreeMap<String, Vec<String>>,
    /// The block list.
    #[serde(default)]
    pub blocks: Vec<String>,
    /// Containers whose `portgate.allow` label does not parse (it opens nothing).
    #[serde(default)]
    pub label_errors: Vec<LabelError>,
    /// Containers whose label is their image's, which `--labels container` ignores.
    #[serde(default)]
    pub ignored_labels: Vec<IgnoredLabelView>,
    /// What `portgate deny` closed that labels or the default policy open, e.g. "web 80/tcp".
    #[serde(default)]
    pub denials: Vec<String>,
    /// What of the sets and blocks comes from the policy file (its rules are listed with
    /// source "file").
    #[serde(default)]
    pub policy_file: Option<PolicyFileView>,
    /// The running containers of users' rootless engines, with their published ports.
    #[serde(default)]
    pub rootless: Vec<RootlessContainer>,
}

/// A container of a user's rootless engine: its ports are listening sockets of the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootlessContainer {
    /// `USER/NAME`, as rules name it.
    pub container: String,
    pub user: String,
    pub engine: String,
    pub id: String,
    /// Published host ports, e.g. "8080->80/tcp", "127.0.0.1:5353->53/udp".
    pub published: Vec<String>,
    /// Whether the gate judges connections to them (the agent's socket lookup is attached).
    pub gated: bool,
    /// The allow map's key for the container's ports: a stand-in from
    /// fd70:6f72:7467:6174::/64, never an address on the network.
    pub stand_in_address: String,
}

/// A user whose rootless engine the agent found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootlessUserView {
    pub user: String,
    pub uid: u32,
    /// The engine's helper programs running for the user (conmon, rootlessport, pasta, ...).
    pub helpers: Vec<String>,
    /// Ports its relays listen on, e.g. "8080/tcp".
    pub listening: Vec<String>,
    pub containers: usize,
    /// Whether the agent follows this user's engine (false: rootless Docker).
    pub followed: bool,
    /// Why its containers are not known (or only as last read), if so; for an engine the
    /// agent does not follow, what it would take.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyFileView {
    pub path: String,
    pub sets: BTreeMap<String, Vec<String>>,
    pub blocks: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabelError {
    pub container: String,
    pub error: String,
}

/// A container whose `portgate.allow` label opens nothing because it is (or may be) its
/// image's (`agent --labels container`, the default).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IgnoredLabelView {
    pub container: String,
    /// The label's value, e.g. "80/tcp".
    pub label: String,
    /// "image", or null when the image could not be inspected.
    pub origin: Option<LabelOrigin>,
    /// What the agent logs: the container, and `--labels image`.
    pub warning: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleView {
    pub id: u32,
    /// What the rule names: an address, or a container name or ID.
    pub target: String,
    /// The running container the target matched, if any.
    pub container: Option<String>,
    /// Opens whatever the container publishes.
    pub published: bool,
    pub source: Origin,
    /// Opens at least one port on at least one address now.
    pub active: bool,
    /// The first address (or the target, while inactive).
    pub address: String,
    pub addresses: Vec<String>,
    /// The port specs in force, e.g. ["80/tcp"].
    pub ports: Vec<String>,
    /// Host ports that the engines map to these container ports.
    pub host_ports: Vec<u16>,
    /// tcp, udp, icmp, or "published".
    pub protocol: String,
    pub port_start: u16,
    pub port_end: u16,
    /// Packets of the connections this rule admitted, both directions.
    pub packets: u64,
    pub bytes: u64,
    /// A label rule: "image" when the image carries the label, "container" when it was set
    /// on the container (`docker run --label`); null for other rules, or when unknown.
    #[serde(default)]
    pub label_origin: Option<LabelOrigin>,
    /// Whether the gate sees traffic to the rule's addresses: true when all are on gated
    /// bridges, false when one is not (host network, macvlan, an ungated bridge); null when
    /// no container owns them.
    #[serde(default)]
    pub gated: Option<bool>,
    /// Who may connect: prefixes and set names; empty: anyone.
    #[serde(default)]
    pub from: Vec<String>,
    /// The interface connections must come in on.
    #[serde(default)]
    pub via: Option<String>,
    /// When the rule ends by itself (RFC 3339), and the seconds left.
    #[serde(default)]
    pub expires: Option<String>,
    #[serde(default)]
    pub expires_in_seconds: Option<u64>,
    /// Why the rule admits less than it says (an interface missing, empty sets, expired).
    #[serde(default)]
    pub problem: Option<String>,
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
    pub engines: Vec<EngineStatus>,
    /// The netfilter delegation rules the agent keeps in place.
    pub netfilter: Vec<NetfilterStatus>,
    /// Counters by kind ("pass", "drop", "event"), then by name.
    pub counters: BTreeMap<String, BTreeMap<String, u64>>,
    /// Drops (or, in audit mode, would-be drops) per bridge and reason.
    pub bridge_drops: Vec<BridgeDrops>,
    /// Drop events read from the kernel, and those the kernel's rate limit suppressed.
    pub drop_events: DropEventStats,
    pub version: String,
    /// Whether containers' `portgate.allow` labels open ports (`agent --labels` not off).
    #[serde(default = "labels_default")]
    pub labels: bool,
    /// Which labels open ports: "off", "container" (set on the container) or "image" (also
    /// the image's).
    #[serde(default)]
    pub label_policy: LabelPolicy,
    /// Containers whose label is their image's and opens nothing (`--labels container`).
    #[serde(default)]
    pub ignored_labels: Vec<IgnoredLabelView>,
    /// Published ports of the running containers, by whether the gate sees them.
    #[serde(default)]
    pub published_ports: PublishedPorts,
    /// Running containers the gate does not (fully) see, with the ports that are open to
    /// whoever reaches them.
    #[serde(default)]
    pub ungated: Vec<UngatedContainer>,
    /// Containers whose `portgate.allow` label does not parse (it opens nothing).
    #[serde(default)]
    pub label_errors: Vec<LabelError>,
    /// Entries of the block list.
    #[serde(default)]
    pub blocks: usize,
    /// Interfaces with the early drop (`--uplink`).
    #[serde(default)]
    pub uplinks: Vec<BridgeStatus>,
    /// The running containers of users' rootless engines, with their published ports.
    #[serde(default)]
    pub rootless: Vec<RootlessContainer>,
    /// The users whose rootless engines the agent found.
    #[serde(default)]
    pub rootless_users: Vec<RootlessUserView>,
}

fn labels_default() -> bool {
    true
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPorts {
    /// Published ports of containers on a gated bridge.
    pub gated: usize,
    /// Published ports of containers on no gated bridge.
    pub ungated: usize,
}

/// A running container whose ports the gate does not see, or not all of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UngatedContainer {
    pub container: String,
    pub engine: String,
    /// `host`, `bridge`, a network name, ...
    pub network_mode: String,
    /// Why, e.g. "host network: ..." or "network lan (macvlan): no bridge for the gate".
    pub reason: String,
    /// The networks the gate does not see.
    pub networks: Vec<String>,
    /// The container's addresses on them.
    pub addresses: Vec<String>,
    /// Published ports that bypass the gate, e.g. "8080->80/tcp", "127.0.0.1:8080->80/tcp".
    pub published: Vec<String>,
    /// Ports the container exposes (EXPOSE, --expose), e.g. "53/udp": on the host network
    /// they are the host's ports, on the other networks they answer on those addresses.
    pub exposed: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BridgeDrops {
    pub bridge: String,
    pub reason: String,
    pub packets: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct DropEventStats {
    pub reported: u64,
    pub suppressed: u64,
}

/// One dropped (or, in audit mode, would-be-dropped) connection attempt, for `portgate watch`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WatchEvent {
    /// RFC 3339, UTC.
    pub time: String,
    pub bridge: String,
    pub source: String,
    pub source_port: u16,
    pub destination: String,
    pub destination_port: u16,
    /// tcp, udp, icmp, icmpv6, or the IP protocol number.
    pub protocol: String,
    pub reason: String,
    /// The container that owns the destination address, when known.
    pub container: Option<String>,
    /// The gate was in audit mode: the packet passed.
    pub audit: bool,
    /// Events the kernel suppressed (rate limit) just before this one, on the same CPU.
    pub suppressed: u32,
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
    /// Entries the rules want that did not fit (the map was full): not enforced.
    #[serde(default)]
    pub not_fitted: usize,
    /// The rules those entries belong to.
    #[serde(default)]
    pub not_fitted_rules: Vec<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Flows {
    /// Entries in the tracking table, including idle ones not yet evicted.
    pub tracked: usize,
    pub capacity: u32,
    /// Connections the agent ended since it started (blocks, `deny --cut`, `--for` ends).
    #[serde(default)]
    pub cut: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EngineStatus {
    pub engine: String,
    pub socket: String,
    pub connected: bool,
    pub containers: usize,
    /// Snapshots taken (at connect, after events, periodically).
    pub syncs: u64,
    /// Snapshots taken because of engine events.
    pub events: u64,
    pub last_error: Option<String>,
    /// The engine's version, as it reports it ("28.5.2", "5.8.6"); null until it was read.
    #[serde(default)]
    pub version: Option<String>,
    /// Podman's network backend, "netavark" or "cni" (null for Docker).
    #[serde(default)]
    pub network_backend: Option<String>,
    /// Where the engine writes its firewall rules: "iptables" or "nftables" (null: unknown).
    #[serde(default)]
    pub firewall: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NetfilterStatus {
    pub bridge: String,
    pub backend: String,
    pub chain: String,
    pub installed: bool,
    /// The bridge's replies rule (its engine accepts the bridge's traffic only in nftables
    /// tables of its own), not its rule toward the bridge. Absent from older agents.
    #[serde(default)]
    pub replies: bool,
}
