//! The command line's arguments and options (clap derive): what `--help` explains.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use gate_user::{
    api::DEFAULT_SOCKET,
    datapath::DEFAULT_BPFFS_DIR,
    runtime::{DEFAULT_DOCKER_SOCKET, DEFAULT_PODMAN_SOCKET},
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
    /// Report what protects this host and what does not, and what to do about each.
    ///
    /// Looks at the agent, every bridge, the engines, the netfilter delegation, containers the
    /// gate cannot see (host network, macvlan, ipvlan), docker-proxy, IPv6 forwarding and the
    /// kernel. Exit status: 0 when nothing is unprotected, 2 when something is, 1 on error.
    Doctor(super::doctor::DoctorArgs),
    /// Write shell completions and man pages (for packaging).
    #[command(hide = true)]
    Generate(super::generate::GenerateArgs),
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
