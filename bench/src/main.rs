//! `xlb-bench`, the benchmarks' program. Users run it as `xlb bench ...`: `xlb` finds
//! `xlb-bench` next to itself or on PATH and runs it in its place with the same arguments, as
//! git and cargo run their external subcommands, so the product binary links none of this.

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser, Subcommand};
use lb_common::DEFAULT_RING_SIZE;
use lb_userspace::{agent, balancer::Forwarding};
use xlb_bench::{
    Machine,
    cost::{self, CostOptions, ScalingOptions},
    forward::{self, ForwardOptions},
    report,
};

/// Measure xlb: program cost, forwarding rate next to nftables and the redirect ceiling,
/// connection rates next to HAProxy, scaling (see docs/benchmarks.md).
#[derive(Parser)]
#[command(
    name = "xlb-bench",
    version,
    after_help = "Run as `xlb bench ...` or as `xlb-bench ...`; both need root.\n\nExamples:\n  sudo xlb bench cost\n  sudo xlb bench forward --quick"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Bench(BenchCommand),
    /// Write shell completions and the man page (what `./x build` puts into target/).
    #[command(hide = true)]
    Generate {
        /// Directory to write completions/ (bash, zsh, fish) and man/xlb-bench.1 into.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Program cost per packet type through BPF_PROG_TEST_RUN, next to an empty program and
    /// a parse-only program measured in the same run.
    #[command(
        after_help = "Examples:\n  sudo xlb bench cost\n  sudo xlb bench cost --calls 2000 --runs 3 --json"
    )]
    Cost {
        /// Test-run calls per run.
        #[arg(long, default_value_t = 20_000)]
        calls: u32,
        /// Runs per packet type and program (min/median/max are over runs).
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Test-run calls before the measured ones.
        #[arg(long, default_value_t = 2_000)]
        warmup: u32,
        /// Backends behind the VIP.
        #[arg(long, default_value_t = 100)]
        backends: u32,
        /// How the VIP reaches its backends: nat, or ipip / gue (direct server return: the
        /// same work as Katran's IPIP encapsulation).
        #[arg(long, default_value = "nat")]
        forwarding: Forwarding,
        /// Print JSON (for scripts) instead of a table.
        #[arg(long)]
        json: bool,
        /// Where the JSON report is written.
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// Packets per second through generator → LB → backend namespaces: xlb (NAT, and direct
    /// server return over IPIP) next to a plain XDP redirect (the ceiling), nftables DNAT and
    /// plain routing; then TCP connections and
    /// requests per second through xlb, nftables and HAProxy.
    #[command(
        after_help = "Examples:\n  sudo xlb bench forward\n  sudo xlb bench forward --quick --json"
    )]
    Forward {
        /// Small sizes only (a smoke run; its figures mean little).
        #[arg(long)]
        quick: bool,
        /// Distinct flows the generator cycles through.
        #[arg(long)]
        flows: Option<u32>,
        /// Rounds of the packet-rate test (each measures every row once; ratios are taken
        /// within a round); the time per row stays the same, split over more rounds.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: Option<u32>,
        /// HAProxy binary for the connection comparison [default: haproxy on PATH].
        #[arg(long)]
        haproxy: Option<PathBuf>,
        /// Leave out the direct-server-return row (xlb with an IPIP VIP; one more packet-rate
        /// configuration, a few seconds).
        #[arg(long)]
        no_dsr: bool,
        /// Also measure another build's data path (its `lb-ebpf` object file) in the same
        /// rounds, right after this build's: a change and its base, side by side.
        #[arg(long, value_name = "OBJECT")]
        against: Option<PathBuf>,
        /// Print JSON (for scripts) instead of a table.
        #[arg(long)]
        json: bool,
        /// Where the JSON report is written.
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// Cost per packet as flows (1..1M), backends per VIP (2..1000) and VIPs (1..1000) grow;
    /// writes SVG plots.
    #[command(after_help = "Examples:\n  sudo xlb bench scaling\n  sudo xlb bench scaling --quick")]
    Scaling {
        /// Small sizes only (a smoke run).
        #[arg(long)]
        quick: bool,
        /// Test-run calls per measurement.
        #[arg(long, default_value_t = 20_000)]
        calls: u32,
        /// Print JSON (for scripts) instead of a table.
        #[arg(long)]
        json: bool,
        /// Where the JSON report is written.
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("serialisable")
    );
}

fn run(command: BenchCommand) -> Result<()> {
    agent::require_root("xlb bench")?;
    match command {
        BenchCommand::Cost {
            calls,
            runs,
            warmup,
            backends,
            forwarding,
            json,
            out,
        } => {
            let rows = cost::run_cost(
                CostOptions {
                    calls,
                    runs,
                    warmup,
                    backends,
                    ring_size: DEFAULT_RING_SIZE,
                    forwarding,
                },
                json,
            )?;
            let report = report::CostReport {
                machine: Machine::current(),
                method: report::COST_METHOD,
                forwarding: forwarding.to_string(),
                rows: &rows,
            };
            report::write_json(&out, "cost.json", &report)?;
            if json {
                print_json(&report);
            } else {
                report::print_cost(&rows);
                println!("report: {}", out.join("cost.json").display());
            }
        }
        BenchCommand::Forward {
            quick,
            flows,
            rounds,
            haproxy,
            no_dsr,
            against,
            json,
            out,
        } => {
            let mut options = if quick {
                ForwardOptions::quick()
            } else {
                ForwardOptions::full()
            };
            if let Some(flows) = flows {
                options.flows = flows;
            }
            if let Some(rounds) = rounds {
                options.rounds = rounds;
            }
            options.haproxy = haproxy;
            options.dsr = !no_dsr;
            options.against = against;
            let report = forward::run(&options, json)?;
            report::write_json(&out, "forward.json", &report)?;
            if json {
                print_json(&report);
            } else {
                forward::print(&report);
                println!("report: {}", out.join("forward.json").display());
            }
        }
        BenchCommand::Scaling {
            quick,
            calls,
            json,
            out,
        } => {
            let options = if quick {
                ScalingOptions {
                    flows: &[1, 1_000],
                    backends: &[2, 10],
                    vips: &[1, 10],
                    calls,
                    ring_size: 251,
                    vip_ring_size: 251,
                }
            } else {
                ScalingOptions {
                    flows: &[1, 1_000, 100_000, 1_000_000],
                    backends: &[2, 10, 100, 1_000],
                    vips: &[1, 100, 1_000],
                    calls,
                    ring_size: DEFAULT_RING_SIZE,
                    vip_ring_size: 1_021,
                }
            };
            let scaling = cost::run_scaling(&options, json)?;
            report::write_json(&out, "scaling.json", &scaling)?;
            report::write_scaling_plots(&out, &scaling)?;
            if json {
                print_json(&scaling);
            } else {
                report::print_scaling(&scaling);
                println!(
                    "report and plots: {}/scaling.json, scaling-*.svg",
                    out.display()
                );
            }
        }
    }
    Ok(())
}

fn generate(out: &std::path::Path) -> Result<()> {
    use clap_complete::Shell;
    let completions = out.join("completions");
    let man = out.join("man");
    for dir in [&completions, &man] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path =
            clap_complete::generate_to(shell, &mut Cli::command(), "xlb-bench", &completions)
                .with_context(|| format!("writing {shell} completions"))?;
        println!("{}", path.display());
    }
    // The page `man xlb-bench` finds: `xlb bench` runs this program, and xlb's own pages
    // leave the verb to it.
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    let path = man.join("xlb-bench.1");
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    // `xlb bench` passes "xlb bench" as the program name, so usage lines and errors read as
    // the command the user typed.
    let name = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map_or_else(
            || "xlb-bench".to_owned(),
            |a| a.to_string_lossy().into_owned(),
        );
    let cli: Cli = match lb_userspace::cli_args::parse_args(&name, args) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::Bench(command) => run(command),
        Command::Generate { out } => generate(&out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
