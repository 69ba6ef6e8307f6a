//! The HTTP side of `/metrics`: hyper, bounded connections and timeouts; bodies come from
//! the agent loop through a channel.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::{debug, warn};

use super::{OPENMETRICS_CONTENT_TYPE, PATH, TEXT_CONTENT_TYPE, to_text_format};

/// How long a scrape waits for the agent loop before answering 503.
pub(super) const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// A client must send its request headers within this time (also bounds idle connections).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `GET /metrics` (and `HEAD`) on `listener` until the listener fails for good. Each
/// scrape sends a oneshot sender through `scrape`; the agent loop answers with [`encode`]'s
/// output, or an empty string when it could not read the datapath (answered 500). When the
/// loop does not answer within 5 s, or is gone, the scrape gets 503. Other paths get 404.
pub async fn serve(
    listener: TcpListener,
    scrape: mpsc::Sender<oneshot::Sender<String>>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            unreachable!("the semaphore is never closed");
        };
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(err) if is_transient(&err) => {
                warn!("metrics: accept failed ({err}); retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
            Err(err) => return Err(err),
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(request, scrape.clone()));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(err) = connection.await {
                debug!("metrics: connection ended: {err}");
            }
            drop(slot);
        });
    }
}

/// Accept errors that say nothing about the listener itself.
fn is_transient(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        err.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | OutOfMemory
    ) || matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}

async fn respond(
    request: Request<Incoming>,
    scrape: mpsc::Sender<oneshot::Sender<String>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() != PATH {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are on /metrics\n",
        ));
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let openmetrics = accepts_openmetrics(request.headers());
    let (tx, rx) = oneshot::channel();
    let answer = tokio::time::timeout(SCRAPE_TIMEOUT, async {
        scrape.send(tx).await.ok()?;
        rx.await.ok()
    })
    .await;
    let body = match answer {
        Ok(Some(body)) if !body.is_empty() => body,
        Ok(Some(_)) => {
            return Ok(plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the agent could not read the datapath; see its log\n",
            ));
        }
        Ok(None) => {
            return Ok(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is not serving metrics\n",
            ));
        }
        Err(_) => {
            return Ok(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent did not answer in time\n",
            ));
        }
    };
    let (content_type, body) = if openmetrics {
        (OPENMETRICS_CONTENT_TYPE, body)
    } else {
        (TEXT_CONTENT_TYPE, to_text_format(&body))
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    Ok(response)
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether the request's `Accept` names `application/openmetrics-text` with a non-zero q.
/// Prometheus sends `application/openmetrics-text;version=1.0.0,...,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`.
pub(super) fn accepts_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            media.eq_ignore_ascii_case("application/openmetrics-text")
                && parts
                    .filter_map(|p| p.split_once('='))
                    .filter(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                    .all(|(_, q)| q.trim().parse::<f32>().map_or(true, |q| q > 0.0))
        })
}
