//! Writing the maps the agent owns: each kept equal to what the agent wants, by writing only
//! the differences against what it last wrote.

use super::*;

/// What a sync of the allow map left out because the map was full.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowSync {
    /// Entries that did not fit, by the rule they belong to.
    pub not_fitted: BTreeMap<u32, usize>,
}

impl AllowSync {
    /// Entries that did not fit, over all rules.
    pub fn not_fitted_entries(&self) -> usize {
        self.not_fitted.values().sum()
    }

    fn left_out(&mut self, rule_id: u32) {
        *self.not_fitted.entry(rule_id).or_default() += 1;
    }
}

/// A hash map refuses a new key with E2BIG when it holds `max_entries` already.
pub(super) fn is_map_full(err: &MapError) -> bool {
    matches!(err, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG))
}

impl Datapath {
    /// Makes the host's addresses in the kernel equal to `addresses`.
    pub fn sync_local_addrs(&mut self, addresses: &BTreeSet<gate_common::Addr>) -> Result<()> {
        let desired: BTreeMap<gate_common::Addr, u8> = addresses.iter().map(|a| (*a, 1)).collect();
        let mut written = self.local_addrs_written.take();
        let map = self.map_mut(map_names::LOCAL_ADDRS)?;
        sync_hash(map_names::LOCAL_ADDRS, map, &mut written, &desired)?;
        self.local_addrs_written = written;
        Ok(())
    }

    /// The allow map's entry for `key`.
    pub fn allow_value(&self, key: &AllowKey) -> Result<Option<AllowValue>> {
        if let Some(written) = &self.allow_written {
            return Ok(written.get(key).copied());
        }
        let name = map_names::ALLOW;
        let map: HashMap<_, AllowKey, AllowValue> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        match map.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(err) => Err(map_err(name)(err)),
        }
    }

    /// Makes the allow map equal to `desired`, as far as it holds: stale entries are removed
    /// first (except those `keep_stale` holds on to), so a deny never waits for room and
    /// frees room for what follows; then new and changed entries are written, those of the
    /// lowest rule ids first (saved rules before the ones containers bring). A changed entry
    /// is updated in place, so a port that stays allowed is never missing. New entries that
    /// find the map full are left out and reported, never an error. Only the differences
    /// reach the kernel: the map's content is read once, then followed in memory (the agent
    /// is its only writer).
    pub fn sync_allow(
        &mut self,
        desired: &BTreeMap<AllowKey, AllowValue>,
        keep_stale: impl Fn(&AllowValue) -> bool,
    ) -> Result<AllowSync> {
        let name = map_names::ALLOW;
        let mut current = match self.allow_written.take() {
            Some(current) => current,
            None => {
                let map: HashMap<_, AllowKey, AllowValue> =
                    HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
                map.iter()
                    .collect::<Result<_, _>>()
                    .map_err(map_err(name))?
            }
        };
        // On any failure the in-memory copy is dropped, and the next sync reads the map again.
        let mut map: HashMap<_, AllowKey, AllowValue> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let stale: Vec<AllowKey> = current
            .iter()
            .filter(|(key, value)| !desired.contains_key(key) && !keep_stale(value))
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            map.remove(&key).map_err(map_err(name))?;
            current.remove(&key);
        }
        let mut pending: Vec<(&AllowKey, &AllowValue)> = desired
            .iter()
            .filter(|(key, value)| current.get(key) != Some(value))
            .collect();
        pending.sort_by_key(|(key, value)| (value.rule_id, **key));
        let mut report = AllowSync::default();
        let mut full = false;
        for (key, value) in pending {
            // Once the map is full, new keys cannot fit (nothing is removed after this point);
            // updates of present keys still can.
            let new_key = !current.contains_key(key);
            if full && new_key {
                report.left_out(value.rule_id);
                continue;
            }
            match map.insert(key, value, 0) {
                Ok(()) => {
                    current.insert(*key, *value);
                }
                Err(err) if new_key && is_map_full(&err) => {
                    full = true;
                    report.left_out(value.rule_id);
                }
                Err(err) => return Err(map_err(name)(err)),
            }
        }
        self.allow_written = Some(current);
        Ok(report)
    }

    /// Writes entries for keys not in the allow map, without a sync of the rest. False (and
    /// nothing written) where that is not known to suffice: the map's content is not known
    /// yet, a key is present, or the entries would not all fit.
    pub fn add_allow(&mut self, entries: &[(AllowKey, AllowValue)]) -> Result<bool> {
        let name = map_names::ALLOW;
        let fits = self.allow_written.as_ref().is_some_and(|written| {
            written.len() + entries.len() <= self.capacities.allow as usize
                && !entries.iter().any(|(key, _)| written.contains_key(key))
        });
        if !fits {
            return Ok(false);
        }
        // Unknown content if a write fails: the next sync reads the map again.
        let mut written = self.allow_written.take().unwrap_or_default();
        let mut map: HashMap<_, AllowKey, AllowValue> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (key, value) in entries {
            map.insert(key, value, 0).map_err(map_err(name))?;
            written.insert(*key, *value);
        }
        self.allow_written = Some(written);
        Ok(true)
    }

    /// The allow map's content as last written, if known.
    pub fn allow_written(&self) -> Option<&BTreeMap<AllowKey, AllowValue>> {
        self.allow_written.as_ref()
    }

    /// Makes the host-port map equal to `desired` (published host ports and the rule that
    /// admits each, or `NO_RULE`), new and changed entries first.
    pub fn sync_host_ports(&mut self, desired: &BTreeMap<AllowKey, AllowValue>) -> Result<()> {
        let mut written = self.host_ports_written.take();
        let map = self.map_mut(map_names::HOST_PORTS)?;
        sync_hash(map_names::HOST_PORTS, map, &mut written, desired)?;
        self.host_ports_written = written;
        Ok(())
    }

    /// Makes the port-address bindings equal to `desired`: new ones first, so a container
    /// keeps its addresses while its bindings change.
    pub fn sync_port_addrs(&mut self, desired: &BTreeSet<PortAddrKey>) -> Result<()> {
        let desired: BTreeMap<PortAddrKey, u8> = desired.iter().map(|k| (*k, 1)).collect();
        let mut written = self.port_addrs_written.take();
        let map = self.map_mut(map_names::PORT_ADDRS)?;
        sync_hash(map_names::PORT_ADDRS, map, &mut written, &desired)?;
        self.port_addrs_written = written;
        Ok(())
    }
}

/// Makes the hash map `map` equal to `desired`, writing only differences against `written`
/// (its content as last written; read from the kernel when unknown). On failure `written` is
/// left empty, so the next sync reads the map again.
pub(super) fn sync_hash<K, V>(
    name: &'static str,
    map: &mut aya::maps::Map,
    written: &mut Option<BTreeMap<K, V>>,
    desired: &BTreeMap<K, V>,
) -> Result<()>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let mut map: HashMap<_, K, V> = HashMap::try_from(map).map_err(map_err(name))?;
    let mut current = match written.take() {
        Some(current) => current,
        None => map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(name))?,
    };
    for (key, value) in desired {
        if current.get(key) != Some(value) {
            map.insert(key, value, 0).map_err(map_err(name))?;
            current.insert(*key, *value);
        }
    }
    let stale: Vec<K> = current
        .keys()
        .filter(|key| !desired.contains_key(key))
        .copied()
        .collect();
    for key in stale {
        map.remove(&key).map_err(map_err(name))?;
        current.remove(&key);
    }
    *written = Some(current);
    Ok(())
}
