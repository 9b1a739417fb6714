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
//!
//! The specs, their validation and the rise/fall state machine live in `xlb_core::health`;
//! this module runs the probes.

use std::{
    collections::HashMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    Request,
    header::{HOST, USER_AGENT},
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpStream, UdpSocket},
    sync::mpsc,
    task::JoinHandle,
    time::{MissedTickBehavior, timeout},
};
pub use xlb_core::health::{
    HealthSpec, HealthSpecError, HealthStatus, HealthTracker, MAX_UDP_PAYLOAD,
    MIN_SILENT_UDP_INTERVAL_MS, Probe, Transition, decode_hex,
};
use xlb_core::model::VipSpec;

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
    healthy: bool,
    task_id: u64,
    shared: Shared,
    events: mpsc::Sender<HealthEvent>,
) {
    let mut ticks = tokio::time::interval(spec.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut tracker = HealthTracker::new(&spec, healthy);
    loop {
        ticks.tick().await;
        let outcome = probe(backend, &spec).await;
        let flips = tracker.observe(outcome, unix_ms()).is_some();
        // Reserve channel room before taking the lock, so the status change and its event
        // are published together (or, if the target was stopped meanwhile, neither is).
        let permit = if flips {
            events.reserve().await.ok()
        } else {
            None
        };
        let status = tracker.status().clone();
        let (healthy, detail) = (status.healthy, status.last_result.clone());
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
        let stream = TcpStream::connect(backend)
            .await
            .map_err(|e| connect_error(&e))?;
        match &spec.probe {
            Probe::Tcp => Ok(format!("ok {}", elapsed_ms(start))),
            Probe::Udp { .. } => unreachable!("UDP probes are sent by udp_probe"),
            Probe::Http {
                path,
                expect_status,
                host,
            } => {
                let host = host.clone().unwrap_or_else(|| backend.to_string());
                let status = http_status(stream, &host, path).await?;
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

/// Longest response head read before giving up on a peer: hyper's smallest buffer, ample
/// for a status line and the headers of a health endpoint.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// `GET path` over `stream` with HTTP/1.1 and `Host: host`: the response's status, or why
/// there is none. The caller bounds the time; only the head is read, then the connection is
/// closed.
async fn http_status(stream: TcpStream, host: &str, path: &str) -> Result<u16, String> {
    let request = Request::get(path)
        .header(HOST, host)
        .header(USER_AGENT, "xlb-health")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .title_case_headers(true)
        .max_buf_size(MAX_RESPONSE_HEAD)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http_error(&e))?;
    let mut connection = Box::pin(connection);
    let mut response = std::pin::pin!(sender.send_request(request));
    // The connection does the I/O and must be polled while the request waits on it. It may
    // end in the same poll that hands the response over (the backend closed after it), so
    // once it has ended, the request's own result says what happened.
    let response = tokio::select! {
        biased;
        response = &mut response => response,
        _ended = &mut connection => {
            drop(connection);
            response.await
        }
    };
    response
        .map(|r| r.status().as_u16())
        .map_err(|e| http_error(&e))
}

fn http_error(e: &hyper::Error) -> String {
    if e.is_incomplete_message() {
        "closed without a response".to_owned()
    } else if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        "no HTTP response".to_owned()
    } else {
        format!("http request failed: {e}")
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
        sync::mpsc::Receiver,
    };

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

    fn udp(payload: &[u8], expect_reply: bool) -> Probe {
        Probe::Udp {
            payload: payload.to_vec(),
            expect_reply,
        }
    }

    #[test]
    fn the_checker_refuses_a_probe_of_another_protocol() {
        // A state file written before the check could hold one.
        let dns: VipSpec = "192.0.2.53:53/udp".parse().unwrap();
        let tcp_spec = HealthSpec::default();
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

    /// Accepts one connection, answers it with `reply` and returns the request head.
    async fn answer_once(listener: TcpListener, reply: &'static [u8]) -> String {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut chunk = [0_u8; 1024];
        while !head.ends_with(b"\r\n\r\n") {
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed mid-request");
            head.extend_from_slice(&chunk[..n]);
        }
        conn.write_all(reply).await.unwrap();
        String::from_utf8(head).unwrap()
    }

    /// Probes a one-shot server answering `reply`: the probe's verdict and the request head
    /// the server saw.
    async fn http_exchange(
        reply: &'static [u8],
        host: Option<&str>,
    ) -> (SocketAddr, Result<String, String>, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(answer_once(listener, reply));
        let mut spec = fast(Probe::Http {
            path: "/healthz?full=1".into(),
            expect_status: 200,
            host: host.map(str::to_owned),
        });
        spec.timeout = Duration::from_secs(5);
        let verdict = probe(addr, &spec).await;
        let head = timeout(Duration::from_secs(5), server)
            .await
            .expect("the server saw the request")
            .unwrap();
        (addr, verdict, head)
    }

    #[tokio::test]
    async fn http_probes_send_http11_with_the_host_header() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (addr, verdict, head) = http_exchange(ok, None).await;
        assert!(
            verdict.as_ref().is_ok_and(|v| v.starts_with("ok http 200")),
            "{verdict:?}"
        );
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("GET /healthz?full=1 HTTP/1.1"));
        let headers: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
        assert!(
            headers.contains(&format!("Host: {addr}").as_str()),
            "{head}"
        );
        assert!(headers.contains(&"User-Agent: xlb-health"), "{head}");
        assert_eq!(
            headers
                .iter()
                .filter(|h| h.to_ascii_lowercase().starts_with("host:"))
                .count(),
            1,
            "{head}"
        );

        let (_, verdict, head) = http_exchange(ok, Some("web.example:8080")).await;
        assert!(verdict.is_ok(), "{verdict:?}");
        assert!(head.contains("\r\nHost: web.example:8080\r\n"), "{head}");
        assert!(!head.contains(&format!("Host: {addr}")), "{head}");
    }

    #[tokio::test]
    async fn http_probes_judge_what_comes_back() {
        let cases: [(&'static [u8], Result<&str, &str>); 4] = [
            (b"HTTP/1.0 200 Fine\r\n\r\n", Ok("ok http 200")),
            (
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
                Err("http 503 (expected 200)"),
            ),
            (b"SSH-2.0-OpenSSH_9.6\r\n", Err("no HTTP response")),
            (b"", Err("closed without a response")),
        ];
        for (reply, expected) in cases {
            let (_, verdict, _) = http_exchange(reply, None).await;
            match expected {
                Ok(prefix) => assert!(
                    verdict.as_ref().is_ok_and(|v| v.starts_with(prefix)),
                    "{reply:?}: {verdict:?}"
                ),
                Err(detail) => assert_eq!(verdict, Err(detail.to_owned()), "{reply:?}"),
            }
        }
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
            host: None,
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
            host: None,
        });
        let result = probe(addr, &spec).await;
        assert_eq!(result, Err("timed out after 40 ms".to_owned()));
        drop(listener);
    }
}
