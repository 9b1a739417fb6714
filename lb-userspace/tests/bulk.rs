//! Bulk TCP through the VIPs, as a user's containers send it: every veth keeps the kernel's
//! default offloads (TSO/GSO segments of 64 KB, `CHECKSUM_PARTIAL` from local senders, GRO
//! off), and the agent runs with the default `--xdp-mode auto`.
//!
//! ```text
//!                       +-- b0 (veth)
//! client --veth-- lb ---+-- b1 (veth)
//!                       +-- br0 (bridge) --+-- b2
//!                                          +-- b3
//! ```
//!
//! Each VIP (IPv4 and IPv6; one served by the veth backends, one by the bridged ones) carries
//! 1 MiB downloads, 1 MiB uploads echoed back and a long-lived stream echoed for a few
//! seconds; every byte is checked. Before the TC hook, native XDP on these veths dropped
//! everything and generic XDP stalled on the GSO segments (0-436 kB of 1 MB in 5-20 s).
//!
//! Needs root. Namespaces, temp dirs and pins are unique to the test and torn down by guards.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
    thread::{self},
    time::{Duration, Instant},
};

use xlb_netns::{
    Netns,
    ipnet::{Ipv4Net, Ipv6Net},
};

mod common;
use common::{Agent, TcpServer, counter, require_root};

const NS_PREFIX: &str = "xbulk-";
const SUITE: &str = "bulk";
const PORT: u16 = 8080;
const BULK_BYTES: usize = 1 << 20;
/// How long the long-lived stream keeps sending.
const STREAM_FOR: Duration = Duration::from_secs(3);
/// A stalled transfer fails the test instead of hanging it: reads and writes that make no
/// progress for this long.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const SERVER_LIFETIME: Duration = Duration::from_secs(180);

/// The first byte a client sends: what it wants from the backend.
const DOWNLOAD: u8 = b'D';
const ECHO: u8 = b'E';

/// The namespaces and their links, all with default offloads.
struct Lab {
    client: Netns,
    lb: Netns,
    backends: Vec<Netns>,
}

fn v4(third: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 231, third, host)
}

fn v6(net: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd31, net, 0, 0, 0, 0, 0, host)
}

fn addr_pair(ns: &Netns, ifname: &str, third: u8, host: u8) {
    ns.add_address(ifname, Ipv4Net::new(v4(third, host), 24).expect("prefix"))
        .expect("IPv4 address");
    ns.add_address(
        ifname,
        Ipv6Net::new(v6(u16::from(third), u16::from(host)), 64).expect("prefix"),
    )
    .expect("IPv6 address");
}

fn default_routes(ns: &Netns, third: u8) {
    ns.add_default_route(v4(third, 1).into())
        .expect("IPv4 default route");
    ns.add_default_route(v6(u16::from(third), 1).into())
        .expect("IPv6 default route");
}

impl Lab {
    /// The LB's interfaces: `client`, `b0`, `b1` (veths) and `br0` (the bridge).
    const LB_IFACES: [&'static str; 4] = ["client", "b0", "b1", "br0"];

    fn build() -> Self {
        require_root();
        xlb_netns::cleanup_stale(NS_PREFIX).expect("removing stale namespaces");
        let ns = |role: &str| {
            Netns::create(&format!("{NS_PREFIX}{role}-")).expect("creating a namespace")
        };
        let (client, lb) = (ns("c"), ns("lb"));
        let backends: Vec<Netns> = (0..4).map(|i| ns(&format!("b{i}"))).collect();

        // client <-> lb: 10.231.1.0/24, fd31:1::/64.
        client.add_veth("eth0", &lb, "client").expect("client veth");
        addr_pair(&client, "eth0", 1, 2);
        addr_pair(&lb, "client", 1, 1);
        client.set_link_up("eth0").expect("link up");
        lb.set_link_up("client").expect("link up");
        default_routes(&client, 1);

        // lb <-> b0, b1 on veths of their own: 10.231.2.0/24 and 10.231.3.0/24.
        for (i, b) in backends[..2].iter().enumerate() {
            let (lb_if, third) = (format!("b{i}"), 2 + i as u8);
            b.add_veth("eth0", &lb, &lb_if).expect("backend veth");
            addr_pair(b, "eth0", third, 2);
            addr_pair(&lb, &lb_if, third, 1);
            b.set_link_up("eth0").expect("link up");
            lb.set_link_up(&lb_if).expect("link up");
            default_routes(b, third);
        }

        // b2, b3 behind the bridge br0: 10.231.4.0/24, as containers sit behind podman0.
        lb.add_bridge("br0").expect("bridge");
        addr_pair(&lb, "br0", 4, 1);
        lb.set_link_up("br0").expect("bridge up");
        for (i, b) in backends[2..].iter().enumerate() {
            let port = format!("br0p{i}");
            b.add_veth("eth0", &lb, &port).expect("bridged veth");
            lb.set_master(&port, "br0").expect("enslaving to br0");
            addr_pair(b, "eth0", 4, 2 + i as u8);
            b.set_link_up("eth0").expect("link up");
            lb.set_link_up(&port).expect("link up");
            default_routes(b, 4);
        }
        Self {
            client,
            lb,
            backends,
        }
    }

    fn backend_addrs(i: usize) -> [SocketAddr; 2] {
        let (third, host) = if i < 2 {
            (2 + i as u8, 2)
        } else {
            (4, i as u8)
        };
        [
            SocketAddr::new(v4(third, host).into(), PORT),
            SocketAddr::new(v6(u16::from(third), u16::from(host)).into(), PORT),
        ]
    }
}

// ---------------------------------------------------------------------------
// Backend servers
// ---------------------------------------------------------------------------

fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

/// A backend's side of a connection: `D` downloads [`BULK_BYTES`] of a pattern, `E` echoes
/// everything until the client shuts its side.
fn serve(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut what = [0u8; 1];
    conn.read_exact(&mut what)?;
    match what[0] {
        DOWNLOAD => conn.write_all(&pattern(BULK_BYTES))?,
        ECHO => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                conn.write_all(&buf[..n])?;
            }
        }
        other => return Err(std::io::Error::other(format!("unknown request {other}"))),
    }
    conn.shutdown(Shutdown::Write)
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

fn connect(vip: SocketAddr, request: u8) -> TcpStream {
    let mut conn = TcpStream::connect_timeout(&vip, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connecting to {vip}: {e}"));
    conn.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    conn.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    conn.write_all(&[request])
        .unwrap_or_else(|e| panic!("asking {vip}: {e}"));
    conn
}

fn download(vip: SocketAddr) {
    let mut conn = connect(vip, DOWNLOAD);
    let mut got = Vec::with_capacity(BULK_BYTES);
    conn.read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("downloading from {vip} ({} bytes so far): {e}", got.len()));
    assert!(
        got == pattern(BULK_BYTES),
        "download from {vip}: {} bytes, not the {BULK_BYTES} sent",
        got.len()
    );
}

/// Sends `chunks` (each written whole) and checks that the echo returns every byte in order;
/// the echo is read on another thread, as it flows back while the upload still runs.
fn echo(vip: SocketAddr, chunks: impl Iterator<Item = Vec<u8>>) -> usize {
    let mut conn = connect(vip, ECHO);
    let mut reader = conn.try_clone().expect("cloning the socket");
    let echoed = thread::spawn(move || {
        let mut got = Vec::new();
        reader.read_to_end(&mut got).map(|_| got)
    });
    let mut sent = Vec::new();
    for chunk in chunks {
        conn.write_all(&chunk)
            .unwrap_or_else(|e| panic!("uploading to {vip} after {} bytes: {e}", sent.len()));
        sent.extend_from_slice(&chunk);
    }
    conn.shutdown(Shutdown::Write)
        .expect("shutting down the upload");
    let got = echoed
        .join()
        .expect("echo reader panicked")
        .unwrap_or_else(|e| panic!("reading the echo from {vip}: {e}"));
    assert!(
        got == sent,
        "echo from {vip}: {} bytes back, {} sent",
        got.len(),
        sent.len()
    );
    sent.len()
}

/// A long-lived connection: 16 KiB every millisecond for [`STREAM_FOR`], echoed back (paced,
/// so the stream lives that long without the test holding gigabytes to compare).
fn stream(vip: SocketAddr) -> usize {
    let started = Instant::now();
    let chunk = pattern(16 * 1024);
    echo(
        vip,
        std::iter::from_fn(move || {
            thread::sleep(Duration::from_millis(1));
            (started.elapsed() < STREAM_FOR).then(|| chunk.clone())
        }),
    )
}

#[test]
fn bulk_tcp_through_veths_and_a_bridge_with_default_offloads() {
    let lab = Lab::build();
    let _servers: Vec<TcpServer> = lab
        .backends
        .iter()
        .map(|ns| TcpServer::start(ns, PORT, SERVER_LIFETIME, serve))
        .collect();
    let agent = Agent::in_ns(&lab.lb, SUITE).ifaces(Lab::LB_IFACES).start();

    let log = agent.process.log();
    for iface in Lab::LB_IFACES {
        assert!(
            log.lines().any(|l| l.contains("attached")
                && l.contains(&format!("\"{iface}\""))
                && l.contains("hook=tc")),
            "--xdp-mode auto did not put {iface} on the TC hook, or did not say so:\n{log}"
        );
    }

    let vips: [(SocketAddr, &[usize]); 4] = [
        ("10.231.9.1:80".parse().unwrap(), &[0, 1]),
        ("[fd31:9::1]:80".parse().unwrap(), &[0, 1]),
        ("10.231.9.2:80".parse().unwrap(), &[2, 3]),
        ("[fd31:9::2]:80".parse().unwrap(), &[2, 3]),
    ];
    for (vip, backends) in &vips {
        let spec = format!("{vip}/tcp");
        agent.cli(&["vip", "add", &spec]);
        for b in *backends {
            let family = usize::from(vip.is_ipv6());
            agent.cli(&[
                "backend",
                "add",
                &spec,
                &Lab::backend_addrs(*b)[family].to_string(),
            ]);
        }
    }
    let moved = lab
        .client
        .run(|| {
            let mut moved = 0;
            for (vip, _) in &vips {
                let started = Instant::now();
                for _ in 0..3 {
                    download(*vip);
                    moved += BULK_BYTES;
                    moved += echo(*vip, std::iter::once(pattern(BULK_BYTES)));
                }
                let streamed = stream(*vip);
                moved += streamed;
                eprintln!(
                    "{vip}: 3 x 1 MiB down, 3 x 1 MiB up and back, {} KiB streamed for {STREAM_FOR:?}, in {:.2} s",
                    streamed / 1024,
                    started.elapsed().as_secs_f64()
                );
            }
            moved
        })
        .expect("entering the client namespace");

    let stats = agent.stats();
    for (vip, _) in &vips {
        let status = stats
            .vips
            .iter()
            .find(|v| v.vip.addr == *vip)
            .unwrap_or_else(|| panic!("{vip} missing from stats"));
        assert_eq!(status.new_flows, 7, "{vip}: one new flow per connection");
        assert!(
            status.bytes >= 3 * BULK_BYTES as u64,
            "{vip}: the uploads did not cross the VIP ({} bytes)",
            status.bytes
        );
    }
    assert!(
        counter(&stats, "reverse_nat") > 0,
        "no reply was translated"
    );
    assert_eq!(
        counter(&stats, "malformed"),
        0,
        "packets dropped as malformed"
    );
    assert_eq!(counter(&stats, "xdp_aborted"), 0, "aborted packets");
    eprintln!("{} MiB through the VIPs", moved >> 20);
}
