//! Writing the maps the agent owns: each kept equal to what the agent wants, by writing only
//! the differences against what it last wrote.

use super::*;

/// A kernel map's content as this agent last wrote it (the agent is its only writer), so
/// that a sync writes only the differences. Unknown until first read, and again after a
/// change failed midway (the kernel's content may then differ): the next change reads the
/// map again.
#[derive(Debug)]
pub(super) struct Mirror<T>(Option<T>);

impl<T> Default for Mirror<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> Mirror<T> {
    /// The content, if known.
    pub fn known(&self) -> Option<&T> {
        self.0.as_ref()
    }

    /// The content for a change, read with `read` when unknown. Change it only as the kernel
    /// map changes, and pass the outcome to [`Mirror::settle`].
    pub fn get_or_read(&mut self, read: impl FnOnce() -> Result<T>) -> Result<&mut T> {
        let content = match self.0.take() {
            Some(content) => content,
            None => read()?,
        };
        Ok(self.0.insert(content))
    }

    /// Ends a change: a failure forgets the content.
    pub fn settle<R>(&mut self, outcome: Result<R>) -> Result<R> {
        if outcome.is_err() {
            self.0 = None;
        }
        outcome
    }

    /// Takes the content out for a change made elsewhere; unknown until [`Mirror::set`].
    pub fn take(&mut self) -> Option<T> {
        self.0.take()
    }

    /// The content now in the kernel map.
    pub fn set(&mut self, content: T) {
        self.0 = Some(content);
    }
}

/// What this agent last wrote into each map it owns.
#[derive(Debug, Default)]
pub(super) struct Written {
    pub allow: Mirror<BTreeMap<AllowKey, AllowValue>>,
    pub host_ports: Mirror<BTreeMap<AllowKey, AllowValue>>,
    pub port_addrs: Mirror<BTreeMap<PortAddrKey, u8>>,
    pub local_addrs: Mirror<BTreeMap<gate_common::Addr, u8>>,
    /// The access lists in the trie, by id.
    pub access: Mirror<BTreeMap<u32, crate::policy::AccessList>>,
    /// The block list in force.
    pub blocks: Mirror<BTreeSet<crate::policy::Prefix>>,
}

/// The map `name` of the object (a free function, so that a mirror can be borrowed beside).
pub(super) fn map_in<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name).ok_or(DatapathError::Missing(name))
}

/// Every entry of the hash map `name`.
fn read_hash<K, V>(ebpf: &Ebpf, name: &'static str) -> Result<BTreeMap<K, V>>
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    let map = ebpf.map(name).ok_or(DatapathError::Missing(name))?;
    let map: HashMap<_, K, V> = HashMap::try_from(map).map_err(map_err(name))?;
    map.iter().collect::<Result<_, _>>().map_err(map_err(name))
}

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
        self.sync_hash(map_names::LOCAL_ADDRS, |w| &mut w.local_addrs, &desired)
    }

    /// The allow map's entry for `key`.
    pub fn allow_value(&self, key: &AllowKey) -> Result<Option<AllowValue>> {
        if let Some(written) = self.written.allow.known() {
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
        let ebpf = &mut self.ebpf;
        let current = self.written.allow.get_or_read(|| read_hash(ebpf, name))?;
        let outcome = write_allow(map_in(ebpf, name)?, current, desired, keep_stale);
        self.written.allow.settle(outcome)
    }

    /// Writes entries for keys not in the allow map, without a sync of the rest. False (and
    /// nothing written) where that is not known to suffice: the map's content is not known
    /// yet, a key is present, or the entries would not all fit.
    pub fn add_allow(&mut self, entries: &[(AllowKey, AllowValue)]) -> Result<bool> {
        let name = map_names::ALLOW;
        let fits = self.written.allow.known().is_some_and(|written| {
            written.len() + entries.len() <= self.capacities.allow as usize
                && !entries.iter().any(|(key, _)| written.contains_key(key))
        });
        if !fits {
            return Ok(false);
        }
        let ebpf = &mut self.ebpf;
        let written = self.written.allow.get_or_read(|| read_hash(ebpf, name))?;
        let outcome = (|| {
            let mut map: HashMap<_, AllowKey, AllowValue> =
                HashMap::try_from(map_in(ebpf, name)?).map_err(map_err(name))?;
            for (key, value) in entries {
                map.insert(key, value, 0).map_err(map_err(name))?;
                written.insert(*key, *value);
            }
            Ok(true)
        })();
        self.written.allow.settle(outcome)
    }

    /// The allow map's content as last written, if known.
    pub fn allow_written(&self) -> Option<&BTreeMap<AllowKey, AllowValue>> {
        self.written.allow.known()
    }

    /// Makes the host-port map equal to `desired` (published host ports and the rule that
    /// admits each, or `NO_RULE`), new and changed entries first.
    pub fn sync_host_ports(&mut self, desired: &BTreeMap<AllowKey, AllowValue>) -> Result<()> {
        self.sync_hash(map_names::HOST_PORTS, |w| &mut w.host_ports, desired)
    }

    /// Makes the port-address bindings equal to `desired`: new ones first, so a container
    /// keeps its addresses while its bindings change.
    pub fn sync_port_addrs(&mut self, desired: &BTreeSet<PortAddrKey>) -> Result<()> {
        let desired: BTreeMap<PortAddrKey, u8> = desired.iter().map(|k| (*k, 1)).collect();
        self.sync_hash(map_names::PORT_ADDRS, |w| &mut w.port_addrs, &desired)
    }
}

impl Datapath {
    /// Makes the hash map `name` equal to `desired`, new and changed entries first, then the
    /// stale ones removed; only the differences against its mirror reach the kernel.
    fn sync_hash<K, V>(
        &mut self,
        name: &'static str,
        mirror: impl FnOnce(&mut Written) -> &mut Mirror<BTreeMap<K, V>>,
        desired: &BTreeMap<K, V>,
    ) -> Result<()>
    where
        K: aya::Pod + Ord,
        V: aya::Pod + PartialEq,
    {
        let ebpf = &mut self.ebpf;
        let mirror = mirror(&mut self.written);
        let current = mirror.get_or_read(|| read_hash(ebpf, name))?;
        let outcome = write_hash(name, map_in(ebpf, name)?, current, desired);
        mirror.settle(outcome)
    }
}

/// Writes into `map` what `desired` has that `current` (the map's mirror) lacks or holds
/// otherwise, then removes what `desired` lacks; `current` follows each write.
fn write_hash<K, V>(
    name: &'static str,
    map: &mut aya::maps::Map,
    current: &mut BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> Result<()>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let mut map: HashMap<_, K, V> = HashMap::try_from(map).map_err(map_err(name))?;
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
    Ok(())
}

/// The allow map's sync against its mirror `current`: see [`Datapath::sync_allow`].
fn write_allow(
    map: &mut aya::maps::Map,
    current: &mut BTreeMap<AllowKey, AllowValue>,
    desired: &BTreeMap<AllowKey, AllowValue>,
    keep_stale: impl Fn(&AllowValue) -> bool,
) -> Result<AllowSync> {
    let name = map_names::ALLOW;
    let mut map: HashMap<_, AllowKey, AllowValue> =
        HashMap::try_from(map).map_err(map_err(name))?;
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
    Ok(report)
}
