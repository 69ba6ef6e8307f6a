//! A stand-in for a container engine: the few endpoints of Docker's Engine API the agent
//! reads (`/version`, `/events`, `/networks`, `/containers/json`, `/containers/ID/json`,
//! `/images/ID/json`), served on a unix socket from fixed JSON. It lets a sandbox test what
//! the agent makes of containers that a real engine would need a daemon, images and root
//! networking for (the host network, macvlan, labels baked into an image), in a second.
//!
//! The events stream stays open and silent: the agent takes its snapshot at connect time.
//! Shared by the end-to-end tests and the bench (its flood cells need published ports, which
//! the agent learns from an engine).

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};

/// What the fake engine answers.
#[derive(Clone, Debug, Default)]
pub struct EngineState {
    /// `GET /networks`: Docker's network objects (`Name`, `Id`, `Driver`, `Options`).
    pub networks: Vec<Value>,
    /// `GET /containers/ID/json`: inspect objects, each with its `Id`.
    pub containers: Vec<Value>,
    /// `GET /images/ID/json`, by image ID.
    pub images: BTreeMap<String, Value>,
}

/// A fake Docker API on a unix socket, stopped and removed on drop.
pub struct FakeEngine {
    pub socket: PathBuf,
    _dir: Option<tempfile::TempDir>,
    /// The paths requested so far (without the API version prefix and the query).
    requests: Arc<Mutex<Vec<String>>>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeEngine {
    /// Serves `state` on a socket in a temporary directory; panics if it cannot (for tests).
    pub fn start(state: EngineState) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pgt-engine-")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("docker.sock");
        let mut engine =
            Self::start_at(socket, state).unwrap_or_else(|e| panic!("start the fake engine: {e}"));
        engine._dir = Some(dir);
        engine
    }

    /// Serves `state` on `dir`/docker.sock (replaced if it exists).
    pub fn start_in(dir: &Path, state: EngineState) -> io::Result<Self> {
        let socket = dir.join("docker.sock");
        let _ = std::fs::remove_file(&socket);
        Self::start_at(socket, state)
    }

    fn start_at(socket: PathBuf, state: EngineState) -> io::Result<Self> {
        let listener = UnixListener::bind(&socket).map_err(|e| {
            io::Error::new(e.kind(), format!("listening on {}: {e}", socket.display()))
        })?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stopping = Arc::new(AtomicBool::new(false));
        let state = Arc::new(state);
        let thread = {
            let (requests, stopping) = (requests.clone(), stopping.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (state, requests, stopping) =
                        (state.clone(), requests.clone(), stopping.clone());
                    std::thread::spawn(move || serve(stream, &state, &requests, &stopping));
                }
            })
        };
        Ok(FakeEngine {
            socket,
            _dir: None,
            requests,
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

    /// The paths requested so far, e.g. `/containers/json`, `/images/sha256:.../json`.
    pub fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers the requests of one connection (HTTP/1.1, keep-alive) until the client closes it.
fn serve(
    stream: UnixStream,
    state: &EngineState,
    requests: &Mutex<Vec<String>>,
    stopping: &AtomicBool,
) {
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
        requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.clone());
        if path == "/events" {
            // Headers only; the stream stays open, with no events, until the fake stops.
            let _ = writer.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            );
            while !stopping.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            return;
        }
        let (status, body) = answer(&path, state);
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

fn answer(path: &str, state: &EngineState) -> (&'static str, Value) {
    let not_found = || {
        (
            "404 Not Found",
            json!({"message": format!("no such thing: {path}")}),
        )
    };
    match path {
        "/_ping" => ("200 OK", json!("OK")),
        "/version" => (
            "200 OK",
            json!({"ApiVersion": "1.45", "MinAPIVersion": "1.24", "Version": "fake", "Os": "linux"}),
        ),
        "/networks" => ("200 OK", Value::from(state.networks.clone())),
        "/containers/json" => (
            "200 OK",
            state
                .containers
                .iter()
                .map(|c| json!({"Id": c["Id"], "Names": [c["Name"]], "State": "running"}))
                .collect(),
        ),
        _ => {
            if let Some(id) = path
                .strip_prefix("/containers/")
                .and_then(|p| p.strip_suffix("/json"))
            {
                return state
                    .containers
                    .iter()
                    .find(|c| c["Id"] == id)
                    .map_or_else(not_found, |c| ("200 OK", c.clone()));
            }
            if let Some(id) = path
                .strip_prefix("/images/")
                .and_then(|p| p.strip_suffix("/json"))
            {
                return state
                    .images
                    .get(id)
                    .map_or_else(not_found, |i| ("200 OK", i.clone()));
            }
            not_found()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_lose_version_and_query() {
        assert_eq!(api_path("/v1.45/containers/json?all=0"), "/containers/json");
        assert_eq!(api_path("/version"), "/version");
        let state = EngineState {
            containers: vec![json!({"Id": "abc", "Name": "/web"})],
            ..EngineState::default()
        };
        assert_eq!(answer("/containers/abc/json", &state).0, "200 OK");
        assert_eq!(answer("/images/x/json", &state).0, "404 Not Found");
    }
}
