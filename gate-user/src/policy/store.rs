//! Rules on disk: one JSON file, replaced atomically (write a temporary file, fsync, rename).
//! A file that cannot be read is an error for the operator, never silently replaced.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{Rule, RuleSet};

const FORMAT_VERSION: u32 = 1;

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
        "rules file {path} has format version {found}; this portgate reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write rules to {path}")]
    Write { path: PathBuf, source: io::Error },
}

#[derive(Serialize, Deserialize)]
struct RulesFile {
    version: u32,
    rules: Vec<Rule>,
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

    /// The saved rules; none if the file does not exist yet.
    pub fn load(&self) -> Result<RuleSet, StoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(RuleSet::default()),
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
        if file.version != FORMAT_VERSION {
            return Err(StoreError::Version {
                path: self.path.clone(),
                found: file.version,
            });
        }
        Ok(RuleSet::new(file.rules))
    }

    pub fn save(&self, rules: &RuleSet) -> Result<(), StoreError> {
        let write_err = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(write_err)?;
        let file = RulesFile {
            version: FORMAT_VERSION,
            rules: rules.rules().to_vec(),
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
    use crate::policy::{Ports, Target};

    #[test]
    fn rules_round_trip_through_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RuleStore::new(&dir.path().join("state"));
        assert!(
            store
                .load()
                .expect("missing file is empty")
                .rules()
                .is_empty()
        );
        let mut rules = RuleSet::default();
        let spec = Ports::Spec("8000-8010/udp".parse().expect("spec"));
        rules
            .allow("fd00::2".parse::<Target>().expect("target"), spec)
            .expect("allow");
        rules
            .allow("web".parse::<Target>().expect("target"), Ports::Published)
            .expect("allow");
        store.save(&rules).expect("save");
        assert_eq!(store.load().expect("load"), rules);
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
