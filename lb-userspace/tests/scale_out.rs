//! Scale-out (issue 15): xlb nodes announce their VIPs through a routing table that a real
//! BGP daemon (BIRD 2) advertises to a router, which spreads flows over the nodes with ECMP.
//!
//! - `announce_table_follows_what_the_node_can_serve`: the routing table the agent writes
//!   (no daemon needed).
//! - `flows_spread_over_bgp_ecmp_and_survive_drain_and_node_loss`: a router namespace
//!   running BIRD with multipath and an L4 hash, three xlb nodes each with its agent and
//!   BIRD peering with it, a client behind the router, direct-server-return backends behind
//!   the router. Flows spread over the nodes; every node picks the same backend for a
//!   5-tuple; a drained node and a node that dies under long-lived TCP streams lose none of
//!   them; a node that comes back takes new flows.
//!
//! Needs root and BIRD 2 (`apt-get install bird2`; `./x test` installs it). Every namespace,
//! agent and daemon is the test's own and is torn down, also when it fails.

mod common;

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{Agent, Backend, Reply, TempDir, output_within, require_root};
use lb_userspace::api::{NodeStatus, Stats};
use xlb_netns::{Netns, ScaleOutTopology, Topology};

const TABLE: &str = "100";

/// Polls `check` every 50 ms until it holds; how long that took, or `None` after `limit`.
fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if check() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `ip route show table all proto 176` in `ns`: xlb's announcement routes, as
/// (destination, table) pairs.
fn xlb_routes(ns: &Netns) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for family in ["-4", "-6"] {
        let out = output_within(
            ns.command("ip").args([
                family, "-j", "route", "show", "table", "all", "proto", "176",
            ]),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "ip route: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let list: serde_json::Value =
            serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text })
                .expect("ip -j route is JSON");
        for route in list.as_array().expect("a list") {
            let dst = route["dst"].as_str().expect("dst").to_owned();
            let table = route["table"].as_str().unwrap_or("main").to_owned();
            assert_eq!(route["dev"], "lo", "{route}");
            routes.insert((dst, table));
        }
    }
    routes
}

fn announced(addrs: &[&str]) -> BTreeSet<(String, String)> {
    addrs
        .iter()
        .map(|a| ((*a).to_owned(), TABLE.to_owned()))
        .collect()
}

#[test]
fn announce_table_follows_what_the_node_can_serve() {
    require_root();
    let topo = Topology::with_prefix("xannc-", 2).expect("topology");
    let lb = topo.lb();
    let mut agent = Agent::in_ns(lb, "announce")
        .ifaces(["client", "b0", "b1"])
        .args(["--announce-table", TABLE, "--no-metrics"])
        .start();
    let settles = |want: BTreeSet<(String, String)>, what: &str| {
        // The agent syncs as it answers a request: no wait is needed, but a retry is allowed.
        assert!(
            wait_until(Duration::from_secs(3), || xlb_routes(lb) == want).is_some(),
            "{what}: want {want:?}, the table holds {:?}",
            xlb_routes(lb)
        );
    };
    settles(announced(&[]), "no VIP");
    agent.cli(&["vip", "add", "10.100.0.1:80/tcp"]);
    agent.cli(&["vip", "add", "10.100.0.1:53/udp"]);
    agent.cli(&["vip", "add", "[fd00:100::1]:80/tcp"]);
    settles(announced(&[]), "VIPs without backends");
    agent.cli(&["backend", "add", "10.100.0.1:80/tcp", "10.11.0.2:8080"]);
    agent.cli(&[
        "backend",
        "add",
        "[fd00:100::1]:80/tcp",
        "[fd00:11::2]:8080",
    ]);
    settles(
        announced(&["10.100.0.1", "fd00:100::1"]),
        "each address with a backend",
    );
    // The address stays while one of its VIPs can serve.
    agent.cli(&["backend", "add", "10.100.0.1:53/udp", "10.11.1.2:5353"]);
    agent.cli(&["backend", "drain", "10.100.0.1:80/tcp", "10.11.0.2:8080"]);
    settles(
        announced(&["10.100.0.1", "fd00:100::1"]),
        "udp VIP still serving",
    );
    agent.cli(&["backend", "del", "10.100.0.1:53/udp", "10.11.1.2:5353"]);
    settles(announced(&["fd00:100::1"]), "no backend in any ring");

    let status: NodeStatus = common::parse_json(
        &["node", "drain", "--json"],
        &agent.cli(&["node", "drain", "--json"]),
    );
    assert_eq!(
        status,
        NodeStatus {
            drained: true,
            announce_table: Some(100),
            announced: Vec::new()
        }
    );
    settles(announced(&[]), "drained");
    // A drained node withdraws even a VIP that becomes ready meanwhile.
    agent.cli(&[
        "backend",
        "set",
        "10.100.0.1:80/tcp",
        "10.11.0.2:8080",
        "--state",
        "active",
    ]);
    settles(announced(&[]), "drained, backend back");
    let text = agent.cli(&["node", "undrain"]);
    assert!(
        text.contains("node: serving; announce table 100: 2"),
        "{text}"
    );
    settles(announced(&["10.100.0.1", "fd00:100::1"]), "undrained");

    // A route the agent did not make, in the same table, is not the agent's to remove.
    let foreign = lb
        .command("ip")
        .args(["route", "add", "10.100.9.9/32", "dev", "lo", "table", TABLE])
        .status()
        .expect("ip route add");
    assert!(foreign.success());
    agent.process.stop();
    settles(announced(&[]), "agent stopped without --keep-attached");
    let left = output_within(
        lb.command("ip").args(["route", "show", "table", TABLE]),
        Duration::from_secs(10),
    );
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "10.100.9.9 dev lo scope link"
    );
}

const VIP: &str = "10.100.0.1:80/tcp";
const VIP_PORT: u16 = 80;
const ROUTER_AS: u32 = 65000;
const NODE_AS: u32 = 65001;

/// `bird -f` in a namespace with its own config, control socket and log; SIGKILL'd and
/// reaped on drop.
struct Bird {
    child: Option<Child>,
    name: String,
    dir: PathBuf,
}

impl Bird {
    fn require_installed() {
        let found = Command::new("bird")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "BIRD 2 is not installed: `apt-get install bird2` (`./x bootstrap` and `./x test` \
             install it); the scale-out test needs a real BGP daemon"
        );
    }

    fn start(ns: &Netns, dir: &Path, name: &str, config: &str) -> Self {
        let conf = dir.join(format!("{name}.conf"));
        fs::write(&conf, config).expect("writing the BIRD config");
        let log = fs::File::create(dir.join(format!("{name}.log"))).expect("BIRD log");
        let child = ns
            .command("bird")
            .arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(dir.join(format!("{name}.ctl")))
            .arg("-P")
            .arg(dir.join(format!("{name}.pid")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawning bird");
        Self {
            child: Some(child),
            name: name.to_owned(),
            dir: dir.to_owned(),
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join(format!("{}.log", self.name))).unwrap_or_default()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("---- BIRD {} log ----\n{}", self.name, self.log());
        }
        self.kill();
    }
}

/// BFD and timers shared by both ends: a silent peer is declared down after 5 × 100 ms
/// (BFD), or after the 3 s hold time where BFD does not run.
const BIRD_TIMERS: &str = r#"
protocol bfd {
    interface "*" { min rx interval 100 ms; min tx interval 100 ms; multiplier 5; };
}
"#;

fn router_bird_config(topo: &ScaleOutTopology) -> String {
    let mut config = format!(
        r#"router id {id};
protocol device {{ scan time 1; }}
{BIRD_TIMERS}
# ECMP: every node's equal route goes into the kernel as one multipath route.
protocol kernel {{
    merge paths on;
    ipv4 {{ import none; export all; }};
}}
"#,
        id = topo.client_link.a.ip4()
    );
    for (i, link) in topo.node_links.iter().enumerate() {
        config.push_str(&format!(
            r#"protocol bgp node{i} {{
    local {local} as {ROUTER_AS};
    neighbor {peer} as {NODE_AS};
    hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 5;
    bfd on;
    ipv4 {{ import all; export none; }};
}}
"#,
            local = link.a.ip4(),
            peer = link.b.ip4(),
        ));
    }
    config
}

fn node_bird_config(topo: &ScaleOutTopology, i: usize) -> String {
    let link = &topo.node_links[i];
    format!(
        r#"router id {local};
protocol device {{ scan time 1; }}
{BIRD_TIMERS}
# What the xlb agent announces: its routes in table {TABLE} (proto 176).
protocol kernel xlb {{
    kernel table {TABLE};
    learn;
    scan time 1;
    ipv4 {{ import all; export none; }};
}}
protocol bgp upstream {{
    local {local} as {NODE_AS};
    neighbor {peer} as {ROUTER_AS};
    hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 5;
    bfd on;
    ipv4 {{ import none; export all; }};
}}
"#,
        local = link.b.ip4(),
        peer = link.a.ip4(),
    )
}

/// The router's next hops for the VIP, sorted (none while no node announces it).
fn vip_next_hops(router: &Netns) -> Vec<String> {
    let out = output_within(
        router.command("ip").args([
            "-4",
            "-j",
            "route",
            "show",
            "exact",
            &format!("{}/32", ScaleOutTopology::VIP_V4),
        ]),
        Duration::from_secs(10),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let routes: serde_json::Value =
        serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text }).expect("JSON");
    let mut hops: Vec<String> = Vec::new();
    for route in routes.as_array().expect("list") {
        if let Some(gw) = route["gateway"].as_str() {
            hops.push(gw.to_owned());
        }
        for hop in route["nexthops"].as_array().into_iter().flatten() {
            hops.push(hop["gateway"].as_str().expect("gateway").to_owned());
        }
    }
    hops.sort();
    hops
}

fn node_addr(topo: &ScaleOutTopology, i: usize) -> String {
    topo.node_links[i].b.ip4().to_string()
}

fn wait_for_hops(topo: &ScaleOutTopology, nodes: &[usize], limit: Duration) -> Duration {
    let mut want: Vec<String> = nodes.iter().map(|i| node_addr(topo, *i)).collect();
    want.sort();
    wait_until(limit, || vip_next_hops(topo.router()) == want).unwrap_or_else(|| {
        panic!(
            "the router's route to the VIP never had next hops {want:?} within {limit:?}: it has {:?}",
            vip_next_hops(topo.router())
        )
    })
}

fn vip_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ScaleOutTopology::VIP_V4), VIP_PORT)
}

/// A client connection to the VIP: which backend answered, and an echo exchange.
struct Stream {
    conn: TcpStream,
    reader: BufReader<TcpStream>,
    client: SocketAddr,
    backend: String,
    rounds: u32,
}

impl Stream {
    fn open(client: &Netns) -> std::io::Result<Self> {
        // Room for three SYNs (sent at 0, 1 and 3 s): on a loaded machine, one lost while a
        // router or node is still settling must not fail the test; a path that drops every
        // SYN still does.
        let conn = client
            .run(|| TcpStream::connect_timeout(&vip_addr(), Duration::from_secs(6)))
            .expect("entering the client")?;
        // Long enough to ride out a node's loss (retransmissions until the router moves the
        // flow), short enough to bound the test.
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut backend = String::new();
        reader.read_line(&mut backend)?;
        Ok(Self {
            client: conn.local_addr()?,
            conn,
            reader,
            backend: backend.trim().to_owned(),
            rounds: 0,
        })
    }

    /// One request and its echo, checked byte for byte.
    fn exchange(&mut self) -> std::io::Result<()> {
        self.rounds += 1;
        let message = format!("{} round {:06}\n", self.client, self.rounds);
        self.conn.write_all(message.as_bytes())?;
        let mut echo = String::new();
        self.reader.read_line(&mut echo)?;
        if echo != message {
            return Err(std::io::Error::other(format!(
                "echo {echo:?} for {message:?}"
            )));
        }
        Ok(())
    }
}

/// Exchanges on every stream for `duration`, all streams in parallel; the failures, by
/// client address.
fn keep_talking(streams: &mut [Stream], duration: Duration) -> Vec<String> {
    thread::scope(|scope| {
        let handles: Vec<_> = streams
            .iter_mut()
            .map(|s| {
                scope.spawn(move || {
                    let end = Instant::now() + duration;
                    while Instant::now() < end {
                        if let Err(e) = s.exchange() {
                            return Some(format!("{} (to {}): {e}", s.client, s.backend));
                        }
                        thread::sleep(Duration::from_millis(50));
                    }
                    None
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("stream thread"))
            .collect()
    })
}

fn new_flows(agent: &Agent<'_>) -> u64 {
    let stats: Stats = agent.stats();
    stats.vips.iter().map(|v| v.new_flows).sum()
}

/// Opens `n` short connections; returns, per connection, the client address and the backend
/// that answered.
fn short_flows(client: &Netns, n: usize) -> Vec<(SocketAddr, String)> {
    (0..n)
        .map(|_| {
            let s = Stream::open(client)
                .unwrap_or_else(|e| panic!("a short connection to the VIP: {e}"));
            (s.client, s.backend)
        })
        .collect()
}

/// Makes a router interface silent both ways (nftables netdev ingress and egress chains
/// that drop everything) while the link stays up; undone on drop.
struct Silence<'n> {
    router: &'n Netns,
}

impl<'n> Silence<'n> {
    fn start(router: &'n Netns, ifname: &str) -> Self {
        let rules = format!(
            "table netdev xlb_scale_silence {{\n\
             chain in {{ type filter hook ingress device \"{ifname}\" priority 0; policy drop; }}\n\
             chain out {{ type filter hook egress device \"{ifname}\" priority 0; policy drop; }}\n\
             }}\n"
        );
        let mut nft = router
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("running nft");
        nft.stdin
            .take()
            .expect("piped")
            .write_all(rules.as_bytes())
            .expect("writing the rules");
        assert!(nft.wait().expect("nft").success(), "nft refused {rules}");
        Self { router }
    }
}

impl Drop for Silence<'_> {
    fn drop(&mut self) {
        let _ = output_within(
            self.router
                .command("nft")
                .args(["delete", "table", "netdev", "xlb_scale_silence"]),
            Duration::from_secs(10),
        );
    }
}

/// `xlb backend prepare` in a backend's namespace, undone on drop.
struct Prepared<'n>(&'n Netns);

impl<'n> Prepared<'n> {
    fn new(ns: &'n Netns) -> Self {
        let out = output_within(
            ns.command(common::XLB).args([
                "backend",
                "prepare",
                "--vip",
                &ScaleOutTopology::VIP_V4.to_string(),
            ]),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "xlb backend prepare: {out:?}");
        Self(ns)
    }
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        let _ = output_within(
            self.0.command(common::XLB).args(["backend", "unprepare"]),
            Duration::from_secs(30),
        );
    }
}

#[test]
fn flows_spread_over_bgp_ecmp_and_survive_drain_and_node_loss() {
    require_root();
    Bird::require_installed();
    const NODES: usize = 3;
    const BACKENDS: usize = 2;
    let topo = ScaleOutTopology::new("xscale-", NODES, BACKENDS).expect("topology");
    let dir = TempDir::new("scale", "bird");
    let router = topo.router();
    // Kernel ECMP hashes on the 5-tuple (policy 1), so one client's flows spread. Replies
    // come from the VIP out of the backends' links: no reverse-path check on the router.
    router
        .sysctl("net.ipv4.fib_multipath_hash_policy", "1")
        .expect("L4 hash");
    for key in ["all", "default"] {
        router
            .sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0")
            .expect("rp_filter");
    }
    for link in topo.node_links.iter().chain(&topo.backend_links) {
        router
            .sysctl(&format!("net/ipv4/conf/{}/rp_filter", link.a.ifname), "0")
            .expect("rp_filter");
    }

    let _prepared: Vec<Prepared<'_>> = (0..BACKENDS)
        .map(|j| Prepared::new(topo.backend(j)))
        .collect();
    // Each backend names itself in a first line, then echoes.
    let any = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), VIP_PORT);
    let _servers: Vec<Backend> = (0..BACKENDS)
        .map(|j| Backend::tcp(topo.backend(j), &format!("b{j}"), any, Reply::GreetThenEcho))
        .collect();
    let backend_addrs: Vec<String> = topo
        .backend_links
        .iter()
        .map(|l| l.b.ip4().to_string())
        .collect();

    // Every node: the same VIP, backends, ring size and hash seed (the defaults).
    let agents: Vec<Agent<'_>> = (0..NODES)
        .map(|i| {
            let agent = Agent::in_ns(topo.node(i), "scale")
                .iface("router")
                .args(["--announce-table", TABLE, "--no-metrics"])
                .start();
            agent.cli(&["vip", "add", VIP, "--forwarding", "ipip"]);
            for b in &backend_addrs {
                agent.cli(&["backend", "add", VIP, b]);
            }
            agent
        })
        .collect();
    let _router_bird = Bird::start(router, &dir.0, "router", &router_bird_config(&topo));
    let mut node_birds: Vec<Bird> = (0..NODES)
        .map(|i| {
            Bird::start(
                topo.node(i),
                &dir.0,
                &format!("node{i}"),
                &node_bird_config(&topo, i),
            )
        })
        .collect();
    let converged = wait_for_hops(&topo, &[0, 1, 2], Duration::from_secs(30));
    eprintln!("BGP: all three nodes announced within {converged:?} of the daemons' start");

    // Spread: the router's ECMP sends new flows to every node.
    let before: Vec<u64> = agents.iter().map(new_flows).collect();
    let flows = short_flows(topo.client(), 90);
    let per_node: Vec<u64> = agents
        .iter()
        .zip(&before)
        .map(|(a, b)| new_flows(a) - b)
        .collect();
    eprintln!("90 new flows per node: {per_node:?}");
    assert_eq!(per_node.iter().sum::<u64>(), 90, "{per_node:?}");
    assert!(
        per_node.iter().all(|n| *n >= 10),
        "a node got under 10 of 90 flows: {per_node:?}"
    );

    // Same backend from any node: each node's explain agrees with the backend that answered.
    for (client, backend) in flows.iter().take(20) {
        let want = format!(
            "{}:{VIP_PORT}",
            topo.backend_links[backend[1..].parse::<usize>().unwrap()]
                .b
                .ip4()
        );
        for agent in &agents {
            let explained: serde_json::Value = common::parse_json(
                &["explain"],
                &agent.cli(&["explain", &client.to_string(), VIP, "--json"]),
            );
            assert_eq!(
                explained["new_flow_backend"],
                want.as_str(),
                "node in {} would send {client} elsewhere: {explained}",
                agent.place()
            );
        }
    }

    // Drain: node 0 withdraws; its established streams move to the other nodes, same backend.
    let mut streams: Vec<Stream> = (0..30)
        .map(|_| Stream::open(topo.client()).expect("a long-lived stream"))
        .collect();
    assert!(keep_talking(&mut streams, Duration::from_millis(300)).is_empty());
    let on_node0 = tracked_clients(&agents[0]);
    let drained_at = Instant::now();
    agents[0].cli(&["node", "drain"]);
    let withdrawn = wait_for_hops(&topo, &[1, 2], Duration::from_secs(10));
    eprintln!("drain: withdrawn from the router after {withdrawn:?}");
    let failures = keep_talking(&mut streams, Duration::from_secs(2));
    assert!(
        failures.is_empty(),
        "streams lost across the drain: {failures:#?}"
    );
    let moved = streams
        .iter()
        .filter(|s| on_node0.contains(&s.client))
        .count();
    assert!(moved > 0, "no stream was on node 0 before the drain");
    let node0_before = new_flows(&agents[0]);
    let _ = short_flows(topo.client(), 30);
    assert_eq!(
        new_flows(&agents[0]),
        node0_before,
        "a drained node took new flows"
    );
    agents[0].cli(&["node", "undrain"]);
    wait_for_hops(&topo, &[0, 1, 2], Duration::from_secs(10));
    eprintln!(
        "drain: {moved} streams moved off node 0 with no loss ({:?} in all)",
        drained_at.elapsed()
    );

    // Node loss: node 2 goes silent (the router's nftables drop everything to and from it;
    // the link keeps its carrier, so only BFD can tell), then its BGP daemon dies.
    let on_node2 = tracked_clients(&agents[2]);
    let on_it = streams
        .iter()
        .filter(|s| on_node2.contains(&s.client))
        .count();
    assert!(on_it > 0, "no stream on node 2 to lose");
    let silenced = Silence::start(router, &topo.node_links[2].a.ifname);
    let lost_at = Instant::now();
    node_birds[2].kill();
    let withdrawn = wait_for_hops(&topo, &[0, 1], Duration::from_secs(10));
    eprintln!("node loss: the router dropped node 2 after {withdrawn:?}");
    assert!(
        withdrawn < Duration::from_secs(3),
        "withdrawn only after {withdrawn:?}"
    );
    let failures = keep_talking(&mut streams, Duration::from_secs(3));
    assert!(
        failures.is_empty(),
        "streams lost with node 2: {failures:#?}"
    );
    eprintln!(
        "node loss: {on_it} streams that were on node 2 went on via the others ({:?})",
        lost_at.elapsed()
    );

    // The node comes back and takes its share of new flows.
    drop(silenced);
    node_birds[2] = Bird::start(
        topo.node(2),
        &dir.0,
        "node2-again",
        &node_bird_config(&topo, 2),
    );
    let rejoined = wait_for_hops(&topo, &[0, 1, 2], Duration::from_secs(30));
    eprintln!("node back: announced again after {rejoined:?}");
    let node2_before = new_flows(&agents[2]);
    let _ = short_flows(topo.client(), 60);
    let taken = new_flows(&agents[2]) - node2_before;
    eprintln!("node back: took {taken} of 60 new flows");
    assert!(
        taken >= 8,
        "the returning node took only {taken} of 60 new flows"
    );
    assert!(keep_talking(&mut streams, Duration::from_millis(500)).is_empty());
    drop(streams);
}

/// The client addresses of the flows a node's connection table holds for the VIP.
fn tracked_clients(agent: &Agent<'_>) -> BTreeSet<SocketAddr> {
    let conns: serde_json::Value = common::parse_json(
        &["conns"],
        &agent.cli(&["conns", VIP, "--json", "--limit", "1000"]),
    );
    conns["flows"]
        .as_array()
        .expect("flows")
        .iter()
        .map(|f| {
            f["client"]
                .as_str()
                .expect("client")
                .parse()
                .expect("address")
        })
        .collect()
}
