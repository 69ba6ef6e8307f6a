//! A fixed stand-in for Docker's Engine API, for the flood cells of portgate: the early drop
//! (`--uplink`) decides on published host ports, which the agent learns from a container
//! engine, not from the rules file. One container, `web` (10.99.0.2 on the bridge pgbr0),
//! publishes the two ports the host namespace DNATs (8080 -> 80, 8081 -> 81), as Docker
//! would. It serves the few endpoints the agent reads on a unix socket; the events stream
//! stays open and silent. (The end-to-end tests have a configurable one; the bench cannot
//! depend on the test crates.)
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::topo::{BLOCKED_PORT, BRIDGE, PUBLISHED_BLOCKED_PORT, PUBLISHED_HTTP_PORT, SERVER_ADDR};

const CONTAINER_ID: &str = "0000000000000000000000000000000000000000000000000000000000000web";

/// The fake engine, stopped on drop (the socket is removed with the cell's directory).
pub struct FakeDocker {
    pub socket: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDocker {
    pub fn start(dir: &Path) -> Result<Self> {
        let socket = dir.join("docker.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("listening on {}", socket.display()))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let stopping = stopping.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let stopping = stopping.clone();
                    std::thread::spawn(move || serve(stream, &stopping));
                }
            })
        };
        Ok(Self {
            socket,
            stopping,
            thread: Some(thread),
        })
    }

    /// The agent's arguments that make it follow this engine.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--runtime".into(),
            "docker".into(),
            "--docker-socket".into(),
            self.socket.to_string_lossy().into_owned(),
        ]
    }
}

impl Drop for FakeDocker {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept loop.
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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

/// Answers one connection's requests (HTTP/1.1, keep-alive) until the client closes it.
fn serve(stream: UnixStream, stopping: &AtomicBool) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // The headers; GET requests have no body.
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
        }
        let target = request_line.split_whitespace().nth(1).unwrap_or("/");
        let path = api_path(target);
        if path == "/events" {
            let _ = writer.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            );
            while !stopping.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            return;
        }
        let (status, body) = answer(&path);
        let body = body.to_string();
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// `/v1.45/containers/json?all=false` -> `/containers/json`.
fn api_path(target: &str) -> String {
    let path = target.split('?').next().unwrap_or(target);
    let unversioned = path.strip_prefix("/v").and_then(|rest| {
        let (version, rest) = rest.split_once('/')?;
        version
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.')
            .then(|| format!("/{rest}"))
    });
    unversioned.unwrap_or_else(|| path.to_owned())
}

fn answer(path: &str) -> (&'static str, Value) {
    match path {
        "/_ping" => ("200 OK", json!("OK")),
        "/version" => (
            "200 OK",
            json!({"ApiVersion": "1.45", "MinAPIVersion": "1.24", "Version": "fake", "Os": "linux"}),
        ),
        "/networks" => (
            "200 OK",
            json!([{"Name": "bridge", "Id": "n-bridge", "Driver": "bridge",
                    "Options": {"com.docker.network.bridge.name": BRIDGE}}]),
        ),
        "/containers/json" => (
            "200 OK",
            json!([{"Id": CONTAINER_ID, "Names": ["/web"], "State": "running"}]),
        ),
        p if p == format!("/containers/{CONTAINER_ID}/json") => ("200 OK", container()),
        _ => (
            "404 Not Found",
            json!({"message": format!("no such thing: {path}")}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_lose_version_and_query() {
        assert_eq!(api_path("/v1.45/containers/json?all=0"), "/containers/json");
        assert_eq!(api_path("/version"), "/version");
        assert_eq!(
            answer(&format!("/containers/{CONTAINER_ID}/json")).0,
            "200 OK"
        );
        assert_eq!(answer("/images/x/json").0, "404 Not Found");
    }
}
