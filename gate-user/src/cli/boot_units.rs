//! `doctor`'s check of the units that start containers themselves (Quadlet files, `podman
//! generate systemd` units): each must wait for the gate at boot, as the engines do.

use std::path::PathBuf;

use gate_user::units;

use super::doctor::{Finding, Level};

/// One finding per container unit: whether it waits for the gate.
pub(super) fn findings() -> Vec<Finding> {
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
