//! Replies are translated back to the right VIP when one backend endpoint serves several
//! VIPs, including flows that began while it served only one (they have no reverse entry
//! of their own: see `lb_common::EndpointVip`). Through the real program with test runs.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::program_names;
use lb_userspace::{
    balancer::{Balancer, VipSpec},
    datapath::{Datapath, DatapathConfig},
    frames::{self, TCP_ACK, TCP_SYN},
};
mod common;
use common::require_root;
use xlb_netns::Netns;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn run(balancer: &Balancer, frame: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; frame.len() + 64];
    let r = balancer
        .datapath()
        .test_run(program_names::XLB, frame, &mut out, 1)
        .expect("test run");
    // No route in this namespace: requests are translated and passed to the stack; replies
    // go back the way their client's packet came (here: the test-run device), by XDP_TX.
    assert!(
        r.action == XDP_PASS || r.action == XDP_TX,
        "action {}",
        r.action
    );
    out.truncate(r.len);
    out
}

fn source(frame: &[u8]) -> SocketAddrV4 {
    let ip: [u8; 4] = frame[26..30].try_into().unwrap();
    SocketAddrV4::new(ip.into(), u16::from_be_bytes([frame[34], frame[35]]))
}

fn spec(addr: SocketAddrV4) -> VipSpec {
    format!("{addr}/tcp").parse().unwrap()
}

#[test]
fn replies_return_from_the_vip_the_flow_went_to() {
    require_root();
    let ns = Netns::create("xlbshared").expect("creating a namespace");
    ns.run(|| {
        let mut balancer = Balancer::new(
            Datapath::load(DatapathConfig {
                ring_size: 251,
                max_vips: 4,
                ..DatapathConfig::default()
            })
            .expect("loading the XDP program"),
        );
        let vip1 = SocketAddrV4::new(Ipv4Addr::new(10, 80, 0, 1), 80);
        let vip2 = SocketAddrV4::new(Ipv4Addr::new(10, 80, 0, 2), 443);
        let backend = SocketAddrV4::new(Ipv4Addr::new(10, 81, 0, 1), 8080);
        let client = |port| SocketAddrV4::new(Ipv4Addr::new(10, 82, 0, 7), port);

        // VIP 1 alone: its flows rely on the endpoint table, not on reverse entries.
        balancer.add_vip(spec(vip1)).unwrap();
        balancer
            .add_backend(&spec(vip1), backend.into(), 1)
            .unwrap();
        let early = client(40_001);
        let fwd = run(&balancer, &frames::tcp(early, vip1, TCP_SYN));
        assert_eq!(frames::destination(&fwd), Some(backend));
        let reply = run(&balancer, &frames::tcp(backend, early, TCP_ACK));
        assert_eq!(source(&reply), vip1);
        assert!(frames::checksums_valid(&reply));

        // Now the endpoint also serves VIP 2.
        balancer.add_vip(spec(vip2)).unwrap();
        balancer
            .add_backend(&spec(vip2), backend.into(), 1)
            .unwrap();
        let to1 = client(40_002);
        let to2 = client(40_003);
        run(&balancer, &frames::tcp(to1, vip1, TCP_SYN));
        run(&balancer, &frames::tcp(to2, vip2, TCP_SYN));
        for (c, vip) in [(early, vip1), (to1, vip1), (to2, vip2)] {
            let reply = run(&balancer, &frames::tcp(backend, c, TCP_ACK));
            assert_eq!(source(&reply), vip, "reply to {c}");
            assert!(frames::checksums_valid(&reply));
        }

        // VIP 1 goes: VIP 2's flows (created while shared) still get their VIP back.
        balancer.remove_vip(&spec(vip1)).unwrap();
        let reply = run(&balancer, &frames::tcp(backend, to2, TCP_ACK));
        assert_eq!(source(&reply), vip2);

        // A packet from the backend that belongs to no flow is left alone.
        let stray = frames::tcp(backend, client(40_009), TCP_ACK);
        assert_eq!(run(&balancer, &stray), stray);
    })
    .expect("running in the namespace");
}
