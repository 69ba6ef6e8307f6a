//! What the policy knows about a running container: the facts rules resolve against. The
//! engine adapters (`runtime`) produce them; the policy depends on no engine.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::Protocol;

/// Label that allows ports for as long as the container runs: `80/tcp,53/udp`.
pub const ALLOW_LABEL: &str = "portgate.allow";

/// A host port that maps to a container port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Published {
    /// The host address the port is published on; unspecified (`0.0.0.0`, `::`) for all.
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

impl Published {
    /// Published on a loopback address only: reachable from the host itself, not from outside.
    pub fn is_loopback_only(&self) -> bool {
        self.host_ip.is_loopback()
    }
}

/// Where a container's label comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelOrigin {
    /// The image has it, with the same value (a `LABEL` its author wrote).
    Image,
    /// Set when the container was created (`docker run --label`), or changed from the image's.
    Container,
}

/// A running container, as rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub id: String,
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub published: Vec<Published>,
    /// The value of its [`ALLOW_LABEL`], if it has one.
    pub allow_label: Option<String>,
    /// Where that label comes from, when known.
    pub allow_label_origin: Option<LabelOrigin>,
}

impl Workload {
    /// Whether `target` names this container: its name, its ID, or an ID prefix of at least
    /// 12 characters (the short form engines print).
    pub fn is_named(&self, target: &str) -> bool {
        self.name == target || (target.len() >= 12 && self.id.starts_with(target))
    }
}
