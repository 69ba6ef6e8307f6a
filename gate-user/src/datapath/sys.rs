//! The few system calls aya 0.14 does not wrap: BPF_PROG_TEST_RUN, BPF_OBJ_GET with
//! BPF_LINK_DETACH, BPF_LINK_UPDATE, statfs, mount, if_nametoindex.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Size of the kernel's `struct __sk_buff`, the context of a TC program's test run.
const SK_BUFF_CTX_WORDS: usize = 48;
/// Word index of `__sk_buff.ingress_ifindex` (byte offset 36).
const INGRESS_IFINDEX_WORD: usize = 9;

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised bpf_attr variant of the size passed.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// The result of running a program on a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value.
    pub retval: i32,
    /// Average nanoseconds per run, as the kernel measured it.
    pub duration_ns: u32,
}

/// Runs a TC program on `frame` (an Ethernet frame) `repeat` times in the kernel.
/// `ingress_ifindex` 0 looks like traffic from the host's own stack; anything else like a
/// forwarded packet.
pub fn test_run(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    ingress_ifindex: u32,
    repeat: u32,
) -> io::Result<TestRun> {
    let mut ctx = [0u32; SK_BUFF_CTX_WORDS];
    ctx[INGRESS_IFINDEX_WORD] = ingress_ifindex;
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: size_of_val(&ctx) as u32,
        ctx_in: ctx.as_ptr() as u64,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(TestRun {
        retval: attr.retval as i32,
        duration_ns: attr.duration,
    })
}

/// A socket lookup, as `struct bpf_sk_lookup` carries it into a test run.
#[derive(Clone, Copy, Debug)]
pub struct SkLookupRun {
    /// The IP protocol number (TCP or UDP).
    pub protocol: u8,
    pub remote: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
}

/// Runs a socket-lookup program once on `lookup`; returns its verdict (1 pass, 0 drop).
/// The kernel takes no receiving interface for a test run: `ingress_ifindex` reads 0 (not
/// lo, so the lookup counts as coming from outside).
pub fn test_run_sk_lookup(prog: BorrowedFd<'_>, lookup: &SkLookupRun) -> io::Result<u32> {
    use std::net::IpAddr;
    // struct bpf_sk_lookup: the u64 socket/cookie union, then u32 fields.
    let mut ctx = [0u32; 18];
    let family_words = |addr: IpAddr| -> (u32, [u32; 4]) {
        match addr {
            IpAddr::V4(v4) => (2, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                (10, [word(0), word(4), word(8), word(12)])
            }
        }
    };
    let (family, remote) = family_words(lookup.remote.ip());
    let (_, local) = family_words(lookup.local.ip());
    ctx[2] = family;
    ctx[3] = u32::from(lookup.protocol);
    if family == 2 {
        ctx[4] = remote[0];
        ctx[10] = local[0];
    } else {
        ctx[5..9].copy_from_slice(&remote);
        ctx[11..15].copy_from_slice(&local);
    }
    ctx[9] = u32::from(lookup.remote.port().to_be());
    ctx[15] = u32::from(lookup.local.port());
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        repeat: 1,
        ctx_size_in: size_of_val(&ctx) as u32,
        ctx_in: ctx.as_ptr() as u64,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(attr.retval)
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens the BPF object (map, program, link) pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let pathname = c_path(path)?;
    let mut get = ObjGetAttr {
        pathname: pathname.as_ptr() as u64,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the BPF object behind `fd` at `path`.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let pathname = c_path(path)?;
    let mut pin = ObjGetAttr {
        pathname: pathname.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_OBJ_PIN, &mut pin).map(drop)
}

/// Detaches the link pinned at `path` (its programs stop running at once).
pub fn detach_pinned_link(path: &Path) -> io::Result<()> {
    let fd = obj_get(path)?;
    let mut detach = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    match sys_bpf(BPF_LINK_DETACH, &mut detach) {
        // A link whose interface is gone is already detached.
        Err(err) if err.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        other => other.map(drop),
    }
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Swaps the program behind `link` for `program` in one step (BPF_LINK_UPDATE): the hook
/// never runs without a program.
pub fn update_link(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

pub fn ifindex(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The filesystem magic number of `path`'s filesystem.
pub fn fs_type(path: &Path) -> Option<i64> {
    let path = CString::new(path.as_os_str().as_bytes()).ok()?;
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
