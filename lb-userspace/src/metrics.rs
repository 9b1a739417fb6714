//! Prometheus metrics: the agent's counters in the OpenMetrics text format, and a small HTTP
//! endpoint to scrape them from, so xlb drops into an existing Prometheus/Grafana setup
//! without a sidecar exporter.
//!
//! Counters are exported as the data plane holds them (monotonic since the VIP or backend was
//! added); Prometheus' `rate()` takes care of resets when an entry is re-added.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{ALLOW, CONTENT_TYPE as CONTENT_TYPE_HEADER, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Notify, Semaphore},
    time::timeout,
};

use crate::{
    api::Stats,
    balancer::{BackendState, VipSpec},
};

/// What `render` produces; scrapers negotiate on it.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipLabels {
    vip: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForwardingLabels {
    vip: String,
    /// `nat`, `ipip` or `gue`.
    forwarding: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    vip: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

/// Registers a metric family. `help` has no final period: the encoder adds one.
fn family<L, M>(registry: &mut Registry, name: &str, help: &str) -> Family<L, M>
where
    L: EncodeLabelSet + Clone + Eq + std::hash::Hash + std::fmt::Debug + Send + Sync + 'static,
    M: Default + prometheus_client::metrics::TypedMetric,
    Family<L, M>: prometheus_client::registry::Metric,
{
    let family = Family::<L, M>::default();
    registry.register(name, help, family.clone());
    family
}

/// Renders one scrape from a stats snapshot and the health checker's verdicts.
///
/// `health` lists the checked backends; a backend missing from it is reported up, because
/// without health checks xlb sends it traffic as if it were.
///
/// # Panics
/// Never: encoding into a `String` cannot fail.
#[must_use]
pub fn render(stats: &Stats, health: &[(VipSpec, SocketAddr, bool)]) -> String {
    let mut registry = Registry::default();

    let vip_packets: Family<VipLabels, Counter> = family(
        &mut registry,
        "xlb_vip_packets",
        "Packets the data plane forwarded for a VIP",
    );
    let vip_bytes: Family<VipLabels, Counter> = family(
        &mut registry,
        "xlb_vip_bytes",
        "Bytes the data plane forwarded for a VIP",
    );
    let vip_flows: Family<VipLabels, Counter> = family(
        &mut registry,
        "xlb_vip_new_flows",
        "Flows a VIP assigned to a backend for the first time",
    );
    let vip_ring: Family<VipLabels, Gauge> = family(
        &mut registry,
        "xlb_vip_ring_size",
        "Slots in the VIP's live Maglev ring (0 when no backend is active)",
    );
    let vip_forwarding: Family<ForwardingLabels, Gauge> = family(
        &mut registry,
        "xlb_vip_forwarding",
        "1, labelled with how the VIP reaches its backends: nat, or ipip or gue (direct server return)",
    );
    let packets: Family<BackendLabels, Counter> = family(
        &mut registry,
        "xlb_packets",
        "Packets the data plane forwarded to a backend",
    );
    let bytes: Family<BackendLabels, Counter> = family(
        &mut registry,
        "xlb_bytes",
        "Bytes the data plane forwarded to a backend",
    );
    let flows: Family<BackendLabels, Counter> = family(
        &mut registry,
        "xlb_new_flows",
        "New flows the data plane assigned to a backend",
    );
    let up: Family<BackendLabels, Gauge> = family(
        &mut registry,
        "xlb_backend_up",
        "1 if the backend passes its health checks (or has none), 0 if it failed them",
    );
    let weight: Family<BackendLabels, Gauge> = family(
        &mut registry,
        "xlb_backend_weight",
        "The backend's configured Maglev weight",
    );
    let draining: Family<BackendLabels, Gauge> = family(
        &mut registry,
        "xlb_backend_draining",
        "1 if the backend is draining: it keeps its established flows but gets no new ones",
    );
    let slots: Family<BackendLabels, Gauge> = family(
        &mut registry,
        "xlb_backend_ring_slots",
        "Slots the backend owns in its VIP's live Maglev ring",
    );
    let actions: Family<ActionLabels, Counter> = family(
        &mut registry,
        "xlb_xdp_actions",
        "Packets by the XDP verdict the program returned",
    );
    let events: Family<EventLabels, Counter> = family(
        &mut registry,
        "xlb_events",
        "Data-plane events by kind (malformed, fragment, conntrack_hit, ...)",
    );

    let verdicts: HashMap<(VipSpec, SocketAddr), bool> =
        health.iter().map(|(v, b, ok)| ((*v, *b), *ok)).collect();
    for vip in &stats.vips {
        let vl = VipLabels {
            vip: vip.vip.to_string(),
        };
        vip_packets.get_or_create(&vl).inc_by(vip.packets);
        vip_bytes.get_or_create(&vl).inc_by(vip.bytes);
        vip_flows.get_or_create(&vl).inc_by(vip.new_flows);
        vip_ring.get_or_create(&vl).set(i64::from(vip.ring_size));
        vip_forwarding
            .get_or_create(&ForwardingLabels {
                vip: vl.vip.clone(),
                forwarding: vip.forwarding.to_string(),
            })
            .set(1);
        for b in &vip.backends {
            let bl = BackendLabels {
                vip: vl.vip.clone(),
                backend: b.addr.to_string(),
            };
            packets.get_or_create(&bl).inc_by(b.packets);
            bytes.get_or_create(&bl).inc_by(b.bytes);
            flows.get_or_create(&bl).inc_by(b.new_flows);
            let healthy = verdicts.get(&(vip.vip, b.addr)).copied().unwrap_or(true);
            up.get_or_create(&bl).set(i64::from(healthy));
            weight.get_or_create(&bl).set(i64::from(b.weight));
            draining
                .get_or_create(&bl)
                .set(i64::from(b.state == BackendState::Draining));
            slots.get_or_create(&bl).set(i64::from(b.slots));
        }
    }
    for counter in &stats.global {
        match counter.name.strip_prefix("xdp_") {
            Some(action) => actions
                .get_or_create(&ActionLabels {
                    action: action.to_owned(),
                })
                .inc_by(counter.value),
            None => events
                .get_or_create(&EventLabels {
                    event: counter.name.clone(),
                })
                .inc_by(counter.value),
        };
    }
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error(
        "cannot listen for metrics on {addr} (is another exporter on that port? choose another address for the metrics endpoint)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Connections served at once. Beyond it, the oldest connection that has not sent its
/// request yet makes room; a new one is closed at once only when all are busy being answered.
const MAX_CONNECTIONS: usize = 64;
/// Largest request head accepted (hyper answers 431 beyond it): a scrape is one short line
/// and a few headers. Hyper's smallest allowed buffer.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the reply.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A scrape rendered this recently is served again: a flood of scrapes renders (and takes
/// the agent's lock) at most this often, so the control socket stays responsive.
const RENDER_REUSE: Duration = Duration::from_millis(100);
/// First pause after a failed `accept`, doubled on each failure in a row up to the maximum.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// At most one warning per this interval for a repeating accept error or refusal.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The connections still waiting for their request head, oldest first: the ones that may be
/// closed to make room.
#[derive(Default)]
struct Waiting {
    next_id: u64,
    queue: VecDeque<(u64, Arc<Notify>)>,
}

impl Waiting {
    fn push(&mut self) -> (u64, Arc<Notify>) {
        let id = self.next_id;
        self.next_id += 1;
        let evict = Arc::new(Notify::new());
        self.queue.push_back((id, Arc::clone(&evict)));
        (id, evict)
    }

    fn remove(&mut self, id: u64) {
        self.queue.retain(|(i, _)| *i != id);
    }

    /// Tells the oldest waiting connection to close; false if there is none.
    fn evict_oldest(&mut self) -> bool {
        self.queue.pop_front().is_some_and(|(_, evict)| {
            evict.notify_one();
            true
        })
    }
}

/// Renders scrapes off the async runtime (the source takes the agent's lock), one at a time,
/// reusing a render younger than [`RENDER_REUSE`].
struct Renderer {
    source: Arc<dyn Fn() -> String + Send + Sync>,
    last: tokio::sync::Mutex<Option<(Instant, Bytes)>>,
}

impl Renderer {
    async fn render(&self) -> Bytes {
        let mut last = self.last.lock().await;
        if let Some((at, body)) = &*last
            && at.elapsed() < RENDER_REUSE
        {
            return body.clone();
        }
        let source = Arc::clone(&self.source);
        let body = Bytes::from(
            tokio::task::spawn_blocking(move || source())
                .await
                .unwrap_or_default(),
        );
        *last = Some((Instant::now(), body.clone()));
        body
    }
}

/// The metrics endpoint, bound but not yet serving: binding separately lets the agent fail
/// at start-up (not in a background task) when the address is taken.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Binds exactly `addr`: the endpoint is unauthenticated, so where it listens is the
    /// operator's call (the CLI's default is loopback).
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self { listener })
    }

    /// Where it listens, for a bind to port 0.
    ///
    /// # Panics
    /// Never in practice: a bound socket has a local address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Answers `GET /metrics` with what `source` renders, forever. `source` runs on the
    /// blocking pool, at most once per [`RENDER_REUSE`].
    pub async fn run(self, source: impl Fn() -> String + Send + Sync + 'static) {
        let renderer = Arc::new(Renderer {
            source: Arc::new(source),
            last: tokio::sync::Mutex::new(None),
        });
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let mut backoff = ACCEPT_BACKOFF;
        let mut last_warning: Option<Instant> = None;
        let mut last_refusal: Option<Instant> = None;
        tracing::info!(addr = %self.local_addr(), "serving metrics at /metrics");
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF;
                    accepted
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin, and
                    // say so now and then rather than on every attempt.
                    if last_warning.is_none_or(|t| t.elapsed() > LOG_INTERVAL) {
                        tracing::warn!(error = %e, "accepting a metrics connection failed (backing off)");
                        last_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            let permit = match Arc::clone(&slots).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let evicted = lock_waiting(&waiting).evict_oldest();
                    let freed = if evicted {
                        // The evicted connection hands its slot back as soon as it wakes.
                        timeout(Duration::from_secs(1), Arc::clone(&slots).acquire_owned())
                            .await
                            .ok()
                            .and_then(Result::ok)
                    } else {
                        None
                    };
                    let Some(permit) = freed else {
                        if last_refusal.is_none_or(|t| t.elapsed() > LOG_INTERVAL) {
                            tracing::warn!(%peer, "closed a metrics connection: {MAX_CONNECTIONS} scrapes are being answered");
                            last_refusal = Some(Instant::now());
                        }
                        continue;
                    };
                    permit
                }
            };
            let (id, evict) = lock_waiting(&waiting).push();
            let renderer = Arc::clone(&renderer);
            let waiting = Arc::clone(&waiting);
            tokio::spawn(async move {
                let served = serve_connection(stream, renderer, &waiting, id, &evict).await;
                lock_waiting(&waiting).remove(id);
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "metrics connection failed");
                }
                drop(permit);
            });
        }
    }
}

fn lock_waiting(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Binds `addr` and serves metrics from `source` until the task is dropped.
///
/// # Errors
/// The address cannot be bound; once serving, it does not return.
pub async fn serve(
    addr: SocketAddr,
    source: impl Fn() -> String + Send + Sync + 'static,
) -> Result<(), MetricsError> {
    MetricsServer::bind(addr).await?.run(source).await;
    Ok(())
}

/// Serves one request on `stream` with hyper, then closes. A scrape is one request per
/// interval, so keep-alive would only let idle clients hold slots for longer.
async fn serve_connection(
    stream: TcpStream,
    renderer: Arc<Renderer>,
    waiting: &Arc<Mutex<Waiting>>,
    id: u64,
    evict: &Notify,
) -> Result<(), hyper::Error> {
    // A second descriptor of the same socket outlives hyper's: see `linger`.
    let lingering = stream.into_std().and_then(|s| {
        let copy = s.try_clone()?;
        Ok((TcpStream::from_std(s)?, copy))
    });
    let Ok((stream, lingering)) = lingering else {
        return Ok(());
    };
    let service = {
        let waiting = Arc::clone(waiting);
        service_fn(move |request| {
            // The head is in: this connection is being answered and may no longer be evicted.
            lock_waiting(&waiting).remove(id);
            let renderer = Arc::clone(&renderer);
            async move { Ok::<_, Infallible>(respond(&request, &renderer).await) }
        })
    };
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST)
        .keep_alive(false)
        .title_case_headers(true)
        .serve_connection(TokioIo::new(stream), service);
    let served = tokio::select! {
        () = evict.notified() => return Ok(()),
        served = timeout(HEADER_TIMEOUT + WRITE_TIMEOUT, connection) => match served {
            Err(_) => return Ok(()),
            Ok(served) => served,
        },
    };
    if let Err(e) = &served
        && e.is_parse_too_large()
    {
        linger(lingering).await;
    }
    served
}

/// Closing a socket with unread input resets the connection, which can destroy the reply
/// (hyper's 431) before the client reads it: end our side, then swallow a bounded amount of
/// what the client still sends before the last descriptor closes.
async fn linger(socket: std::net::TcpStream) {
    let Ok(mut socket) = TcpStream::from_std(socket) else {
        return;
    };
    let _ = socket.shutdown().await;
    let mut chunk = [0_u8; 1024];
    let mut drained = 0;
    while drained < 8 * MAX_REQUEST {
        match timeout(Duration::from_secs(1), socket.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
}

async fn respond(request: &Request<Incoming>, renderer: &Renderer) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "metrics are at /metrics\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    // Hyper leaves the body out of an answer to HEAD and keeps its length.
    let mut response = Response::new(Full::new(renderer.render().await));
    response
        .headers_mut()
        .insert(CONTENT_TYPE_HEADER, HeaderValue::from_static(CONTENT_TYPE));
    response
}

fn reply(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE_HEADER, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use prometheus_parse::{Scrape, Value};

    use super::*;
    use crate::{
        api::CounterValue,
        balancer::{BackendStatus, Forwarding, VipStatus},
    };

    fn stats() -> Stats {
        let backend = |addr: &str, id, state, packets| BackendStatus {
            addr: addr.parse().unwrap(),
            container: None,
            container_running: None,
            id,
            weight: id + 1,
            state,
            healthy: true,
            health: None,
            slots: if state == BackendState::Active { 30 } else { 0 },
            packets,
            bytes: packets * 100,
            new_flows: packets / 10,
            live_flows: None,
        };
        Stats {
            vips: vec![
                VipStatus {
                    vip: "192.0.2.10:80/tcp".parse().unwrap(),
                    id: 0,
                    ring_size: 61,
                    idle_timeout_s: 300,
                    forwarding: Forwarding::Nat,
                    health_check: None,
                    packets: 300,
                    bytes: 30_000,
                    new_flows: 30,
                    backends: vec![
                        backend("10.0.0.2:8080", 0, BackendState::Active, 100),
                        backend("10.0.0.3:8080", 1, BackendState::Draining, 200),
                    ],
                },
                VipStatus {
                    vip: "[2001:db8::1]:443/udp".parse().unwrap(),
                    id: 1,
                    ring_size: 61,
                    idle_timeout_s: 60,
                    forwarding: Forwarding::Gue,
                    health_check: None,
                    packets: 7,
                    bytes: 700,
                    new_flows: 1,
                    backends: vec![backend("[fd00::2]:8443", 2, BackendState::Active, 7)],
                },
            ],
            global: vec![
                CounterValue {
                    name: "xdp_pass".into(),
                    value: 5,
                },
                CounterValue {
                    name: "xdp_tx".into(),
                    value: 307,
                },
                CounterValue {
                    name: "malformed".into(),
                    value: 2,
                },
                CounterValue {
                    name: "conntrack_hit".into(),
                    value: 250,
                },
            ],
        }
    }

    fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == metric
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                    && s.labels.len() == labels.len()
            })
            .unwrap_or_else(|| panic!("no sample {metric}{labels:?}"));
        match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => panic!("unexpected value type for {metric}"),
        }
    }

    #[test]
    fn renders_parseable_exposition() {
        let vip: VipSpec = "192.0.2.10:80/tcp".parse().unwrap();
        let text = render(&stats(), &[(vip, "10.0.0.3:8080".parse().unwrap(), false)]);
        if std::env::var_os("XLB_SHOW_METRICS").is_some() {
            println!("{text}");
        }
        assert!(text.contains("# TYPE xlb_packets counter"), "{text}");
        assert!(text.contains("# HELP xlb_backend_up "), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();

        let v4 = [("vip", "192.0.2.10:80/tcp"), ("backend", "10.0.0.2:8080")];
        let drained = [("vip", "192.0.2.10:80/tcp"), ("backend", "10.0.0.3:8080")];
        let v6 = [
            ("vip", "[2001:db8::1]:443/udp"),
            ("backend", "[fd00::2]:8443"),
        ];
        assert_eq!(value(&scrape, "xlb_packets_total", &v4), 100.0);
        assert_eq!(value(&scrape, "xlb_bytes_total", &drained), 20_000.0);
        assert_eq!(value(&scrape, "xlb_new_flows_total", &v6), 0.0);
        assert_eq!(value(&scrape, "xlb_backend_up", &v4), 1.0);
        assert_eq!(value(&scrape, "xlb_backend_up", &drained), 0.0);
        assert_eq!(value(&scrape, "xlb_backend_up", &v6), 1.0);
        assert_eq!(value(&scrape, "xlb_backend_weight", &v6), 3.0);
        assert_eq!(value(&scrape, "xlb_backend_draining", &drained), 1.0);
        assert_eq!(value(&scrape, "xlb_backend_ring_slots", &v4), 30.0);
        let vip4 = [("vip", "192.0.2.10:80/tcp")];
        assert_eq!(value(&scrape, "xlb_vip_packets_total", &vip4), 300.0);
        assert_eq!(value(&scrape, "xlb_vip_bytes_total", &vip4), 30_000.0);
        assert_eq!(value(&scrape, "xlb_vip_ring_size", &vip4), 61.0);
        let forwarding = |vip, method| [("vip", vip), ("forwarding", method)];
        assert_eq!(
            value(
                &scrape,
                "xlb_vip_forwarding",
                &forwarding("192.0.2.10:80/tcp", "nat")
            ),
            1.0
        );
        assert_eq!(
            value(
                &scrape,
                "xlb_vip_forwarding",
                &forwarding("[2001:db8::1]:443/udp", "gue")
            ),
            1.0
        );
        assert_eq!(
            value(&scrape, "xlb_xdp_actions_total", &[("action", "tx")]),
            307.0
        );
        assert_eq!(
            value(&scrape, "xlb_xdp_actions_total", &[("action", "pass")]),
            5.0
        );
        assert_eq!(
            value(&scrape, "xlb_events_total", &[("event", "conntrack_hit")]),
            250.0
        );
        assert_eq!(
            value(&scrape, "xlb_events_total", &[("event", "malformed")]),
            2.0
        );
        assert!(
            !scrape
                .samples
                .iter()
                .any(|s| s.metric == "xlb_events_total" && s.labels.get("event") == Some("xdp_tx"))
        );
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await
            .expect("the server answers and closes")
            .unwrap();
        response
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr();
        let task = tokio::spawn(server.run(|| render(&stats(), &[])));

        let response = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Type: {CONTENT_TYPE}")),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(
            body.contains(
                "xlb_packets_total{vip=\"192.0.2.10:80/tcp\",backend=\"10.0.0.2:8080\"} 100"
            ),
            "{body}"
        );

        // Several clients at once: the first, still sending its request, blocks nobody.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /met").await.unwrap();
        let many: Vec<_> = (0..8)
            .map(|_| tokio::spawn(get(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n")))
            .collect();
        for r in many {
            // Hyper answers an HTTP/1.0 request in HTTP/1.0.
            let response = r.await.unwrap();
            assert!(response.starts_with("HTTP/1.0 200 OK"), "{response}");
        }
        drop(slow);

        let response = get(addr, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 404 Not Found"), "{response}");
        let response = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 405"), "{response}");
        assert!(response.contains("\r\nAllow: GET, HEAD\r\n"), "{response}");
        let response = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200 OK") && response.ends_with("\r\n\r\n"));
        assert!(
            response.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
            "HEAD announces the length GET sends: {response}"
        );
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // The server may close before reading everything; only the status matters.
        let _ = stream.write_all(huge.as_bytes()).await;
        let mut response = Vec::new();
        let _ = timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
        assert!(String::from_utf8_lossy(&response).starts_with("HTTP/1.1 431"));

        task.abort();
    }

    #[tokio::test]
    async fn idle_connections_do_not_block_a_scrape() {
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr();
        let task = tokio::spawn(server.run(|| render(&stats(), &[])));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 8 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let response = timeout(
            Duration::from_secs(2),
            get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await
        .expect("a scrape is answered while idle clients hold every slot");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        task.abort();
    }

    #[tokio::test]
    async fn bind_failures_name_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve(addr, String::new).await.unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
