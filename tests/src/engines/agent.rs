//! The agent, in the root namespace.

use super::*;

/// `portgate agent --bridge auto --runtime auto` in the root namespace, with its own pin
/// directory (`/sys/fs/bpf/pge-<pid>-<n>`), state directory and control socket. Dropping it
/// kills the agent and runs `portgate uninstall` (programs, pins, delegation rules).
pub struct EngineAgent;

impl EngineAgent {
    /// Starts the agent on the sockets of the engine set `engines` runs, and waits until it
    /// answers `status`.
    pub fn start(engines: &Engines, extra_args: &[&str]) -> Agent<'static> {
        reap_stale();
        let docker = engines.docker_socket.to_string_lossy().into_owned();
        let podman = engines.podman_socket.to_string_lossy().into_owned();
        let mut agent = Agent::in_root_namespace(
            &[
                "--bridge",
                "auto",
                "--runtime",
                "auto",
                "--docker-socket",
                &docker,
                "--podman-socket",
                &podman,
            ],
            extra_args,
            &unique(""),
        );
        agent.spawn();
        agent.wait_ready();
        agent
    }
}

impl Agent<'_> {
    /// Waits until `status --json` lists every engine in `engines` as connected with at least
    /// one sync, and returns that status. Panics after [`FOLLOW_TIMEOUT`].
    pub fn wait_engines_connected(&self, engines: &[&str]) -> Value {
        let deadline = Instant::now() + FOLLOW_TIMEOUT;
        loop {
            let status = self.status_json();
            let ok = engines.iter().all(|name| {
                engine_status(&status, name).is_some_and(|e| {
                    e["connected"] == true && e["syncs"].as_u64().unwrap_or(0) >= 1
                })
            });
            if ok {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "engines {engines:?} not connected and synced after {FOLLOW_TIMEOUT:?}: {}\nlog:\n{}",
                    status["engines"],
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The entry of `status --json` `engines[]` for `engine` ("docker" or "podman").
pub fn engine_status<'v>(status: &'v Value, engine: &str) -> Option<&'v Value> {
    status["engines"]
        .as_array()?
        .iter()
        .find(|e| e["engine"] == engine)
}

/// The rules of `list --json` whose container is `name`.
pub fn container_rules<'v>(list: &'v Value, name: &str) -> Vec<&'v Value> {
    list["rules"]
        .as_array()
        .map(|rules| rules.iter().filter(|r| r["container"] == name).collect())
        .unwrap_or_default()
}

/// Every host port listed in `host_ports` of `rules`.
pub fn host_ports(rules: &[&Value]) -> BTreeSet<u64> {
    rules
        .iter()
        .flat_map(|r| r["host_ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_u64())
        .collect()
}
