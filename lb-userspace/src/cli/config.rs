//! `xlb config` and `xlb reload`: the declarative config file, checked and applied.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use lb_userspace::{
    api::Client,
    balancer::{BackendConfig, DesiredState, VipConfig, VipStatus},
    config::{describe_changes, describe_encap_change, to_toml},
};

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate FILE: exit 0 if it would load, else one line naming FILE:LINE:COLUMN.
    #[command(after_help = "Example:\n  xlb config check /etc/xlb/xlb.toml")]
    Check {
        /// The config file (xlb.toml).
        file: PathBuf,
    },
    /// Print the running VIPs and backends as an xlb.toml (like ipvsadm-save): the agent's
    /// interfaces, VIPs, timeouts, health checks, backends, weights and states.
    #[command(
        after_help = "Examples:\n  xlb config dump > /etc/xlb/xlb.toml\n  xlb config dump | xlb config check /dev/stdin"
    )]
    Dump {
        #[command(flatten)]
        socket: super::SocketArg,
    },
    /// What applying FILE to the running agent would change, as `xlb reload` words it;
    /// nothing is changed.
    #[command(after_help = "Example:\n  xlb config diff /etc/xlb/xlb.toml")]
    Diff {
        /// The config file (xlb.toml).
        file: PathBuf,
        #[command(flatten)]
        socket: super::SocketArg,
    },
}

/// The running VIPs as a config file would hold them (no ids).
fn running_state(vips: Vec<VipStatus>) -> DesiredState {
    DesiredState {
        vips: vips
            .into_iter()
            .map(|v| VipConfig {
                vip: v.vip,
                backends: v
                    .backends
                    .into_iter()
                    .map(|b| BackendConfig {
                        addr: b.addr,
                        weight: b.weight,
                        state: b.state,
                        id: None,
                        container: b.container,
                        discovered: false,
                    })
                    .collect(),
                id: None,
                health: v.health_check,
                idle_timeout_s: Some(v.idle_timeout_s),
                forwarding: v.forwarding,
            })
            .collect(),
    }
}

/// `socket` turns a verb's `--socket` into the path to use.
pub fn run(
    command: ConfigCommand,
    mut socket: impl FnMut(Option<PathBuf>) -> PathBuf,
) -> Result<()> {
    match command {
        ConfigCommand::Check { file } => {
            let config = lb_userspace::config::load(&file)?;
            let containers: usize = config.vips.iter().map(|v| v.containers.len()).sum();
            println!(
                "{}: ok ({} VIPs, {} backends{})",
                file.display(),
                config.vips.len(),
                config.vips.iter().map(|v| v.backends.len()).sum::<usize>() + containers,
                if containers > 0 {
                    format!(", {containers} of them containers")
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        ConfigCommand::Dump { socket: given } => {
            let path = socket(given.socket);
            let client = Client::new(&path);
            let running = running_state(client.vip_list()?);
            let status = client.status()?;
            let ifaces: Vec<String> = status.interfaces.into_iter().map(|i| i.name).collect();
            print!("{}", to_toml(&running, &ifaces, &status.agent.encap));
            Ok(())
        }
        ConfigCommand::Diff {
            file,
            socket: given,
        } => {
            let config = lb_userspace::config::load(&file)?;
            let wanted = config.desired_state();
            let path = socket(given.socket);
            let client = Client::new(&path);
            let running = running_state(client.vip_list()?);
            let mut changes = describe_changes(&running, &wanted);
            // As a reload would apply them: the agent's command-line settings win.
            let agent = client.status()?.agent;
            changes.extend(describe_encap_change(
                &agent.encap,
                &agent.encap_flags.over(config.agent.encap),
            ));
            if changes.is_empty() {
                println!("{}: matches the running state", file.display());
            }
            for c in changes {
                println!("{c}");
            }
            Ok(())
        }
    }
}

pub fn reload(client: Client<'_>, dry_run: bool) -> Result<()> {
    let changes = client.reload(dry_run)?;
    if changes.is_empty() {
        if dry_run {
            println!("a reload would change nothing");
        } else {
            println!("reloaded: nothing changed");
        }
    }
    for c in changes {
        match c.strip_prefix("warning: ") {
            Some(warning) => eprintln!("xlb: warning: {warning}"),
            None => println!("{c}"),
        }
    }
    Ok(())
}
