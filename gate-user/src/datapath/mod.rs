//! The kernel side as the agent sees it: load the programs, reuse or create the pinned maps,
//! attach (or atomically replace) the programs, and read and write the maps.
//!
//! Pin layout under the bpffs directory (default /sys/fs/bpf/portgate), `vN` being
//! [`LAYOUT_VERSION`]:
//!   vN/maps/<every name in map_names::PINNED>
//!   vN/programs/<every program of the object>
//!   vN/links/<bridge>-egress     toward_containers on each bridge's TC egress
//!   vN/links/<port>-port         from_containers on each bridge port's TC ingress
//!   vN/links/host-ports          host_ports on the host's network namespace (socket lookup)
//!   vN/links/relay-{bound4,bound6,adopted}  the relay hooks on the cgroup v2 root
//!   vN/links/<iface>-uplink      from_uplinks on each --uplink interface's TC ingress
//!   vN/links/<parent>-macvlan-in  toward_macvlan on each macvlan parent's TC ingress
//!   vN/links/<parent>-macvlan-out from_macvlan on each macvlan parent's TC egress
//! The links keep the programs attached after the agent exits (fail closed). While the agent
//! runs it also holds each link open, so removing a pin detaches nothing; it pins it again.
//! The directories are root-only (0700); `uninstall` removes these names only, never other
//! tools' pins.

mod flows;
mod macvlan;
mod relays;
mod sources;
pub mod sys;

pub use relays::{RELAY_PROCESSES, recorded_relay_ports};
pub use sources::Lookup;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, MapInfo, MapType, PerCpuArray, PerCpuHashMap,
        PerCpuValues, RingBuf,
    },
    programs::{
        LinkOrder, ProgramError, SchedClassifier, SkLookup, TcAttachType,
        links::{FdLink, LinkError},
        tc::TcAttachOptions,
    },
};
use gate_common::{
    ALLOW_CAPACITY, AllowKey, AllowValue, BLOCKED_CAPACITY, BRIDGE_DROPS_CAPACITY, BlockKey,
    BridgeDropKey, CONFIG_AUDIT, CONFIG_GATE_HOST, Config, DropEvent, FLOW_CAPACITY, FlowKey,
    FlowState, HOST_PORTS_CAPACITY, LOCAL_ADDRS_CAPACITY, PORT_ADDRS_CAPACITY, PortAddrKey,
    RuleStats, SOURCES_CAPACITY, SourceKey, SourceValue, counters, map_names, program_names,
};
use tracing::{info, warn};

/// The eBPF object, built by build.rs with aya-build.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gate-ebpf"));

pub use gate_common::LAYOUT_VERSION;
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/portgate";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// `bpf_map_update_elem` flag: only if the key is not there yet.
const BPF_NOEXIST: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{path} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf },
    #[error(
        "this kernel ({release}) has no TCX links, which the gate needs to attach and swap its programs atomically: run Linux 6.6 or later"
    )]
    NoTcx { release: String },
    #[error("cannot mount bpffs on /sys/fs/bpf: {0}")]
    Mount(io::Error),
    #[error("{path}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "pinned map {path} does not fit this portgate ({detail}); run `portgate uninstall` to remove the old gate first"
    )]
    IncompatibleMap { path: PathBuf, detail: String },
    #[error("loading the eBPF programs")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("attaching to {target}")]
    Attach {
        target: String,
        source: ProgramError,
    },
    #[error("link {path}")]
    LinkIo { path: PathBuf, source: io::Error },
    #[error("bridge {bridge}: no such interface")]
    NoSuchBridge { bridge: String },
    #[error("link {path}")]
    Link { path: PathBuf, source: LinkError },
    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Gate behaviour the agent sets at run time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateConfig {
    /// Count what would be dropped; drop nothing.
    pub audit: bool,
    /// Gate connections from the host's own stack too.
    pub gate_host_traffic: bool,
}

impl GateConfig {
    fn flags(self) -> u32 {
        (if self.audit { CONFIG_AUDIT } else { 0 })
            | (if self.gate_host_traffic {
                CONFIG_GATE_HOST
            } else {
                0
            })
    }
}

/// A bridge the programs are attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    pub ifindex: u32,
}

/// Directories of one pin layout.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(bpffs_dir: &Path) -> Self {
        Self {
            root: bpffs_dir.join(LAYOUT_VERSION),
        }
    }

    fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    fn programs(&self) -> PathBuf {
        self.root.join("programs")
    }

    fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    fn link(&self, name: &str) -> PathBuf {
        self.links().join(name)
    }
}

/// Pin name of the egress link of `bridge`.
fn egress_link(bridge: &str) -> String {
    format!("{bridge}-egress")
}

/// Pin name of the ingress link of bridge port `port`.
fn port_link(port: &str) -> String {
    format!("{port}-port")
}

/// Pin name of the ingress link of uplink `iface`.
fn uplink_link(iface: &str) -> String {
    format!("{iface}-uplink")
}

/// Pin name of the socket-lookup link on the host's network namespace.
const HOST_PORTS_LINK: &str = "host-ports";

/// Every program of the object, pinned under `programs/` by name.
const PROGRAMS: [&str; 9] = [
    program_names::TOWARD_CONTAINERS,
    program_names::FROM_CONTAINERS,
    program_names::HOST_PORTS,
    program_names::FROM_UPLINKS,
    program_names::TOWARD_MACVLAN,
    program_names::FROM_MACVLAN,
    program_names::RELAY_BOUND4,
    program_names::RELAY_BOUND6,
    program_names::RELAY_ADOPTED,
];

/// Sizes of the maps that grow with the host: set at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Allow-map entries: one per (address, protocol, port).
    pub allow: u32,
    /// Tracked connections (LRU).
    pub flows: u32,
    /// Saved rules (`--max-rules`); as many rule slots again are for the rules the agent
    /// derives (labels, `--published`, the default policy, the policy file).
    pub rules: u32,
}

/// Saved rules by default (the policy's; the kernel object declares twice as many slots).
pub use crate::policy::DEFAULT_SAVED_RULES;
/// The most `--max-rules` takes: rule ids stay far below `NO_RULE`, and the counters of
/// 2 × this many slots take 32 MiB per possible CPU.
pub const MAX_SAVED_RULES_LIMIT: u32 = 1 << 20;

impl Capacities {
    /// The unreplied flows' table: a share of the replied one.
    pub fn new_flows(&self) -> u32 {
        (self.flows / gate_common::NEW_FLOW_SHARE).max(gate_common::MIN_NEW_FLOWS)
    }

    /// Slots of the per-rule counters (`RULE_STATS`): ids `0..rules` for saved rules,
    /// `rules..2 × rules` for derived ones.
    pub fn rule_slots(&self) -> u32 {
        self.rules.saturating_mul(2)
    }

    /// The ids of saved rules.
    pub fn saved_ids(&self) -> std::ops::Range<u32> {
        0..self.rules
    }

    /// The ids of the rules the agent derives.
    pub fn derived_ids(&self) -> std::ops::Range<u32> {
        self.rules..self.rule_slots()
    }
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            allow: ALLOW_CAPACITY,
            flows: FLOW_CAPACITY,
            rules: DEFAULT_SAVED_RULES,
        }
    }
}

/// What each pinned map must look like: (name, type, key size, value size, capacity).
fn expected_maps(capacities: Capacities) -> [(&'static str, MapType, usize, usize, u32); 14] {
    use std::mem::size_of;
    [
        (
            map_names::ALLOW,
            MapType::Hash,
            size_of::<AllowKey>(),
            size_of::<AllowValue>(),
            capacities.allow,
        ),
        (
            map_names::FLOWS,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<FlowState>(),
            capacities.flows,
        ),
        (
            map_names::NEW_FLOWS,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<FlowState>(),
            capacities.new_flows(),
        ),
        (
            map_names::RULE_STATS,
            MapType::PerCpuArray,
            4,
            size_of::<RuleStats>(),
            capacities.rule_slots(),
        ),
        (
            map_names::COUNTERS,
            MapType::PerCpuArray,
            4,
            size_of::<u64>(),
            counters::COUNT,
        ),
        (map_names::CONFIG, MapType::Array, 4, size_of::<Config>(), 1),
        (
            map_names::BRIDGE_DROPS,
            MapType::PerCpuHash,
            size_of::<BridgeDropKey>(),
            size_of::<u64>(),
            BRIDGE_DROPS_CAPACITY,
        ),
        (
            map_names::HOST_PORTS,
            MapType::Hash,
            size_of::<AllowKey>(),
            size_of::<AllowValue>(),
            HOST_PORTS_CAPACITY,
        ),
        (
            map_names::PORT_ADDRS,
            MapType::Hash,
            size_of::<PortAddrKey>(),
            size_of::<u8>(),
            PORT_ADDRS_CAPACITY,
        ),
        // LPM trie keys: a 32-bit prefix length, then the data.
        (
            map_names::SOURCES,
            MapType::LpmTrie,
            4 + size_of::<SourceKey>(),
            size_of::<SourceValue>(),
            SOURCES_CAPACITY,
        ),
        (
            map_names::BLOCKED,
            MapType::LpmTrie,
            4 + size_of::<BlockKey>(),
            size_of::<u8>(),
            BLOCKED_CAPACITY,
        ),
        (
            map_names::LOCAL_ADDRS,
            MapType::Hash,
            size_of::<gate_common::Addr>(),
            size_of::<u8>(),
            LOCAL_ADDRS_CAPACITY,
        ),
        (
            map_names::RELAY_COMMS,
            MapType::Hash,
            gate_common::COMM_LEN,
            size_of::<u8>(),
            gate_common::RELAY_COMMS_CAPACITY,
        ),
        (
            map_names::RELAY_PORTS,
            MapType::Hash,
            size_of::<gate_common::RelayPort>(),
            size_of::<u8>(),
            gate_common::RELAY_PORTS_CAPACITY,
        ),
    ]
}

/// What a sync of the allow map left out because the map was full.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowSync {
    /// Entries that did not fit, by the rule they belong to.
    pub not_fitted: BTreeMap<u32, usize>,
}

impl AllowSync {
    /// Entries that did not fit, over all rules.
    pub fn not_fitted_entries(&self) -> usize {
        self.not_fitted.values().sum()
    }

    fn left_out(&mut self, rule_id: u32) {
        *self.not_fitted.entry(rule_id).or_default() += 1;
    }
}

/// A hash map refuses a new key with E2BIG when it holds `max_entries` already.
fn is_map_full(err: &MapError) -> bool {
    matches!(err, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG))
}

/// The loaded programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    pins: Pins,
    bridges: Vec<Bridge>,
    /// Bridge ports with `from_containers` attached, by ifindex.
    ports: BTreeMap<u32, String>,
    /// Uplinks with `from_uplinks` attached, by ifindex.
    uplinks: BTreeMap<u32, String>,
    /// Macvlan parents with `toward_macvlan` and `from_macvlan` attached, by ifindex.
    macvlan_parents: BTreeMap<u32, String>,
    local_addrs_written: Option<BTreeMap<gate_common::Addr, u8>>,
    capacities: Capacities,
    /// The allow map's content as last written, so a sync costs only its differences.
    allow_written: Option<BTreeMap<AllowKey, AllowValue>>,
    host_ports_written: Option<BTreeMap<AllowKey, AllowValue>>,
    port_addrs_written: Option<BTreeMap<PortAddrKey, u8>>,
    /// The access lists in the trie, by id.
    access_written: Option<BTreeMap<u32, crate::policy::AccessList>>,
    /// The block list in force.
    blocks_written: Option<BTreeSet<crate::policy::Prefix>>,
    /// Connections ended (marked cut) since this agent started.
    flows_cut: u64,
    /// The config map's content.
    config: Config,
    /// Every link this agent attached or took over, by pin path, held open: a removed pin
    /// detaches nothing while the agent runs (see [`Datapath::repin`]).
    links: BTreeMap<PathBuf, OwnedFd>,
    /// The sockets `host_ports` sends refused connections to, so that they get no answer.
    black_holes: Vec<OwnedFd>,
    /// Recorded relay ports no socket held at the last sync (see [`Datapath::sync_relay_ports`]).
    relay_ports_unheld: BTreeSet<gate_common::RelayPort>,
}

impl Datapath {
    /// Loads the programs with the default capacities; see [`Datapath::load_with`].
    pub fn load(bpffs_dir: &Path, config: GateConfig) -> Result<Self> {
        Self::load_with(bpffs_dir, config, Capacities::default())
    }

    /// Loads the programs, reusing the maps pinned under `bpffs_dir` when they fit, and
    /// applies `config`. Nothing is attached yet: see [`Datapath::attach`].
    pub fn load_with(bpffs_dir: &Path, config: GateConfig, capacities: Capacities) -> Result<Self> {
        let release = sys::kernel_release();
        if !has_tcx(&release) {
            return Err(DatapathError::NoTcx { release });
        }
        ensure_bpffs(bpffs_dir)?;
        let pins = Pins::new(bpffs_dir);
        for dir in [pins.maps(), pins.programs(), pins.links()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        check_pinned_maps(&pins, capacities)?;

        let map_paths: Vec<(&str, PathBuf)> = map_names::PINNED
            .iter()
            .map(|name| (*name, pins.map(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(map_names::ALLOW, capacities.allow)
            .map_max_entries(map_names::FLOWS, capacities.flows)
            .map_max_entries(map_names::NEW_FLOWS, capacities.new_flows())
            .map_max_entries(map_names::RULE_STATS, capacities.rule_slots());
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in [
            program_names::TOWARD_CONTAINERS,
            program_names::FROM_CONTAINERS,
            program_names::FROM_UPLINKS,
            program_names::TOWARD_MACVLAN,
            program_names::FROM_MACVLAN,
        ] {
            let program = classifier(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let name = program_names::HOST_PORTS;
        sk_lookup(&mut ebpf, name)?
            .load()
            .map_err(|source| DatapathError::Program { name, source })?;
        Self::load_relay_hooks(&mut ebpf)?;
        for name in PROGRAMS {
            // Replace the previous agent's program pin, for inspection with bpftool.
            let pin = pins.programs().join(name);
            remove_if_present(&pin)?;
            let program = ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?;
            program.pin(&pin).map_err(|source| DatapathError::Pin {
                path: pin.clone(),
                source,
            })?;
        }
        let mut datapath = Self {
            ebpf,
            pins,
            bridges: Vec::new(),
            ports: BTreeMap::new(),
            uplinks: BTreeMap::new(),
            macvlan_parents: BTreeMap::new(),
            local_addrs_written: None,
            capacities,
            allow_written: None,
            host_ports_written: None,
            port_addrs_written: None,
            access_written: None,
            blocks_written: None,
            flows_cut: 0,
            config: Config::default(),
            links: BTreeMap::new(),
            black_holes: Vec::new(),
            relay_ports_unheld: BTreeSet::new(),
        };
        // Keep the block list the previous agent left in force.
        datapath.config = Config {
            netns_cookie: sys::netns_cookie().map_err(io_err(Path::new("/proc/self/ns/net")))?,
            ..datapath.read_config()?
        };
        datapath.set_config(config)?;
        Ok(datapath)
    }

    /// Takes the aya-log ring buffer out of the object, for the agent to drain.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
            .map_err(|err| warn!("no eBPF log buffer: {err}"))
            .ok()
    }

    /// Attaches `toward_containers` to `bridge`'s egress, first in its TCX chain.
    pub fn attach(&mut self, bridge: &str) -> Result<()> {
        let ifindex = sys::ifindex(bridge).ok_or_else(|| DatapathError::NoSuchBridge {
            bridge: bridge.to_owned(),
        })?;
        self.attach_tc(
            program_names::TOWARD_CONTAINERS,
            bridge,
            TcAttachType::Egress,
            &egress_link(bridge),
        )?;
        info!(bridge, ifindex, "gate attached");
        self.bridges.retain(|b| b.name != bridge);
        self.bridges.push(Bridge {
            name: bridge.to_owned(),
            ifindex,
        });
        Ok(())
    }

    /// Attaches `from_containers` to the ingress of bridge port `port` (a container's veth).
    pub fn attach_port(&mut self, port: &str, ifindex: u32) -> Result<()> {
        self.attach_tc(
            program_names::FROM_CONTAINERS,
            port,
            TcAttachType::Ingress,
            &port_link(port),
        )?;
        self.ports.insert(ifindex, port.to_owned());
        Ok(())
    }

    /// Forgets ports that are gone (their links went with the device) and removes their pins.
    pub fn forget_ports(&mut self, gone: &BTreeSet<u32>) -> Result<()> {
        for ifindex in gone {
            if let Some(port) = self.ports.remove(ifindex) {
                let pin = self.pins.link(&port_link(&port));
                self.links.remove(&pin);
                remove_if_present(&pin)?;
            }
        }
        Ok(())
    }

    /// Ports with `from_containers` attached, by ifindex.
    pub fn ports(&self) -> &BTreeMap<u32, String> {
        &self.ports
    }

    /// Attaches `from_uplinks` to the ingress of `iface`, first in its TCX chain.
    pub fn attach_uplink(&mut self, iface: &str, ifindex: u32) -> Result<()> {
        self.attach_tc(
            program_names::FROM_UPLINKS,
            iface,
            TcAttachType::Ingress,
            &uplink_link(iface),
        )?;
        info!(uplink = iface, ifindex, "early drop attached");
        self.uplinks.insert(ifindex, iface.to_owned());
        Ok(())
    }

    /// Forgets uplinks that are gone or no longer wanted: detaches them, removes their pins.
    pub fn forget_uplinks(&mut self, gone: &BTreeSet<u32>) -> Result<()> {
        for ifindex in gone {
            if let Some(iface) = self.uplinks.remove(ifindex) {
                let pin = self.pins.link(&uplink_link(&iface));
                self.links.remove(&pin);
                if pin.exists() {
                    sys::detach_pinned_link(&pin).map_err(io_err(&pin))?;
                }
                remove_if_present(&pin)?;
            }
        }
        Ok(())
    }

    /// Uplinks with `from_uplinks` attached, by ifindex.
    pub fn uplinks(&self) -> &BTreeMap<u32, String> {
        &self.uplinks
    }

    /// Makes the host's addresses in the kernel equal to `addresses`.
    pub fn sync_local_addrs(&mut self, addresses: &BTreeSet<gate_common::Addr>) -> Result<()> {
        let desired: BTreeMap<gate_common::Addr, u8> = addresses.iter().map(|a| (*a, 1)).collect();
        let mut written = self.local_addrs_written.take();
        let map = self.map_mut(map_names::LOCAL_ADDRS)?;
        sync_hash(map_names::LOCAL_ADDRS, map, &mut written, &desired)?;
        self.local_addrs_written = written;
        Ok(())
    }

    /// Attaches `host_ports` to the agent's network namespace (the host's).
    pub fn attach_host_ports(&mut self) -> Result<()> {
        let name = program_names::HOST_PORTS;
        let pin = self.pins.link(HOST_PORTS_LINK);
        let program = sk_lookup(&mut self.ebpf, name)?;
        let program_fd = owned_fd(name, program.fd(), &pin)?;
        let link = take_over_or_create(&pin, program_fd.as_fd(), || {
            let attach_err = |source| DatapathError::Attach {
                target: "the host network namespace".to_owned(),
                source,
            };
            let netns = fs::File::open("/proc/self/ns/net")
                .map_err(io_err(Path::new("/proc/self/ns/net")))?;
            let id = program.attach(netns).map_err(attach_err)?;
            Ok(program.take_link(id).map_err(attach_err)?.into())
        })?;
        self.links.insert(pin, link);
        Ok(())
    }

    /// Opens the black-hole sockets (TCP at index 0, UDP at 1) and hands them to
    /// `host_ports`, so that connections it refuses time out instead of being refused.
    pub fn open_black_holes(&mut self) -> Result<()> {
        let name = map_names::BLACK_HOLE;
        let path = Path::new("black-hole socket");
        let mut sockets = Vec::new();
        for (index, stream) in [(0u32, true), (1, false)] {
            let socket = sys::black_hole_socket(stream).map_err(io_err(path))?;
            let mut map: aya::maps::SockMap<_> =
                aya::maps::SockMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
            map.set(index, &socket, 0).map_err(map_err(name))?;
            sockets.push(socket);
        }
        self.black_holes = sockets;
        Ok(())
    }

    fn attach_tc(
        &mut self,
        name: &'static str,
        interface: &str,
        attach_type: TcAttachType,
        link_name: &str,
    ) -> Result<()> {
        let pin = self.pins.link(link_name);
        let program = classifier(&mut self.ebpf, name)?;
        let program_fd = owned_fd(name, program.fd(), &pin)?;
        let link = take_over_or_create(&pin, program_fd.as_fd(), || {
            let attach_err = |source| DatapathError::Attach {
                target: interface.to_owned(),
                source,
            };
            let id = program
                .attach_with_options(
                    interface,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(attach_err)?;
            program
                .take_link(id)
                .map_err(attach_err)?
                .try_into()
                .map_err(|source| DatapathError::Link {
                    path: pin.clone(),
                    source,
                })
        })?;
        self.links.insert(pin, link);
        Ok(())
    }

    /// Pins again every held link whose pin someone removed; returns the paths re-pinned.
    pub fn repin(&self) -> Vec<PathBuf> {
        let mut repinned = Vec::new();
        for (path, link) in &self.links {
            if path.exists() {
                continue;
            }
            match sys::obj_pin(link.as_fd(), path) {
                Ok(()) => repinned.push(path.clone()),
                Err(err) => warn!(path = %path.display(), "cannot pin the link again: {err}"),
            }
        }
        repinned
    }

    pub fn capacities(&self) -> Capacities {
        self.capacities
    }

    pub fn bridges(&self) -> &[Bridge] {
        &self.bridges
    }

    /// Whether the gate is still attached to `bridge`: the same device is there (not deleted,
    /// or deleted and re-created), and the agent holds its link.
    pub fn is_attached(&self, bridge: &Bridge) -> bool {
        sys::ifindex(&bridge.name) == Some(bridge.ifindex)
            && self
                .links
                .contains_key(&self.pins.link(&egress_link(&bridge.name)))
    }

    pub fn set_config(&mut self, config: GateConfig) -> Result<()> {
        self.write_config(Config {
            flags: config.flags(),
            ..self.config
        })
    }

    fn read_config(&self) -> Result<Config> {
        let name = map_names::CONFIG;
        let map: Array<_, Config> = Array::try_from(self.map(name)?).map_err(map_err(name))?;
        map.get(&0, 0).map_err(map_err(name))
    }

    /// The allow map's entry for `key`.
    pub fn allow_value(&self, key: &AllowKey) -> Result<Option<AllowValue>> {
        if let Some(written) = &self.allow_written {
            return Ok(written.get(key).copied());
        }
        let name = map_names::ALLOW;
        let map: HashMap<_, AllowKey, AllowValue> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        match map.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(err) => Err(map_err(name)(err)),
        }
    }

    /// Makes the allow map equal to `desired`, as far as it holds: stale entries are removed
    /// first (except those `keep_stale` holds on to), so a deny never waits for room and
    /// frees room for what follows; then new and changed entries are written, those of the
    /// lowest rule ids first (saved rules before the ones containers bring). A changed entry
    /// is updated in place, so a port that stays allowed is never missing. New entries that
    /// find the map full are left out and reported, never an error. Only the differences
    /// reach the kernel: the map's content is read once, then followed in memory (the agent
    /// is its only writer).
    pub fn sync_allow(
        &mut self,
        desired: &BTreeMap<AllowKey, AllowValue>,
        keep_stale: impl Fn(&AllowValue) -> bool,
    ) -> Result<AllowSync> {
        let name = map_names::ALLOW;
        let mut current = match self.allow_written.take() {
            Some(current) => current,
            None => {
                let map: HashMap<_, AllowKey, AllowValue> =
                    HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
                map.iter()
                    .collect::<Result<_, _>>()
                    .map_err(map_err(name))?
            }
        };
        // On any failure the in-memory copy is dropped, and the next sync reads the map again.
        let mut map: HashMap<_, AllowKey, AllowValue> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let stale: Vec<AllowKey> = current
            .iter()
            .filter(|(key, value)| !desired.contains_key(key) && !keep_stale(value))
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            map.remove(&key).map_err(map_err(name))?;
            current.remove(&key);
        }
        let mut pending: Vec<(&AllowKey, &AllowValue)> = desired
            .iter()
            .filter(|(key, value)| current.get(key) != Some(value))
            .collect();
        pending.sort_by_key(|(key, value)| (value.rule_id, **key));
        let mut report = AllowSync::default();
        let mut full = false;
        for (key, value) in pending {
            // Once the map is full, new keys cannot fit (nothing is removed after this point);
            // updates of present keys still can.
            let new_key = !current.contains_key(key);
            if full && new_key {
                report.left_out(value.rule_id);
                continue;
            }
            match map.insert(key, value, 0) {
                Ok(()) => {
                    current.insert(*key, *value);
                }
                Err(err) if new_key && is_map_full(&err) => {
                    full = true;
                    report.left_out(value.rule_id);
                }
                Err(err) => return Err(map_err(name)(err)),
            }
        }
        self.allow_written = Some(current);
        Ok(report)
    }

    /// Writes entries for keys not in the allow map, without a sync of the rest. False (and
    /// nothing written) where that is not known to suffice: the map's content is not known
    /// yet, a key is present, or the entries would not all fit.
    pub fn add_allow(&mut self, entries: &[(AllowKey, AllowValue)]) -> Result<bool> {
        let name = map_names::ALLOW;
        let fits = self.allow_written.as_ref().is_some_and(|written| {
            written.len() + entries.len() <= self.capacities.allow as usize
                && !entries.iter().any(|(key, _)| written.contains_key(key))
        });
        if !fits {
            return Ok(false);
        }
        // Unknown content if a write fails: the next sync reads the map again.
        let mut written = self.allow_written.take().unwrap_or_default();
        let mut map: HashMap<_, AllowKey, AllowValue> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (key, value) in entries {
            map.insert(key, value, 0).map_err(map_err(name))?;
            written.insert(*key, *value);
        }
        self.allow_written = Some(written);
        Ok(true)
    }

    /// The allow map's content as last written, if known.
    pub fn allow_written(&self) -> Option<&BTreeMap<AllowKey, AllowValue>> {
        self.allow_written.as_ref()
    }

    pub fn allow_entries(&self) -> Result<usize> {
        self.count_entries(
            map_names::ALLOW,
            size_of::<AllowKey>(),
            size_of::<AllowValue>(),
        )
    }

    /// Entries of the pinned hash map `name`, counted in batches: a status or a scrape costs
    /// a few dozen system calls even with the flow table full, not one per entry.
    fn count_entries(
        &self,
        name: &'static str,
        key_size: usize,
        value_size: usize,
    ) -> Result<usize> {
        let path = self.pins.map(name);
        let fd = sys::obj_get(&path).map_err(io_err(&path))?;
        sys::count_entries(fd.as_fd(), key_size, value_size).map_err(io_err(&path))
    }

    /// Zeroes the counters of rule slots about to be (re)used.
    pub fn reset_rule_stats(&mut self, rule_ids: &BTreeSet<u32>) -> Result<()> {
        let name = map_names::RULE_STATS;
        let cpus = possible_cpus()?;
        let mut map: PerCpuArray<_, RuleStats> =
            PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for id in rule_ids {
            let zeros = PerCpuValues::try_from(vec![RuleStats::default(); cpus])
                .map_err(|e| map_err(name)(MapError::from(e)))?;
            map.set(*id, zeros, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Packets and bytes of each of `rule_ids`, summed over CPUs, read in batches
    /// (BPF_MAP_LOOKUP_BATCH) of the slots around them: `list`, `status` and a scrape cost a
    /// few system calls per few thousand rules, not one per rule. Ids beyond the slots count
    /// nothing.
    pub fn rule_stats_of(
        &self,
        rule_ids: impl IntoIterator<Item = u32>,
    ) -> Result<BTreeMap<u32, RuleStats>> {
        const CHUNK: u32 = 4_096;
        let name = map_names::RULE_STATS;
        let path = self.pins.map(name);
        let slots = self.capacities.rule_slots();
        let cpus = possible_cpus()?;
        // The kernel copies each CPU's value rounded up to 8 bytes.
        let per_cpu = size_of::<RuleStats>().div_ceil(8) * 8;
        let ids: BTreeSet<u32> = rule_ids.into_iter().filter(|id| *id < slots).collect();
        let mut stats = BTreeMap::new();
        let mut fd = None;
        let mut covered_to = 0u32;
        for id in &ids {
            if *id < covered_to {
                continue;
            }
            let fd = match &fd {
                Some(fd) => fd,
                None => fd.insert(sys::obj_get(&path).map_err(io_err(&path))?),
            };
            let count = CHUNK.min(slots - id);
            let (keys, values) = sys::lookup_array_batch(fd.as_fd(), *id, count, per_cpu * cpus)
                .map_err(io_err(&path))?;
            covered_to = id + count;
            for (key, value) in keys.iter().zip(values.chunks_exact(per_cpu * cpus)) {
                if !ids.contains(key) {
                    continue;
                }
                let mut sum = RuleStats::default();
                for cpu in value.chunks_exact(per_cpu) {
                    // SAFETY: RuleStats is plain old data valid for any bits; `cpu` holds at
                    // least its size; unaligned read.
                    let one: RuleStats =
                        unsafe { std::ptr::read_unaligned(cpu.as_ptr().cast::<RuleStats>()) };
                    sum.packets += one.packets;
                    sum.bytes += one.bytes;
                }
                stats.insert(*key, sum);
            }
        }
        Ok(stats)
    }

    /// Packets and bytes of one rule, summed over CPUs.
    pub fn rule_stats(&self, rule_id: u32) -> Result<RuleStats> {
        let name = map_names::RULE_STATS;
        let map: PerCpuArray<_, RuleStats> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        let values = map.get(&rule_id, 0).map_err(map_err(name))?;
        Ok(values
            .iter()
            .fold(RuleStats::default(), |sum, v| RuleStats {
                packets: sum.packets + v.packets,
                bytes: sum.bytes + v.bytes,
            }))
    }

    /// The global counters, summed over CPUs, by index of `gate_common::counters`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        let name = map_names::COUNTERS;
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        (0..counters::COUNT)
            .map(|i| Ok(map.get(&i, 0).map_err(map_err(name))?.iter().sum()))
            .collect()
    }

    /// Drops per (bridge ifindex, reason counter), summed over CPUs.
    pub fn bridge_drops(&self) -> Result<BTreeMap<BridgeDropKey, u64>> {
        let name = map_names::BRIDGE_DROPS;
        let map: PerCpuHashMap<_, BridgeDropKey, u64> =
            PerCpuHashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        map.iter()
            .map(|item| item.map(|(key, values)| (key, values.iter().sum())))
            .collect::<Result<_, _>>()
            .map_err(map_err(name))
    }

    /// Takes the drop-event ring buffer out of the object, for the agent to read.
    pub fn take_drop_events(&mut self) -> Result<RingBuf<MapData>> {
        let name = map_names::DROP_EVENTS;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::Missing(name))?;
        RingBuf::try_from(map).map_err(map_err(name))
    }

    /// Copies the connections that the other layouts' pinned flow tables under `bpffs_dir`
    /// track (an older agent's, still attached) into this layout's tables: replied ones into
    /// `FLOWS`, the others into `NEW_FLOWS`, never replacing a flow this layout tracks
    /// already. Called before this layout's programs are attached, and again just before the
    /// older ones are detached (for the connections opened in between), so that connections
    /// established through the older gate continue through this one. A table whose type, key
    /// or value differs from this layout's is left alone (its connections end). Returns the
    /// flows copied.
    pub fn adopt_flows(&mut self, bpffs_dir: &Path) -> Result<usize> {
        use std::mem::size_of;
        let mut found: Vec<(FlowKey, FlowState)> = Vec::new();
        for version in layout_dirs(bpffs_dir)? {
            if version.file_name().and_then(|n| n.to_str()) == Some(LAYOUT_VERSION) {
                continue;
            }
            for name in [map_names::FLOWS, map_names::NEW_FLOWS] {
                let path = version.join("maps").join(name);
                if !path.exists() {
                    continue;
                }
                let fits = MapInfo::from_pin(&path).is_ok_and(|info| {
                    info.map_type().is_ok_and(|t| t == MapType::LruHash)
                        && info.key_size() as usize == size_of::<FlowKey>()
                        && info.value_size() as usize == size_of::<FlowState>()
                });
                if !fits {
                    warn!(
                        table = %path.display(),
                        "an older layout's flow table of another shape: its connections end"
                    );
                    continue;
                }
                let data = MapData::from_pin(&path).map_err(map_err(name))?;
                let table: HashMap<MapData, FlowKey, FlowState> =
                    HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err(name))?;
                // A flow the older programs evict while this runs is just not copied.
                found.extend(table.iter().filter_map(|entry| entry.ok()));
            }
        }
        let mut adopted = 0;
        for (key, state) in found {
            let name = if state.flags & gate_common::FLOW_REPLIED != 0 {
                map_names::FLOWS
            } else {
                map_names::NEW_FLOWS
            };
            let mut table: HashMap<_, FlowKey, FlowState> =
                HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
            match table.insert(key, state, BPF_NOEXIST) {
                Ok(()) => adopted += 1,
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(err) => return Err(map_err(name)(err)),
            }
        }
        Ok(adopted)
    }

    /// Connections this agent ended (a block, `deny --cut`, a rule's `--for` end).
    pub fn flows_cut(&self) -> u64 {
        self.flows_cut
    }

    /// Entries in the connection-tracking tables, replied and unreplied (including idle ones
    /// not yet evicted).
    pub fn tracked_flows(&self) -> Result<usize> {
        let mut count = 0;
        for name in [map_names::FLOWS, map_names::NEW_FLOWS] {
            count += self.count_entries(name, size_of::<FlowKey>(), size_of::<FlowState>())?;
        }
        Ok(count)
    }

    /// The loaded program `name`, e.g. for BPF_PROG_TEST_RUN.
    pub fn program_fd(&self, name: &'static str) -> Result<BorrowedFd<'_>> {
        let program = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::Missing(name))?;
        let fd = program
            .fd()
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok(fd.as_fd())
    }

    /// Makes the host-port map equal to `desired` (published host ports and the rule that
    /// admits each, or `NO_RULE`), new and changed entries first.
    pub fn sync_host_ports(&mut self, desired: &BTreeMap<AllowKey, AllowValue>) -> Result<()> {
        let mut written = self.host_ports_written.take();
        let map = self.map_mut(map_names::HOST_PORTS)?;
        sync_hash(map_names::HOST_PORTS, map, &mut written, desired)?;
        self.host_ports_written = written;
        Ok(())
    }

    /// Makes the port-address bindings equal to `desired`: new ones first, so a container
    /// keeps its addresses while its bindings change.
    pub fn sync_port_addrs(&mut self, desired: &BTreeSet<PortAddrKey>) -> Result<()> {
        let desired: BTreeMap<PortAddrKey, u8> = desired.iter().map(|k| (*k, 1)).collect();
        let mut written = self.port_addrs_written.take();
        let map = self.map_mut(map_names::PORT_ADDRS)?;
        sync_hash(map_names::PORT_ADDRS, map, &mut written, &desired)?;
        self.port_addrs_written = written;
        Ok(())
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or(DatapathError::Missing(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or(DatapathError::Missing(name))
    }
}

/// Makes the hash map `map` equal to `desired`, writing only differences against `written`
/// (its content as last written; read from the kernel when unknown). On failure `written` is
/// left empty, so the next sync reads the map again.
fn sync_hash<K, V>(
    name: &'static str,
    map: &mut aya::maps::Map,
    written: &mut Option<BTreeMap<K, V>>,
    desired: &BTreeMap<K, V>,
) -> Result<()>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let mut map: HashMap<_, K, V> = HashMap::try_from(map).map_err(map_err(name))?;
    let mut current = match written.take() {
        Some(current) => current,
        None => map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(name))?,
    };
    for (key, value) in desired {
        if current.get(key) != Some(value) {
            map.insert(key, value, 0).map_err(map_err(name))?;
            current.insert(*key, *value);
        }
    }
    let stale: Vec<K> = current
        .keys()
        .filter(|key| !desired.contains_key(key))
        .copied()
        .collect();
    for key in stale {
        map.remove(&key).map_err(map_err(name))?;
        current.remove(&key);
    }
    *written = Some(current);
    Ok(())
}

/// Decodes one drop event from the ring buffer.
pub fn decode_drop_event(bytes: &[u8]) -> Option<DropEvent> {
    (bytes.len() >= std::mem::size_of::<DropEvent>())
        // SAFETY: long enough, DropEvent is plain old data valid for any bits; unaligned read.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
}

/// Opens the link pinned at `pin` and swaps its program for `program` in one step (the hook
/// never runs without a gate: an earlier agent's link, taken over on restart or upgrade);
/// where there is none, or it is defunct (its interface was deleted), `create` attaches a new
/// link, which is pinned. Either way the link is returned open, for the agent to hold.
fn take_over_or_create(
    pin: &Path,
    program: BorrowedFd<'_>,
    create: impl FnOnce() -> Result<FdLink>,
) -> Result<OwnedFd> {
    if let Some(link) = take_over(pin, program)? {
        return Ok(link);
    }
    create()?.pin(pin).map_err(|source| DatapathError::Pin {
        path: pin.to_owned(),
        source,
    })?;
    sys::obj_get(pin).map_err(|source| DatapathError::LinkIo {
        path: pin.to_owned(),
        source,
    })
}

/// The link pinned at `pin`, now running `program`; `None` when there is none or it is
/// defunct (its pin is then removed).
fn take_over(pin: &Path, program: BorrowedFd<'_>) -> Result<Option<OwnedFd>> {
    match sys::obj_get(pin) {
        Ok(link) => match sys::update_link(link.as_fd(), program) {
            Ok(()) => Ok(Some(link)),
            Err(err) => {
                warn!(pin = %pin.display(), "cannot reuse pinned link ({err}); attaching anew");
                remove_if_present(pin)?;
                Ok(None)
            }
        },
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DatapathError::LinkIo {
            path: pin.to_owned(),
            source,
        }),
    }
}

/// A descriptor of its own for program `name`'s fd, kept while the program is borrowed to
/// attach it.
fn owned_fd(
    name: &'static str,
    fd: std::result::Result<&aya::programs::ProgramFd, ProgramError>,
    pin: &Path,
) -> Result<OwnedFd> {
    fd.map_err(|source| DatapathError::Program { name, source })?
        .as_fd()
        .try_clone_to_owned()
        .map_err(io_err(pin))
}

fn sk_lookup<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SkLookup> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn possible_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Io {
        path: PathBuf::from("/sys/devices/system/cpu/possible"),
        source,
    })
}

/// Refuses pinned maps whose type, key, value or capacity differ from this build's.
fn check_pinned_maps(pins: &Pins, capacities: Capacities) -> Result<()> {
    for (name, map_type, key_size, value_size, capacity) in expected_maps(capacities) {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let incompatible = |detail: String| DatapathError::IncompatibleMap {
            path: path.clone(),
            detail,
        };
        let info = MapInfo::from_pin(&path).map_err(|e| incompatible(e.to_string()))?;
        let found_type = info.map_type().map_err(|e| incompatible(e.to_string()))?;
        let found = (
            found_type,
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        let wanted = (map_type, key_size, value_size, capacity);
        if found != wanted {
            return Err(incompatible(format!(
                "found type/key/value/capacity {found:?}, expected {wanted:?}"
            )));
        }
    }
    Ok(())
}

/// Whether a kernel of this release (`uname -r`) has TCX links: Linux 6.6 and later. A
/// release that does not parse is given the benefit of the doubt (attaching says the rest).
fn has_tcx(release: &str) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (6, 6),
        _ => true,
    }
}

/// Makes sure `dir` will be on a bpf filesystem, mounting /sys/fs/bpf if it is the one missing.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let sys_fs_bpf = Path::new("/sys/fs/bpf");
    if dir.starts_with(sys_fs_bpf) && sys::fs_type(sys_fs_bpf) != Some(BPF_FS_MAGIC) {
        info!("mounting bpffs on /sys/fs/bpf");
        sys::mount_bpffs(sys_fs_bpf).map_err(DatapathError::Mount)?;
    }
    // The nearest existing ancestor tells which filesystem the pins will land on.
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if sys::fs_type(existing) != Some(BPF_FS_MAGIC) {
        return Err(DatapathError::NotBpffs {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

/// Creates the pin directory if missing (root-only, on a bpf filesystem: /sys/fs/bpf is
/// mounted if it is the one missing) and locks it for this process: one agent per pin
/// directory. The lock lasts as long as the returned value. Then makes sure this layout's
/// directories are there, root-only (0700) also when an older agent created them.
pub fn lock_pin_dir(bpffs_dir: &Path) -> Result<crate::lock::Lock> {
    ensure_bpffs(bpffs_dir)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(bpffs_dir)
        .map_err(io_err(bpffs_dir))?;
    let lock = crate::lock::lock_dir(bpffs_dir, "pin directory")?;
    let pins = Pins::new(bpffs_dir);
    for dir in [
        pins.root.clone(),
        pins.maps(),
        pins.programs(),
        pins.links(),
    ] {
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(err) if err.kind() != io::ErrorKind::AlreadyExists => {
                return Err(io_err(&dir)(err));
            }
            _ => {}
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
    }
    Ok(lock)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(io_err(path)(err)),
        _ => Ok(()),
    }
}

/// Detaches and removes the pins of every other layout version under `bpffs_dir`: an older
/// agent's programs, which the new ones (attached first) replace. Their tracked flows go with
/// them, unless [`Datapath::adopt_flows`] copied them first. Other tools' pins stay, as with
/// `uninstall`.
pub fn retire_other_layouts(bpffs_dir: &Path) -> Result<()> {
    let mut done = Uninstalled::default();
    for version in layout_dirs(bpffs_dir)? {
        if version.file_name().and_then(|n| n.to_str()) != Some(LAYOUT_VERSION) {
            uninstall_layout(&version, &mut done)?;
            info!(layout = %version.display(), "detached the previous layout's programs");
        }
    }
    Ok(())
}

/// What `uninstall` removed, and what it left.
#[derive(Debug, Default)]
pub struct Uninstalled {
    pub links: usize,
    pub pins: usize,
    /// The bridges the gate was attached to.
    pub bridges: BTreeSet<String>,
    /// Entries under the pin directory that are not portgate's, left in place.
    pub foreign: Vec<PathBuf>,
}

/// Whether a link pin's file name is one of portgate's (`<bridge>-egress`, v1's
/// `<bridge>-ingress`, `<port>-port`, `host-ports`), and the bridge it names, if any.
fn link_pin_owner(name: &str) -> Option<Option<&str>> {
    let per_interface = ["-port", "-uplink", macvlan::IN_SUFFIX, macvlan::OUT_SUFFIX]
        .iter()
        .any(|suffix| name.strip_suffix(suffix).is_some_and(|p| !p.is_empty()));
    let relay_hook = relays::LINKS.iter().any(|(_, link, _)| *link == name);
    if name == HOST_PORTS_LINK || per_interface || relay_hook {
        return Some(None);
    }
    ["-egress", "-ingress"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix).filter(|b| !b.is_empty()))
        .map(Some)
}

/// Whether a directory name is one of portgate's layout versions (`v1`, `v2`, ...).
fn is_layout_version(name: &str) -> bool {
    name.strip_prefix('v')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Detaches the links portgate pinned under `bpffs_dir` and removes portgate's own pins: in
/// each layout-version directory (`v1`, ...) the link pins, the programs and the maps named as
/// portgate names them, then every directory that is left empty. Whatever else is there
/// (another tool's pins) stays, with the directories that hold it. The gate stops: traffic is
/// no longer filtered.
pub fn uninstall(bpffs_dir: &Path) -> Result<Uninstalled> {
    let mut done = Uninstalled::default();
    if !bpffs_dir.exists() {
        return Ok(done);
    }
    for version in layout_dirs(bpffs_dir)? {
        uninstall_layout(&version, &mut done)?;
    }
    remove_dir_if_empty(bpffs_dir)?;
    done.foreign = leftovers(bpffs_dir);
    Ok(done)
}

/// The layout-version directories (`v1`, `v2`, ...) under `bpffs_dir`.
fn layout_dirs(bpffs_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(bpffs_dir).map_err(io_err(bpffs_dir))? {
        let entry = entry.map_err(io_err(bpffs_dir))?;
        if entry.file_name().to_str().is_some_and(is_layout_version)
            && entry.file_type().map_err(io_err(bpffs_dir))?.is_dir()
        {
            dirs.push(entry.path());
        }
    }
    Ok(dirs)
}

/// Detaches the links of one layout directory and removes its pins that portgate names, then
/// its directories that are left empty.
fn uninstall_layout(root: &Path, done: &mut Uninstalled) -> Result<()> {
    let pins = Pins {
        root: root.to_owned(),
    };
    let links = pins.links();
    for entry in fs::read_dir(&links).into_iter().flatten() {
        let path = entry.map_err(io_err(&links))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let Some(bridge) = link_pin_owner(name) else {
            continue;
        };
        // Detach explicitly: another process may still hold the link open.
        match sys::detach_pinned_link(&path) {
            Ok(()) => {}
            // Named like a link pin of ours, but not a link: not ours.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(err) => return Err(io_err(&path)(err)),
        }
        done.links += 1;
        done.bridges.extend(bridge.map(str::to_owned));
        done.pins += remove_pin(&path)?;
    }
    for name in PROGRAMS {
        done.pins += remove_pin(&pins.programs().join(name))?;
    }
    let maps = map_names::PINNED
        .iter()
        .chain(&[map_names::DROP_EVENTS, map_names::EVENT_BUDGET]);
    for name in maps {
        done.pins += remove_pin(&pins.map(name))?;
    }
    for dir in [links, pins.programs(), pins.maps(), pins.root.clone()] {
        remove_dir_if_empty(&dir)?;
    }
    Ok(())
}

/// Removes a pin; 1 if it was there, 0 if not.
fn remove_pin(path: &Path) -> Result<usize> {
    match fs::remove_file(path) {
        Ok(()) => Ok(1),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(err) => Err(io_err(path)(err)),
    }
}

/// Removes a directory unless something is left in it (or it is gone already).
fn remove_dir_if_empty(dir: &Path) -> Result<()> {
    match fs::remove_dir(dir) {
        Err(err)
            if !matches!(
                err.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
            ) =>
        {
            Err(io_err(dir)(err))
        }
        _ => Ok(()),
    }
}

/// Files and empty directories left under `dir`, deepest paths included.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let inner = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            leftovers(&path)
        } else {
            Vec::new()
        };
        if inner.is_empty() {
            found.push(path);
        } else {
            found.extend(inner);
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_before_6_6_have_no_tcx() {
        for old in ["5.15.0-91-generic", "6.1.0-18-amd64", "6.5.13"] {
            assert!(!has_tcx(old), "{old}");
        }
        for new in ["6.6.0", "6.18.0-1-cloud-amd64", "7.0.1"] {
            assert!(has_tcx(new), "{new}");
        }
        let message = DatapathError::NoTcx {
            release: "6.1.0-18-amd64".to_owned(),
        }
        .to_string();
        assert!(
            !message.contains('\n')
                && message.contains("6.1.0-18-amd64")
                && message.contains("6.6"),
            "{message}"
        );
    }

    #[test]
    fn uninstall_knows_its_own_names() {
        assert_eq!(link_pin_owner("docker0-egress"), Some(Some("docker0")));
        assert_eq!(
            link_pin_owner("br-0123456789ab-ingress"),
            Some(Some("br-0123456789ab"))
        );
        assert_eq!(link_pin_owner("veth1a2b3c-port"), Some(None));
        assert_eq!(link_pin_owner("host-ports"), Some(None));
        for foreign in [
            "-egress",
            "egress",
            "docker0",
            "docker0-egress.bak",
            "x-ingres",
            "-port",
        ] {
            assert_eq!(link_pin_owner(foreign), None, "{foreign}");
        }
        assert!(is_layout_version(LAYOUT_VERSION) && is_layout_version("v12"));
        for foreign in ["v", "va", "maps", "v1x", "foreign"] {
            assert!(!is_layout_version(foreign), "{foreign}");
        }
    }
}
