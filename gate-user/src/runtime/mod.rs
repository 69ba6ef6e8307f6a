//! Container engines as the source of truth: Docker's Engine API and Podman's
//! Docker-compatible API, watched over their unix sockets with bollard.
//!
//! Each engine gets a task that connects, takes a full snapshot (running containers with
//! their addresses, published ports, labels and networks; the bridges of the engine's
//! networks), then re-takes it after every container or network event. When the engine goes away the task
//! says so and reconnects with backoff; the agent keeps enforcing the last snapshot.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    path::PathBuf,
    time::Duration,
};

use bollard::{
    API_DEFAULT_VERSION, Docker,
    models::{ContainerInspectResponse, Network},
    query_parameters::{EventsOptions, ListContainersOptions, ListNetworksOptions},
};
use futures_util::StreamExt as _;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::policy::{ALLOW_LABEL, LabelOrigin, PortSpec, Protocol, Published, Workload};
use bridges::{PodmanBridges, bridge_of};

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

/// Events arrive in bursts (a `docker run` is several); one snapshot after a short pause.
const SETTLE: Duration = Duration::from_millis(200);
/// A full re-sync now and then, in case an event was missed.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

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

/// Watches one engine forever, sending what it sees to `events`.
pub async fn watch(engine: Engine, socket: PathBuf, events: mpsc::Sender<RuntimeEvent>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let error = match session(engine, &socket, &events, &mut backoff).await {
            Ok(()) => "event stream ended".to_owned(),
            Err(err) => err.to_string(),
        };
        if events
            .send(RuntimeEvent::Disconnected { engine, error })
            .await
            .is_err()
        {
            return; // the agent is shutting down
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: snapshot, then a snapshot after each burst of events.
async fn session(
    engine: Engine,
    socket: &std::path::Path,
    events: &mpsc::Sender<RuntimeEvent>,
    backoff: &mut Duration,
) -> Result<(), bollard::errors::Error> {
    let path = socket.to_string_lossy();
    let docker = Docker::connect_with_unix(&path, 30, API_DEFAULT_VERSION)?
        .negotiate_version()
        .await?;
    let filters = HashMap::from([(
        "type".to_owned(),
        vec!["container".to_owned(), "network".to_owned()],
    )]);
    // Subscribe before the snapshot, so nothing between the two is missed.
    let mut stream = Box::pin(docker.events(Some(EventsOptions {
        filters: Some(filters),
        ..Default::default()
    })));
    let snapshot = take_snapshot(engine, &docker, socket).await?;
    info!(%engine, socket = %path, containers = snapshot.containers.len(),
        version = ?snapshot.info.version, network_backend = ?snapshot.info.network_backend,
        firewall = ?snapshot.info.firewall, "engine synced");
    *backoff = Duration::from_millis(500);
    if events
        .send(RuntimeEvent::Synced {
            engine,
            snapshot,
            after_event: false,
        })
        .await
        .is_err()
    {
        return Ok(());
    }
    loop {
        let next = tokio::time::timeout(RESYNC_EVERY, stream.next()).await;
        let after_event = match next {
            Ok(Some(Ok(_))) => true,
            Ok(Some(Err(err))) => return Err(err),
            Ok(None) => return Ok(()),
            Err(_) => false, // periodic re-sync
        };
        // Let the burst finish, then take one snapshot for all of it.
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                next = stream.next() => match next {
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Err(err),
                    None => return Ok(()),
                },
            }
        }
        let snapshot = take_snapshot(engine, &docker, socket).await?;
        if events
            .send(RuntimeEvent::Synced {
                engine,
                snapshot,
                after_event,
            })
            .await
            .is_err()
        {
            return Ok(());
        }
    }
}

async fn take_snapshot(
    engine: Engine,
    docker: &Docker,
    socket: &std::path::Path,
) -> Result<Snapshot, bollard::errors::Error> {
    let info = engine_info(engine, docker, socket).await;
    let podman_bridges = match engine {
        Engine::Docker | Engine::RootlessPodman => HashMap::new(),
        Engine::Podman => podman::network_interfaces(socket)
            .await
            .unwrap_or_else(|err| {
                warn!(%engine, "cannot list Podman's networks; bridges from files only: {:#}",
                    anyhow::Error::from(err));
                HashMap::new()
            }),
    };
    let networks = NetworkIndex::new(
        engine,
        &PodmanBridges {
            cni: info.network_backend.as_deref() == Some(BACKEND_CNI),
            by_network: podman_bridges,
        },
        &docker.list_networks(None::<ListNetworksOptions>).await?,
    );
    let summaries = docker
        .list_containers(None::<ListContainersOptions>)
        .await?;
    let mut containers = Vec::with_capacity(summaries.len());
    for id in summaries.into_iter().filter_map(|s| s.id) {
        match docker.inspect_container(&id, None).await {
            Ok(inspect) => containers.extend(container_facts(engine, inspect)),
            // Gone between list and inspect: the next event brings a new snapshot.
            Err(err) => warn!(%engine, id, "cannot inspect container: {err}"),
        }
    }
    // One image inspect per distinct image that a container's allow label may come from.
    let mut image_labels: HashMap<String, Option<HashMap<String, String>>> = HashMap::new();
    for container in &mut containers {
        networks.describe(&mut container.networks);
        let Some(image) = container
            .image
            .clone()
            .filter(|_| container.labels.contains_key(ALLOW_LABEL))
        else {
            continue;
        };
        if !image_labels.contains_key(&image) {
            let labels = match docker.inspect_image(&image).await {
                Ok(inspect) => Some(inspect.config.and_then(|c| c.labels).unwrap_or_default()),
                Err(err) => {
                    warn!(%engine, image, "cannot inspect image; its labels' origin is unknown: {err}");
                    None
                }
            };
            image_labels.insert(image.clone(), labels);
        }
        container.allow_label_origin = image_labels
            .get(&image)
            .and_then(Option::as_ref)
            .and_then(|labels| label_origin(&container.labels, labels, ALLOW_LABEL));
    }
    containers.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Snapshot {
        containers,
        bridges: networks.bridges(),
        info,
        rootless: Vec::new(),
    })
}

const BACKEND_CNI: &str = "cni";

/// The engine's version and firewall. Never fails the snapshot: what cannot be read is None.
async fn engine_info(engine: Engine, docker: &Docker, socket: &std::path::Path) -> EngineInfo {
    let version = match docker.version().await {
        Ok(version) => version.version,
        Err(err) => {
            warn!(%engine, "cannot read the engine's version: {err}");
            None
        }
    };
    match engine {
        Engine::Docker | Engine::RootlessPodman => {
            // Docker 28 names its firewall backend; older ones only had iptables.
            let firewall = match docker.info().await {
                Ok(info) => Some(
                    info.firewall_backend
                        .and_then(|f| f.driver)
                        .unwrap_or_else(|| FIREWALL_IPTABLES.to_owned()),
                ),
                Err(err) => {
                    warn!(%engine, "cannot read the engine's info: {err}");
                    None
                }
            };
            EngineInfo {
                version,
                network_backend: None,
                firewall,
            }
        }
        Engine::Podman => {
            // Only Podman's own API says which network backend it runs.
            let network_backend = match podman::network_backend(socket).await {
                Ok(backend) => backend,
                Err(err) => {
                    warn!(%engine, "cannot read Podman's network backend: {err:#}");
                    None
                }
            };
            let firewall = match network_backend.as_deref() {
                Some(BACKEND_CNI) => Some(FIREWALL_IPTABLES.to_owned()),
                Some(_) => tokio::task::spawn_blocking(podman::netavark_firewall)
                    .await
                    .ok()
                    .flatten(),
                None => None,
            };
            EngineInfo {
                version,
                network_backend,
                firewall,
            }
        }
    }
}

/// Where the container's label `key` comes from: the image when the image has it with the
/// same value (a `--label` that repeats the image's value cannot be told from it).
pub fn label_origin(
    container: &BTreeMap<String, String>,
    image: &HashMap<String, String>,
    key: &str,
) -> Option<LabelOrigin> {
    let value = container.get(key)?;
    Some(if image.get(key) == Some(value) {
        LabelOrigin::Image
    } else {
        LabelOrigin::Container
    })
}

/// What a network says about itself: driver, bridge, macvlan parent.
type NetworkFacts = (Option<String>, Option<String>, Option<String>);

/// An engine's networks' facts, by ID and by name.
#[derive(Debug, Default)]
struct NetworkIndex {
    by_id: HashMap<String, NetworkFacts>,
    by_name: HashMap<String, NetworkFacts>,
}

impl NetworkIndex {
    fn new(engine: Engine, podman: &PodmanBridges, networks: &[Network]) -> Self {
        let mut index = Self::default();
        for network in networks {
            let facts = (
                network.driver.clone(),
                bridge_of(engine, podman, network),
                macvlan_parent(network),
            );
            if let Some(id) = &network.id {
                index.by_id.insert(id.clone(), facts.clone());
            }
            if let Some(name) = &network.name {
                index.by_name.insert(name.clone(), facts);
            }
        }
        index
    }

    /// The Linux bridges of the bridge networks, sorted.
    fn bridges(&self) -> Vec<String> {
        let mut bridges: Vec<String> = self
            .by_name
            .values()
            .chain(self.by_id.values())
            .filter_map(|(_, bridge, _)| bridge.clone())
            .collect();
        bridges.sort();
        bridges.dedup();
        bridges
    }

    /// Fills in each attachment's driver and bridge.
    fn describe(&self, attachments: &mut [Attachment]) {
        for attachment in attachments {
            let facts = attachment
                .network_id
                .as_ref()
                .and_then(|id| self.by_id.get(id))
                .or_else(|| self.by_name.get(&attachment.network));
            if let Some((driver, bridge, parent)) = facts {
                attachment.driver.clone_from(driver);
                attachment.bridge.clone_from(bridge);
                attachment.parent.clone_from(parent);
            }
        }
    }
}

/// The parent interface of a macvlan network, as both engines take it (`-o parent=eth0`).
fn macvlan_parent(network: &Network) -> Option<String> {
    if network.driver.as_deref() != Some("macvlan") {
        return None;
    }
    network.options.as_ref()?.get("parent").cloned()
}

/// A binding's host address; absent or empty means every address.
fn host_ip(text: Option<&str>) -> IpAddr {
    text.and_then(|t| t.parse().ok())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

fn container_facts(engine: Engine, inspect: ContainerInspectResponse) -> Option<Container> {
    let id = inspect.id?;
    let name = inspect
        .name
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_owned();
    let config = inspect.config.unwrap_or_default();
    let labels = config
        .labels
        .map(|l| l.into_iter().collect())
        .unwrap_or_default();
    let mut exposed: Vec<PortSpec> = config
        .exposed_ports
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.parse::<PortSpec>().ok())
        .filter(|spec| spec.protocol != Protocol::Icmp)
        .collect();
    exposed.sort_by_key(|spec| (spec.port_start, spec.protocol));
    exposed.dedup();
    let network_mode = inspect
        .host_config
        .and_then(|h| h.network_mode)
        .unwrap_or_default();
    let settings = inspect.network_settings.unwrap_or_default();
    let mut networks: Vec<Attachment> = settings
        .networks
        .unwrap_or_default()
        .into_iter()
        .map(|(network, endpoint)| {
            let mut addresses: Vec<IpAddr> = [endpoint.ip_address, endpoint.global_ipv6_address]
                .into_iter()
                .flatten()
                .filter_map(|a| a.parse().ok())
                .collect();
            addresses.sort();
            Attachment {
                network,
                network_id: endpoint.network_id.filter(|id| !id.is_empty()),
                driver: None,
                bridge: None,
                parent: None,
                addresses,
            }
        })
        .collect();
    networks.sort_by(|a, b| a.network.cmp(&b.network));
    let mut addresses: Vec<IpAddr> = networks
        .iter()
        .flat_map(|n| n.addresses.iter().copied())
        .collect();
    addresses.sort();
    addresses.dedup();
    let mut published: Vec<Published> = settings
        .ports
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(port, bindings)| {
            let (port, proto) = port.split_once('/').unwrap_or((port.as_str(), "tcp"));
            let protocol = match proto {
                "tcp" => Some(Protocol::Tcp),
                "udp" => Some(Protocol::Udp),
                _ => None,
            };
            let container_port = port.parse::<u16>().ok();
            bindings
                .unwrap_or_default()
                .into_iter()
                .filter_map(move |b| {
                    Some(Published {
                        host_ip: host_ip(b.host_ip.as_deref()),
                        host_port: b.host_port?.parse().ok()?,
                        container_port: container_port?,
                        protocol: protocol?,
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect();
    published.sort();
    published.dedup();
    Some(Container {
        engine,
        id,
        name,
        addresses,
        published,
        labels,
        image: inspect.image.filter(|i| !i.is_empty()),
        allow_label_origin: None,
        network_mode,
        networks,
        exposed,
        user: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from `docker inspect` of `docker run -p 8080:80 -p 5353:53/udp --label ...`.
    const INSPECT: &str = r#"{
        "Id": "4013436478f9e4c7ad8aa8d1d3d6482fca666fda1187e799cc8bfa0a33264a8a",
        "Name": "/web",
        "Config": {"Labels": {"portgate.allow": "443/tcp"}},
        "NetworkSettings": {
            "Ports": {
                "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}, {"HostIp": "::", "HostPort": "8080"}],
                "53/udp": [{"HostIp": "0.0.0.0", "HostPort": "5353"}],
                "9000/tcp": null
            },
            "Networks": {
                "bridge": {"IPAddress": "172.17.0.2", "GlobalIPv6Address": ""},
                "backend": {"IPAddress": "172.18.0.5", "GlobalIPv6Address": "fd00:18::5"}
            }
        }
    }"#;

    #[test]
    fn inspect_output_becomes_container_facts() {
        let inspect: ContainerInspectResponse =
            serde_json::from_str(INSPECT).expect("inspect JSON");
        let c = container_facts(Engine::Docker, inspect).expect("facts");
        assert_eq!(c.name, "web");
        assert!(c.is_named("web") && c.is_named("4013436478f9") && !c.is_named("4013"));
        let addresses: Vec<String> = c.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(addresses, ["172.17.0.2", "172.18.0.5", "fd00:18::5"]);
        assert_eq!(
            c.published,
            [
                Published {
                    host_ip: "0.0.0.0".parse().unwrap(),
                    host_port: 5353,
                    container_port: 53,
                    protocol: Protocol::Udp
                },
                Published {
                    host_ip: "0.0.0.0".parse().unwrap(),
                    host_port: 8080,
                    container_port: 80,
                    protocol: Protocol::Tcp
                },
                Published {
                    host_ip: "::".parse().unwrap(),
                    host_port: 8080,
                    container_port: 80,
                    protocol: Protocol::Tcp
                },
            ]
        );
        assert_eq!(
            c.labels.get(ALLOW_LABEL).map(String::as_str),
            Some("443/tcp")
        );
    }

    /// Trimmed from `docker inspect` of `docker run --network host` of an image that
    /// exposes 53/udp and 8053/tcp (`-p` is ignored on the host network).
    const HOST_NETWORK: &str = r#"{
        "Id": "6f1a0c0e4b8d2a9e2f3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091",
        "Name": "/dns",
        "Image": "sha256:9f0c0d6e1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5",
        "Config": {"ExposedPorts": {"53/udp": {}, "8053/tcp": {}}, "Labels": {}},
        "HostConfig": {"NetworkMode": "host"},
        "NetworkSettings": {
            "Ports": {},
            "Networks": {
                "host": {"NetworkID": "3c6a3d3f6e0b", "IPAddress": "", "GlobalIPv6Address": ""}
            }
        }
    }"#;

    /// Trimmed from `docker inspect` of a container on a macvlan network `lan`.
    const MACVLAN: &str = r#"{
        "Id": "0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c",
        "Name": "/nas",
        "Image": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
        "Config": {"ExposedPorts": {"445/tcp": {}}},
        "HostConfig": {"NetworkMode": "lan"},
        "NetworkSettings": {
            "Ports": {"445/tcp": null},
            "Networks": {
                "lan": {"NetworkID": "aa11bb22cc33dd44", "IPAddress": "192.168.1.50", "GlobalIPv6Address": ""}
            }
        }
    }"#;

    fn index(networks: &[(&str, &str, &str)]) -> NetworkIndex {
        let networks: Vec<Network> = networks
            .iter()
            .map(|(name, id, driver)| Network {
                name: Some((*name).to_owned()),
                id: Some((*id).to_owned()),
                driver: Some((*driver).to_owned()),
                ..Default::default()
            })
            .collect();
        NetworkIndex::new(Engine::Docker, &PodmanBridges::default(), &networks)
    }

    #[test]
    fn host_network_containers_are_recognised_with_their_exposed_ports() {
        let inspect: ContainerInspectResponse =
            serde_json::from_str(HOST_NETWORK).expect("inspect JSON");
        let mut c = container_facts(Engine::Docker, inspect).expect("facts");
        index(&[("host", "3c6a3d3f6e0b", "host"), ("bridge", "b1", "bridge")])
            .describe(&mut c.networks);
        assert_eq!(c.network_mode, "host");
        assert!(c.is_host_network());
        assert!(c.addresses.is_empty() && c.published.is_empty());
        assert_eq!(c.networks.len(), 1);
        assert_eq!(c.networks[0].driver.as_deref(), Some("host"));
        assert_eq!(c.networks[0].bridge, None);
        let exposed: Vec<String> = c.exposed.iter().map(ToString::to_string).collect();
        assert_eq!(exposed, ["53/udp", "8053/tcp"]);
        assert_eq!(
            c.image.as_deref(),
            Some("sha256:9f0c0d6e1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5")
        );
    }

    #[test]
    fn macvlan_containers_have_their_network_driver_and_no_bridge() {
        let inspect: ContainerInspectResponse =
            serde_json::from_str(MACVLAN).expect("inspect JSON");
        let mut c = container_facts(Engine::Docker, inspect).expect("facts");
        index(&[("lan", "aa11bb22cc33dd44", "macvlan")]).describe(&mut c.networks);
        assert!(!c.is_host_network());
        assert_eq!(
            c.networks,
            [Attachment {
                network: "lan".to_owned(),
                network_id: Some("aa11bb22cc33dd44".to_owned()),
                driver: Some("macvlan".to_owned()),
                bridge: None,
                parent: None,
                addresses: vec!["192.168.1.50".parse().unwrap()],
            }]
        );
        assert!(
            c.published.is_empty(),
            "a port without bindings is not published"
        );
        assert_eq!(c.exposed.len(), 1);

        // A bridge network's attachment gets its Linux bridge, found by network ID.
        let inspect: ContainerInspectResponse = serde_json::from_str(INSPECT).expect("inspect");
        let mut web = container_facts(Engine::Docker, inspect).expect("facts");
        assert_eq!(web.network_mode, "");
        let networks = vec![
            Network {
                name: Some("bridge".to_owned()),
                id: Some("b1".to_owned()),
                driver: Some("bridge".to_owned()),
                ..Default::default()
            },
            Network {
                name: Some("backend".to_owned()),
                id: Some("0123456789abcdef".to_owned()),
                driver: Some("bridge".to_owned()),
                ..Default::default()
            },
        ];
        let index = NetworkIndex::new(Engine::Docker, &PodmanBridges::default(), &networks);
        index.describe(&mut web.networks);
        let bridges: Vec<Option<&str>> = web.networks.iter().map(|n| n.bridge.as_deref()).collect();
        assert_eq!(bridges, [Some("br-0123456789ab"), Some("docker0")]);
        assert_eq!(index.bridges(), ["br-0123456789ab", "docker0"]);
    }

    #[test]
    fn an_allow_label_comes_from_the_image_only_with_the_images_value() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let image: HashMap<String, String> =
            labels(&[(ALLOW_LABEL, "80/tcp")]).into_iter().collect();
        let none = HashMap::new();
        let origin = |container: &[(&str, &str)], image: &HashMap<String, String>| {
            label_origin(&labels(container), image, ALLOW_LABEL)
        };
        assert_eq!(
            origin(&[(ALLOW_LABEL, "80/tcp")], &image),
            Some(LabelOrigin::Image)
        );
        assert_eq!(
            origin(&[(ALLOW_LABEL, "80/tcp,22/tcp")], &image),
            Some(LabelOrigin::Container),
            "docker run --label overrides the image's value"
        );
        assert_eq!(
            origin(&[(ALLOW_LABEL, "80/tcp")], &none),
            Some(LabelOrigin::Container)
        );
        assert_eq!(origin(&[("other", "x")], &image), None);
    }

    #[test]
    fn bridge_names_follow_each_engine() {
        let network = |name: &str, id: &str, bridge_option: Option<&str>| Network {
            name: Some(name.to_owned()),
            id: Some(id.to_owned()),
            driver: Some("bridge".to_owned()),
            options: bridge_option.map(|b| {
                HashMap::from([("com.docker.network.bridge.name".to_owned(), b.to_owned())])
            }),
            ..Default::default()
        };
        assert_eq!(
            bridge_of(
                Engine::Docker,
                &PodmanBridges::default(),
                &network("bridge", "abc", Some("docker0"))
            )
            .as_deref(),
            Some("docker0")
        );
        assert_eq!(
            bridge_of(
                Engine::Docker,
                &PodmanBridges::default(),
                &network("backend", "0123456789abcdef", None)
            )
            .as_deref(),
            Some("br-0123456789ab")
        );
        assert_eq!(
            bridge_of(
                Engine::Podman,
                &PodmanBridges::default(),
                &network("bridge", "x", None)
            )
            .as_deref(),
            Some("podman0")
        );
        let host = Network {
            driver: Some("host".to_owned()),
            ..network("host", "h", None)
        };
        assert_eq!(
            bridge_of(Engine::Docker, &PodmanBridges::default(), &host),
            None
        );
        // Podman's own API names the bridges; CNI's default network without it is
        // cni-podman0.
        let podman = PodmanBridges {
            cni: false,
            by_network: HashMap::from([
                ("podman".to_owned(), "podman0".to_owned()),
                ("backend".to_owned(), "podman3".to_owned()),
            ]),
        };
        assert_eq!(
            bridge_of(Engine::Podman, &podman, &network("backend", "y", None)).as_deref(),
            Some("podman3")
        );
        assert_eq!(
            bridge_of(Engine::Podman, &podman, &network("bridge", "x", None)).as_deref(),
            Some("podman0")
        );
        let cni = PodmanBridges {
            cni: true,
            by_network: HashMap::new(),
        };
        assert_eq!(
            bridge_of(Engine::Podman, &cni, &network("podman", "x", None)).as_deref(),
            Some("cni-podman0")
        );
    }
}
