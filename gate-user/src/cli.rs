//! The `portgate` command line: the agent, and the commands that talk to it.

use std::{fmt::Write as _, path::PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::{
    agent::{Agent, AgentOptions},
    api::{DEFAULT_SOCKET, Reply, Request, RuleView, Status, UngatedContainer, WatchEvent, client},
    datapath::{self, Capacities, DEFAULT_BPFFS_DIR, GateConfig},
    netfilter,
    policy::Source,
    policy::{PortSpec, Target},
    runtime::{DEFAULT_DOCKER_SOCKET, DEFAULT_PODMAN_SOCKET, Engine, LabelOrigin},
};

const ABOUT: &str = "An eBPF port gate for container bridges.

A TC program on each container bridge admits new connections only to the (container address,
protocol, port) on the allow list; replies and established connections pass; everything else
is dropped and counted. The agent keeps the gate loaded and the rules saved; the other commands
talk to it over its control socket (root only).";

#[derive(Debug, Parser)]
#[command(name = "portgate", version, about = ABOUT)]
pub struct Cli {
    /// The agent's control socket.
    #[arg(long, global = true, env = "PORTGATE_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the host agent in the foreground (root). Stops on SIGINT/SIGTERM; the gate stays.
    Agent(AgentArgs),
    /// Allow new connections to TARGET (an address or a container) on PORTS.
    #[command(
        after_help = "Examples:\n  portgate allow 172.17.0.2 80\n  portgate allow fd00::2 53/udp\n  portgate allow web 8000-8010/tcp     (container by name; follows it across restarts)\n  portgate allow --published web      (exactly the ports `web` publishes)\n  portgate allow 172.17.0.2 icmp\n\nContainers can also allow themselves: --label portgate.allow=80/tcp,53/udp"
    )]
    Allow(RuleArgs),
    /// Stop allowing new connections to TARGET on PORTS (established ones continue).
    Deny(RuleArgs),
    /// Show the allow rules with their packet and byte counters.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show bridges, mode, table fill and the pass/drop counters.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow dropped (or, in audit mode, would-be-dropped) connection attempts live.
    Watch {
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Switch the running gate between enforce and audit; tracked connections are kept.
    Mode {
        #[arg(value_enum)]
        mode: Mode,
    },
    /// Detach the gate from every bridge and remove its pins (run with the agent stopped).
    Uninstall {
        /// The bpffs directory holding the pins.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct RuleArgs {
    /// Container address (IPv4 or IPv6), or a container name or ID.
    pub target: String,
    /// PORT, PORT/tcp, PORT/udp, FIRST-LAST/PROTO, or `icmp` (echo). TCP when no protocol.
    #[arg(required_unless_present = "published", conflicts_with = "published")]
    pub ports: Option<String>,
    /// The ports the container publishes (host port -> container port), whatever they are.
    #[arg(long)]
    pub published: bool,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Bridge to gate (repeat for more), e.g. docker0, podman0; `auto`: docker0, podman0 and
    /// the bridges of the engines' networks, including ones created later.
    #[arg(long = "bridge", value_name = "IFACE", required = true)]
    pub bridges: Vec<String>,
    /// Container engines to follow; auto watches the sockets that exist.
    #[arg(long, value_enum, default_value_t = RuntimeChoice::Auto)]
    pub runtime: RuntimeChoice,
    /// Docker's API socket.
    #[arg(long, default_value = DEFAULT_DOCKER_SOCKET)]
    pub docker_socket: PathBuf,
    /// Podman's Docker-compatible API socket (`podman system service`).
    #[arg(long, default_value = DEFAULT_PODMAN_SOCKET)]
    pub podman_socket: PathBuf,
    /// deny: only what rules and labels allow; published: also every container's published
    /// ports (Docker's own behaviour, as an explicit choice).
    #[arg(long, value_enum, default_value_t = DefaultPolicy::Deny)]
    pub default_policy: DefaultPolicy,
    /// on: a container's `portgate.allow` label opens its ports while it runs (also a label
    /// its image carries: `list` tells which); off: labels are ignored, only saved rules
    /// and the default policy open ports.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub labels: Switch,
    /// Do not install the netfilter rules that hand published ports to the gate where the
    /// FORWARD policy would drop them.
    #[arg(long)]
    pub no_netfilter: bool,
    /// Connections the gate can track at once (least recently used go first when full).
    /// Changing it on a host where the gate runs needs `portgate uninstall` first.
    #[arg(long, default_value_t = gate_common::FLOW_CAPACITY, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_flows: u32,
    /// Allow-map entries, one per (address, protocol, port) the rules open; what does not fit
    /// is left out and reported (`status`, `allow`). At most the default. Changing it on a
    /// host where the gate runs needs `portgate uninstall` first.
    #[arg(long, default_value_t = gate_common::ALLOW_CAPACITY, value_parser = clap::value_parser!(u32).range(1..=i64::from(gate_common::ALLOW_CAPACITY)))]
    pub max_allow: u32,
    /// Serve Prometheus metrics on ADDR (/metrics); `off` to serve none.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9560", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
    /// Where the rules are saved.
    #[arg(long, default_value = "/var/lib/portgate")]
    pub state_dir: PathBuf,
    /// bpffs directory for the pinned programs, links and maps (mounted if missing).
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs: PathBuf,
    /// enforce drops what is not allowed; audit only counts what enforce would drop.
    #[arg(long, value_enum, default_value_t = Mode::Enforce)]
    pub mode: Mode,
    /// Gate connections from the host's own stack too (by default they pass).
    #[arg(long)]
    pub gate_host_traffic: bool,
}

/// `--metrics-addr`: an address, or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<std::net::SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|addr| MetricsAddr(Some(addr)))
        .map_err(|_| format!("expected IP:PORT (e.g. 127.0.0.1:9560) or off, got {s:?}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RuntimeChoice {
    Docker,
    Podman,
    Auto,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DefaultPolicy {
    Deny,
    Published,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Enforce,
    Audit,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => run_agent(args, cli.socket),
        Command::Allow(args) => change(&cli.socket, args, true),
        Command::Deny(args) => change(&cli.socket, args, false),
        Command::List { json } => match client::call(&cli.socket, &Request::List)? {
            Reply::List(list) if json => print_json(&list),
            Reply::List(list) => {
                print!("{}", format_rules(&list.rules));
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Status { json } => match client::call(&cli.socket, &Request::Status)? {
            Reply::Status(status) if json => print_json(&status),
            Reply::Status(status) => {
                print!("{}", format_status(&status));
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Watch { json } => client::watch(&cli.socket, |event| {
            if json {
                println!("{}", serde_json::to_string(&event)?);
            } else {
                println!("{}", format_watch_event(&event));
            }
            Ok(())
        }),
        Command::Mode { mode } => match client::call(
            &cli.socket,
            &Request::Mode {
                audit: mode == Mode::Audit,
            },
        )? {
            Reply::Changed(changed) => {
                println!("{}", changed.message);
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Uninstall { bpffs } => uninstall(&cli.socket, &bpffs),
    }
}

fn run_agent(args: AgentArgs, socket: PathBuf) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let auto_bridges = args.bridges.iter().any(|b| b == "auto");
    let bridges = args.bridges.into_iter().filter(|b| b != "auto").collect();
    let docker = (Engine::Docker, args.docker_socket);
    let podman = (Engine::Podman, args.podman_socket);
    let engines = match args.runtime {
        RuntimeChoice::Docker => vec![docker],
        RuntimeChoice::Podman => vec![podman],
        RuntimeChoice::None => vec![],
        RuntimeChoice::Auto => [docker, podman]
            .into_iter()
            .filter(|(_, s)| s.exists())
            .collect(),
    };
    let options = AgentOptions {
        bridges,
        auto_bridges,
        engines,
        default_published: args.default_policy == DefaultPolicy::Published,
        labels: args.labels == Switch::On,
        netfilter: !args.no_netfilter,
        metrics_addr: args.metrics_addr.0,
        capacities: Capacities {
            flows: args.max_flows,
            allow: args.max_allow,
        },
        state_dir: args.state_dir,
        bpffs: args.bpffs,
        socket,
        gate: GateConfig {
            audit: args.mode == Mode::Audit,
            gate_host_traffic: args.gate_host_traffic,
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let agent = Agent::start(options)?;
        agent.serve().await
    })
}

fn change(socket: &std::path::Path, args: RuleArgs, allow: bool) -> anyhow::Result<()> {
    // Check locally first, so bad input fails fast even without an agent.
    args.target.parse::<Target>()?;
    if let Some(ports) = &args.ports {
        ports.parse::<PortSpec>()?;
    }
    let RuleArgs {
        target,
        ports,
        published,
    } = args;
    let request = if allow {
        Request::Allow {
            target,
            ports,
            published,
        }
    } else {
        Request::Deny {
            target,
            ports,
            published,
        }
    };
    match client::call(socket, &request)? {
        Reply::Changed(changed) => {
            println!("{}", changed.message);
            for warning in &changed.warnings {
                eprintln!("warning: {warning}");
            }
            Ok(())
        }
        other => unexpected(other),
    }
}

fn uninstall(socket: &std::path::Path, bpffs: &std::path::Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        anyhow::bail!(
            "an agent is serving {}; stop it first, or it would run without a gate",
            socket.display()
        );
    }
    // An agent that serves another socket still holds its pin directory.
    let _lock = if bpffs.exists() {
        Some(crate::lock::lock_dir(bpffs, "pin directory")?)
    } else {
        None
    };
    let done = datapath::uninstall(bpffs)?;
    let rules = netfilter::remove_for(&done.bridges)?;
    println!(
        "detached {} link(s), removed {} pin(s) under {} and {rules} netfilter delegation rule(s); traffic to the bridges is no longer gated",
        done.links,
        done.pins,
        bpffs.display()
    );
    if !done.foreign.is_empty() {
        let foreign: Vec<String> = done
            .foreign
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        println!(
            "left {} entr{} that portgate did not create: {}",
            foreign.len(),
            if foreign.len() == 1 { "y" } else { "ies" },
            foreign.join(", ")
        );
    }
    Ok(())
}


fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn unexpected(reply: Reply) -> anyhow::Result<()> {
    anyhow::bail!("the agent answered something unexpected: {reply:?}")
}

pub fn format_rules(rules: &[RuleView]) -> String {
    if rules.is_empty() {
        return "no rules: every new connection into the gated bridges is dropped\n".to_owned();
    }
    let mut out = format!(
        "{:<5} {:<20} {:<16} {:<26} {:<16} {:<10} {:<20} {:<5} {:>10} {:>12}\n",
        "ID",
        "TARGET",
        "CONTAINER",
        "ADDRESS",
        "PORTS",
        "HOST",
        "STATE",
        "GATED",
        "PACKETS",
        "BYTES"
    );
    for rule in rules {
        let ports = if rule.published && rule.ports.is_empty() {
            "published".to_owned()
        } else {
            rule.ports.join(",")
        };
        let host: Vec<String> = rule.host_ports.iter().map(ToString::to_string).collect();
        let state = match (rule.active, rule.source) {
            (false, _) => "inactive".to_owned(),
            (true, Source::Cli) => "active".to_owned(),
            (true, Source::Label) if rule.label_origin == Some(LabelOrigin::Image) => {
                "active (image label)".to_owned()
            }
            (true, Source::Label) => "active (label)".to_owned(),
            (true, Source::DefaultPolicy) => "active (policy)".to_owned(),
        };
        let gated = match rule.gated {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        let _ = writeln!(
            out,
            "{:<5} {:<20} {:<16} {:<26} {:<16} {:<10} {:<20} {gated:<5} {:>10} {:>12}",
            rule.id,
            rule.target,
            rule.container.as_deref().unwrap_or("-"),
            if rule.addresses.is_empty() {
                "-".to_owned()
            } else {
                rule.addresses.join(",")
            },
            ports,
            if host.is_empty() {
                "-".to_owned()
            } else {
                host.join(",")
            },
            state,
            rule.packets,
            rule.bytes
        );
    }
    out
}

pub fn format_watch_event(event: &WatchEvent) -> String {
    let verdict = if event.audit { "would drop" } else { "dropped" };
    let container = event
        .container
        .as_deref()
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    let suppressed = match event.suppressed {
        0 => String::new(),
        n => format!(" [+{n} suppressed before]"),
    };
    format!(
        "{} {} {verdict} {} {}:{} -> {}:{}{container} {}{suppressed}",
        event.time,
        event.bridge,
        event.protocol,
        event.source,
        event.source_port,
        event.destination,
        event.destination_port,
        event.reason,
    )
}

/// One container the gate does not see: who, why, and what is open to whoever reaches it.
pub fn format_ungated(ungated: &UngatedContainer) -> String {
    let mut line = format!(
        "{} ({}): {}",
        ungated.container, ungated.engine, ungated.reason
    );
    for (what, list) in [
        ("on", &ungated.addresses),
        ("publishes", &ungated.published),
        ("exposes", &ungated.exposed),
    ] {
        if !list.is_empty() {
            let _ = write!(line, "; {what} {}", list.join(","));
        }
    }
    line
}

pub fn format_status(status: &Status) -> String {
    let mut out = String::new();
    let host = if status.gate_host_traffic {
        "gated"
    } else {
        "passes"
    };
    let _ = writeln!(out, "mode:     {} (host traffic {host})", status.mode);
    for bridge in &status.bridges {
        let state = if bridge.attached {
            "attached"
        } else {
            "NOT ATTACHED"
        };
        let _ = writeln!(
            out,
            "bridge:   {} (ifindex {}) {state}",
            bridge.name, bridge.ifindex
        );
    }
    let fill = &status.allow_entries;
    let not_fitted = match fill.not_fitted {
        0 => String::new(),
        n => format!(
            "; {n} MORE DID NOT FIT ({} {}), not enforced: see --max-allow",
            if fill.not_fitted_rules.len() == 1 {
                "rule"
            } else {
                "rules"
            },
            fill.not_fitted_rules
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    };
    let _ = writeln!(
        out,
        "rules:    {} ({} of {} allow entries{not_fitted})",
        status.rules, fill.used, fill.capacity
    );
    let _ = writeln!(
        out,
        "flows:    {} tracked of {}",
        status.flows.tracked, status.flows.capacity
    );
    let _ = writeln!(
        out,
        "events:   {} drop events reported, {} suppressed by the rate limit",
        status.drop_events.reported, status.drop_events.suppressed
    );
    for drops in &status.bridge_drops {
        let _ = writeln!(
            out,
            "drops:    {} {} {}",
            drops.bridge, drops.reason, drops.packets
        );
    }
    for engine in &status.engines {
        let state = if engine.connected {
            "connected"
        } else {
            "DISCONNECTED"
        };
        let error = engine
            .last_error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "engine:   {} {state}{error}, {} containers, {} syncs, {} events, {}",
            engine.engine, engine.containers, engine.syncs, engine.events, engine.socket
        );
    }
    for rule in &status.netfilter {
        let state = match (rule.installed, rule.backend.as_str()) {
            (true, _) => "installed",
            (false, netfilter::BACKEND_NONE) => "not needed",
            (false, _) => "MISSING (could not be installed; see the agent log)",
        };
        let _ = writeln!(
            out,
            "netfilter: {} via {} {} {state}",
            rule.bridge, rule.backend, rule.chain
        );
    }
    let labels = if status.labels {
        "on (portgate.allow labels open ports)"
    } else {
        "off (portgate.allow labels are ignored)"
    };
    let _ = writeln!(out, "labels:   {labels}");
    let ports = status.published_ports;
    let _ = writeln!(
        out,
        "published: {} port(s) gated, {} not",
        ports.gated, ports.ungated
    );
    for ungated in &status.ungated {
        let _ = writeln!(out, "UNGATED:  {}", format_ungated(ungated));
    }
    let _ = writeln!(out, "pins:     {}", status.bpffs);
    let _ = writeln!(out, "rules in: {}", status.state_file);
    for (kind, title) in [("pass", "passed"), ("drop", "dropped"), ("event", "events")] {
        if let Some(counters) = status.counters.get(kind) {
            let list: Vec<String> = counters
                .iter()
                .map(|(name, v)| format!("{name} {v}"))
                .collect();
            let _ = writeln!(out, "{title:<9} {}", list.join(", "));
        }
    }
    out
}
