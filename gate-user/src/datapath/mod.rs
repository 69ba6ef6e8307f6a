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

mod apply;
mod flows;
mod links;
mod macvlan;
mod pins;
mod relays;
mod sources;
mod stats;
mod sync;
pub mod sys;
mod uninstall;
mod upgrade;

pub use apply::{Applied, ApplyError, Desired};
pub use pins::{PinnedGate, Pins, lock_pin_dir};
pub use relays::{cgroup2_root, recorded_relay_ports};
pub use sources::Lookup;
pub use stats::decode_drop_event;
pub use sync::AllowSync;
pub use uninstall::{Uninstalled, uninstall};
pub use upgrade::retire_other_layouts;

use links::{owned_fd, take_over};
use pins::{
    HOST_PORTS_LINK, check_pinned_maps, egress_link, ensure_bpffs, layout_dirs, object, port_link,
    sized_maps, uplink_link,
};
use uninstall::uninstall_layout;

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
        LinkOrder, Program, ProgramError, SchedClassifier, SkLookup, TcAttachType,
        links::{FdLink, LinkError},
        tc::TcAttachOptions,
    },
};
use gate_common::{
    ALLOW_CAPACITY, AllowKey, AllowValue, BridgeDropKey, CONFIG_AUDIT, CONFIG_GATE_HOST, Config,
    DropEvent, FLOW_CAPACITY, FlowKey, FlowState, PortAddrKey, RuleStats, counters, map_names,
    program_names,
};
use tracing::{info, warn};

/// The eBPF object, built by build.rs with aya-build.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gate-ebpf"));

pub use gate_common::LAYOUT_VERSION;
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/portgate";
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
    #[error("reading the eBPF object: {0}")]
    Object(String),
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
    capacities: Capacities,
    /// What this agent last wrote into the maps it owns.
    written: sync::Written,
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
        for (name, capacity) in sized_maps(capacities) {
            loader.map_max_entries(name, capacity);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in &object()?.programs {
            let program = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing("program"))?;
            let loaded = match program {
                Program::SchedClassifier(p) => p.load(),
                Program::SkLookup(p) => p.load(),
                Program::CgroupSock(p) => p.load(),
                Program::CgroupSockopt(p) => p.load(),
                _ => Err(ProgramError::UnexpectedProgramType),
            };
            loaded.map_err(|source| DatapathError::Program { name, source })?;
            // Replace the previous agent's program pin, for inspection with bpftool.
            let pin = pins.programs().join(name);
            remove_if_present(&pin)?;
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
            capacities,
            written: sync::Written::default(),
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

    pub fn capacities(&self) -> Capacities {
        self.capacities
    }

    pub fn bridges(&self) -> &[Bridge] {
        &self.bridges
    }

    pub fn set_config(&mut self, config: GateConfig) -> Result<()> {
        self.write_config(Config {
            flags: config.flags(),
            ..self.config
        })
    }

    pub(super) fn read_config(&self) -> Result<Config> {
        let name = map_names::CONFIG;
        let map: Array<_, Config> = Array::try_from(self.map(name)?).map_err(map_err(name))?;
        map.get(&0, 0).map_err(map_err(name))
    }

    /// Connections this agent ended (a block, `deny --cut`, a rule's `--for` end).
    pub fn flows_cut(&self) -> u64 {
        self.flows_cut
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

    pub(super) fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or(DatapathError::Missing(name))
    }

    pub(super) fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or(DatapathError::Missing(name))
    }
}

/// Whether a kernel of this release (`uname -r`) has TCX links: Linux 6.6 and later. A
/// release that does not parse is given the benefit of the doubt (attaching says the rest).
pub fn has_tcx(release: &str) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (6, 6),
        _ => true,
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(io_err(path)(err)),
        _ => Ok(()),
    }
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
}
