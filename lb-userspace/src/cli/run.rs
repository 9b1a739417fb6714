//! `xlb run` (the agent) and `xlb detach`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use lb_common::{DEFAULT_HASH_SEED, DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE};
use lb_userspace::{
    agent::{self, AgentOptions},
    attach::ModeChoice,
    datapath::DatapathConfig,
    paths,
};

#[derive(clap::Args)]
pub struct RunArgs {
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
    /// Slots per Maglev ring (prime); the same on every node behind one ECMP group [default:
    /// 65537, or the config's [agent] ring_size]
    #[arg(long, value_parser = prime_ring_size)]
    ring_size: Option<u32>,
    /// Room for this many VIPs.
    #[arg(long, default_value_t = DEFAULT_MAX_VIPS)]
    max_vips: u32,
    /// Flow-hash seed; give every node behind the same ECMP group the same seed [default:
    /// 2020368929, or the config's [agent] hash_seed]
    #[arg(long)]
    hash_seed: Option<u32>,
    /// Connection-table entries, shared by all CPUs: IPv4 flows get this many ways in sets
    /// of eight (give it twice the flows to hold: a full set evicts), IPv6 flows an LRU of
    /// this many; the handshake tables get half as many each.
    #[arg(long, default_value_t = lb_common::CONNTRACK_ENTRIES)]
    conntrack_entries: u32,
    /// On SIGINT/SIGTERM leave the data path running (program attached, maps pinned);
    /// the next `xlb run` adopts it without losing a flow. `xlb detach` removes it.
    #[arg(long)]
    keep_attached: bool,
    /// Serve Prometheus metrics on ADDR (/metrics) [default: 127.0.0.1:9464]
    #[arg(long, conflicts_with = "no_metrics")]
    metrics: Option<std::net::SocketAddr>,
    /// Serve no metrics.
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
    /// Announce each VIP this node can serve as a route in routing table N (VIP/32 dev lo
    /// proto 176), for the node's BGP daemon to learn and advertise (docs/scale-out.md);
    /// withdrawn when it has no usable backend, on `xlb node drain`, and at a stop without
    /// --keep-attached.
    #[arg(long, value_name = "N")]
    announce_table: Option<u32>,
    /// Outer source address of direct-server-return tunnels (ipip, gue VIPs), one per
    /// address family (repeatable); it must be an address of this host [default: the source
    /// of the route to each backend]
    #[arg(long = "encap-source", value_name = "ADDR")]
    encap_sources: Vec<std::net::IpAddr>,
    /// UDP port GUE-encapsulated packets are sent to (the backends' decapsulation listens
    /// there) [default: 6080]
    #[arg(long, value_name = "PORT")]
    gue_port: Option<u16>,
}

/// `--ring-size`: Maglev needs a prime, refused here rather than after loading the maps.
fn prime_ring_size(text: &str) -> Result<u32, String> {
    let n: u32 = text.parse().map_err(|e| format!("{e}"))?;
    if lb_common::maglev::is_prime(n) {
        Ok(n)
    } else {
        Err(format!(
            "{n} is not prime (Maglev needs a prime, e.g. 65537 or 16381)"
        ))
    }
}

/// Runs the agent until SIGINT/SIGTERM; `socket` is the global `--socket`.
pub fn run(args: RunArgs, socket: Option<PathBuf>) -> Result<()> {
    let RunArgs {
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
        announce_table,
        encap_sources,
        gue_port,
    } = args;
    let encap = lb_userspace::encap::Encap::new(&encap_sources, gue_port)
        .context("--encap-source/--gue-port")?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file or journald gets plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    // Command-line flags win over the config file's [agent] table, which wins over the
    // defaults.
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
        socket: socket.or(file.socket).unwrap_or_else(paths::default_socket),
        state: state.or(file.state).unwrap_or_else(paths::default_state),
        datapath: DatapathConfig {
            ring_size: ring_size.or(file.ring_size).unwrap_or(DEFAULT_RING_SIZE),
            max_vips,
            hash_seed: hash_seed.or(file.hash_seed).unwrap_or(DEFAULT_HASH_SEED),
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
        announce_table: announce_table.or(file.announce_table),
        encap,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(agent::run(options)))
}

/// Removes a data path left running by `xlb run --keep-attached`.
pub fn detach(bpffs: Option<PathBuf>, socket: &Path) -> Result<()> {
    agent::detach(&bpffs.unwrap_or_else(paths::default_bpffs), socket)
}
