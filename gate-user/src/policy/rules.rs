//! The saved allow rules: one rule, and the set of them with stable ids (what `allow` and
//! `deny` change and the rules file holds).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::*;

/// One allow rule: new connections to `target` on `ports` may pass, from whom `access` says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Stable while the rule exists; indexes the per-rule counters.
    pub id: u32,
    pub target: Target,
    pub ports: Ports,
    #[serde(flatten)]
    pub access: Access,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}{}", self.target, self.ports, self.access)
    }
}

/// The set of allow rules, kept in id order; ids are below its limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// How many rules it may hold (the agent's `--max-rules`).
    #[serde(skip, default = "default_limit")]
    limit: u32,
}

fn default_limit() -> u32 {
    DEFAULT_SAVED_RULES
}

impl Default for RuleSet {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl RuleSet {
    pub fn new(mut rules: Vec<Rule>) -> Self {
        rules.sort_by_key(|r| r.id);
        Self {
            rules,
            limit: DEFAULT_SAVED_RULES,
        }
    }

    /// The same rules, limited to `limit` (ids `0..limit`).
    pub fn with_limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self
    }

    /// The highest rule id, if any rule.
    pub fn max_id(&self) -> Option<u32> {
        self.rules.last().map(|r| r.id)
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Adds a rule; returns its id. Refused when one rule with the same sources and
    /// interface already covers all of it; if only its expiry differs, the expiry is updated
    /// (a temporary rule renewed, or made permanent).
    pub fn allow(
        &mut self,
        target: Target,
        ports: Ports,
        access: Access,
    ) -> Result<u32, PolicyError> {
        if matches!((&target, ports), (Target::Address(_), Ports::Published)) {
            return Err(PolicyError::PublishedNeedsContainer);
        }
        let covering = self.rules.iter_mut().find(|r| {
            r.target == target
                && r.access.same_reach(&access)
                && match (r.ports, ports) {
                    (Ports::Spec(have), Ports::Spec(want)) => have.contains(&want),
                    (have, want) => have == want,
                }
        });
        if let Some(rule) = covering {
            if rule.access.expires == access.expires {
                return Err(PolicyError::AlreadyAllowed(format!(
                    "{target} {ports}{access}"
                )));
            }
            rule.access.expires = access.expires;
            return Ok(rule.id);
        }
        let id = self
            .free_id()
            .ok_or(PolicyError::TooManyRules { limit: self.limit })?;
        let mut next = self.clone();
        next.rules.push(Rule {
            id,
            target,
            ports,
            access,
        });
        next.rules.sort_by_key(|r| r.id);
        next.check_capacity()?;
        *self = next;
        Ok(id)
    }

    /// Removes `ports` on `target` from every rule that covers part of it, splitting ranges.
    /// Returns the ids of the rules removed (the first piece of a split keeps its id).
    pub fn deny(&mut self, target: &Target, ports: Ports) -> Result<Vec<u32>, PolicyError> {
        let mut next = Vec::with_capacity(self.rules.len() + 1);
        let mut removed = Vec::new();
        let mut touched = false;
        let mut pending_split = Vec::new();
        for rule in &self.rules {
            let spec = match (rule.ports, ports) {
                _ if rule.target != *target => None,
                (Ports::Spec(have), Ports::Spec(want)) if have.overlaps(&want) => {
                    Some((have, want))
                }
                (Ports::Published, Ports::Published) => {
                    touched = true;
                    removed.push(rule.id);
                    continue;
                }
                _ => None,
            };
            let Some((have, want)) = spec else {
                next.push(rule.clone());
                continue;
            };
            touched = true;
            let below = (have.port_start < want.port_start).then(|| PortSpec {
                port_end: want.port_start - 1,
                ..have
            });
            let above = (have.port_end > want.port_end).then(|| PortSpec {
                port_start: want.port_end + 1,
                ..have
            });
            match (below, above) {
                (None, None) => removed.push(rule.id),
                (Some(keep), None) | (None, Some(keep)) => {
                    next.push(Rule {
                        ports: Ports::Spec(keep),
                        ..rule.clone()
                    });
                }
                (Some(below), Some(above)) => {
                    next.push(Rule {
                        ports: Ports::Spec(below),
                        ..rule.clone()
                    });
                    pending_split.push((rule.target.clone(), above, rule.access.clone()));
                }
            }
        }
        if !touched {
            return Err(PolicyError::NotAllowed(format!("{target} {ports}")));
        }
        let mut result = RuleSet::new(next).with_limit(self.limit);
        for (target, spec, access) in pending_split {
            let id = result
                .free_id()
                .ok_or(PolicyError::TooManyRules { limit: self.limit })?;
            result.rules.push(Rule {
                id,
                target,
                ports: Ports::Spec(spec),
                access,
            });
            result.rules.sort_by_key(|r| r.id);
        }
        *self = result;
        Ok(removed)
    }

    /// Removes the rules whose time is up at `now` (Unix seconds); returns their ids.
    pub fn expire(&mut self, now: u64) -> Vec<u32> {
        let (gone, kept): (Vec<Rule>, Vec<Rule>) = std::mem::take(&mut self.rules)
            .into_iter()
            .partition(|r| r.access.is_due(now));
        self.rules = kept;
        gone.into_iter().map(|r| r.id).collect()
    }

    /// Whether some rule's time is up at `now`.
    pub fn any_due(&self, now: u64) -> bool {
        self.rules.iter().any(|r| r.access.is_due(now))
    }

    /// The ids of the rules whose sources name the set `name`.
    pub fn using_set(&self, name: &str) -> Vec<u32> {
        self.rules
            .iter()
            .filter(|r| {
                r.access
                    .from
                    .iter()
                    .any(|s| matches!(s, SourceSpec::Set(set) if set == name))
            })
            .map(|r| r.id)
            .collect()
    }

    fn free_id(&self) -> Option<u32> {
        // Rules are sorted by id: the first gap is free.
        let mut candidate = 0;
        for rule in &self.rules {
            if rule.id != candidate {
                break;
            }
            candidate += 1;
        }
        (candidate < self.limit).then_some(candidate)
    }

    fn check_capacity(&self) -> Result<(), PolicyError> {
        let needed: usize = self
            .rules
            .iter()
            .map(|r| match r.ports {
                Ports::Spec(spec) => spec.len(),
                Ports::Published => 0,
            })
            .sum();
        if needed > ALLOW_CAPACITY as usize {
            return Err(PolicyError::TooManyEntries { needed });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Ports {
        Ports::Spec(s.parse().expect("valid spec"))
    }

    fn target(s: &str) -> Target {
        s.parse().expect("valid target")
    }

    impl RuleSet {
        fn allow_any(&mut self, target: Target, ports: Ports) -> Result<u32, PolicyError> {
            self.allow(target, ports, Access::default())
        }
    }

    #[test]
    fn rules_with_other_sources_are_other_rules_and_expire() {
        let mut rules = RuleSet::default();
        let from = |s: &str| Access {
            from: vec![s.parse().expect("source")],
            ..Access::default()
        };
        assert_eq!(
            rules.allow(target("web"), spec("80"), from("10.0.0.0/8")),
            Ok(0)
        );
        assert_eq!(
            rules.allow(target("web"), spec("80"), from("office")),
            Ok(1)
        );
        assert!(matches!(
            rules.allow(target("web"), spec("80"), from("10.0.0.0/8")),
            Err(PolicyError::AlreadyAllowed(_))
        ));
        assert_eq!(rules.using_set("office"), [1]);
        let temporary = Access {
            expires: Some(100),
            ..from("10.0.0.0/8")
        };
        assert_eq!(
            rules.allow(target("web"), spec("80"), temporary),
            Ok(0),
            "renewed"
        );
        assert_eq!(rules.expire(99), Vec::<u32>::new());
        assert_eq!(rules.expire(100), [0]);
        assert_eq!(rules.rules().len(), 1);
    }

    #[test]
    fn allow_assigns_ids_and_refuses_duplicates() {
        let mut rules = RuleSet::default();
        assert_eq!(rules.allow_any(target("10.0.0.2"), spec("80")), Ok(0));
        assert_eq!(rules.allow_any(target("10.0.0.2"), spec("443")), Ok(1));
        assert!(matches!(
            rules.allow_any(target("10.0.0.2"), spec("80/tcp")),
            Err(PolicyError::AlreadyAllowed(_))
        ));
        // Same port, other protocol or target: a different rule.
        assert_eq!(rules.allow_any(target("10.0.0.2"), spec("80/udp")), Ok(2));
        assert_eq!(rules.allow_any(target("fd00::2"), spec("80")), Ok(3));
        assert_eq!(rules.allow_any(target("web"), spec("80")), Ok(4));
        assert_eq!(rules.allow_any(target("web"), Ports::Published), Ok(5));
        assert!(matches!(
            rules.allow_any(target("web"), Ports::Published),
            Err(PolicyError::AlreadyAllowed(_))
        ));
        assert_eq!(
            rules.allow_any(target("10.0.0.2"), Ports::Published),
            Err(PolicyError::PublishedNeedsContainer)
        );
    }

    #[test]
    fn deny_splits_ranges_and_frees_ids() {
        let mut rules = RuleSet::default();
        rules
            .allow_any(target("10.0.0.2"), spec("8000-8002"))
            .expect("allow");
        assert_eq!(rules.deny(&target("10.0.0.2"), spec("8001")), Ok(vec![]));
        let specs: Vec<String> = rules.rules().iter().map(|r| r.ports.to_string()).collect();
        assert_eq!(specs, ["8000/tcp", "8002/tcp"]);
        assert_eq!(
            rules.deny(&target("10.0.0.2"), spec("8000-8002")),
            Ok(vec![0, 1])
        );
        assert!(rules.rules().is_empty());
        assert!(matches!(
            rules.deny(&target("10.0.0.2"), spec("80")),
            Err(PolicyError::NotAllowed(_))
        ));
        assert_eq!(rules.allow_any(target("10.0.0.2"), spec("80")), Ok(0));
        rules
            .allow_any(target("web"), Ports::Published)
            .expect("allow");
        assert!(matches!(
            rules.deny(&target("web"), spec("80")),
            Err(PolicyError::NotAllowed(_))
        ));
        assert_eq!(rules.deny(&target("web"), Ports::Published), Ok(vec![1]));
    }

    #[test]
    fn the_limit_refuses_one_more_rule_in_one_line_and_changes_nothing() {
        let mut rules = RuleSet::default().with_limit(2);
        assert_eq!(rules.allow_any(target("10.0.0.2"), spec("80")), Ok(0));
        assert_eq!(rules.allow_any(target("10.0.0.3"), spec("80")), Ok(1));
        let before = rules.clone();
        let err = rules
            .allow_any(target("10.0.0.4"), spec("80"))
            .expect_err("full");
        assert_eq!(err, PolicyError::TooManyRules { limit: 2 });
        let message = err.to_string();
        assert!(
            message.contains("--max-rules") && !message.contains('\n'),
            "{message}"
        );
        assert_eq!(rules, before);
        // A deny that splits a range needs a slot too: refused alike.
        let mut ranges = RuleSet::default().with_limit(1);
        ranges
            .allow_any(target("10.0.0.2"), spec("80-82"))
            .expect("allow");
        let before = ranges.clone();
        assert_eq!(
            ranges.deny(&target("10.0.0.2"), spec("81")),
            Err(PolicyError::TooManyRules { limit: 1 })
        );
        assert_eq!(ranges, before);
        assert_eq!(ranges.max_id(), Some(0));
    }

    #[test]
    fn failed_changes_leave_rules_unchanged() {
        let mut rules = RuleSet::default();
        for last in 2..=5 {
            rules
                .allow_any(target(&format!("10.0.0.{last}")), spec("1-65535"))
                .expect("allow");
        }
        let before = rules.clone();
        assert!(matches!(
            rules.allow_any(target("10.0.0.6"), spec("1-100")),
            Err(PolicyError::TooManyEntries { .. })
        ));
        assert_eq!(rules, before);
    }
}
