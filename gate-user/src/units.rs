//! Container units that start containers themselves, outside the engines' own units: Quadlet
//! files (`/etc/containers/systemd/*.container`, turned into `NAME.service` by Podman's
//! generator) and `podman generate systemd` units (`container-NAME.service`, which run
//! `podman run` or `podman start`). They must wait for the gate at boot as the engines'
//! units do; the package's systemd generator (`portgate systemd-generator`) gives each a
//! drop-in, so no per-unit step is needed, and `doctor` names those that do not wait.

use std::{
    io,
    path::{Path, PathBuf},
};

/// Where Quadlet reads the system's container files.
pub const QUADLET_DIRS: [&str; 3] = [
    "/etc/containers/systemd",
    "/run/containers/systemd",
    "/usr/share/containers/systemd",
];
/// Where administrators and `podman generate systemd --files` put units.
pub const UNIT_DIRS: [&str; 2] = ["/etc/systemd/system", "/run/systemd/system"];
/// Where a unit's drop-ins may be: the generators' output once systemd ran them, and the
/// unit directories.
pub const DROP_IN_DIRS: [&str; 6] = [
    "/run/systemd/generator",
    "/run/systemd/generator.early",
    "/run/systemd/generator.late",
    "/etc/systemd/system",
    "/run/systemd/system",
    "/lib/systemd/system",
];
/// The engines' own units, which the package's static drop-ins cover.
const ENGINE_UNITS: [&str; 4] = [
    "docker.service",
    "podman.service",
    "podman-restart.service",
    "podman-auto-update.service",
];
/// Quadlet file kinds that become a service running containers.
const QUADLET_KINDS: [&str; 3] = ["container", "kube", "pod"];
/// The drop-in's file name.
pub const DROP_IN: &str = "portgate.conf";

/// The drop-in that makes a unit wait for the gate: started after it, and not at all when
/// no agent answers, as the engines' drop-ins do.
pub const DROP_IN_TEXT: &str = "\
# Written by portgate's systemd generator: this unit starts containers itself, so it starts
# only after the gate is attached (portgate.service is Type=notify), and not at all when no
# agent answers, so that its containers never start ungated.
[Unit]
Wants=portgate.service
After=portgate.service

[Service]
ExecStartPre=/bin/sh -c 'exec /usr/bin/portgate status >/dev/null'
";

/// A unit that starts containers, and where it was found.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerUnit {
    /// e.g. `web.service`, `container-db.service`.
    pub name: String,
    pub source: PathBuf,
}

/// Every container unit under the given directories: Quadlet files (searched to a small
/// depth, as Quadlet does) and service files that run `podman run` or `podman start`.
pub fn find(quadlet_dirs: &[PathBuf], unit_dirs: &[PathBuf]) -> Vec<ContainerUnit> {
    let mut units = Vec::new();
    for dir in quadlet_dirs {
        for path in files_under(dir, 3) {
            if let Some(name) = quadlet_service(&path) {
                units.push(ContainerUnit { name, source: path });
            }
        }
    }
    for dir in unit_dirs {
        for path in files_under(dir, 0) {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !name.ends_with(".service") || ENGINE_UNITS.contains(&name) {
                continue;
            }
            let runs_podman =
                std::fs::read_to_string(&path).is_ok_and(|text| starts_containers(&text));
            if runs_podman {
                units.push(ContainerUnit {
                    name: name.to_owned(),
                    source: path,
                });
            }
        }
    }
    units.sort();
    units.dedup_by(|a, b| a.name == b.name);
    units
}

/// Writes the drop-in of each unit under `out` (a generator's output directory); returns
/// the units.
pub fn generate(
    out: &Path,
    quadlet_dirs: &[PathBuf],
    unit_dirs: &[PathBuf],
) -> io::Result<Vec<ContainerUnit>> {
    let units = find(quadlet_dirs, unit_dirs);
    for unit in &units {
        let dir = out.join(format!("{}.d", unit.name));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(DROP_IN), DROP_IN_TEXT)?;
    }
    Ok(units)
}

/// Whether `unit` waits for the gate: a drop-in of ours in a generator's output or under
/// `unit_dirs`, or an `After=` naming portgate.service in the unit itself.
pub fn waits_for_gate(unit: &ContainerUnit, drop_in_dirs: &[PathBuf]) -> bool {
    let drop_in = drop_in_dirs.iter().any(|dir| {
        let path = dir.join(format!("{}.d", unit.name)).join(DROP_IN);
        std::fs::read_to_string(path).is_ok_and(|text| orders_after_gate(&text))
    });
    drop_in || std::fs::read_to_string(&unit.source).is_ok_and(|text| orders_after_gate(&text))
}

/// The service a Quadlet file becomes: its `ServiceName=`, else its stem (`web.pod` becomes
/// `web-pod.service`).
fn quadlet_service(path: &Path) -> Option<String> {
    let kind = path.extension()?.to_str()?;
    if !QUADLET_KINDS.contains(&kind) {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    let text = std::fs::read_to_string(path).ok()?;
    let named = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("ServiceName="))
        .map(|name| name.trim().trim_end_matches(".service").to_owned());
    Some(match named {
        Some(name) => format!("{name}.service"),
        None if kind == "pod" => format!("{stem}-pod.service"),
        None => format!("{stem}.service"),
    })
}

/// Whether a unit's text starts containers: an `Exec*=` line running `podman run`,
/// `podman start` or `podman kube play`.
fn starts_containers(text: &str) -> bool {
    text.lines().any(|line| {
        let line = line.trim();
        line.starts_with("Exec")
            && line.contains("podman")
            && [" run ", " start ", " kube play ", " play kube "]
                .iter()
                .any(|verb| format!("{line} ").contains(verb))
    })
}

/// Whether a unit or drop-in text orders the unit after portgate.service.
fn orders_after_gate(text: &str) -> bool {
    text.lines().any(|line| {
        line.trim()
            .strip_prefix("After=")
            .is_some_and(|units| units.split_whitespace().any(|u| u == "portgate.service"))
    })
}

/// Regular files under `dir`, to `depth` levels of subdirectories; a missing directory has
/// none.
fn files_under(dir: &Path, depth: u32) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() && depth > 0 => files.extend(files_under(&path, depth - 1)),
            Ok(t) if t.is_file() || t.is_symlink() => files.push(path),
            _ => {}
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `podman generate systemd --new --name db` (Podman 4.3), trimmed.
    const GENERATED: &str = "[Unit]\nDescription=Podman container-db.service\nWants=network-online.target\nAfter=network-online.target\n\n[Service]\nEnvironment=PODMAN_SYSTEMD_UNIT=%n\nRestart=on-failure\nExecStart=/usr/bin/podman run --cidfile=%t/%n.ctr-id --cgroups=no-conmon --rm --sdnotify=conmon -d --replace --name db -p 5432:5432 postgres\nExecStop=/usr/bin/podman stop --ignore -t 10 --cidfile=%t/%n.ctr-id\nType=notify\nNotifyAccess=all\n\n[Install]\nWantedBy=default.target\n";

    #[test]
    fn quadlet_files_and_podman_units_get_a_drop_in_and_nothing_else_does() {
        let root = tempfile::tempdir().expect("tempdir");
        let quadlet = root.path().join("containers/systemd");
        let units = root.path().join("systemd/system");
        std::fs::create_dir_all(quadlet.join("apps")).expect("mkdir");
        std::fs::create_dir_all(&units).expect("mkdir");
        std::fs::write(
            quadlet.join("web.container"),
            "[Container]\nImage=nginx\nPublishPort=8080:80\n",
        )
        .expect("write");
        std::fs::write(
            quadlet.join("apps/api.container"),
            "[Container]\nImage=api\nServiceName=backend\n",
        )
        .expect("write");
        std::fs::write(quadlet.join("stack.pod"), "[Pod]\n").expect("write");
        std::fs::write(quadlet.join("data.volume"), "[Volume]\n").expect("write");
        std::fs::write(units.join("container-db.service"), GENERATED).expect("write");
        std::fs::write(
            units.join("nginx.service"),
            "[Service]\nExecStart=/usr/sbin/nginx\n",
        )
        .expect("write");
        std::fs::write(
            units.join("podman.service"),
            "[Service]\nExecStart=/usr/bin/podman system service\n",
        )
        .expect("write");

        let out = root.path().join("generator");
        let found = generate(&out, &[quadlet], &[units]).expect("generate");
        let names: Vec<&str> = found.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "backend.service",
                "container-db.service",
                "stack-pod.service",
                "web.service"
            ]
        );
        for unit in &found {
            assert!(
                !waits_for_gate(unit, &[]),
                "{} waits without the drop-in",
                unit.name
            );
            assert!(
                waits_for_gate(unit, std::slice::from_ref(&out)),
                "{} waits with it",
                unit.name
            );
            let text = std::fs::read_to_string(out.join(format!("{}.d/portgate.conf", unit.name)))
                .expect("drop-in");
            assert_eq!(text, DROP_IN_TEXT);
        }
    }
}
