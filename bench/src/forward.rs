//! `xlb bench forward`: packets per second forwarded through xlb between network namespaces,
//! next to what the same path does without xlb, in the same run and topology.
//!
//! Topology (one namespace each, veth pairs, GRO on at every end):
//!
//! ```text
//!   gen 10.90.0.2 ──── 10.90.0.1 lb 10.91.i.1 ──── 10.91.i.2 sink i   (i < backends)
//!                                  10.91.n.1 ──── 10.91.n.2 new      (the "backend add" probe)
//! ```
//!
//! Traffic is made in the kernel: `xlb_bench_gen` runs under `BPF_PROG_TEST_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` (as xdp-trafficgen does) in the generator namespace, and every
//! frame it returns `XDP_TX` for leaves through the generator's veth. 64-byte UDP/IPv4 frames,
//! checksum 0, the source port cycling over `flows` values. The sinks run `xlb_bench_sink`,
//! which counts and drops. The generating thread is pinned to one CPU; the veth receive work
//! of the LB and of the sinks runs in softirq on that same CPU, so every configuration is
//! measured in one placement (spreading it made XDP slower on this machine kind).
//!
//! In the middle, in rounds (each round measures every configuration once, in a rotated order,
//! and ratios are taken within a round: this VM's speed changes by half within seconds): plain
//! routing, a redirect-only XDP program (the ceiling of this path) sending everything to one
//! backend and spreading the flows over the backends as xlb does, nftables jhash DNAT (what
//! kube-proxy's nftables mode deploys), xlb, xlb with one backend, another build's xlb
//! (`--against`), and xlb with the VIP in direct server return over IPIP (the sinks count the
//! encapsulated frames; one frame through xlb's program is checked first: outer IPv4 header
//! from the LB's address to a backend, the generated packet intact inside). Then the
//! connection-level comparison: TCP connections and requests per second from the generator
//! namespace (now a client) to real TCP servers in the sink namespaces, through xlb, through
//! nftables DNAT and through HAProxy in TCP mode.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::{
    maps::{Array, IterableMap as _, Map, MapData, PerCpuArray, xdp::DevMapHash},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};
use indicatif::{ProgressBar, ProgressStyle};
use lb_common::{
    BENCH_FRAME_LEN, BENCH_SPORT_OFFSET, BENCH_SPREAD_SLOTS, BenchFrame, NextHop, bench_maps,
    program_names,
};
use lb_userspace::{
    balancer::{Balancer, Forwarding, Protocol, VipSpec},
    datapath::{Datapath, DatapathConfig},
    frames,
};
use serde::Serialize;
use xlb_netns::{
    Netns, Network, NsId, Veth,
    ipnet::{Ipv4Net, Ipv6Net},
};

use crate::Machine;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 10);
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const SPORT_BASE: u16 = 10_000;
/// Source addresses used while new flows are needed (the "backend add" probe).
const CHURN_BASE: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);
const XDP_TX: u32 = 3;
const NFT_TABLE: &str = "xlbbench";
/// Request and response sizes of the connection-level test.
const REQUEST_LEN: usize = 32;
const RESPONSE_LEN: usize = 64;
/// First request byte: the server closes after answering (one request per connection).
const REQ_CLOSE: u8 = b'C';
/// First request byte: the server keeps the connection for more requests.
const REQ_KEEP: u8 = b'K';

/// What `xlb bench forward` measures and for how long.
#[derive(Clone, Debug)]
pub struct ForwardOptions {
    /// Distinct flows (source ports) the generator cycles through.
    pub flows: u32,
    /// Backends (sink namespaces) behind the VIP.
    pub backends: u32,
    /// Measured time per packet-rate configuration (generator busy time), split evenly over
    /// `rounds`.
    pub packet_duration: Duration,
    /// Rounds of the packet-rate test: each round measures every configuration once, in a
    /// rotated order, so a machine whose speed drifts (a VM's neighbours) weighs on every row
    /// alike, and ratios are taken within a round.
    pub rounds: u32,
    /// Frames per live-frames batch (at most 256).
    pub batch: u32,
    /// Generator calls made before each measurement (conntrack, neighbours, caches).
    pub warmup_frames: u32,
    /// Measured time per connection-level configuration and metric.
    pub conn_duration: Duration,
    /// Concurrent client threads in the connection-level test.
    pub conn_clients: u32,
    /// Times the "backend add → first packet" probe is repeated.
    pub add_trials: u32,
    /// HAProxy binary; `None` looks for `haproxy` in `PATH` (the row is skipped when absent).
    pub haproxy: Option<PathBuf>,
    /// Also measure xlb with the VIP in direct server return (IPIP), one more packet row.
    pub dsr: bool,
    /// Another build's eBPF object (`lb-ebpf`) to measure in the same rounds, right after
    /// this build's xlb: a data-path change against its base, side by side.
    pub against: Option<PathBuf>,
}

impl ForwardOptions {
    /// The full run: 256 flows, 4 backends, about 3 s per configuration in 10 rounds.
    #[must_use]
    pub const fn full() -> Self {
        Self {
            flows: 256,
            backends: 4,
            packet_duration: Duration::from_secs(3),
            rounds: 10,
            batch: 64,
            warmup_frames: 200_000,
            conn_duration: Duration::from_secs(2),
            conn_clients: 4,
            add_trials: 9,
            haproxy: None,
            dsr: true,
            against: None,
        }
    }

    /// A tiny run (about 0.3 s per configuration, few flows) to check that the mode works and
    /// its output is well-formed; its figures mean little.
    #[must_use]
    pub const fn quick() -> Self {
        Self {
            flows: 8,
            backends: 2,
            packet_duration: Duration::from_millis(300),
            rounds: 1,
            batch: 64,
            warmup_frames: 20_000,
            conn_duration: Duration::from_millis(300),
            conn_clients: 2,
            add_trials: 1,
            haproxy: None,
            dsr: true,
            against: None,
        }
    }
}

/// One configuration of the packet-rate test.
#[derive(Clone, Debug, Serialize)]
pub struct PacketRow {
    pub name: &'static str,
    pub description: &'static str,
    /// Why the row was not measured; all figures are `None` then.
    pub skipped: Option<String>,
    pub generated: Option<u64>,
    pub delivered: Option<u64>,
    pub lost: Option<u64>,
    /// Generator busy time (kernel-reported) over which the packets were counted.
    pub seconds: Option<f64>,
    pub generated_mpps: Option<f64>,
    pub delivered_mpps: Option<f64>,
    /// Lost / generated.
    pub loss_ratio: Option<f64>,
    /// Delivered Mpps in each round.
    pub round_mpps: Vec<f64>,
    /// xlb's delivered Mpps divided by this row's, the median over the rounds of the ratio
    /// within each round.
    pub xlb_ratio: Option<f64>,
}

/// One configuration of the connection-level test.
#[derive(Clone, Debug, Serialize)]
pub struct ConnRow {
    pub name: &'static str,
    pub description: &'static str,
    pub skipped: Option<String>,
    /// New TCP connections per second, each carrying one request and its response.
    pub connections_per_s: Option<f64>,
    /// Requests (and responses) per second over persistent connections.
    pub requests_per_s: Option<f64>,
    /// Failed connects, resets and timeouts over both measurements.
    pub errors: Option<u64>,
    /// xlb's figures divided by this row's.
    pub xlb_ratio_connections: Option<f64>,
    pub xlb_ratio_requests: Option<f64>,
}

/// Time from `Balancer::add_backend` returning to the first packet counted at the new backend.
#[derive(Clone, Debug, Serialize)]
pub struct BackendAddLatency {
    pub skipped: Option<String>,
    /// Each trial's figure, in microseconds; trials that saw no packet within 1 s are left out.
    pub trials_us: Vec<f64>,
    pub min_us: Option<f64>,
    pub median_us: Option<f64>,
    pub max_us: Option<f64>,
    pub timeouts: u32,
    pub method: &'static str,
}

/// One row's delivered rate over another's, taken within each round.
#[derive(Clone, Debug, Serialize)]
pub struct PairedRatio {
    pub what: String,
    pub numerator: &'static str,
    pub denominator: &'static str,
    /// The median over the rounds of the ratio within each round.
    pub median: Option<f64>,
    /// The lowest and highest round's ratio.
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl PairedRatio {
    fn of(
        packets: &[PacketRow],
        what: String,
        numerator: &'static str,
        denominator: &'static str,
    ) -> Self {
        let rounds = round_mpps(packets, numerator)
            .zip(round_mpps(packets, denominator))
            .and_then(|(n, d)| RoundRatios::of(&n, &d));
        Self {
            what,
            numerator,
            denominator,
            median: rounds.map(|q| q.median),
            min: rounds.map(|q| q.min),
            max: rounds.map(|q| q.max),
        }
    }
}

/// Ratios of two rows' rates taken round by round: within a round the two rows ran seconds
/// apart, while the whole run spans a minute or more.
#[derive(Clone, Copy)]
struct RoundRatios {
    median: f64,
    min: f64,
    max: f64,
}

impl RoundRatios {
    /// `None` when the rows do not have the same rounds, or a round measured nothing.
    fn of(numerator: &[f64], denominator: &[f64]) -> Option<Self> {
        if numerator.is_empty() || numerator.len() != denominator.len() {
            return None;
        }
        let mut ratios: Vec<f64> = numerator
            .iter()
            .zip(denominator)
            .map(|(n, d)| (*d > 0.0).then(|| n / d))
            .collect::<Option<_>>()?;
        let median = crate::median(&mut ratios);
        Some(Self {
            median,
            min: ratios[0],
            max: ratios[ratios.len() - 1],
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Reference {
    pub what: &'static str,
    pub mpps: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ForwardReport {
    pub machine: Machine,
    pub method: &'static str,
    pub flows: u32,
    pub backends: u32,
    pub frame_bytes: usize,
    pub packet_seconds_per_config: f64,
    /// Rounds the packet-rate time was split over.
    pub rounds: u32,
    pub packets: Vec<PacketRow>,
    /// xlb's rate over the redirect ceiling's with the same fan-out: what xlb's own work
    /// costs, apart from how many backends share the traffic.
    pub ceiling_share: Vec<PairedRatio>,
    /// With `--against`: this build's xlb over the other build's.
    pub against: Option<PairedRatio>,
    pub backend_add: BackendAddLatency,
    pub connections: Vec<ConnRow>,
    /// Why IPVS, the kernel's own L4 balancer, has no row.
    pub ipvs: String,
    /// The same path measured earlier on this machine kind (../shared/design.md); only
    /// figures from one run compare.
    pub reference: Vec<Reference>,
}

pub const FORWARD_METHOD: &str = "generator -> LB -> sinks in network namespaces over veth (GRO on); in-kernel generator (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES, XDP_TX), 64-byte UDP/IPv4 frames, generator thread pinned to one CPU (all softirq work on that CPU); delivered = count of the sinks' XDP programs over the generator's kernel-reported busy time; lost = generated - delivered; each row's time split over rounds that measure every row once in a rotated order, ratios between rows taken within each round (median, min, max over the rounds)";

const BACKEND_ADD_METHOD: &str = "generator running on the xlb path; Balancer::add_backend returns (taken 100-600 ms into a live-frames call), then a fresh, never-repeated source address goes into the generator's template every ~20 us (new flows: known flows stay on their backends) while the new backend's sink counter is polled in a loop; time to its first count";

fn reference() -> Vec<Reference> {
    vec![
        Reference {
            what: "redirect-only XDP program (ceiling)",
            mpps: 4.45,
        },
        Reference {
            what: "kernel routing only",
            mpps: 1.09,
        },
        Reference {
            what: "nftables jhash DNAT with conntrack",
            mpps: 0.80,
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// Topology

struct Topo {
    net: Network,
    gen_id: NsId,
    lb_id: NsId,
    /// `a` is the LB's end, `b` the generator's.
    gen_link: Veth,
    /// `a` is the LB's end, `b` the sink's.
    sinks: Vec<Veth>,
    /// The backend added while traffic flows.
    probe: Veth,
}

impl Topo {
    fn new(backends: u32) -> Result<Self> {
        ensure!(
            (1..=200).contains(&backends),
            "backends must be between 1 and 200"
        );
        let mut net = Network::new("xlbfwd-").context("creating the benchmark namespaces")?;
        let gen_id = net.add_namespace("gen")?;
        let lb_id = net.add_namespace("lb")?;
        let v6 = |a: u16, b: u16| {
            Ipv6Net::new(std::net::Ipv6Addr::new(0xfd00, a, b, 0, 0, 0, 0, 0), 64)
                .expect("valid prefix")
        };
        let gen_link = net.connect(
            lb_id,
            gen_id,
            Ipv4Net::new(Ipv4Addr::new(10, 90, 0, 0), 24)?,
            v6(0x90, 0),
        )?;
        let mut links = Vec::new();
        for i in 0..=backends {
            let role = if i == backends {
                "new".to_owned()
            } else {
                format!("s{i}")
            };
            let id = net.add_namespace(&role)?;
            let i8 = u8::try_from(i)?;
            links.push(net.connect(
                lb_id,
                id,
                Ipv4Net::new(Ipv4Addr::new(10, 91, i8, 0), 24)?,
                v6(0x91, u16::from(i8)),
            )?);
        }
        let probe = links.pop().expect("one link per backend plus the probe");
        let topo = Self {
            net,
            gen_id,
            lb_id,
            gen_link,
            sinks: links,
            probe,
        };
        topo.route()?;
        Ok(topo)
    }

    /// Forwarding in the LB, default routes towards it, and permanent neighbours everywhere:
    /// the sinks drop ARP with everything else, and first packets should not wait for it.
    fn route(&self) -> Result<()> {
        let lb = self.lb();
        lb.enable_forwarding()?;
        let g = &self.gen_link;
        lb.add_neighbour(&g.a.ifname, g.b.ip4().into(), g.b.mac)?;
        self.generator_ns()
            .add_neighbour(&g.b.ifname, g.a.ip4().into(), g.a.mac)?;
        self.generator_ns().add_default_route(g.a.ip4().into())?;
        for link in self.sinks.iter().chain(std::iter::once(&self.probe)) {
            lb.add_neighbour(&link.a.ifname, link.b.ip4().into(), link.b.mac)?;
            let s = self.net.ns(link.b.ns);
            s.add_neighbour(&link.b.ifname, link.a.ip4().into(), link.a.mac)?;
            s.add_default_route(link.a.ip4().into())?;
        }
        for ns in [self.generator_ns(), lb] {
            ns.sysctl("net/ipv4/ip_local_port_range", "1024 65000")?;
            ns.sysctl("net/ipv4/tcp_tw_reuse", "1")?;
        }
        Ok(())
    }

    fn generator_ns(&self) -> &Netns {
        self.net.ns(self.gen_id)
    }

    fn lb(&self) -> &Netns {
        self.net.ns(self.lb_id)
    }

    fn backend_addrs(&self) -> Vec<Ipv4Addr> {
        self.sinks.iter().map(|l| l.b.ip4()).collect()
    }

    /// The LB's interfaces: towards the generator first, then every backend and the probe.
    fn lb_ifindexes(&self) -> Vec<u32> {
        std::iter::once(&self.gen_link)
            .chain(&self.sinks)
            .chain(std::iter::once(&self.probe))
            .map(|l| l.a.ifindex)
            .collect()
    }
}

fn small_config() -> DatapathConfig {
    DatapathConfig {
        ring_size: 251,
        max_vips: 1,
        ..DatapathConfig::default()
    }
}

/// An owned handle on one of `datapath`'s maps, usable while the datapath is borrowed
/// elsewhere (the generator thread holds its program while the template changes).
fn owned_map(datapath: &Datapath, name: &'static str) -> Result<Map> {
    let id = match name {
        bench_maps::FRAME => datapath
            .map::<Array<&MapData, BenchFrame>>(name)?
            .map()
            .info()?
            .id(),
        _ => datapath
            .map::<PerCpuArray<&MapData, u64>>(name)?
            .map()
            .info()?
            .id(),
    };
    Ok(Map::from_map_data(MapData::from_id(id)?)?)
}

struct Counter(PerCpuArray<MapData, u64>);

impl Counter {
    fn of(datapath: &Datapath) -> Result<Self> {
        Ok(Self(PerCpuArray::try_from(owned_map(
            datapath,
            bench_maps::COUNT,
        )?)?))
    }

    fn read(&self) -> Result<u64> {
        Ok(self.0.get(&0, 0)?.iter().sum())
    }
}

/// The generator: its datapath, template map and counter.
struct Generator {
    datapath: Datapath,
    frame: Array<MapData, BenchFrame>,
    count: Counter,
    ifindex: u32,
    shape: Shape,
    src: Ipv4Addr,
    batch: u32,
}

/// What every generated frame shares: the link's MACs and the number of flows.
#[derive(Clone, Copy)]
struct Shape {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    flows: u32,
}

impl Shape {
    /// The template for frames from `src` to `dst`.
    fn template(self, src: Ipv4Addr, dst: SocketAddrV4) -> BenchFrame {
        let mut bytes = [0u8; BENCH_FRAME_LEN];
        bytes.copy_from_slice(&frames::udp(
            SocketAddrV4::new(src, SPORT_BASE),
            dst,
            BENCH_FRAME_LEN - 42,
            false,
        ));
        bytes[0..6].copy_from_slice(&self.dst_mac);
        bytes[6..12].copy_from_slice(&self.src_mac);
        BenchFrame {
            bytes,
            flows: self.flows,
            sport_offset: BENCH_SPORT_OFFSET as u32,
            sport_base: u32::from(SPORT_BASE),
            _pad: 0,
        }
    }
}

impl Generator {
    fn new(topo: &Topo, flows: u32, batch: u32) -> Result<Self> {
        ensure!(
            (1..=256).contains(&batch),
            "batch must be between 1 and 256"
        );
        ensure!(
            (1..=u32::from(u16::MAX - SPORT_BASE)).contains(&flows),
            "flows must be between 1 and {}",
            u16::MAX - SPORT_BASE
        );
        let mut datapath = Datapath::load(small_config()).context("loading the generator")?;
        datapath.load_program(program_names::BENCH_GENERATE)?;
        let frame = Array::try_from(owned_map(&datapath, bench_maps::FRAME)?)?;
        let count = Counter::of(&datapath)?;
        let g = &topo.gen_link;
        Ok(Self {
            datapath,
            frame,
            count,
            ifindex: g.b.ifindex,
            shape: Shape {
                src_mac: g.b.mac,
                dst_mac: g.a.mac,
                flows,
            },
            src: g.b.ip4(),
            batch,
        })
    }

    /// Makes every generated frame go from `src` to `dst`.
    fn aim(&mut self, src: Ipv4Addr, dst: SocketAddrV4) -> Result<()> {
        let t = self.shape.template(src, dst);
        self.frame.set(0, &t, 0)?;
        Ok(())
    }

    fn program(&self) -> Result<&Xdp> {
        Ok(self.datapath.program(program_names::BENCH_GENERATE)?)
    }
}

/// One live-frames call: `repeat` frames; returns the kernel-reported busy time.
/// Must run in the generator's namespace (the kernel resolves `ingress_ifindex` there).
fn live_frames(program: &Xdp, ifindex: u32, repeat: u32, batch: u32) -> Result<Duration> {
    let template = [0u8; BENCH_FRAME_LEN];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(BENCH_FRAME_LEN as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&template),
            ctx_in: Some(&ctx),
            repeat,
            attrs: TestRunAttrs::new().xdp_live_frames(batch),
            ..TestRunOptions::new()
        })
        .context("live-frames test run (needs a kernel with BPF_F_TEST_XDP_LIVE_FRAMES, 5.18+)")?;
    ensure!(
        result.return_value == XDP_TX || result.return_value == 0,
        "generator returned {}",
        result.return_value
    );
    Ok(result.duration * repeat)
}

/// Frames per call that take about `target` at the rate the warm-up showed.
fn frames_for(per_frame: Duration, target: Duration) -> u32 {
    let ns = per_frame.as_nanos().max(1);
    u32::try_from(target.as_nanos() / ns)
        .unwrap_or(u32::MAX)
        .clamp(10_000, 50_000_000)
}

/// What sits in the LB namespace for one packet-rate row.
enum Contender<'a> {
    /// Nothing: the kernel routes.
    Routing,
    /// The redirect-only program, next hops filled in, attached for each slice.
    Ceiling(Datapath),
    /// nftables DNAT, installed for each slice.
    Nft,
    /// xlb, VIPs and backends in place, attached for each slice.
    Xlb(&'a mut Lb),
}

impl Contender<'_> {
    /// Puts the contender in place, measures one slice and takes it away again.
    fn slice(
        &mut self,
        topo: &Topo,
        generator: &mut Generator,
        sinks: &Counter,
        options: &ForwardOptions,
        duration: Duration,
    ) -> Result<Measured> {
        let to = match self {
            Self::Routing | Self::Ceiling(_) => {
                SocketAddrV4::new(topo.sinks[0].b.ip4(), BACKEND_PORT)
            }
            Self::Nft | Self::Xlb(_) => SocketAddrV4::new(VIP, VIP_PORT),
        };
        generator.aim(generator.src, to)?;
        let measure = |g: &Generator| measure(g, topo, sinks, options, duration);
        match self {
            Self::Routing => measure(generator),
            Self::Ceiling(datapath) => {
                let link = topo.lb().run(|| {
                    datapath.attach_program(
                        program_names::BENCH_REDIRECT,
                        topo.gen_link.a.ifindex,
                        XdpMode::Driver,
                    )
                })??;
                let m = measure(generator);
                datapath.detach_program(program_names::BENCH_REDIRECT, link)?;
                m
            }
            Self::Nft => {
                let nft = Nft::install(topo.lb(), &topo.backend_addrs())?;
                let m = measure(generator);
                drop(nft);
                m
            }
            Self::Xlb(lb) => {
                lb.attach(topo)?;
                let m = measure(generator);
                lb.detach(topo)?;
                m
            }
        }
    }
}

/// One packet-rate row through the rounds: its contender and the slices measured so far.
/// A row that fails a slice is reported as skipped, with the error.
struct Rotation<'a> {
    name: &'static str,
    description: &'static str,
    contender: Result<Contender<'a>, String>,
    slices: Vec<Measured>,
}

impl<'a> Rotation<'a> {
    fn new(
        (name, description): (&'static str, &'static str),
        contender: Result<Contender<'a>>,
    ) -> Self {
        Self {
            name,
            description,
            contender: contender.map_err(|e| format!("failed: {e:#}")),
            slices: Vec::new(),
        }
    }

    fn skipped((name, description): (&'static str, &'static str), why: &str) -> Self {
        Self {
            name,
            description,
            contender: Err(why.to_owned()),
            slices: Vec::new(),
        }
    }

    fn measure(
        &mut self,
        topo: &Topo,
        generator: &mut Generator,
        sinks: &Counter,
        options: &ForwardOptions,
        duration: Duration,
    ) {
        let Ok(contender) = &mut self.contender else {
            return;
        };
        match contender.slice(topo, generator, sinks, options, duration) {
            Ok(m) => self.slices.push(m),
            Err(e) => self.contender = Err(format!("failed: {e:#}")),
        }
    }

    fn finish(self) -> PacketRow {
        match self.contender {
            Ok(_) => packet_row(self.name, self.description, &self.slices),
            Err(why) => skipped_packet_row(self.name, self.description, why),
        }
    }
}

struct Measured {
    generated: u64,
    delivered: u64,
    busy: Duration,
}

/// Warms up, then generates for `duration` of generator busy time, counting at `sinks`.
/// Runs the generator for `duration` of busy time against whatever is in place.
fn measure(
    generator: &Generator,
    topo: &Topo,
    sinks: &Counter,
    options: &ForwardOptions,
    duration: Duration,
) -> Result<Measured> {
    let program = generator.program()?;
    let (ifindex, batch) = (generator.ifindex, generator.batch);
    topo.generator_ns().run(|| -> Result<Measured> {
        crate::pin_to_one_cpu();
        let warm = live_frames(program, ifindex, options.warmup_frames.max(1), batch)?;
        let per_frame = warm / options.warmup_frames.max(1);
        // Long calls (each costs ~37 ms of setup), at most ~1 s each, so a run stays bounded.
        let per_call = frames_for(per_frame, duration.min(Duration::from_secs(1)));
        std::thread::sleep(Duration::from_millis(20));
        let (g0, s0) = (generator.count.read()?, sinks.read()?);
        let mut busy = Duration::ZERO;
        let deadline = Instant::now() + duration * 4 + Duration::from_secs(2);
        while busy < duration && Instant::now() < deadline {
            busy += live_frames(program, ifindex, per_call, batch)?;
        }
        // Whatever is still in the veth rings.
        std::thread::sleep(Duration::from_millis(20));
        let (g1, s1) = (generator.count.read()?, sinks.read()?);
        Ok(Measured {
            generated: g1 - g0,
            delivered: s1 - s0,
            busy,
        })
    })?
}

fn packet_row(name: &'static str, description: &'static str, slices: &[Measured]) -> PacketRow {
    let generated: u64 = slices.iter().map(|m| m.generated).sum();
    let delivered: u64 = slices.iter().map(|m| m.delivered).sum();
    let busy: Duration = slices.iter().map(|m| m.busy).sum();
    let secs = busy.as_secs_f64().max(1e-9);
    let lost = generated.saturating_sub(delivered);
    PacketRow {
        name,
        description,
        skipped: None,
        generated: Some(generated),
        delivered: Some(delivered),
        lost: Some(lost),
        seconds: Some(secs),
        generated_mpps: Some(generated as f64 / secs / 1e6),
        delivered_mpps: Some(delivered as f64 / secs / 1e6),
        loss_ratio: Some(if generated == 0 {
            0.0
        } else {
            lost as f64 / generated as f64
        }),
        round_mpps: slices
            .iter()
            .map(|m| m.delivered as f64 / m.busy.as_secs_f64().max(1e-9) / 1e6)
            .collect(),
        xlb_ratio: None,
    }
}

const fn skipped_packet_row(
    name: &'static str,
    description: &'static str,
    why: String,
) -> PacketRow {
    PacketRow {
        name,
        description,
        skipped: Some(why),
        generated: None,
        delivered: None,
        lost: None,
        seconds: None,
        generated_mpps: None,
        delivered_mpps: None,
        loss_ratio: None,
        round_mpps: Vec::new(),
        xlb_ratio: None,
    }
}

// ---------------------------------------------------------------------------------------------
// nftables and HAProxy

fn nft_ruleset(backends: &[Ipv4Addr]) -> String {
    let map = |_proto: &str| {
        backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("{i} : {b} . {BACKEND_PORT}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let n = backends.len();
    format!(
        "table ip {NFT_TABLE} {{\n chain pre {{\n  type nat hook prerouting priority -100;\n  \
         ip daddr {VIP} udp dport {VIP_PORT} dnat ip to jhash ip saddr . udp sport mod {n} map {{ {} }}\n  \
         ip daddr {VIP} tcp dport {VIP_PORT} dnat ip to jhash ip saddr . tcp sport mod {n} map {{ {} }}\n }}\n}}\n",
        map("udp"),
        map("tcp"),
    )
}

/// The nftables balancer in the LB namespace; deleted on drop.
struct Nft<'a> {
    ns: &'a Netns,
}

impl<'a> Nft<'a> {
    fn install(ns: &'a Netns, backends: &[Ipv4Addr]) -> Result<Self> {
        let mut child = ns
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft (is nftables installed?)")?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(nft_ruleset(backends).as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "nft -f: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Self { ns })
    }
}

impl Drop for Nft<'_> {
    fn drop(&mut self) {
        let _ = self
            .ns
            .command("nft")
            .args(["delete", "table", "ip", NFT_TABLE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `name` on PATH, else in the sbin directories a non-root PATH leaves out.
fn find_in_path(name: &str) -> Option<PathBuf> {
    which::which(name)
        .or_else(|_| which::which_in(name, Some("/usr/sbin:/sbin"), "/"))
        .ok()
}

/// HAProxy in TCP mode in the LB namespace, bound to the VIP; killed on drop.
struct Haproxy {
    child: Child,
    config: PathBuf,
}

impl Haproxy {
    fn start(binary: &PathBuf, ns: &Netns, backends: &[Ipv4Addr]) -> Result<Self> {
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("    server b{i} {b}:{BACKEND_PORT}\n"))
            .collect();
        let config =
            std::env::temp_dir().join(format!("xlb-bench-haproxy-{}.cfg", std::process::id()));
        std::fs::write(
            &config,
            format!(
                "global\n    maxconn 4096\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    \
                 timeout client 5s\n    timeout server 5s\n\nfrontend vip\n    bind {VIP}:{VIP_PORT}\n    \
                 default_backend pool\n\nbackend pool\n    balance roundrobin\n{servers}"
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let log_path = config.with_extension("log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = ns
            .command(binary)
            .arg("-f")
            .arg(&config)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut haproxy = Self { child, config };
        std::thread::sleep(Duration::from_millis(200));
        let exited = haproxy.child.try_wait()?;
        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = std::fs::remove_file(&log_path);
        if let Some(status) = exited {
            bail!(
                "haproxy exited ({status}): {}",
                output.trim().replace('\n', " | ")
            );
        }
        Ok(haproxy)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

// ---------------------------------------------------------------------------------------------
// Connection-level test

/// Request/response servers in the sink namespaces; stopped (and joined) on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

fn serve(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut stream = stream;
    let mut request = [0u8; REQUEST_LEN];
    let response = [b'r'; RESPONSE_LEN];
    loop {
        if stream.read_exact(&mut request).is_err() || stream.write_all(&response).is_err() {
            return;
        }
        if request[0] == REQ_CLOSE {
            // The server closes first, so TIME_WAIT stays on the server side.
            return;
        }
    }
}

impl Servers {
    fn start(topo: &Topo, workers: u32) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for link in &topo.sinks {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let stop2 = Arc::clone(&stop);
            handles.push(topo.net.ns(link.b.ns).spawn(move || {
                let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                // accept(2) honours SO_RCVTIMEO: lets the workers notice `stop`.
                let timeout = nix::sys::time::TimeVal::new(0, 100_000);
                let _ = nix::sys::socket::setsockopt(
                    &listener,
                    nix::sys::socket::sockopt::ReceiveTimeout,
                    &timeout,
                );
                let _ = tx.send(Ok(()));
                std::thread::scope(|s| {
                    for _ in 0..workers {
                        s.spawn(|| {
                            while !stop2.load(Ordering::Relaxed) {
                                if let Ok((stream, _)) = listener.accept() {
                                    serve(stream);
                                }
                            }
                        });
                    }
                });
            })?);
            rx.recv()
                .map_err(|_| anyhow!("backend server thread died"))?
                .context("binding the backend server")?;
        }
        Ok(Self { stop, handles })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn request(stream: &mut TcpStream, kind: u8) -> std::io::Result<()> {
    let mut req = [b'q'; REQUEST_LEN];
    req[0] = kind;
    stream.write_all(&req)?;
    let mut resp = [0u8; RESPONSE_LEN];
    stream.read_exact(&mut resp)
}

fn connect(vip: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&vip, Duration::from_secs(1))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok(s)
}

fn one_connection(vip: SocketAddr) -> std::io::Result<()> {
    let mut s = connect(vip)?;
    request(&mut s, REQ_CLOSE)?;
    // Wait for the server's FIN, so the connection is complete on both sides.
    let mut rest = [0u8; 1];
    match s.read(&mut rest)? {
        0 => Ok(()),
        _ => Err(std::io::Error::other("unexpected bytes after the response")),
    }
}

struct ConnFigures {
    connections_per_s: f64,
    requests_per_s: f64,
    errors: u64,
}

/// Runs both client loads from the generator namespace against the VIP.
fn connection_load(topo: &Topo, options: &ForwardOptions) -> Result<ConnFigures> {
    let vip = SocketAddr::new(IpAddr::V4(VIP), VIP_PORT);
    let clients = options.conn_clients.max(1);
    let d = options.conn_duration;
    topo.generator_ns().run(|| -> Result<ConnFigures> {
        // Something must answer before anything is timed.
        let ready_by = Instant::now() + Duration::from_secs(3);
        loop {
            match one_connection(vip) {
                Ok(()) => break,
                Err(e) if Instant::now() > ready_by => {
                    bail!("nothing answers at {vip} through this balancer: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let done = AtomicU64::new(0);
        let errors = AtomicU64::new(0);
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..clients {
                s.spawn(|| {
                    while start.elapsed() < d {
                        match one_connection(vip) {
                            Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                            Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                });
            }
        });
        let connections_per_s = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        let requests = AtomicU64::new(0);
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..clients {
                s.spawn(|| {
                    let mut stream = None;
                    while start.elapsed() < d {
                        let conn = match stream.take() {
                            Some(c) => Ok(c),
                            None => connect(vip),
                        };
                        match conn.and_then(|mut c| request(&mut c, REQ_KEEP).map(|()| c)) {
                            Ok(c) => {
                                requests.fetch_add(1, Ordering::Relaxed);
                                stream = Some(c);
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        let requests_per_s =
            requests.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        Ok(ConnFigures {
            connections_per_s,
            requests_per_s,
            errors: errors.load(Ordering::Relaxed),
        })
    })?
}

fn conn_row(name: &'static str, description: &'static str, r: Result<ConnFigures>) -> ConnRow {
    match r {
        Ok(f) => ConnRow {
            name,
            description,
            skipped: None,
            connections_per_s: Some(f.connections_per_s),
            requests_per_s: Some(f.requests_per_s),
            errors: Some(f.errors),
            xlb_ratio_connections: None,
            xlb_ratio_requests: None,
        },
        Err(e) => skipped_conn_row(name, description, format!("failed: {e:#}")),
    }
}

const fn skipped_conn_row(name: &'static str, description: &'static str, why: String) -> ConnRow {
    ConnRow {
        name,
        description,
        skipped: Some(why),
        connections_per_s: None,
        requests_per_s: None,
        errors: None,
        xlb_ratio_connections: None,
        xlb_ratio_requests: None,
    }
}

// ---------------------------------------------------------------------------------------------
// The xlb balancer in the LB namespace

struct Lb {
    balancer: Balancer,
    links: Vec<XdpLinkId>,
}

fn vip_spec(proto: Protocol) -> VipSpec {
    VipSpec {
        addr: SocketAddr::new(IpAddr::V4(VIP), VIP_PORT),
        proto,
    }
}

impl Lb {
    /// xlb with both VIPs reaching the first `backends` sinks by `forwarding`; a tunnelled
    /// VIP's backends serve the VIP's own port. `object`: another build's data path instead
    /// of this one's.
    fn new(
        topo: &Topo,
        forwarding: Forwarding,
        backends: usize,
        object: Option<&[u8]>,
    ) -> Result<Self> {
        let config = DatapathConfig {
            ring_size: 65_537,
            max_vips: 4,
            ..DatapathConfig::default()
        };
        let datapath = match object {
            Some(object) => Datapath::load_object(config, object),
            None => Datapath::load(config),
        }
        .context("loading xlb")?;
        let mut balancer = Balancer::new(datapath);
        // Devmap entries resolve the ifindex in the caller's namespace.
        topo.lb().run(|| -> Result<()> {
            for ifindex in topo.lb_ifindexes() {
                balancer.allow_egress(ifindex)?;
            }
            Ok(())
        })??;
        for proto in [Protocol::Udp, Protocol::Tcp] {
            let vip = vip_spec(proto);
            balancer.add_vip_with(vip, None, forwarding)?;
            let port = if forwarding == Forwarding::Nat {
                BACKEND_PORT
            } else {
                VIP_PORT
            };
            for b in topo.backend_addrs().into_iter().take(backends) {
                balancer.add_backend(&vip, SocketAddr::new(IpAddr::V4(b), port), 1)?;
            }
        }
        Ok(Self {
            balancer,
            links: Vec::new(),
        })
    }

    /// xlb with IPIP VIPs, detached, once one generated `frame` run through its program comes
    /// out tunnelled as [`check_tunnelled`] requires.
    fn tunnelling(topo: &Topo, frame: &[u8]) -> Result<Self> {
        let lb = Self::new(topo, Forwarding::Ipip, topo.sinks.len(), None)?;
        let mut out = vec![0u8; frame.len() + 256];
        let outcome = topo.lb().run(|| {
            lb.balancer
                .datapath()
                .test_run(program_names::XLB, frame, &mut out, 1)
        })??;
        out.truncate(outcome.len);
        let links: Vec<(Ipv4Addr, Ipv4Addr, [u8; 6], [u8; 6])> = topo
            .sinks
            .iter()
            .map(|l| (l.a.ip4(), l.b.ip4(), l.a.mac, l.b.mac))
            .collect();
        check_tunnelled(outcome.action, frame, &out, &links)
            .map_err(|e| anyhow!("xlb's IPIP output is wrong: {e}"))?;
        Ok(lb)
    }

    fn attach(&mut self, topo: &Topo) -> Result<()> {
        let datapath = self.balancer.datapath_mut();
        self.links = topo.lb().run(|| -> Result<Vec<XdpLinkId>> {
            topo.lb_ifindexes()
                .into_iter()
                .map(|i| datapath.attach(i, XdpMode::Driver).map_err(Into::into))
                .collect()
        })??;
        Ok(())
    }

    fn detach(&mut self, topo: &Topo) -> Result<()> {
        let datapath = self.balancer.datapath_mut();
        let links = std::mem::take(&mut self.links);
        topo.lb().run(|| -> Result<()> {
            for l in links {
                datapath.detach(l)?;
            }
            Ok(())
        })?
    }
}

/// `out` is `input`'s IP packet, unchanged, inside an outer IPv4/IPIP header with a valid
/// checksum, from the LB's address on a backend's link to that backend, between the link's
/// MACs. `links` are (LB address, backend address, LB MAC, backend MAC).
fn check_tunnelled(
    action: u32,
    input: &[u8],
    out: &[u8],
    links: &[(Ipv4Addr, Ipv4Addr, [u8; 6], [u8; 6])],
) -> Result<(), String> {
    const XDP_REDIRECT: u32 = 4;
    if action != XDP_REDIRECT {
        return Err(format!("action {action}, expected XDP_REDIRECT"));
    }
    let outer = out.get(14..34).ok_or("short output")?;
    if out[12..14] != [0x08, 0x00] || outer[0] != 0x45 || outer[9] != 4 {
        return Err(format!("not IPv4-in-IPv4: {:02x?}", &out[12..34]));
    }
    if lb_common::csum::checksum(0, outer) != 0 {
        return Err("outer header checksum".into());
    }
    let src = Ipv4Addr::new(outer[12], outer[13], outer[14], outer[15]);
    let dst = Ipv4Addr::new(outer[16], outer[17], outer[18], outer[19]);
    let &(lb_addr, _, lb_mac, backend_mac) = links
        .iter()
        .find(|l| l.1 == dst)
        .ok_or_else(|| format!("tunnelled to {dst}, not a backend"))?;
    if src != lb_addr {
        return Err(format!("outer source {src}, expected {lb_addr}"));
    }
    if out[0..6] != backend_mac || out[6..12] != lb_mac {
        return Err(format!("MACs {:02x?}", &out[0..12]));
    }
    if usize::from(u16::from_be_bytes([outer[2], outer[3]])) != out.len() - 14 {
        return Err("outer total length".into());
    }
    if out.get(34..) != input.get(14..) {
        return Err("the inner packet changed".into());
    }
    Ok(())
}

/// Attaches `program` of a fresh small datapath to each `(namespace, ifindex)`; dropping the
/// datapath detaches it everywhere.
fn attach_everywhere(topo: &Topo, program: &'static str, at: &[(NsId, u32)]) -> Result<Datapath> {
    let mut datapath = Datapath::load(small_config()).context("loading a benchmark program")?;
    for &(ns, ifindex) in at {
        topo.net
            .ns(ns)
            .run(|| datapath.attach_program(program, ifindex, XdpMode::Driver))??;
    }
    Ok(datapath)
}

/// Where the redirect-only ceiling sends the generator's flows.
#[derive(Clone, Copy)]
enum Fanout {
    /// Everything to the first sink.
    One,
    /// Over every sink, by source port, as a balancer spreads flows over backends: the
    /// sinks' receive work is then split into as many smaller batches as under xlb.
    Spread,
}

/// The redirect-only ceiling, its next hops and redirect map filled; `Contender::slice`
/// attaches it to the LB's generator-facing interface.
fn ceiling(topo: &Topo, fanout: Fanout) -> Result<Datapath> {
    let mut datapath = Datapath::load(small_config()).context("loading the redirect ceiling")?;
    let used = match fanout {
        Fanout::One => &topo.sinks[..1],
        Fanout::Spread => &topo.sinks[..],
    };
    let mut slots = datapath.map_mut::<Array<&mut MapData, NextHop>>(bench_maps::REDIRECT_TO)?;
    for slot in 0..BENCH_SPREAD_SLOTS {
        let out = &used[slot as usize % used.len()];
        slots.set(
            slot,
            &NextHop {
                ifindex: out.a.ifindex,
                src_mac: out.a.mac,
                dst_mac: out.b.mac,
            },
            0,
        )?;
    }
    topo.lb().run(|| -> Result<()> {
        let mut ports = datapath.map_mut::<DevMapHash<&mut MapData>>(bench_maps::PORTS)?;
        for out in used {
            ports.insert(out.a.ifindex, out.a.ifindex, None, 0)?;
        }
        Ok(())
    })??;
    Ok(datapath)
}

// ---------------------------------------------------------------------------------------------
// Backend add → first packet

fn backend_add_latency(
    generator: &mut Generator,
    topo: &Topo,
    lb: &mut Lb,
    trials: u32,
) -> Result<BackendAddLatency> {
    let probe_sink = attach_everywhere(
        topo,
        program_names::BENCH_SINK,
        &[(topo.probe.b.ns, topo.probe.b.ifindex)],
    )?;
    let probe_count = Counter::of(&probe_sink)?;
    let vip = vip_spec(Protocol::Udp);
    let probe = SocketAddr::new(IpAddr::V4(topo.probe.b.ip4()), BACKEND_PORT);
    let stop = AtomicBool::new(false);
    // When the generator's current call started (ns since `base`), 0 between calls.
    let in_call_since = AtomicU64::new(0);
    let base = Instant::now();
    let vip_dst = SocketAddrV4::new(VIP, VIP_PORT);
    // A fresh source address for every template (never repeating within a run: flows the
    // connection table already knows stay on their backends), built without borrowing the
    // generator, whose template map is written below while its program runs.
    let shape = generator.shape;
    let mut trials_us = Vec::new();
    let mut timeouts = 0;
    let program = generator.datapath.program(program_names::BENCH_GENERATE)?;
    let (ifindex, batch) = (generator.ifindex, generator.batch);
    // Only the template map is written from here while the generator thread runs.
    let frame = &mut generator.frame;
    let mut churn = 0u32;
    let mut next = || {
        churn = (churn + 1) % (1 << 22);
        shape.template(Ipv4Addr::from_bits(CHURN_BASE.to_bits() + churn), vip_dst)
    };
    let aim = |frame: &mut Array<MapData, BenchFrame>, t: BenchFrame| -> Result<()> {
        frame.set(0, &t, 0)?;
        Ok(())
    };
    let result = std::thread::scope(|s| -> Result<()> {
        let gen_thread = s.spawn(|| {
            topo.generator_ns().run(|| -> Result<()> {
                crate::pin_to_one_cpu();
                let probe = 100_000;
                let per_frame = live_frames(program, ifindex, probe, batch)? / probe;
                // Long calls: no frames flow during a call's ~37 ms of setup, so a trial only
                // starts well inside a call (see `in_call_since`).
                let per_call = frames_for(per_frame, Duration::from_millis(1500));
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    in_call_since.store(
                        u64::try_from(base.elapsed().as_nanos())
                            .unwrap_or(u64::MAX)
                            .max(1),
                        Ordering::Relaxed,
                    );
                    let r = live_frames(program, ifindex, per_call, batch);
                    in_call_since.store(0, Ordering::Relaxed);
                    r?;
                }
                Ok(())
            })
        });
        let mut run = || -> Result<()> {
            for _ in 0..trials {
                aim(frame, next())?;
                // Wait until the generator is 100-600 ms into a call (a call lasts ~1.5 s).
                let wait_until = Instant::now() + Duration::from_secs(10);
                loop {
                    let since = in_call_since.load(Ordering::Relaxed);
                    let now = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    let into = now.saturating_sub(since);
                    if since != 0 && (100_000_000..600_000_000).contains(&into) {
                        break;
                    }
                    ensure!(Instant::now() < wait_until, "the generator did not start");
                    std::thread::sleep(Duration::from_millis(5));
                }
                let before = probe_count.read()?;
                lb.balancer.add_backend(&vip, probe, 1)?;
                let added = Instant::now();
                let mut seen = false;
                let mut aimed = Instant::now();
                aim(frame, next())?;
                while added.elapsed() < Duration::from_secs(1) {
                    // A new source every ~20 us: tens of frames, each a new flow.
                    if aimed.elapsed() > Duration::from_micros(20) {
                        aim(frame, next())?;
                        aimed = Instant::now();
                    }
                    if probe_count.read()? > before {
                        trials_us.push(added.elapsed().as_secs_f64() * 1e6);
                        seen = true;
                        break;
                    }
                }
                if !seen {
                    timeouts += 1;
                }
                lb.balancer.remove_backend(&vip, probe)?;
                // Known flows leave the removed backend; let the rest drain.
                aim(frame, next())?;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        };
        let r = run();
        stop.store(true, Ordering::Relaxed);
        let g = gen_thread
            .join()
            .map_err(|_| anyhow!("generator thread panicked"))?;
        r?;
        g??;
        Ok(())
    });
    drop(probe_sink);
    result?;
    let mut sorted = trials_us.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(BackendAddLatency {
        skipped: None,
        min_us: sorted.first().copied(),
        median_us: sorted.get(sorted.len() / 2).copied(),
        max_us: sorted.last().copied(),
        trials_us,
        timeouts,
        method: BACKEND_ADD_METHOD,
    })
}

// ---------------------------------------------------------------------------------------------

fn ipvs_status() -> String {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let config = std::fs::read_to_string(format!("/boot/config-{release}")).unwrap_or_default();
    let set = config
        .lines()
        .find(|l| l.starts_with("CONFIG_IP_VS=") || l.starts_with("# CONFIG_IP_VS is not set"));
    let loaded = std::path::Path::new("/proc/net/ip_vs").exists()
        || std::path::Path::new(&format!("/lib/modules/{release}/kernel/net/netfilter/ipvs"))
            .exists();
    match set {
        Some(l) if l.starts_with('#') => {
            "not measured: this kernel has no IPVS (CONFIG_IP_VS is not set); nftables DNAT is the kernel's balancer here".to_owned()
        }
        Some(l) => format!("not measured: IPVS is available ({l}) but this bench does not drive it"),
        None if loaded => "not measured: IPVS is available but this bench does not drive it".to_owned(),
        None => "not measured: this kernel has no IPVS (CONFIG_IP_VS is not set on this project's machines); nftables DNAT is the kernel's balancer here".to_owned(),
    }
}

fn progress(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:40}] {pos}/{len} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

fn ratio(xlb: Option<f64>, other: Option<f64>) -> Option<f64> {
    match (xlb, other) {
        (Some(x), Some(o)) if o > 0.0 => Some(x / o),
        _ => None,
    }
}

const ROUTING: (&str, &str) = (
    "routing",
    "no balancer: the LB namespace routes frames addressed to backend 0",
);
const CEILING: (&str, &str) = (
    "xdp_redirect",
    "XDP program that only rewrites MACs and redirects, everything to backend 0",
);
const CEILING_SPREAD: (&str, &str) = (
    "xdp_redirect_spread",
    "the same XDP program spreading the flows over the backends by source port, as xlb spreads them (the ceiling of this path)",
);
const NFT: (&str, &str) = (
    "nftables",
    "nftables DNAT of the VIP over the backends by jhash, with conntrack (kube-proxy's nftables mode)",
);
const XLB: (&str, &str) = (
    "xlb",
    "xlb on every LB interface, VIP over the backends (Maglev, connection table)",
);
const XLB_ONE: (&str, &str) = (
    "xlb_one_backend",
    "the same xlb with backend 0 alone behind the VIP: the fan-out of the xdp_redirect row",
);
const XLB_AGAINST: (&str, &str) = (
    "xlb_against",
    "xlb as the xlb row, from the eBPF object given with --against (measured right after it in every round)",
);
const XLB_DSR: (&str, &str) = (
    "xlb_dsr_ipip",
    "xlb on every LB interface, the VIP in direct server return: each frame left intact inside an outer IPv4 header (IPIP) from the LB to its backend; the sinks count the encapsulated frames",
);
const HAPROXY: (&str, &str) = (
    "haproxy",
    "HAProxy in TCP mode in the LB namespace, bound to the VIP, round robin",
);

/// Builds the namespaces, measures every configuration and tears everything down.
///
/// # Errors
/// Not root, no BPF, the namespaces or the programs failing to set up. A configuration that
/// fails on its own (nftables missing, say) becomes a skipped row instead.
pub fn run(options: &ForwardOptions, quiet: bool) -> Result<ForwardReport> {
    ensure!(
        options.packet_duration > Duration::ZERO && options.conn_duration > Duration::ZERO,
        "durations must be positive"
    );
    let against_object = options
        .against
        .as_ref()
        .map(|path| std::fs::read(path).with_context(|| format!("reading {}", path.display())))
        .transpose()?;
    let bar = progress(u64::from(options.rounds.max(1)) + 4, quiet);
    bar.set_message("setting up");
    let topo = Topo::new(options.backends)?;
    let mut generator = Generator::new(&topo, options.flows, options.batch)?;
    let sink_at: Vec<(NsId, u32)> = topo.sinks.iter().map(|l| (l.b.ns, l.b.ifindex)).collect();
    let sinks_dp = attach_everywhere(&topo, program_names::BENCH_SINK, &sink_at)?;
    let sinks = Counter::of(&sinks_dp)?;
    let mut lb = Lb::new(&topo, Forwarding::Nat, topo.sinks.len(), None)?;
    let mut packets = {
        let vip_template = generator
            .shape
            .template(generator.src, SocketAddrV4::new(VIP, VIP_PORT));
        let mut lb_one = Lb::new(&topo, Forwarding::Nat, 1, None);
        // Asked for by name: an object that does not load ends the run.
        let mut lb_against = against_object
            .as_deref()
            .map(|object| Lb::new(&topo, Forwarding::Nat, topo.sinks.len(), Some(object)))
            .transpose()
            .context("the --against object")?;
        let mut dsr = options
            .dsr
            .then(|| Lb::tunnelling(&topo, &vip_template.bytes));
        let mut rows = vec![
            Rotation::new(ROUTING, Ok(Contender::Routing)),
            Rotation::new(CEILING, ceiling(&topo, Fanout::One).map(Contender::Ceiling)),
            Rotation::new(
                CEILING_SPREAD,
                ceiling(&topo, Fanout::Spread).map(Contender::Ceiling),
            ),
            Rotation::new(NFT, Ok(Contender::Nft)),
            Rotation::new(XLB, Ok(Contender::Xlb(&mut lb))),
            Rotation::new(
                XLB_ONE,
                lb_one
                    .as_mut()
                    .map(Contender::Xlb)
                    .map_err(|e| anyhow!("{e:#}")),
            ),
        ];
        if let Some(against) = lb_against.as_mut() {
            rows.push(Rotation::new(XLB_AGAINST, Ok(Contender::Xlb(against))));
        }
        match dsr.as_mut() {
            Some(tunnelling) => rows.push(Rotation::new(
                XLB_DSR,
                tunnelling
                    .as_mut()
                    .map(Contender::Xlb)
                    .map_err(|e| anyhow!("{e:#}")),
            )),
            None => rows.push(Rotation::skipped(XLB_DSR, "not run (--no-dsr)")),
        }
        // Each ratio's two rows run one after the other, the seconds between them being
        // what drifts least.
        let order = [
            ROUTING,
            NFT,
            XLB_DSR,
            CEILING_SPREAD,
            XLB,
            XLB_AGAINST,
            XLB_ONE,
            CEILING,
        ]
        .into_iter()
        .filter_map(|(name, _)| rows.iter().position(|r| r.name == name))
        .collect::<Vec<_>>();
        let rounds = options.rounds.max(1);
        let slice = options.packet_duration / rounds;
        for round in 0..rounds as usize {
            bar.set_message(format!("packet rates, round {} of {rounds}", round + 1));
            for i in 0..order.len() {
                let row = &mut rows[order[(round + i) % order.len()]];
                row.measure(&topo, &mut generator, &sinks, options, slice);
            }
            bar.inc(1);
        }
        rows.into_iter().map(Rotation::finish).collect::<Vec<_>>()
    };
    lb.attach(&topo)?;

    bar.set_message("backend add");
    let backend_add =
        match backend_add_latency(&mut generator, &topo, &mut lb, options.add_trials.max(1)) {
            Ok(b) => b,
            Err(e) => BackendAddLatency {
                skipped: Some(format!("failed: {e:#}")),
                trials_us: Vec::new(),
                min_us: None,
                median_us: None,
                max_us: None,
                timeouts: 0,
                method: BACKEND_ADD_METHOD,
            },
        };
    bar.inc(1);
    // The connection test needs the backends' stacks: no XDP sinks from here on.
    drop(sinks);
    drop(sinks_dp);

    let servers = Servers::start(&topo, options.conn_clients.max(1) + 1)?;
    let mut connections = Vec::new();
    bar.set_message("connections: xlb");
    connections.push(conn_row(XLB.0, XLB.1, connection_load(&topo, options)));
    lb.detach(&topo)?;
    bar.inc(1);

    bar.set_message("connections: nftables");
    let row = Nft::install(topo.lb(), &topo.backend_addrs()).and_then(|nft| {
        let r = connection_load(&topo, options);
        drop(nft);
        r
    });
    connections.push(conn_row(NFT.0, NFT.1, row));
    bar.inc(1);

    bar.set_message("connections: haproxy");
    let haproxy_bin = options.haproxy.clone().or_else(|| find_in_path("haproxy"));
    let row = match haproxy_bin {
        None => skipped_conn_row(
            HAPROXY.0,
            HAPROXY.1,
            "haproxy is not installed (apt install haproxy); the bench does not install it"
                .to_owned(),
        ),
        Some(bin) => {
            let r = topo
                .lb()
                .add_address("lo", Ipv4Net::new(VIP, 32)?)
                .map_err(anyhow::Error::from)
                .and_then(|()| Haproxy::start(&bin, topo.lb(), &topo.backend_addrs()))
                .and_then(|h| {
                    let r = connection_load(&topo, options);
                    drop(h);
                    r
                });
            conn_row(HAPROXY.0, HAPROXY.1, r)
        }
    };
    connections.push(row);
    bar.inc(1);
    drop(servers);
    bar.finish_and_clear();

    let xlb_rounds = round_mpps(&packets, XLB.0);
    for r in &mut packets {
        if r.skipped.is_none() {
            r.xlb_ratio = xlb_rounds
                .as_ref()
                .and_then(|x| RoundRatios::of(x, &r.round_mpps))
                .map(|q| q.median);
        }
    }
    let xlb_conn = connections.iter().find(|r| r.name == XLB.0).cloned();
    for r in &mut connections {
        r.xlb_ratio_connections = ratio(
            xlb_conn.as_ref().and_then(|x| x.connections_per_s),
            r.connections_per_s,
        );
        r.xlb_ratio_requests = ratio(
            xlb_conn.as_ref().and_then(|x| x.requests_per_s),
            r.requests_per_s,
        );
    }
    let ceiling_share = vec![
        PairedRatio::of(
            &packets,
            format!(
                "share of the redirect ceiling, {} backends",
                options.backends
            ),
            XLB.0,
            CEILING_SPREAD.0,
        ),
        PairedRatio::of(
            &packets,
            "share of the redirect ceiling, 1 backend".to_owned(),
            XLB_ONE.0,
            CEILING.0,
        ),
    ];
    let against = options.against.as_ref().map(|path| {
        PairedRatio::of(
            &packets,
            format!("this build over {}", path.display()),
            XLB.0,
            XLB_AGAINST.0,
        )
    });
    drop(lb);
    drop(generator);
    drop(topo);
    Ok(ForwardReport {
        machine: Machine::current(),
        method: FORWARD_METHOD,
        flows: options.flows,
        backends: options.backends,
        frame_bytes: BENCH_FRAME_LEN,
        packet_seconds_per_config: options.packet_duration.as_secs_f64(),
        rounds: options.rounds.max(1),
        packets,
        ceiling_share,
        against,
        backend_add,
        connections,
        ipvs: ipvs_status(),
        reference: reference(),
    })
}

/// A measured row's rate in each round.
fn round_mpps(packets: &[PacketRow], name: &str) -> Option<Vec<f64>> {
    packets
        .iter()
        .find(|r| r.name == name && r.skipped.is_none())
        .map(|r| r.round_mpps.clone())
}

fn opt(v: Option<f64>, precision: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.precision$}"))
}

fn opt_int(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The report as terminal tables.
pub fn print(report: &ForwardReport) {
    println!(
        "Forwarding through the LB namespace ({} flows, {} backends, {}-byte UDP frames, ~{:.1} s per row in {} rounds)",
        report.flows,
        report.backends,
        report.frame_bytes,
        report.packet_seconds_per_config,
        report.rounds
    );
    println!(
        "{:<20} {:>10} {:>10} {:>13} {:>13} {:>8} {:>9}",
        "LB in the middle", "gen Mpps", "sink Mpps", "generated", "lost", "loss %", "xlb ratio"
    );
    for r in &report.packets {
        if let Some(why) = &r.skipped {
            println!("{:<20} skipped: {why}", r.name);
            continue;
        }
        println!(
            "{:<20} {:>10} {:>10} {:>13} {:>13} {:>8} {:>9}",
            r.name,
            opt(r.generated_mpps, 2),
            opt(r.delivered_mpps, 2),
            opt_int(r.generated),
            opt_int(r.lost),
            opt(r.loss_ratio.map(|l| l * 100.0), 1),
            opt(r.xlb_ratio, 2),
        );
    }
    for c in report.ceiling_share.iter().chain(&report.against) {
        println!(
            "{}: {} / {} = {} % (rounds {}-{} %)",
            c.what,
            c.numerator,
            c.denominator,
            opt(c.median.map(|s| s * 100.0), 1),
            opt(c.min.map(|s| s * 100.0), 1),
            opt(c.max.map(|s| s * 100.0), 1),
        );
    }
    println!("IPVS: {}", report.ipvs);
    let reference: Vec<String> = report
        .reference
        .iter()
        .map(|r| format!("{} {:.2}", r.what, r.mpps))
        .collect();
    println!(
        "Reference Mpps on this machine kind (design doc, another run): {}",
        reference.join("; ")
    );
    println!();
    let a = &report.backend_add;
    match &a.skipped {
        Some(why) => println!("backend add -> first packet at the new backend: skipped: {why}"),
        None => println!(
            "backend add -> first packet at the new backend: min {} / median {} / max {} us over {} trials ({} timed out)",
            opt(a.min_us, 0),
            opt(a.median_us, 0),
            opt(a.max_us, 0),
            a.trials_us.len(),
            a.timeouts
        ),
    }
    println!();
    println!(
        "{:<14} {:>12} {:>12} {:>8} {:>11} {:>11}",
        "TCP through", "conn/s", "req/s", "errors", "xlb x conn", "xlb x req"
    );
    for r in &report.connections {
        if let Some(why) = &r.skipped {
            println!("{:<14} skipped: {why}", r.name);
            continue;
        }
        println!(
            "{:<14} {:>12} {:>12} {:>8} {:>11} {:>11}",
            r.name,
            opt(r.connections_per_s, 0),
            opt(r.requests_per_s, 0),
            opt_int(r.errors),
            opt(r.xlb_ratio_connections, 2),
            opt(r.xlb_ratio_requests, 2),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_ruleset_maps_every_backend() {
        let rules = nft_ruleset(&[Ipv4Addr::new(10, 91, 0, 2), Ipv4Addr::new(10, 91, 1, 2)]);
        assert!(rules.contains(
            "jhash ip saddr . udp sport mod 2 map { 0 : 10.91.0.2 . 8080, 1 : 10.91.1.2 . 8080 }"
        ));
        assert!(rules.contains("tcp sport mod 2"));
    }

    const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn links() -> Vec<(Ipv4Addr, Ipv4Addr, [u8; 6], [u8; 6])> {
        vec![(
            Ipv4Addr::new(10, 91, 0, 1),
            Ipv4Addr::new(10, 91, 0, 2),
            LB_MAC,
            BACKEND_MAC,
        )]
    }

    /// `input` as xlb should tunnel it to 10.91.0.2.
    fn tunnelled(input: &[u8]) -> Vec<u8> {
        let inner = &input[14..];
        let mut outer = [0u8; 20];
        outer[0] = 0x45;
        outer[2..4].copy_from_slice(&u16::try_from(20 + inner.len()).unwrap().to_be_bytes());
        outer[8] = 64;
        outer[9] = 4;
        outer[12..16].copy_from_slice(&[10, 91, 0, 1]);
        outer[16..20].copy_from_slice(&[10, 91, 0, 2]);
        let sum = lb_common::csum::checksum(0, &outer);
        outer[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut out = Vec::new();
        out.extend_from_slice(&BACKEND_MAC);
        out.extend_from_slice(&LB_MAC);
        out.extend_from_slice(&[0x08, 0x00]);
        out.extend_from_slice(&outer);
        out.extend_from_slice(inner);
        out
    }

    #[test]
    fn tunnelled_output_check_accepts_ipip_and_rejects_damage() {
        let input = frames::udp(
            SocketAddrV4::new(Ipv4Addr::new(10, 90, 0, 2), SPORT_BASE),
            SocketAddrV4::new(VIP, VIP_PORT),
            BENCH_FRAME_LEN - 42,
            false,
        );
        let good = tunnelled(&input);
        assert_eq!(check_tunnelled(4, &input, &good, &links()), Ok(()));
        assert!(check_tunnelled(3, &input, &good, &links()).is_err());

        let mut inner_changed = good.clone();
        *inner_changed.last_mut().unwrap() ^= 1;
        assert!(check_tunnelled(4, &input, &inner_changed, &links()).is_err());

        let mut elsewhere = good.clone();
        elsewhere[33] = 9;
        assert!(check_tunnelled(4, &input, &elsewhere, &links()).is_err());

        let mut bad_sum = good.clone();
        bad_sum[24] ^= 0xff;
        assert!(check_tunnelled(4, &input, &bad_sum, &links()).is_err());

        // NAT output (no outer header) is not a tunnelled frame.
        assert!(check_tunnelled(4, &input, &input, &links()).is_err());
    }

    #[test]
    fn calls_are_sized_from_the_warmup_rate() {
        assert_eq!(
            frames_for(Duration::from_nanos(500), Duration::from_secs(1)),
            2_000_000
        );
        assert_eq!(
            frames_for(Duration::ZERO, Duration::from_secs(1)),
            50_000_000
        );
    }
}
