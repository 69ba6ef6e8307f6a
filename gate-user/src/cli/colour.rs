//! Colour for the human output of `list`, `status` and `doctor`: only on a terminal, and not
//! when NO_COLOR is set to anything but empty (https://no-color.org). `--json` never has any.
//! The markers that need a reader's attention are already upper case (NOT ATTACHED, UNGATED,
//! MISSING, NO, UNPROTECTED, WARNING); they go red or yellow, doctor's `ok` green.

use std::{ffi::OsString, io::IsTerminal as _};

const RED: &str = "\x1b[1;31m";
const YELLOW: &str = "\x1b[1;33m";
const GREEN: &str = "\x1b[32m";
const RESET: &str = "\x1b[0m";

/// Whether stdout gets colour.
pub fn enabled() -> bool {
    decide(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR"),
    )
}

fn decide(terminal: bool, no_color: Option<OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// `text` painted when stdout gets colour, else unchanged.
pub fn paint(text: &str) -> String {
    if enabled() {
        paint_markers(text)
    } else {
        text.to_owned()
    }
}

fn paint_markers(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        let mut line = line.to_owned();
        for (marker, colour) in [
            ("UNPROTECTED", RED),
            ("NOT ATTACHED", RED),
            ("UNGATED:", RED),
            ("MISSING", RED),
            ("WARNING", YELLOW),
            (" NO ", RED),
        ] {
            line = line.replace(marker, &format!("{colour}{marker}{RESET}"));
        }
        if let Some(rest) = line.strip_prefix("ok ") {
            line = format!("{GREEN}ok{RESET} {rest}");
        }
        out.push_str(&line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_on_a_terminal_without_no_color() {
        assert!(decide(true, None));
        assert!(decide(true, Some(OsString::new())));
        assert!(!decide(true, Some(OsString::from("1"))));
        assert!(!decide(false, None));
    }

    #[test]
    fn markers_are_painted_and_the_text_kept() {
        let text = "bridge:   docker0 NOT ATTACHED\nok           agent x\nUNGATED:  dns\n";
        let painted = paint_markers(text);
        assert!(painted.contains(&format!("{RED}NOT ATTACHED{RESET}")));
        assert!(painted.starts_with("bridge:"));
        assert!(painted.contains(&format!("{GREEN}ok{RESET}           agent x")));
        let plain = painted
            .replace(RED, "")
            .replace(GREEN, "")
            .replace(RESET, "");
        assert_eq!(plain, text);
    }
}
