//! Rootless engines, which the agent does not follow: rootless Podman publishes through a
//! listening socket of the host owned by the user's `rootlessport` (or `pasta`,
//! `slirp4netns`; rootless Docker's `rootlesskit`), which relays to the container. Nothing
//! gates those ports, so `doctor` names each one `UNPROTECTED`, with its user.

use std::{collections::BTreeMap, path::Path};

use super::doctor::{Finding, Level};

/// The processes that relay a rootless engine's published ports from the host.
const RELAYS: [&str; 5] = [
    "rootlessport",
    "pasta",
    "pasta.avx2",
    "slirp4netns",
    "rootlesskit",
];

/// A listening socket of a rootless relay.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct RelayedPort {
    pub user: String,
    pub relay: String,
    pub proto: &'static str,
    pub port: u16,
}

/// Every port a rootless relay listens on, from /proc.
pub(super) fn relayed_ports() -> Vec<RelayedPort> {
    let listening = listening_sockets();
    let mut ports = Vec::new();
    for dir in super::doctor::process_dirs() {
        let Some(comm) = std::fs::read_to_string(dir.join("comm")).ok() else {
            continue;
        };
        let comm = comm.trim();
        if !RELAYS.contains(&comm) {
            continue;
        }
        let Some(uid) = process_uid(&dir) else {
            continue;
        };
        if uid == 0 {
            continue; // rootful Podman's own helpers are the agent's to follow
        }
        for inode in socket_inodes(&dir) {
            if let Some((proto, port)) = listening.get(&inode) {
                ports.push(RelayedPort {
                    user: user_name(uid),
                    relay: comm.to_owned(),
                    proto,
                    port: *port,
                });
            }
        }
    }
    ports.sort();
    ports.dedup();
    ports
}

/// The doctor's findings: one per relayed port.
pub(super) fn findings(ports: &[RelayedPort]) -> Vec<Finding> {
    ports
        .iter()
        .map(|p| Finding {
            check: "container",
            subject: format!("{}:{}/{}", p.user, p.port, p.proto),
            level: Level::Unprotected,
            detail: format!(
                "a rootless engine of user {} publishes {}/{} through {}, a listening socket of the host: the agent does not follow rootless engines, so nothing gates it",
                p.user, p.port, p.proto, p.relay
            ),
            advice: Some(
                "filter the port in the host's input firewall, or run the container with rootful Podman or Docker, which the agent follows".to_owned(),
            ),
        })
        .collect()
}

/// Listening TCP sockets and bound UDP sockets of this network namespace, by inode.
fn listening_sockets() -> BTreeMap<u64, (&'static str, u16)> {
    let mut sockets = BTreeMap::new();
    for (file, proto, state) in [
        ("/proc/net/tcp", "tcp", "0A"),
        ("/proc/net/tcp6", "tcp", "0A"),
        ("/proc/net/udp", "udp", "07"),
        ("/proc/net/udp6", "udp", "07"),
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        sockets.extend(parse_proc_net(&text, state).map(|(inode, port)| (inode, (proto, port))));
    }
    sockets
}

/// (inode, local port) of the sockets in `state` in a /proc/net/{tcp,udp}[6] table.
fn parse_proc_net<'a>(text: &'a str, state: &'a str) -> impl Iterator<Item = (u64, u16)> + 'a {
    text.lines().skip(1).filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(3) != Some(&state) {
            return None;
        }
        let port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
        let inode = fields.get(9)?.parse().ok()?;
        Some((inode, port))
    })
}

/// The socket inodes among a process's open files.
fn socket_inodes(process: &Path) -> Vec<u64> {
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

/// The real uid of a process (`Uid:` in its status).
fn process_uid(process: &Path) -> Option<u32> {
    let status = std::fs::read_to_string(process.join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The user's name from /etc/passwd, else the uid.
fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.get(2)? == &uid.to_string().as_str()).then(|| fields[0].to_owned())
        })
        .unwrap_or_else(|| uid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_read_from_proc_net() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 100 0 0 10 0\n   1: 0100007F:8871 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0\n";
        let found: Vec<(u64, u16)> = parse_proc_net(tcp, "0A").collect();
        assert_eq!(found, [(4242, 8080)], "only the listening socket");
    }
}
