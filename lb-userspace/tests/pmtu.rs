//! Path-MTU discovery through xlb, end to end: a router whose next link has a smaller MTU
//! than the path before it answers a too-big TCP segment with ICMP "fragmentation needed"
//! (IPv4) or "packet too big" (IPv6), and the transfer only completes if that error reaches
//! the sender's socket in a form it recognises, which takes xlb's translation:
//!
//! - download: `client -- router -- lb -- backend`, the router's link to the client at MTU
//!   1280. The backend's full-size replies (VIP → client after xlb) hit it; the router's
//!   error goes to the VIP, and xlb must hand it to the backend quoting backend → client.
//! - upload: `client -- lb -- router -- backend`, the router's link to the backend at MTU
//!   1280. The client's segments (client → backend after xlb) hit it; the router's error
//!   goes to the client, and xlb must make it quote client → VIP.
//!
//! The agent runs in the LB namespace in its default `--xdp-mode auto`, which puts the
//! veths on the TC hook. Each direction is exercised over IPv4 and IPv6. Only the
//! router's own link is narrowed: a veth drops frames larger than its receiver's MTU, so
//! the other end stays at 1500 and small packets (ACKs, requests) pass both ways.
//!
//! Needs root. Namespaces (unique prefixes), temp dirs and pins are torn down by guards.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use xlb_netns::{
    Netns, Network, NsId,
    ipnet::{Ipv4Net, Ipv6Net},
};

mod common;
use common::{Agent, TcpServer, counter, require_root};

const SUITE: &str = "pmtu";
const BACKEND_PORT: u16 = 8080;
const VIP_PORT: u16 = 80;
const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
/// What the router's narrow link carries; IPv6's minimum.
const NARROW_MTU: u32 = 1280;
const TRANSFER: usize = 1 << 20;
/// A transfer that makes no progress for this long has stalled: without the translation
/// it never resumes (TCP keeps resending the same too-big segments).
const STALL: Duration = Duration::from_secs(10);
/// Upper bound for the server threads, whatever the test does.
const SERVER_LIFETIME: Duration = Duration::from_secs(120);

/// Where the narrow link is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Narrow {
    /// Between a router and the client: downloads need path-MTU discovery.
    ClientSide,
    /// Between a router and the backend: uploads need it.
    BackendSide,
}

/// A chain of namespaces `client -- … -- lb -- … -- backend`, link `k` on `10.61.k.0/24`
/// and `fd00:61:k::/64` (its left end `.1`, its right end `.2`), every node routing
/// through its neighbours, one router's link towards the end narrowed.
struct Path {
    net: Network,
    client: NsId,
    lb: NsId,
    backend: NsId,
    /// The LB's interfaces.
    lb_ifaces: [String; 2],
    backend_addr: (Ipv4Addr, Ipv6Addr),
}

fn link_v4(k: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 61, k, 0), 24).expect("valid prefix")
}

fn link_v6(k: u8) -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0xfd00, 0x61, u16::from(k), 0, 0, 0, 0, 0), 64)
        .expect("valid prefix")
}

impl Path {
    fn build(narrow: Narrow) -> Self {
        // Distinct prefixes: each test's stale-namespace cleanup leaves the other's alone.
        let prefix = match narrow {
            Narrow::ClientSide => "xpmtud-",
            Narrow::BackendSide => "xpmtuu-",
        };
        let mut net = Network::new(prefix).expect("network");
        let roles: &[&str] = match narrow {
            Narrow::ClientSide => &["client", "router", "lb", "b0"],
            Narrow::BackendSide => &["client", "lb", "router", "b0"],
        };
        let ids: Vec<NsId> = roles
            .iter()
            .map(|r| net.add_namespace(r).expect("namespace"))
            .collect();
        let links: Vec<_> = ids
            .windows(2)
            .zip(1u8..)
            .map(|(pair, k)| {
                net.connect(pair[0], pair[1], link_v4(k), link_v6(k))
                    .expect("link")
            })
            .collect();
        let lb_at = roles.iter().position(|r| *r == "lb").expect("an lb");
        for (i, &id) in ids.iter().enumerate() {
            let ns = net.ns(id);
            if i > 0 && i < ids.len() - 1 {
                ns.enable_forwarding().expect("forwarding");
            }
            // Towards the LB by default; the LB itself routes what lies beyond its
            // neighbours through them.
            if i < lb_at {
                let right = &links[i].b;
                ns.add_default_route(right.ip4().into()).expect("route");
                ns.add_default_route(right.ip6().into()).expect("route");
            } else if i > lb_at {
                let left = &links[i - 1].a;
                ns.add_default_route(left.ip4().into()).expect("route");
                ns.add_default_route(left.ip6().into()).expect("route");
            } else {
                for (k, link) in links.iter().enumerate() {
                    let via = if k + 1 < lb_at {
                        &links[lb_at - 1].a
                    } else if k > lb_at {
                        &links[lb_at].b
                    } else {
                        continue;
                    };
                    ns.add_route(link.a.v4, via.ip4().into()).expect("route");
                    ns.add_route(link.a.v6, via.ip6().into()).expect("route");
                }
            }
        }
        let router_at = roles.iter().position(|r| *r == "router").expect("a router");
        let (narrow_end, role) = match narrow {
            Narrow::ClientSide => (&links[router_at - 1].b, "client"),
            Narrow::BackendSide => (&links[router_at].a, "b0"),
        };
        net.ns(ids[router_at])
            .set_mtu(&narrow_end.ifname, NARROW_MTU)
            .unwrap_or_else(|e| panic!("MTU of the router's link to the {role}: {e}"));
        let last = &links[links.len() - 1].b;
        Self {
            lb_ifaces: [
                links[lb_at - 1].b.ifname.clone(),
                links[lb_at].a.ifname.clone(),
            ],
            client: ids[0],
            lb: ids[lb_at],
            backend: ids[ids.len() - 1],
            backend_addr: (last.ip4(), last.ip6()),
            net,
        }
    }

    fn ns(&self, id: NsId) -> &Netns {
        self.net.ns(id)
    }
}

/// The backend's side of a connection: it says `get N` (the server sends N bytes and
/// closes) or `put N` (it reads N bytes and answers `got N`).
fn serve(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(STALL))?;
    stream.set_write_timeout(Some(STALL))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let bad = || std::io::Error::new(ErrorKind::InvalidData, format!("bad request {line:?}"));
    let (verb, n) = line.trim().split_once(' ').ok_or_else(bad)?;
    let n: usize = n.parse().map_err(|_| bad())?;
    match verb {
        "get" => writer.write_all(&pattern(n)),
        "put" => {
            let got = drain(&mut reader, n)?;
            writer.write_all(format!("got {got}\n").as_bytes())
        }
        _ => Err(bad()),
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Reads up to `n` bytes (until EOF); how many came.
fn drain(reader: &mut impl std::io::Read, n: usize) -> std::io::Result<usize> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < n {
        match reader.read(&mut buf)? {
            0 => break,
            k => got += k,
        }
    }
    Ok(got)
}

/// One transfer through the VIP from the client namespace: how long it took, or where it
/// stalled.
fn transfer(client: &Netns, vip: SocketAddr, upload: bool) -> Result<Duration, String> {
    client
        .run(|| {
            let started = Instant::now();
            let what = if upload { "upload" } else { "download" };
            let fail = |step: &str, e: std::io::Error| {
                format!(
                    "{what} of {TRANSFER} bytes via {vip}: {step}: {e} after {:?}",
                    started.elapsed()
                )
            };
            let mut stream =
                TcpStream::connect_timeout(&vip, STALL).map_err(|e| fail("connect", e))?;
            stream
                .set_read_timeout(Some(STALL))
                .map_err(|e| fail("timeout", e))?;
            stream
                .set_write_timeout(Some(STALL))
                .map_err(|e| fail("timeout", e))?;
            if upload {
                stream
                    .write_all(format!("put {TRANSFER}\n").as_bytes())
                    .and_then(|()| stream.write_all(&pattern(TRANSFER)))
                    .map_err(|e| fail("sending", e))?;
                let mut answer = String::new();
                BufReader::new(&stream)
                    .read_line(&mut answer)
                    .map_err(|e| fail("awaiting the backend's count", e))?;
                if answer.trim() != format!("got {TRANSFER}") {
                    return Err(format!("{what}: the backend answered {answer:?}"));
                }
            } else {
                stream
                    .write_all(format!("get {TRANSFER}\n").as_bytes())
                    .map_err(|e| fail("asking", e))?;
                let mut data = Vec::with_capacity(TRANSFER);
                stream.read_to_end(&mut data).map_err(|e| {
                    fail(&format!("receiving (stalled at {} bytes)", data.len()), e)
                })?;
                if data != pattern(TRANSFER) {
                    return Err(format!(
                        "{what}: {} bytes arrived, not the {TRANSFER} sent",
                        data.len()
                    ));
                }
            }
            Ok(started.elapsed())
        })
        .expect("entering the client namespace")
}

fn run(narrow: Narrow) {
    require_root();
    let path = Path::build(narrow);
    let _server = TcpServer::start(path.ns(path.backend), BACKEND_PORT, SERVER_LIFETIME, serve);
    let agent = Agent::in_ns(path.ns(path.lb), SUITE)
        .ifaces(&path.lb_ifaces)
        .start();
    let vips = [
        (
            SocketAddr::new(VIP_V4.into(), VIP_PORT),
            SocketAddr::new(path.backend_addr.0.into(), BACKEND_PORT),
        ),
        (
            SocketAddr::new(VIP_V6.into(), VIP_PORT),
            SocketAddr::new(path.backend_addr.1.into(), BACKEND_PORT),
        ),
    ];
    for (vip, backend) in vips {
        let vip = format!("{vip}/tcp");
        agent.cli(&["vip", "add", &vip]);
        agent.cli(&["backend", "add", &vip, &backend.to_string()]);
    }
    let upload = narrow == Narrow::BackendSide;
    let client = path.ns(path.client);
    for (vip, _) in vips {
        let before = counter(&agent.stats(), "icmp_translated");
        let result = transfer(client, vip, upload);
        let stats = agent.stats();
        let translated = counter(&stats, "icmp_translated") - before;
        match result {
            Ok(took) => eprintln!(
                "{} via {vip}: {TRANSFER} bytes in {took:?}, {translated} ICMP errors translated",
                if upload { "upload" } else { "download" }
            ),
            Err(e) => panic!(
                "{e}\nICMP errors translated: {translated}; global counters: {}",
                stats
                    .global
                    .iter()
                    .filter(|c| c.value != 0)
                    .map(|c| format!("{}={}", c.name, c.value))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
        assert!(
            translated > 0,
            "the transfer via {vip} completed without an ICMP error crossing xlb: the path \
             never needed path-MTU discovery, so this test proves nothing"
        );
    }
}

/// The backend's replies are too big for the client's last link: the router's error to
/// the VIP must reach the backend.
#[test]
fn downloads_complete_over_a_narrower_client_side_link() {
    run(Narrow::ClientSide);
}

/// The client's segments are too big for the backend's last link: the router's error
/// about client → backend must reach the client as one about client → VIP.
#[test]
fn uploads_complete_over_a_narrower_backend_side_link() {
    run(Narrow::BackendSide);
}
