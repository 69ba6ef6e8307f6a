//! The policy file (`/etc/portgate/policy.toml`), for hosts driven by config management:
//! sets, blocks and rules in the vocabulary of the command line. The agent reads it at
//! start, on SIGHUP and on `portgate reload`; a file that does not parse changes nothing.
//!
//! ```toml
//! block = ["203.0.113.0/24"]
//!
//! [sets]
//! office = ["192.0.2.0/24", "198.51.100.7"]
//!
//! [[allow]]
//! target = "web"
//! ports = "443/tcp"           # or: published = true, or: host_port = "8080/tcp"
//! from = ["office", "10.0.0.0/8"]
//! via = "wg0"
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{
    Access, PolicyError, Ports, Prefix, SourceSets, SourceSpec, Target, check_interface,
    is_set_name, rule_target,
};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the policy file {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}:{line}")]
    Invalid {
        path: PathBuf,
        line: usize,
        source: PolicyError,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    block: Vec<Prefix>,
    #[serde(default)]
    sets: BTreeMap<String, Vec<Prefix>>,
    #[serde(default)]
    allow: Vec<toml::Spanned<RawAllow>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    target: Option<String>,
    ports: Option<String>,
    #[serde(default)]
    published: bool,
    host_port: Option<String>,
    #[serde(default)]
    from: Vec<SourceSpec>,
    via: Option<String>,
}

/// One rule of the file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileRule {
    pub target: Target,
    pub ports: Ports,
    pub access: Access,
}

/// What the file says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilePolicy {
    pub path: PathBuf,
    pub sets: SourceSets,
    pub blocks: BTreeSet<Prefix>,
    pub rules: Vec<FileRule>,
}

impl FilePolicy {
    /// Reads and checks the file; a set name its rules use must be defined in the file or
    /// be one of `known_sets`.
    pub fn load(path: &Path, known_sets: &SourceSets) -> Result<Self, FileError> {
        let text = fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path, known_sets)
    }

    pub fn parse(text: &str, path: &Path, known_sets: &SourceSets) -> Result<Self, FileError> {
        let raw: Raw = toml::from_str(text).map_err(|err| FileError::Syntax {
            path: path.to_owned(),
            message: syntax_message(text, &err),
        })?;
        let invalid = |span_start: usize, source| FileError::Invalid {
            path: path.to_owned(),
            line: line_of(text, span_start),
            source,
        };
        let mut sets = SourceSets::new();
        for (name, prefixes) in raw.sets {
            if !is_set_name(&name) {
                let at = text.find(&name).unwrap_or(0);
                return Err(invalid(at, PolicyError::Prefix(name)));
            }
            sets.insert(name, prefixes.into_iter().collect());
        }
        let mut rules = Vec::new();
        for item in raw.allow {
            let start = item.span().start;
            let allow = item.into_inner();
            let (target, ports) = rule_target(
                allow.target.as_deref(),
                allow.ports.as_deref(),
                allow.published,
                allow.host_port.as_deref(),
            )
            .map_err(|err| invalid(start, err))?;
            if let Some(via) = &allow.via {
                check_interface(via).map_err(|err| invalid(start, err))?;
            }
            for spec in &allow.from {
                if let SourceSpec::Set(name) = spec
                    && !sets.contains_key(name)
                    && !known_sets.contains_key(name)
                {
                    return Err(invalid(start, PolicyError::NoSuchSet(name.clone())));
                }
            }
            rules.push(FileRule {
                target,
                ports,
                access: Access {
                    from: allow.from,
                    via: allow.via,
                    expires: None,
                },
            });
        }
        Ok(Self {
            path: path.to_owned(),
            sets,
            blocks: raw.block.into_iter().collect(),
            rules,
        })
    }
}

/// The parser's message with the line it points at (toml's own message spans lines).
fn syntax_message(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim().to_owned();
    match err.span() {
        Some(span) => format!("line {}: {message}", line_of(text, span.start)),
        None => message,
    }
}

/// The 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |before| before.matches('\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
block = ["203.0.113.0/24"]

[sets]
office = ["192.0.2.0/24", "198.51.100.7"]

[[allow]]
target = "web"
ports = "443/tcp"
from = ["office", "10.0.0.0/8"]
via = "wg0"

[[allow]]
host_port = "8080/tcp"
"#;

    #[test]
    fn the_example_parses() {
        let policy =
            FilePolicy::parse(EXAMPLE, Path::new("p.toml"), &SourceSets::new()).expect("parses");
        assert_eq!(policy.sets["office"].len(), 2);
        assert_eq!(policy.blocks.len(), 1);
        assert_eq!(policy.rules.len(), 2);
        assert_eq!(policy.rules[0].access.via.as_deref(), Some("wg0"));
        assert!(matches!(
            policy.rules[1].target,
            Target::HostPort { port: 8080, .. }
        ));
    }

    #[test]
    fn the_packaged_example_parses() {
        let text = include_str!("../../../packaging/examples/policy.toml");
        let policy = FilePolicy::parse(text, Path::new("policy.toml"), &SourceSets::new())
            .expect("the example parses");
        assert_eq!(policy.rules.len(), 3);
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "[[allow]]\ntarget = \"web\"\nports = \"99999\"\n",
                "p.toml:1",
            ),
            ("block = [\"10.0.0.1/8\"]\n", "line 1"),
            (
                "\n\n[[allow]]\ntarget = \"web\"\nports = \"80\"\nfrom = [\"nowhere\"]\n",
                "p.toml:3",
            ),
            ("[[allow]]\ntarget = \"web\"\nport = \"80\"\n", "line 3"),
            ("[sets\n", "line 1"),
        ];
        for (text, expected) in cases {
            let err =
                FilePolicy::parse(text, Path::new("p.toml"), &SourceSets::new()).expect_err(text);
            let shown = format!("{:#}", anyhow::Error::from(err));
            assert!(shown.contains(expected), "{text:?}: {shown}");
        }
    }
}
