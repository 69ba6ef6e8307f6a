//! Rules on disk: one JSON file, replaced atomically (write a temporary file, fsync, rename).
//! A file that cannot be read is an error for the operator, never silently replaced.

use std::{
    collections::BTreeSet,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{Denials, Prefix, Rule, RuleSet, SourceSets};

/// Version 2 added sources, interfaces, expiry, sets and blocks. An older portgate would read
/// a rule with sources as one without (unknown fields are ignored) and open it to everyone,
/// so it must refuse the file instead: every save writes version 2 or later.
const FORMAT_VERSION: u32 = 2;
/// Version 3 added denials (`portgate deny` of what a label opens). An older portgate would
/// ignore them and open what the operator closed, so a file with denials is version 3; one
/// without stays version 2, which an older portgate still reads.
const DENIALS_VERSION: u32 = 3;
/// Versions this portgate reads (1: rules only).
const READABLE_VERSIONS: [u32; 3] = [1, 2, 3];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read rules from {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "rules file {path} is corrupt ({source}); fix or move it away, portgate will not overwrite it"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "rules file {path} has format version {found}; this portgate reads versions 1 to {DENIALS_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write rules to {path}")]
    Write { path: PathBuf, source: io::Error },
}

#[derive(Serialize, Deserialize)]
struct RulesFile {
    version: u32,
    rules: Vec<Rule>,
    #[serde(default)]
    sets: SourceSets,
    #[serde(default)]
    blocks: BTreeSet<Prefix>,
    #[serde(default, skip_serializing_if = "Denials::is_empty")]
    denials: Denials,
}

/// What `portgate allow`, `set` and `block` saved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    pub rules: RuleSet,
    pub sets: SourceSets,
    /// Sources never admitted.
    pub blocks: BTreeSet<Prefix>,
    /// What `portgate deny` closed that containers' labels or the default policy open.
    pub denials: Denials,
}

/// The rules file in a state directory.
pub struct RuleStore {
    path: PathBuf,
}

impl RuleStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("rules.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved rules, sets and blocks; none if the file does not exist yet.
    pub fn load(&self) -> Result<Saved, StoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Saved::default()),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let file: RulesFile =
            serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        if !READABLE_VERSIONS.contains(&file.version) {
            return Err(StoreError::Version {
                path: self.path.clone(),
                found: file.version,
            });
        }
        Ok(Saved {
            rules: RuleSet::new(file.rules),
            sets: file.sets,
            blocks: file.blocks,
            denials: file.denials,
        })
    }

    pub fn save(&self, saved: &Saved) -> Result<(), StoreError> {
        let write_err = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(write_err)?;
        let file = RulesFile {
            version: if saved.denials.is_empty() {
                FORMAT_VERSION
            } else {
                DENIALS_VERSION
            },
            rules: saved.rules.rules().to_vec(),
            sets: saved.sets.clone(),
            blocks: saved.blocks.clone(),
            denials: saved.denials.clone(),
        };
        let mut text = serde_json::to_vec_pretty(&file).map_err(|e| write_err(e.into()))?;
        text.push(b'\n');
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(write_err)?;
        tmp.write_all(&text).map_err(write_err)?;
        tmp.as_file().sync_all().map_err(write_err)?;
        tmp.persist(&self.path).map_err(|e| write_err(e.error))?;
        // Make the rename itself durable.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Access, Ports, Target};

    #[test]
    fn rules_round_trip_through_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RuleStore::new(&dir.path().join("state"));
        assert_eq!(
            store.load().expect("missing file is empty"),
            Saved::default()
        );
        let mut saved = Saved::default();
        let spec = Ports::Spec("8000-8010/udp".parse().expect("spec"));
        let rules = &mut saved.rules;
        rules
            .allow(
                "fd00::2".parse::<Target>().expect("target"),
                spec,
                Access::default(),
            )
            .expect("allow");
        let restricted = Access {
            from: vec![
                "office".parse().expect("set"),
                "10.0.0.0/8".parse().expect("prefix"),
            ],
            via: Some("wg0".into()),
            expires: Some(1_900_000_000),
        };
        rules
            .allow(
                "web".parse::<Target>().expect("target"),
                Ports::Published,
                restricted,
            )
            .expect("allow");
        rules
            .allow(
                Target::HostPort {
                    protocol: crate::policy::Protocol::Tcp,
                    port: 8080,
                },
                Ports::Published,
                Access::default(),
            )
            .expect("allow");
        saved.sets.insert(
            "office".into(),
            ["192.0.2.0/24".parse().expect("prefix")].into(),
        );
        saved
            .blocks
            .insert("203.0.113.0/24".parse().expect("prefix"));
        store.save(&saved).expect("save");
        assert_eq!(store.load().expect("load"), saved);
        let text = fs::read_to_string(store.path()).expect("read");
        assert!(
            text.contains("\"version\": 2"),
            "no denials: version 2\n{text}"
        );
        // A denial makes it version 3, which an older portgate refuses rather than ignore.
        saved.denials.add(
            "web".parse::<Target>().expect("target"),
            Ports::Spec("80/tcp".parse().expect("spec")),
        );
        store.save(&saved).expect("save");
        assert_eq!(store.load().expect("load"), saved);
        let text = fs::read_to_string(store.path()).expect("read");
        assert!(text.contains("\"version\": 3"), "{text}");
    }

    #[test]
    fn a_corrupt_file_is_an_error_and_stays_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RuleStore::new(dir.path());
        fs::write(store.path(), b"{not json").expect("write");
        let err = store.load().expect_err("corrupt");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("rules.json"));
        assert_eq!(fs::read(store.path()).expect("read"), b"{not json");
    }

    #[test]
    fn a_version_1_file_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RuleStore::new(dir.path());
        let v1 = br#"{"version": 1, "rules": [{"id": 0, "target": {"address": "10.0.0.2"}, "ports": {"spec": {"protocol": "tcp", "port_start": 80, "port_end": 80}}}]}"#;
        fs::write(store.path(), v1).expect("write");
        let saved = store.load().expect("version 1 loads");
        assert_eq!(saved.rules.rules().len(), 1);
        assert!(!saved.rules.rules()[0].access.is_restricted());
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RuleStore::new(dir.path());
        fs::write(store.path(), br#"{"version": 9, "rules": []}"#).expect("write");
        assert!(matches!(
            store.load(),
            Err(StoreError::Version { found: 9, .. })
        ));
    }
}
