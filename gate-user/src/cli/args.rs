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
    /// Allow new connections to TARGET (an address or a container) on PORTS, from anyone or
    /// from the sources and interface given.
    #[command(
        after_help = "Examples:\n  portgate allow 172.17.0.2 80\n  portgate allow fd00::2 53/udp\n  portgate allow web 8000-8010/tcp     (container by name; follows it across restarts)\n  portgate allow --published web      (exactly the ports `web` publishes)\n  portgate allow --host-port 8080/tcp (the container port host port 8080 maps to)\n  portgate allow 172.17.0.2 icmp\n  portgate allow db 5432/tcp --from 10.0.0.0/8 --from 2001:db8::/32\n  portgate allow web 443 --from office (a set: portgate set office 192.0.2.0/24 ...)\n  portgate allow web 8080 --via wg0    (only connections that came in on wg0)\n  portgate allow web 22 --from 192.0.2.7 --for 2h   (ends by itself)\n\nSeveral --from are a union; with --via, both must hold. Rules add up: a port is open to\nthe union of what its rules admit. The block list (portgate block) overrides every rule.\n\nContainers can also allow themselves: --label 'portgate.allow=80/tcp, 5432/tcp from 10.0.0.0/8'\n(a label in the image opens nothing unless the agent runs with --labels image)."
    )]
    Allow(AllowArgs),
    /// Stop allowing new connections to TARGET on PORTS. Removes every rule on them, whatever
    /// its sources; where a container's `portgate.allow` label (or the default policy) opens
    /// them, closes them while the deny stands. Established connections continue (as with ufw
    /// and nftables) unless --cut is given; every new connection, even over an old one's
    /// ports, is judged anew.
    #[command(
        after_help = "The deny of what a label opens is saved with the rules (`portgate list`: denied: ...)\nand stands across restarts and for a new container of that name, until\n`portgate allow TARGET PORTS` (for anyone, with no --for) lifts it. It does not close\nwhat saved rules or the policy file open."
    )]
    Deny(DenyArgs),
    /// Create or replace a named set of sources, for `allow --from NAME`; every rule that
    /// names it follows at once (established connections continue).
    #[command(
        after_help = "Examples:\n  portgate set office 192.0.2.0/24 198.51.100.7 2001:db8:1::/48\n  portgate set office -f office.txt     (one address or prefix per line, # comments)\n  portgate set office --delete"
    )]
    Set(SetArgs),
    /// Never admit new connections from these sources, whatever allows them (the rules stay).
    #[command(
        after_help = "Examples:\n  portgate block 203.0.113.0/24 198.51.100.7\n  portgate block --replace -f blocklist.txt   (the whole list, switched at once)\n  portgate unblock 198.51.100.7\n\nMeant to be fed by other tools (fail2ban, CrowdSec, a cron job). Drops count as `blocked`.\nA block also ends the live connections from there, both ways (their packets count as `cut`)."
    )]
    Block(BlockArgs),
    /// Take sources off the block list.
    Unblock {
        /// Addresses or prefixes, as blocked.
        #[arg(required = true)]
        prefixes: Vec<String>,
    },
    /// Say what verdict a new connection would get, and why, from the maps the kernel reads
    /// (no traffic is sent).
    #[command(
        after_help = "TARGET is a container (name or address), or `host` (or a host address) with PORT a\npublished host port.\n\nExamples:\n  portgate explain 192.0.2.7 web 443\n  portgate explain 2001:db8::5 host 8080/tcp --via eth1"
    )]
    Explain {
        /// The connecting address.
        source: String,
        /// A container name or address, or `host`.
        target: String,
        /// PORT, PORT/tcp, PORT/udp, or `icmp`.
        port: String,
        /// The interface the connection would come in on.
        #[arg(long, value_name = "IFACE")]
        via: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
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
    /// Read the policy file again and apply it (as SIGHUP does); a file that does not parse
    /// changes nothing.
    Reload,
    /// Check a policy file without applying it, and say what applying it would change.
    #[command(after_help = POLICY_HELP)]
    Check {
        /// The file (default: /etc/portgate/policy.toml).
        file: Option<PathBuf>,
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
    /// The systemd generator (/lib/systemd/system-generators/portgate): a drop-in that makes
    /// each unit that starts containers itself (Quadlet files, `podman generate systemd`
    /// units) wait for the gate at boot.
    #[command(hide = true)]
    SystemdGenerator(super::generate::GeneratorArgs),
    /// Detach the gate from every bridge and remove its pins (run with the agent stopped).
    Uninstall {
        /// The bpffs directory holding the pins.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        #[command(flatten)]
        saved: super::leftovers::SavedRulesets,
    },
}

#[derive(Debug, Args)]
pub struct RuleArgs {
    /// Container address (IPv4 or IPv6), or a container name or ID.
    #[arg(required_unless_present = "host_port")]
    pub target: Option<String>,
    /// PORT, PORT/tcp, PORT/udp, FIRST-LAST/PROTO, or `icmp` (echo). TCP when no protocol.
    #[arg(required_unless_present_any = ["published", "host_port"], conflicts_with = "published")]
    pub ports: Option<String>,
    /// The ports the container publishes (host port -> container port), whatever they are.
    #[arg(long)]
    pub published: bool,
    /// The container port this host port maps to (PORT/PROTO), whichever container
    /// publishes it now; instead of TARGET and PORTS.
    #[arg(long, value_name = "PORT/PROTO", conflicts_with_all = ["published"])]
    pub host_port: Option<String>,
}

#[derive(Debug, Args)]
pub struct DenyArgs {
    #[command(flatten)]
    pub rule: RuleArgs,
    /// Also end the established connections the removed rules admitted (their packets are
    /// dropped both ways from now on, counted `cut`).
    #[arg(long)]
    pub cut: bool,
}

#[derive(Debug, Args)]
pub struct AllowArgs {
    #[command(flatten)]
    pub rule: RuleArgs,
    /// Only from this source: an address, a prefix (10.0.0.0/8, 2001:db8::/32) or a set
    /// name (repeat for more: a union).
    #[arg(long = "from", value_name = "SOURCE")]
    pub from: Vec<String>,
    /// Only connections that came in on this interface (wg0, tailscale0, eth1).
    #[arg(long, value_name = "IFACE")]
    pub via: Option<String>,
    /// The rule ends by itself after this long (30m, 2h, 1d); survives agent restarts. Its
    /// end also ends the connections it admitted.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    pub for_duration: Option<std::time::Duration>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|err| format!("{err} (e.g. 30m, 2h, 1d)"))
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The set's name: a letter, then letters, digits, `_`, `.` or `-`.
    pub name: String,
    /// Its addresses and prefixes (the set becomes exactly these).
    #[arg(required_unless_present_any = ["delete", "file"], conflicts_with = "delete")]
    pub prefixes: Vec<String>,
    /// Read the prefixes from FILE (one per line, # comments; `-`: standard input).
    #[arg(short = 'f', long, value_name = "FILE", conflicts_with = "delete")]
    pub file: Option<PathBuf>,
    /// Delete the set (refused while rules name it).
    #[arg(long)]
    pub delete: bool,
}

#[derive(Debug, Args)]
pub struct BlockArgs {
    /// Addresses and prefixes to block.
    #[arg(required_unless_present = "file")]
    pub prefixes: Vec<String>,
    /// Read them from FILE (one per line, # comments; `-`: standard input).
    #[arg(short = 'f', long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The block list becomes exactly these, switched to at once (no packet sees half).
    #[arg(long)]
    pub replace: bool,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Bridge to gate (repeat for more), e.g. docker0, podman0; `auto`: docker0, podman0 and
    /// the bridges of the engines' networks, including ones created later.
    #[arg(long = "bridge", value_name = "IFACE", required = true)]
    pub bridges: Vec<String>,
    /// Drop new connections to published host ports that the rules do not admit already on
    /// the ingress of IFACE, before netfilter and conntrack (repeat for more); `auto`: every
    /// interface that is up and not loopback, a bridge, a veth or a bridge port. The bridge
    /// gate still decides everything else.
    #[arg(long = "uplink", value_name = "IFACE")]
    pub uplinks: Vec<String>,
    /// Container engines to follow; auto watches the sockets that exist.
    #[arg(long, value_enum, default_value_t = RuntimeChoice::Auto)]
    pub runtime: RuntimeChoice,
    /// Docker's API socket.
    #[arg(long, default_value = DEFAULT_DOCKER_SOCKET)]
    pub docker_socket: PathBuf,
    /// Podman's Docker-compatible API socket (`podman system service`).
    #[arg(long, default_value = DEFAULT_PODMAN_SOCKET)]
    pub podman_socket: PathBuf,
    /// The `podman` the agent runs as each user whose rootless Podman it finds (`podman ps`),
    /// with `--runtime auto` or `podman`; `off`: rootless Podman is not followed.
    #[arg(long, value_name = "PROGRAM", default_value = "podman")]
    pub rootless_podman: PathBuf,
    /// A root directory to run that `podman` in (chroot), for a Podman installed there.
    #[arg(long, value_name = "DIR")]
    pub rootless_podman_root: Option<PathBuf>,
    /// deny: only what rules and labels allow; published: also every container's published
    /// ports (Docker's own behaviour, as an explicit choice).
    #[arg(long, value_enum, default_value_t = DefaultPolicy::Deny)]
    pub default_policy: DefaultPolicy,
    /// Which `portgate.allow` labels open their container's ports while it runs. container:
    /// labels set on the container itself (`docker run --label`, compose `labels:`); `on`
    /// means the same. image: also labels its image carries (a `LABEL` in the image's
    /// Dockerfile: whoever built the image decides what it opens). off: none; only saved
    /// rules, the policy file and the default policy open ports. A label equal to its
    /// image's counts as the image's. `list` says where each label came from; `status` and
    /// `doctor` name the containers whose image label opens nothing. `portgate deny` closes
    /// what a label opens.
    #[arg(long, value_enum, default_value_t = Labels::Container)]
    pub labels: Labels,
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
    /// Saved rules (`portgate allow`) the agent holds; as many again are for the rules it
    /// derives (labels, --published, the default policy, the policy file). Each rule has a
    /// counter slot in a per-CPU kernel array, 2 × N slots × 16 bytes × possible CPUs in all
    /// (the default: 256 KiB per CPU, 32 MiB on 128 CPUs), so the default stays modest.
    /// Changing it on a host where the gate runs needs `portgate uninstall` first.
    #[arg(long, value_name = "N", default_value_t = gate_user::datapath::DEFAULT_SAVED_RULES, value_parser = clap::value_parser!(u32).range(1..=i64::from(gate_user::datapath::MAX_SAVED_RULES_LIMIT)))]
    pub max_rules: u32,
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
    /// The policy file: sets, blocks and rules, read at start, on SIGHUP and on `portgate
    /// reload` (see `portgate check --help`). The default is optional; a file named here
    /// must exist.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
}

/// Where the policy file is looked for when `--policy` is not given.
pub const DEFAULT_POLICY_FILE: &str = "/etc/portgate/policy.toml";

const POLICY_HELP: &str =
    "The policy file holds sets, blocks and rules in the words of the command line:

  block = [\"203.0.113.0/24\"]

  [sets]
  office = [\"192.0.2.0/24\", \"198.51.100.7\"]

  [[allow]]
  target = \"web\"            # a container name or ID, or an address
  ports = \"443/tcp\"         # or: published = true, or: host_port = \"8080/tcp\" (no target)
  from = [\"office\", \"10.0.0.0/8\"]
  via = \"wg0\"

Its rules are listed with source `file` and cannot be removed with `deny`; its sets and
blocks cannot be changed with `set`, `block` or `unblock`: edit the file, then reload.";

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
pub enum Labels {
    /// No label opens ports.
    Off,
    /// Labels set on the container itself (`on`, which once meant image labels too, is
    /// taken for this).
    #[value(alias = "on")]
    Container,
    /// Labels set on the container and labels its image carries.
    Image,
}

impl From<Labels> for gate_user::policy::LabelPolicy {
    fn from(labels: Labels) -> Self {
        match labels {
            Labels::Off => Self::Off,
            Labels::Container => Self::Container,
            Labels::Image => Self::Image,
        }
    }
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn labels(extra: &[&str]) -> Result<Labels, String> {
        let mut argv = vec!["portgate", "agent", "--bridge", "docker0"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Agent(args) => Ok(args.labels),
            other => Err(format!("parsed as {other:?}")),
        }
    }

    #[test]
    fn labels_default_to_the_containers_own_and_on_means_the_same() {
        assert_eq!(labels(&[]), Ok(Labels::Container));
        assert_eq!(labels(&["--labels", "on"]), Ok(Labels::Container));
        assert_eq!(labels(&["--labels", "container"]), Ok(Labels::Container));
        assert_eq!(labels(&["--labels", "image"]), Ok(Labels::Image));
        assert_eq!(labels(&["--labels", "off"]), Ok(Labels::Off));
        let err = labels(&["--labels", "yes"]).expect_err("not a choice");
        assert!(
            err.contains("off") && err.contains("container") && err.contains("image"),
            "{err}"
        );
    }
}
