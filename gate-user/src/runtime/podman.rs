//! What only Podman's own API and files say: its network backend (netavark or CNI), where
//! netavark keeps its firewall, and the bridges of CNI networks.

use std::{path::Path, process::Command};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
};

use super::FIREWALL_IPTABLES;

/// Where Podman's CNI backend reads its network configuration lists.
pub(super) const CNI_CONFIG_DIR: &str = "/etc/cni/net.d";
/// The largest answer read from `/libpod/info` (it is a few KiB).
const INFO_LIMIT: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub(super) enum PodmanInfoError {
    #[error("asking {socket} for /libpod/info")]
    Io {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("/libpod/info answered {status:?}")]
    Status { status: String },
    #[error("parsing /libpod/info")]
    Json(#[source] serde_json::Error),
}

/// `host.networkBackend` of Podman's `/libpod/info` ("netavark" or "cni"). bollard speaks only
/// the Docker-compatible API, which does not say; one HTTP/1.0 request (the server closes the
/// connection after its answer, so reading to the end reads exactly it).
pub(super) async fn network_backend(socket: &Path) -> Result<Option<String>, PodmanInfoError> {
    let io = |source| PodmanInfoError::Io {
        socket: socket.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(socket).await.map_err(io)?;
    stream
        .write_all(b"GET /v4.0.0/libpod/info HTTP/1.0\r\nHost: podman\r\n\r\n")
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
        return Err(PodmanInfoError::Status {
            status: status.to_owned(),
        });
    }
    let info: serde_json::Value = serde_json::from_str(body).map_err(PodmanInfoError::Json)?;
    Ok(info["host"]["networkBackend"].as_str().map(str::to_owned))
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
