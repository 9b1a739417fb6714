//! Address and port translation with incremental checksum updates (RFC 1624): the data plane
//! never sums a whole packet.
//!
//! One plan, two ways to apply it. An XDP frame carries complete checksums, so the program
//! updates them itself. A socket buffer at the TC hook may carry a checksum the stack has
//! only begun (`CHECKSUM_PARTIAL`: local senders, GSO) or a receive checksum over the whole
//! packet (`CHECKSUM_COMPLETE`); only the kernel's checksum helpers know which, so the TC
//! path hands them the same deltas.

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::generated::{bpf_csum_update, bpf_l3_csum_replace, bpf_l4_csum_replace},
    programs::TcContext,
};
use lb_common::{
    IPPROTO_UDP,
    csum::CsumDelta,
    parse::{
        IPV4_CHECK_OFFSET, IPV4_DST_OFFSET, IPV4_SRC_OFFSET, IPV4_TTL_OFFSET, IPV6_DST_OFFSET,
        IPV6_HOP_LIMIT_OFFSET, IPV6_SRC_OFFSET, Parsed,
    },
};

use crate::packet::Packet;

/// `BPF_F_IPV6` (kernel 6.16+): the pseudo-header change is IPv6's, whose addresses no
/// header checksum covers, so a `CHECKSUM_COMPLETE` sum needs no correction for it.
const BPF_F_IPV6: u64 = 1 << 7;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Client → VIP becomes client → backend.
    Destination,
    /// Backend → client becomes VIP → client.
    Source,
}

/// The change of lowering the TTL (IPv4: the first byte of the word it shares with the
/// protocol) or the hop limit (IPv6: the second byte of the word it shares with the next
/// header) by one, in native word order; the caller checked it is above 1.
#[inline(always)]
fn ttl_decrement(p: &Parsed) -> CsumDelta {
    CsumDelta::new().byte_decrement(if p.ipv6 { 1 } else { 0 })
}

/// The translation of one endpoint, and what it does to each checksum. Every delta is in
/// native word order (`lb_common::csum`): addresses, ports and checksums are loaded and
/// stored as they are, with no byte swap, and the kernel's checksum helpers take native
/// sums (`__wsum`) too.
struct Plan {
    addr_offset: usize,
    port_offset: usize,
    /// The change to the pseudo-header (addresses): the L4 checksum's share that the stack
    /// has already folded in when the checksum is only begun.
    pseudo: CsumDelta,
    /// The change inside the L4 header (the port).
    port: CsumDelta,
    /// The change to the IPv4 header (address, TTL); IPv6 has no header checksum.
    ip: CsumDelta,
    /// The change to the word holding the IPv6 hop limit, which only a receive checksum over
    /// the whole packet covers.
    hop_word: CsumDelta,
}

/// `addr` is the new address as native words (`Translation::addr_words`).
#[inline(always)]
fn plan(p: &Parsed, endpoint: Endpoint, addr: [u32; 4], port_be: u16, decrement_ttl: bool) -> Plan {
    let (old_addr, old_port_be, port_offset) = match endpoint {
        Endpoint::Destination => (p.dst_words(), p.dport_be, p.l4_offset + 2),
        Endpoint::Source => (p.src_words(), p.sport_be, p.l4_offset),
    };
    let port = CsumDelta::new().replace_u16(old_port_be, port_be);
    let ttl = if decrement_ttl {
        ttl_decrement(p)
    } else {
        CsumDelta::new()
    };
    if p.ipv6 {
        Plan {
            addr_offset: p.l3_offset
                + match endpoint {
                    Endpoint::Destination => IPV6_DST_OFFSET,
                    Endpoint::Source => IPV6_SRC_OFFSET,
                },
            port_offset,
            pseudo: CsumDelta::new()
                .replace_u32(old_addr[0], addr[0])
                .replace_u32(old_addr[1], addr[1])
                .replace_u32(old_addr[2], addr[2])
                .replace_u32(old_addr[3], addr[3]),
            port,
            ip: CsumDelta::new(),
            hop_word: ttl,
        }
    } else {
        let pseudo = CsumDelta::new().replace_u32(old_addr[3], addr[3]);
        Plan {
            addr_offset: p.l3_offset
                + match endpoint {
                    Endpoint::Destination => IPV4_DST_OFFSET,
                    Endpoint::Source => IPV4_SRC_OFFSET,
                },
            port_offset,
            pseudo,
            port,
            ip: pseudo.merge(ttl),
            hop_word: CsumDelta::new(),
        }
    }
}

/// Writes the new address, port and TTL; checksums are the caller's.
#[inline(always)]
fn write_fields(
    pkt: &Packet,
    p: &Parsed,
    plan: &Plan,
    addr: [u32; 4],
    port_be: u16,
    decrement_ttl: bool,
) -> Option<()> {
    if p.ipv6 {
        pkt.write_u32_native(plan.addr_offset, addr[0])?;
        pkt.write_u32_native(plan.addr_offset + 4, addr[1])?;
        pkt.write_u32_native(plan.addr_offset + 8, addr[2])?;
        pkt.write_u32_native(plan.addr_offset + 12, addr[3])?;
        if decrement_ttl {
            pkt.write(p.l3_offset + IPV6_HOP_LIMIT_OFFSET, [p.ttl - 1])?;
        }
    } else {
        pkt.write_u32_native(plan.addr_offset, addr[3])?;
        if decrement_ttl {
            pkt.write(p.l3_offset + IPV4_TTL_OFFSET, [p.ttl - 1])?;
        }
    }
    pkt.write_u16_native(plan.port_offset, port_be)
}

/// Rewrites one endpoint of an XDP frame to `addr`:`port_be` (`addr` as native words), and
/// when `decrement_ttl` lowers the TTL/hop limit by one (the caller forwards the frame itself
/// and checked TTL > 1).
///
/// All old values are read before the first write; `None` means the frame was shorter than
/// the parser saw, which cannot happen, and the caller drops it rather than send it half-done.
#[inline(always)]
pub fn rewrite(
    pkt: &Packet,
    p: &Parsed,
    endpoint: Endpoint,
    addr: [u32; 4],
    port_be: u16,
    decrement_ttl: bool,
) -> Option<()> {
    let plan = plan(p, endpoint, addr, port_be, decrement_ttl);
    let l4_check_offset = p.l4_check_offset();
    let old_l4_check = pkt.read_u16_native(l4_check_offset)?;
    let ip_check_offset = p.l3_offset + IPV4_CHECK_OFFSET;
    let old_ip_check = if p.ipv6 {
        0
    } else {
        pkt.read_u16_native(ip_check_offset)?
    };
    write_fields(pkt, p, &plan, addr, port_be, decrement_ttl)?;
    if !p.ipv6 {
        pkt.write_u16_native(ip_check_offset, plan.ip.apply(old_ip_check))?;
    }
    let l4 = plan.pseudo.merge(plan.port);
    let new_l4_check = if p.proto == IPPROTO_UDP {
        l4.apply_udp(old_l4_check)
    } else {
        l4.apply(old_l4_check)
    };
    pkt.write_u16_native(l4_check_offset, new_l4_check)
}

/// A big-endian delta (`CsumDelta::replace` of packet bytes, as `icmp.rs` builds them) as
/// the kernel's checksum helpers take it: a sum of 16-bit words as the CPU loads them from
/// the packet (`__wsum`). One's complement sums commute with byte swapping, so the folded
/// sum only changes byte order.
#[inline(always)]
fn wsum(delta: CsumDelta) -> u64 {
    u64::from(u16::from_ne_bytes(delta.folded().to_be_bytes()))
}

/// A native-order delta (a `Plan`'s) as the kernel's checksum helpers take it.
#[inline(always)]
fn native_wsum(delta: CsumDelta) -> u64 {
    u64::from(delta.folded())
}

/// As [`rewrite`], for a socket buffer at the TC hook: the same fields, with the checksums
/// updated by the kernel's helpers, which honour the buffer's checksum state. `None`: the
/// packet was shorter than parsed, or a helper refused; the caller drops it.
#[inline(always)]
pub fn rewrite_skb(
    ctx: &TcContext,
    p: &Parsed,
    endpoint: Endpoint,
    addr: [u32; 4],
    port_be: u16,
    decrement_ttl: bool,
) -> Option<()> {
    let plan = plan(p, endpoint, addr, port_be, decrement_ttl);
    write_fields(&Packet::of_skb(ctx), p, &plan, addr, port_be, decrement_ttl)?;
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    let l4_check_offset = p.l4_check_offset() as u32;
    let udp = if p.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let pseudo_flags = u64::from(BPF_F_PSEUDO_HDR) | udp;
    // SAFETY: skb is this run's context; the helpers bounds-check the offset themselves and
    // with size 0 take `to` as a checksum delta.
    unsafe {
        if p.ipv6 {
            // Kernels before 6.16 know no BPF_F_IPV6; their update is right for every
            // checksum state but a receive checksum over the whole packet.
            if bpf_l4_csum_replace(
                skb,
                l4_check_offset,
                0,
                native_wsum(plan.pseudo),
                pseudo_flags | BPF_F_IPV6,
            ) < 0
                && bpf_l4_csum_replace(
                    skb,
                    l4_check_offset,
                    0,
                    native_wsum(plan.pseudo),
                    pseudo_flags,
                ) < 0
            {
                return None;
            }
            if decrement_ttl {
                // Fails unless the buffer is CHECKSUM_COMPLETE, and then nothing is owed.
                let _ = bpf_csum_update(skb, native_wsum(plan.hop_word) as u32);
            }
        } else {
            if bpf_l4_csum_replace(
                skb,
                l4_check_offset,
                0,
                native_wsum(plan.pseudo),
                pseudo_flags,
            ) < 0
            {
                return None;
            }
            let ip_check_offset = (p.l3_offset + IPV4_CHECK_OFFSET) as u32;
            if bpf_l3_csum_replace(skb, ip_check_offset, 0, native_wsum(plan.ip), 0) < 0 {
                return None;
            }
        }
        if bpf_l4_csum_replace(skb, l4_check_offset, 0, native_wsum(plan.port), udp) < 0 {
            return None;
        }
    }
    Some(())
}

/// Lowers the TTL/hop limit of an XDP frame that is translated already (an ICMP error, see
/// `icmp.rs`) by one, before XDP forwards it; the caller checked TTL > 1.
#[inline(always)]
pub fn decrement_ttl(pkt: &Packet, p: &Parsed) -> Option<()> {
    if p.ipv6 {
        return pkt.write(p.l3_offset + IPV6_HOP_LIMIT_OFFSET, [p.ttl - 1]);
    }
    let check_offset = p.l3_offset + IPV4_CHECK_OFFSET;
    let old_check = pkt.read_u16_native(check_offset)?;
    pkt.write(p.l3_offset + IPV4_TTL_OFFSET, [p.ttl - 1])?;
    pkt.write_u16_native(check_offset, ttl_decrement(p).apply(old_check))
}

/// As [`decrement_ttl`], for a socket buffer at the TC hook.
#[inline(always)]
pub fn decrement_ttl_skb(ctx: &TcContext, p: &Parsed) -> Option<()> {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    let delta = native_wsum(ttl_decrement(p));
    if p.ipv6 {
        Packet::of_skb(ctx).write(p.l3_offset + IPV6_HOP_LIMIT_OFFSET, [p.ttl - 1])?;
        // SAFETY: skb is this run's context. Fails unless the buffer is CHECKSUM_COMPLETE,
        // and then nothing is owed.
        let _ = unsafe { bpf_csum_update(skb, delta as u32) };
        return Some(());
    }
    Packet::of_skb(ctx).write(p.l3_offset + IPV4_TTL_OFFSET, [p.ttl - 1])?;
    add_to_ipv4_checksum_skb(ctx, p.l3_offset + IPV4_CHECK_OFFSET, delta)
}

/// Adds `delta` to the checksum at `offset` of an XDP frame, whose checksums are complete.
#[inline(always)]
pub fn update_checksum(pkt: &Packet, offset: usize, delta: CsumDelta) -> Option<()> {
    let old = pkt.read_u16(offset)?;
    pkt.write_u16(offset, delta.apply(old))
}

/// Adds `delta` (bytes of the header already changed, as big-endian words) to the IPv4
/// header checksum at `offset` of a socket buffer.
#[inline(always)]
pub fn update_ipv4_checksum_skb(ctx: &TcContext, offset: usize, delta: CsumDelta) -> Option<()> {
    add_to_ipv4_checksum_skb(ctx, offset, wsum(delta))
}

/// Adds `wsum` (a native-order sum) to the IPv4 header checksum at `offset` of a socket
/// buffer. The helper keeps a receive checksum over the whole packet right: the header's
/// bytes and its checksum change by opposite amounts.
#[inline(always)]
fn add_to_ipv4_checksum_skb(ctx: &TcContext, offset: usize, wsum: u64) -> Option<()> {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: skb is this run's context; the helper bounds-checks the offset and with size 0
    // takes `to` as a checksum delta.
    (unsafe { bpf_l3_csum_replace(skb, offset as u32, 0, wsum, 0) } >= 0).then_some(())
}

/// Adds `delta` to the ICMP/ICMPv6 checksum at `offset` of a socket buffer: a change to the
/// message's own bytes, or with `ipv6_pseudo_header` to the IPv6 addresses its checksum
/// covers through the pseudo-header.
#[inline(always)]
pub fn update_icmp_checksum_skb(
    ctx: &TcContext,
    offset: usize,
    delta: CsumDelta,
    ipv6_pseudo_header: bool,
) -> Option<()> {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    let offset = offset as u32;
    // SAFETY: as above.
    let ok = unsafe {
        if ipv6_pseudo_header {
            let pseudo = u64::from(BPF_F_PSEUDO_HDR);
            // As in `rewrite_skb`: kernels before 6.16 know no BPF_F_IPV6.
            bpf_l4_csum_replace(skb, offset, 0, wsum(delta), pseudo | BPF_F_IPV6) >= 0
                || bpf_l4_csum_replace(skb, offset, 0, wsum(delta), pseudo) >= 0
        } else {
            bpf_l4_csum_replace(skb, offset, 0, wsum(delta), 0) >= 0
        }
    };
    ok.then_some(())
}
