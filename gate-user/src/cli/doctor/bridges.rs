//! Every bridge on the host (gated or not; an engine's bridge that is not gated is
//! unprotected) and the netfilter delegation rule of each gated one.

use std::collections::BTreeSet;

use gate_user::netfilter;

use super::{Facts, Finding, Level};

pub(super) fn check(facts: &Facts<'_>) -> Vec<Finding> {
    let gated = facts.gated_bridges();
    // Bridges the agent names as the reason a container is not gated.
    let ungated_bridges: BTreeSet<&str> = facts
        .status
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
    let host_bridges = host_bridges();
    if host_bridges.is_empty() {
        return vec![Finding::new(
            "bridge",
            "-",
            Level::Info,
            "no bridge on this host yet; with --bridge auto the agent gates docker0, podman0 and the engines' bridges as soon as they appear".to_owned(),
            None,
        )];
    }
    host_bridges
        .iter()
        .map(|bridge| {
            if gated.contains(&bridge.name) {
                return Finding::new(
                    "bridge",
                    &bridge.name,
                    Level::Ok,
                    format!("gated ({} port(s))", bridge.ports),
                    None,
                );
            }
            let engine_bridge = gate_user::runtime::bridges::is_engine_bridge_name(&bridge.name)
                || ungated_bridges.contains(bridge.name.as_str());
            Finding::new(
                "bridge",
                &bridge.name,
                if engine_bridge {
                    Level::Unprotected
                } else {
                    Level::Warning
                },
                format!(
                    "not gated ({} port(s)): what is behind it is filtered only by the host's own firewall",
                    bridge.ports
                ),
                Some(format!(
                    "gate it: run the agent with `--bridge auto` (engine bridges) or `--bridge {}`",
                    bridge.name
                )),
            )
        })
        .collect()
}

/// The delegation rule of each gated bridge (only the agent knows them).
pub(super) fn check_netfilter(facts: &Facts<'_>) -> Vec<Finding> {
    let Ok(status) = &facts.status else {
        return Vec::new();
    };
    status
        .netfilter
        .iter()
        .map(|rule| {
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
            Finding::new("netfilter", &rule.bridge, level, detail, advice)
        })
        .collect()
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
