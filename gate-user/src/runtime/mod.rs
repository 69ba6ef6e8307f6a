//! Container engines as the source of truth: what they run (containers, their addresses,
//! published ports, labels and networks), as the agent sees it. `api.rs` watches Docker and
//! rootful Podman over their APIs, `rootless.rs` each user's rootless Podman, `bridges.rs`
//! names the engines' bridges, `podman.rs` reads what only Podman's own API and files say.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::Serialize;

use crate::policy::{ALLOW_LABEL, LabelOrigin, PortSpec, Published, Workload};

mod api;
pub mod bridges;
mod podman;
pub mod rootless;

/// Docker's userland proxy (up to Docker 27 it binds the published port itself; Docker 28's
/// daemon binds it and hands it over).
pub const DOCKER_PROXY: &str = "docker-proxy";

/// Every process that relays a published port from a listening socket of the host to a
/// container: what the gate's relay hooks record.
pub const RELAY_PROCESSES: [&str; 8] = [
    DOCKER_PROXY,
    rootless::RELAYS[0],
    rootless::RELAYS[1],
    rootless::RELAYS[2],
    rootless::RELAYS[3],
    rootless::RELAYS[4],
    rootless::RELAYS[5],
    rootless::ROOTLESS_DOCKER,
];

pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
pub const DEFAULT_PODMAN_SOCKET: &str = "/run/podman/podman.sock";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Docker,
    Podman,
    /// Each user's rootless Podman, read with that user's `podman ps` ([`rootless`]).
    #[serde(rename = "podman-rootless")]
    RootlessPodman,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
            Engine::RootlessPodman => "podman-rootless",
        })
    }
}

/// A network a container is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The network's name, as the container's inspect names it.
    pub network: String,
    pub network_id: Option<String>,
    /// The network's driver (bridge, macvlan, ipvlan, host, overlay, ...), if the engine
    /// listed the network.
    pub driver: Option<String>,
    /// The Linux bridge behind a bridge network.
    pub bridge: Option<String>,
    /// The parent interface of a macvlan network (its `parent` option).
    pub parent: Option<String>,
    /// The container's addresses on this network.
    pub addresses: Vec<IpAddr>,
}

/// What the gate needs to know about a running container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub engine: Engine,
    pub id: String,
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub published: Vec<Published>,
    pub labels: BTreeMap<String, String>,
    /// The image's ID.
    pub image: Option<String>,
    /// Where the `portgate.allow` label comes from, if the container has one and the image
    /// could be inspected.
    pub allow_label_origin: Option<LabelOrigin>,
    /// `HostConfig.NetworkMode`: `bridge`, `host`, `none`, a network, `container:<id>`.
    pub network_mode: String,
    /// The networks the container is on, by name.
    pub networks: Vec<Attachment>,
    /// Ports the container exposes (`EXPOSE` in the image, `--expose`), one port per spec.
    pub exposed: Vec<PortSpec>,
    /// The user whose rootless engine runs it; none for the rootful engines.
    pub user: Option<String>,
}

impl Container {
    /// Whether `target` names this container: its name, its ID, or an ID prefix of at least
    /// 12 characters (the short form engines print).
    pub fn is_named(&self, target: &str) -> bool {
        self.name == target || (target.len() >= 12 && self.id.starts_with(target))
    }

    /// The facts the policy resolves rules against.
    pub fn workload(&self) -> Workload {
        Workload {
            id: self.id.clone(),
            name: self.name.clone(),
            addresses: self.addresses.clone(),
            published: self.published.clone(),
            allow_label: self.labels.get(ALLOW_LABEL).cloned(),
            allow_label_origin: self.allow_label_origin,
        }
    }

    /// Run by a user's rootless engine: its published ports are listening sockets of the
    /// host, judged by the gate's socket lookup; its address is a stand-in.
    pub fn is_rootless(&self) -> bool {
        self.engine == Engine::RootlessPodman
    }

    /// On the host's network: what it listens on is the host's own ports, behind no bridge.
    pub fn is_host_network(&self) -> bool {
        self.network_mode == "host"
            || self
                .networks
                .iter()
                .any(|n| n.driver.as_deref() == Some("host"))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub containers: Vec<Container>,
    /// Linux bridges of the engine's bridge networks.
    pub bridges: Vec<String>,
    pub info: EngineInfo,
    /// The users whose rootless engines were found (the rootless watcher only).
    pub rootless: Vec<rootless::RootlessUser>,
}

/// What `status` says about an engine, and what the netfilter delegation needs to know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineInfo {
    /// The engine's own version (`docker version`'s server, Podman's), if it said.
    pub version: Option<String>,
    /// Podman's network backend: `netavark` or `cni`.
    pub network_backend: Option<String>,
    /// Where the engine writes its firewall rules: `iptables` or `nftables` (Docker's
    /// `FirewallBackend`; for netavark, whether its `table inet netavark` exists), if known.
    pub firewall: Option<String>,
}

impl EngineInfo {
    /// Whether the engine accepts its bridges' traffic only in nftables tables of its own: a
    /// FORWARD chain elsewhere that drops then drops its replies too (netavark#977).
    pub fn nftables_only(&self) -> bool {
        self.firewall.as_deref() == Some(FIREWALL_NFTABLES)
    }
}

pub const FIREWALL_IPTABLES: &str = "iptables";
pub const FIREWALL_NFTABLES: &str = "nftables";

#[derive(Debug)]
pub enum RuntimeEvent {
    Synced {
        engine: Engine,
        snapshot: Snapshot,
        after_event: bool,
    },
    Disconnected {
        engine: Engine,
        error: String,
    },
}

pub use api::{label_origin, watch};
