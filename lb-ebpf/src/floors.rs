//! Reference programs for `xlb bench`: the cheapest possible XDP program, and one that parses
//! exactly as xlb does and then passes. xlb's cost is reported as a ratio to both.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::parse::parse;

use crate::packet::XdpPacket;

#[xdp]
pub fn xlb_floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn xlb_floor_parse(ctx: XdpContext) -> u32 {
    match parse(&XdpPacket::new(&ctx)) {
        // Keep the parsed ports alive so the parse is not optimised away.
        Ok(p) if p.sport_be == 0 && p.dport_be == 0 => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}
