//! The host agent: loads the gate, keeps the allow map equal to the saved rules resolved
//! against the running containers, and serves the control socket until SIGINT or SIGTERM.
//! Enforcement outlives it (pinned links).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use gate_common::{AllowKey, AllowValue, DropEvent, NO_RULE, PortAddrKey, counters};
use tokio::{
    io::{AsyncWriteExt as _, unix::AsyncFd},
    net::UnixStream,
    signal::unix::{SignalKind, signal},
    sync::{broadcast, mpsc},
};
use tracing::{error, info, warn};

use crate::{
    api::{
        BridgeDrops, BridgeStatus, Changed, DropEventStats, EngineStatus, Fill, Flows,
        NetfilterStatus, Reply, Request, Response, RuleList, RuleView, Status, WatchEvent,
        server::{self, ControlSocket},
    },
    datapath::{self, AllowSync, Capacities, Datapath, GateConfig, sys},
    exposure,
    lock::{self, Lock},
    metrics,
    netfilter::{Delegation, DelegationStatus},
    policy::{
        MAX_SAVED_RULES, Ports, Resolved, ResolvedRule, Resolver, RuleSet, RuleStore, Target,
        addr_from_map, map_addr,
    },
    ports,
    runtime::{self, Container, Engine, RuntimeEvent, Snapshot},
};

/// Bridges `--bridge auto` gates whenever they exist, besides those of the engines' networks.
const DEFAULT_BRIDGES: [&str; 2] = ["docker0", "podman0"];
/// How often the agent re-checks bridges and the netfilter delegation rules.
const TICK: Duration = Duration::from_secs(2);
/// Drop events waiting for the agent loop; beyond this they count as suppressed.
const DROP_EVENT_QUEUE: usize = 1024;

/// How the agent was asked to run.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Bridges named explicitly; they must exist at start.
    pub bridges: Vec<String>,
    /// Also gate docker0, podman0 and the engines' bridge networks as they appear.
    pub auto_bridges: bool,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    pub socket: PathBuf,
    pub gate: GateConfig,
    /// Engines to watch, with their sockets.
    pub engines: Vec<(Engine, PathBuf)>,
    /// Allow every container's published ports (Docker's old behaviour, chosen explicitly).
    pub default_published: bool,
    /// Honour containers' `portgate.allow` labels.
    pub labels: bool,
    /// Install the netfilter delegation rules where FORWARD would drop.
    pub netfilter: bool,
    /// Where to serve Prometheus metrics; none: not at all.
    pub metrics_addr: Option<SocketAddr>,
    pub capacities: Capacities,
}

#[derive(Debug)]
struct EngineState {
    socket: PathBuf,
    connected: bool,
    /// The last snapshot; kept (and enforced) while the engine is away.
    snapshot: Option<Snapshot>,
    syncs: u64,
    events: u64,
    last_error: Option<String>,
}

/// The agent's state while it serves.
pub struct Agent {
    options: AgentOptions,
    datapath: Datapath,
    rules: RuleSet,
    store: RuleStore,
    resolver: Resolver,
    resolved: Resolved,
    /// What the last sync of the allow map left out for want of room.
    allow_sync: AllowSync,
    engines: BTreeMap<Engine, EngineState>,
    delegation: Option<NetfilterKeeper>,
    drop_events: DropEventStats,
    /// Fan-out of drop events to `portgate watch` clients.
    watchers: broadcast::Sender<WatchEvent>,
    /// The bridge ports must be looked at again (containers changed, or one was not found).
    ports_stale: bool,
    /// The state and pin directories are this agent's while it runs.
    _locks: [Lock; 2],
}

impl Agent {
    /// Loads the saved rules and the datapath, and attaches to the bridges. Any failure here
    /// leaves a previously attached gate exactly as it was.
    pub fn start(options: AgentOptions) -> anyhow::Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "portgate agent must run as root: it loads eBPF programs and attaches them to bridges"
            );
        }
        // One agent per state directory and pin directory, settled before anything is
        // touched: a second agent must not write the maps, programs or links of the first.
        let locks = [
            lock::lock_state_dir(&options.state_dir)?,
            datapath::lock_pin_dir(&options.bpffs)?,
        ];
        if options.bridges.is_empty() && !options.auto_bridges {
            bail!(
                "no bridge to gate: pass --bridge IFACE (for example docker0 or podman0) or --bridge auto"
            );
        }
        for bridge in &options.bridges {
            if sys::ifindex(bridge).is_none() {
                bail!("bridge {bridge}: no such interface");
            }
        }
        let store = RuleStore::new(&options.state_dir);
        let rules = store.load()?;
        let datapath = Datapath::load_with(&options.bpffs, options.gate, options.capacities)
            .with_context(|| format!("loading the gate under {}", options.bpffs.display()))?;
        let engines = options
            .engines
            .iter()
            .map(|(engine, socket)| {
                let state = EngineState {
                    socket: socket.clone(),
                    connected: false,
                    snapshot: None,
                    syncs: 0,
                    events: 0,
                    last_error: None,
                };
                (*engine, state)
            })
            .collect();
        let delegation = options.netfilter.then(NetfilterKeeper::start);
        let resolver = Resolver::new(options.labels);
        let mut agent = Self {
            options,
            datapath,
            rules,
            store,
            resolver,
            resolved: Resolved::default(),
            allow_sync: AllowSync::default(),
            engines,
            delegation,
            drop_events: DropEventStats::default(),
            watchers: broadcast::channel(256).0,
            ports_stale: true,
            _locks: locks,
        };
        // Rules first, then programs: the new programs never run on a stale allow map. Until
        // the engines have reported, entries for containers stay as the last agent left them.
        agent.reconcile().context("writing the allow map")?;
        agent.attach_bridges(true)?;
        agent
            .datapath
            .open_black_holes()
            .context("opening the sockets refused connections vanish into")?;
        agent
            .datapath
            .attach_host_ports()
            .context("gating published host ports that reach local sockets")?;
        agent.sync_ports(true)?;
        datapath::retire_other_layouts(&agent.options.bpffs)
            .context("detaching an older gate's programs")?;
        info!(
            rules = agent.rules.rules().len(),
            bridges = ?agent.datapath.bridges().iter().map(|b| &b.name).collect::<Vec<_>>(),
            engines = ?agent.engines.keys().collect::<Vec<_>>(),
            audit = agent.options.gate.audit,
            gate_host_traffic = agent.options.gate.gate_host_traffic,
            "gate loaded"
        );
        Ok(agent)
    }

    /// Serves the control socket and follows the engines until SIGINT or SIGTERM.
    pub async fn serve(mut self) -> anyhow::Result<()> {
        let socket = ControlSocket::bind(&self.options.socket)?;
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let logs = self.datapath.take_logger().and_then(|logger| {
            // SAFETY: the logger owns its ring buffer's fd, open and unchanged while it lives.
            unsafe { AsyncFd::register(logger) }
                .map_err(|err| warn!("cannot watch eBPF logs: {err}"))
                .ok()
        });
        tokio::spawn(drain_ebpf_logs(logs));
        let (drops_tx, mut drops) = mpsc::channel(DROP_EVENT_QUEUE);
        let ring = self.datapath.take_drop_events()?;
        // SAFETY: the ring buffer owns its map fd, open and unchanged while it lives.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|err| anyhow::anyhow!("cannot watch the drop events: {err}"))?;
        tokio::spawn(read_drop_events(ring, drops_tx));
        let (scrape_tx, mut scrapes) = mpsc::channel(4);
        if let Some(addr) = self.options.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
            info!(%addr, "serving Prometheus metrics on /metrics");
            tokio::spawn(async move {
                if let Err(err) = metrics::serve(listener, scrape_tx).await {
                    error!("metrics server stopped: {err}");
                }
            });
        }
        let (events_tx, mut events) = mpsc::channel(16);
        for (engine, state) in &self.engines {
            tokio::spawn(runtime::watch(
                *engine,
                state.socket.clone(),
                events_tx.clone(),
            ));
        }
        drop(events_tx);
        let mut tick = tokio::time::interval(TICK);
        info!(socket = %socket.path().display(), "agent ready");
        let (requests_tx, mut requests) = mpsc::channel(16);
        tokio::spawn(socket.run(requests_tx));
        loop {
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                Some((request, mut stream)) = requests.recv() => match request {
                    Request::Watch => {
                        tokio::spawn(stream_watch(stream, self.watchers.subscribe()));
                    }
                    request => {
                        let response = self.handle(request);
                        tokio::spawn(async move { server::reply(&mut stream, &response).await });
                    }
                },
                Some(event) = events.recv() => self.on_runtime_event(event),
                Some(drop) = drops.recv() => self.on_drop_event(drop),
                Some(reply) = scrapes.recv() => {
                    let body = self.metrics_text().unwrap_or_else(|err| {
                        error!("building metrics: {err:#}");
                        String::new()
                    });
                    let _ = reply.send(body);
                }
                _ = tick.tick() => self.on_tick(),
            }
        }
        info!("stopping; the gate stays attached and keeps enforcing");
        Ok(())
    }

    fn on_runtime_event(&mut self, event: RuntimeEvent) {
        match event {
            RuntimeEvent::Synced {
                engine,
                snapshot,
                after_event,
            } => {
                let Some(state) = self.engines.get_mut(&engine) else {
                    return;
                };
                if !state.connected {
                    info!(%engine, "engine connected");
                }
                state.connected = true;
                state.last_error = None;
                state.syncs += 1;
                state.events += u64::from(after_event);
                if state.snapshot.as_ref() == Some(&snapshot) {
                    return;
                }
                state.snapshot = Some(snapshot);
                if let Err(err) = self
                    .attach_bridges(false)
                    .and_then(|()| self.reconcile())
                    .and_then(|()| self.sync_ports(false))
                {
                    error!("applying {engine}'s containers failed: {err:#}");
                }
            }
            RuntimeEvent::Disconnected { engine, error } => {
                let Some(state) = self.engines.get_mut(&engine) else {
                    return;
                };
                if state.connected || state.last_error.is_none() {
                    warn!(%engine, socket = %state.socket.display(), "engine unreachable ({error}); enforcing what is known, reconnecting");
                }
                state.connected = false;
                state.last_error = Some(error);
            }
        }
    }

    fn on_drop_event(&mut self, drop: Option<DropEvent>) {
        let Some(drop) = drop else {
            // Lost between the kernel and this loop (queue full).
            self.drop_events.suppressed += 1;
            return;
        };
        self.drop_events.reported += 1;
        self.drop_events.suppressed += u64::from(drop.suppressed);
        if self.watchers.receiver_count() == 0 {
            return;
        }
        let destination = addr_from_map(drop.dst);
        let container = self
            .engines
            .values()
            .filter_map(|s| s.snapshot.as_ref())
            .flat_map(|s| &s.containers)
            .find(|c| c.addresses.contains(&destination));
        let event = WatchEvent {
            time: humantime::format_rfc3339_millis(wall_clock(drop.timestamp_ns)).to_string(),
            bridge: self.bridge_name(drop.ifindex),
            source: addr_from_map(drop.src).to_string(),
            source_port: drop.src_port,
            destination: destination.to_string(),
            destination_port: drop.dst_port,
            protocol: protocol_name(drop.proto),
            reason: counter_name(u32::from(drop.reason)),
            container: container.map(|c| c.name.clone()),
            audit: drop.audit != 0,
            suppressed: drop.suppressed,
        };
        let _ = self.watchers.send(event);
    }

    fn bridge_name(&self, ifindex: u32) -> String {
        self.datapath
            .bridges()
            .iter()
            .find(|b| b.ifindex == ifindex)
            .map_or_else(|| format!("ifindex {ifindex}"), |b| b.name.clone())
    }

    fn metrics_text(&self) -> anyhow::Result<String> {
        let status = self.status()?;
        let rules = self.list()?.rules;
        Ok(metrics::encode(&status, &rules)?)
    }

    fn on_tick(&mut self) {
        for path in self.datapath.repin() {
            warn!(pin = %path.display(), "a link pin was removed; pinned it again (the gate stayed attached)");
        }
        if let Err(err) = self
            .attach_bridges(false)
            .and_then(|()| self.sync_ports(false))
        {
            warn!("{err:#}");
        }
    }

    /// Binds each port of the gated bridges to the addresses of the container behind it, and
    /// attaches `from_containers` to ports that do not have it yet. Bindings are written
    /// before a port's program is attached, and a port that is not found opens nothing (fail
    /// closed). Runs on each tick and after each engine sync, where containers come and go.
    fn sync_ports(&mut self, strict: bool) -> anyhow::Result<()> {
        let ports: Vec<ports::Port> = self
            .datapath
            .bridges()
            .iter()
            .flat_map(|b| ports::bridge_ports(&b.name))
            .collect();
        let current: BTreeSet<u32> = ports.iter().map(|p| p.ifindex).collect();
        let known: BTreeSet<u32> = self.datapath.ports().keys().copied().collect();
        if current == known && !self.ports_stale {
            return Ok(());
        }
        let addresses = ports::port_addresses(&ports);
        let bindings: BTreeSet<PortAddrKey> = addresses
            .iter()
            .flat_map(|(ifindex, addrs)| {
                addrs.iter().map(|addr| PortAddrKey {
                    addr: map_addr(*addr),
                    ifindex: *ifindex,
                })
            })
            .collect();
        self.datapath
            .sync_port_addrs(&bindings)
            .context("binding bridge ports to their containers' addresses")?;
        for port in ports.iter().filter(|p| !known.contains(&p.ifindex)) {
            match self.datapath.attach_port(&port.name, port.ifindex) {
                Ok(()) => info!(
                    port = port.name,
                    addresses = ?addresses.get(&port.ifindex),
                    "bridge port tracked"
                ),
                Err(err) if !strict => warn!("bridge port {}: {err:#}; retrying", port.name),
                Err(err) => {
                    return Err(err).with_context(|| format!("bridge port {}", port.name));
                }
            }
        }
        self.datapath.forget_ports(&(&known - &current))?;
        // A port whose container was not found yet is looked at again on the next round.
        self.ports_stale = ports.iter().any(|p| !addresses.contains_key(&p.ifindex));
        Ok(())
    }

    /// The bridges to gate now: the explicit ones, and with `--bridge auto` the default and
    /// engine bridges that exist.
    fn wanted_bridges(&self) -> BTreeSet<String> {
        let mut wanted: BTreeSet<String> = self.options.bridges.iter().cloned().collect();
        if self.options.auto_bridges {
            let engine_bridges = self
                .engines
                .values()
                .filter_map(|s| s.snapshot.as_ref())
                .flat_map(|s| s.bridges.iter().cloned());
            wanted.extend(
                DEFAULT_BRIDGES
                    .iter()
                    .map(|b| (*b).to_owned())
                    .chain(engine_bridges),
            );
        }
        wanted
    }

    /// Attaches to wanted bridges that exist and are not attached (new, or re-created), then
    /// makes sure their netfilter delegation is in place. With `strict`, any failure is an
    /// error (start-up); later, a failing bridge is logged and retried on the next tick.
    fn attach_bridges(&mut self, strict: bool) -> anyhow::Result<()> {
        let mut changed = false;
        for name in self.wanted_bridges() {
            let Some(ifindex) = sys::ifindex(&name) else {
                continue;
            };
            let current = self.datapath.bridges().iter().find(|b| b.name == name);
            if current.is_some_and(|b| b.ifindex == ifindex && self.datapath.is_attached(b)) {
                continue;
            }
            match self.datapath.attach(&name) {
                Ok(()) => changed = true,
                Err(err) if !strict => warn!("{err}; retrying"),
                Err(err) => return Err(err.into()),
            }
        }
        if changed || strict {
            let bridges: Vec<String> = self
                .datapath
                .bridges()
                .iter()
                .map(|b| b.name.clone())
                .collect();
            if let Some(delegation) = &self.delegation {
                delegation.ensure(bridges);
            }
        }
        Ok(())
    }

    fn containers(&self) -> Vec<Container> {
        self.engines
            .values()
            .filter_map(|s| s.snapshot.as_ref())
            .flat_map(|s| s.containers.iter().cloned())
            .collect()
    }

    /// Resolves the rules against the containers and writes the allow map. Until every engine
    /// has reported, entries of rules that depend on containers (saved container rules,
    /// labels, the default policy) stay as they are: an agent that just started must not drop
    /// what its predecessor allowed for containers it has not seen yet. Everything else (an
    /// address rule, a denied rule) is exact at once.
    fn reconcile(&mut self) -> anyhow::Result<()> {
        let resolved = self.resolver.resolve(
            &self.rules,
            &self.containers(),
            self.options.default_published,
        );
        let all_known = self.engines.values().all(|s| s.snapshot.is_some());
        let container_rules: BTreeSet<u32> = self
            .rules
            .rules()
            .iter()
            .filter(|r| matches!(r.target, Target::Container(_)))
            .map(|r| r.id)
            .collect();
        let waits_for_engines = |value: &gate_common::AllowValue| {
            !all_known
                && (value.rule_id >= MAX_SAVED_RULES || container_rules.contains(&value.rule_id))
        };
        self.datapath.reset_rule_stats(&resolved.new_ids)?;
        let sync = self
            .datapath
            .sync_allow(&resolved.entries, waits_for_engines)?;
        // Until every engine has reported, the host ports stay as the last agent left them.
        if all_known {
            self.datapath
                .sync_host_ports(&host_ports(&self.containers(), &resolved.entries))
                .context("writing the published host ports")?;
        }
        if sync != self.allow_sync {
            match not_fitted_warning(&sync, self.datapath.capacities().allow) {
                Some(warning) => warn!("{warning}"),
                None => info!("every allow entry fits in the allow map again"),
            }
        }
        self.allow_sync = sync;
        self.resolved = resolved;
        // Containers changed: look at the bridge ports again.
        self.ports_stale = true;
        Ok(())
    }

    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Allow {
                target,
                ports,
                published,
            } => self.change(&target, ports.as_deref(), published, true),
            Request::Deny {
                target,
                ports,
                published,
            } => self.change(&target, ports.as_deref(), published, false),
            Request::List => self.list().map(Reply::List),
            Request::Status => self.status().map(|s| Reply::Status(Box::new(s))),
            Request::Mode { audit } => self.set_mode(audit),
            // Served by `serve`, which hands the connection to a streaming task.
            Request::Watch => Err(anyhow::anyhow!("watch is a streaming request")),
        };
        match result {
            Ok(reply) => Response::Ok(reply),
            Err(err) => Response::Error(crate::cli::error_text(&err)),
        }
    }

    /// Switches between enforce and audit; the flow table is untouched, so tracked
    /// connections carry on either way.
    fn set_mode(&mut self, audit: bool) -> anyhow::Result<Reply> {
        let gate = GateConfig {
            audit,
            ..self.options.gate
        };
        self.datapath.set_config(gate)?;
        self.options.gate = gate;
        let mode = if audit {
            "audit: nothing is dropped, would-be drops are counted"
        } else {
            "enforce"
        };
        let message = format!("mode {mode}; tracked connections kept");
        info!("{message}");
        Ok(Reply::Changed(Changed {
            message,
            rules: Vec::new(),
            warnings: Vec::new(),
        }))
    }

    /// Applies an allow or deny: saved first, then written to the map. If the map write
    /// fails, the previous rules are restored in both places.
    fn change(
        &mut self,
        target: &str,
        ports: Option<&str>,
        published: bool,
        allow: bool,
    ) -> anyhow::Result<Reply> {
        let target: Target = target.parse()?;
        let ports = match (ports, published) {
            (Some(_), true) => bail!("give either ports or --published, not both"),
            (None, false) => bail!("which ports? give PORTS (e.g. 80/tcp) or --published"),
            (Some(spec), false) => Ports::Spec(spec.parse()?),
            (None, true) => Ports::Published,
        };
        let mut next = self.rules.clone();
        let mut message = if allow {
            let id = next.allow(target.clone(), ports)?;
            format!("allowed {target} {ports} (rule {id})")
        } else {
            next.deny(&target, ports)?;
            format!("denied {target} {ports}; established connections continue")
        };
        let old_ids: BTreeSet<u32> = self.rules.rules().iter().map(|r| r.id).collect();
        let new_ids: BTreeSet<u32> = next
            .rules()
            .iter()
            .map(|r| r.id)
            .filter(|id| !old_ids.contains(id))
            .collect();
        self.store.save(&next)?;
        let previous = std::mem::replace(&mut self.rules, next);
        if let Err(err) = self
            .datapath
            .reset_rule_stats(&new_ids)
            .map_err(anyhow::Error::from)
            .and_then(|()| self.reconcile())
        {
            error!("applying rules failed, restoring the previous ones: {err:#}");
            self.rules = previous;
            self.store.save(&self.rules)?;
            self.reconcile()?;
            return Err(err);
        }
        info!("{message}");
        let rules = self.views(|r| r.target == target);
        if allow && matches!(target, Target::Container(_)) && !rules.iter().any(|r| r.active) {
            message.push_str("; no such container is running: the rule waits for it (inactive)");
        }
        let warnings = not_fitted_warning(&self.allow_sync, self.datapath.capacities().allow)
            .into_iter()
            .collect();
        Ok(Reply::Changed(Changed {
            message,
            rules,
            warnings,
        }))
    }

    fn views(&self, filter: impl Fn(&ResolvedRule) -> bool) -> Vec<RuleView> {
        let (containers, gated_bridges) = (self.containers(), self.gated_bridges());
        self.resolved
            .rules
            .iter()
            .filter(|r| filter(r))
            .map(|rule| {
                let stats = self.datapath.rule_stats(rule.id).unwrap_or_default();
                let gated = exposure::rule_gated(rule, &containers, &gated_bridges);
                rule_view(rule, stats.packets, stats.bytes, gated)
            })
            .collect()
    }

    /// The bridges the gate is attached to now.
    fn gated_bridges(&self) -> BTreeSet<String> {
        self.datapath
            .bridges()
            .iter()
            .filter(|b| self.datapath.is_attached(b))
            .map(|b| b.name.clone())
            .collect()
    }

    fn list(&self) -> anyhow::Result<RuleList> {
        Ok(RuleList {
            rules: self.views(|_| true),
        })
    }

    fn status(&self) -> anyhow::Result<Status> {
        let values = self.datapath.counters()?;
        let (containers, gated_bridges) = (self.containers(), self.gated_bridges());
        let mut by_kind: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (index, name, kind) in counters::ALL {
            let kind = match kind {
                counters::Kind::Pass => "pass",
                counters::Kind::Drop => "drop",
                counters::Kind::Event => "event",
            };
            let value = values.get(*index as usize).copied().unwrap_or(0);
            by_kind
                .entry(kind.to_owned())
                .or_default()
                .insert((*name).to_owned(), value);
        }
        Ok(Status {
            mode: if self.options.gate.audit {
                "audit"
            } else {
                "enforce"
            }
            .to_owned(),
            gate_host_traffic: self.options.gate.gate_host_traffic,
            bpffs: self.options.bpffs.display().to_string(),
            state_file: self.store.path().display().to_string(),
            bridges: self
                .datapath
                .bridges()
                .iter()
                .map(|b| BridgeStatus {
                    name: b.name.clone(),
                    ifindex: b.ifindex,
                    attached: self.datapath.is_attached(b),
                })
                .collect(),
            rules: self.resolved.rules.len(),
            allow_entries: Fill {
                used: self.datapath.allow_entries()?,
                capacity: self.datapath.capacities().allow,
                not_fitted: self.allow_sync.not_fitted_entries(),
                not_fitted_rules: self.allow_sync.not_fitted.keys().copied().collect(),
            },
            flows: Flows {
                tracked: self.datapath.tracked_flows()?,
                capacity: self.datapath.capacities().flows,
            },
            engines: self
                .engines
                .iter()
                .map(|(engine, s)| EngineStatus {
                    engine: engine.to_string(),
                    socket: s.socket.display().to_string(),
                    connected: s.connected,
                    containers: s.snapshot.as_ref().map_or(0, |s| s.containers.len()),
                    syncs: s.syncs,
                    events: s.events,
                    last_error: s.last_error.clone(),
                })
                .collect(),
            bridge_drops: self
                .datapath
                .bridge_drops()?
                .into_iter()
                .map(|(key, packets)| BridgeDrops {
                    bridge: self.bridge_name(key.ifindex),
                    reason: counter_name(key.reason),
                    packets,
                })
                .collect(),
            drop_events: self.drop_events,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            labels: self.options.labels,
            published_ports: exposure::published_ports(&containers, &gated_bridges),
            ungated: containers
                .iter()
                .filter_map(|c| exposure::ungated(c, &gated_bridges))
                .collect(),
            netfilter: self
                .delegation
                .as_ref()
                .map(|d| {
                    d.status()
                        .into_iter()
                        .map(|n| NetfilterStatus {
                            bridge: n.bridge,
                            backend: n.backend,
                            chain: n.chain,
                            installed: n.installed,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            counters: by_kind,
        })
    }
}

/// Each published host port, with the rule that admits the container port it maps to, or
/// `NO_RULE`. Keyed as `host_ports` looks them up: the host address, or all-zero for a port
/// published on every address. Where several mappings share a key, one that is not admitted
/// closes it (fail closed).
fn host_ports(
    containers: &[Container],
    allow: &BTreeMap<AllowKey, AllowValue>,
) -> BTreeMap<AllowKey, AllowValue> {
    let mut entries = BTreeMap::new();
    for container in containers {
        for published in &container.published {
            let host_addr = if published.host_ip.is_unspecified() {
                [0; 16]
            } else {
                map_addr(published.host_ip)
            };
            let proto = published.protocol.number(published.host_ip);
            let rule_id = container
                .addresses
                .iter()
                .find_map(|addr| {
                    let key = AllowKey::new(
                        map_addr(*addr),
                        published.protocol.number(*addr),
                        published.container_port,
                    );
                    allow.get(&key).map(|v| v.rule_id)
                })
                .unwrap_or(NO_RULE);
            let key = AllowKey::new(host_addr, proto, published.host_port);
            let entry = entries.entry(key).or_insert(AllowValue { rule_id });
            if rule_id == NO_RULE {
                entry.rule_id = NO_RULE;
            }
        }
    }
    entries
}

fn rule_view(rule: &ResolvedRule, packets: u64, bytes: u64, gated: Option<bool>) -> RuleView {
    let (protocol, port_start, port_end) = match rule.ports {
        Ports::Spec(spec) => (spec.protocol.to_string(), spec.port_start, spec.port_end),
        Ports::Published => ("published".to_owned(), 0, 0),
    };
    RuleView {
        id: rule.id,
        target: rule.target.to_string(),
        container: rule.containers.first().cloned(),
        published: rule.ports == Ports::Published,
        source: rule.source,
        active: rule.is_active(),
        address: rule
            .addresses
            .first()
            .map_or_else(|| rule.target.to_string(), ToString::to_string),
        addresses: rule.addresses.iter().map(ToString::to_string).collect(),
        ports: rule.specs.iter().map(ToString::to_string).collect(),
        host_ports: rule.host_ports.clone(),
        protocol,
        port_start,
        port_end,
        packets,
        bytes,
        label_origin: rule.label_origin,
        gated,
    }
}

/// Says what the allow map left out, if anything: how many entries, of which rules.
fn not_fitted_warning(sync: &AllowSync, capacity: u32) -> Option<String> {
    let entries = sync.not_fitted_entries();
    if entries == 0 {
        return None;
    }
    let rules: Vec<String> = sync.not_fitted.keys().map(ToString::to_string).collect();
    let (noun, verb) = if entries == 1 {
        ("entry", "is")
    } else {
        ("entries", "are")
    };
    let of = if rules.len() == 1 { "rule" } else { "rules" };
    Some(format!(
        "the allow map is full ({capacity} entries, --max-allow): {entries} allow {noun} of {of} {} did not fit and {verb} not enforced; deny what is no longer needed or raise --max-allow",
        rules.join(", ")
    ))
}

/// Keeps the netfilter delegation rules in place from a thread of its own: iptables may wait
/// seconds for its lock, which must not stall the agent loop.
struct NetfilterKeeper {
    bridges: std::sync::mpsc::Sender<Vec<String>>,
    status: std::sync::Arc<std::sync::Mutex<Vec<DelegationStatus>>>,
}

impl NetfilterKeeper {
    fn start() -> Self {
        let (bridges, wanted) = std::sync::mpsc::channel::<Vec<String>>();
        let status = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let shared = std::sync::Arc::clone(&status);
        std::thread::spawn(move || {
            let mut delegation = Delegation::new();
            loop {
                let result = match wanted.recv_timeout(TICK) {
                    Ok(bridges) => delegation.ensure(&bridges).map(drop),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        delegation.check_and_restore().map(drop)
                    }
                    // The agent is stopping; the rules stay, as the gate does.
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                };
                if let Err(err) = result {
                    error!("netfilter delegation rules: {err}");
                }
                if let Ok(mut status) = shared.lock() {
                    *status = delegation.status();
                }
            }
        });
        Self { bridges, status }
    }

    fn ensure(&self, bridges: Vec<String>) {
        if self.bridges.send(bridges).is_err() {
            error!("the netfilter keeper thread is gone; delegation rules are no longer checked");
        }
    }

    fn status(&self) -> Vec<DelegationStatus> {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

fn counter_name(index: u32) -> String {
    counters::ALL
        .iter()
        .find(|(i, _, _)| *i == index)
        .map_or_else(
            || format!("counter {index}"),
            |(_, name, _)| (*name).to_owned(),
        )
}

fn protocol_name(proto: u8) -> String {
    match proto {
        gate_common::PROTO_TCP => "tcp".to_owned(),
        gate_common::PROTO_UDP => "udp".to_owned(),
        gate_common::PROTO_ICMP => "icmp".to_owned(),
        gate_common::PROTO_ICMPV6 => "icmpv6".to_owned(),
        other => other.to_string(),
    }
}

/// The wall-clock time of a `bpf_ktime_get_ns` (CLOCK_MONOTONIC) timestamp.
fn wall_clock(monotonic_ns: u64) -> SystemTime {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let now_ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    SystemTime::now() - Duration::from_nanos(now_ns.saturating_sub(monotonic_ns))
}

/// Moves drop events from the kernel's ring buffer to the agent loop. `None` stands for an
/// event lost because the loop is behind.
async fn read_drop_events(
    mut ring: AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
    events: mpsc::Sender<Option<DropEvent>>,
) {
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(err) => {
                warn!("drop event buffer unreadable: {err}");
                return;
            }
        };
        while let Some(item) = guard.get_inner_mut().next() {
            let event = datapath::decode_drop_event(&item);
            match events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Report the loss once there is room again.
                    if events.send(None).await.is_err() {
                        return;
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        guard.clear_ready();
    }
}

/// Streams drop events to one `portgate watch` client as JSON lines, until it hangs up.
async fn stream_watch(mut stream: UnixStream, mut events: broadcast::Receiver<WatchEvent>) {
    loop {
        let line = match events.recv().await {
            Ok(event) => serde_json::to_string(&event).map(|mut l| {
                l.push('\n');
                l
            }),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                warn!(missed, "a watch client fell behind");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Ok(line) = line else { continue };
        if stream.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Forwards the programs' aya-log records to tracing (through the `log` bridge).
async fn drain_ebpf_logs(logs: Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>) {
    let Some(mut logs) = logs else { return };
    loop {
        match logs.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(err) => {
                warn!("eBPF log buffer unreadable: {err}");
                return;
            }
        }
    }
}
