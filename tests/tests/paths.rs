//! Every path in stays closed unless allowed: a container acting in another container's name,
//! IPv4-mapped IPv6, and the gate's own pins removed while it runs. Real namespaces, a real
//! bridge, the real agent in the real kernel. Need root; without it each test says it is
//! skipped.

use std::{net::SocketAddrV4, time::Duration};

use portgate_tests::agent::counter;
use portgate_tests::net::{
    NO_REPLY, SHOULD_ANSWER, assert_tcp_answers, assert_tcp_times_out, sa, send_forged_udp,
    udp_request_from,
};
use portgate_tests::sandbox::{BRIDGE, CLIENT_V4, CONTAINER_V4};
use portgate_tests::{Agent, Sandbox, TcpEchoServer, UdpEchoServer, require_root};

macro_rules! require_root {
    () => {
        if !require_root() {
            return;
        }
    };
}

/// The neighbour container forges one datagram "from" the container's port 5353 to the
/// client's port 40000. Before the gate bound flows to bridge ports, that opened a flow in
/// the container's name, and the client's "reply" from 40000 reached the container's UDP
/// service on 5353 with no rule at all.
#[test]
fn a_forged_source_opens_no_path_into_another_container() {
    require_root!();
    let sb = Sandbox::new();
    let _service = UdpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:5353"));
    let agent = Agent::start(&sb);
    let container: SocketAddrV4 = format!("{CONTAINER_V4}:5353").parse().expect("addr");
    let client: SocketAddrV4 = format!("{CLIENT_V4}:40000").parse().expect("addr");

    send_forged_udp(&sb, &sb.neighbour, container, client, b"forged");
    let reply = udp_request_from(
        &sb,
        &sb.client,
        sa("10.98.0.2:40000"),
        sa("10.99.0.2:5353"),
        b"in through a forged flow?",
        NO_REPLY,
    );
    assert_eq!(
        reply, None,
        "the client reached the container's port 5353 through a flow the neighbour forged"
    );
    let status = agent.status_json();
    assert!(
        counter(&status, "event", "foreign_source") >= 1,
        "the forged packet should be counted as foreign_source: {status}"
    );

    // Control: once allowed, the same request from the same client port gets 5353's echo,
    // so the silence above was the gate's, not a server or path that never answers.
    agent.allow(CONTAINER_V4, "5353/udp");
    let allowed = udp_request_from(
        &sb,
        &sb.client,
        sa("10.98.0.2:40000"),
        sa("10.99.0.2:5353"),
        b"in through a rule",
        SHOULD_ANSWER,
    );
    assert_eq!(
        allowed.as_deref(),
        Some(&b"in through a rule"[..]),
        "the client's request to the container's port 5353, allowed, should get its echo"
    );

    // Control: the same exchange, opened by the container itself, is a tracked flow.
    let _outside = UdpEchoServer::start(&sb, &sb.client, sa("10.98.0.2:40001"));
    let answered = udp_request_from(
        &sb,
        &sb.container,
        sa("10.99.0.2:5354"),
        sa("10.98.0.2:40001"),
        b"from the container itself",
        SHOULD_ANSWER,
    );
    assert!(
        answered.is_some(),
        "the container's own UDP request should get its reply"
    );
}

/// While the agent runs it holds its links: removing their pins detaches nothing, even for a
/// moment, and the agent pins them again.
#[test]
fn removing_the_link_pins_never_opens_the_gate() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _ssh = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:22"));
    let agent = Agent::start(&sb);
    agent.allow("10.99.0.2", "80/tcp");
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));

    let links = agent.bpffs.join(gate_common::LAYOUT_VERSION).join("links");
    let pins: Vec<_> = std::fs::read_dir(&links)
        .expect("the agent's link pins")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(!pins.is_empty(), "no link pins under {}", links.display());
    for pin in &pins {
        std::fs::remove_file(pin).expect("remove a link pin");
    }
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:22"));
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));

    // Pinned again within a tick or two, so the gate also outlives this agent.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pins.iter().any(|p| !p.exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not pin its links again: {:?}",
            pins.iter().filter(|p| !p.exists()).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut agent = agent;
    agent.kill();
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:22"));
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
}

/// The bridge deleted and made again (an engine or network restart does this): the agent
/// attaches to the new one by itself, says so, and the gate is as it was.
#[test]
fn a_recreated_bridge_is_gated_again_by_itself() {
    require_root!();
    let sb = Sandbox::new();
    let _web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let _ssh = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:22"));
    let agent = Agent::start(&sb);
    agent.allow("10.99.0.2", "80/tcp");
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));

    let ip = |args: &[&str]| {
        portgate_tests::run_ok(
            std::process::Command::new("ip")
                .args(["-n", &sb.host])
                .args(args),
        )
    };
    ip(&["link", "del", BRIDGE]);
    ip(&["link", "add", BRIDGE, "type", "bridge"]);
    for port in ["vctr", "vnbr"] {
        ip(&["link", "set", port, "master", BRIDGE]);
    }
    ip(&["addr", "add", "10.99.0.1/24", "dev", BRIDGE]);
    ip(&["-6", "addr", "add", "fd99::1/64", "dev", BRIDGE, "nodad"]);
    ip(&["link", "set", BRIDGE, "up"]);

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agent.log_text().matches("gate attached").nth(1).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not attach to the new bridge: {}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_tcp_times_out(&sb, &sb.client, sa("10.99.0.2:22"));
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
}

/// A listener in `ns` on every address of both families, echoing what it reads; killed on
/// drop.
struct Listener {
    child: std::process::Child,
    /// Holds the renamed link to the program while it runs.
    _dir: tempfile::TempDir,
}

impl Listener {
    /// socat run under the name `name` (a symbolic link: the kernel names a process after
    /// the path it was started by).
    fn start(sb: &Sandbox, ns: &str, name: &str, port: u16) -> Self {
        let (dir, program) = renamed("socat", name);
        let child = sb
            .command_in(ns, &program)
            .args([
                &format!("TCP6-LISTEN:{port},ipv6only=0,fork,reuseaddr"),
                "EXEC:cat",
            ])
            .spawn()
            .expect("start the listener");
        Self::ready(child, dir)
    }

    /// A listener bound by one process (python3) and adopted by another named `name`, as
    /// Docker 28's daemon binds a published port and hands it to docker-proxy.
    fn adopted(sb: &Sandbox, ns: &str, name: &str, port: u16) -> Self {
        let (dir, relay) = renamed("python3", name);
        let bind = format!(
            "import os, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(('::', {port}))
s.listen(16)
os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.execv(sys.argv[1], [sys.argv[1], '-c', sys.argv[2]])"
        );
        let relay_script = "import socket
listener = socket.socket(fileno=3)
while True:
    c, _ = listener.accept()
    c.sendall(c.recv(1000))
    c.close()";
        let child = sb
            .command_in(ns, "python3")
            .args(["-c", &bind])
            .arg(&relay)
            .arg(relay_script)
            .spawn()
            .expect("start the adopted listener");
        Self::ready(child, dir)
    }

    fn ready(child: std::process::Child, dir: tempfile::TempDir) -> Self {
        std::thread::sleep(Duration::from_millis(500));
        Self { child, _dir: dir }
    }
}

/// A symbolic link named `name` to `program` (found in /usr/bin or /bin).
fn renamed(program: &str, name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let target = ["/usr/bin", "/bin"]
        .iter()
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("{program} is installed"));
    let dir = tempfile::tempdir().expect("temporary directory");
    let link = dir.path().join(name);
    std::os::unix::fs::symlink(target, &link).expect("link the program under another name");
    (dir, link)
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a connection from `ns` to `addr` fails (refused or timed out) rather than being
/// answered.
fn tcp_closed(sb: &Sandbox, ns: &str, addr: std::net::SocketAddr) -> bool {
    use portgate_tests::net::{SHOULD_TIME_OUT, exchange, tcp_connect};
    match tcp_connect(sb, ns, addr, SHOULD_TIME_OUT) {
        Ok(mut stream) => exchange(&mut stream, "open?").is_err(),
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::ConnectionRefused
        ),
    }
}

/// A container relay (here a program named `docker-proxy`) that takes a host port while no
/// agent runs, as Docker's userland proxy does for a container started then, by binding it
/// (Docker up to 27) or by adopting the daemon's listener (Docker 28): the port stays
/// closed over IPv4 and IPv6 (the gate's hooks recorded it), is refused silently once an
/// agent runs again, and is forgotten when the relay goes. Other programs' ports, and a
/// relay bound in another network namespace, are not touched.
#[test]
fn a_relay_bound_while_no_agent_runs_stays_closed() {
    use portgate_tests::sandbox::{HOST_V4, HOST_V6};
    require_root!();
    let sb = Sandbox::new();
    let mut agent = Agent::start(&sb);
    agent.stop();
    let on_host = |port: u16| {
        [
            sa(&format!("{HOST_V4}:{port}")),
            sa(&format!("[{HOST_V6}]:{port}")),
        ]
    };

    let relay = Listener::start(&sb, &sb.host, "docker-proxy", 18080);
    let _adopted = Listener::adopted(&sb, &sb.host, "docker-proxy", 18083);
    let _other = Listener::start(&sb, &sb.host, "socat", 18081);
    // The relay's end inside another namespace (as rootlessport's child has) is not the
    // host's: the same port on the host stays the host's own.
    let _elsewhere = Listener::start(&sb, &sb.client, "docker-proxy", 18082);
    let _own = Listener::start(&sb, &sb.host, "socat", 18082);
    for addr in on_host(18080).into_iter().chain(on_host(18083)) {
        assert!(
            tcp_closed(&sb, &sb.client, addr),
            "a relay started while no agent runs answered at {addr}"
        );
    }
    for addr in on_host(18081).into_iter().chain(on_host(18082)) {
        assert_tcp_answers(&sb, &sb.client, addr);
    }

    agent.spawn();
    agent.wait_ready();
    for addr in on_host(18080).into_iter().chain(on_host(18083)) {
        assert_tcp_times_out(&sb, &sb.client, addr);
    }
    let status = agent.status_json();
    assert!(
        counter(&status, "drop", "relay_unpublished") >= 4,
        "refused relay connections should count as relay_unpublished: {status}"
    );

    // The relay goes: within a tick or two the port is the host's again.
    drop(relay);
    let _successor = Listener::start(&sb, &sb.host, "socat", 18080);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tcp_closed(&sb, &sb.client, on_host(18080)[0]) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not forget the port of a relay that is gone"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_tcp_answers(&sb, &sb.client, on_host(18080)[1]);
}
