//! Reference programs for `xlb bench`: the cheapest possible XDP program, and one that parses
//! exactly as xlb does and then passes. xlb's cost is reported as a ratio to both.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::parse::Parsed;

use crate::hook::Hook as _;

#[xdp]
pub fn xlb_floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn xlb_floor_parse(ctx: XdpContext) -> u32 {
    // The same parser as xlb's XDP entry point, so the floor differs only by the rest.
    let mut p = Parsed::EMPTY;
    match ctx.parse(&mut p) {
        // Use the result, so the parse cannot be optimised away.
        Ok(()) if p.dport_be == 0 => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}
