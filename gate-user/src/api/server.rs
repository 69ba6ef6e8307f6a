//! The agent's side of the control socket: root only (peer credentials), mode 0600.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use super::{MAX_REQUEST_BYTES, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another agent is already serving {0}")]
    InUse(PathBuf),
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

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

    /// Waits for the next root client and reads its request. Clients that are not root, or
    /// send garbage, get an error response here and are not passed on.
    pub async fn next(&self) -> io::Result<Option<(Request, UnixStream)>> {
        let (mut stream, _) = self.listener.accept().await?;
        let uid = stream.peer_cred().map(|cred| cred.uid());
        if !matches!(uid, Ok(0)) {
            warn!(?uid, "refused a control connection from a non-root peer");
            reply(
                &mut stream,
                &Response::Error("permission denied: portgate needs root".into()),
            )
            .await;
            return Ok(None);
        }
        let mut body = Vec::new();
        let read = (&mut stream)
            .take(MAX_REQUEST_BYTES)
            .read_to_end(&mut body)
            .await;
        match read.map_err(|e| e.to_string()).and_then(|_| {
            serde_json::from_slice::<Request>(&body).map_err(|e| format!("bad request: {e}"))
        }) {
            Ok(request) => Ok(Some((request, stream))),
            Err(message) => {
                debug!(%message, "bad control request");
                reply(&mut stream, &Response::Error(message)).await;
                Ok(None)
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Sends the response; a client that went away is not the agent's problem.
pub async fn reply(stream: &mut UnixStream, response: &Response) {
    let body = match serde_json::to_vec(response) {
        Ok(body) => body,
        Err(err) => format!(r#"{{"error":"cannot encode response: {err}"}}"#).into_bytes(),
    };
    if let Err(err) = stream.write_all(&body).await {
        debug!("control client went away: {err}");
    }
    let _ = stream.shutdown().await;
}
