//! The engines: each one the agent follows (reachable or not), and engine sockets on this
//! host that it does not follow.

use std::path::Path;

use gate_user::runtime::{DEFAULT_DOCKER_SOCKET, DEFAULT_PODMAN_SOCKET};

use super::{Facts, Finding, Level};

pub(super) fn check(facts: &Facts<'_>) -> Vec<Finding> {
    let Ok(status) = &facts.status else {
        return Vec::new();
    };
    let mut findings: Vec<Finding> = status
        .engines
        .iter()
        .map(|engine| {
            if engine.connected {
                return Finding::new(
                    "engine",
                    &engine.engine,
                    Level::Ok,
                    format!(
                        "followed on {}: {} container(s), {} sync(s)",
                        engine.socket, engine.containers, engine.syncs
                    ),
                    None,
                );
            }
            let error = engine
                .last_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            Finding::new(
                "engine",
                &engine.engine,
                Level::Warning,
                format!(
                    "not reachable on {}{error}: the gate enforces what it knew; new containers' rules and labels wait",
                    engine.socket,
                ),
                Some("start the engine or its API socket (for Podman: `systemctl start podman.socket`); the agent reconnects by itself".to_owned()),
            )
        })
        .collect();
    for (engine, socket) in [
        ("docker", DEFAULT_DOCKER_SOCKET),
        ("podman", DEFAULT_PODMAN_SOCKET),
    ] {
        let followed = status.engines.iter().any(|e| e.engine == engine);
        if Path::new(socket).exists() && !followed {
            findings.push(Finding::new(
                "engine",
                engine,
                Level::Warning,
                format!(
                    "its socket {socket} exists but the agent does not follow it: rules by container name, labels and --published do not apply to its containers"
                ),
                Some("run the agent with `--runtime auto` (the default)".to_owned()),
            ));
        }
    }
    findings
}
