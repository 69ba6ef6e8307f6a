//! `portgate doctor`: one report of what protects this host and what does not, and what to do
//! about each finding. It asks the agent for its status (when one answers) and looks at the
//! host itself; one function per check, in a file per subject: the agent, bridges and their
//! netfilter rules, engines, containers, docker-proxy, the host and kernel, the service and
//! boot order, rootless engines (and, in `cli/leftovers.rs`, delegation rules without a gate).
//!
//! Exit status: 0 when nothing is unprotected, 2 when a finding is `unprotected` (warnings do
//! not count), 1 when the doctor itself failed.

mod agent;
mod bridges;
mod containers;
mod engines;
mod host;
mod proxies;
mod rootless;
mod service;

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
};

use clap::Args;
use serde::Serialize;

use gate_user::{
    api::{Reply, Request, Status, client},
    datapath::{DEFAULT_BPFFS_DIR, PinnedGate},
};

/// The exit status when something is unprotected.
pub const EXIT_UNPROTECTED: i32 = 2;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The bpffs directory holding the pins (looked at when no agent answers).
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs: PathBuf,
    #[command(flatten)]
    pub saved: super::leftovers::SavedRulesets,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    Info,
    Warning,
    Unprotected,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Info => "info",
            Level::Warning => "WARNING",
            Level::Unprotected => "UNPROTECTED",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Finding {
    /// agent, bridge, engine, netfilter, label, container, docker_proxy, ipv6, kernel, service.
    pub check: &'static str,
    /// What the finding is about: a bridge, an engine, a container, ...
    pub subject: String,
    pub level: Level,
    pub detail: String,
    /// What to do about it; none when nothing needs doing.
    pub advice: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// No finding is `unprotected`.
    pub protected: bool,
    pub unprotected: usize,
    pub warnings: usize,
    pub findings: Vec<Finding>,
}

pub fn run(socket: &Path, args: &DoctorArgs) -> anyhow::Result<()> {
    let report = examine(socket, args);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", super::colour::paint(&format_report(&report)));
    }
    if !report.protected {
        std::io::stdout().flush()?;
        std::process::exit(EXIT_UNPROTECTED);
    }
    Ok(())
}

/// What every check may read: the agent's status (when one answers) and the pinned gate.
struct Facts<'a> {
    socket: &'a Path,
    bpffs: &'a Path,
    status: Result<Box<Status>, String>,
    pinned: PinnedGate,
}

impl Facts<'_> {
    /// The bridges the gate is attached to: as the agent says, else as the pins say.
    fn gated_bridges(&self) -> BTreeSet<String> {
        match &self.status {
            Ok(status) => status
                .bridges
                .iter()
                .filter(|b| b.attached)
                .map(|b| b.name.clone())
                .collect(),
            Err(_) => self.pinned.bridges.clone(),
        }
    }
}

/// Runs every check, one function each, in the report's order of subjects.
fn examine(socket: &Path, args: &DoctorArgs) -> Report {
    let status = match client::call(socket, &Request::Status) {
        Ok(Reply::Status(status)) => Ok(status),
        Ok(other) => Err(format!("answered something unexpected: {other:?}")),
        Err(err) => Err(format!("{:#}", anyhow::Error::from(err))),
    };
    let facts = Facts {
        socket,
        bpffs: &args.bpffs,
        status,
        pinned: PinnedGate::read(&args.bpffs),
    };
    let mut findings = agent::check(&facts);
    findings.extend(bridges::check(&facts));
    findings.extend(engines::check(&facts));
    findings.extend(bridges::check_netfilter(&facts));
    findings.extend(containers::check(&facts));
    findings.extend(proxies::check_hooks(&facts));
    findings.extend(proxies::check(&facts));
    findings.extend(host::check());
    findings.extend(service::check());
    findings.extend(rootless::findings(
        &rootless::relayed_ports(),
        facts.status.as_ref().ok().map(|s| &**s),
    ));
    // Delegation rules without a gate, now or after the next boot.
    findings.extend(super::leftovers::findings(
        &facts.gated_bridges(),
        &args.saved,
    ));
    Report::new(findings)
}

impl Report {
    fn new(mut findings: Vec<Finding>) -> Self {
        findings.sort_by_key(|f| std::cmp::Reverse(f.level));
        let count = |level| findings.iter().filter(|f| f.level == level).count();
        let (unprotected, warnings) = (count(Level::Unprotected), count(Level::Warning));
        Self {
            protected: unprotected == 0,
            unprotected,
            warnings,
            findings,
        }
    }
}

impl Finding {
    fn new(
        check: &'static str,
        subject: &str,
        level: Level,
        detail: String,
        advice: Option<String>,
    ) -> Self {
        Self {
            check,
            subject: subject.to_owned(),
            level,
            detail,
            advice,
        }
    }
}

fn format_report(report: &Report) -> String {
    let mut out = String::new();
    let verdict = if report.protected {
        "nothing unprotected found".to_owned()
    } else {
        format!("{} unprotected", report.unprotected)
    };
    let _ = writeln!(
        out,
        "portgate doctor: {verdict}, {} warning(s)",
        report.warnings
    );
    for finding in &report.findings {
        let _ = writeln!(
            out,
            "{:<12} {:<12} {}: {}",
            finding.level.label(),
            finding.check,
            finding.subject,
            finding.detail
        );
        if let Some(advice) = &finding.advice {
            let _ = writeln!(out, "{:<12} {:<12} -> {advice}", "", "");
        }
    }
    out
}

fn join(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(", ")
}
