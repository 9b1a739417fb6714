//! xlb's backend-side program: takes the tunnel off packets an xlb balancer sent to this
//! host by direct server return, so the service sees the client's own packet to the VIP
//! (which sits on the host's loopback) and answers it straight to the client.
//!
//! Kernels with `ipip`, `ip6_tunnel` and `fou` can do this with tunnel devices; many
//! container hosts and minimal kernels have none of them. A TC ingress program needs
//! nothing but BPF, handles GSO buffers (`bpf_skb_adjust_room` fixes their segment size
//! and checksum state), and costs one header read for packets that are not tunnelled.
//!
//! Accepted: IPv4 in IPv4 (protocol 4), IPv6 in IPv6 (next header 41), and GUE variant 1
//! (UDP to the configured port, the inner IP header right after the UDP header) carrying the
//! outer header's family. Anything else is passed untouched: outer IPv4 with options or
//! fragmented, inner family different from the outer.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{__sk_buff, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::generated::{bpf_skb_adjust_room, bpf_skb_pull_data},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use lb_common::{
    DEFAULT_GUE_PORT, GUE_V4_OVERHEAD, GUE_V6_OVERHEAD, IPIP_V4_OVERHEAD, IPIP_V6_OVERHEAD,
    IPPROTO_UDP, decap,
};

/// The GUE port accepted, in network order; the loader sets it
/// (`lb_common::decap::GUE_PORT_SYMBOL`).
#[unsafe(no_mangle)]
static XLB_DECAP_GUE_PORT: Global<u16> = Global::new(DEFAULT_GUE_PORT.to_be());

#[map(name = "XLB_DECAP_CNT")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(decap::COUNTERS.len() as u32, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
/// Ethernet, the largest outer header (IPv6 + UDP) and the inner header's first byte.
const HEADERS_MAX: usize = ETH_HLEN + GUE_V6_OVERHEAD as usize + 1;

/// The program: every packet leaves with `TC_ACT_OK`, tunnelled ones without their outer
/// headers.
mod entry {
    // The macro's outer entry point takes the kernel's raw `__sk_buff` pointer, as every TC
    // program does, and the lint cannot see that the kernel vouches for it.
    #![allow(clippy::not_unsafe_ptr_arg_deref)]

    use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

    #[classifier]
    pub fn xlb_decap(ctx: TcContext) -> i32 {
        crate::decapsulate(&ctx);
        TC_ACT_OK
    }
}

#[inline(always)]
fn decapsulate(ctx: &TcContext) {
    let Some(overhead) = tunnel_overhead(ctx) else {
        return;
    };
    // SAFETY: the context is this run's socket buffer; the helper checks the length.
    let rc = unsafe {
        bpf_skb_adjust_room(
            ctx.as_ptr().cast::<__sk_buff>(),
            -i32::from(overhead),
            BPF_ADJ_ROOM_MAC,
            0,
        )
    };
    count(if rc == 0 {
        decap::DECAPSULATED
    } else {
        decap::FAILED
    });
}

/// The outer headers' length if the packet is a tunnel xlb sends.
#[inline(always)]
fn tunnel_overhead(ctx: &TcContext) -> Option<u16> {
    let ethertype = u16::from_be_bytes(read::<2>(ctx, 12)?);
    let (inner_version, overhead) = match ethertype {
        ETH_P_IP => {
            let ip = read::<20>(ctx, ETH_HLEN)?;
            // No options (xlb sends none), not a fragment (more-fragments bit or offset).
            if ip[0] != 0x45 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return None;
            }
            match ip[9] {
                IPPROTO_IPIP => (4, IPIP_V4_OVERHEAD),
                IPPROTO_UDP if is_gue(ctx, ETH_HLEN + 20)? => (4, GUE_V4_OVERHEAD),
                _ => return None,
            }
        }
        ETH_P_IPV6 => match read::<1>(ctx, ETH_HLEN + 6)?[0] {
            IPPROTO_IPV6 => (6, IPIP_V6_OVERHEAD),
            IPPROTO_UDP if is_gue(ctx, ETH_HLEN + 40)? => (6, GUE_V6_OVERHEAD),
            _ => return None,
        },
        _ => return None,
    };
    let inner = read::<1>(ctx, ETH_HLEN + usize::from(overhead))?[0];
    (inner >> 4 == inner_version).then_some(overhead)
}

/// Whether the UDP header at `offset` goes to the GUE port.
#[inline(always)]
fn is_gue(ctx: &TcContext, offset: usize) -> Option<bool> {
    let udp = read::<4>(ctx, offset)?;
    Some(u16::from_ne_bytes([udp[2], udp[3]]) == XLB_DECAP_GUE_PORT.load())
}

/// `N` bytes at `offset` of the linear head, pulling the headers into it first if a
/// sender left them outside.
#[inline(always)]
fn read<const N: usize>(ctx: &TcContext, offset: usize) -> Option<[u8; N]> {
    if ctx.data() + offset + N > ctx.data_end() {
        let want = (ctx.len() as usize).min(HEADERS_MAX) as u32;
        // SAFETY: the context is this run's socket buffer. A failure leaves the head as
        // it was, and the bounds check below then refuses the read.
        unsafe { bpf_skb_pull_data(ctx.as_ptr().cast::<__sk_buff>(), want) };
    }
    let start = ctx.data() + offset;
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: [start, start + N) lies inside the packet's linear head, checked just above
    // against data_end, which is what the verifier checks too.
    Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) })
}

#[inline(always)]
fn count(counter: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: a per-CPU slot, written only by this CPU with preemption disabled.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
