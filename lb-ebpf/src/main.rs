//! xlb's XDP data plane: VIP lookup, Maglev backend choice, connection tracking, NAT both ways,
//! forwarding with `XDP_TX`/`XDP_REDIRECT`. Layouts and pure logic come from `lb-common`.
#![no_std]
#![no_main]

mod bench;
mod floors;
mod forward;
mod maps;
mod nat;
mod packet;
mod stats;

use aya_ebpf::{macros::xdp, programs::XdpContext};

/// The load balancer. Every packet is counted under exactly one XDP action.
#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let action = forward::process(&ctx);
    stats::count_action(action);
    action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// `bpf_fib_lookup` is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
