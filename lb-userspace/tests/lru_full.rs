//! A full connection table never stops new flows: the LRU evicts the least recently used
//! entries instead of refusing inserts. Run through the real program with a tiny table.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{Counter, program_names};
use lb_userspace::{
    balancer::Balancer,
    datapath::{Datapath, DatapathConfig},
    frames::{self, TCP_SYN},
};
mod common;
use common::require_root;
use xlb_netns::Netns;

const XDP_PASS: u32 = 2;

fn counter(balancer: &Balancer, which: Counter) -> u64 {
    balancer
        .datapath()
        .global_counters()
        .expect("reading counters")
        .into_iter()
        .find(|(c, _)| *c == which)
        .map_or(0, |(_, v)| v)
}

#[test]
fn new_flows_keep_coming_in_when_the_table_is_full() {
    require_root();
    // A namespace of its own: no route to the backends, so translated packets are handed to
    // the stack (XDP_PASS) and the output shows the backend chosen.
    let ns = Netns::create("xlblru").expect("creating a namespace");
    ns.run(|| {
        let datapath = Datapath::load(DatapathConfig {
            ring_size: 251,
            max_vips: 2,
            conntrack_entries: 64,
            ..DatapathConfig::default()
        })
        .expect("loading the XDP program");
        let mut balancer = Balancer::new(datapath);
        let vip = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 80);
        let spec = format!("{vip}/tcp").parse().unwrap();
        balancer.add_vip(spec).unwrap();
        let backends: Vec<SocketAddrV4> = (1..=3)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 78, 0, i), 8080))
            .collect();
        for b in &backends {
            balancer.add_backend(&spec, (*b).into(), 1).unwrap();
        }
        let flows = 2_000u16;
        let mut first_choice = Vec::new();
        for round in 0..2 {
            for n in 0..flows {
                let client = SocketAddrV4::new(Ipv4Addr::new(10, 79, 0, 2), 10_000 + n);
                let frame = frames::tcp(client, vip, TCP_SYN);
                let mut out = vec![0u8; frame.len() + 64];
                let run = balancer
                    .datapath()
                    .test_run(program_names::XLB, &frame, &mut out, 1)
                    .expect("test run");
                assert_eq!(run.action, XDP_PASS, "flow {n}, round {round}: dropped");
                let dst = frames::destination(&out[..run.len]).expect("output frame");
                assert!(backends.contains(&dst), "flow {n} went to {dst}");
                assert!(
                    frames::checksums_valid(&out[..run.len]),
                    "flow {n}: bad checksums"
                );
                if round == 0 {
                    first_choice.push(dst);
                } else {
                    // Evicted long ago, re-hashed: the same ring gives the same backend.
                    assert_eq!(dst, first_choice[usize::from(n)], "flow {n} moved");
                }
            }
        }
        assert_eq!(counter(&balancer, Counter::ConntrackInsertFailed), 0);
        assert_eq!(counter(&balancer, Counter::NoBackend), 0);
        // The table is far smaller than the flows: most second-round packets were misses.
        assert!(counter(&balancer, Counter::ConntrackMiss) > u64::from(flows));
    })
    .expect("running in the namespace");
}
