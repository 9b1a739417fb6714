//! The soak test (issue 11): traffic, backend churn, health flaps, reloads and agent restarts
//! all at once, for `XLB_SOAK_SECS` seconds (default 60; the hour run is
//! `XLB_SOAK_SECS=3600 cargo test --release -p lb-userspace --test soak -- --nocapture`).
//!
//! ```text
//!   client 10.10.0.2 ──── 10.10.0.1 lb 10.11.i.1 ──── 10.11.i.2 backend i   (i < 6)
//! ```
//!
//! Three TCP VIPs with HTTP health checks. Backends 0 and 1 are the core: never removed, only
//! re-weighted. Backend 2 flaps: its `/healthz` answers 503 and 200 in turn, so it leaves its
//! VIPs' rings and rejoins them. Backends 3 to 5 churn: added, re-weighted, drained, made
//! active again and deleted, through the CLI or by editing the config file and `xlb reload`.
//! The agent runs with `--keep-attached --config FILE` and is restarted (SIGTERM, start again,
//! adopting the pinned data path) every [`restart_every`]. Meanwhile the client namespace
//! makes new connections (connect, a line echoed with the backend's name, close) and keeps
//! long-lived line-echo streams of 5 to 30 s to every VIP.
//!
//! Failures: a connection may fail only while its backend is legitimately taken away from it,
//! that is, between that backend's `backend del` on its VIP and its next `backend add`, or
//! between its health endpoint going down and its coming back plus the checks needed to see it
//! (a backend leaving the ring takes its flows with it, as documented). Every other failure
//! fails the test: to a backend that stays healthy, to a draining or re-weighted one, across
//! reloads and restarts. A connection that failed before its backend said its name counts as
//! excused only if its VIP had such a window open during its lifetime.
//!
//! Resources: each agent process's RSS and open file descriptors are sampled every
//! [`SAMPLE_EVERY`]; after a warm-up, each agent's last sample must stay within a bound of its
//! first, and the last agent's of the first agent's.
//!
//! Needs root. Namespaces, temp dirs and pins are unique to the test and torn down by guards.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};
use xlb_netns::{Netns, Topology};

mod common;
use common::{Agent, KeptPins, RaiseOnDrop, TempDir, backend_v4, require_root, xlb};

const NS_PREFIX: &str = "xsoak-";
const SUITE: &str = "soak";
const BACKENDS: usize = 6;
const CORE: [usize; 2] = [0, 1];
const FLAPPER: usize = 2;
const EXTRAS: [usize; 3] = [3, 4, 5];
const PORT: u16 = 8080;
const VIPS: [SocketAddrV4; 3] = [
    SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 1), 80),
    SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 2), 80),
    SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 3), 80),
];
/// A small prime ring keeps restarts and ring rebuilds quick.
const RING: &str = "1009";
const HEALTH_INTERVAL_MS: u64 = 500;
const HEALTH_TIMEOUT_MS: u64 = 300;
const HEALTH_RISE: u64 = 2;
const HEALTH_FALL: u64 = 2;
/// After the flapper's health endpoint comes back, how long its VIPs may still route its flows
/// away: `rise` checks plus a timeout and scheduling slack (a restart pauses the checks).
const HEALTH_SETTLE: Duration = Duration::from_secs(4);
const DEFAULT_SOAK: Duration = Duration::from_secs(60);
const CHURN_EVERY: Duration = Duration::from_secs(2);
/// Every this many churn operations, one is applied by editing the config and `xlb reload`.
const RELOAD_EVERY_NTH_OP: u64 = 4;
const FLAP_EVERY: Duration = Duration::from_secs(8);
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const NEW_CONNECTION_THREADS: usize = 2;
const STREAMS_PER_VIP: usize = 2;
const STREAM_LINE_EVERY: Duration = Duration::from_millis(50);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// An agent's resources are compared from its first sample after this much of its life.
const WARM_UP: Duration = Duration::from_secs(6);

/// How long the soak runs: `XLB_SOAK_SECS` or [`DEFAULT_SOAK`].
fn soak_duration() -> Duration {
    match std::env::var("XLB_SOAK_SECS") {
        Ok(s) => Duration::from_secs(
            s.parse()
                .unwrap_or_else(|e| panic!("XLB_SOAK_SECS={s:?} is not a number of seconds: {e}")),
        ),
        Err(_) => DEFAULT_SOAK,
    }
}

/// Four restarts in a short run, one every 10 minutes in the hour run.
fn restart_every(soak: Duration) -> Duration {
    (soak / 6).clamp(Duration::from_secs(12), Duration::from_secs(600))
}

/// The client's source address towards VIP `v`: one per VIP. Every backend serves several
/// VIPs on one port, and xlb rewrites only the destination, so a client that used one source
/// port towards two VIPs at once (Linux reuses an ephemeral port across destinations) would
/// present one 4-tuple for both connections at the backend, which then resets one of them.
/// That is a limit of destination-only NAT (see docs/reliability.md), not what the soak
/// measures.
fn client_addr(v: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, 0, 2 + u8::try_from(v).expect("few VIPs"))
}

fn backend_addr(i: usize) -> SocketAddr {
    backend_v4(i, PORT)
}

fn vip_spec(v: usize) -> String {
    format!("{}/tcp", VIPS[v])
}

// ---------------------------------------------------------------------------------------------
// Backends

/// Whether the flapper's `/healthz` answers 503.
static FLAPPER_DOWN: AtomicBool = AtomicBool::new(false);

/// A backend's TCP server: `GET …` is a health probe, `HELLO` starts the line echo, each line
/// answered with the backend's name in front. Connections run on detached threads (an hour of
/// probes and connections would otherwise pile up unjoined threads); the server waits for
/// them, bounded, when dropped.
struct Server {
    stop: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Netns, index: usize) -> Self {
        let addr = backend_addr(index);
        let listener = ns
            .run(move || TcpListener::bind(addr))
            .expect("entering the backend's namespace")
            .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&live));
        let accept = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (flag, count) = (Arc::clone(&flag), Arc::clone(&count));
                        count.fetch_add(1, Ordering::Relaxed);
                        thread::spawn(move || {
                            let _ = serve(conn, index, &flag);
                            count.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            stop,
            live,
            accept: Some(accept),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.live.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Reads a line, waiting through read timeouts until `stop`; `None` at EOF or on stop.
fn read_line(
    reader: &mut BufReader<TcpStream>,
    stop: &AtomicBool,
) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    loop {
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(None),
            Ok(_) if line.ends_with('\n') => return Ok(Some(line)),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn serve(conn: TcpStream, index: usize, stop: &AtomicBool) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let Some(first) = read_line(&mut reader, stop)? else {
        return Ok(());
    };
    if first.starts_with("GET ") {
        // Read the whole request head first: closing with unread bytes would send a reset.
        while let Some(line) = read_line(&mut reader, stop)? {
            if line.trim_end().is_empty() {
                break;
            }
        }
        let status = if index == FLAPPER && FLAPPER_DOWN.load(Ordering::Relaxed) {
            "503 Service Unavailable"
        } else {
            "200 OK"
        };
        writer.write_all(format!("HTTP/1.0 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())?;
        return writer.shutdown(Shutdown::Write);
    }
    if first != "HELLO\n" {
        return Err(std::io::Error::other(format!("unknown request {first:?}")));
    }
    writer.write_all(format!("b{index}\n").as_bytes())?;
    while let Some(line) = read_line(&mut reader, stop)? {
        writer.write_all(format!("b{index} {line}").as_bytes())?;
    }
    writer.shutdown(Shutdown::Write)
}

// ---------------------------------------------------------------------------------------------
// Clients

/// A connection that failed, for the verdict at the end.
#[derive(Debug)]
struct Failure {
    what: &'static str,
    vip: usize,
    /// The backend that said its name, if one did before the failure.
    backend: Option<usize>,
    started: Instant,
    failed: Instant,
    error: String,
}

#[derive(Default)]
struct Traffic {
    new_ok: AtomicU64,
    streams_ok: AtomicU64,
    lines: AtomicU64,
    failures: Mutex<Vec<Failure>>,
}

/// One client connection speaking the line protocol.
struct Line {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    backend: Option<usize>,
}

impl Line {
    fn open(vip: usize) -> Result<Self, (Option<usize>, String)> {
        let fail = |e: std::io::Error| (None, e.to_string());
        let connect = || -> std::io::Result<TcpStream> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            socket.bind(&SocketAddr::new(client_addr(vip).into(), 0).into())?;
            socket.connect_timeout(&SocketAddr::V4(VIPS[vip]).into(), CONNECT_TIMEOUT)?;
            Ok(socket.into())
        };
        let conn = connect().map_err(|e| (None, format!("connect: {e}")))?;
        conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(fail)?;
        conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(fail)?;
        let mut line = Self {
            writer: conn.try_clone().map_err(fail)?,
            reader: BufReader::new(conn),
            backend: None,
        };
        line.writer.write_all(b"HELLO\n").map_err(fail)?;
        let name = line.read()?;
        let index = name
            .trim_end()
            .strip_prefix('b')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| (None, format!("greeting {name:?}")))?;
        line.backend = Some(index);
        Ok(line)
    }

    fn read(&mut self) -> Result<String, (Option<usize>, String)> {
        let mut got = String::new();
        match self.reader.read_line(&mut got) {
            Ok(0) => Err((self.backend, "closed by the peer".to_owned())),
            Ok(_) => Ok(got),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let local = self
                    .writer
                    .local_addr()
                    .map_or_else(|e| e.to_string(), |a| a.to_string());
                Err((
                    self.backend,
                    format!("nothing for {IO_TIMEOUT:?} (client {local})"),
                ))
            }
            Err(e) => Err((self.backend, e.to_string())),
        }
    }

    /// Sends `text` and checks that the same backend echoes it.
    fn exchange(&mut self, text: &str) -> Result<(), (Option<usize>, String)> {
        self.writer
            .write_all(format!("{text}\n").as_bytes())
            .map_err(|e| (self.backend, format!("send: {e}")))?;
        let got = self.read()?;
        let want = format!("b{} {text}\n", self.backend.expect("greeted"));
        if got == want {
            Ok(())
        } else {
            Err((self.backend, format!("echo {got:?}, not {want:?}")))
        }
    }

    /// Shuts our side and expects the backend's orderly close.
    fn close(mut self) -> Result<(), (Option<usize>, String)> {
        self.writer
            .shutdown(Shutdown::Write)
            .map_err(|e| (self.backend, format!("shutdown: {e}")))?;
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) if rest.is_empty() => Ok(()),
            Ok(_) => Err((self.backend, format!("{} stray bytes at close", rest.len()))),
            Err(e) => Err((self.backend, format!("close: {e}"))),
        }
    }
}

fn record(
    traffic: &Traffic,
    what: &'static str,
    vip: usize,
    started: Instant,
    e: (Option<usize>, String),
) {
    traffic.failures.lock().expect("lock").push(Failure {
        what,
        vip,
        backend: e.0,
        started,
        failed: Instant::now(),
        error: e.1,
    });
}

fn new_connections(thread_index: usize, stop: &AtomicBool, traffic: &Traffic) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let vip = usize::try_from(n).expect("fits") % VIPS.len();
        let started = Instant::now();
        let result = Line::open(vip).and_then(|mut line| {
            line.exchange(&format!("new {thread_index} {n}"))?;
            line.close()
        });
        match result {
            Ok(()) => {
                traffic.new_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => record(traffic, "new connection", vip, started, e),
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Long-lived streams to `vip`, one after the other, each 5 to 30 s of a line every 50 ms.
fn streams(vip: usize, seed: u64, stop: &AtomicBool, traffic: &Traffic) {
    let mut k = seed;
    while !stop.load(Ordering::Relaxed) {
        k = k
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let lifetime = Duration::from_secs(5 + (k >> 33) % 26);
        let started = Instant::now();
        let result = Line::open(vip).and_then(|mut line| {
            let mut sent = 0u64;
            while started.elapsed() < lifetime && !stop.load(Ordering::Relaxed) {
                sent += 1;
                line.exchange(&format!("stream {vip} {seed} {sent}"))?;
                traffic.lines.fetch_add(1, Ordering::Relaxed);
                thread::sleep(STREAM_LINE_EVERY);
            }
            line.close()
        });
        match result {
            Ok(()) => {
                traffic.streams_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => record(traffic, "stream", vip, started, e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the agent should hold, and the windows in which a backend's flows may break

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Backend {
    weight: u32,
    draining: bool,
}

/// The desired state: per VIP, backend index to its settings. Written as the config file.
#[derive(Clone, Debug)]
struct Model {
    vips: [BTreeMap<usize, Backend>; 3],
}

impl Model {
    fn initial() -> Self {
        let active = |weight| Backend {
            weight,
            draining: false,
        };
        Self {
            vips: [
                BTreeMap::from([
                    (0, active(1)),
                    (1, active(1)),
                    (FLAPPER, active(1)),
                    (3, active(1)),
                ]),
                BTreeMap::from([(0, active(2)), (1, active(1)), (FLAPPER, active(1))]),
                BTreeMap::from([(0, active(1)), (1, active(1)), (4, active(1))]),
            ],
        }
    }

    fn config(&self) -> String {
        let mut text = String::from("# xlb soak test: rewritten before every reload and restart\n");
        for (v, backends) in self.vips.iter().enumerate() {
            let _ = write!(
                text,
                "\n[[vip]]\naddress = \"{}\"\n\n[vip.health]\nprobe = \"http\"\npath = \
                 \"/healthz\"\nexpect_status = 200\ninterval_ms = {HEALTH_INTERVAL_MS}\n\
                 timeout_ms = {HEALTH_TIMEOUT_MS}\nrise = {HEALTH_RISE}\nfall = {HEALTH_FALL}\n",
                vip_spec(v)
            );
            for (i, b) in backends {
                let state = if b.draining { "draining" } else { "active" };
                let _ = write!(
                    text,
                    "\n[[vip.backend]]\naddress = \"{}\"\nweight = {}\nstate = \"{state}\"\n",
                    backend_addr(*i),
                    b.weight
                );
            }
        }
        text
    }
}

/// A span in which the flows of `backend` on `vip` may legitimately break.
#[derive(Debug)]
struct Window {
    vip: usize,
    backend: usize,
    from: Instant,
    to: Option<Instant>,
    why: &'static str,
}

impl Window {
    fn overlaps(&self, from: Instant, to: Instant) -> bool {
        self.from <= to && self.to.is_none_or(|end| end >= from)
    }
}

fn excused(failure: &Failure, windows: &[Window]) -> Option<&'static str> {
    windows
        .iter()
        .filter(|w| w.vip == failure.vip && failure.backend.is_none_or(|b| b == w.backend))
        .find(|w| w.overlaps(failure.started, failure.failed))
        .map(|w| w.why)
}

// ---------------------------------------------------------------------------------------------
// The agent

struct Lab {
    topology: Topology,
    dir: TempDir,
    config: PathBuf,
    ifaces: Vec<String>,
}

impl Lab {
    fn ns(&self) -> &Netns {
        self.topology.lb()
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("xlb.sock")
    }

    /// A kept-attached agent on the lab's config, pinning under `pins`.
    fn start_agent(&self, pins: &Path) -> Agent<'_> {
        Agent::in_ns(self.ns(), SUITE)
            .ifaces(&self.ifaces)
            .dir(&self.dir.0)
            .bpffs(pins)
            .args(["--keep-attached", "--no-metrics", "--ring-size", RING])
            .config(&self.config)
            .start_limit(Duration::from_secs(20))
            .start()
    }

    fn cli(&self, args: &[&str]) -> String {
        common::ok(self.ns(), &self.socket(), args)
    }

    /// The agent's backends of VIP `v`: index to settings.
    fn backends(&self, v: usize) -> BTreeMap<usize, Backend> {
        let spec = vip_spec(v);
        let list: Value = common::json(
            self.ns(),
            &self.socket(),
            &["backend", "list", &spec, "--json"],
        );
        list["backends"]
            .as_array()
            .unwrap_or_else(|| panic!("no backends in {list:#}"))
            .iter()
            .map(|b| {
                let addr = b["addr"].as_str().expect("addr");
                let index = (0..BACKENDS)
                    .find(|i| backend_addr(*i).to_string() == addr)
                    .unwrap_or_else(|| panic!("unknown backend {addr}"));
                let weight = b["weight"].as_u64().expect("weight");
                (
                    index,
                    Backend {
                        weight: u32::try_from(weight).expect("weight fits"),
                        draining: b["state"] == "draining",
                    },
                )
            })
            .collect()
    }

    fn assert_holds(&self, model: &Model, when: &str) {
        for (v, wanted) in model.vips.iter().enumerate() {
            assert_eq!(&self.backends(v), wanted, "{when}: VIP {}", VIPS[v]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resources

#[derive(Clone, Copy, Debug)]
struct Sample {
    generation: usize,
    /// Since the soak started.
    at: Duration,
    /// Since this agent started.
    age: Duration,
    rss_kib: u64,
    fds: usize,
}

fn sample(pid: u32) -> (u64, usize) {
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).expect("reading the agent's status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("listing the agent's fds")
        .count();
    (rss_kib, fds)
}

/// RSS may grow by a quarter or 4 MiB, whichever is more; fds by a few (a CLI connection or
/// a health probe in flight when sampled).
fn rss_bound(base_kib: u64) -> u64 {
    base_kib + (base_kib / 4).max(4096)
}
const FD_SLACK: usize = 6;

// ---------------------------------------------------------------------------------------------
// The soak

#[derive(Default, Debug)]
struct Ops {
    cli: u64,
    reloads: u64,
    adds: u64,
    dels: u64,
    drains: u64,
    activations: u64,
    weights: u64,
    flaps: u64,
    restarts: u64,
}

/// One churn operation on the model, chosen by `n`; returns the CLI arguments that apply it
/// and the window it opens or closes.
fn churn(model: &mut Model, n: u64, ops: &mut Ops, windows: &Mutex<Vec<Window>>) -> Vec<String> {
    let v = usize::try_from(n % 3).expect("fits");
    let e = EXTRAS[usize::try_from((n / 3) % 3).expect("fits")];
    let spec = vip_spec(v);
    let addr = backend_addr(e).to_string();
    let weight = u32::try_from(1 + n % 4).expect("fits");
    let now = Instant::now();
    let backends = &mut model.vips[v];
    match backends.get(&e).copied() {
        None => {
            ops.adds += 1;
            backends.insert(
                e,
                Backend {
                    weight,
                    draining: false,
                },
            );
            for w in windows.lock().expect("lock").iter_mut() {
                if w.vip == v && w.backend == e && w.to.is_none() {
                    w.to = Some(now);
                }
            }
            vec![
                "backend".into(),
                "add".into(),
                spec,
                addr,
                "--weight".into(),
                weight.to_string(),
            ]
        }
        // Each (VIP, extra) pair comes up once in every 9 operations, so n / 9 counts its turns.
        Some(b) => match (b.draining, (n / 9) % if b.draining { 2 } else { 5 }) {
            (false, 0) => {
                ops.drains += 1;
                backends.insert(
                    e,
                    Backend {
                        draining: true,
                        ..b
                    },
                );
                vec!["backend".into(), "drain".into(), spec, addr]
            }
            (true, 0) => {
                ops.activations += 1;
                backends.insert(
                    e,
                    Backend {
                        draining: false,
                        ..b
                    },
                );
                vec![
                    "backend".into(),
                    "set".into(),
                    spec,
                    addr,
                    "--state".into(),
                    "active".into(),
                ]
            }
            (false, 1 | 4) => {
                ops.weights += 1;
                backends.insert(e, Backend { weight, ..b });
                vec![
                    "backend".into(),
                    "set".into(),
                    spec,
                    addr,
                    "--weight".into(),
                    weight.to_string(),
                ]
            }
            (false, 2) | (true, _) => {
                ops.dels += 1;
                backends.remove(&e);
                windows.lock().expect("lock").push(Window {
                    vip: v,
                    backend: e,
                    from: now,
                    to: None,
                    why: "backend del",
                });
                vec!["backend".into(), "del".into(), spec, addr]
            }
            _ => {
                // A core backend's weight: Maglev moves slots, the connection table keeps flows.
                ops.weights += 1;
                let core = CORE[usize::try_from(n % 2).expect("fits")];
                let b = backends[&core];
                backends.insert(core, Backend { weight, ..b });
                let addr = backend_addr(core).to_string();
                vec![
                    "backend".into(),
                    "set".into(),
                    spec,
                    addr,
                    "--weight".into(),
                    weight.to_string(),
                ]
            }
        },
    }
}

#[test]
fn soak_traffic_churn_flaps_reloads_restarts() {
    require_root();
    let soak = soak_duration();
    let restart_every = restart_every(soak);
    xlb_netns::cleanup_stale(NS_PREFIX).expect("removing stale namespaces");
    let topology = Topology::with_prefix(NS_PREFIX, BACKENDS).expect("building the topology");
    let dir = TempDir::new(SUITE, "run");
    let lab = Lab {
        ifaces: std::iter::once(&topology.client_link)
            .chain(&topology.backend_links)
            .map(|l| l.a.ifname.clone())
            .collect(),
        config: dir.join("xlb.toml"),
        dir,
        topology,
    };
    for v in 1..VIPS.len() {
        lab.topology
            .client()
            .add_address(
                &lab.topology.client_link.b.ifname,
                xlb_netns::ipnet::Ipv4Net::new(client_addr(v), 24).expect("prefix"),
            )
            .expect("a client address per VIP");
    }
    let _servers: Vec<Server> = (0..BACKENDS)
        .map(|i| Server::start(lab.topology.backend(i), i))
        .collect();
    let mut model = Model::initial();
    fs::write(&lab.config, model.config()).expect("writing the config");
    let pins = KeptPins::new(lab.ns(), SUITE, lab.socket());
    let mut generation = 0;
    let mut agent = lab.start_agent(&pins.dir);
    let mut agent_started = Instant::now();
    lab.assert_holds(&model, "at start");

    let traffic = Arc::new(Traffic::default());
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_panic = RaiseOnDrop(Arc::clone(&stop));
    let mut clients = Vec::new();
    for t in 0..NEW_CONNECTION_THREADS {
        let (stop, traffic) = (Arc::clone(&stop), Arc::clone(&traffic));
        clients.push(
            lab.topology
                .client()
                .spawn(move || new_connections(t, &stop, &traffic))
                .expect("starting new connections"),
        );
    }
    for v in 0..VIPS.len() {
        for s in 0..STREAMS_PER_VIP {
            let (stop, traffic) = (Arc::clone(&stop), Arc::clone(&traffic));
            let seed = (v * STREAMS_PER_VIP + s) as u64;
            clients.push(
                lab.topology
                    .client()
                    .spawn(move || streams(v, seed, &stop, &traffic))
                    .expect("starting streams"),
            );
        }
    }

    let windows: Mutex<Vec<Window>> = Mutex::default();
    // What the test did and when, to explain a failure.
    let mut events: Vec<(Instant, String)> = Vec::new();
    let mut ops = Ops::default();
    let mut samples: Vec<Sample> = Vec::new();
    let started = Instant::now();
    let (mut next_churn, mut next_flap, mut next_restart, mut next_sample) = (
        started + CHURN_EVERY,
        started + FLAP_EVERY,
        started + restart_every,
        started,
    );
    let mut churn_n = 0u64;
    let mut explained = 0;
    // What the agent's connection table said about each stalled flow right after the stall.
    let mut explanations: BTreeMap<usize, String> = BTreeMap::new();
    let mut last_report = started;
    while started.elapsed() < soak {
        let now = Instant::now();
        if now >= next_sample {
            next_sample += SAMPLE_EVERY;
            let (rss_kib, fds) = sample(agent.process.pid());
            samples.push(Sample {
                generation,
                at: now - started,
                age: now - agent_started,
                rss_kib,
                fds,
            });
        }
        if now >= next_churn {
            next_churn += CHURN_EVERY;
            churn_n += 1;
            let args = churn(&mut model, churn_n, &mut ops, &windows);
            fs::write(&lab.config, model.config()).expect("writing the config");
            if churn_n.is_multiple_of(RELOAD_EVERY_NTH_OP) {
                let changes = lab.cli(&["reload"]);
                assert!(
                    !changes.trim().is_empty(),
                    "reload applying `{}` listed no change",
                    args.join(" ")
                );
                ops.reloads += 1;
                events.push((
                    now,
                    format!("reload ({}): {}", args.join(" "), changes.trim()),
                ));
            } else {
                // The file says the same already: --force tells the agent, which runs from
                // it, that a change by hand is meant.
                let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
                args.push("--force");
                lab.cli(&args);
                ops.cli += 1;
                events.push((now, args.join(" ")));
            }
        }
        if now >= next_flap {
            next_flap += FLAP_EVERY;
            ops.flaps += 1;
            let going_down = !FLAPPER_DOWN.load(Ordering::Relaxed);
            let mut windows = windows.lock().expect("lock");
            if going_down {
                for (v, backends) in model.vips.iter().enumerate() {
                    if backends.contains_key(&FLAPPER) {
                        windows.push(Window {
                            vip: v,
                            backend: FLAPPER,
                            from: now,
                            to: None,
                            why: "health check failing",
                        });
                    }
                }
            } else {
                for w in windows.iter_mut() {
                    if w.backend == FLAPPER && w.to.is_none() {
                        w.to = Some(now + HEALTH_SETTLE);
                    }
                }
            }
            FLAPPER_DOWN.store(going_down, Ordering::Relaxed);
            events.push((
                now,
                format!(
                    "b{FLAPPER} health {}",
                    if going_down { "down" } else { "up" }
                ),
            ));
        }
        if now >= next_restart {
            next_restart += restart_every;
            let (rss_kib, fds) = sample(agent.process.pid());
            samples.push(Sample {
                generation,
                at: now - started,
                age: now - agent_started,
                rss_kib,
                fds,
            });
            let status = agent.stop();
            assert!(
                status.success(),
                "agent {generation} stopped with {status}:\n{}",
                agent.log()
            );
            // The data path runs on its own for a moment.
            thread::sleep(Duration::from_millis(300));
            generation += 1;
            let t = Instant::now();
            agent = lab.start_agent(&pins.dir);
            agent_started = Instant::now();
            assert!(
                agent.log().contains("adopted"),
                "agent {generation} did not adopt the pinned data path:\n{}",
                agent.log()
            );
            ops.restarts += 1;
            events.push((now, format!("restart {generation}")));
            lab.assert_holds(&model, &format!("after restart {generation}"));
            eprintln!(
                "[{:>5.0} s] restart {generation}: answering after {} ms",
                started.elapsed().as_secs_f64(),
                t.elapsed().as_millis()
            );
        }
        let stalled: Vec<(usize, usize, String)> = traffic.failures.lock().expect("lock")
            [explained..]
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                let client = f.error.split("(client ").nth(1)?.trim_end_matches(')');
                Some((explained + i, f.vip, client.to_owned()))
            })
            .collect();
        explained = traffic.failures.lock().expect("lock").len();
        for (i, v, client) in stalled {
            let spec = vip_spec(v);
            let out = xlb(
                lab.ns(),
                &lab.socket(),
                &["explain", &client, &spec, "--json"],
            );
            explanations.insert(i, String::from_utf8_lossy(&out.stdout).replace('\n', " "));
        }
        if now - last_report >= Duration::from_secs(60) {
            last_report = now;
            let last = samples.last().expect("sampled");
            eprintln!(
                "[{:>5.0} s] {} new connections, {} streams, {} lines; {} failures so far; \
                 agent {generation}: RSS {} KiB, {} fds",
                started.elapsed().as_secs_f64(),
                traffic.new_ok.load(Ordering::Relaxed),
                traffic.streams_ok.load(Ordering::Relaxed),
                traffic.lines.load(Ordering::Relaxed),
                traffic.failures.lock().expect("lock").len(),
                last.rss_kib,
                last.fds,
            );
        }
        let next = next_churn.min(next_flap).min(next_restart).min(next_sample);
        thread::sleep(
            next.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200)),
        );
    }

    FLAPPER_DOWN.store(false, Ordering::Relaxed);
    let (rss_kib, fds) = sample(agent.process.pid());
    samples.push(Sample {
        generation,
        at: started.elapsed(),
        age: agent_started.elapsed(),
        rss_kib,
        fds,
    });
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    }
    lab.assert_holds(&model, "at the end");
    let stats = common::json(lab.ns(), &lab.socket(), &["stats", "--json"]);
    let agent_counters: Vec<String> = stats["global"]
        .as_array()
        .expect("global counters")
        .iter()
        .filter(|c| c["value"] != 0)
        .map(|c| format!("{}={}", c["name"].as_str().unwrap_or("?"), c["value"]))
        .collect();
    let agent_counters = agent_counters.join(" ");
    let status = agent.stop();
    assert!(
        status.success(),
        "last agent stopped with {status}:\n{}",
        agent.log()
    );

    // ------------------------------------------------------------------ the verdict
    let windows = windows.into_inner().expect("lock");
    let failures = std::mem::take(&mut *traffic.failures.lock().expect("lock"));
    let (excused_failures, unexcused): (Vec<_>, Vec<_>) = failures
        .iter()
        .partition(|f| excused(f, &windows).is_some());
    let new_ok = traffic.new_ok.load(Ordering::Relaxed);
    let streams_ok = traffic.streams_ok.load(Ordering::Relaxed);
    let lines = traffic.lines.load(Ordering::Relaxed);
    eprintln!(
        "soak: {:.0} s; {new_ok} new connections and {streams_ok} long-lived streams ({lines} \
         lines) completed; failed: {} excused (backend deleted or failing its health check), \
         {} not excused",
        started.elapsed().as_secs_f64(),
        excused_failures.len(),
        unexcused.len()
    );
    eprintln!("operations: {ops:?}; restart every {restart_every:?}");
    for f in &excused_failures {
        eprintln!(
            "  excused ({}): {} to {} on {} after {} ms: {}",
            excused(f, &windows).expect("excused"),
            f.what,
            VIPS[f.vip],
            f.backend
                .map_or_else(|| "an unknown backend".to_owned(), |b| format!("b{b}")),
            (f.failed - f.started).as_millis(),
            f.error
        );
    }

    // Resources, per agent process.
    let mut verdicts = Vec::new();
    let mut baselines = Vec::new();
    eprintln!("agent resources (generation: RSS KiB first/after warm-up/max/last, fds same):");
    for g in 0..=generation {
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.generation == g).collect();
        let Some(base) = mine.iter().find(|s| s.age >= WARM_UP) else {
            continue;
        };
        let last = mine.last().expect("sampled");
        let max_rss = mine.iter().map(|s| s.rss_kib).max().expect("sampled");
        let max_fds = mine.iter().map(|s| s.fds).max().expect("sampled");
        eprintln!(
            "  agent {g}: {:.0} s, {} samples; RSS {}/{}/{max_rss}/{}; fds {}/{}/{max_fds}/{}",
            last.age.as_secs_f64(),
            mine.len(),
            mine[0].rss_kib,
            base.rss_kib,
            last.rss_kib,
            mine[0].fds,
            base.fds,
            last.fds
        );
        if last.rss_kib > rss_bound(base.rss_kib) || last.fds > base.fds + FD_SLACK {
            verdicts.push(format!(
                "agent {g} grew: RSS {} -> {} KiB, fds {} -> {}",
                base.rss_kib, last.rss_kib, base.fds, last.fds
            ));
        }
        baselines.push((g, **base, **last));
    }
    let every = (samples.len() / 40).max(1);
    let series: Vec<String> = samples
        .iter()
        .step_by(every)
        .map(|s| {
            format!(
                "{:.0}s:a{}:{}KiB:{}fd",
                s.at.as_secs_f64(),
                s.generation,
                s.rss_kib,
                s.fds
            )
        })
        .collect();
    eprintln!("series (every {every}th sample): {}", series.join(" "));
    if let (Some(first), Some(last)) = (baselines.first(), baselines.last())
        && (last.2.rss_kib > rss_bound(first.1.rss_kib) || last.2.fds > first.1.fds + FD_SLACK)
    {
        verdicts.push(format!(
            "the last agent ({}) ended above the first ({}) after warm-up: RSS {} -> {} KiB, \
             fds {} -> {}",
            last.0, first.0, first.1.rss_kib, last.2.rss_kib, first.1.fds, last.2.fds
        ));
    }

    for (i, f) in failures.iter().enumerate() {
        if excused(f, &windows).is_some() {
            continue;
        }
        if let Some(e) = explanations.get(&i) {
            eprintln!("explain after the stall: {e}");
        }
        eprintln!(
            "NOT excused: {} to {} on {} from {:.1} s to {:.1} s: {}; what happened meanwhile:",
            f.what,
            VIPS[f.vip],
            f.backend
                .map_or_else(|| "an unknown backend".to_owned(), |b| format!("b{b}")),
            (f.started - started).as_secs_f64(),
            (f.failed - started).as_secs_f64(),
            f.error
        );
        for (at, what) in &events {
            if *at + Duration::from_secs(1) >= f.started && *at <= f.failed {
                eprintln!("    {:.1} s: {what}", (*at - started).as_secs_f64());
            }
        }
    }
    eprintln!("agent counters at the end: {}", agent_counters);
    assert!(
        unexcused.is_empty(),
        "{} connections failed that had no reason to: {unexcused:#?}",
        unexcused.len()
    );
    assert!(
        verdicts.is_empty(),
        "agent resources not flat: {verdicts:#?}"
    );
    assert!(
        baselines.len() >= 2,
        "too short to compare resources across agents: {} agents sampled past warm-up",
        baselines.len()
    );
    assert!(
        new_ok > 100 && streams_ok > 0 && lines > 100,
        "traffic ran: {new_ok} connections, {streams_ok} streams, {lines} lines"
    );
    assert!(
        ops.restarts >= 2 && ops.reloads >= 1 && ops.flaps >= 2 && ops.dels >= 1 && ops.drains >= 1,
        "every kind of disturbance happened: {ops:?}"
    );
}
