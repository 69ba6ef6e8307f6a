//! The `portgate` command line: the agent, and the commands that talk to it.

use std::{fmt::Write as _, path::PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::{
    agent::{Agent, AgentOptions},
    api::{DEFAULT_SOCKET, Reply, Request, RuleView, Status, client},
    datapath::{self, DEFAULT_BPFFS_DIR, GateConfig},
    policy::{self, PortSpec},
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
    /// Allow new connections to ADDRESS on PORTS.
    #[command(after_help = "Examples:\n  portgate allow 172.17.0.2 80\n  portgate allow fd00::2 53/udp\n  portgate allow 10.88.0.5 8000-8010/tcp\n  portgate allow 172.17.0.2 icmp")]
    Allow(RuleArgs),
    /// Stop allowing new connections to ADDRESS on PORTS (established ones continue).
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
    /// Detach the gate from every bridge and remove its pins (run with the agent stopped).
    Uninstall {
        /// The bpffs directory holding the pins.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct RuleArgs {
    /// Container address (IPv4 or IPv6).
    pub address: String,
    /// PORT, PORT/tcp, PORT/udp, FIRST-LAST/PROTO, or `icmp` (echo). TCP when no protocol.
    pub ports: String,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Bridge to gate (repeat for more), e.g. docker0, podman0.
    #[arg(long = "bridge", value_name = "IFACE", required = true)]
    pub bridges: Vec<String>,
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
            Reply::List(list) => Ok(print!("{}", format_rules(&list.rules))),
            other => unexpected(other),
        },
        Command::Status { json } => match client::call(&cli.socket, &Request::Status)? {
            Reply::Status(status) if json => print_json(&status),
            Reply::Status(status) => Ok(print!("{}", format_status(&status))),
            other => unexpected(other),
        },
        Command::Uninstall { bpffs } => uninstall(&cli.socket, &bpffs),
    }
}

fn run_agent(args: AgentArgs, socket: PathBuf) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let options = AgentOptions {
        bridges: args.bridges,
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
    policy::parse_address(&args.address)?;
    args.ports.parse::<PortSpec>()?;
    let request = if allow {
        Request::Allow { address: args.address, ports: args.ports }
    } else {
        Request::Deny { address: args.address, ports: args.ports }
    };
    match client::call(socket, &request)? {
        Reply::Changed(changed) => {
            println!("{}", changed.message);
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
    let done = datapath::uninstall(bpffs)?;
    println!(
        "detached {} link(s), removed {} pin(s) under {}; traffic to the bridges is no longer gated",
        done.links,
        done.pins,
        bpffs.display()
    );
    Ok(())
}

/// An error and its causes on one line, without repeating a cause its parent already quotes.
pub fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn unexpected(reply: Reply) -> anyhow::Result<()> {
    anyhow::bail!("the agent answered something unexpected: {reply:?}")
}

fn ports_text(rule: &RuleView) -> String {
    match (rule.protocol.as_str(), rule.port_start == rule.port_end) {
        ("icmp", _) => "icmp".to_owned(),
        (proto, true) => format!("{}/{proto}", rule.port_start),
        (proto, false) => format!("{}-{}/{proto}", rule.port_start, rule.port_end),
    }
}

pub fn format_rules(rules: &[RuleView]) -> String {
    if rules.is_empty() {
        return "no rules: every new connection into the gated bridges is dropped\n".to_owned();
    }
    let mut out = format!("{:<5} {:<40} {:<16} {:>12} {:>14}\n", "ID", "ADDRESS", "PORTS", "PACKETS", "BYTES");
    for rule in rules {
        let _ = writeln!(
            out,
            "{:<5} {:<40} {:<16} {:>12} {:>14}",
            rule.id,
            rule.address,
            ports_text(rule),
            rule.packets,
            rule.bytes
        );
    }
    out
}

pub fn format_status(status: &Status) -> String {
    let mut out = String::new();
    let host = if status.gate_host_traffic { "gated" } else { "passes" };
    let _ = writeln!(out, "mode:     {} (host traffic {host})", status.mode);
    for bridge in &status.bridges {
        let state = if bridge.attached { "attached" } else { "NOT ATTACHED" };
        let _ = writeln!(out, "bridge:   {} (ifindex {}) {state}", bridge.name, bridge.ifindex);
    }
    let _ = writeln!(
        out,
        "rules:    {} ({} of {} allow entries)",
        status.rules, status.allow_entries.used, status.allow_entries.capacity
    );
    let _ = writeln!(out, "flows:    {} tracked of {}", status.flows.tracked, status.flows.capacity);
    let _ = writeln!(out, "pins:     {}", status.bpffs);
    let _ = writeln!(out, "rules in: {}", status.state_file);
    for (kind, title) in [("pass", "passed"), ("drop", "dropped"), ("event", "events")] {
        if let Some(counters) = status.counters.get(kind) {
            let list: Vec<String> = counters.iter().map(|(name, v)| format!("{name} {v}")).collect();
            let _ = writeln!(out, "{title:<9} {}", list.join(", "));
        }
    }
    out
}
