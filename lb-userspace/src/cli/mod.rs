//! The `xlb` command line: the agent (`xlb run`) and the commands that talk to it, one
//! module per command group; how replies are shown lives in `render`.

mod backend;
mod bench;
mod config;
mod conns;
mod container;
mod render;
mod run;
mod stats;
mod status;
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
    /// The agent's control socket [default: /run/xlb/xlb.sock in the host's network namespace]
    #[arg(long, global = true, env = "XLB_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: attach the data plane and serve the control API until SIGINT/SIGTERM.
    #[command(
        after_help = "Logs go to stderr, one line per event, in colour only on a terminal (and without NO_COLOR). RUST_LOG sets what is logged, in tracing's filter syntax [default: info]; every change through the control API is logged once, with the peer's uid and pid.\n\nExamples:\n  sudo xlb run --iface eth0\n  sudo xlb run --iface eth0 --iface veth-web1   # NIC on native XDP, veth on TC\n  sudo xlb run --iface eth0 --xdp-mode tc\n  sudo RUST_LOG=debug xlb run --iface eth0\n  sudo RUST_LOG=info,lb_userspace::health=debug xlb run --iface eth0"
    )]
    Run(run::RunArgs),
    /// Re-read the agent's --config file and apply only what changed.
    #[command(
        after_help = "Examples:\n  xlb reload          # or: kill -HUP $(pidof xlb)\n  xlb reload --dry-run"
    )]
    Reload {
        /// Only print what the reload would change.
        #[arg(long)]
        dry_run: bool,
    },
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
    },
    /// Add, change, remove or list VIPs.
    #[command(
        subcommand,
        after_help = "Examples:\n  xlb vip add 192.0.2.10:80/tcp\n  xlb vip set 192.0.2.10:80/tcp --health tcp\n  xlb vip list"
    )]
    Vip(vip::VipCommand),
    /// Add, remove, change, drain or list a VIP's backends.
    #[command(
        subcommand,
        after_help = "Examples:\n  xlb backend add 192.0.2.10:80/tcp 10.88.0.14:8080\n  xlb backend drain 192.0.2.10:80/tcp 10.88.0.14:8080\n  xlb backend list 192.0.2.10:80/tcp"
    )]
    Backend(backend::BackendCommand),
    /// Packets, bytes and new flows per VIP and backend, and the global counters.
    #[command(after_help = "Examples:\n  xlb stats\n  xlb stats --watch\n  xlb stats --json")]
    Stats(stats::StatsArgs),
    /// The agent, its interfaces and hooks, VIP and backend counts, health, and the data-path
    /// counters that signal trouble, on one screen.
    #[command(after_help = "Examples:\n  xlb status\n  xlb status --json")]
    Status(status::StatusArgs),
    /// A VIP's tracked flows from the connection table: client, backend, TCP state, idle
    /// time, whether the entry still holds (like `ipvsadm -Lc` or `cilium bpf ct list`).
    #[command(
        after_help = "Examples:\n  xlb conns 192.0.2.10:80/tcp\n  xlb conns 192.0.2.10:80/tcp --backend 10.88.0.14:8080 --limit 20\n  xlb conns 192.0.2.10:80/tcp --json"
    )]
    Conns(conns::ConnsArgs),
    /// Measure xlb: program cost, forwarding rate next to nftables and the redirect ceiling,
    /// connection rates next to HAProxy, scaling (see docs/benchmarks.md).
    #[command(
        subcommand,
        after_help = "Examples:\n  sudo xlb bench cost\n  sudo xlb bench forward --quick"
    )]
    Bench(bench::BenchCommand),
    /// Which backend a new flow from CLIENT gets, and whether the connection table holds it.
    #[command(after_help = "Example:\n  xlb explain 198.51.100.7:40000 192.0.2.10:80/tcp")]
    Explain(stats::ExplainArgs),
}

/// clap's error as one line, like every other xlb error: its first paragraph, which names
/// the missing arguments or lists the accepted values on lines of their own.
fn one_line(clap_error: &str) -> String {
    let words: Vec<&str> = clap_error
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(|line| line.trim().trim_start_matches("error: "))
        .collect();
    if words.is_empty() {
        "invalid arguments".to_owned()
    } else {
        words.join(" ")
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    return ExitCode::SUCCESS;
                }
                // `xlb vip` alone: the verb's help is the useful answer, but it is not success.
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    return ExitCode::from(2);
                }
                _ => {}
            }
            eprintln!("xlb: {} (see --help)", one_line(&e.to_string()));
            return ExitCode::from(2);
        }
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
    let socket = || cli.socket.clone().unwrap_or_else(paths::default_socket);
    let result = match cli.command {
        Command::Run(args) => run::run(args, cli.socket.clone()),
        Command::Bench(command) => bench::run(command),
        Command::Config(command) => config::run(Client::new(&socket()), command),
        Command::Detach { bpffs } => run::detach(bpffs, &socket()),
        Command::Reload { dry_run } => config::reload(Client::new(&socket()), dry_run),
        Command::Vip(command) => vip::run(Client::new(&socket()), command),
        Command::Backend(command) => backend::run(Client::new(&socket()), command),
        Command::Stats(args) => stats::stats(Client::new(&socket()), args),
        Command::Status(args) => status::run(Client::new(&socket()), args),
        Command::Conns(args) => conns::run(Client::new(&socket()), args),
        Command::Explain(args) => stats::explain(Client::new(&socket()), args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
