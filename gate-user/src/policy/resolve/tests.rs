use super::*;

fn context(default_published: bool) -> Context {
    Context {
        default_published,
        ..Context::default()
    }
}
use crate::policy::{Protocol, Published, parse_address};
use gate_common::{PROTO_ICMP, PROTO_TCP, ipv4_mapped};

fn container(name: &str, address: &str, published: &[(u16, u16)], label: Option<&str>) -> Workload {
    Workload {
        id: format!("{name:0>64}"),
        name: name.to_owned(),
        addresses: vec![parse_address(address).expect("address")],
        published: published
            .iter()
            .map(|(host_port, container_port)| Published {
                host_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
                host_port: *host_port,
                container_port: *container_port,
                protocol: Protocol::Tcp,
            })
            .collect(),
        allow_label: label.map(str::to_owned),
        allow_label_origin: label.map(|_| LabelOrigin::Container),
    }
}

fn rules(list: &[(&str, &str)]) -> RuleSet {
    let mut rules = RuleSet::default();
    for (target, ports) in list {
        let ports = if *ports == "published" {
            Ports::Published
        } else {
            Ports::Spec(ports.parse().expect("spec"))
        };
        rules
            .allow(target.parse().expect("target"), ports, Access::default())
            .expect("allow");
    }
    rules
}

#[test]
fn an_added_open_address_rule_resolves_as_a_full_resolution_would() {
    let web = container("web", "10.0.0.9", &[(8080, 80)], Some("53/udp"));
    let before = rules(&[("10.0.0.2", "80-81"), ("web", "80")]);
    let mut resolver = Resolver::default();
    let mut incremental = resolver.resolve(&before, std::slice::from_ref(&web), &context(false));
    let mut after = before.clone();
    let id = after
        .allow(
            "10.0.0.3".parse().expect("target"),
            Ports::Spec("443-444".parse().expect("spec")),
            Access::default(),
        )
        .expect("allow");
    let rule = after.rules().iter().find(|r| r.id == id).expect("rule");
    let keys = incremental
        .add_open_address_rule(rule, 0)
        .expect("an open address rule to new destinations");
    assert_eq!(keys.len(), 2);
    let full = resolver.resolve(&after, &[web], &context(false));
    assert_eq!(incremental.entries, full.entries);
    let ids = |r: &Resolved| {
        r.rules
            .iter()
            .map(|r| (r.id, r.addresses.clone(), r.specs.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&incremental), ids(&full));

    // Where the rule would change another admission, or needs an access list, nothing
    // changes and the caller resolves everything.
    let overlapping = Rule {
        id: 900,
        target: "10.0.0.2".parse().expect("target"),
        ports: Ports::Spec("81-82".parse().expect("spec")),
        access: Access::default(),
    };
    let restricted = Rule {
        id: 901,
        target: "10.0.0.4".parse().expect("target"),
        ports: Ports::Spec("80".parse().expect("spec")),
        access: Access {
            from: vec!["192.0.2.0/24".parse().expect("source")],
            ..Access::default()
        },
    };
    let container_rule = Rule {
        id: 902,
        target: "db".parse().expect("target"),
        ports: Ports::Spec("5432".parse().expect("spec")),
        access: Access::default(),
    };
    for rule in [overlapping, restricted, container_rule, rule.clone()] {
        assert!(
            incremental.add_open_address_rule(&rule, 0).is_none(),
            "{rule}"
        );
    }
    assert_eq!(incremental.entries, full.entries);
}

#[test]
fn address_rules_map_addresses_protocols_and_ports() {
    let resolved = Resolver::default().resolve(
        &rules(&[("10.0.0.2", "80-81"), ("10.0.0.2", "icmp")]),
        &[],
        &context(false),
    );
    assert_eq!(resolved.entries.len(), 3);
    let v4 = ipv4_mapped([10, 0, 0, 2]);
    assert_eq!(
        resolved.entries[&AllowKey::new(v4, PROTO_TCP, 81)],
        Admission::Any(0)
    );
    assert_eq!(
        resolved.entries[&AllowKey::new(v4, PROTO_ICMP, 0)],
        Admission::Any(1)
    );
    assert!(resolved.rules.iter().all(ResolvedRule::is_active));
}

#[test]
fn container_rules_follow_the_container() {
    let set = rules(&[("web", "80")]);
    let mut resolver = Resolver::default();
    let before = resolver.resolve(&set, &[], &context(false));
    assert!(
        !before.rules[0].is_active(),
        "kept, inactive, while the container is not running"
    );
    assert!(before.entries.is_empty());

    let web = container("web", "172.17.0.2", &[(8080, 80)], None);
    let running = resolver.resolve(&set, &[web], &context(false));
    assert!(running.rules[0].is_active());
    assert_eq!(running.rules[0].host_ports, [8080]);
    assert!(running.entries.contains_key(&AllowKey::new(
        ipv4_mapped([172, 17, 0, 2]),
        PROTO_TCP,
        80
    )));

    // Restarted with a new address: the entry moves.
    let moved = resolver.resolve(
        &set,
        &[container("web", "172.17.0.3", &[(8080, 80)], None)],
        &context(false),
    );
    let keys: Vec<_> = moved.entries.keys().collect();
    assert_eq!(
        keys,
        [&AllowKey::new(ipv4_mapped([172, 17, 0, 3]), PROTO_TCP, 80)]
    );
}

#[test]
fn published_rules_open_exactly_the_published_ports() {
    let set = rules(&[("web", "published")]);
    let web = container("web", "172.17.0.2", &[(8080, 80), (8443, 443)], None);
    let resolved = Resolver::default().resolve(&set, &[web], &context(false));
    let ports: Vec<u16> = resolved.entries.keys().map(|k| k.port).collect();
    assert_eq!(ports, [80, 443]);
    assert_eq!(resolved.rules[0].host_ports, [8080, 8443]);
}

#[test]
fn labels_and_default_policy_add_rules_with_stable_ids() {
    let db = container("db", "10.88.0.5", &[], Some("5432/tcp, 53/udp"));
    let web = container("web", "10.88.0.6", &[(8081, 80)], None);
    let mut resolver = Resolver::default();
    let first = resolver.resolve(
        &RuleSet::default(),
        &[db.clone(), web.clone()],
        &context(true),
    );
    assert!(first.label_errors.is_empty());
    let sources: Vec<Origin> = first.rules.iter().map(|r| r.source).collect();
    assert_eq!(
        sources,
        [Origin::Label, Origin::Label, Origin::DefaultPolicy]
    );
    assert!(first.rules.iter().all(|r| r.id >= DEFAULT_SAVED_RULES));
    assert_eq!(first.new_ids.len(), 3);
    assert_eq!(first.entries.len(), 3);

    let again = resolver.resolve(&RuleSet::default(), &[db.clone(), web], &context(true));
    let ids = |r: &Resolved| r.rules.iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(&again), ids(&first));
    assert!(again.new_ids.is_empty());

    // The web container stops: its derived rule goes.
    let after = resolver.resolve(&RuleSet::default(), &[db], &context(true));
    assert_eq!(after.rules.len(), 2);
}

#[test]
fn labels_carry_sources_and_a_label_that_does_not_parse_opens_nothing() {
    let items = parse_label("5432/tcp from 10.0.0.0/8 office via wg0, 80/tcp").expect("label");
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].1.from.len(), 2);
    assert_eq!(items[0].1.via.as_deref(), Some("wg0"));
    assert!(!items[1].1.is_restricted());
    for bad in [
        "5432/tcp, bogus",
        "80 from 10.0.0.1/8",
        "80 to 10.0.0.0/8",
        "80 via",
    ] {
        assert!(parse_label(bad).is_err(), "{bad}");
    }

    let db = container("db", "10.88.0.5", &[], Some("5432/tcp, bogus"));
    let resolved = Resolver::default().resolve(&RuleSet::default(), &[db], &context(false));
    assert!(resolved.rules.is_empty(), "no rule from a broken label");
    assert!(resolved.entries.is_empty());
    assert_eq!(resolved.label_errors.len(), 1);
    assert!(
        resolved.label_errors[0].1.contains("bogus"),
        "{:?}",
        resolved.label_errors
    );
}

#[test]
fn restricted_rules_add_up_and_an_open_rule_wins() {
    let mut set = RuleSet::default();
    let spec = || Ports::Spec("80".parse().expect("spec"));
    let from = |s: &str| Access {
        from: vec![s.parse().expect("source")],
        ..Access::default()
    };
    set.allow("10.0.0.2".parse().expect("t"), spec(), from("192.0.2.0/24"))
        .expect("allow");
    set.allow("10.0.0.2".parse().expect("t"), spec(), from("office"))
        .expect("allow");
    let via = Access {
        via: Some("wg9".into()),
        ..Access::default()
    };
    set.allow("10.0.0.2".parse().expect("t"), spec(), via)
        .expect("allow");
    let mut ctx = context(false);
    ctx.sets
        .insert("office".into(), ["198.51.100.7".parse().expect("p")].into());
    let resolved = Resolver::default().resolve(&set, &[], &ctx);
    let key = AllowKey::new(ipv4_mapped([10, 0, 0, 2]), PROTO_TCP, 80);
    let Admission::Restricted(list) = &resolved.entries[&key] else {
        panic!("restricted: {:?}", resolved.entries[&key]);
    };
    assert_eq!(
        list.len(),
        2,
        "the rule on a missing interface admits nothing"
    );
    assert!(
        resolved.rules[2]
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("wg9"))
    );
    assert!(!resolved.rules[2].is_active());

    set.allow("10.0.0.2".parse().expect("t"), spec(), Access::default())
        .expect("allow");
    let resolved = Resolver::default().resolve(&set, &[], &ctx);
    assert_eq!(resolved.entries[&key], Admission::Any(3));

    let expired = Access {
        expires: Some(10),
        ..Access::default()
    };
    let mut later = RuleSet::default();
    later
        .allow("10.0.0.3".parse().expect("t"), spec(), expired)
        .expect("allow");
    ctx.now = 10;
    assert!(
        Resolver::default()
            .resolve(&later, &[], &ctx)
            .entries
            .is_empty()
    );
}

/// `web` publishing `bindings`: (host address, host port, container port), all TCP.
fn published_on(bindings: &[(&str, u16, u16)]) -> Workload {
    let mut web = container("web", "172.17.0.2", &[], None);
    web.published = bindings
        .iter()
        .map(|(host_ip, host_port, container_port)| Published {
            host_ip: host_ip.parse().expect("host address"),
            host_port: *host_port,
            container_port: *container_port,
            protocol: Protocol::Tcp,
        })
        .collect();
    web
}

#[test]
fn loopback_only_ports_are_left_to_the_host_unless_allowed_explicitly() {
    let port = |p: u16| AllowKey::new(ipv4_mapped([172, 17, 0, 2]), PROTO_TCP, p);
    // `-p 127.0.0.1:8080:80` (and its IPv6 twin): for the host itself only.
    let local = published_on(&[("127.0.0.1", 8080, 80), ("::1", 8080, 80)]);

    let by_published = Resolver::default().resolve(
        &rules(&[("web", "published")]),
        std::slice::from_ref(&local),
        &context(false),
    );
    assert!(
        !by_published.entries.contains_key(&port(80)),
        "--published must not admit a loopback-only port: {:?}",
        by_published.entries
    );
    assert!(!by_published.rules[0].is_active());

    let by_policy = Resolver::default().resolve(
        &RuleSet::default(),
        std::slice::from_ref(&local),
        &context(true),
    );
    assert!(
        by_policy.entries.is_empty(),
        "the default policy must not admit a loopback-only port: {:?}",
        by_policy.entries
    );

    // Asked for by name and port, it is admitted: the operator said so.
    let explicit = Resolver::default().resolve(
        &rules(&[("web", "80")]),
        std::slice::from_ref(&local),
        &context(false),
    );
    assert_eq!(explicit.entries.get(&port(80)), Some(&Admission::Any(0)));
    assert_eq!(explicit.rules[0].host_ports, [8080]);

    // Published on loopback and on every address: reachable from outside, so admitted.
    let both = published_on(&[("127.0.0.1", 8080, 80), ("0.0.0.0", 9090, 80)]);
    for (set, default_published) in [
        (rules(&[("web", "published")]), false),
        (RuleSet::default(), true),
    ] {
        let resolved = Resolver::default().resolve(
            &set,
            std::slice::from_ref(&both),
            &context(default_published),
        );
        let ports: Vec<u16> = resolved.entries.keys().map(|k| k.port).collect();
        assert_eq!(ports, [80], "default_published {default_published}");
    }
}

#[test]
fn labels_off_ignores_them_and_label_rules_say_where_the_label_came_from() {
    let mut from_image = container("app", "10.88.0.7", &[], Some("22/tcp"));
    from_image.allow_label_origin = Some(LabelOrigin::Image);
    let set = rules(&[("app", "80")]);
    let image = Resolver::new(LabelPolicy::Image).resolve(
        &set,
        std::slice::from_ref(&from_image),
        &context(false),
    );
    let label_rules: Vec<&ResolvedRule> = image
        .rules
        .iter()
        .filter(|r| r.source == Origin::Label)
        .collect();
    assert_eq!(label_rules.len(), 1);
    assert_eq!(label_rules[0].label_origin, Some(LabelOrigin::Image));
    assert_eq!(
        image.rules[0].label_origin, None,
        "a saved rule has no label"
    );
    assert_eq!(image.entries.len(), 2);
    assert!(
        image.ignored_labels.is_empty(),
        "--labels image ignores none"
    );

    let off = Resolver::new(LabelPolicy::Off).resolve(&set, &[from_image], &context(false));
    assert!(
        off.rules.iter().all(|r| r.source != Origin::Label),
        "--labels off: no label rules"
    );
    assert!(off.ignored_labels.is_empty(), "off says so once, in status");
    let ports: Vec<u16> = off.entries.keys().map(|k| k.port).collect();
    assert_eq!(ports, [80], "saved rules still apply");
    // The default policy does not depend on labels.
    let web = container("web", "10.88.0.6", &[(8081, 80)], Some("443"));
    let policy =
        Resolver::new(LabelPolicy::Off).resolve(&RuleSet::default(), &[web], &context(true));
    let sources: Vec<Origin> = policy.rules.iter().map(|r| r.source).collect();
    assert_eq!(sources, [Origin::DefaultPolicy]);
}

#[test]
fn by_default_only_labels_set_on_the_container_open_ports() {
    let own = container("own", "10.88.0.5", &[], Some("80/tcp"));
    let mut image = container("img", "10.88.0.6", &[], Some("80/tcp"));
    image.allow_label_origin = Some(LabelOrigin::Image);
    let mut unknown = container("unk", "10.88.0.7", &[], Some("80/tcp"));
    unknown.allow_label_origin = None;
    let resolved =
        Resolver::default().resolve(&RuleSet::default(), &[own, image, unknown], &context(false));
    let opened: Vec<String> = resolved
        .entries
        .keys()
        .map(|k| crate::policy::addr_from_map(k.addr).to_string())
        .collect();
    assert_eq!(
        opened,
        ["10.88.0.5"],
        "only the container's own label opens"
    );
    let ignored: Vec<(&str, Option<LabelOrigin>)> = resolved
        .ignored_labels
        .iter()
        .map(|i| (i.container.as_str(), i.origin))
        .collect();
    assert_eq!(
        ignored,
        [("img", Some(LabelOrigin::Image)), ("unk", None)],
        "each one the agent warns about"
    );
    let warning = resolved.ignored_labels[0].warning();
    assert!(
        warning.contains("container img")
            && warning.contains("--labels image")
            && warning.contains("portgate.allow=80/tcp")
            && !warning.contains('\n'),
        "{warning}"
    );
}

#[test]
fn a_denial_closes_label_and_default_policy_ports_but_not_saved_rules() {
    let web = container("web", "172.17.0.2", &[(8080, 80)], Some("80-82/tcp"));
    let db = container("db", "172.17.0.3", &[(5432, 5432)], None);
    let mut ctx = context(true);
    ctx.denials.add(
        "web".parse().expect("target"),
        Ports::Spec("81".parse().expect("spec")),
    );
    ctx.denials
        .add("db".parse().expect("target"), Ports::Published);
    let saved = rules(&[("172.17.0.3", "5432")]);
    let resolved = Resolver::default().resolve(&saved, &[web, db], &ctx);
    let open: Vec<(String, u16)> = resolved
        .entries
        .keys()
        .map(|k| (crate::policy::addr_from_map(k.addr).to_string(), k.port))
        .collect();
    assert_eq!(
        open,
        [
            ("172.17.0.2".to_owned(), 80),
            ("172.17.0.2".to_owned(), 82),
            ("172.17.0.3".to_owned(), 5432),
        ],
        "81 closed; db's published port stays open by the saved rule"
    );
    let label = resolved
        .rules
        .iter()
        .find(|r| r.source == Origin::Label)
        .expect("label rule");
    let specs: Vec<String> = label.specs.iter().map(ToString::to_string).collect();
    assert_eq!(specs, ["80/tcp", "82/tcp"], "the label lists what is open");
    assert!(label.is_active());
    let db_policy = resolved
        .rules
        .iter()
        .find(|r| r.source == Origin::DefaultPolicy && r.containers == ["db"])
        .expect("db's default-policy rule");
    assert!(!db_policy.is_active());
    assert!(
        db_policy
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("portgate deny")),
        "{db_policy:?}"
    );
    assert_eq!(
        resolved.entries[&AllowKey::new(ipv4_mapped([172, 17, 0, 3]), PROTO_TCP, 5432)],
        Admission::Any(0)
    );
}

#[test]
fn derived_rules_take_the_slots_given_and_what_does_not_fit_is_skipped() {
    let file_rule = |address: &str| FileRule {
        target: address.parse().expect("target"),
        ports: Ports::Spec("80".parse().expect("spec")),
        access: Access::default(),
    };
    let mut ctx = context(false);
    ctx.file_rules = (1..=3).map(|i| file_rule(&format!("10.0.0.{i}"))).collect();
    let mut resolver = Resolver::default().with_slots(100..102);
    let resolved = resolver.resolve(&RuleSet::default(), &[], &ctx);
    let ids: Vec<u32> = resolved.rules.iter().map(|r| r.id).collect();
    assert_eq!(ids, [100, 101], "two slots, three file rules: one skipped");
    assert_eq!(resolved.entries.len(), 2);
    // The same file again: the same ids, nothing new.
    let again = resolver.resolve(&RuleSet::default(), &[], &ctx);
    assert_eq!(again.rules.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
    assert!(again.new_ids.is_empty());
}

#[test]
fn saved_rules_win_where_they_overlap_derived_ones() {
    let web = container("web", "172.17.0.2", &[(8080, 80)], Some("80"));
    let resolved = Resolver::default().resolve(&rules(&[("web", "80")]), &[web], &context(false));
    let key = AllowKey::new(ipv4_mapped([172, 17, 0, 2]), PROTO_TCP, 80);
    assert_eq!(resolved.entries[&key], Admission::Any(0));
}
