//! The pin directory: its layout (one directory per [`LAYOUT_VERSION`]), the names of the
//! link pins, the shapes pinned maps must have, the bpf filesystem and the lock that keeps
//! one agent per directory.

use super::*;

/// Directories of one pin layout.
#[derive(Clone, Debug)]
pub struct Pins {
    pub(super) root: PathBuf,
}

impl Pins {
    pub fn new(bpffs_dir: &Path) -> Self {
        Self {
            root: bpffs_dir.join(LAYOUT_VERSION),
        }
    }

    pub(super) fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub(super) fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub(super) fn programs(&self) -> PathBuf {
        self.root.join("programs")
    }

    pub(super) fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub(super) fn link(&self, name: &str) -> PathBuf {
        self.links().join(name)
    }
}

/// Pin name of the egress link of `bridge`.
pub(super) fn egress_link(bridge: &str) -> String {
    format!("{bridge}{EGRESS_SUFFIX}")
}

/// The suffix of a bridge's egress link pin.
const EGRESS_SUFFIX: &str = "-egress";

/// What the pin directory says about the gate, with or without an agent: the bridges with
/// an egress link pinned, and whether the socket lookup's link is.
#[derive(Debug, Default)]
pub struct PinnedGate {
    pub bridges: BTreeSet<String>,
    pub host_ports: bool,
    /// Every relay hook's link is pinned (see `relays.rs`).
    pub relay_hooks: bool,
}

impl PinnedGate {
    pub fn read(bpffs_dir: &Path) -> Self {
        let mut pinned = Self::default();
        let Ok(entries) = fs::read_dir(Pins::new(bpffs_dir).links()) else {
            return pinned;
        };
        let mut relay_links = 0;
        for name in entries
            .filter_map(std::result::Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
        {
            if let Some(bridge) = name.strip_suffix(EGRESS_SUFFIX) {
                pinned.bridges.insert(bridge.to_owned());
            } else if name == HOST_PORTS_LINK {
                pinned.host_ports = true;
            } else if super::relays::LINKS
                .iter()
                .any(|(_, link, _)| *link == name)
            {
                relay_links += 1;
            }
        }
        pinned.relay_hooks = relay_links == super::relays::LINKS.len();
        pinned
    }
}

/// Pin name of the ingress link of bridge port `port`.
pub(super) fn port_link(port: &str) -> String {
    format!("{port}-port")
}

/// Pin name of the ingress link of uplink `iface`.
pub(super) fn uplink_link(iface: &str) -> String {
    format!("{iface}-uplink")
}

/// Pin name of the socket-lookup link on the host's network namespace.
pub(super) const HOST_PORTS_LINK: &str = "host-ports";

/// What this build's eBPF object declares, read from the object itself so that no list here
/// repeats gate-ebpf's declarations: its programs (each pinned under `programs/` by name)
/// and the shape of each map.
pub(super) struct ObjectFacts {
    pub programs: Vec<String>,
    maps: BTreeMap<String, MapShape>,
}

/// A map's type, key and value sizes and capacity, as the kernel reports a pinned map's.
#[derive(Clone, Copy, Debug, PartialEq)]
struct MapShape {
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

/// The facts of [`EBPF_OBJECT`], parsed once.
pub(super) fn object() -> Result<&'static ObjectFacts> {
    static FACTS: std::sync::OnceLock<std::result::Result<ObjectFacts, String>> =
        std::sync::OnceLock::new();
    FACTS
        .get_or_init(parse_object)
        .as_ref()
        .map_err(|detail| DatapathError::Object(detail.clone()))
}

fn parse_object() -> std::result::Result<ObjectFacts, String> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| e.to_string())?;
    let mut programs: Vec<String> = object.programs.keys().cloned().collect();
    programs.sort();
    let mut maps = BTreeMap::new();
    for (name, map) in &object.maps {
        let map_type = aya_obj::generated::bpf_map_type::try_from(map.map_type())
            .map_err(|_| format!("map {name}: unknown type {}", map.map_type()))
            .and_then(|t| MapType::try_from(t).map_err(|e| format!("map {name}: {e}")))?;
        let shape = MapShape {
            map_type,
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
        };
        maps.insert(name.clone(), shape);
    }
    Ok(ObjectFacts { programs, maps })
}

/// The maps whose capacity is set at load time, with theirs.
pub(super) fn sized_maps(capacities: Capacities) -> [(&'static str, u32); 4] {
    [
        (map_names::ALLOW, capacities.allow),
        (map_names::FLOWS, capacities.flows),
        (map_names::NEW_FLOWS, capacities.new_flows()),
        (map_names::RULE_STATS, capacities.rule_slots()),
    ]
}

/// Refuses pinned maps whose type, key, value or capacity differ from this build's.
pub(super) fn check_pinned_maps(pins: &Pins, capacities: Capacities) -> Result<()> {
    let object = object()?;
    for name in map_names::PINNED {
        let mut wanted = *object.maps.get(name).ok_or(DatapathError::Missing(name))?;
        if let Some((_, capacity)) = sized_maps(capacities).iter().find(|(n, _)| *n == name) {
            wanted.max_entries = *capacity;
        }
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
        let found = MapShape {
            map_type: found_type,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        if found != wanted {
            return Err(incompatible(format!(
                "found {found:?}, expected {wanted:?}"
            )));
        }
    }
    Ok(())
}

/// Makes sure `dir` will be on a bpf filesystem, mounting /sys/fs/bpf if it is the one missing.
pub(super) fn ensure_bpffs(dir: &Path) -> Result<()> {
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

/// Whether a directory name is one of portgate's layout versions (`v1`, `v2`, ...).
pub(super) fn is_layout_version(name: &str) -> bool {
    name.strip_prefix('v')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The layout-version directories (`v1`, `v2`, ...) under `bpffs_dir`.
pub(super) fn layout_dirs(bpffs_dir: &Path) -> Result<Vec<PathBuf>> {
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

pub(super) const BPF_FS_MAGIC: i64 = 0xcafe4a11;
