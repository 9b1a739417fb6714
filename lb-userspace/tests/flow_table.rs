//! The connection tables through the real program: IPv4 flows in the set-associative
//! `XLB_FLOWS4`, IPv6 flows in the LRU hash map `XLB_CONNTRACK`, both behind
//! `Datapath::{flow, set_flow, for_each_flow}`. What the agent plants the data path follows,
//! what the data path records the agent reads, an upgrade from a build without
//! `XLB_FLOWS4`, a resize and a restart with another hash seed keep every flow, and a full
//! set gives up the flow seen longest ago.
//!
//! Each test loads its own data path in a namespace of its own, with no route to the
//! backends: a translated packet is handed to the stack (`XDP_PASS`), and the output frame
//! shows the backend chosen. Pinned maps live in a bpffs directory of the test's own.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fs,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, PayloadSlice, TransportHeader};
use lb_common::{
    FlowKey, FlowState, IPPROTO_TCP, NextHop,
    addr::is_v4_mapped,
    flow_table::{FLOW_SET_WAYS, FlowKey4, FlowSet, SetMultipliers, flow_sets, flow_table_entries},
    map_names,
};
use lb_userspace::{
    balancer::{Balancer, VipSpec},
    datapath::{Datapath, DatapathConfig},
    frames::{self, TCP_ACK, TCP_SYN},
};
mod common;
use common::{require_root, unique};
use xlb_netns::Netns;

const SUITE: &str = "flowtable";
const XDP_PASS: u32 = 2;
const RING_SIZE: u32 = 251;

const VIP4: &str = "10.77.0.1:80";
const VIP6: &str = "[fd00:77::1]:80";

/// A directory on the host's bpffs for one test's pins; removed, pins and all, on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Self {
        let path = Path::new("/sys/fs/bpf").join(unique(SUITE, tag));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating the pin directory {}: {e}", path.display()));
        Self(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn config(conntrack_entries: u32) -> DatapathConfig {
    DatapathConfig {
        ring_size: RING_SIZE,
        max_vips: 4,
        conntrack_entries,
        ..DatapathConfig::default()
    }
}

/// `CLOCK_MONOTONIC_COARSE`, the clock of `FlowState::last_seen_ns`
/// (`bpf_ktime_get_coarse_ns`).
fn now_coarse_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE");
    u64::try_from(Duration::from(now).as_nanos()).expect("u64 nanoseconds")
}

fn tcp_key(client: SocketAddr, vip: SocketAddr) -> FlowKey {
    FlowKey::new(client, vip, IPPROTO_TCP)
}

fn planted(backend_id: u32, last_seen_ns: u64) -> FlowState {
    FlowState {
        backend_id,
        last_seen_ns,
        ..FlowState::default()
    }
}

fn client(vip: SocketAddr, port: u16) -> SocketAddr {
    match vip.ip() {
        IpAddr::V4(_) => SocketAddr::from(([10, 79, 0, 2], port)),
        IpAddr::V6(_) => SocketAddr::from(([0xfd00, 0x79, 0, 0, 0, 0, 0, 2], port)),
    }
}

/// A VIP (`vip`/tcp) with three backends on port 8080; returns its spec and its backends'
/// ids by address.
fn add_service(balancer: &mut Balancer, vip: &str) -> (VipSpec, BTreeMap<SocketAddr, u32>) {
    let spec: VipSpec = format!("{vip}/tcp").parse().expect("a VIP spec");
    balancer.add_vip(spec).expect("adding the VIP");
    for i in 1..=3u16 {
        let backend = match spec.addr.ip() {
            IpAddr::V4(_) => SocketAddr::from(([10, 78, 0, i as u8], 8080)),
            IpAddr::V6(_) => SocketAddr::from(([0xfd00, 0x78, 0, 0, 0, 0, 0, i], 8080)),
        };
        balancer
            .add_backend(&spec, backend, 1)
            .expect("adding a backend");
    }
    let ids = balancer
        .vip_status(&spec)
        .expect("the VIP's status")
        .backends
        .into_iter()
        .map(|b| (b.addr, b.id))
        .collect();
    (spec, ids)
}

/// A TCP segment without payload from `client` to `vip` with the SYN flag or the ACK flag.
fn tcp_frame(client: SocketAddr, vip: SocketAddr, syn: bool) -> Vec<u8> {
    match (client, vip) {
        (SocketAddr::V4(c), SocketAddr::V4(v)) => {
            frames::tcp(c, v, if syn { TCP_SYN } else { TCP_ACK })
        }
        (SocketAddr::V6(c), SocketAddr::V6(v)) => {
            let ip = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv6(
                c.ip().octets(),
                v.ip().octets(),
                64,
            );
            let tcp = ip.tcp(c.port(), v.port(), 1, 64_240);
            let tcp = if syn { tcp.syn() } else { tcp.ack(1) };
            let mut frame = Vec::new();
            tcp.write(&mut frame, &[]).expect("writing an IPv6 frame");
            frame
        }
        _ => panic!("mixed families: {client} -> {vip}"),
    }
}

/// Runs `frame` through the XDP program once; the translated frame's destination, after
/// etherparse checked every checksum in it.
fn forward(datapath: &Datapath, frame: &[u8]) -> SocketAddr {
    let mut out = vec![0u8; frame.len() + 128];
    let run = datapath
        .test_run(lb_common::program_names::XLB, frame, &mut out, 1)
        .expect("test run");
    assert_eq!(run.action, XDP_PASS, "the packet was not forwarded");
    let out = &out[..run.len];
    let headers = PacketHeaders::from_ethernet_slice(out)
        .unwrap_or_else(|e| panic!("the output frame does not parse: {e}: {out:02x?}"));
    let PayloadSlice::Tcp(payload) = headers.payload else {
        panic!("no TCP in the output frame: {out:02x?}");
    };
    match (headers.net, headers.transport) {
        (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Tcp(tcp))) => {
            assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 header");
            let want = tcp.calc_checksum_ipv4(&ip, payload).expect("a checksum");
            assert_eq!(tcp.checksum, want, "TCP checksum");
            assert!(frames::checksums_valid(out), "xlb's own check disagrees");
            let to = SocketAddrV4::new(ip.destination.into(), tcp.destination_port);
            assert_eq!(frames::destination(out), Some(to));
            to.into()
        }
        (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Tcp(tcp))) => {
            let want = tcp.calc_checksum_ipv6(&ip, payload).expect("a checksum");
            assert_eq!(tcp.checksum, want, "TCP checksum");
            SocketAddr::from((ip.destination, tcp.destination_port))
        }
        (net, transport) => panic!("not IP and TCP: {net:?} {transport:?}"),
    }
}

/// A backend of `ids` other than `not`.
fn another_backend(ids: &BTreeMap<SocketAddr, u32>, not: SocketAddr) -> SocketAddr {
    *ids.keys()
        .find(|b| **b != not)
        .expect("a VIP with more than one backend")
}

/// How many times `for_each_flow` lists each flow.
fn listed(datapath: &Datapath) -> StdHashMap<FlowKey, (usize, FlowState)> {
    let mut seen = StdHashMap::new();
    datapath
        .for_each_flow(|key, state| {
            seen.entry(key).or_insert((0, state)).0 += 1;
        })
        .expect("walking the connection tables");
    seen
}

/// Pins set aside for another layout or size (`*_RETIRED`) still in `pins`.
fn retired_pins(pins: &PinDir) -> Vec<String> {
    fs::read_dir(&pins.0)
        .expect("listing the pins")
        .map(|e| e.expect("a pin").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with("_RETIRED"))
        .collect()
}

/// The pinned `XLB_CONNTRACK` at `path`, opened as another process would.
fn pinned_conntrack(path: &Path) -> HashMap<MapData, FlowKey, FlowState> {
    let data = MapData::from_pin(path).expect("opening the pinned XLB_CONNTRACK");
    HashMap::try_from(Map::LruHashMap(data)).expect("XLB_CONNTRACK as a hash map")
}

fn in_map(map: &HashMap<MapData, FlowKey, FlowState>, key: &FlowKey) -> Option<FlowState> {
    match map.get(key, 0) {
        Ok(state) => Some(state),
        Err(MapError::KeyNotFound) => None,
        Err(e) => panic!("reading XLB_CONNTRACK: {e}"),
    }
}

/// Case 1 for one family: the flows it created, for the listing check.
fn agent_and_data_path_agree(balancer: &mut Balancer, vip: &str) -> Vec<FlowKey> {
    let (spec, ids) = add_service(balancer, vip);
    let vip = spec.addr;

    // A fresh flow's first packet after the handshake: the data path records it.
    let recorded = client(vip, 30_000);
    let recorded_key = tcp_key(recorded, vip);
    let dp = balancer.datapath();
    assert_eq!(dp.flow(&recorded_key).expect("reading"), None);
    let before = now_coarse_ns();
    let recorded_to = forward(dp, &tcp_frame(recorded, vip, false));
    let after = now_coarse_ns();
    assert!(
        ids.contains_key(&recorded_to),
        "{recorded} went to {recorded_to}"
    );
    let state = dp
        .flow(&recorded_key)
        .expect("reading")
        .unwrap_or_else(|| panic!("{recorded}: the data path recorded no entry"));
    assert_eq!(
        state.backend_id, ids[&recorded_to],
        "{recorded}: entry {state:?}"
    );
    assert!(
        (before..=after).contains(&state.last_seen_ns),
        "{recorded}: last seen {} outside {before}..={after}",
        state.last_seen_ns
    );
    assert_eq!(forward(dp, &tcp_frame(recorded, vip, false)), recorded_to);

    // A flow the data path has not seen: its SYN shows the ring's choice and leaves the
    // connection table alone; the entry planted then, naming another backend, wins over
    // both the ring and the SYN's handshake record.
    let fresh = client(vip, 30_001);
    let fresh_key = tcp_key(fresh, vip);
    let ring_choice = forward(dp, &tcp_frame(fresh, vip, true));
    assert_eq!(dp.flow(&fresh_key).expect("reading"), None, "a SYN's entry");
    let fresh_to = another_backend(&ids, ring_choice);
    balancer
        .datapath_mut()
        .set_flow(&fresh_key, &planted(ids[&fresh_to], now_coarse_ns()))
        .expect("planting a flow");
    let dp = balancer.datapath();
    for _ in 0..2 {
        assert_eq!(
            forward(dp, &tcp_frame(fresh, vip, false)),
            fresh_to,
            "{fresh}: the ring picks {ring_choice}, the planted entry {fresh_to}"
        );
    }
    assert_eq!(
        dp.flow(&fresh_key).expect("reading").map(|s| s.backend_id),
        Some(ids[&fresh_to])
    );

    // A flow the data path recorded, its entry rewritten: the new backend holds.
    let moved = client(vip, 30_002);
    let moved_key = tcp_key(moved, vip);
    let first = forward(dp, &tcp_frame(moved, vip, false));
    let moved_to = another_backend(&ids, first);
    balancer
        .datapath_mut()
        .set_flow(&moved_key, &planted(ids[&moved_to], now_coarse_ns()))
        .expect("rewriting a flow");
    let dp = balancer.datapath();
    assert_eq!(forward(dp, &tcp_frame(moved, vip, false)), moved_to);
    assert_eq!(
        dp.flow(&moved_key).expect("reading").map(|s| s.backend_id),
        Some(ids[&moved_to])
    );

    // The agent's own views read the same entries: `xlb explain` and `xlb conns`.
    let explained = balancer.explain(fresh, &spec).expect("explain");
    assert_eq!(
        explained.new_flow_backend,
        Some(ring_choice),
        "the ring, as explained"
    );
    assert_eq!(
        explained.tracked_backend,
        Some(fresh_to),
        "the planted entry, as explained"
    );
    let conns = balancer.conns(&spec, None, 10).expect("conns");
    assert_eq!(conns.total, 3, "{conns:?}");
    let tracked: BTreeMap<SocketAddr, Option<SocketAddr>> =
        conns.flows.iter().map(|f| (f.client, f.backend)).collect();
    let expected = BTreeMap::from([
        (recorded, Some(recorded_to)),
        (fresh, Some(fresh_to)),
        (moved, Some(moved_to)),
    ]);
    assert_eq!(tracked, expected, "xlb conns");
    vec![recorded_key, fresh_key, moved_key]
}

#[test]
fn agent_and_data_path_read_each_others_flows_in_both_tables() {
    require_root();
    let ns = Netns::create("xlbflowshare").expect("creating a namespace");
    ns.run(|| {
        let datapath = Datapath::load(config(4096)).expect("loading the XDP program");
        let mut balancer = Balancer::new(datapath);
        let mut flows = agent_and_data_path_agree(&mut balancer, VIP4);
        flows.extend(agent_and_data_path_agree(&mut balancer, VIP6));

        // The walk lists both families, each flow once, with the state `flow` reads.
        let dp = balancer.datapath();
        let seen = listed(dp);
        assert_eq!(seen.len(), flows.len(), "listed: {seen:?}");
        for key in &flows {
            let (times, state) = seen
                .get(key)
                .unwrap_or_else(|| panic!("{key:?} not listed"));
            assert_eq!(*times, 1, "{key:?}");
            assert_eq!(Some(*state), dp.flow(key).expect("reading"), "{key:?}");
        }
    })
    .expect("running in the namespace");
}

#[test]
fn ipv4_flows_left_in_the_hash_map_by_an_older_build_move_to_the_set_table() {
    upgrade_from_a_build_without_the_set_table("upgrade", 1024, 1024);
}

/// The upgrade and another `--conntrack-entries` at once: the old hash map is retired and
/// carried over, each flow into its family's table.
#[test]
fn an_upgrade_that_also_resizes_moves_ipv4_flows_to_the_set_table() {
    upgrade_from_a_build_without_the_set_table("upgrade-resize", 1024, 4096);
}

/// Case 2: a build without `XLB_FLOWS4` ran with `old_entries`, this one starts with
/// `new_entries` on its pins.
fn upgrade_from_a_build_without_the_set_table(tag: &str, old_entries: u32, new_entries: u32) {
    require_root();
    let pins = PinDir::new(tag);
    let ns = Netns::create("xlbflowupgrade").expect("creating a namespace");
    ns.run(|| {
        let datapath =
            Datapath::load_pinned(config(old_entries), &pins.0).expect("loading the XDP program");
        let mut balancer = Balancer::new(datapath);
        let (spec, ids) = add_service(&mut balancer, VIP4);
        let vip = spec.addr;
        let flow4 = client(vip, 31_000);
        let key4 = tcp_key(flow4, vip);
        let ring_choice = forward(balancer.datapath(), &tcp_frame(flow4, vip, true));
        let chosen = another_backend(&ids, ring_choice);
        let vip6: SocketAddr = VIP6.parse().unwrap();
        let key6 = tcp_key(client(vip6, 31_001), vip6);
        // The agent stops; the pins stay, as they do across an upgrade.
        drop(balancer);

        // What a build before `XLB_FLOWS4` leaves: no such pin, IPv4 flows in the hash map.
        fs::remove_file(pins.join(map_names::FLOWS4)).expect("removing the XLB_FLOWS4 pin");
        let state4 = planted(ids[&chosen], now_coarse_ns());
        let state6 = FlowState {
            closing: lb_common::CLOSE_FIN_FROM_CLIENT,
            ..planted(9, now_coarse_ns())
        };
        {
            let mut old = pinned_conntrack(&pins.join(map_names::CONNTRACK));
            old.insert(&key4, &state4, 0)
                .expect("writing the IPv4 flow");
            old.insert(&key6, &state6, 0)
                .expect("writing the IPv6 flow");
        }

        let datapath = Datapath::load_pinned(config(new_entries), &pins.0).expect("loading again");
        assert!(pins.join(map_names::FLOWS4).exists(), "XLB_FLOWS4 pinned");
        assert_eq!(
            retired_pins(&pins),
            Vec::<String>::new(),
            "retired pins left"
        );
        assert_eq!(
            datapath.flow(&key4).expect("reading"),
            Some(state4),
            "the IPv4 flow, moved to XLB_FLOWS4"
        );
        assert_eq!(
            datapath.flow(&key6).expect("reading"),
            Some(state6),
            "the IPv6 flow, left in XLB_CONNTRACK"
        );
        let conntrack = pinned_conntrack(&pins.join(map_names::CONNTRACK));
        assert_eq!(in_map(&conntrack, &key4), None, "the IPv4 flow left behind");
        assert_eq!(
            in_map(&conntrack, &key6),
            Some(state6),
            "the IPv6 flow moved"
        );
        let seen = listed(&datapath);
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(
            seen.get(&key4).map(|s| s.0),
            Some(1),
            "listings of the IPv4 flow"
        );
        assert_eq!(
            seen.get(&key6).map(|s| s.0),
            Some(1),
            "listings of the IPv6 flow"
        );

        // The VIP and its backends were pinned too: the moved entry steers the flow, over
        // the ring and the handshake its SYN recorded.
        assert_eq!(
            forward(&datapath, &tcp_frame(flow4, vip, false)),
            chosen,
            "the ring picks {ring_choice}"
        );
    })
    .expect("running in the namespace");
}

#[test]
fn a_resized_set_table_keeps_every_ipv4_flow() {
    require_root();
    let pins = PinDir::new("resize");
    let ns = Netns::create("xlbflowresize").expect("creating a namespace");
    // 32 sets: 20 flows overfill one with odds of about one in ten million.
    let small = 256;
    let vip: SocketAddr = VIP4.parse().unwrap();
    let vip6: SocketAddr = VIP6.parse().unwrap();
    let now = now_coarse_ns();
    let flows: Vec<(FlowKey, FlowState)> = (0..20u16)
        .map(|i| {
            let state = FlowState {
                backend_id: u32::from(i) + 1,
                closing: (i % 3) as u8,
                _pad: [0; 3],
                last_seen_ns: now - u64::from(i) * 1_000,
                reply_next_hop: NextHop {
                    ifindex: u32::from(i) + 100,
                    src_mac: [2, 0, 0, 0, 1, i as u8],
                    dst_mac: [2, 0, 0, 0, 2, i as u8],
                },
            };
            (tcp_key(client(vip, 32_000 + i), vip), state)
        })
        .chain((0..2u16).map(|i| {
            let key = tcp_key(client(vip6, 32_100 + i), vip6);
            (key, planted(u32::from(i) + 50, now))
        }))
        .collect();
    ns.run(|| {
        let mut datapath =
            Datapath::load_pinned(config(small), &pins.0).expect("loading the XDP program");
        // Each flow must fit its small table's set, or the test would check eviction
        // instead: the sets come from the table's own seed, recorded after its sets.
        let pinned: Array<MapData, FlowSet> = Array::try_from(Map::Array(
            MapData::from_pin(pins.join(map_names::FLOWS4)).expect("the pinned XLB_FLOWS4"),
        ))
        .expect("an array of sets");
        let seed = pinned
            .get(&flow_sets(small), 0)
            .expect("the seed record")
            .recorded_seed()
            .expect("a seed record after the sets");
        let mut per_set = BTreeMap::new();
        for (key, _) in flows.iter().filter(|(k, _)| is_v4_mapped(&k.dst)) {
            let set = FlowKey4::of(key).set_index(&SetMultipliers::of_seed(seed), flow_sets(small));
            *per_set.entry(set).or_insert(0) += 1;
        }
        assert!(per_set.values().all(|&n| n <= FLOW_SET_WAYS), "{per_set:?}");
        for (key, state) in &flows {
            datapath.set_flow(key, state).expect("planting a flow");
        }
        assert_eq!(listed(&datapath).len(), flows.len());
        drop(datapath);

        let datapath = Datapath::load_pinned(config(4096), &pins.0).expect("loading resized");
        let sets = MapData::from_pin(pins.join(map_names::FLOWS4))
            .and_then(|m| m.info())
            .expect("the pinned XLB_FLOWS4's info")
            .max_entries();
        assert_eq!(sets, flow_table_entries(4096), "XLB_FLOWS4 resized");
        for (key, state) in &flows {
            assert_eq!(
                datapath.flow(key).expect("reading"),
                Some(*state),
                "{key:?}"
            );
        }
        let seen = listed(&datapath);
        assert_eq!(seen.len(), flows.len(), "{seen:?}");
        for (key, state) in &flows {
            assert_eq!(seen.get(key), Some(&(1, *state)), "{key:?}");
        }
    })
    .expect("running in the namespace");
    assert_eq!(
        retired_pins(&pins),
        Vec::<String>::new(),
        "retired pins left"
    );
}

/// What the previous program writes into a retired table after the new build carried it
/// over (until the agent attaches the new program) follows in a second pass; entries the new
/// tables already hold are newer and stay.
#[test]
fn entries_written_during_the_switch_follow_in_a_second_pass() {
    require_root();
    let pins = PinDir::new("switch");
    let ns = Netns::create("xlbflowswitch").expect("creating a namespace");
    let vip: SocketAddr = VIP4.parse().unwrap();
    let vip6: SocketAddr = VIP6.parse().unwrap();
    let now = now_coarse_ns();
    let early = tcp_key(client(vip, 33_000), vip);
    let during = [
        tcp_key(client(vip, 33_001), vip),
        tcp_key(client(vip6, 33_002), vip6),
    ];
    ns.run(|| {
        let mut old = Datapath::load_pinned(config(256), &pins.0).expect("loading the XDP program");
        old.set_flow(&early, &planted(1, now))
            .expect("planting a flow");

        // A resize retires the old tables: the old program (here, `old`'s maps) keeps
        // writing them until the new one is attached.
        let mut new = Datapath::load_pinned(config(4096), &pins.0).expect("loading resized");
        assert_eq!(new.flow(&early).expect("reading"), Some(planted(1, now)));
        for (i, key) in during.iter().enumerate() {
            old.set_flow(key, &planted(10 + i as u32, now))
                .expect("the old program's write");
            assert_eq!(
                new.flow(key).expect("reading"),
                None,
                "not carried over yet"
            );
        }
        // The new program updated the early flow meanwhile: its entry is the newer one.
        new.set_flow(&early, &planted(2, now + 1))
            .expect("the new program's write");
        old.set_flow(&early, &planted(3, now + 2))
            .expect("a stale write");

        assert_eq!(
            new.finish_carry_over().expect("the second pass"),
            during.len()
        );
        for (i, key) in during.iter().enumerate() {
            assert_eq!(
                new.flow(key).expect("reading"),
                Some(planted(10 + i as u32, now)),
                "{key:?}"
            );
        }
        assert_eq!(
            new.flow(&early).expect("reading"),
            Some(planted(2, now + 1)),
            "an entry the new tables hold is kept"
        );
        assert_eq!(new.finish_carry_over().expect("nothing left"), 0);
    })
    .expect("running in the namespace");
}

#[test]
fn a_full_set_gives_up_the_flow_seen_longest_ago() {
    require_root();
    let ns = Netns::create("xlbflowevict").expect("creating a namespace");
    ns.run(|| {
        // Eight ways: one set, which every IPv4 flow shares.
        let datapath = Datapath::load(config(8)).expect("loading the XDP program");
        assert_eq!(flow_sets(8), 1);
        let mut balancer = Balancer::new(datapath);
        let (spec, ids) = add_service(&mut balancer, VIP4);
        let vip = spec.addr;
        let backend_ids: Vec<u32> = ids.values().copied().collect();

        // Seen 1 to 8 ms ago, in no particular order: the fourth is the oldest.
        let ages_ms = [3u64, 7, 1, 8, 2, 6, 4, 5];
        let oldest = 3;
        let now = now_coarse_ns();
        let held: Vec<(FlowKey, FlowState)> = (0..8u16)
            .map(|i| {
                let state = planted(
                    backend_ids[usize::from(i) % backend_ids.len()],
                    now - ages_ms[usize::from(i)] * 1_000_000,
                );
                (tcp_key(client(vip, 33_000 + i), vip), state)
            })
            .collect();
        let vip6: SocketAddr = VIP6.parse().unwrap();
        let key6 = tcp_key(client(vip6, 33_100), vip6);
        let state6 = planted(77, now.saturating_sub(60_000_000_000));
        let dp = balancer.datapath_mut();
        for (key, state) in &held {
            dp.set_flow(key, state).expect("planting a flow");
        }
        dp.set_flow(&key6, &state6).expect("planting an IPv6 flow");
        for (key, state) in &held {
            assert_eq!(dp.flow(key).expect("reading"), Some(*state), "{key:?}");
        }

        let ninth = client(vip, 33_008);
        let ninth_key = tcp_key(ninth, vip);
        let went_to = forward(balancer.datapath(), &tcp_frame(ninth, vip, false));
        let dp = balancer.datapath();
        assert_eq!(
            dp.flow(&ninth_key).expect("reading").map(|s| s.backend_id),
            Some(ids[&went_to]),
            "the new flow recorded"
        );
        for (i, (key, state)) in held.iter().enumerate() {
            let found = dp.flow(key).expect("reading");
            if i == oldest {
                assert_eq!(found, None, "the oldest flow, seen {} ms ago", ages_ms[i]);
            } else {
                assert_eq!(found, Some(*state), "flow {i}, seen {} ms ago", ages_ms[i]);
            }
        }
        // Older than any IPv4 flow, but in the other table: untouched.
        assert_eq!(
            dp.flow(&key6).expect("reading"),
            Some(state6),
            "the IPv6 flow"
        );
        assert_eq!(
            listed(dp).len(),
            9,
            "7 IPv4 flows planted, the new one, the IPv6 one"
        );
    })
    .expect("running in the namespace");
}

/// `--hash-seed` takes effect on restart, and a restart keeps established connections on
/// their backends (README): the connection tables are pinned. `XLB_FLOWS4`'s set index is
/// seeded, so a table kept as it is under another seed must still find its flows.
#[test]
fn a_restart_with_another_hash_seed_keeps_every_flow() {
    require_root();
    let pins = PinDir::new("reseed");
    let ns = Netns::create("xlbflowreseed").expect("creating a namespace");
    let before = config(1024);
    let after = DatapathConfig {
        hash_seed: before.hash_seed ^ 0x5eed_5eed,
        ..before
    };
    ns.run(|| {
        // Where the restarted data path's ring sends the flow, found on a throwaway one.
        let probe = Datapath::load(after).expect("loading the XDP program");
        let mut balancer = Balancer::new(probe);
        let (spec, probe_ids) = add_service(&mut balancer, VIP4);
        let vip = spec.addr;
        let flow4 = client(vip, 34_000);
        let ring_choice = forward(balancer.datapath(), &tcp_frame(flow4, vip, true));
        drop(balancer);

        let datapath = Datapath::load_pinned(before, &pins.0).expect("loading the XDP program");
        let mut balancer = Balancer::new(datapath);
        let (_, ids) = add_service(&mut balancer, VIP4);
        assert_eq!(ids, probe_ids, "the same backends get the same ids");
        let chosen = another_backend(&ids, ring_choice);
        let key4 = tcp_key(flow4, vip);
        let state4 = planted(ids[&chosen], now_coarse_ns());
        let vip6: SocketAddr = VIP6.parse().unwrap();
        let key6 = tcp_key(client(vip6, 34_001), vip6);
        let state6 = planted(9, now_coarse_ns());
        let dp = balancer.datapath_mut();
        dp.set_flow(&key4, &state4).expect("planting the IPv4 flow");
        dp.set_flow(&key6, &state6).expect("planting the IPv6 flow");
        // The agent stops; the pins stay. The operator changes `--hash-seed` and restarts.
        drop(balancer);

        let datapath = Datapath::load_pinned(after, &pins.0).expect("loading again");
        assert_eq!(
            datapath.flow(&key6).expect("reading"),
            Some(state6),
            "the IPv6 flow"
        );
        assert_eq!(
            forward(&datapath, &tcp_frame(flow4, vip, false)),
            chosen,
            "the established flow keeps its backend; the new seed's ring picks {ring_choice}"
        );
        assert_eq!(
            datapath.flow(&key4).expect("reading").map(|s| s.backend_id),
            Some(state4.backend_id),
            "the IPv4 flow, planted in the set of the old seed"
        );
    })
    .expect("running in the namespace");
}
