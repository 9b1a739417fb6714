//! `xlb stats` and `xlb explain`: what the data path counted, and where a flow goes.

use std::{io::Write as _, net::SocketAddr, time::Duration};

use anyhow::Result;
use lb_userspace::{api::Client, balancer::VipSpec};

use super::render::{print_explanation, print_json, print_stats};

#[derive(clap::Args)]
pub struct StatsArgs {
    /// Print JSON (for scripts) instead of a table.
    #[arg(long)]
    json: bool,
    /// Refresh every second in place.
    #[arg(long)]
    watch: bool,
}

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// The client: ADDR:PORT, as its packets arrive.
    client: SocketAddr,
    /// The VIP: ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp).
    vip: VipSpec,
    /// Print JSON (for scripts) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn stats(client: Client<'_>, StatsArgs { json, watch }: StatsArgs) -> Result<()> {
    loop {
        let stats = match client.stats() {
            Ok(stats) => stats,
            // Watching outlives an agent restart: say so and keep trying.
            Err(e) if watch => {
                eprintln!("xlb: {:#} (retrying every second)", anyhow::Error::new(e));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        // Clear the screen only on a terminal: a pipe or file gets the plain reports.
        if watch && !json && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            print!("\x1b[H\x1b[2J");
        }
        if json {
            print_json(&stats);
        } else {
            print_stats(&stats);
        }
        std::io::stdout().flush().ok();
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

pub fn explain(
    client: Client<'_>,
    ExplainArgs {
        client: from,
        vip,
        json,
    }: ExplainArgs,
) -> Result<()> {
    let explanation = client.explain(from, vip)?;
    if json {
        print_json(&explanation);
    } else {
        print_explanation(&explanation);
    }
    Ok(())
}
