//! What /proc and /etc/passwd say about processes, their sockets and their users: the one
//! reader for the agent (rootless engines' relays and their users, which relay holds which
//! port) and `doctor`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use gate_common::{PROTO_TCP, PROTO_UDP};

/// Every process's /proc/PID directory.
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

/// A process's program name (`comm`).
pub fn comm(process: &Path) -> Option<String> {
    std::fs::read_to_string(process.join("comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The real uid of a process (`Uid:` in its status).
pub fn process_uid(process: &Path) -> Option<u32> {
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

/// Listening TCP sockets and bound UDP sockets of this network namespace, by inode:
/// (protocol, local port).
pub fn listening_sockets() -> BTreeMap<u64, (&'static str, u16)> {
    sockets()
        .into_iter()
        .filter(|(_, s)| s.listening)
        .map(|(inode, s)| {
            let proto = if s.proto == PROTO_TCP { "tcp" } else { "udp" };
            (inode, (proto, s.port))
        })
        .collect()
}

/// The local ports of the sockets that processes named one of `names` hold (listening or
/// not), in this network namespace.
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

/// A user as /etc/passwd has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The user with `uid` in the passwd file `passwd` (its text).
pub fn user_in(passwd: &str, uid: u32) -> Option<User> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.get(2)?.parse::<u32>().ok()? != uid {
            return None;
        }
        Some(User {
            name: (*fields.first()?).to_owned(),
            uid,
            gid: fields.get(3)?.parse().ok()?,
            home: PathBuf::from(fields.get(5)?),
        })
    })
}

/// The user with `uid` in /etc/passwd.
pub fn user(uid: u32) -> Option<User> {
    user_in(&std::fs::read_to_string("/etc/passwd").ok()?, uid)
}

/// The user's name from /etc/passwd, else the uid.
pub fn user_name(uid: u32) -> String {
    user(uid).map_or_else(|| uid.to_string(), |u| u.name)
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

    #[test]
    fn users_are_read_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1001:1002:,,,:/home/alice:/bin/sh\n";
        assert_eq!(
            user_in(passwd, 1001),
            Some(User {
                name: "alice".to_owned(),
                uid: 1001,
                gid: 1002,
                home: PathBuf::from("/home/alice"),
            })
        );
        assert_eq!(user_in(passwd, 7), None);
    }
}
