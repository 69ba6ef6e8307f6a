//! A fixed stand-in for Docker's Engine API, for the flood cells of portgate: the early drop
//! (`--uplink`) decides on published host ports, which the agent learns from a container
//! engine, not from the rules file. One container, `web` (10.99.0.2 on the bridge pgbr0),
//! publishes the two ports the host namespace DNATs (8080 -> 80, 8081 -> 81), as Docker
//! would. It serves the few endpoints the agent reads on a unix socket; the events stream
//! stays open and silent. (The engine itself is the tests' one, `portgate-fake-docker`.)
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use portgate_fake_docker::{EngineState, FakeEngine};
use serde_json::{Value, json};

use super::topo::{BLOCKED_PORT, BRIDGE, PUBLISHED_BLOCKED_PORT, PUBLISHED_HTTP_PORT, SERVER_ADDR};

const CONTAINER_ID: &str = "0000000000000000000000000000000000000000000000000000000000000web";

/// The fake engine serving `web`, on `dir`/docker.sock; stopped on drop.
pub fn start(dir: &Path) -> Result<FakeEngine> {
    let state = EngineState {
        networks: vec![
            json!({"Name": "bridge", "Id": "n-bridge", "Driver": "bridge",
                              "Options": {"com.docker.network.bridge.name": BRIDGE}}),
        ],
        containers: vec![container()],
        ..EngineState::default()
    };
    FakeEngine::start_in(dir, state).context("starting the bench's fake Docker engine")
}

/// Waits until `portgate status --json` says the docker engine is connected and synced.
pub fn wait_synced(status: impl Fn() -> Result<Value>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status()?;
        let synced = st["engines"].as_array().is_some_and(|engines| {
            engines.iter().any(|e| {
                e["engine"] == "docker"
                    && e["connected"] == true
                    && e["syncs"].as_u64().unwrap_or(0) >= 1
            })
        });
        if synced {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not sync with the bench's fake engine within 30 s: {}",
                st["engines"]
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn container() -> Value {
    json!({
        "Id": CONTAINER_ID,
        "Name": "/web",
        "Image": "sha256:none",
        "Config": {"Labels": {}},
        "HostConfig": {"NetworkMode": "bridge"},
        "NetworkSettings": {
            "Ports": {
                "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": PUBLISHED_HTTP_PORT.to_string()}],
                format!("{BLOCKED_PORT}/tcp"): [{"HostIp": "0.0.0.0", "HostPort": PUBLISHED_BLOCKED_PORT.to_string()}],
            },
            "Networks": {"bridge": {"NetworkID": "n-bridge", "IPAddress": SERVER_ADDR}},
        },
    })
}
