//! Rootless engines in `doctor`: rootless Podman publishes through a listening socket of the
//! host owned by the user's `rootlessport` (or `pasta`, `slirp4netns`; rootless Docker's
//! `rootlesskit`), which relays to the container. The agent follows each user's rootless
//! Podman and its socket lookup judges those ports; `doctor` checks, port by port, that the
//! agent knows the container behind each relayed port, and names what nothing gates.

use gate_user::{
    api::Status,
    procfs,
    runtime::rootless::{RELAYS, ROOTLESS_DOCKER},
};

use super::{Finding, Level};

/// What it takes to gate rootless Docker's ports.
const ROOTLESS_DOCKER_ADVICE: &str = "run the container with rootless Podman, rootful Podman or Docker, which the agent follows, or filter the port in the host's input firewall";

/// A listening socket of a rootless relay.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct RelayedPort {
    pub user: String,
    pub uid: u32,
    pub relay: String,
    pub proto: &'static str,
    pub port: u16,
}

/// Every port a rootless relay listens on, from /proc.
pub(super) fn relayed_ports() -> Vec<RelayedPort> {
    let listening = procfs::listening_sockets();
    let mut ports = Vec::new();
    for dir in procfs::process_dirs() {
        let Some(comm) = procfs::comm(&dir) else {
            continue;
        };
        if !RELAYS.contains(&comm.as_str()) && comm != ROOTLESS_DOCKER {
            continue;
        }
        let Some(uid) = procfs::process_uid(&dir) else {
            continue;
        };
        if uid == 0 {
            continue; // rootful Podman's own helpers are the agent's to follow
        }
        for inode in procfs::socket_inodes(&dir) {
            if let Some((proto, port)) = listening.get(&inode) {
                ports.push(RelayedPort {
                    user: procfs::user_name(uid),
                    uid,
                    relay: comm.clone(),
                    proto,
                    port: *port,
                });
            }
        }
    }
    ports.sort();
    ports.dedup();
    ports
}

/// The host port and protocol of a published port as `status` prints it
/// ("[ADDR:]HOST->CONTAINER/PROTO").
fn host_port_of(published: &str) -> Option<(u16, &str)> {
    let (host, container) = published.split_once("->")?;
    let port = host.rsplit(':').next()?.parse().ok()?;
    let proto = container.split_once('/')?.1;
    Some((port, proto))
}

/// The doctor's findings: one per relayed port, and one per user whose rootless engine the
/// agent cannot read. `status`: the agent's, when one answers.
pub(super) fn findings(ports: &[RelayedPort], status: Option<&Status>) -> Vec<Finding> {
    let mut findings: Vec<Finding> = ports
        .iter()
        .map(|p| {
            // The agent names the user as the passwd of the root its Podman runs in does
            // (--rootless-podman-root): go by uid.
            let user = status
                .and_then(|s| s.rootless_users.iter().find(|u| u.uid == p.uid))
                .map_or_else(|| p.user.clone(), |u| u.user.clone());
            port_finding(&RelayedPort { user, ..p.clone() }, status)
        })
        .collect();
    for user in status
        .map(|s| s.rootless_users.as_slice())
        .unwrap_or_default()
    {
        let Some(error) = &user.error else { continue };
        findings.push(Finding {
            check: "rootless",
            subject: format!("user {}", user.user),
            level: Level::Warning,
            detail: if user.followed {
                format!(
                    "the agent cannot read the rootless Podman of user {} ({error}); it enforces the containers it last read",
                    user.user
                )
            } else {
                error.clone()
            },
            advice: Some(if user.followed {
                format!(
                    "check that `podman ps` works as user {} with XDG_RUNTIME_DIR=/run/user/{} (agent --rootless-podman names the program)",
                    user.user, user.uid
                )
            } else {
                ROOTLESS_DOCKER_ADVICE.to_owned()
            }),
        });
    }
    findings
}

fn port_finding(p: &RelayedPort, status: Option<&Status>) -> Finding {
    let subject = format!("{}:{}/{}", p.user, p.port, p.proto);
    let unprotected = |detail: String, advice: String| Finding {
        check: "container",
        subject: subject.clone(),
        level: Level::Unprotected,
        detail,
        advice: Some(advice),
    };
    if p.relay == ROOTLESS_DOCKER {
        return unprotected(
            format!(
                "rootless Docker of user {} publishes {}/{} through rootlesskit, a listening socket of the host: the agent does not follow rootless Docker, so nothing gates it",
                p.user, p.port, p.proto
            ),
            ROOTLESS_DOCKER_ADVICE.to_owned(),
        );
    }
    let Some(status) = status else {
        return unprotected(
            format!(
                "a rootless Podman of user {} publishes {}/{} through {}, a listening socket of the host, and no agent answers to follow it",
                p.user, p.port, p.proto, p.relay
            ),
            "start the agent (`--runtime auto` follows rootless Podman), or filter the port in the host's input firewall".to_owned(),
        );
    };
    if !status.engines.iter().any(|e| e.engine == "podman-rootless") {
        return unprotected(
            format!(
                "a rootless Podman of user {} publishes {}/{} through {}, a listening socket of the host, and the agent does not follow rootless Podman",
                p.user, p.port, p.proto, p.relay
            ),
            "run the agent with `--runtime auto` or `--runtime podman`, without `--rootless-podman off`".to_owned(),
        );
    }
    let container = status.rootless.iter().find(|c| {
        c.user == p.user
            && c.published
                .iter()
                .filter_map(|text| host_port_of(text))
                .any(|(port, proto)| port == p.port && proto == p.proto)
    });
    match container {
        Some(c) if c.gated => Finding {
            check: "container",
            subject,
            level: Level::Ok,
            detail: format!(
                "rootless Podman container {} publishes {}/{} through {}; the gate judges each new connection at the host's socket (rules name it {})",
                c.container, p.port, p.proto, p.relay, c.container
            ),
            advice: None,
        },
        _ => {
            let why = status
                .rootless_users
                .iter()
                .find(|u| u.user == p.user)
                .and_then(|u| u.error.clone())
                .unwrap_or_else(|| {
                    "no running container of the user's Podman publishes it, as the agent last read it".to_owned()
                });
            unprotected(
                format!(
                    "user {}'s {} listens on {}/{}, a socket of the host the agent does not know as a container's port: {why}",
                    p.user, p.relay, p.port, p.proto
                ),
                format!(
                    "check `podman ps` as user {}; meanwhile filter the port in the host's input firewall",
                    p.user
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_texts_give_their_host_port() {
        assert_eq!(host_port_of("8080->80/tcp"), Some((8080, "tcp")));
        assert_eq!(host_port_of("127.0.0.1:5353->53/udp"), Some((5353, "udp")));
        assert_eq!(host_port_of("[::1]:8443->443/tcp"), Some((8443, "tcp")));
        assert_eq!(host_port_of("nonsense"), None);
    }
}
