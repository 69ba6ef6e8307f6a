//! Reading what the programs counted: per-rule and per-reason counters, drops per bridge,
//! tracked flows, the drop-event ring buffer.

use super::*;

impl Datapath {
    pub fn allow_entries(&self) -> Result<usize> {
        self.count_entries(
            map_names::ALLOW,
            size_of::<AllowKey>(),
            size_of::<AllowValue>(),
        )
    }

    /// Entries of the pinned hash map `name`, counted in batches: a status or a scrape costs
    /// a few dozen system calls even with the flow table full, not one per entry.
    pub(super) fn count_entries(
        &self,
        name: &'static str,
        key_size: usize,
        value_size: usize,
    ) -> Result<usize> {
        let path = self.pins.map(name);
        let fd = sys::obj_get(&path).map_err(io_err(&path))?;
        sys::count_entries(fd.as_fd(), key_size, value_size).map_err(io_err(&path))
    }

    /// Zeroes the counters of rule slots about to be (re)used.
    pub fn reset_rule_stats(&mut self, rule_ids: &BTreeSet<u32>) -> Result<()> {
        let name = map_names::RULE_STATS;
        let cpus = possible_cpus()?;
        let mut map: PerCpuArray<_, RuleStats> =
            PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for id in rule_ids {
            let zeros = PerCpuValues::try_from(vec![RuleStats::default(); cpus])
                .map_err(|e| map_err(name)(MapError::from(e)))?;
            map.set(*id, zeros, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Packets and bytes of each of `rule_ids`, summed over CPUs, read in batches
    /// (BPF_MAP_LOOKUP_BATCH) of the slots around them: `list`, `status` and a scrape cost a
    /// few system calls per few thousand rules, not one per rule. Ids beyond the slots count
    /// nothing.
    pub fn rule_stats_of(
        &self,
        rule_ids: impl IntoIterator<Item = u32>,
    ) -> Result<BTreeMap<u32, RuleStats>> {
        const CHUNK: u32 = 4_096;
        let name = map_names::RULE_STATS;
        let path = self.pins.map(name);
        let slots = self.capacities.rule_slots();
        let cpus = possible_cpus()?;
        // The kernel copies each CPU's value rounded up to 8 bytes.
        let per_cpu = size_of::<RuleStats>().div_ceil(8) * 8;
        let ids: BTreeSet<u32> = rule_ids.into_iter().filter(|id| *id < slots).collect();
        let mut stats = BTreeMap::new();
        let mut fd = None;
        let mut covered_to = 0u32;
        for id in &ids {
            if *id < covered_to {
                continue;
            }
            let fd = match &fd {
                Some(fd) => fd,
                None => fd.insert(sys::obj_get(&path).map_err(io_err(&path))?),
            };
            let count = CHUNK.min(slots - id);
            let (keys, values) = sys::lookup_array_batch(fd.as_fd(), *id, count, per_cpu * cpus)
                .map_err(io_err(&path))?;
            covered_to = id + count;
            for (key, value) in keys.iter().zip(values.chunks_exact(per_cpu * cpus)) {
                if !ids.contains(key) {
                    continue;
                }
                let mut sum = RuleStats::default();
                for cpu in value.chunks_exact(per_cpu) {
                    // SAFETY: RuleStats is plain old data valid for any bits; `cpu` holds at
                    // least its size; unaligned read.
                    let one: RuleStats =
                        unsafe { std::ptr::read_unaligned(cpu.as_ptr().cast::<RuleStats>()) };
                    sum.packets += one.packets;
                    sum.bytes += one.bytes;
                }
                stats.insert(*key, sum);
            }
        }
        Ok(stats)
    }

    /// Packets and bytes of one rule, summed over CPUs.
    pub fn rule_stats(&self, rule_id: u32) -> Result<RuleStats> {
        let name = map_names::RULE_STATS;
        let map: PerCpuArray<_, RuleStats> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        let values = map.get(&rule_id, 0).map_err(map_err(name))?;
        Ok(values
            .iter()
            .fold(RuleStats::default(), |sum, v| RuleStats {
                packets: sum.packets + v.packets,
                bytes: sum.bytes + v.bytes,
            }))
    }

    /// The global counters, summed over CPUs, by index of `gate_common::counters`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        let name = map_names::COUNTERS;
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        (0..counters::COUNT)
            .map(|i| Ok(map.get(&i, 0).map_err(map_err(name))?.iter().sum()))
            .collect()
    }

    /// Drops per (bridge ifindex, reason counter), summed over CPUs.
    pub fn bridge_drops(&self) -> Result<BTreeMap<BridgeDropKey, u64>> {
        let name = map_names::BRIDGE_DROPS;
        let map: PerCpuHashMap<_, BridgeDropKey, u64> =
            PerCpuHashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        map.iter()
            .map(|item| item.map(|(key, values)| (key, values.iter().sum())))
            .collect::<Result<_, _>>()
            .map_err(map_err(name))
    }

    /// Takes the drop-event ring buffer out of the object, for the agent to read.
    pub fn take_drop_events(&mut self) -> Result<RingBuf<MapData>> {
        let name = map_names::DROP_EVENTS;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::Missing(name))?;
        RingBuf::try_from(map).map_err(map_err(name))
    }

    /// Entries in the connection-tracking tables, replied and unreplied (including idle ones
    /// not yet evicted).
    pub fn tracked_flows(&self) -> Result<usize> {
        let mut count = 0;
        for name in [map_names::FLOWS, map_names::NEW_FLOWS] {
            count += self.count_entries(name, size_of::<FlowKey>(), size_of::<FlowState>())?;
        }
        Ok(count)
    }
}

/// Decodes one drop event from the ring buffer.
pub fn decode_drop_event(bytes: &[u8]) -> Option<DropEvent> {
    (bytes.len() >= std::mem::size_of::<DropEvent>())
        // SAFETY: long enough, DropEvent is plain old data valid for any bits; unaligned read.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
}

pub(super) fn possible_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Io {
        path: PathBuf::from("/sys/devices/system/cpu/possible"),
        source,
    })
}
