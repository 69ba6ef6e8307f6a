//! The BPF system calls portgate makes itself (aya 0.14 does not wrap them): BPF_OBJ_GET and
//! BPF_OBJ_PIN, BPF_PROG_TEST_RUN (TC and socket-lookup programs), BPF_LINK_UPDATE and
//! BPF_LINK_DETACH, BPF_LINK_CREATE; and entering network namespaces (`netns`). Shared by the
//! agent, the bench, xtask and the tests; no aya, so xtask can build it before setup has
//! installed bpf-linker.

pub mod netns;

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

pub const BPF_OBJ_PIN: libc::c_long = 6;
pub const BPF_OBJ_GET: libc::c_long = 7;
pub const BPF_PROG_TEST_RUN: libc::c_long = 10;
pub const BPF_PROG_QUERY: libc::c_long = 16;
pub const BPF_LINK_CREATE: libc::c_long = 28;
pub const BPF_LINK_UPDATE: libc::c_long = 29;
pub const BPF_LINK_DETACH: libc::c_long = 34;

/// TCX attach points (`enum bpf_attach_type`), for [`tcx_programs`].
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;
/// Cgroup attach points, for [`link_create`].
pub const BPF_CGROUP_INET4_POST_BIND: u32 = 12;
pub const BPF_CGROUP_INET6_POST_BIND: u32 = 13;
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;

/// Size of the kernel's `struct __sk_buff`, the context of a TC program's test run.
const SK_BUFF_CTX_WORDS: usize = 48;
/// Word index of `__sk_buff.ingress_ifindex` (byte offset 36).
const INGRESS_IFINDEX_WORD: usize = 9;

/// The bpf(2) system call with one `bpf_attr` variant.
pub fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
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

/// `path` as a C string.
pub fn c_path(path: &Path) -> io::Result<CString> {
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

/// `bpf_attr` of BPF_LINK_CREATE, up to the fields a cgroup link uses.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// Attaches `program` to `target` (a cgroup's directory) at `attach_type` as a new link
/// (BPF_LINK_CREATE), beside whatever else is attached there.
pub fn link_create(
    program: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new file descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
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

pub const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `bpf_attr` of the map batch commands (BPF_MAP_LOOKUP_BATCH, _UPDATE_BATCH, _DELETE_BATCH).
#[repr(C)]
#[derive(Default)]
pub struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

/// The number of entries in a hash map (also LRU), read in batches of a few thousand
/// (BPF_MAP_LOOKUP_BATCH), not one system call per entry. `value_size` is the value's size
/// as the kernel copies it (for per-CPU maps: rounded to 8, times the CPUs).
pub fn count_entries(map: BorrowedFd<'_>, key_size: usize, value_size: usize) -> io::Result<usize> {
    const CHUNK: usize = 4_096;
    let mut keys = vec![0u8; CHUNK * key_size];
    let mut values = vec![0u8; CHUNK * value_size];
    // The batch token of hash maps is a bucket index; 8 bytes hold it.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut total = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u64 as u64
            },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        total += attr.count as usize;
        match result {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(total),
            Err(err) => return Err(err),
        }
        token_in = token_out;
        first = false;
    }
}

/// `bpf_attr` of BPF_PROG_QUERY.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// The ids of the programs attached through TCX at `attach_type` ([`BPF_TCX_INGRESS`] or
/// [`BPF_TCX_EGRESS`]) of interface `ifindex` (in the calling thread's network namespace), in
/// the order they run. At most 64.
pub fn tcx_programs(ifindex: u32, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_ifindex: ifindex,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        count: ids.len() as u32,
        ..QueryAttr::default()
    };
    // The kernel writes at most `count` ids into `ids`, which outlives the call.
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.count as usize);
    Ok(ids)
}

/// Up to `count` entries of an array map (also per-CPU) from index `first` on, in one system
/// call (BPF_MAP_LOOKUP_BATCH): their indices, and their values back to back, `value_size`
/// bytes each (for per-CPU maps: the value rounded to 8 bytes, times the possible CPUs).
/// Fewer come back at the end of the array.
pub fn lookup_array_batch(
    map: BorrowedFd<'_>,
    first: u32,
    count: u32,
    value_size: usize,
) -> io::Result<(Vec<u32>, Vec<u8>)> {
    let mut keys = vec![0u32; count as usize];
    let mut values = vec![0u8; count as usize * value_size];
    // The batch continues after the key in `in_batch`: the one before `first` (none for 0).
    let before = first.wrapping_sub(1);
    let mut token_out = 0u32;
    let mut attr = BatchAttr {
        in_batch: if first == 0 {
            0
        } else {
            &before as *const u32 as u64
        },
        out_batch: &mut token_out as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(_) => {}
        // The end of the array: what was read is in `count`.
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
        Err(err) => return Err(err),
    }
    let read = attr.count as usize;
    keys.truncate(read);
    values.truncate(read * value_size);
    Ok((keys, values))
}
