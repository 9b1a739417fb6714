//! The `xlb` command line: the agent (`xlb run`) and the commands that talk to it, one
//! module per command group; how replies are shown lives in `render`.

mod backend;
mod bench;
mod config;
mod conns;
mod generate;
mod node;
mod render;
mod run;
mod stats;
mod status;
mod top;
mod vip;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_userspace::{api::Client, paths};

#[derive(Parser)]
#[command(
    name = "xlb",
    version,
    about = "An XDP layer-4 load balancer: VIPs in front of your containers",
    after_help = "Examples:\n  sudo xlb run --iface eth0\n  xlb vip add 192.0.2.10:80/tcp\n  xlb backend add 192.0.2.10:80/tcp 10.88.0.14:8080\n  xlb stats --watch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// `xlb --socket PATH VERB`, as earlier versions took it: the socket for a verb that
    /// talks to the agent and names none itself. Hidden: each such verb shows its own.
    #[arg(long = "socket", hide = true)]
    socket_before_verb: Option<PathBuf>,
}

/// `--socket`, on the verbs that talk to the agent (and `run`, which serves it).
#[derive(clap::Args)]
pub struct SocketArg {
    /// The agent's control socket [default: /run/xlb/xlb.sock in the host's network
    /// namespace, /run/xlb/netns-INODE/xlb.sock in another]
    #[arg(long, env = "XLB_SOCKET")]
    socket: Option<PathBuf>,
}

/// A verb's own arguments and `--socket`.
#[derive(clap::Args)]
pub struct WithSocket<T: clap::Args> {
    #[command(flatten)]
    args: T,
    #[command(flatten)]
    socket: SocketArg,
}

/// A group of verbs that all talk to the agent: `--socket` goes with any of them.
#[derive(clap::Args)]
pub struct Group<T: Subcommand> {
    #[command(subcommand)]
    command: T,
    /// The agent's control socket [default: /run/xlb/xlb.sock in the host's network
    /// namespace, /run/xlb/netns-INODE/xlb.sock in another]
    #[arg(long, env = "XLB_SOCKET", global = true)]
    socket: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ReloadArgs {
    /// Only print what the reload would change.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: attach the data plane and serve the control API until SIGINT/SIGTERM.
    #[command(
        after_help = "Logs go to stderr, one line per event, in colour only on a terminal (and without NO_COLOR). RUST_LOG sets what is logged, in tracing's filter syntax [default: info]; every change through the control API is logged once, with the peer's uid and pid.\n\nExamples:\n  sudo xlb run --iface eth0\n  sudo xlb run --iface eth0 --iface veth-web1   # NIC on native XDP, veth on TC\n  sudo xlb run --iface eth0 --xdp-mode tc\n  sudo RUST_LOG=debug xlb run --iface eth0\n  sudo RUST_LOG=info,lb_userspace::health=debug xlb run --iface eth0"
    )]
    Run(WithSocket<run::RunArgs>),
    /// Re-read the agent's --config file and apply only what changed.
    #[command(
        after_help = "Examples:\n  xlb reload          # or: kill -HUP $(pidof xlb)\n  xlb reload --dry-run"
    )]
    Reload(WithSocket<ReloadArgs>),
    /// Check a config file, compare it with the running state, or dump the running state as one.
    #[command(
        subcommand,
        after_help = "Examples:\n  xlb config check /etc/xlb/xlb.toml\n  xlb config diff /etc/xlb/xlb.toml\n  xlb config dump"
    )]
    Config(config::ConfigCommand),
    /// Remove a data path left running by `xlb run --keep-attached`.
    #[command(after_help = "Example:\n  sudo xlb detach")]
    Detach {
        /// Where the agent pinned it [default: /sys/fs/bpf/xlb]
        #[arg(long)]
        bpffs: Option<PathBuf>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Add, change, remove or list VIPs.
    #[command(
        after_help = "Examples:\n  xlb vip add 192.0.2.10:80/tcp\n  xlb vip set 192.0.2.10:80/tcp --health tcp\n  xlb vip list"
    )]
    Vip(Group<vip::VipCommand>),
    /// Add, remove, change, drain or list a VIP's backends; prepare a backend for direct
    /// server return.
    #[command(
        after_help = "Examples:\n  xlb backend add 192.0.2.10:80/tcp 10.88.0.14:8080\n  xlb backend drain 192.0.2.10:80/tcp 10.88.0.14:8080\n  xlb backend list 192.0.2.10:80/tcp"
    )]
    Backend(Group<backend::BackendCommand>),
    /// Packets, bytes and new flows per VIP and backend, and the global counters.
    #[command(after_help = "Examples:\n  xlb stats\n  xlb stats --watch\n  xlb stats --json")]
    Stats(WithSocket<stats::StatsArgs>),
    /// The agent, its interfaces and hooks, VIP and backend counts, health, and the data-path
    /// counters that signal trouble, on one screen.
    #[command(after_help = "Examples:\n  xlb status\n  xlb status --json")]
    Status(WithSocket<status::StatusArgs>),
    /// A VIP's tracked flows from the connection table: client, backend, TCP state, idle
    /// time, whether the entry still holds (like `ipvsadm -Lc` or `cilium bpf ct list`).
    #[command(
        after_help = "Examples:\n  xlb conns 192.0.2.10:80/tcp\n  xlb conns 192.0.2.10:80/tcp --backend 10.88.0.14:8080 --limit 20\n  xlb conns 192.0.2.10:80/tcp --json"
    )]
    Conns(WithSocket<conns::ConnsArgs>),
    /// Measure xlb: program cost, forwarding rate next to nftables and the redirect ceiling,
    /// connection rates next to HAProxy, scaling (see docs/benchmarks.md).
    // The benchmarks are the program `xlb-bench`: every argument, `--help` too, goes to it.
    #[command(
        disable_help_flag = true,
        after_help = "Runs xlb-bench (next to xlb, or on PATH) with these arguments; `xlb bench --help` shows its own.\n\nExamples:\n  sudo xlb bench cost\n  sudo xlb bench forward --quick"
    )]
    Bench(bench::BenchArgs),
    /// Which backend a new flow from CLIENT gets, and whether the connection table holds it.
    #[command(after_help = "Example:\n  xlb explain 198.51.100.7:40000 192.0.2.10:80/tcp")]
    Explain(WithSocket<stats::ExplainArgs>),
    /// A live view of the VIPs and backends: rates, health, ring slots, live flows, sortable
    /// (`xlb stats --watch` is the one for scripts).
    #[command(
        after_help = "Keys: s sorts by the next column (address, packets/s, bytes/s, new flows/s, live flows), q or Esc quits.\n\nExamples:\n  xlb top\n  xlb top --interval 5"
    )]
    Top(WithSocket<top::TopArgs>),
    /// This node's announcements to its routers: drain (withdraw every VIP, keep forwarding
    /// the flows already here), undrain, status (see docs/scale-out.md).
    #[command(after_help = "Examples:\n  xlb node drain\n  xlb node undrain\n  xlb node status")]
    Node(Group<node::NodeCommand>),
    /// Write shell completions and man pages (what `./x build` puts into target/).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
}

/// `xlb help VERB --help` means `xlb help VERB`: clap's help verb takes no flags of its own.
fn arguments() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "help") {
        args.retain(|a| a != "--help" && a != "-h");
    }
    args
}

pub fn main() -> ExitCode {
    let cli: Cli = match lb_userspace::cli_args::parse_args("xlb", arguments()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if !matches!(cli.command, Command::Run(_)) {
        // A client writing into a pipe its reader closed (`xlb stats | head`) ends quietly,
        // as Unix tools do, instead of panicking on the write. The agent keeps ignoring
        // SIGPIPE: it writes to sockets whose peers may go away.
        // SAFETY: restores the default disposition before any other thread exists.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    // The socket a verb talks to, and whether it is the default (which a note may qualify).
    let mut defaulted = false;
    let before_verb = cli.socket_before_verb.clone();
    let mut socket = |given: Option<PathBuf>| {
        given.or_else(|| before_verb.clone()).unwrap_or_else(|| {
            defaulted = true;
            paths::default_socket()
        })
    };
    let result = match cli.command {
        Command::Run(WithSocket { args, socket }) => {
            run::run(args, socket.socket.or_else(|| before_verb.clone()))
        }
        Command::Bench(args) => bench::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Config(command) => config::run(command, &mut socket),
        Command::Detach { bpffs, socket: s } => run::detach(bpffs, &socket(s.socket)),
        Command::Reload(WithSocket { args, socket: s }) => {
            config::reload(Client::new(&socket(s.socket)), args.dry_run)
        }
        Command::Vip(Group { command, socket: s }) => vip::run(Client::new(&socket(s)), command),
        // Preparing a backend talks to no agent: no socket to default to, or to blame.
        Command::Backend(Group { command, .. }) if command.is_local() => {
            backend::run_local(command)
        }
        Command::Backend(Group { command, socket: s }) => {
            backend::run(Client::new(&socket(s)), command)
        }
        Command::Stats(WithSocket { args, socket: s }) => {
            stats::stats(Client::new(&socket(s.socket)), args)
        }
        Command::Status(WithSocket { args, socket: s }) => {
            status::run(Client::new(&socket(s.socket)), args)
        }
        Command::Conns(WithSocket { args, socket: s }) => {
            conns::run(Client::new(&socket(s.socket)), args)
        }
        Command::Top(WithSocket { args, socket: s }) => {
            top::run(Client::new(&socket(s.socket)), args)
        }
        Command::Explain(WithSocket { args, socket: s }) => {
            stats::explain(Client::new(&socket(s.socket)), args)
        }
        Command::Node(Group { command, socket: s }) => node::run(Client::new(&socket(s)), command),
    };
    // Where the host's namespace could not be told apart, the default path is a guess: an
    // error (no agent there, say) comes with what was guessed and why.
    let result = result.map_err(|e| match paths::namespace_unknown() {
        Some(why) if defaulted => e.context(format!(
            "{why}: used {}, the host namespace's socket (give --socket or XLB_SOCKET otherwise)",
            paths::default_socket().display()
        )),
        _ => e,
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
