//! What the program tests and the fuzzer share: a freshly loaded gate in the real kernel,
//! run on frames through BPF_PROG_TEST_RUN, and the frame builders.
// Each test binary uses its own part of this module.
#![allow(dead_code)]

pub mod fragmented;

pub use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

pub use etherparse::PacketBuilder;
use gate_common::{FlowKey, FlowState, PortAddrKey};
pub use gate_common::{counters, ipv4_mapped, program_names};
pub use gate_user::datapath::{self, AllowSync, Capacities, Datapath, GateConfig, sys};
pub use gate_user::policy::{
    Access, Context, Ports, Prefix, Resolver, RuleSet, SourceSets, Target, parse_address,
};

pub const CONTAINER4: [u8; 4] = [10, 99, 0, 2];
pub const REMOTE4: [u8; 4] = [10, 98, 0, 2];
pub const CONTAINER6: [u8; 16] = [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const REMOTE6: [u8; 16] = [0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// Any non-zero receiving interface: the packet looks forwarded, not sent by the host.
pub const FORWARDED: u32 = 7;
pub const FROM_HOST: u32 = 0;
/// The device of a test run's packet (lo), standing for the container's bridge port.
pub const TEST_RUN_IFINDEX: u32 = 1;

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

/// A freshly loaded gate (maps pinned under a unique directory, removed on drop).
pub struct Gate {
    pub datapath: Datapath,
    pub rules: RuleSet,
    pub sets: SourceSets,
    pub dir: PathBuf,
}

/// The interface `--via` names in these tests: the runs' receiving interface.
pub const VIA: &str = "wg-test";

impl Gate {
    /// None when the test cannot run here, after saying so (a failure in CI instead: see
    /// `portgate_test_support::skip`).
    pub fn load(config: GateConfig) -> Option<Self> {
        Self::load_with(config, Capacities::default())
    }

    pub fn load_with(config: GateConfig, capacities: Capacities) -> Option<Self> {
        if !portgate_test_support::require_root("loads eBPF programs") {
            return None;
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/pgprog-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut datapath = Datapath::load_with(&dir, config, capacities).expect("load the gate");
        // The test container's addresses are its own on the port the test runs use (lo,
        // BPF_PROG_TEST_RUN's default device).
        let bindings = [ipv4_mapped(CONTAINER4), CONTAINER6]
            .into_iter()
            .map(|addr| PortAddrKey {
                addr,
                ifindex: TEST_RUN_IFINDEX,
            })
            .collect();
        datapath
            .sync_port_addrs(&bindings)
            .expect("bind the container's addresses");
        Some(Self {
            datapath,
            rules: RuleSet::default(),
            sets: SourceSets::new(),
            dir,
        })
    }

    pub fn allow(&mut self, address: &str, ports: &str) {
        self.allow_with(address, ports, Access::default());
    }

    pub fn allow_with(&mut self, address: &str, ports: &str, access: Access) {
        self.rules
            .allow(target(address), spec(ports), access)
            .expect("allow");
        self.sync();
    }

    pub fn set(&mut self, name: &str, prefixes: &[&str]) {
        self.sets.insert(
            name.to_owned(),
            prefixes.iter().map(|p| prefix(p)).collect(),
        );
        self.sync();
    }

    /// Replaces the block list; returns the connections it ended.
    pub fn block(&mut self, prefixes: &[&str]) -> usize {
        let blocks = prefixes.iter().map(|p| prefix(p)).collect();
        self.datapath.sync_blocks(&blocks).expect("block list")
    }

    /// Binds the test container's addresses to bridge port `ifindex` instead: test runs
    /// (on [`TEST_RUN_IFINDEX`]) then stand for a neighbour's port.
    pub fn bind_container_to(&mut self, ifindex: u32) {
        let bindings = [ipv4_mapped(CONTAINER4), CONTAINER6]
            .into_iter()
            .map(|addr| PortAddrKey { addr, ifindex })
            .collect();
        self.datapath
            .sync_port_addrs(&bindings)
            .expect("bind the container's addresses");
    }

    pub fn deny(&mut self, address: &str, ports: &str) {
        self.rules
            .deny(&target(address), spec(ports))
            .expect("deny");
        self.sync();
    }

    pub fn sync(&mut self) -> AllowSync {
        let context = Context {
            sets: self.sets.clone(),
            interfaces: [(VIA.to_owned(), FORWARDED)].into(),
            ..Context::default()
        };
        let resolved = Resolver::default().resolve(&self.rules, &[], &context);
        let allow = self
            .datapath
            .write_access_lists(&resolved.entries)
            .expect("access lists");
        let sync = self.datapath.sync_allow(&allow, |_| false).expect("sync");
        self.datapath
            .remove_unused_access_lists()
            .expect("remove unused access lists");
        sync
    }

    pub fn run(&self, program: &'static str, frame: &[u8], ingress_ifindex: u32) -> Verdict {
        self.run_repeated(program, frame, ingress_ifindex, 1)
    }

    pub fn run_repeated(
        &self,
        program: &'static str,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Verdict {
        let fd = self.datapath.program_fd(program).expect("program fd");
        let run = sys::test_run(fd, frame, ingress_ifindex, repeat).expect("BPF_PROG_TEST_RUN");
        match run.retval {
            -1 => Verdict::Pass,
            2 => Verdict::Drop,
            other => panic!("unexpected TC verdict {other}"),
        }
    }

    /// A forwarded packet entering the bridge toward a container.
    pub fn toward(&self, frame: &[u8]) -> Verdict {
        self.run(program_names::TOWARD_CONTAINERS, frame, FORWARDED)
    }

    /// The same, received on another interface than [`VIA`].
    pub fn toward_via_other(&self, frame: &[u8]) -> Verdict {
        self.run(program_names::TOWARD_CONTAINERS, frame, FORWARDED + 1)
    }

    /// A packet a container sends, which passes: the ingress program drops only packets of
    /// connections the agent ended ([`Gate::verdict_on_container_packet`]).
    pub fn sent_by_container(&self, frame: &[u8]) {
        assert_eq!(self.verdict_on_container_packet(frame), Verdict::Pass);
    }

    /// A packet a container sends, and its verdict.
    pub fn verdict_on_container_packet(&self, frame: &[u8]) -> Verdict {
        self.run(program_names::FROM_CONTAINERS, frame, FORWARDED)
    }

    /// The tracked flow of `key`, replied or not.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowState> {
        use aya::maps::{HashMap, Map, MapData};
        [
            gate_common::map_names::FLOWS,
            gate_common::map_names::NEW_FLOWS,
        ]
        .into_iter()
        .find_map(|name| {
            let path = self
                .dir
                .join(datapath::LAYOUT_VERSION)
                .join("maps")
                .join(name);
            let data = MapData::from_pin(&path).expect("open a pinned flow table");
            let flows: HashMap<_, FlowKey, FlowState> =
                HashMap::try_from(Map::LruHashMap(data)).expect("flow table");
            flows.get(key, 0).ok()
        })
    }

    /// Runs `host_ports` on a socket lookup.
    pub fn lookup(&self, lookup: sys::SkLookupRun) -> Verdict {
        let fd = self
            .datapath
            .program_fd(program_names::HOST_PORTS)
            .expect("program fd");
        match sys::test_run_sk_lookup(fd, &lookup).expect("BPF_PROG_TEST_RUN") {
            1 => Verdict::Pass,
            0 => Verdict::Drop,
            other => panic!("unexpected socket lookup verdict {other}"),
        }
    }

    /// Makes every tracked flow look idle since boot, as if its timeout had passed.
    pub fn expire_flows(&self) {
        use aya::maps::{HashMap, Map, MapData};
        for name in [
            gate_common::map_names::FLOWS,
            gate_common::map_names::NEW_FLOWS,
        ] {
            let path = self
                .dir
                .join(datapath::LAYOUT_VERSION)
                .join("maps")
                .join(name);
            let data = MapData::from_pin(&path).expect("open a pinned flow table");
            let mut flows: HashMap<_, FlowKey, FlowState> =
                HashMap::try_from(Map::LruHashMap(data)).expect("flow table");
            let keys: Vec<FlowKey> = flows.keys().map(|k| k.expect("key")).collect();
            for key in keys {
                let mut state = flows.get(&key, 0).expect("flow");
                state.last_seen_ns = 0;
                flows.insert(key, state, 0).expect("write flow");
            }
        }
    }

    pub fn counter(&self, name: &str) -> u64 {
        let (index, _, _) = counters::ALL
            .iter()
            .find(|(_, n, _)| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"));
        self.datapath.counters().expect("counters")[*index as usize]
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = datapath::uninstall(&self.dir);
    }
}

pub fn target(s: &str) -> Target {
    Target::Address(parse_address(s).expect("address"))
}

pub fn prefix(s: &str) -> Prefix {
    s.parse().expect("prefix")
}

pub fn from(sources: &[&str]) -> Access {
    Access {
        from: sources.iter().map(|s| s.parse().expect("source")).collect(),
        ..Access::default()
    }
}

pub fn spec(s: &str) -> Ports {
    Ports::Spec(s.parse().expect("port spec"))
}

/// TCP flags for the frame builders.
#[derive(Clone, Copy, Default)]
pub struct Flags {
    syn: bool,
    ack: bool,
    fin: bool,
    rst: bool,
}
pub const SYN: Flags = Flags {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
pub const SYN_ACK: Flags = Flags {
    syn: true,
    ack: true,
    fin: false,
    rst: false,
};
pub const ACK: Flags = Flags {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};
pub const FIN_ACK: Flags = Flags {
    syn: false,
    ack: true,
    fin: true,
    rst: false,
};
pub const RST: Flags = Flags {
    syn: false,
    ack: false,
    fin: false,
    rst: true,
};

pub fn with_tcp(
    builder: etherparse::PacketBuilderStep<etherparse::IpHeaders>,
    sport: u16,
    dport: u16,
    flags: Flags,
) -> Vec<u8> {
    let mut b = builder.tcp(sport, dport, 1000, 64240);
    if flags.syn {
        b = b.syn();
    }
    if flags.ack {
        b = b.ack(1);
    }
    if flags.fin {
        b = b.fin();
    }
    if flags.rst {
        b = b.rst();
    }
    let mut frame = Vec::new();
    b.write(&mut frame, b"payload").expect("build frame");
    frame
}

pub fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: Flags) -> Vec<u8> {
    with_tcp(
        PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src, dst, 64),
        sport,
        dport,
        flags,
    )
}

pub fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, flags: Flags) -> Vec<u8> {
    with_tcp(
        PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(src, dst, 64),
        sport,
        dport,
        flags,
    )
}

pub fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    udp4_carrying(src, dst, sport, dport, b"query")
}

pub fn udp4_carrying(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut frame, data)
        .expect("build frame");
    frame
}

pub fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
    udp6_carrying(src, dst, sport, dport, b"query")
}

pub fn udp6_carrying(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(src, dst, 64)
        .udp(sport, dport)
        .write(&mut frame, data)
        .expect("build frame");
    frame
}

pub fn echo4(src: [u8; 4], dst: [u8; 4], id: u16, request: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src, dst, 64);
    let b = if request {
        b.icmpv4_echo_request(id, 1)
    } else {
        b.icmpv4_echo_reply(id, 1)
    };
    let mut frame = Vec::new();
    b.write(&mut frame, b"ping").expect("build frame");
    frame
}

pub fn echo6(src: [u8; 16], dst: [u8; 16], id: u16, request: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(src, dst, 64);
    let b = if request {
        b.icmpv6_echo_request(id, 1)
    } else {
        b.icmpv6_echo_reply(id, 1)
    };
    let mut frame = Vec::new();
    b.write(&mut frame, b"ping").expect("build frame");
    frame
}

/// An ICMP error from `router` to `to`, embedding the IP packet of `offending` (a frame).
pub fn icmp4_error(router: [u8; 4], to: [u8; 4], offending: &[u8]) -> Vec<u8> {
    let embedded = &offending[14..14 + 28];
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(router, to, 64)
        .icmpv4_raw(3, 3, [0; 4])
        .write(&mut frame, embedded)
        .expect("build frame");
    frame
}

pub fn icmp6_error(router: [u8; 16], to: [u8; 16], offending: &[u8]) -> Vec<u8> {
    let embedded = &offending[14..14 + 48];
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(router, to, 64)
        .icmpv6_raw(1, 4, [0; 4])
        .write(&mut frame, embedded)
        .expect("build frame");
    frame
}

/// Inserts `ext` (IPv6 extension headers, already chained to the original next header's
/// value by the caller) after the fixed IPv6 header, with `first` as the new next header.
pub fn with_ipv6_extensions(mut frame: Vec<u8>, first: u8, ext: &[u8]) -> Vec<u8> {
    let payload_len = u16::from_be_bytes([frame[18], frame[19]]) + ext.len() as u16;
    frame[18..20].copy_from_slice(&payload_len.to_be_bytes());
    frame[20] = first;
    frame.splice(54..54, ext.iter().copied());
    frame
}

/// One 8-byte hop-by-hop/destination-options header: next header, length 0, padding.
pub fn ext_header(next: u8) -> [u8; 8] {
    [next, 0, 1, 4, 0, 0, 0, 0]
}

/// `bpftool -j ARGS...`'s JSON; panics unless it succeeds.
pub fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let output = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("run bpftool");
    assert!(
        output.status.success(),
        "bpftool {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&output.stdout).expect("bpftool's JSON")
}

/// Entries of one of the gate's maps, counted by bpftool from its pin.
pub fn bpftool_entries(gate: &Gate, map: &str) -> usize {
    let pin = gate
        .dir
        .join(datapath::LAYOUT_VERSION)
        .join("maps")
        .join(map);
    let dump = bpftool_json(&["map", "dump", "pinned", &pin.display().to_string()]);
    dump.as_array().map_or(0, Vec::len)
}
