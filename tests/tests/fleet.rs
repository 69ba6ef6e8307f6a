//! Many hosts: the file_sd scrape example is a valid Prometheus configuration (with the alert
//! rules it loads), and an alert names the host it fires for (`instance`), checked with
//! `promtool test rules` on two hosts' series.

use std::path::{Path, PathBuf};
use std::process::Command;

use portgate_tests::skip;

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn have_promtool() -> bool {
    if Command::new("promtool").arg("--version").output().is_ok() {
        return true;
    }
    skip("promtool is not installed (apt-get install prometheus; cargo xtask setup does)");
    false
}

#[test]
fn file_sd_example_is_a_valid_configuration() {
    if !have_promtool() {
        return;
    }
    let (ok, text) = promtool(&["check", "config", "prometheus/prometheus.yml"], &docs());
    assert!(
        ok,
        "promtool check config docs/prometheus/prometheus.yml:\n{text}"
    );
    assert!(text.contains("1 rule files found"), "{text}");
}

#[test]
fn alerts_name_the_host() {
    if !have_promtool() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let alerts = docs().join("alerts.yml");
    let test = format!(
        r#"rule_files:
  - {alerts}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'portgate_ungated_containers{{job="portgate",instance="web-01.example.net"}}'
        values: '2x20'
      - series: 'portgate_ungated_containers{{job="portgate",instance="web-02.example.net"}}'
        values: '0x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: PortgateUngatedContainers
        exp_alerts:
          - exp_labels:
              severity: warning
              job: portgate
              instance: web-01.example.net
            exp_annotations:
              summary: "2 container(s) on web-01.example.net are not behind the gate"
              description: "`portgate doctor` (or `portgate status`) on web-01.example.net names them, with their ports and what to do about each."
"#,
        alerts = alerts.display()
    );
    std::fs::write(dir.path().join("fleet_test.yml"), test).unwrap();
    let (ok, text) = promtool(&["test", "rules", "fleet_test.yml"], dir.path());
    assert!(ok, "promtool test rules:\n{text}");
}
