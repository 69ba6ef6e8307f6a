//! The gate's tables in the real kernel: a full allow map, pinned maps of another layout, an
//! older layout's flows adopted, the flow tables under a flood, per-rule counters. Needs root;
//! skipped with a message otherwise.

mod support;

use support::*;

#[test]
fn a_full_allow_map_applies_every_removal_and_leaves_out_what_does_not_fit() {
    let capacities = Capacities {
        allow: 2,
        ..Capacities::default()
    };
    let Some(mut gate) = Gate::load_with(GateConfig::default(), capacities) else {
        return;
    };
    let mut sport = 40000;
    let mut syn = |gate: &Gate, port| {
        sport += 1;
        gate.toward(&tcp4(REMOTE4, CONTAINER4, sport, port, SYN))
    };
    gate.rules
        .allow(target("10.99.0.2"), spec("80-81"), Access::default())
        .expect("allow");
    assert_eq!(gate.sync(), AllowSync::default(), "two entries fit in two");
    // One more than the map holds: saved, left out, reported by rule.
    gate.rules
        .allow(target("10.99.0.2"), spec("82"), Access::default())
        .expect("allow");
    let sync = gate.sync();
    assert_eq!(sync.not_fitted.into_iter().collect::<Vec<_>>(), [(1, 1)]);
    assert_eq!(gate.datapath.allow_entries().expect("entries"), 2);
    assert_eq!(syn(&gate, 80), Verdict::Pass);
    assert_eq!(syn(&gate, 81), Verdict::Pass);
    assert_eq!(syn(&gate, 82), Verdict::Drop, "left out: not enforced");
    // A deny while the map is full: its removal comes first, then the entry that waited
    // takes the freed room.
    gate.deny("10.99.0.2", "81");
    assert_eq!(syn(&gate, 81), Verdict::Drop, "denied");
    assert_eq!(syn(&gate, 82), Verdict::Pass, "fits now");
    assert_eq!(syn(&gate, 80), Verdict::Pass);
    assert_eq!(gate.sync(), AllowSync::default());
}

/// Removes a test's pin directory, whatever is in it, on drop.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_pinned_map_with_another_layout_is_refused_not_reused_or_replaced() {
    if !portgate_test_support::require_root("pins maps, loads eBPF programs") {
        return;
    }
    if std::process::Command::new("bpftool")
        .arg("version")
        .output()
        .is_err()
    {
        portgate_test_support::skip("bpftool not found (apt-get install bpftool)");
        return;
    }
    let dir = PathBuf::from(format!("/sys/fs/bpf/pgprog-{}-foreign", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let _ = std::fs::remove_dir_all(&dir);
    let maps = dir.join(gate_common::LAYOUT_VERSION).join("maps");
    std::fs::create_dir_all(&maps).expect("create the maps directory");
    // Where this layout's allow map is pinned, a map of another layout (a u32 key and value,
    // 8 entries), with an entry in it.
    let pin = maps.join(gate_common::map_names::ALLOW);
    let pin_str = pin.to_str().expect("UTF-8 path");
    bpftool_json(&[
        "map", "create", pin_str, "type", "hash", "key", "4", "value", "4", "entries", "8", "name",
        "ALLOW",
    ]);
    bpftool_json(&[
        "map", "update", "pinned", pin_str, "key", "1", "0", "0", "0", "value", "2", "0", "0", "0",
    ]);
    let show = || bpftool_json(&["map", "show", "pinned", pin_str]);
    let before = show();
    let dump = || bpftool_json(&["map", "dump", "pinned", pin_str]);
    let entries = dump();

    match Datapath::load(&dir, GateConfig::default()) {
        Ok(_) => panic!("a pinned map of another layout was reused"),
        Err(datapath::DatapathError::IncompatibleMap { path, detail }) => {
            assert_eq!(path, pin, "{detail}");
        }
        Err(other) => panic!("expected IncompatibleMap, got: {other}"),
    }

    // Not replaced: the same map (same id, type, sizes), with its entry.
    let after = show();
    assert_eq!(after["id"], before["id"], "replaced: {before} -> {after}");
    for field in ["type", "key", "value", "max_entries", "name"] {
        assert_eq!(after[field], before[field], "{field}: {before} -> {after}");
    }
    assert_eq!(dump(), entries, "the map's contents changed");
    // Not reused: nothing was loaded or pinned next to it.
    let pinned: Vec<_> = std::fs::read_dir(dir.join(gate_common::LAYOUT_VERSION))
        .expect("read the layout directory")
        .flat_map(|entry| {
            let entry = entry.expect("entry");
            std::fs::read_dir(entry.path())
                .map(|d| d.map(|e| e.expect("entry").path()).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(pinned, [pin], "only the foreign map may be pinned");
}

/// Four times the table's capacity of new connections, from outside to an allowed port and
/// from the container to many destinations: the 50 idle established connections all survive
/// (a new connection lives in the unreplied table until its first reply).
#[test]
fn a_flood_of_new_connections_evicts_no_established_one() {
    let capacities = Capacities {
        flows: 4_096,
        ..Capacities::default()
    };
    let Some(mut gate) = Gate::load_with(GateConfig::default(), capacities) else {
        return;
    };
    gate.allow("10.99.0.2", "80/tcp");
    let remote = |i: u32| [10, 98, (i >> 8) as u8, i as u8];
    for i in 0..50 {
        assert_eq!(
            gate.toward(&tcp4(remote(i), CONTAINER4, 40000, 80, SYN)),
            Verdict::Pass
        );
        gate.sent_by_container(&tcp4(CONTAINER4, remote(i), 80, 40000, SYN_ACK));
        assert_eq!(
            gate.toward(&tcp4(remote(i), CONTAINER4, 40000, 80, ACK)),
            Verdict::Pass
        );
    }
    assert_eq!(
        gate.datapath.tracked_flows().expect("count"),
        50,
        "counted in batches"
    );
    // Answered, as a listening container answers SYNs from forged sources, and as the
    // destinations a scanning container reaches answer it; never continued.
    let flood = 4 * capacities.flows;
    let source = |i: u32| [10, 200 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
    let destination = |i: u32| [10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
    for i in 0..flood {
        assert_eq!(
            gate.toward(&tcp4(source(i), CONTAINER4, 40000, 80, SYN)),
            Verdict::Pass
        );
        gate.sent_by_container(&tcp4(CONTAINER4, source(i), 80, 40000, SYN_ACK));
        gate.sent_by_container(&tcp4(CONTAINER4, destination(i), 50000, 443, SYN));
        assert_eq!(
            gate.toward(&tcp4(destination(i), CONTAINER4, 443, 50000, SYN_ACK)),
            Verdict::Pass
        );
    }
    // An LRU map evicts a little before it is full (each CPU keeps free entries of its own).
    let tracked = gate.datapath.tracked_flows().expect("count");
    assert!(
        tracked >= capacities.flows as usize * 3 / 4,
        "the flood filled the replied table ({tracked} flows tracked)"
    );
    let survivors = (0..50)
        .filter(|i| gate.toward(&tcp4(remote(*i), CONTAINER4, 40000, 80, ACK)) == Verdict::Pass)
        .count();
    assert_eq!(
        survivors, 50,
        "established connections evicted by the flood"
    );
    // The latest new connections are still tracked: their handshakes complete.
    let last = flood - 1;
    assert_eq!(
        gate.toward(&tcp4(source(last), CONTAINER4, 40000, 80, ACK)),
        Verdict::Pass
    );
    gate.sent_by_container(&tcp4(CONTAINER4, destination(last), 50000, 443, ACK));
    assert_eq!(
        gate.toward(&tcp4(destination(last), CONTAINER4, 443, 50000, ACK)),
        Verdict::Pass
    );
}

/// A closed connection's port pair reused for a new one: the new connection gets its own
/// state (the closed one, in the replied table, must not shadow it).
#[test]
fn a_reused_port_pair_is_a_new_connection() {
    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    let handshake = |gate: &Gate| {
        assert_eq!(
            gate.toward(&tcp4(REMOTE4, CONTAINER4, 41500, 80, SYN)),
            Verdict::Pass
        );
        gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 41500, SYN_ACK));
        assert_eq!(
            gate.toward(&tcp4(REMOTE4, CONTAINER4, 41500, 80, ACK)),
            Verdict::Pass
        );
    };
    handshake(&gate);
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 41500, RST));
    handshake(&gate);
    assert_eq!(gate.counter("flow_created"), 2);
    // The new connection is the tracked one: a reset ends it, and then a bare ACK is refused.
    gate.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 41500, RST));
    gate.expire_flows();
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 41500, 80, ACK)),
        Verdict::Drop
    );
}

/// An upgrade across layouts: the flows an older layout's tables track (here another gate's
/// tables, moved to where an older layout's are pinned) are copied into this layout's, so the
/// established connection passes the new programs; a table of another shape is left alone.
#[test]
fn an_older_layouts_tracked_flows_are_adopted() {
    let Some(mut older) = Gate::load(GateConfig::default()) else {
        return;
    };
    older.allow("10.99.0.2", "80");
    assert_eq!(
        older.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN)),
        Verdict::Pass
    );
    older.sent_by_container(&tcp4(CONTAINER4, REMOTE4, 80, 40000, SYN_ACK));
    // A connection request that got no answer yet.
    assert_eq!(
        older.toward(&tcp4(REMOTE4, CONTAINER4, 40001, 80, SYN)),
        Verdict::Pass
    );

    let Some(mut gate) = Gate::load(GateConfig::default()) else {
        return;
    };
    gate.allow("10.99.0.2", "80");
    let ack = tcp4(REMOTE4, CONTAINER4, 40000, 80, ACK);
    assert_eq!(gate.toward(&ack), Verdict::Drop, "not tracked here yet");
    let old_maps = gate.dir.join("v1").join("maps");
    std::fs::create_dir_all(old_maps.parent().expect("v1")).expect("v1");
    std::fs::rename(
        older.dir.join(gate_common::LAYOUT_VERSION).join("maps"),
        &old_maps,
    )
    .expect("move the older gate's maps to where an older layout's are");
    // And a layout whose flow table has another shape.
    let odd = gate.dir.join("v0").join("maps");
    std::fs::create_dir_all(&odd).expect("v0");
    let odd_flows = odd.join(gate_common::map_names::FLOWS);
    let odd_str = odd_flows.to_str().expect("UTF-8 path");
    bpftool_json(&[
        "map", "create", odd_str, "type", "lru_hash", "key", "4", "value", "4", "entries", "8",
        "name", "FLOWS",
    ]);
    bpftool_json(&[
        "map", "update", "pinned", odd_str, "key", "1", "0", "0", "0", "value", "2", "0", "0", "0",
    ]);
    let odd_map = bpftool_json(&["map", "show", "pinned", odd_str]);
    assert_eq!(
        (&odd_map["type"], &odd_map["bytes_key"]),
        (&serde_json::json!("lru_hash"), &serde_json::json!(4)),
        "the odd table is pinned, with its own shape: {odd_map}"
    );

    let adopted = gate.datapath.adopt_flows(&gate.dir).expect("adopt");
    assert_eq!(adopted, 2, "the answered and the unanswered connection");
    assert_eq!(gate.toward(&ack), Verdict::Pass, "the adopted connection");
    assert_eq!(
        gate.datapath.tracked_flows().expect("flows"),
        2,
        "one in each table"
    );
    assert_eq!(
        gate.datapath.adopt_flows(&gate.dir).expect("adopt again"),
        0,
        "a flow tracked here already is not replaced"
    );
    datapath::retire_other_layouts(&gate.dir).expect("retire");
    assert!(!old_maps.exists(), "the older layout's pins are gone");
    assert_eq!(gate.toward(&ack), Verdict::Pass);
}

/// `--max-rules 100000`: the per-rule counters are sized at load time; a saved rule with the
/// last saved id counts in its slot, read in a batch like the others, and a pinned counters
/// map of another size is refused.
#[test]
fn rule_counters_are_sized_by_max_rules_and_read_in_batches() {
    let capacities = Capacities {
        rules: 100_000,
        ..Capacities::default()
    };
    let Some(mut gate) = Gate::load_with(GateConfig::default(), capacities) else {
        return;
    };
    assert_eq!(
        bpftool_json(&[
            "map",
            "show",
            "pinned",
            gate.dir
                .join(gate_common::LAYOUT_VERSION)
                .join("maps")
                .join(gate_common::map_names::RULE_STATS)
                .to_str()
                .expect("UTF-8 path"),
        ])["max_entries"],
        200_000,
        "saved and derived rules' slots"
    );
    let rule = |id: u32, address: &str| gate_user::policy::Rule {
        id,
        target: target(address),
        ports: spec("80"),
        access: Access::default(),
    };
    gate.rules =
        gate_user::policy::RuleSet::new(vec![rule(0, "10.99.0.3"), rule(99_999, "10.99.0.2")])
            .with_limit(100_000);
    gate.sync();
    assert_eq!(
        gate.toward(&tcp4(REMOTE4, CONTAINER4, 40000, 80, SYN)),
        Verdict::Pass
    );
    let stats = gate
        .datapath
        .rule_stats_of([0, 99_999, 150_000, 250_000])
        .expect("stats");
    assert_eq!(stats[&99_999].packets, 1, "{stats:?}");
    assert_eq!(stats[&0].packets, 0);
    assert_eq!(stats[&150_000].packets, 0, "a derived slot, unused");
    assert!(!stats.contains_key(&250_000), "beyond the slots: nothing");
    assert_eq!(
        gate.datapath.rule_stats(99_999).expect("stats"),
        stats[&99_999]
    );
    // Another size on the same pins: refused, not reused.
    match Datapath::load_with(&gate.dir, GateConfig::default(), Capacities::default()) {
        Err(datapath::DatapathError::IncompatibleMap { path, detail }) => {
            assert!(
                path.ends_with(gate_common::map_names::RULE_STATS),
                "{path:?}: {detail}"
            );
        }
        Err(other) => panic!("expected IncompatibleMap, got: {other}"),
        Ok(_) => panic!("counters of another size were reused"),
    }
}
