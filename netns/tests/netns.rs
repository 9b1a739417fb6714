//! These tests create real namespaces and links, so they need root. Every
//! wait is bounded: a broken topology fails within seconds instead of hanging.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use xlb_netns::{
    DsrTopology, Netns, Topology, cleanup_stale, in_fresh_netns,
    ipnet::{IpNet, Ipv4Net, Ipv6Net},
};

const IO_TIMEOUT: Duration = Duration::from_secs(3);
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Accepts one connection, echoes everything until EOF, and returns the
/// client's address.
fn echo_once(listener: &TcpListener) -> SocketAddr {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    let (mut stream, peer) = loop {
        match listener.accept() {
            Ok(conn) => break conn,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no connection within {ACCEPT_TIMEOUT:?}"
                );
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).unwrap();
    stream.write_all(&buf).unwrap();
    peer
}

/// Starts a server thread in `ns` serving one echo connection on each of
/// `addrs`, in order; returns once every listener is bound.
fn serve(ns: &Netns, addrs: Vec<SocketAddr>) -> thread::JoinHandle<Vec<SocketAddr>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = ns
        .spawn(move || {
            let listeners: Vec<_> = addrs
                .iter()
                .map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}")))
                .collect();
            ready_tx.send(()).unwrap();
            listeners.iter().map(echo_once).collect()
        })
        .unwrap();
    ready_rx
        .recv_timeout(IO_TIMEOUT)
        .expect("server did not bind");
    handle
}

/// Connects to each of `addrs` in order from inside `ns` and asserts the
/// payload comes back; returns the local address of each connection.
fn echo_from(ns: &Netns, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    ns.run(|| {
        addrs
            .iter()
            .map(|addr| {
                let mut s = TcpStream::connect_timeout(addr, IO_TIMEOUT)
                    .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                let msg = format!("hello {addr}");
                s.write_all(msg.as_bytes()).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                let mut back = String::new();
                s.read_to_string(&mut back).unwrap();
                assert_eq!(back, msg, "echo over {addr}");
                s.local_addr().unwrap()
            })
            .collect()
    })
    .unwrap()
}

#[test]
fn veth_pair_carries_tcp_over_v4_and_v6_and_drop_removes_namespace() {
    let a = Netns::create("xlbnt-a").unwrap();
    let b = Netns::create("xlbnt-b").unwrap();
    assert!(
        a.name()
            .starts_with(&format!("xlbnt-a{}-", std::process::id()))
    );
    assert!(a.path().exists());

    a.add_veth("va", &b, "vb").unwrap();
    a.add_address("va", net("10.99.0.1/24")).unwrap();
    a.add_address("va", net("fd00:99::1/64")).unwrap();
    b.add_address("vb", net("10.99.0.2/24")).unwrap();
    b.add_address("vb", net("fd00:99::2/64")).unwrap();
    a.set_link_up("va").unwrap();
    b.set_link_up("vb").unwrap();

    let v4: SocketAddr = "10.99.0.1:7000".parse().unwrap();
    let v6: SocketAddr = "[fd00:99::1]:7000".parse().unwrap();
    let server = serve(&a, vec![v4, v6]);
    let locals = echo_from(&b, &[v4, v6]);
    let peers = server.join().unwrap();
    assert_eq!(peers, locals);
    assert_eq!(locals[0].ip(), IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2)));
    assert_eq!(locals[1].ip(), "fd00:99::2".parse::<IpAddr>().unwrap());

    // The link only exists inside the namespaces.
    let here = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    assert!(!here.contains("va:") && !here.contains("vb:"));

    let (pa, pb): (PathBuf, PathBuf) = (a.path().into(), b.path().into());
    drop(a);
    b.delete().unwrap();
    assert!(!pa.exists(), "{} still exists", pa.display());
    assert!(!pb.exists(), "{} still exists", pb.display());
}

#[test]
fn topology_routes_client_to_backends_through_lb() {
    let topo = Topology::with_prefix("xlbnt-t", 2).unwrap();
    let paths: Vec<PathBuf> = [topo.client(), topo.lb(), topo.backend(0), topo.backend(1)]
        .iter()
        .map(|ns| ns.path().to_owned())
        .collect();

    // Address plan as documented.
    let lb_c = &topo.client_link.a;
    let client = &topo.client_link.b;
    assert_eq!(lb_c.v4, "10.10.0.1/24".parse::<Ipv4Net>().unwrap());
    assert_eq!(client.v6, "fd00:10::2/64".parse::<Ipv6Net>().unwrap());
    assert_eq!(
        (lb_c.ifname.as_str(), client.ifname.as_str()),
        ("client", "lb")
    );
    let b1 = &topo.backend_links[1].b;
    assert_eq!(b1.ip4(), Ipv4Addr::new(10, 11, 1, 2));
    assert_eq!(b1.ip6(), "fd00:11:1::2".parse::<Ipv6Addr>().unwrap());
    assert_eq!(topo.backend_links[1].a.ifname, "b1");
    assert_eq!(
        topo.lb().ifindex("b1").unwrap(),
        topo.backend_links[1].a.ifindex
    );
    assert_eq!(topo.lb().mac("client").unwrap(), lb_c.mac);

    // Preconditions for XDP redirect into the client and backend ends.
    assert!(topo.client().gro("lb").unwrap());
    assert!(topo.backend(1).gro("lb").unwrap());
    assert_eq!(topo.lb().read_sysctl("net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(
        topo.lb()
            .read_sysctl("net.ipv6.conf.all.forwarding")
            .unwrap(),
        "1"
    );

    for i in 0..2 {
        let b = &topo.backend_links[i].b;
        let targets = [
            SocketAddr::new(b.ip4().into(), 8080),
            SocketAddr::new(b.ip6().into(), 8080),
        ];
        let server = serve(topo.backend(i), targets.to_vec());
        let locals = echo_from(topo.client(), &targets);
        let peers = server.join().unwrap();
        // Plain routing: the backend sees the client's own addresses.
        assert_eq!(peers, locals);
        assert_eq!(peers[0].ip(), IpAddr::V4(client.ip4()));
        assert_eq!(peers[1].ip(), IpAddr::V6(client.ip6()));
    }

    drop(topo);
    for p in paths {
        assert!(!p.exists(), "{} still exists", p.display());
    }
}

#[test]
fn dsr_topology_keeps_the_balancer_off_the_backend_client_path() {
    let topo = DsrTopology::with_prefix("xlbnt-d", 2).unwrap();
    let client = &topo.client_link.b;
    assert_eq!(client.v4, "10.30.0.2/24".parse::<Ipv4Net>().unwrap());
    assert_eq!(
        topo.lb_link.b.ip6(),
        "fd00:31::2".parse::<Ipv6Addr>().unwrap()
    );
    let b1 = &topo.backend_links[1].b;
    assert_eq!(b1.ip4(), Ipv4Addr::new(10, 32, 1, 2));
    assert_eq!(b1.ip6(), "fd00:32:1::2".parse::<Ipv6Addr>().unwrap());
    assert_eq!(
        (topo.backend_links[1].a.ifname.as_str(), b1.ifname.as_str()),
        ("b1", "router")
    );
    assert_eq!(
        topo.router().read_sysctl("net.ipv4.ip_forward").unwrap(),
        "1"
    );
    assert_eq!(topo.lb().read_sysctl("net.ipv4.ip_forward").unwrap(), "0");
    assert_eq!(
        topo.router()
            .read_sysctl("net/ipv4/conf/all/rp_filter")
            .unwrap(),
        "0"
    );

    // Client <-> backend and balancer -> backend go through the router alone.
    let lb_before = topo.lb().link_stats("router").unwrap();
    for i in 0..2 {
        let b = &topo.backend_links[i].b;
        let targets = [
            SocketAddr::new(b.ip4().into(), 8080),
            SocketAddr::new(b.ip6().into(), 8080),
        ];
        let server = serve(topo.backend(i), targets.to_vec());
        let locals = echo_from(topo.client(), &targets);
        assert_eq!(server.join().unwrap(), locals);
    }
    let lb_after = topo.lb().link_stats("router").unwrap();
    // Neighbour discovery on the balancer's link is all it may see: far less than the
    // four echoed connections.
    assert!(
        lb_after.rx_bytes - lb_before.rx_bytes < 1000,
        "the balancer saw client/backend traffic: {lb_before:?} -> {lb_after:?}"
    );
    let b0 = SocketAddr::new(topo.backend_links[0].b.ip4().into(), 8081);
    let server = serve(topo.backend(0), vec![b0]);
    let locals = echo_from(topo.lb(), &[b0]);
    assert_eq!(server.join().unwrap(), locals);

    // The router sends the VIPs to the balancer, which owns no address for them.
    let sent = 1200;
    let before = topo.lb().link_stats("router").unwrap();
    topo.client()
        .run(move || {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .send_to(&vec![7u8; sent], (DsrTopology::VIP_V4, 9))
                .unwrap();
            let socket = std::net::UdpSocket::bind("[::]:0").unwrap();
            socket
                .send_to(&vec![7u8; sent], (DsrTopology::VIP_V6, 9))
                .unwrap();
        })
        .unwrap();
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let now = topo.lb().link_stats("router").unwrap();
        if now.rx_bytes - before.rx_bytes >= 2 * sent as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the VIP datagrams did not reach the balancer: {before:?} -> {now:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn link_operations() {
    let ns = Netns::create("xlbnt-l").unwrap();
    let peer = Netns::create("xlbnt-p").unwrap();

    ns.add_bridge("br0").unwrap();
    ns.add_veth("v0", &ns, "v1").unwrap();
    ns.set_master("v0", "br0").unwrap();
    let br = ns.link("br0").unwrap();
    assert_eq!(ns.link("v0").unwrap().master, Some(br.ifindex));
    assert_eq!(ns.link("v1").unwrap().master, None);

    ns.set_mtu("v1", 3000).unwrap();
    assert_eq!(ns.link("v1").unwrap().mtu, Some(3000));

    assert!(!ns.gro("v1").unwrap());
    ns.set_gro("v1", true).unwrap();
    assert!(ns.gro("v1").unwrap());
    ns.set_gro("v1", false).unwrap();
    assert!(!ns.gro("v1").unwrap());

    ns.set_link_up("v1").unwrap();
    ns.add_address("v1", net("10.98.0.1/24")).unwrap();
    ns.add_address("v1", net("fd00:98::1/64")).unwrap();
    let mac = [0x02, 0, 0, 0, 0, 0x42];
    ns.add_neighbour("v1", "10.98.0.9".parse().unwrap(), mac)
        .unwrap();
    ns.add_neighbour("v1", "fd00:98::9".parse().unwrap(), mac)
        .unwrap();
    let arp = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/arp"))
        .unwrap()
        .unwrap();
    assert!(
        arp.lines()
            .any(|l| l.starts_with("10.98.0.9 ") && l.contains("02:00:00:00:00:42")),
        "{arp}"
    );

    ns.add_route(net("10.97.0.0/16"), "10.98.0.9".parse().unwrap())
        .unwrap();
    ns.add_route(net("fd00:97::/48"), "fd00:98::9".parse().unwrap())
        .unwrap();
    ns.add_default_route("10.98.0.9".parse().unwrap()).unwrap();
    ns.add_default_route("fd00:98::9".parse().unwrap()).unwrap();
    assert!(
        ns.add_route(net("10.96.0.0/16"), "fd00:98::9".parse().unwrap())
            .is_err()
    );
    let routes = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/ipv6_route"))
        .unwrap()
        .unwrap();
    assert!(
        routes.contains("fd000097000000000000000000000000 30"),
        "{routes}"
    );

    assert!(matches!(
        ns.ifindex("nope"),
        Err(xlb_netns::Error::LinkNotFound { .. })
    ));

    // A link moved nowhere is invisible to the other namespace.
    assert!(peer.ifindex("v0").is_err());

    ns.set_link_down("v1").unwrap();
    ns.delete_link("v1").unwrap();
    assert!(
        ns.ifindex("v0").is_err(),
        "deleting one end removes the pair"
    );

    ns.sysctl("net.ipv4.conf.all.rp_filter", "2").unwrap();
    assert_eq!(ns.read_sysctl("net/ipv4/conf/all/rp_filter").unwrap(), "2");
    assert_eq!(
        ns.read_sysctl("net.ipv6.conf.default.accept_dad").unwrap(),
        "0"
    );
}

#[test]
fn command_and_spawn_enter_the_namespace() {
    let ns = Netns::create("xlbnt-c").unwrap();
    let other = Netns::create("xlbnt-o").unwrap();
    ns.add_veth("cmdveth", &other, "peer").unwrap();

    let out = ns
        .command("cat")
        .arg("/proc/self/net/dev")
        .output()
        .unwrap();
    assert!(out.status.success());
    let dev = String::from_utf8(out.stdout).unwrap();
    assert!(dev.contains("cmdveth:"), "{dev}");
    assert!(!dev.contains("peer:"), "{dev}");

    let seen = ns
        .spawn(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap())
        .unwrap()
        .join()
        .unwrap();
    assert!(seen.contains("cmdveth:"));

    // A Command outliving its namespace fails instead of running elsewhere.
    let mut late = ns.command("true");
    drop(ns);
    assert!(late.status().is_err());
}

#[test]
fn cleanup_stale_removes_dead_pids_only() {
    let live = Netns::create("xlbnt-s").unwrap();
    // A pid that has exited: our own finished child.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = PathBuf::from(format!("/run/netns/xlbnt-s{dead}-0"));
    std::fs::write(&stale, b"").unwrap();

    let removed = cleanup_stale("xlbnt-s").unwrap();
    assert_eq!(removed, vec![format!("xlbnt-s{dead}-0")]);
    assert!(!stale.exists());
    assert!(live.path().exists());
}

#[test]
fn fresh_netns_is_private_to_its_thread_and_serves_the_netns_api() {
    let own_netns = || std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let outer = own_netns();
    let (mac_a, mac_b) = ([0x02, 0, 0, 0, 0xfa, 0x01], [0x02, 0, 0, 0, 0xfa, 0x02]);
    let (inner, path) = in_fresh_netns("xlbnt-fresh", Duration::from_secs(30), move |ns| {
        let inner = own_netns();
        // As the kernel makes it: nothing but a `lo`, down.
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        assert_eq!(dev.lines().count(), 3, "{dev}");
        assert!(dev.contains("lo:"), "{dev}");

        // Every operation runs on a helper thread of its own; each must land here.
        ns.add_veth("fa", ns, "fb").unwrap();
        ns.set_mac("fa", mac_a).unwrap();
        ns.set_mac("fb", mac_b).unwrap();
        assert_eq!(
            (ns.mac("fa").unwrap(), ns.mac("fb").unwrap()),
            (mac_a, mac_b)
        );
        for ifname in ["lo", "fa", "fb"] {
            ns.set_link_up(ifname).unwrap();
        }
        ns.add_address("fa", net("10.96.0.1/24")).unwrap();
        ns.add_route_dev(net("10.95.0.0/16"), "fa").unwrap();
        ns.add_route_dev(net("fd00:95::/48"), "fa").unwrap();
        assert!(ns.add_route_dev(net("10.94.0.0/16"), "nope").is_err());
        ns.add_neighbour("fa", "10.95.0.9".parse().unwrap(), mac_b)
            .unwrap();
        let routes = std::fs::read_to_string("/proc/thread-self/net/route").unwrap();
        // 10.95.0.0/16 out of fa, no gateway (little-endian hex, as the kernel prints it).
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with("fa\t00005F0A\t00000000\t") && l.contains("\t0000FFFF\t")),
            "{routes}"
        );
        let routes6 = std::fs::read_to_string("/proc/thread-self/net/ipv6_route").unwrap();
        assert!(
            routes6
                .lines()
                .any(|l| l.starts_with("fd000095000000000000000000000000 30 ")
                    && l.contains(" 00000000000000000000000000000000 ")
                    && l.ends_with(" fa")),
            "{routes6}"
        );
        let arp = std::fs::read_to_string("/proc/thread-self/net/arp").unwrap();
        assert!(
            arp.lines()
                .any(|l| l.starts_with("10.95.0.9 ") && l.contains("02:00:00:00:fa:02")),
            "{arp}"
        );

        ns.set_forwarding(true).unwrap();
        for key in [
            "net/ipv4/conf/all/forwarding",
            "net/ipv4/conf/fa/forwarding",
            "net/ipv6/conf/all/forwarding",
        ] {
            assert_eq!(ns.read_sysctl(key).unwrap(), "1", "{key}");
        }
        ns.set_forwarding(false).unwrap();
        assert_eq!(ns.read_sysctl("net.ipv4.ip_forward").unwrap(), "0");
        assert_eq!(ns.read_sysctl("net/ipv6/conf/fb/forwarding").unwrap(), "0");

        let out = ns
            .command("cat")
            .arg("/proc/self/net/dev")
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("fa:"));
        (inner, ns.path().to_owned())
    })
    .unwrap();
    assert_ne!(inner, outer, "the thread had a namespace of its own");
    assert_eq!(
        own_netns(),
        outer,
        "the caller's thread stayed where it was"
    );
    // The thread has been joined, but the kernel may release its /proc entry (and with it
    // the last reference to the namespace) a moment after the join returns.
    let gone_by = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while path.exists() && std::time::Instant::now() < gone_by {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!path.exists(), "{} outlived its thread", path.display());
    let here = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    assert!(!here.contains("fa:") && !here.contains("fb:"), "{here}");
}

#[test]
fn fresh_netns_resumes_panics_and_bounds_its_run_time() {
    let panic = std::panic::catch_unwind(|| {
        in_fresh_netns("xlbnt-panic", Duration::from_secs(30), |_| -> () {
            panic!("raised inside")
        })
    })
    .expect_err("the panic reaches the caller");
    assert_eq!(panic.downcast_ref::<&str>(), Some(&"raised inside"));

    let started = Instant::now();
    let late = in_fresh_netns("xlbnt-slow", Duration::from_millis(200), |_| {
        thread::sleep(Duration::from_secs(3));
    });
    assert!(
        matches!(late, Err(xlb_netns::Error::TimedOut { .. })),
        "{late:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
