//! `portgate generate DIR` (hidden): shell completions and man pages, generated from the clap
//! definitions, for the Debian package (`cargo xtask deb` runs it).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

use super::Cli;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Where to write `completions/` (bash, zsh, fish) and `man/` (portgate.1 and one page per
    /// command).
    pub out_dir: PathBuf,
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
