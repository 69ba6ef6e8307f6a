//! The engines' bridges, named in one place: the default ones, how each engine names its
//! networks' bridges, and the bridge behind a network as the engines' APIs describe it.

use std::collections::HashMap;

use bollard::models::Network;

use super::{Engine, podman};

/// Docker's default network's bridge.
pub const DOCKER_DEFAULT: &str = "docker0";
/// Podman's default network's bridge (netavark).
pub const PODMAN_DEFAULT: &str = "podman0";
/// Podman's default network's bridge under CNI, unless its configuration names another.
const CNI_DEFAULT: &str = "cni-podman0";
/// The bridges `--bridge auto` gates whether or not they exist yet.
pub const DEFAULTS: [&str; 2] = [DOCKER_DEFAULT, PODMAN_DEFAULT];

/// Whether `name` is how an engine names its bridges: docker0, Docker's `br-<12 hex digits
/// of the network ID>`, netavark's `podman<N>`, CNI's `cni-podman<N>`.
pub fn is_engine_bridge_name(name: &str) -> bool {
    let numbered = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let docker = name
        .strip_prefix("br-")
        .is_some_and(|id| id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()));
    name == DOCKER_DEFAULT || docker || numbered("podman") || numbered("cni-podman")
}

/// Bridges that exist now and are named as the engines name theirs. `--bridge auto` gates
/// them as soon as they appear, before the engine (which may not be followed yet at boot)
/// reports its networks.
pub fn engine_named_bridges() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("bridge").is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| is_engine_bridge_name(name))
        .collect()
}

/// What Podman said about its networks' bridges.
#[derive(Debug, Default)]
pub(super) struct PodmanBridges {
    /// Podman runs the CNI backend.
    pub cni: bool,
    /// `network_interface` by network name, from Podman's own API.
    pub by_network: HashMap<String, String>,
}

/// The Linux bridge behind a bridge network, as each engine names it.
pub(super) fn bridge_of(
    engine: Engine,
    podman: &PodmanBridges,
    network: &Network,
) -> Option<String> {
    if network.driver.as_deref() != Some("bridge") {
        return None;
    }
    if let Some(name) = network
        .options
        .as_ref()
        .and_then(|o| o.get("com.docker.network.bridge.name"))
    {
        return Some(name.clone());
    }
    if engine == Engine::Podman
        && let Some(bridge) = network
            .name
            .as_deref()
            .map(|name| if name == "bridge" { "podman" } else { name })
            .and_then(|name| podman.by_network.get(name))
    {
        return Some(bridge.clone());
    }
    let cni = podman.cni;
    match (engine, network.name.as_deref(), network.id.as_deref()) {
        (Engine::Docker, Some("bridge"), _) => Some(DOCKER_DEFAULT.to_owned()),
        (Engine::Docker, _, Some(id)) => Some(format!("br-{}", id.get(..12).unwrap_or(id))),
        // Podman's compatible API calls its default network "bridge"; the bridges of other
        // networks are only in netavark's network files, or CNI's configuration lists. CNI's
        // default network may exist only in Podman's memory, with bridge cni-podman0.
        (Engine::Podman, Some("podman" | "bridge"), _) => Some(if cni {
            podman::cni_bridge(podman::CNI_CONFIG_DIR, "podman")
                .unwrap_or_else(|| CNI_DEFAULT.to_owned())
        } else {
            PODMAN_DEFAULT.to_owned()
        }),
        (Engine::Podman, Some(name), _) if cni => podman::cni_bridge(podman::CNI_CONFIG_DIR, name),
        (Engine::Podman, Some(name), _) => podman::network_interface_of(name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::is_engine_bridge_name;

    #[test]
    fn engine_bridge_names() {
        for name in [
            "docker0",
            "br-0123456789ab",
            "podman0",
            "podman12",
            "cni-podman0",
        ] {
            assert!(is_engine_bridge_name(name), "{name}");
        }
        for name in [
            "br-lan",
            "br-0123456789abc",
            "podman",
            "podmanx",
            "pgbr0",
            "eth0",
            "br0",
            "virbr0",
        ] {
            assert!(!is_engine_bridge_name(name), "{name}");
        }
    }
}
