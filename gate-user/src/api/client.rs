//! The CLI's side of the control socket.

use std::{
    io::{self, BufRead as _, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{MAX_REQUEST_BYTES, Reply, Request, Response, WatchEvent};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {path} (is `portgate agent` running? is --socket right?)")]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to the agent at {path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the agent sent an unreadable answer: {0}")]
    Decode(serde_json::Error),
    /// The agent refused the request; its message says why.
    #[error("{0}")]
    Refused(String),
}

fn send(socket: &Path, request: &Request) -> Result<UnixStream, ClientError> {
    let io_err = |source| ClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    let mut body = serde_json::to_vec(request).map_err(ClientError::Decode)?;
    body.push(b'\n');
    stream.write_all(&body).map_err(io_err)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(io_err)?;
    Ok(stream)
}

/// Follows the agent's drop events, calling `on_event` for each, until the agent goes away.
pub fn watch(
    socket: &Path,
    mut on_event: impl FnMut(WatchEvent) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let stream = send(socket, &Request::Watch)?;
    for line in io::BufReader::new(stream).lines() {
        let line = line.map_err(|source| ClientError::Io {
            path: socket.to_owned(),
            source,
        })?;
        // A refusal comes as a response object rather than an event.
        if let Ok(Response::Error(message)) = serde_json::from_str::<Response>(&line) {
            return Err(ClientError::Refused(message).into());
        }
        on_event(serde_json::from_str(&line).map_err(ClientError::Decode)?)?;
    }
    anyhow::bail!("the agent closed the event stream (stopped?)")
}

/// Sends one request and waits for the answer.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let io_err = |source| ClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let stream = send(socket, request)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_REQUEST_BYTES * 16)
        .read_to_end(&mut answer)
        .map_err(io_err)?;
    match serde_json::from_slice(&answer).map_err(ClientError::Decode)? {
        Response::Ok(reply) => Ok(reply),
        Response::Error(message) => Err(ClientError::Refused(message)),
    }
}
