//! Programs for `xlb bench forward`: a traffic generator for live-frame test runs, the
//! plain-redirect ceiling, and a sink that counts and drops.

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMapHash, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    BENCH_FRAME_LEN, BENCH_SPORT_OFFSET, BENCH_SPREAD_SLOTS, BenchFrame, NextHop,
    parse::PacketBytes as _,
};

use crate::packet::Packet;

#[map(name = "XLB_BENCH_FRAME")]
static FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);

#[map(name = "XLB_BENCH_NH")]
static REDIRECT_TO: Array<NextHop> = Array::with_max_entries(BENCH_SPREAD_SLOTS, 0);

#[map(name = "XLB_BENCH_PORTS")]
static PORTS: DevMapHash = DevMapHash::with_max_entries(8, 0);

#[map(name = "XLB_BENCH_CNT")]
static COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn bump() -> u64 {
    match COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        Some(c) => unsafe {
            *c += 1;
            *c
        },
        None => 0,
    }
}

/// Live-frame pages are recycled with whatever the path wrote into them (a load balancer
/// rewrites addresses and MACs), so every run writes the whole template again, then varies
/// the source port to make `flows` distinct flows.
#[xdp]
pub fn xlb_bench_gen(ctx: XdpContext) -> u32 {
    let Some(frame) = FRAME.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let pkt = Packet::of_xdp(&ctx);
    if pkt.write::<BENCH_FRAME_LEN>(0, frame.bytes).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    let n = bump();
    let flows = u64::from(frame.flows.max(1));
    let sport = (u64::from(frame.sport_base) + n % flows) as u16;
    if pkt
        .write_u16(frame.sport_offset as usize & 0x3f, sport)
        .is_none()
    {
        return xdp_action::XDP_ABORTED;
    }
    xdp_action::XDP_TX
}

/// The ceiling: what forwarding costs with no balancing work at all. The next hop is picked
/// by one byte of the frame (see `BENCH_SPREAD_SLOTS`), so the ceiling can spread the flows
/// over the backends a balancer would.
#[xdp]
pub fn xlb_bench_redirect(ctx: XdpContext) -> u32 {
    let pkt = Packet::of_xdp(&ctx);
    let Some([_, sport_low]) = pkt.read::<2>(BENCH_SPORT_OFFSET) else {
        return xdp_action::XDP_PASS;
    };
    let Some(nh) = REDIRECT_TO.get(u32::from(sport_low) % BENCH_SPREAD_SLOTS) else {
        return xdp_action::XDP_ABORTED;
    };
    if pkt.write_macs(nh).is_none() {
        return xdp_action::XDP_PASS;
    }
    PORTS
        .redirect(nh.ifindex, 0)
        .unwrap_or(xdp_action::XDP_ABORTED)
}

#[xdp]
pub fn xlb_bench_sink(_ctx: XdpContext) -> u32 {
    bump();
    xdp_action::XDP_DROP
}
