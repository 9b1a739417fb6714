//! Direct server return: a client's packet to a tunnelled backend leaves untouched inside an
//! outer IP header (IPIP, IPv6 in IPv6) or IP + UDP header (GUE) to the backend's address,
//! which takes the tunnel off and answers from the VIP straight to the client. The backend
//! was chosen exactly as for NAT (`forward::to_backend`); only the way out differs.
//!
//! What the outer header needs (the next hop, the balancer's own address towards the
//! backend, the route's MTU, the GUE port) is resolved per backend and CPU once a second,
//! with one `bpf_fib_lookup`, into the backend's `CachedHop`; a packet costs no lookup.

use core::mem;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, bpf_fib_lookup},
    helpers::generated::bpf_fib_lookup as fib_lookup,
};
use lb_common::{
    CachedHop, Counter, DEFAULT_GUE_PORT, FORWARD_GUE, FORWARD_NAT, FlowKey, IPPROTO_UDP, NextHop,
    encap::{
        self, ICMP_HLEN, ICMP4_QUOTE, ICMP6_QUOTE, IPPROTO_IPIP, IPPROTO_IPV6, flow_label,
        gue_source_port, traffic_class,
    },
    hash::flow_hash,
    icmp::{TunnelTooBig, parse_tunnel_too_big_into},
    parse::{ETH_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, PacketBytes as _, Parsed, UDP_HLEN},
};

use crate::{
    forward::{AF_INET, AF_INET6, Translation, flow_key, words},
    hook::{Hook, Room},
    maps::{BACKENDS, ENCAP, XLB_HASH_SEED, flow_entry},
    packet::Packet,
    stats::count,
};

/// Sends the client's packet (`p`, to backend `t.addr`) through the tunnel `t.forwarding`
/// names; `slot` is this CPU's cache of the backend's hop. Packets that cannot be tunnelled
/// are dropped and counted (`next_hop_failure`): unlike a NAT-ed packet, a tunnelled one
/// cannot be left to the stack, which would see its own address as the source.
///
/// Not inlined: its frame (outer headers, route lookup) is its own.
#[inline(never)]
pub fn emit<H: Hook>(
    ctx: &H,
    p: &Parsed,
    t: &Translation,
    slot: Option<&'static mut CachedHop>,
) -> u32 {
    let Some(overhead) = encap::overhead(t.forwarding, p.ipv6) else {
        count(Counter::Malformed);
        return H::DROP;
    };
    // A VLAN tag (in the frame or beside it) belongs to the ingress side; the tunnel leaves
    // untagged towards the route's next hop, which only an untagged frame can take here.
    let Some(c) = slot.filter(|_| p.l3_offset == ETH_HLEN && !ctx.vlan_tagged()) else {
        count(Counter::NextHopFailure);
        return H::DROP;
    };
    if c.hop.ifindex == 0 && resolve(ctx, p.ipv6, &t.addr, t.forwarding, c).is_none() {
        count(Counter::NextHopFailure);
        return H::DROP;
    }
    // Compared as `len > mtu - overhead`: the frame's length comes from packet pointers,
    // and the verifier refuses the scalar-minus-pointer LLVM makes of `len + overhead`.
    if let Some(len) = ctx.length_to_fit(p)
        && c.mtu != 0
        && len > u32::from(c.mtu.saturating_sub(overhead))
    {
        return too_big(ctx, p, encap::announced_mtu(c.mtu, overhead, p.ipv6));
    }
    let Some(action) = ctx.send_out(c.hop.ifindex) else {
        count(Counter::NextHopFailure);
        return H::DROP;
    };
    if encapsulate(ctx, p, t, c).is_none() {
        return dropped_malformed::<H>();
    }
    action
}

/// Puts the outer headers in front of the packet and addresses the frame to the hop.
/// Not inlined: the headers are built in this frame.
#[inline(never)]
fn encapsulate<H: Hook>(ctx: &H, p: &Parsed, t: &Translation, c: &CachedHop) -> Option<()> {
    let overhead = encap::overhead(t.forwarding, p.ipv6)?;
    let gue = t.forwarding == FORWARD_GUE;
    // The tunnel's source port or flow label: the same for all of a flow's packets. IPIP
    // over IPv4 has no field for it, and skips the hash.
    let entropy = if gue || p.ipv6 {
        flow_hash(&flow_key(p), XLB_HASH_SEED.load())
    } else {
        0
    };
    let first_two = ctx.packet().read::<2>(ETH_HLEN)?;
    ctx.open_room(
        overhead,
        Room::Tunnel {
            ipv6: p.ipv6,
            udp: gue,
        },
    )?;
    let pkt = ctx.packet();
    // A GSO buffer's length may pass 64 KiB; each segment gets its own length when cut.
    let inner_len = (pkt.len() - ETH_HLEN - usize::from(overhead)).min(0xffff - 48) as u16;
    let class = traffic_class(first_two, p.ipv6);
    let udp_len = if gue { UDP_HLEN as u16 } else { 0 };
    let ip_len = if p.ipv6 {
        let next = if gue { IPPROTO_UDP } else { IPPROTO_IPV6 };
        let h = encap::ipv6_header(
            &c.encap_src,
            &t.addr,
            next,
            class,
            flow_label(entropy),
            inner_len + udp_len,
        );
        write_ipv6_header(&pkt, &h)?;
        IPV6_HLEN
    } else {
        let next = if gue { IPPROTO_UDP } else { IPPROTO_IPIP };
        let h = encap::ipv4_header(
            last4(&c.encap_src),
            last4(&t.addr),
            next,
            class,
            inner_len + udp_len,
            true,
        );
        write_ipv4_header(&pkt, &h)?;
        IPV4_MIN_HLEN
    };
    if gue {
        let udp = encap::gue_udp_header(gue_source_port(entropy), c.gue_port_be, inner_len);
        pkt.write(ETH_HLEN + ip_len, udp)?;
    }
    pkt.write_macs(&c.hop)
}

/// Writes an outer IPv4 header after the Ethernet header in four stores (2 + 8 + 8 + 2
/// bytes, the 8-byte ones 8-aligned within the frame) where a 20-byte copy would be twenty
/// byte stores.
#[inline(always)]
fn write_ipv4_header(pkt: &Packet, h: &[u8; 20]) -> Option<()> {
    pkt.write(ETH_HLEN, [h[0], h[1]])?;
    pkt.write(ETH_HLEN + 2, chunk8(h, 2))?;
    pkt.write(ETH_HLEN + 10, chunk8(h, 10))?;
    pkt.write(ETH_HLEN + 18, [h[18], h[19]])
}

/// As `write_ipv4_header`, for the 40 bytes of an IPv6 header (2 + 4 × 8 + 4 + 2).
#[inline(always)]
fn write_ipv6_header(pkt: &Packet, h: &[u8; 40]) -> Option<()> {
    pkt.write(ETH_HLEN, [h[0], h[1]])?;
    pkt.write(ETH_HLEN + 2, chunk8(h, 2))?;
    pkt.write(ETH_HLEN + 10, chunk8(h, 10))?;
    pkt.write(ETH_HLEN + 18, chunk8(h, 18))?;
    pkt.write(ETH_HLEN + 26, chunk8(h, 26))?;
    pkt.write(ETH_HLEN + 34, [h[34], h[35], h[36], h[37]])?;
    pkt.write(ETH_HLEN + 38, [h[38], h[39]])
}

#[inline(always)]
fn chunk8<const N: usize>(h: &[u8; N], at: usize) -> [u8; 8] {
    [
        h[at],
        h[at + 1],
        h[at + 2],
        h[at + 3],
        h[at + 4],
        h[at + 5],
        h[at + 6],
        h[at + 7],
    ]
}

/// Resolves the backend's hop into `c`: next hop, outer source (configured in `XLB_ENCAP`,
/// else the route's own), the route's MTU and the GUE port. `None`: no usable route or
/// neighbour (the caller counts it; the next packet tries again). Not inlined: the lookup's
/// parameters live in this frame.
#[inline(never)]
fn resolve<H: Hook>(
    ctx: &H,
    ipv6: bool,
    backend: &[u8; 16],
    forwarding: u8,
    c: &mut CachedHop,
) -> Option<()> {
    let settings = ENCAP.get(0);
    let configured: [u8; 16] = match settings {
        Some(s) if ipv6 => s.src_v6,
        Some(s) => {
            let mut a = [0u8; 16];
            a[12..].copy_from_slice(&s.src_v4);
            a
        }
        None => [0; 16],
    };
    let from_route = configured == [0; 16];
    // SAFETY: bpf_fib_lookup is plain data; all-zero is its documented "no input" state.
    let mut params: bpf_fib_lookup = unsafe { mem::zeroed() };
    params.family = if ipv6 { AF_INET6 } else { AF_INET };
    params.l4_protocol = match (forwarding == FORWARD_GUE, ipv6) {
        (true, _) => IPPROTO_UDP,
        (false, true) => IPPROTO_IPV6,
        (false, false) => IPPROTO_IPIP,
    };
    params.ifindex = ctx.ingress_ifindex();
    if ipv6 {
        params.__bindgen_anon_3.ipv6_src = words(&configured);
        params.__bindgen_anon_4.ipv6_dst = words(backend);
    } else {
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(last4(&configured));
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(last4(backend));
    }
    // The route's own source address is what the balancer would send from; the kernel
    // fills it in (`BPF_FIB_LOOKUP_SRC`, kernel 6.7) unless one is configured.
    let flags = if from_route { BPF_FIB_LOOKUP_SRC } else { 0 };
    // SAFETY: params is a properly sized, initialised struct on our stack.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr().cast(),
            &raw mut params,
            mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return None;
    }
    // SAFETY: on success the kernel filled the smac/dmac arm of the union, the source
    // address (with `BPF_FIB_LOOKUP_SRC`) and the route's MTU (`mtu_result`).
    let (macs, mtu, src4, src6) = unsafe {
        (
            params.__bindgen_anon_6.__bindgen_anon_2,
            params.__bindgen_anon_1.mtu_result,
            params.__bindgen_anon_3.ipv4_src,
            params.__bindgen_anon_3.ipv6_src,
        )
    };
    c.hop = NextHop {
        ifindex: params.ifindex,
        src_mac: macs.smac,
        dst_mac: macs.dmac,
    };
    c.encap_src = if !from_route {
        configured
    } else if ipv6 {
        from_words(src6)
    } else {
        let mut a = [0u8; 16];
        a[12..].copy_from_slice(&src4.to_ne_bytes());
        a
    };
    c.mtu = mtu;
    c.gue_port_be = match settings.map_or(0, |s| s.gue_port_be) {
        0 => DEFAULT_GUE_PORT.to_be(),
        port => port,
    };
    Some(())
}

/// Answers a client's packet that would not fit the route once tunnelled with an ICMP
/// "fragmentation needed" (IPv4) or "packet too big" (IPv6) from the VIP, announcing `mtu`,
/// as a router on the way would: the client's stack then sends smaller packets. The packet
/// becomes the answer in place: room for the error's headers opens in front of its IP
/// header, which with 8 bytes of what follows stays as the quote, and the rest is cut.
/// IPv4 packets with options are dropped instead (the quote would need them whole). Not
/// inlined: the error is built in this frame.
#[inline(never)]
fn too_big<H: Hook>(ctx: &H, p: &Parsed, mtu: u16) -> u32 {
    count(Counter::TooBigForTunnel);
    if !p.ipv6 && p.l4_offset != ETH_HLEN + IPV4_MIN_HLEN {
        return H::DROP;
    }
    let (ip_len, quote_len) = if p.ipv6 {
        (IPV6_HLEN, ICMP6_QUOTE)
    } else {
        (IPV4_MIN_HLEN, ICMP4_QUOTE)
    };
    let pkt = ctx.packet();
    // One at a time: a value read on one path only must not reach a path where it is
    // undefined, which LLVM allows and the verifier refuses.
    let Some(eth) = pkt.read::<12>(0) else {
        return dropped_malformed::<H>();
    };
    let Some(quote_sum) = quote_sum(&pkt, ETH_HLEN, p.ipv6) else {
        return dropped_malformed::<H>();
    };
    let Some(action) = ctx.send_out(ctx.ingress_ifindex()) else {
        return H::DROP;
    };
    let len = (ETH_HLEN + ip_len + ICMP_HLEN + quote_len) as u32;
    if ctx
        .open_room((ip_len + ICMP_HLEN) as u16, Room::IcmpError)
        .and_then(|()| ctx.truncate(len))
        .is_none()
    {
        return dropped_malformed::<H>();
    }
    ctx.make_readable(len);
    let pkt = ctx.packet();
    // Back to where it came from: the sender's address becomes the destination.
    let macs = [
        eth[6], eth[7], eth[8], eth[9], eth[10], eth[11], eth[0], eth[1], eth[2], eth[3], eth[4],
        eth[5],
    ];
    let written = if p.ipv6 {
        let (ip, icmp) = encap::icmp6_packet_too_big(&p.dst, &p.src, mtu, quote_sum);
        pkt.write(ETH_HLEN, ip)
            .and_then(|()| pkt.write(ETH_HLEN + IPV6_HLEN, icmp))
    } else {
        let (ip, icmp) = encap::icmp4_frag_needed(last4(&p.dst), last4(&p.src), mtu, quote_sum);
        pkt.write(ETH_HLEN, ip)
            .and_then(|()| pkt.write(ETH_HLEN + IPV4_MIN_HLEN, icmp))
    };
    if written.and_then(|()| pkt.write(0, macs)).is_none() {
        return dropped_malformed::<H>();
    }
    action
}

/// An ICMP "too big" from a router between the balancer and a backend, about a packet xlb
/// tunnelled: the client hears of it, about its own packet, from the VIP, with the MTU less
/// the tunnel, as if the balancer's own route were that narrow; the error goes out where
/// the flow's replies would go (`FlowState::reply_next_hop`). Only for a flow whose entry
/// names a tunnelled backend at the tunnel's destination. `None`: not such an error (it is
/// left to the caller).
///
/// Not inlined: the parsed error lives in this frame.
#[inline(never)]
pub fn translate_path_error<H: Hook>(ctx: &H) -> Option<u32> {
    ctx.make_readable(PATH_ERROR_MAX);
    let gue_port_be = match ENCAP.get(0).map_or(0, |s| s.gue_port_be) {
        0 => DEFAULT_GUE_PORT.to_be(),
        port => port,
    };
    let mut e = TunnelTooBig::EMPTY;
    parse_path_error(ctx, gue_port_be, &mut e)?;
    let key = FlowKey {
        src: e.client,
        dst: e.vip,
        sport_be: e.client_port_be,
        dport_be: e.vip_port_be,
        proto: e.proto,
        _pad: [0; 3],
    };
    let state = flow_entry(&key)?;
    let b = BACKENDS.get(state.backend_id)?;
    if b.forwarding == FORWARD_NAT || b.addr != e.backend || state.reply_next_hop.ifindex == 0 {
        return None;
    }
    let hop = state.reply_next_hop;
    let action = ctx.send_out(hop.ifindex)?;
    count(Counter::IcmpTranslated);
    e.mtu = encap::announced_mtu(e.mtu, e.overhead, e.ipv6);
    Some(requote(ctx, &e, &hop).map_or_else(dropped_malformed::<H>, |()| action))
}

/// Not inlined: the parser's temporaries are gone before the lookups run.
#[inline(never)]
fn parse_path_error<H: Hook>(ctx: &H, gue_port_be: u16, out: &mut TunnelTooBig) -> Option<()> {
    parse_tunnel_too_big_into(&ctx.packet(), gue_port_be, out)
}

/// Rewrites the frame into the client's error: its packet's head moved to where an error's
/// quote goes, the rest cut, the error's headers and MACs (towards the client) in front.
/// Not inlined: the headers are built in this frame.
#[inline(never)]
/// `e.mtu` is the MTU to announce. (Three arguments: with more, LLVM's argument promotion
/// can pass more than the five registers BPF calls have.)
fn requote<H: Hook>(ctx: &H, e: &TunnelTooBig, hop: &NextHop) -> Option<()> {
    let (ip_len, quote_len) = if e.ipv6 {
        (IPV6_HLEN, ICMP6_QUOTE)
    } else {
        (IPV4_MIN_HLEN, ICMP4_QUOTE)
    };
    let to = ETH_HLEN + ip_len + ICMP_HLEN;
    let from = e.inner_offset;
    let pkt = ctx.packet();
    // Each byte read once, nearest first: a second read at the same variable offset may
    // lose the bounds check the verifier credits to the first.
    let word = |offset: usize| pkt.read::<8>(from + offset).map(u64::from_ne_bytes);
    let (w0, w1, w2) = (word(0)?, word(8)?, word(16)?);
    let (w3, w4, w5) = if e.ipv6 {
        (word(24)?, word(32)?, word(40)?)
    } else {
        let tail = pkt.read::<4>(from + 24)?;
        (u64::from(u32::from_ne_bytes(tail)), 0, 0)
    };
    let sum = finish_sum(
        fold_words(w0)
            + fold_words(w1)
            + fold_words(w2)
            + fold_words(w3)
            + fold_words(w4)
            + fold_words(w5),
    );
    // To a constant offset before the source: the quote only moves towards the start.
    pkt.write(to, w0.to_ne_bytes())?;
    pkt.write(to + 8, w1.to_ne_bytes())?;
    pkt.write(to + 16, w2.to_ne_bytes())?;
    if e.ipv6 {
        pkt.write(to + 24, w3.to_ne_bytes())?;
        pkt.write(to + 32, w4.to_ne_bytes())?;
        pkt.write(to + 40, w5.to_ne_bytes())?;
    } else {
        pkt.write(to + 24, (w3 as u32).to_ne_bytes())?;
    }
    ctx.truncate((to + quote_len) as u32)?;
    let pkt = ctx.packet();
    if e.ipv6 {
        let (ip, icmp) = encap::icmp6_packet_too_big(&e.vip, &e.client, e.mtu, sum);
        pkt.write(ETH_HLEN, ip)?;
        pkt.write(ETH_HLEN + IPV6_HLEN, icmp)?;
    } else {
        let (ip, icmp) = encap::icmp4_frag_needed(last4(&e.vip), last4(&e.client), e.mtu, sum);
        pkt.write(ETH_HLEN, ip)?;
        pkt.write(ETH_HLEN + IPV4_MIN_HLEN, icmp)?;
    }
    pkt.write_macs(hop)
}

/// The longest error `translate_path_error` reads: Ethernet, IPv6 + ICMPv6, the tunnel's
/// IPv6 + UDP, the client's IPv6 header and 8 bytes.
const PATH_ERROR_MAX: u32 =
    (ETH_HLEN + IPV6_HLEN + ICMP_HLEN + IPV6_HLEN + UDP_HLEN + ICMP6_QUOTE) as u32;

/// `encap::sum_be_words` of the bytes an ICMP error quotes, read where they are (at `at`):
/// 8 bytes at a time, summed as native-order 16-bit words and swapped at
/// the end, which the one's-complement sum allows (RFC 1071 §2(B)).
#[inline(always)]
fn quote_sum(pkt: &Packet, at: usize, ipv6: bool) -> Option<u32> {
    // Written out, not looped: LLVM turns a loop over packet offsets into arithmetic on
    // `data_end`, which the verifier refuses.
    let word = |offset: usize| pkt.read::<8>(at + offset).map(u64::from_ne_bytes);
    let mut sum = fold_words(word(0)?) + fold_words(word(8)?) + fold_words(word(16)?);
    if ipv6 {
        sum += fold_words(word(24)?) + fold_words(word(32)?) + fold_words(word(40)?);
    } else {
        sum += fold_words(u64::from(u32::from_ne_bytes(pkt.read::<4>(at + 24)?)));
    }
    Some(finish_sum(sum))
}

/// Folds a sum of native-order 16-bit words into the big-endian-word sum `encap` takes.
#[inline(always)]
fn finish_sum(mut sum: u64) -> u32 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u32::from((sum as u16).swap_bytes())
}

/// The sum of a 64-bit word's four 16-bit halves.
#[inline(always)]
const fn fold_words(v: u64) -> u64 {
    (v & 0xffff) + (v >> 16 & 0xffff) + (v >> 32 & 0xffff) + (v >> 48)
}

#[inline(always)]
fn dropped_malformed<H: Hook>() -> u32 {
    count(Counter::Malformed);
    H::DROP
}

#[inline(always)]
fn last4(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

#[inline(always)]
fn from_words(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}
