//! The `portgate` command line: the agent, and the commands that talk to it over the control
//! socket. `args` holds what clap parses, `output` how replies are printed; the commands are
//! here.

mod args;
mod check;
mod colour;
mod doctor;
mod generate;
mod leftovers;
mod output;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tracing_subscriber::EnvFilter;

pub use self::args::Cli;
use self::args::*;
use self::output::*;
use gate_user::{
    agent::{Agent, AgentOptions},
    api::{Reply, Request, client},
    datapath::{self, Capacities, GateConfig},
    netfilter,
    policy::{PortSpec, Prefix, SourceSpec, Target, check_interface},
    runtime::{Engine, rootless::RootlessOptions},
};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => run_agent(args, cli.socket),
        Command::Allow(args) => allow(&cli.socket, args),
        Command::Deny(args) => deny(&cli.socket, args),
        Command::Set(args) => set(&cli.socket, args),
        Command::Block(args) => {
            let prefixes = prefixes_from(args.prefixes, args.file.as_deref())?;
            let request = Request::Block {
                prefixes,
                remove: false,
                replace: args.replace,
            };
            print_changed(client::call(&cli.socket, &request)?)
        }
        Command::Unblock { prefixes } => {
            let prefixes = prefixes_from(prefixes, None)?;
            let request = Request::Block {
                prefixes,
                remove: true,
                replace: false,
            };
            print_changed(client::call(&cli.socket, &request)?)
        }
        Command::Explain {
            source,
            target,
            port,
            via,
            json,
        } => {
            let request = Request::Explain {
                source,
                target,
                port,
                via,
            };
            match client::call(&cli.socket, &request)? {
                Reply::Explained(explained) if json => print_json(&explained),
                Reply::Explained(explained) => {
                    print!("{}", format_explanation(&explained));
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::List { json } => match client::call(&cli.socket, &Request::List)? {
            Reply::List(list) if json => print_json(&list),
            Reply::List(list) => {
                print!("{}", colour::paint(&format_list(&list)));
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Status { json } => match client::call(&cli.socket, &Request::Status)? {
            Reply::Status(status) if json => print_json(&status),
            Reply::Status(status) => {
                print!("{}", colour::paint(&format_status(&status)));
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Watch { json } => client::watch(&cli.socket, |event| {
            if json {
                println!("{}", serde_json::to_string(&event)?);
            } else {
                println!("{}", format_watch_event(&event));
            }
            Ok(())
        }),
        Command::Mode { mode } => print_changed(client::call(
            &cli.socket,
            &Request::Mode {
                audit: mode == Mode::Audit,
            },
        )?),
        Command::Uninstall { bpffs, saved } => uninstall(&cli.socket, &bpffs, &saved),
        Command::Reload => print_changed(client::call(&cli.socket, &Request::Reload)?),
        Command::Check { file } => check::run(&cli.socket, file.as_deref()),
        Command::Doctor(args) => doctor::run(&cli.socket, &args),
        Command::Generate(args) => generate::run(&args),
        Command::SystemdGenerator(args) => generate::systemd_generator(&args),
    }
}

fn run_agent(args: AgentArgs, socket: PathBuf) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let auto_bridges = args.bridges.iter().any(|b| b == "auto");
    let bridges = args.bridges.into_iter().filter(|b| b != "auto").collect();
    let auto_uplinks = args.uplinks.iter().any(|u| u == "auto");
    let uplinks = args.uplinks.into_iter().filter(|u| u != "auto").collect();
    let docker = (Engine::Docker, args.docker_socket);
    let podman = (Engine::Podman, args.podman_socket);
    // auto: the engines whose socket exists now, and the others once theirs appears (at
    // boot the agent starts before them).
    let (engines, engines_later) = match args.runtime {
        RuntimeChoice::Docker => (vec![docker], vec![]),
        RuntimeChoice::Podman => (vec![podman], vec![]),
        RuntimeChoice::None => (vec![], vec![]),
        RuntimeChoice::Auto => [docker, podman].into_iter().partition(|(_, s)| s.exists()),
    };
    let rootless = (matches!(args.runtime, RuntimeChoice::Auto | RuntimeChoice::Podman)
        && args.rootless_podman.as_os_str() != "off")
        .then_some(RootlessOptions {
            podman: args.rootless_podman,
            root: args.rootless_podman_root,
        });
    let options = AgentOptions {
        rootless,
        bridges,
        auto_bridges,
        uplinks,
        auto_uplinks,
        engines,
        engines_later,
        default_published: args.default_policy == DefaultPolicy::Published,
        labels: args.labels.into(),
        netfilter: !args.no_netfilter,
        metrics_addr: args.metrics_addr.0,
        capacities: Capacities {
            flows: args.max_flows,
            allow: args.max_allow,
            rules: args.max_rules,
        },
        policy_required: args.policy.is_some(),
        policy_file: args
            .policy
            .unwrap_or_else(|| PathBuf::from(DEFAULT_POLICY_FILE)),
        state_dir: args.state_dir,
        bpffs: args.bpffs,
        socket,
        gate: GateConfig {
            audit: args.mode == Mode::Audit,
            gate_host_traffic: args.gate_host_traffic,
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let agent = Agent::start(options)?;
        agent.serve().await
    })
}

/// Checks what can be checked without the agent, so bad input fails fast.
fn check_rule_args(args: &RuleArgs) -> anyhow::Result<()> {
    if let Some(target) = &args.target {
        target.parse::<Target>()?;
    }
    for spec in [&args.ports, &args.host_port].into_iter().flatten() {
        spec.parse::<PortSpec>()?;
    }
    Ok(())
}

fn allow(socket: &Path, args: AllowArgs) -> anyhow::Result<()> {
    check_rule_args(&args.rule)?;
    for source in &args.from {
        source.parse::<SourceSpec>()?;
    }
    if let Some(via) = &args.via {
        check_interface(via)?;
    }
    let RuleArgs {
        target,
        ports,
        published,
        host_port,
    } = args.rule;
    let request = Request::Allow {
        target: target.unwrap_or_default(),
        ports,
        published,
        host_port,
        from: args.from,
        via: args.via,
        for_seconds: args.for_duration.map(|d| d.as_secs().max(1)),
    };
    print_changed(client::call(socket, &request)?)
}

fn deny(socket: &Path, args: DenyArgs) -> anyhow::Result<()> {
    check_rule_args(&args.rule)?;
    let RuleArgs {
        target,
        ports,
        published,
        host_port,
    } = args.rule;
    let request = Request::Deny {
        target: target.unwrap_or_default(),
        ports,
        published,
        host_port,
        cut: args.cut,
    };
    print_changed(client::call(socket, &request)?)
}

fn set(socket: &Path, args: SetArgs) -> anyhow::Result<()> {
    let prefixes = if args.delete {
        Vec::new()
    } else {
        prefixes_from(args.prefixes, args.file.as_deref())?
    };
    let request = Request::Set {
        name: args.name,
        prefixes,
        delete: args.delete,
    };
    print_changed(client::call(socket, &request)?)
}

/// The prefixes given, and those of `file` (one per line; `#` starts a comment), each
/// checked here: an error names the line, and nothing is sent.
fn prefixes_from(mut prefixes: Vec<String>, file: Option<&Path>) -> anyhow::Result<Vec<String>> {
    for prefix in &prefixes {
        prefix.parse::<Prefix>()?;
    }
    let Some(file) = file else {
        return Ok(prefixes);
    };
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    for (number, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        entry
            .parse::<Prefix>()
            .with_context(|| format!("{}:{}", file.display(), number + 1))?;
        prefixes.push(entry.to_owned());
    }
    Ok(prefixes)
}

fn print_changed(reply: Reply) -> anyhow::Result<()> {
    match reply {
        Reply::Changed(changed) => {
            println!("{}", changed.message);
            for warning in &changed.warnings {
                eprintln!("warning: {warning}");
            }
            Ok(())
        }
        other => unexpected(other),
    }
}

fn uninstall(socket: &Path, bpffs: &Path, saved: &leftovers::SavedRulesets) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        anyhow::bail!(
            "an agent is serving {}; stop it first, or it would run without a gate",
            socket.display()
        );
    }
    // An agent that serves another socket still holds its pin directory.
    let _lock = if bpffs.exists() {
        Some(gate_user::lock::lock_dir(bpffs, "pin directory")?)
    } else {
        None
    };
    let done = datapath::uninstall(bpffs)?;
    let rules = netfilter::remove_for(&done.bridges)?;
    println!(
        "detached {} link(s), removed {} pin(s) under {} and {rules} netfilter delegation rule(s); traffic to the bridges is no longer gated",
        done.links,
        done.pins,
        bpffs.display()
    );
    if !done.foreign.is_empty() {
        let foreign: Vec<String> = done
            .foreign
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        println!(
            "left {} entr{} that portgate did not create: {}",
            foreign.len(),
            if foreign.len() == 1 { "y" } else { "ies" },
            foreign.join(", ")
        );
    }
    print!("{}", leftovers::uninstall_notes(saved));
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn unexpected(reply: Reply) -> anyhow::Result<()> {
    anyhow::bail!("the agent answered something unexpected: {reply:?}")
}
