//! `xlb config` and `xlb reload`: the declarative config file, checked and applied.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use lb_userspace::api::Client;

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate FILE: exit 0 if it would load, else one line naming FILE:LINE:COLUMN.
    #[command(after_help = "Example:\n  xlb config check /etc/xlb/xlb.toml")]
    Check {
        /// The config file (xlb.toml).
        file: PathBuf,
    },
}

/// The verbs that need no agent.
pub fn run(command: ConfigCommand) -> Result<()> {
    match command {
        ConfigCommand::Check { file } => {
            let config = lb_userspace::config::load(&file)?;
            println!(
                "{}: ok ({} VIPs, {} backends)",
                file.display(),
                config.vips.len(),
                config.vips.iter().map(|v| v.backends.len()).sum::<usize>()
            );
            Ok(())
        }
    }
}

pub fn reload(client: Client<'_>) -> Result<()> {
    let changes = client.reload()?;
    if changes.is_empty() {
        println!("reloaded: nothing changed");
    }
    for c in changes {
        match c.strip_prefix("warning: ") {
            Some(warning) => eprintln!("xlb: warning: {warning}"),
            None => println!("{c}"),
        }
    }
    Ok(())
}
