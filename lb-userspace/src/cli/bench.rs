//! `xlb bench`: runs the benchmarks of `lb_userspace::bench` and reports them.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use lb_common::DEFAULT_RING_SIZE;
use lb_userspace::{agent, balancer::Forwarding};

use super::render::print_json;

#[derive(Subcommand)]
pub enum BenchCommand {
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
        /// HAProxy binary for the connection comparison [default: haproxy on PATH].
        #[arg(long)]
        haproxy: Option<PathBuf>,
        /// Leave out the direct-server-return row (xlb with an IPIP VIP; one more packet-rate
        /// configuration, a few seconds).
        #[arg(long)]
        no_dsr: bool,
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

pub fn run(command: BenchCommand) -> Result<()> {
    use lb_userspace::bench::{
        Machine,
        cost::{self, CostOptions, ScalingOptions},
        report,
    };
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
            haproxy,
            no_dsr,
            json,
            out,
        } => {
            use lb_userspace::bench::forward::{self, ForwardOptions};
            let mut options = if quick {
                ForwardOptions::quick()
            } else {
                ForwardOptions::full()
            };
            if let Some(flows) = flows {
                options.flows = flows;
            }
            options.haproxy = haproxy;
            options.dsr = !no_dsr;
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
