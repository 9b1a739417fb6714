//! `xlb`: the agent (`xlb run`) and the commands that talk to it.

use std::{io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use lb_common::{DEFAULT_HASH_SEED, DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE};
use lb_userspace::{
    agent::{self, AgentOptions},
    api::{self, Reply, Request},
    attach::ModeChoice,
    balancer::{BackendState, Protocol, VipSpec, VipStatus, validate_idle_timeout},
    datapath::DatapathConfig,
    health::{HealthSpec, Probe, decode_hex},
    paths,
};

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
        after_help = "Examples:\n  sudo xlb run --iface eth0\n  sudo xlb run --iface eth0 --iface veth-web1   # NIC on native XDP, veth on TC\n  sudo xlb run --iface eth0 --xdp-mode tc"
    )]
    Run {
        /// Interface to attach to (repeatable): the client-facing one and the backend-facing
        /// ones. Required unless the --config file's [agent] ifaces lists them.
        #[arg(long = "iface")]
        ifaces: Vec<String>,
        /// Hook per interface: auto puts NICs on native XDP (TC if the driver refuses) and veths,
        /// bridges and other virtual devices on TC; native, skb (generic XDP) or tc force one
        /// hook everywhere [default: auto]
        #[arg(long, value_enum)]
        xdp_mode: Option<ModeChoice>,
        /// Where maps are pinned [default: /sys/fs/bpf/xlb; mounted if needed]
        #[arg(long)]
        bpffs: Option<PathBuf>,
        /// Desired-state file, restored on start [default: /var/lib/xlb/state.json]
        #[arg(long)]
        state: Option<PathBuf>,
        /// Slots per Maglev ring (prime).
        #[arg(long, default_value_t = DEFAULT_RING_SIZE)]
        ring_size: u32,
        /// Room for this many VIPs.
        #[arg(long, default_value_t = DEFAULT_MAX_VIPS)]
        max_vips: u32,
        /// Flow-hash seed; give every node behind the same ECMP group the same seed.
        #[arg(long, default_value_t = DEFAULT_HASH_SEED)]
        hash_seed: u32,
        /// Connection-table entries (LRU; each CPU's list holds ENTRIES / CPUs flows).
        #[arg(long, default_value_t = lb_common::CONNTRACK_ENTRIES)]
        conntrack_entries: u32,
        /// On SIGINT/SIGTERM leave the data path running (program attached, maps pinned);
        /// the next `xlb run` adopts it without losing a flow. `xlb detach` removes it.
        #[arg(long)]
        keep_attached: bool,
        /// Serve Prometheus metrics on ADDR (/metrics) [default: 127.0.0.1:9464]
        #[arg(long, conflicts_with = "no_metrics")]
        metrics: Option<std::net::SocketAddr>,
        #[arg(long)]
        no_metrics: bool,
        /// Declarative config (see examples/xlb.toml): VIPs, backends, weights, health
        /// checks. `xlb reload` or SIGHUP re-read it and apply only what changed.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Make running containers labelled xlb.vip=ADDR:PORT/PROTO (optional xlb.port,
        /// xlb.weight, xlb.health=tcp|udp|http:/PATH) backends of that VIP, following the
        /// engine's events: added when they start, drained and removed when they stop.
        #[arg(long, value_enum, value_name = "ENGINE")]
        containers: Option<lb_userspace::containers::EngineChoice>,
    },
    /// Re-read the agent's --config file and apply only what changed.
    #[command(after_help = "Example:\n  xlb reload          # or: kill -HUP $(pidof xlb)")]
    Reload,
    /// Check a config file without applying it.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Remove a data path left running by `xlb run --keep-attached`.
    #[command(after_help = "Example:\n  sudo xlb detach")]
    Detach {
        /// Where the agent pinned it [default: /sys/fs/bpf/xlb]
        #[arg(long)]
        bpffs: Option<PathBuf>,
    },
    /// Add, remove or list VIPs.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Add, remove or list a VIP's backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Packets, bytes and new flows per VIP and backend, and the global counters.
    #[command(after_help = "Examples:\n  xlb stats\n  xlb stats --watch\n  xlb stats --json")]
    Stats {
        #[arg(long)]
        json: bool,
        /// Refresh every second in place.
        #[arg(long)]
        watch: bool,
    },
    /// Measure xlb: program cost, forwarding rate next to nftables and the redirect ceiling,
    /// connection rates next to HAProxy, scaling (see docs/benchmarks.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Which backend a new flow from CLIENT gets, and whether the connection table holds it.
    #[command(after_help = "Example:\n  xlb explain 198.51.100.7:40000 192.0.2.10:80/tcp")]
    Explain {
        client: SocketAddr,
        vip: VipSpec,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StateArg {
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
        #[arg(long, default_value_t = 2_000)]
        warmup: u32,
        /// Backends behind the VIP.
        #[arg(long, default_value_t = 100)]
        backends: u32,
        #[arg(long)]
        json: bool,
        /// Where the JSON report is written.
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// Packets per second through generator → LB → backend namespaces: xlb next to a plain
    /// XDP redirect (the ceiling), nftables DNAT and plain routing; then TCP connections and
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
        #[arg(long)]
        json: bool,
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
        #[arg(long, default_value_t = 20_000)]
        calls: u32,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE: exit 0 if it would load, else one line naming FILE:LINE:COLUMN.
    #[command(after_help = "Example:\n  xlb config check /etc/xlb/xlb.toml")]
    Check { file: PathBuf },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProbeArg {
    Tcp,
    Http,
    Udp,
}

/// Health-check options of `xlb vip add`.
#[derive(clap::Args)]
struct HealthArgs {
    /// Check the VIP's backends: tcp (connect) or http (GET, expect a status) for a TCP VIP,
    /// udp (send a datagram, see --health-payload) for a UDP VIP.
    #[arg(long)]
    health: Option<ProbeArg>,
    /// HTTP path to GET.
    #[arg(long, default_value = "/", requires = "health")]
    health_path: String,
    /// HTTP status a healthy backend answers with.
    #[arg(long, default_value_t = 200, requires = "health")]
    health_status: u16,
    #[arg(long, default_value_t = 2000, requires = "health")]
    health_interval_ms: u64,
    #[arg(long, default_value_t = 1000, requires = "health")]
    health_timeout_ms: u64,
    /// Consecutive successes that bring a backend back.
    #[arg(long, default_value_t = 2, requires = "health")]
    health_rise: u32,
    /// Consecutive failures that take a backend out.
    #[arg(long, default_value_t = 3, requires = "health")]
    health_fall: u32,
    /// UDP probe payload, as text [default: an empty datagram].
    #[arg(long, requires = "health", conflicts_with = "health_payload_hex")]
    health_payload: Option<String>,
    /// UDP probe payload, as hex bytes (e.g. a DNS query).
    #[arg(long, requires = "health", value_name = "HEX")]
    health_payload_hex: Option<String>,
    /// true: healthy only if the backend answers the UDP probe within the timeout; false:
    /// healthy unless an ICMP port-unreachable comes back (needs an interval of at least
    /// 1000 ms) [default: true with a payload, false without]
    #[arg(long, requires = "health", value_name = "BOOL", action = clap::ArgAction::Set)]
    health_expect_reply: Option<bool>,
}

impl HealthArgs {
    fn spec(&self) -> Result<Option<HealthSpec>> {
        let Some(kind) = self.health else {
            return Ok(None);
        };
        let udp_options = self.health_payload.is_some()
            || self.health_payload_hex.is_some()
            || self.health_expect_reply.is_some();
        if kind != ProbeArg::Udp && udp_options {
            bail!(
                "--health-payload, --health-payload-hex and --health-expect-reply only apply to --health udp"
            );
        }
        let probe = match kind {
            ProbeArg::Tcp => Probe::Tcp,
            ProbeArg::Http => Probe::Http {
                path: self.health_path.clone(),
                expect_status: self.health_status,
            },
            ProbeArg::Udp => {
                let payload = match (&self.health_payload, &self.health_payload_hex) {
                    (Some(text), _) => text.as_bytes().to_vec(),
                    (None, Some(hex)) => {
                        decode_hex(hex).map_err(|e| anyhow!("--health-payload-hex: {e}"))?
                    }
                    (None, None) => Vec::new(),
                };
                // A payload of the operator's choosing is one the service answers; an empty
                // datagram only finds out whether the port is closed.
                Probe::Udp {
                    expect_reply: self.health_expect_reply.unwrap_or(!payload.is_empty()),
                    payload,
                }
            }
        };
        Ok(Some(HealthSpec {
            probe,
            interval: Duration::from_millis(self.health_interval_ms),
            timeout: Duration::from_millis(self.health_timeout_ms),
            rise: self.health_rise,
            fall: self.health_fall,
        }))
    }
}

/// Idle timeouts of `xlb vip add`: one per protocol, so the flag says which kind of flow it
/// is about; only the VIP's own applies.
#[derive(clap::Args)]
struct TimeoutArgs {
    /// A TCP VIP's connections idle this many seconds are forgotten: their next packet is
    /// balanced afresh (10-604800) [default: 300]. Closed connections go 10 s after their
    /// last packet; a SYN always gets a fresh choice.
    #[arg(long, value_name = "SECS", conflicts_with = "udp_timeout")]
    tcp_timeout: Option<u64>,
    /// A UDP VIP's flows idle this many seconds are forgotten: their next datagram is
    /// balanced afresh (1-604800) [default: 60].
    #[arg(long, value_name = "SECS")]
    udp_timeout: Option<u64>,
}

impl TimeoutArgs {
    fn idle_timeout_s(&self, vip: &VipSpec) -> Result<Option<u32>> {
        let (given, flag, other) = match vip.proto {
            Protocol::Tcp => (self.tcp_timeout, "--tcp-timeout", self.udp_timeout),
            Protocol::Udp => (self.udp_timeout, "--udp-timeout", self.tcp_timeout),
        };
        if other.is_some() {
            bail!("{vip} is a {} VIP: give it {flag}", vip.proto);
        }
        given
            .map(|secs| validate_idle_timeout(vip.proto, secs).map_err(|e| anyhow!("{flag}: {e}")))
            .transpose()
    }
}

#[derive(Subcommand)]
enum VipCommand {
    /// Add a VIP: ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp).
    #[command(
        after_help = "Examples:\n  xlb vip add 192.0.2.10:80/tcp\n  xlb vip add [2001:db8::10]:53/udp\n  xlb vip add 192.0.2.10:22/tcp --tcp-timeout 3600\n  xlb vip add 192.0.2.53:53/udp --udp-timeout 10\n  xlb vip add 192.0.2.10:80/tcp --health http --health-path /healthz --health-fall 2\n  xlb vip add 192.0.2.53:53/udp --health udp\n  xlb vip add 192.0.2.53:5000/udp --health udp --health-payload ping"
    )]
    Add {
        vip: VipSpec,
        #[command(flatten)]
        timeouts: TimeoutArgs,
        #[command(flatten)]
        health: HealthArgs,
    },
    /// Remove a VIP and its backends.
    #[command(after_help = "Example:\n  xlb vip del 192.0.2.10:80/tcp")]
    Del { vip: VipSpec },
    /// List VIPs.
    #[command(after_help = "Examples:\n  xlb vip list\n  xlb vip list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Add a backend to a VIP, by address or by container name.
    #[command(
        after_help = "Examples:\n  xlb backend add 192.0.2.10:80/tcp 10.88.0.14:8080\n  xlb backend add 192.0.2.10:80/tcp 10.88.0.15:8080 --weight 2\n  xlb backend add 192.0.2.10:80/tcp --container web-1:8080"
    )]
    Add {
        vip: VipSpec,
        /// BACKEND_ADDR:PORT
        #[arg(required_unless_present = "container", conflicts_with = "container")]
        backend: Option<SocketAddr>,
        /// A podman or docker container NAME[:PORT], followed from then on: out of the ring
        /// while stopped, re-resolved when it starts again [port: the container's single
        /// exposed port].
        #[arg(long)]
        container: Option<String>,
        /// Share of new flows relative to the other backends (1-1000).
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Remove a backend; its established flows move to the others.
    #[command(after_help = "Example:\n  xlb backend del 192.0.2.10:80/tcp 10.88.0.14:8080")]
    Del { vip: VipSpec, backend: SocketAddr },
    /// Change a backend's weight (the ring is rebuilt with minimal disruption) or state.
    #[command(
        after_help = "Examples:\n  xlb backend set 192.0.2.10:80/tcp 10.88.0.14:8080 --weight 3\n  xlb backend set 192.0.2.10:80/tcp 10.88.0.14:8080 --state active"
    )]
    Set {
        vip: VipSpec,
        backend: SocketAddr,
        /// New weight (1-1000).
        #[arg(long)]
        weight: Option<u32>,
        /// active: takes new flows; draining: keeps its established flows, takes no new ones.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
    },
    /// Stop sending new flows to a backend; its established flows continue until they end.
    /// `xlb backend list` shows how many remain.
    #[command(after_help = "Example:\n  xlb backend drain 192.0.2.10:80/tcp 10.88.0.14:8080")]
    Drain { vip: VipSpec, backend: SocketAddr },
    /// List a VIP's backends with their weights, ring slots and traffic.
    #[command(
        after_help = "Examples:\n  xlb backend list 192.0.2.10:80/tcp\n  xlb backend list 192.0.2.10:80/tcp --json"
    )]
    List {
        vip: VipSpec,
        #[arg(long)]
        json: bool,
    },
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("serialisable")
    );
}

fn print_vips(vips: &[VipStatus]) {
    if vips.is_empty() {
        println!("no VIPs (add one with `xlb vip add ADDR:PORT/tcp`)");
        return;
    }
    println!(
        "{:<32} {:>8} {:>12} {:>14} {:>10} {:>12}",
        "VIP", "BACKENDS", "PACKETS", "BYTES", "NEW FLOWS", "IDLE TIMEOUT"
    );
    for v in vips {
        println!(
            "{:<32} {:>8} {:>12} {:>14} {:>10} {:>12}",
            v.vip.to_string(),
            v.backends.len(),
            v.packets,
            v.bytes,
            v.new_flows,
            format!("{} s", v.idle_timeout_s)
        );
    }
}

fn print_backends(v: &VipStatus) {
    println!("{}  ({} slots in the ring)", v.vip, v.ring_size);
    if v.backends.is_empty() {
        println!(
            "  no backends (add one with `xlb backend add {} ADDR:PORT`)",
            v.vip
        );
        return;
    }
    println!(
        "  {:<40} {:>6} {:>9} {:>7} {:>12} {:>14} {:>10} {:>10}",
        "BACKEND", "WEIGHT", "STATE", "SLOTS", "PACKETS", "BYTES", "NEW FLOWS", "LIVE FLOWS"
    );
    for b in &v.backends {
        let (backend, state) = match (&b.container, b.container_running) {
            (Some(name), Some(false)) => (format!("{} ({name})", b.addr), "stopped".to_owned()),
            (Some(name), _) => (
                format!("{} ({name})", b.addr),
                format!("{:?}", b.state).to_lowercase(),
            ),
            (None, _) => (b.addr.to_string(), format!("{:?}", b.state).to_lowercase()),
        };
        println!(
            "  {:<40} {:>6} {:>9} {:>7} {:>12} {:>14} {:>10} {:>10}",
            backend,
            b.weight,
            state,
            b.slots,
            b.packets,
            b.bytes,
            b.new_flows,
            b.live_flows.map_or("-".to_owned(), |f| f.to_string())
        );
    }
}

fn print_stats(stats: &api::Stats) {
    for v in &stats.vips {
        println!(
            "{}  packets {}  bytes {}  new flows {}",
            v.vip, v.packets, v.bytes, v.new_flows
        );
        for b in &v.backends {
            println!(
                "  -> {:<40} packets {:>10}  bytes {:>12}  new flows {:>8}",
                b.addr.to_string(),
                b.packets,
                b.bytes,
                b.new_flows
            );
        }
    }
    if stats.vips.is_empty() {
        println!("no VIPs");
    }
    println!("global:");
    for c in &stats.global {
        println!("  {:<26} {:>14}", c.name, c.value);
    }
}

fn bench(command: BenchCommand) -> Result<()> {
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
                },
                json,
            )?;
            let report = report::CostReport {
                machine: Machine::current(),
                method: report::COST_METHOD,
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

fn client(socket: &std::path::Path, command: Command) -> Result<()> {
    let call = |request: &Request| api::call(socket, request).map_err(anyhow::Error::new);
    match command {
        Command::Run { .. } | Command::Bench(_) | Command::Detach { .. } | Command::Config(_) => {
            unreachable!("handled in main")
        }
        Command::Vip(VipCommand::Add {
            vip,
            timeouts,
            health,
        }) => {
            let idle_timeout_s = timeouts.idle_timeout_s(&vip)?;
            let health = health.spec()?;
            if let Some(spec) = &health {
                spec.validate_for(&vip).context("invalid health check")?;
            }
            call(&Request::VipAdd {
                vip,
                health: health.clone(),
                idle_timeout_s,
            })?;
            match health {
                Some(spec) => println!("added VIP {vip} (health checks: {})", spec.probe),
                None => println!("added VIP {vip}"),
            }
        }
        Command::Reload => {
            if let Reply::Changes(changes) = call(&Request::Reload)? {
                if changes.is_empty() {
                    println!("reloaded: nothing changed");
                }
                for c in changes {
                    match c.strip_prefix("warning: ") {
                        Some(warning) => eprintln!("xlb: warning: {warning}"),
                        None => println!("{c}"),
                    }
                }
            }
        }
        Command::Vip(VipCommand::Del { vip }) => {
            call(&Request::VipDel { vip })?;
            println!("removed VIP {vip}");
        }
        Command::Vip(VipCommand::List { json }) => {
            if let Reply::Vips(vips) = call(&Request::VipList)? {
                if json {
                    print_json(&vips)
                } else {
                    print_vips(&vips)
                }
            }
        }
        Command::Backend(BackendCommand::Add {
            vip,
            backend,
            container,
            weight,
        }) => {
            let (reply, container) = match (backend, container) {
                (Some(backend), _) => (
                    call(&Request::BackendAdd {
                        vip,
                        backend,
                        weight,
                    })?,
                    None,
                ),
                (None, Some(spec)) => {
                    let (container, port) = lb_userspace::containers::parse_container_arg(&spec)
                        .map_err(|e| anyhow!("--container {spec}: {e}"))?;
                    let request = Request::ContainerBackendAdd {
                        vip,
                        container: container.clone(),
                        port,
                        weight,
                    };
                    (call(&request)?, Some(container))
                }
                (None, None) => bail!("give BACKEND_ADDR:PORT or --container NAME"),
            };
            let (added, warnings) = match reply {
                Reply::DoneWithWarnings(warnings) => (backend, warnings),
                Reply::ContainerBackendAdded { backend, warnings } => (Some(backend), warnings),
                _ => (backend, Vec::new()),
            };
            for warning in warnings {
                eprintln!("xlb: warning: {warning}");
            }
            let added = added.map_or_else(|| "?".to_owned(), |a| a.to_string());
            match container {
                Some(name) => println!(
                    "added backend {added} (container {name}, followed) to {vip} (weight {weight})"
                ),
                None => println!("added backend {added} to {vip} (weight {weight})"),
            }
        }
        Command::Backend(BackendCommand::Del { vip, backend }) => {
            call(&Request::BackendDel { vip, backend })?;
            println!("removed backend {backend} from {vip}");
        }
        Command::Backend(BackendCommand::Set {
            vip,
            backend,
            weight,
            state,
        }) => {
            if weight.is_none() && state.is_none() {
                bail!("nothing to change: give --weight N and/or --state active|draining");
            }
            call(&Request::BackendSet {
                vip,
                backend,
                weight,
                state: state.map(Into::into),
            })?;
            println!("updated backend {backend} of {vip}");
        }
        Command::Backend(BackendCommand::Drain { vip, backend }) => {
            call(&Request::BackendSet {
                vip,
                backend,
                weight: None,
                state: Some(BackendState::Draining),
            })?;
            println!(
                "draining backend {backend} of {vip}: no new flows; `xlb backend list {vip}` shows the flows it still has"
            );
        }
        Command::Backend(BackendCommand::List { vip, json }) => {
            if let Reply::Vip(status) = call(&Request::BackendList { vip })? {
                if json {
                    print_json(&status)
                } else {
                    print_backends(&status)
                }
            }
        }
        Command::Stats { json, watch } => loop {
            let stats = match call(&Request::Stats) {
                Ok(reply) => reply,
                // Watching outlives an agent restart: say so and keep trying.
                Err(e) if watch => {
                    eprintln!("xlb: {e:#} (retrying every second)");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Reply::Stats(stats) = stats {
                // Clear the screen only on a terminal: a pipe or file gets the plain reports.
                if watch && !json && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    print!("\x1b[H\x1b[2J");
                }
                if json {
                    print_json(&stats)
                } else {
                    print_stats(&stats)
                }
                std::io::stdout().flush().ok();
            }
            if !watch {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        },
        Command::Explain { client, vip, json } => {
            if let Reply::Explanation(e) = call(&Request::Explain { client, vip })? {
                if json {
                    print_json(&e);
                } else {
                    let show =
                        |b: Option<SocketAddr>| b.map_or("none".to_owned(), |b| b.to_string());
                    println!(
                        "flow {client} -> {vip}: hash {:#010x}, ring slot {}",
                        e.flow_hash, e.ring_slot
                    );
                    println!("  a new flow goes to:        {}", show(e.new_flow_backend));
                    println!("  connection table holds:    {}", show(e.tracked_backend));
                }
            }
        }
    }
    Ok(())
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

fn main() -> ExitCode {
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
    if !matches!(cli.command, Command::Run { .. }) {
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
    let result = match cli.command {
        Command::Run {
            ifaces,
            xdp_mode,
            bpffs,
            state,
            ring_size,
            max_vips,
            hash_seed,
            conntrack_entries,
            keep_attached,
            metrics,
            no_metrics,
            config,
            containers,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                // Colour codes only for a terminal: a log file or journald gets plain text.
                .with_ansi(
                    std::io::IsTerminal::is_terminal(&std::io::stderr())
                        && std::env::var_os("NO_COLOR").is_none(),
                )
                .init();
            (|| -> Result<()> {
                // Command-line flags win over the config file's [agent] table, which wins over
                // the defaults.
                let file = match &config {
                    Some(path) => lb_userspace::config::load(path)?.agent,
                    None => lb_userspace::config::AgentConfig::default(),
                };
                let ifaces = if ifaces.is_empty() {
                    file.ifaces
                } else {
                    ifaces
                };
                if ifaces.is_empty() {
                    bail!(
                        "no interface given: use --iface IF (repeatable), or ifaces in the config's [agent] table"
                    );
                }
                let options = AgentOptions {
                    ifaces,
                    mode: xdp_mode.or(file.xdp_mode).unwrap_or(ModeChoice::Auto),
                    bpffs: bpffs.or(file.bpffs).unwrap_or_else(paths::default_bpffs),
                    socket: cli
                        .socket
                        .or(file.socket)
                        .unwrap_or_else(paths::default_socket),
                    state: state.or(file.state).unwrap_or_else(paths::default_state),
                    datapath: DatapathConfig {
                        ring_size,
                        max_vips,
                        hash_seed,
                        conntrack_entries,
                    },
                    keep_attached,
                    metrics: (!no_metrics).then(|| {
                        metrics
                            .or(file.metrics)
                            .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 9464)))
                    }),
                    config,
                    containers,
                };
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .context("starting the async runtime")
                    .and_then(|rt| rt.block_on(agent::run(options)))
            })()
        }
        Command::Bench(command) => bench(command),
        Command::Config(ConfigCommand::Check { file }) => lb_userspace::config::load(&file)
            .map(|config| {
                println!(
                    "{}: ok ({} VIPs, {} backends)",
                    file.display(),
                    config.vips.len(),
                    config.vips.iter().map(|v| v.backends.len()).sum::<usize>()
                );
            })
            .map_err(Into::into),
        Command::Detach { bpffs } => agent::detach(
            &bpffs.unwrap_or_else(paths::default_bpffs),
            &cli.socket.unwrap_or_else(paths::default_socket),
        ),
        command => client(&cli.socket.unwrap_or_else(paths::default_socket), command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
