//! xlb's data plane: VIP lookup, Maglev backend choice, connection tracking, NAT both ways.
//! One path, two hooks: XDP (forwarding with `XDP_TX`/`XDP_REDIRECT`) for interfaces that
//! take native XDP, TC (`bpf_redirect`) for veths and bridges, where socket buffers carry
//! GSO segments and unfinished checksums. Layouts and pure logic come from `lb-common`.
#![no_std]
#![no_main]
// One hand-written context load (packet::Packet::of_skb) that the verifier can accept.
#![feature(asm_experimental_arch)]

mod bench;
mod floors;
mod forward;
mod hook;
mod icmp;
mod maps;
mod nat;
mod packet;
mod stats;
mod tc;
mod tunnel;
mod xdp;

use aya_ebpf::{macros::xdp, programs::XdpContext};

/// The load balancer at XDP. Every packet is counted under exactly one action.
#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let action = forward::process(&ctx);
    stats::count_xdp_action(action);
    action
}

/// The load balancer at TC ingress (tcx).
mod tc_entry {
    // The macro's outer entry point takes the kernel's raw `__sk_buff` pointer, as every TC
    // program does, and the lint cannot see that the kernel vouches for it.
    #![allow(clippy::not_unsafe_ptr_arg_deref)]

    use aya_ebpf::{macros::classifier, programs::TcContext};

    use crate::{forward, stats, tc};

    /// Every packet is counted under exactly one action.
    #[classifier]
    pub fn xlb_tc(ctx: TcContext) -> i32 {
        tc::pull_headers(&ctx);
        let verdict = forward::process(&ctx);
        stats::count_tc_verdict(verdict);
        verdict as i32
    }
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
