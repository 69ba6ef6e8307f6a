//! What only Podman's own API and files say: its network backend (netavark or CNI), where
//! netavark keeps its firewall, and the bridges of its networks (netavark's network files,
//! CNI's configuration lists).

use std::{collections::HashMap, path::Path, process::Command};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
};

use super::FIREWALL_IPTABLES;

/// Where Podman's CNI backend reads its network configuration lists.
pub(super) const CNI_CONFIG_DIR: &str = "/etc/cni/net.d";
/// The largest answer read from Podman's API (a few KiB; more with many networks).
const INFO_LIMIT: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub(super) enum PodmanApiError {
    #[error("asking {socket} for {path}")]
    Io {
        socket: String,
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} answered {status:?}")]
    Status { path: &'static str, status: String },
    #[error("parsing the answer to {path}")]
    Json {
        path: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// `host.networkBackend` of Podman's `/libpod/info` ("netavark" or "cni"). bollard speaks only
/// the Docker-compatible API, which does not say.
pub(super) async fn network_backend(socket: &Path) -> Result<Option<String>, PodmanApiError> {
    let info = libpod_get(socket, "/v4.0.0/libpod/info").await?;
    Ok(info["host"]["networkBackend"].as_str().map(str::to_owned))
}

/// The Linux bridge of each of Podman's networks, by name (`network_interface` of
/// `/libpod/networks/json`, for netavark and CNI alike): the Docker-compatible list does not
/// have it, and netavark's files may be where the agent does not look (another root).
pub(super) async fn network_interfaces(
    socket: &Path,
) -> Result<HashMap<String, String>, PodmanApiError> {
    let networks = libpod_get(socket, "/v4.0.0/libpod/networks/json").await?;
    Ok(networks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["driver"] == "bridge")
        .filter_map(|n| {
            Some((
                n["name"].as_str()?.to_owned(),
                n["network_interface"].as_str()?.to_owned(),
            ))
        })
        .collect())
}

/// One GET of Podman's own API, as one HTTP/1.0 request: the server closes the connection
/// after its answer, so reading to the end reads exactly it.
async fn libpod_get(
    socket: &Path,
    path: &'static str,
) -> Result<serde_json::Value, PodmanApiError> {
    let io = |source| PodmanApiError::Io {
        socket: socket.display().to_string(),
        path,
        source,
    };
    let mut stream = UnixStream::connect(socket).await.map_err(io)?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: podman\r\n\r\n").as_bytes())
        .await
        .map_err(io)?;
    let mut answer = Vec::new();
    stream
        .take(INFO_LIMIT)
        .read_to_end(&mut answer)
        .await
        .map_err(io)?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(PodmanApiError::Status {
            path,
            status: status.to_owned(),
        });
    }
    serde_json::from_str(body).map_err(|source| PodmanApiError::Json { path, source })
}

/// netavark's firewall driver, as the host's netfilter shows it: `nftables` when its own
/// `table inet netavark` exists (netavark 1.17's default), else `iptables`. None when nft
/// cannot be run. Listing a table never creates it.
pub(super) fn netavark_firewall() -> Option<String> {
    let nft = crate::netfilter::find_binary("nft");
    let Some(nft) = nft else {
        return Some(FIREWALL_IPTABLES.to_owned());
    };
    let output = Command::new(nft)
        .args(["list", "table", "inet", "netavark"])
        .output()
        .ok()?;
    Some(if output.status.success() {
        super::FIREWALL_NFTABLES.to_owned()
    } else {
        FIREWALL_IPTABLES.to_owned()
    })
}

/// The bridge of CNI network `network`: the `bridge` of the `bridge` plugin in the
/// configuration list (`*.conflist`, or a single `*.conf`) in `dir` whose `name` it is.
pub(super) fn cni_bridge(dir: &str, network: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Plugin {
        #[serde(rename = "type")]
        kind: Option<String>,
        bridge: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct ConfList {
        name: Option<String>,
        #[serde(default)]
        plugins: Vec<Plugin>,
        // A single `.conf` is one plugin with the network's name.
        #[serde(rename = "type")]
        kind: Option<String>,
        bridge: Option<String>,
    }
    let entries = std::fs::read_dir(dir).ok()?;
    entries.flatten().find_map(|entry| {
        let path = entry.path();
        let ext = path.extension()?.to_str()?;
        if ext != "conflist" && ext != "conf" {
            return None;
        }
        let list: ConfList = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
        if list.name.as_deref() != Some(network) {
            return None;
        }
        let single = Plugin {
            kind: list.kind,
            bridge: list.bridge,
        };
        list.plugins
            .into_iter()
            .chain([single])
            .find(|p| p.kind.as_deref() == Some("bridge"))
            .and_then(|p| p.bridge)
    })
}

/// Where netavark (Podman 4 as root) keeps its network definitions.
const PODMAN_NETWORKS_DIR: &str = "/etc/containers/networks";

/// The bridge of netavark network `network`, from its network file.
pub(super) fn network_interface_of(network: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct NetworkFile {
        network_interface: Option<String>,
    }
    let path = std::path::Path::new(PODMAN_NETWORKS_DIR).join(format!("{network}.json"));
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str::<NetworkFile>(&text)
        .ok()?
        .network_interface
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_bridges_come_from_the_configuration_lists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("87-podman-bridge.conflist"),
            r#"{"cniVersion": "0.4.0", "name": "podman", "plugins": [
                {"type": "bridge", "bridge": "cni-podman0", "isGateway": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]]}},
                {"type": "portmap", "capabilities": {"portMappings": true}},
                {"type": "firewall"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("backend.conflist"),
            r#"{"cniVersion": "0.4.0", "name": "backend", "plugins": [
                {"type": "bridge", "bridge": "cni-podman1"}, {"type": "portmap"}]}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a network").unwrap();
        let dir = dir.path().to_str().unwrap();
        assert_eq!(cni_bridge(dir, "podman").as_deref(), Some("cni-podman0"));
        assert_eq!(cni_bridge(dir, "backend").as_deref(), Some("cni-podman1"));
        assert_eq!(cni_bridge(dir, "missing"), None);
        assert_eq!(cni_bridge("/nonexistent-portgate-dir", "podman"), None);
    }
}
