//! How the commands print the agent's replies for people (`--json` prints them as they are).

use std::fmt::Write as _;

use gate_user::{
    api::{Explanation, RuleList, RuleView, Status, UngatedContainer, WatchEvent},
    netfilter,
    policy::{LabelOrigin, LabelPolicy, Origin},
};

/// The rules, then the sets, the block list and the labels that do not parse.
pub fn format_list(list: &RuleList) -> String {
    let mut out = format_rules(&list.rules);
    for (name, prefixes) in &list.sets {
        let _ = writeln!(
            out,
            "set {name}: {}",
            if prefixes.is_empty() {
                "(empty)".to_owned()
            } else {
                prefixes.join(" ")
            }
        );
    }
    if !list.blocks.is_empty() {
        let shown: Vec<&str> = list.blocks.iter().take(20).map(String::as_str).collect();
        let more = list.blocks.len().saturating_sub(shown.len());
        let more = if more > 0 {
            format!(" (+{more} more)")
        } else {
            String::new()
        };
        let _ = writeln!(out, "blocked: {}{more}", shown.join(" "));
    }
    for error in &list.label_errors {
        let _ = writeln!(
            out,
            "label of {} opens nothing: {}",
            error.container, error.error
        );
    }
    for ignored in &list.ignored_labels {
        let _ = writeln!(out, "WARNING: {}", ignored.warning);
    }
    for denial in &list.denials {
        let _ = writeln!(
            out,
            "denied: {denial} (closes what labels and the default policy open; `portgate allow {denial}` lifts it)"
        );
    }
    for c in &list.rootless {
        let _ = writeln!(
            out,
            "rootless {} (user {}): {} {} (its rules' address {} is a stand-in, only the allow map's key)",
            c.container,
            c.user,
            if c.published.is_empty() {
                "publishes nothing".to_owned()
            } else {
                c.published.join(", ")
            },
            if c.gated { "gated" } else { "NOT GATED" },
            c.stand_in_address
        );
    }
    out
}

/// The verdict, then each step that led to it.
pub fn format_explanation(explained: &Explanation) -> String {
    let mut out = format!(
        "{}: {} ({}) to {} {}/{}\n",
        explained.verdict,
        match explained.rule {
            Some(id) => format!("rule {id}"),
            None => "no rule".to_owned(),
        },
        explained.reason,
        explained.destination,
        explained.destination_port,
        explained.protocol
    );
    for step in &explained.steps {
        let _ = writeln!(out, "  {step}");
    }
    out
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
            (true, Origin::Cli) => "active".to_owned(),
            (true, Origin::Label) if rule.label_origin == Some(LabelOrigin::Image) => {
                "active (image label)".to_owned()
            }
            (true, Origin::Label) => "active (label)".to_owned(),
            (true, Origin::DefaultPolicy) => "active (policy)".to_owned(),
            (true, Origin::File) => "active (file)".to_owned(),
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
        let mut reach = Vec::new();
        if !rule.from.is_empty() {
            reach.push(format!("from {}", rule.from.join(" ")));
        }
        if let Some(via) = &rule.via {
            reach.push(format!("via {via}"));
        }
        if let (Some(at), Some(left)) = (&rule.expires, rule.expires_in_seconds) {
            let left = humantime::format_duration(std::time::Duration::from_secs(left));
            reach.push(format!("expires in {left} ({at})"));
        }
        if let Some(problem) = &rule.problem {
            reach.push(format!("NOTE: {problem}"));
        }
        if !reach.is_empty() {
            let _ = writeln!(out, "{:<5} {}", "", reach.join("; "));
        }
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
    status_gate(&mut out, status);
    status_engines(&mut out, status);
    status_labels(&mut out, status);
    status_exposure(&mut out, status);
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

/// The mode, bridges, rules, tracked flows and drops.
fn status_gate(out: &mut String, status: &Status) {
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
        "flows:    {} tracked of {}, {} ended by blocks and cuts",
        status.flows.tracked, status.flows.capacity, status.flows.cut
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
}

/// The engines followed and the netfilter delegation.
fn status_engines(out: &mut String, status: &Status) {
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
        let version = engine.version.as_deref().unwrap_or("version unknown");
        let backend = engine
            .network_backend
            .as_deref()
            .map(|b| format!(" on {b}"))
            .unwrap_or_default();
        let firewall = engine.firewall.as_deref().unwrap_or("unknown");
        if engine.engine == "podman-rootless" {
            // Each user's own Podman, read with `podman ps` as that user.
            let _ = writeln!(
                out,
                "engine:   {} ({} as each user, {} users) {state}{error}, {} containers, {} syncs, {} events",
                engine.engine,
                engine.socket,
                status.rootless_users.len(),
                engine.containers,
                engine.syncs,
                engine.events
            );
            continue;
        }
        let _ = writeln!(
            out,
            "engine:   {} {version}{backend} (firewall {firewall}) {state}{error}, {} containers, {} syncs, {} events, {}",
            engine.engine, engine.containers, engine.syncs, engine.events, engine.socket
        );
    }
    for rule in &status.netfilter {
        let state = match (rule.installed, rule.backend.as_str()) {
            (true, _) => "installed",
            (false, netfilter::BACKEND_NONE) => "not needed",
            (false, _) => "MISSING (could not be installed; see the agent log)",
        };
        let replies = if rule.replies { " replies" } else { "" };
        let _ = writeln!(
            out,
            "netfilter: {}{replies} via {} {} {state}",
            rule.bridge, rule.backend, rule.chain
        );
    }
}

/// Which labels open ports, and labels that open nothing.
fn status_labels(out: &mut String, status: &Status) {
    let labels = match status.label_policy {
        _ if !status.labels => "off (portgate.allow labels are ignored)",
        LabelPolicy::Off => "off (portgate.allow labels are ignored)",
        LabelPolicy::Container => {
            "container (portgate.allow labels set on the container open ports; image labels do not)"
        }
        LabelPolicy::Image => {
            "image (portgate.allow labels open ports, also those the image carries)"
        }
    };
    let _ = writeln!(out, "labels:   {labels}");
    for ignored in &status.ignored_labels {
        let _ = writeln!(out, "WARNING:  {}", ignored.warning);
    }
    for error in &status.label_errors {
        let _ = writeln!(
            out,
            "LABEL:    {} opens nothing: {}",
            error.container, error.error
        );
    }
}

/// Uplinks, blocks, published ports gated or not, rootless containers.
fn status_exposure(out: &mut String, status: &Status) {
    if !status.uplinks.is_empty() {
        let names: Vec<&str> = status.uplinks.iter().map(|u| u.name.as_str()).collect();
        let _ = writeln!(
            out,
            "uplinks:  {} (new connections refused before conntrack)",
            names.join(", ")
        );
    }
    if status.blocks > 0 {
        let _ = writeln!(out, "blocked:  {} entries", status.blocks);
    }
    let ports = status.published_ports;
    let _ = writeln!(
        out,
        "published: {} port(s) gated, {} not",
        ports.gated, ports.ungated
    );
    for ungated in &status.ungated {
        let _ = writeln!(out, "UNGATED:  {}", format_ungated(ungated));
    }
    for c in &status.rootless {
        let gated = if c.gated { "gated" } else { "NOT GATED" };
        let _ = writeln!(
            out,
            "rootless: {} (user {}, {}) {} {gated} at the host's socket",
            c.container,
            c.user,
            c.engine,
            if c.published.is_empty() {
                "publishes nothing".to_owned()
            } else {
                c.published.join(", ")
            }
        );
    }
    for u in status.rootless_users.iter().filter(|u| u.error.is_some()) {
        let _ = writeln!(
            out,
            "ROOTLESS: user {} ({}): {}",
            u.user,
            u.helpers.join(", "),
            u.error.as_deref().unwrap_or_default()
        );
    }
}
