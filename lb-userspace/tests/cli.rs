//! Every `xlb` verb end to end against a running agent in a network-namespace topology:
//! what the CLI prints, what the counters say about real traffic, whether `explain` names
//! the backend a connection really reached, whether the state survives a restart, and how
//! bad input is refused.
//!
//! Needs root (namespaces, XDP). Each test builds its own topology, temp dir and bpffs
//! directory, so the tests run in parallel with each other and with other test binaries.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    thread,
    time::Duration,
};

use serde_json::Value;
use xlb_netns::{Netns, Topology};

mod common;
use common::{
    Agent, AgentBuilder, Backend, Reply, TempDir, WorldReadableCopy, XLB, backend_v4, describe,
    output_within, require_root, v4, xlb, xlb_attached,
};

/// A small prime ring keeps map setup quick; the tests check it is what the agent reports.
const RING: u64 = 1009;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
/// Names of temp dirs and pins start `xlb-cli-`.
const SUITE: &str = "cli";

/// The three-namespace topology; `Network::connect` already turns TX checksum offload off on
/// every end: a veth leaves only the pseudo-header sum in the L4 checksum
/// (`CHECKSUM_PARTIAL`), XDP on the LB updates that incrementally and redirects raw bytes,
/// losing the mark, so the receiver would drop every rewritten segment. Real NICs fill the
/// checksum in before the wire.
fn topology(backends: usize) -> Topology {
    require_root();
    Topology::new(backends).expect("topology")
}

/// The LB interfaces of `topo`: the client's link and every backend's.
fn lb_ifaces(topo: &Topology) -> Vec<String> {
    std::iter::once(&topo.client_link)
        .chain(&topo.backend_links)
        .map(|l| l.a.ifname.clone())
        .collect()
}

/// An agent in `ns` on `ifaces` with its socket and log in `dir`, restoring `state`, on the
/// small test ring.
fn agent_in<'a>(ns: &'a Netns, ifaces: &[String], dir: &TempDir, state: &Path) -> AgentBuilder<'a> {
    Agent::in_ns(ns, SUITE)
        .ifaces(ifaces)
        .dir(&dir.0)
        .state(state)
        .args(["--ring-size", &RING.to_string()])
}

/// Starts an agent attached to every LB interface of `topo` and waits until it answers.
fn start_agent<'a>(topo: &'a Topology, dir: &TempDir, state: &Path) -> Agent<'a> {
    agent_in(topo.lb(), &lb_ifaces(topo), dir, state).start()
}

/// Servers on backends that answer with the backend's name (`b0`, `b1`, ...); stopped
/// and joined on drop.
#[derive(Default)]
struct Servers(Vec<Backend>);

impl Servers {
    fn new() -> Self {
        Self::default()
    }

    /// A TCP server on `addr` in backend `i`'s namespace: writes the name and closes.
    fn tcp(&mut self, topo: &Topology, i: usize, addr: SocketAddr) {
        let name = format!("b{i}");
        self.0
            .push(Backend::tcp(topo.backend(i), &name, addr, Reply::Name));
    }

    /// A UDP server on `addr` in backend `i`'s namespace: answers every datagram with the name.
    fn udp(&mut self, topo: &Topology, i: usize, addr: SocketAddr) {
        let name = format!("b{i}");
        self.0
            .push(Backend::udp(topo.backend(i), &name, addr, Reply::Name));
    }
}

/// Connects from `from` (bound explicitly) to `to` and returns what the server wrote.
/// Must run inside the client's namespace.
fn tcp_ask(from: SocketAddr, to: SocketAddr) -> String {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket =
        Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP)).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket
        .bind(&from.into())
        .unwrap_or_else(|e| panic!("binding {from}: {e}"));
    socket
        .connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting {from} -> {to}: {e}"));
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .unwrap_or_else(|e| panic!("reading {from} -> {to}: {e}"));
    answer
}

/// Sends one datagram from `socket` (connected to the VIP) and waits for the answer.
fn udp_ask(socket: &UdpSocket) -> String {
    socket.send(b"ping").expect("send");
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no reply from {:?} to {:?}: {e}\nclient /proc/net/snmp:\n{}",
            socket.peer_addr().ok(),
            socket.local_addr().ok(),
            fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default()
        )
    });
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn as_u64(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

fn find_vip<'v>(list: &'v Value, vip: &str) -> &'v Value {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .find(|v| v["vip"] == vip)
        .unwrap_or_else(|| panic!("VIP {vip} missing from {list:#}"))
}

fn backends_of(status: &Value) -> &Vec<Value> {
    status["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no backends array in {status:#}"))
}

/// What a VIP is configured as (no counters): (vip, ring_size, [(addr, weight, state, slots)]).
/// (address, weight, state, slots) of one backend.
type BackendRow = (String, u64, String, u64);

fn config_of(list: &Value) -> Vec<(String, u64, Vec<BackendRow>)> {
    let mut out: Vec<_> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|v| {
            let mut bs: Vec<_> = backends_of(v)
                .iter()
                .map(|b| {
                    (
                        b["addr"].as_str().expect("addr").to_owned(),
                        as_u64(&b["weight"], "weight"),
                        b["state"].as_str().expect("state").to_owned(),
                        as_u64(&b["slots"], "slots"),
                    )
                })
                .collect();
            bs.sort();
            (
                v["vip"].as_str().expect("vip").to_owned(),
                as_u64(&v["ring_size"], "ring_size"),
                bs,
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn verbs_end_to_end() {
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "verbs");
    let agent = start_agent(&topo, &dir, &dir.join("state.json"));

    let empty = agent.ok(&["vip", "list"]);
    assert!(empty.contains("no VIPs"), "empty list says so: {empty}");
    assert_eq!(
        agent.json(&["vip", "list", "--json"]),
        serde_json::json!([])
    );

    let tcp = "10.100.0.1:80/tcp";
    let udp6 = "[fd00:100::1]:53/udp";
    let out = agent.ok(&["vip", "add", tcp]);
    assert!(out.contains(tcp), "{out}");
    agent.ok(&["vip", "add", udp6]);
    // No protocol means tcp.
    let out = agent.ok(&["vip", "add", "10.100.0.1:8443"]);
    assert!(out.contains("10.100.0.1:8443/tcp"), "{out}");

    let b0 = backend_v4(0, 8080).to_string();
    let b1 = backend_v4(1, 8080).to_string();
    let out = agent.ok(&["backend", "add", tcp, &b0, "--weight", "3"]);
    assert!(out.contains(&b0) && out.contains("weight 3"), "{out}");
    let out = agent.ok(&["backend", "add", tcp, &b1]);
    assert!(out.contains(&b1) && out.contains("weight 1"), "{out}");
    let b6 = "[fd00:11:1::2]:5353";
    agent.ok(&["backend", "add", udp6, b6, "--weight", "7"]);

    // backend list --json: weights, states, slots adding up to the ring.
    let status = agent.json(&["backend", "list", tcp, "--json"]);
    assert_eq!(status["vip"], tcp);
    assert_eq!(as_u64(&status["ring_size"], "ring_size"), RING);
    let bs = backends_of(&status);
    assert_eq!(bs.len(), 2, "{status:#}");
    let by_addr: BTreeMap<&str, &Value> = bs
        .iter()
        .map(|b| (b["addr"].as_str().expect("addr"), b))
        .collect();
    assert_eq!(by_addr[b0.as_str()]["weight"], 3);
    assert_eq!(by_addr[b1.as_str()]["weight"], 1);
    for b in bs {
        assert_eq!(b["state"], "active", "{b}");
        assert_eq!(b["packets"], 0, "{b}");
    }
    let slots0 = as_u64(&by_addr[b0.as_str()]["slots"], "slots");
    let slots1 = as_u64(&by_addr[b1.as_str()]["slots"], "slots");
    assert_eq!(slots0 + slots1, RING, "slots sum to the ring: {status:#}");
    assert!(
        slots0 > 2 * slots1 && slots1 > 0,
        "weight 3:1 gives about 3:1 slots: {slots0} vs {slots1}"
    );

    let s6 = agent.json(&["backend", "list", udp6, "--json"]);
    assert_eq!(backends_of(&s6).len(), 1);
    assert_eq!(s6["backends"][0]["addr"], b6);
    assert_eq!(s6["backends"][0]["weight"], 7);
    assert_eq!(as_u64(&s6["backends"][0]["slots"], "slots"), RING);

    // backend list, plain.
    let plain = agent.ok(&["backend", "list", tcp]);
    for needle in [
        tcp,
        &b0,
        &b1,
        "active",
        &format!("{RING} slots"),
        &slots0.to_string(),
    ] {
        assert!(
            plain.contains(needle),
            "plain backend list lacks {needle}:\n{plain}"
        );
    }

    // vip list, both forms.
    let list = agent.json(&["vip", "list", "--json"]);
    assert_eq!(list.as_array().expect("list").len(), 3, "{list:#}");
    assert_eq!(backends_of(find_vip(&list, tcp)).len(), 2);
    assert_eq!(backends_of(find_vip(&list, udp6)).len(), 1);
    let empty_vip = find_vip(&list, "10.100.0.1:8443/tcp");
    assert!(backends_of(empty_vip).is_empty());
    assert_eq!(
        empty_vip["ring_size"], 0,
        "a VIP without backends has no live ring"
    );
    let plain = agent.ok(&["vip", "list"]);
    for needle in [tcp, udp6, "10.100.0.1:8443/tcp"] {
        assert!(
            plain.contains(needle),
            "plain vip list lacks {needle}:\n{plain}"
        );
    }

    // stats, both forms, and --watch (XLB_SOCKET instead of --socket on this one).
    let stats = agent.json(&["stats", "--json"]);
    assert_eq!(
        stats["vips"].as_array().expect("vips").len(),
        3,
        "{stats:#}"
    );
    let global = stats["global"].as_array().expect("global");
    assert!(!global.is_empty(), "{stats:#}");
    assert!(
        global
            .iter()
            .all(|c| c["name"].is_string() && c["value"].is_u64()),
        "{stats:#}"
    );
    let plain = agent.ok(&["stats"]);
    assert!(
        plain.contains(tcp) && plain.contains(&b0) && plain.contains("global:"),
        "{plain}"
    );
    let watch_out = dir.join("watch.out");
    let mut watch = topo
        .lb()
        .command(XLB)
        .args(["stats", "--watch"])
        .env("XLB_SOCKET", &agent.socket)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&watch_out).expect("watch output"))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning stats --watch");
    thread::sleep(Duration::from_millis(2500));
    let still_running = watch.try_wait().expect("try_wait").is_none();
    let _ = watch.kill();
    let _ = watch.wait();
    let watched = fs::read_to_string(&watch_out).expect("watch output");
    assert!(still_running, "stats --watch exited by itself:\n{watched}");
    assert!(
        watched.matches("global:").count() >= 2 && watched.contains(tcp),
        "stats --watch refreshes:\n{watched}"
    );

    // explain, both forms.
    let client = v4(CLIENT, 40000).to_string();
    let e = agent.json(&["explain", &client, tcp, "--json"]);
    assert_eq!(e["client"], client.as_str());
    assert_eq!(e["vip"], tcp);
    assert!(as_u64(&e["ring_slot"], "ring_slot") < RING);
    assert!(e["flow_hash"].is_u64());
    let chosen = e["new_flow_backend"]
        .as_str()
        .expect("a backend for a new flow");
    assert!(chosen == b0 || chosen == b1, "{e:#}");
    assert!(e["tracked_backend"].is_null(), "no traffic yet: {e:#}");
    let plain = agent.ok(&["explain", &client, tcp]);
    assert!(plain.contains(chosen) && plain.contains("none"), "{plain}");

    // backend del: the other backend takes the whole ring; the last one leaves none.
    let out = agent.ok(&["backend", "del", tcp, &b1]);
    assert!(out.contains(&b1), "{out}");
    let status = agent.json(&["backend", "list", tcp, "--json"]);
    assert_eq!(backends_of(&status).len(), 1);
    assert_eq!(status["backends"][0]["addr"], b0.as_str());
    assert_eq!(as_u64(&status["backends"][0]["slots"], "slots"), RING);
    agent.ok(&["backend", "del", tcp, &b0]);
    let status = agent.json(&["backend", "list", tcp, "--json"]);
    assert!(backends_of(&status).is_empty(), "{status:#}");
    assert_eq!(status["ring_size"], 0);
    let e = agent.json(&["explain", &client, tcp, "--json"]);
    assert!(
        e["new_flow_backend"].is_null(),
        "no backends, no choice: {e:#}"
    );

    // vip del.
    let out = agent.ok(&["vip", "del", tcp]);
    assert!(out.contains(tcp), "{out}");
    agent.ok(&["vip", "del", "10.100.0.1:8443/tcp"]);
    let list = agent.json(&["vip", "list", "--json"]);
    assert_eq!(list.as_array().expect("list").len(), 1, "{list:#}");
    assert_eq!(list[0]["vip"], udp6);
    assert!(!agent.ok(&["vip", "list"]).contains(tcp));
}

#[test]
fn stats_match_traffic() {
    const PORTS: u16 = 8; // K distinct clients
    const PER_PORT: u16 = 5; // datagrams from each, so N = 40
    const TCP_CONNS: u16 = 12; // M
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "stats");
    let agent = start_agent(&topo, &dir, &dir.join("state.json"));
    let mut servers = Servers::new();
    for i in 0..2 {
        servers.udp(&topo, i, backend_v4(i, 5300));
        servers.tcp(&topo, i, backend_v4(i, 8080));
    }

    let udp_vip = "10.100.0.1:53/udp";
    agent.ok(&["vip", "add", udp_vip]);
    for i in 0..2 {
        agent.ok(&["backend", "add", udp_vip, &backend_v4(i, 5300).to_string()]);
    }
    let vip_addr = v4(Topology::VIP_V4, 53);
    let answers: Vec<String> = topo
        .client()
        .run(move || {
            let mut answers = Vec::new();
            for p in 0..PORTS {
                let socket = UdpSocket::bind(v4(CLIENT, 41000 + p)).expect("bind");
                socket.connect(vip_addr).expect("connect");
                socket
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .expect("timeout");
                for _ in 0..PER_PORT {
                    answers.push(udp_ask(&socket));
                }
            }
            answers
        })
        .expect("client namespace");
    let n = u64::from(PORTS * PER_PORT);
    assert_eq!(answers.len() as u64, n);
    assert!(
        answers.iter().all(|a| a == "b0" || a == "b1"),
        "{answers:?}"
    );

    let stats = agent.json(&["stats", "--json"]);
    let v = find_vip(&stats["vips"], udp_vip);
    assert_eq!(
        as_u64(&v["packets"], "packets"),
        n,
        "VIP packets == datagrams sent: {v:#}"
    );
    assert_eq!(
        as_u64(&v["new_flows"], "new_flows"),
        u64::from(PORTS),
        "one flow per source port: {v:#}"
    );
    assert!(
        as_u64(&v["bytes"], "bytes") >= n * 46,
        "bytes count frames: {v:#}"
    );
    let bs = backends_of(v);
    let sum = |field: &str| bs.iter().map(|b| as_u64(&b[field], field)).sum::<u64>();
    assert_eq!(sum("packets"), n, "{v:#}");
    assert_eq!(sum("new_flows"), u64::from(PORTS), "{v:#}");
    // Each backend's packet count is the number of answers it gave.
    for b in bs {
        let i = usize::from(b["addr"] != backend_v4(0, 5300).to_string().as_str());
        let answered = answers.iter().filter(|a| **a == format!("b{i}")).count() as u64;
        assert_eq!(as_u64(&b["packets"], "packets"), answered, "{b}");
    }

    // TCP: M connections to a fresh TCP VIP, each from its own port, are M new flows.
    let tcp_vip = "10.100.0.1:80/tcp";
    agent.ok(&["vip", "add", tcp_vip]);
    for i in 0..2 {
        agent.ok(&["backend", "add", tcp_vip, &backend_v4(i, 8080).to_string()]);
    }
    let tcp_addr = v4(Topology::VIP_V4, 80);
    topo.client()
        .run(move || {
            for p in 0..TCP_CONNS {
                let answer = tcp_ask(v4(CLIENT, 43000 + p), tcp_addr);
                assert!(answer == "b0" || answer == "b1", "answer {answer:?}");
            }
        })
        .expect("client namespace");
    let m = u64::from(TCP_CONNS);
    let stats = agent.json(&["stats", "--json"]);
    let v = find_vip(&stats["vips"], tcp_vip);
    assert_eq!(as_u64(&v["new_flows"], "new_flows"), m, "{v:#}");
    let bs = backends_of(v);
    assert_eq!(
        bs.iter()
            .map(|b| as_u64(&b["new_flows"], "new_flows"))
            .sum::<u64>(),
        m,
        "{v:#}"
    );
    // Every connection sends at least SYN, ACK and FIN-ACK ... through the LB.
    assert!(as_u64(&v["packets"], "packets") >= 3 * m, "{v:#}");
    assert_eq!(
        bs.iter()
            .map(|b| as_u64(&b["packets"], "packets"))
            .sum::<u64>(),
        as_u64(&v["packets"], "packets"),
        "{v:#}"
    );
    // The UDP VIP did not move.
    let u = find_vip(&stats["vips"], udp_vip);
    assert_eq!(as_u64(&u["packets"], "packets"), n, "{u:#}");
}

#[test]
fn explain_matches_reality() {
    const CLIENTS: u16 = 100;
    let topo = topology(3);
    let dir = TempDir::new(SUITE, "explain");
    let agent = start_agent(&topo, &dir, &dir.join("state.json"));
    let mut servers = Servers::new();
    let mut name_of = BTreeMap::new();
    for i in 0..3 {
        servers.tcp(&topo, i, backend_v4(i, 8080));
        name_of.insert(backend_v4(i, 8080).to_string(), format!("b{i}"));
    }
    let vip = "10.100.0.1:80/tcp";
    agent.ok(&["vip", "add", vip]);
    for i in 0..3 {
        agent.ok(&["backend", "add", vip, &backend_v4(i, 8080).to_string()]);
    }
    let vip_addr = v4(Topology::VIP_V4, 80);

    let mut expected = Vec::new();
    for p in 0..CLIENTS {
        let from = v4(CLIENT, 42000 + p);
        let e = agent.json(&["explain", &from.to_string(), vip, "--json"]);
        let predicted = e["new_flow_backend"]
            .as_str()
            .unwrap_or_else(|| panic!("no backend predicted: {e:#}"))
            .to_owned();
        assert!(
            e["tracked_backend"].is_null(),
            "{from} has not connected yet: {e:#}"
        );
        let answer = topo
            .client()
            .run(move || tcp_ask(from, vip_addr))
            .expect("client namespace");
        assert_eq!(
            name_of[&predicted], answer,
            "explain said {predicted} for {from}, but {answer} answered"
        );
        expected.push((from, predicted));
    }
    let reached: BTreeSet<&String> = expected.iter().map(|(_, b)| b).collect();
    assert_eq!(
        reached.len(),
        3,
        "100 clients reach all 3 backends: {reached:?}"
    );

    // The connection table now holds each flow, on the backend it reached.
    for (from, predicted) in &expected {
        let e = agent.json(&["explain", &from.to_string(), vip, "--json"]);
        assert_eq!(e["tracked_backend"], predicted.as_str(), "{e:#}");
        assert_eq!(e["new_flow_backend"], predicted.as_str(), "{e:#}");
    }
}

#[test]
fn state_survives_restart() {
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "restart");
    let state = dir.join("state").join("state.json");
    let lb_ifaces = lb_ifaces(&topo);
    let mut servers = Servers::new();
    for i in 0..2 {
        servers.tcp(&topo, i, backend_v4(i, 8080));
        servers.udp(
            &topo,
            i,
            SocketAddr::new(topo.backend_links[i].b.ip6().into(), 5353),
        );
    }
    let tcp = "10.100.0.1:80/tcp";
    let udp6 = "[fd00:100::1]:53/udp";
    let b6 = |i: usize| SocketAddr::new(topo.backend_links[i].b.ip6().into(), 5353).to_string();
    let vip_tcp = v4(Topology::VIP_V4, 80);
    let vip_udp6 = SocketAddr::new(Topology::VIP_V6.into(), 53);
    let client6 = topo.client_link.b.ip6();
    let traffic = |round: u16| {
        topo.client()
            .run(move || {
                let a = tcp_ask(v4(CLIENT, 44000 + round), vip_tcp);
                let u =
                    UdpSocket::bind(SocketAddr::new(client6.into(), 44000 + round)).expect("bind");
                u.connect(vip_udp6).expect("connect");
                u.set_read_timeout(Some(Duration::from_secs(3)))
                    .expect("timeout");
                (a, udp_ask(&u))
            })
            .expect("client namespace")
    };

    let before = {
        let mut agent = start_agent(&topo, &dir, &state);
        agent.ok(&["vip", "add", tcp]);
        agent.ok(&["vip", "add", udp6]);
        agent.ok(&["vip", "add", "10.100.0.1:9000/udp"]);
        agent.ok(&[
            "backend",
            "add",
            tcp,
            &backend_v4(0, 8080).to_string(),
            "--weight",
            "2",
        ]);
        agent.ok(&[
            "backend",
            "add",
            tcp,
            &backend_v4(1, 8080).to_string(),
            "--weight",
            "5",
        ]);
        agent.ok(&["backend", "add", udp6, &b6(0)]);
        agent.ok(&["backend", "add", udp6, &b6(1), "--weight", "3"]);
        let (a, u) = traffic(0);
        assert!(
            ["b0", "b1"].contains(&a.as_str()) && ["b0", "b1"].contains(&u.as_str()),
            "{a} {u}"
        );
        for ifname in &lb_ifaces {
            assert!(
                xlb_attached(topo.lb(), ifname),
                "xlb attached to {ifname} while the agent runs"
            );
        }
        let list = agent.json(&["vip", "list", "--json"]);
        let status = agent.stop();
        assert!(
            status.success(),
            "SIGTERM is a clean stop: {status}\n{}",
            agent.log()
        );
        assert!(!agent.bpffs.exists(), "pins removed on stop");
        assert!(!agent.socket.exists(), "socket removed on stop");
        list
    };

    let saved: Value =
        serde_json::from_slice(&fs::read(&state).expect("state file exists after stop"))
            .expect("state file is JSON");
    assert_eq!(
        saved["vips"].as_array().expect("vips").len(),
        3,
        "{saved:#}"
    );
    for ifname in &lb_ifaces {
        assert!(
            !xlb_attached(topo.lb(), ifname),
            "XDP detached from {ifname} after SIGTERM"
        );
    }

    let agent = start_agent(&topo, &dir, &state);
    let after = agent.json(&["vip", "list", "--json"]);
    assert_eq!(
        config_of(&after),
        config_of(&before),
        "same config after restart:\n{before:#}\n{after:#}"
    );
    for vip in [tcp, udp6, "10.100.0.1:9000/udp"] {
        let b = agent.json(&["backend", "list", vip, "--json"]);
        let expect = find_vip(&before, vip);
        assert_eq!(
            config_of(&Value::Array(vec![b])),
            config_of(&Value::Array(vec![expect.clone()]))
        );
    }
    let (a, u) = traffic(1);
    assert!(
        ["b0", "b1"].contains(&a.as_str()) && ["b0", "b1"].contains(&u.as_str()),
        "{a} {u}"
    );
    let stats = agent.json(&["stats", "--json"]);
    assert_eq!(
        as_u64(&find_vip(&stats["vips"], udp6)["packets"], "packets"),
        1,
        "{stats:#}"
    );
}

/// `None` if `out` is a failure with exactly one stderr line, `xlb: ...NEEDLE...`; else
/// what went wrong, for the list of failures.
fn one_line_refusal(what: &str, args: &[&str], out: &Output, needle: &str) -> Option<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let fine = !out.status.success()
        && lines.len() == 1
        && lines[0].starts_with("xlb: ")
        && lines[0].contains(needle);
    (!fine).then(|| {
        format!(
            "{what}: expected a failure with one stderr line \"xlb: ...{needle}...\"; {}",
            describe(args, out)
        )
    })
}

/// Bad addresses, options and config files, each refused with one line naming the problem.
fn refused_commands(topo: &Topology, agent: &Agent<'_>, dir: &TempDir) -> Vec<String> {
    let (vip, vip6) = ("10.100.0.1:80/tcp", "[fd00:100::1]:80/tcp");
    let b0 = backend_v4(0, 8080).to_string();
    // The LB's own addresses in its namespace (backends in other namespaces are fine).
    let lb_backend_side = topo.backend_links[1].a.ip4().to_string();
    let lb_client_side6 = topo.client_link.a.ip6().to_string();
    let own_v4 = format!("{lb_backend_side}:8080");
    let own_v6 = format!("[{lb_client_side6}]:8080");
    let own_iface = format!("on {}", topo.backend_links[1].a.ifname);
    // Config files `xlb config check` refuses, one line naming FILE:LINE:COLUMN.
    let udp_tcp_probe = dir.join("udp-tcp-probe.toml");
    fs::write(
        &udp_tcp_probe,
        "[[vip]]\naddress = \"10.100.0.1:53/udp\"\n[vip.health]\nprobe = \"tcp\"\n",
    )
    .expect("writing a config");
    let loopback_backend = dir.join("loopback-backend.toml");
    fs::write(
        &loopback_backend,
        "[[vip]]\naddress = \"10.100.0.1:80/tcp\"\n[[vip.backend]]\naddress = \"127.0.0.1:8080\"\n",
    )
    .expect("writing a config");
    let udp_tcp_probe_path = udp_tcp_probe.display().to_string();
    let loopback_backend_path = loopback_backend.display().to_string();

    let lb = topo.lb();
    let s = agent.socket.as_path();
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "octet out of range",
            &["vip", "add", "10.0.0.300:80"],
            "10.0.0.300:80",
        ),
        ("not an address", &["vip", "add", "nonsense"], "nonsense"),
        (
            "port out of range",
            &["vip", "add", "[::1]:99999"],
            "[::1]:99999",
        ),
        (
            "bad backend address",
            &["backend", "add", vip, "10.11.0.300:80"],
            "10.11.0.300:80",
        ),
        (
            "bad client for explain",
            &["explain", "nonsense", vip],
            "nonsense",
        ),
        (
            "an IPv6 client of an IPv4 VIP is called a client",
            &["explain", "[fd00::9]:4000", vip],
            "client [fd00::9]:4000 and VIP 10.100.0.1:80/tcp are of different address families",
        ),
        (
            "a ring size that is not prime, before anything is loaded",
            &["run", "--iface", "lo", "--ring-size", "65536"],
            "65536 is not prime",
        ),
        (
            "unknown protocol",
            &["vip", "add", "10.100.0.1:80/sctp"],
            "sctp",
        ),
        ("port 0", &["vip", "add", "10.100.0.1:0/tcp"], "port 0"),
        (
            "unknown VIP",
            &["backend", "add", "10.100.0.9:80/tcp", &b0],
            "no VIP 10.100.0.9:80/tcp",
        ),
        (
            "duplicate backend",
            &["backend", "add", vip, &b0],
            "already behind",
        ),
        ("duplicate VIP", &["vip", "add", vip], "already exists"),
        (
            "family mismatch",
            &["backend", "add", vip, "[fd00:11::2]:8080"],
            "address families",
        ),
        (
            "weight too big",
            &["backend", "add", vip, "10.11.1.2:8080", "--weight", "1001"],
            "weight",
        ),
        (
            "unknown backend",
            &["backend", "del", vip, "10.11.1.2:8080"],
            "not behind",
        ),
        (
            "unknown VIP del",
            &["vip", "del", "10.100.0.9:80/tcp"],
            "no VIP",
        ),
        (
            "unknown container",
            &[
                "backend",
                "add",
                vip,
                "--container",
                "xlb-no-such-container",
            ],
            "xlb-no-such-container",
        ),
        // Health checks that do not speak the VIP's protocol would fail every backend.
        (
            "tcp health check on a UDP VIP",
            &["vip", "add", "10.100.0.1:53/udp", "--health", "tcp"],
            "a tcp health check cannot probe UDP VIP 10.100.0.1:53/udp",
        ),
        (
            "http health check on a UDP VIP",
            &["vip", "add", "10.100.0.1:53/udp", "--health", "http"],
            "a http health check cannot probe UDP VIP",
        ),
        (
            "udp health check on a TCP VIP",
            &["vip", "add", "10.100.0.1:81/tcp", "--health", "udp"],
            "a udp health check cannot probe TCP VIP",
        ),
        (
            "udp payload on a tcp health check",
            &[
                "vip",
                "add",
                "10.100.0.1:81/tcp",
                "--health",
                "tcp",
                "--health-payload",
                "ping",
            ],
            "only apply to --health udp",
        ),
        (
            "Host header on a tcp health check",
            &[
                "vip",
                "add",
                "10.100.0.1:81/tcp",
                "--health",
                "tcp",
                "--health-host",
                "web.example",
            ],
            "--health-host only applies to --health http",
        ),
        (
            "Host header that could end the header line",
            &[
                "vip",
                "add",
                "10.100.0.1:81/tcp",
                "--health",
                "http",
                "--health-host",
                "web.example\r\nX-Injected: 1",
            ],
            "the HTTP health check host must be a name or address",
        ),
        (
            "udp payload not hex",
            &[
                "vip",
                "add",
                "10.100.0.1:53/udp",
                "--health",
                "udp",
                "--health-payload-hex",
                "xyz",
            ],
            "--health-payload-hex",
        ),
        (
            "udp check without reply probing faster than ICMP is sent",
            &[
                "vip",
                "add",
                "10.100.0.1:53/udp",
                "--health",
                "udp",
                "--health-interval-ms",
                "500",
                "--health-timeout-ms",
                "100",
            ],
            "at least 1000 ms",
        ),
        // Idle timeouts: the VIP's own protocol's, in range.
        (
            "tcp timeout on a UDP VIP",
            &["vip", "add", "10.100.0.1:53/udp", "--tcp-timeout", "30"],
            "10.100.0.1:53/udp is a udp VIP: give it --udp-timeout",
        ),
        (
            "udp timeout on a TCP VIP",
            &["vip", "add", "10.100.0.1:81/tcp", "--udp-timeout", "30"],
            "10.100.0.1:81/tcp is a tcp VIP: give it --tcp-timeout",
        ),
        (
            "tcp timeout shorter than a closing connection's",
            &["vip", "add", "10.100.0.1:81/tcp", "--tcp-timeout", "9"],
            "--tcp-timeout: a tcp idle timeout must be between 10 and 604800 seconds, got 9",
        ),
        (
            "udp timeout 0",
            &["vip", "add", "10.100.0.1:53/udp", "--udp-timeout", "0"],
            "between 1 and 604800 seconds, got 0",
        ),
        (
            "udp timeout not a number",
            &["vip", "add", "10.100.0.1:53/udp", "--udp-timeout", "1m"],
            "--udp-timeout",
        ),
        // VIPs that can never work, or that alias the live VIP.
        (
            "unspecified VIP",
            &["vip", "add", "0.0.0.0:80"],
            "unspecified",
        ),
        (
            "unspecified VIP v6",
            &["vip", "add", "[::]:80"],
            "unspecified",
        ),
        (
            "broadcast VIP",
            &["vip", "add", "255.255.255.255:80/udp"],
            "broadcast",
        ),
        (
            "multicast VIP",
            &["vip", "add", "239.1.1.1:5000/udp"],
            "multicast",
        ),
        ("loopback VIP", &["vip", "add", "127.0.0.1:80"], "loopback"),
        (
            "link-local VIP",
            &["vip", "add", "[fe80::1]:80"],
            "link-local",
        ),
        (
            "IPv4-mapped alias of the VIP",
            &["vip", "add", "[::ffff:10.100.0.1]:80/tcp"],
            "IPv4-mapped IPv6 address: the data plane stores it as 10.100.0.1:80",
        ),
        (
            "scope-id alias of the VIP",
            &["vip", "add", "[fd00:100::1%1]:80/tcp"],
            "scope id (%1)",
        ),
        (
            "VIP on a backend's address",
            &["vip", "add", "10.11.0.2:9000/tcp"],
            "is the address of backend 10.11.0.2:8080 of VIP 10.100.0.1:80/tcp",
        ),
        // Backends that can never work.
        (
            "the VIP as its own backend",
            &["backend", "add", vip, "10.100.0.1:80"],
            "is the address of VIP 10.100.0.1:80/tcp",
        ),
        (
            "the VIP's address on another port",
            &["backend", "add", vip, "10.100.0.1:8080"],
            "is the address of VIP 10.100.0.1:80/tcp",
        ),
        (
            "another VIP's address",
            &["backend", "add", vip, "10.100.0.2:8080"],
            "is the address of VIP 10.100.0.2:53/udp",
        ),
        (
            "the IPv6 VIP as its own backend",
            &["backend", "add", vip6, "[fd00:100::1]:8080"],
            "is the address of VIP [fd00:100::1]:80/tcp",
        ),
        (
            "unspecified backend",
            &["backend", "add", vip, "0.0.0.0:8080"],
            "unspecified",
        ),
        (
            "broadcast backend",
            &["backend", "add", vip, "255.255.255.255:8080"],
            "broadcast",
        ),
        (
            "a subnet's broadcast address as a backend",
            &["backend", "add", vip, "10.11.1.255:8080"],
            "backend 10.11.1.255:8080 is a broadcast address",
        ),
        (
            "multicast backend",
            &["backend", "add", vip, "224.0.0.9:8080"],
            "multicast",
        ),
        (
            "loopback backend",
            &["backend", "add", vip, "127.0.0.1:8080"],
            "loopback",
        ),
        (
            "loopback backend v6",
            &["backend", "add", vip6, "[::1]:8080"],
            "loopback",
        ),
        (
            "link-local backend",
            &["backend", "add", vip, "169.254.7.7:8080"],
            "link-local",
        ),
        (
            "link-local backend v6",
            &["backend", "add", vip6, "[fe80::2]:8080"],
            "link-local",
        ),
        (
            "IPv4-mapped backend",
            &["backend", "add", vip, "[::ffff:10.11.1.2]:8080"],
            "IPv4-mapped",
        ),
        (
            "scope-id backend",
            &["backend", "add", vip6, "[fd00:11:1::2%1]:8080"],
            "scope id (%1)",
        ),
        (
            "backend port 0",
            &["backend", "add", vip, "10.11.1.2:0"],
            "port 0",
        ),
        (
            "the LB's own address as a backend",
            &["backend", "add", vip, &own_v4],
            &own_iface,
        ),
        (
            "the LB's own IPv6 address as a backend",
            &["backend", "add", vip6, &own_v6],
            "is this host's own address",
        ),
        (
            "config check: tcp probe on a UDP VIP",
            &["config", "check", &udp_tcp_probe_path],
            &format!("{udp_tcp_probe_path}:4:9: a tcp health check cannot probe UDP VIP"),
        ),
        (
            "config check: loopback backend",
            &["config", "check", &loopback_backend_path],
            &format!("{loopback_backend_path}:4:11: backend 127.0.0.1:8080 is a loopback address"),
        ),
    ];
    let mut failures = Vec::new();
    for (what, args, needle) in cases {
        // `config check` talks to no agent, so it takes no --socket.
        let out = if args[..2] == ["config", "check"] {
            output_within(
                std::process::Command::new(XLB).args(*args),
                Duration::from_secs(20),
            )
        } else {
            xlb(lb, s, args)
        };
        failures.extend(one_line_refusal(what, args, &out, needle));
    }

    failures
}

/// No agent behind the socket; `xlb run` on a missing interface, and without root.
fn refused_starts(topo: &Topology, dir: &TempDir) -> Vec<String> {
    let lb = topo.lb();
    let mut failures = Vec::new();
    let mut check = |what: &str, args: &[&str], out: &Output, needle: &str| {
        failures.extend(one_line_refusal(what, args, out, needle));
    };
    // No agent behind the socket.
    let nowhere = dir.join("nobody-here.sock");
    let args = ["vip", "list"];
    let out = xlb(lb, &nowhere, &args);
    check("no agent", &args, &out, "no xlb agent is listening");

    // `xlb run` on an interface that does not exist.
    let run_args = |tag: &str| -> Vec<String> {
        vec![
            "run".into(),
            "--iface".into(),
            "does-not-exist".into(),
            "--state".into(),
            dir.join(&format!("{tag}.json")).display().to_string(),
            "--bpffs".into(),
            Path::new("/sys/fs/bpf")
                .join(common::unique(SUITE, tag))
                .display()
                .to_string(),
        ]
    };
    let args = run_args("noiface");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = xlb(lb, &dir.join("noiface.sock"), &argv);
    check("no such interface", &argv, &out, "does-not-exist");

    // `xlb run` without root: setuid(nobody) after joining the namespace. Nobody may not be
    // able to reach the build's binary (a checkout under /root or in a 0700 directory), so
    // it runs a copy in a directory everyone can enter, from `/`.
    let mut args = run_args("noroot");
    args[2] = topo.client_link.a.ifname.clone();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let unprivileged = WorldReadableCopy::of_xlb(SUITE);
    let mut cmd = lb.command(&unprivileged.path);
    cmd.args(&argv)
        .arg("--socket")
        .arg(dir.join("noroot.sock"))
        .current_dir("/")
        .env_remove("XLB_SOCKET");
    // Runs after `Netns::command`'s own pre_exec (setns), which needs root.
    run_as_nobody(&mut cmd);
    let out = output_within(&mut cmd, Duration::from_secs(20));
    check("not root", &argv, &out, "root");

    failures
}

/// A malformed line on the control socket gets an error reply; the connection and the
/// agent keep working (the VIPs are still `snapshot`).
fn malformed_control_requests(agent: &Agent<'_>, snapshot: &Value) -> Vec<String> {
    let mut failures = Vec::new();
    let mut conn = UnixStream::connect(&agent.socket).expect("connecting to the control socket");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut ask = |line: &str| -> Value {
        conn.write_all(line.as_bytes()).expect("write");
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("reply");
        serde_json::from_str(&reply)
            .unwrap_or_else(|e| panic!("reply to {line:?} is not JSON ({e}): {reply:?}"))
    };
    for bad in ["{this is not json\n", "{\"op\":\"explode\"}\n", "[]\n"] {
        let reply = ask(bad);
        if reply["kind"] != "error" || !reply["data"].is_string() {
            failures.push(format!(
                "malformed request {bad:?}: expected {{\"kind\":\"error\",...}}, got {reply}"
            ));
        }
    }
    // The API refuses what the CLI refuses, also without the CLI's own checks.
    for (request, needle) in [
        (
            r#"{"op":"vip_add","vip":"10.100.0.1:53/udp","health":{"probe":{"kind":"tcp"},"interval_ms":2000,"timeout_ms":1000,"rise":2,"fall":3}}"#,
            "a tcp health check cannot probe UDP VIP",
        ),
        (
            r#"{"op":"vip_add","vip":"[::ffff:10.100.0.1]:80/tcp"}"#,
            "IPv4-mapped",
        ),
        (
            r#"{"op":"backend_add","vip":"10.100.0.1:80/tcp","backend":"10.100.0.1:80","weight":1}"#,
            "is the address of VIP",
        ),
    ] {
        let reply = ask(&format!("{request}\n"));
        let refused =
            reply["kind"] == "error" && reply["data"].as_str().is_some_and(|d| d.contains(needle));
        if !refused {
            failures.push(format!(
                "API request {request}: expected an error containing {needle:?}, got {reply}"
            ));
        }
    }
    let reply = ask("{\"op\":\"vip_list\"}\n");
    assert_eq!(
        reply["kind"], "vips",
        "same connection still served: {reply}"
    );
    assert_eq!(reply["data"], *snapshot, "{reply}");
    failures
}

#[test]
fn bad_input_matrix() {
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "bad");
    let agent = start_agent(&topo, &dir, &dir.join("state.json"));
    let vip = "10.100.0.1:80/tcp";
    let vip6 = "[fd00:100::1]:80/tcp";
    let b0 = backend_v4(0, 8080).to_string();
    agent.ok(&["vip", "add", vip]);
    agent.ok(&["vip", "add", vip6]);
    agent.ok(&["vip", "add", "10.100.0.2:53/udp"]);
    agent.ok(&["backend", "add", vip, &b0, "--weight", "2"]);
    let snapshot = agent.json(&["vip", "list", "--json"]);

    let mut failures = refused_commands(&topo, &agent, &dir);
    failures.extend(refused_starts(&topo, &dir));
    failures.extend(malformed_control_requests(&agent, &snapshot));

    let after = agent.json(&["vip", "list", "--json"]);
    assert_eq!(after, snapshot, "refused requests change nothing");
    assert!(
        failures.is_empty(),
        "{} bad-input case(s) not handled as specified:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// A backend reached through an interface the agent is not attached to is added, with a
/// warning on stderr and in the agent log naming the interface and the fix; one behind an
/// attached interface gets none. A reload that would add the LB's own address is refused and
/// changes nothing; one adding an unattached backend applies, with the warning.
#[test]
fn backends_behind_unattached_interfaces_warn() {
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "route");
    let vip = "10.100.0.1:80/tcp";
    let b0 = backend_v4(0, 8080).to_string();
    let config = dir.join("xlb.toml");
    let write_config = |backends: &[String]| {
        let mut text = format!("[[vip]]\naddress = \"{vip}\"\n");
        for b in backends {
            text.push_str(&format!("[[vip.backend]]\naddress = \"{b}\"\n"));
        }
        fs::write(&config, text).expect("writing the config");
    };
    write_config(std::slice::from_ref(&b0));
    // Attached to the client link and backend 0's link, not to backend 1's.
    let unattached = topo.backend_links[1].a.ifname.clone();
    let ifaces = vec![
        topo.client_link.a.ifname.clone(),
        topo.backend_links[0].a.ifname.clone(),
    ];
    let config_arg = config.display().to_string();
    let agent = agent_in(topo.lb(), &ifaces, &dir, &dir.join("state.json"))
        .args(["--config", &config_arg])
        .start();

    let expected_warning = |backend: &str| {
        format!(
            "xlb: warning: backend {backend} is reached through {unattached}, which xlb is not attached to: its replies would not be translated back to the VIP (add --iface {unattached} to `xlb run`)"
        )
    };
    let b1 = backend_v4(1, 8080).to_string();
    // The agent runs from a config file: a change by hand needs --force.
    let args = ["backend", "add", vip, &b1, "--force"];
    let out = xlb(topo.lb(), &agent.socket, &args);
    assert!(out.status.success(), "{}", describe(&args, &out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [expected_warning(&b1)],
        "{}",
        describe(&args, &out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("added backend {b1}")),
        "{}",
        describe(&args, &out)
    );
    let listed = agent.json(&["backend", "list", vip, "--json"]);
    assert!(
        backends_of(&listed)
            .iter()
            .any(|b| b["addr"] == b1.as_str()),
        "the backend was added despite the warning: {listed:#}"
    );
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains(&format!("is reached through {unattached}"))
            && l.contains(&format!("--iface {unattached}"))),
        "the agent logs the warning:\n{log}"
    );

    // Behind an attached interface: no warning.
    let b0_other_port = backend_v4(0, 9090).to_string();
    let args = ["backend", "add", vip, &b0_other_port, "--force"];
    let out = xlb(topo.lb(), &agent.socket, &args);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        describe(&args, &out)
    );

    // A reload adding the LB's own address is refused and changes nothing.
    let before = agent.json(&["vip", "list", "--json"]);
    let own = format!("{}:8080", topo.backend_links[0].a.ip4());
    write_config(&[b0.clone(), own.clone()]);
    let out = xlb(topo.lb(), &agent.socket, &["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.lines().count() == 1
            && stderr.starts_with("xlb: ")
            && stderr.contains(&format!("backend {own} is this host's own address")),
        "{}",
        describe(&["reload"], &out)
    );
    assert_eq!(
        agent.json(&["vip", "list", "--json"]),
        before,
        "a refused reload changes nothing"
    );

    // A reload adding an unattached backend applies it and warns.
    let b1_other_port = backend_v4(1, 9090).to_string();
    write_config(&[b0.clone(), b1_other_port.clone()]);
    let out = xlb(topo.lb(), &agent.socket, &["reload"]);
    assert!(out.status.success(), "{}", describe(&["reload"], &out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("+ backend {vip} {b1_other_port}")),
        "{}",
        describe(&["reload"], &out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .collect::<Vec<_>>(),
        [expected_warning(&b1_other_port)],
        "{}",
        describe(&["reload"], &out)
    );
}

/// A client whose reader goes away (`xlb config check FILE | true`, `xlb stats | head`) ends
/// quietly: killed by SIGPIPE like any Unix tool, no panic and no backtrace on stderr.
#[test]
fn a_closed_pipe_ends_the_client_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let (read_end, write_end) = nix::unistd::pipe().expect("a pipe");
    drop(read_end);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/xlb.toml");
    let out = std::process::Command::new(common::XLB)
        .args(["config", "check", example])
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("running xlb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    assert_eq!(
        out.status.signal(),
        Some(nix::libc::SIGPIPE),
        "{:?}, stderr: {stderr}",
        out.status
    );
}

/// Argument errors are one line that names what is missing, or lists the accepted values.
#[test]
fn argument_errors_name_what_is_missing_or_accepted() {
    for (args, wanted) in [
        (
            &["vip", "add"][..],
            "xlb: the following required arguments were not provided: <VIP> (see --help)",
        ),
        (
            &[
                "backend",
                "set",
                "10.0.0.1:80/tcp",
                "10.1.0.1:80",
                "--state",
                "drain",
            ][..],
            "xlb: invalid value 'drain' for '--state <STATE>' [possible values: active, draining] (see --help)",
        ),
    ] {
        let out = std::process::Command::new(common::XLB)
            .args(args)
            .output()
            .expect("running xlb");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("{wanted}\n"),
            "{args:?}"
        );
    }
}

fn run_xlb(args: &[&str]) -> Output {
    output_within(
        std::process::Command::new(XLB)
            .args(args)
            .env_remove("XLB_SOCKET"),
        Duration::from_secs(20),
    )
}

/// `xlb help VERB --help` is the verb's help; `--socket` is offered, and taken, only by the
/// verbs that talk to the agent.
#[test]
fn help_and_socket_where_they_belong() {
    let out = run_xlb(&["help", "run", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Usage: xlb run") && text.contains("--iface"),
        "{}",
        describe(&["help", "run", "--help"], &out)
    );
    for verb in [
        &["run"][..],
        &["reload"],
        &["detach"],
        &["status"],
        &["stats"],
        &["conns"],
        &["explain"],
        &["config", "dump"],
        &["config", "diff"],
        &["vip", "list"],
        &["backend", "add"],
    ] {
        let args = [verb, &["--help"]].concat();
        let out = run_xlb(&args);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("--socket <SOCKET>"),
            "{}",
            describe(&args, &out)
        );
    }
    // `config check` takes no socket; nor do `xlb bench`'s verbs (bench/tests/dispatch.rs,
    // through the xlb-bench they run).
    let help = run_xlb(&["config", "check", "--help"]);
    assert!(
        help.status.success() && !String::from_utf8_lossy(&help.stdout).contains("--socket"),
        "{}",
        describe(&["config", "check", "--help"], &help)
    );
    let args = ["config", "check", "--socket", "/nowhere"];
    let out = run_xlb(&args);
    assert!(
        out.status.code() == Some(2)
            && String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--socket'"),
        "{}",
        describe(&args, &out)
    );
    // Before or after the verb of a group, and before the verb as earlier versions took it.
    for args in [
        &["vip", "list", "--socket", "/nowhere/xlb.sock"][..],
        &["vip", "--socket", "/nowhere/xlb.sock", "list"],
        &["--socket", "/nowhere/xlb.sock", "vip", "list"],
        &["--socket", "/nowhere/xlb.sock", "stats"],
    ] {
        let out = run_xlb(args);
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("no xlb agent is listening on /nowhere/xlb.sock"),
            "{}",
            describe(args, &out)
        );
    }
}

/// Where the host's network namespace cannot be looked at (here: an unprivileged user, who
/// may not read /proc/1/ns/net), the CLI uses the documented socket and says why.
#[test]
fn an_unreadable_host_namespace_falls_back_to_the_documented_socket() {
    let unprivileged = WorldReadableCopy::of_xlb(SUITE);
    let mut cmd = std::process::Command::new(&unprivileged.path);
    cmd.arg("stats").current_dir("/").env_remove("XLB_SOCKET");
    run_as_nobody(&mut cmd);
    let out = output_within(&mut cmd, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.lines().count() == 1
            && stderr.contains("cannot read /proc/1/ns/net")
            && stderr.contains("used /run/xlb/xlb.sock")
            && stderr.contains("--socket"),
        "{}",
        describe(&["stats"], &out)
    );
}

/// `xlb stats --watch` into a pipe: plain reports, no clear-screen codes; and it keeps
/// watching, saying why, while the agent is away (issue 13).
#[test]
fn stats_watch_writes_plain_reports_and_outlives_the_agent() {
    require_root();
    let ns = Netns::create("xlbwatch").expect("a namespace");
    let peer = Netns::create("xlbwatchp").expect("a namespace");
    ns.add_veth("watch0", &peer, "watch1").expect("a veth");
    ns.set_link_up("watch0").expect("link up");
    peer.set_link_up("watch1").expect("link up");
    let mut agent = common::Agent::in_ns(&ns, SUITE)
        .iface("watch0")
        .arg("--no-metrics")
        .start();
    let mut watch = ns.command(XLB);
    watch
        .args(["stats", "--watch", "--socket"])
        .arg(&agent.socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let watch = watch.spawn().expect("starting xlb stats --watch");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let stopped = agent.process.stop();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let mut watch = watch;
    let still_watching = watch.try_wait().expect("polling the watcher").is_none();
    let _ = watch.kill();
    let out = watch.wait_with_output().expect("the watcher's output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        still_watching,
        "the watcher exited when the agent stopped ({stopped:?}): {stderr}"
    );
    assert!(
        !stdout.contains('\x1b'),
        "terminal codes in a pipe: {stdout:?}"
    );
    assert!(
        stdout.matches("global:").count() >= 2,
        "fewer than two reports in 2.5 s: {stdout}"
    );
    assert!(stderr.contains("retrying every second"), "stderr: {stderr}");
}

/// (answers in order, ports asked from) for one datagram from each of `ports` on the client.
fn udp_ask_from(topo: &Topology, ports: std::ops::Range<u16>, vip: SocketAddr) -> Vec<String> {
    topo.client()
        .run(move || {
            ports
                .map(|p| {
                    let socket = UdpSocket::bind(v4(CLIENT, p)).expect("bind");
                    socket.connect(vip).expect("connect");
                    socket
                        .set_read_timeout(Some(Duration::from_secs(3)))
                        .expect("timeout");
                    udp_ask(&socket)
                })
                .collect()
        })
        .expect("client namespace")
}

/// Weight 0 drains, as `ipvsadm -w 0` and HAProxy's `weight 0`: no new flows, established
/// ones stay; a weight again brings the backend back. Accepted on add and in the config file.
#[test]
fn weight_zero_drains() {
    const FLOWS: u16 = 32;
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "weight0");
    let agent = start_agent(&topo, &dir, &dir.join("state.json"));
    let mut servers = Servers::new();
    for i in 0..2 {
        servers.udp(&topo, i, backend_v4(i, 5300));
    }
    let vip = "10.100.0.1:53/udp";
    let vip_addr = v4(Topology::VIP_V4, 53);
    let (b0, b1) = (
        backend_v4(0, 5300).to_string(),
        backend_v4(1, 5300).to_string(),
    );
    agent.ok(&["vip", "add", vip]);
    agent.ok(&["backend", "add", vip, &b0]);
    agent.ok(&["backend", "add", vip, &b1]);

    // 32 flows over two equal backends: none on b0 has odds 2^-32.
    let before = udp_ask_from(&topo, 41000..41000 + FLOWS, vip_addr);
    assert!(before.iter().any(|a| a == "b0"), "{before:?}");

    agent.ok(&["backend", "set", vip, &b0, "--weight", "0"]);
    let status = agent.json(&["backend", "list", vip, "--json"]);
    let row = |addr: &str| {
        backends_of(&status)
            .iter()
            .find(|b| b["addr"] == addr)
            .unwrap_or_else(|| panic!("{addr} missing: {status:#}"))
            .clone()
    };
    assert_eq!(row(&b0)["weight"], 0, "{status:#}");
    assert_eq!(row(&b0)["state"], "active", "{status:#}");
    assert_eq!(row(&b0)["slots"], 0, "{status:#}");
    assert_eq!(as_u64(&row(&b1)["slots"], "slots"), RING, "{status:#}");

    // The established flows keep their backend, b0 included; new ones all go to b1.
    let again = udp_ask_from(&topo, 41000..41000 + FLOWS, vip_addr);
    assert_eq!(again, before, "established flows moved");
    let fresh = udp_ask_from(&topo, 42000..42000 + FLOWS, vip_addr);
    assert!(fresh.iter().all(|a| a == "b1"), "{fresh:?}");

    // A weight again: back in the ring.
    agent.ok(&["backend", "set", vip, &b0, "--weight", "1"]);
    let status = agent.json(&["backend", "list", vip, "--json"]);
    assert!(
        backends_of(&status)
            .iter()
            .all(|b| as_u64(&b["slots"], "slots") > 0),
        "{status:#}"
    );

    // Weight 0 on add, and in a config file.
    let tcp = "10.100.0.1:80/tcp";
    agent.ok(&["vip", "add", tcp]);
    let out = agent.ok(&[
        "backend",
        "add",
        tcp,
        &backend_v4(0, 8080).to_string(),
        "--weight",
        "0",
    ]);
    assert!(out.contains("weight 0"), "{out}");
    let status = agent.json(&["backend", "list", tcp, "--json"]);
    assert_eq!(status["backends"][0]["slots"], 0, "{status:#}");
    let file = dir.join("weight0.toml");
    fs::write(
        &file,
        "[[vip]]\naddress = \"192.0.2.1:80\"\n[[vip.backend]]\naddress = \"10.0.0.2:80\"\nweight = 0\n",
    )
    .expect("config file");
    let out = std::process::Command::new(XLB)
        .args(["config", "check"])
        .arg(&file)
        .output()
        .expect("xlb config check");
    assert!(
        out.status.success(),
        "{}",
        describe(&["config", "check"], &out)
    );
}

/// One raw request line to the agent's socket; the reply as JSON.
fn raw_request(socket: &Path, line: &str) -> Value {
    let mut conn = UnixStream::connect(socket).expect("connecting to the control socket");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(line.as_bytes()).expect("write");
    let mut reply = String::new();
    BufReader::new(conn).read_line(&mut reply).expect("reply");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply to {line:?} ({e}): {reply:?}"))
}

/// Polls `backend list --json` (bounded) until `done` holds; the last status either way.
fn wait_for_status(agent: &Agent<'_>, vip: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut status = agent.json(&["backend", "list", vip, "--json"]);
    for _ in 0..100 {
        if done(&status) {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        status = agent.json(&["backend", "list", vip, "--json"]);
    }
    status
}

/// `xlb vip set` changes a VIP's idle timeout and health checks without deleting it: same
/// id, counters and established flows; a change the agent refuses leaves everything as it
/// was; the settings are shown by `vip list` and survive in the state file.
#[test]
fn vip_set_changes_settings_in_place() {
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "vipset");
    let state = dir.join("state.json");
    let agent = start_agent(&topo, &dir, &state);
    let mut servers = Servers::new();
    servers.udp(&topo, 0, backend_v4(0, 5300));
    servers.udp(&topo, 1, backend_v4(1, 5300));
    // Only b0 listens on TCP: a TCP health check takes b1 out.
    servers.tcp(&topo, 0, backend_v4(0, 8080));

    let udp = "10.100.0.1:53/udp";
    agent.ok(&["vip", "add", udp]);
    for i in 0..2 {
        agent.ok(&["backend", "add", udp, &backend_v4(i, 5300).to_string()]);
    }
    let vip_addr = v4(Topology::VIP_V4, 53);
    let before = udp_ask_from(&topo, 41000..41016, vip_addr);
    let listed = agent.json(&["vip", "list", "--json"]);
    let was = find_vip(&listed, udp).clone();
    assert_eq!(was["idle_timeout_s"], 60, "{was:#}");

    let out = agent.ok(&["vip", "set", udp, "--udp-timeout", "900"]);
    assert!(out.contains("idle timeout 900 s"), "{out}");
    let listed = agent.json(&["vip", "list", "--json"]);
    let now = find_vip(&listed, udp);
    assert_eq!(now["idle_timeout_s"], 900, "{now:#}");
    assert_eq!(now["id"], was["id"], "the VIP was not re-created: {now:#}");
    assert_eq!(now["packets"], was["packets"], "its counters stay: {now:#}");
    assert_eq!(config_of(&listed), config_of(&serde_json::json!([was])));
    let again = udp_ask_from(&topo, 41000..41016, vip_addr);
    assert_eq!(again, before, "established flows kept their backends");
    let plain = agent.ok(&["vip", "list"]);
    assert!(plain.contains("900 s"), "{plain}");
    assert!(
        fs::read_to_string(&state)
            .expect("state file")
            .contains("\"idle_timeout_s\": 900"),
        "persisted"
    );

    // Refused by the agent itself (a client bypassing the CLI's checks): nothing changes.
    let reply = raw_request(
        &agent.socket,
        &format!("{{\"op\":\"vip_set\",\"vip\":\"{udp}\",\"idle_timeout_s\":{{\"to\":0}}}}\n"),
    );
    assert_eq!(reply["kind"], "error", "{reply}");
    assert!(
        reply["data"]
            .as_str()
            .unwrap_or("")
            .contains("idle timeout"),
        "{reply}"
    );
    assert_eq!(
        find_vip(&agent.json(&["vip", "list", "--json"]), udp)["idle_timeout_s"],
        900
    );
    let refused = xlb(
        topo.lb(),
        &agent.socket,
        &["vip", "set", udp, "--tcp-timeout", "60"],
    );
    assert!(
        !refused.status.success(),
        "{}",
        describe(&["vip", "set"], &refused)
    );
    let nothing = xlb(topo.lb(), &agent.socket, &["vip", "set", udp]);
    assert!(
        !nothing.status.success()
            && String::from_utf8_lossy(&nothing.stderr).contains("nothing to change"),
        "{}",
        describe(&["vip", "set", udp], &nothing)
    );

    // Health checks on a TCP VIP, then off again.
    let tcp = "10.100.0.1:80/tcp";
    agent.ok(&["vip", "add", tcp]);
    for i in 0..2 {
        agent.ok(&["backend", "add", tcp, &backend_v4(i, 8080).to_string()]);
    }
    let out = agent.ok(&[
        "vip",
        "set",
        tcp,
        "--health",
        "tcp",
        "--health-interval-ms",
        "200",
        "--health-timeout-ms",
        "150",
        "--health-fall",
        "1",
        "--health-rise",
        "1",
    ]);
    assert!(out.contains("health checks: tcp"), "{out}");
    let b1 = backend_v4(1, 8080).to_string();
    let b1_down = |s: &Value| {
        backends_of(s)
            .iter()
            .any(|b| b["addr"] == b1.as_str() && b["healthy"] == false)
    };
    let status = wait_for_status(&agent, tcp, b1_down);
    assert!(b1_down(&status), "b1 has no TCP server: {status:#}");
    let plain = agent.ok(&["vip", "list"]);
    assert!(plain.contains("tcp every 200 ms"), "{plain}");
    assert_eq!(
        find_vip(&agent.json(&["vip", "list", "--json"]), tcp)["health_check"]["probe"]["kind"],
        "tcp"
    );

    let out = agent.ok(&["vip", "set", tcp, "--no-health"]);
    assert!(out.contains("no health checks"), "{out}");
    let all_up = |s: &Value| backends_of(s).iter().all(|b| b["healthy"] == true);
    let status = wait_for_status(&agent, tcp, all_up);
    assert!(all_up(&status), "{status:#}");
    let listed = agent.json(&["vip", "list", "--json"]);
    assert!(
        find_vip(&listed, tcp)["health_check"].is_null(),
        "{listed:#}"
    );

    // Each change is logged once, with who asked; the log (a file) has no colour codes.
    let log = agent.log();
    assert!(!log.contains('\x1b'), "colour codes in a log file:\n{log}");
    let applied: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("API change applied") && l.contains("op=vip_set"))
        .collect();
    assert_eq!(
        applied.len(),
        3,
        "three vip set changes, each logged once:\n{log}"
    );
    assert!(
        applied
            .iter()
            .all(|l| l.contains("uid=0 pid=") && l.contains("request={")),
        "{applied:#?}"
    );
    let test_pid = std::process::id();
    assert!(
        log.lines().any(|l| l.contains("API change refused")
            && l.contains("op=vip_set")
            && l.contains(&format!("pid={test_pid} "))),
        "the raw request this test sent is logged as refused, with its pid:\n{log}"
    );
}

/// `xlb status`: the agent (its pid), each interface with its hook, VIP and backend counts,
/// which backends are down and why, and the counters that mean trouble once there is some.
#[test]
fn status_shows_agent_interfaces_health_and_trouble() {
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "status");
    let agent = start_agent(&topo, &dir, &dir.join("state.json"));
    let mut servers = Servers::new();
    servers.tcp(&topo, 0, backend_v4(0, 8080));

    let text = agent.ok(&["status"]);
    let pid = agent.process.pid();
    assert!(text.contains(&format!("pid {pid}")), "{text}");
    assert!(text.contains("no config file"), "{text}");
    for link in std::iter::once(&topo.client_link).chain(&topo.backend_links) {
        // Veths get the TC hook under --xdp-mode auto.
        assert!(
            text.contains(&format!("{} (tc)", link.a.ifname)),
            "{} missing: {text}",
            link.a.ifname
        );
    }
    assert!(text.contains("VIPs        0 "), "{text}");
    assert!(text.contains("trouble     none"), "{text}");

    let tcp = "10.100.0.1:80/tcp";
    let udp = "10.100.0.1:53/udp";
    agent.ok(&[
        "vip",
        "add",
        tcp,
        "--health",
        "tcp",
        "--health-interval-ms",
        "200",
        "--health-timeout-ms",
        "150",
        "--health-fall",
        "1",
    ]);
    agent.ok(&["vip", "add", udp]);
    let (b0, b1) = (
        backend_v4(0, 8080).to_string(),
        backend_v4(1, 8080).to_string(),
    );
    agent.ok(&["backend", "add", tcp, &b0]);
    agent.ok(&["backend", "add", tcp, &b1]);
    wait_for_status(&agent, tcp, |s| {
        backends_of(s)
            .iter()
            .any(|b| b["addr"] == b1.as_str() && b["healthy"] == false)
    });
    // A datagram to the UDP VIP, which has no backend: dropped and counted.
    let vip_addr = v4(Topology::VIP_V4, 53);
    topo.client()
        .run(move || {
            let socket = UdpSocket::bind(v4(CLIENT, 41999)).expect("bind");
            socket.send_to(b"anyone?", vip_addr).expect("send");
        })
        .expect("client namespace");

    let mut text = agent.ok(&["status"]);
    for _ in 0..20 {
        if text.contains("no_backend 1") {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        text = agent.ok(&["status"]);
    }
    for needle in [
        "VIPs        2 (1 tcp, 1 udp); backends 2: 1 taking new flows, 0 draining, 0 weight 0, 1 unhealthy",
        &format!("no backend takes new flows on: {udp}"),
        "1 of 2 VIPs checked: 1 backends up, 1 down",
        &format!("down: {b1} of {tcp}: "),
        "no_backend 1 (VIP without a backend to take it)",
    ] {
        assert!(text.contains(needle), "status lacks {needle:?}:\n{text}");
    }
    assert!(text.lines().count() <= 24, "one screen: {text}");

    let json = agent.json(&["status", "--json"]);
    assert_eq!(
        as_u64(&json["agent"]["pid"], "pid"),
        u64::from(pid),
        "{json:#}"
    );
    assert_eq!(json["vips"].as_array().map(Vec::len), Some(2), "{json:#}");
    let hooks: Vec<&Value> = json["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .map(|i| &i["hook"])
        .collect();
    assert_eq!(hooks.len(), 3, "{json:#}");
    assert!(hooks.iter().all(|h| *h == "tc"), "{json:#}");
}

/// `xlb conns`: every flow the connection table holds for a VIP, with the backend that
/// really answered it, filtered by backend, limited, and a TCP connection's closing state.
#[test]
fn conns_lists_tracked_flows() {
    const FLOWS: u16 = 12;
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "conns");
    let agent = start_agent(&topo, &dir, &dir.join("state.json"));
    let mut servers = Servers::new();
    for i in 0..2 {
        servers.udp(&topo, i, backend_v4(i, 5300));
        servers.tcp(&topo, i, backend_v4(i, 8080));
    }
    let udp = "10.100.0.1:53/udp";
    agent.ok(&["vip", "add", udp]);
    for i in 0..2 {
        agent.ok(&["backend", "add", udp, &backend_v4(i, 5300).to_string()]);
    }
    let empty = agent.json(&["conns", udp, "--json"]);
    assert_eq!(empty["total"], 0, "{empty:#}");

    let answers = udp_ask_from(&topo, 41000..41000 + FLOWS, v4(Topology::VIP_V4, 53));
    // Client port -> the backend that answered.
    let expected: BTreeMap<String, String> = (41000..41000 + FLOWS)
        .zip(&answers)
        .map(|(port, answer)| {
            let i = usize::from(answer == "b1");
            (
                v4(CLIENT, port).to_string(),
                backend_v4(i, 5300).to_string(),
            )
        })
        .collect();
    let conns = agent.json(&["conns", udp, "--json"]);
    assert_eq!(
        as_u64(&conns["total"], "total"),
        u64::from(FLOWS),
        "{conns:#}"
    );
    let listed: BTreeMap<String, String> = conns["flows"]
        .as_array()
        .expect("flows")
        .iter()
        .map(|f| {
            assert_eq!(f["state"], "udp", "{f}");
            assert_eq!(f["live"], true, "{f}");
            assert!(as_u64(&f["idle_s"], "idle_s") < 30, "{f}");
            (
                f["client"].as_str().expect("client").to_owned(),
                f["backend"].as_str().expect("backend").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        listed, expected,
        "each flow with the backend that answered it"
    );

    let b0 = backend_v4(0, 5300).to_string();
    let on_b0 = agent.json(&["conns", udp, "--backend", &b0, "--json"]);
    let want_b0 = expected.values().filter(|b| **b == b0).count() as u64;
    assert_eq!(as_u64(&on_b0["total"], "total"), want_b0, "{on_b0:#}");
    assert!(
        on_b0["flows"]
            .as_array()
            .expect("flows")
            .iter()
            .all(|f| f["backend"] == b0.as_str()),
        "{on_b0:#}"
    );
    let limited = agent.json(&["conns", udp, "--limit", "3", "--json"]);
    assert_eq!(as_u64(&limited["total"], "total"), u64::from(FLOWS));
    assert_eq!(limited["flows"].as_array().map(Vec::len), Some(3));
    let text = agent.ok(&["conns", udp, "--limit", "3"]);
    assert!(
        text.contains(&format!("{udp}: {FLOWS} tracked flows (showing 3")),
        "{text}"
    );
    let first = limited["flows"][0]["client"].as_str().expect("client");
    assert!(text.contains(first) && text.contains("udp"), "{text}");
    let unknown = xlb(
        topo.lb(),
        &agent.socket,
        &["conns", udp, "--backend", "10.11.9.9:5300"],
    );
    assert!(
        !unknown.status.success()
            && String::from_utf8_lossy(&unknown.stderr).contains("not behind"),
        "{}",
        describe(&["conns", udp, "--backend"], &unknown)
    );

    // A TCP connection the server closed and the client read to the end: both FINs seen.
    let tcp = "10.100.0.1:80/tcp";
    agent.ok(&["vip", "add", tcp]);
    agent.ok(&["backend", "add", tcp, &backend_v4(0, 8080).to_string()]);
    let vip_addr = v4(Topology::VIP_V4, 80);
    let answer = topo
        .client()
        .run(move || tcp_ask(v4(CLIENT, 43000), vip_addr))
        .expect("client namespace");
    assert_eq!(answer, "b0");
    let mut conns = agent.json(&["conns", tcp, "--json"]);
    for _ in 0..20 {
        if conns["flows"][0]["state"] == "closed" {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        conns = agent.json(&["conns", tcp, "--json"]);
    }
    assert_eq!(conns["total"], 1, "{conns:#}");
    let flow = &conns["flows"][0];
    assert_eq!(
        flow["client"],
        v4(CLIENT, 43000).to_string().as_str(),
        "{flow}"
    );
    assert_eq!(
        flow["backend"],
        backend_v4(0, 8080).to_string().as_str(),
        "{flow}"
    );
    assert_eq!(flow["state"], "closed", "{flow}");
}

/// `xlb config dump` writes the running state as a config that `config check` accepts and an
/// agent started from reproduces; `config diff` and `reload --dry-run` say what a reload
/// would change and change nothing; an agent running from a config file refuses changes by
/// hand unless they say --force.
#[test]
fn config_dump_diff_dry_run_and_changes_by_hand() {
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "dump");
    let ifaces = lb_ifaces(&topo);
    let tcp = "10.100.0.1:80/tcp";
    let udp = "[fd00:100::1]:53/udp";
    let (b0, b1) = (
        backend_v4(0, 8080).to_string(),
        backend_v4(1, 8080).to_string(),
    );
    let dump = dir.join("dumped.toml");
    // Forwarding off, as on a fresh host: the agent switches it on, and back off on a full stop.
    let forwarding_keys = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"];
    for key in forwarding_keys {
        topo.lb().sysctl(key, "0").expect("forwarding off");
    }
    let forwarding =
        || forwarding_keys.map(|key| topo.lb().read_sysctl(key).expect("reading a sysctl"));
    let running = {
        let mut agent = start_agent(&topo, &dir, &dir.join("state.json"));
        assert_eq!(forwarding(), ["1", "1"]);
        agent.ok(&[
            "vip",
            "add",
            tcp,
            "--tcp-timeout",
            "900",
            "--health",
            "http",
            "--health-path",
            "/healthz",
            "--health-host",
            "web.example",
            "--health-interval-ms",
            "60000",
        ]);
        agent.ok(&["vip", "add", udp]);
        agent.ok(&["backend", "add", tcp, &b0, "--weight", "3"]);
        agent.ok(&["backend", "add", tcp, &b1, "--weight", "0"]);
        agent.ok(&["backend", "add", udp, "[fd00:11::2]:53"]);
        agent.ok(&["backend", "drain", udp, "[fd00:11::2]:53"]);
        let text = agent.ok(&["config", "dump"]);
        fs::write(&dump, &text).expect("writing the dump");
        let check = std::process::Command::new(XLB)
            .args(["config", "check"])
            .arg(&dump)
            .output()
            .expect("xlb config check");
        assert!(
            check.status.success(),
            "{}\n{text}",
            describe(&["config", "check"], &check)
        );
        let dump_arg = dump.display().to_string();
        let same = agent.ok(&["config", "diff", &dump_arg]);
        assert!(same.contains("matches the running state"), "{same}\n{text}");
        let listed = agent.json(&["vip", "list", "--json"]);
        assert!(agent.stop().success(), "{}", agent.log());
        assert_eq!(
            forwarding(),
            ["0", "0"],
            "a full stop switches forwarding back off"
        );
        listed
    };

    // An agent started from the dump runs the same VIPs, backends, timeouts and checks.
    let dump_arg = dump.display().to_string();
    let agent = agent_in(topo.lb(), &ifaces, &dir, &dir.join("state2.json"))
        .args(["--config", &dump_arg])
        .start();
    let listed = agent.json(&["vip", "list", "--json"]);
    assert_eq!(config_of(&listed), config_of(&running));
    for vip in [tcp, udp] {
        let (now, was) = (find_vip(&listed, vip), find_vip(&running, vip));
        assert_eq!(now["idle_timeout_s"], was["idle_timeout_s"], "{vip}");
        assert_eq!(now["health_check"], was["health_check"], "{vip}");
    }
    assert_eq!(
        find_vip(&running, tcp)["health_check"]["probe"]["host"],
        "web.example",
        "the probe's Host header goes through the API, the dump and the config"
    );

    // Changes by hand: refused without --force, saying how; applied with it.
    let extra = backend_v4(0, 9090).to_string();
    let args = ["backend", "add", tcp, &extra];
    let refused = xlb(topo.lb(), &agent.socket, &args);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains(&dump_arg)
            && stderr.contains("xlb reload")
            && stderr.contains("--force"),
        "{}",
        describe(&args, &refused)
    );
    assert_eq!(
        config_of(&agent.json(&["vip", "list", "--json"])),
        config_of(&running)
    );
    agent.ok(&["backend", "add", tcp, &extra, "--force"]);

    // The file changes: diff and dry run name the changes (and the forced backend's
    // removal), and change nothing; the reload then applies exactly that.
    let edited = fs::read_to_string(&dump)
        .expect("dump")
        .replace("weight = 3", "weight = 5");
    fs::write(&dump, edited).expect("editing the dump");
    let expected = [
        format!("~ backend {tcp} {b0} weight 5 active"),
        format!("- backend {tcp} {extra}"),
    ];
    let before = agent.json(&["vip", "list", "--json"]);
    for args in [
        &["config", "diff", dump_arg.as_str()][..],
        &["reload", "--dry-run"],
    ] {
        let out = agent.ok(args);
        let lines: BTreeSet<&str> = out.lines().collect();
        let want: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
        assert_eq!(lines, want, "xlb {}", args.join(" "));
    }
    assert_eq!(
        agent.json(&["vip", "list", "--json"]),
        before,
        "nothing changed"
    );
    let out = agent.ok(&["reload"]);
    let lines: BTreeSet<&str> = out.lines().collect();
    assert_eq!(lines, expected.iter().map(String::as_str).collect());
    let out = agent.ok(&["reload", "--dry-run"]);
    assert!(out.contains("a reload would change nothing"), "{out}");
}

/// `xlb generate` (run by `./x build`): completions for bash, zsh and fish and man pages,
/// from the same definitions as `--help`; the bash completion completes a verb.
#[test]
fn completions_and_man_pages_are_generated() {
    let dir = TempDir::new(SUITE, "generate");
    let out_dir = dir.join("out");
    let out = run_xlb(&["generate", "--out", out_dir.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", describe(&["generate"], &out));
    let read =
        |rel: &str| fs::read_to_string(out_dir.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let bash = out_dir.join("completions/xlb.bash");
    let completed = output_within(
        std::process::Command::new("bash").arg("-c").arg(format!(
            "source {}; COMP_WORDS=(xlb con); COMP_CWORD=1; _xlb xlb con xlb; echo \"${{COMPREPLY[@]}}\"",
            bash.display()
        )),
        Duration::from_secs(20),
    );
    let words = String::from_utf8_lossy(&completed.stdout);
    assert!(
        completed.status.success()
            && words.split_whitespace().collect::<Vec<_>>() == ["config", "conns"],
        "{}",
        describe(&["bash completion"], &completed)
    );
    assert!(read("completions/xlb.bash").contains("--dry-run"));
    assert!(read("completions/_xlb").starts_with("#compdef xlb"));
    assert!(read("completions/xlb.fish").contains("complete -c xlb"));
    let man = read("man/xlb.1");
    assert!(man.contains(".TH xlb 1") && man.contains("status"), "{man}");
    let vip = read("man/xlb-vip.1");
    assert!(
        vip.contains(".TH xlb-vip 1") && vip.contains("set"),
        "{vip}"
    );
    assert!(
        !out_dir.join("man/xlb-generate.1").exists(),
        "the hidden verb has no page"
    );
    assert!(
        !out_dir.join("man/xlb-bench.1").exists(),
        "xlb-bench.1 is the page of the program `xlb bench` runs, written by xlb-bench"
    );
}

/// A directory holding a copy of `xlb` and, if given, an executable script as `xlb-bench`.
fn bench_dir(tag: &str, fake_bench: Option<&str>) -> (TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new(SUITE, tag);
    let xlb = dir.join("xlb");
    common::copy_executable(Path::new(XLB), &xlb);
    if let Some(script) = fake_bench {
        // Written under another name and copied by `cp`: the program itself is never open
        // for writing in this process ("text file busy" for a thread forking meanwhile).
        let source = dir.join("xlb-bench.txt");
        fs::write(&source, script).expect("writing the script");
        fs::set_permissions(&source, fs::Permissions::from_mode(0o755)).expect("chmod 755");
        common::copy_executable(&source, &dir.join("xlb-bench"));
    }
    (dir, xlb)
}

/// `xlb bench ARGS` runs the `xlb-bench` next to it with ARGS as given, `--help` and
/// arguments with spaces included, and exits with its status; without one next to it, the
/// one on PATH.
#[test]
fn bench_runs_xlb_bench_with_the_same_arguments_and_status() {
    const ECHO_AND_EXIT_7: &str = "#!/bin/sh\nprintf '%s\\n' \"$@\"\nexit 7\n";
    let args = ["cost", "--help", "--out", "a dir", "-j"];
    let (dir, xlb) = bench_dir("bench-beside", Some(ECHO_AND_EXIT_7));
    let mut cmd = std::process::Command::new(&xlb);
    cmd.arg("bench").args(args).env("PATH", "/nowhere");
    let out = output_within(&mut cmd, Duration::from_secs(20));
    let printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(
        out.status.code() == Some(7) && printed == args,
        "{}",
        describe(&["bench", "(next to xlb)"], &out)
    );

    let (_alone, lone_xlb) = bench_dir("bench-path", None);
    let mut cmd = std::process::Command::new(&lone_xlb);
    cmd.args(["bench", "scaling"]).env("PATH", &dir.0);
    let out = output_within(&mut cmd, Duration::from_secs(20));
    assert!(
        out.status.code() == Some(7) && String::from_utf8_lossy(&out.stdout) == "scaling\n",
        "{}",
        describe(&["bench", "(on PATH)"], &out)
    );
}

/// No `xlb-bench` next to `xlb` or on PATH: one line naming what is missing and how to build
/// it, and failure.
#[test]
fn bench_without_xlb_bench_says_how_to_get_it() {
    let (_dir, xlb) = bench_dir("bench-missing", None);
    let mut cmd = std::process::Command::new(&xlb);
    cmd.args(["bench", "cost", "--help"]).env("PATH", "");
    let out = output_within(&mut cmd, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && out.stdout.is_empty()
            && stderr.lines().count() == 1
            && stderr.contains("xlb-bench")
            && stderr.contains(&xlb.display().to_string())
            && stderr.contains("./x build")
            && stderr.contains("cargo build --release -p xlb-bench"),
        "{}",
        describe(&["bench", "cost", "--help"], &out)
    );
}

/// `xlb top` draws on a terminal; into a pipe it refuses at once and names the verbs for
/// scripts, before it looks for an agent.
#[test]
fn top_into_a_pipe_points_at_stats() {
    let out = run_xlb(&["top", "--socket", "/nowhere/xlb.sock"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && out.stdout.is_empty()
            && stderr.contains("stdout is not one")
            && stderr.contains("xlb stats --watch"),
        "{}",
        describe(&["top"], &out)
    );
}

/// Makes `cmd` run as nobody (uid and gid 65534, no supplementary groups).
fn run_as_nobody(cmd: &mut std::process::Command) {
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The node's tunnel settings as the data plane holds them (`XLB_ENCAP`, pinned).
fn pinned_encap(bpffs: &Path) -> lb_common::EncapSettings {
    let data = aya::maps::MapData::from_pin(bpffs.join(lb_common::map_names::ENCAP))
        .expect("XLB_ENCAP pinned");
    let map: aya::maps::Array<_, lb_common::EncapSettings> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("an array");
    map.get(&0, 0).expect("its one entry")
}

/// Direct server return end to end through the CLI: `vip add --forwarding`, a backend
/// given without a port (the VIP's), another port and a NAT VIP's portless backend refused,
/// the method in `vip list`, `backend list`, `explain`, `status`, JSON, `config dump` and
/// the state file, surviving a restart; `vip set --forwarding` refused; `--encap-source` and
/// `--gue-port` in `XLB_ENCAP` and `status`, and a source this host lacks refused at start.
#[test]
fn dsr_forwarding_and_tunnel_settings_through_the_cli() {
    let topo = topology(2);
    let dir = TempDir::new(SUITE, "dsr");
    let state = dir.join("state.json");
    let lb_ifaces = lb_ifaces(&topo);
    let own = topo.client_link.a.ip4().to_string();
    let tunnels = ["--encap-source", own.as_str(), "--gue-port", "7000"];
    let mut agent = agent_in(topo.lb(), &lb_ifaces, &dir, &state)
        .args(tunnels)
        .start();

    let dsr = "10.100.0.1:443/tcp";
    let nat = "10.100.0.1:80/tcp";
    let out = agent.ok(&["vip", "add", dsr, "--forwarding", "ipip"]);
    assert!(out.contains("forwarding dsr/ipip"), "{out}");
    agent.ok(&["vip", "add", nat]);
    let b0 = backend_v4(0, 443);
    let out = agent.ok(&["backend", "add", dsr, &b0.ip().to_string()]);
    assert!(out.contains(&format!("added backend {b0} ")), "{out}");
    // Its next hop is kept resolved though no packet has gone there: replies never come back.
    let neighbour = topo
        .lb()
        .command("ip")
        .args(["neigh", "show", &b0.ip().to_string()])
        .output()
        .expect("ip neigh");
    let neighbour = String::from_utf8_lossy(&neighbour.stdout);
    assert!(neighbour.contains("managed"), "{neighbour:?}");

    let refused = |args: &[&str], needle: &str| {
        let out = xlb(topo.lb(), &agent.socket, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(needle) && stderr.lines().count() == 1,
            "{}",
            describe(args, &out)
        );
    };
    let b1_other_port = backend_v4(1, 8443).to_string();
    refused(
        &["backend", "add", dsr, &b1_other_port],
        "must serve port 443 of VIP 10.100.0.1:443/tcp (dsr/ipip): the packet reaches it unchanged",
    );
    refused(
        &["backend", "add", nat, &backend_v4(1, 0).ip().to_string()],
        "needs a port: VIP 10.100.0.1:80/tcp forwards by NAT",
    );
    refused(
        &["vip", "set", dsr, "--forwarding", "gue"],
        &format!("`xlb vip del {dsr}`, then `xlb vip add {dsr} --forwarding gue`"),
    );

    let listed = agent.json(&["vip", "list", "--json"]);
    assert_eq!(find_vip(&listed, dsr)["forwarding"], "ipip", "{listed:#}");
    assert_eq!(find_vip(&listed, nat)["forwarding"], "nat", "{listed:#}");
    let table = agent.ok(&["vip", "list"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(dsr) && l.contains("dsr/ipip")),
        "{table}"
    );
    let backends = agent.ok(&["backend", "list", dsr]);
    assert!(backends.contains("forwarding dsr/ipip"), "{backends}");
    let explained = agent.ok(&["explain", "10.10.0.2:40000", dsr]);
    assert!(
        explained.contains(&format!("a new flow goes to:        dsr/ipip to {b0}")),
        "{explained}"
    );
    let explained = agent.json(&["explain", "10.10.0.2:40000", dsr, "--json"]);
    assert_eq!(explained["forwarding"], "ipip", "{explained:#}");

    let status = agent.ok(&["status"]);
    assert!(
        status.contains(&format!(
            "tunnels     outer source: IPv4 {own}, IPv6 route's; GUE port 7000; 1 direct-server-return VIPs"
        )),
        "{status}"
    );
    let json = agent.json(&["status", "--json"]);
    assert_eq!(
        json["agent"]["encap"]["source_v4"],
        own.as_str(),
        "{json:#}"
    );
    let held = pinned_encap(&agent.bpffs);
    assert_eq!(held.src_v4, topo.client_link.a.ip4().octets());
    assert_eq!(
        (held.src_v6, u16::from_be(held.gue_port_be)),
        ([0; 16], 7000)
    );

    let dumped = agent.ok(&["config", "dump"]);
    assert!(dumped.contains("forwarding = \"ipip\""), "{dumped}");
    assert!(
        dumped.contains(&format!("encap_source = [\"{own}\"]"))
            && dumped.contains("gue_port = 7000"),
        "{dumped}"
    );
    let saved = fs::read_to_string(&state).expect("state file");
    assert!(saved.contains("\"forwarding\": \"ipip\""), "{saved}");

    // Restarted from the state file alone, with the defaults for the tunnels.
    assert!(agent.stop().success(), "{}", agent.log());
    drop(agent);
    let agent = agent_in(topo.lb(), &lb_ifaces, &dir, &state).start();
    let listed = agent.json(&["vip", "list", "--json"]);
    let vip = find_vip(&listed, dsr);
    assert_eq!(vip["forwarding"], "ipip", "{vip:#}");
    assert_eq!(
        backends_of(vip)[0]["addr"],
        b0.to_string().as_str(),
        "{vip:#}"
    );
    let status = agent.ok(&["status"]);
    assert!(
        status.contains("tunnels     outer source: route's (default); GUE port 6080 (default)"),
        "{status}"
    );
    let held = pinned_encap(&agent.bpffs);
    assert_eq!(
        (held.src_v4, u16::from_be(held.gue_port_be)),
        ([0; 4], 6080)
    );
    drop(agent);

    // A source this host does not have: refused before anything is loaded.
    let bpffs = Path::new("/sys/fs/bpf").join(common::unique(SUITE, "pins"));
    let log = dir.join("refused.log");
    let mut cmd = common::agent_command(
        topo.lb().command(XLB),
        &lb_ifaces,
        &dir.join("refused.sock"),
        &dir.join("refused.json"),
        &bpffs,
        &log,
    );
    cmd.args(["--encap-source", "192.0.2.77"]);
    let out = output_within(&mut cmd, Duration::from_secs(20));
    let said = format!(
        "{}{}",
        fs::read_to_string(&log).unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("encap source 192.0.2.77 is not an address of this host"),
        "{said}"
    );
    assert!(!bpffs.exists(), "nothing pinned: {said}");
}

/// A config file's forwarding method and tunnel settings through `xlb reload`: the dry run
/// and the reload word the VIP's replacement and the tunnels' change alike; the VIP keeps
/// its id while its backend comes back under a new one, portless, on the VIP's port; the
/// outer source reaches `XLB_ENCAP`. A source this host lacks is refused and changes nothing.
#[test]
fn a_reload_replaces_a_vip_whose_forwarding_changes_and_applies_tunnels() {
    let topo = topology(1);
    let dir = TempDir::new(SUITE, "dsrreload");
    let ifaces = lb_ifaces(&topo);
    let vip = "10.100.0.1:80/tcp";
    let b0 = backend_v4(0, 80);
    let config = dir.join("xlb.toml");
    let config_arg = config.display().to_string();
    fs::write(
        &config,
        format!("[[vip]]\naddress = \"{vip}\"\n[[vip.backend]]\naddress = \"{b0}\"\n"),
    )
    .expect("writing the config");
    let agent = agent_in(topo.lb(), &ifaces, &dir, &dir.join("state.json"))
        .args(["--config", &config_arg])
        .start();
    let before = agent.json(&["vip", "list", "--json"]);
    let before = find_vip(&before, vip).clone();
    assert_eq!(before["forwarding"], "nat", "{before:#}");

    let own = topo.client_link.a.ip4();
    let dsr = |source: &str| {
        format!(
            "[agent]\nencap_source = [\"{source}\"]\n\n[[vip]]\naddress = \"{vip}\"\nforwarding = \"ipip\"\n[[vip.backend]]\naddress = \"{}\"\n",
            b0.ip()
        )
    };
    fs::write(&config, dsr(&own.to_string())).expect("editing the config");
    let expected = [
        format!(
            "~ vip {vip} forwarding nat -> dsr/ipip: replaced, its backends re-added (their established flows end)"
        ),
        format!("+ backend {vip} {b0} weight 1 active"),
        format!("~ tunnels: outer source: IPv4 {own}, IPv6 route's; GUE port 6080 (default)"),
    ];
    for args in [
        &["config", "diff", config_arg.as_str()][..],
        &["reload", "--dry-run"],
    ] {
        let dry = agent.ok(args);
        assert_eq!(
            dry.lines().collect::<Vec<_>>(),
            expected,
            "xlb {}",
            args.join(" ")
        );
    }
    let unchanged = agent.json(&["vip", "list", "--json"]);
    assert_eq!(find_vip(&unchanged, vip)["forwarding"], "nat", "a dry run");
    assert_eq!(pinned_encap(&agent.bpffs).src_v4, [0; 4], "a dry run");

    let applied = agent.ok(&["reload"]);
    assert_eq!(applied.lines().collect::<Vec<_>>(), expected, "{applied}");
    let after = agent.json(&["vip", "list", "--json"]);
    let after = find_vip(&after, vip);
    assert_eq!(after["forwarding"], "ipip", "{after:#}");
    assert_eq!(
        after["id"], before["id"],
        "the VIP keeps its slot: {after:#}"
    );
    let (was, now) = (&backends_of(&before)[0], &backends_of(after)[0]);
    assert_eq!(now["addr"], b0.to_string().as_str(), "{after:#}");
    assert_ne!(now["id"], was["id"], "a new backend id: {after:#}");
    assert_eq!(pinned_encap(&agent.bpffs).src_v4, own.octets());
    let status = agent.ok(&["status"]);
    assert!(
        status.contains(&format!(
            "tunnels     outer source: IPv4 {own}, IPv6 route's"
        )),
        "{status}"
    );

    // An outer source that is not this host's: the whole reload is refused.
    fs::write(&config, dsr("192.0.2.77")).expect("editing the config");
    let args = ["reload"];
    let out = xlb(topo.lb(), &agent.socket, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("nothing changed")
            && stderr.contains("encap source 192.0.2.77 is not an address of this host"),
        "{}",
        describe(&args, &out)
    );
    assert_eq!(pinned_encap(&agent.bpffs).src_v4, own.octets());
}
