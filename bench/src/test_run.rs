//! The gate program's own cost per packet, through BPF_PROG_TEST_RUN.
//!
//! The real agent loads and pins the gate (rules file with N allow entries, `--max-flows`
//! large enough for a million flows) on a bridge that never carries traffic, then stops; the
//! bench opens the pinned program and maps (BPF_OBJ_GET), fills the tracking map with
//! established flows (BPF_MAP_UPDATE_BATCH) and runs the program on crafted frames:
//! - new-connection path: a SYN to an allowed port from a source never seen (flow lookup
//!   misses, allow lookup hits, a flow is inserted);
//! - tracked path: an ACK of one of the filled flows, picked at random (lookup hits, the
//!   entry is refreshed).
//!
//! Every frame is different and runs once (`repeat` 1): with a larger repeat the SYN's second
//! run would already find its flow. The kernel's figure for one run includes reading the
//! clock around it, so the bench also reports the floor: the same call on a frame the program
//! passes at once (sent by the host itself).
//!
//! Only raw bpf(2) calls here (portgate-bpf-sys, shared with the agent), no aya: xtask must
//! build before `cargo xtask setup` has installed what building the eBPF object needs.
use std::{
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use gate_common::{
    AllowKey, AllowValue, BLOCK_FIXED_BITS, BlockKey, Config, FLOW_REPLIED, FlowKey, FlowState,
    NO_RULE, ORIGIN_REMOTE, PROTO_TCP, PROTO_UDP, SOURCE_FIXED_BITS, SourceKey, SourceValue,
    ipv4_mapped, map_names, program_names, tcp,
};
use portgate_bpf_sys::{BatchAttr, sys_bpf};

use super::{
    filters::{self, Agent, Entry, HTTP_PORT, Proto, Setup},
    topo::{PROG_BRIDGE, SERVER_IP, Topology},
};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Any non-zero receiving interface: the frame looks forwarded, not sent by the host.
const FORWARDED: u32 = 7;
const FROM_HOST: u32 = 0;
const TC_ACT_UNSPEC: i32 = -1;

/// The big fill of the tracking map; its capacity is a little larger, so the fill and the
/// measurement's new flows fit without LRU eviction skewing the count.
pub const MILLION: usize = 1_000_000;
pub const PROG_FLOW_CAPACITY: u32 = 1 << 20;

/// Per-packet cost at one N, in nanoseconds (medians over `samples` distinct frames).
#[derive(Clone, Debug, Default)]
pub struct ProgCost {
    pub n: usize,
    /// Allow-map entries read back from the map.
    pub allow_entries: usize,
    pub floor_ns: f64,
    /// (flows in the table, new-connection ns, tracked ns)
    pub fills: Vec<(usize, f64, f64)>,
    pub samples: usize,
}

/// A new connection's cost when its rule names sources, or a block list is in force: the
/// same SYNs as the new-connection path, medians in nanoseconds, against the plain rule
/// measured in the same interleaved rounds.
#[derive(Clone, Debug, Default)]
pub struct SourceCost {
    /// (what, median ns).
    pub cases: Vec<(String, f64)>,
    pub samples: usize,
}

/// The pinned object at `path`, opened.
pub(super) fn obj_get(path: &Path) -> Result<OwnedFd> {
    portgate_bpf_sys::obj_get(path).with_context(|| format!("BPF_OBJ_GET {}", path.display()))
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// Inserts `keys[i] -> values[i]`, in batches (one element at a time where the kernel has no
/// batch update for the map).
fn update_all<K, V>(map: &OwnedFd, keys: &[K], values: &[V]) -> Result<()> {
    const CHUNK: usize = 16_384;
    assert_eq!(keys.len(), values.len());
    let mut done = 0;
    let mut batch_works = true;
    while done < keys.len() {
        let end = (done + CHUNK).min(keys.len());
        if batch_works {
            let mut attr = BatchAttr {
                keys: keys[done..].as_ptr() as u64,
                values: values[done..].as_ptr() as u64,
                count: (end - done) as u32,
                map_fd: map.as_raw_fd() as u32,
                ..Default::default()
            };
            match sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
                Ok(_) => {
                    done = end;
                    continue;
                }
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) && done == 0 => {
                    batch_works = false;
                }
                Err(err) => return Err(err).context("BPF_MAP_UPDATE_BATCH"),
            }
        }
        for i in done..end {
            let mut attr = ElemAttr {
                map_fd: map.as_raw_fd() as u32,
                key: (&keys[i] as *const K) as u64,
                value_or_next_key: (&values[i] as *const V) as u64,
                ..Default::default()
            };
            sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("BPF_MAP_UPDATE_ELEM")?;
        }
        done = end;
    }
    Ok(())
}

/// Deletes `keys`, in batches (one at a time where the kernel has no batch delete).
fn delete_all<K>(map: &OwnedFd, keys: &[K]) -> Result<()> {
    const CHUNK: usize = 16_384;
    for chunk in keys.chunks(CHUNK) {
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        match sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                for key in chunk {
                    let mut attr = ElemAttr {
                        map_fd: map.as_raw_fd() as u32,
                        key: (key as *const K) as u64,
                        ..Default::default()
                    };
                    sys_bpf(BPF_MAP_DELETE_ELEM, &mut attr).context("BPF_MAP_DELETE_ELEM")?;
                }
            }
            Err(err) => return Err(err).context("BPF_MAP_DELETE_BATCH"),
        }
    }
    Ok(())
}

/// Entries in a hash map, walked with BPF_MAP_GET_NEXT_KEY.
fn count_entries<K: Copy>(map: &OwnedFd, zero: K) -> Result<usize> {
    let mut key = zero;
    let mut next = zero;
    let mut count = 0;
    let mut first = true;
    loop {
        let mut attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: if first { 0 } else { (&key as *const K) as u64 },
            value_or_next_key: (&mut next as *mut K) as u64,
            ..Default::default()
        };
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                count += 1;
                key = next;
                first = false;
            }
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(count),
            Err(err) => return Err(err).context("BPF_MAP_GET_NEXT_KEY"),
        }
    }
}

/// Runs the program once on `frame`; (return value, nanoseconds as the kernel measured).
fn test_run(prog: &OwnedFd, frame: &[u8], ingress_ifindex: u32) -> Result<(i32, u32)> {
    let run = portgate_bpf_sys::test_run(prog.as_fd(), frame, ingress_ifindex, 1)
        .context("BPF_PROG_TEST_RUN")?;
    Ok((run.retval, run.duration_ns))
}

/// An Ethernet + IPv4 + TCP frame (no options, no payload).
fn tcp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> [u8; 54] {
    let mut f = [0u8; 54];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = PROTO_TCP;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let sum = ip_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let tcp_hdr = &mut f[34..54];
    tcp_hdr[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp_hdr[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp_hdr[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp_hdr[12] = 5 << 4;
    tcp_hdr[13] = flags;
    tcp_hdr[14..16].copy_from_slice(&64240u16.to_be_bytes());
    f
}

fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The remote address of filled flow `i` (10.100.0.0 and up; never a real address).
fn remote_of(i: usize) -> [u8; 4] {
    [10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8]
}

/// The remote address of new-connection sample `i` (10.200.0.0 and up: never filled).
fn new_remote_of(i: usize) -> [u8; 4] {
    [10, 200 + (i >> 16) as u8, (i >> 8) as u8, i as u8]
}

const REMOTE_PORT: u16 = 40_000;

fn monotonic_ns() -> u64 {
    // SAFETY: `timespec` is plain integers, for which all zeroes is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes only into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Adds established flows `from..to` (remote addresses [`remote_of`]) to the tracking map.
fn fill_flows(flows: &OwnedFd, from: usize, to: usize) -> Result<()> {
    let now = monotonic_ns();
    let container = ipv4_mapped(SERVER_IP);
    let keys: Vec<FlowKey> = (from..to)
        .map(|i| FlowKey {
            container_addr: container,
            remote_addr: ipv4_mapped(remote_of(i)),
            container_port: HTTP_PORT,
            remote_port: REMOTE_PORT,
            proto: PROTO_TCP,
            _pad: [0; 3],
        })
        .collect();
    let values = vec![
        FlowState {
            last_seen_ns: now,
            rule_id: 0,
            tcp_state: tcp::ESTABLISHED,
            origin: ORIGIN_REMOTE,
            flags: FLOW_REPLIED,
            _pad: 0,
        };
        keys.len()
    ];
    update_all(flows, &keys, &values)
}

fn median(mut v: Vec<u32>) -> f64 {
    v.sort_unstable();
    if v.is_empty() {
        return f64::NAN;
    }
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        f64::from(v[mid])
    } else {
        (f64::from(v[mid - 1]) + f64::from(v[mid])) / 2.0
    }
}

/// The allow-map key of an entry, as the agent writes it.
fn allow_key(entry: &Entry) -> AllowKey {
    let proto = match entry.proto {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
    };
    AllowKey::new(ipv4_mapped(entry.addr), proto, entry.port)
}

/// The pinned gate, opened for test runs.
struct Gate {
    prog: OwnedFd,
    allow: OwnedFd,
    flows: OwnedFd,
    /// Entries in the allow map: always `filters::entries(allow_n)`.
    allow_n: usize,
    /// Flows `0..filled` of [`remote_of`] are in the tracking map.
    filled: usize,
    /// Next new-connection sample ([`new_remote_of`]).
    next_new: usize,
    /// Next tracked sample (spread over the filled flows).
    next_tracked: usize,
}

impl Gate {
    /// Makes the allow map hold `filters::entries(n)`: N-3 decoys and the used ports. The
    /// decoys of a smaller N are a prefix of a larger N's, so only the difference changes.
    fn resize_allow(&mut self, n: usize) -> Result<()> {
        let used = filters::USED.len();
        let all = filters::entries(n.max(self.allow_n));
        let (lo, hi) = (self.allow_n.min(n) - used, self.allow_n.max(n) - used);
        let keys: Vec<AllowKey> = all[lo..hi].iter().map(allow_key).collect();
        if n > self.allow_n {
            let values = vec![AllowValue::any_source(0); keys.len()];
            update_all(&self.allow, &keys, &values)?;
        } else if n < self.allow_n {
            delete_all(&self.allow, &keys)?;
        }
        self.allow_n = n;
        let found = count_entries(&self.allow, AllowKey::new([0; 16], 0, 0))?;
        if found != n {
            bail!("the allow map holds {found} entries, expected {n}");
        }
        Ok(())
    }

    fn fill_to(&mut self, flows: usize) -> Result<()> {
        if flows > self.filled {
            fill_flows(&self.flows, self.filled, flows)?;
            self.filled = flows;
        }
        Ok(())
    }

    fn flows_in_table(&self) -> Result<usize> {
        let zero = FlowKey {
            container_addr: [0; 16],
            remote_addr: [0; 16],
            container_port: 0,
            remote_port: 0,
            proto: 0,
            _pad: [0; 3],
        };
        count_entries(&self.flows, zero)
    }

    fn floor(&self, samples: usize, out: &mut Vec<u32>) -> Result<()> {
        let frame = tcp_frame(remote_of(0), SERVER_IP, REMOTE_PORT, HTTP_PORT, tcp::ACK);
        for _ in 0..samples {
            out.push(test_run(&self.prog, &frame, FROM_HOST)?.1);
        }
        Ok(())
    }

    /// ACKs of filled flows, spread over the whole table.
    fn tracked(&mut self, samples: usize, out: &mut Vec<u32>) -> Result<()> {
        for _ in 0..samples {
            let i = self.next_tracked.wrapping_mul(2_654_435_761) % self.filled.max(1);
            self.next_tracked += 1;
            let frame = tcp_frame(remote_of(i), SERVER_IP, REMOTE_PORT, HTTP_PORT, tcp::ACK);
            let (ret, ns) = test_run(&self.prog, &frame, FORWARDED)?;
            if ret != TC_ACT_UNSPEC {
                bail!("the gate did not pass an ACK of a tracked flow (returned {ret})");
            }
            out.push(ns);
        }
        Ok(())
    }

    /// SYNs from sources never seen, to an allowed port.
    fn new_connections(&mut self, samples: usize, out: &mut Vec<u32>) -> Result<()> {
        for _ in 0..samples {
            let i = self.next_new;
            self.next_new += 1;
            let frame = tcp_frame(
                new_remote_of(i),
                SERVER_IP,
                REMOTE_PORT,
                HTTP_PORT,
                tcp::SYN,
            );
            let (ret, ns) = test_run(&self.prog, &frame, FORWARDED)?;
            if ret != TC_ACT_UNSPEC {
                bail!("the gate did not pass a SYN to an allowed port (returned {ret})");
            }
            out.push(ns);
        }
        Ok(())
    }
}

/// A key of an LPM trie as the kernel takes it: the prefix length, then the data.
#[repr(C)]
#[derive(Clone, Copy)]
struct LpmKey<K> {
    prefix_len: u32,
    data: K,
}

/// The cases of [`SourceCost`]: (label, the allow value of the measured port, the block
/// generation in force).
const SOURCE_CASES: [(&str, u32, u32); 4] = [
    ("plain rule (one hash lookup)", 0, 0),
    ("rule with a set of 1 prefix", 1, 0),
    ("rule with a set of 10 000 prefixes", 2, 0),
    ("plain rule, 100 000-entry block list", 0, 1),
];

/// Writes the access lists and the block list [`SOURCE_CASES`] switch between: list 1 holds
/// the prefix that admits the samples (10.192.0.0/10), list 2 the same and 9 999 decoy
/// addresses on the same path through the trie (10.128.0.0/10); generation 1 of the block
/// list holds 100 000 addresses the samples never use (10.64.0.0/15).
fn write_source_lists(sources: &OwnedFd, blocked: &OwnedFd) -> Result<()> {
    let entry = |access: u32, addr: [u8; 4], bits: u32, rule_id: u32| {
        let key = LpmKey {
            prefix_len: SOURCE_FIXED_BITS + 96 + bits,
            data: SourceKey {
                access,
                ifindex: 0,
                addr: ipv4_mapped(addr),
            },
        };
        (key, SourceValue { rule_id })
    };
    let marker = |access: u32| {
        let key = LpmKey {
            prefix_len: SOURCE_FIXED_BITS,
            data: SourceKey {
                access,
                ifindex: 0,
                addr: [0; 16],
            },
        };
        (key, SourceValue { rule_id: NO_RULE })
    };
    let mut entries = vec![
        entry(1, [10, 192, 0, 0], 10, 0),
        marker(1),
        entry(2, [10, 192, 0, 0], 10, 0),
        marker(2),
    ];
    entries.extend((0..9_999usize).map(|i| {
        entry(
            2,
            [10, 128 + (i >> 16) as u8, (i >> 8) as u8, i as u8],
            32,
            0,
        )
    }));
    let (keys, values): (Vec<_>, Vec<_>) = entries.into_iter().unzip();
    update_all(sources, &keys, &values).context("writing the access lists")?;
    let blocks: Vec<LpmKey<BlockKey>> = (0..100_000usize)
        .map(|i| LpmKey {
            prefix_len: BLOCK_FIXED_BITS + 128,
            data: BlockKey {
                generation: 1,
                addr: ipv4_mapped([10, 64 + (i >> 16) as u8, (i >> 8) as u8, i as u8]),
            },
        })
        .collect();
    update_all(blocked, &blocks, &vec![1u8; blocks.len()]).context("writing the block list")
}

/// Measures the program at every N of `ns` (ascending): first with the tracking map filled
/// to N flows, then with the same map at a million flows, in `rounds` interleaved rounds over
/// N, so that only the allow map differs between the figures of one column. `quiet` runs
/// before each batch (it waits for a quiet machine).
pub fn measure_all(
    topo: &Topology,
    setup: &Setup,
    cell: &str,
    ns: &[usize],
    rounds: usize,
    samples: usize,
    quiet: &mut dyn FnMut() -> Result<()>,
) -> Result<(Vec<ProgCost>, SourceCost)> {
    let first = *ns.first().context("no N")?;
    let dir = setup.work_dir.join(cell);
    let state = dir.join("state");
    std::fs::create_dir_all(&state)?;
    std::fs::write(
        state.join("rules.json"),
        serde_json::to_vec_pretty(&filters::portgate_rules(&filters::entries(first)))?,
    )?;
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/{cell}"));
    let mut agent = Agent::start(
        topo,
        setup,
        &dir,
        &bpffs,
        PROG_BRIDGE,
        Some(PROG_FLOW_CAPACITY),
        &[],
    )?;
    // The gate stays pinned; the maps are the bench's alone from here on.
    agent.stop()?;
    let root = bpffs.join(gate_common::LAYOUT_VERSION);
    let mut gate = Gate {
        prog: obj_get(&root.join("programs").join(program_names::TOWARD_CONTAINERS))?,
        allow: obj_get(&root.join("maps").join(map_names::ALLOW))?,
        flows: obj_get(&root.join("maps").join(map_names::FLOWS))?,
        allow_n: first,
        filled: 0,
        next_new: 0,
        next_tracked: 0,
    };
    let found = count_entries(&gate.allow, AllowKey::new([0; 16], 0, 0))?;
    if found != first {
        bail!("the agent wrote {found} allow-map entries, expected {first}");
    }

    let mut results: Vec<ProgCost> = ns
        .iter()
        .map(|&n| ProgCost {
            n,
            allow_entries: n,
            samples,
            ..Default::default()
        })
        .collect();
    let mut floors: Vec<Vec<u32>> = vec![Vec::new(); ns.len()];

    // The tracking map at N flows (growing with N).
    for (i, &n) in ns.iter().enumerate() {
        quiet()?;
        gate.resize_allow(n)?;
        gate.fill_to(n)?;
        let (mut new, mut tracked) = (Vec::new(), Vec::new());
        gate.floor(samples, &mut floors[i])?;
        gate.tracked(samples, &mut tracked)?;
        gate.new_connections(samples, &mut new)?;
        results[i]
            .fills
            .push((gate.flows_in_table()?, median(new), median(tracked)));
    }

    // The same tracking map at a million flows; rounds over N in rotated order.
    gate.fill_to(MILLION)?;
    let per_round = samples.div_ceil(rounds.max(1));
    let mut new: Vec<Vec<u32>> = vec![Vec::new(); ns.len()];
    let mut tracked: Vec<Vec<u32>> = vec![Vec::new(); ns.len()];
    for round in 0..rounds.max(1) {
        let mut order: Vec<usize> = (0..ns.len()).collect();
        order.rotate_left(round % ns.len());
        for i in order {
            quiet()?;
            gate.resize_allow(ns[i])?;
            gate.floor(per_round, &mut floors[i])?;
            gate.tracked(per_round, &mut tracked[i])?;
            gate.new_connections(per_round, &mut new[i])?;
        }
    }
    let in_table = gate.flows_in_table()?;

    // Sources and the block list, at the largest N and a million flows.
    let maps = root.join("maps");
    let sources_map = obj_get(&maps.join(map_names::SOURCES))?;
    let blocked_map = obj_get(&maps.join(map_names::BLOCKED))?;
    let config_map = obj_get(&maps.join(map_names::CONFIG))?;
    write_source_lists(&sources_map, &blocked_map)?;
    let measured = allow_key(&Entry {
        addr: SERVER_IP,
        proto: Proto::Tcp,
        port: HTTP_PORT,
    });
    let mut by_case: Vec<Vec<u32>> = vec![Vec::new(); SOURCE_CASES.len()];
    for round in 0..rounds.max(1) {
        let mut order: Vec<usize> = (0..SOURCE_CASES.len()).collect();
        order.rotate_left(round % SOURCE_CASES.len());
        for i in order {
            quiet()?;
            let (_, access, generation) = SOURCE_CASES[i];
            let value = AllowValue { rule_id: 0, access };
            update_all(&gate.allow, &[measured], &[value])?;
            let config = Config {
                flags: 0,
                block_generation: generation,
                ..Config::default()
            };
            update_all(&config_map, &[0u32], &[config])?;
            gate.new_connections(per_round, &mut by_case[i])?;
        }
    }
    update_all(&gate.allow, &[measured], &[AllowValue::any_source(0)])?;
    let sources = SourceCost {
        cases: SOURCE_CASES
            .iter()
            .zip(by_case)
            .map(|((label, _, _), runs)| ((*label).to_owned(), median(runs)))
            .collect(),
        samples: per_round * rounds.max(1),
    };

    for (i, result) in results.iter_mut().enumerate() {
        result.fills.push((
            in_table,
            median(std::mem::take(&mut new[i])),
            median(std::mem::take(&mut tracked[i])),
        ));
        result.floor_ns = median(std::mem::take(&mut floors[i]));
    }
    drop(gate);
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok((results, sources))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_a_valid_ip_checksum() {
        let f = tcp_frame([10, 98, 0, 2], SERVER_IP, 40000, 80, tcp::SYN);
        assert_eq!(ip_checksum(&f[14..34]), 0);
        assert_eq!(f[47], tcp::SYN);
    }

    #[test]
    fn sample_addresses_never_collide_with_filled_ones() {
        assert_ne!(remote_of(MILLION - 1), new_remote_of(0));
        assert!(remote_of(MILLION - 1)[1] < 200);
    }
}
