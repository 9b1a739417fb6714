//! `xlb generate`: shell completions and man pages from the clap definitions, written by
//! `./x build` into target/ (hidden: packaging runs it, not operators).

use std::{fs, path::Path};

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;
use clap_complete::Shell;

use super::Cli;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Directory to write completions/ (bash, zsh, fish) and man/ (xlb.1, xlb-VERB.1) into.
    #[arg(long)]
    out: std::path::PathBuf,
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

pub fn run(GenerateArgs { out }: GenerateArgs) -> Result<()> {
    let completions = out.join("completions");
    let man = out.join("man");
    for dir in [&completions, &man] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = Cli::command();
        let path = clap_complete::generate_to(shell, &mut cmd, "xlb", &completions)
            .with_context(|| format!("writing {shell} completions"))?;
        println!("{}", path.display());
    }
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    write(&man.join("xlb.1"), &page)?;
    println!("{}", man.join("xlb.1").display());
    // `xlb bench` runs the program `xlb-bench`, whose own page is `xlb-bench.1`
    // (`xlb-bench generate`).
    for verb in cmd
        .get_subcommands()
        .filter(|c| !c.is_hide_set() && c.get_name() != "bench")
    {
        // clap takes a name as `&'static str` (without its `string` feature); this runs once.
        let name: &'static str = Box::leak(format!("xlb-{}", verb.get_name()).into_boxed_str());
        let mut page = Vec::new();
        clap_mangen::Man::new(verb.clone().name(name)).render(&mut page)?;
        let path = man.join(format!("{name}.1"));
        write(&path, &page)?;
        println!("{}", path.display());
    }
    Ok(())
}
