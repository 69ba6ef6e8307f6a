//! The classic Prometheus text format, derived from the OpenMetrics encoding.

use std::{collections::BTreeMap, fmt::Write as _};

/// The same exposition in the classic Prometheus text format 0.0.4: counters are declared
/// under their sample name (`foo_total`), info metrics become gauges (`foo_info`), and the
/// OpenMetrics-only `# UNIT` and `# EOF` lines go. Samples stay as they are. (Help texts
/// never need escaping: they are this module's own, without `\`, `"` or newlines.)
pub fn to_text_format(openmetrics: &str) -> String {
    let kinds: BTreeMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let header = line
            .strip_prefix("# HELP ")
            .map(|rest| ("HELP", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("TYPE", rest)));
        let Some((keyword, rest)) = header else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
        let (suffix, kind) = match kinds.get(name).copied() {
            Some("counter") => ("_total", "counter"),
            Some("info") => ("_info", "gauge"),
            Some("unknown") => ("", "untyped"),
            Some(other) => ("", other),
            None => ("", ""),
        };
        let text = if keyword == "TYPE" { kind } else { text };
        let _ = writeln!(out, "# {keyword} {name}{suffix} {text}");
    }
    out
}
