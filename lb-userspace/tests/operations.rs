//! Operating xlb: health checks taking dead backends out and bringing them back, draining and
//! re-weighting under live connections, agent restarts that drop nothing, the Prometheus
//! endpoint, the declarative config with reload and SIGHUP, and a full disk under the state
//! file.
//!
//! Needs root (namespaces, XDP, mounts). Each test builds its own topology, temp dir and
//! bpffs directory, so the tests run in parallel with each other and with other test binaries.
//! Every backend runs a line server: on connect it sends its name (`b0`, `b1`, ...) and a
//! newline, then answers each line `L` with `NAME L`, so a connection that silently moved to
//! another backend shows up as a reset or a wrong name.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::Value;
use xlb_netns::{Netns, Topology};

mod common;
use common::{
    Agent, AgentProcess, Backend, KeptPins, Reply, TempDir, XLB, backend_v4, describe, ok,
    output_within, require_root, v4, xlb, xlb_attached,
};

/// A small prime ring keeps map setup quick.
const RING: u64 = 1009;
const VIP: &str = "10.100.0.1:80/tcp";
const METRICS_PORT: u16 = 9464;

/// Names of temp dirs and pins start `xlb-ops-`.
const SUITE: &str = "ops";

/// The three-namespace topology; `Network::connect` already turns TX checksum offload off
/// (XDP rewrites would otherwise leave `CHECKSUM_PARTIAL` frames the receiver drops) and GRO
/// on.
fn topology(backends: usize) -> Topology {
    require_root();
    Topology::new(backends).expect("topology")
}

fn lb_ifaces(topo: &Topology) -> Vec<String> {
    std::iter::once(&topo.client_link)
        .chain(&topo.backend_links)
        .map(|l| l.a.ifname.clone())
        .collect()
}

fn backend_addr(i: usize) -> SocketAddr {
    backend_v4(i, 8080)
}

fn vip_addr() -> SocketAddr {
    v4(Topology::VIP_V4, 80)
}

/// The backend address a server name (`b1`) stands for.
fn addr_of(name: &str) -> String {
    let i: usize = name
        .strip_prefix('b')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a backend name: {name:?}"));
    backend_addr(i).to_string()
}

// ---------------------------------------------------------------------------------------------
// Running `xlb`

/// Starts an agent attached to every LB interface of `topo`, pinning under `pins`, with
/// `extra` arguments (the small test ring unless they set `--ring-size`), and waits until it
/// answers.
fn start_agent<'a>(
    topo: &'a Topology,
    dir: &TempDir,
    pins: &KeptPins<'_>,
    state: &Path,
    extra: &[&str],
) -> Agent<'a> {
    let mut agent = Agent::in_ns(topo.lb(), SUITE)
        .ifaces(lb_ifaces(topo))
        .dir(&dir.0)
        .socket(&pins.socket)
        .bpffs(&pins.dir)
        .state(state);
    if !extra.contains(&"--ring-size") {
        agent = agent.args(["--ring-size", &RING.to_string()]);
    }
    agent.args(extra).start()
}

/// What these tests ask an agent about the VIP's backends.
trait BackendQueries {
    fn json(&self, args: &[&str]) -> Value;

    /// `backend list VIP --json`, keyed by backend address.
    fn backends(&self) -> BTreeMap<String, Value> {
        self.backends_of(VIP)
    }

    /// `backend list VIP --json` of another VIP, keyed by backend address.
    fn backends_of(&self, vip: &str) -> BTreeMap<String, Value> {
        let status = self.json(&["backend", "list", vip, "--json"]);
        status["backends"]
            .as_array()
            .unwrap_or_else(|| panic!("no backends in {status:#}"))
            .iter()
            .map(|b| (b["addr"].as_str().expect("addr").to_owned(), b.clone()))
            .collect()
    }

    /// Polls `backend list` until `done` holds for it; panics with the last listing after
    /// `limit`. Returns the listing and how long it took.
    fn wait_backends(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&BTreeMap<String, Value>) -> bool,
    ) -> (BTreeMap<String, Value>, Duration) {
        self.wait_backends_of(VIP, what, limit, done)
    }

    /// [`Self::wait_backends`] for another VIP.
    fn wait_backends_of(
        &self,
        vip: &str,
        what: &str,
        limit: Duration,
        done: impl Fn(&BTreeMap<String, Value>) -> bool,
    ) -> (BTreeMap<String, Value>, Duration) {
        let start = Instant::now();
        loop {
            let list = self.backends_of(vip);
            if done(&list) {
                return (list, start.elapsed());
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}; last listing:\n{list:#?}"
            );
            thread::sleep(Duration::from_millis(25));
        }
    }

    fn tracked_backend(&self, client: SocketAddr) -> Value {
        let e = self.json(&["explain", &client.to_string(), VIP, "--json"]);
        e["tracked_backend"].clone()
    }
}

impl BackendQueries for Agent<'_> {
    fn json(&self, args: &[&str]) -> Value {
        Agent::json(self, args)
    }
}

/// Adds the VIP (with `vip_args`, e.g. health options) and backends `0..n`.
fn add_vip(agent: &Agent<'_>, n: usize, vip_args: &[&str]) {
    let mut args = vec!["vip", "add", VIP];
    args.extend_from_slice(vip_args);
    agent.ok(&args);
    for i in 0..n {
        agent.ok(&["backend", "add", VIP, &backend_addr(i).to_string()]);
    }
}

fn u64_of(v: &Value, what: &str) -> u64 {
    v[what]
        .as_u64()
        .unwrap_or_else(|| panic!("{what} is not a number in {v}"))
}

// ---------------------------------------------------------------------------------------------
// Backend servers

/// Backend `i`'s TCP server on its address, answering as `reply` says, named `bI`.
fn server(topo: &Topology, i: usize, reply: Reply) -> Backend {
    Backend::tcp(topo.backend(i), &format!("b{i}"), backend_addr(i), reply)
}

/// Line servers (greeting, then each line echoed after the name) on backends `0..n`.
fn line_servers(topo: &Topology, n: usize) -> Vec<Backend> {
    (0..n).map(|i| server(topo, i, Reply::NamedEcho)).collect()
}

/// Backend `i`'s UDP server on `port`, answering with its name, or never (`answer` false).
fn udp_server(topo: &Topology, i: usize, port: u16, answer: bool) -> Backend {
    let reply = if answer { Reply::Name } else { Reply::Silent };
    Backend::udp(
        topo.backend(i),
        &format!("b{i}"),
        backend_v4(i, port),
        reply,
    )
}

// ---------------------------------------------------------------------------------------------
// Clients

/// A connection to the VIP speaking the line protocol.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The name the backend greeted with.
    backend: String,
    local: SocketAddr,
    sent: u64,
}

impl Conn {
    /// Connects from inside the client namespace (call it there) and reads the greeting.
    fn open(to: SocketAddr) -> Result<Self, String> {
        Self::open_within(to, Duration::from_secs(3))
    }

    /// As [`Self::open`], with `limit` for the connect and for each read.
    fn open_within(to: SocketAddr, limit: Duration) -> Result<Self, String> {
        let stream = TcpStream::connect_timeout(&to, limit)
            .map_err(|e| format!("connecting to {to}: {e}"))?;
        Self::greeted(stream, limit)
    }

    /// A connected stream, once the backend's greeting is read (3 s per read).
    fn from_stream(stream: TcpStream) -> Result<Self, String> {
        Self::greeted(stream, Duration::from_secs(3))
    }

    fn greeted(stream: TcpStream, limit: Duration) -> Result<Self, String> {
        stream
            .set_read_timeout(Some(limit))
            .map_err(|e| e.to_string())?;
        let local = stream.local_addr().map_err(|e| e.to_string())?;
        let mut conn = Self {
            stream,
            buf: Vec::new(),
            backend: String::new(),
            local,
            sent: 0,
        };
        conn.backend = conn
            .read_line()
            .map_err(|e| format!("{local}: greeting: {e}"))?;
        Ok(conn)
    }

    fn read_line(&mut self) -> Result<String, String> {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("EOF".to_owned()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Sends one line and checks the same backend echoes it.
    fn echo(&mut self) -> Result<(), String> {
        self.sent += 1;
        let line = format!("line {}", self.sent);
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("{}: writing {line:?}: {e}", self.local))?;
        let reply = self
            .read_line()
            .map_err(|e| format!("{}: reading the echo of {line:?}: {e}", self.local))?;
        let expected = format!("{} {line}", self.backend);
        if reply == expected {
            Ok(())
        } else {
            Err(format!(
                "{}: expected {expected:?}, got {reply:?}",
                self.local
            ))
        }
    }

    fn must_echo(&mut self) {
        self.echo().unwrap_or_else(|e| panic!("{e}"));
    }
}

/// `n` fresh connections from the client namespace; the backend each reached.
fn connect_many(topo: &Topology, n: usize) -> Vec<String> {
    let to = vip_addr();
    topo.client()
        .run(move || {
            (0..n)
                .map(|_| {
                    Conn::open(to)
                        .unwrap_or_else(|e| panic!("new connection: {e}"))
                        .backend
                })
                .collect()
        })
        .expect("client namespace")
}

/// Opens connections until one reaches each backend named in `wanted` (bounded).
fn conns_to(topo: &Topology, wanted: &[&str]) -> BTreeMap<String, Conn> {
    let to = vip_addr();
    let wanted: Vec<String> = wanted.iter().map(|s| (*s).to_owned()).collect();
    topo.client()
        .run(move || {
            let mut got = BTreeMap::new();
            for _ in 0..200 {
                let conn = Conn::open(to).unwrap_or_else(|e| panic!("new connection: {e}"));
                if wanted.contains(&conn.backend) && !got.contains_key(&conn.backend) {
                    got.insert(conn.backend.clone(), conn);
                }
                if got.len() == wanted.len() {
                    return got;
                }
            }
            panic!("200 connections did not reach all of {wanted:?}");
        })
        .expect("client namespace")
}

/// One HTTP GET through the VIP from the client namespace; the body (the backend's name).
fn http_get_via_vip(topo: &Topology) -> String {
    let to = vip_addr();
    let response = topo
        .client()
        .run(move || common::http_get(to, "/", Duration::from_secs(3)))
        .expect("client namespace")
        .unwrap_or_else(|e| panic!("GET / from {to}: {e}"));
    assert!(
        response.status_line.starts_with("HTTP/1.0 200"),
        "{response:?}"
    );
    response.body.trim().to_owned()
}

/// A GET of `path` on `addr` from inside `ns`: (status line, body).
fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let path = path.to_owned();
    ns.run(move || common::http_get(addr, &path, Duration::from_secs(5)))
        .expect("entering namespace")
        .map(|r| (r.status_line, r.body))
}

/// Scrapes the agent's metrics from inside the LB namespace and parses them with
/// `prometheus-parse`, an implementation independent of the encoder.
fn scrape(topo: &Topology) -> prometheus_parse::Scrape {
    let (status, body) = http_get(topo.lb(), v4(Ipv4Addr::LOCALHOST, METRICS_PORT), "/metrics")
        .unwrap_or_else(|e| panic!("scraping 127.0.0.1:{METRICS_PORT} in the LB namespace: {e}"));
    assert!(status.contains(" 200"), "{status}\n{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("unparsable metrics ({e}):\n{body}"))
}

/// The value of the sample `metric` whose labels include all of `labels`.
fn sample(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use prometheus_parse::Value as V;
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            V::Counter(v) | V::Gauge(v) | V::Untyped(v) => v,
            _ => panic!("{metric} is not a plain number: {:?}", s.value),
        })
}

// ---------------------------------------------------------------------------------------------
// 1. Health checks

#[test]
fn health_checks_take_failing_backends_out_and_back() {
    const INTERVAL_MS: u64 = 200;
    const FALL: u64 = 2;
    const RISE: u64 = 2;
    let topo = topology(3);
    let dir = TempDir::new(SUITE, "health");
    let mut servers = line_servers(&topo, 3);
    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let agent = start_agent(&topo, &dir, &pins, &dir.join("state.json"), &[]);
    add_vip(
        &agent,
        3,
        &[
            "--health",
            "tcp",
            "--health-interval-ms",
            &INTERVAL_MS.to_string(),
            "--health-timeout-ms",
            "100",
            "--health-fall",
            &FALL.to_string(),
            "--health-rise",
            &RISE.to_string(),
        ],
    );
    let b0 = backend_addr(0).to_string();
    // Every backend passes its probes first.
    agent.wait_backends("all backends probed ok", Duration::from_secs(5), |l| {
        l.len() == 3
            && l.values().all(|b| {
                b["healthy"] == true
                    && b["health"]["last_result"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("ok"))
            })
    });
    // An established connection to another backend, which must survive b0's failure.
    let mut conns = conns_to(&topo, &["b1"]);
    let mut kept = conns.remove("b1").expect("b1");
    kept.must_echo();

    servers[0].stop();
    let limit = Duration::from_millis(INTERVAL_MS * FALL) + Duration::from_secs(1);
    let (list, took) = agent.wait_backends("b0 taken out", limit, |l| {
        l[&b0]["healthy"] == false && l[&b0]["slots"] == 0
    });
    eprintln!("b0 out {took:?} after its server stopped (limit {limit:?})");
    let result = list[&b0]["health"]["last_result"]
        .as_str()
        .unwrap_or_default();
    assert!(
        result.contains("refused"),
        "last_result says why: {:#}",
        list[&b0]
    );
    assert!(
        u64_of(&list[&b0]["health"], "consecutive_fail") >= FALL,
        "{:#}",
        list[&b0]
    );
    assert_eq!(
        list.values().map(|b| u64_of(b, "slots")).sum::<u64>(),
        RING,
        "the others share the ring: {list:#?}"
    );
    let m = scrape(&topo);
    assert_eq!(
        sample(&m, "xlb_backend_up", &[("vip", VIP), ("backend", &b0)]),
        Some(0.0),
        "xlb_backend_up of b0: {:?}",
        m.samples
    );
    assert_eq!(
        sample(
            &m,
            "xlb_backend_up",
            &[("vip", VIP), ("backend", &backend_addr(1).to_string())]
        ),
        Some(1.0)
    );

    let reached = connect_many(&topo, 50);
    assert!(
        reached.iter().all(|b| b != "b0"),
        "no new connection reaches the dead backend: {reached:?}"
    );
    kept.must_echo();

    servers[0].restart(topo.backend(0));
    let limit = Duration::from_millis(INTERVAL_MS * RISE) + Duration::from_secs(1);
    let (list, took) = agent.wait_backends("b0 back", limit, |l| {
        l[&b0]["healthy"] == true && u64_of(&l[&b0], "slots") > 0
    });
    eprintln!("b0 back {took:?} after its server restarted (limit {limit:?})");
    assert!(
        list[&b0]["health"]["last_result"]
            .as_str()
            .is_some_and(|r| r.starts_with("ok")),
        "{:#}",
        list[&b0]
    );
    let m = scrape(&topo);
    assert_eq!(
        sample(&m, "xlb_backend_up", &[("vip", VIP), ("backend", &b0)]),
        Some(1.0)
    );
    let reached = connect_many(&topo, 50);
    assert!(
        reached.iter().any(|b| b == "b0"),
        "b0 takes new connections again: {reached:?}"
    );
    kept.must_echo();
}

#[test]
fn http_health_check_takes_a_503_backend_out() {
    let topo = topology(3);
    let dir = TempDir::new(SUITE, "http-health");
    let statuses: Vec<Arc<AtomicU16>> = (0..3).map(|_| Arc::new(AtomicU16::new(200))).collect();
    statuses[1].store(503, Ordering::Relaxed);
    let _servers: Vec<Backend> = (0..3)
        .map(|i| server(&topo, i, Reply::Http(Arc::clone(&statuses[i]))))
        .collect();
    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let agent = start_agent(&topo, &dir, &pins, &dir.join("state.json"), &[]);
    add_vip(
        &agent,
        3,
        &[
            "--health",
            "http",
            "--health-path",
            "/healthz",
            "--health-status",
            "200",
            "--health-interval-ms",
            "200",
            "--health-timeout-ms",
            "100",
            "--health-fall",
            "2",
            "--health-rise",
            "2",
        ],
    );
    let b1 = backend_addr(1).to_string();
    let (list, took) =
        agent.wait_backends("the 503 backend out", Duration::from_millis(1400), |l| {
            l.len() == 3 && l[&b1]["healthy"] == false && l[&b1]["slots"] == 0
        });
    eprintln!("503 backend out after {took:?}");
    assert!(
        list[&b1]["health"]["last_result"]
            .as_str()
            .is_some_and(|r| r.contains("503")),
        "{:#}",
        list[&b1]
    );
    for i in [0, 2] {
        let b = &list[&backend_addr(i).to_string()];
        assert!(b["healthy"] == true && u64_of(b, "slots") > 0, "{b:#}");
        assert!(
            b["health"]["last_result"]
                .as_str()
                .is_some_and(|r| r.starts_with("ok http 200")),
            "{b:#}"
        );
    }
    let answers: Vec<String> = (0..30).map(|_| http_get_via_vip(&topo)).collect();
    assert!(
        answers.iter().all(|a| a == "b0" || a == "b2"),
        "no request reaches b1: {answers:?}"
    );

    statuses[1].store(200, Ordering::Relaxed);
    agent.wait_backends("b1 back", Duration::from_millis(1400), |l| {
        l[&b1]["healthy"] == true && u64_of(&l[&b1], "slots") > 0
    });
}

/// `n` datagrams to `vip`, each from a fresh client port (a new flow): who answered each.
fn udp_ask_many(topo: &Topology, vip: SocketAddr, n: usize) -> Vec<String> {
    topo.client()
        .run(move || {
            (0..n)
                .map(|_| {
                    let socket = UdpSocket::bind("0.0.0.0:0").expect("binding a client socket");
                    socket.connect(vip).expect("connect");
                    socket
                        .set_read_timeout(Some(Duration::from_secs(3)))
                        .expect("read timeout");
                    socket.send(b"ping").expect("send");
                    let mut buf = [0_u8; 64];
                    let len = socket
                        .recv(&mut buf)
                        .unwrap_or_else(|e| panic!("no answer from {vip}: {e}"));
                    String::from_utf8_lossy(&buf[..len]).into_owned()
                })
                .collect()
        })
        .expect("client namespace")
}

/// Both kinds of UDP check against real UDP servers going down and coming back: one expecting
/// an answer to its payload, one (no payload) only expecting no port-unreachable. The two
/// VIPs' failing backends sit in different namespaces: Linux rate-limits ICMP errors per
/// namespace and peer, and probes of one VIP must not use up the other's.
#[test]
fn udp_health_checks_follow_a_udp_server_down_and_up() {
    const ANSWERING: &str = "10.100.0.1:53/udp";
    const SILENT: &str = "10.100.0.1:54/udp";
    let topo = topology(3);
    let dir = TempDir::new(SUITE, "udp-health");
    // ANSWERING on backends 0 and 1, SILENT on backends 1 and 2.
    let mut answering: Vec<Backend> = (0..2).map(|i| udp_server(&topo, i, 5353, true)).collect();
    let mut silent: Vec<Backend> = (1..3).map(|i| udp_server(&topo, i, 5454, false)).collect();
    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let agent = start_agent(&topo, &dir, &pins, &dir.join("state.json"), &[]);
    let out = agent.ok(&[
        "vip",
        "add",
        ANSWERING,
        "--health",
        "udp",
        "--health-payload",
        "ping",
        "--health-interval-ms",
        "200",
        "--health-timeout-ms",
        "100",
        "--health-fall",
        "2",
        "--health-rise",
        "2",
    ]);
    assert!(out.contains("udp (4 bytes) expecting a reply"), "{out}");
    let out = agent.ok(&[
        "vip",
        "add",
        SILENT,
        "--health",
        "udp",
        "--health-interval-ms",
        "1000",
        "--health-timeout-ms",
        "300",
        "--health-fall",
        "2",
        "--health-rise",
        "2",
    ]);
    assert!(
        out.contains("udp (0 bytes) expecting no port-unreachable"),
        "{out}"
    );
    for s in &answering {
        agent.ok(&["backend", "add", ANSWERING, &s.addr.to_string()]);
    }
    for s in &silent {
        agent.ok(&["backend", "add", SILENT, &s.addr.to_string()]);
    }
    let all_ok = |prefix: &'static str| {
        move |l: &BTreeMap<String, Value>| {
            l.len() == 2
                && l.values().all(|b| {
                    b["healthy"] == true
                        && b["health"]["last_result"]
                            .as_str()
                            .is_some_and(|r| r.starts_with(prefix))
                })
        }
    };
    agent.wait_backends_of(
        ANSWERING,
        "answering backends probed ok",
        Duration::from_secs(5),
        all_ok("ok udp reply"),
    );
    agent.wait_backends_of(
        SILENT,
        "silent backends probed ok",
        Duration::from_secs(5),
        all_ok("ok no port-unreachable within 300 ms"),
    );

    // Down: b0 of ANSWERING, b2 of SILENT.
    let (b0, b2) = (answering[0].addr.to_string(), silent[1].addr.to_string());
    answering[0].stop();
    silent[1].stop();
    let limit = Duration::from_millis(200 * 2) + Duration::from_secs(1);
    let (list, took) = agent.wait_backends_of(ANSWERING, "b0 taken out", limit, |l| {
        l[&b0]["healthy"] == false && l[&b0]["slots"] == 0
    });
    eprintln!("answering b0 out {took:?} after its server stopped (limit {limit:?})");
    let why = list[&b0]["health"]["last_result"].as_str().unwrap_or("");
    // Port-unreachable at first; once the backend's ICMP budget (a burst, then one a second)
    // is spent, a probe that gets no answer fails by its timeout instead.
    assert!(
        why == "port unreachable" || why == "no reply within 100 ms",
        "{:#}",
        list[&b0]
    );
    let limit = Duration::from_millis(1000 * 2) + Duration::from_millis(1500);
    let (list, took) = agent.wait_backends_of(SILENT, "b2 taken out", limit, |l| {
        l[&b2]["healthy"] == false && l[&b2]["slots"] == 0
    });
    eprintln!("silent b2 out {took:?} after its server stopped (limit {limit:?})");
    assert_eq!(
        list[&b2]["health"]["last_result"], "port unreachable",
        "{:#}",
        list[&b2]
    );
    let vip_addr = v4(Topology::VIP_V4, 53);
    let reached = udp_ask_many(&topo, vip_addr, 20);
    assert!(
        reached.iter().all(|b| b == "b1"),
        "no datagram reaches the dead backend: {reached:?}"
    );

    // Up again.
    answering[0].restart(topo.backend(0));
    silent[1].restart(topo.backend(2));
    let limit = Duration::from_millis(200 * 2) + Duration::from_secs(1);
    agent.wait_backends_of(ANSWERING, "b0 back", limit, |l| {
        l[&b0]["healthy"] == true && u64_of(&l[&b0], "slots") > 0
    });
    let limit = Duration::from_millis(1000 * 2) + Duration::from_millis(1500);
    agent.wait_backends_of(SILENT, "b2 back", limit, |l| {
        l[&b2]["healthy"] == true && u64_of(&l[&b2], "slots") > 0
    });
    // 20 new flows over two backends with equal weights: all on b1 has odds 2^-20.
    let reached = udp_ask_many(&topo, vip_addr, 20);
    assert!(
        reached.iter().any(|b| b == "b0"),
        "b0 takes new flows again: {reached:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Draining and weights

#[test]
fn draining_keeps_established_connections() {
    let topo = topology(3);
    let dir = TempDir::new(SUITE, "drain");
    let _servers = line_servers(&topo, 3);
    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let agent = start_agent(&topo, &dir, &pins, &dir.join("state.json"), &[]);
    add_vip(&agent, 3, &[]);
    let (b0, b1, b2) = (
        backend_addr(0).to_string(),
        backend_addr(1).to_string(),
        backend_addr(2).to_string(),
    );
    let mut on_b0 = conns_to(&topo, &["b0"]).remove("b0").expect("b0");
    on_b0.must_echo();
    // A spread of connections over b1 and b2 that a weight change must not move.
    let to = vip_addr();
    let mut others: Vec<Conn> = topo
        .client()
        .run(move || {
            let mut v = Vec::new();
            while v.len() < 16 {
                let c = Conn::open(to).unwrap_or_else(|e| panic!("{e}"));
                if c.backend != "b0" {
                    v.push(c);
                }
            }
            v
        })
        .expect("client namespace");

    let out = agent.ok(&["backend", "drain", VIP, &b0]);
    assert!(out.contains("draining"), "{out}");
    let list = agent.backends();
    assert_eq!(list[&b0]["state"], "draining", "{:#}", list[&b0]);
    assert_eq!(list[&b0]["slots"], 0, "{:#}", list[&b0]);
    assert!(
        u64_of(&list[&b0], "live_flows") >= 1,
        "the open connection counts: {:#}",
        list[&b0]
    );
    for _ in 0..3 {
        on_b0.must_echo();
    }
    let reached = connect_many(&topo, 40);
    assert!(
        reached.iter().all(|b| b != "b0"),
        "a draining backend gets no new connection: {reached:?}"
    );
    on_b0.must_echo();
    assert_eq!(
        agent.tracked_backend(on_b0.local),
        b0.as_str(),
        "the drained flow is still b0's"
    );

    agent.ok(&["backend", "set", VIP, &b1, "--weight", "3"]);
    let list = agent.backends();
    let (s1, s2) = (u64_of(&list[&b1], "slots"), u64_of(&list[&b2], "slots"));
    assert_eq!(s1 + s2, RING, "{list:#?}");
    let ratio = s1 as f64 / s2 as f64;
    assert!(
        (2.5..=3.5).contains(&ratio),
        "weight 3:1 gives about 3:1 slots, got {s1}:{s2}"
    );
    assert_eq!(list[&b1]["weight"], 3);
    assert_eq!(list[&b0]["state"], "draining");
    on_b0.must_echo();
    for c in &mut others {
        c.must_echo();
        assert_eq!(
            agent.tracked_backend(c.local),
            addr_of(&c.backend).as_str(),
            "{} keeps {}",
            c.local,
            c.backend
        );
    }
    // Closing the drained connection empties it.
    drop(on_b0);
    let reached = connect_many(&topo, 20);
    assert!(reached.iter().all(|b| b != "b0"), "{reached:?}");
}

/// A line-protocol connection from client port `port` (bound with SO_REUSEADDR, as a client
/// reusing its port does); call it in the client namespace.
fn conn_from_port(port: u16, to: SocketAddr) -> Result<Conn, String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.to_string())?;
    socket.set_reuse_address(true).map_err(|e| e.to_string())?;
    socket
        .bind(&v4(Ipv4Addr::UNSPECIFIED, port).into())
        .map_err(|e| format!("binding port {port}: {e}"))?;
    socket
        .connect_timeout(&to.into(), Duration::from_secs(3))
        .map_err(|e| format!("connecting from port {port} to {to}: {e}"))?;
    Conn::from_stream(socket.into())
}

/// After a drain, a new connection from a client port that an earlier connection to the
/// drained backend used gets an active backend (its SYN never reuses the old entry), and
/// `live_flows` drops as soon as connections close; a UDP VIP with a short idle timeout
/// moves an idle flow off a draining backend once the timeout has passed.
#[test]
fn flows_end_when_connections_close_or_idle_out() {
    const UDP_VIP: &str = "10.100.0.1:53/udp";
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "lifetime");
    let mut servers = line_servers(&topo, 2);
    let udp_servers: Vec<Backend> = (0..2).map(|i| udp_server(&topo, i, 5353, true)).collect();
    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let agent = start_agent(&topo, &dir, &pins, &dir.join("state.json"), &[]);
    add_vip(&agent, 2, &[]);
    agent.ok(&["vip", "add", UDP_VIP, "--udp-timeout", "2"]);
    for s in &udp_servers {
        agent.ok(&["backend", "add", UDP_VIP, &s.addr.to_string()]);
    }
    let vips = agent.json(&["vip", "list", "--json"]);
    let timeouts: BTreeMap<&str, u64> = vips
        .as_array()
        .expect("a VIP array")
        .iter()
        .map(|v| (v["vip"].as_str().expect("vip"), u64_of(v, "idle_timeout_s")))
        .collect();
    assert_eq!(
        timeouts,
        BTreeMap::from([(VIP, 300), (UDP_VIP, 2)]),
        "{vips:#}"
    );
    let listing = agent.ok(&["vip", "list"]);
    assert!(
        listing.contains("IDLE TIMEOUT") && listing.contains("2 s"),
        "{listing}"
    );

    // TCP: a connection to b0 from a port of our choosing; the ones that reached b1 while
    // looking for it are closed at once.
    let to = vip_addr();
    let (port, mut on_b0) = topo
        .client()
        .run(move || {
            for port in 46_000..46_200 {
                let conn = conn_from_port(port, to).unwrap_or_else(|e| panic!("{e}"));
                if conn.backend == "b0" {
                    return (port, conn);
                }
            }
            panic!("200 client ports never reached b0");
        })
        .expect("client namespace");
    on_b0.must_echo();
    let (b0, b1) = (backend_addr(0).to_string(), backend_addr(1).to_string());
    let (_, took) = agent.wait_backends(
        "closed connections are not live",
        Duration::from_secs(3),
        |l| u64_of(&l[&b0], "live_flows") == 1 && u64_of(&l[&b1], "live_flows") == 0,
    );
    eprintln!("closed connections stopped counting after {took:?}");

    agent.ok(&["backend", "drain", VIP, &b0]);
    on_b0.must_echo();
    // b0 closes its side first (its server stops), so the client's port is free of
    // TIME_WAIT; b0 listens again right after, so a connection wrongly sent there would be
    // answered by b0 rather than refused.
    servers[0].stop();
    assert_eq!(on_b0.read_line(), Err("EOF".to_owned()), "b0 closed first");
    drop(on_b0);
    servers[0].restart(topo.backend(0));
    let (_, took) = agent.wait_backends(
        "the closed connection is not live",
        Duration::from_secs(3),
        |l| u64_of(&l[&b0], "live_flows") == 0,
    );
    eprintln!("b0's last connection stopped counting {took:?} after it closed");
    let mut again = topo
        .client()
        .run(move || conn_from_port(port, to))
        .expect("client namespace")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        again.backend, "b1",
        "a new connection from port {port}, which b0's connection used, goes to an active backend"
    );
    again.must_echo();
    assert_eq!(agent.tracked_backend(again.local), b1.as_str());

    // UDP: one flow (one client socket) sticks to its backend while it is busy, also when
    // that backend drains; idle for longer than the VIP's 2 s, it is balanced afresh.
    let udp_vip = v4(Topology::VIP_V4, 53);
    let client = topo
        .client()
        .run(move || {
            let socket = UdpSocket::bind("0.0.0.0:0").expect("binding a client socket");
            socket.connect(udp_vip).expect("connect");
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("read timeout");
            socket
        })
        .expect("client namespace");
    let ask = || {
        client.send(b"ping").expect("send");
        let mut buf = [0_u8; 64];
        let len = client
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no answer from {udp_vip}: {e}"));
        String::from_utf8_lossy(&buf[..len]).into_owned()
    };
    let first = ask();
    let other = if first == "b0" { "b1" } else { "b0" };
    let first_addr = udp_servers
        .iter()
        .find(|s| s.name == first)
        .expect("a UDP server")
        .addr
        .to_string();
    agent.ok(&["backend", "drain", UDP_VIP, &first_addr]);
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(400));
        assert_eq!(ask(), first, "a busy flow stays on its draining backend");
    }
    thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        ask(),
        other,
        "idle past the VIP's 2 s timeout: balanced afresh"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Restarts

/// How hard [`Traffic`] pushes, and how patient it is.
struct TrafficPlan {
    /// A new TCP connection (connect, greeting, one echoed line) this often.
    new_tcp_every: Duration,
    /// A new UDP flow (a fresh socket, one datagram echoed) to this VIP this often.
    udp: Option<(SocketAddr, Duration)>,
    /// How long a new flow may take before it counts as failed. Under 1 s, a dropped SYN
    /// fails instead of being hidden by the client's retransmission.
    new_flow_limit: Duration,
}

impl TrafficPlan {
    /// One new connection every ~50 ms, with the kernel's usual patience.
    const GENTLE: Self = Self {
        new_tcp_every: Duration::from_millis(50),
        udp: None,
        new_flow_limit: Duration::from_secs(3),
    };
}

/// Traffic that runs while agents come and go: one long connection sending a line every
/// ~20 ms, and new flows as the plan says.
struct Traffic {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    echoed: Arc<AtomicU64>,
    new_conns: Arc<AtomicU64>,
    new_udp_flows: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    stream_local: SocketAddr,
    stream_backend: String,
}

impl Traffic {
    fn start(topo: &Topology, plan: &TrafficPlan) -> Self {
        let to = vip_addr();
        let mut stream = topo
            .client()
            .run(move || Conn::open(to))
            .expect("client namespace")
            .unwrap_or_else(|e| panic!("long-lived connection: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let echoed = Arc::new(AtomicU64::new(0));
        let new_conns = Arc::new(AtomicU64::new(0));
        let new_udp_flows = Arc::new(AtomicU64::new(0));
        let (stream_local, stream_backend) = (stream.local, stream.backend.clone());
        let mut threads = Vec::new();
        {
            let (stop, failures, echoed) = (
                Arc::clone(&stop),
                Arc::clone(&failures),
                Arc::clone(&echoed),
            );
            // The socket lives in the client namespace whichever thread uses it.
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = stream.echo() {
                        failures
                            .lock()
                            .expect("failures")
                            .push(format!("stream: {e}"));
                        return;
                    }
                    echoed.fetch_add(1, Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(20));
                }
            }));
        }
        {
            let (stop, failures, new_conns) = (
                Arc::clone(&stop),
                Arc::clone(&failures),
                Arc::clone(&new_conns),
            );
            let (every, limit) = (plan.new_tcp_every, plan.new_flow_limit);
            threads.push(
                topo.client()
                    .spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            match Conn::open_within(to, limit) {
                                Ok(mut c) => {
                                    if let Err(e) = c.echo() {
                                        failures
                                            .lock()
                                            .expect("failures")
                                            .push(format!("new: {e}"));
                                    }
                                    new_conns.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    failures.lock().expect("failures").push(format!("new: {e}"))
                                }
                            }
                            thread::sleep(every);
                        }
                    })
                    .expect("client namespace"),
            );
        }
        if let Some((udp_vip, every)) = plan.udp {
            let (stop, failures, flows) = (
                Arc::clone(&stop),
                Arc::clone(&failures),
                Arc::clone(&new_udp_flows),
            );
            let limit = plan.new_flow_limit;
            threads.push(
                topo.client()
                    .spawn(move || {
                        let mut n = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            n += 1;
                            match udp_exchange(udp_vip, n, limit) {
                                Ok(()) => {
                                    flows.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    failures.lock().expect("failures").push(format!("udp: {e}"))
                                }
                            }
                            thread::sleep(every);
                        }
                    })
                    .expect("client namespace"),
            );
        }
        Self {
            stop,
            failures,
            echoed,
            new_conns,
            new_udp_flows,
            threads,
            stream_local,
            stream_backend,
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().expect("failures").clone()
    }

    /// Stops every stream; (lines echoed, TCP connections made, UDP flows echoed, failures).
    fn finish(&mut self) -> (u64, u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.echoed.load(Ordering::Relaxed),
            self.new_conns.load(Ordering::Relaxed),
            self.new_udp_flows.load(Ordering::Relaxed),
            self.failures(),
        )
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One new UDP flow from the client namespace (call it there): a fresh socket, so a fresh
/// source port, sends `ping N` and must get `NAME ping N` back within `limit`.
fn udp_exchange(to: SocketAddr, n: u64, limit: Duration) -> Result<(), String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("binding: {e}"))?;
    socket
        .set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    socket
        .connect(to)
        .map_err(|e| format!("connecting to {to}: {e}"))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let ping = format!("ping {n}");
    socket
        .send(ping.as_bytes())
        .map_err(|e| format!("{local}: sending {ping:?}: {e}"))?;
    let mut buf = [0u8; 256];
    let len = socket
        .recv(&mut buf)
        .map_err(|e| format!("{local}: no answer to {ping:?} within {limit:?}: {e}"))?;
    let reply = String::from_utf8_lossy(&buf[..len]);
    match reply.split_once(' ') {
        Some((name, rest)) if name.starts_with('b') && rest == ping => Ok(()),
        _ => Err(format!("{local}: {ping:?} answered with {reply:?}")),
    }
}

/// The forwarding sysctls the agent switches on.
const FORWARDING_KEYS: [&str; 2] = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"];

#[test]
fn restart_without_dropping() {
    const RESTARTS: usize = 3;
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "restart");
    let state = dir.join("state.json");
    let _servers = line_servers(&topo, 2);
    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    // Forwarding off, as on a fresh host: the agent switches it on, and it stays on while a
    // kept data path runs, across restarts, until `xlb detach` switches it back off.
    let forwarding =
        || FORWARDING_KEYS.map(|key| topo.lb().read_sysctl(key).expect("reading a sysctl"));
    for key in FORWARDING_KEYS {
        topo.lb().sysctl(key, "0").expect("forwarding off");
    }
    let mut agent = start_agent(&topo, &dir, &pins, &state, &["--keep-attached"]);
    assert_eq!(forwarding(), ["1", "1"], "the agent switches forwarding on");
    add_vip(&agent, 2, &[]);
    let mut traffic = Traffic::start(&topo, &TrafficPlan::GENTLE);
    thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    for round in 0..RESTARTS {
        let status = agent.stop();
        assert!(
            status.success(),
            "clean stop {round}: {status}\n{}",
            agent.log()
        );
        assert!(pins.dir.exists(), "--keep-attached leaves the pins");
        assert_eq!(
            forwarding(),
            ["1", "1"],
            "the kept data path needs forwarding"
        );
        for ifname in lb_ifaces(&topo) {
            assert!(
                xlb_attached(topo.lb(), &ifname),
                "still attached to {ifname}"
            );
        }
        // The data path runs on its own for a while.
        thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        agent = start_agent(&topo, &dir, &pins, &state, &["--keep-attached"]);
        eprintln!(
            "restart {round}: agent answering {:?} after start",
            t.elapsed()
        );
        assert!(
            agent.log().contains("adopted"),
            "round {round}: the new agent adopts the running data path:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(300));
        let failures = traffic.failures();
        assert!(failures.is_empty(), "round {round}: {failures:#?}");
    }
    let (echoed, made, _, failures) = traffic.finish();
    eprintln!(
        "{RESTARTS} restarts in {:?}: {echoed} lines echoed, {made} new connections",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "nothing failed across restarts: {failures:#?}"
    );
    assert!(
        echoed > 50 && made > 20,
        "traffic ran: {echoed} lines, {made} connections"
    );
    let tracked = agent.tracked_backend(traffic.stream_local);
    assert_eq!(
        tracked,
        addr_of(&traffic.stream_backend).as_str(),
        "the connection table still holds the long stream's flow on the backend answering it"
    );

    // A final stop leaves the data path running; `xlb detach` takes it down.
    let status = agent.stop();
    assert!(status.success(), "{status}");
    for ifname in lb_ifaces(&topo) {
        assert!(xlb_attached(topo.lb(), &ifname), "{ifname}");
    }
    let args = ["detach", "--bpffs", pins.dir.to_str().expect("utf-8 path")];
    let out = agent.run(&args);
    assert!(out.status.success(), "{}", describe(&args, &out));
    assert!(!pins.dir.exists(), "detach removes the pin directory");
    assert_eq!(
        forwarding(),
        ["0", "0"],
        "detach switches back off what the agent switched on: {}",
        describe(&args, &out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("switched net.ipv4.ip_forward back off"),
        "{}",
        describe(&args, &out)
    );
    for ifname in lb_ifaces(&topo) {
        assert!(
            !xlb_attached(topo.lb(), &ifname),
            "no XDP program on {ifname} after detach"
        );
    }
    let to = vip_addr();
    let refused = topo
        .client()
        .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(1)))
        .expect("client namespace");
    assert!(
        refused.is_err(),
        "nothing answers the VIP once the program is gone"
    );
}

/// A restart with other table sizes meets pinned maps this build cannot reuse as they are,
/// as an upgrade across a map layout change does. The agent replaces them and carries the
/// connection table's entries over: a long-lived connection whose backend has left the
/// ring (drained, so only its entry keeps it there) still reaches that backend, and nothing
/// fails.
#[test]
fn a_restart_with_other_table_sizes_keeps_established_connections() {
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "resize");
    let state = dir.join("state.json");
    let _servers = line_servers(&topo, 2);
    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let before = [
        "--keep-attached",
        "--conntrack-entries",
        "16384",
        "--max-vips",
        "8",
    ];
    let after = [
        "--keep-attached",
        "--conntrack-entries",
        "32768",
        "--max-vips",
        "16",
    ];
    let mut agent = start_agent(&topo, &dir, &pins, &state, &before);
    add_vip(&agent, 2, &[]);
    let mut traffic = Traffic::start(&topo, &TrafficPlan::GENTLE);
    thread::sleep(Duration::from_millis(300));
    let stream_backend = addr_of(&traffic.stream_backend);
    agent.ok(&["backend", "drain", VIP, &stream_backend]);
    thread::sleep(Duration::from_millis(300));

    let status = agent.stop();
    assert!(status.success(), "clean stop: {status}\n{}", agent.log());
    agent = start_agent(&topo, &dir, &pins, &state, &after);
    let log = agent.log();
    for map in ["XLB_CONNTRACK", "XLB_FLOWS4", "XLB_VIPS"] {
        assert!(
            log.lines()
                .any(|l| l.contains("replaced by this build's") && l.contains(map)),
            "{map} is replaced:\n{log}"
        );
    }
    assert!(
        log.lines().any(|l| l.contains("carried over")
            && l.contains("XLB_FLOWS4")
            && !l.contains("entries=0")),
        "the IPv4 connection table's entries are carried over:\n{log}"
    );
    assert!(log.contains("adopted"), "{log}");
    assert!(
        !fs::read_dir(&pins.dir).expect("pin directory").any(|e| e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .ends_with("_RETIRED")),
        "no retired pin is left behind"
    );
    thread::sleep(Duration::from_millis(500));
    let (echoed, made, _, failures) = traffic.finish();
    assert!(failures.is_empty(), "nothing failed: {failures:#?}");
    assert!(
        echoed > 10 && made > 5,
        "traffic ran: {echoed} lines, {made} connections"
    );
    assert_eq!(
        agent.tracked_backend(traffic.stream_local),
        stream_backend.as_str(),
        "the long stream is still tracked on its drained backend"
    );
}

const UDP_VIP: &str = "10.100.0.1:80/udp";

/// A global counter from `xlb stats --json`.
fn global_counter(agent: &Agent<'_>, name: &str) -> u64 {
    let stats = agent.json(&["stats", "--json"]);
    let counter = stats["global"]
        .as_array()
        .expect("global counters")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no counter {name} in {stats:#}"));
    u64_of(counter, "value")
}

/// An agent adopting a running data path must not let a single packet see a VIP without
/// its ring: new TCP connections and UDP flows every 5 ms, each allowed less than the 1 s a
/// lost SYN costs, all get through three restarts, and the data path never drops a packet
/// for want of a backend. Rings of the default size, so that rewriting one takes as long
/// as it does in production.
#[test]
fn keep_attached_restarts_lose_no_new_flow() {
    const RESTARTS: usize = 3;
    const AGENT_ARGS: &[&str] = &["--keep-attached", "--ring-size", "65537"];
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "adopt");
    let state = dir.join("state.json");
    let _servers = line_servers(&topo, 2);
    let _udp_servers = (0..2)
        .map(|i| {
            Backend::udp(
                topo.backend(i),
                &format!("b{i}"),
                backend_addr(i),
                Reply::NamedEcho,
            )
        })
        .collect::<Vec<_>>();
    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let mut agent = start_agent(&topo, &dir, &pins, &state, AGENT_ARGS);
    add_vip(&agent, 2, &[]);
    agent.ok(&["vip", "add", UDP_VIP]);
    for i in 0..2 {
        agent.ok(&["backend", "add", UDP_VIP, &backend_addr(i).to_string()]);
    }
    let udp_vip = vip_addr();
    let mut traffic = Traffic::start(
        &topo,
        &TrafficPlan {
            new_tcp_every: Duration::from_millis(5),
            udp: Some((udp_vip, Duration::from_millis(5))),
            new_flow_limit: Duration::from_millis(900),
        },
    );
    thread::sleep(Duration::from_millis(300));
    let warm_up = traffic.failures();
    assert!(warm_up.is_empty(), "before any restart: {warm_up:#?}");
    let no_backend_before = global_counter(&agent, "no_backend");

    let mut failed_per_round = Vec::new();
    for round in 0..RESTARTS {
        let failed_before = traffic.failures().len();
        let status = agent.stop();
        assert!(
            status.success(),
            "clean stop {round}: {status}\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(200));
        agent = start_agent(&topo, &dir, &pins, &state, AGENT_ARGS);
        assert!(
            agent.log().contains("adopted"),
            "round {round}: the new agent adopts the running data path:\n{}",
            agent.log()
        );
        // Past the 900 ms every flow started during the restart may take.
        thread::sleep(Duration::from_millis(1200));
        failed_per_round.push(traffic.failures().len() - failed_before);
    }
    let no_backend_after = global_counter(&agent, "no_backend");
    let (echoed, tcp, udp, failures) = traffic.finish();
    eprintln!(
        "{RESTARTS} restarts: {echoed} lines echoed on the long stream, {tcp} new TCP \
         connections, {udp} new UDP flows; failed flows per restart: {failed_per_round:?}; \
         no_backend {no_backend_before} -> {no_backend_after}"
    );
    assert!(
        failures.is_empty(),
        "failed flows per restart {failed_per_round:?}: {failures:#?}"
    );
    assert_eq!(
        no_backend_after, no_backend_before,
        "packets dropped for want of a backend during the restarts"
    );
    assert!(
        echoed > 100 && tcp > 300 && udp > 300,
        "traffic ran: {echoed} lines, {tcp} connections, {udp} UDP flows"
    );
    assert_eq!(
        agent.tracked_backend(traffic.stream_local),
        addr_of(&traffic.stream_backend).as_str(),
        "the long stream's flow is still tracked on the backend answering it"
    );
}

/// A restarted agent programs what its state says, not what the pinned maps happen to hold:
/// a VIP the state file no longer has (the file was lost) stops being balanced.
#[test]
fn adoption_removes_vips_the_state_no_longer_has() {
    let topo = topology(1);
    let dir = TempDir::new(SUITE, "ghost");
    let state = dir.join("state.json");
    let _servers = line_servers(&topo, 1);
    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let mut agent = start_agent(&topo, &dir, &pins, &state, &["--keep-attached"]);
    add_vip(&agent, 1, &[]);
    assert_eq!(connect_many(&topo, 2), ["b0", "b0"]);
    let status = agent.stop();
    assert!(status.success(), "{status}\n{}", agent.log());
    assert_eq!(
        connect_many(&topo, 1),
        ["b0"],
        "the kept data path forwards on its own"
    );

    fs::remove_file(&state).expect("removing the state file");
    agent = start_agent(&topo, &dir, &pins, &state, &["--keep-attached"]);
    let vips = agent.json(&["vip", "list", "--json"]);
    assert_eq!(vips, serde_json::json!([]), "no VIP is configured");
    let to = vip_addr();
    let answered = topo
        .client()
        .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(1)))
        .expect("client namespace");
    assert!(
        answered.is_err(),
        "the VIP the state no longer has is not balanced any more"
    );
}

/// A bpffs mounted by the test in its own (the host's) mount namespace; unmounted on drop.
struct HostBpffs(PathBuf);

impl HostBpffs {
    fn mount(at: PathBuf) -> Self {
        fs::create_dir_all(&at).expect("creating the bpffs mount point");
        nix::mount::mount(
            Some("bpf"),
            &at,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mounting bpffs on {}: {e}", at.display()));
        Self(at)
    }
}

impl Drop for HostBpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// `xlb run --keep-attached` through `ip netns exec LB-NAMESPACE`, logging to a fresh file.
fn agent_under_ip_netns_exec(
    topo: &Topology,
    dir: &TempDir,
    pins: &KeptPins<'_>,
    extra: &[&str],
) -> (Command, PathBuf) {
    let log = dir.join(&format!("agent-{}.log", common::seq()));
    let mut ip = Command::new("ip");
    ip.args(["netns", "exec", topo.lb().name(), XLB]);
    let mut cmd = common::agent_command(
        ip,
        &lb_ifaces(topo),
        &pins.socket,
        &dir.join("state.json"),
        &pins.dir,
        &log,
    );
    cmd.args(["--ring-size", &RING.to_string(), "--keep-attached"])
        .args(extra)
        .env_remove("XLB_SOCKET");
    (cmd, log)
}

/// `ip netns exec` runs the agent in a mount namespace of its own with `/sys` mounted
/// afresh: a bpffs the agent mounts there, with every pin on it, goes when the agent exits.
/// `--keep-attached` must refuse that (and say what to do) instead of promising a data path
/// that vanishes; on a bpffs mounted in the host's namespace it must keep the data path.
#[test]
fn keep_attached_under_ip_netns_exec() {
    let topo = topology(1);
    let dir = TempDir::new(SUITE, "netns-exec");
    let _servers = line_servers(&topo, 1);

    let private = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let (cmd, _) = agent_under_ip_netns_exec(&topo, &dir, &private, &[]);
    let mut cmd = cmd;
    let out = output_within(&mut cmd, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--keep-attached on a bpffs private to `ip netns exec` must be refused:\n{stderr}"
    );
    let error = stderr
        .lines()
        .find(|l| l.starts_with("xlb: "))
        .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    let wanted_nsenter = format!("nsenter --net=/run/netns/{}", topo.lb().name());
    assert!(
        error.contains(&wanted_nsenter) && error.contains("--bpffs"),
        "the error says how to fix it: {error}"
    );
    for ifname in lb_ifaces(&topo) {
        assert!(
            !xlb_attached(topo.lb(), &ifname),
            "nothing attached to {ifname} by a refused start"
        );
    }

    // A bpffs mounted where the host sees it outlives the agent's mount namespace.
    let host_bpffs = HostBpffs::mount(dir.join("bpf"));
    let pins = KeptPins::at(topo.lb(), host_bpffs.0.join("pins"), dir.join("xlb.sock"));
    let (cmd, log) = agent_under_ip_netns_exec(&topo, &dir, &pins, &[]);
    let mut process = AgentProcess::start(
        cmd,
        log,
        Duration::from_secs(15),
        Duration::from_millis(20),
        common::vip_list_probe(|args| xlb(topo.lb(), &pins.socket, args)),
    );
    ok(topo.lb(), &pins.socket, &["vip", "add", VIP]);
    ok(
        topo.lb(),
        &pins.socket,
        &["backend", "add", VIP, &backend_addr(0).to_string()],
    );
    assert_eq!(connect_many(&topo, 3), ["b0", "b0", "b0"]);
    let status = process.stop();
    assert!(status.success(), "{status}\n{}", process.log());
    assert!(pins.dir.exists(), "the pins outlive the agent");
    for ifname in lb_ifaces(&topo) {
        assert!(
            xlb_attached(topo.lb(), &ifname),
            "still attached to {ifname} after the agent exited"
        );
    }
    assert_eq!(
        connect_many(&topo, 3),
        ["b0", "b0", "b0"],
        "the data path forwards on its own"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Metrics

#[test]
fn metrics_scrape() {
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "metrics");
    let _servers = line_servers(&topo, 2);
    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let agent = start_agent(&topo, &dir, &pins, &dir.join("state.json"), &[]);
    add_vip(&agent, 2, &[]);
    let reached = connect_many(&topo, 20);
    assert!(reached.iter().any(|b| b == "b0") && reached.iter().any(|b| b == "b1"));
    // Closed connections may still have a last ACK in flight: compare only a scrape taken
    // between two identical stats snapshots.
    let (stats, m) = (0..20)
        .find_map(|_| {
            thread::sleep(Duration::from_millis(100));
            let before = agent.json(&["stats", "--json"]);
            let m = scrape(&topo);
            let after = agent.json(&["stats", "--json"]);
            (before == after).then_some((before, m))
        })
        .expect("counters settle");
    let vips = stats["vips"].as_array().expect("vips");
    assert_eq!(vips.len(), 1, "{stats:#}");
    let backends = vips[0]["backends"].as_array().expect("backends");
    assert_eq!(backends.len(), 2);
    for b in backends {
        let addr = b["addr"].as_str().expect("addr");
        let labels = [("vip", VIP), ("backend", addr)];
        let packets = u64_of(b, "packets");
        assert!(packets > 0, "{b}");
        assert_eq!(
            sample(&m, "xlb_packets_total", &labels),
            Some(packets as f64),
            "xlb_packets_total for {addr} vs stats {b}"
        );
        assert_eq!(
            sample(&m, "xlb_new_flows_total", &labels),
            Some(u64_of(b, "new_flows") as f64)
        );
        assert_eq!(sample(&m, "xlb_backend_up", &labels), Some(1.0));
        assert_eq!(
            sample(&m, "xlb_backend_ring_slots", &labels),
            Some(u64_of(b, "slots") as f64)
        );
    }
    assert_eq!(
        sample(&m, "xlb_vip_packets_total", &[("vip", VIP)]),
        Some(u64_of(&vips[0], "packets") as f64)
    );
    let redirects = sample(&m, "xlb_xdp_actions_total", &[("action", "redirect")])
        .unwrap_or_else(|| panic!("no redirect counter: {:?}", m.samples));
    assert!(redirects > 0.0, "{redirects}");
    let global = stats["global"].as_array().expect("global");
    let xdp_redirect = global
        .iter()
        .find(|c| c["name"] == "xdp_redirect")
        .expect("xdp_redirect counter");
    assert_eq!(redirects, u64_of(xdp_redirect, "value") as f64);

    // Bound to the LB namespace's loopback: not reachable from the client, neither at the
    // LB's address nor at the client's own loopback.
    let lb_addr = topo.client_link.a.ip4();
    for addr in [
        v4(lb_addr, METRICS_PORT),
        v4(Ipv4Addr::LOCALHOST, METRICS_PORT),
    ] {
        let reached = topo
            .client()
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
            .expect("client namespace");
        assert!(
            reached.is_err(),
            "metrics must not be reachable from the client namespace at {addr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Config file and reload

fn config_text(backends: &[(usize, u32)]) -> String {
    let mut text = format!("# xlb test config\n[[vip]]\naddress = \"{VIP}\"\n");
    for (i, weight) in backends {
        text.push_str(&format!(
            "\n[[vip.backend]]\naddress = \"{}\"\nweight = {weight}\n",
            backend_addr(*i)
        ));
    }
    text
}

/// Runs `xlb config check FILE` (no agent needed).
fn config_check(file: &Path) -> Output {
    let mut cmd = Command::new(XLB);
    cmd.args(["config", "check"]).arg(file);
    output_within(&mut cmd, Duration::from_secs(20))
}

/// A copy of `text` with backend `i`'s address made invalid; the file, its broken line (1-based)
/// and the column (1-based) of the value's opening quote.
fn broken(text: &str, i: usize) -> (String, usize, usize) {
    let good = format!("address = \"{}\"", backend_addr(i));
    let line = text
        .lines()
        .position(|l| l == good)
        .expect("the backend's line")
        + 1;
    let bad = text.replace(&good, &good.replace(".2:8080", ".300:8080"));
    (bad, line, good.find('"').expect("quote") + 1)
}

/// Asserts `out` failed with one stderr line naming `file:line:` and a column on that line.
fn assert_located(out: &Output, file: &Path, line: usize, quote_col: usize) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    let prefix = format!("{}:{line}:", file.display());
    let at = lines[0]
        .find(&prefix)
        .unwrap_or_else(|| panic!("{prefix} missing from {stderr}"));
    let col: usize = lines[0][at + prefix.len()..]
        .split(':')
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no column after {prefix}: {stderr}"));
    assert!(
        col == quote_col || col == quote_col + 1,
        "column {col} points at the value (quote at {quote_col}): {stderr}"
    );
    assert!(lines[0].contains("10.11.1.300:8080"), "{stderr}");
}

#[test]
fn config_and_reload() {
    let topo = topology(3);
    let dir = TempDir::new(SUITE, "config");
    let mut servers = line_servers(&topo, 3);
    let file = dir.join("xlb.toml");
    let text = config_text(&[(0, 1), (1, 1)]);
    fs::write(&file, &text).expect("writing config");
    let out = config_check(&file);
    assert!(
        out.status.success(),
        "{}",
        describe(&["config", "check"], &out)
    );

    let broken_file = dir.join("broken.toml");
    let (bad, line, col) = broken(&text, 1);
    fs::write(&broken_file, &bad).expect("writing config");
    assert_located(&config_check(&broken_file), &broken_file, line, col);

    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let file_arg = file.to_str().expect("utf-8 path").to_owned();
    let mut agent = start_agent(
        &topo,
        &dir,
        &pins,
        &dir.join("state.json"),
        &["--config", &file_arg],
    );
    let list = agent.backends();
    assert_eq!(
        list.keys().cloned().collect::<Vec<_>>(),
        vec![backend_addr(0).to_string(), backend_addr(1).to_string()]
    );
    let reached = connect_many(&topo, 20);
    assert!(
        reached.iter().all(|b| b == "b0" || b == "b1")
            && reached.iter().any(|b| b == "b0")
            && reached.iter().any(|b| b == "b1"),
        "{reached:?}"
    );
    let mut conns = conns_to(&topo, &["b0", "b1"]);

    // Add a backend and change a weight.
    fs::write(&file, config_text(&[(0, 2), (1, 1), (2, 1)])).expect("writing config");
    let out = agent.ok(&["reload"]);
    let got: BTreeSet<&str> = out.lines().collect();
    let expected: BTreeSet<String> = [
        format!("+ backend {VIP} {} weight 1 active", backend_addr(2)),
        format!("~ backend {VIP} {} weight 2 active", backend_addr(0)),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        got,
        expected.iter().map(String::as_str).collect(),
        "reload lists exactly the changes:\n{out}"
    );
    for c in conns.values_mut() {
        c.must_echo();
        assert_eq!(agent.tracked_backend(c.local), addr_of(&c.backend).as_str());
    }
    let list = agent.backends();
    let weights: Vec<(String, u64)> = list
        .iter()
        .map(|(a, b)| (a.clone(), u64_of(b, "weight")))
        .collect();
    assert_eq!(
        weights,
        vec![
            (backend_addr(0).to_string(), 2),
            (backend_addr(1).to_string(), 1),
            (backend_addr(2).to_string(), 1)
        ]
    );
    assert!(list.values().all(|b| u64_of(b, "slots") > 0), "{list:#?}");
    let reached = connect_many(&topo, 30);
    assert!(
        reached.iter().any(|b| b == "b2"),
        "b2 takes traffic: {reached:?}"
    );

    // SIGHUP after another edit.
    fs::write(&file, config_text(&[(0, 2), (1, 5), (2, 1)])).expect("writing config");
    agent.signal(libc::SIGHUP);
    let b1 = backend_addr(1).to_string();
    agent.wait_backends("SIGHUP applies the edit", Duration::from_secs(5), |l| {
        l[&b1]["weight"] == 5
    });
    for c in conns.values_mut() {
        c.must_echo();
    }

    // A broken file: the reload fails with the location and changes nothing.
    let before = agent.json(&["vip", "list", "--json"]);
    let (bad, line, col) = broken(&fs::read_to_string(&file).expect("config"), 1);
    fs::write(&file, bad).expect("writing config");
    let out = agent.run(&["reload"]);
    assert_located(&out, &file, line, col);
    // SIGHUP with the broken file: logged, nothing changes, the agent keeps running.
    agent.signal(libc::SIGHUP);
    thread::sleep(Duration::from_millis(300));
    let after = agent.json(&["vip", "list", "--json"]);
    let config = |v: &Value| -> Vec<(String, u64, String, u64)> {
        v[0]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| {
                (
                    b["addr"].as_str().expect("addr").to_owned(),
                    u64_of(b, "weight"),
                    b["state"].as_str().expect("state").to_owned(),
                    u64_of(b, "slots"),
                )
            })
            .collect()
    };
    assert_eq!(
        config(&before),
        config(&after),
        "a failed reload changes nothing"
    );
    for c in conns.values_mut() {
        c.must_echo();
    }
    let status = agent.stop();
    assert!(status.success(), "{status}");
    servers.clear();
}

/// `[[vip]]` tables for VIPs `10.100.0.2..` without backends.
fn empty_vips(range: std::ops::Range<u8>) -> String {
    range
        .map(|i| format!("\n[[vip]]\naddress = \"10.100.0.{i}:80/tcp\"\n"))
        .collect()
}

/// A reload the agent cannot hold whole (more VIPs than `--max-vips`, which `config check`
/// cannot know) is refused before anything changes; one that changes many things at once
/// applies all of them; a state file beyond the limits is refused at start, nothing written.
#[test]
fn reload_applies_whole_or_not_at_all() {
    let topo = topology(3);
    let dir = TempDir::new(SUITE, "reload-whole");
    let mut servers = line_servers(&topo, 3);
    let file = dir.join("xlb.toml");
    let state = dir.join("state.json");
    // The test VIP and three more: all four slots of `--max-vips 4`.
    fs::write(&file, config_text(&[(0, 1), (1, 1)]) + &empty_vips(2..5)).expect("config");
    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let file_arg = file.to_str().expect("utf-8 path").to_owned();
    let mut agent = start_agent(
        &topo,
        &dir,
        &pins,
        &state,
        &["--config", &file_arg, "--max-vips", "4"],
    );
    // Something to persist, so the state file exists.
    agent.ok(&[
        "backend",
        "set",
        VIP,
        &backend_addr(1).to_string(),
        "--weight",
        "2",
        "--force",
    ]);
    let saved = fs::read(&state).expect("state file");
    let before = agent.json(&["vip", "list", "--json"]);
    assert_eq!(before.as_array().map(Vec::len), Some(4), "{before:#}");

    // Seven VIPs, a new backend and a changed weight: `config check` passes it.
    fs::write(
        &file,
        config_text(&[(0, 1), (1, 1), (2, 1)]) + &empty_vips(2..8),
    )
    .expect("config");
    let out = config_check(&file);
    assert!(
        out.status.success(),
        "{}",
        describe(&["config", "check"], &out)
    );
    let out = agent.run(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", describe(&["reload"], &out));
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("7 VIPs")
            && stderr.contains("4 VIP slots")
            && stderr.contains("--max-vips"),
        "the error names the limit: {stderr}"
    );
    assert_eq!(
        agent.json(&["vip", "list", "--json"]),
        before,
        "a refused reload changes nothing"
    );
    assert_eq!(
        fs::read(&state).expect("state file"),
        saved,
        "state file unchanged"
    );
    let reached = connect_many(&topo, 20);
    assert!(
        reached.iter().all(|b| b == "b0" || b == "b1")
            && reached.iter().any(|b| b == "b0")
            && reached.iter().any(|b| b == "b1"),
        "{reached:?}"
    );

    // Many changes at once: a weight, a backend in, one out, one draining, two VIPs gone, one
    // new VIP with a backend and a timeout.
    let b1 = backend_addr(1);
    let text = format!(
        "{}\n[[vip.backend]]\naddress = \"{}\"\nstate = \"draining\"\n{}\n[[vip]]\naddress = \"10.100.0.9:80/tcp\"\ntcp_timeout = 30\n\n[[vip.backend]]\naddress = \"{b1}\"\n",
        config_text(&[(0, 3), (2, 1)]),
        backend_addr(1),
        empty_vips(2..3),
    );
    fs::write(&file, text).expect("config");
    agent.ok(&["reload"]);
    let list = agent.json(&["vip", "list", "--json"]);
    let vips: BTreeSet<&str> = list
        .as_array()
        .expect("vips")
        .iter()
        .map(|v| v["vip"].as_str().expect("vip"))
        .collect();
    assert_eq!(
        vips,
        BTreeSet::from([VIP, "10.100.0.2:80/tcp", "10.100.0.9:80/tcp"]),
        "{list:#}"
    );
    let backends: Vec<(String, u64, String)> = agent
        .backends()
        .iter()
        .map(|(a, b)| {
            (
                a.clone(),
                u64_of(b, "weight"),
                b["state"].as_str().expect("state").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        backends,
        vec![
            (backend_addr(0).to_string(), 3, "active".to_owned()),
            (backend_addr(1).to_string(), 1, "draining".to_owned()),
            (backend_addr(2).to_string(), 1, "active".to_owned()),
        ]
    );
    let new_vip = agent.json(&["backend", "list", "10.100.0.9:80/tcp", "--json"]);
    assert_eq!(new_vip["idle_timeout_s"], 30, "{new_vip:#}");
    assert_eq!(
        new_vip["backends"][0]["addr"],
        b1.to_string(),
        "{new_vip:#}"
    );
    let reached = connect_many(&topo, 30);
    assert!(
        reached.iter().all(|b| b == "b0" || b == "b2") && reached.iter().any(|b| b == "b2"),
        "{reached:?}"
    );
    let persisted: Value =
        serde_json::from_slice(&fs::read(&state).expect("state file")).expect("state is JSON");
    assert_eq!(
        persisted["vips"].as_array().map(Vec::len),
        Some(3),
        "{persisted:#}"
    );
    let status = agent.stop();
    assert!(status.success(), "{status}");

    // At start: a state file of five VIPs with `--max-vips 4` is refused in one line.
    let mut five = persisted.clone();
    for i in 20..22 {
        five["vips"]
            .as_array_mut()
            .expect("vips")
            .push(serde_json::json!({ "vip": format!("10.100.0.{i}:80/tcp"), "backends": [] }));
    }
    let big_state = dir.join("big-state.json");
    fs::write(&big_state, five.to_string()).expect("state");
    let log = dir.join("refused.log");
    let mut cmd = common::agent_command(
        topo.lb().command(XLB),
        &lb_ifaces(&topo),
        &pins.socket,
        &big_state,
        &pins.dir,
        &log,
    );
    cmd.args(["--ring-size", &RING.to_string(), "--max-vips", "4"])
        .env_remove("XLB_SOCKET");
    let out = output_within(&mut cmd, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("xlb: ")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("5 VIPs") && errors[0].contains("--max-vips"),
        "{stderr}"
    );
    for ifname in lb_ifaces(&topo) {
        assert!(
            !xlb_attached(topo.lb(), &ifname),
            "{ifname}: nothing attached"
        );
    }
    servers.clear();
}

// ---------------------------------------------------------------------------------------------
// 6. A full disk under the state file

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs(TempDir);

impl Tmpfs {
    fn mount(tag: &str, size: &str) -> Self {
        let dir = TempDir::new(SUITE, tag);
        nix::mount::mount(
            Some("tmpfs"),
            &dir.0,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap_or_else(|e| panic!("mounting a tmpfs on {}: {e}", dir.0.display()));
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn persisting_state_survives_a_full_disk() {
    let topo = topology(1);
    let dir = TempDir::new(SUITE, "fulldisk");
    let _server = server(&topo, 0, Reply::NamedEcho);
    let disk = Tmpfs::mount("fulldisk-fs", "16k");
    let state = disk.0.join("state.json");
    let pins = KeptPins::new(topo.lb(), SUITE, dir.join("xlb.sock"));
    let agent = start_agent(&topo, &dir, &pins, &state, &["--no-metrics"]);
    add_vip(&agent, 1, &[]);
    let saved = fs::read(&state).expect("state file written");
    let parsed: Value = serde_json::from_slice(&saved).expect("state is JSON");
    assert_eq!(
        parsed["vips"].as_array().map(Vec::len),
        Some(1),
        "{parsed:#}"
    );

    // Fill the file system.
    let filler = disk.0.join("filler");
    {
        let mut f = fs::File::create(&filler).expect("filler");
        let block = [0u8; 4096];
        let mut written = 0;
        while f.write_all(&block).is_ok() {
            written += 1;
            assert!(written < 64, "a 16k tmpfs took {written} 4k blocks");
        }
    }

    let args = ["vip", "add", "10.100.0.1:81/tcp"];
    let out = agent.run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", describe(&args, &out));
    assert!(
        stderr.contains(state.to_str().expect("utf-8 path")),
        "the error names the state file: {}",
        describe(&args, &out)
    );
    assert_eq!(
        fs::read(&state).expect("state file still there"),
        saved,
        "the previous state file is intact"
    );
    assert!(
        !disk.0.join("state.json.tmp").exists(),
        "no temporary file left behind"
    );
    // The agent keeps serving.
    let list = agent.json(&["vip", "list", "--json"]);
    assert!(list.as_array().is_some_and(|v| !v.is_empty()), "{list:#}");
    let reached = connect_many(&topo, 5);
    assert!(reached.iter().all(|b| b == "b0"), "{reached:?}");

    // Room again: the next change is persisted, with everything applied so far.
    fs::remove_file(&filler).expect("removing filler");
    agent.ok(&["vip", "del", "10.100.0.1:81/tcp"]);
    let parsed: Value =
        serde_json::from_slice(&fs::read(&state).expect("state file")).expect("state is JSON");
    assert_eq!(
        parsed["vips"].as_array().map(Vec::len),
        Some(1),
        "{parsed:#}"
    );
    assert_eq!(parsed["vips"][0]["vip"], VIP, "{parsed:#}");
}
