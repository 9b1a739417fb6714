//! `xlb status`: the agent, its interfaces and hooks, the VIPs and backends, their health and
//! the data-path counters that signal trouble, on one screen.

use anyhow::Result;
use lb_userspace::api::Client;

use super::render::{print_json, print_status};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Everything the agent reported, as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(client: Client<'_>, StatusArgs { json }: StatusArgs) -> Result<()> {
    let status = client.status()?;
    if json {
        print_json(&status);
    } else {
        print_status(&status);
    }
    Ok(())
}
