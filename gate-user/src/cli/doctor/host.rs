//! The host itself: IPv6 forwarding, and the kernel features the gate needs (TCX, BTF, a
//! cgroup v2 hierarchy for the relay hooks).

use std::path::Path;

use gate_user::datapath::{self, sys};

use super::{Finding, Level};

pub(super) fn check() -> Vec<Finding> {
    let mut findings = vec![ipv6_forwarding()];
    let release = sys::kernel_release();
    findings.push(if datapath::has_tcx(&release) {
        Finding::new(
            "kernel",
            "tcx",
            Level::Ok,
            format!(
                "kernel {release} has TCX: the gate's links are its own, no other tool's tc filter can detach or reorder them"
            ),
            None,
        )
    } else {
        Finding::new(
            "kernel",
            "tcx",
            Level::Unprotected,
            format!("kernel {release} has no TCX links (6.6+): the gate cannot load here"),
            Some("run Linux 6.6 or later".to_owned()),
        )
    });
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        findings.push(Finding::new(
            "kernel",
            "btf",
            Level::Warning,
            "no /sys/kernel/btf/vmlinux".to_owned(),
            Some("use a kernel built with CONFIG_DEBUG_INFO_BTF".to_owned()),
        ));
    }
    findings.push(match datapath::cgroup2_root() {
        Ok(root) => Finding::new(
            "kernel",
            "cgroup2",
            Level::Ok,
            format!(
                "cgroup v2 at {}: the relay hooks see every process's binds",
                root.display()
            ),
            None,
        ),
        Err(err) => Finding::new(
            "kernel",
            "cgroup2",
            Level::Unprotected,
            format!(
                "{:#}: the agent cannot attach the relay hooks",
                anyhow::Error::from(err)
            ),
            Some(
                "mount one: `mount -t cgroup2 none /sys/fs/cgroup` (systemd does at boot)"
                    .to_owned(),
            ),
        ),
    });
    findings
}

fn ipv6_forwarding() -> Finding {
    let forwarding = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding");
    let (level, detail) = match forwarding.as_deref().map(str::trim) {
        Ok("1") => (
            Level::Info,
            "on: IPv6 is routed to containers with IPv6 addresses; the gate handles IPv6 on gated bridges, but containers the gate does not see answer over IPv6 too",
        ),
        Ok(_) => (
            Level::Ok,
            "off: IPv6 clients reach published ports only through docker-proxy (gated by the socket lookup)",
        ),
        Err(_) => (Level::Info, "no IPv6 on this host"),
    };
    Finding::new("ipv6", "forwarding", level, detail.to_owned(), None)
}
