//! The `portgate` command line: the agent, and the commands that talk to it over the control
//! socket. `args` holds what clap parses, `output` how replies are printed; the commands are
//! here.

mod args;
mod colour;
mod doctor;
mod generate;
mod output;

use std::path::PathBuf;

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
    policy::{PortSpec, Target},
    runtime::Engine,
};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => run_agent(args, cli.socket),
        Command::Allow(args) => change(&cli.socket, args, true),
        Command::Deny(args) => change(&cli.socket, args, false),
        Command::List { json } => match client::call(&cli.socket, &Request::List)? {
            Reply::List(list) if json => print_json(&list),
            Reply::List(list) => {
                print!("{}", colour::paint(&format_rules(&list.rules)));
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
        Command::Mode { mode } => match client::call(
            &cli.socket,
            &Request::Mode {
                audit: mode == Mode::Audit,
            },
        )? {
            Reply::Changed(changed) => {
                println!("{}", changed.message);
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Uninstall { bpffs } => uninstall(&cli.socket, &bpffs),
        Command::Doctor(args) => doctor::run(&cli.socket, &args),
        Command::Generate(args) => generate::run(&args),
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
    let options = AgentOptions {
        bridges,
        auto_bridges,
        engines,
        engines_later,
        default_published: args.default_policy == DefaultPolicy::Published,
        labels: args.labels == Switch::On,
        netfilter: !args.no_netfilter,
        metrics_addr: args.metrics_addr.0,
        capacities: Capacities {
            flows: args.max_flows,
            allow: args.max_allow,
        },
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

fn change(socket: &std::path::Path, args: RuleArgs, allow: bool) -> anyhow::Result<()> {
    // Check locally first, so bad input fails fast even without an agent.
    args.target.parse::<Target>()?;
    if let Some(ports) = &args.ports {
        ports.parse::<PortSpec>()?;
    }
    let RuleArgs {
        target,
        ports,
        published,
    } = args;
    let request = if allow {
        Request::Allow {
            target,
            ports,
            published,
        }
    } else {
        Request::Deny {
            target,
            ports,
            published,
        }
    };
    match client::call(socket, &request)? {
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

fn uninstall(socket: &std::path::Path, bpffs: &std::path::Path) -> anyhow::Result<()> {
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
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn unexpected(reply: Reply) -> anyhow::Result<()> {
    anyhow::bail!("the agent answered something unexpected: {reply:?}")
}
