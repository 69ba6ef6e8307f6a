//! docker-proxy's ports while no agent runs. The pinned gate keeps enforcing, but the
//! socket lookup only knows the host ports the last agent wrote (`HOST_PORTS`). A port
//! docker-proxy bound itself (Docker up to 27) was recorded by the gate's relay hooks and is
//! refused until the agent is back; one Docker's daemon bound and handed over (Docker 28,
//! `-use-listen-fd`), or a protocol the socket lookup does not see (SCTP), answers IPv6
//! clients and hairpin connections: `doctor` names each such port `unprotected`.

use std::{net::IpAddr, path::Path};

use aya::maps::{HashMap, Map, MapData};
use gate_common::RelayPort;
use gate_common::{AllowKey, AllowValue, LAYOUT_VERSION, PROTO_TCP, PROTO_UDP, map_names};
use gate_user::{datapath::recorded_relay_ports, policy::map_addr};

use super::{Facts, Finding, Level};

/// Whether the relay hooks are pinned, where a gate is.
pub(super) fn check_hooks(facts: &Facts<'_>) -> Option<Finding> {
    if !facts.pinned.host_ports {
        return None; // no gate installed: the agent finding says so
    }
    Some(if facts.pinned.relay_hooks {
        Finding::new(
            "relays",
            "relay hooks",
            Level::Ok,
            "attached: the ports container relays take are refused until an engine publishes them, also while no agent runs".to_owned(),
            None,
        )
    } else {
        Finding::new(
            "relays",
            "relay hooks",
            Level::Unprotected,
            "not attached (see the agent's log): a container started while no agent runs answers through its relay (docker-proxy: IPv6 and hairpin; rootless Podman) until the agent is back".to_owned(),
            Some("mount a cgroup v2 hierarchy (systemd does) and restart the agent".to_owned()),
        )
    })
}

/// docker-proxy: each proxied port the gate cannot judge, then one finding for the proxies.
pub(super) fn check(facts: &Facts<'_>) -> Vec<Finding> {
    let proxies = processes_named(gate_user::runtime::DOCKER_PROXY);
    if proxies == 0 {
        return vec![Finding::new(
            "docker_proxy",
            "docker-proxy",
            Level::Ok,
            "not in use".to_owned(),
            None,
        )];
    }
    // Without an agent, the pinned gate knows only the ports the last agent saw; with one,
    // every TCP and UDP port: what is left is a protocol the lookup does not see.
    let mut proxied = proxied_ports();
    if facts.status.is_ok() || !facts.pinned.host_ports {
        proxied.retain(|p| !matches!(p.proto.as_str(), "tcp" | "udp"));
    }
    let mut findings = unknown_to_the_gate(facts.bpffs, &proxied);
    let gated = facts.status.is_ok() || facts.pinned.host_ports;
    findings.push(Finding::new(
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
    ));
    findings
}

/// How many processes run the program `name`.
fn processes_named(name: &str) -> usize {
    gate_user::procfs::process_dirs()
        .filter(|dir| gate_user::procfs::comm(dir).as_deref() == Some(name))
        .count()
}

/// A port docker-proxy relays: its host address, protocol and host port.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ProxiedPort {
    pub host_ip: IpAddr,
    pub proto: String,
    pub port: u16,
}

/// The ports of every running docker-proxy, from their command lines.
fn proxied_ports() -> Vec<ProxiedPort> {
    gate_user::procfs::process_dirs()
        .filter_map(|dir| std::fs::read(dir.join("cmdline")).ok())
        .filter_map(|cmdline| parse_cmdline(&cmdline))
        .collect()
}

/// `docker-proxy -proto tcp -host-ip 0.0.0.0 -host-port 8080 -container-ip ... ...`.
fn parse_cmdline(cmdline: &[u8]) -> Option<ProxiedPort> {
    let args: Vec<&str> = cmdline
        .split(|b| *b == 0)
        .filter_map(|a| std::str::from_utf8(a).ok())
        .collect();
    if !args.first()?.ends_with(gate_user::runtime::DOCKER_PROXY) {
        return None;
    }
    let value = |flag: &str| {
        let at = args
            .iter()
            .position(|a| *a == flag || *a == format!("-{flag}"))?;
        args.get(at + 1).copied()
    };
    Some(ProxiedPort {
        host_ip: value("-host-ip")?.parse().ok()?,
        proto: value("-proto")?.to_owned(),
        port: value("-host-port")?.parse().ok()?,
    })
}

/// Findings for the proxied ports the pinned gate under `bpffs` does not know (called when
/// no agent answers).
fn unknown_to_the_gate(bpffs: &Path, ports: &[ProxiedPort]) -> Vec<Finding> {
    let path = bpffs
        .join(LAYOUT_VERSION)
        .join("maps")
        .join(map_names::HOST_PORTS);
    let known: Option<HashMap<MapData, AllowKey, AllowValue>> = MapData::from_pin(&path)
        .ok()
        .and_then(|data| HashMap::try_from(Map::HashMap(data)).ok());
    let recorded = recorded_relay_ports(bpffs).unwrap_or_default();
    let mut findings = Vec::new();
    for p in ports {
        let proto = match p.proto.as_str() {
            "tcp" => Some(PROTO_TCP),
            "udp" => Some(PROTO_UDP),
            _ => None,
        };
        if proto.is_some_and(|proto| recorded.contains(&RelayPort::new(proto, p.port))) {
            findings.push(Finding {
                check: "docker_proxy",
                subject: format!("{}:{}/{}", p.host_ip, p.port, p.proto),
                level: Level::Ok,
                detail: format!(
                    "docker-proxy relays host port {}/{}, which no agent has published: the gate refuses it until the agent knows its container",
                    p.port, p.proto
                ),
                advice: None,
            });
        }
    }
    let unknown = ports
        .iter()
        .filter(|p| {
            let proto = match p.proto.as_str() {
                "tcp" => PROTO_TCP,
                "udp" => PROTO_UDP,
                // SCTP and the rest: the socket lookup never sees them.
                _ => return true,
            };
            let addr = if p.host_ip.is_unspecified() {
                [0; 16]
            } else {
                map_addr(p.host_ip)
            };
            let published = known.as_ref().is_some_and(|map| {
                map.get(&AllowKey::new(addr, proto, p.port), 0).is_ok()
                    || map.get(&AllowKey::new([0; 16], proto, p.port), 0).is_ok()
            });
            !published && !recorded.contains(&RelayPort::new(proto, p.port))
        })
        .map(|p| Finding {
            check: "docker_proxy",
            subject: format!("{}:{}/{}", p.host_ip, p.port, p.proto),
            level: Level::Unprotected,
            detail: format!(
                "docker-proxy relays host port {}/{}, which the pinned gate does not know (published while no agent ran by a Docker whose daemon binds the port itself, or a protocol the socket lookup does not see): IPv6 clients and hairpin connections reach it",
                p.port, p.proto
            ),
            advice: Some("start the agent (`systemctl start portgate`): it closes the port until a rule allows it".to_owned()),
        });
    findings.extend(unknown);
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_proxy_command_lines_give_their_ports() {
        let cmdline = [
            "/usr/bin/docker-proxy",
            "-proto",
            "tcp",
            "-host-ip",
            "::",
            "-host-port",
            "8080",
            "-container-ip",
            "172.17.0.2",
            "-container-port",
            "80",
        ]
        .join("\0");
        assert_eq!(
            parse_cmdline(cmdline.as_bytes()),
            Some(ProxiedPort {
                host_ip: "::".parse().unwrap(),
                proto: "tcp".to_owned(),
                port: 8080
            })
        );
        assert_eq!(parse_cmdline(b"/usr/sbin/sshd\0-D\0"), None);
    }

    #[test]
    fn an_sctp_port_is_never_known_to_the_gate() {
        let sctp = ProxiedPort {
            host_ip: "0.0.0.0".parse().unwrap(),
            proto: "sctp".to_owned(),
            port: 9999,
        };
        let findings = unknown_to_the_gate(Path::new("/nonexistent"), &[sctp]);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].level, Level::Unprotected);
    }
}
