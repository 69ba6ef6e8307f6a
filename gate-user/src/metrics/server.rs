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

/// What the agent loop answers a scrape with: the writing of the exposition, which runs on a
/// blocking thread once the loop has read the datapath (with many rules the text is tens of
/// megabytes; the loop must not wait for it, nor must the timeout that catches a stuck loop
/// count it). An empty exposition means the datapath could not be read (answered 500).
pub type Body = Box<dyn FnOnce() -> String + Send>;

/// A body that is written already.
pub fn written(text: String) -> Body {
    Box::new(move || text)
}
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
    scrape: mpsc::Sender<oneshot::Sender<Body>>,
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
    scrape: mpsc::Sender<oneshot::Sender<Body>>,
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
    let gzip = accepts_gzip(request.headers());
    let (tx, rx) = oneshot::channel();
    let answer = tokio::time::timeout(SCRAPE_TIMEOUT, async {
        scrape.send(tx).await.ok()?;
        rx.await.ok()
    })
    .await;
    let body = match answer {
        Ok(Some(body)) => body,
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
    // Written, rewritten for the classic format and compressed on a blocking thread: with
    // many rules that is megabytes, which must not hold up the runtime's one thread.
    // One large answer at a time (see `crate::memory::one_at_a_time`).
    let written = tokio::task::spawn_blocking(move || {
        crate::memory::one_at_a_time(|| write_body(body, openmetrics, gzip))
    })
    .await;
    let Ok(Some(bytes)) = written else {
        return Ok(plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the agent could not read the datapath; see its log\n",
        ));
    };
    let content_type = if openmetrics {
        OPENMETRICS_CONTENT_TYPE
    } else {
        TEXT_CONTENT_TYPE
    };
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    if gzip {
        headers.insert(
            header::CONTENT_ENCODING,
            header::HeaderValue::from_static("gzip"),
        );
    }
    Ok(response)
}

/// The exposition `body` writes, in the format asked for, compressed if asked; none when the
/// agent could not read the datapath.
fn write_body(body: Body, openmetrics: bool, gzip: bool) -> Option<Vec<u8>> {
    let body = body();
    if body.is_empty() {
        return None;
    }
    let text = if openmetrics {
        body
    } else {
        to_text_format(&body)
    };
    crate::memory::answered(text.len());
    Some(if gzip {
        compress(text.as_bytes())
    } else {
        text.into_bytes()
    })
}

/// gzip at its fastest level: a scrape of 100 000 rules' series shrinks from about 30 MB to
/// under 2 MB for a fraction of the time writing it took.
fn compress(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 8),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(bytes);
    encoder.finish().unwrap_or_default()
}

/// Whether the request's `Accept-Encoding` names gzip with a non-zero q (Prometheus sends
/// `Accept-Encoding: gzip`).
pub(super) fn accepts_gzip(headers: &HeaderMap) -> bool {
    accepts(headers, header::ACCEPT_ENCODING, |coding| {
        coding.eq_ignore_ascii_case("gzip") || coding == "*"
    })
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
    accepts(headers, header::ACCEPT, |media| {
        media.eq_ignore_ascii_case("application/openmetrics-text")
    })
}

/// Whether a comma-separated list header (`Accept`, `Accept-Encoding`) has an item that
/// `wanted` takes by its name, with no `q` parameter or a non-zero one.
fn accepts(headers: &HeaderMap, name: header::HeaderName, wanted: impl Fn(&str) -> bool) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            wanted(parts.next().unwrap_or_default())
                && parts
                    .filter_map(|p| p.split_once('='))
                    .filter(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                    .all(|(_, q)| q.trim().parse::<f32>().map_or(true, |q| q > 0.0))
        })
}
