//! `xlb node`: this node's announcements to its routers (drain, undrain, status).

use anyhow::Result;
use clap::Subcommand;
use lb_userspace::api::{Client, NodeStatus};

use super::render::print_json;

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Withdraw every VIP from the routers: new flows go to the other nodes, flows already
    /// here keep being forwarded (for as long as the routers still send them).
    Drain {
        #[arg(long)]
        json: bool,
    },
    /// Announce the VIPs again (those with a usable backend).
    #[command(alias = "resume")]
    Undrain {
        #[arg(long)]
        json: bool,
    },
    /// Whether the node is drained, and what it announces.
    Status {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(client: Client, command: NodeCommand) -> Result<()> {
    let (drain, json) = match command {
        NodeCommand::Drain { json } => (Some(true), json),
        NodeCommand::Undrain { json } => (Some(false), json),
        NodeCommand::Status { json } => (None, json),
    };
    let status = client.node(drain)?;
    if json {
        print_json(&status);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

fn render(status: &NodeStatus) -> String {
    let state = if status.drained { "drained" } else { "serving" };
    let Some(table) = status.announce_table else {
        return format!(
            "node: {state}; announces nothing (the agent runs without --announce-table)\n"
        );
    };
    let mut out = format!(
        "node: {state}; announce table {table}: {} VIP address(es)\n",
        status.announced.len()
    );
    for addr in &status.announced {
        out.push_str(&format!("  {addr}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_table_and_each_announced_address() {
        let status = NodeStatus {
            drained: false,
            announce_table: Some(100),
            announced: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        };
        assert_eq!(
            render(&status),
            "node: serving; announce table 100: 2 VIP address(es)\n  192.0.2.1\n  2001:db8::1\n"
        );
        let drained = NodeStatus {
            drained: true,
            announce_table: None,
            announced: Vec::new(),
        };
        assert_eq!(
            render(&drained),
            "node: drained; announces nothing (the agent runs without --announce-table)\n"
        );
    }
}
