//! `portgate doctor`: one report of what protects this host and what does not, and what to do
//! about each finding. It asks the agent for its status (when one answers) and looks at the
//! host itself: bridges, pins, engine sockets, docker-proxy, IPv6 forwarding, the kernel.
//!
//! Exit status: 0 when nothing is unprotected, 2 when a finding is `unprotected` (warnings do
//! not count), 1 when the doctor itself failed.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
};

use clap::Args;
use serde::Serialize;

use gate_user::{
    api::{Reply, Request, UngatedContainer, client},
    datapath::{DEFAULT_BPFFS_DIR, LAYOUT_VERSION},
    netfilter,
    runtime::{DEFAULT_DOCKER_SOCKET, DEFAULT_PODMAN_SOCKET},
};

/// The exit status when something is unprotected.
pub const EXIT_UNPROTECTED: i32 = 2;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The bpffs directory holding the pins (looked at when no agent answers).
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs: PathBuf,
    #[command(flatten)]
    pub saved: super::leftovers::SavedRulesets,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    Info,
    Warning,
    Unprotected,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Info => "info",
            Level::Warning => "WARNING",
            Level::Unprotected => "UNPROTECTED",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Finding {
    /// agent, bridge, engine, netfilter, label, container, docker_proxy, ipv6, kernel, service.
    pub check: &'static str,
    /// What the finding is about: a bridge, an engine, a container, ...
    pub subject: String,
    pub level: Level,
    pub detail: String,
    /// What to do about it; none when nothing needs doing.
    pub advice: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// No finding is `unprotected`.
    pub protected: bool,
    pub unprotected: usize,
    pub warnings: usize,
    pub findings: Vec<Finding>,
}

pub fn run(socket: &Path, args: &DoctorArgs) -> anyhow::Result<()> {
    let report = examine(socket, args);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", super::colour::paint(&format_report(&report)));
    }
    if !report.protected {
        std::io::stdout().flush()?;
        std::process::exit(EXIT_UNPROTECTED);
    }
    Ok(())
}

fn examine(socket: &Path, args: &DoctorArgs) -> Report {
    let bpffs = args.bpffs.as_path();
    let mut findings = Vec::new();
    let mut push = |check, subject: &str, level, detail: String, advice: Option<String>| {
        findings.push(Finding {
            check,
            subject: subject.to_owned(),
            level,
            detail,
            advice,
        });
    };
    let status = match client::call(socket, &Request::Status) {
        Ok(Reply::Status(status)) => Ok(status),
        Ok(other) => Err(format!("answered something unexpected: {other:?}")),
        Err(err) => Err(format!("{:#}", anyhow::Error::from(err))),
    };
    let pins = Pins::read(bpffs);
    let host_bridges = host_bridges();

    // The agent.
    match &status {
        Ok(status) => {
            let (level, advice) = if status.mode == "audit" {
                (
                    Level::Unprotected,
                    Some("audit mode passes everything: `portgate mode enforce`".to_owned()),
                )
            } else {
                (Level::Ok, None)
            };
            push(
                "agent",
                "portgate agent",
                level,
                format!(
                    "running (version {}), mode {}, {} rule(s), host traffic {}",
                    status.version,
                    status.mode,
                    status.rules,
                    if status.gate_host_traffic {
                        "gated"
                    } else {
                        "passes"
                    }
                ),
                advice,
            );
            if status.allow_entries.not_fitted > 0 {
                push(
                    "agent",
                    "allow map",
                    Level::Warning,
                    format!(
                        "{} allow entries did not fit (capacity {}): those ports stay closed",
                        status.allow_entries.not_fitted, status.allow_entries.capacity
                    ),
                    Some("narrow the rules, or restart the agent with a larger --max-allow (after `portgate uninstall`)".to_owned()),
                );
            }
        }
        Err(err) => {
            let enforcing = if pins.bridges.is_empty() {
                "no gate is attached".to_owned()
            } else {
                format!(
                    "the gate stays attached to {} and enforces the last rules, but new bridges, containers and rule changes are not followed",
                    join(&pins.bridges)
                )
            };
            push(
                "agent",
                "portgate agent",
                Level::Unprotected,
                format!("not answering on {}: {err}; {enforcing}", socket.display()),
                Some("start it: `systemctl start portgate` (the package's unit), or `portgate agent --bridge auto`; `portgate doctor` needs root to reach it".to_owned()),
            );
        }
    }

    // Bridges.
    let gated: BTreeSet<String> = match &status {
        Ok(status) => status
            .bridges
            .iter()
            .filter(|b| b.attached)
            .map(|b| b.name.clone())
            .collect(),
        Err(_) => pins.bridges.clone(),
    };
    let ungated_bridges: BTreeSet<&str> = status
        .as_ref()
        .map(|s| {
            s.ungated
                .iter()
                .flat_map(|u| u.reason.split("; "))
                .filter_map(|r| r.split("(bridge ").nth(1))
                .filter_map(|r| r.split(')').next())
                .collect()
        })
        .unwrap_or_default();
    if host_bridges.is_empty() {
        push(
            "bridge",
            "-",
            Level::Info,
            "no bridge on this host yet; with --bridge auto the agent gates docker0, podman0 and the engines' bridges as soon as they appear".to_owned(),
            None,
        );
    }
    for bridge in &host_bridges {
        if gated.contains(&bridge.name) {
            push(
                "bridge",
                &bridge.name,
                Level::Ok,
                format!("gated ({} port(s))", bridge.ports),
                None,
            );
        } else {
            let engine_bridge =
                is_engine_bridge(&bridge.name) || ungated_bridges.contains(bridge.name.as_str());
            let level = if engine_bridge {
                Level::Unprotected
            } else {
                Level::Warning
            };
            push(
                "bridge",
                &bridge.name,
                level,
                format!(
                    "not gated ({} port(s)): what is behind it is filtered only by the host's own firewall",
                    bridge.ports
                ),
                Some(format!(
                    "gate it: run the agent with `--bridge auto` (engine bridges) or `--bridge {}`",
                    bridge.name
                )),
            );
        }
    }

    // Engines.
    let followed: Vec<(String, bool)> = match &status {
        Ok(status) => {
            for engine in &status.engines {
                if engine.connected {
                    push(
                        "engine",
                        &engine.engine,
                        Level::Ok,
                        format!(
                            "followed on {}: {} container(s), {} sync(s)",
                            engine.socket, engine.containers, engine.syncs
                        ),
                        None,
                    );
                } else {
                    push(
                        "engine",
                        &engine.engine,
                        Level::Warning,
                        format!(
                            "not reachable on {}{}: the gate enforces what it knew; new containers' rules and labels wait",
                            engine.socket,
                            engine
                                .last_error
                                .as_deref()
                                .map(|e| format!(" ({e})"))
                                .unwrap_or_default()
                        ),
                        Some("start the engine or its API socket (for Podman: `systemctl start podman.socket`); the agent reconnects by itself".to_owned()),
                    );
                }
            }
            status
                .engines
                .iter()
                .map(|e| (e.engine.clone(), e.connected))
                .collect()
        }
        Err(_) => Vec::new(),
    };
    for (engine, socket) in [
        ("docker", DEFAULT_DOCKER_SOCKET),
        ("podman", DEFAULT_PODMAN_SOCKET),
    ] {
        if status.is_ok()
            && Path::new(socket).exists()
            && !followed.iter().any(|(e, _)| e == engine)
        {
            push(
                "engine",
                engine,
                Level::Warning,
                format!(
                    "its socket {socket} exists but the agent does not follow it: rules by container name, labels and --published do not apply to its containers"
                ),
                Some("run the agent with `--runtime auto` (the default)".to_owned()),
            );
        }
    }

    // Netfilter delegation.
    if let Ok(status) = &status {
        for rule in &status.netfilter {
            let (level, detail, advice) = match (rule.installed, rule.backend.as_str()) {
                (true, _) => (
                    Level::Ok,
                    format!(
                        "published ports are handed to the gate ({} {})",
                        rule.backend, rule.chain
                    ),
                    None,
                ),
                (false, netfilter::BACKEND_NONE) => (
                    Level::Ok,
                    "not needed: FORWARD lets published ports reach the gate".to_owned(),
                    None,
                ),
                (false, _) => (
                    Level::Warning,
                    format!(
                        "the delegation rule in {} {} is missing: FORWARD drops published ports before the gate sees them (closed, but allowed ports do not answer)",
                        rule.backend, rule.chain
                    ),
                    Some("see the agent's log for why it could not be installed".to_owned()),
                ),
            };
            push("netfilter", &rule.bridge, level, detail, advice);
        }
    }

    // Image labels that opened ports before `--labels container` became the default.
    if let Ok(status) = &status {
        for ignored in &status.ignored_labels {
            push(
                "label",
                &ignored.container,
                Level::Warning,
                ignored.warning.clone(),
                Some(format!(
                    "if the image's author should decide what it opens: run the agent with --labels image; else `portgate allow {} PORTS`, or `docker run --label portgate.allow=...` with a value of your own",
                    ignored.container
                )),
            );
        }
    }

    // Containers the gate does not see.
    if let Ok(status) = &status {
        for ungated in &status.ungated {
            push(
                "container",
                &ungated.container,
                Level::Unprotected,
                ungated_detail(ungated),
                Some(ungated_advice(ungated)),
            );
        }
    }

    // docker-proxy.
    let proxies = processes_named(gate_user::runtime::DOCKER_PROXY);
    if proxies > 0 {
        // Without an agent, the pinned gate knows only the ports the last agent saw; with
        // one, every TCP and UDP port: what is left is a protocol the lookup does not see.
        let mut proxied = super::proxies::proxied_ports();
        if status.is_ok() || !pins.host_ports {
            proxied.retain(|p| !matches!(p.proto.as_str(), "tcp" | "udp"));
        }
        for f in super::proxies::unknown_to_the_gate(bpffs, &proxied) {
            push(f.check, &f.subject, f.level, f.detail, f.advice);
        }
    }
    if proxies > 0 {
        let gated = status.is_ok() || pins.host_ports;
        push(
            "docker_proxy",
            "docker-proxy",
            if gated { Level::Ok } else { Level::Unprotected },
            format!(
                "{proxies} docker-proxy process(es) relay published ports from the host's own stack (IPv6 clients, hairpin); {}",
                if gated {
                    "the gate's socket lookup admits only allowed ports (connections through lo are not gated)"
                } else {
                    "nothing gates them (no socket-lookup link)"
                }
            ),
            Some(if gated {
                "optional: `\"userland-proxy\": false` in /etc/docker/daemon.json makes Docker use DNAT only".to_owned()
            } else {
                "start the agent: it gates them with a socket lookup".to_owned()
            }),
        );
    } else {
        push(
            "docker_proxy",
            "docker-proxy",
            Level::Ok,
            "not in use".to_owned(),
            None,
        );
    }

    // IPv6 forwarding.
    match read_trimmed("/proc/sys/net/ipv6/conf/all/forwarding").as_deref() {
        Some("1") => push(
            "ipv6",
            "forwarding",
            Level::Info,
            "on: IPv6 is routed to containers with IPv6 addresses; the gate handles IPv6 on gated bridges, but containers the gate does not see answer over IPv6 too".to_owned(),
            None,
        ),
        Some(_) => push(
            "ipv6",
            "forwarding",
            Level::Ok,
            "off: IPv6 clients reach published ports only through docker-proxy (gated by the socket lookup)".to_owned(),
            None,
        ),
        None => push(
            "ipv6",
            "forwarding",
            Level::Info,
            "no IPv6 on this host".to_owned(),
            None,
        ),
    }

    // Kernel features.
    let release = read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = kernel_version(&release);
    if version >= (6, 6) {
        push(
            "kernel",
            "tcx",
            Level::Ok,
            format!(
                "kernel {release} has TCX: the gate's links are its own, no other tool's tc filter can detach or reorder them"
            ),
            None,
        );
    } else {
        push(
            "kernel",
            "tcx",
            Level::Warning,
            format!(
                "kernel {release} has no TCX (6.6+): the gate attaches as a netlink tc filter, which another tool's `tc filter` can precede or remove"
            ),
            Some("upgrade to a kernel 6.6 or newer".to_owned()),
        );
    }
    if version < (5, 9) {
        push(
            "kernel",
            "sk_lookup",
            Level::Unprotected,
            format!(
                "kernel {release} has no socket lookup programs (5.9+): docker-proxy's ports cannot be gated"
            ),
            Some(
                "upgrade the kernel, or set `\"userland-proxy\": false` in /etc/docker/daemon.json"
                    .to_owned(),
            ),
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        push(
            "kernel",
            "btf",
            Level::Warning,
            "no /sys/kernel/btf/vmlinux".to_owned(),
            Some("use a kernel built with CONFIG_DEBUG_INFO_BTF".to_owned()),
        );
    }

    // The service: whether the gate comes up before the engines at boot.
    if Path::new("/run/systemd/system").is_dir() {
        let enabled = std::process::Command::new("systemctl")
            .args(["is-enabled", "--quiet", "portgate.service"])
            .status()
            .is_ok_and(|s| s.success());
        if enabled {
            push(
                "service",
                "portgate.service",
                Level::Ok,
                "enabled: starts before docker.service, podman.service and podman.socket, which wait for it".to_owned(),
                None,
            );
        } else {
            push(
                "service",
                "portgate.service",
                Level::Warning,
                "not enabled: after a reboot, containers with a restart policy start before anything gates them".to_owned(),
                Some("`systemctl enable --now portgate`".to_owned()),
            );
        }
    } else {
        push(
            "service",
            "portgate.service",
            Level::Info,
            "systemd is not running this host: start the agent before the engines at boot yourself"
                .to_owned(),
            None,
        );
    }

    // Rootless engines' published ports: each one's container, known to the agent or not.
    findings.extend(super::rootless::findings(
        &super::rootless::relayed_ports(),
        status.as_ref().ok().map(|s| &**s),
    ));

    // Units that start containers themselves, and whether they wait for the gate.
    findings.extend(super::boot_units::findings());

    // Delegation rules without a gate, now or after the next boot.
    findings.extend(super::leftovers::findings(&gated, &args.saved));
    findings.sort_by_key(|f| std::cmp::Reverse(f.level));
    let unprotected = findings
        .iter()
        .filter(|f| f.level == Level::Unprotected)
        .count();
    let warnings = findings
        .iter()
        .filter(|f| f.level == Level::Warning)
        .count();
    Report {
        protected: unprotected == 0,
        unprotected,
        warnings,
        findings,
    }
}

fn ungated_detail(ungated: &UngatedContainer) -> String {
    let mut detail = format!("({}) {}", ungated.engine, ungated.reason);
    for (what, list) in [
        ("on", &ungated.addresses),
        ("publishes", &ungated.published),
        ("exposes", &ungated.exposed),
    ] {
        if !list.is_empty() {
            let _ = write!(detail, "; {what} {}", list.join(","));
        }
    }
    detail
}

fn ungated_advice(ungated: &UngatedContainer) -> String {
    if ungated.network_mode == "host" {
        "its ports are the host's: filter them in the host's input firewall, or run it on a bridge network and publish what it serves".to_owned()
    } else if ungated.reason.contains("(bridge ") {
        "gate that bridge: run the agent with `--bridge auto` or name it with --bridge".to_owned()
    } else {
        "it has its own address on the LAN: filter it there (router, switch) or in the container, or move it to a bridge network".to_owned()
    }
}

fn format_report(report: &Report) -> String {
    let mut out = String::new();
    let verdict = if report.protected {
        "nothing unprotected found".to_owned()
    } else {
        format!("{} unprotected", report.unprotected)
    };
    let _ = writeln!(
        out,
        "portgate doctor: {verdict}, {} warning(s)",
        report.warnings
    );
    for finding in &report.findings {
        let _ = writeln!(
            out,
            "{:<12} {:<12} {}: {}",
            finding.level.label(),
            finding.check,
            finding.subject,
            finding.detail
        );
        if let Some(advice) = &finding.advice {
            let _ = writeln!(out, "{:<12} {:<12} -> {advice}", "", "");
        }
    }
    out
}

/// What the pin directory says when no agent answers: bridges with an egress link pinned,
/// and whether the socket lookup is pinned.
#[derive(Default)]
struct Pins {
    bridges: BTreeSet<String>,
    host_ports: bool,
}

impl Pins {
    fn read(bpffs: &Path) -> Self {
        let mut pins = Pins::default();
        let Ok(entries) = std::fs::read_dir(bpffs.join(LAYOUT_VERSION).join("links")) else {
            return pins;
        };
        for name in entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
        {
            if let Some(bridge) = name.strip_suffix("-egress") {
                pins.bridges.insert(bridge.to_owned());
            } else if name == "host-ports" {
                pins.host_ports = true;
            }
        }
        pins
    }
}

struct HostBridge {
    name: String,
    ports: usize,
}

/// Every Linux bridge in this network namespace, with its number of ports.
fn host_bridges() -> Vec<HostBridge> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut bridges: Vec<HostBridge> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("bridge").is_dir())
        .filter_map(|e| {
            let ports = std::fs::read_dir(e.path().join("brif")).map_or(0, Iterator::count);
            Some(HostBridge {
                name: e.file_name().into_string().ok()?,
                ports,
            })
        })
        .collect();
    bridges.sort_by(|a, b| a.name.cmp(&b.name));
    bridges
}

/// Named as the engines name their bridges (docker0, br-<id>, podman<N>, cni-podman<N>).
fn is_engine_bridge(name: &str) -> bool {
    name == "docker0" || gate_user::agent::is_engine_bridge_name(name)
}

/// How many processes run the program `name` (by /proc/PID/comm).
fn processes_named(name: &str) -> usize {
    process_dirs()
        .filter(|dir| read_trimmed(dir.join("comm")).as_deref() == Some(name))
        .count()
}

pub(super) use gate_user::procfs::process_dirs;

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// (major, minor) of a kernel release such as "6.18.0-1-amd64"; (0, 0) when unreadable.
fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn join(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), (6, 18));
        assert_eq!(kernel_version("5.10.0"), (5, 10));
        assert_eq!(kernel_version(""), (0, 0));
    }

    #[test]
    fn engine_bridges() {
        assert!(is_engine_bridge("docker0"));
        assert!(is_engine_bridge("br-0123456789ab"));
        assert!(is_engine_bridge("cni-podman0"));
        assert!(!is_engine_bridge("br0"));
        assert!(!is_engine_bridge("virbr0"));
    }
}
