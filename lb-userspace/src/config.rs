//! The declarative configuration file, `xlb.toml`: the whole set of VIPs, backends and health
//! checks in one reviewable file, as an alternative to building it up with `xlb vip add` /
//! `xlb backend add`. `xlb reload` applies only the [`diff`] between what runs and what the
//! file says, so unchanged backends keep their ring slots and their flows.
//!
//! ```toml
//! [agent]
//! ifaces = ["eth0"]
//! metrics = "127.0.0.1:9464"
//! encap_source = ["192.0.2.1"]  # outer source of DSR tunnels, one per family (default: the route's)
//! gue_port = 6080              # where GUE packets go (the default)
//!
//! [[vip]]
//! address = "192.0.2.10:80/tcp"
//! tcp_timeout = 600            # seconds a connection may idle (udp_timeout for UDP VIPs)
//! [vip.health]
//! probe = "http"
//! path = "/healthz"
//! host = "www.example"         # Host header (default: the backend's address:port)
//! [[vip.backend]]
//! address = "10.0.0.2:8080"
//! weight = 2
//!
//! [[vip]]
//! address = "192.0.2.10:443/tcp"
//! forwarding = "ipip"          # direct server return: nat (default), ipip or gue
//! [[vip.backend]]
//! address = "10.0.2.5"         # no port: the VIP's (the packet reaches it unchanged)
//! ```
//!
//! Every mistake is reported with the file, line and column it is at, because a config file is
//! edited by hand and a bare "invalid config" sends the operator hunting.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use toml::Spanned;

use crate::{
    attach::ModeChoice,
    balancer::{
        BackendConfig, BackendState, DesiredState, Forwarding, MAX_WEIGHT, Protocol, VipConfig,
        VipSpec, validate_idle_timeout as validate_idle_timeout_secs,
    },
    encap::Encap,
    health::{HealthSpec, HealthSpecError, Probe, decode_hex},
    validate,
};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something in the file is wrong; `line` and `column` count from 1.
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// The `[agent]` table: start-up settings the command line would otherwise carry. Each is
/// optional, and a command-line flag wins over it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentConfig {
    pub ifaces: Vec<String>,
    pub xdp_mode: Option<ModeChoice>,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    pub socket: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
    /// Announce VIPs to routers through this routing table (`xlb run --announce-table`).
    pub announce_table: Option<u32>,
    /// The flow-hash seed and the rings' size: every node behind the same ECMP group needs
    /// the same (`xlb run --hash-seed`, `--ring-size`), so they belong in the file the nodes
    /// share.
    pub hash_seed: Option<u32>,
    pub ring_size: Option<u32>,
    /// `encap_source` and `gue_port`: the direct-server-return tunnels' settings. Unlike the
    /// others, a reload applies them.
    pub encap: Encap,
}

/// The `[agent]` settings that differ between `before` and `after`, by their key in the file,
/// leaving out those a reload applies (`encap_source`, `gue_port`).
#[must_use]
pub fn agent_changes(before: &AgentConfig, after: &AgentConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if before.ifaces != after.ifaces {
        changed.push("ifaces");
    }
    if before.xdp_mode != after.xdp_mode {
        changed.push("xdp_mode");
    }
    if before.metrics != after.metrics {
        changed.push("metrics");
    }
    if before.socket != after.socket {
        changed.push("socket");
    }
    if before.state != after.state {
        changed.push("state");
    }
    if before.bpffs != after.bpffs {
        changed.push("bpffs");
    }
    if before.announce_table != after.announce_table {
        changed.push("announce_table");
    }
    if before.hash_seed != after.hash_seed {
        changed.push("hash_seed");
    }
    if before.ring_size != after.ring_size {
        changed.push("ring_size");
    }
    changed
}

/// One `[[vip]]` entry, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipDecl {
    pub vip: VipSpec,
    /// `None`: no health checks, every backend counts as healthy.
    pub health: Option<HealthSpec>,
    /// `tcp_timeout` / `udp_timeout`, seconds; `None`: the protocol's default.
    pub idle_timeout_s: Option<u32>,
    /// `forwarding =`: NAT unless it says `ipip` or `gue` (direct server return).
    pub forwarding: Forwarding,
    /// In the file's order.
    pub backends: Vec<BackendConfig>,
    /// Backends named by container (`container = "web-1"`), resolved and followed by the
    /// agent; in the file's order.
    pub containers: Vec<ContainerDecl>,
}

/// A `[[vip.backend]]` with `container =` instead of `address =`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerDecl {
    pub name: String,
    /// `port =`; none: the container's single exposed port.
    pub port: Option<u16>,
    pub weight: u32,
    pub state: BackendState,
}

/// A parsed and validated `xlb.toml`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub agent: AgentConfig,
    /// In the file's order.
    pub vips: Vec<VipDecl>,
}

impl Config {
    /// The balancer state the file describes, sorted the way the balancer reports its own,
    /// so the two compare equal when nothing differs.
    #[must_use]
    pub fn desired_state(&self) -> DesiredState {
        let mut vips: Vec<VipConfig> = self
            .vips
            .iter()
            .map(|v| {
                let mut backends = v.backends.clone();
                backends.sort_by_key(|b| b.addr);
                VipConfig {
                    vip: v.vip,
                    backends,
                    id: None,
                    health: v.health.clone(),
                    idle_timeout_s: v.idle_timeout_s,
                    forwarding: v.forwarding,
                }
            })
            .collect();
        vips.sort_by_key(|v| v.vip);
        DesiredState { vips }
    }

    /// The VIPs that have health checks; the others have none.
    #[must_use]
    pub fn health(&self) -> Vec<(VipSpec, HealthSpec)> {
        self.vips
            .iter()
            .filter_map(|v| v.health.clone().map(|h| (v.vip, h)))
            .collect()
    }
}

// The file as written, with spans, before validation turns it into `Config`.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: Option<RawAgent>,
    #[serde(default)]
    vip: Vec<RawVip>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    #[serde(default)]
    ifaces: Vec<Spanned<String>>,
    xdp_mode: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    socket: Option<PathBuf>,
    state: Option<PathBuf>,
    bpffs: Option<PathBuf>,
    announce_table: Option<u32>,
    hash_seed: Option<Spanned<i64>>,
    ring_size: Option<Spanned<i64>>,
    #[serde(default)]
    encap_source: Vec<Spanned<String>>,
    gue_port: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: Spanned<String>,
    tcp_timeout: Option<Spanned<i64>>,
    udp_timeout: Option<Spanned<i64>>,
    forwarding: Option<Spanned<String>>,
    health: Option<Spanned<RawHealth>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    probe: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    expect_status: Option<Spanned<i64>>,
    host: Option<Spanned<String>>,
    payload: Option<Spanned<String>>,
    payload_hex: Option<Spanned<String>>,
    expect_reply: Option<Spanned<bool>>,
    interval_ms: Option<Spanned<i64>>,
    timeout_ms: Option<Spanned<i64>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Option<Spanned<String>>,
    container: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    weight: Option<Spanned<i64>>,
    state: Option<Spanned<BackendState>>,
}

/// A problem at a byte range of the text, turned into line:column once at the end.
struct Problem {
    span: Range<usize>,
    message: String,
}

fn problem(span: Range<usize>, message: impl Into<String>) -> Problem {
    Problem {
        span,
        message: message.into(),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn invalid(origin: &str, text: &str, p: &Problem) -> ConfigError {
    let (line, column) = line_col(text, p.span.start);
    ConfigError::Invalid {
        origin: origin.to_owned(),
        line,
        column,
        message: p.message.clone(),
    }
}

/// Parses and validates a config given as text. Errors name the file `xlb.toml`; [`load`]
/// names the real path.
///
/// # Errors
/// The first problem in the text, with its line and column.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_named(text, "xlb.toml")
}

/// Reads, parses and validates a config file.
///
/// # Errors
/// The file cannot be read, or the first problem in it, with its line and column.
pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_named(&text, &path.display().to_string())
}

fn parse_named(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        invalid(origin, text, &problem(span, e.message().trim_end()))
    })?;
    validate(raw, text).map_err(|p| invalid(origin, text, &p))
}

fn validate(raw: RawConfig, text: &str) -> Result<Config, Problem> {
    let agent = match raw.agent {
        Some(a) => validate_agent(a)?,
        None => AgentConfig::default(),
    };
    // Counted before any entry is looked at: an oversized file is refused at once, at the
    // first backend the data plane has no room for.
    let total: usize = raw.vip.iter().map(|v| v.backend.len()).sum();
    if let Some(first_over) = raw
        .vip
        .iter()
        .flat_map(|v| &v.backend)
        .nth(lb_common::MAX_BACKENDS as usize)
    {
        return Err(problem(
            first_over.get_ref().span(),
            format!(
                "{total} backends, but the data plane holds at most {} (this is the first one \
                 beyond)",
                lb_common::MAX_BACKENDS
            ),
        ));
    }
    let mut vips = Vec::with_capacity(raw.vip.len());
    let mut seen: HashMap<VipSpec, Range<usize>> = HashMap::new();
    // Each VIP's backends with where they are written, in `vips` order.
    let mut spans: Vec<HashMap<SocketAddr, Range<usize>>> = Vec::with_capacity(raw.vip.len());
    for v in raw.vip {
        let span = v.address.span();
        let vip: VipSpec = v
            .address
            .get_ref()
            .parse()
            .map_err(|e| problem(span.clone(), format!("bad VIP address: {e}")))?;
        validate::check_vip(&vip).map_err(|e| problem(span.clone(), e.to_string()))?;
        if let Some(first) = seen.insert(vip, span.clone()) {
            return Err(problem(
                span,
                format!(
                    "VIP {vip} is declared twice (first at line {})",
                    line_col(text, first.start).0
                ),
            ));
        }
        let idle_timeout_s = validate_idle_timeout(&vip, v.tcp_timeout, v.udp_timeout)?;
        let forwarding = v
            .forwarding
            .map(|f| {
                f.get_ref()
                    .parse::<Forwarding>()
                    .map_err(|e| problem(f.span(), e.to_string()))
            })
            .transpose()?
            .unwrap_or_default();
        let health = v.health.map(|h| validate_health(h, &vip)).transpose()?;
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(v.backend.len());
        let mut containers: Vec<ContainerDecl> = Vec::new();
        let mut backend_spans: HashMap<SocketAddr, Range<usize>> = HashMap::new();
        let mut container_spans: HashMap<String, Range<usize>> = HashMap::new();
        for b in v.backend {
            let table = b.span();
            let b = b.into_inner();
            if b.container.is_some() {
                containers.push(validate_container(&vip, b, &mut container_spans, text)?);
            } else {
                backends.push(validate_backend(
                    &vip,
                    forwarding,
                    b,
                    table,
                    &mut backend_spans,
                    text,
                )?);
            }
        }
        vips.push(VipDecl {
            vip,
            health,
            idle_timeout_s,
            forwarding,
            backends,
            containers,
        });
        spans.push(backend_spans);
    }
    check_backends_are_not_vips(&vips, &spans)?;
    Ok(Config { agent, vips })
}

/// Across the whole file: no backend sits on the address of any VIP (the backends' own VIP
/// was checked with them), which also keeps every VIP off every backend's address.
fn check_backends_are_not_vips(
    vips: &[VipDecl],
    backend_spans: &[HashMap<SocketAddr, Range<usize>>],
) -> Result<(), Problem> {
    let all_vips: Vec<VipSpec> = vips.iter().map(|v| v.vip).collect();
    for (decl, spans) in vips.iter().zip(backend_spans) {
        for backend in &decl.backends {
            validate::check_backend_against_vips(backend.addr, all_vips.iter().copied())
                .map_err(|e| problem(spans[&backend.addr].clone(), e.to_string()))?;
        }
    }
    Ok(())
}

fn validate_agent(a: RawAgent) -> Result<AgentConfig, Problem> {
    let mut ifaces = Vec::with_capacity(a.ifaces.len());
    for iface in a.ifaces {
        let span = iface.span();
        let name = iface.into_inner();
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ']) {
            return Err(problem(span, format!("'{name}' is not an interface name")));
        }
        ifaces.push(name);
    }
    let xdp_mode = a
        .xdp_mode
        .map(|m| {
            <ModeChoice as clap::ValueEnum>::from_str(m.get_ref(), true).map_err(|_| {
                problem(
                    m.span(),
                    format!("xdp_mode '{}' is not one of auto, native, skb", m.get_ref()),
                )
            })
        })
        .transpose()?;
    let metrics = a
        .metrics
        .map(|m| {
            m.get_ref().parse::<SocketAddr>().map_err(|_| {
                problem(
                    m.span(),
                    format!(
                        "metrics address '{}' is not ADDR:PORT (e.g. 127.0.0.1:9464)",
                        m.get_ref()
                    ),
                )
            })
        })
        .transpose()?;
    let mut sources = Vec::with_capacity(a.encap_source.len());
    let mut encap = Encap::default();
    for source in &a.encap_source {
        let addr: std::net::IpAddr = source.get_ref().parse().map_err(|_| {
            problem(
                source.span(),
                format!("encap_source '{}' is not an IP address", source.get_ref()),
            )
        })?;
        sources.push(addr);
        // Checked as each is added, so a problem points at the address that causes it.
        encap = Encap::new(&sources, None).map_err(|e| problem(source.span(), e.to_string()))?;
    }
    encap.gue_port = a
        .gue_port
        .map(|p| {
            u16::try_from(*p.get_ref())
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    problem(p.span(), format!("gue_port {} is not 1-65535", p.get_ref()))
                })
        })
        .transpose()?;
    let hash_seed = a
        .hash_seed
        .map(|s| {
            u32::try_from(*s.get_ref()).map_err(|_| {
                problem(
                    s.span(),
                    format!("hash_seed {} is not 0-4294967295", s.get_ref()),
                )
            })
        })
        .transpose()?;
    let ring_size = a
        .ring_size
        .map(|r| {
            u32::try_from(*r.get_ref())
                .ok()
                .filter(|n| lb_common::maglev::is_prime(*n))
                .ok_or_else(|| {
                    problem(
                        r.span(),
                        format!(
                            "ring_size {} is not prime (Maglev needs a prime, e.g. 65537 or 16381)",
                            r.get_ref()
                        ),
                    )
                })
        })
        .transpose()?;
    Ok(AgentConfig {
        ifaces,
        xdp_mode,
        metrics,
        socket: a.socket,
        state: a.state,
        bpffs: a.bpffs,
        announce_table: a.announce_table,
        hash_seed,
        ring_size,
        encap,
    })
}

/// A backend as the CLI takes it: `ADDR:PORT`, or the address alone (port 0), which a
/// direct-server-return VIP's port stands in for (the agent refuses it for a NAT VIP).
///
/// # Errors
/// Neither form.
pub fn backend_arg(text: &str) -> Result<SocketAddr, String> {
    // Taken whole, scope id and all, for the agent to judge.
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return if addr.port() == 0 {
            Err(format!(
                "port 0 is not a port (give {} alone for a direct-server-return VIP's port)",
                addr.ip()
            ))
        } else {
            Ok(addr)
        };
    }
    parse_backend_address(text)
        .map(|(ip, _)| SocketAddr::new(ip, 0))
        .ok_or_else(|| {
            format!(
                "'{text}' is not ADDR:PORT, or ADDR alone for a direct-server-return VIP (IPv6 as [fd00::2]:8080)"
            )
        })
}

/// A backend address as written: `ADDR:PORT` (IPv6 as `[fd00::2]:8080`), or the address
/// alone (IPv6 bare or in brackets), which `None`'s port stands for.
fn parse_backend_address(written: &str) -> Option<(std::net::IpAddr, Option<u16>)> {
    if let Ok(addr) = written.parse::<SocketAddr>() {
        return Some((addr.ip(), Some(addr.port())));
    }
    let bare = written
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(written);
    bare.parse().ok().map(|ip| (ip, None))
}

fn validate_backend(
    vip: &VipSpec,
    forwarding: Forwarding,
    b: RawBackend,
    table: Range<usize>,
    seen: &mut HashMap<SocketAddr, Range<usize>>,
    text: &str,
) -> Result<BackendConfig, Problem> {
    let Some(address) = b.address else {
        return Err(problem(
            table,
            "a backend needs address = \"ADDR:PORT\" or container = \"NAME\"",
        ));
    };
    if let Some(port) = b.port {
        return Err(problem(
            port.span(),
            "port goes with container =; an address carries its own port",
        ));
    }
    let span = address.span();
    let written = address.get_ref();
    let (ip, port) = parse_backend_address(written).ok_or_else(|| {
        problem(
            span.clone(),
            format!("backend address '{written}' is not ADDR:PORT (IPv6 as [fd00::2]:8080)"),
        )
    })?;
    if port == Some(0) {
        return Err(problem(
            span,
            format!("backend address '{written}' has port 0"),
        ));
    }
    // No port: the VIP's, for direct server return (the packet reaches the backend as the
    // client sent it); a NAT backend must say where it listens.
    let addr = xlb_core::limits::backend_address::<std::convert::Infallible>(
        vip,
        forwarding,
        SocketAddr::new(ip, port.unwrap_or(0)),
    )
    .map_err(|e| problem(span.clone(), e.to_string()))?;
    if forwarding.is_dsr() && addr.port() != vip.addr.port() {
        return Err(problem(
            span,
            xlb_core::limits::BalancerError::<std::convert::Infallible>::DsrBackendPort {
                vip: *vip,
                backend: addr,
                forwarding,
            }
            .to_string(),
        ));
    }
    validate::check_backend(vip, addr).map_err(|e| problem(span.clone(), e.to_string()))?;
    if addr.is_ipv4() != vip.addr.is_ipv4() {
        let family = |ipv4: bool| if ipv4 { "IPv4" } else { "IPv6" };
        return Err(problem(
            span,
            format!(
                "backend {addr} is {} but VIP {vip} is {} (xlb does not translate between address families)",
                family(addr.is_ipv4()),
                family(vip.addr.is_ipv4()),
            ),
        ));
    }
    if let Some(first) = seen.insert(addr, span.clone()) {
        return Err(problem(
            span,
            format!(
                "backend {addr} is listed twice under VIP {vip} (first at line {})",
                line_col(text, first.start).0
            ),
        ));
    }
    let weight = validate_weight(b.weight)?;
    Ok(BackendConfig {
        addr,
        weight,
        state: b.state.map_or(BackendState::Active, Spanned::into_inner),
        id: None,
        container: None,
        discovered: false,
    })
}

impl RawBackend {
    /// Where the entry is written: its address or container.
    fn span(&self) -> Range<usize> {
        self.address
            .as_ref()
            .map(Spanned::span)
            .or_else(|| self.container.as_ref().map(Spanned::span))
            .unwrap_or(0..0)
    }
}

fn validate_weight(weight: Option<Spanned<i64>>) -> Result<u32, Problem> {
    match weight {
        None => Ok(1),
        Some(w) => {
            let value = *w.get_ref();
            u32::try_from(value)
                .ok()
                .filter(|w| *w <= MAX_WEIGHT)
                .ok_or_else(|| {
                    problem(
                        w.span(),
                        format!("weight must be between 0 (drain) and {MAX_WEIGHT}, got {value}"),
                    )
                })
        }
    }
}

/// A backend named by its container: the name podman and docker would accept, an optional
/// port, no address (the agent finds it).
fn validate_container(
    vip: &VipSpec,
    b: RawBackend,
    seen: &mut HashMap<String, Range<usize>>,
    text: &str,
) -> Result<ContainerDecl, Problem> {
    let container = b.container.expect("checked by the caller");
    let span = container.span();
    if let Some(address) = &b.address {
        return Err(problem(
            address.span(),
            "give a backend address = or container =, not both (the agent finds a container's address)",
        ));
    }
    let name = container.into_inner();
    validate::check_container_name(&name).map_err(|e| problem(span.clone(), e.to_string()))?;
    let port = b
        .port
        .map(|p| {
            u16::try_from(*p.get_ref())
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| problem(p.span(), format!("port {} is not 1-65535", p.get_ref())))
        })
        .transpose()?;
    if let Some(first) = seen.insert(name.clone(), span.clone()) {
        return Err(problem(
            span,
            format!(
                "container {name} is listed twice under VIP {vip} (first at line {})",
                line_col(text, first.start).0
            ),
        ));
    }
    Ok(ContainerDecl {
        name,
        port,
        weight: validate_weight(b.weight)?,
        state: b.state.map_or(BackendState::Active, Spanned::into_inner),
    })
}

/// `tcp_timeout` on a TCP VIP or `udp_timeout` on a UDP VIP, in range; the other key is a
/// mistake (a VIP has one protocol), not something to ignore.
fn validate_idle_timeout(
    vip: &VipSpec,
    tcp: Option<Spanned<i64>>,
    udp: Option<Spanned<i64>>,
) -> Result<Option<u32>, Problem> {
    let (given, wrong, key, wrong_key) = match vip.proto {
        Protocol::Tcp => (tcp, udp, "tcp_timeout", "udp_timeout"),
        Protocol::Udp => (udp, tcp, "udp_timeout", "tcp_timeout"),
    };
    if let Some(w) = wrong {
        return Err(problem(
            w.span(),
            format!(
                "{wrong_key} does not apply to {vip}, a {} VIP (use {key})",
                vip.proto
            ),
        ));
    }
    given
        .map(|t| {
            u64::try_from(*t.get_ref())
                .ok()
                .and_then(|secs| validate_idle_timeout_secs(vip.proto, secs).ok())
                .ok_or_else(|| {
                    problem(
                        t.span(),
                        format!(
                            "{key} must be between {} and {} seconds, got {}",
                            vip.proto.min_idle_timeout_s(),
                            lb_common::MAX_IDLE_TIMEOUT_S,
                            t.get_ref()
                        ),
                    )
                })
        })
        .transpose()
}

fn validate_health(h: Spanned<RawHealth>, vip: &VipSpec) -> Result<HealthSpec, Problem> {
    let table = h.span();
    let h = h.into_inner();
    let defaults = HealthSpec::default();
    let number = |field: &Option<Spanned<i64>>, name: &str, default: u64| -> Result<u64, Problem> {
        field.as_ref().map_or(Ok(default), |v| {
            u64::try_from(*v.get_ref())
                .map_err(|_| problem(v.span(), format!("{name} must not be negative")))
        })
    };
    let small = |field: &Option<Spanned<i64>>, name: &str, default: u32| -> Result<u32, Problem> {
        let n = number(field, name, u64::from(default))?;
        u32::try_from(n).map_err(|_| {
            problem(
                field.as_ref().map_or(table.clone(), Spanned::span),
                format!("{name} is too large"),
            )
        })
    };
    let interval = Duration::from_millis(number(
        &h.interval_ms,
        "interval_ms",
        millis(defaults.interval),
    )?);
    let timeout = Duration::from_millis(number(
        &h.timeout_ms,
        "timeout_ms",
        millis(defaults.timeout),
    )?);
    let rise = small(&h.rise, "rise", defaults.rise)?;
    let fall = small(&h.fall, "fall", defaults.fall)?;
    // The probe a VIP's protocol calls for unless one is named.
    let default_kind = match vip.proto {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    let kind = h
        .probe
        .as_ref()
        .map_or(default_kind, |p| p.get_ref().as_str());
    let http_field = h
        .path
        .as_ref()
        .or(h.host.as_ref())
        .map(Spanned::span)
        .or_else(|| h.expect_status.as_ref().map(Spanned::span));
    let udp_field = h
        .payload
        .as_ref()
        .or(h.payload_hex.as_ref())
        .map(Spanned::span)
        .or_else(|| h.expect_reply.as_ref().map(Spanned::span));
    if kind != "http"
        && let Some(span) = http_field
    {
        return Err(problem(
            span,
            "path, host and expect_status only apply to probe = \"http\"",
        ));
    }
    if kind != "udp"
        && let Some(span) = udp_field
    {
        return Err(problem(
            span,
            "payload, payload_hex and expect_reply only apply to probe = \"udp\"",
        ));
    }
    let probe = match kind {
        "tcp" => Probe::Tcp,
        "udp" => {
            let payload = match (&h.payload, &h.payload_hex) {
                (Some(_), Some(hex)) => {
                    return Err(problem(
                        hex.span(),
                        "give payload (text) or payload_hex (bytes), not both",
                    ));
                }
                (Some(text), None) => text.get_ref().as_bytes().to_vec(),
                (None, Some(hex)) => {
                    decode_hex(hex.get_ref()).map_err(|e| problem(hex.span(), e))?
                }
                (None, None) => Vec::new(),
            };
            // Expect an answer to a payload the operator chose; an empty datagram is only
            // sent to see whether the port is closed.
            let expect_reply = h
                .expect_reply
                .as_ref()
                .map_or(!payload.is_empty(), |e| *e.get_ref());
            Probe::Udp {
                payload,
                expect_reply,
            }
        }
        "http" => {
            let expect_status = match &h.expect_status {
                None => 200,
                Some(s) => u16::try_from(*s.get_ref()).map_err(|_| {
                    problem(
                        s.span(),
                        format!(
                            "the expected HTTP status must be between 100 and 599, got {}",
                            s.get_ref()
                        ),
                    )
                })?,
            };
            Probe::Http {
                path: h
                    .path
                    .as_ref()
                    .map_or_else(|| "/".to_owned(), |p| p.get_ref().clone()),
                expect_status,
                host: h.host.as_ref().map(|host| host.get_ref().clone()),
            }
        }
        other => {
            let span = h.probe.as_ref().map_or(table.clone(), Spanned::span);
            return Err(problem(
                span,
                format!("health probe '{other}' is not one of tcp, http, udp"),
            ));
        }
    };
    let spec = HealthSpec {
        probe,
        interval,
        timeout,
        rise,
        fall,
    };
    spec.validate_for(vip).map_err(|e| {
        let at = |field: &Option<Spanned<i64>>| field.as_ref().map(Spanned::span);
        let span = match e {
            HealthSpecError::ZeroInterval => at(&h.interval_ms),
            HealthSpecError::ZeroTimeout | HealthSpecError::TimeoutExceedsInterval { .. } => {
                at(&h.timeout_ms).or_else(|| at(&h.interval_ms))
            }
            HealthSpecError::ZeroRise => at(&h.rise),
            HealthSpecError::ZeroFall => at(&h.fall),
            HealthSpecError::BadPath(_) => h.path.as_ref().map(Spanned::span),
            HealthSpecError::BadStatus(_) => at(&h.expect_status),
            HealthSpecError::BadHost(_) => h.host.as_ref().map(Spanned::span),
            HealthSpecError::WrongProtocol { .. } => h.probe.as_ref().map(Spanned::span),
            HealthSpecError::PayloadTooLarge(_) => h
                .payload
                .as_ref()
                .or(h.payload_hex.as_ref())
                .map(Spanned::span),
            HealthSpecError::SilentUdpTooFrequent => {
                at(&h.interval_ms).or_else(|| h.expect_reply.as_ref().map(Spanned::span))
            }
        };
        problem(span.unwrap_or(table), e.to_string())
    })?;
    Ok(spec)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One step from a running state towards a configured one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    AddVip(VipSpec),
    /// Takes the VIP's backends with it.
    RemoveVip(VipSpec),
    /// The VIP's forwarding method changes: it keeps its slot and counters, but every
    /// backend is replaced (each comes back as an `AddBackend`, under a new id), since a
    /// flow opened one way cannot go on the other (NAT's backend port is not the VIP's, and
    /// a DSR backend answers from the VIP).
    ReplaceVip {
        vip: VipSpec,
        from: Forwarding,
        to: Forwarding,
    },
    /// Carries the full backend config: apply the weight on add and the state after it.
    AddBackend {
        vip: VipSpec,
        backend: BackendConfig,
    },
    RemoveBackend {
        vip: VipSpec,
        backend: SocketAddr,
    },
    /// Weight and/or state changed; the backend keeps its id and its established flows.
    UpdateBackend {
        vip: VipSpec,
        backend: BackendConfig,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = |s: BackendState| match s {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
        };
        match self {
            Self::AddVip(vip) => write!(f, "+ vip {vip}"),
            Self::RemoveVip(vip) => write!(f, "- vip {vip}"),
            Self::ReplaceVip { vip, from, to } => write!(
                f,
                "~ vip {vip} forwarding {} -> {}: replaced, its backends re-added (their established flows end)",
                from.describe(),
                to.describe()
            ),
            Self::AddBackend { vip, backend } => write!(
                f,
                "+ backend {vip} {} weight {} {}",
                backend.addr,
                backend.weight,
                state(backend.state)
            ),
            Self::RemoveBackend { vip, backend } => write!(f, "- backend {vip} {backend}"),
            Self::UpdateBackend { vip, backend } => write!(
                f,
                "~ backend {vip} {} weight {} {}",
                backend.addr,
                backend.weight,
                state(backend.state)
            ),
        }
    }
}

/// What turning `running` into `wanted` changes, one line each, as `xlb reload` reports it:
/// the [`diff`] (`+ vip`, `- backend`, `~ backend … weight 3 active`), then per kept or new
/// VIP a change of health checks and, for kept VIPs, of the idle timeout the data path
/// applies (no timeout given and the protocol's default are the same).
#[must_use]
pub fn describe_changes(running: &DesiredState, wanted: &DesiredState) -> Vec<String> {
    let mut lines: Vec<String> = diff(running, wanted)
        .iter()
        .map(ToString::to_string)
        .collect();
    let timeout = |v: &VipConfig| {
        v.idle_timeout_s
            .unwrap_or_else(|| v.vip.proto.default_idle_timeout_s())
    };
    for vip in &wanted.vips {
        let was = running.vips.iter().find(|v| v.vip == vip.vip);
        if was.and_then(|v| v.health.as_ref()) != vip.health.as_ref() {
            lines.push(format!("~ health checks of {}", vip.vip));
        }
        if let Some(was) = was
            && timeout(was) != timeout(vip)
        {
            lines.push(format!("~ idle timeout of {} {} s", vip.vip, timeout(vip)));
        }
        // A kept VIP's new method is a `ReplaceVip` of the diff; a new VIP's is said here.
        if was.is_none() && vip.forwarding.is_dsr() {
            lines.push(format!(
                "~ forwarding of {} {}",
                vip.vip,
                vip.forwarding.describe()
            ));
        }
    }
    lines
}

/// The line a reload adds when the tunnels' settings in force (`running`) become `wanted`.
#[must_use]
pub fn describe_encap_change(running: &Encap, wanted: &Encap) -> Option<String> {
    (running != wanted).then(|| format!("~ tunnels: {wanted}"))
}

/// A TOML basic string: JSON's escapes are all TOML's too.
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).expect("strings serialise")
}

/// `state` as an `xlb.toml` that [`parse`] reads back to the same VIPs, backends, weights,
/// states, health checks, idle timeouts and forwarding methods (ids are the agent's
/// business), with `ifaces` and the tunnels' settings `encap` in its `[agent]` table: what
/// `xlb config dump` prints, like `ipvsadm-save`.
#[must_use]
pub fn to_toml(state: &DesiredState, ifaces: &[String], encap: &Encap) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut agent = String::new();
    if !ifaces.is_empty() {
        let names: Vec<String> = ifaces.iter().map(|i| toml_string(i)).collect();
        let _ = writeln!(agent, "ifaces = [{}]", names.join(", "));
    }
    let sources = encap.sources();
    if !sources.is_empty() {
        let sources: Vec<String> = sources.iter().map(|a| format!("\"{a}\"")).collect();
        let _ = writeln!(agent, "encap_source = [{}]", sources.join(", "));
    }
    if let Some(port) = encap.gue_port {
        let _ = writeln!(agent, "gue_port = {port}");
    }
    if !agent.is_empty() {
        let _ = writeln!(out, "[agent]\n{agent}");
    }
    for vip in &state.vips {
        let _ = writeln!(
            out,
            "[[vip]]\naddress = {}",
            toml_string(&vip.vip.to_string())
        );
        if let Some(secs) = vip.idle_timeout_s
            && secs != vip.vip.proto.default_idle_timeout_s()
        {
            let _ = writeln!(out, "{}_timeout = {secs}", vip.vip.proto);
        }
        if vip.forwarding.is_dsr() {
            let _ = writeln!(out, "forwarding = \"{}\"", vip.forwarding);
        }
        if let Some(h) = &vip.health {
            let _ = writeln!(out, "[vip.health]\nprobe = \"{}\"", h.probe.kind());
            match &h.probe {
                Probe::Tcp => {}
                Probe::Http {
                    path,
                    expect_status,
                    host,
                } => {
                    let _ = writeln!(
                        out,
                        "path = {}\nexpect_status = {expect_status}",
                        toml_string(path)
                    );
                    if let Some(host) = host {
                        let _ = writeln!(out, "host = {}", toml_string(host));
                    }
                }
                Probe::Udp {
                    payload,
                    expect_reply,
                } => {
                    if !payload.is_empty() {
                        let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
                        let _ = writeln!(out, "payload_hex = \"{hex}\"");
                    }
                    let _ = writeln!(out, "expect_reply = {expect_reply}");
                }
            }
            let _ = writeln!(
                out,
                "interval_ms = {}\ntimeout_ms = {}\nrise = {}\nfall = {}",
                millis(h.interval),
                millis(h.timeout),
                h.rise,
                h.fall
            );
        }
        for b in &vip.backends {
            // A container is written by name: its address is whatever it has when read.
            let _ = match &b.container {
                Some(name) => writeln!(
                    out,
                    "[[vip.backend]]\ncontainer = {}\nport = {}\nweight = {}",
                    toml_string(name),
                    b.addr.port(),
                    b.weight
                ),
                None => writeln!(
                    out,
                    "[[vip.backend]]\naddress = {}\nweight = {}",
                    toml_string(&b.addr.to_string()),
                    b.weight
                ),
            };
            if b.state == BackendState::Draining {
                let _ = writeln!(out, "state = \"draining\"");
            }
        }
        out.push('\n');
    }
    out
}

/// The fewest changes that turn `old` into `new`, so a reload leaves untouched VIPs and
/// backends (their ring slots, ids and flows) exactly as they are.
///
/// Order: removed VIPs first (freeing their slots and backend ids), then new VIPs with their
/// backends, then per kept VIP additions and updates before removals — adding before removing
/// keeps a VIP from passing through an empty ring when its backends are swapped.
/// Health checks are not part of it: they are set per VIP wholesale. A kept VIP whose
/// forwarding method changes is a `ReplaceVip` and all its backends `AddBackend`s.
#[must_use]
pub fn diff(old: &DesiredState, new: &DesiredState) -> Vec<Change> {
    type Index = BTreeMap<VipSpec, (Forwarding, BTreeMap<SocketAddr, BackendConfig>)>;
    let index = |s: &DesiredState| -> Index {
        s.vips
            .iter()
            .map(|v| {
                (
                    v.vip,
                    (
                        v.forwarding,
                        v.backends.iter().map(|b| (b.addr, b.clone())).collect(),
                    ),
                )
            })
            .collect()
    };
    let (old, new) = (index(old), index(new));
    let mut changes = Vec::new();
    for vip in old.keys().filter(|v| !new.contains_key(v)) {
        changes.push(Change::RemoveVip(*vip));
    }
    for (vip, (_, backends)) in new.iter().filter(|(v, _)| !old.contains_key(v)) {
        changes.push(Change::AddVip(*vip));
        changes.extend(backends.values().map(|b| Change::AddBackend {
            vip: *vip,
            backend: b.clone(),
        }));
    }
    for (vip, (forwarding, backends)) in &new {
        let Some((was, before)) = old.get(vip) else {
            continue;
        };
        if was != forwarding {
            changes.push(Change::ReplaceVip {
                vip: *vip,
                from: *was,
                to: *forwarding,
            });
            changes.extend(backends.values().map(|b| Change::AddBackend {
                vip: *vip,
                backend: b.clone(),
            }));
            continue;
        }
        for (addr, b) in backends {
            match before.get(addr) {
                None => changes.push(Change::AddBackend {
                    vip: *vip,
                    backend: b.clone(),
                }),
                // Ids are the data plane's business: a config never has them.
                Some(was) if (was.weight, was.state) != (b.weight, b.state) => {
                    changes.push(Change::UpdateBackend {
                        vip: *vip,
                        backend: b.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        for addr in before.keys().filter(|a| !backends.contains_key(a)) {
            changes.push(Change::RemoveBackend {
                vip: *vip,
                backend: *addr,
            });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `xlb config dump`'s text reads back as the state it was made from, and a reload of it
    /// would change nothing.
    #[test]
    fn a_dumped_state_parses_back_to_itself() {
        let health = |probe| HealthSpec {
            probe,
            interval: Duration::from_millis(700),
            timeout: Duration::from_millis(300),
            rise: 4,
            fall: 5,
        };
        let backend = |addr: &str, weight, state| BackendConfig {
            addr: addr.parse().unwrap(),
            weight,
            state,
            id: Some(3),
            container: None,
            discovered: false,
        };
        let state = DesiredState {
            vips: vec![
                VipConfig {
                    vip: "192.0.2.10:80/tcp".parse().unwrap(),
                    backends: vec![
                        backend("10.0.0.2:8080", 3, BackendState::Active),
                        backend("10.0.0.3:8080", 0, BackendState::Active),
                        backend("10.0.0.4:8080", 1, BackendState::Draining),
                    ],
                    id: Some(1),
                    health: Some(health(Probe::Http {
                        path: r#"/health\"z"#.into(),
                        expect_status: 204,
                        host: Some("web.example:8080".into()),
                    })),
                    idle_timeout_s: Some(900),
                    forwarding: Forwarding::Nat,
                },
                VipConfig {
                    vip: "[2001:db8::1]:53/udp".parse().unwrap(),
                    backends: vec![backend("[fd00::2]:5353", 1, BackendState::Active)],
                    id: None,
                    health: Some(health(Probe::Udp {
                        payload: vec![0, 1, 0xfe],
                        expect_reply: true,
                    })),
                    // The default, written or not.
                    idle_timeout_s: Some(60),
                    forwarding: Forwarding::Nat,
                },
                VipConfig {
                    vip: "192.0.2.11:443/tcp".parse().unwrap(),
                    backends: Vec::new(),
                    id: None,
                    health: None,
                    idle_timeout_s: None,
                    forwarding: Forwarding::Nat,
                },
                VipConfig {
                    vip: "192.0.2.12:443/tcp".parse().unwrap(),
                    backends: vec![backend("10.0.2.5:443", 1, BackendState::Active)],
                    id: None,
                    health: None,
                    idle_timeout_s: None,
                    forwarding: Forwarding::Gue,
                },
            ],
        };
        let encap = Encap::new(
            &["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            Some(7000),
        )
        .unwrap();
        let text = to_toml(&state, &["eth0".into(), "veth1".into()], &encap);
        let config = parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
        assert_eq!(config.agent.ifaces, ["eth0", "veth1"]);
        assert_eq!(config.agent.encap, encap, "{text}");
        let mut expected = state.clone();
        for v in &mut expected.vips {
            v.id = None;
            v.backends.iter_mut().for_each(|b| b.id = None);
        }
        expected.vips[1].idle_timeout_s = None;
        expected.vips.sort_by_key(|v| v.vip);
        assert_eq!(config.desired_state(), expected, "{text}");
        assert!(describe_changes(&state, &config.desired_state()).is_empty());
    }

    /// A container backend is dumped by name and port, not by the address it has now, and
    /// reads back as the same container.
    #[test]
    fn a_container_backend_is_dumped_by_name() {
        let state = DesiredState {
            vips: vec![VipConfig {
                vip: "192.0.2.10:80/tcp".parse().unwrap(),
                backends: vec![BackendConfig {
                    addr: "10.88.0.7:8080".parse().unwrap(),
                    weight: 2,
                    state: BackendState::Draining,
                    id: Some(4),
                    container: Some("web-1".into()),
                    discovered: false,
                }],
                id: Some(1),
                health: None,
                idle_timeout_s: None,
                forwarding: Forwarding::Nat,
            }],
        };
        let text = to_toml(&state, &[], &Encap::default());
        assert!(!text.contains("10.88.0.7"), "{text}");
        let config = parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
        assert_eq!(
            config.vips[0].containers,
            [ContainerDecl {
                name: "web-1".into(),
                port: Some(8080),
                weight: 2,
                state: BackendState::Draining,
            }],
            "{text}"
        );
        assert!(config.vips[0].backends.is_empty());
    }

    #[test]
    fn a_backend_argument_is_an_address_with_or_without_its_port() {
        let arg = |text| backend_arg(text).map(|a| a.to_string());
        assert_eq!(arg("10.0.2.5:8080").unwrap(), "10.0.2.5:8080");
        assert_eq!(arg("10.0.2.5").unwrap(), "10.0.2.5:0", "port 0: none given");
        assert_eq!(arg("fd00::5").unwrap(), "[fd00::5]:0");
        assert_eq!(arg("[fd00::5]").unwrap(), "[fd00::5]:0");
        // A scope id reaches the agent, which refuses it with its reason.
        assert_eq!(arg("[fd00::5%1]:80").unwrap(), "[fd00::5%1]:80");
        assert!(arg("10.0.2.5:0").unwrap_err().contains("port 0"));
        assert!(arg("web-1").unwrap_err().contains("is not ADDR:PORT"));
    }

    #[test]
    fn a_vip_forwards_by_the_method_it_names() {
        let config = parse(concat!(
            "[[vip]]\naddress = \"192.0.2.1:80\"\n",
            "[[vip]]\naddress = \"192.0.2.2:443\"\nforwarding = \"ipip\"\n",
            "[[vip.backend]]\naddress = \"10.0.2.5\"\n",
            "[[vip.backend]]\naddress = \"10.0.2.6:443\"\n",
            "[[vip]]\naddress = \"[2001:db8::1]:53/udp\"\nforwarding = \"gue\"\n",
            "[[vip.backend]]\naddress = \"fd00::5\"\n",
            "[[vip.backend]]\naddress = \"[fd00::6]\"\n",
        ))
        .unwrap();
        let methods: Vec<Forwarding> = config.vips.iter().map(|v| v.forwarding).collect();
        assert_eq!(
            methods,
            [Forwarding::Nat, Forwarding::Ipip, Forwarding::Gue]
        );
        // A backend given without a port serves the VIP's.
        let addrs = |i: usize| -> Vec<String> {
            config.vips[i]
                .backends
                .iter()
                .map(|b| b.addr.to_string())
                .collect()
        };
        assert_eq!(addrs(1), ["10.0.2.5:443", "10.0.2.6:443"]);
        assert_eq!(addrs(2), ["[fd00::5]:53", "[fd00::6]:53"]);
    }

    #[test]
    fn forwarding_mistakes_are_refused_where_they_are() {
        let refused = |text: &str| parse(text).unwrap_err().to_string();
        assert_eq!(
            refused("[[vip]]\naddress = \"192.0.2.1:80\"\nforwarding = \"dsr\"\n"),
            "xlb.toml:3:14: unknown forwarding method 'dsr' (use nat, ipip or gue)"
        );
        assert_eq!(
            refused(concat!(
                "[[vip]]\naddress = \"192.0.2.1:80\"\nforwarding = \"ipip\"\n",
                "[[vip.backend]]\naddress = \"10.0.2.5:8080\"\n",
            )),
            "xlb.toml:5:11: backend 10.0.2.5:8080 must serve port 80 of VIP 192.0.2.1:80/tcp \
             (dsr/ipip): the packet reaches it unchanged, still addressed to the VIP (give \
             10.0.2.5 alone, or with that port)"
        );
        assert_eq!(
            refused(
                "[[vip]]\naddress = \"192.0.2.1:80\"\n[[vip.backend]]\naddress = \"10.0.2.5\"\n"
            ),
            "xlb.toml:4:11: backend 10.0.2.5 needs a port: VIP 192.0.2.1:80/tcp forwards by NAT \
             (only a direct-server-return VIP's backends take the VIP's port)"
        );
    }

    #[test]
    fn a_changed_forwarding_method_replaces_the_vips_backends() {
        let running = parse(
            "[[vip]]\naddress = \"192.0.2.1:80\"\n[[vip.backend]]\naddress = \"10.0.0.2:80\"\n",
        )
        .unwrap()
        .desired_state();
        let wanted = parse(concat!(
            "[[vip]]\naddress = \"192.0.2.1:80\"\nforwarding = \"gue\"\n",
            "[[vip.backend]]\naddress = \"10.0.0.2\"\n",
            "[[vip]]\naddress = \"192.0.2.9:80\"\nforwarding = \"ipip\"\n",
        ))
        .unwrap()
        .desired_state();
        assert_eq!(
            describe_changes(&running, &wanted),
            [
                "+ vip 192.0.2.9:80/tcp",
                "~ vip 192.0.2.1:80/tcp forwarding nat -> dsr/gue: replaced, its backends \
                 re-added (their established flows end)",
                "+ backend 192.0.2.1:80/tcp 10.0.0.2:80 weight 1 active",
                "~ forwarding of 192.0.2.9:80/tcp dsr/ipip",
            ]
        );
        assert!(diff(&wanted, &wanted).is_empty());
    }

    #[test]
    fn described_changes_name_every_difference() {
        let mut running = parse(
            "[[vip]]\naddress = \"192.0.2.1:80\"\n[[vip.backend]]\naddress = \"10.0.0.2:80\"\n",
        )
        .unwrap()
        .desired_state();
        running.vips[0].idle_timeout_s = Some(300);
        let wanted = parse(concat!(
            "[[vip]]\naddress = \"192.0.2.1:80\"\ntcp_timeout = 600\n[vip.health]\nprobe = \"tcp\"\n",
            "[[vip.backend]]\naddress = \"10.0.0.2:80\"\nweight = 0\n",
            "[[vip.backend]]\naddress = \"10.0.0.3:80\"\n",
        ))
        .unwrap()
        .desired_state();
        assert_eq!(
            describe_changes(&running, &wanted),
            [
                "~ backend 192.0.2.1:80/tcp 10.0.0.2:80 weight 0 active",
                "+ backend 192.0.2.1:80/tcp 10.0.0.3:80 weight 1 active",
                "~ health checks of 192.0.2.1:80/tcp",
                "~ idle timeout of 192.0.2.1:80/tcp 600 s",
            ]
        );
    }

    #[test]
    fn more_backends_than_the_data_plane_holds_are_refused_at_the_first_beyond() {
        let mut text = String::from("[[vip]]\naddress = \"10.0.0.1:80\"\n");
        let max = lb_common::MAX_BACKENDS as usize;
        for i in 0..=max {
            text.push_str(&format!(
                "[[vip.backend]]\naddress = \"10.{}.{}.{}:80\"\n",
                1 + i / 65_536,
                (i / 256) % 256,
                i % 256
            ));
        }
        let (line, column, message) = err(&text);
        assert_eq!((line, column), (4 + 2 * max, 11), "{message}");
        assert!(
            message.starts_with(&format!("{} backends", max + 1)),
            "{message}"
        );
    }

    #[test]
    fn agent_changes_name_each_changed_key() {
        let before = AgentConfig {
            ifaces: vec!["eth0".into()],
            ..AgentConfig::default()
        };
        assert!(agent_changes(&before, &before.clone()).is_empty());
        let after = AgentConfig {
            ifaces: vec!["eth0".into(), "eth1".into()],
            xdp_mode: Some(ModeChoice::Tc),
            announce_table: Some(100),
            ..before.clone()
        };
        assert_eq!(
            agent_changes(&before, &after),
            ["ifaces", "xdp_mode", "announce_table"]
        );
        let hashing = AgentConfig {
            hash_seed: Some(7),
            ring_size: Some(16_381),
            ..before.clone()
        };
        assert_eq!(agent_changes(&before, &hashing), ["hash_seed", "ring_size"]);
        // A reload applies the tunnels' settings: no restart to ask for.
        let tunnels = AgentConfig {
            encap: Encap::new(&["192.0.2.1".parse().unwrap()], Some(7000)).unwrap(),
            ..before.clone()
        };
        assert!(agent_changes(&before, &tunnels).is_empty());
    }

    #[test]
    fn hash_seed_and_ring_size_are_read_and_checked_where_written() {
        let config = parse("[agent]\nhash_seed = 42\nring_size = 16381\n").unwrap();
        assert_eq!(config.agent.hash_seed, Some(42));
        assert_eq!(config.agent.ring_size, Some(16_381));
        assert_eq!(
            err("[agent]\nring_size = 16384\n"),
            (
                2,
                13,
                "ring_size 16384 is not prime (Maglev needs a prime, e.g. 65537 or 16381)"
                    .to_owned()
            )
        );
        assert_eq!(
            err("[agent]\nhash_seed = -1\n").2,
            "hash_seed -1 is not 0-4294967295"
        );
    }

    #[test]
    fn encap_settings_are_read_and_checked_where_written() {
        let config =
            parse("[agent]\nencap_source = [\"2001:db8::1\", \"192.0.2.1\"]\ngue_port = 7000\n")
                .unwrap();
        assert_eq!(
            config.agent.encap,
            Encap::new(
                &["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
                Some(7000)
            )
            .unwrap()
        );
        assert_eq!(
            err("[agent]\nencap_source = [\"192.0.2.1\", \"192.0.2.2\"]\n"),
            (
                2,
                30,
                "two IPv4 encap sources, 192.0.2.1 and 192.0.2.2: give at most one per address family"
                    .to_owned()
            )
        );
        assert_eq!(
            err("[agent]\nencap_source = [\"eth0\"]\n").2,
            "encap_source 'eth0' is not an IP address"
        );
        assert_eq!(
            err("[agent]\ngue_port = 0\n").2,
            "gue_port 0 is not 1-65535"
        );
    }

    fn err(text: &str) -> (usize, usize, String) {
        match parse(text).unwrap_err() {
            ConfigError::Invalid {
                origin,
                line,
                column,
                message,
            } => {
                assert_eq!(origin, "xlb.toml");
                (line, column, message)
            }
            e @ ConfigError::Read { .. } => panic!("unexpected {e}"),
        }
    }

    fn vip(s: &str) -> VipSpec {
        s.parse().unwrap()
    }

    fn backend(addr: &str, weight: u32, state: BackendState) -> BackendConfig {
        BackendConfig {
            addr: addr.parse().unwrap(),
            weight,
            state,
            id: None,
            container: None,
            discovered: false,
        }
    }

    #[test]
    fn the_example_config_parses() {
        let config = parse(include_str!("../../examples/xlb.toml")).unwrap();
        assert_eq!(config.agent.ifaces, ["eth0"]);
        assert_eq!(config.agent.xdp_mode, Some(ModeChoice::Auto));
        assert_eq!(
            config.agent.metrics,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(config.vips.len(), 2);
        let web = &config.vips[0];
        assert_eq!(web.vip, vip("192.0.2.10:80/tcp"));
        assert_eq!(
            web.backends,
            [
                backend("10.0.0.2:8080", 2, BackendState::Active),
                backend("10.0.0.3:8080", 1, BackendState::Active),
                backend("10.0.0.4:8080", 1, BackendState::Draining),
            ]
        );
        assert_eq!(
            web.containers,
            [ContainerDecl {
                name: "web-4".into(),
                port: Some(8080),
                weight: 1,
                state: BackendState::Active,
            }]
        );
        assert_eq!(
            config.health(),
            [(
                vip("192.0.2.10:80/tcp"),
                HealthSpec {
                    probe: Probe::Http {
                        path: "/healthz".into(),
                        expect_status: 200,
                        host: None,
                    },
                    interval: Duration::from_secs(2),
                    timeout: Duration::from_secs(1),
                    rise: 2,
                    fall: 3,
                }
            )]
        );
        assert_eq!(config.vips[1].health, None);
        assert_eq!(
            (config.vips[0].idle_timeout_s, config.vips[1].idle_timeout_s),
            (Some(900), Some(30))
        );
        let state = config.desired_state();
        assert_eq!(state.vips[0].idle_timeout_s, Some(900));
    }

    #[test]
    fn idle_timeouts_match_the_vips_protocol_and_range() {
        let config = parse("[[vip]]\naddress = \"192.0.2.1:80\"\n").unwrap();
        assert_eq!(config.vips[0].idle_timeout_s, None, "default");
        let config = parse("[[vip]]\naddress = \"192.0.2.1:53/udp\"\nudp_timeout = 1\n").unwrap();
        assert_eq!(config.vips[0].idle_timeout_s, Some(1));
        for (text, column, message) in [
            (
                "[[vip]]\naddress = \"192.0.2.1:53/udp\"\ntcp_timeout = 30\n",
                15,
                "tcp_timeout does not apply to 192.0.2.1:53/udp, a udp VIP (use udp_timeout)",
            ),
            (
                "[[vip]]\naddress = \"192.0.2.1:80\"\nudp_timeout = 30\n",
                15,
                "udp_timeout does not apply to 192.0.2.1:80/tcp, a tcp VIP (use tcp_timeout)",
            ),
            (
                "[[vip]]\naddress = \"192.0.2.1:80\"\ntcp_timeout = 5\n",
                15,
                "tcp_timeout must be between 10 and 604800 seconds, got 5",
            ),
            (
                "[[vip]]\naddress = \"192.0.2.1:53/udp\"\nudp_timeout = -1\n",
                15,
                "udp_timeout must be between 1 and 604800 seconds, got -1",
            ),
        ] {
            assert_eq!(err(text), (3, column, message.to_owned()), "{text}");
        }
    }

    #[test]
    fn an_empty_file_is_an_empty_config() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(parse("").unwrap().desired_state(), DesiredState::default());
    }

    #[test]
    fn health_fields_default_individually() {
        let config = parse(
            "[[vip]]\naddress = \"192.0.2.1:80\"\n[vip.health]\nprobe = \"http\"\nfall = 5\n",
        )
        .unwrap();
        let spec = config.vips[0].health.clone().unwrap();
        assert_eq!(
            spec,
            HealthSpec {
                probe: Probe::Http {
                    path: "/".into(),
                    expect_status: 200,
                    host: None,
                },
                fall: 5,
                ..HealthSpec::default()
            }
        );
        let config = parse("[[vip]]\naddress = \"192.0.2.1:80\"\n[vip.health]\n").unwrap();
        assert_eq!(config.vips[0].health, Some(HealthSpec::default()));
    }

    #[test]
    fn errors_point_at_the_line_and_column() {
        let (line, column, message) = err(concat!(
            "[[vip]]\n",                         // 1
            "address = \"192.0.2.10:80/tcp\"\n", // 2
            "\n",                                // 3
            "[[vip.backend]]\n",                 // 4
            "address = \"10.0.0.2:8080\"\n",     // 5
            "\n",                                // 6
            "[[vip.backend]]\n",                 // 7
            "address = \"x\"\n",                 // 8
        ));
        assert_eq!((line, column), (8, 11));
        assert_eq!(
            message,
            "backend address 'x' is not ADDR:PORT (IPv6 as [fd00::2]:8080)"
        );
        let shown =
            parse("[[vip]]\naddress = \"192.0.2.1:80\"\n[[vip.backend]]\naddress = \"x\"\n")
                .unwrap_err()
                .to_string();
        assert!(
            shown.starts_with("xlb.toml:4:11: backend address 'x'"),
            "{shown}"
        );

        let (line, column, message) = err("[[vip]]\naddress = \"192.0.2.1:80\"\nbackends = []\n");
        assert_eq!((line, column), (3, 1));
        assert!(message.contains("unknown field `backends`"), "{message}");

        let (line, _, message) = err("[[vip]]\naddress = \"192.0.2.1/tcp\"\n");
        assert_eq!(line, 2);
        assert!(
            message.starts_with("bad VIP address: '192.0.2.1/tcp' is not ADDR:PORT"),
            "{message}"
        );

        let (line, _, message) = err("[[vip]]\naddress = \"192.0.2.1:80/sctp\"\n");
        assert_eq!(line, 2);
        assert!(message.contains("unknown protocol 'sctp'"), "{message}");

        let (line, _, message) =
            err("[[vip]]\naddress = \"192.0.2.1:80\"\n[[vip]]\naddress = \"192.0.2.1:80/tcp\"\n");
        assert_eq!(line, 4);
        assert_eq!(
            message,
            "VIP 192.0.2.1:80/tcp is declared twice (first at line 2)"
        );

        let (line, _, message) = err(concat!(
            "[[vip]]\naddress = \"192.0.2.1:80\"\n",
            "[[vip.backend]]\naddress = \"10.0.0.2:80\"\n",
            "[[vip.backend]]\naddress = \"10.0.0.2:80\"\nweight = 3\n",
        ));
        assert_eq!(line, 6);
        assert_eq!(
            message,
            "backend 10.0.0.2:80 is listed twice under VIP 192.0.2.1:80/tcp (first at line 4)"
        );

        let (line, column, message) = err(
            "[[vip]]\naddress = \"192.0.2.1:80\"\n[[vip.backend]]\naddress = \"[fd00::2]:80\"\n",
        );
        assert_eq!((line, column), (4, 11));
        assert!(
            message.contains("is IPv6 but VIP 192.0.2.1:80/tcp is IPv4"),
            "{message}"
        );

        // Weight 0 drains, as in IPVS and HAProxy.
        let drained = parse(
            "[[vip]]\naddress = \"192.0.2.1:80\"\n[[vip.backend]]\naddress = \"10.0.0.2:80\"\nweight = 0\n",
        )
        .unwrap();
        assert_eq!(drained.vips[0].backends[0].weight, 0);
        for bad in ["1001", "-1"] {
            let (line, column, message) = err(&format!(
                "[[vip]]\naddress = \"192.0.2.1:80\"\n[[vip.backend]]\naddress = \"10.0.0.2:80\"\nweight = {bad}\n"
            ));
            assert_eq!((line, column), (5, 10));
            assert_eq!(
                message,
                format!("weight must be between 0 (drain) and 1000, got {bad}")
            );
        }

        let (line, _, message) = err(
            "[[vip]]\naddress = \"192.0.2.1:80\"\n[[vip.backend]]\naddress = \"10.0.0.2:80\"\nstate = \"gone\"\n",
        );
        assert_eq!(line, 5);
        assert!(message.contains("unknown variant `gone`"), "{message}");

        let (line, column, message) = err("[agent]\nxdp_mode = \"turbo\"\n");
        assert_eq!((line, column), (2, 12));
        assert_eq!(message, "xdp_mode 'turbo' is not one of auto, native, skb");

        let (line, _, message) = err("[agent]\nmetrics = \"9464\"\n");
        assert_eq!(line, 2);
        assert!(
            message.starts_with("metrics address '9464' is not ADDR:PORT"),
            "{message}"
        );

        let (line, _, message) = err("[[vip]]\naddress = \"192.0.2.1:80\"\n[[vip.backend]]\n");
        assert!(line >= 3, "{line}");
        assert!(
            message.contains("needs address = \"ADDR:PORT\" or container = \"NAME\""),
            "{message}"
        );

        let (line, _, message) = err("[[vip]\n");
        assert_eq!(line, 1);
        assert!(!message.is_empty());
    }

    #[test]
    fn bad_health_specs_point_at_the_field() {
        let health = |body: &str| {
            err(&format!(
                "[[vip]]\naddress = \"192.0.2.1:80\"\n[vip.health]\n{body}"
            ))
        };
        let (line, column, message) = health("interval_ms = 500\ntimeout_ms = 900\n");
        assert_eq!((line, column), (5, 14));
        assert_eq!(
            message,
            "the health check timeout (900 ms) must not exceed its interval (500 ms)"
        );
        let (line, _, message) = health("rise = 0\n");
        assert_eq!(line, 4);
        assert_eq!(message, "health check rise must be at least 1");
        let (line, _, message) = health("fall = -2\n");
        assert_eq!(line, 4);
        assert_eq!(message, "fall must not be negative");
        let (line, _, message) = health("interval_ms = 0\n");
        assert_eq!(line, 4);
        assert!(
            message.contains("interval must be more than 0"),
            "{message}"
        );
        let (line, _, message) = health("probe = \"icmp\"\n");
        assert_eq!(line, 4);
        assert_eq!(message, "health probe 'icmp' is not one of tcp, http, udp");
        let (line, _, message) = health("path = \"/x\"\n");
        assert_eq!(line, 4);
        assert!(
            message.contains("only apply to probe = \"http\""),
            "{message}"
        );
        let (line, _, message) = health("probe = \"http\"\npath = \"healthz\"\n");
        assert_eq!(line, 5);
        assert!(message.contains("must start with '/'"), "{message}");
        let (line, _, message) = health("probe = \"http\"\nexpect_status = 99\n");
        assert_eq!(line, 5);
        assert!(message.contains("between 100 and 599"), "{message}");
        let (line, _, message) = health("host = \"web.example\"\n");
        assert_eq!(line, 4);
        assert!(
            message.contains("only apply to probe = \"http\""),
            "{message}"
        );
        let (line, _, message) = health("probe = \"http\"\nhost = \"a b\"\n");
        assert_eq!(line, 5);
        assert!(
            message.contains("host must be a name or address"),
            "{message}"
        );
        let config = parse(
            "[[vip]]\naddress = \"192.0.2.1:80\"\n[vip.health]\nprobe = \"http\"\nhost = \"web.example\"\n",
        )
        .unwrap();
        assert!(matches!(
            &config.vips[0].health.as_ref().unwrap().probe,
            Probe::Http { host: Some(host), .. } if host == "web.example"
        ));
        let (line, _, message) = health("probe = \"http\"\nexpect = 200\n");
        assert_eq!(line, 5);
        assert!(message.contains("unknown field `expect`"), "{message}");
    }

    #[test]
    fn udp_health_checks_parse_and_match_the_vips_protocol() {
        let health = |vip: &str, body: &str| {
            parse(&format!(
                "[[vip]]\naddress = \"{vip}\"\n[vip.health]\n{body}"
            ))
        };
        let probe_of = |vip: &str, body: &str| {
            health(vip, body).unwrap().vips[0]
                .health
                .clone()
                .unwrap()
                .probe
        };
        // A UDP VIP's checks default to the UDP probe: an empty datagram, judged by the
        // absence of port-unreachable; a payload of one's own expects an answer.
        assert_eq!(
            probe_of("192.0.2.53:53/udp", ""),
            Probe::Udp {
                payload: vec![],
                expect_reply: false
            }
        );
        assert_eq!(
            probe_of("192.0.2.53:53/udp", "payload = \"ping\"\n"),
            Probe::Udp {
                payload: b"ping".to_vec(),
                expect_reply: true
            }
        );
        assert_eq!(
            probe_of(
                "192.0.2.53:53/udp",
                "probe = \"udp\"\npayload_hex = \"00ff\"\nexpect_reply = false\n"
            ),
            Probe::Udp {
                payload: vec![0, 0xff],
                expect_reply: false
            }
        );

        let (line, column, message) =
            err("[[vip]]\naddress = \"192.0.2.53:53/udp\"\n[vip.health]\nprobe = \"tcp\"\n");
        assert_eq!((line, column), (4, 9));
        assert_eq!(
            message,
            "a tcp health check cannot probe UDP VIP 192.0.2.53:53/udp: every backend would fail it (use a udp health check)"
        );
        let (line, _, message) =
            err("[[vip]]\naddress = \"192.0.2.53:53/udp\"\n[vip.health]\nprobe = \"http\"\n");
        assert_eq!(line, 4);
        assert!(
            message.starts_with("a http health check cannot probe UDP VIP"),
            "{message}"
        );
        let (line, _, message) =
            err("[[vip]]\naddress = \"192.0.2.10:80/tcp\"\n[vip.health]\nprobe = \"udp\"\n");
        assert_eq!(line, 4);
        assert!(
            message.contains("use a tcp or http health check"),
            "{message}"
        );

        let udp_err = |body: &str| {
            err(&format!(
                "[[vip]]\naddress = \"192.0.2.53:53/udp\"\n[vip.health]\n{body}"
            ))
        };
        let (line, _, message) = udp_err("payload = \"a\"\npayload_hex = \"61\"\n");
        assert_eq!(line, 5);
        assert!(message.contains("not both"), "{message}");
        let (line, _, message) = udp_err("payload_hex = \"6\"\n");
        assert_eq!(line, 4);
        assert!(message.contains("odd number of hex digits"), "{message}");
        let (line, _, message) = udp_err("interval_ms = 500\ntimeout_ms = 100\n");
        assert_eq!(line, 4);
        assert!(message.contains("at least 1000 ms"), "{message}");
        let (line, _, message) = udp_err("path = \"/x\"\n");
        assert_eq!(line, 4);
        assert!(
            message.contains("only apply to probe = \"http\""),
            "{message}"
        );
        let (line, _, message) =
            err("[[vip]]\naddress = \"192.0.2.10:80\"\n[vip.health]\nexpect_reply = true\n");
        assert_eq!(line, 4);
        assert!(
            message.contains("only apply to probe = \"udp\""),
            "{message}"
        );
    }

    #[test]
    fn addresses_that_cannot_work_are_refused_where_they_are_written() {
        let (line, column, message) = err("[[vip]]\naddress = \"0.0.0.0:80/tcp\"\n");
        assert_eq!((line, column), (2, 11));
        assert_eq!(
            message,
            "VIP 0.0.0.0:80/tcp is the unspecified address, which names no host"
        );
        let (_, _, message) = err("[[vip]]\naddress = \"[::ffff:10.0.0.1]:80\"\n");
        assert!(message.contains("write that"), "{message}");
        let (_, _, message) = err("[[vip]]\naddress = \"[fd00::1%1]:80\"\n");
        assert!(message.contains("scope id (%1)"), "{message}");

        let with_backend = |vip: &str, backend: &str| {
            err(&format!(
                "[[vip]]\naddress = \"{vip}\"\n[[vip.backend]]\naddress = \"{backend}\"\n"
            ))
        };
        for (backend, needle) in [
            ("127.0.0.1:8080", "loopback"),
            ("255.255.255.255:8080", "broadcast"),
            ("224.0.0.5:8080", "multicast"),
            ("169.254.0.9:8080", "link-local"),
            ("0.0.0.0:8080", "unspecified"),
            ("192.0.2.10:8080", "is the address of VIP 192.0.2.10:80/tcp"),
        ] {
            let (line, column, message) = with_backend("192.0.2.10:80", backend);
            assert_eq!((line, column), (4, 11), "{backend}");
            assert!(
                message.starts_with(&format!("backend {backend} ")) && message.contains(needle),
                "{backend}: {message}"
            );
        }
        let (_, _, message) = with_backend("[2001:db8::10]:80", "[fe80::2]:80");
        assert!(message.contains("link-local"), "{message}");

        // Another VIP's address, whichever comes first in the file.
        for text in [
            "[[vip]]\naddress = \"192.0.2.10:80\"\n[[vip.backend]]\naddress = \"192.0.2.11:80\"\n[[vip]]\naddress = \"192.0.2.11:53/udp\"\n",
            "[[vip]]\naddress = \"192.0.2.11:53/udp\"\n[[vip]]\naddress = \"192.0.2.10:80\"\n[[vip.backend]]\naddress = \"192.0.2.11:80\"\n",
        ] {
            let (_, _, message) = err(text);
            assert_eq!(
                message,
                "backend 192.0.2.11:80 is the address of VIP 192.0.2.11:53/udp: translated packets would come back to the load balancer instead of reaching a server"
            );
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("xlb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("prod.toml");
        std::fs::write(&path, "[[vip]]\naddress = \"nope\"\n").unwrap();
        let shown = load(&path).unwrap_err().to_string();
        assert!(
            shown.starts_with(&format!("{}:2:11: bad VIP address", path.display())),
            "{shown}"
        );
        let missing = load(dir.join("absent.toml")).unwrap_err();
        assert!(matches!(missing, ConfigError::Read { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn desired_state_is_sorted_like_the_balancers() {
        let config = parse(concat!(
            "[[vip]]\naddress = \"192.0.2.20:80\"\n",
            "[[vip.backend]]\naddress = \"10.0.0.9:80\"\n",
            "[[vip.backend]]\naddress = \"10.0.0.1:80\"\nweight = 4\n",
            "[[vip]]\naddress = \"192.0.2.10:80\"\n",
        ))
        .unwrap();
        let state = config.desired_state();
        assert_eq!(
            state,
            DesiredState {
                vips: vec![
                    VipConfig {
                        vip: vip("192.0.2.10:80/tcp"),
                        backends: vec![],
                        id: None,
                        health: None,
                        idle_timeout_s: None,
                        forwarding: Forwarding::Nat,
                    },
                    VipConfig {
                        vip: vip("192.0.2.20:80/tcp"),
                        backends: vec![
                            backend("10.0.0.1:80", 4, BackendState::Active),
                            backend("10.0.0.9:80", 1, BackendState::Active),
                        ],
                        id: None,
                        health: None,
                        idle_timeout_s: None,
                        forwarding: Forwarding::Nat,
                    },
                ],
            }
        );
        assert!(config.health().is_empty());
    }

    #[test]
    fn diff_is_minimal() {
        let a = vip("192.0.2.1:80/tcp");
        let b = vip("192.0.2.2:80/tcp");
        let c = vip("192.0.2.3:53/udp");
        let state = |vips: Vec<(VipSpec, Vec<BackendConfig>)>| DesiredState {
            vips: vips
                .into_iter()
                .map(|(vip, backends)| VipConfig {
                    vip,
                    backends,
                    id: None,
                    health: None,
                    idle_timeout_s: None,
                    forwarding: Forwarding::Nat,
                })
                .collect(),
        };
        let mut running = state(vec![
            (
                a,
                vec![
                    backend("10.0.0.1:80", 1, BackendState::Active),
                    backend("10.0.0.2:80", 1, BackendState::Active),
                    backend("10.0.0.3:80", 1, BackendState::Active),
                ],
            ),
            (b, vec![backend("10.0.1.1:80", 1, BackendState::Active)]),
        ]);
        // The running state carries data-plane ids; they must not count as a change.
        for (i, be) in running.vips[0].backends.iter_mut().enumerate() {
            be.id = Some(u32::try_from(i).unwrap() + 7);
        }
        running.vips[0].id = Some(3);

        assert!(diff(&running, &running).is_empty());
        let unchanged = state(vec![
            (b, vec![backend("10.0.1.1:80", 1, BackendState::Active)]),
            (
                a,
                vec![
                    backend("10.0.0.3:80", 1, BackendState::Active),
                    backend("10.0.0.1:80", 1, BackendState::Active),
                    backend("10.0.0.2:80", 1, BackendState::Active),
                ],
            ),
        ]);
        assert!(
            diff(&running, &unchanged).is_empty(),
            "order and ids do not matter"
        );

        let wanted = state(vec![
            (
                a,
                vec![
                    backend("10.0.0.1:80", 1, BackendState::Active),
                    backend("10.0.0.2:80", 5, BackendState::Active),
                    backend("10.0.0.4:80", 1, BackendState::Draining),
                ],
            ),
            (c, vec![backend("10.0.2.1:53", 1, BackendState::Active)]),
        ]);
        assert_eq!(
            diff(&running, &wanted),
            [
                Change::RemoveVip(b),
                Change::AddVip(c),
                Change::AddBackend {
                    vip: c,
                    backend: backend("10.0.2.1:53", 1, BackendState::Active)
                },
                Change::UpdateBackend {
                    vip: a,
                    backend: backend("10.0.0.2:80", 5, BackendState::Active)
                },
                Change::AddBackend {
                    vip: a,
                    backend: backend("10.0.0.4:80", 1, BackendState::Draining)
                },
                Change::RemoveBackend {
                    vip: a,
                    backend: "10.0.0.3:80".parse().unwrap()
                },
            ]
        );
        assert_eq!(
            diff(&running, &DesiredState::default()),
            [Change::RemoveVip(a), Change::RemoveVip(b)]
        );
        let shown: Vec<String> = diff(&DesiredState::default(), &wanted)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown[0], "+ vip 192.0.2.1:80/tcp");
        assert_eq!(
            shown[3],
            "+ backend 192.0.2.1:80/tcp 10.0.0.4:80 weight 1 draining"
        );
        assert_eq!(
            serde_json::to_string(&Change::RemoveVip(a)).unwrap(),
            r#"{"remove_vip":"192.0.2.1:80/tcp"}"#
        );
    }

    #[test]
    fn a_backend_can_be_named_by_container() {
        let config = parse(concat!(
            "[[vip]]\naddress = \"192.0.2.10:80\"\n",
            "[[vip.backend]]\naddress = \"10.0.0.9:80\"\n",
            "[[vip.backend]]\ncontainer = \"web-1\"\nweight = 2\n",
            "[[vip.backend]]\ncontainer = \"web-2\"\nport = 8080\nstate = \"draining\"\n",
        ))
        .unwrap();
        let vip = &config.vips[0];
        assert_eq!(vip.backends.len(), 1);
        assert_eq!(
            vip.containers,
            [
                ContainerDecl {
                    name: "web-1".into(),
                    port: None,
                    weight: 2,
                    state: BackendState::Active,
                },
                ContainerDecl {
                    name: "web-2".into(),
                    port: Some(8080),
                    weight: 1,
                    state: BackendState::Draining,
                },
            ]
        );
        // Addresses only: the agent finds the containers'.
        assert_eq!(config.desired_state().vips[0].backends.len(), 1);

        let head = "[[vip]]\naddress = \"192.0.2.10:80\"\n[[vip.backend]]\n";
        for (body, line, expected) in [
            (
                "container = \"web-1\"\naddress = \"10.0.0.9:80\"\n",
                5,
                "not both",
            ),
            ("container = \"-web\"\n", 4, "not a valid container name"),
            (
                "container = \"web\"\nport = 0\n",
                5,
                "port 0 is not 1-65535",
            ),
            (
                "address = \"10.0.0.9:80\"\nport = 81\n",
                5,
                "port goes with container =",
            ),
            (
                "container = \"web\"\n[[vip.backend]]\ncontainer = \"web\"\n",
                6,
                "container web is listed twice under VIP 192.0.2.10:80/tcp (first at line 4)",
            ),
        ] {
            let (at, _, message) = err(&format!("{head}{body}"));
            assert_eq!(at, line, "{body}: {message}");
            assert!(message.contains(expected), "{body}: {message}");
        }
    }
}
