//! Servers and clients on plain `std::net` sockets, opened inside a sandbox's namespaces.
//!
//! The echo protocol is one line: the client sends a line, the server sends it back. "Answers"
//! means a user would see a response; "times out" means the gate dropped the connection
//! request (not refused: a refusal would mean the packet reached the container).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::Sandbox;

/// How long a connection request that should be dropped is given before calling it a timeout.
pub const SHOULD_TIME_OUT: Duration = Duration::from_millis(1500);
/// How long something that should answer may take (generous: only a failure waits this long).
pub const SHOULD_ANSWER: Duration = Duration::from_secs(5);
/// How long to wait for a UDP reply that should not come.
pub const NO_REPLY: Duration = Duration::from_millis(1000);

/// Parses "10.99.0.2:80" or "[fd99::2]:80".
pub fn sa(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad socket address {s:?}: {e}"))
}

/// A TCP line-echo server listening in a namespace, one thread per connection.
pub struct TcpEchoServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    listener_fd: i32,
    stopping: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEchoServer {
    /// Listens on `addr` inside namespace `ns`.
    pub fn start(sandbox: &Sandbox, ns: &str, addr: SocketAddr) -> Self {
        let listener = sandbox
            .in_netns(ns, || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("listen on {addr} in {ns}: {e}"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let listener_fd = listener.as_raw_fd();
        let thread = {
            let (accepted, stopping, connections) =
                (accepted.clone(), stopping.clone(), connections.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    if let Ok(clone) = stream.try_clone() {
                        connections
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(clone);
                    }
                    std::thread::spawn(move || echo_lines(stream));
                }
            })
        };
        TcpEchoServer {
            addr,
            accepted,
            listener_fd,
            stopping,
            connections,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn echo_lines(stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if writer.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept (it returns EINVAL); the fd stays owned by the thread.
        // SAFETY: the listener is alive until the thread, joined below, returns.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        for stream in self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A UDP echo server in a namespace: every datagram goes back to its sender.
pub struct UdpEchoServer {
    pub addr: SocketAddr,
    received: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    pub fn start(sandbox: &Sandbox, ns: &str, addr: SocketAddr) -> Self {
        let socket = sandbox
            .in_netns(ns, || UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind udp {addr} in {ns}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set_read_timeout");
        let received = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stopping) = (received.clone(), stopping.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stopping.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        received.fetch_add(1, Ordering::SeqCst);
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
        };
        UdpEchoServer {
            addr,
            received,
            stopping,
            thread: Some(thread),
        }
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Opens a TCP connection from namespace `ns`.
pub fn tcp_connect(
    sandbox: &Sandbox,
    ns: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let stream = sandbox.in_netns(ns, || TcpStream::connect_timeout(&addr, timeout))?;
    stream.set_read_timeout(Some(SHOULD_ANSWER))?;
    stream.set_write_timeout(Some(SHOULD_ANSWER))?;
    Ok(stream)
}

/// Opens a TCP connection from namespace `ns`, from local address `from`.
pub fn tcp_connect_from(
    sandbox: &Sandbox,
    ns: &str,
    from: std::net::IpAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    tcp_connect_bound(sandbox, ns, SocketAddr::new(from, 0), addr, timeout)
}

/// Opens a TCP connection from namespace `ns`, from local address and port `local`.
pub fn tcp_connect_bound(
    sandbox: &Sandbox,
    ns: &str,
    local: SocketAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let stream = sandbox.in_netns(ns, || -> io::Result<TcpStream> {
        let domain = socket2::Domain::for_address(addr);
        let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&local.into())?;
        socket.connect_timeout(&addr.into(), timeout)?;
        Ok(socket.into())
    })?;
    stream.set_read_timeout(Some(SHOULD_ANSWER))?;
    stream.set_write_timeout(Some(SHOULD_ANSWER))?;
    Ok(stream)
}

/// Whether a connection from `ns`, from `from`, to `addr` is answered and echoes a request
/// (true), or times out (false); anything else fails the test.
pub fn tcp_answers_from(sandbox: &Sandbox, ns: &str, from: &str, addr: SocketAddr) -> bool {
    let source: std::net::IpAddr = from.parse().expect("source address");
    match tcp_connect_from(sandbox, ns, source, addr, SHOULD_TIME_OUT) {
        Ok(mut stream) => {
            let message = format!("hello {addr} from {from}");
            let reply = exchange(&mut stream, &message)
                .unwrap_or_else(|e| panic!("TCP request to {addr} from {from}: {e}"));
            assert_eq!(reply, message, "echo from {addr}");
            true
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut => false,
        Err(e) => {
            panic!("TCP connection to {addr} from {from}: answered or timed out expected, got {e}")
        }
    }
}

/// Sends one line on an open connection and reads the echo.
pub fn exchange(stream: &mut TcpStream, message: &str) -> io::Result<String> {
    assert!(!message.contains('\n'));
    stream.write_all(format!("{message}\n").as_bytes())?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line.trim_end_matches('\n').to_owned())
}

/// Asserts that a connection from `ns` to `addr` is answered and a request gets its response.
pub fn assert_tcp_answers(sandbox: &Sandbox, ns: &str, addr: SocketAddr) {
    let mut stream = tcp_connect(sandbox, ns, addr, SHOULD_ANSWER)
        .unwrap_or_else(|e| panic!("TCP connection to {addr} should be answered, got: {e}"));
    let message = format!("hello {addr}");
    let reply = exchange(&mut stream, &message)
        .unwrap_or_else(|e| panic!("TCP request to {addr} should get a response, got: {e}"));
    assert_eq!(reply, message, "echo from {addr}");
}

/// Asserts that a connection request from `ns` to `addr` gets no answer at all (dropped),
/// within [`SHOULD_TIME_OUT`].
pub fn assert_tcp_times_out(sandbox: &Sandbox, ns: &str, addr: SocketAddr) {
    match tcp_connect(sandbox, ns, addr, SHOULD_TIME_OUT) {
        Ok(_) => {
            panic!("TCP connection to {addr} was answered; it should have timed out (dropped)")
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        Err(e) => panic!(
            "TCP connection to {addr} should time out (dropped by the gate), got instead: {e} \
             ({:?})",
            e.kind()
        ),
    }
}

/// Sends one datagram from `ns` to `addr` and waits up to `timeout` for a reply.
pub fn udp_request(
    sandbox: &Sandbox,
    ns: &str,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Option<Vec<u8>> {
    let any = if addr.is_ipv4() {
        sa("0.0.0.0:0")
    } else {
        sa("[::]:0")
    };
    udp_request_from(sandbox, ns, any, addr, payload, timeout)
}

/// Asserts that a UDP request from `ns` to `addr` gets its echo.
pub fn assert_udp_answers(sandbox: &Sandbox, ns: &str, addr: SocketAddr) {
    let payload = format!("udp hello {addr}");
    let reply = udp_request(sandbox, ns, addr, payload.as_bytes(), SHOULD_ANSWER)
        .unwrap_or_else(|| panic!("UDP request to {addr} should get a reply, got none"));
    assert_eq!(reply, payload.as_bytes(), "UDP echo from {addr}");
}

/// Asserts that a UDP request from `ns` to `addr` gets no reply within [`NO_REPLY`].
pub fn assert_udp_no_reply(sandbox: &Sandbox, ns: &str, addr: SocketAddr) {
    if let Some(reply) = udp_request(sandbox, ns, addr, b"should be dropped", NO_REPLY) {
        panic!(
            "UDP request to {addr} got a reply ({:?}); it should have been dropped",
            String::from_utf8_lossy(&reply)
        );
    }
}

/// Sends one UDP datagram over IPv4 from `ns` with a forged source, `from`, through a raw
/// socket (as a container with CAP_NET_RAW, Docker's default, can).
pub fn send_forged_udp(
    sandbox: &Sandbox,
    ns: &str,
    from: SocketAddrV4,
    to: SocketAddrV4,
    payload: &[u8],
) {
    let mut packet = Vec::with_capacity(28 + payload.len());
    let total = (28 + payload.len()) as u16;
    // IPv4 header: version/IHL, TOS, length, id, flags/fragment, TTL, protocol UDP; the
    // kernel fills in the checksum of a raw socket's header.
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    packet.extend_from_slice(&from.ip().octets());
    packet.extend_from_slice(&to.ip().octets());
    // UDP header without checksum (allowed over IPv4).
    packet.extend_from_slice(&from.port().to_be_bytes());
    packet.extend_from_slice(&to.port().to_be_bytes());
    packet.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
    sandbox.in_netns(ns, || {
        // SAFETY: plain socket calls on a socket this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            assert!(fd >= 0, "raw socket: {}", io::Error::last_os_error());
            let mut dst: libc::sockaddr_in = std::mem::zeroed();
            dst.sin_family = libc::AF_INET as u16;
            dst.sin_addr.s_addr = u32::from_ne_bytes(to.ip().octets());
            let sent = libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            let err = io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(sent, packet.len() as isize, "send forged packet: {err}");
        }
    });
}

/// Sends one datagram from `ns`, from local address `from`, to `to`; the reply, if any came
/// within `timeout`.
pub fn udp_request_from(
    sandbox: &Sandbox,
    ns: &str,
    from: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Option<Vec<u8>> {
    let socket = sandbox
        .in_netns(ns, || UdpSocket::bind(from))
        .unwrap_or_else(|e| panic!("bind udp client {from} in {ns}: {e}"));
    socket
        .set_read_timeout(Some(timeout))
        .expect("set_read_timeout");
    socket
        .send_to(payload, to)
        .unwrap_or_else(|e| panic!("send udp to {to}: {e}"));
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) if peer == to => return Some(buf[..n].to_vec()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// Sends `count` TCP SYNs over IPv4 from `ns` to `to`, each from another source address in
/// 100.64.0.0/10 (never a real host; the sandbox routes nowhere), through a raw socket, with
/// valid checksums (conntrack ignores segments with bad ones).
pub fn send_syn_flood(sandbox: &Sandbox, ns: &str, to: SocketAddrV4, count: u32) {
    send_syns(sandbox, ns, count, |i| {
        (flood_address(i), 20_000 + (i % 40_000) as u16, to)
    });
}

/// Sends `count` TCP SYNs from `ns` out of `from`, each to another destination in
/// 100.64.0.0/10, port 443: a container opening connections to many hosts.
pub fn send_syns_to_many(sandbox: &Sandbox, ns: &str, from: std::net::Ipv4Addr, count: u32) {
    send_syns(sandbox, ns, count, |i| {
        let port = 20_000 + (i % 40_000) as u16;
        (from, port, SocketAddrV4::new(flood_address(i), 443))
    });
}

/// Sends one TCP SYN over IPv4 from `ns`, from `from` (not through a socket: the kernel
/// knows nothing of it and answers a SYN-ACK with a reset, unless something drops that).
pub fn send_syn(sandbox: &Sandbox, ns: &str, from: SocketAddrV4, to: SocketAddrV4) {
    send_syns(sandbox, ns, 1, |_| (*from.ip(), from.port(), to));
}

/// The `i`-th address of 100.64.0.0/10.
fn flood_address(i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(100, 64 + (i >> 16) as u8 % 64, (i >> 8) as u8, i as u8)
}

/// Sends the SYNs `syn(i)` = (source, source port, destination) for `i` in `0..count`
/// through a raw socket in `ns`.
fn send_syns(
    sandbox: &Sandbox,
    ns: &str,
    count: u32,
    syn: impl Fn(u32) -> (std::net::Ipv4Addr, u16, SocketAddrV4) + Send + Sync,
) {
    sandbox.in_netns(ns, || {
        // SAFETY: plain socket calls on a socket this closure owns and closes.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", io::Error::last_os_error());
        for i in 0..count {
            let (from, sport, to) = syn(i);
            let packet = syn_packet(from, sport, to);
            // SAFETY: `sockaddr_in` is plain integers, for which all zeroes is a valid value.
            let mut dst: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            dst.sin_family = libc::AF_INET as u16;
            dst.sin_addr.s_addr = u32::from_ne_bytes(to.ip().octets());
            // SAFETY: the buffer and address outlive the call.
            let sent = unsafe {
                libc::sendto(
                    fd,
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&dst as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            assert_eq!(
                sent,
                packet.len() as isize,
                "send SYN: {}",
                io::Error::last_os_error()
            );
        }
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(fd) };
    });
}

/// A download through 10.99.0.2:8080 (allow it) that lasts until `stop`: the container's
/// side sends a known byte pattern in
/// paced chunks, the client checks every byte. (bytes sent, bytes received intact).
pub fn paced_download(sb: &Sandbox, stop: &AtomicBool) -> (u64, u64) {
    let listener = sb
        .in_netns(&sb.container, || {
            std::net::TcpListener::bind("10.99.0.2:8080")
        })
        .expect("listen for the download");
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let (mut stream, _) = listener.accept().expect("accept the download");
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let piece: Vec<u8> = (sent..sent + 64 * 1024).map(|i| (i % 251) as u8).collect();
                stream.write_all(&piece).expect("send the download");
                sent += piece.len() as u64;
                std::thread::sleep(Duration::from_millis(20));
            }
            sent
        });
        let mut stream =
            tcp_connect(sb, &sb.client, sa("10.99.0.2:8080"), SHOULD_ANSWER).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let (mut received, mut buf) = (0u64, vec![0u8; 64 * 1024]);
        loop {
            let n = stream.read(&mut buf).expect("read the download");
            if n == 0 {
                break;
            }
            for byte in &buf[..n] {
                assert_eq!(
                    u64::from(*byte),
                    received % 251,
                    "byte {received} of the download"
                );
                received += 1;
            }
        }
        (sender.join().expect("sender"), received)
    })
}

/// An IPv4 + TCP SYN, checksums filled in.
fn syn_packet(from: std::net::Ipv4Addr, sport: u16, to: SocketAddrV4) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&from.octets());
    p[16..20].copy_from_slice(&to.ip().octets());
    let ip_sum = checksum(&p[0..20], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&to.port().to_be_bytes());
    p[24..28].copy_from_slice(&1u32.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x02; // SYN
    p[34..36].copy_from_slice(&64240u16.to_be_bytes());
    // The pseudo-header: addresses, protocol, TCP length.
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&p[12..20]);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let seed = checksum_sum(&pseudo);
    let tcp_sum = checksum(&p[20..40], seed);
    p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

fn checksum_sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum()
}

fn checksum(bytes: &[u8], seed: u32) -> u16 {
    let mut sum = seed + checksum_sum(bytes);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
