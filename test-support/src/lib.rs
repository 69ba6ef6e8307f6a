//! The skip policy of every portgate test crate (gate-user's unit, program and netfilter
//! tests, the end-to-end tests in `portgate-tests`).
//!
//! A test that cannot run here (not root, a tool or a container engine missing) calls
//! [`skip`] (or [`require_root`]) and returns. That is never a silent pass:
//!
//! - the line `skipped: <test>: <why>` goes straight to the process's stderr (one
//!   `write(2)` on fd 2), which libtest does not capture (it captures only the print macros
//!   and panics), so it shows up for a passing test too, without `--nocapture`;
//! - where a skip is a failure (CI), it panics instead: when any of [`REQUIRE_VARS`]
//!   (`PORTGATE_REQUIRE_ROOT`, `PORTGATE_REQUIRE_ENGINES`, `CI`) is set to anything but
//!   empty, `0` or `false`. `.ci/run` sets them.
//!
//! A test whose subject this machine's set does not have (an engine set without the feature)
//! is not skipped: it calls [`not_applicable`], which says so the same way, as
//! `not applicable: <test>: <why>`, and never fails, and returns.

pub mod topology;

use std::{ffi::OsString, fmt::Display, io::Write as _};

/// The variables that turn every skip into a failure.
pub const REQUIRE_VARS: [&str; 3] = ["PORTGATE_REQUIRE_ROOT", "PORTGATE_REQUIRE_ENGINES", "CI"];

/// Skips the running test, saying why: prints `skipped: <test>: <why>` where the terminal
/// (or the CI log) shows it, even under libtest's capture. The caller returns afterwards.
///
/// # Panics
///
/// When a skip must not happen ([`skips_forbidden_by`] names a variable): the test fails with
/// the reason.
#[track_caller]
pub fn skip(why: impl Display) {
    let test = current_test_name();
    if let Some(var) = skips_forbidden_by(|name| std::env::var_os(name)) {
        panic!("{test} cannot run here: {why} ({var} is set: a skip is a failure)");
    }
    // One write of the whole line, so that parallel tests' lines do not interleave. An error
    // writing to stderr leaves nothing better to report it on.
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("skipped: {test}: {why}\n").as_bytes());
}

/// Says that the running test has nothing to check here, and why (e.g. this engine set has
/// no such feature): prints `not applicable: <test>: <why>` past libtest's capture, like
/// [`skip`], so that a test that checked nothing does not read as a bare "ok". Not a skip:
/// it never fails the test, also where skips are failures. The caller returns afterwards.
#[track_caller]
pub fn not_applicable(why: impl Display) {
    // One write of the whole line, as in `skip`.
    let _ = std::io::stderr()
        .lock()
        .write_all(not_applicable_line(&current_test_name(), why).as_bytes());
}

/// The line [`not_applicable`] prints.
pub fn not_applicable_line(test: &str, why: impl Display) -> String {
    format!("not applicable: {test}: {why}\n")
}

/// Whether the test may run as far as privileges go: true for root; otherwise [`skip`]s with
/// `needs root (<what>)` and returns false (or panics, see [`skip`]).
#[track_caller]
pub fn require_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    skip(format_args!("needs root ({what})"));
    false
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The name of the running test: libtest names each test's thread after it.
pub fn current_test_name() -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_owned(),
        _ => "<unknown test>".to_owned(),
    }
}

/// The first of [`REQUIRE_VARS`] that `lookup` finds set to something other than empty, `0`
/// or `false`: skips are failures then.
pub fn skips_forbidden_by(lookup: impl Fn(&str) -> Option<OsString>) -> Option<&'static str> {
    REQUIRE_VARS.into_iter().find(|name| {
        lookup(name).is_some_and(|value| {
            let value = value.to_string_lossy();
            let value = value.trim();
            !(value.is_empty() || value == "0" || value.eq_ignore_ascii_case("false"))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: Vec<(String, OsString)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn skips_are_allowed_without_the_variables() {
        assert_eq!(skips_forbidden_by(env(&[])), None);
        assert_eq!(skips_forbidden_by(env(&[("OTHER", "1")])), None);
    }

    #[test]
    fn empty_zero_and_false_do_not_forbid_skips() {
        for value in ["", "0", "false", "FALSE", " 0 "] {
            assert_eq!(skips_forbidden_by(env(&[("CI", value)])), None, "{value:?}");
        }
    }

    #[test]
    fn any_of_the_variables_forbids_skips() {
        for name in REQUIRE_VARS {
            for value in ["1", "true", "yes"] {
                assert_eq!(
                    skips_forbidden_by(env(&[(name, value)])),
                    Some(name),
                    "{name}={value}"
                );
            }
        }
        assert_eq!(
            skips_forbidden_by(env(&[("CI", "true"), ("PORTGATE_REQUIRE_ENGINES", "0")])),
            Some("CI")
        );
    }

    #[test]
    fn not_applicable_names_the_test_and_why() {
        assert_eq!(
            not_applicable_line("engines::a_test", "this set has no such thing"),
            "not applicable: engines::a_test: this set has no such thing\n"
        );
    }

    #[test]
    fn the_test_name_is_the_threads() {
        let name = current_test_name();
        assert!(name.ends_with("the_test_name_is_the_threads"), "{name}");
    }
}
