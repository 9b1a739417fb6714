//! `xlb bench cost`: the loaded program's cost per packet through `BPF_PROG_TEST_RUN`, next
//! to two floors measured in the same run, and its scaling with flows, backends and VIPs.
//!
//! Method (as Katran's published figures): one test run per call (`repeat = 1`, because the
//! program rewrites in place and later iterations of one call would see rewritten packets),
//! the kernel-reported duration of each call, the calling thread pinned to one CPU. Every
//! measured call's action and output are checked.

use std::net::SocketAddrV4;

use anyhow::{Context as _, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use lb_common::{Counter, program_names};
use lb_userspace::{
    balancer::Forwarding,
    datapath::DatapathConfig,
    frames::{self, TCP_ACK, TCP_SYN},
};
use serde::Serialize;

use crate::{
    env::{BACKEND_PORT, BenchEnv, backend_addr, client, vip},
    median,
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

/// Katran's balancer measured on this project's machine kind with this method (medians,
/// kernel-reported ns per call; ../shared/design.md). Not re-measured here: Katran is not
/// built by this project.
pub const KATRAN_REFERENCE: [(&str, f64); 4] = [
    ("tcp_syn_new_flow", 531.0),
    ("tcp_ack_established", 281.0),
    ("udp_not_for_vip", 160.0),
    ("junk_64_bytes", 110.0),
];

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub min_ns: f64,
    pub median_ns: f64,
    pub max_ns: f64,
}

impl Spread {
    /// Min, median and max of the per-run medians.
    fn of_runs(run_medians: &mut [f64]) -> Self {
        run_medians.sort_by(f64::total_cmp);
        Self {
            min_ns: run_medians[0],
            median_ns: run_medians[run_medians.len() / 2],
            max_ns: run_medians[run_medians.len() - 1],
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CostRow {
    pub packet: &'static str,
    pub description: &'static str,
    pub xlb: Spread,
    pub floor_pass: Spread,
    pub floor_parse: Spread,
    /// 1000 / median ns: what one core would sustain at this cost.
    pub mpps_per_core: f64,
    pub ratio_to_pass_floor: f64,
    pub ratio_to_parse_floor: f64,
    pub katran_reference_ns: Option<f64>,
}

#[derive(Clone, Copy, Debug)]
pub struct CostOptions {
    /// Test-run calls per run.
    pub calls: u32,
    /// Runs per packet type and program.
    pub runs: u32,
    pub warmup: u32,
    pub backends: u32,
    pub ring_size: u32,
    /// How the VIPs reach their backends: NAT, or a tunnel (direct server return).
    pub forwarding: Forwarding,
}

/// Checks one run's action and output against its input; `Err` says what is wrong.
type Check = dyn Fn(u32, &[u8], &[u8]) -> Result<(), String> + Sync;

/// Builds the n-th frame of a case.
type FrameFn = Box<dyn Fn(u64) -> Vec<u8> + Sync>;

/// A packet type: how to build the n-th frame, and what the program must do with it.
struct Case {
    name: &'static str,
    description: &'static str,
    frame: FrameFn,
    /// Checks the xlb program's action and output for frame n.
    check: Box<Check>,
    /// Frames sent through xlb once before the case is measured (flows to establish).
    setup: Option<(u64, FrameFn)>,
}

/// Flows the "many established flows" case spreads its ACKs over (Katran's comparison uses
/// the same number): enough that their entries do not all sit in the CPU's caches.
const SAMPLED_FLOWS: u64 = 100_000;

/// The k-th of the sampled flows' clients: an address range no other case uses.
fn sampled_client(k: u64) -> SocketAddrV4 {
    client(1_280_000_000 + k)
}

/// Which sampled flow the n-th ACK belongs to: a fixed pseudo-random walk (SplitMix64), so
/// consecutive calls hit unrelated entries, the same sequence in every run.
fn sampled_flow(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) % SAMPLED_FLOWS
}

fn vip4() -> SocketAddrV4 {
    match vip(0).addr {
        std::net::SocketAddr::V4(v) => v,
        std::net::SocketAddr::V6(_) => unreachable!("bench VIPs are IPv4"),
    }
}

fn forwarded_to_backend(backends: u32) -> impl Fn(u32, &[u8], &[u8]) -> Result<(), String> + Sync {
    move |action, _input, out| {
        if action != XDP_REDIRECT {
            return Err(format!("action {action}, expected XDP_REDIRECT"));
        }
        let dst = frames::destination(out).ok_or("short output")?;
        let known = (0..backends).any(|b| backend_addr(b) == *dst.ip());
        if !known || dst.port() != BACKEND_PORT {
            return Err(format!("forwarded to {dst}, not a backend"));
        }
        if !frames::checksums_valid(out) {
            return Err("invalid checksums after rewrite".into());
        }
        Ok(())
    }
}

/// The input, untouched, inside an outer IPv4 header (and for GUE a UDP header to the
/// default GUE port) from the bench interface's address to one of the backends.
fn tunnelled_to_backend(
    backends: u32,
    gue: bool,
) -> impl Fn(u32, &[u8], &[u8]) -> Result<(), String> + Sync {
    move |action, input, out| {
        if action != XDP_REDIRECT {
            return Err(format!("action {action}, expected XDP_REDIRECT"));
        }
        let outer = out.get(14..34).ok_or("short output")?;
        let (proto, udp) = if gue { (17, 8) } else { (4, 0) };
        if outer[0] != 0x45 || outer[9] != proto || lb_common::csum::checksum(0, outer) != 0 {
            return Err(format!("outer header {outer:02x?}"));
        }
        let dst = std::net::Ipv4Addr::new(outer[16], outer[17], outer[18], outer[19]);
        if !(0..backends).any(|b| backend_addr(b) == dst) {
            return Err(format!("tunnelled to {dst}, not a backend"));
        }
        if gue && out.get(36..38) != Some(&lb_common::DEFAULT_GUE_PORT.to_be_bytes()[..]) {
            return Err("GUE port".into());
        }
        if out.get(34 + udp..) != input.get(14..) {
            return Err("the inner packet changed".into());
        }
        Ok(())
    }
}

fn passed_unchanged(action: u32, input: &[u8], out: &[u8]) -> Result<(), String> {
    if action != XDP_PASS {
        return Err(format!("action {action}, expected XDP_PASS"));
    }
    if input != out {
        return Err("pass-through packet was modified".into());
    }
    Ok(())
}

fn cases(backends: u32, forwarding: Forwarding) -> Vec<Case> {
    // What a packet to the VIP must come out as: rewritten to a backend, or tunnelled to one.
    let forwarded_to_backend = move |backends: u32| -> Box<Check> {
        match forwarding {
            Forwarding::Nat => Box::new(forwarded_to_backend(backends)),
            Forwarding::Ipip => Box::new(tunnelled_to_backend(backends, false)),
            Forwarding::Gue => Box::new(tunnelled_to_backend(backends, true)),
        }
    };
    let vip = vip4();
    let established = client(u64::from(u32::MAX));
    let udp_vip = crate::env::udp_vip();
    // A port no VIP uses, and a VIP's port on an address that is no VIP: the first is
    // settled by the port-role array alone, the second also takes a VIP-table lookup.
    let other = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 203, 0, 1), 5353);
    let other_on_vip_port = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 203, 0, 1), 53);
    vec![
        Case {
            name: "tcp_syn_new_flow",
            description: "TCP SYN to the VIP, a new 5-tuple every call (connection-table miss)",
            frame: Box::new(move |n| frames::tcp(client(n), vip, TCP_SYN)),
            check: forwarded_to_backend(backends),
            setup: None,
        },
        Case {
            name: "tcp_ack_new_flow",
            description: "A handshake's first ACK, a new 5-tuple every call (the flow's insert)",
            frame: Box::new(move |n| frames::tcp(client(n), vip, TCP_ACK)),
            check: forwarded_to_backend(backends),
            setup: None,
        },
        Case {
            name: "tcp_ack_established",
            description: "TCP ACK of one established flow (connection-table hit)",
            frame: Box::new(move |_| frames::tcp(established, vip, TCP_ACK)),
            check: forwarded_to_backend(backends),
            setup: None,
        },
        Case {
            name: "tcp_ack_100k_flows",
            description: "TCP ACKs sampled over 100k established flows (hits on cold entries)",
            frame: Box::new(move |n| frames::tcp(sampled_client(sampled_flow(n)), vip, TCP_ACK)),
            check: forwarded_to_backend(backends),
            // Each flow's handshake: its SYN, then the ACK that creates its entry.
            setup: Some((
                2 * SAMPLED_FLOWS,
                Box::new(move |k| {
                    let flags = if k % 2 == 0 { TCP_SYN } else { TCP_ACK };
                    frames::tcp(sampled_client(k / 2), vip, flags)
                }),
            )),
        },
        Case {
            name: "udp_established",
            description: "64-byte UDP datagram of one flow to the UDP VIP, checksum on (hit)",
            frame: Box::new(move |_| frames::udp(established, udp_vip, 18, true)),
            check: forwarded_to_backend(backends),
            setup: None,
        },
        Case {
            name: "udp_vip_port_other_address",
            description: "UDP to a VIP's port on an address that is no VIP (pass-through)",
            frame: Box::new(move |_| frames::udp(established, other_on_vip_port, 18, true)),
            check: Box::new(passed_unchanged),
            setup: None,
        },
        Case {
            name: "udp_not_for_vip",
            description: "UDP to an address and port no VIP uses (pass-through)",
            frame: Box::new(move |_| frames::udp(established, other, 18, true)),
            check: Box::new(passed_unchanged),
            setup: None,
        },
        Case {
            name: "junk_64_bytes",
            description: "64 bytes that are not IP (pass-through)",
            frame: Box::new(|_| {
                let mut f = vec![0u8; 64];
                f[12] = 0x88;
                f[13] = 0xb5; // local experimental ethertype
                f
            }),
            check: Box::new(passed_unchanged),
            setup: None,
        },
    ]
}

/// Per-call kernel durations (ns) of `calls` calls, starting at frame index `first`.
fn measure(
    env: &BenchEnv,
    program: &'static str,
    case: &Case,
    first: u64,
    calls: u32,
    check: bool,
) -> Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(calls as usize);
    for i in 0..u64::from(calls) {
        let frame = (case.frame)(first + i);
        let (outcome, out) = env.run_once(program, &frame)?;
        if check {
            (case.check)(outcome.action, &frame, &out)
                .map_err(|e| anyhow::anyhow!("{} through {program}, call {i}: {e}", case.name))?;
        }
        samples.push(outcome.duration.as_nanos() as f64);
    }
    Ok(samples)
}

fn counter(env: &BenchEnv, which: Counter) -> Result<u64> {
    Ok(env
        .balancer
        .datapath()
        .global_counters()?
        .into_iter()
        .find(|(c, _)| *c == which)
        .map_or(0, |(_, v)| v))
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:40}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

pub fn run_cost(options: CostOptions, quiet: bool) -> Result<Vec<CostRow>> {
    ensure!(
        options.calls > 0 && options.runs > 0,
        "--calls and --runs must be positive"
    );
    let config = DatapathConfig {
        ring_size: options.ring_size,
        max_vips: 4,
        ..DatapathConfig::default()
    };
    let env = BenchEnv::with_forwarding(config, 1, options.backends, options.forwarding)?;
    let cases = cases(options.backends, options.forwarding);
    let per_case = u64::from(options.runs) * 3;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        progress(per_case * cases.len() as u64, "program cost")
    };
    let rows = env.ns.run(|| -> Result<Vec<CostRow>> {
        crate::pin_to_one_cpu();
        let mut rows = Vec::new();
        // New flows never repeat a 5-tuple, across warm-up and every run.
        let mut next_new_flow = 0u64;
        for case in &cases {
            if let Some((flows, frame)) = &case.setup {
                for k in 0..*flows {
                    env.run_once(program_names::XLB, &frame(k))?;
                }
            }
            let mut spreads = Vec::new();
            for program in [
                program_names::XLB,
                program_names::FLOOR_PASS,
                program_names::FLOOR_PARSE,
            ] {
                let check = program == program_names::XLB;
                measure(&env, program, case, next_new_flow, options.warmup, check)?;
                next_new_flow += u64::from(options.warmup);
                let mut medians = Vec::new();
                for _ in 0..options.runs {
                    let mut s = measure(&env, program, case, next_new_flow, options.calls, check)?;
                    next_new_flow += u64::from(options.calls);
                    medians.push(median(&mut s));
                    bar.inc(1);
                }
                spreads.push(Spread::of_runs(&mut medians));
            }
            let (xlb, pass, parse) = (spreads[0], spreads[1], spreads[2]);
            rows.push(CostRow {
                packet: case.name,
                description: case.description,
                xlb,
                floor_pass: pass,
                floor_parse: parse,
                mpps_per_core: 1000.0 / xlb.median_ns,
                ratio_to_pass_floor: xlb.median_ns / pass.median_ns,
                ratio_to_parse_floor: xlb.median_ns / parse.median_ns,
                katran_reference_ns: KATRAN_REFERENCE
                    .iter()
                    .find(|(n, _)| *n == case.name)
                    .map(|(_, v)| *v),
            });
        }
        Ok(rows)
    })??;
    bar.finish_and_clear();
    let misses = counter(&env, Counter::ConntrackMiss)?;
    let expected_misses =
        u64::from(options.warmup + options.calls * options.runs) + 1 + SAMPLED_FLOWS;
    if misses < expected_misses {
        bail!(
            "only {misses} connection-table misses for {expected_misses} new flows: the SYN case did not measure new flows"
        );
    }
    Ok(rows)
}

#[derive(Clone, Debug, Serialize)]
pub struct ScalingPoint {
    pub x: u64,
    pub established_ns: f64,
    pub new_flow_ns: f64,
    /// Share of the "established" samples that hit the connection table. Below 1 when the
    /// flows outgrow the connection table.
    pub established_hit_ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Scaling {
    pub flows: Vec<ScalingPoint>,
    pub backends: Vec<ScalingPoint>,
    pub vips: Vec<ScalingPoint>,
    /// Control plane: building one ring of the default size (65537 slots).
    pub maglev_build: Vec<MaglevBuild>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MaglevBuild {
    pub backends: u32,
    /// Median of several builds.
    pub median_ms: f64,
}

/// Times `lb_common::maglev::build_ring` for 65537 slots (criterion has the same in
/// `lb-common/benches/maglev.rs`; this puts the figure in the report).
fn maglev_build_times(sizes: &[u32]) -> Result<Vec<MaglevBuild>> {
    use lb_common::maglev::{MaglevBackend, build_ring};
    sizes
        .iter()
        .map(|&n| {
            let set: Vec<_> = (0..n)
                .map(|i| {
                    let addr = lb_common::addr::v4_mapped([10, 1, (i >> 8) as u8, i as u8]);
                    MaglevBackend::new(i, addr, 8080, 1)
                })
                .collect();
            let mut samples: Vec<f64> = (0..7)
                .map(|_| {
                    let start = std::time::Instant::now();
                    let ring = build_ring(&set, lb_common::DEFAULT_RING_SIZE);
                    let ms = start.elapsed().as_secs_f64() * 1000.0;
                    ring.map(|_| ms)
                })
                .collect::<Result<_, _>>()?;
            Ok(MaglevBuild {
                backends: n,
                median_ms: median(&mut samples),
            })
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
pub struct ScalingOptions {
    pub flows: &'static [u64],
    pub backends: &'static [u32],
    pub vips: &'static [u32],
    pub calls: u32,
    pub ring_size: u32,
    /// Ring size for the VIP sweep: 1000 VIPs × two 65537-slot rings would be 0.5 GB.
    pub vip_ring_size: u32,
}

/// Median cost of established packets sampled over `flows` live flows, and of new flows.
fn point(
    env: &BenchEnv,
    x: u64,
    flows: u64,
    vip_count: u32,
    calls: u32,
    new_base: u64,
) -> Result<ScalingPoint> {
    env.ns.run(|| -> Result<ScalingPoint> {
        crate::pin_to_one_cpu();
        let vip_of = |n: u64| match vip((n % u64::from(vip_count)) as u32).addr {
            std::net::SocketAddr::V4(v) => v,
            std::net::SocketAddr::V6(_) => unreachable!(),
        };
        // Runs flow n's packet through xlb, which must forward it; returns the cost in ns.
        let forward = |n: u64, flags: u8, what: &str| -> Result<f64> {
            let (o, _) = env.run_once(
                program_names::XLB,
                &frames::tcp(client(n), vip_of(n), flags),
            )?;
            ensure!(o.action == XDP_REDIRECT, "{what} {n}: action {}", o.action);
            Ok(o.duration.as_nanos() as f64)
        };
        // Establish the flows (not timed): a handshake's ACK creates the entry.
        for n in 0..flows {
            forward(n, TCP_SYN, "establishing flow")?;
            forward(n, TCP_ACK, "establishing flow")?;
        }
        let hits_before = counter(env, Counter::ConntrackHit)?;
        // Spread samples over the live flows (a multiplicative walk, not a cache-friendly sweep).
        let mut established = (0..u64::from(calls))
            .map(|i| {
                forward(
                    i.wrapping_mul(2_654_435_761) % flows,
                    TCP_ACK,
                    "established flow",
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let hits = counter(env, Counter::ConntrackHit)? - hits_before;
        let mut new = (0..u64::from(calls))
            .map(|i| forward(new_base + i, TCP_SYN, "new flow"))
            .collect::<Result<Vec<_>>>()?;
        Ok(ScalingPoint {
            x,
            established_ns: median(&mut established),
            new_flow_ns: median(&mut new),
            established_hit_ratio: hits as f64 / f64::from(calls),
        })
    })?
}

pub fn run_scaling(options: &ScalingOptions, quiet: bool) -> Result<Scaling> {
    let steps = options.flows.len() + options.backends.len() + options.vips.len();
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        progress(steps as u64, "scaling")
    };
    let new_base = 1u64 << 26;
    // Room for the largest flow count: twice it on this 2-CPU machine kind (IPv4 flows fill
    // 8-way sets, which at half the ways in use evict one flow in 120 early; the hit ratio
    // reported says whether that happened).
    let largest = options.flows.iter().copied().max().unwrap_or(1);
    let cpus = aya::util::nr_cpus().map_or(1, |n| n.get());
    let conntrack_entries = u32::try_from(largest * u64::from(cpus))
        .unwrap_or(u32::MAX)
        .max(lb_common::CONNTRACK_ENTRIES);
    let config = |ring_size, max_vips| DatapathConfig {
        ring_size,
        max_vips,
        conntrack_entries,
        ..DatapathConfig::default()
    };
    let mut flows = Vec::new();
    for &f in options.flows {
        let env = BenchEnv::new(config(options.ring_size, 4), 1, 100).context("flow sweep")?;
        flows.push(point(&env, f, f.max(1), 1, options.calls, new_base)?);
        bar.inc(1);
    }
    let mut backends = Vec::new();
    for &b in options.backends {
        let env = BenchEnv::new(config(options.ring_size, 4), 1, b).context("backend sweep")?;
        backends.push(point(&env, u64::from(b), 1000, 1, options.calls, new_base)?);
        bar.inc(1);
    }
    let mut vips = Vec::new();
    for &v in options.vips {
        let max_vips = v.next_power_of_two().max(4);
        let env =
            BenchEnv::new(config(options.vip_ring_size, max_vips), v, 2).context("VIP sweep")?;
        vips.push(point(
            &env,
            u64::from(v),
            1000.max(u64::from(v)),
            v,
            options.calls,
            new_base,
        )?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(Scaling {
        flows,
        backends,
        vips,
        maglev_build: maglev_build_times(&[10, 100, 1000])?,
    })
}
