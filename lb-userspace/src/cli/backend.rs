//! `xlb backend`: add, remove, change, drain and list a VIP's backends.

use std::net::SocketAddr;

use anyhow::{Result, anyhow, bail};
use clap::Subcommand;
use lb_userspace::{
    api::Client,
    balancer::{BackendState, VipSpec},
    config::backend_arg,
};

use super::render::{print_backends, print_json};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum StateArg {
    Active,
    Draining,
}

impl From<StateArg> for BackendState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Active => Self::Active,
            StateArg::Draining => Self::Draining,
        }
    }
}

#[derive(Subcommand)]
pub enum BackendCommand {
    /// Add a backend to a VIP, by address or by container name.
    #[command(
        after_help = "Examples:\n  xlb backend add 192.0.2.10:80/tcp 10.88.0.14:8080\n  xlb backend add 192.0.2.10:80/tcp 10.88.0.15:8080 --weight 2\n  xlb backend add 192.0.2.10:80/tcp --container web-1:8080"
    )]
    Add {
        /// The VIP: ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp).
        vip: VipSpec,
        /// BACKEND_ADDR:PORT (a direct-server-return VIP's backend: BACKEND_ADDR alone, or
        /// with the VIP's port)
        #[arg(required_unless_present = "container", conflicts_with = "container", value_parser = backend_arg)]
        backend: Option<SocketAddr>,
        /// A podman or docker container NAME[:PORT], followed from then on: out of the ring
        /// while stopped, re-resolved when it starts again [port: the container's single
        /// exposed port].
        #[arg(long)]
        container: Option<String>,
        /// Share of new flows relative to the other backends (0-1000; 0 drains it, as in
        /// IPVS: no new flows, its established ones go on).
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Change an agent that runs from a --config file anyway (until its next reload).
        #[arg(long)]
        force: bool,
    },
    /// Remove a backend; its established flows move to the others.
    #[command(after_help = "Example:\n  xlb backend del 192.0.2.10:80/tcp 10.88.0.14:8080")]
    Del {
        /// The VIP: ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp).
        vip: VipSpec,
        /// The backend: ADDR:PORT (ADDR alone for a direct-server-return VIP).
        #[arg(value_parser = backend_arg)]
        backend: SocketAddr,
        /// Change an agent that runs from a --config file anyway (until its next reload).
        #[arg(long)]
        force: bool,
    },
    /// Change a backend's weight (the ring is rebuilt with minimal disruption) or state.
    #[command(
        after_help = "Examples:\n  xlb backend set 192.0.2.10:80/tcp 10.88.0.14:8080 --weight 3\n  xlb backend set 192.0.2.10:80/tcp 10.88.0.14:8080 --state active\n  xlb backend set 192.0.2.10:80/tcp 10.88.0.14:8080 --weight 0   # drain, as with ipvsadm -w 0"
    )]
    Set {
        /// The VIP: ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp).
        vip: VipSpec,
        /// The backend: ADDR:PORT (ADDR alone for a direct-server-return VIP).
        #[arg(value_parser = backend_arg)]
        backend: SocketAddr,
        /// New weight (0-1000; 0 drains the backend: no new flows, established ones go on).
        #[arg(long)]
        weight: Option<u32>,
        /// active: takes new flows; draining: keeps its established flows, takes no new ones.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Change an agent that runs from a --config file anyway (until its next reload).
        #[arg(long)]
        force: bool,
    },
    /// Stop sending new flows to a backend; its established flows continue until they end.
    /// `xlb backend list` shows how many remain.
    #[command(after_help = "Example:\n  xlb backend drain 192.0.2.10:80/tcp 10.88.0.14:8080")]
    Drain {
        /// The VIP: ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp).
        vip: VipSpec,
        /// The backend: ADDR:PORT (ADDR alone for a direct-server-return VIP).
        #[arg(value_parser = backend_arg)]
        backend: SocketAddr,
        /// Change an agent that runs from a --config file anyway (until its next reload).
        #[arg(long)]
        force: bool,
    },
    /// List a VIP's backends with their weights, ring slots and traffic.
    #[command(
        after_help = "Examples:\n  xlb backend list 192.0.2.10:80/tcp\n  xlb backend list 192.0.2.10:80/tcp --json"
    )]
    List {
        /// The VIP: ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp).
        vip: VipSpec,
        /// Print JSON (for scripts) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

impl BackendCommand {
    const fn force(&self) -> bool {
        match self {
            Self::Add { force, .. }
            | Self::Del { force, .. }
            | Self::Set { force, .. }
            | Self::Drain { force, .. } => *force,
            Self::List { .. } => false,
        }
    }
}

/// A backend as the agent took it: without a port, the (direct-server-return) VIP's.
fn as_resolved(vip: &VipSpec, backend: SocketAddr) -> SocketAddr {
    if backend.port() == 0 {
        SocketAddr::new(backend.ip(), vip.addr.port())
    } else {
        backend
    }
}

pub fn run(client: Client<'_>, command: BackendCommand) -> Result<()> {
    let client = client.forcing(command.force());
    match command {
        BackendCommand::Add {
            vip,
            backend,
            container,
            weight,
            ..
        } => {
            match (backend, container) {
                (Some(backend), _) => {
                    for warning in client.backend_add(vip, backend, weight)? {
                        eprintln!("xlb: warning: {warning}");
                    }
                    let backend = as_resolved(&vip, backend);
                    println!("added backend {backend} to {vip} (weight {weight})");
                }
                (None, Some(spec)) => {
                    // The agent resolves the name, and follows the container from then on.
                    let (name, port) = lb_userspace::containers::parse_container_arg(&spec)
                        .map_err(|e| anyhow!("--container {spec}: {e}"))?;
                    let (backend, warnings) =
                        client.container_backend_add(vip, name.clone(), port, weight)?;
                    for warning in warnings {
                        eprintln!("xlb: warning: {warning}");
                    }
                    println!(
                        "added backend {backend} (container {name}, followed) to {vip} (weight {weight})"
                    );
                }
                (None, None) => bail!("give BACKEND_ADDR:PORT or --container NAME"),
            }
        }
        BackendCommand::Del { vip, backend, .. } => {
            client.backend_del(vip, backend)?;
            let backend = as_resolved(&vip, backend);
            println!("removed backend {backend} from {vip}");
        }
        BackendCommand::Set {
            vip,
            backend,
            weight,
            state,
            ..
        } => {
            if weight.is_none() && state.is_none() {
                bail!("nothing to change: give --weight N and/or --state active|draining");
            }
            client.backend_set(vip, backend, weight, state.map(Into::into))?;
            let backend = as_resolved(&vip, backend);
            println!("updated backend {backend} of {vip}");
        }
        BackendCommand::Drain { vip, backend, .. } => {
            client.backend_set(vip, backend, None, Some(BackendState::Draining))?;
            let backend = as_resolved(&vip, backend);
            println!(
                "draining backend {backend} of {vip}: no new flows; `xlb backend list {vip}` shows the flows it still has"
            );
        }
        BackendCommand::List { vip, json } => {
            let status = client.backend_list(vip)?;
            if json {
                print_json(&status);
            } else {
                print_backends(&status);
            }
        }
    }
    Ok(())
}
