//! The system calls of the datapath that aya 0.14 does not wrap: the BPF ones (from
//! `portgate-bpf-sys`, shared with the bench), statfs, mount, if_nametoindex, uname, and the
//! black-hole socket.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use portgate_bpf_sys::c_path;
pub use portgate_bpf_sys::{
    SkLookupRun, TestRun, count_entries, detach_pinned_link, link_create, lookup_array_batch,
    obj_get, obj_pin, test_run, test_run_sk_lookup, update_link,
};

pub fn ifindex(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The MAC address of interface `name` (from sysfs).
pub fn mac_address(name: &str) -> Option<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).ok()?;
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The filesystem magic number of `path`'s filesystem.
pub fn fs_type(path: &Path) -> Option<i64> {
    let path = c_path(path).ok()?;
    // SAFETY: `statfs` is plain integers, for which all zeroes is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string; statfs writes only into `stat`.
    let ret = unsafe { libc::statfs(path.as_ptr(), &mut stat) };
    (ret == 0).then_some(stat.f_type as i64)
}

pub fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = c_path(target)?;
    let bpf = c"bpf";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let ret = unsafe {
        libc::mount(
            bpf.as_ptr(),
            target.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The cookie of this thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14), as the
/// eBPF helper `bpf_get_netns_cookie` names it.
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a socket created and closed here, read into a buffer of the option's size.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = OwnedFd::from_raw_fd(fd);
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let ret = libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        );
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }
}

/// A dual-stack socket that takes what is assigned to it and discards every packet through its
/// socket filter (classic BPF `ret #0`), without an answer: a TCP listener (`stream`) or an
/// unconnected UDP socket, on an ephemeral port of every address.
pub fn black_hole_socket(stream: bool) -> io::Result<OwnedFd> {
    let kind = if stream {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    // SAFETY: plain socket calls on the socket created here, with valid option buffers.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, kind | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let check = |ret: libc::c_int| {
            if ret < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let off: libc::c_int = 0;
        check(libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&off as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        ))?;
        // BPF_RET | BPF_K, 0: keep no byte of any packet.
        let mut discard = [libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0,
        }];
        let program = libc::sock_fprog {
            len: 1,
            filter: discard.as_mut_ptr(),
        };
        check(libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&program as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as u32,
        ))?;
        let mut any: libc::sockaddr_in6 = std::mem::zeroed();
        any.sin6_family = libc::AF_INET6 as u16;
        check(libc::bind(
            fd.as_raw_fd(),
            (&any as *const libc::sockaddr_in6).cast(),
            size_of::<libc::sockaddr_in6>() as u32,
        ))?;
        if stream {
            check(libc::listen(fd.as_raw_fd(), 1))?;
        }
        Ok(fd)
    }
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct we pass.
    if unsafe { libc::uname(&mut name) } != 0 {
        return String::new();
    }
    // SAFETY: uname NUL-terminates its fields.
    unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The addresses configured on this network namespace's interfaces (getifaddrs).
pub fn local_addresses() -> io::Result<Vec<std::net::IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addresses = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not freed yet.
        let ifa = unsafe { &*entry };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` points at a sockaddr of the family it names.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: an AF_INET address is a sockaddr_in.
                    let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                    addresses
                        .push(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into());
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 address is a sockaddr_in6.
                    let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                    addresses.push(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into());
                }
                _ => {}
            }
        }
        entry = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(addresses)
}
