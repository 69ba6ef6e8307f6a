//! A host's boot, simulated: the engines shut down (as at poweroff), their bridges removed
//! (gone after a reboot), then started again in boot order, after the agent.

use super::*;

/// Daemons started here; kept (not reaped, not killed) so that they outlive the test like the
/// harness's own, for the next test binary.
static BOOTED: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// The engines' bridges that a reboot removes.
pub const ENGINE_BRIDGES: &[&str] = &["docker0", "podman0", "cni-podman0"];

/// Pids of running processes named `comm` whose command line contains `arg` (if given), and
/// whose root is the machine's (an engine in a chroot, e.g. a newer Docker, is not this
/// host's and is left alone).
fn pids_of(comm: &str, arg: Option<&str>) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
                && !is_zombie(*pid)
                && std::fs::read_link(format!("/proc/{pid}/root"))
                    .is_ok_and(|root| root == Path::new("/"))
                && arg.is_none_or(|arg| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(arg))
                })
        })
        .collect()
}

/// SIGTERM, as a shutdown sends it, and waits until the processes are gone (or zombies).
fn terminate(what: &str, pids: &[u32]) -> Result<()> {
    for pid in pids {
        // SAFETY: kill has no memory preconditions; the pid was just read from /proc.
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGTERM) };
    }
    wait_until(Duration::from_secs(60), || {
        pids.iter().all(|pid| !pid_alive(*pid) || is_zombie(*pid))
    })
    .with_context(|| format!("{what} ({pids:?}) did not stop within 60 s of SIGTERM"))
}

/// Stops Podman's API service, dockerd (which stops its containers, as at shutdown) and
/// containerd, with SIGTERM; removes what a dead dockerd leaves for its successor.
pub fn shut_down_engines() -> Result<()> {
    terminate("podman system service", &pids_of("podman", Some("service")))?;
    terminate("dockerd", &pids_of("dockerd", None))?;
    terminate("containerd", &pids_of("containerd", None))?;
    // A zombie dockerd (nobody reaps here) keeps its pidfile "in use".
    let _ = std::fs::remove_file("/var/run/docker.pid");
    Ok(())
}

/// Deletes the engines' bridges that exist; returns those it deleted.
pub fn remove_engine_bridges() -> Vec<String> {
    let mut removed = Vec::new();
    for bridge in ENGINE_BRIDGES {
        if Path::new("/sys/class/net").join(bridge).exists() {
            run_ok(Command::new("ip").args(["link", "delete", bridge]));
            removed.push((*bridge).to_owned());
        }
    }
    removed
}

/// Starts containerd, then dockerd (which starts its `--restart always` containers), as at
/// boot; returns once `docker info` answers. The host's engines only (not a chroot's).
pub fn start_docker(engines: &Engines) -> Result<()> {
    let containerd = find_program("containerd").context("containerd not found")?;
    let log = engines.set.logs().containerd;
    BOOTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(spawn_daemon(Command::new(containerd), &log)?);
    wait_until(Duration::from_secs(30), || {
        socket_accepts(CONTAINERD_SOCKET)
    })
    .with_context(|| {
        format!(
            "containerd did not open {CONTAINERD_SOCKET}; log {}:\n{}",
            log.display(),
            tail(&log)
        )
    })?;
    engines.start_dockerd();
    Ok(())
}

/// Starts Podman's API service, then what podman-restart.service runs at boot: `podman start
/// --all --filter restart-policy=always`.
pub fn start_podman(engines: &Engines) -> Result<()> {
    let socket = engines.podman_socket.clone();
    let _ = std::fs::remove_file(&socket);
    let mut command = engines.cli(Engine::Podman);
    command.args([
        "system".to_owned(),
        "service".to_owned(),
        "--time=0".to_owned(),
        format!("unix://{}", socket.display()),
    ]);
    BOOTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(spawn_daemon(command, &engines.set.logs().podman)?);
    wait_until(Duration::from_secs(30), || {
        UnixStream::connect(&socket).is_ok()
    })
    .with_context(|| format!("podman system service did not open {}", socket.display()))?;
    engines.cli_ok(
        Engine::Podman,
        &["start", "--all", "--filter", "restart-policy=always"],
    );
    Ok(())
}
