//! Container relays' ports, closed until published: `relay_bound4`/`relay_bound6` record
//! each port a relay process binds in the host's network namespace, `relay_adopted` each
//! listener a relay takes over from another process (Docker 28), and `host_ports` refuses a
//! recorded port that no engine has published. The hooks sit on the cgroup v2 root, so
//! they see every process, and their links are pinned: they keep recording while no agent
//! runs. The agent writes the relays' names and removes the ports no socket holds any more.

use std::{
    collections::BTreeSet,
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, MapData},
    programs::{CgroupSock, CgroupSockopt},
};
use gate_common::{COMM_LEN, RelayPort, map_names, program_names};
use tracing::info;

use crate::runtime::RELAY_PROCESSES;

use super::{Datapath, DatapathError, Result, io_err, map_err, owned_fd, sys, take_over};

/// The hooks: program, pin name of its link, cgroup attach point.
pub(super) const LINKS: [(&str, &str, u32); 3] = [
    (
        program_names::RELAY_BOUND4,
        "relay-bound4",
        portgate_bpf_sys::BPF_CGROUP_INET4_POST_BIND,
    ),
    (
        program_names::RELAY_BOUND6,
        "relay-bound6",
        portgate_bpf_sys::BPF_CGROUP_INET6_POST_BIND,
    ),
    (
        program_names::RELAY_ADOPTED,
        "relay-adopted",
        portgate_bpf_sys::BPF_CGROUP_GETSOCKOPT,
    ),
];

impl Datapath {
    /// Names the relays, then attaches the hooks to the cgroup v2 root (taking over the
    /// previous agent's links), so that the ports relays take from now on are recorded.
    pub fn attach_relay_hooks(&mut self) -> Result<()> {
        let name = map_names::RELAY_COMMS;
        let mut comms: HashMap<_, [u8; COMM_LEN], u8> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for process in RELAY_PROCESSES {
            comms.insert(comm(process), 1, 0).map_err(map_err(name))?;
        }
        let root = cgroup2_root()?;
        let cgroup = fs::File::open(&root).map_err(io_err(&root))?;
        for (name, link_name, attach_type) in LINKS {
            let pin = self.pins.link(link_name);
            let ebpf = &mut self.ebpf;
            let program = if name == program_names::RELAY_ADOPTED {
                owned_fd(name, cgroup_sockopt(ebpf, name)?.fd(), &pin)?
            } else {
                owned_fd(name, cgroup_sock(ebpf, name)?.fd(), &pin)?
            };
            let link = match take_over(&pin, program.as_fd())? {
                Some(link) => link,
                // A cgroup link sits beside the other programs attached there.
                None => {
                    let link = sys::link_create(program.as_fd(), cgroup.as_fd(), attach_type)
                        .map_err(io_err(&root))?;
                    sys::obj_pin(link.as_fd(), &pin).map_err(io_err(&pin))?;
                    link
                }
            };
            self.links.insert(pin, link);
        }
        info!(cgroup = %root.display(), "recording the ports container relays take");
        Ok(())
    }

    /// Removes the recorded ports that no relay process of this namespace has held for two
    /// calls in a row (a relay's socket and the tables /proc shows it in are read one after
    /// the other). A host service that takes such a port
    /// after the relay is gone is the host's own again.
    pub fn sync_relay_ports(&mut self) -> Result<()> {
        let name = map_names::RELAY_PORTS;
        let unheld_before = std::mem::take(&mut self.relay_ports_unheld);
        let mut ports: HashMap<_, RelayPort, u8> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let recorded: BTreeSet<RelayPort> = ports.keys().filter_map(|k| k.ok()).collect();
        if recorded.is_empty() {
            return Ok(()); // nothing to forget: no walk over /proc
        }
        let held = crate::procfs::ports_held_by(&RELAY_PROCESSES);
        let unheld: BTreeSet<RelayPort> = recorded
            .into_iter()
            .filter(|p| !held.contains(&(p.proto, p.port)))
            .collect();
        for port in unheld.intersection(&unheld_before) {
            // Gone meanwhile is as good as removed.
            let _ = ports.remove(port);
        }
        self.relay_ports_unheld = unheld;
        Ok(())
    }
}

/// The ports relays have bound, as the pinned map under `bpffs_dir` records them (for
/// `doctor`, with or without an agent): `None` when the gate never recorded any (not
/// installed, or an older one).
pub fn recorded_relay_ports(bpffs_dir: &Path) -> Option<BTreeSet<RelayPort>> {
    let path = super::Pins::new(bpffs_dir).map(map_names::RELAY_PORTS);
    let data = MapData::from_pin(&path).ok()?;
    let map = aya::maps::Map::HashMap(data);
    let ports: HashMap<_, RelayPort, u8> = HashMap::try_from(&map).ok()?;
    Some(ports.keys().filter_map(|k| k.ok()).collect())
}

/// A process name as the kernel holds it: NUL-padded to [`COMM_LEN`], cut at 15 bytes.
fn comm(name: &str) -> [u8; COMM_LEN] {
    let mut comm = [0u8; COMM_LEN];
    let len = name.len().min(COMM_LEN - 1);
    comm[..len].copy_from_slice(&name.as_bytes()[..len]);
    comm
}

/// The root of the cgroup v2 hierarchy, from /proc/self/mountinfo (`/sys/fs/cgroup` on a
/// unified host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_root() -> Result<PathBuf> {
    let path = Path::new("/proc/self/mountinfo");
    let mountinfo = fs::read_to_string(path).map_err(io_err(path))?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (fields, fs) = line.split_once(" - ")?;
            let mount_point = fields.split_whitespace().nth(4)?;
            (fs.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or_else(|| DatapathError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no cgroup2 file system is mounted; mount one with `mount -t cgroup2 none /sys/fs/cgroup`",
            ),
        })
}

fn cgroup_sock<'a>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut CgroupSock> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn cgroup_sockopt<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockopt> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_names_are_cut_as_the_kernel_cuts_them() {
        assert_eq!(&comm("docker-proxy")[..13], b"docker-proxy\0");
        let long = comm("a-name-longer-than-fifteen");
        assert_eq!(&long[..15], b"a-name-longer-t");
        assert_eq!(long[15], 0);
    }
}
