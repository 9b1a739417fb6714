//! What the per-packet path needs from the hook it runs at. The decision (VIP, flow,
//! backend, reply) is the same at XDP and at TC; reading the frame, the verdicts and handing
//! the packet on differ, and live in `xdp.rs` and `tc.rs`.

use aya_ebpf::EbpfContext;
use lb_common::{NextHop, parse::Parsed};

use crate::{forward::Translation, packet::Packet};

pub trait Hook: EbpfContext {
    /// Leave the packet to the stack.
    const PASS: u32;
    /// Drop the packet.
    const DROP: u32;

    /// The directly readable headers.
    fn packet(&self) -> Packet;

    fn ingress_ifindex(&self) -> u32;

    /// Bytes the packet carries on the wire, all its GSO segments together.
    fn wire_len(&self) -> u64;

    /// The packet belongs to a VLAN whose tag the hook keeps outside the bytes (TC: the
    /// socket buffer's tag field): only the stack knows how the egress wants it.
    fn vlan_tagged(&self) -> bool;

    /// `tot_len` for `bpf_fib_lookup`'s MTU check (0: let the kernel check the packet
    /// itself, which knows a GSO packet leaves as segments).
    fn fib_tot_len(&self, p: &Parsed) -> u16;

    /// Applies `t` and hands the packet on: out of an interface when the next hop is known
    /// (`cache` is where the flow keeps it; null: nowhere), through the stack otherwise.
    fn emit(&self, p: &Parsed, t: &Translation, cache: *mut NextHop) -> u32;
}
