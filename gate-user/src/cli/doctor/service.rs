//! The boot order: whether `portgate.service` is enabled (the engines' units wait for it),
//! and each unit that starts containers itself (Quadlet files, `podman generate systemd`
//! units), which must wait for the gate at boot as the engines do.

use std::path::{Path, PathBuf};

use gate_user::units;

use super::{Finding, Level};

pub(super) fn check() -> Vec<Finding> {
    let mut findings = vec![service()];
    findings.extend(container_units());
    findings
}

/// Whether the gate comes up before the engines at boot.
fn service() -> Finding {
    if !Path::new("/run/systemd/system").is_dir() {
        return Finding::new(
            "service",
            "portgate.service",
            Level::Info,
            "systemd is not running this host: start the agent before the engines at boot yourself"
                .to_owned(),
            None,
        );
    }
    let enabled = std::process::Command::new("systemctl")
        .args(["is-enabled", "--quiet", "portgate.service"])
        .status()
        .is_ok_and(|s| s.success());
    if enabled {
        Finding::new(
            "service",
            "portgate.service",
            Level::Ok,
            "enabled: starts before docker.service, podman.service and podman.socket, which wait for it".to_owned(),
            None,
        )
    } else {
        Finding::new(
            "service",
            "portgate.service",
            Level::Warning,
            "not enabled: after a reboot, containers with a restart policy start before anything gates them".to_owned(),
            Some("`systemctl enable --now portgate`".to_owned()),
        )
    }
}

/// One finding per container unit: whether it waits for the gate.
fn container_units() -> Vec<Finding> {
    let paths = |dirs: &[&str]| dirs.iter().map(PathBuf::from).collect::<Vec<_>>();
    let drop_in_dirs = paths(&units::DROP_IN_DIRS);
    units::find(&paths(&units::QUADLET_DIRS), &paths(&units::UNIT_DIRS))
        .into_iter()
        .map(|unit| {
            let waits = units::waits_for_gate(&unit, &drop_in_dirs);
            Finding {
                check: "service",
                subject: unit.name.clone(),
                level: if waits { Level::Ok } else { Level::Warning },
                detail: if waits {
                    format!("starts containers ({}); waits for the gate at boot", unit.source.display())
                } else {
                    format!(
                        "starts containers ({}) without waiting for the gate: if the gate fails at boot, its containers start ungated",
                        unit.source.display()
                    )
                },
                advice: (!waits).then(|| {
                    "`systemctl daemon-reload` runs portgate's generator, which gives it the drop-in (installed by the package)".to_owned()
                }),
            }
        })
        .collect()
}
