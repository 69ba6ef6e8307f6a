//! `portgate.allow` labels on real engines: an image's label is its author's word, not the
//! operator's (it opens nothing unless the agent runs with `--labels image`, and the agent
//! says so), and `portgate deny` closes what a label opened.

use std::process::Stdio;
use std::sync::MutexGuard;
use std::time::Instant;

use portgate_tests::engines::{
    ContainerGuard, Engine, EngineAgent, Engines, FOLLOW_TIMEOUT, IMAGE, Scenario, body_of,
    container_rules, free_port, httpd_script, unique,
};
use serde_json::Value;

use super::SERIAL;

/// An image built here (`docker build` / `podman build`) from the test image with
/// `LABEL portgate.allow="80/tcp"`; removed from both engines on drop.
struct LabelledImage {
    engines: &'static Engines,
    tag: String,
}

impl LabelledImage {
    fn build(engines: &'static Engines) -> Self {
        let tag = format!("{}:latest", unique("labelled"));
        // The build context lives where the engine's CLI runs (the sid set: its chroot).
        let root = engines.root.clone().unwrap_or_else(|| "/".into());
        let inner = format!("/tmp/{}", unique("build"));
        let dir = root.join(inner.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).expect("create the build context");
        std::fs::write(
            dir.join("Dockerfile"),
            format!("FROM {IMAGE}\nLABEL portgate.allow=\"80/tcp\"\n"),
        )
        .expect("write the Dockerfile");
        let image = Self { engines, tag };
        let dockerfile = format!("{inner}/Dockerfile");
        for engine in [Engine::Docker, Engine::Podman] {
            let mut command = engines.cli(engine);
            command
                .arg("build")
                .args(["-t", &image.tag, "-f", &dockerfile]);
            match engine {
                // The classic builder needs no buildx and takes the local base image as is.
                Engine::Docker => command.env("DOCKER_BUILDKIT", "0"),
                Engine::Podman => command.arg("--pull=never"),
            };
            let output = command
                .arg(&inner)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .expect("run the engine's build");
            assert!(
                output.status.success(),
                "{} build of {}: {}{}",
                engine.name(),
                image.tag,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        image
    }

    /// An httpd from this image, published on `host_port`.
    fn run_httpd(&self, engine: Engine, name: &str, host_port: u16) -> ContainerGuard {
        let publish = format!("{host_port}:80");
        let script = httpd_script(name, &[80], 0);
        let guard = self.engines.run(
            engine,
            name,
            &["-p", &publish, &self.tag, "/bin/sh", "-c", &script],
        );
        guard.wait_serving(80);
        guard
    }
}

impl Drop for LabelledImage {
    fn drop(&mut self) {
        for engine in [Engine::Docker, Engine::Podman] {
            let _ = self
                .engines
                .cli(engine)
                .args(["rmi", "-f", &self.tag])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The entries of `ignored_labels` (status or list JSON) naming `container`.
fn ignored<'v>(json: &'v Value, container: &str) -> Option<&'v Value> {
    json["ignored_labels"]
        .as_array()?
        .iter()
        .find(|i| i["container"] == container)
}

/// Waits until the agent's log says `needle`; panics with the log after [`FOLLOW_TIMEOUT`].
fn wait_log(agent: &portgate_tests::agent::Agent<'_>, needle: &str) {
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    while !agent.log_text().contains(needle) {
        if Instant::now() > deadline {
            panic!(
                "the agent's log never said {needle:?}:\n{}",
                agent.log_text()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn an_image_label_opens_nothing_unless_the_agent_runs_with_labels_image() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let image = LabelledImage::build(engines);
    let (idport, ipport, odport, opport) = (free_port(), free_port(), free_port(), free_port());
    let (idname, ipname) = (unique("img-d"), unique("img-p"));
    let (odname, opname) = (unique("own-d"), unique("own-p"));
    let _img_d = image.run_httpd(Engine::Docker, &idname, idport);
    let _img_p = image.run_httpd(Engine::Podman, &ipname, ipport);
    let own = ["--label", "portgate.allow=80/tcp"];
    let _own_d = engines.run_httpd(Engine::Docker, &odname, odport, &own);
    let _own_p = engines.run_httpd(Engine::Podman, &opname, opport, &own);

    // The agent's default: labels set on the container open ports, the image's do not.
    let agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker", "podman"]);
    for (port, name, engine) in [(odport, &odname, "Docker"), (opport, &opname, "Podman")] {
        sc.assert_answers_within(
            sc.published(port),
            &body_of(name),
            FOLLOW_TIMEOUT,
            &format!("{engine} container run with --label portgate.allow=80/tcp"),
        );
    }
    for (port, engine) in [(idport, "Docker"), (ipport, "Podman")] {
        sc.assert_times_out(
            sc.published(port),
            &format!(
                "{engine} container whose image has LABEL portgate.allow=80/tcp, default --labels"
            ),
        );
    }
    // ... and says so, naming the container and the flag: log, status, list, doctor.
    let status = agent.status_json();
    assert_eq!(status["label_policy"], "container", "{status}");
    for name in [&idname, &ipname] {
        let entry = ignored(&status, name)
            .unwrap_or_else(|| panic!("status --json names no ignored label of {name}: {status}"));
        assert_eq!(entry["origin"], "image", "{entry}");
        let warning = entry["warning"].as_str().unwrap_or_default();
        assert!(warning.contains("--labels image"), "{warning}");
        wait_log(&agent, &format!("container {name}: its image's label"));
    }
    let text = agent.cli_ok(&["status"]);
    assert!(
        text.contains(&format!("WARNING:  container {idname}")),
        "{text}"
    );
    let doctor = agent.cli(&["doctor", "--json"]);
    let report: Value = serde_json::from_slice(&doctor.stdout).expect("doctor --json");
    let flagged = report["findings"].as_array().is_some_and(|findings| {
        findings
            .iter()
            .any(|f| f["check"] == "label" && f["subject"] == *ipname && f["level"] == "warning")
    });
    assert!(flagged, "doctor names {ipname}'s image label: {report}");
    let list = agent.list_json();
    assert!(ignored(&list, &idname).is_some(), "{list}");
    assert!(
        container_rules(&list, &odname)
            .iter()
            .any(|r| r["source"] == "label" && r["label_origin"] == "container"),
        "{list}"
    );
    // A new such container is named as it appears.
    let (newport, newname) = (free_port(), unique("img-new"));
    let _img_new = image.run_httpd(Engine::Docker, &newname, newport);
    wait_log(&agent, &format!("container {newname}: its image's label"));
    sc.assert_times_out(
        sc.published(newport),
        "a new container from the labelled image",
    );
    drop(agent);

    // --labels image: the image's author decides, as before.
    let agent = EngineAgent::start(engines, &["--labels", "image"]);
    agent.wait_engines_connected(&["docker", "podman"]);
    for (port, name, engine) in [(idport, &idname, "Docker"), (ipport, &ipname, "Podman")] {
        sc.assert_answers_within(
            sc.published(port),
            &body_of(name),
            FOLLOW_TIMEOUT,
            &format!("{engine} container with an image label, --labels image"),
        );
    }
    let list = agent.list_json();
    assert!(
        container_rules(&list, &idname)
            .iter()
            .any(|r| r["source"] == "label" && r["label_origin"] == "image"),
        "list says the label is the image's: {list}"
    );
    let status = agent.status_json();
    assert_eq!(status["label_policy"], "image", "{status}");
    assert!(ignored(&status, &idname).is_none(), "{status}");
}

#[test]
fn deny_closes_a_port_a_label_opened_while_the_deny_stands() {
    let (_serial, engines) = setup!();
    let sc = Scenario::new();
    let (dport, pport) = (free_port(), free_port());
    let (dname, pname) = (unique("lbl-d"), unique("lbl-p"));
    let own = ["--label", "portgate.allow=80/tcp"];
    let _docker = engines.run_httpd(Engine::Docker, &dname, dport, &own);
    let _podman = engines.run_httpd(Engine::Podman, &pname, pport, &own);
    let mut agent = EngineAgent::start(engines, &[]);
    agent.wait_engines_connected(&["docker", "podman"]);
    for (port, name) in [(dport, &dname), (pport, &pname)] {
        sc.assert_answers_within(
            sc.published(port),
            &body_of(name),
            FOLLOW_TIMEOUT,
            "a container run with --label portgate.allow=80/tcp",
        );
    }

    // The operator's word wins over the label.
    let said = agent.cli_ok(&["deny", &dname, "80/tcp"]);
    assert!(said.contains("closes what the label of"), "{said}");
    sc.assert_times_out(sc.published(dport), "Docker labelled container after deny");
    sc.assert_answers(
        sc.published(pport),
        &body_of(&pname),
        "Podman labelled container, not denied",
    );
    agent.deny(&pname, "80/tcp");
    sc.assert_times_out(sc.published(pport), "Podman labelled container after deny");
    let list = agent.list_json();
    let denials = list["denials"].as_array().cloned().unwrap_or_default();
    assert_eq!(denials.len(), 2, "{list}");

    // It stands across a restart of the agent (it is saved with the rules).
    agent.restart();
    agent.wait_engines_connected(&["docker", "podman"]);
    sc.assert_times_out(
        sc.published(dport),
        "Docker denied container after a restart",
    );
    sc.assert_times_out(
        sc.published(pport),
        "Podman denied container after a restart",
    );

    // An allow for anyone lifts it.
    let said = agent.cli_ok(&["allow", &dname, "80/tcp"]);
    assert!(said.contains("lifted the deny"), "{said}");
    sc.assert_answers(
        sc.published(dport),
        &body_of(&dname),
        "Docker labelled container after allow",
    );
    sc.assert_times_out(sc.published(pport), "Podman container, still denied");
}
