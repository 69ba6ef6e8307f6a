//! The load: servers in the server namespace, generators in the client namespace.
//! - short TCP connections: wrk with `Connection: close` against a small threaded HTTP/1.0
//!   server written here (one connection per request, the server closes first);
//! - single-stream TCP throughput: iperf3;
//! - small UDP datagrams over many flows: a flood written here (one socket per flow, bounded
//!   in time and count) and a counting sink that answers the first datagram of each flow, as
//!   a request/response protocol would, so every filter sees the flows as established;
//! - the control-plane probe: datagrams every 100 µs to a port that is not allowed yet,
//!   timing the first one that arrives after the allow command starts.
use std::{
    io::{Read as _, Write as _},
    mem::{size_of, zeroed},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, RawFd},
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    filters::{HTTP_PORT, IPERF_PORT, PROBE_PORT, UDP_PORT},
    topo::{
        BLOCKED_PORT, CLIENT_ADDR, CLIENT_CPU, HOST_ADDR, Netns, PUBLISHED_BLOCKED_PORT,
        PUBLISHED_HTTP_PORT, SERVER_ADDR, SERVER_CPU, Topology, pin_command, pin_thread, run_quiet,
    },
};
use portgate_cmd as proc;

const HTTP_WORKERS: usize = 4;
const HTTP_RESPONSE: &[u8] =
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
/// Distinct UDP flows (source ports) of the flood.
pub const UDP_FLOWS: usize = 2048;
/// Payload of each flood datagram: 18 bytes, the smallest Ethernet frame (64 bytes).
const UDP_PAYLOAD: usize = 18;
/// Upper bound on the datagrams one flood may send, whatever its duration.
const UDP_MAX_DATAGRAMS: u64 = 20_000_000;
const PROBE_INTERVAL: Duration = Duration::from_micros(100);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The servers of one cell: HTTP, iperf3 and the UDP sink, all in the server namespace.
pub struct Servers {
    http: HttpServer,
    iperf: Option<Child>,
    pub sink: UdpSink,
}

impl Servers {
    pub fn start(topo: &Topology) -> Result<Self> {
        let http = HttpServer::start(&topo.server)?;
        let sink = UdpSink::start(&topo.server, UDP_PORT, true)?;
        let mut cmd = topo.server.command("iperf3");
        cmd.args(["-s", "-B", SERVER_ADDR, "-p", &IPERF_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        pin_command(&mut cmd, SERVER_CPU);
        let iperf = cmd
            .spawn()
            .with_context(|| format!("starting `{}`", proc::display(&cmd)))?;
        let servers = Self {
            http,
            iperf: Some(iperf),
            sink,
        };
        wait_listening(&topo.server, IPERF_PORT)?;
        Ok(servers)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(mut child) = self.iperf.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.http.stop();
        self.sink.stop();
    }
}

/// Waits until something listens on TCP `port` in `ns` (read from the namespace's
/// /proc/thread-self/net/tcp, so no connection disturbs the server).
fn wait_listening(ns: &Netns, port: u16) -> Result<()> {
    let needle = format!(":{port:04X} 00000000:0000 0A");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))??;
        if table.contains(&needle) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} in {} after 10 s", ns.name);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct HttpServer {
    stopping: Arc<AtomicBool>,
    listener_fd: RawFd,
    threads: Vec<JoinHandle<()>>,
}

impl HttpServer {
    fn start(ns: &Netns) -> Result<Self> {
        let addr: SocketAddr = format!("{SERVER_ADDR}:{HTTP_PORT}").parse()?;
        let listener = ns
            .run(|| TcpListener::bind(addr))?
            .with_context(|| format!("listening on {addr}"))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let listener_fd = listener.as_raw_fd();
        let listener = Arc::new(listener);
        let threads = (0..HTTP_WORKERS)
            .map(|_| {
                let (listener, stopping) = (listener.clone(), stopping.clone());
                std::thread::spawn(move || {
                    pin_thread(SERVER_CPU);
                    while !stopping.load(Ordering::Relaxed) {
                        if let Ok((stream, _)) = listener.accept() {
                            serve_one(stream);
                        }
                    }
                })
            })
            .collect();
        Ok(Self {
            stopping,
            listener_fd,
            threads,
        })
    }

    fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accepts (they fail with EINVAL); the listener is closed when the
        // last thread drops its Arc.
        // SAFETY: the listener stays open until the threads, joined below, have returned.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve_one(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 2048];
    let mut len = 0;
    while len < buf.len() {
        match stream.read(&mut buf[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            let _ = stream.write_all(HTTP_RESPONSE);
            return;
        }
    }
}

/// One HTTP request from the client namespace: whether the server answered.
pub fn http_get_once(topo: &Topology, port: u16, timeout: Duration) -> Result<bool> {
    http_get(topo, format!("{SERVER_ADDR}:{port}").parse()?, timeout)
}

/// Whether the HTTP server answers on the published host port (DNAT), within 20 tries.
pub fn published_answers(topo: &Topology) -> Result<bool> {
    let addr: SocketAddr = format!("{HOST_ADDR}:{PUBLISHED_HTTP_PORT}").parse()?;
    for _ in 0..20 {
        if http_get(topo, addr, Duration::from_secs(2))? {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(false)
}

fn http_get(topo: &Topology, addr: SocketAddr, timeout: Duration) -> Result<bool> {
    topo.client.run(move || {
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(timeout));
        if stream
            .write_all(b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        answer.starts_with(b"HTTP/1.0 200")
    })
}

/// What wrk measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct WrkResult {
    pub requests_per_sec: f64,
    pub errors: u64,
}

pub fn wrk_args(threads: u32, connections: u32, secs: u32) -> Vec<String> {
    wrk_args_to(
        threads,
        connections,
        secs,
        &format!("{SERVER_ADDR}:{HTTP_PORT}"),
    )
}

/// wrk to the published host port, which the host DNATs to the HTTP server.
pub fn wrk_dnat_args(threads: u32, connections: u32, secs: u32) -> Vec<String> {
    wrk_args_to(
        threads,
        connections,
        secs,
        &format!("{HOST_ADDR}:{PUBLISHED_HTTP_PORT}"),
    )
}

fn wrk_args_to(threads: u32, connections: u32, secs: u32, target: &str) -> Vec<String> {
    vec![
        format!("-t{threads}"),
        format!("-c{connections}"),
        format!("-d{secs}s"),
        "--timeout".into(),
        "2s".into(),
        "-H".into(),
        "Connection: close".into(),
        format!("http://{target}/"),
    ]
}

/// New TCP connections per second: wrk with `Connection: close`, one request per connection.
pub fn wrk(topo: &Topology, args: &[String], secs: u32) -> Result<WrkResult> {
    let mut cmd = topo.client.command("wrk");
    cmd.args(args);
    pin_command(&mut cmd, CLIENT_CPU);
    let out = proc::capture(&mut cmd, Duration::from_secs(u64::from(secs) + 30))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", proc::display(&cmd), out.combined());
    }
    parse_wrk(&out.stdout).with_context(|| format!("parsing wrk's output:\n{}", out.stdout))
}

fn parse_wrk(text: &str) -> Result<WrkResult> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context("no Requests/sec line")?;
    let mut errors = 0;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            errors += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok(WrkResult {
        requests_per_sec: rps,
        errors,
    })
}

pub fn iperf_args(secs: u32) -> Vec<String> {
    vec![
        "-c".into(),
        SERVER_ADDR.into(),
        "-p".into(),
        IPERF_PORT.to_string(),
        "-t".into(),
        secs.to_string(),
        "-J".into(),
    ]
}

/// Single-stream TCP throughput in Gbit/s (iperf3's receiver side).
pub fn iperf(topo: &Topology, args: &[String], secs: u32) -> Result<f64> {
    let mut cmd = topo.client.command("iperf3");
    cmd.args(args);
    pin_command(&mut cmd, CLIENT_CPU);
    let out = proc::capture(&mut cmd, Duration::from_secs(u64::from(secs) + 30))?;
    let json: serde_json::Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("parsing iperf3's JSON: {}", out.combined()))?;
    if let Some(err) = json["error"].as_str() {
        bail!("iperf3: {err}");
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .context("iperf3's JSON has no end.sum_received.bits_per_second")
}

/// Counts datagrams arriving on a UDP port in the server namespace; with `answer_first`,
/// answers the first datagram of each source port with one byte.
pub struct UdpSink {
    pub received: Arc<AtomicU64>,
    /// Whether it answers first datagrams now (off during the many-new-flows load, whose
    /// sources have no route back).
    pub answering: Arc<AtomicBool>,
    /// When the first datagram arrived.
    pub first: Arc<Mutex<Option<Instant>>>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl UdpSink {
    pub fn start(ns: &Netns, port: u16, answer_first: bool) -> Result<Self> {
        let addr: SocketAddr = format!("{SERVER_ADDR}:{port}").parse()?;
        let socket = ns
            .run(|| UdpSocket::bind(addr))?
            .with_context(|| format!("binding {addr}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        set_int_opt(socket.as_raw_fd(), libc::SO_RCVBUFFORCE, 8 << 20);
        let received = Arc::new(AtomicU64::new(0));
        let answering = Arc::new(AtomicBool::new(answer_first));
        let first = Arc::new(Mutex::new(None));
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, first, stopping, answering) = (
                received.clone(),
                first.clone(),
                stopping.clone(),
                answering.clone(),
            );
            std::thread::Builder::new()
                .name(format!("udp-sink-{port}"))
                .spawn(move || {
                    pin_thread(SERVER_CPU);
                    sink_loop(&socket, &answering, &received, &first, &stopping)
                })?
        };
        Ok(Self {
            received,
            answering,
            first,
            stopping,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sink_loop(
    socket: &UdpSocket,
    answering: &AtomicBool,
    received: &AtomicU64,
    first: &Mutex<Option<Instant>>,
    stopping: &AtomicBool,
) -> Result<()> {
    const BATCH: usize = 64;
    let fd = socket.as_raw_fd();
    let mut bufs = [[0u8; 64]; BATCH];
    // SAFETY: an all-zero sockaddr_in is a valid initial value (integers only).
    let mut names: [libc::sockaddr_in; BATCH] = unsafe { zeroed() };
    // SAFETY: an all-zero iovec (null pointer, length 0) is a valid initial value.
    let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
    // SAFETY: an all-zero mmsghdr (null pointers, zero lengths) is a valid initial value.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    // One bit per source port: answered already.
    let mut answered = vec![0u64; 65536 / 64];
    while !stopping.load(Ordering::Relaxed) {
        for i in 0..BATCH {
            iovs[i] = libc::iovec {
                iov_base: bufs[i].as_mut_ptr().cast(),
                iov_len: bufs[i].len(),
            };
            msgs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_in).cast();
            msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every mmsghdr points at live buffers of the sizes given.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        let now = Instant::now();
        {
            let mut first = first.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(now);
            }
        }
        received.fetch_add(n as u64, Ordering::Relaxed);
        if answering.load(Ordering::Relaxed) {
            for name in &names[..n as usize] {
                let port = u16::from_be(name.sin_port) as usize;
                let (word, bit) = (port / 64, 1u64 << (port % 64));
                if answered[word] & bit == 0 {
                    answered[word] |= bit;
                    // SAFETY: `name` is the sockaddr_in the kernel filled in.
                    unsafe {
                        libc::sendto(
                            fd,
                            b"r".as_ptr().cast(),
                            1,
                            libc::MSG_DONTWAIT,
                            (name as *const libc::sockaddr_in).cast(),
                            size_of::<libc::sockaddr_in>() as u32,
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn set_int_opt(fd: RawFd, opt: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt with a pointer to a live c_int of the size passed; failure is harmless.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        );
    }
}

/// What one UDP flood measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloodResult {
    pub delivered_per_sec: f64,
    pub sent_per_sec: f64,
}

/// Small datagrams round-robin over [`UDP_FLOWS`] flows for `duration`; each flow is opened
/// (one datagram, answered by the sink) before the clock starts.
pub fn udp_flood(topo: &Topology, sink: &UdpSink, duration: Duration) -> Result<FloodResult> {
    let target: SocketAddr = format!("{SERVER_ADDR}:{UDP_PORT}").parse()?;
    let sockets = topo.client.run(move || -> Result<Vec<UdpSocket>> {
        (0..UDP_FLOWS)
            .map(|_| {
                let socket = UdpSocket::bind(format!("{CLIENT_ADDR}:0"))?;
                socket.connect(target)?;
                socket.set_nonblocking(true)?;
                Ok(socket)
            })
            .collect()
    })??;
    let payload = [0x55u8; UDP_PAYLOAD];
    // Open every flow, and give the answers time to come back.
    for socket in &sockets {
        let _ = socket.send(&payload);
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = sink.received.load(Ordering::Relaxed);
    let (sent, elapsed) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                pin_thread(CLIENT_CPU);
                let start = Instant::now();
                let mut sent: u64 = 0;
                loop {
                    for socket in &sockets {
                        if socket.send(&payload).is_ok() {
                            sent += 1;
                        }
                    }
                    if start.elapsed() >= duration || sent >= UDP_MAX_DATAGRAMS {
                        return (sent, start.elapsed().as_secs_f64());
                    }
                }
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    // Let the queues drain into the sink.
    std::thread::sleep(Duration::from_millis(100));
    let delivered = sink.received.load(Ordering::Relaxed) - before;
    Ok(FloodResult {
        delivered_per_sec: delivered as f64 / elapsed,
        sent_per_sec: sent as f64 / elapsed,
    })
}

/// Time from the start of `allow` (a command that opens PROBE_PORT/udp) to the first datagram
/// that reaches the server, while the client sends one every 100 µs; also how long the command
/// itself took.
pub fn allow_to_first_packet(
    topo: &Topology,
    allow: impl FnOnce() -> Result<()>,
) -> Result<(Duration, Duration)> {
    let sink = UdpSink::start(&topo.server, PROBE_PORT, false)?;
    let target: SocketAddr = format!("{SERVER_ADDR}:{PROBE_PORT}").parse()?;
    let socket = topo
        .client
        .run(|| UdpSocket::bind(format!("{CLIENT_ADDR}:0")))??;
    socket.connect(target)?;
    socket.set_nonblocking(true)?;
    let stopping = Arc::new(AtomicBool::new(false));
    let sender = {
        let stopping = stopping.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + PROBE_TIMEOUT + Duration::from_secs(1);
            while !stopping.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = socket.send(b"probe");
                std::thread::sleep(PROBE_INTERVAL);
            }
        })
    };
    let finish = |stopping: &AtomicBool, sender: JoinHandle<()>| {
        stopping.store(true, Ordering::SeqCst);
        let _ = sender.join();
    };
    // Not allowed yet: nothing may arrive.
    std::thread::sleep(Duration::from_millis(100));
    if sink.received.load(Ordering::Relaxed) > 0 {
        finish(&stopping, sender);
        bail!(
            "datagrams to port {PROBE_PORT} arrived before it was allowed: the filter is not in force"
        );
    }
    let start = Instant::now();
    let result = allow();
    let command_done = start.elapsed();
    if let Err(err) = result {
        finish(&stopping, sender);
        return Err(err);
    }
    let arrived = loop {
        if let Some(first) = *sink.first.lock().unwrap_or_else(|e| e.into_inner()) {
            break Some(first);
        }
        if start.elapsed() > PROBE_TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_micros(50));
    };
    finish(&stopping, sender);
    let first = arrived.with_context(|| {
        format!("no datagram reached port {PROBE_PORT} within {PROBE_TIMEOUT:?} of allowing it")
    })?;
    Ok((first.saturating_duration_since(start), command_done))
}

/// Whether a TCP connection to a port that no filter allows is dropped (times out) rather
/// than refused: proof that the filter is in force.
pub fn blocked_port_times_out(topo: &Topology) -> Result<bool> {
    times_out(topo, format!("{SERVER_ADDR}:{BLOCKED_PORT}").parse()?)
}

/// The same through the published port that no filter allows (DNAT to port 81).
pub fn published_blocked_times_out(topo: &Topology) -> Result<bool> {
    times_out(
        topo,
        format!("{HOST_ADDR}:{PUBLISHED_BLOCKED_PORT}").parse()?,
    )
}

fn times_out(topo: &Topology, addr: SocketAddr) -> Result<bool> {
    topo.client.run(
        move || match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Err(err) => err.kind() == std::io::ErrorKind::TimedOut,
            Ok(_) => false,
        },
    )
}

/// `tool --version`'s first line, for the report.
pub fn tool_version(tool: &str, arg: &str) -> String {
    let mut cmd = std::process::Command::new(tool);
    cmd.arg(arg);
    match run_quiet(&mut cmd) {
        Ok(out) => out
            .combined()
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        Err(_) => {
            // wrk prints its version with the usage text and exits 1.
            proc::capture(&mut cmd, Duration::from_secs(10))
                .map(|out| {
                    out.combined()
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_owned()
                })
                .unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_parses() {
        let text = "Running 3s test @ http://10.99.0.2:80/\n  1 threads and 32 connections\n\
            3000 requests in 3.00s, 300.00KB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n\
            Requests/sec:   1000.50\nTransfer/sec:    100.00KB\n";
        let r = parse_wrk(text).expect("parse");
        assert_eq!(r.requests_per_sec, 1000.5);
        assert_eq!(r.errors, 3);
    }
}
