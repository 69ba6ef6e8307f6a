//! The tracking table under pressure, with real packets: four times its capacity of new
//! connections from forged sources to an allowed port (which the container answers) and from
//! the container to as many hosts, while 50 idle established connections wait and a download
//! runs. The replied table must be full afterwards (counted with `bpftool`), every idle
//! connection still talk, the download lose nothing, and the port take new connections: a
//! flood of new connections evicts only new connections. Needs root.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use portgate_tests::agent::counter;
use portgate_tests::net::{
    SHOULD_ANSWER, assert_tcp_answers, exchange, paced_download, sa, send_syn_flood,
    send_syns_to_many, tcp_connect,
};
use portgate_tests::sandbox::CONTAINER_V4;
use portgate_tests::{Agent, Sandbox, TcpEchoServer, require_root, run_ok};

/// The smallest tracking table the agent takes (`--max-flows`; new flows get a table of
/// their own), so the flood is quick.
const FLOWS: u32 = 1_024;
const IDLE: usize = 50;

#[test]
fn a_flood_of_new_connections_evicts_no_established_one() {
    if !require_root() {
        return;
    }
    let sb = Sandbox::new();
    // Forged sources must reach the gate, not be dropped by reverse-path filtering.
    run_ok(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &sb.host,
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.vcli.rp_filter=0",
    ]));
    let web = TcpEchoServer::start(&sb, &sb.container, sa("10.99.0.2:80"));
    let max_flows = FLOWS.to_string();
    let agent = Agent::start_with(&sb, &["--max-flows", &max_flows]);
    agent.allow(CONTAINER_V4, "80/tcp");
    agent.allow(CONTAINER_V4, "8080/tcp");
    // From here the test's traffic comes from one CPU, so the table can be shown full.
    stay_on_one_cpu();

    let mut idle: Vec<_> = (0..IDLE)
        .map(|i| {
            let mut stream =
                tcp_connect(&sb, &sb.client, sa("10.99.0.2:80"), SHOULD_ANSWER).expect("connect");
            exchange(&mut stream, &format!("hello {i}")).expect("first exchange");
            stream
        })
        .collect();

    // Four times both tables together.
    let flood = 4 * (FLOWS + (FLOWS / gate_common::NEW_FLOW_SHARE).max(gate_common::MIN_NEW_FLOWS));
    let created_before = counter(&agent.status_json(), "event", "flow_created");
    let stop = AtomicBool::new(false);
    let (sent, received) = std::thread::scope(|scope| {
        let download = scope.spawn(|| paced_download(&sb, &stop));
        std::thread::sleep(Duration::from_millis(300));
        send_syn_flood(
            &sb,
            &sb.client,
            "10.99.0.2:80".parse().expect("address"),
            flood,
        );
        send_syns_to_many(
            &sb,
            &sb.container,
            CONTAINER_V4.parse().expect("address"),
            flood,
        );
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        download.join().expect("download")
    });

    let status = agent.status_json();
    let tracked = status["flows"]["tracked"].as_u64().unwrap_or(0);
    let created = counter(&status, "event", "flow_created") - created_before;
    assert!(
        created >= u64::from(2 * flood),
        "the flood did not reach the table: {created} flows created"
    );
    // The pressure: the replied table, where the idle connections are, is full of the
    // flood's answered connections (an LRU map evicts a little before it is full: each CPU
    // keeps free entries of its own), so keeping the idle ones took more than room.
    let replied = map_entries(
        &agent
            .bpffs
            .join(gate_common::LAYOUT_VERSION)
            .join("maps")
            .join(gate_common::map_names::FLOWS),
    );
    assert!(
        replied >= FLOWS as usize * 3 / 4,
        "the flood did not fill the replied table: {replied} of {FLOWS} entries ({tracked} \
         tracked in both tables)"
    );
    let survivors = idle
        .iter_mut()
        .enumerate()
        .map(|(i, stream)| exchange(stream, &format!("again {i}")).is_ok())
        .filter(|answered| *answered)
        .count();
    println!(
        "pressure: {flood} new connections from forged sources to an allowed port and {flood} \
         from the container, against a table of {FLOWS} (+{} for new flows): {survivors} of \
         {IDLE} idle connections survived; download {received} of {sent} bytes, intact; \
         {created} flows created, {tracked} tracked afterwards ({replied} replied)",
        (FLOWS / gate_common::NEW_FLOW_SHARE).max(gate_common::MIN_NEW_FLOWS)
    );
    assert_eq!(
        survivors, IDLE,
        "established connections evicted by the flood"
    );
    assert_eq!(received, sent, "the download lost bytes");
    // The port still takes new connections after the flood.
    let accepted_before = web.accepted();
    assert_tcp_answers(&sb, &sb.client, sa("10.99.0.2:80"));
    assert_eq!(
        web.accepted(),
        accepted_before + 1,
        "a new connection after the flood"
    );
}

/// Keeps the calling thread, and the threads it starts from now on, on the CPU it runs on.
/// The flow tables are LRU maps in which each CPU that inserted keeps up to 128 free entries
/// of its own: filled from many CPUs, a table stays further from full than the assertion
/// allows. Packets sent from one CPU are handled, and answered, on that CPU.
fn stay_on_one_cpu() {
    // SAFETY: sched_getcpu has no preconditions; CPU_ZERO and CPU_SET write into a cpu_set_t
    // this function owns, and sched_setaffinity (0: the calling thread) reads it.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(
            cpu >= 0,
            "sched_getcpu: {}",
            std::io::Error::last_os_error()
        );
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu as usize, &mut set);
        let pinned = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            pinned,
            0,
            "sched_setaffinity to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// How many entries the pinned map at `pin` holds (`bpftool map dump`).
fn map_entries(pin: &std::path::Path) -> usize {
    let dump = run_ok(
        std::process::Command::new("bpftool")
            .args(["--json", "map", "dump", "pinned"])
            .arg(pin),
    );
    let entries: serde_json::Value = serde_json::from_str(&dump)
        .unwrap_or_else(|e| panic!("bpftool's dump of {}: {e}: {dump}", pin.display()));
    entries
        .as_array()
        .unwrap_or_else(|| panic!("bpftool's dump of {} is a list: {dump}", pin.display()))
        .len()
}
