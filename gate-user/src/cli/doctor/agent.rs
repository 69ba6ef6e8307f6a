//! The agent: running or not (and then what the pinned gate still does), its mode, and
//! whether every allow entry fits.

use super::{Facts, Finding, Level, join};

pub(super) fn check(facts: &Facts<'_>) -> Vec<Finding> {
    let status = match &facts.status {
        Ok(status) => status,
        Err(err) => {
            let enforcing = if facts.pinned.bridges.is_empty() {
                "no gate is attached".to_owned()
            } else {
                format!(
                    "the gate stays attached to {} and enforces the last rules, but new bridges, containers and rule changes are not followed",
                    join(&facts.pinned.bridges)
                )
            };
            return vec![Finding::new(
                "agent",
                "portgate agent",
                Level::Unprotected,
                format!("not answering on {}: {err}; {enforcing}", facts.socket.display()),
                Some("start it: `systemctl start portgate` (the package's unit), or `portgate agent --bridge auto`; `portgate doctor` needs root to reach it".to_owned()),
            )];
        }
    };
    let (level, advice) = if status.mode == "audit" {
        (
            Level::Unprotected,
            Some("audit mode passes everything: `portgate mode enforce`".to_owned()),
        )
    } else {
        (Level::Ok, None)
    };
    let mut findings = vec![Finding::new(
        "agent",
        "portgate agent",
        level,
        format!(
            "running (version {}), mode {}, {} rule(s), host traffic {}",
            status.version,
            status.mode,
            status.rules,
            if status.gate_host_traffic {
                "gated"
            } else {
                "passes"
            }
        ),
        advice,
    )];
    if status.allow_entries.not_fitted > 0 {
        findings.push(Finding::new(
            "agent",
            "allow map",
            Level::Warning,
            format!(
                "{} allow entries did not fit (capacity {}): those ports stay closed",
                status.allow_entries.not_fitted, status.allow_entries.capacity
            ),
            Some("narrow the rules, or restart the agent with a larger --max-allow (after `portgate uninstall`)".to_owned()),
        ));
    }
    findings
}
