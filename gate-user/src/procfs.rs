//! What /proc says about processes and their sockets: the one reader for the agent (which
//! relay holds which port) and `doctor` (which ports relays publish, with their users).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use gate_common::{PROTO_TCP, PROTO_UDP};

/// Every process's directory under /proc.
pub fn process_dirs() -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path())
}

/// A process's name as the kernel holds it (`comm`).
pub fn comm(process: &Path) -> Option<String> {
    let comm = std::fs::read_to_string(process.join("comm")).ok()?;
    Some(comm.trim_end_matches('\n').to_owned())
}

/// The real uid of a process (`Uid:` in its status).
pub fn uid(process: &Path) -> Option<u32> {
    let status = std::fs::read_to_string(process.join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The socket inodes among a process's open files.
pub fn socket_inodes(process: &Path) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(process.join("fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// A TCP or UDP socket of this process's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Socket {
    pub proto: u8,
    pub port: u16,
    /// TCP: listening; UDP: bound, not connected.
    pub listening: bool,
}

/// Every TCP and UDP socket of this network namespace (/proc/self/net), by inode.
pub fn sockets() -> BTreeMap<u64, Socket> {
    let mut sockets = BTreeMap::new();
    for (file, proto, listening) in [
        ("tcp", PROTO_TCP, "0A"),
        ("tcp6", PROTO_TCP, "0A"),
        ("udp", PROTO_UDP, "07"),
        ("udp6", PROTO_UDP, "07"),
    ] {
        // No IPv6 in this kernel: nothing there.
        let text =
            std::fs::read_to_string(Path::new("/proc/self/net").join(file)).unwrap_or_default();
        sockets.extend(parse_table(&text, proto, listening));
    }
    sockets
}

/// The local ports of the sockets that processes named one of `names` hold, in this network
/// namespace.
pub fn ports_held_by(names: &[&str]) -> BTreeSet<(u8, u16)> {
    let sockets = sockets();
    process_dirs()
        .filter(|dir| comm(dir).is_some_and(|c| names.contains(&c.as_str())))
        .flat_map(|dir| socket_inodes(&dir))
        .filter_map(|inode| sockets.get(&inode))
        .map(|s| (s.proto, s.port))
        .collect()
}

/// (inode, socket) of each line of a /proc/net/{tcp,udp}[6] table; `listening` is the
/// state (hexadecimal) that counts as listening.
fn parse_table<'a>(
    text: &'a str,
    proto: u8,
    listening: &'a str,
) -> impl Iterator<Item = (u64, Socket)> + 'a {
    text.lines().skip(1).filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
        let inode = fields.get(9)?.parse().ok()?;
        let socket = Socket {
            proto,
            port,
            listening: *fields.get(3)? == listening,
        };
        Some((inode, socket))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_read_from_proc_net() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 100 0 0 10 0\n   1: 0100007F:8871 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0\n";
        let found: Vec<(u64, Socket)> = parse_table(tcp, PROTO_TCP, "0A").collect();
        let socket = |port, listening| Socket {
            proto: PROTO_TCP,
            port,
            listening,
        };
        assert_eq!(
            found,
            [(4242, socket(8080, true)), (4343, socket(0x8871, false))]
        );
    }
}
