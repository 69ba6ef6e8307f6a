//! Namespaces and HTTP.

use super::*;

/// `GET PATH HTTP/1.0` from namespace `ns` to `addr`; the body when the status is 200.
/// `timeout` bounds the connection request; reading may take [`SHOULD_ANSWER`].
pub fn http_get(ns: &str, addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<String> {
    let stream = in_netns(ns, || TcpStream::connect_timeout(&addr, timeout))?;
    http_exchange(stream, addr, path)
}

/// `GET PATH HTTP/1.0` from the host itself (the root namespace) to `addr`.
pub fn http_get_from_host(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<String> {
    http_exchange(TcpStream::connect_timeout(&addr, timeout)?, addr, path)
}

pub(super) fn http_exchange(
    mut stream: TcpStream,
    addr: SocketAddr,
    path: &str,
) -> io::Result<String> {
    stream.set_read_timeout(Some(SHOULD_ANSWER))?;
    stream.set_write_timeout(Some(SHOULD_ANSWER))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: portgate-test\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no HTTP response from {addr}: {text:?}")))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(io::Error::other(format!("{addr}{path}: {status}")));
    }
    Ok(body.to_owned())
}

/// A download in a thread of the client namespace: `GET PATH`, reading at most
/// `bytes_per_sec` through a small receive buffer.
pub struct Download {
    pub received: Arc<AtomicU64>,
    thread: Option<JoinHandle<io::Result<(u64, u64)>>>,
}

impl Download {
    pub fn start(ns: &str, addr: SocketAddr, path: &str, bytes_per_sec: u64) -> Self {
        let mut stream = in_netns(ns, || TcpStream::connect_timeout(&addr, SHOULD_ANSWER))
            .unwrap_or_else(|e| panic!("download: connect {addr}: {e}"));
        let rcvbuf: libc::c_int = 64 * 1024;
        // SAFETY: setsockopt on an open socket with a pointer to a c_int of the given size.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&rcvbuf as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let received = Arc::new(AtomicU64::new(0));
        let request = format!("GET {path} HTTP/1.0\r\nHost: portgate-test\r\n\r\n");
        let counter = received.clone();
        let thread = std::thread::spawn(move || -> io::Result<(u64, u64)> {
            // A stall this long is a broken connection, not a slow one.
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(request.as_bytes())?;
            let mut reader = BufReader::with_capacity(16 * 1024, stream);
            let mut content_length = None;
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "eof in headers",
                    ));
                }
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    content_length = v.trim().parse::<u64>().ok();
                }
            }
            let content_length = content_length
                .ok_or_else(|| io::Error::other("no Content-Length in the response"))?;
            let start = Instant::now();
            let mut buf = vec![0u8; 16 * 1024];
            let mut total = 0u64;
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                counter.store(total, Ordering::SeqCst);
                let due = Duration::from_secs_f64(total as f64 / bytes_per_sec as f64);
                if let Some(ahead) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
            Ok((content_length, total))
        });
        Download {
            received,
            thread: Some(thread),
        }
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// Waits for the end: (Content-Length, bytes of body received), or the error that ended it.
    pub fn finish(mut self) -> io::Result<(u64, u64)> {
        match self.thread.take().expect("finished twice").join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// A TCP server in a namespace: reads one line per connection, answers `pong <line>`, closes.
pub struct PongServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
    listener_fd: i32,
    thread: Option<JoinHandle<()>>,
}

impl PongServer {
    pub fn start(ns: &str, addr: SocketAddr) -> Self {
        let listener = in_netns(ns, || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("listen on {addr} in {ns}: {e}"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let listener_fd = listener.as_raw_fd();
        let thread = {
            let (accepted, stopping) = (accepted.clone(), stopping.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                        let Ok(mut writer) = stream.try_clone() else {
                            return;
                        };
                        let mut line = String::new();
                        let _ = BufReader::new(stream).read_line(&mut line);
                        let _ = writer.write_all(format!("pong {}\n", line.trim_end()).as_bytes());
                        let _ = writer.shutdown(std::net::Shutdown::Both);
                    });
                }
            })
        };
        PongServer {
            addr,
            accepted,
            stopping,
            listener_fd,
            thread: Some(thread),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for PongServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: the listener is alive until the thread, joined below, returns.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// docker0's IPv4 address (Docker's default network's gateway: where a container reaches the
/// host's published ports). Panics when it has none, so that no test ever sends to a
/// made-up address.
pub fn docker0_address() -> std::net::Ipv4Addr {
    let output = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", "docker0"])
        .output()
        .expect("run ip addr show docker0");
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("docker0 has no IPv4 address: {text:?}"))
}

/// Whether a hairpin connection (through docker-proxy) from a new container on docker0 to
/// [`docker0_address`] at `port` gets `body`.
pub fn hairpin_answers(engines: &'static Engines, port: u16, body: &str) -> bool {
    let gateway = docker0_address();
    let script =
        format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 3 {gateway} {port}");
    let output = engines.run_to_completion(
        Engine::Docker,
        &unique("hairpin"),
        &[IMAGE, "/bin/sh", "-c", &script],
        Duration::from_secs(60),
    );
    String::from_utf8_lossy(&output.stdout).contains(body)
}
