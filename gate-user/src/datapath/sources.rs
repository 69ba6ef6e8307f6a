//! The access lists (`SOURCES`) and the block list (`BLOCKED`), both LPM tries. A change
//! never shows a packet half a list: a changed access list is written under a new id and
//! the allow entries are switched to it one write each; a replaced block list is written
//! under a new generation and switched to with one write of the config.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, LpmTrie, lpm_trie::Key};
use gate_common::{
    ANY_SOURCE, AllowKey, AllowValue, BLOCK_FIXED_BITS, BlockKey, Config, SOURCE_FIXED_BITS,
    SourceKey, SourceValue, map_names,
};

use super::{Datapath, Result, map_err};
use crate::policy::{AccessList, Admission, Prefix, addr_from_map};

impl Datapath {
    /// Writes the access lists `entries` need that the trie does not hold yet, each under a
    /// fresh id (a list already there, from this agent or the one before, keeps its id), and
    /// returns the allow map's content with the ids in place. The lists no entry needs any
    /// more stay until [`Datapath::remove_unused_access_lists`], after the switch.
    pub fn write_access_lists(
        &mut self,
        entries: &BTreeMap<AllowKey, Admission>,
    ) -> Result<BTreeMap<AllowKey, AllowValue>> {
        let mut written = match self.written.access.take() {
            Some(written) => written,
            None => self.read_access_lists()?,
        };
        let mut ids: BTreeMap<AccessList, u32> = written
            .iter()
            .map(|(id, list)| (list.clone(), *id))
            .collect();
        let name = map_names::SOURCES;
        let mut allow = BTreeMap::new();
        for (key, admission) in entries {
            let value = match admission {
                Admission::Any(rule_id) => AllowValue::any_source(*rule_id),
                Admission::Restricted(restrictions) => {
                    let list = AccessList::build(&restrictions.iter().collect::<Vec<_>>());
                    let id = match ids.get(&list) {
                        Some(id) => *id,
                        None => {
                            let id = free_access_id(&written);
                            let mut trie: LpmTrie<_, SourceKey, SourceValue> =
                                LpmTrie::try_from(self.map_mut(name)?).map_err(map_err(name))?;
                            for ((ifindex, addr, bits), rule_id) in &list.0 {
                                let key = source_key(id, *ifindex, *addr, *bits);
                                trie.insert(&key, SourceValue { rule_id: *rule_id }, 0)
                                    .map_err(map_err(name))?;
                            }
                            written.insert(id, list.clone());
                            ids.insert(list, id);
                            id
                        }
                    };
                    AllowValue {
                        rule_id: admission.rule_id(),
                        access: id,
                    }
                }
            };
            allow.insert(*key, value);
        }
        self.written.access.set(written);
        Ok(allow)
    }

    /// Removes the access lists that neither the allow map nor the host-port map refers to.
    pub fn remove_unused_access_lists(&mut self) -> Result<()> {
        let Some(mut written) = self.written.access.take() else {
            return Ok(());
        };
        let in_use: BTreeSet<u32> = [self.written.allow.known(), self.written.host_ports.known()]
            .into_iter()
            .flatten()
            .flat_map(|map| map.values().map(|v| v.access))
            .collect();
        let name = map_names::SOURCES;
        let unused: Vec<u32> = written
            .keys()
            .filter(|id| !in_use.contains(id))
            .copied()
            .collect();
        let mut trie: LpmTrie<_, SourceKey, SourceValue> =
            LpmTrie::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for id in unused {
            if let Some(list) = written.remove(&id) {
                for (ifindex, addr, bits) in list.0.keys() {
                    trie.remove(&source_key(id, *ifindex, *addr, *bits))
                        .map_err(map_err(name))?;
                }
            }
        }
        self.written.access.set(written);
        Ok(())
    }

    /// The access lists in the trie, by id.
    fn read_access_lists(&self) -> Result<BTreeMap<u32, AccessList>> {
        let name = map_names::SOURCES;
        let trie: LpmTrie<_, SourceKey, SourceValue> =
            LpmTrie::try_from(self.map(name)?).map_err(map_err(name))?;
        let mut lists: BTreeMap<u32, AccessList> = BTreeMap::new();
        for item in trie.iter() {
            let (key, value) = item.map_err(map_err(name))?;
            let data = key.data();
            let bits = key.prefix_len().saturating_sub(SOURCE_FIXED_BITS);
            lists
                .entry(data.access)
                .or_default()
                .0
                .insert((data.ifindex, data.addr, bits), value.rule_id);
        }
        Ok(lists)
    }

    /// Makes the block list in force equal to `blocks`. One address more or less is one
    /// write; any other change is written as a new generation beside the list in force and
    /// switched to at once, then the old generation is removed. Then the connections from the
    /// newly blocked sources are ended ([`Datapath::cut_flows`]); returns how many.
    pub fn sync_blocks(&mut self, blocks: &BTreeSet<Prefix>) -> Result<usize> {
        let current = match self.written.blocks.take() {
            Some(current) => current,
            None => self.read_blocks()?,
        };
        if &current == blocks {
            self.written.blocks.set(current);
            return Ok(0);
        }
        let newly: Vec<Prefix> = blocks.difference(&current).copied().collect();
        let generation = self.config.block_generation;
        let added: Vec<&Prefix> = blocks.difference(&current).collect();
        let removed: Vec<&Prefix> = current.difference(blocks).collect();
        let name = map_names::BLOCKED;
        if generation != 0 && added.len() + removed.len() == 1 && !blocks.is_empty() {
            let mut trie: LpmTrie<_, BlockKey, u8> =
                LpmTrie::try_from(self.map_mut(name)?).map_err(map_err(name))?;
            for prefix in added {
                trie.insert(&block_key(generation, prefix), 1, 0)
                    .map_err(map_err(name))?;
            }
            for prefix in removed {
                trie.remove(&block_key(generation, prefix))
                    .map_err(map_err(name))?;
            }
        } else {
            let next = if blocks.is_empty() {
                0
            } else {
                generation.wrapping_add(1).max(1)
            };
            {
                let mut trie: LpmTrie<_, BlockKey, u8> =
                    LpmTrie::try_from(self.map_mut(name)?).map_err(map_err(name))?;
                for prefix in blocks {
                    trie.insert(&block_key(next, prefix), 1, 0)
                        .map_err(map_err(name))?;
                }
            }
            self.write_config(Config {
                block_generation: next,
                ..self.config
            })?;
            self.remove_blocks_except(next)?;
        }
        self.written.blocks.set(blocks.clone());
        // A ban ends the sessions from there too, both ways, whoever opened them.
        if newly.is_empty() {
            return Ok(0);
        }
        self.cut_flows(|key, _| {
            let remote = addr_from_map(key.remote_addr);
            newly.iter().any(|prefix| prefix.contains(remote))
        })
    }

    /// The block list in force (the config's generation).
    fn read_blocks(&self) -> Result<BTreeSet<Prefix>> {
        let generation = self.config.block_generation;
        if generation == 0 {
            return Ok(BTreeSet::new());
        }
        let name = map_names::BLOCKED;
        let trie: LpmTrie<_, BlockKey, u8> =
            LpmTrie::try_from(self.map(name)?).map_err(map_err(name))?;
        let mut blocks = BTreeSet::new();
        for key in trie.keys() {
            let key = key.map_err(map_err(name))?;
            let data = key.data();
            if data.generation == generation {
                let bits = key.prefix_len().saturating_sub(BLOCK_FIXED_BITS);
                blocks.extend(Prefix::from_map_key(data.addr, bits));
            }
        }
        Ok(blocks)
    }

    /// Removes every block entry of another generation than `generation` (a replaced list,
    /// or what an interrupted replacement left behind).
    fn remove_blocks_except(&mut self, generation: u32) -> Result<()> {
        let name = map_names::BLOCKED;
        let mut trie: LpmTrie<_, BlockKey, u8> =
            LpmTrie::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let stale: Vec<Key<BlockKey>> = trie
            .keys()
            .filter_map(|key| key.ok())
            .filter(|key| key.data().generation != generation)
            .collect();
        for key in stale {
            trie.remove(&key).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Writes the config map and remembers what it holds.
    pub(super) fn write_config(&mut self, config: Config) -> Result<()> {
        let name = map_names::CONFIG;
        let mut map: Array<_, Config> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        map.set(0, config, 0).map_err(map_err(name))?;
        self.config = config;
        Ok(())
    }

    /// What the kernel would find for a new connection from `source` on `ifindex` to `key`:
    /// whether the source is blocked, the allow entry, and the access-list entries on that
    /// interface and on any (read from the maps the programs read, for `explain`).
    pub fn lookup_admission(
        &self,
        key: &AllowKey,
        source: &gate_common::Addr,
        ifindex: u32,
    ) -> Result<Lookup> {
        let generation = self.config.block_generation;
        let blocked = if generation == 0 {
            false
        } else {
            let name = map_names::BLOCKED;
            let trie: LpmTrie<_, BlockKey, u8> =
                LpmTrie::try_from(self.map(name)?).map_err(map_err(name))?;
            let key = Key::new(
                BLOCK_FIXED_BITS + 128,
                BlockKey {
                    generation,
                    addr: *source,
                },
            );
            trie.get(&key, 0).is_ok()
        };
        let allow = self.allow_value(key)?;
        let (mut on_interface, mut on_any) = (None, None);
        if let Some(value) = allow.filter(|v| v.access != ANY_SOURCE) {
            let name = map_names::SOURCES;
            let trie: LpmTrie<_, SourceKey, SourceValue> =
                LpmTrie::try_from(self.map(name)?).map_err(map_err(name))?;
            let find = |ifindex| {
                trie.get(&source_key(value.access, ifindex, *source, 128), 0)
                    .ok()
                    .map(|v| v.rule_id)
            };
            on_interface = find(ifindex);
            on_any = find(0);
        }
        Ok(Lookup {
            blocked,
            allow,
            on_interface,
            on_any,
        })
    }
}

/// See [`Datapath::lookup_admission`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub blocked: bool,
    pub allow: Option<AllowValue>,
    pub on_interface: Option<u32>,
    pub on_any: Option<u32>,
}

/// The lowest id no list uses (never [`ANY_SOURCE`]).
fn free_access_id(written: &BTreeMap<u32, AccessList>) -> u32 {
    (1..)
        .find(|id| !written.contains_key(id))
        .unwrap_or(u32::MAX)
}

fn source_key(access: u32, ifindex: u32, addr: gate_common::Addr, bits: u32) -> Key<SourceKey> {
    Key::new(
        SOURCE_FIXED_BITS + bits,
        SourceKey {
            access,
            ifindex,
            addr,
        },
    )
}

fn block_key(generation: u32, prefix: &Prefix) -> Key<BlockKey> {
    let (addr, bits) = prefix.map_key();
    Key::new(BLOCK_FIXED_BITS + bits, BlockKey { generation, addr })
}
