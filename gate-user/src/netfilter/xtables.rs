//! The iptables backends: `iptables-legacy`, `iptables-nft` and their ip6tables twins, always
//! in the `filter` table.

use std::{collections::BTreeSet, path::Path};

use tracing::{debug, warn};

use super::{
    Location, NetfilterError, OwnRule, Position, RuleId, Scope, Slot, Survey, Target,
    bridge_of_comment, comment_for,
    exec::{Invocation, find_binary},
    layout, split_key,
};

/// One iptables binary and how to tell, without side effects, that it has no tables at all.
#[derive(Debug)]
pub(super) struct Xtables {
    /// Also the binary's name, and the backend's name in statuses.
    pub(super) name: &'static str,
    /// A plain `iptables` (hosts with iptables before 1.8, which has neither variant) is
    /// used only when none of these exist.
    only_without: &'static [&'static str],
    /// For the legacy backends: the /proc/net file listing the tables that exist in this
    /// network namespace. Listing a legacy table that does not exist creates it (and makes
    /// every `iptables-nft` call warn "iptables-legacy tables present"), so it is checked
    /// first and the binary is not run at all when the filter table is absent.
    legacy_tables: Option<&'static str>,
}

pub(super) const BACKENDS: [Xtables; 6] = [
    Xtables {
        name: "iptables-legacy",
        only_without: &[],
        legacy_tables: Some("ip_tables_names"),
    },
    Xtables {
        name: "iptables-nft",
        only_without: &[],
        legacy_tables: None,
    },
    Xtables {
        name: "iptables",
        only_without: &["iptables-legacy", "iptables-nft"],
        legacy_tables: None,
    },
    Xtables {
        name: "ip6tables-legacy",
        only_without: &[],
        legacy_tables: Some("ip6_tables_names"),
    },
    Xtables {
        name: "ip6tables-nft",
        only_without: &[],
        legacy_tables: None,
    },
    Xtables {
        name: "ip6tables",
        only_without: &["ip6tables-legacy", "ip6tables-nft"],
        legacy_tables: None,
    },
];

/// iptables' exit status when the kernel lacks the table or its module ("can't initialize
/// iptables table"): this backend does not exist here.
const VERSION_PROBLEM: i32 = 3;

pub(super) const DOCKER_USER: &str = "DOCKER-USER";
const FORWARD: &str = "FORWARD";
/// How long to wait for the xtables lock another iptables process holds (legacy only).
const WAIT_SECONDS: &str = "5";

/// The rule's match and target, after `-I CHAIN N` / `-C CHAIN` / `-D CHAIN`; also exactly
/// how `-S` prints it back. The replies rule matches the reply direction only
/// (`--ctdir REPLY`): `--ctstate DNAT` alone would also accept a container's own connection
/// to a port forward of the host's that leads elsewhere.
pub(super) fn rule_spec(key: &str) -> Vec<String> {
    let (bridge, replies) = split_key(key);
    let comment = comment_for(key);
    let mut spec = vec![
        if replies { "-i" } else { "-o" },
        bridge,
        "-m",
        "conntrack",
        "--ctstate",
        "DNAT",
    ];
    if replies {
        spec.extend(["--ctdir", "REPLY"]);
    }
    spec.extend(["-m", "comment", "--comment", &comment, "-j", "ACCEPT"]);
    spec.into_iter().map(str::to_owned).collect()
}

fn invocation<'a>(tool: &'a Path, args: impl IntoIterator<Item = String>) -> Invocation<'a> {
    let mut all = vec![
        "-w".to_owned(),
        WAIT_SECONDS.to_owned(),
        "-t".to_owned(),
        "filter".to_owned(),
    ];
    all.extend(args);
    Invocation::new(tool, all)
}

/// Whether the legacy `filter` table exists in the calling thread's network namespace.
fn legacy_filter_exists(names_file: &str) -> bool {
    // thread-self, not self: the caller may be a thread that entered another namespace.
    ["/proc/thread-self/net", "/proc/self/net"]
        .iter()
        .map(|dir| Path::new(dir).join(names_file))
        .find_map(|path| std::fs::read_to_string(path).ok())
        .is_some_and(|names| names.lines().any(|name| name.trim() == "filter"))
}

/// What this backend's `filter` table says: where the rule belongs (nowhere when FORWARD
/// would not drop) and every rule that carries a portgate comment. None when the backend is
/// absent (no binary, no legacy table, or a table only the `nft` tool can read).
pub(super) fn survey(backend: &Xtables) -> Result<Option<Survey>, NetfilterError> {
    if backend
        .only_without
        .iter()
        .any(|other| find_binary(other).is_some())
    {
        return Ok(None);
    }
    let Some(tool) = find_binary(backend.name) else {
        return Ok(None);
    };
    if let Some(names_file) = backend.legacy_tables
        && !legacy_filter_exists(names_file)
    {
        return Ok(None);
    }
    let list = invocation(&tool, ["-S".to_owned()]);
    let output = list.output()?;
    if !output.status.success() {
        let error = list.failed(&output);
        if String::from_utf8_lossy(&output.stderr).contains("incompatible") {
            // The table was made with `nft` and is handled (natively) by the nftables backend.
            warn!(backend = backend.name, %error, "table not readable by iptables; skipped");
            return Ok(None);
        }
        if output.status.code() == Some(VERSION_PROBLEM) {
            debug!(backend = backend.name, %error, "not available in this kernel; skipped");
            return Ok(None);
        }
        return Err(error);
    }
    let listing = parse_listing(&String::from_utf8_lossy(&output.stdout)).map_err(|detail| {
        NetfilterError::Parse {
            command: list.display(),
            detail,
        }
    })?;
    Ok(Some(Survey {
        tool,
        json: false,
        targets: listing.targets(),
        own: listing.own,
    }))
}

/// The parts of `iptables -S` that matter here.
#[derive(Debug, Default)]
pub(super) struct Listing {
    forward_policy: Option<String>,
    chains: Vec<String>,
    /// Every rule of the table, in order: its chain, its tokens after `-A CHAIN`, and its
    /// index in `own` when it is ours.
    rules: Vec<(String, Vec<String>, Option<usize>)>,
    pub(super) own: Vec<OwnRule>,
}

/// The verdict of a rule that matches every packet (`-j TARGET` with nothing before it but
/// comments), e.g. "DROP" for `-j DROP` or "REJECT" for `-j REJECT --reject-with ...`.
fn unconditional(spec: &[String]) -> Option<&str> {
    let mut rest = spec;
    while let [m, comment, option, _, tail @ ..] = rest
        && m == "-m"
        && comment == "comment"
        && option == "--comment"
    {
        rest = tail;
    }
    match rest {
        [j, target, ..] if j == "-j" => Some(target),
        _ => None,
    }
}

impl Listing {
    fn chain_rules<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a [String]> + 'a {
        self.rules
            .iter()
            .filter(move |(name, _, _)| name == chain)
            .map(|(_, spec, _)| spec.as_slice())
    }

    /// Whether a packet that no earlier rule accepts ends up dropped in FORWARD: a DROP
    /// policy, or an unconditional DROP/REJECT as FORWARD's last rule (firewalld's iptables
    /// backend, hand-written firewalls).
    pub(super) fn forward_drops(&self) -> bool {
        let last_drops = self
            .chain_rules(FORWARD)
            .last()
            .is_some_and(|rule| matches!(unconditional(rule), Some("DROP" | "REJECT")));
        self.forward_policy.as_deref() == Some("DROP") || last_drops
    }

    /// DOCKER-USER when it exists and FORWARD jumps to it (Docker owns FORWARD and keeps that
    /// jump first), FORWARD otherwise. A DOCKER-USER that FORWARD no longer reaches (Docker
    /// stopped and its rules were flushed) would make the rule useless.
    pub(super) fn target_chain(&self) -> &'static str {
        let jumps = self
            .chain_rules(FORWARD)
            .any(|rule| matches!(rule, [j, chain] if j == "-j" && chain == DOCKER_USER));
        if jumps && self.chains.iter().any(|chain| chain == DOCKER_USER) {
            DOCKER_USER
        } else {
            FORWARD
        }
    }

    /// The bridges Docker's own rules send to its `DOCKER` chain (`-o <bridge> -j DOCKER`:
    /// in FORWARD for Docker 20.10, in DOCKER-BRIDGE for Docker 28): Docker's bridges, whose
    /// published ports Docker accepts before any rule an operator appends to FORWARD.
    pub(super) fn docker_bridges(&self) -> BTreeSet<String> {
        self.rules
            .iter()
            .filter(|(_, spec, _)| spec.ends_with(&["-j".to_owned(), "DOCKER".to_owned()]))
            .filter_map(|(_, spec, _)| {
                let at = spec.iter().position(|word| word == "-o")?;
                let negated = at > 0 && spec[at - 1] == "!";
                (!negated).then(|| spec.get(at + 1).cloned()).flatten()
            })
            .collect()
    }

    /// The target chains and where the rule goes in each. Docker's bridges get it in
    /// DOCKER-USER (Docker's place for a host's rules: Docker's own ACCEPTs precede anything
    /// appended to FORWARD anyway); every other bridge in FORWARD, after every rule of the
    /// host's, so that an operator's DROP in FORWARD (or ufw's chains) still holds for
    /// Podman's or hand-made bridges on a host that also runs Docker.
    fn targets(&self) -> Vec<Target> {
        if !self.forward_drops() {
            return Vec::new();
        }
        if self.target_chain() == FORWARD {
            return vec![self.target(FORWARD, Scope::All)];
        }
        let docker = self.docker_bridges();
        vec![
            self.target(DOCKER_USER, Scope::Only(docker.clone())),
            self.target(FORWARD, Scope::Except(docker)),
        ]
    }

    /// Where the rule goes in `chain`. DOCKER-USER ends in Docker's unconditional
    /// `-j RETURN` (Docker 28 may leave it empty); a DROP or REJECT there is the host's own
    /// rule and comes first. In FORWARD the final DROP/REJECT stands for the policy
    /// (firewalld), which is what the rule replaces for published ports.
    fn target(&self, chain: &str, scope: Scope) -> Target {
        let terminal: &[&str] = if chain == DOCKER_USER {
            &["RETURN"]
        } else {
            &["RETURN", "DROP", "REJECT"]
        };
        let slots: Vec<Slot> = self
            .rules
            .iter()
            .filter(|(name, _, _)| name == chain)
            .map(|(_, spec, own)| Slot {
                own: *own,
                terminal: unconditional(spec).is_some_and(|verdict| terminal.contains(&verdict)),
            })
            .collect();
        let (at, placed, unreachable) = layout(&slots);
        Target {
            location: Location::Chain(chain.to_owned()),
            position: at.map_or(Position::End, |i| Position::BeforeNumber(i + 1)),
            placed,
            unreachable,
            scope,
        }
    }
}

pub(super) fn parse_listing(text: &str) -> Result<Listing, String> {
    let mut listing = Listing::default();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
    {
        let tokens = split_words(line).map_err(|e| format!("{e} in line {line:?}"))?;
        match tokens.as_slice() {
            [p, chain, policy] if p == "-P" && chain == FORWARD => {
                listing.forward_policy = Some(policy.clone());
            }
            [n, chain] if n == "-N" => listing.chains.push(chain.clone()),
            [a, chain, rest @ ..] if a == "-A" => {
                let ours = rest
                    .windows(2)
                    .find(|pair| pair[0] == "--comment")
                    .and_then(|pair| bridge_of_comment(&pair[1]));
                let own = ours.map(|bridge| {
                    listing.own.push(OwnRule {
                        location: Location::Chain(chain.clone()),
                        bridge,
                        id: RuleId::Spec(rest.to_vec()),
                    });
                    listing.own.len() - 1
                });
                listing.rules.push((chain.clone(), rest.to_vec(), own));
            }
            _ => {}
        }
    }
    Ok(listing)
}

/// Splits a line of `iptables -S` into words: whitespace separates, double quotes group and
/// a backslash escapes the next character inside them (how iptables quotes comments).
pub(super) fn split_words(line: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        None => return Err("unterminated quote"),
                        Some('"') => break,
                        Some('\\') => word.push(chars.next().ok_or("unterminated escape")?),
                        Some(other) => word.push(other),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            other => {
                in_word = true;
                word.push(other);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// `-C`: whether the exact rule is in `chain`.
pub(super) fn check(survey: &Survey, chain: &str, bridge: &str) -> Result<bool, NetfilterError> {
    let mut args = vec!["-C".to_owned(), chain.to_owned()];
    args.extend(rule_spec(bridge));
    let check = invocation(&survey.tool, args);
    let output = check.output()?;
    match output.status.code() {
        Some(0) => Ok(true),
        // "Bad rule (does a matching rule exist in that chain?)" or no such chain.
        Some(1) => Ok(false),
        _ => Err(check.failed(&output)),
    }
}

/// `-I CHAIN N` before the terminal rule, or `-A CHAIN`: after the host's own rules.
pub(super) fn insert(
    survey: &Survey,
    chain: &str,
    position: Position,
    bridge: &str,
) -> Result<(), NetfilterError> {
    let mut args = match position {
        Position::BeforeNumber(number) => {
            vec!["-I".to_owned(), chain.to_owned(), number.to_string()]
        }
        Position::End | Position::BeforeHandle(_) => vec!["-A".to_owned(), chain.to_owned()],
    };
    args.extend(rule_spec(bridge));
    invocation(&survey.tool, args).run().map(drop)
}

/// `-D CHAIN <the rule exactly as listed>`: deletes by full specification, comment included,
/// so it can only ever remove a rule identical to ours (never by position, which a
/// concurrent change could shift onto someone else's rule).
pub(super) fn delete(survey: &Survey, rule: &OwnRule) -> Result<(), NetfilterError> {
    let (Location::Chain(chain), RuleId::Spec(spec)) = (&rule.location, &rule.id) else {
        return Ok(());
    };
    let mut args = vec!["-D".to_owned(), chain.clone()];
    args.extend(spec.iter().cloned());
    invocation(&survey.tool, args).run().map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_quoted_comments() {
        let words =
            split_words(r#"-A FORWARD -m comment --comment "a \"b\" c" -j ACCEPT"#).expect("split");
        assert_eq!(
            words,
            [
                "-A",
                "FORWARD",
                "-m",
                "comment",
                "--comment",
                "a \"b\" c",
                "-j",
                "ACCEPT"
            ]
        );
        assert!(split_words(r#"-A "x"#).is_err());
    }

    #[test]
    fn reads_a_docker_host() {
        let text = r#"-P INPUT ACCEPT
-P FORWARD DROP
-P OUTPUT ACCEPT
-N DOCKER
-N DOCKER-USER
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -j DOCKER
-A DOCKER-USER -o docker0 -m conntrack --ctstate DNAT -m comment --comment "portgate: delegate docker0 to the eBPF gate" -j ACCEPT
-A DOCKER-USER -m comment --comment "someone else" -j ACCEPT
-A DOCKER-USER -j RETURN
"#;
        let listing = parse_listing(text).expect("parse");
        assert!(listing.forward_drops());
        assert_eq!(listing.target_chain(), DOCKER_USER);
        assert_eq!(listing.own.len(), 1);
        assert_eq!(listing.own[0].bridge, "docker0");
        assert_eq!(listing.own[0].id, RuleId::Spec(rule_spec("docker0")));
        // Ours is before someone else's rule: misplaced; it belongs before the RETURN.
        let targets = listing.targets();
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].location, Location::Chain(DOCKER_USER.to_owned()));
        assert_eq!(targets[0].position, Position::BeforeNumber(3));
        assert!(targets[0].placed.is_empty());
        // Docker's bridge there, every other bridge in FORWARD (after the host's rules).
        assert!(targets[0].scope.holds("docker0"));
        assert!(!targets[0].scope.holds("podman0"));
        assert_eq!(targets[1].location, Location::Chain(FORWARD.to_owned()));
        assert!(targets[1].scope.holds("podman0"));
        assert!(targets[1].scope.holds("podman0/replies"));
        assert!(!targets[1].scope.holds("docker0"));
        assert_eq!(targets[1].position, Position::End);
    }

    #[test]
    fn docker_bridges_are_those_docker_routes_to_its_chain() {
        let text = "-P FORWARD DROP\n-N DOCKER\n-N DOCKER-BRIDGE\n-N DOCKER-USER\n\
-A FORWARD -j DOCKER-USER\n-A FORWARD -o docker0 -j DOCKER\n\
-A DOCKER-BRIDGE -o br-0123456789ab -j DOCKER\n-A FORWARD ! -o podman0 -j DOCKER\n\
-A FORWARD -o podman0 -j ACCEPT\n";
        let listing = parse_listing(text).expect("parse");
        assert_eq!(
            listing.docker_bridges(),
            BTreeSet::from(["docker0".to_owned(), "br-0123456789ab".to_owned()])
        );
    }

    /// The first target: DOCKER-USER where Docker owns FORWARD, else FORWARD.
    fn target_of(text: &str) -> Target {
        let mut targets = parse_listing(text).expect("parse").targets();
        assert!(!targets.is_empty(), "{text}");
        targets.remove(0)
    }

    #[test]
    fn the_rule_goes_after_the_hosts_rules() {
        let ours = r#"-o br0 -m conntrack --ctstate DNAT -m comment --comment "portgate: delegate br0 to the eBPF gate" -j ACCEPT"#;
        let docker = "-P FORWARD DROP\n-N DOCKER-USER\n-A FORWARD -j DOCKER-USER\n";
        // Before Docker's RETURN, after the host's DROP.
        let placed = target_of(&format!(
            "{docker}-A DOCKER-USER -s 10.0.0.1/32 -j DROP\n-A DOCKER-USER {ours}\n-A DOCKER-USER -j RETURN\n"
        ));
        assert_eq!(placed.position, Position::BeforeNumber(3));
        assert_eq!(placed.placed, [0]);
        // Docker 28: an empty DOCKER-USER; a DROP there is the host's, so ours goes after it.
        assert_eq!(target_of(docker).position, Position::End);
        let after_drop = target_of(&format!("{docker}-A DOCKER-USER -j DROP\n"));
        assert_eq!(after_drop.position, Position::End);
        // FORWARD: before firewalld's final REJECT (a comment does not make it conditional).
        let firewalld = target_of(
            "-P FORWARD ACCEPT\n-A FORWARD -s 10.0.0.1/32 -j DROP\n-A FORWARD -m comment --comment \"deny\" -j REJECT --reject-with icmp-host-prohibited\n",
        );
        assert_eq!(firewalld.position, Position::BeforeNumber(2));
        // Policy DROP: at the end; a rule of the host's after ours means ours must move.
        let moved = target_of(&format!(
            "-P FORWARD DROP\n-A FORWARD {ours}\n-A FORWARD -s 10.0.0.1/32 -j DROP\n"
        ));
        assert_eq!(moved.position, Position::End);
        assert!(moved.placed.is_empty());
        // Past a RETURN nothing is reached: that copy is unreachable.
        let dead = target_of(&format!(
            "{docker}-A DOCKER-USER -j RETURN\n-A DOCKER-USER {ours}\n-A DOCKER-USER -j RETURN\n"
        ));
        assert_eq!(dead.position, Position::BeforeNumber(1));
        assert_eq!(dead.unreachable, [0]);
    }

    #[test]
    fn policy_accept_needs_nothing_unless_forward_ends_in_a_drop() {
        let accept = parse_listing("-P FORWARD ACCEPT\n-A FORWARD -i x -j DROP\n").expect("parse");
        assert!(!accept.forward_drops());
        let reject = parse_listing(
            "-P FORWARD ACCEPT\n-A FORWARD -j REJECT --reject-with icmp-host-prohibited\n",
        )
        .expect("parse");
        assert!(reject.forward_drops());
        assert_eq!(reject.target_chain(), FORWARD);
        // DOCKER-USER that FORWARD does not reach is not used.
        let stale = parse_listing("-P FORWARD DROP\n-N DOCKER-USER\n").expect("parse");
        assert_eq!(stale.target_chain(), FORWARD);
    }
}
