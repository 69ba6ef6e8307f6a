//! `podman ps --format json` as Podman 4.3 (Debian 12) and Podman 5.8 (Debian sid) print it,
//! captured from `podman run -d --name web -p PORT:80 -p PORT+1-PORT+2:81-82
//! -p 127.0.0.1:PORT+3:83/udp --label portgate.allow=80/tcp local/busybox:latest httpd ...`
//! as an ordinary user.

use super::ps::*;
use super::*;
use crate::policy::{Protocol, Published};

const PS_PODMAN_4_3: &str = r#"[
  {
    "AutoRemove": false,
    "Command": [
      "httpd",
      "-f",
      "-p",
      "80",
      "-h",
      "/bin"
    ],
    "CreatedAt": "1 second ago",
    "Exited": false,
    "ExitedAt": -62135596800,
    "ExitCode": 0,
    "Id": "77e5b7dfff342d86dc0ccfbb5870775afd04d790d7de4d74d95d57b3167c393e",
    "Image": "localhost/local/busybox:latest",
    "ImageID": "4a154a89f51455a806a300cd4faa6d24ac5796b7f896de5327b377a566bcb1ed",
    "IsInfra": false,
    "Labels": {
      "portgate.allow": "80/tcp"
    },
    "Mounts": [],
    "Names": [
      "web"
    ],
    "Namespaces": {},
    "Networks": [],
    "Pid": 19650,
    "Pod": "",
    "PodName": "",
    "Ports": [
      {
        "host_ip": "",
        "container_port": 80,
        "host_port": 18080,
        "range": 3,
        "protocol": "tcp"
      },
      {
        "host_ip": "127.0.0.1",
        "container_port": 83,
        "host_port": 18083,
        "range": 1,
        "protocol": "udp"
      }
    ],
    "Size": null,
    "StartedAt": 1796690864,
    "State": "running",
    "Status": "Up 1 second ago",
    "Created": 1796690864
  }
]"#;

const PS_PODMAN_5_8: &str = r#"[
  {
    "AutoRemove": false,
    "Command": [
      "httpd",
      "-f",
      "-p",
      "80",
      "-h",
      "/bin"
    ],
    "CreatedAt": "Less than a second ago",
    "CIDFile": "",
    "Exited": false,
    "ExitedAt": -62135596800,
    "ExitCode": 0,
    "ExposedPorts": null,
    "Id": "19b86e470c8dd7294a18214cafa6ddbe55fbd704534f2f76992cec9f695af37d",
    "Image": "localhost/local/busybox:latest",
    "ImageID": "185530ce32c210bc8f062b07af57b897fef9624a28efec347499e60ef6733814",
    "IsInfra": false,
    "Labels": {
      "portgate.allow": "80/tcp"
    },
    "Mounts": [],
    "Names": [
      "web"
    ],
    "Namespaces": {},
    "Networks": [],
    "Pid": 23001,
    "Pod": "",
    "PodName": "",
    "Ports": [
      {
        "host_ip": "",
        "container_port": 80,
        "host_port": 18090,
        "range": 3,
        "protocol": "tcp"
      },
      {
        "host_ip": "127.0.0.1",
        "container_port": 83,
        "host_port": 18093,
        "range": 1,
        "protocol": "udp"
      }
    ],
    "Restarts": 0,
    "Size": null,
    "StartedAt": 1796690933,
    "State": "running",
    "Status": "Up Less than a second",
    "Created": 1796690932
  }
]"#;

fn published(host_ip: &str, host_port: u16, container_port: u16, protocol: Protocol) -> Published {
    Published {
        host_ip: host_ip.parse().expect("address"),
        host_port,
        container_port,
        protocol,
    }
}

fn container_of(text: &str) -> Container {
    let entries = parse_ps(text).expect("podman ps JSON");
    assert_eq!(entries.len(), 1);
    entries
        .into_iter()
        .next()
        .and_then(|e| e.into_container("alice"))
        .expect("a running container")
}

#[test]
fn podman_ps_of_podman_4_and_5_becomes_user_containers() {
    for (text, base) in [(PS_PODMAN_4_3, 18080), (PS_PODMAN_5_8, 18090)] {
        let c = container_of(text);
        assert_eq!(c.name, "alice/web");
        assert_eq!(c.user.as_deref(), Some("alice"));
        assert_eq!(c.engine, Engine::RootlessPodman);
        assert!(c.is_rootless() && !c.is_host_network());
        assert!(c.is_named("alice/web") && c.is_named(&c.id[..12]));
        assert_eq!(
            c.labels.get(ALLOW_LABEL).map(String::as_str),
            Some("80/tcp")
        );
        // A range of three is three ports; an address binds only that address.
        assert_eq!(
            c.published,
            [
                published("0.0.0.0", base, 80, Protocol::Tcp),
                published("0.0.0.0", base + 1, 81, Protocol::Tcp),
                published("0.0.0.0", base + 2, 82, Protocol::Tcp),
                published("127.0.0.1", base + 3, 83, Protocol::Udp),
            ]
        );
        assert_eq!(c.addresses, [stand_in(&c.id)]);
        assert!(is_stand_in(&c.addresses[0]));
        assert!(c.image.is_some());
    }
}

#[test]
fn stand_ins_are_stable_distinct_and_in_their_prefix() {
    let a = stand_in("77e5b7dfff342d86dc0ccfbb5870775afd04d790d7de4d74d95d57b3167c393e");
    assert_eq!(a.to_string(), "fd70:6f72:7467:6174:77e5:b7df:ff34:2d86");
    assert_eq!(
        a,
        stand_in("77e5b7dfff342d86dc0ccfbb5870775afd04d790d7de4d74d95d57b3167c393e")
    );
    assert_ne!(
        a,
        stand_in("19b86e470c8dd7294a18214cafa6ddbe55fbd704534f2f76992cec9f695af37d")
    );
    assert!(is_stand_in(&stand_in("not-hex")));
    assert!(!is_stand_in(&"172.17.0.2".parse().expect("address")));
    assert!(!is_stand_in(&"fd00::1".parse().expect("address")));
}

#[test]
fn no_container_and_stopped_ones_are_nothing() {
    assert!(parse_ps("").expect("empty").is_empty());
    assert!(parse_ps("[]").expect("none").is_empty());
    let stopped = PS_PODMAN_4_3.replace(r#""State": "running""#, r#""State": "exited""#);
    let entries = parse_ps(&stopped).expect("JSON");
    assert!(
        entries
            .into_iter()
            .all(|e| e.into_container("alice").is_none())
    );
    // Podman prints null where a container has no ports or labels.
    let bare =
        r#"[{"Id": "abc", "Names": ["x"], "Ports": null, "Labels": null, "State": "running"}]"#;
    let c = parse_ps(bare)
        .expect("JSON")
        .into_iter()
        .next()
        .and_then(|e| e.into_container("bob"))
        .expect("container");
    assert!(c.published.is_empty() && c.labels.is_empty());
    assert_eq!(c.name, "bob/x");
}

#[test]
fn image_labels_come_from_image_inspect() {
    let text = r#"[{"Id": "4a15", "Labels": {"portgate.allow": "80/tcp"}, "Config": {}}]"#;
    let labels = parse_image_labels(text).expect("labels");
    assert_eq!(labels.get(ALLOW_LABEL).map(String::as_str), Some("80/tcp"));
    assert_eq!(
        parse_image_labels(r#"[{"Id": "x", "Labels": null}]"#),
        Some(BTreeMap::new())
    );
    assert_eq!(parse_image_labels("not json"), None);
}

#[test]
fn a_relay_port_no_container_publishes_is_unaccounted() {
    let followed = Followed {
        seen: Seen::default(),
        read_at: None,
        containers: vec![container_of(PS_PODMAN_4_3)],
        error: None,
        unaccounted_reads: 0,
    };
    let seen = |ports: &[(&str, u16)]| Seen {
        helpers: BTreeSet::new(),
        listening: ports.iter().map(|(p, n)| ((*p).to_owned(), *n)).collect(),
    };
    assert!(!followed.unaccounted(&seen(&[])));
    assert!(!followed.unaccounted(&seen(&[("tcp", 18080), ("udp", 18083)])));
    // A container still starting (pasta already listens), or another Podman's.
    assert!(followed.unaccounted(&seen(&[("tcp", 18080), ("tcp", 18099)])));
    assert!(followed.unaccounted(&seen(&[("udp", 18080)])));
}
