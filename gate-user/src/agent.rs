//! The host agent: loads the gate, keeps the allow map equal to the saved rules, and serves
//! the control socket until SIGINT or SIGTERM. Enforcement outlives it (pinned links).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use anyhow::{Context as _, bail};
use gate_common::{ALLOW_CAPACITY, FLOW_CAPACITY, counters};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    api::{
        BridgeStatus, Changed, Fill, Flows, Reply, Request, Response, RuleList, RuleView, Status,
        server::{self, ControlSocket},
    },
    datapath::{Datapath, GateConfig, sys},
    policy::{self, PortSpec, RuleSet, RuleStore},
};

/// How the agent was asked to run.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub bridges: Vec<String>,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    pub socket: PathBuf,
    pub gate: GateConfig,
}

/// The agent's state while it serves.
pub struct Agent {
    options: AgentOptions,
    datapath: Datapath,
    rules: RuleSet,
    store: RuleStore,
}

impl Agent {
    /// Loads the saved rules and the datapath, and attaches to every bridge. Any failure here
    /// leaves a previously attached gate exactly as it was.
    pub fn start(options: AgentOptions) -> anyhow::Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("portgate agent must run as root: it loads eBPF programs and attaches them to bridges");
        }
        if options.bridges.is_empty() {
            bail!("no bridge to gate: pass --bridge IFACE (for example docker0 or podman0)");
        }
        for bridge in &options.bridges {
            if sys::ifindex(bridge).is_none() {
                bail!("bridge {bridge}: no such interface");
            }
        }
        let store = RuleStore::new(&options.state_dir);
        let rules = store.load()?;
        let mut datapath = Datapath::load(&options.bpffs, options.gate)
            .with_context(|| format!("loading the gate under {}", options.bpffs.display()))?;
        // Rules first, then programs: the new programs never run on a stale allow map.
        datapath.sync_allow(&rules.allow_entries()).context("writing the allow map")?;
        for bridge in &options.bridges {
            datapath.attach(bridge)?;
        }
        info!(
            rules = rules.rules().len(),
            bridges = ?options.bridges,
            audit = options.gate.audit,
            gate_host_traffic = options.gate.gate_host_traffic,
            "gate loaded"
        );
        Ok(Self { options, datapath, rules, store })
    }

    /// Serves the control socket until SIGINT or SIGTERM.
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
        info!(socket = %socket.path().display(), "agent ready");
        loop {
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                next = socket.next() => match next {
                    Ok(Some((request, mut stream))) => {
                        let response = self.handle(request);
                        server::reply(&mut stream, &response).await;
                    }
                    Ok(None) => {}
                    Err(err) => warn!("control socket accept failed: {err}"),
                },
            }
        }
        info!("stopping; the gate stays attached and keeps enforcing");
        Ok(())
    }

    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Allow { address, ports } => self.change(&address, &ports, true),
            Request::Deny { address, ports } => self.change(&address, &ports, false),
            Request::List => self.list().map(Reply::List),
            Request::Status => self.status().map(|s| Reply::Status(Box::new(s))),
        };
        match result {
            Ok(reply) => Response::Ok(reply),
            Err(err) => Response::Error(crate::cli::error_text(&err)),
        }
    }

    /// Applies an allow or deny: saved first, then written to the map. If the map write
    /// fails, the previous rules are restored in both places.
    fn change(&mut self, address: &str, ports: &str, allow: bool) -> anyhow::Result<Reply> {
        let address = policy::parse_address(address)?;
        let spec: PortSpec = ports.parse()?;
        let mut next = self.rules.clone();
        let message = if allow {
            let id = next.allow(address, spec)?;
            format!("allowed {address} {spec} (rule {id})")
        } else {
            next.deny(address, spec)?;
            format!("denied {address} {spec}; established connections continue")
        };
        self.store.save(&next)?;
        if let Err(err) = self.apply(&next) {
            error!("applying rules failed, restoring the previous ones: {err:#}");
            self.store.save(&self.rules)?;
            self.apply(&self.rules.clone())?;
            return Err(err);
        }
        self.rules = next;
        info!("{message}");
        let rules = self.views(|r| r.address == address && (r.spec.protocol == spec.protocol))?;
        Ok(Reply::Changed(Changed { message, rules }))
    }

    fn apply(&mut self, next: &RuleSet) -> anyhow::Result<()> {
        let old: BTreeSet<u32> = self.rules.rules().iter().map(|r| r.id).collect();
        let new: BTreeSet<u32> =
            next.rules().iter().map(|r| r.id).filter(|id| !old.contains(id)).collect();
        self.datapath.reset_rule_stats(&new)?;
        self.datapath.sync_allow(&next.allow_entries())?;
        Ok(())
    }

    fn views(&self, filter: impl Fn(&policy::Rule) -> bool) -> anyhow::Result<Vec<RuleView>> {
        self.rules
            .rules()
            .iter()
            .filter(|r| filter(r))
            .map(|rule| {
                let stats = self.datapath.rule_stats(rule.id)?;
                Ok(RuleView {
                    id: rule.id,
                    address: rule.address.to_string(),
                    protocol: rule.spec.protocol.to_string(),
                    port_start: rule.spec.port_start,
                    port_end: rule.spec.port_end,
                    packets: stats.packets,
                    bytes: stats.bytes,
                })
            })
            .collect()
    }

    fn list(&self) -> anyhow::Result<RuleList> {
        Ok(RuleList { rules: self.views(|_| true)? })
    }

    fn status(&self) -> anyhow::Result<Status> {
        let values = self.datapath.counters()?;
        let mut by_kind: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (index, name, kind) in counters::ALL {
            let kind = match kind {
                counters::Kind::Pass => "pass",
                counters::Kind::Drop => "drop",
                counters::Kind::Event => "event",
            };
            let value = values.get(*index as usize).copied().unwrap_or(0);
            by_kind.entry(kind.to_owned()).or_default().insert((*name).to_owned(), value);
        }
        Ok(Status {
            mode: if self.options.gate.audit { "audit" } else { "enforce" }.to_owned(),
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
            rules: self.rules.rules().len(),
            allow_entries: Fill { used: self.datapath.allow_entries()?, capacity: ALLOW_CAPACITY },
            flows: Flows { tracked: self.datapath.tracked_flows()?, capacity: FLOW_CAPACITY },
            counters: by_kind,
        })
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
