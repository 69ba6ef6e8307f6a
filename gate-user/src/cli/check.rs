//! `portgate check [FILE]`: the policy file checked without applying it, and, when an agent
//! runs, what applying it would change against what the agent holds from the file now.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use gate_user::{
    api::{Reply, Request, RuleList, client},
    policy::{Access, FilePolicy, Origin, SourceSets, SourceSpec},
};

use super::args::DEFAULT_POLICY_FILE;

pub fn run(socket: &Path, file: Option<&Path>) -> anyhow::Result<()> {
    let path = file.unwrap_or(Path::new(DEFAULT_POLICY_FILE));
    // The sets defined by `portgate set` (not the file's own: the file may drop them), for
    // the rules that name them.
    let list = match client::call(socket, &Request::List) {
        Ok(Reply::List(list)) => Some(*list),
        _ => None,
    };
    let known: SourceSets = list
        .as_ref()
        .map(|l| {
            let from_file = l.policy_file.as_ref().map(|f| &f.sets);
            l.sets
                .iter()
                .filter(|(name, _)| !from_file.is_some_and(|sets| sets.contains_key(*name)))
                .map(|(name, prefixes)| {
                    let prefixes = prefixes.iter().filter_map(|p| p.parse().ok()).collect();
                    (name.clone(), prefixes)
                })
                .collect()
        })
        .unwrap_or_default();
    let policy = FilePolicy::load(path, &known)?;
    println!(
        "{}: ok: {} rules, {} sets, {} blocks",
        path.display(),
        policy.rules.len(),
        policy.sets.len(),
        policy.blocks.len()
    );
    match list {
        Some(list) => print!("{}", changes(&policy, &list)),
        None => println!("no agent answers on {}: not compared", socket.display()),
    }
    Ok(())
}

/// What reloading `policy` would change, one line each: `+` added, `-` removed.
fn changes(policy: &FilePolicy, list: &RuleList) -> String {
    let current = list.policy_file.clone().unwrap_or_default();
    let wanted_rules: BTreeSet<String> = policy
        .rules
        .iter()
        .map(|r| format!("allow {} {}{}", r.target, r.ports, r.access))
        .collect();
    let current_rules: BTreeSet<String> = list
        .rules
        .iter()
        .filter(|r| r.source == Origin::File)
        .map(|r| {
            let ports = if r.published {
                "published ports".to_owned()
            } else if r.protocol == "icmp" {
                "icmp".to_owned()
            } else if r.port_start == r.port_end {
                format!("{}/{}", r.port_start, r.protocol)
            } else {
                format!("{}-{}/{}", r.port_start, r.port_end, r.protocol)
            };
            let access = Access {
                from: r
                    .from
                    .iter()
                    .filter_map(|s| s.parse::<SourceSpec>().ok())
                    .collect(),
                via: r.via.clone(),
                expires: None,
            };
            format!("allow {} {ports}{access}", r.target)
        })
        .collect();
    let wanted_sets: BTreeMap<String, Vec<String>> = policy
        .sets
        .iter()
        .map(|(name, prefixes)| {
            (
                name.clone(),
                prefixes.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    let wanted_blocks: BTreeSet<String> = policy.blocks.iter().map(ToString::to_string).collect();
    let current_blocks: BTreeSet<String> = current.blocks.iter().cloned().collect();
    let mut out = String::new();
    let mut line = |sign: char, text: String| {
        out.push_str(&format!("{sign} {text}\n"));
    };
    for rule in current_rules.difference(&wanted_rules) {
        line('-', rule.clone());
    }
    for rule in wanted_rules.difference(&current_rules) {
        line('+', rule.clone());
    }
    for (name, prefixes) in &current.sets {
        match wanted_sets.get(name) {
            None => line('-', format!("set {name}")),
            Some(wanted) if wanted != prefixes => line(
                '~',
                format!("set {name}: {} -> {}", prefixes.join(" "), wanted.join(" ")),
            ),
            Some(_) => {}
        }
    }
    for (name, prefixes) in &wanted_sets {
        if !current.sets.contains_key(name) {
            line('+', format!("set {name}: {}", prefixes.join(" ")));
        }
    }
    for block in current_blocks.difference(&wanted_blocks) {
        line('-', format!("block {block}"));
    }
    for block in wanted_blocks.difference(&current_blocks) {
        line('+', format!("block {block}"));
    }
    if out.is_empty() {
        out.push_str("no changes against the running agent\n");
    }
    out
}
