//! The agent's side of the control socket: root only (peer credentials), mode 0600.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::mpsc,
};
use tracing::{debug, warn};

use super::{MAX_REQUEST_BYTES, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another agent is already serving {0}")]
    InUse(PathBuf),
    #[error("control socket {path}")]
    Io { path: PathBuf, source: io::Error },
}

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound control socket; the file is removed on drop.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        let io_err = |source| ServerError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err)?;
        }
        if path.exists() {
            // A live agent answers; a stale file from a crash does not.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_owned()));
            }
            fs::remove_file(path).map_err(io_err)?;
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts clients until the agent stops, reading each one's request on a task of its
    /// own, and hands (request, connection) to the agent loop through `requests`. A slow
    /// client holds up no one, and the agent loop only ever waits on a channel, which a
    /// `select!` may cancel without losing a client.
    pub async fn run(self, requests: mpsc::Sender<(Request, UnixStream)>) {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    warn!("control socket accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let requests = requests.clone();
            tokio::spawn(async move {
                if let Some(request) = read_request(stream).await {
                    let _ = requests.send(request).await;
                }
            });
        }
    }
}

/// Reads one request from a root client. Clients that are not root, are too slow, or send
/// garbage get an error response here and are not passed on.
async fn read_request(mut stream: UnixStream) -> Option<(Request, UnixStream)> {
    let uid = stream.peer_cred().map(|cred| cred.uid());
    if !matches!(uid, Ok(0)) {
        warn!(?uid, "refused a control connection from a non-root peer");
        reply(
            &mut stream,
            Response::Error("permission denied: portgate needs root".into()),
        )
        .await;
        return None;
    }
    let mut body = Vec::new();
    let mut limited = (&mut stream).take(MAX_REQUEST_BYTES);
    let parsed = match tokio::time::timeout(REQUEST_TIMEOUT, limited.read_to_end(&mut body)).await {
        Err(_) => Err("no complete request within 10 s".to_owned()),
        Ok(Err(err)) => Err(err.to_string()),
        Ok(Ok(_)) => {
            serde_json::from_slice::<Request>(&body).map_err(|e| format!("bad request: {e}"))
        }
    };
    match parsed {
        Ok(request) => Some((request, stream)),
        Err(message) => {
            debug!(%message, "bad control request");
            reply(&mut stream, Response::Error(message)).await;
            None
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Sends the response; a client that went away is not the agent's problem. The encoding
/// runs on a blocking thread: a `list` of many rules is tens of megabytes of JSON, which
/// must not hold up the agent's loop (the runtime has one thread).
pub async fn reply(stream: &mut UnixStream, response: Response) {
    let encoded = tokio::task::spawn_blocking(move || serde_json::to_vec(&response)).await;
    write_reply(stream, encoded).await;
}

/// Like [`reply`], with the response made on the blocking thread too (`list`'s views), one
/// such large answer at a time (see [`crate::memory::one_at_a_time`]).
pub async fn reply_with(
    stream: &mut UnixStream,
    response: impl FnOnce() -> Response + Send + 'static,
) {
    let encoded = tokio::task::spawn_blocking(move || {
        crate::memory::one_at_a_time(|| serde_json::to_vec(&response()))
    })
    .await;
    write_reply(stream, encoded).await;
}

async fn write_reply(
    stream: &mut UnixStream,
    encoded: Result<serde_json::Result<Vec<u8>>, tokio::task::JoinError>,
) {
    let body = match encoded
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        Ok(body) => body,
        Err(err) => format!(r#"{{"error":"cannot encode response: {err}"}}"#).into_bytes(),
    };
    if let Err(err) = stream.write_all(&body).await {
        debug!("control client went away: {err}");
    }
    let size = body.len();
    drop(body);
    crate::memory::answered(size);
    let _ = stream.shutdown().await;
}
