//! `xlb conns`: a VIP's tracked flows, from the connection table (like `ipvsadm -Lc`).

use std::net::SocketAddr;

use anyhow::Result;
use lb_userspace::{api::Client, balancer::VipSpec};

use super::render::{print_conns, print_json};

#[derive(clap::Args)]
pub struct ConnsArgs {
    /// The VIP: ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp).
    vip: VipSpec,
    /// Only the flows this backend (ADDR:PORT) carries.
    #[arg(long)]
    backend: Option<SocketAddr>,
    /// Show at most this many flows (the total is counted in full).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Print JSON (for scripts) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(client: Client<'_>, args: ConnsArgs) -> Result<()> {
    let conns = client.conns(args.vip, args.backend, args.limit)?;
    if args.json {
        print_json(&conns);
    } else {
        print_conns(&conns);
    }
    Ok(())
}
