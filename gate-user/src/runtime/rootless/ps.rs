//! What `podman ps --format json` and `podman image inspect` print, and the containers the
//! gate makes of it, each with its stand-in address.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
};

use serde::Deserialize;

use super::STAND_IN_PREFIX;
use crate::{
    policy::{Protocol, Published},
    runtime::{Container, Engine},
};

/// One container of `podman ps --format json` (Podman 4 and 5 print the same fields).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PsEntry {
    id: String,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default, rename = "ImageID")]
    image_id: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    ports: Option<Vec<PsPort>>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    networks: Option<Vec<String>>,
}

/// A port mapping as `podman ps` prints it: `range` consecutive ports from each start.
#[derive(Debug, Deserialize)]
struct PsPort {
    #[serde(default)]
    host_ip: String,
    container_port: u16,
    host_port: u16,
    #[serde(default = "one")]
    range: u16,
    protocol: String,
}

fn one() -> u16 {
    1
}

/// `podman ps --format json`'s output (an empty output is no container).
pub fn parse_ps(text: &str) -> Result<Vec<PsEntry>, serde_json::Error> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(text)
}

/// The `Labels` of `podman image inspect`'s first image.
pub(super) fn parse_image_labels(text: &str) -> Option<BTreeMap<String, String>> {
    #[derive(Deserialize)]
    struct Image {
        #[serde(rename = "Labels", default)]
        labels: Option<BTreeMap<String, String>>,
    }
    let images: Vec<Image> = serde_json::from_str(text).ok()?;
    Some(images.into_iter().next()?.labels.unwrap_or_default())
}

/// The stand-in address of a container: the prefix, then the first 64 bits of its ID.
pub fn stand_in(id: &str) -> IpAddr {
    let low = u64::from_str_radix(id.get(..16).unwrap_or(id), 16).unwrap_or_else(|_| {
        id.bytes().fold(0xcbf2_9ce4_8422_2325, |h: u64, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    });
    let [a, b, c, d] = STAND_IN_PREFIX;
    let words = [
        (low >> 48) as u16,
        (low >> 32) as u16,
        (low >> 16) as u16,
        low as u16,
    ];
    IpAddr::V6(Ipv6Addr::new(
        a, b, c, d, words[0], words[1], words[2], words[3],
    ))
}

/// Whether `address` is a rootless container's stand-in (no traffic goes there).
pub fn is_stand_in(address: &IpAddr) -> bool {
    match address {
        IpAddr::V6(v6) => v6.segments()[..4] == STAND_IN_PREFIX,
        IpAddr::V4(_) => false,
    }
}

impl PsEntry {
    /// The container as the gate sees it, named `USER/NAME`; none when it is not running.
    pub(super) fn into_container(self, user: &str) -> Option<Container> {
        if self.state.as_deref().is_some_and(|s| s != "running") {
            return None;
        }
        let name = self.names.first()?;
        let mut published = Vec::new();
        for port in self.ports.unwrap_or_default() {
            let protocol = match port.protocol.as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => continue, // sctp: the gate does not judge it
            };
            let host_ip = port
                .host_ip
                .parse()
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            for i in 0..port.range.max(1) {
                let (Some(host_port), Some(container_port)) = (
                    port.host_port.checked_add(i),
                    port.container_port.checked_add(i),
                ) else {
                    break;
                };
                published.push(Published {
                    host_ip,
                    host_port,
                    container_port,
                    protocol,
                });
            }
        }
        published.sort();
        published.dedup();
        let network_mode = self
            .networks
            .as_ref()
            .and_then(|n| n.first().cloned())
            .unwrap_or_default();
        Some(Container {
            engine: Engine::RootlessPodman,
            addresses: vec![stand_in(&self.id)],
            name: format!("{user}/{name}"),
            id: self.id,
            published,
            labels: self.labels.unwrap_or_default(),
            image: self.image_id.filter(|i| !i.is_empty()),
            allow_label_origin: None,
            network_mode,
            networks: Vec::new(),
            exposed: Vec::new(),
            user: Some(user.to_owned()),
        })
    }
}
