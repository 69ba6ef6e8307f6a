//! The native nftables backend: forward base chains made with the `nft` tool (not the ones
//! iptables-nft manages, which the iptables backends handle).

use serde_json::{Value, json};
use tracing::debug;

use super::{
    Location, NetfilterError, OwnRule, Position, RuleId, Scope, Slot, Survey, Target,
    bridge_of_comment, comment_for,
    exec::{Invocation, find_binary},
    layout, split_key,
};

pub(super) const BACKEND: &str = "nftables";

/// The tables and base chains iptables-nft creates; nftables rules are never added there.
const XTABLES_TABLES: [&str; 5] = ["filter", "mangle", "raw", "security", "nat"];
const XTABLES_CHAINS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// One chain of the ruleset, with what matters here.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Chain {
    pub(super) family: String,
    pub(super) table: String,
    pub(super) name: String,
    /// type, hook and policy of a base chain; None for a regular chain.
    pub(super) base: Option<Base>,
    pub(super) rules: Vec<Rule>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Base {
    pub(super) kind: String,
    pub(super) hook: String,
    pub(super) policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rule {
    pub(super) handle: u64,
    pub(super) comment: Option<String>,
    /// Nothing but an optional counter and a drop or reject verdict.
    pub(super) drops_everything: bool,
    /// Matches `ct direction reply`: a replies rule of an earlier release lacks it and is
    /// replaced.
    pub(super) reply_only: bool,
}

impl Chain {
    fn location(&self) -> Location {
        Location::Nft {
            family: self.family.clone(),
            table: self.table.clone(),
            chain: self.name.clone(),
        }
    }

    fn managed_by_iptables(&self) -> bool {
        matches!(self.family.as_str(), "ip" | "ip6")
            && XTABLES_TABLES.contains(&self.table.as_str())
            && XTABLES_CHAINS.contains(&self.name.as_str())
    }

    /// A filter chain on the forward hook of an IP family whose verdict for an unmatched
    /// packet is drop: `policy drop`, or an unconditional drop/reject as the last rule.
    /// Every such chain must accept the connection (an accept in one base chain does not
    /// skip the others on the same hook), so each gets its own rule.
    pub(super) fn drops_forwarded(&self) -> bool {
        let Some(base) = &self.base else { return false };
        base.kind == "filter"
            && base.hook == "forward"
            && matches!(self.family.as_str(), "ip" | "ip6" | "inet")
            && !self.managed_by_iptables()
            && (base.policy == "drop"
                || self.rules.last().is_some_and(|rule| rule.drops_everything))
    }
}

/// The chains of `nft -j list ruleset`.
pub(super) fn parse_json(text: &str) -> Result<Vec<Chain>, String> {
    let root: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let items = root
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("no \"nftables\" array")?;
    let str_of = |object: &Value, key: &str| {
        object
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let mut chains: Vec<Chain> = Vec::new();
    for item in items {
        if let Some(chain) = item.get("chain") {
            let base = chain.get("hook").map(|_| Base {
                kind: str_of(chain, "type"),
                hook: str_of(chain, "hook"),
                policy: str_of(chain, "policy"),
            });
            chains.push(Chain {
                family: str_of(chain, "family"),
                table: str_of(chain, "table"),
                name: str_of(chain, "name"),
                base,
                rules: Vec::new(),
            });
        } else if let Some(rule) = item.get("rule") {
            let (family, table, name) = (
                str_of(rule, "family"),
                str_of(rule, "table"),
                str_of(rule, "chain"),
            );
            let handle = rule
                .get("handle")
                .and_then(Value::as_u64)
                .ok_or("rule without handle")?;
            let exprs = rule
                .get("expr")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let drops_everything = match exprs.split_last() {
                Some((last, before)) => {
                    (last.get("drop").is_some() || last.get("reject").is_some())
                        && before.iter().all(|expr| expr.get("counter").is_some())
                }
                None => false,
            };
            let rule = Rule {
                handle,
                comment: rule
                    .get("comment")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                drops_everything,
                reply_only: exprs.contains(&reply_direction()),
            };
            // Rules follow their chain in a listing; look from the end.
            match chains
                .iter_mut()
                .rev()
                .find(|c| c.family == family && c.table == table && c.name == name)
            {
                Some(chain) => chain.rules.push(rule),
                None => return Err(format!("rule in unknown chain {family} {table} {name}")),
            }
        }
    }
    Ok(chains)
}

/// The chains of `nft -a list ruleset`, for an `nft` built without JSON support.
pub(super) fn parse_text(text: &str) -> Result<Vec<Chain>, String> {
    let mut chains: Vec<Chain> = Vec::new();
    let mut depth: i64 = 0;
    let mut table: Option<(String, String)> = None;
    let mut in_chain = false;
    for raw in text.lines() {
        let line = raw.trim();
        let (code, handle) = split_handle(line);
        let words: Vec<&str> = code.split_whitespace().collect();
        match (depth, words.as_slice()) {
            (0, ["table", family, name, "{"]) => {
                table = Some(((*family).to_owned(), (*name).to_owned()));
            }
            (1, ["chain", name, "{"]) => {
                if let Some((family, table)) = &table {
                    chains.push(Chain {
                        family: family.clone(),
                        table: table.clone(),
                        name: (*name).to_owned(),
                        base: None,
                        rules: Vec::new(),
                    });
                    in_chain = true;
                }
            }
            (2, ["type", ..]) if in_chain => {
                let after = |key: &str| {
                    words
                        .windows(2)
                        .find(|pair| pair[0] == key)
                        .map(|pair| pair[1].trim_end_matches(';').to_owned())
                        .unwrap_or_default()
                };
                let policy = after("policy");
                if let Some(chain) = chains.last_mut() {
                    chain.base = Some(Base {
                        kind: after("type"),
                        hook: after("hook"),
                        policy: if policy.is_empty() {
                            "accept".to_owned()
                        } else {
                            policy
                        },
                    });
                }
            }
            (2, _) if in_chain => {
                if let (Some(handle), Some(chain)) = (handle, chains.last_mut()) {
                    chain.rules.push(Rule {
                        handle,
                        comment: text_comment(code),
                        drops_everything: text_drops_everything(&words),
                        reply_only: code.contains(" ct direction reply "),
                    });
                }
            }
            _ => {}
        }
        depth += braces(code);
        if depth < 0 {
            return Err(format!("unbalanced braces at {line:?}"));
        }
        if depth < 2 {
            in_chain = false;
        }
        if depth < 1 {
            table = None;
        }
    }
    Ok(chains)
}

/// Splits "... # handle 12" into the statement and the handle.
fn split_handle(line: &str) -> (&str, Option<u64>) {
    if let Some(at) = line.rfind("# handle ")
        && let Ok(handle) = line[at + "# handle ".len()..].trim().parse()
    {
        return (line[..at].trim_end(), Some(handle));
    }
    (line, None)
}

/// Opening minus closing braces outside quoted strings.
fn braces(code: &str) -> i64 {
    let mut quoted = false;
    let mut count = 0;
    for c in code.chars() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => count += 1,
            '}' if !quoted => count -= 1,
            _ => {}
        }
    }
    count
}

/// nft prints a rule's comment last: `... comment "text"`.
fn text_comment(code: &str) -> Option<String> {
    let body = code.strip_suffix('"')?;
    let at = body.rfind("comment \"")?;
    Some(body[at + "comment \"".len()..].to_owned())
}

fn text_drops_everything(words: &[&str]) -> bool {
    let rest = match words {
        ["counter", "packets", _, "bytes", _, rest @ ..] => rest,
        ["counter", rest @ ..] => rest,
        rest => rest,
    };
    matches!(rest, ["drop"]) || rest.first() == Some(&"reject")
}

/// `ct direction reply`, as nft JSON (and as `nft -j` prints it back).
fn reply_direction() -> Value {
    json!({"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"}})
}

/// The rule as nft JSON: `oifname "<bridge>" ct status dnat accept comment "..."`; with
/// `before`, the handle of the rule an "insert" puts it in front of.
fn rule_json(family: &str, table: &str, chain: &str, key: &str, before: Option<u64>) -> Value {
    let (bridge, replies) = split_key(key);
    let interface = if replies { "iifname" } else { "oifname" };
    let mut expr = vec![
        json!({"match": {"op": "==", "left": {"meta": {"key": interface}}, "right": bridge}}),
        json!({"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}),
    ];
    if replies {
        expr.push(reply_direction());
    }
    expr.push(json!({"accept": null}));
    let mut rule = json!({
        "family": family, "table": table, "chain": chain,
        "expr": expr,
        "comment": comment_for(key),
    });
    if let (Some(handle), Some(fields)) = (before, rule.as_object_mut()) {
        fields.insert("handle".to_owned(), handle.into());
    }
    rule
}

/// The chains that need the rule, with where it goes in each, and every rule of ours.
fn place(chains: &[Chain]) -> (Vec<Target>, Vec<OwnRule>) {
    let mut own = Vec::new();
    let mut targets = Vec::new();
    // Our rules whose match is not what we would write now: deleted, never kept in place.
    let mut outdated = Vec::new();
    for chain in chains {
        let slots: Vec<Slot> = chain
            .rules
            .iter()
            .map(|rule| {
                let bridge = rule.comment.as_deref().and_then(bridge_of_comment);
                let own = bridge.map(|bridge| {
                    if split_key(&bridge).1 && !rule.reply_only {
                        outdated.push(own.len());
                    }
                    own.push(OwnRule {
                        location: chain.location(),
                        bridge,
                        id: RuleId::Handle(rule.handle),
                    });
                    own.len() - 1
                });
                Slot {
                    own,
                    terminal: rule.drops_everything,
                }
            })
            .collect();
        if chain.drops_forwarded() {
            // Before the first unconditional drop/reject, else at the end (policy drop).
            let (at, mut placed, unreachable) = layout(&slots);
            placed.retain(|i| !outdated.contains(i));
            targets.push(Target {
                location: chain.location(),
                position: at
                    .and_then(|i| chain.rules.get(i))
                    .map_or(Position::End, |rule| Position::BeforeHandle(rule.handle)),
                placed,
                unreachable,
                scope: Scope::All,
            });
        }
    }
    (targets, own)
}

/// What the ruleset says: the chains that need the rule and every rule with our comment.
pub(super) fn survey() -> Result<Option<Survey>, NetfilterError> {
    let Some(tool) = find_binary("nft") else {
        return Ok(None);
    };
    let list_json = Invocation::new(&tool, ["-j", "list", "ruleset"]);
    let output = list_json.output()?;
    let (chains, json, list) = if output.status.success() {
        let text = String::from_utf8_lossy(&output.stdout);
        (parse_json(&text), true, list_json)
    } else if String::from_utf8_lossy(&output.stderr).contains("JSON") {
        // Built without JSON support: read the text listing (with handles) instead.
        let list_text = Invocation::new(&tool, ["-a", "list", "ruleset"]);
        let text = list_text.run()?;
        (parse_text(&text), false, list_text)
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("Protocol not supported") || stderr.contains("Operation not supported") {
            // A kernel without nf_tables: no native rules can exist.
            debug!(error = %list_json.failed(&output), "nftables not available in this kernel; skipped");
            return Ok(None);
        }
        return Err(list_json.failed(&output));
    };
    let chains = chains.map_err(|detail| NetfilterError::Parse {
        command: list.display(),
        detail,
    })?;
    let (targets, own) = place(&chains);
    Ok(Some(Survey {
        tool,
        json,
        targets,
        own,
    }))
}

/// Text commands only accept plain identifiers for table and chain names.
fn plain(name: &str) -> Result<&str, NetfilterError> {
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'));
    if ok {
        Ok(name)
    } else {
        Err(NetfilterError::Unsupported(format!(
            "nftables name {name:?} cannot be given to an nft without JSON support"
        )))
    }
}

/// `nft insert rule ... position H` before the terminal rule, or `nft add rule` at the end:
/// after the host's own rules.
pub(super) fn insert(
    survey: &Survey,
    location: &Location,
    position: Position,
    bridge: &str,
) -> Result<(), NetfilterError> {
    let Location::Nft {
        family,
        table,
        chain,
    } = location
    else {
        return Ok(());
    };
    let before = match position {
        Position::BeforeHandle(handle) => Some(handle),
        Position::End | Position::BeforeNumber(_) => None,
    };
    let invocation = if survey.json {
        let rule = rule_json(family, table, chain, bridge, before);
        let command = if before.is_some() {
            json!({"insert": {"rule": rule}})
        } else {
            json!({"add": {"rule": rule}})
        };
        Invocation::new(&survey.tool, ["-j", "-f", "-"])
            .stdin(json!({"nftables": [command]}).to_string())
    } else {
        let verb = if before.is_some() { "insert" } else { "add" };
        let mut args = vec![
            verb.to_owned(),
            "rule".to_owned(),
            plain(family)?.to_owned(),
            plain(table)?.to_owned(),
            plain(chain)?.to_owned(),
        ];
        if let Some(handle) = before {
            args.extend(["position".to_owned(), handle.to_string()]);
        }
        let (name, replies) = split_key(bridge);
        let interface = if replies { "iifname" } else { "oifname" };
        let mut words = vec![interface, "ct", "status", "dnat"];
        if replies {
            words.extend(["ct", "direction", "reply"]);
        }
        words.extend(["accept", "comment"]);
        args.push(interface.to_owned());
        args.push(format!("\"{name}\""));
        args.extend(words[1..].iter().map(|word| (*word).to_owned()));
        args.push(format!("\"{}\"", comment_for(bridge)));
        Invocation::new(&survey.tool, args)
    };
    invocation.run().map(drop)
}

/// `nft delete rule ... handle N`, with the handle the survey just read. Handles are never
/// reused while a table exists; only a table deleted and re-created (with a rule in a chain of
/// the same name) between that listing and this call could make it name another rule.
pub(super) fn delete(survey: &Survey, rule: &OwnRule) -> Result<(), NetfilterError> {
    let (
        Location::Nft {
            family,
            table,
            chain,
        },
        RuleId::Handle(handle),
    ) = (&rule.location, &rule.id)
    else {
        return Ok(());
    };
    let invocation = if survey.json {
        let batch = json!({"nftables": [{"delete": {"rule": {
            "family": family, "table": table, "chain": chain, "handle": handle
        }}}]});
        Invocation::new(&survey.tool, ["-j", "-f", "-"]).stdin(batch.to_string())
    } else {
        Invocation::new(
            &survey.tool,
            [
                "delete".to_owned(),
                "rule".to_owned(),
                plain(family)?.to_owned(),
                plain(table)?.to_owned(),
                plain(chain)?.to_owned(),
                "handle".to_owned(),
                handle.to_string(),
            ],
        )
    };
    invocation.run().map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"table ip filter { # handle 1
	chain FORWARD { # handle 1
		type filter hook forward priority filter; policy drop;
		oifname "br0" ct status dnat  counter packets 0 bytes 0 accept # handle 2
	}
}
table inet fw { # handle 2
	set blocked { # handle 5
		type ipv4_addr
		elements = { 10.0.0.1, 10.0.0.2 }
	}
	chain forward { # handle 1
		type filter hook forward priority filter; policy accept;
		oifname "br0" ct status dnat accept comment "portgate: delegate br0 to the eBPF gate" # handle 3
		ip saddr { 10.1.0.1, 10.1.0.2 } accept comment "mine" # handle 6
		counter packets 0 bytes 0 reject with icmpx admin-prohibited # handle 2
	}
	chain other { # handle 7
		accept # handle 8
	}
}
"#;

    #[test]
    fn parses_text_listing() {
        let chains = parse_text(TEXT).expect("parse");
        assert_eq!(chains.len(), 3);
        assert!(chains[0].managed_by_iptables());
        assert!(
            !chains[0].drops_forwarded(),
            "iptables-nft's chain is not ours to handle"
        );
        let forward = &chains[1];
        assert_eq!(
            (forward.family.as_str(), forward.table.as_str()),
            ("inet", "fw")
        );
        assert_eq!(
            forward.base.as_ref().map(|b| b.policy.as_str()),
            Some("accept")
        );
        assert_eq!(forward.rules.len(), 3);
        assert_eq!(forward.rules[0].handle, 3);
        assert_eq!(
            forward.rules[0].comment.as_deref(),
            Some("portgate: delegate br0 to the eBPF gate")
        );
        assert_eq!(forward.rules[1].comment.as_deref(), Some("mine"));
        assert!(forward.drops_forwarded(), "ends in an unconditional reject");
        assert!(chains[2].base.is_none());
        assert!(!chains[2].drops_forwarded());
    }

    #[test]
    fn parses_json_listing() {
        let text = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "inet", "name": "fw", "handle": 2}},
          {"chain": {"family": "inet", "table": "fw", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
          {"rule": {"family": "inet", "table": "fw", "chain": "forward", "handle": 3, "comment": "portgate: delegate br0 to the eBPF gate", "expr": [{"accept": null}]}},
          {"rule": {"family": "inet", "table": "fw", "chain": "forward", "handle": 2, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}]}"#;
        let chains = parse_json(text).expect("parse");
        assert_eq!(chains.len(), 1);
        assert!(chains[0].drops_forwarded());
        assert!(chains[0].rules[1].drops_everything);
        assert!(!chains[0].rules[0].drops_everything);
        assert_eq!(chains[0].rules[0].handle, 3);
    }

    #[test]
    fn the_rule_goes_after_the_hosts_rules() {
        let chains = parse_text(TEXT).expect("parse");
        let (targets, own) = place(&chains);
        assert_eq!(own.len(), 1);
        assert_eq!(targets.len(), 1);
        // Ours (handle 3) is before "mine": misplaced; the new one goes before the reject.
        assert_eq!(targets[0].position, Position::BeforeHandle(2));
        assert!(targets[0].placed.is_empty());

        let policy_drop = r#"table inet fw { # handle 2
	chain forward { # handle 1
		type filter hook forward priority filter; policy drop;
		ip saddr 10.1.0.1 drop # handle 4
		oifname "br0" ct status dnat accept comment "portgate: delegate br0 to the eBPF gate" # handle 3
	}
}
"#;
        let (targets, own) = place(&parse_text(policy_drop).expect("parse"));
        assert_eq!(targets[0].position, Position::End);
        assert_eq!(targets[0].placed, [0]);
        assert_eq!(own[0].id, RuleId::Handle(3));

        let early_drop = r#"table inet fw { # handle 2
	chain forward { # handle 1
		type filter hook forward priority filter; policy accept;
		drop # handle 5
		oifname "br0" ct status dnat accept comment "portgate: delegate br0 to the eBPF gate" # handle 3
		drop # handle 4
	}
}
"#;
        let (targets, _) = place(&parse_text(early_drop).expect("parse"));
        assert_eq!(targets[0].position, Position::BeforeHandle(5));
        assert!(targets[0].placed.is_empty());
        assert_eq!(targets[0].unreachable, [0]);
    }

    #[test]
    fn a_replies_rule_without_the_direction_is_replaced() {
        let text = r#"table inet fw { # handle 2
	chain forward { # handle 1
		type filter hook forward priority filter; policy drop;
		iifname "br0" ct status dnat accept comment "portgate: delegate br0 replies to the eBPF gate" # handle 3
		iifname "br1" ct status dnat ct direction reply accept comment "portgate: delegate br1 replies to the eBPF gate" # handle 4
	}
}
"#;
        let (targets, own) = place(&parse_text(text).expect("parse"));
        assert_eq!(own.len(), 2);
        assert_eq!(
            targets[0].placed,
            [1],
            "only the current form stays in place"
        );
    }
}
