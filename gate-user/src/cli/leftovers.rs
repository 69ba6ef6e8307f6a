//! Delegation rules that outlive their gate: in the kernel for a bridge no gate is attached to
//! (`portgate doctor` flags them), and in saved rulesets that restore one at boot (the doctor
//! and `portgate uninstall` say where; neither edits the files).

use std::{collections::BTreeSet, fmt::Write as _, path::PathBuf};

use clap::Args;

use gate_user::netfilter::{self, SavedRule};

use super::doctor::{Finding, Level};

#[derive(Debug, Clone, Args)]
pub struct SavedRulesets {
    /// Saved rulesets restored at boot, looked through for delegation rules (repeat, or
    /// separate with ':').
    #[arg(
        long = "saved-ruleset",
        value_name = "FILE",
        env = "PORTGATE_SAVED_RULESETS",
        value_delimiter = ':',
        default_values = netfilter::SAVED_RULESETS
    )]
    pub paths: Vec<PathBuf>,
}

fn rule_name(bridge: &str, replies: bool) -> String {
    if replies {
        format!("the delegation rule for {bridge}'s replies")
    } else {
        format!("the delegation rule for {bridge}")
    }
}

/// The doctor's findings: live delegation rules of bridges not in `gated`, and saved ones.
pub(super) fn findings(gated: &BTreeSet<String>, saved: &SavedRulesets) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut push = |subject: &str, level, detail: String, advice: &str| {
        findings.push(Finding {
            check: "netfilter",
            subject: subject.to_owned(),
            level,
            detail,
            advice: Some(advice.to_owned()),
        });
    };
    match netfilter::live_rules() {
        Ok(rules) => {
            for rule in rules.iter().filter(|rule| !gated.contains(&rule.bridge)) {
                push(
                    &rule.bridge,
                    Level::Unprotected,
                    format!(
                        "{} is in {} {}, but no gate is attached to {}: DNATed connections to its published ports pass the host's FORWARD drop unfiltered",
                        rule_name(&rule.bridge, rule.replies),
                        rule.backend,
                        rule.chain,
                        rule.bridge
                    ),
                    "gate the bridge (the agent with `--bridge auto` or `--bridge NAME` takes the rule over), or delete the rule; if a saved ruleset restored it, delete it there too",
                );
            }
        }
        Err(err) => push(
            "delegation rules",
            Level::Warning,
            format!(
                "cannot list the delegation rules: {:#}",
                anyhow::Error::from(err)
            ),
            "run `portgate doctor` as root",
        ),
    }
    for rule in netfilter::saved_rules(&saved.paths) {
        push(
            &rule.bridge,
            Level::Warning,
            format!(
                "{} holds {}: the boot restores it before the agent gates {} (for good, once portgate is removed)",
                location(&rule),
                rule_name(&rule.bridge, rule.replies),
                rule.bridge
            ),
            "delete that line from the saved ruleset (portgate does not edit it)",
        );
    }
    findings
}

fn location(rule: &SavedRule) -> String {
    format!("{}:{}", rule.path.display(), rule.line)
}

/// What `portgate uninstall` says about saved rulesets that still hold a delegation rule.
pub(super) fn uninstall_notes(saved: &SavedRulesets) -> String {
    let rules = netfilter::saved_rules(&saved.paths);
    let mut out = String::new();
    if rules.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "saved rulesets still hold {} delegation rule(s); the boot restores them without a gate, accepting DNATed connections to those bridges. Delete these lines (portgate does not edit the files):",
        rules.len()
    );
    for rule in &rules {
        let _ = writeln!(
            out,
            "  {}: {}",
            location(rule),
            rule_name(&rule.bridge, rule.replies)
        );
    }
    out
}
