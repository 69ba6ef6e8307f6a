//! Raw frame floods from the client namespace, and `--flood`: allowed new connections with and
//! without a SYN flood to a published port that no rule allows.
//!
//! The generator writes whole Ethernet frames on the client's link (AF_PACKET, qdisc bypass,
//! batches of [`BATCH`] with sendmmsg), as fast as one thread can: the host receives each
//! frame in the sender's own softirq, so the rate is bounded by what the host does with it.
//! Checksums are real (conntrack checks them and would ignore the frames otherwise). Sources:
//! - one: the client's address, source ports cycled (a flood from one machine);
//! - random: addresses from 198.18.0.0/15 (the benchmarking range) and ports at random;
//! - distinct: (address, port) counted up from 198.18.0.0:1024, so no two frames of a run
//!   share a flow (each datagram of the many-new-flows UDP figure is a new flow).
//!
//! CPU per frame: the generator thread's own CPU time (CLOCK_THREAD_CPUTIME_ID) plus the
//! ksoftirqd threads' time, during a flood with no other load of the bench, over the frames
//! sent. With qdisc bypass, a veth hands each frame to the peer's backlog and the softirq that
//! empties it runs as the sending syscall re-enables bottom halves, in the sender's context:
//! the host's prerouting, conntrack, routing, forward hook, bridge and gate all run there (and
//! the server's answer, if any). This kernel has no IRQ_TIME_ACCOUNTING, so that softirq time
//! is the thread's; what the kernel defers to ksoftirqd is added. Other processes do not
//! count, unlike with /proc/stat. The control is the same flood with a destination MAC
//! address that is not the host's: the host's link receives the frames and drops them as
//! PACKET_OTHERHOST before any netfilter hook.
use std::{
    mem::{size_of, zeroed},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    Plan, WRK_CONNECTIONS, WRK_THREADS, engine,
    filters::{self, Filter, Setup},
    noise,
    topo::{
        self, CLIENT_CPU, CLIENT_MAC, FOREIGN_MAC, HOST_MAC, PUBLISHED_BLOCKED_PORT, Topology,
        pin_thread,
    },
    traffic,
};
use portgate_cmd as proc;

const BATCH: usize = 64;
const SOL_PACKET: libc::c_int = 263;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const ETH_P_IP: u16 = 0x0800;
/// The benchmarking range 198.18.0.0/15: the random and distinct sources.
const RANDOM_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
const RANDOM_ADDRS: u32 = 1 << 17;
/// N of the flood cells: the figures are about conntrack, not the rule count.
pub const FLOOD_N: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Sources {
    One,
    Random,
    Distinct,
}

impl Sources {
    pub fn label(self) -> &'static str {
        match self {
            Sources::One => "one source",
            Sources::Random => "random sources",
            Sources::Distinct => "distinct flows",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Payload {
    /// A TCP SYN to this port.
    Syn(u16),
    /// An 18-byte UDP datagram (a 64-byte frame with the FCS) to this port.
    Udp(u16),
}

/// What a generator sends: to `dst` (address and MAC), from `sources`.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub dst_mac: [u8; 6],
    pub dst_ip: [u8; 4],
    pub payload: Payload,
    pub sources: Sources,
}

/// A flood running on its own thread, pinned to the client CPU; stopped on drop.
pub struct Generator {
    stopping: Arc<AtomicBool>,
    pub sent: Arc<AtomicU64>,
    /// The sending thread's CPU time so far, in nanoseconds.
    pub cpu_ns: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Generator {
    pub fn start(topo: &Topology, spec: Spec) -> Result<Self> {
        // The socket and the interface index belong to the client namespace.
        let socket = topo.client.run(open_packet_socket)??;
        let stopping = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let cpu_ns = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stopping, sent, cpu_ns) = (stopping.clone(), sent.clone(), cpu_ns.clone());
            std::thread::Builder::new()
                .name("raw-flood".into())
                .spawn(move || {
                    pin_thread(CLIENT_CPU);
                    send_loop(&socket, spec, &stopping, &sent, &cpu_ns)
                })?
        };
        Ok(Self {
            stopping,
            sent,
            cpu_ns,
            thread: Some(thread),
        })
    }

    /// Stops the flood; an error of the sending thread (the socket refused every frame).
    pub fn stop(&mut self) -> Result<()> {
        self.stopping.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => Ok(()),
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn open_packet_socket() -> Result<OwnedFd> {
    // SAFETY: a plain socket(2) call; protocol 0: the socket receives nothing.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: socket(2) returned a new descriptor that we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
    if ifindex == 0 {
        bail!("no eth0 in the client namespace");
    }
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int of the size passed. Without the qdisc
    // bypass the frames queue in the veth's qdisc; failure only makes the flood slower.
    unsafe {
        libc::setsockopt(
            fd,
            SOL_PACKET,
            PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        );
    }
    // SAFETY: an all-zero sockaddr_ll is valid (integers only).
    let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_IP.to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: bind with a sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        bail!(
            "binding the AF_PACKET socket to eth0: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(socket)
}

/// xorshift64*: random sources and sequence numbers, cheap enough not to show.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The frames' fixed part; [`Frame::set_source`] fills in the source and the checksums.
pub struct Frame {
    bytes: Vec<u8>,
}

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;

impl Frame {
    pub fn new(spec: &Spec) -> Self {
        let (proto, l4_len) = match spec.payload {
            Payload::Syn(_) => (libc::IPPROTO_TCP as u8, 20),
            Payload::Udp(_) => (libc::IPPROTO_UDP as u8, 8 + 18),
        };
        let mut b = vec![0u8; ETH_LEN + IP_LEN + l4_len];
        b[0..6].copy_from_slice(&spec.dst_mac);
        b[6..12].copy_from_slice(&CLIENT_MAC);
        b[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        let ip = &mut b[ETH_LEN..ETH_LEN + IP_LEN];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((IP_LEN + l4_len) as u16).to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = proto;
        ip[16..20].copy_from_slice(&spec.dst_ip);
        let l4 = &mut b[ETH_LEN + IP_LEN..];
        match spec.payload {
            Payload::Syn(port) => {
                l4[2..4].copy_from_slice(&port.to_be_bytes());
                l4[12] = 5 << 4; // data offset: 5 words
                l4[13] = 0x02; // SYN
                l4[14..16].copy_from_slice(&64_240u16.to_be_bytes());
            }
            Payload::Udp(port) => {
                l4[2..4].copy_from_slice(&port.to_be_bytes());
                l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                l4[8..].fill(0x55);
            }
        }
        Self { bytes: b }
    }

    /// Source address and port (and the TCP sequence number), then both checksums.
    pub fn set_source(&mut self, addr: [u8; 4], port: u16, seq: u32) {
        let b = &mut self.bytes;
        b[ETH_LEN + 12..ETH_LEN + 16].copy_from_slice(&addr);
        b[ETH_LEN + 10..ETH_LEN + 12].fill(0);
        let ip_sum = checksum(&b[ETH_LEN..ETH_LEN + IP_LEN], 0);
        b[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_sum.to_be_bytes());
        let proto = b[ETH_LEN + 9];
        let l4_start = ETH_LEN + IP_LEN;
        let l4_len = b.len() - l4_start;
        b[l4_start..l4_start + 2].copy_from_slice(&port.to_be_bytes());
        let sum_at = if proto == libc::IPPROTO_TCP as u8 {
            b[l4_start + 4..l4_start + 8].copy_from_slice(&seq.to_be_bytes());
            l4_start + 16
        } else {
            l4_start + 6
        };
        b[sum_at..sum_at + 2].fill(0);
        // The pseudo-header: source, destination, protocol, length.
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&b[ETH_LEN + 12..ETH_LEN + 20]);
        pseudo[9] = proto;
        pseudo[10..12].copy_from_slice(&(l4_len as u16).to_be_bytes());
        let partial = sum_words(&pseudo, 0);
        let mut l4_sum = checksum(&b[l4_start..], partial);
        if l4_sum == 0 && proto == libc::IPPROTO_UDP as u8 {
            l4_sum = 0xffff;
        }
        b[sum_at..sum_at + 2].copy_from_slice(&l4_sum.to_be_bytes());
    }
}

fn sum_words(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// The Internet checksum of `data`, starting from a partial sum.
fn checksum(data: &[u8], partial: u32) -> u16 {
    let mut sum = sum_words(data, partial);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The `i`-th source of a run.
fn source(sources: Sources, i: u64, rng: &mut Rng) -> ([u8; 4], u16) {
    match sources {
        Sources::One => (
            topo::CLIENT_IP,
            1024 + (i % u64::from(u16::MAX - 1024)) as u16,
        ),
        Sources::Random => {
            let r = rng.next();
            let addr = RANDOM_BASE + (r as u32 % RANDOM_ADDRS);
            (
                addr.to_be_bytes(),
                1024 + ((r >> 32) as u16 % (u16::MAX - 1024)),
            )
        }
        Sources::Distinct => {
            let ports = u64::from(u16::MAX - 1024);
            let addr = RANDOM_BASE + ((i / ports) % u64::from(RANDOM_ADDRS)) as u32;
            (addr.to_be_bytes(), 1024 + (i % ports) as u16)
        }
    }
}

fn send_loop(
    socket: &OwnedFd,
    spec: Spec,
    stopping: &AtomicBool,
    sent: &AtomicU64,
    cpu_ns: &AtomicU64,
) -> Result<()> {
    let template = Frame::new(&spec);
    let mut frames: Vec<Frame> = (0..BATCH)
        .map(|_| Frame {
            bytes: template.bytes.clone(),
        })
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut i: u64 = 0;
    let mut failures = 0u64;
    let mut total = 0u64;
    while !stopping.load(Ordering::Relaxed) {
        for frame in &mut frames {
            let (addr, port) = source(spec.sources, i, &mut rng);
            frame.set_source(addr, port, rng.next() as u32);
            i += 1;
        }
        // SAFETY: all-zero iovec and mmsghdr values are valid (null pointers, zero lengths);
        // each is pointed at a live frame below.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for k in 0..BATCH {
            iovs[k] = libc::iovec {
                iov_base: frames[k].bytes.as_mut_ptr().cast(),
                iov_len: frames[k].bytes.len(),
            };
            msgs[k].msg_hdr.msg_iov = &mut iovs[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every mmsghdr points at a live frame of the length given; the socket is bound.
        let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        cpu_ns.store(thread_cpu_ns(), Ordering::Relaxed);
        if n > 0 {
            sent.fetch_add(n as u64, Ordering::Relaxed);
            total += n as u64;
        } else {
            // ENOBUFS when the receiving backlog is full: the frame is lost, try the next.
            failures += 1;
            if total == 0 && failures > 100_000 {
                bail!(
                    "the AF_PACKET socket refuses every frame: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    Ok(())
}

/// The calling thread's CPU time, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    // SAFETY: an all-zero timespec is valid; clock_gettime writes only into it.
    let mut ts: libc::timespec = unsafe { zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One flood without other load: rate, kernel CPU per frame, the conntrack table around it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Phase {
    pub sent_per_sec: f64,
    pub cpu_ns_per_frame: f64,
    pub ct_before: u64,
    pub ct_after: u64,
}

/// Runs `spec` for `duration` with nothing else of the bench running.
pub fn measure_phase(topo: &Topology, spec: Spec, duration: Duration) -> Result<Phase> {
    let ct_before = topo.conntrack_count()?;
    let mut generator = Generator::start(topo, spec)?;
    // Let the thread reach full speed before the clock starts.
    std::thread::sleep(Duration::from_millis(100));
    let sample = |g: &Generator| {
        (
            g.sent.load(Ordering::Relaxed),
            g.cpu_ns.load(Ordering::Relaxed) as f64 + noise::softirqd_secs() * 1e9,
        )
    };
    let ((sent0, cpu0), t0) = (sample(&generator), Instant::now());
    proc::sleep(duration)?;
    let ((sent1, cpu1), secs) = (sample(&generator), t0.elapsed().as_secs_f64());
    generator.stop()?;
    let ct_after = topo.conntrack_count()?;
    let frames = (sent1 - sent0) as f64;
    if frames == 0.0 {
        bail!("the flood sent nothing");
    }
    Ok(Phase {
        sent_per_sec: frames / secs,
        cpu_ns_per_frame: (cpu1 - cpu0) / frames,
        ct_before,
        ct_after,
    })
}

/// Many new UDP flows: 18-byte datagrams to the sink, each from a source (address, port) no
/// earlier datagram of the run used, so each one is a new flow for conntrack and the gate.
/// The sink does not answer them.
pub fn udp_new_flows(
    topo: &Topology,
    sink: &traffic::UdpSink,
    duration: Duration,
) -> Result<traffic::FloodResult> {
    sink.answering.store(false, Ordering::SeqCst);
    let spec = Spec {
        dst_mac: HOST_MAC,
        dst_ip: topo::SERVER_IP,
        payload: Payload::Udp(filters::UDP_PORT),
        sources: Sources::Distinct,
    };
    let mut generator = Generator::start(topo, spec)?;
    std::thread::sleep(Duration::from_millis(100));
    let (sent0, got0, t0) = (
        generator.sent.load(Ordering::Relaxed),
        sink.received.load(Ordering::Relaxed),
        Instant::now(),
    );
    proc::sleep(duration)?;
    let (sent1, got1, secs) = (
        generator.sent.load(Ordering::Relaxed),
        sink.received.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    generator.stop()?;
    sink.answering.store(true, Ordering::SeqCst);
    Ok(traffic::FloodResult {
        delivered_per_sec: (got1 - got0) as f64 / secs,
        sent_per_sec: (sent1 - sent0) as f64 / secs,
    })
}

/// A filter of the flood table: the four of the data path, and portgate with its early drop
/// on the host's client-facing link (`--uplink vcli`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Variant {
    pub filter: Filter,
    pub uplink: bool,
}

impl Variant {
    pub fn label(self) -> String {
        if self.uplink {
            format!("{} --uplink", self.filter.label())
        } else {
            self.filter.label().to_owned()
        }
    }

    /// The variants this portgate supports (`--uplink` only if `portgate agent --help` names it).
    pub fn all(setup: &Setup) -> Vec<Variant> {
        let mut out: Vec<Variant> = Filter::ALL
            .iter()
            .map(|&filter| Variant {
                filter,
                uplink: false,
            })
            .collect();
        if has_uplink(setup) {
            out.push(Variant {
                filter: Filter::Portgate,
                uplink: true,
            });
        }
        out
    }
}

pub fn has_uplink(setup: &Setup) -> bool {
    let mut cmd = std::process::Command::new(&setup.portgate);
    cmd.args(["agent", "--help"]);
    proc::capture(&mut cmd, Duration::from_secs(20))
        .map(|out| out.combined().contains("--uplink"))
        .unwrap_or(false)
}

/// What one flood cell measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Allowed new connections per second (wrk through the published port), no flood.
    pub idle_cps: f64,
    /// The control: frames to a foreign MAC address.
    pub control: Phase,
    /// Per source kind: the flood alone, and allowed new connections per second under it.
    pub floods: Vec<(Sources, Phase, f64)>,
}

/// One flood cell: a fresh container-host topology with `variant`, allowed connections
/// alone, the control flood, then for one and random sources the flood alone and the flood
/// with the allowed connections. The table keeps what a flood left for the next one, as a
/// host would; each flood's fill is taken just before and after it.
pub fn run_cell(plan: &Plan, setup: &Setup, cell: &str, variant: Variant) -> Result<Outcome> {
    let topo = Topology::create(cell)?;
    topo.container_host()?;
    let servers = traffic::Servers::start(&topo)?;
    // portgate follows a (fake) Docker that publishes the DNATed ports: the early drop
    // decides on published host ports, which only an engine tells the agent. Both portgate
    // variants get it, so they differ in --uplink alone.
    let dir = setup.work_dir.join(cell);
    std::fs::create_dir_all(&dir)?;
    let docker = match variant.filter {
        Filter::Portgate => Some(engine::start(&dir)?),
        _ => None,
    };
    let mut agent_args = docker
        .as_ref()
        .map_or_else(Vec::new, portgate_fake_docker::FakeEngine::agent_args);
    if variant.uplink {
        agent_args.extend(["--uplink".into(), "vcli".into()]);
    }
    let installed = filters::install_with(variant.filter, FLOOD_N, &topo, setup, cell, &agent_args)
        .with_context(|| format!("installing {}", variant.label()))?;
    if let Some(agent) = &installed.agent {
        engine::wait_synced(|| agent.status(setup))?;
        if variant.uplink {
            let status = agent.status(setup)?;
            if status["uplinks"][0]["name"] != "vcli" {
                bail!(
                    "the agent does not gate the uplink vcli: {}",
                    status["uplinks"]
                );
            }
        }
    }
    if !traffic::published_answers(&topo)? {
        bail!(
            "the HTTP server does not answer on the published port through {}",
            variant.label()
        );
    }
    if variant.filter != Filter::None && !traffic::published_blocked_times_out(&topo)? {
        bail!(
            "{} does not drop a connection to the published port it does not allow",
            variant.label()
        );
    }
    let secs = plan.flood_secs;
    let wrk_args = traffic::wrk_dnat_args(WRK_THREADS, WRK_CONNECTIONS, secs);
    let mut outcome = Outcome {
        idle_cps: traffic::wrk(&topo, &wrk_args, secs)?.requests_per_sec,
        ..Default::default()
    };
    let duration = Duration::from_secs(u64::from(secs));
    let syn = |dst_mac, sources| Spec {
        dst_mac,
        dst_ip: topo::HOST_IP,
        payload: Payload::Syn(PUBLISHED_BLOCKED_PORT),
        sources,
    };
    proc::check_interrupted()?;
    outcome.control = measure_phase(&topo, syn(FOREIGN_MAC, Sources::Random), duration)?;
    for sources in [Sources::One, Sources::Random] {
        proc::check_interrupted()?;
        let phase = measure_phase(&topo, syn(HOST_MAC, sources), duration)?;
        let mut generator = Generator::start(&topo, syn(HOST_MAC, sources))?;
        let under = traffic::wrk(&topo, &wrk_args, secs);
        generator.stop()?;
        outcome
            .floods
            .push((sources, phase, under?.requests_per_sec));
    }
    drop(installed);
    drop(docker);
    drop(servers);
    drop(topo);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        for payload in [Payload::Syn(8081), Payload::Udp(9000)] {
            let spec = Spec {
                dst_mac: HOST_MAC,
                dst_ip: [10, 99, 0, 2],
                payload,
                sources: Sources::Random,
            };
            let mut frame = Frame::new(&spec);
            frame.set_source([198, 18, 3, 4], 40_000, 12345);
            let b = &frame.bytes;
            // A header with its checksum sums to 0xffff, i.e. checksums to zero.
            assert_eq!(checksum(&b[ETH_LEN..ETH_LEN + IP_LEN], 0), 0);
            let mut pseudo = [0u8; 12];
            pseudo[0..8].copy_from_slice(&b[ETH_LEN + 12..ETH_LEN + 20]);
            pseudo[9] = b[ETH_LEN + 9];
            let l4 = &b[ETH_LEN + IP_LEN..];
            pseudo[10..12].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            assert_eq!(checksum(l4, sum_words(&pseudo, 0)), 0);
        }
    }

    #[test]
    fn distinct_sources_do_not_repeat() {
        let mut rng = Rng(1);
        let mut seen = std::collections::HashSet::new();
        for i in 0..200_000 {
            assert!(seen.insert(source(Sources::Distinct, i, &mut rng)));
        }
        let (addr, _) = source(Sources::Random, 0, &mut rng);
        assert_eq!(&addr[..2], &[198, 18]);
        let _ = source(Sources::One, u64::MAX, &mut rng);
    }
}
