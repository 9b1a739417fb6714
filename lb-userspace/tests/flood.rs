//! A SYN flood must not evict established flows (issue 11).
//!
//! ```text
//!   client 10.10.0.2 ──── 10.10.0.1 lb 10.11.i.1 ──── 10.11.i.2 backend i   (i < 3)
//!   (flood sources 10.200.0.0/16, spoofed from the client namespace)
//! ```
//!
//! The agent runs with a connection table of [`CONNTRACK_ENTRIES`] entries. While 20
//! long-lived TCP streams (10 server-push, 10 echo; every byte checked, each must keep making
//! progress) and a steady stream of new connections (connect, request, checked answer, close)
//! run through the VIP, the client namespace writes [`FLOOD_SYNS`] spoofed SYNs to the VIP from
//! distinct source addresses and ports of 10.200.0.0/16, as raw Ethernet frames (AF_PACKET):
//! about 60 times the table. The backends answer them with SYN cookies; the LB routes those
//! answers back to the client namespace, which does not forward and drops them, so nothing
//! leaves the test's namespaces.
//!
//! Before the fix a flood overran the LRU connection table and evicted the established flows:
//! their replies then left the LB untranslated (from the backend's address), the client reset
//! them, and streams died. The test asserts zero failed streams, zero stalls, zero failed new
//! connections, and that the agent counted the flood's packets at the VIP.
//!
//! Needs root. Namespaces, temp dirs and pins are unique to the test and torn down by guards.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use lb_userspace::frames::{self, TCP_SYN};
use xlb_netns::{Netns, Topology, ipnet::Ipv4Net};

mod common;
use common::{Agent, RaiseOnDrop, TcpServer, backend_v4, counter, require_root};

const NS_PREFIX: &str = "xflood-";
const SUITE: &str = "flood";
const BACKENDS: usize = 3;
const PORT: u16 = 8080;
const VIP: SocketAddrV4 = SocketAddrV4::new(Topology::VIP_V4, 80);
/// Small, so that the flood overruns it many times over in a few seconds.
const CONNTRACK_ENTRIES: u32 = 16_384;
/// Spoofed SYNs, each from a source address and port no other SYN uses.
const FLOOD_SYNS: u32 = 1_000_000;
/// The flood's sources: routed only inside the test's namespaces.
const FLOOD_NET: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
/// Frames per sendmmsg(2).
const FLOOD_BATCH: usize = 256;
const PUSH_STREAMS: usize = 10;
const ECHO_STREAMS: usize = 10;
const NEW_CONNECTION_THREADS: usize = 2;
/// Each stream's pace: one chunk per tick, both ways for echo streams.
const STREAM_CHUNK: usize = 1024;
const STREAM_TICK: Duration = Duration::from_millis(10);
/// Traffic before and after the flood, so that streams are established first and any flow
/// the flood broke shows up as a stall or reset afterwards.
const SETTLE: Duration = Duration::from_secs(3);
/// A stream that delivers nothing for this long has stalled (it sends every 10 ms).
const STALL_LIMIT: Duration = Duration::from_secs(2);
/// Reads and writes that make no progress for this long fail the stream.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Everything in the test stops by itself within this time.
const LIFETIME: Duration = Duration::from_secs(150);

/// The first byte a client sends: what it wants from the backend.
const PUSH: u8 = b'P';
const ECHO: u8 = b'E';
const REQUEST: u8 = b'R';

/// Byte `offset` of every stream's content.
fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(2_654_435_761) >> 13) as u8
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(pattern_byte).collect()
}

/// A backend's side: `P` pushes the pattern every tick until the client goes away, `E` echoes
/// until the client shuts its side, `R` answers an 8-byte nonce with its bytes reversed.
fn serve(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut what = [0u8; 1];
    conn.read_exact(&mut what)?;
    match what[0] {
        PUSH => {
            let started = Instant::now();
            let mut offset = 0u64;
            while started.elapsed() < LIFETIME {
                if conn.write_all(&pattern(offset, STREAM_CHUNK)).is_err() {
                    // The client closed the stream: the end of a push.
                    break;
                }
                offset += STREAM_CHUNK as u64;
                thread::sleep(STREAM_TICK);
            }
        }
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
        REQUEST => {
            let mut nonce = [0u8; 8];
            conn.read_exact(&mut nonce)?;
            nonce.reverse();
            conn.write_all(&nonce)?;
        }
        other => return Err(std::io::Error::other(format!("unknown request {other}"))),
    }
    conn.shutdown(Shutdown::Write)
}

/// What the client threads report back.
#[derive(Default)]
struct Progress {
    /// Verified bytes received, per stream.
    streams: Vec<AtomicU64>,
    /// Why a stream ended early, per stream.
    stream_errors: Mutex<Vec<(usize, String)>>,
    connections_ok: AtomicU64,
    connections_failed: AtomicU64,
    connection_errors: Mutex<Vec<String>>,
    /// The slowest successful connection, in ms.
    slowest_connection_ms: AtomicU64,
}

fn connect(request: u8) -> std::io::Result<TcpStream> {
    let mut conn = TcpStream::connect_timeout(&SocketAddr::V4(VIP), CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    conn.write_all(&[request])?;
    Ok(conn)
}

/// Reads exactly `buf.len()` bytes, counting them into `received` as they come, so that a
/// slow read still shows progress to the stall watch.
fn read_counted(conn: &mut TcpStream, buf: &mut [u8], received: &AtomicU64) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match conn.read(&mut buf[filled..])? {
            0 => {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "stream closed",
                ));
            }
            n => {
                filled += n;
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

fn check(buf: &[u8], offset: u64) -> std::io::Result<()> {
    match buf
        .iter()
        .zip(offset..)
        .find(|(b, at)| **b != pattern_byte(*at))
    {
        None => Ok(()),
        Some((_, at)) => Err(std::io::Error::other(format!("wrong byte at offset {at}"))),
    }
}

/// Reads the server's push until `stop`, checking every byte.
fn push_stream(index: usize, stop: &AtomicBool, progress: &Progress) -> std::io::Result<()> {
    let mut conn = connect(PUSH)?;
    let received = &progress.streams[index];
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut offset = 0u64;
    while !stop.load(Ordering::Relaxed) {
        read_counted(&mut conn, &mut buf, received)?;
        check(&buf, offset)?;
        offset += STREAM_CHUNK as u64;
    }
    Ok(())
}

/// Sends a chunk every tick until `stop` and checks that each comes back, in order.
fn echo_stream(index: usize, stop: &AtomicBool, progress: &Progress) -> std::io::Result<()> {
    let mut conn = connect(ECHO)?;
    let received = &progress.streams[index];
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut offset = 0u64;
    while !stop.load(Ordering::Relaxed) {
        conn.write_all(&pattern(offset, STREAM_CHUNK))?;
        read_counted(&mut conn, &mut buf, received)?;
        check(&buf, offset)?;
        offset += STREAM_CHUNK as u64;
        thread::sleep(STREAM_TICK);
    }
    conn.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)?;
    if rest.is_empty() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{} bytes echoed that were never sent",
            rest.len()
        )))
    }
}

/// One request on a new connection; the answer must be the nonce reversed, then the close.
fn one_request(nonce: u64) -> std::io::Result<()> {
    let mut conn = connect(REQUEST)?;
    conn.write_all(&nonce.to_be_bytes())?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer)?;
    if answer == nonce.to_le_bytes() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "answer {answer:02x?} to nonce {nonce:#x}"
        )))
    }
}

fn new_connections(thread_index: usize, stop: &AtomicBool, progress: &Progress) {
    let mut nonce = (thread_index as u64) << 48;
    while !stop.load(Ordering::Relaxed) {
        nonce += 1;
        let started = Instant::now();
        match one_request(nonce) {
            Ok(()) => {
                progress.connections_ok.fetch_add(1, Ordering::Relaxed);
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                progress
                    .slowest_connection_ms
                    .fetch_max(ms, Ordering::Relaxed);
            }
            Err(e) => {
                progress.connections_failed.fetch_add(1, Ordering::Relaxed);
                progress
                    .connection_errors
                    .lock()
                    .expect("lock")
                    .push(format!("nonce {nonce:#x}: {e}"));
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The `n`th flood source: every (address, port) pair distinct, spread over the /16.
fn flood_source(n: u32) -> SocketAddrV4 {
    // An odd multiplier permutes the 16-bit host part, so consecutive SYNs hit scattered
    // addresses (and both CPUs' LRU lists) rather than a run of neighbours.
    let host = (n & 0xffff).wrapping_mul(40_503) & 0xffff;
    let port = 1024 + u16::try_from(n >> 16).expect("fewer than 2^32 SYNs");
    SocketAddrV4::new(
        Ipv4Addr::from_bits(FLOOD_NET.to_bits() | host),
        port.wrapping_add(u16::try_from(host & 0xff).expect("< 256")),
    )
}

/// Writes [`FLOOD_SYNS`] spoofed SYNs to the VIP out of `ifname` (in the calling thread's
/// namespace), addressed to `dst_mac`; returns how many the kernel took.
fn flood(ifname: &str, src_mac: [u8; 6], dst_mac: [u8; 6]) -> std::io::Result<u64> {
    let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(std::io::Error::from)?;
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    // Protocol 0: this socket sends only and never receives a copy of the traffic.
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = i32::try_from(ifindex).expect("ifindex fits");
    // SAFETY: `addr` is a valid sockaddr_ll and the length says so.
    let bound = unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(std::io::Error::last_os_error());
    }

    let mut sent = 0u64;
    let mut next = 0u32;
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(FLOOD_BATCH);
    while next < FLOOD_SYNS {
        batch.clear();
        while batch.len() < FLOOD_BATCH && next < FLOOD_SYNS {
            let mut frame = frames::tcp(flood_source(next), VIP, TCP_SYN);
            frame[0..6].copy_from_slice(&dst_mac);
            frame[6..12].copy_from_slice(&src_mac);
            batch.push(frame);
            next += 1;
        }
        let mut iovecs: Vec<libc::iovec> = batch
            .iter_mut()
            .map(|f| libc::iovec {
                iov_base: f.as_mut_ptr().cast(),
                iov_len: f.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; all-zero is a valid value.
        let mut msgs: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iov| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = std::ptr::from_mut(iov);
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut done = 0;
        while done < msgs.len() {
            // SAFETY: every header points at an iovec and frame that outlive the call; the
            // socket is bound, so no destination address is needed.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    msgs[done..].as_mut_ptr(),
                    u32::try_from(msgs.len() - done).expect("batch fits"),
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted || e.raw_os_error() == Some(libc::ENOBUFS) {
                    thread::yield_now();
                    continue;
                }
                return Err(e);
            }
            done += usize::try_from(n).expect("non-negative");
            sent += u64::try_from(n).expect("non-negative");
        }
    }
    Ok(sent)
}

fn vip_packets(agent: &Agent) -> (u64, u64) {
    let stats = agent.stats();
    let vip = stats
        .vips
        .iter()
        .find(|v| v.vip.addr == SocketAddr::V4(VIP))
        .expect("the VIP in stats");
    (vip.packets, vip.new_flows)
}

struct Lab {
    topology: Topology,
}

impl Lab {
    fn build() -> Self {
        xlb_netns::cleanup_stale(NS_PREFIX).expect("removing stale namespaces");
        let topology = Topology::with_prefix(NS_PREFIX, BACKENDS).expect("building the topology");
        let flood_net = Ipv4Net::new(FLOOD_NET, 16).expect("prefix");
        // The backends' answers to the flood come back to the LB, which sends them on to the
        // client namespace; that one does not forward (the default), so it drops them.
        topology
            .lb()
            .add_route(flood_net, topology.client_link.b.ip4().into())
            .expect("route to the flood sources");
        // The client namespace must not forward them (new namespaces may inherit forwarding
        // from the host): they would bounce back to the LB until their TTL ran out.
        topology
            .client()
            .sysctl("net.ipv4.ip_forward", "0")
            .expect("forwarding off in the client namespace");
        for i in 0..BACKENDS {
            // Half-open handshakes then cost the backends nothing, and real ones still work.
            topology
                .backend(i)
                .sysctl("net.ipv4.tcp_syncookies", "1")
                .expect("syncookies");
        }
        Self { topology }
    }

    fn client(&self) -> &Netns {
        self.topology.client()
    }
}

/// Joins a client thread, turning its panic into the test's.
fn join<T>(handle: JoinHandle<T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

#[test]
fn a_syn_flood_does_not_break_established_flows() {
    require_root();
    let lab = Lab::build();
    let _servers: Vec<TcpServer> = (0..BACKENDS)
        .map(|i| TcpServer::start(lab.topology.backend(i), PORT, LIFETIME, serve))
        .collect();
    let ifaces: Vec<String> = std::iter::once("client".to_owned())
        .chain((0..BACKENDS).map(|i| format!("b{i}")))
        .collect();
    let entries = CONNTRACK_ENTRIES.to_string();
    let agent = Agent::in_ns(lab.topology.lb(), SUITE)
        .ifaces(&ifaces)
        .args(["--conntrack-entries", &entries, "--no-metrics"])
        .start();
    let spec = format!("{VIP}/tcp");
    agent.cli(&["vip", "add", &spec]);
    for i in 0..BACKENDS {
        agent.cli(&["backend", "add", &spec, &backend_v4(i, PORT).to_string()]);
    }

    let streams = PUSH_STREAMS + ECHO_STREAMS;
    let progress = Arc::new(Progress {
        streams: (0..streams).map(|_| AtomicU64::new(0)).collect(),
        ..Progress::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_panic = RaiseOnDrop(Arc::clone(&stop));
    let mut handles = Vec::new();
    for index in 0..streams {
        let (stop, progress) = (Arc::clone(&stop), Arc::clone(&progress));
        handles.push(
            lab.client()
                .spawn(move || {
                    let result = if index < PUSH_STREAMS {
                        push_stream(index, &stop, &progress)
                    } else {
                        echo_stream(index, &stop, &progress)
                    };
                    if let Err(e) = result {
                        let kind = if index < PUSH_STREAMS { "push" } else { "echo" };
                        let why = if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
                        {
                            format!("nothing for {IO_TIMEOUT:?}")
                        } else {
                            e.to_string()
                        };
                        let bytes = progress.streams[index].load(Ordering::Relaxed);
                        progress
                            .stream_errors
                            .lock()
                            .expect("lock")
                            .push((index, format!("{kind} stream after {bytes} bytes: {why}")));
                    }
                })
                .expect("starting a stream"),
        );
    }
    for t in 0..NEW_CONNECTION_THREADS {
        let (stop, progress) = (Arc::clone(&stop), Arc::clone(&progress));
        handles.push(
            lab.client()
                .spawn(move || new_connections(t, &stop, &progress))
                .expect("starting new connections"),
        );
    }

    // Samples every stream's progress until `stop`; the longest time each went without any.
    let watch = {
        let (stop, progress) = (Arc::clone(&stop), Arc::clone(&progress));
        thread::spawn(move || {
            let mut last: Vec<(u64, Instant)> = vec![(0, Instant::now()); streams];
            let mut longest = vec![Duration::ZERO; streams];
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(100));
                let now = Instant::now();
                for (i, counter) in progress.streams.iter().enumerate() {
                    let bytes = counter.load(Ordering::Relaxed);
                    if bytes != last[i].0 {
                        last[i] = (bytes, now);
                    }
                    longest[i] = longest[i].max(now - last[i].1);
                }
            }
            longest
        })
    };

    thread::sleep(SETTLE);
    let before = vip_packets(&agent);
    let client_mac = lab.client().mac("lb").expect("client MAC");
    let lb_mac = lab.topology.lb().mac("client").expect("LB MAC");
    let flood_started = Instant::now();
    let sent = lab
        .client()
        .run(|| flood("lb", client_mac, lb_mac))
        .expect("entering the client namespace")
        .expect("flooding");
    let flood_took = flood_started.elapsed();
    let after = vip_packets(&agent);
    thread::sleep(SETTLE);

    stop.store(true, Ordering::Relaxed);
    for h in handles {
        join(h);
    }
    let stalls = join(watch);
    let stats = agent.stats();

    let rate = sent as f64 / flood_took.as_secs_f64();
    let received: Vec<u64> = progress
        .streams
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let stream_errors = progress.stream_errors.lock().expect("lock").clone();
    let stalled: Vec<(usize, Duration)> = stalls
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, d)| *d > STALL_LIMIT)
        .collect();
    let connections_ok = progress.connections_ok.load(Ordering::Relaxed);
    let connections_failed = progress.connections_failed.load(Ordering::Relaxed);
    let connection_errors = progress.connection_errors.lock().expect("lock").clone();
    eprintln!(
        "flood: {sent} SYNs in {:.2} s ({:.0} per s) against a {CONNTRACK_ENTRIES}-entry table \
         ({:.0}x); VIP packets +{}, new flows +{} during the flood",
        flood_took.as_secs_f64(),
        rate,
        f64::from(FLOOD_SYNS) / f64::from(CONNTRACK_ENTRIES),
        after.0 - before.0,
        after.1 - before.1,
    );
    eprintln!(
        "streams: {} of {streams} failed, {} stalled over {STALL_LIMIT:?}; longest gaps (ms) {:?}; \
         KiB received {:?}",
        stream_errors.len(),
        stalled.len(),
        stalls.iter().map(Duration::as_millis).collect::<Vec<_>>(),
        received.iter().map(|b| b / 1024).collect::<Vec<_>>(),
    );
    eprintln!(
        "new connections: {connections_ok} ok, {connections_failed} failed, slowest {} ms",
        progress.slowest_connection_ms.load(Ordering::Relaxed)
    );
    eprintln!(
        "counters: conntrack_miss {}, reverse_nat {}, xdp_aborted {}, malformed {}",
        counter(&stats, "conntrack_miss"),
        counter(&stats, "reverse_nat"),
        counter(&stats, "xdp_aborted"),
        counter(&stats, "malformed"),
    );

    assert_eq!(sent, u64::from(FLOOD_SYNS), "the kernel refused SYNs");
    // The streams add packets too, so the VIP must have seen at least the flood's SYNs, minus
    // the few a busy veth may drop.
    assert!(
        after.0 - before.0 >= u64::from(FLOOD_SYNS) * 95 / 100,
        "the flood did not reach the VIP: {} packets counted for {FLOOD_SYNS} SYNs",
        after.0 - before.0
    );
    assert!(
        stream_errors.is_empty() && stalled.is_empty(),
        "{} of {streams} long-lived streams failed: {stream_errors:?}; stalled (index, longest gap): \
         {stalled:?}",
        stream_errors.len()
    );
    assert!(
        received.iter().all(|&b| b > 0),
        "a stream never received anything: {received:?}"
    );
    assert_eq!(
        connections_failed, 0,
        "new connections failed during the flood: {connection_errors:?}"
    );
    assert!(connections_ok > 0, "no new connection was made");
    assert_eq!(counter(&stats, "xdp_aborted"), 0, "aborted packets");
}
