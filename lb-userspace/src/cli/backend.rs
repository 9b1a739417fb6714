//! `xlb backend`: add, remove, change, drain and list a VIP's backends; prepare a host,
//! namespace or container as a backend of direct server return.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Result, anyhow, bail};
use clap::Subcommand;
use lb_userspace::{
    api::Client,
    balancer::{BackendState, VipSpec},
    config::backend_arg,
    containers::EngineChoice,
    decap::{self, Target},
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
    /// Set this host, a network namespace or a container up as a backend of direct server
    /// return: decapsulation at tc ingress, the VIPs on lo, rp_filter and ARP settings.
    #[command(
        after_help = "Examples:\n  sudo xlb backend prepare --vip 192.0.2.10 --vip 2001:db8::10\n  sudo xlb backend prepare --vip 192.0.2.10 --interface eth1 --gue-port 9000\n  sudo xlb backend prepare --vip 192.0.2.10 --container web-1\n  sudo xlb backend prepare --vip 192.0.2.10 --netns web   # /run/netns/web\n  sudo xlb backend prepare --check\n\nThe filter is a netlink cls_bpf filter (`tc filter show dev IFACE ingress`), pref 1, handle 0x786c: it stays until removed, and goes with the interface. Running prepare again replaces it. What prepare changed is recorded under /run/xlb, so `xlb backend unprepare` removes exactly that."
    )]
    Prepare(PrepareArgs),
    /// Remove what `xlb backend prepare` set up: the filters, the VIPs it added, the sysctls
    /// it changed (where nobody changed them since).
    #[command(
        after_help = "Examples:\n  sudo xlb backend unprepare\n  sudo xlb backend unprepare --container web-1"
    )]
    Unprepare(UnprepareArgs),
}

/// Where `prepare` and `unprepare` work.
#[derive(clap::Args)]
pub struct PlaceArgs {
    /// Work in this network namespace instead of this one: a path (/proc/PID/ns/net) or a
    /// name under /run/netns (as `ip netns` knows it).
    #[arg(long, value_name = "PATH|NAME", conflicts_with = "container")]
    netns: Option<PathBuf>,
    /// Work in this container's network namespace.
    #[arg(long, value_name = "NAME")]
    container: Option<String>,
    /// The engine that runs the container.
    #[arg(long, value_enum, default_value = "auto", requires = "container")]
    engine: EngineChoice,
}

impl PlaceArgs {
    fn target(&self) -> Result<Target> {
        if let Some(name) = &self.container {
            let info = lb_userspace::containers::find(self.engine, name)
                .map_err(|e| anyhow!("--container {name}: {e}"))?;
            let pid = info
                .pid
                .ok_or_else(|| anyhow!("--container {name}: it is not running: start it first"))?;
            return Ok(Target::Netns(PathBuf::from(format!("/proc/{pid}/ns/net"))));
        }
        Ok(match &self.netns {
            None => Target::Current,
            Some(path) if path.components().count() == 1 && !path.is_absolute() => {
                Target::Netns(Path::new("/run/netns").join(path))
            }
            Some(path) => Target::Netns(path.clone()),
        })
    }
}

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// A VIP this backend serves by direct server return (repeat for several): it goes on lo
    /// as a /32 or /128. With --check: the VIPs to look for [default: those prepare added].
    #[arg(long = "vip", value_name = "ADDR", required_unless_present_any = ["check", "remove"])]
    vips: Vec<IpAddr>,
    /// An interface the balancer's tunnelled packets arrive on (repeat for several)
    /// [default: every interface with a default route].
    #[arg(long = "interface", value_name = "IFACE")]
    interfaces: Vec<String>,
    /// The UDP port GUE packets come to: the balancer's --gue-port.
    #[arg(long, value_name = "PORT", default_value_t = lb_common::DEFAULT_GUE_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    gue_port: u16,
    #[command(flatten)]
    place: PlaceArgs,
    /// Only report what is in place and what is missing, one line each, and the
    /// decapsulation counters; exit status 1 if anything is missing.
    #[arg(long, conflicts_with = "remove")]
    check: bool,
    /// Remove what prepare set up (as `xlb backend unprepare`).
    #[arg(long)]
    remove: bool,
}

#[derive(clap::Args)]
pub struct UnprepareArgs {
    /// Also remove this address from lo, whether prepare added it or not (repeat).
    #[arg(long = "vip", value_name = "ADDR")]
    vips: Vec<IpAddr>,
    #[command(flatten)]
    place: PlaceArgs,
}

impl BackendCommand {
    const fn force(&self) -> bool {
        match self {
            Self::Add { force, .. }
            | Self::Del { force, .. }
            | Self::Set { force, .. }
            | Self::Drain { force, .. } => *force,
            Self::List { .. } | Self::Prepare(_) | Self::Unprepare(_) => false,
        }
    }

    /// Whether the command works on this host alone, with no agent to talk to.
    pub const fn is_local(&self) -> bool {
        matches!(self, Self::Prepare(_) | Self::Unprepare(_))
    }
}

/// Runs a command for which [`BackendCommand::is_local`] holds.
pub fn run_local(command: BackendCommand) -> Result<()> {
    match command {
        BackendCommand::Prepare(args) => prepare(&args),
        BackendCommand::Unprepare(args) => unprepare(&args.place, &args.vips),
        _ => bail!("this `xlb backend` command needs the agent"),
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
    if command.is_local() {
        return run_local(command);
    }
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
        BackendCommand::Prepare(_) | BackendCommand::Unprepare(_) => {
            unreachable!("local commands return before the agent's client is used")
        }
    }
    Ok(())
}

fn prepare(args: &PrepareArgs) -> Result<()> {
    if args.remove {
        return unprepare(&args.place, &args.vips);
    }
    let target = args.place.target()?;
    if args.check {
        let report = decap::check(&target, &args.vips, &args.interfaces)?;
        for item in &report.items {
            println!("{:<8}{}", if item.ok { "ok" } else { "MISSING" }, item.what);
        }
        let counters: Vec<String> = report
            .counters
            .iter()
            .map(|(name, value)| format!("{name} {value}"))
            .collect();
        println!("counters: {}", counters.join(", "));
        let missing = report.items.iter().filter(|i| !i.ok).count();
        if missing > 0 {
            bail!(
                "{missing} of {} things missing in {target}",
                report.items.len()
            );
        }
        return Ok(());
    }
    let spec = decap::PrepareSpec {
        vips: args.vips.clone(),
        interfaces: args.interfaces.clone(),
        gue_port: args.gue_port,
    };
    for line in decap::prepare(&target, &spec)? {
        println!("{line}");
    }
    println!("{target} is ready for direct server return (`xlb backend prepare --check` shows it)");
    Ok(())
}

fn unprepare(place: &PlaceArgs, vips: &[IpAddr]) -> Result<()> {
    let target = place.target()?;
    let done = decap::unprepare(&target, vips)?;
    if done.is_empty() {
        println!("nothing of xlb's to remove in {target}");
    }
    for line in done {
        println!("{line}");
    }
    Ok(())
}
