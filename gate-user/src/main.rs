use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = gate_user::cli::Cli::parse();
    match gate_user::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
