//! ICMP errors about balanced flows, translated so that each end hears about the packet it
//! sent itself (parsing: `lb_common::icmp`).
//!
//! - An error from the backend side (the backend, or a router between xlb and it) quotes a
//!   packet client → backend that xlb translated; it travels to the client. The quote's
//!   destination becomes the VIP again, and so does the error's source when the backend
//!   itself sent it (a router's own address stays: it is not the service's). It leaves like
//!   a reply of the flow.
//! - An error from the client side (the client, or a router in front of it) quotes a reply
//!   VIP → client and is addressed to the VIP. The quote's source and the error's
//!   destination become the backend, and it leaves like a packet of the flow to the backend.
//!
//! Without this, a router's "fragmentation needed" / "packet too big" on either side never
//! reaches a socket that knows the flow, and path-MTU discovery through xlb stalls.
//!
//! Checksums: the quoted IPv4 header's and the quoted transport checksum (when the quote
//! reaches it; a quote of a partial checksum is updated all the same, as Linux and Katran
//! do) are plain bytes inside the message; the error's own IPv4 header checksum and its ICMP
//! checksum go through the hook, which at TC leaves them to the kernel's helpers.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, Counter, FORWARD_NAT, FlowKey, IPPROTO_UDP, PORT_IS_BACKEND,
    PORT_IS_VIP, VipKey,
    csum::CsumDelta,
    icmp::{IPPROTO_ICMP, IPPROTO_ICMPV6, IcmpError, parse_icmp_error_into},
    parse::{
        IPV4_CHECK_OFFSET, IPV4_DST_OFFSET, IPV4_SRC_OFFSET, IPV6_DST_OFFSET, IPV6_SRC_OFFSET,
        Parsed,
    },
};

use crate::{
    forward::{Reply, Translation, backend_hop, reply_flow, usable_backend},
    hook::Hook,
    maps::{HopCache, PORTS, VIPS, flow_entry},
    nat::Endpoint,
    stats::count,
    tunnel,
};

/// Enough for the headers of any error the parser accepts: Ethernet, one VLAN tag, IPv4
/// with options, the ICMP header, the quoted IPv4 header with options and the quoted TCP
/// header up to its checksum.
const ICMP_HEADERS_MAX: u32 = 14 + 4 + 60 + 8 + 60 + 18;

/// Translates an ICMP error about a balanced flow and hands it on; returns the hook's
/// verdict, or `None` to leave the packet to the stack untouched (the caller counts it).
/// `p` is scratch space the caller's failed parse left.
///
/// Inlined, so that `emit` runs from the caller's frame and not on top of `prepare`'s (the
/// verifier sums the frames of a call chain, and `emit`'s is large).
#[inline(always)]
pub fn translate<H: Hook>(ctx: &H, p: &mut Parsed) -> Option<u32> {
    let mut t = Translation::NONE;
    let cache = prepare(ctx, p, &mut t);
    if !t.already_translated {
        return tunnel::translate_path_error(ctx);
    }
    if t.forwarding != FORWARD_NAT {
        // SAFETY: a helper without arguments.
        let slot = backend_hop(u32::from(t.backend_id), unsafe {
            bpf_ktime_get_coarse_ns()
        });
        return Some(tunnel::emit(ctx, p, &t, slot));
    }
    if cache.is_none() {
        // Rewritten in part only, which cannot happen: never send it half-done.
        count(Counter::Malformed);
        return Some(H::DROP);
    }
    Some(ctx.emit(p, &t, cache))
}

/// Finds the flow, rewrites the error, and describes it as it now stands in `p` and `t`
/// (with `already_translated`) for `emit`; returns where the flow keeps the next hop
/// towards the error's receiver. Leaves `t.already_translated` unset for an error this is
/// not for, and returns `None` with it set when the rewrite broke off.
///
/// Not inlined: the error's parsed form lives in this frame, which is gone before `emit`'s
/// is pushed. An error whose TTL expires here is translated too; `emit` then leaves it to
/// the stack, as any packet, and the stack sends no error about an error.
#[inline(never)]
fn prepare<H: Hook>(ctx: &H, p: &mut Parsed, t: &mut Translation) -> HopCache {
    ctx.make_readable(ICMP_HEADERS_MAX);
    let mut e = IcmpError::EMPTY;
    parse_into(ctx, &mut e)?;
    let cache = find_flow(&e, t)?;
    t.already_translated = true;
    if t.forwarding != FORWARD_NAT {
        // About a reply a tunnelled backend sent from the VIP itself: the error goes to it
        // through the tunnel as it came, since the quote is already the backend's own packet.
        count(Counter::IcmpTranslated);
        p.src = e.src;
        p.dst = e.dst;
        p.l3_offset = e.l3_offset;
        p.l4_offset = e.icmp_offset;
        p.ipv6 = e.ipv6;
        p.proto = if e.ipv6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
        p.ttl = e.ttl;
        return Some(cache);
    }
    rewrite(ctx, &e, t)?;
    count(Counter::IcmpTranslated);
    // The error as it now stands, for `emit`; `p` is as the failed parse left it: empty.
    // Fields are set one by one: a whole `Parsed` built here would cost this frame a copy.
    p.src = e.src;
    p.dst = e.dst;
    if outer_follows_quote(&e, t) {
        match t.endpoint {
            Endpoint::Destination => p.src = t.addr,
            Endpoint::Source => p.dst = t.addr,
        }
    }
    p.l3_offset = e.l3_offset;
    p.l4_offset = e.icmp_offset;
    p.ipv6 = e.ipv6;
    p.proto = if e.ipv6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    p.ttl = e.ttl;
    // Routed as it now stands: from `p.src` to `t.addr`.
    t.endpoint = Endpoint::Destination;
    t.addr = p.dst;
    t.port_be = 0;
    Some(cache)
}

/// Not inlined: the parser's temporaries are gone before the lookups run.
#[inline(never)]
fn parse_into<H: Hook>(ctx: &H, out: &mut IcmpError) -> Option<()> {
    parse_icmp_error_into(&ctx.packet(), out)
}

/// The flow the quoted packet belongs to. Fills `t` with the quoted endpoint to rewrite
/// (the backend as destination, or the VIP as source) and its new address and port; returns
/// where the flow keeps the next hop towards the error's receiver, or `None` for no flow.
///
/// As `forward::to_client`, the reference travels as the return value: the verifier forgets
/// a pointer's type when it is copied through memory in pieces.
#[inline(never)]
fn find_flow(e: &IcmpError, t: &mut Translation) -> HopCache {
    let role = |port_be: u16| {
        PORTS
            .get(u32::from(u16::from_be(port_be)))
            .map_or(0, |r| *r)
    };
    // The quote is client → backend, a packet xlb forwarded: the error goes to the client,
    // where the flow's replies go.
    if role(e.quoted_dport_be) & PORT_IS_BACKEND != 0 {
        let reply = Reply {
            src: &e.quoted_dst,
            dst: &e.quoted_src,
            sport_be: e.quoted_dport_be,
            dport_be: e.quoted_sport_be,
            proto: e.quoted_proto,
        };
        if let Some(cache) = reply_flow(&reply, t) {
            t.endpoint = Endpoint::Destination;
            return Some(cache);
        }
    }
    // The quote is a reply VIP → client: the error goes to the flow's backend.
    if role(e.quoted_sport_be) & PORT_IS_VIP == 0 {
        return None;
    }
    let vip_key = VipKey {
        addr: e.quoted_src,
        port_be: e.quoted_sport_be,
        proto: e.quoted_proto,
        _pad: [0; 5],
    };
    // SAFETY: the agent replaces VIP entries whole and never writes into them in place.
    let vip = (unsafe { VIPS.get(&vip_key) })?;
    let key = FlowKey {
        src: e.quoted_dst,
        dst: e.quoted_src,
        sport_be: e.quoted_dport_be,
        dport_be: e.quoted_sport_be,
        proto: e.quoted_proto,
        _pad: [0; 3],
    };
    let backend_id = flow_entry(&key)?.backend_id;
    // Only an established flow: an error never creates one.
    let backend = usable_backend(
        backend_id,
        vip.vip_id,
        e.ipv6,
        BACKEND_ACTIVE | BACKEND_DRAINING,
    )?;
    t.endpoint = Endpoint::Source;
    t.addr = backend.addr;
    t.port_be = backend.port_be;
    t.forwarding = backend.forwarding;
    t.backend_id = backend_id as u16;
    // SAFETY: a helper without arguments.
    backend_hop(backend_id, unsafe { bpf_ktime_get_coarse_ns() }).map(|c| &mut c.hop)
}

/// Whether the error's address on the rewritten endpoint's side is that endpoint's, and so
/// changes with it. The quote travels the other way round from the error: its destination
/// (the backend) pairs with the error's source, its source (the VIP) with the error's
/// destination. An error from a router keeps the router's address.
#[inline(always)]
fn outer_follows_quote(e: &IcmpError, t: &Translation) -> bool {
    match t.endpoint {
        Endpoint::Destination => e.src == e.quoted_dst,
        Endpoint::Source => e.dst == e.quoted_src,
    }
}

#[inline(always)]
fn last4(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// The change of replacing address `old` by `new`, 4 bytes of each for IPv4.
#[inline(always)]
fn address_change(ipv6: bool, old: &[u8; 16], new: &[u8; 16]) -> CsumDelta {
    if ipv6 {
        CsumDelta::new().replace(old, new)
    } else {
        CsumDelta::new().replace(&last4(old), &last4(new))
    }
}

/// Rewrites the quote's `t.endpoint` to `t.addr`:`t.port_be`, and the error's own address
/// where `outer_follows_quote`, with every checksum: the quoted IPv4 header's and the quoted
/// transport checksum (if quoted) as plain bytes, the error's through the hook. All old
/// values are read before the first write, and the hook's updates come after the last: at
/// TC they may move the data.
///
/// Not inlined: its temporaries stay out of `prepare`'s frame.
#[inline(never)]
fn rewrite<H: Hook>(ctx: &H, e: &IcmpError, t: &Translation) -> Option<()> {
    let pkt = ctx.packet();
    let (src_offset, dst_offset) = if e.ipv6 {
        (IPV6_SRC_OFFSET, IPV6_DST_OFFSET)
    } else {
        (IPV4_SRC_OFFSET, IPV4_DST_OFFSET)
    };
    // See `outer_follows_quote` for the pairing.
    let (addr_offset, port_offset, outer_offset, old_addr, old_port_be) = match t.endpoint {
        Endpoint::Destination => (
            e.quoted_l3_offset + dst_offset,
            e.quoted_l4_offset + 2,
            e.l3_offset + src_offset,
            &e.quoted_dst,
            e.quoted_dport_be,
        ),
        Endpoint::Source => (
            e.quoted_l3_offset + src_offset,
            e.quoted_l4_offset,
            e.l3_offset + dst_offset,
            &e.quoted_src,
            e.quoted_sport_be,
        ),
    };
    // Where the error's address follows, it was the quoted one: the same change.
    let rewrite_outer = outer_follows_quote(e, t);
    let addr = address_change(e.ipv6, old_addr, &t.addr);
    let port = CsumDelta::new().replace_u16(u16::from_be(old_port_be), u16::from_be(t.port_be));
    // The ICMP checksum covers the whole quote: every byte changed there.
    let mut message = addr.merge(port);
    let ip_check_offset = e.quoted_l3_offset + IPV4_CHECK_OFFSET;
    let mut new_ip_check = 0;
    if !e.ipv6 {
        let old = pkt.read_u16(ip_check_offset)?;
        new_ip_check = addr.apply(old);
        message = message.merge(CsumDelta::new().replace_u16(old, new_ip_check));
    }
    let mut new_l4_check = 0;
    if e.quoted_l4_check {
        let old = pkt.read_u16(e.quoted_l4_check_offset())?;
        // The quoted packet's pseudo-header holds the address.
        let l4 = addr.merge(port);
        new_l4_check = if e.quoted_proto == IPPROTO_UDP {
            l4.apply_udp(old)
        } else {
            l4.apply(old)
        };
        message = message.merge(CsumDelta::new().replace_u16(old, new_l4_check));
    }

    if e.ipv6 {
        pkt.write(addr_offset, t.addr)?;
        if rewrite_outer {
            pkt.write(outer_offset, t.addr)?;
        }
    } else {
        pkt.write(addr_offset, last4(&t.addr))?;
        pkt.write_u16(ip_check_offset, new_ip_check)?;
        if rewrite_outer {
            pkt.write(outer_offset, last4(&t.addr))?;
        }
    }
    pkt.write(port_offset, t.port_be.to_ne_bytes())?;
    if e.quoted_l4_check {
        pkt.write_u16(e.quoted_l4_check_offset(), new_l4_check)?;
    }

    if rewrite_outer {
        // ICMPv4's checksum leaves the IP header out; ICMPv6's covers its addresses.
        if e.ipv6 {
            ctx.update_icmp_checksum(e.icmp_check_offset(), addr, true)?;
        } else {
            ctx.update_ipv4_checksum(e.l3_offset + IPV4_CHECK_OFFSET, addr)?;
        }
    }
    ctx.update_icmp_checksum(e.icmp_check_offset(), message, false)
}
