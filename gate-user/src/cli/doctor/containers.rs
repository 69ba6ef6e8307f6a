//! Containers: image labels that opened ports before `--labels container` became the
//! default, and containers the gate does not see (host network, ipvlan, an ungated bridge).

use std::fmt::Write as _;

use gate_user::api::UngatedContainer;

use super::{Facts, Finding, Level};

pub(super) fn check(facts: &Facts<'_>) -> Vec<Finding> {
    let Ok(status) = &facts.status else {
        return Vec::new();
    };
    let labels = status.ignored_labels.iter().map(|ignored| {
        Finding::new(
            "label",
            &ignored.container,
            Level::Warning,
            ignored.warning.clone(),
            Some(format!(
                "if the image's author should decide what it opens: run the agent with --labels image; else `portgate allow {} PORTS`, or `docker run --label portgate.allow=...` with a value of your own",
                ignored.container
            )),
        )
    });
    let ungated = status.ungated.iter().map(|ungated| {
        Finding::new(
            "container",
            &ungated.container,
            Level::Unprotected,
            ungated_detail(ungated),
            Some(ungated_advice(ungated)),
        )
    });
    labels.chain(ungated).collect()
}

fn ungated_detail(ungated: &UngatedContainer) -> String {
    let mut detail = format!("({}) {}", ungated.engine, ungated.reason);
    for (what, list) in [
        ("on", &ungated.addresses),
        ("publishes", &ungated.published),
        ("exposes", &ungated.exposed),
    ] {
        if !list.is_empty() {
            let _ = write!(detail, "; {what} {}", list.join(","));
        }
    }
    detail
}

fn ungated_advice(ungated: &UngatedContainer) -> String {
    if ungated.network_mode == "host" {
        "its ports are the host's: filter them in the host's input firewall, or run it on a bridge network and publish what it serves".to_owned()
    } else if ungated.reason.contains("(bridge ") {
        "gate that bridge: run the agent with `--bridge auto` or name it with --bridge".to_owned()
    } else {
        "it has its own address on the LAN: filter it there (router, switch) or in the container, or move it to a bridge network".to_owned()
    }
}
