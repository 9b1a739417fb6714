//! Backend health checks. The agent probes each backend of a VIP that has a [`HealthSpec`]
//! from its own network namespace (directly, not through the VIP) and takes a backend out of
//! the ring when it stops answering, so a dead container stops getting new flows without an
//! operator in the loop.
//!
//! A backend starts out healthy: adding one (or restarting the agent) then takes effect at
//! once instead of after `rise` probes, and a backend that is really down leaves again after
//! `fall` probes. Flapping is damped by needing `fall` consecutive failures to go down and
//! `rise` consecutive successes to come back.
//!
//! A probe must speak the VIP's protocol: TCP and HTTP probes for TCP VIPs, the UDP probe for
//! UDP VIPs. A TCP connect to a UDP service is refused by every backend, so a mismatched probe
//! would take all of them out; [`HealthSpec::check_protocol`] refuses that combination.

use std::{
    collections::HashMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    sync::mpsc,
    task::JoinHandle,
    time::{MissedTickBehavior, timeout},
};

use crate::balancer::{Protocol, VipSpec};

/// How a backend is asked whether it is alive.
///
/// Serialised with a `kind` tag: `{"kind":"tcp"}`,
/// `{"kind":"http","path":"/healthz","expect_status":200}`,
/// `{"kind":"udp","payload_hex":"70696e67","expect_reply":true}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Probe {
    /// A completed TCP handshake: cheap, but only proves the socket is open.
    Tcp,
    /// `GET path HTTP/1.0`, healthy when the status line carries `expect_status`: proves the
    /// application answers, and lets it report itself unhealthy (e.g. 503 while draining).
    Http { path: String, expect_status: u16 },
    /// One datagram carrying `payload` (empty by default, which no service should act on).
    /// With `expect_reply`, healthy when any answer arrives within the timeout: proves the
    /// service answers. Without, healthy unless an ICMP port-unreachable comes back (a
    /// connected UDP socket reports it as ECONNREFUSED): proves only that the port is open,
    /// for services that never answer the payload.
    Udp {
        #[serde(rename = "payload_hex", with = "hex", default)]
        payload: Vec<u8>,
        expect_reply: bool,
    },
}

impl Probe {
    /// The protocol the probe speaks, which must be its VIP's.
    #[must_use]
    pub const fn protocol(&self) -> Protocol {
        match self {
            Self::Tcp | Self::Http { .. } => Protocol::Tcp,
            Self::Udp { .. } => Protocol::Udp,
        }
    }

    /// `tcp`, `http` or `udp`, as `--health` and the config's `probe` take it.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http { .. } => "http",
            Self::Udp { .. } => "udp",
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("tcp"),
            Self::Http {
                path,
                expect_status,
            } => write!(f, "http GET {path} expecting {expect_status}"),
            Self::Udp {
                payload,
                expect_reply: true,
            } => write!(f, "udp ({} bytes) expecting a reply", payload.len()),
            Self::Udp {
                payload,
                expect_reply: false,
            } => write!(
                f,
                "udp ({} bytes) expecting no port-unreachable",
                payload.len()
            ),
        }
    }
}

/// How often and how strictly one VIP's backends are probed.
///
/// Serialised with durations in whole milliseconds, which the JSON API and the TOML config
/// both carry as plain integers: `{"probe":{"kind":"tcp"},"interval_ms":2000,"timeout_ms":1000,
/// "rise":2,"fall":3}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    pub probe: Probe,
    #[serde(rename = "interval_ms", with = "millis")]
    pub interval: Duration,
    #[serde(rename = "timeout_ms", with = "millis")]
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy backend back.
    pub rise: u32,
    /// Consecutive failures that take a healthy backend out.
    pub fall: u32,
}

impl Default for HealthSpec {
    /// TCP connect every 2 s with a 1 s timeout, down after 3 failures, up after 2 successes:
    /// a dead backend is out within about 6 s, and one lost SYN does not evict it.
    fn default() -> Self {
        Self {
            probe: Probe::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HealthSpecError {
    #[error("the health check interval must be more than 0 ms")]
    ZeroInterval,
    #[error("the health check timeout must be more than 0 ms")]
    ZeroTimeout,
    #[error(
        "the health check timeout ({timeout_ms} ms) must not exceed its interval ({interval_ms} ms)"
    )]
    TimeoutExceedsInterval { timeout_ms: u128, interval_ms: u128 },
    #[error("health check rise must be at least 1")]
    ZeroRise,
    #[error("health check fall must be at least 1")]
    ZeroFall,
    #[error(
        "the HTTP health check path must start with '/' and hold no spaces or line breaks, got '{0}'"
    )]
    BadPath(String),
    #[error("the expected HTTP status must be between 100 and 599, got {0}")]
    BadStatus(u16),
    #[error(
        "a {probe} health check cannot probe {} VIP {vip}: every backend would fail it (use {})",
        proto_name(vip.proto),
        suggestion(vip.proto)
    )]
    WrongProtocol { probe: &'static str, vip: VipSpec },
    #[error("the UDP health check payload is {0} bytes, at most {MAX_UDP_PAYLOAD}")]
    PayloadTooLarge(usize),
    #[error(
        "a UDP health check that expects no reply relies on ICMP port-unreachable messages, which Linux sends at most once per second per peer: use an interval of at least {MIN_SILENT_UDP_INTERVAL_MS} ms (or expect a reply)"
    )]
    SilentUdpTooFrequent,
}

fn proto_name(proto: Protocol) -> &'static str {
    match proto {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

fn suggestion(proto: Protocol) -> &'static str {
    match proto {
        Protocol::Tcp => "a tcp or http health check",
        Protocol::Udp => "a udp health check",
    }
}

/// Largest UDP probe payload: fits one unfragmented datagram on any link.
pub const MAX_UDP_PAYLOAD: usize = 1024;

/// Shortest interval of a UDP probe that judges by the absence of ICMP port-unreachable:
/// Linux sends those at most once per `net.ipv4.icmp_ratelimit` (1000 ms) per peer after a
/// short burst, so faster probes would see silence from a dead port and call it healthy.
pub const MIN_SILENT_UDP_INTERVAL_MS: u64 = 1000;

impl HealthSpec {
    /// Rejects specs that could never settle: probes overlapping their own interval, or a
    /// threshold of zero that would flip state without any evidence.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), HealthSpecError> {
        if self.interval.is_zero() {
            return Err(HealthSpecError::ZeroInterval);
        }
        if self.timeout.is_zero() {
            return Err(HealthSpecError::ZeroTimeout);
        }
        if self.timeout > self.interval {
            return Err(HealthSpecError::TimeoutExceedsInterval {
                timeout_ms: self.timeout.as_millis(),
                interval_ms: self.interval.as_millis(),
            });
        }
        if self.rise == 0 {
            return Err(HealthSpecError::ZeroRise);
        }
        if self.fall == 0 {
            return Err(HealthSpecError::ZeroFall);
        }
        if let Probe::Http {
            path,
            expect_status,
        } = &self.probe
        {
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(HealthSpecError::BadPath(path.clone()));
            }
            if !(100..=599).contains(expect_status) {
                return Err(HealthSpecError::BadStatus(*expect_status));
            }
        }
        if let Probe::Udp {
            payload,
            expect_reply,
        } = &self.probe
        {
            if payload.len() > MAX_UDP_PAYLOAD {
                return Err(HealthSpecError::PayloadTooLarge(payload.len()));
            }
            if !expect_reply && self.interval < Duration::from_millis(MIN_SILENT_UDP_INTERVAL_MS) {
                return Err(HealthSpecError::SilentUdpTooFrequent);
            }
        }
        Ok(())
    }

    /// Refuses a probe that does not speak `vip`'s protocol.
    ///
    /// # Errors
    /// [`HealthSpecError::WrongProtocol`].
    pub fn check_protocol(&self, vip: &VipSpec) -> Result<(), HealthSpecError> {
        if self.probe.protocol() == vip.proto {
            Ok(())
        } else {
            Err(HealthSpecError::WrongProtocol {
                probe: self.probe.kind(),
                vip: *vip,
            })
        }
    }

    /// [`Self::validate`] and [`Self::check_protocol`].
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate_for(&self, vip: &VipSpec) -> Result<(), HealthSpecError> {
        self.validate()?;
        self.check_protocol(vip)
    }
}

/// Bytes as lowercase hex in JSON and the state file, so any payload (a DNS query, say)
/// survives as text.
mod hex {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        decode(&String::deserialize(d)?).map_err(D::Error::custom)
    }

    #[must_use]
    pub fn encode(bytes: &[u8]) -> String {
        use std::fmt::Write as _;
        bytes.iter().fold(String::new(), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
    }

    /// # Errors
    /// An odd number of digits or a character that is not a hex digit.
    pub fn decode(text: &str) -> Result<Vec<u8>, String> {
        if !text.len().is_multiple_of(2) {
            return Err(format!("'{text}' has an odd number of hex digits"));
        }
        text.as_bytes()
            .chunks(2)
            .map(|pair| {
                std::str::from_utf8(pair)
                    .ok()
                    .and_then(|p| u8::from_str_radix(p, 16).ok())
                    .ok_or_else(|| format!("'{text}' is not hex (two digits per byte, e.g. 0a1b)"))
            })
            .collect()
    }
}

pub use hex::decode as decode_hex;

mod millis {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// What the last probes of one backend said, for `xlb` to show and the metrics to export.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HealthStatus {
    pub healthy: bool,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    /// Human-readable outcome of the last probe: `ok 1.2 ms`, `connect refused`, `http 503`.
    pub last_result: String,
    /// 0 until the first probe has finished.
    pub last_checked_unix_ms: u64,
}

impl HealthStatus {
    fn fresh(healthy: bool) -> Self {
        Self {
            healthy,
            consecutive_ok: 0,
            consecutive_fail: 0,
            last_result: "not checked yet".to_owned(),
            last_checked_unix_ms: 0,
        }
    }
}

/// A backend changed state: the agent takes it out of (or puts it back into) the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub vip: VipSpec,
    pub backend: SocketAddr,
    pub healthy: bool,
    /// The probe result that tipped the balance, for the log.
    pub detail: String,
}

type TargetKey = (VipSpec, SocketAddr);

struct Slot {
    /// Which task owns this entry; a task whose id no longer matches has been replaced or
    /// stopped and must not write or send anything.
    task_id: u64,
    status: HealthStatus,
}

type Shared = Arc<Mutex<HashMap<TargetKey, Slot>>>;

fn lock(shared: &Shared) -> MutexGuard<'_, HashMap<TargetKey, Slot>> {
    // A panicking probe task cannot leave the map half-updated (each write is one insert),
    // so a poisoned lock is still consistent.
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Target {
    spec: HealthSpec,
    task: JoinHandle<()>,
}

/// Runs one probing task per (VIP, backend) and reports state changes on a channel.
///
/// Dropping it stops every task.
pub struct HealthChecker {
    events: mpsc::Sender<HealthEvent>,
    targets: HashMap<TargetKey, Target>,
    shared: Shared,
    next_task_id: u64,
}

impl fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthChecker")
            .field("targets", &self.targets.len())
            .finish_non_exhaustive()
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for target in self.targets.values() {
            target.task.abort();
        }
    }
}

impl HealthChecker {
    /// State changes go to `events`; a full channel holds back further transitions (not
    /// probes) until the agent catches up, so no change is ever lost or reordered.
    #[must_use]
    pub fn new(events: mpsc::Sender<HealthEvent>) -> Self {
        Self {
            events,
            targets: HashMap::new(),
            shared: Arc::default(),
            next_task_id: 0,
        }
    }

    /// Makes the probed set for `vip` exactly `backends` under `spec`, touching only what
    /// changed: a backend whose spec is unchanged keeps its task and its counters, so a
    /// reload does not reset health. `None` stops checking the VIP (its backends then count
    /// as healthy). Must be called within a tokio runtime.
    ///
    /// Once this returns, no event is sent for a target it stopped.
    ///
    /// # Errors
    /// An invalid spec; nothing is changed then.
    pub fn set_targets(
        &mut self,
        vip: VipSpec,
        spec: Option<HealthSpec>,
        backends: &[SocketAddr],
    ) -> Result<(), HealthSpecError> {
        let Some(spec) = spec else {
            self.remove_vip(&vip);
            return Ok(());
        };
        spec.validate_for(&vip)?;
        let stale: Vec<TargetKey> = self
            .targets
            .keys()
            .filter(|(v, b)| *v == vip && !backends.contains(b))
            .copied()
            .collect();
        for key in stale {
            self.stop(&key);
        }
        for backend in backends {
            let key = (vip, *backend);
            if self.targets.get(&key).is_some_and(|t| t.spec == spec) {
                continue;
            }
            // A changed spec restarts the task but keeps the verdict, so an unhealthy
            // backend stays out until it passes `rise` probes under the new spec.
            let healthy = self.status(&vip, *backend).is_none_or(|s| s.healthy);
            self.stop(&key);
            self.start(key, spec.clone(), healthy);
        }
        Ok(())
    }

    /// Stops every check of `vip`.
    pub fn remove_vip(&mut self, vip: &VipSpec) {
        let keys: Vec<TargetKey> = self
            .targets
            .keys()
            .filter(|(v, _)| v == vip)
            .copied()
            .collect();
        for key in keys {
            self.stop(&key);
        }
    }

    /// Stops the checks of every VIP not in `vips` (VIPs that were removed).
    pub fn retain_vips(&mut self, vips: &[VipSpec]) {
        let gone: Vec<TargetKey> = self
            .targets
            .keys()
            .filter(|(v, _)| !vips.contains(v))
            .copied()
            .collect();
        for key in gone {
            self.stop(&key);
        }
    }

    /// `None` when the backend is not checked (no spec for its VIP, or unknown).
    #[must_use]
    pub fn status(&self, vip: &VipSpec, backend: SocketAddr) -> Option<HealthStatus> {
        lock(&self.shared)
            .get(&(*vip, backend))
            .map(|slot| slot.status.clone())
    }

    /// Whether the backend may take new flows: unchecked backends always may.
    #[must_use]
    pub fn is_healthy(&self, vip: &VipSpec, backend: SocketAddr) -> bool {
        self.status(vip, backend).is_none_or(|s| s.healthy)
    }

    /// Every checked backend, sorted, for listings and metrics.
    #[must_use]
    pub fn statuses(&self) -> Vec<(VipSpec, SocketAddr, HealthStatus)> {
        let mut all: Vec<_> = lock(&self.shared)
            .iter()
            .map(|((vip, backend), slot)| (*vip, *backend, slot.status.clone()))
            .collect();
        all.sort_by_key(|(vip, backend, _)| (*vip, *backend));
        all
    }

    fn stop(&mut self, key: &TargetKey) {
        if let Some(target) = self.targets.remove(key) {
            target.task.abort();
        }
        // Removing the slot under the lock is what fences the task off: from here on its
        // id matches nothing, whether or not the abort has landed yet.
        lock(&self.shared).remove(key);
    }

    fn start(&mut self, key: TargetKey, spec: HealthSpec, healthy: bool) {
        let task_id = self.next_task_id;
        self.next_task_id += 1;
        lock(&self.shared).insert(
            key,
            Slot {
                task_id,
                status: HealthStatus::fresh(healthy),
            },
        );
        let task = tokio::spawn(probe_loop(
            key,
            spec.clone(),
            healthy,
            task_id,
            Arc::clone(&self.shared),
            self.events.clone(),
        ));
        tracing::debug!(vip = %key.0, backend = %key.1, "health checks started");
        self.targets.insert(key, Target { spec, task });
    }
}

async fn probe_loop(
    (vip, backend): TargetKey,
    spec: HealthSpec,
    mut healthy: bool,
    task_id: u64,
    shared: Shared,
    events: mpsc::Sender<HealthEvent>,
) {
    let mut ticks = tokio::time::interval(spec.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut ok, mut fail) = (0_u32, 0_u32);
    loop {
        ticks.tick().await;
        let outcome = probe(backend, &spec).await;
        let passed = outcome.is_ok();
        let detail = match outcome {
            Ok(d) | Err(d) => d,
        };
        if passed {
            ok = ok.saturating_add(1);
            fail = 0;
        } else {
            fail = fail.saturating_add(1);
            ok = 0;
        }
        let flips = if healthy {
            fail >= spec.fall
        } else {
            ok >= spec.rise
        };
        // Reserve channel room before taking the lock, so the status change and its event
        // are published together (or, if the target was stopped meanwhile, neither is).
        let permit = if flips {
            events.reserve().await.ok()
        } else {
            None
        };
        if flips {
            healthy = !healthy;
        }
        let status = HealthStatus {
            healthy,
            consecutive_ok: ok,
            consecutive_fail: fail,
            last_result: detail.clone(),
            last_checked_unix_ms: unix_ms(),
        };
        {
            let mut map = lock(&shared);
            match map.get_mut(&(vip, backend)) {
                Some(slot) if slot.task_id == task_id => slot.status = status,
                _ => return,
            }
            if flips {
                if healthy {
                    tracing::info!(%vip, %backend, %detail, "backend is healthy again");
                } else {
                    tracing::warn!(%vip, %backend, %detail, probe = %spec.probe, "backend failed its health checks");
                }
                match permit {
                    Some(permit) => permit.send(HealthEvent {
                        vip,
                        backend,
                        healthy,
                        detail,
                    }),
                    None => {
                        tracing::debug!(%vip, %backend, "nobody listens for health events");
                    }
                }
            }
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn elapsed_ms(start: Instant) -> String {
    format!("{:.1} ms", start.elapsed().as_secs_f64() * 1000.0)
}

/// One probe: `Ok(detail)` on success, `Err(detail)` on failure.
async fn probe(backend: SocketAddr, spec: &HealthSpec) -> Result<String, String> {
    if let Probe::Udp {
        payload,
        expect_reply,
    } = &spec.probe
    {
        return udp_probe(backend, payload, *expect_reply, spec.timeout).await;
    }
    let start = Instant::now();
    let attempt = async {
        let mut stream = TcpStream::connect(backend)
            .await
            .map_err(|e| connect_error(&e))?;
        match &spec.probe {
            Probe::Tcp => Ok(format!("ok {}", elapsed_ms(start))),
            Probe::Udp { .. } => unreachable!("UDP probes are sent by udp_probe"),
            Probe::Http {
                path,
                expect_status,
            } => {
                let status = http_status(&mut stream, backend, path).await?;
                if status == *expect_status {
                    Ok(format!("ok http {status} {}", elapsed_ms(start)))
                } else {
                    Err(format!("http {status} (expected {expect_status})"))
                }
            }
        }
    };
    match timeout(spec.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {} ms", spec.timeout.as_millis())),
    }
}

async fn udp_probe(
    backend: SocketAddr,
    payload: &[u8],
    expect_reply: bool,
    limit: Duration,
) -> Result<String, String> {
    let start = Instant::now();
    let any: SocketAddr = if backend.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any)
        .await
        .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    // Connected, so the kernel hands this socket the ICMP errors about the backend (as
    // ECONNREFUSED and friends on the next call) and drops datagrams from anyone else.
    socket.connect(backend).await.map_err(|e| udp_error(&e))?;
    socket.send(payload).await.map_err(|e| udp_error(&e))?;
    // Only the arrival matters; a longer answer is truncated, which is fine.
    let mut answer = [0_u8; 1];
    match timeout(limit, socket.recv(&mut answer)).await {
        Ok(Ok(_)) => Ok(format!("ok udp reply {}", elapsed_ms(start))),
        Ok(Err(e)) => Err(udp_error(&e)),
        Err(_) if expect_reply => Err(format!("no reply within {} ms", limit.as_millis())),
        Err(_) => Ok(format!(
            "ok no port-unreachable within {} ms",
            limit.as_millis()
        )),
    }
}

fn udp_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "port unreachable".to_owned(),
        std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
            "unreachable".to_owned()
        }
        _ => format!("udp probe failed: {e}"),
    }
}

fn connect_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect refused".to_owned(),
        std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
            "unreachable".to_owned()
        }
        _ => format!("connect failed: {e}"),
    }
}

/// Longest status line read before giving up on a peer that is not speaking HTTP.
const MAX_STATUS_LINE: usize = 1024;

async fn http_status(
    stream: &mut TcpStream,
    backend: SocketAddr,
    path: &str,
) -> Result<u16, String> {
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {backend}\r\nUser-Agent: xlb-health\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0_u8; 256];
    while !buf.contains(&b'\n') {
        if buf.len() >= MAX_STATUS_LINE {
            return Err("no HTTP status line".to_owned());
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    parse_status_line(line).ok_or_else(|| {
        if buf.is_empty() {
            "closed without a response".to_owned()
        } else {
            "no HTTP status line".to_owned()
        }
    })
}

fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use tokio::{net::TcpListener, sync::mpsc::Receiver};

    use super::*;

    fn vip() -> VipSpec {
        "192.0.2.10:80/tcp".parse().unwrap()
    }

    fn fast(probe: Probe) -> HealthSpec {
        HealthSpec {
            probe,
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(40),
            rise: 2,
            fall: 2,
        }
    }

    /// A listener that accepts and closes, or answers HTTP with `status`.
    struct Server {
        addr: SocketAddr,
        task: JoinHandle<()>,
    }

    impl Server {
        async fn start(addr: SocketAddr, http_status: Option<u16>) -> Self {
            let listener = TcpListener::bind(addr).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((mut conn, _)) = listener.accept().await else {
                        continue;
                    };
                    if let Some(status) = http_status {
                        tokio::spawn(async move {
                            let mut buf = [0_u8; 1024];
                            let _ = conn.read(&mut buf).await;
                            let reply =
                                format!("HTTP/1.0 {status} Whatever\r\nContent-Length: 0\r\n\r\n");
                            let _ = conn.write_all(reply.as_bytes()).await;
                        });
                    }
                }
            });
            Self { addr, task }
        }

        /// Closes the listening socket (and waits until it is really gone).
        async fn stop(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }

    async fn next_event(rx: &mut Receiver<HealthEvent>) -> HealthEvent {
        timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no health event within 5 s")
            .expect("channel open")
    }

    #[test]
    fn specs_validate_and_serialise_in_milliseconds() {
        let spec = HealthSpec::default();
        spec.validate().unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(
            json,
            r#"{"probe":{"kind":"tcp"},"interval_ms":2000,"timeout_ms":1000,"rise":2,"fall":3}"#
        );
        assert_eq!(serde_json::from_str::<HealthSpec>(&json).unwrap(), spec);
        let http: Probe =
            serde_json::from_str(r#"{"kind":"http","path":"/healthz","expect_status":204}"#)
                .unwrap();
        assert_eq!(
            http,
            Probe::Http {
                path: "/healthz".into(),
                expect_status: 204
            }
        );

        let bad = |f: fn(&mut HealthSpec)| {
            let mut s = HealthSpec::default();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert_eq!(
            bad(|s| s.interval = Duration::ZERO),
            HealthSpecError::ZeroInterval
        );
        assert!(matches!(
            bad(|s| s.timeout = Duration::from_secs(3)),
            HealthSpecError::TimeoutExceedsInterval { .. }
        ));
        assert_eq!(bad(|s| s.rise = 0), HealthSpecError::ZeroRise);
        assert_eq!(bad(|s| s.fall = 0), HealthSpecError::ZeroFall);
        assert!(matches!(
            bad(|s| s.probe = Probe::Http {
                path: "healthz".into(),
                expect_status: 200
            }),
            HealthSpecError::BadPath(_)
        ));
    }

    fn udp(payload: &[u8], expect_reply: bool) -> Probe {
        Probe::Udp {
            payload: payload.to_vec(),
            expect_reply,
        }
    }

    #[test]
    fn udp_specs_serialise_and_validate() {
        let probe = udp(b"ping", true);
        let json = serde_json::to_string(&probe).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"udp","payload_hex":"70696e67","expect_reply":true}"#
        );
        assert_eq!(serde_json::from_str::<Probe>(&json).unwrap(), probe);
        assert_eq!(
            serde_json::from_str::<Probe>(r#"{"kind":"udp","expect_reply":false}"#).unwrap(),
            udp(b"", false)
        );
        assert!(
            serde_json::from_str::<Probe>(
                r#"{"kind":"udp","payload_hex":"7","expect_reply":true}"#
            )
            .is_err()
        );
        assert_eq!(decode_hex("00ff1A").unwrap(), [0, 0xff, 0x1a]);
        assert!(decode_hex("zz").unwrap_err().contains("not hex"));

        let spec = |probe, interval_ms| HealthSpec {
            probe,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(100),
            ..HealthSpec::default()
        };
        spec(udp(b"", false), 1000).validate().unwrap();
        spec(udp(b"x", true), 200).validate().unwrap();
        assert_eq!(
            spec(udp(b"", false), 999).validate().unwrap_err(),
            HealthSpecError::SilentUdpTooFrequent
        );
        assert_eq!(
            spec(udp(&[0; MAX_UDP_PAYLOAD + 1], true), 1000)
                .validate()
                .unwrap_err(),
            HealthSpecError::PayloadTooLarge(MAX_UDP_PAYLOAD + 1)
        );
    }

    #[test]
    fn probes_must_speak_the_vips_protocol() {
        let dns: VipSpec = "192.0.2.53:53/udp".parse().unwrap();
        let web = vip();
        let tcp_spec = HealthSpec::default();
        let e = tcp_spec.check_protocol(&dns).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a tcp health check cannot probe UDP VIP 192.0.2.53:53/udp: every backend would fail it (use a udp health check)"
        );
        let http_spec = HealthSpec {
            probe: Probe::Http {
                path: "/".into(),
                expect_status: 200,
            },
            ..HealthSpec::default()
        };
        assert!(http_spec.validate_for(&dns).is_err());
        let udp_spec = HealthSpec {
            probe: udp(b"", false),
            ..HealthSpec::default()
        };
        udp_spec.validate_for(&dns).unwrap();
        tcp_spec.validate_for(&web).unwrap();
        assert!(
            udp_spec
                .check_protocol(&web)
                .unwrap_err()
                .to_string()
                .contains("use a tcp or http health check")
        );
        // The checker refuses the mismatch too (a state file written before the check).
        let (tx, _rx) = mpsc::channel(1);
        let mut checker = HealthChecker::new(tx);
        assert!(matches!(
            checker.set_targets(dns, Some(tcp_spec), &["127.0.0.1:53".parse().unwrap()]),
            Err(HealthSpecError::WrongProtocol { probe: "tcp", .. })
        ));
        assert!(checker.statuses().is_empty());
    }

    /// A UDP socket that answers every datagram with "pong" (or stays silent), until dropped.
    struct UdpServer {
        addr: SocketAddr,
        task: JoinHandle<()>,
    }

    impl UdpServer {
        async fn start(addr: SocketAddr, answer: bool) -> Self {
            let socket = UdpSocket::bind(addr).await.unwrap();
            let addr = socket.local_addr().unwrap();
            let task = tokio::spawn(async move {
                let mut buf = [0_u8; 2048];
                while let Ok((_, from)) = socket.recv_from(&mut buf).await {
                    if answer {
                        let _ = socket.send_to(b"pong", from).await;
                    }
                }
            });
            Self { addr, task }
        }

        async fn stop(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }

    #[tokio::test]
    async fn udp_probes_tell_answers_silence_and_port_unreachable_apart() {
        let limit = Duration::from_millis(200);
        let echo = UdpServer::start("127.0.0.1:0".parse().unwrap(), true).await;
        let silent = UdpServer::start("127.0.0.1:0".parse().unwrap(), false).await;
        let closed = {
            let gone = UdpServer::start("127.0.0.1:0".parse().unwrap(), true).await;
            let addr = gone.addr;
            gone.stop().await;
            addr
        };
        let ok = |r: Result<String, String>, prefix: &str| {
            assert!(r.as_ref().is_ok_and(|d| d.starts_with(prefix)), "{r:?}");
        };
        ok(
            udp_probe(echo.addr, b"ping", true, limit).await,
            "ok udp reply",
        );
        ok(
            udp_probe(echo.addr, b"", false, limit).await,
            "ok udp reply",
        );
        assert_eq!(
            udp_probe(silent.addr, b"ping", true, limit).await,
            Err("no reply within 200 ms".to_owned())
        );
        ok(
            udp_probe(silent.addr, b"", false, limit).await,
            "ok no port-unreachable within 200 ms",
        );
        for expect_reply in [true, false] {
            assert_eq!(
                udp_probe(closed, b"", expect_reply, limit).await,
                Err("port unreachable".to_owned())
            );
        }
        echo.stop().await;
        silent.stop().await;
    }

    #[tokio::test]
    async fn udp_target_goes_down_and_comes_back() {
        let dns: VipSpec = "192.0.2.53:53/udp".parse().unwrap();
        let server = UdpServer::start("127.0.0.1:0".parse().unwrap(), true).await;
        let addr = server.addr;
        let (tx, mut rx) = mpsc::channel(16);
        let mut checker = HealthChecker::new(tx);
        checker
            .set_targets(dns, Some(fast(udp(b"ping", true))), &[addr])
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.try_recv().is_err());
        let status = checker.status(&dns, addr).unwrap();
        assert!(
            status.healthy && status.last_result.starts_with("ok udp reply"),
            "{status:?}"
        );

        server.stop().await;
        let event = next_event(&mut rx).await;
        assert_eq!((event.backend, event.healthy), (addr, false));
        assert_eq!(event.detail, "port unreachable");

        let server = UdpServer::start(addr, true).await;
        let event = next_event(&mut rx).await;
        assert!(event.healthy);
        server.stop().await;
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 2000 OK"), None);
    }

    #[tokio::test]
    async fn tcp_target_goes_down_and_comes_back() {
        let server = Server::start("127.0.0.1:0".parse().unwrap(), None).await;
        let addr = server.addr;
        let (tx, mut rx) = mpsc::channel(16);
        let mut checker = HealthChecker::new(tx);
        checker
            .set_targets(vip(), Some(fast(Probe::Tcp)), &[addr])
            .unwrap();
        assert!(checker.status(&vip(), addr).unwrap().healthy);

        // Up: stays healthy and sends nothing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.try_recv().is_err());
        let status = checker.status(&vip(), addr).unwrap();
        assert!(status.healthy);
        assert!(status.consecutive_ok >= 2, "{status:?}");
        assert!(status.last_result.starts_with("ok "), "{status:?}");
        assert!(status.last_checked_unix_ms > 0);

        // Down after `fall` refused connects.
        server.stop().await;
        let event = next_event(&mut rx).await;
        assert_eq!(
            (event.vip, event.backend, event.healthy),
            (vip(), addr, false)
        );
        assert_eq!(event.detail, "connect refused");
        let status = checker.status(&vip(), addr).unwrap();
        assert!(!status.healthy);
        assert!(status.consecutive_fail >= 2);
        assert!(!checker.is_healthy(&vip(), addr));

        // Back after `rise` successes.
        let server = Server::start(addr, None).await;
        let event = next_event(&mut rx).await;
        assert!(event.healthy);
        assert!(checker.is_healthy(&vip(), addr));
        server.stop().await;
    }

    #[tokio::test]
    async fn http_targets_are_judged_by_status() {
        let good = Server::start("127.0.0.1:0".parse().unwrap(), Some(200)).await;
        let bad = Server::start("127.0.0.1:0".parse().unwrap(), Some(503)).await;
        let (tx, mut rx) = mpsc::channel(16);
        let mut checker = HealthChecker::new(tx);
        let spec = fast(Probe::Http {
            path: "/healthz".into(),
            expect_status: 200,
        });
        checker
            .set_targets(vip(), Some(spec), &[good.addr, bad.addr])
            .unwrap();

        let event = next_event(&mut rx).await;
        assert_eq!((event.backend, event.healthy), (bad.addr, false));
        assert_eq!(event.detail, "http 503 (expected 200)");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "the 200 backend must not flip");
        let status = checker.status(&vip(), good.addr).unwrap();
        assert!(status.healthy);
        assert!(status.last_result.starts_with("ok http 200"), "{status:?}");
        assert_eq!(
            checker
                .statuses()
                .iter()
                .filter(|(_, _, s)| s.healthy)
                .count(),
            1
        );
        good.stop().await;
        bad.stop().await;
    }

    #[tokio::test]
    async fn removed_targets_stop_probing() {
        let kept = Server::start("127.0.0.1:0".parse().unwrap(), None).await;
        let dropped = Server::start("127.0.0.1:0".parse().unwrap(), None).await;
        let (tx, mut rx) = mpsc::channel(16);
        let mut checker = HealthChecker::new(tx);
        let spec = Some(fast(Probe::Tcp));
        checker
            .set_targets(vip(), spec.clone(), &[kept.addr, dropped.addr])
            .unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(checker.status(&vip(), dropped.addr).unwrap().consecutive_ok >= 1);

        checker.set_targets(vip(), spec, &[kept.addr]).unwrap();
        assert_eq!(checker.status(&vip(), dropped.addr), None);
        assert!(checker.is_healthy(&vip(), dropped.addr));
        // Had its task survived, closing its listener would flip it within ~100 ms.
        let dropped_addr = dropped.addr;
        dropped.stop().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(rx.try_recv().is_err());

        // Turning checks off for the VIP stops the rest the same way.
        checker.set_targets(vip(), None, &[kept.addr]).unwrap();
        assert!(checker.statuses().is_empty());
        kept.stop().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.try_recv().is_err());
        assert!(checker.is_healthy(&vip(), dropped_addr));
    }

    #[tokio::test]
    async fn unanswered_probes_time_out() {
        // A listener that never accepts still completes handshakes (backlog), so use an
        // HTTP probe against a peer that never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spec = fast(Probe::Http {
            path: "/".into(),
            expect_status: 200,
        });
        let result = probe(addr, &spec).await;
        assert_eq!(result, Err("timed out after 40 ms".to_owned()));
        drop(listener);
    }
}
