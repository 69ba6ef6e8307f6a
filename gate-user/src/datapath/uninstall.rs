//! `portgate uninstall`: portgate's links detached, its pins removed, other tools' pins left.

use super::*;

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
pub(super) fn link_pin_owner(name: &str) -> Option<Option<&str>> {
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

/// Detaches the links of one layout directory and removes its pins that portgate names, then
/// its directories that are left empty.
pub(super) fn uninstall_layout(root: &Path, done: &mut Uninstalled) -> Result<()> {
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
    for name in &object()?.programs {
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
pub(super) fn remove_pin(path: &Path) -> Result<usize> {
    match fs::remove_file(path) {
        Ok(()) => Ok(1),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(err) => Err(io_err(path)(err)),
    }
}

/// Removes a directory unless something is left in it (or it is gone already).
pub(super) fn remove_dir_if_empty(dir: &Path) -> Result<()> {
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
pub(super) fn leftovers(dir: &Path) -> Vec<PathBuf> {
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
    use crate::datapath::pins::is_layout_version;

    #[test]
    fn uninstall_knows_its_own_names() {
        assert_eq!(link_pin_owner("docker0-egress"), Some(Some("docker0")));
        assert_eq!(
            link_pin_owner("br-0123456789ab-ingress"),
            Some(Some("br-0123456789ab"))
        );
        assert_eq!(link_pin_owner("veth1a2b3c-port"), Some(None));
        assert_eq!(link_pin_owner("host-ports"), Some(None));
        assert_eq!(link_pin_owner("relay-adopted"), Some(None));
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
