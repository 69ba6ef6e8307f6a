//! The host agent: loads the gate, keeps the allow map equal to the saved rules resolved
//! against the running containers, and serves the control socket until SIGINT or SIGTERM.
//! Enforcement outlives it (pinned links).
//!
//! One owner, one loop: [`Agent`] holds all the agent's state and [`Agent::serve`] is the
//! only place that changes it, one event at a time. Each job has its file: `bridges`
//! (bridges and their ports), `reconcile` (rules × containers → maps), `requests` (the
//! control socket), `views` (list, status, watch, metrics).

mod bridges;
mod cut;
mod events;
mod explain;
mod macvlan;
mod reconcile;
mod requests;
mod service;
mod uplinks;
mod views;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use gate_common::DropEvent;
use tokio::{
    io::{AsyncWriteExt as _, unix::AsyncFd},
    net::UnixStream,
    signal::unix::{SignalKind, signal},
    sync::{broadcast, mpsc},
    task::JoinSet,
};
use tracing::{error, info, warn};

use self::events::{drain_ebpf_logs, read_drop_events, stream_watch};
use self::views::{counter_name, protocol_name};
use crate::{
    api::{
        DropEventStats, Reply, Request, Response, WatchEvent,
        server::{self, ControlSocket},
    },
    datapath::{self, AllowSync, Capacities, Datapath, GateConfig, sys},
    lock::{self, Lock},
    metrics,
    netfilter::NetfilterKeeper,
    policy::{FilePolicy, LabelPolicy, Resolved, Resolver, RuleStore, Saved, addr_from_map},
    runtime::{self, Engine, RuntimeEvent, Snapshot},
};

/// How often the agent re-checks bridges and the netfilter delegation rules.
const TICK: Duration = Duration::from_secs(2);
/// How long answers being written may take to finish when the agent stops.
const DRAIN: Duration = Duration::from_secs(2);
/// Drop events waiting for the agent loop; beyond this they count as suppressed.
const DROP_EVENT_QUEUE: usize = 1024;

/// How the agent was asked to run.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Bridges named explicitly; they must exist at start.
    pub bridges: Vec<String>,
    /// Also gate docker0, podman0 and the engines' bridge networks as they appear.
    pub auto_bridges: bool,
    /// Interfaces traffic arrives on, for the early drop (`--uplink`).
    pub uplinks: Vec<String>,
    /// Also every interface that is not loopback, a bridge, a veth or a bridge port.
    pub auto_uplinks: bool,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    pub socket: PathBuf,
    pub gate: GateConfig,
    /// Engines to watch, with their sockets.
    pub engines: Vec<(Engine, PathBuf)>,
    /// Engines to watch once their socket exists (`--runtime auto` at boot, before the
    /// engines start).
    pub engines_later: Vec<(Engine, PathBuf)>,
    /// Follow users' rootless Podman (how to run it), if at all.
    pub rootless: Option<runtime::rootless::RootlessOptions>,
    /// Allow every container's published ports (Docker's old behaviour, chosen explicitly).
    pub default_published: bool,
    /// Which containers' `portgate.allow` labels open ports (`--labels`).
    pub labels: LabelPolicy,
    /// Install the netfilter delegation rules where FORWARD would drop.
    pub netfilter: bool,
    /// Where to serve Prometheus metrics; none: not at all.
    pub metrics_addr: Option<SocketAddr>,
    pub capacities: Capacities,
    /// The policy file, read at start, on SIGHUP and on `reload`.
    pub policy_file: PathBuf,
    /// Whether the policy file must exist (it was named explicitly); else a missing file is
    /// an empty policy.
    pub policy_required: bool,
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

impl EngineState {
    /// An engine to follow, not reached yet.
    fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            connected: false,
            snapshot: None,
            syncs: 0,
            events: 0,
            last_error: None,
        }
    }
}

/// The agent's state while it serves.
pub struct Agent {
    options: AgentOptions,
    datapath: Datapath,
    /// Rules, sets and blocks as saved.
    saved: Saved,
    /// What the policy file says.
    file: FilePolicy,
    store: RuleStore,
    /// The `--via` interfaces as the last reconcile found them (name → ifindex).
    via_interfaces: BTreeMap<String, u32>,
    resolver: Resolver,
    /// The rules as resolved last; shared with the threads that build `list` and scrapes.
    resolved: std::sync::Arc<Resolved>,
    /// What the last sync of the allow map left out for want of room.
    allow_sync: AllowSync,
    engines: BTreeMap<Engine, EngineState>,
    delegation: Option<NetfilterKeeper>,
    /// The delegation rule keys last handed to the keeper (bridges, and replies keys).
    delegated: Vec<String>,
    drop_events: DropEventStats,
    /// Fan-out of drop events to `portgate watch` clients.
    watchers: broadcast::Sender<WatchEvent>,
    /// The bridge ports must be looked at again (containers changed, or one was not found).
    ports_stale: bool,
    /// Containers whose image label the log already said opens nothing (by ID).
    warned_labels: BTreeSet<String>,
    /// `--runtime auto` engines whose socket does not exist yet, checked on each tick.
    engines_later: Vec<(Engine, PathBuf)>,
    /// The state and pin directories are this agent's while it runs.
    _locks: [Lock; 2],
}

impl Agent {
    /// Loads the saved rules and the datapath, and attaches to the bridges. Any failure here
    /// leaves a previously attached gate exactly as it was.
    pub fn start(options: AgentOptions) -> anyhow::Result<Self> {
        crate::memory::limit_arenas();
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
        check_interfaces(&options)?;
        let store = RuleStore::new(&options.state_dir);
        let saved = load_saved(&store, options.capacities.rules)?;
        let file = read_policy_file(&options, &saved)?;
        let datapath = Datapath::load_with(&options.bpffs, options.gate, options.capacities)
            .with_context(|| format!("loading the gate under {}", options.bpffs.display()))?;
        let mut engines: BTreeMap<Engine, EngineState> = options
            .engines
            .iter()
            .map(|(engine, socket)| (*engine, EngineState::new(socket.clone())))
            .collect();
        if let Some(rootless) = &options.rootless {
            engines.insert(
                Engine::RootlessPodman,
                EngineState::new(rootless.podman.clone()),
            );
        }
        let delegation = options.netfilter.then(NetfilterKeeper::start);
        let resolver = Resolver::new(options.labels).with_slots(options.capacities.derived_ids());
        let engines_later = options.engines_later.clone();
        let mut agent = Self {
            options,
            datapath,
            saved,
            file,
            store,
            via_interfaces: BTreeMap::new(),
            resolver,
            resolved: std::sync::Arc::default(),
            allow_sync: AllowSync::default(),
            engines,
            delegation,
            delegated: Vec::new(),
            drop_events: DropEventStats::default(),
            watchers: broadcast::channel(256).0,
            ports_stale: true,
            warned_labels: BTreeSet::new(),
            engines_later,
            _locks: locks,
        };
        agent.attach_all()?;
        info!(
            rules = agent.saved.rules.rules().len(),
            bridges = ?agent.datapath.bridges().iter().map(|b| &b.name).collect::<Vec<_>>(),
            engines = ?agent.engines.keys().collect::<Vec<_>>(),
            audit = agent.options.gate.audit,
            gate_host_traffic = agent.options.gate.gate_host_traffic,
            "gate loaded"
        );
        Ok(agent)
    }

    /// Writes the maps, then attaches every program, then retires an older layout: the
    /// new programs never run on a stale allow map. Until the engines have reported, entries
    /// for containers stay as the last agent left them.
    fn attach_all(&mut self) -> anyhow::Result<()> {
        self.reconcile().context("writing the allow map")?;
        // An older layout's tracked connections too: they continue through the new programs.
        self.adopt_older_flows();
        self.attach_bridges(true)?;
        self.datapath
            .open_black_holes()
            .context("opening the sockets refused connections vanish into")?;
        self.datapath
            .attach_host_ports()
            .context("gating published host ports that reach local sockets")?;
        // They guard the time no agent runs; without them (no cgroup v2 hierarchy) this agent
        // still gates everything, and `doctor` names what is missing.
        if let Err(err) = self.datapath.attach_relay_hooks() {
            warn!(
                "not recording the ports container relays take ({:#}): a container started while no agent runs answers through its relay until the agent is back",
                anyhow::Error::from(err)
            );
        }
        self.sync_ports()?;
        self.sync_uplinks(true)?;
        self.adopt_older_flows();
        datapath::retire_other_layouts(&self.options.bpffs)
            .context("detaching an older gate's programs")?;
        Ok(())
    }

    /// Copies an older layout's tracked connections into this one's tables
    /// ([`Datapath::adopt_flows`]), saying how many when there were any. A failure only
    /// costs those connections (they end, as without the copy), so it is a warning.
    fn adopt_older_flows(&mut self) {
        match self.datapath.adopt_flows(&self.options.bpffs) {
            Ok(0) => {}
            Ok(adopted) => info!(
                connections = adopted,
                "took over the older layout's tracked connections"
            ),
            Err(err) => warn!(
                "cannot take over the older layout's tracked connections (they end): {:#}",
                anyhow::Error::from(err)
            ),
        }
    }

    /// Serves the control socket and follows the engines until SIGINT or SIGTERM. Every task
    /// it starts is in one of two sets: `tasks` (engine watchers, event readers, servers,
    /// `watch` streams), stopped at shutdown, and `replies`, which get [`DRAIN`] to finish
    /// writing, so that a client's answer is not cut by a SIGTERM.
    pub async fn serve(mut self) -> anyhow::Result<()> {
        let mut tasks = JoinSet::new();
        let mut replies = JoinSet::new();
        let socket = ControlSocket::bind(&self.options.socket)?;
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let (links_tx, mut links) = mpsc::channel(1);
        tasks.spawn(service::watch_links(links_tx));
        let logs = self.datapath.take_logger().and_then(|logger| {
            // SAFETY: the logger owns its ring buffer's fd, open and unchanged while it lives.
            unsafe { AsyncFd::register(logger) }
                .map_err(|err| warn!("cannot watch eBPF logs: {err}"))
                .ok()
        });
        tasks.spawn(drain_ebpf_logs(logs));
        let (drops_tx, mut drops) = mpsc::channel(DROP_EVENT_QUEUE);
        let ring = self.datapath.take_drop_events()?;
        // SAFETY: the ring buffer owns its map fd, open and unchanged while it lives.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|err| anyhow::anyhow!("cannot watch the drop events: {err}"))?;
        tasks.spawn(read_drop_events(ring, drops_tx));
        let (scrape_tx, mut scrapes) = mpsc::channel(4);
        if let Some(addr) = self.options.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
            info!(%addr, "serving Prometheus metrics on /metrics");
            tasks.spawn(async move {
                if let Err(err) = metrics::serve(listener, scrape_tx).await {
                    error!("metrics server stopped: {err}");
                }
            });
        }
        let (events_tx, mut events) = mpsc::channel(16);
        self.watch_engines(&mut tasks, &events_tx);
        let mut tick = tokio::time::interval(TICK);
        info!(socket = %socket.path().display(), "agent ready");
        let (requests_tx, mut requests) = mpsc::channel(16);
        tasks.spawn(socket.run(requests_tx));
        // The gate is attached and the socket answers: "started" for systemd means gated.
        service::notify("READY=1");
        loop {
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = sighup.recv() => {
                    // systemd (ExecReload) sees the reload through to its end.
                    service::notify("RELOADING=1");
                    match self.reload() {
                        Ok(message) => info!("SIGHUP: {message}"),
                        Err(err) => error!("SIGHUP: {err:#}"),
                    }
                    service::notify("READY=1");
                }
                Some(()) = links.recv() => self.on_links_changed(),
                Some((request, stream)) = requests.recv() => {
                    self.on_request(request, stream, &mut tasks, &mut replies);
                }
                Some(event) = events.recv() => self.on_runtime_event(event),
                Some(drop) = drops.recv() => self.on_drop_event(drop),
                Some(reply) = scrapes.recv() => {
                    let _ = reply.send(self.scrape());
                }
                _ = tick.tick() => {
                    self.on_tick();
                    for (engine, socket) in self.engines_appeared() {
                        tasks.spawn(runtime::watch(engine, socket, events_tx.clone()));
                    }
                }
                // Finished replies are collected as they go, so the set stays small.
                Some(_) = replies.join_next(), if !replies.is_empty() => {}
            }
        }
        info!("stopping; the gate stays attached and keeps enforcing");
        service::notify("STOPPING=1");
        // No new requests; the answers already on their way get a moment to be written.
        tasks.shutdown().await;
        let drained = tokio::time::timeout(DRAIN, async {
            while replies.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                "{} replies were still being written after {DRAIN:?}; cut",
                replies.len()
            );
        }
        replies.shutdown().await;
        Ok(())
    }

    /// Answers one control request: a watch streams from a task of its own, a list's views
    /// are built off the loop, the rest is answered here and written by a task.
    fn on_request(
        &mut self,
        request: Request,
        mut stream: UnixStream,
        tasks: &mut JoinSet<()>,
        replies: &mut JoinSet<()>,
    ) {
        match request {
            Request::Watch => {
                tasks.spawn(stream_watch(stream, self.watchers.subscribe()));
            }
            Request::List => {
                let (mut list, views) = self.list();
                replies.spawn(async move {
                    server::reply_with(&mut stream, move || {
                        list.rules = views.build(|_| true);
                        Response::Ok(Reply::List(Box::new(list)))
                    })
                    .await;
                });
            }
            request => {
                let response = self.handle(request);
                replies.spawn(async move { server::reply(&mut stream, response).await });
            }
        }
    }

    /// One scrape: the loop reads the datapath; the text is written on a blocking thread.
    fn scrape(&self) -> metrics::Body {
        match self.metrics_input() {
            Ok((status, views)) => Box::new(move || {
                metrics::encode(&status, &views.build(|_| true)).unwrap_or_else(|err| {
                    error!("encoding metrics: {err}");
                    String::new()
                })
            }),
            Err(err) => {
                error!("building metrics: {err:#}");
                metrics::written(String::new())
            }
        }
    }

    /// A task per engine the agent follows, and one for every user's rootless Podman.
    fn watch_engines(&self, tasks: &mut JoinSet<()>, events: &mpsc::Sender<RuntimeEvent>) {
        if let Some(rootless) = self.options.rootless.clone() {
            tasks.spawn(runtime::rootless::watch(rootless, events.clone()));
        }
        for (engine, state) in &self.engines {
            if *engine != Engine::RootlessPodman {
                tasks.spawn(runtime::watch(
                    *engine,
                    state.socket.clone(),
                    events.clone(),
                ));
            }
        }
    }

    fn on_tick(&mut self) {
        crate::memory::release_if_due();
        if let Err(err) = self.expire_rules() {
            warn!("{err:#}");
        }
        if self.via_interfaces != self.interfaces() {
            info!("an interface named by --via appeared, went or changed; re-resolving");
            if let Err(err) = self.reconcile() {
                warn!("{err:#}");
            }
        }
        for path in self.datapath.repin() {
            warn!(pin = %path.display(), "a link pin was removed; pinned it again (the gate stayed attached)");
        }
        if let Err(err) = self.attach_bridges(false).and_then(|()| self.sync_ports()) {
            warn!("{err:#}");
        }
        if let Err(err) = self.sync_uplinks(false) {
            warn!("{err:#}");
        }
        if let Err(err) = self.datapath.sync_relay_ports() {
            warn!("forgetting the ports container relays no longer hold: {err:#}");
        }
    }
}

/// The policy file as the options name it, checked against the saved sets: an empty policy
/// when it is optional and absent.
/// The bridges and uplinks the options name exist (with `--bridge auto`, none need be named).
fn check_interfaces(options: &AgentOptions) -> anyhow::Result<()> {
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
    for uplink in &options.uplinks {
        if sys::ifindex(uplink).is_none() {
            bail!("uplink {uplink}: no such interface");
        }
    }
    Ok(())
}

/// The saved rules, refused when they hold ids `--max-rules` does not give slots for.
fn load_saved(store: &RuleStore, limit: u32) -> anyhow::Result<Saved> {
    let mut saved = store.load()?;
    if let Some(max_id) = saved.rules.max_id().filter(|id| *id >= limit) {
        bail!(
            "{} holds {} rules, with ids up to {max_id}: start the agent with --max-rules {} or more",
            store.path().display(),
            saved.rules.rules().len(),
            max_id + 1
        );
    }
    saved.rules = saved.rules.with_limit(limit);
    Ok(saved)
}

pub(super) fn read_policy_file(
    options: &AgentOptions,
    saved: &Saved,
) -> anyhow::Result<FilePolicy> {
    let path = &options.policy_file;
    if !options.policy_required && !path.exists() {
        return Ok(FilePolicy::default());
    }
    let file = FilePolicy::load(path, &saved.sets)?;
    let limit = options.capacities.rules;
    if file.rules.len() > limit as usize {
        anyhow::bail!(
            "{}: {} rules; the agent holds at most {limit} rules from the policy file, containers' labels and --published together (agent --max-rules)",
            path.display(),
            file.rules.len()
        );
    }
    if let Some(name) = file.sets.keys().find(|name| saved.sets.contains_key(*name)) {
        anyhow::bail!(
            "{}: set {name} is also defined by `portgate set`; delete one of the two",
            path.display()
        );
    }
    Ok(file)
}
