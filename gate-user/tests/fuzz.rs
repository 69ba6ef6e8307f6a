//! The gate's TC programs under bad input: structured mutations of valid frames (header
//! fields, lengths, options, extension headers, VLAN tags, ICMP errors, truncation at every
//! byte) and random frames, run through BPF_PROG_TEST_RUN in the real kernel. After every
//! frame the invariants a firewall must keep are checked:
//!
//! - `toward_containers` returns pass or drop, and exactly one pass or drop counter moved;
//! - a dropped frame created no flow; a flow is created only by a pass counted as
//!   `new_allowed` (nothing from outside creates state unless an allowed new connection);
//! - `from_containers` never drops;
//! - the established connection kept aside keeps passing (its ACK is sent every 64 frames).
//!
//! - `from_uplinks` returns pass or drop and creates no flow.
//!
//! Seeded and bounded: `PORTGATE_FUZZ_FRAMES` frames (default 200 000 in tests,
//! more with `cargo xtask fuzz`), `PORTGATE_FUZZ_SEED` (default: fixed, so CI is
//! reproducible). A failing frame is saved as hex under `target/fuzz/` and named in the
//! panic, with the seed and index that reproduce it. Needs root.

mod support;

use std::time::Instant;

use support::*;

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

const ETH_HEADER: usize = 14;
/// An Ethernet and an IPv6 header: shorter frames the test run may refuse to run.
const SHORT_L3: usize = ETH_HEADER + 40;

/// The established connection the fuzzer keeps checking (a tuple no seed frame uses).
const KEPT_PORT: u16 = 55_555;

/// Valid frames of every shape the parser knows, toward the container and from it.
fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (dport, flags) in [
        (80, SYN),
        (80, ACK),
        (81, SYN),
        (80, FIN_ACK),
        (80, RST),
        (443, SYN_ACK),
    ] {
        seeds.push(tcp4(REMOTE4, CONTAINER4, 40000, dport, flags));
        seeds.push(tcp6(REMOTE6, CONTAINER6, 40000, dport, flags));
    }
    seeds.push(udp4(REMOTE4, CONTAINER4, 40000, 53));
    seeds.push(udp6(REMOTE6, CONTAINER6, 40000, 53));
    seeds.push(echo4(REMOTE4, CONTAINER4, 7, true));
    seeds.push(echo6(REMOTE6, CONTAINER6, 7, true));
    seeds.push(echo4(REMOTE4, CONTAINER4, 7, false));
    let offending4 = tcp4(CONTAINER4, REMOTE4, 80, 40000, SYN_ACK);
    seeds.push(icmp4_error([10, 98, 0, 1], CONTAINER4, &offending4[14..]));
    let offending6 = tcp6(CONTAINER6, REMOTE6, 80, 40000, SYN_ACK);
    seeds.push(icmp6_error(REMOTE6, CONTAINER6, &offending6[14..]));
    let syn6 = tcp6(REMOTE6, CONTAINER6, 40000, 80, SYN);
    seeds.push(with_ipv6_extensions(syn6.clone(), 0, &ext_header(6)));
    let mut two = ext_header(60).to_vec();
    two.extend_from_slice(&ext_header(6));
    seeds.push(with_ipv6_extensions(syn6, 0, &two));
    // IPv4 with options (IHL 6).
    let mut options = tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN);
    options[14] = 0x46;
    let total = u16::from_be_bytes([options[16], options[17]]) + 4;
    options[16..18].copy_from_slice(&total.to_be_bytes());
    options.splice(34..34, [1, 1, 1, 0]);
    seeds.push(options);
    // A VLAN tag (802.1Q) in front of the IPv4 header.
    let mut vlan = tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN);
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
    seeds.push(vlan);
    // A fragment.
    let mut fragment = udp4(REMOTE4, CONTAINER4, 40000, 53);
    fragment[20] = 0x20;
    seeds.push(fragment);
    seeds
}

/// One mutation of `frame`: a field set to a boundary value, bytes flipped, the frame
/// truncated or extended, bytes inserted or removed, or another seed spliced in.
fn mutate(rng: &mut Rng, frame: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = frame.to_vec();
    for _ in 0..=rng.below(3) {
        if out.is_empty() {
            out.push(rng.byte());
        }
        let at = rng.below(out.len());
        match rng.below(8) {
            0 => out[at] ^= 1 << rng.below(8),
            1 => out[at] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)],
            2 => {
                // A 16-bit field (lengths, ports, ethertypes) set to a boundary value.
                let value: u16 = [0, 1, 20, 40, 0x7fff, 0xffff][rng.below(6)];
                if at + 1 < out.len() {
                    out[at..at + 2].copy_from_slice(&value.to_be_bytes());
                }
            }
            3 => out.truncate(at),
            4 => out
                .splice(at..at, (0..rng.below(16)).map(|_| rng.byte()))
                .for_each(drop),
            5 => {
                let end = (at + rng.below(16)).min(out.len());
                out.drain(at..end);
            }
            6 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                let len = rng.below(other.len() - from + 1);
                let end = (at + len).min(out.len());
                out.splice(at..end, other[from..from + len].iter().copied())
                    .for_each(drop);
            }
            _ => {
                // The header fields that steer the parser: the ethertype, IHL, IPv6 next header.
                let spots = [12usize, 13, 14, 20, 23];
                let spot = spots[rng.below(spots.len())];
                if spot < out.len() {
                    out[spot] = rng.byte();
                }
            }
        }
    }
    out
}

fn frames_to_run() -> usize {
    std::env::var("PORTGATE_FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

fn seed() -> u64 {
    std::env::var("PORTGATE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe)
        .max(1)
}

/// Pass and drop counters summed, flows created, and new connections admitted.
fn tally(gate: &Gate) -> (u64, u64, u64, u64) {
    let values = gate.datapath.counters().expect("counters");
    let (mut passes, mut drops) = (0, 0);
    for (index, _, kind) in counters::ALL {
        let value = values[*index as usize];
        match kind {
            counters::Kind::Pass => passes += value,
            counters::Kind::Drop => drops += value,
            counters::Kind::Event => {}
        }
    }
    let created = values[counters::FLOW_CREATED as usize];
    let admitted = values[counters::PASS_NEW_ALLOWED as usize];
    (passes, drops, created, admitted)
}

/// Saves the frame that broke an invariant and fails with how to reproduce it.
fn fail(frame: &[u8], seed: u64, index: usize, what: &str) -> ! {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("failure-{seed}-{index}.hex"));
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    let _ = std::fs::write(&path, format!("{hex}\n"));
    panic!(
        "{what}; frame {index} of seed {seed} saved as {} ({} bytes: {hex})",
        path.display(),
        frame.len()
    );
}

#[test]
fn mutated_and_random_frames_keep_the_gates_invariants() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80/tcp");
    gate.allow("10.99.0.2", "53/udp");
    gate.allow("10.99.0.2", "icmp");
    gate.allow("fd99::2", "80/tcp");
    gate.allow("10.99.0.2", &format!("{KEPT_PORT}/tcp"));
    // The connection kept aside: opened from outside, answered, established.
    let kept_syn = tcp4(REMOTE4, CONTAINER4, KEPT_PORT, KEPT_PORT, SYN);
    assert_eq!(gate.toward(&kept_syn), Verdict::Pass);
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, KEPT_PORT, KEPT_PORT, SYN_ACK));
    let kept_ack = tcp4(REMOTE4, CONTAINER4, KEPT_PORT, KEPT_PORT, ACK);
    assert_eq!(gate.toward(&kept_ack), Verdict::Pass);
    // For the uplink program: the container's address stands for the host's, with port 81
    // published and refused, port 80 published and admitted.
    {
        use gate_common::{AllowKey, AllowValue, NO_RULE, PROTO_TCP};
        let local = [ipv4_mapped(CONTAINER4), CONTAINER6].into();
        gate.datapath
            .sync_local_addrs(&local)
            .expect("local addresses");
        let published = [
            (
                AllowKey::new([0; 16], PROTO_TCP, 81),
                AllowValue::any_source(NO_RULE),
            ),
            (
                AllowKey::new([0; 16], PROTO_TCP, 80),
                AllowValue::any_source(0),
            ),
        ]
        .into();
        gate.datapath
            .sync_host_ports(&published)
            .expect("host ports");
    }

    let seeds = seeds();
    let (seed, frames) = (seed(), frames_to_run());
    let mut rng = Rng(seed);
    let started = Instant::now();
    let (mut passed, mut dropped, mut short) = (0u64, 0u64, 0u64);
    for index in 0..frames {
        let frame = if rng.below(10) == 0 {
            (0..rng.below(200)).map(|_| rng.byte()).collect()
        } else {
            let base = rng.below(seeds.len());
            mutate(&mut rng, &seeds[base], &seeds)
        };
        // The kernel runs nothing shorter than an Ethernet header (no such frame reaches TC).
        if frame.len() < ETH_HEADER {
            short += 1;
            continue;
        }
        let (passes, drops, created, admitted) = tally(&gate);
        let fd = gate
            .datapath
            .program_fd(program_names::TOWARD_CONTAINERS)
            .expect("program fd");
        let run = match sys::test_run(fd, &frame, FORWARDED, 1) {
            Ok(run) => run,
            // The test run refuses frames whose network header is cut short (a device would
            // still deliver them); nothing ran, nothing to check.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) && frame.len() < SHORT_L3 => {
                short += 1;
                continue;
            }
            Err(err) => fail(&frame, seed, index, &format!("BPF_PROG_TEST_RUN: {err}")),
        };
        let (passes_after, drops_after, created_after, admitted_after) = tally(&gate);
        let verdicts = (passes_after - passes) + (drops_after - drops);
        match run.retval {
            -1 => passed += 1,
            2 => dropped += 1,
            other => fail(&frame, seed, index, &format!("undefined verdict {other}")),
        }
        if verdicts != 1 {
            fail(
                &frame,
                seed,
                index,
                &format!("{verdicts} verdict counters moved, not 1"),
            );
        }
        if run.retval == 2 && created_after != created {
            fail(&frame, seed, index, "a dropped frame created a flow");
        }
        if created_after - created > admitted_after - admitted {
            fail(
                &frame,
                seed,
                index,
                "a flow was created by something else than an allowed new connection",
            );
        }
        // The same frame as if a container sent it: never dropped.
        let fd = gate
            .datapath
            .program_fd(program_names::FROM_CONTAINERS)
            .expect("program fd");
        let run = match sys::test_run(fd, &frame, FORWARDED, 1) {
            Ok(run) => run,
            Err(err) => fail(&frame, seed, index, &format!("BPF_PROG_TEST_RUN: {err}")),
        };
        if run.retval != -1 {
            fail(
                &frame,
                seed,
                index,
                &format!(
                    "from_containers returned {} (it must never drop)",
                    run.retval
                ),
            );
        }
        // And as it arrives on an uplink, before conntrack.
        let (.., created, _) = tally(&gate);
        let fd = gate
            .datapath
            .program_fd(program_names::FROM_UPLINKS)
            .expect("program fd");
        let run = match sys::test_run(fd, &frame, FORWARDED, 1) {
            Ok(run) => run,
            Err(err) => fail(&frame, seed, index, &format!("BPF_PROG_TEST_RUN: {err}")),
        };
        if run.retval != -1 && run.retval != 2 {
            fail(
                &frame,
                seed,
                index,
                &format!("from_uplinks: undefined verdict {}", run.retval),
            );
        }
        if tally(&gate).2 != created {
            fail(&frame, seed, index, "from_uplinks created a flow");
        }
        if index % 64 == 0 && gate.toward(&kept_ack) != Verdict::Pass {
            fail(
                &frame,
                seed,
                index,
                "the established connection stopped passing after this frame",
            );
        }
    }
    eprintln!(
        "fuzz: {frames} frames (seed {seed}) in {:.1} s: toward_containers passed {passed}, dropped {dropped}; {short} too short to run",
        started.elapsed().as_secs_f64()
    );
    assert!(
        passed > 0 && dropped > 0,
        "the mutations should reach both verdicts"
    );
}
