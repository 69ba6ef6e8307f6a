//! Upgrades: an older layout's tracked connections copied into this one's tables, then the
//! older layout's programs detached and its pins removed.

use super::*;

impl Datapath {
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
