//! The kernel side as the agent sees it: load the programs, reuse or create the pinned maps,
//! attach (or atomically replace) the programs on each bridge, and read and write the maps.
//!
//! Pin layout under the bpffs directory (default /sys/fs/bpf/portgate):
//!   v1/maps/{ALLOW,FLOWS,RULE_STATS,COUNTERS,CONFIG}
//!   v1/programs/{toward_containers,from_containers}
//!   v1/links/<bridge>-{egress,ingress}
//! The links keep the programs attached after the agent exits (fail closed). The directories
//! are root-only (0700); `uninstall` removes these names only, never other tools' pins.

pub mod sys;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::{
        fd::{AsFd as _, BorrowedFd},
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
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::TcAttachOptions,
    },
};
use gate_common::{
    ALLOW_CAPACITY, AllowKey, AllowValue, BRIDGE_DROPS_CAPACITY, BridgeDropKey, CONFIG_AUDIT,
    CONFIG_GATE_HOST, Config, DropEvent, FLOW_CAPACITY, FlowKey, FlowState, MAX_RULES, RuleStats,
    counters, map_names, program_names,
};
use tracing::{info, warn};

/// The eBPF object, built by build.rs with aya-build.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gate-ebpf"));

/// Bumped whenever a map's layout changes, so an old agent's pins are never misread.
pub const LAYOUT_VERSION: &str = "v1";
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/portgate";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{path} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf },
    #[error("cannot mount bpffs on /sys/fs/bpf: {0}")]
    Mount(io::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "pinned map {path} does not fit this portgate ({detail}); run `portgate uninstall` to remove the old gate first"
    )]
    IncompatibleMap { path: PathBuf, detail: String },
    #[error("loading the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("bridge {bridge}: {source}")]
    Attach {
        bridge: String,
        source: ProgramError,
    },
    #[error("bridge {bridge}: no such interface")]
    NoSuchBridge { bridge: String },
    #[error("link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("map {name}: {source}")]
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

    fn link(&self, bridge: &str, hook: Hook) -> PathBuf {
        self.links().join(format!("{bridge}-{}", hook.suffix()))
    }
}

#[derive(Clone, Copy, Debug)]
enum Hook {
    /// Bridge egress: toward the containers.
    Egress,
    /// Bridge ingress: from the containers.
    Ingress,
}

impl Hook {
    const ALL: [Hook; 2] = [Hook::Egress, Hook::Ingress];

    fn program(self) -> &'static str {
        match self {
            Hook::Egress => program_names::TOWARD_CONTAINERS,
            Hook::Ingress => program_names::FROM_CONTAINERS,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Egress => TcAttachType::Egress,
            Hook::Ingress => TcAttachType::Ingress,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Hook::Egress => "egress",
            Hook::Ingress => "ingress",
        }
    }
}

/// Sizes of the maps that grow with the host: set at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Allow-map entries: one per (address, protocol, port).
    pub allow: u32,
    /// Tracked connections (LRU).
    pub flows: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            allow: ALLOW_CAPACITY,
            flows: FLOW_CAPACITY,
        }
    }
}

/// What each pinned map must look like: (name, type, key size, value size, capacity).
fn expected_maps(capacities: Capacities) -> [(&'static str, MapType, usize, usize, u32); 6] {
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
            map_names::RULE_STATS,
            MapType::PerCpuArray,
            4,
            size_of::<RuleStats>(),
            MAX_RULES,
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
    capacities: Capacities,
    /// The allow map's content as last written, so a sync costs only its differences.
    allow_written: Option<BTreeMap<AllowKey, AllowValue>>,
}

impl Datapath {
    /// Loads the programs with the default capacities; see [`Datapath::load_with`].
    pub fn load(bpffs_dir: &Path, config: GateConfig) -> Result<Self> {
        Self::load_with(bpffs_dir, config, Capacities::default())
    }

    /// Loads the programs, reusing the maps pinned under `bpffs_dir` when they fit, and
    /// applies `config`. Nothing is attached yet: see [`Datapath::attach`].
    pub fn load_with(bpffs_dir: &Path, config: GateConfig, capacities: Capacities) -> Result<Self> {
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
            .map_max_entries(map_names::FLOWS, capacities.flows);
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for hook in Hook::ALL {
            let name = hook.program();
            let program = classifier(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
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
            capacities,
            allow_written: None,
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

    /// Attaches both programs to `bridge`, first in its TCX chains. A link pinned by an
    /// earlier agent is updated in place (one atomic program swap, no moment without a gate);
    /// otherwise a new link is created and pinned.
    pub fn attach(&mut self, bridge: &str) -> Result<()> {
        let ifindex = sys::ifindex(bridge).ok_or_else(|| DatapathError::NoSuchBridge {
            bridge: bridge.to_owned(),
        })?;
        for hook in Hook::ALL {
            let pin = self.pins.link(bridge, hook);
            let program = classifier(&mut self.ebpf, hook.program())?;
            let attach_err = |source| DatapathError::Attach {
                bridge: bridge.to_owned(),
                source,
            };
            let replaced = match PinnedLink::from_pin(&pin) {
                Ok(old) => match FdLink::from(old).try_into() {
                    Ok(link) => match program.attach_to_link(link) {
                        Ok(id) => Some(id),
                        Err(err) => {
                            // The bridge was deleted and re-created: the old link is defunct.
                            warn!(
                                bridge,
                                hook = hook.suffix(),
                                "cannot reuse pinned link ({err}); attaching anew"
                            );
                            None
                        }
                    },
                    Err(err) => {
                        warn!(
                            bridge,
                            "pinned link is not a TC link ({err}); attaching anew"
                        );
                        None
                    }
                },
                Err(LinkError::SyscallError(err))
                    if err.io_error.kind() == io::ErrorKind::NotFound =>
                {
                    None
                }
                Err(source) => return Err(DatapathError::Link { path: pin, source }),
            };
            let was_replaced = replaced.is_some();
            let id = match replaced {
                Some(id) => id,
                None => program
                    .attach_with_options(
                        bridge,
                        hook.attach_type(),
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .map_err(attach_err)?,
            };
            let link = program.take_link(id).map_err(attach_err)?;
            let link: FdLink = link.try_into().map_err(|source| DatapathError::Link {
                path: pin.clone(),
                source,
            })?;
            remove_if_present(&pin)?;
            link.pin(&pin).map_err(|source| DatapathError::Pin {
                path: pin.clone(),
                source,
            })?;
            info!(
                bridge,
                ifindex,
                hook = hook.suffix(),
                replaced = was_replaced,
                "gate attached"
            );
        }
        self.bridges.retain(|b| b.name != bridge);
        self.bridges.push(Bridge {
            name: bridge.to_owned(),
            ifindex,
        });
        Ok(())
    }

    pub fn capacities(&self) -> Capacities {
        self.capacities
    }

    pub fn bridges(&self) -> &[Bridge] {
        &self.bridges
    }

    /// Whether both programs of `bridge` are still attached (the bridge may have gone).
    pub fn is_attached(&self, bridge: &Bridge) -> bool {
        sys::ifindex(&bridge.name) == Some(bridge.ifindex)
            && Hook::ALL.iter().all(|hook| {
                PinnedLink::from_pin(self.pins.link(&bridge.name, *hook))
                    .ok()
                    .and_then(|link| FdLink::from(link).info().ok())
                    .is_some()
            })
    }

    pub fn set_config(&mut self, config: GateConfig) -> Result<()> {
        let name = map_names::CONFIG;
        let mut map: Array<_, Config> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        map.set(
            0,
            Config {
                flags: config.flags(),
            },
            0,
        )
        .map_err(map_err(name))
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

    pub fn allow_entries(&self) -> Result<usize> {
        let name = map_names::ALLOW;
        let map: HashMap<_, AllowKey, AllowValue> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        Ok(map.keys().filter(Result::is_ok).count())
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

    /// Packets and bytes of each rule, summed over CPUs.
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

    /// Entries in the connection-tracking table (including idle ones not yet evicted).
    pub fn tracked_flows(&self) -> Result<usize> {
        let name = map_names::FLOWS;
        // aya's HashMap also reads LRU hash maps.
        let map: HashMap<_, FlowKey, FlowState> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        Ok(map.keys().filter(Result::is_ok).count())
    }

    /// The loaded program behind `hook`, e.g. for BPF_PROG_TEST_RUN.
    pub fn program_fd(&self, name: &'static str) -> Result<BorrowedFd<'_>> {
        let program: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::Missing(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        let fd = program
            .fd()
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok(fd.as_fd())
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or(DatapathError::Missing(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or(DatapathError::Missing(name))
    }
}

/// Decodes one drop event from the ring buffer.
pub fn decode_drop_event(bytes: &[u8]) -> Option<DropEvent> {
    (bytes.len() >= std::mem::size_of::<DropEvent>())
        // SAFETY: long enough, DropEvent is plain old data valid for any bits; unaligned read.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
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

/// The bridge of a link pin's file name (`<bridge>-egress`, `<bridge>-ingress`), if it is one.
fn link_pin_bridge(name: &str) -> Option<&str> {
    Hook::ALL.iter().find_map(|hook| {
        name.strip_suffix(hook.suffix())?
            .strip_suffix('-')
            .filter(|bridge| !bridge.is_empty())
    })
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
    let map_pins = map_names::PINNED
        .iter()
        .chain(&[map_names::DROP_EVENTS, map_names::EVENT_BUDGET]);
    let program_pins = Hook::ALL.map(Hook::program);
    for version in fs::read_dir(bpffs_dir).map_err(io_err(bpffs_dir))? {
        let version = version.map_err(io_err(bpffs_dir))?;
        let is_ours = version.file_name().to_str().is_some_and(is_layout_version)
            && version.file_type().map_err(io_err(bpffs_dir))?.is_dir();
        if !is_ours {
            continue;
        }
        let pins = Pins {
            root: version.path(),
        };
        let links = pins.links();
        for entry in fs::read_dir(&links).into_iter().flatten() {
            let path = entry.map_err(io_err(&links))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let Some(bridge) = link_pin_bridge(name) else {
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
            done.bridges.insert(bridge.to_owned());
            done.pins += remove_pin(&path)?;
        }
        for name in program_pins {
            done.pins += remove_pin(&pins.programs().join(name))?;
        }
        for name in map_pins.clone() {
            done.pins += remove_pin(&pins.map(name))?;
        }
        for dir in [links, pins.programs(), pins.maps(), pins.root.clone()] {
            remove_dir_if_empty(&dir)?;
        }
    }
    remove_dir_if_empty(bpffs_dir)?;
    done.foreign = leftovers(bpffs_dir);
    Ok(done)
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
    fn uninstall_knows_its_own_names() {
        assert_eq!(link_pin_bridge("docker0-egress"), Some("docker0"));
        assert_eq!(
            link_pin_bridge("br-0123456789ab-ingress"),
            Some("br-0123456789ab")
        );
        for foreign in [
            "-egress",
            "egress",
            "docker0",
            "docker0-egress.bak",
            "x-ingres",
        ] {
            assert_eq!(link_pin_bridge(foreign), None, "{foreign}");
        }
        assert!(is_layout_version(LAYOUT_VERSION) && is_layout_version("v12"));
        for foreign in ["v", "va", "maps", "v1x", "foreign"] {
            assert!(!is_layout_version(foreign), "{foreign}");
        }
    }
}
