//! Containers on macvlan networks: gated on the parent interface, where their traffic
//! crosses the host's TC hooks without a bridge or netfilter.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use portgate_tests::run_ok;

use super::*;

/// A macvlan interface of the host itself on `parent` (the usual way for a host to reach its
/// macvlan containers), with `address`; deleted on drop.
struct HostShim(String);

impl HostShim {
    fn create(parent: &str, address: &str) -> Self {
        let name = format!("pgsh{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| run_ok(Command::new("ip").args(args));
        ip(&[
            "link", "add", &name, "link", parent, "type", "macvlan", "mode", "bridge",
        ]);
        let shim = HostShim(name);
        ip(&["addr", "add", &format!("{address}/32"), "dev", &shim.0]);
        ip(&["link", "set", &shim.0, "up"]);
        shim
    }
}

impl Drop for HostShim {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "delete", &self.0])
            .status();
    }
}

/// Sends, from the client namespace, an ICMP echo request to `to` inside an Ethernet
/// broadcast frame (as any host on the segment can), and says whether it was answered.
fn broadcast_ping_answered(client_ns: &str, from: &str, to: &str) -> bool {
    const SCRIPT: &str = r#"
import socket, struct, sys, time
ifname, src, dst = sys.argv[1:4]
def csum(b):
    if len(b) % 2: b += bytes(1)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
ident = 0x5047
icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"portgate"
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, socket.inet_aton(src), socket.inet_aton(dst))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
mac = bytes.fromhex(open("/sys/class/net/%s/address" % ifname).read().strip().replace(":", ""))
replies = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
replies.settimeout(0.5)
out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
out.bind((ifname, 0))
out.send(b"\xff" * 6 + mac + b"\x08\x00" + ip + icmp)
end = time.time() + 2
while time.time() < end:
    try:
        data, addr = replies.recvfrom(2048)
    except socket.timeout:
        continue
    at = (data[0] & 15) * 4
    if addr[0] == dst and data[at] == 0 and struct.unpack("!H", data[at + 4:at + 6])[0] == ident:
        print("answered"); sys.exit(0)
print("silent")
"#;
    let out = run_ok(Command::new("ip").args([
        "netns", "exec", client_ns, "python3", "-c", SCRIPT, "eth0", from, to,
    ]));
    out.trim() == "answered"
}

/// A one-line echo server of the host's, on `addr`, answering connections until dropped.
fn host_echo(addr: SocketAddr) -> std::thread::JoinHandle<()> {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("listen on {addr}: {e}"));
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 64];
            if let Ok(n) = stream.read(&mut buf) {
                let _ = stream.write_all(&buf[..n]);
            }
        }
    })
}

#[test]
fn macvlan_containers_are_closed_until_allowed() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    // The client's own segment: the scenario's root-side veth is the network's parent, so
    // the client reaches the container directly, as a host on its LAN would.
    let x = sc.host_addr.octets()[2];
    let parent = format!("parent={}", sc.host_if);
    let (subnet, range) = (format!("10.98.{x}.0/24"), format!("10.98.{x}.64/26"));
    let network = DockerNetwork::create(
        engines,
        &unique("lan"),
        &[
            "-d",
            "macvlan",
            "--subnet",
            &subnet,
            "--ip-range",
            &range,
            "--gateway",
            &sc.host_addr.to_string(),
            "-o",
            &parent,
        ],
    );
    let (name, ip) = (unique("mv-web"), format!("10.98.{x}.70"));
    let script = httpd_script(&name, &[80, 81], 0);
    let _web = engines.docker_run(
        &name,
        &[
            "--network",
            &network.name,
            "--ip",
            &ip,
            IMAGE,
            "/bin/sh",
            "-c",
            &script,
        ],
    );
    let web: SocketAddr = format!("{ip}:80").parse().expect("address");
    let other: SocketAddr = format!("{ip}:81").parse().expect("address");
    let body = body_of(&name);
    // The control: without the gate, the segment reaches every port.
    sc.assert_answers_within(web, &body, Duration::from_secs(20), "macvlan, no agent");
    assert!(
        broadcast_ping_answered(&sc.client, &sc.client_addr.to_string(), &ip),
        "the control: without the gate, a ping inside a broadcast frame is answered"
    );
    sc.assert_answers(other, &body, "macvlan port 81, no agent");

    let agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker"]);
    let start = Instant::now();
    while sc.get(web, Duration::from_millis(500)).is_ok() {
        assert!(
            start.elapsed() < FOLLOW_TIMEOUT,
            "the macvlan container still answers {FOLLOW_TIMEOUT:?} after the agent synced"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    sc.assert_times_out(web, "macvlan, no rule");
    sc.assert_times_out(other, "macvlan port 81, no rule");
    // A ping for the container's address inside a broadcast frame: the host needs such
    // frames, the container's stack would answer it.
    let client = sc.client_addr.to_string();
    assert!(
        !broadcast_ping_answered(&sc.client, &client, &ip),
        "a ping to the macvlan container inside a broadcast frame must not be answered"
    );
    let status = agent.status_json();
    let ungated = status["ungated"].as_array().cloned().unwrap_or_default();
    assert!(
        !ungated.iter().any(|u| u["container"] == name.as_str()),
        "a gated macvlan container is not listed as ungated: {status}"
    );

    agent.allow(&name, "80/tcp");
    sc.assert_answers(web, &body, "macvlan after allow");
    sc.assert_times_out(other, "macvlan port 81, not allowed");

    // The host's own macvlan interface on the same parent is the host's, not a container's.
    let shim_address = format!("10.98.{x}.60");
    let _shim = HostShim::create(&sc.host_if, &shim_address);
    // Only the shim answers for its address (else the parent would, with its own MAC, and
    // the frames would never be the shim's).
    run_ok(
        Command::new("sysctl").args(["-qw", &format!("net.ipv4.conf.{}.arp_ignore=1", sc.host_if)]),
    );
    let shim: SocketAddr = format!("{shim_address}:18099").parse().expect("address");
    let _echo = host_echo(shim);
    let start = Instant::now();
    let answered = loop {
        let reply = sc.in_client(|| -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect_timeout(&shim, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(b"host")?;
            let mut buf = [0u8; 8];
            let n = stream.read(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        });
        match reply {
            Ok(text) => break text,
            // The agent reads the host's addresses on its next tick.
            Err(_) if start.elapsed() < FOLLOW_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(300))
            }
            Err(e) => panic!("the host's own macvlan address {shim} must answer: {e}"),
        }
    };
    assert_eq!(answered, "host");
    let status = agent.status_json();
    assert!(
        status["counters"]["drop"]["not_allowed"].as_u64() > Some(0),
        "{status}"
    );
}
