//! Bridge ports and the containers behind them.
//!
//! Each port of a gated bridge is the host end of a veth pair whose other end is a container's
//! interface, in the container's network namespace. The addresses configured on that other
//! end are the container's own: a process in the container cannot change them without
//! CAP_NET_ADMIN (which engines do not grant by default). The gate binds what a container may
//! open to them, so that a forged source address opens nothing.
//!
//! The peer is found without asking any engine, so the same holds for Docker, Podman and a
//! hand-made namespace: every network namespace on the host (those of processes, and those
//! pinned under /run/netns and /var/run/docker/netns) is listed once, and in each one
//! `ip -j addr show` tells which interface is the peer of which host ifindex.

use portgate_bpf_sys::netns;
use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::IpAddr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;

/// A port of a bridge: the host end of a container's veth.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port {
    pub name: String,
    pub ifindex: u32,
    /// The peer's ifindex in its own namespace.
    pub peer_ifindex: u32,
    /// The id this namespace gives the peer's namespace.
    pub peer_netnsid: i32,
}

/// The veth ports of `bridge` whose peer is in another namespace (`ip -j link show master`,
/// which, unlike sysfs, lists the agent's own namespace); empty if it has none or is gone.
pub fn bridge_ports(bridge: &str) -> Vec<Port> {
    let Ok(output) = Command::new("ip")
        .args(["-j", "link", "show", "master", bridge])
        .output()
    else {
        return Vec::new();
    };
    let Ok(links) = serde_json::from_slice::<Vec<Interface>>(&output.stdout) else {
        return Vec::new();
    };
    let mut ports: Vec<Port> = links
        .into_iter()
        .filter_map(|link| {
            Some(Port {
                name: link.ifname,
                ifindex: link.ifindex,
                peer_ifindex: link.link_index?,
                peer_netnsid: i32::try_from(link.link_netnsid?).ok()?,
            })
        })
        .collect();
    ports.sort();
    ports
}

#[derive(Debug, Deserialize)]
struct Interface {
    ifindex: u32,
    #[serde(default)]
    ifname: String,
    #[serde(default)]
    link_index: Option<u32>,
    /// Present when the link's peer is in another namespace.
    #[serde(default)]
    link_netnsid: Option<i64>,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    local: Option<IpAddr>,
}

/// The addresses of the container behind each of `ports`, by port ifindex. A port whose peer
/// is not found (a namespace without process or pin, or one that just went) has no entry:
/// its container opens nothing until it is found.
pub fn port_addresses(ports: &[Port]) -> BTreeMap<u32, BTreeSet<IpAddr>> {
    let mut found = BTreeMap::new();
    if ports.is_empty() {
        return found;
    }
    for namespace in namespaces() {
        // Which of our ports have their peer in this namespace: the namespace ids must agree
        // (ifindexes repeat from one namespace to the next).
        let Ok(Some(nsid)) = netnsid(&namespace) else {
            continue;
        };
        if !ports.iter().any(|p| p.peer_netnsid == nsid) {
            continue;
        }
        let Ok(interfaces) = interfaces_in(&namespace) else {
            continue; // gone meanwhile
        };
        for interface in interfaces {
            let Some(port) = ports.iter().find(|p| {
                p.peer_netnsid == nsid
                    && p.peer_ifindex == interface.ifindex
                    && interface.link_index == Some(p.ifindex)
            }) else {
                continue;
            };
            found
                .entry(port.ifindex)
                .or_insert_with(BTreeSet::new)
                .extend(interface.addr_info.iter().filter_map(|a| a.local));
        }
    }
    found
}

/// Every network namespace on the host but the agent's own, once each.
fn namespaces() -> Vec<PathBuf> {
    let own = fs::metadata("/proc/self/ns/net")
        .map(|m| (m.dev(), m.ino()))
        .ok();
    let mut seen = BTreeSet::new();
    own.map(|id| seen.insert(id));
    let pinned = ["/run/netns", "/var/run/netns", "/var/run/docker/netns"]
        .into_iter()
        .flat_map(|dir| fs::read_dir(dir).into_iter().flatten().flatten())
        .map(|entry| entry.path());
    let of_processes = crate::procfs::process_dirs().map(|dir| dir.join("ns/net"));
    pinned
        .chain(of_processes)
        .filter(|path| {
            fs::metadata(path)
                .map(|m| seen.insert((m.dev(), m.ino())))
                .unwrap_or(false)
        })
        .collect()
}

/// The interfaces of the namespace at `path`, as `ip -j addr show` run inside it lists them.
fn interfaces_in(path: &Path) -> io::Result<Vec<Interface>> {
    let mut command = Command::new("ip");
    command.args(["-j", "addr", "show"]);
    netns::command_in(&mut command, fs::File::open(path)?);
    let output = command.output()?;
    if !output.status.success() {
        return Err(io::Error::other(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(io::Error::other)
}

/// The id the agent's namespace gives the namespace at `path` (RTM_GETNSID), if it has one:
/// it has, once a link whose peer is there was listed.
fn netnsid(path: &Path) -> io::Result<Option<i32>> {
    const RTM_GETNSID: u16 = 90;
    const RTM_NEWNSID: u16 = 88;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const NETNSA_NSID: u16 = 1;
    const NETNSA_FD: u16 = 3;
    let namespace = fs::File::open(path)?;
    // nlmsghdr (16 bytes), rtgenmsg (1 byte, padded to 4), one u32 attribute (8 bytes).
    let mut request = Vec::with_capacity(28);
    request.extend_from_slice(&28u32.to_ne_bytes());
    request.extend_from_slice(&RTM_GETNSID.to_ne_bytes());
    request.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    request.extend_from_slice(&[0; 8]); // sequence, port id
    request.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    request.extend_from_slice(&8u16.to_ne_bytes());
    request.extend_from_slice(&NETNSA_FD.to_ne_bytes());
    request.extend_from_slice(&(namespace.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: plain socket call; the fd is owned at once.
    let socket = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if socket < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(socket) };
    // SAFETY: the buffer is valid for its length; netlink's kernel address is all-zero.
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 256];
    // SAFETY: the buffer is valid for its length.
    let len = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            reply.len(),
            0,
        )
    };
    if len < 20 {
        return Err(io::Error::last_os_error());
    }
    let reply = &reply[..len as usize];
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind == NLMSG_ERROR {
        let errno = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != RTM_NEWNSID {
        return Ok(None);
    }
    let mut attrs = &reply[20..];
    while attrs.len() >= 8 {
        let attr_len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let attr_type = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if attr_len < 4 || attr_len > attrs.len() {
            break;
        }
        if attr_type == NETNSA_NSID {
            let nsid = i32::from_ne_bytes([attrs[4], attrs[5], attrs[6], attrs[7]]);
            return Ok((nsid >= 0).then_some(nsid));
        }
        attrs = &attrs[(attr_len + 3) & !3..];
    }
    Ok(None)
}

/// The interfaces `--uplink auto` takes: up, not loopback, not a bridge, not a veth, not a
/// bridge's port (`ip -j -d link show`); the interfaces traffic from outside arrives on.
pub fn uplink_candidates() -> Vec<(String, u32)> {
    #[derive(Deserialize)]
    struct Link {
        ifindex: u32,
        ifname: String,
        #[serde(default)]
        link_type: String,
        #[serde(default)]
        flags: Vec<String>,
        #[serde(default)]
        master: Option<String>,
        #[serde(default)]
        linkinfo: Option<LinkInfo>,
    }
    #[derive(Deserialize)]
    struct LinkInfo {
        #[serde(default)]
        info_kind: String,
    }
    let Ok(output) = Command::new("ip")
        .args(["-j", "-d", "link", "show"])
        .output()
    else {
        return Vec::new();
    };
    let Ok(links) = serde_json::from_slice::<Vec<Link>>(&output.stdout) else {
        return Vec::new();
    };
    links
        .into_iter()
        .filter(|link| {
            let kind = link.linkinfo.as_ref().map_or("", |i| i.info_kind.as_str());
            link.link_type != "loopback"
                && link.master.is_none()
                && !matches!(kind, "bridge" | "veth")
                && link.flags.iter().any(|f| f == "UP")
        })
        .map(|link| (link.ifname, link.ifindex))
        .collect()
}
