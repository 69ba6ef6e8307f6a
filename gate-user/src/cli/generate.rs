//! `portgate generate DIR` (hidden): shell completions and man pages, generated from the clap
//! definitions, for the Debian package (`cargo xtask deb` runs it).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

use gate_user::units;

use super::Cli;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Where to write `completions/` (bash, zsh, fish) and `man/` (portgate.1 and one page per
    /// command).
    pub out_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct GeneratorArgs {
    /// The generator's output directory (systemd passes normal, early and late; the
    /// drop-ins go to the first).
    pub normal_dir: PathBuf,
    pub early_dir: Option<PathBuf>,
    pub late_dir: Option<PathBuf>,
    /// Where Quadlet files are (repeatable; default: Quadlet's system directories).
    #[arg(long)]
    pub quadlet_dir: Vec<PathBuf>,
    /// Where unit files are (repeatable; default: /etc/systemd/system, /run/systemd/system).
    #[arg(long)]
    pub unit_dir: Vec<PathBuf>,
}

/// Writes a drop-in for each container unit (`gate_user::units`); lists them.
pub fn systemd_generator(args: &GeneratorArgs) -> anyhow::Result<()> {
    let or_default = |given: &[PathBuf], default: &[&str]| -> Vec<PathBuf> {
        if given.is_empty() {
            default.iter().map(PathBuf::from).collect()
        } else {
            given.to_vec()
        }
    };
    let quadlet = or_default(&args.quadlet_dir, &units::QUADLET_DIRS);
    let unit_dirs = or_default(&args.unit_dir, &units::UNIT_DIRS);
    let found = units::generate(&args.normal_dir, &quadlet, &unit_dirs).with_context(|| {
        format!(
            "writing the container units' drop-ins to {}",
            args.normal_dir.display()
        )
    })?;
    for unit in found {
        println!("{} ({})", unit.name, unit.source.display());
    }
    Ok(())
}

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let completions = args.out_dir.join("completions");
    let man = args.out_dir.join("man");
    for dir in [&completions, &man] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut Cli::command(), "portgate", &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
        println!("{}", path.display());
    }
    write_man_pages(&man)
}

/// portgate.1, and portgate-COMMAND.1 for each command that is not hidden.
fn write_man_pages(dir: &Path) -> anyhow::Result<()> {
    let mut command = Cli::command();
    command.build();
    let mut pages = vec![("portgate".to_owned(), command.clone())];
    for sub in command
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        // build() named them `portgate-COMMAND`, the name clap_mangen gives the page.
        let name = format!("portgate-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().display_name(name)));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut out)
            .with_context(|| format!("rendering the man page {name}.1"))?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}
