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

/// Which `portgate.allow` labels open ports (`agent --labels`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelPolicy {
    /// None: only saved rules, the policy file and the default policy open ports.
    Off,
    /// Labels given to the container itself (`docker run --label`, compose `labels:`).
    #[default]
    Container,
    /// Also labels the image carries: whoever built the image decides what it opens.
    Image,
}

impl LabelPolicy {
    /// Whether a label from `origin` opens ports. A label whose origin is unknown (the image
    /// could not be inspected) may be the image's: under `container` it opens nothing.
    pub fn honours(self, origin: Option<LabelOrigin>) -> bool {
        match self {
            Self::Off => false,
            Self::Container => origin == Some(LabelOrigin::Container),
            Self::Image => true,
        }
    }
}

impl std::fmt::Display for LabelPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Container => "container",
            Self::Image => "image",
        })
    }
}

/// A running container whose `portgate.allow` label opens nothing under `--labels container`
/// because it is (or may be) its image's. Before `container` became the default, such a label
/// opened ports: the agent says so rather than close them without a word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoredLabel {
    pub container_id: String,
    pub container: String,
    /// The label's value, e.g. `80/tcp`.
    pub label: String,
    /// `Image`, or none when the image could not be inspected.
    pub origin: Option<LabelOrigin>,
}

impl IgnoredLabel {
    /// One line for the log, `status` and `doctor`: the container, the label, the flag.
    pub fn warning(&self) -> String {
        let whose = match self.origin {
            Some(_) => "its image's label",
            None => "its label (its image could not be inspected, so it may be the image's)",
        };
        format!(
            "container {}: {whose} {ALLOW_LABEL}={} opens nothing: only labels set on the container open ports (agent --labels container, the default since image labels stopped counting as the operator's word); to honour image labels run the agent with --labels image, or open the ports yourself: portgate allow {} PORTS",
            self.container, self.label, self.container
        )
    }
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
