//! Tunnelled backends' next hops are kept resolved by the kernel: after
//! `neighbours::keep_resolved`, a backend on the balancer's own link that never sent the
//! balancer a packet has a neighbour entry with its MAC (what `bpf_fib_lookup` needs), and a
//! backend behind a gateway makes the gateway's entry. An entry the operator set stays.
//!
//! Needs root. Namespaces are unique to the test and deleted by their guards.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use lb_userspace::neighbours::{NextHop, keep_resolved};
mod common;
use common::require_root;
use xlb_netns::{Netns, ipnet::Ipv4Net};

const NS_PREFIX: &str = "xneigh-";

/// `ip neigh show ADDR` in `ns`, e.g. "10.77.0.2 dev a lladdr 02:.. managed REACHABLE".
fn neighbour(ns: &Netns, addr: IpAddr) -> String {
    let out = ns
        .command("ip")
        .args(["neigh", "show", &addr.to_string()])
        .output()
        .expect("running ip neigh");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn next_hops_of_tunnelled_backends_are_resolved_without_traffic() {
    require_root();
    let lb = Netns::create(NS_PREFIX).expect("balancer namespace");
    let peer = Netns::create(NS_PREFIX).expect("backend namespace");
    lb.add_veth("a", &peer, "b").expect("veth");
    let (lb_addr, backend, remote, operator_set) = (
        Ipv4Addr::new(10, 77, 0, 1),
        Ipv4Addr::new(10, 77, 0, 2),
        Ipv4Addr::new(10, 88, 0, 5),
        Ipv4Addr::new(10, 77, 0, 9),
    );
    lb.add_address("a", Ipv4Net::new(lb_addr, 24).expect("net"))
        .expect("address");
    peer.add_address("b", Ipv4Net::new(backend, 24).expect("net"))
        .expect("address");
    for (ns, ifname) in [(&lb, "a"), (&peer, "b")] {
        ns.set_link_up(ifname).expect("link up");
        ns.set_link_up("lo").expect("lo up");
    }
    // The backend's namespace also answers for the gateway address towards 10.88/16.
    peer.add_address(
        "b",
        Ipv4Net::new(Ipv4Addr::new(10, 77, 0, 254), 24).expect("net"),
    )
    .expect("gateway address");
    lb.add_route(
        Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 16).expect("net"),
        IpAddr::V4(Ipv4Addr::new(10, 77, 0, 254)),
    )
    .expect("route via the gateway");
    let fixed_mac = [0x02, 0, 0, 0, 0x77, 0x09];
    lb.add_neighbour("a", IpAddr::V4(operator_set), fixed_mac)
        .expect("operator's permanent entry");
    let peer_mac = peer.mac("b").expect("backend's MAC");
    let ifindex = lb.ifindex("a").expect("ifindex");

    assert_eq!(
        neighbour(&lb, IpAddr::V4(backend)),
        "",
        "nothing learned before"
    );
    let managed = lb
        .run(move || {
            keep_resolved(&[
                IpAddr::V4(backend),
                IpAddr::V4(remote),
                IpAddr::V4(operator_set),
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            ])
        })
        .expect("entering the namespace")
        .expect("netlink");
    assert_eq!(
        managed,
        vec![
            NextHop {
                ifindex,
                neighbour: IpAddr::V4(backend)
            },
            NextHop {
                ifindex,
                neighbour: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 254))
            },
        ],
        "the backend on the link and the gateway of the remote one; the operator's entry and \
         the unroutable address are left alone"
    );
    let mac = peer_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let entry = neighbour(&lb, IpAddr::V4(backend));
        let gateway = neighbour(&lb, IpAddr::V4(Ipv4Addr::new(10, 77, 0, 254)));
        if entry.contains(&mac) && gateway.contains(&mac) {
            assert!(entry.contains("managed"), "{entry}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not resolved within 5 s: backend '{entry}', gateway '{gateway}'"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let fixed = neighbour(&lb, IpAddr::V4(operator_set));
    assert!(
        fixed.contains("PERMANENT") && fixed.contains("02:00:00:00:77:09"),
        "{fixed}"
    );
}
