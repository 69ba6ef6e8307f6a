//! Docker's Engine API and Podman's Docker-compatible API, watched over their unix sockets
//! with bollard: each engine gets a task that connects, takes a full snapshot (running
//! containers with their addresses, published ports, labels and networks; the bridges of the
//! engine's networks), then re-takes it after every container or network event. When the
//! engine goes away the task says so and reconnects with backoff; the agent keeps enforcing
//! the last snapshot.

use std::{
    collections::{BTreeMap, HashMap},
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
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    Attachment, Container, Engine, EngineInfo, FIREWALL_IPTABLES, RuntimeEvent, Snapshot,
    bridges::{PodmanBridges, bridge_of},
    podman,
};
use crate::policy::{ALLOW_LABEL, LabelOrigin, PortSpec, Protocol, Published};

/// Events arrive in bursts (a `docker run` is several); one snapshot after a short pause.
const SETTLE: Duration = Duration::from_millis(200);
/// A full re-sync now and then, in case an event was missed.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

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
#[path = "api_tests.rs"]
mod tests;
