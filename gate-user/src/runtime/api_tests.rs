use super::*;

/// Trimmed from `docker inspect` of `docker run -p 8080:80 -p 5353:53/udp --label ...`.
const INSPECT: &str = r#"{
    "Id": "4013436478f9e4c7ad8aa8d1d3d6482fca666fda1187e799cc8bfa0a33264a8a",
    "Name": "/web",
    "Config": {"Labels": {"portgate.allow": "443/tcp"}},
    "NetworkSettings": {
        "Ports": {
            "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}, {"HostIp": "::", "HostPort": "8080"}],
            "53/udp": [{"HostIp": "0.0.0.0", "HostPort": "5353"}],
            "9000/tcp": null
        },
        "Networks": {
            "bridge": {"IPAddress": "172.17.0.2", "GlobalIPv6Address": ""},
            "backend": {"IPAddress": "172.18.0.5", "GlobalIPv6Address": "fd00:18::5"}
        }
    }
}"#;

#[test]
fn inspect_output_becomes_container_facts() {
    let inspect: ContainerInspectResponse = serde_json::from_str(INSPECT).expect("inspect JSON");
    let c = container_facts(Engine::Docker, inspect).expect("facts");
    assert_eq!(c.name, "web");
    assert!(c.is_named("web") && c.is_named("4013436478f9") && !c.is_named("4013"));
    let addresses: Vec<String> = c.addresses.iter().map(ToString::to_string).collect();
    assert_eq!(addresses, ["172.17.0.2", "172.18.0.5", "fd00:18::5"]);
    assert_eq!(
        c.published,
        [
            Published {
                host_ip: "0.0.0.0".parse().unwrap(),
                host_port: 5353,
                container_port: 53,
                protocol: Protocol::Udp
            },
            Published {
                host_ip: "0.0.0.0".parse().unwrap(),
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp
            },
            Published {
                host_ip: "::".parse().unwrap(),
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp
            },
        ]
    );
    assert_eq!(
        c.labels.get(ALLOW_LABEL).map(String::as_str),
        Some("443/tcp")
    );
}

/// Trimmed from `docker inspect` of `docker run --network host` of an image that
/// exposes 53/udp and 8053/tcp (`-p` is ignored on the host network).
const HOST_NETWORK: &str = r#"{
    "Id": "6f1a0c0e4b8d2a9e2f3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091",
    "Name": "/dns",
    "Image": "sha256:9f0c0d6e1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5",
    "Config": {"ExposedPorts": {"53/udp": {}, "8053/tcp": {}}, "Labels": {}},
    "HostConfig": {"NetworkMode": "host"},
    "NetworkSettings": {
        "Ports": {},
        "Networks": {
            "host": {"NetworkID": "3c6a3d3f6e0b", "IPAddress": "", "GlobalIPv6Address": ""}
        }
    }
}"#;

/// Trimmed from `docker inspect` of a container on a macvlan network `lan`.
const MACVLAN: &str = r#"{
    "Id": "0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c",
    "Name": "/nas",
    "Image": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
    "Config": {"ExposedPorts": {"445/tcp": {}}},
    "HostConfig": {"NetworkMode": "lan"},
    "NetworkSettings": {
        "Ports": {"445/tcp": null},
        "Networks": {
            "lan": {"NetworkID": "aa11bb22cc33dd44", "IPAddress": "192.168.1.50", "GlobalIPv6Address": ""}
        }
    }
}"#;

fn index(networks: &[(&str, &str, &str)]) -> NetworkIndex {
    let networks: Vec<Network> = networks
        .iter()
        .map(|(name, id, driver)| Network {
            name: Some((*name).to_owned()),
            id: Some((*id).to_owned()),
            driver: Some((*driver).to_owned()),
            ..Default::default()
        })
        .collect();
    NetworkIndex::new(Engine::Docker, &PodmanBridges::default(), &networks)
}

#[test]
fn host_network_containers_are_recognised_with_their_exposed_ports() {
    let inspect: ContainerInspectResponse =
        serde_json::from_str(HOST_NETWORK).expect("inspect JSON");
    let mut c = container_facts(Engine::Docker, inspect).expect("facts");
    index(&[("host", "3c6a3d3f6e0b", "host"), ("bridge", "b1", "bridge")])
        .describe(&mut c.networks);
    assert_eq!(c.network_mode, "host");
    assert!(c.is_host_network());
    assert!(c.addresses.is_empty() && c.published.is_empty());
    assert_eq!(c.networks.len(), 1);
    assert_eq!(c.networks[0].driver.as_deref(), Some("host"));
    assert_eq!(c.networks[0].bridge, None);
    let exposed: Vec<String> = c.exposed.iter().map(ToString::to_string).collect();
    assert_eq!(exposed, ["53/udp", "8053/tcp"]);
    assert_eq!(
        c.image.as_deref(),
        Some("sha256:9f0c0d6e1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5")
    );
}

#[test]
fn macvlan_containers_have_their_network_driver_and_no_bridge() {
    let inspect: ContainerInspectResponse = serde_json::from_str(MACVLAN).expect("inspect JSON");
    let mut c = container_facts(Engine::Docker, inspect).expect("facts");
    index(&[("lan", "aa11bb22cc33dd44", "macvlan")]).describe(&mut c.networks);
    assert!(!c.is_host_network());
    assert_eq!(
        c.networks,
        [Attachment {
            network: "lan".to_owned(),
            network_id: Some("aa11bb22cc33dd44".to_owned()),
            driver: Some("macvlan".to_owned()),
            bridge: None,
            parent: None,
            addresses: vec!["192.168.1.50".parse().unwrap()],
        }]
    );
    assert!(
        c.published.is_empty(),
        "a port without bindings is not published"
    );
    assert_eq!(c.exposed.len(), 1);

    // A bridge network's attachment gets its Linux bridge, found by network ID.
    let inspect: ContainerInspectResponse = serde_json::from_str(INSPECT).expect("inspect");
    let mut web = container_facts(Engine::Docker, inspect).expect("facts");
    assert_eq!(web.network_mode, "");
    let networks = vec![
        Network {
            name: Some("bridge".to_owned()),
            id: Some("b1".to_owned()),
            driver: Some("bridge".to_owned()),
            ..Default::default()
        },
        Network {
            name: Some("backend".to_owned()),
            id: Some("0123456789abcdef".to_owned()),
            driver: Some("bridge".to_owned()),
            ..Default::default()
        },
    ];
    let index = NetworkIndex::new(Engine::Docker, &PodmanBridges::default(), &networks);
    index.describe(&mut web.networks);
    let bridges: Vec<Option<&str>> = web.networks.iter().map(|n| n.bridge.as_deref()).collect();
    assert_eq!(bridges, [Some("br-0123456789ab"), Some("docker0")]);
    assert_eq!(index.bridges(), ["br-0123456789ab", "docker0"]);
}

#[test]
fn an_allow_label_comes_from_the_image_only_with_the_images_value() {
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let image: HashMap<String, String> = labels(&[(ALLOW_LABEL, "80/tcp")]).into_iter().collect();
    let none = HashMap::new();
    let origin = |container: &[(&str, &str)], image: &HashMap<String, String>| {
        label_origin(&labels(container), image, ALLOW_LABEL)
    };
    assert_eq!(
        origin(&[(ALLOW_LABEL, "80/tcp")], &image),
        Some(LabelOrigin::Image)
    );
    assert_eq!(
        origin(&[(ALLOW_LABEL, "80/tcp,22/tcp")], &image),
        Some(LabelOrigin::Container),
        "docker run --label overrides the image's value"
    );
    assert_eq!(
        origin(&[(ALLOW_LABEL, "80/tcp")], &none),
        Some(LabelOrigin::Container)
    );
    assert_eq!(origin(&[("other", "x")], &image), None);
}

#[test]
fn bridge_names_follow_each_engine() {
    let network = |name: &str, id: &str, bridge_option: Option<&str>| Network {
        name: Some(name.to_owned()),
        id: Some(id.to_owned()),
        driver: Some("bridge".to_owned()),
        options: bridge_option
            .map(|b| HashMap::from([("com.docker.network.bridge.name".to_owned(), b.to_owned())])),
        ..Default::default()
    };
    assert_eq!(
        bridge_of(
            Engine::Docker,
            &PodmanBridges::default(),
            &network("bridge", "abc", Some("docker0"))
        )
        .as_deref(),
        Some("docker0")
    );
    assert_eq!(
        bridge_of(
            Engine::Docker,
            &PodmanBridges::default(),
            &network("backend", "0123456789abcdef", None)
        )
        .as_deref(),
        Some("br-0123456789ab")
    );
    assert_eq!(
        bridge_of(
            Engine::Podman,
            &PodmanBridges::default(),
            &network("bridge", "x", None)
        )
        .as_deref(),
        Some("podman0")
    );
    let host = Network {
        driver: Some("host".to_owned()),
        ..network("host", "h", None)
    };
    assert_eq!(
        bridge_of(Engine::Docker, &PodmanBridges::default(), &host),
        None
    );
    // Podman's own API names the bridges; CNI's default network without it is
    // cni-podman0.
    let podman = PodmanBridges {
        cni: false,
        by_network: HashMap::from([
            ("podman".to_owned(), "podman0".to_owned()),
            ("backend".to_owned(), "podman3".to_owned()),
        ]),
    };
    assert_eq!(
        bridge_of(Engine::Podman, &podman, &network("backend", "y", None)).as_deref(),
        Some("podman3")
    );
    assert_eq!(
        bridge_of(Engine::Podman, &podman, &network("bridge", "x", None)).as_deref(),
        Some("podman0")
    );
    let cni = PodmanBridges {
        cni: true,
        by_network: HashMap::new(),
    };
    assert_eq!(
        bridge_of(Engine::Podman, &cni, &network("podman", "x", None)).as_deref(),
        Some("cni-podman0")
    );
}
