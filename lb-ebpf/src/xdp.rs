//! The XDP hook: frames straight from the driver, complete checksums, out with `XDP_TX` or
//! `XDP_REDIRECT` through the redirect map.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    Counter,
    csum::CsumDelta,
    parse::{ETH_HLEN, PacketBytes as _, Parsed, Skip, parse_into},
};

use crate::{
    forward::{Translation, next_hop},
    hook::{Hook, Room},
    maps::{EGRESS_PORTS, HopCache},
    nat::{decrement_ttl, rewrite, update_checksum},
    packet::Packet,
    stats::count,
};

impl Hook for XdpContext {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    #[inline(always)]
    fn packet(&self) -> Packet {
        Packet::of_xdp(self)
    }

    // Inlined: the XDP call chain has room for the parser's stack (see `Hook::parse`).
    #[inline(always)]
    fn parse(&self, out: &mut Parsed) -> Result<(), Skip> {
        parse_into(&self.packet(), out)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: ctx points at the kernel's xdp_md for this run.
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn wire_len(&self) -> u64 {
        self.packet().len() as u64
    }

    #[inline(always)]
    fn vlan_tagged(&self) -> bool {
        // A tag in an XDP frame is in its bytes, where the parser sees it.
        false
    }

    #[inline(always)]
    fn fib_tot_len(&self, p: &Parsed) -> u16 {
        (self.packet().len() - p.l3_offset) as u16
    }

    #[inline(always)]
    fn make_readable(&self, _len: u32) {
        // An XDP frame is all readable.
    }

    #[inline(always)]
    fn update_ipv4_checksum(&self, offset: usize, delta: CsumDelta) -> Option<()> {
        update_checksum(&self.packet(), offset, delta)
    }

    #[inline(always)]
    fn update_icmp_checksum(&self, offset: usize, delta: CsumDelta, _pseudo: bool) -> Option<()> {
        update_checksum(&self.packet(), offset, delta)
    }

    #[inline(always)]
    fn length_to_fit(&self, p: &Parsed) -> Option<u32> {
        Some((self.packet().len() - p.l3_offset) as u32)
    }

    #[inline(always)]
    fn open_room(&self, len: u16, _room: Room) -> Option<()> {
        // SAFETY: ctx is this run's xdp_md; the helper checks the headroom.
        if unsafe { bpf_xdp_adjust_head(self.ctx.cast(), -i32::from(len)) } != 0 {
            return None;
        }
        // The Ethernet header moves to the new start; what follows it is the room.
        let pkt = self.packet();
        let eth = pkt.read::<ETH_HLEN>(usize::from(len))?;
        pkt.write(0, eth)
    }

    #[inline(always)]
    fn truncate(&self, len: u32) -> Option<()> {
        // Opaque to LLVM: otherwise it folds `len` into the pointer difference and emits
        // scalar-minus-pointer, which the verifier refuses.
        let current = core::hint::black_box(self.packet().len()) as i64;
        let cut = current - i64::from(len);
        if cut <= 0 {
            return Some(());
        }
        // SAFETY: ctx is this run's xdp_md; the helper refuses cuts past the minimum.
        (unsafe { bpf_xdp_adjust_tail(self.ctx.cast(), -(cut as i32)) } == 0).then_some(())
    }

    #[inline(always)]
    fn send_out(&self, ifindex: u32) -> Option<u32> {
        if ifindex == Hook::ingress_ifindex(self) {
            return Some(xdp_action::XDP_TX);
        }
        EGRESS_PORTS.redirect(ifindex, 0).ok()
    }

    // Not inlined: shared by both directions, in its own stack frame.
    #[inline(never)]
    fn emit(&self, p: &Parsed, t: &Translation, cache: HopCache) -> u32 {
        let pkt = &self.packet();
        let next_hop = next_hop(self, p, t, cache);
        let Some(nh) = next_hop.filter(|_| p.l3_offset == lb_common::parse::ETH_HLEN) else {
            // VLAN-tagged frames also go through the stack: the tag belongs to the ingress
            // device and only the stack knows how the egress wants it.
            return via_stack(pkt, p, t);
        };
        if p.ttl <= 1 {
            // Untouched: the stack sends the ICMP time-exceeded.
            count(Counter::TtlExpired);
            return xdp_action::XDP_PASS;
        }
        // The action is settled before the frame is touched: an egress that is not in the
        // redirect map (it left it since the next hop was cached, or a reply's client-side
        // interface never was in it) sends the packet through the stack, MACs untouched.
        let Some(action) = self.send_out(nh.ifindex) else {
            return via_stack(pkt, p, t);
        };
        let translated = if t.already_translated {
            decrement_ttl(pkt, p)
        } else {
            rewrite(pkt, p, t.endpoint, t.addr_words(), t.port_be, true)
        };
        if translated.is_none() || pkt.write_mac_words(nh.macs).is_none() {
            return dropped_malformed();
        }
        action
    }
}

/// Translates the packet and lets the stack route it (TTL and MACs are the stack's job).
#[inline(always)]
fn via_stack(pkt: &Packet, p: &Parsed, t: &Translation) -> u32 {
    count(Counter::ViaStack);
    if t.already_translated {
        return xdp_action::XDP_PASS;
    }
    match rewrite(pkt, p, t.endpoint, t.addr_words(), t.port_be, false) {
        Some(()) => xdp_action::XDP_PASS,
        None => dropped_malformed(),
    }
}

#[inline(always)]
fn dropped_malformed() -> u32 {
    count(Counter::Malformed);
    xdp_action::XDP_DROP
}
