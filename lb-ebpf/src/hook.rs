//! What the per-packet path needs from the hook it runs at. The decision (VIP, flow,
//! backend, reply) is the same at XDP and at TC; reading the frame, the verdicts and handing
//! the packet on differ, and live in `xdp.rs` and `tc.rs`.

use aya_ebpf::EbpfContext;
use lb_common::{
    csum::CsumDelta,
    parse::{Parsed, Skip},
};

use crate::{forward::Translation, maps::HopCache, packet::Packet};

/// What room opened by `Hook::open_room` will hold: a socket buffer's offload state must
/// know a tunnel header from anything else.
#[derive(Clone, Copy)]
pub enum Room {
    /// Outer headers: IP of the family, with UDP or not.
    Tunnel { ipv6: bool, udp: bool },
    /// The IP and ICMP headers of an error quoting what follows them.
    IcmpError,
}

pub trait Hook: EbpfContext {
    /// Leave the packet to the stack.
    const PASS: u32;
    /// Drop the packet.
    const DROP: u32;

    /// The directly readable headers.
    fn packet(&self) -> Packet;

    /// Parses the packet into `out` (`lb_common::parse::parse_into`). Each hook decides
    /// whether the parser is inlined into the entry point: its 64 bytes of stack count
    /// under the forwarding functions' frames (the verifier allows a call chain 512 bytes),
    /// and a call costs every packet a call, a return and the spills around them.
    fn parse(&self, out: &mut Parsed) -> Result<(), Skip>;

    fn ingress_ifindex(&self) -> u32;

    /// Bytes the packet carries on the wire, all its GSO segments together.
    fn wire_len(&self) -> u64;

    /// The packet belongs to a VLAN whose tag the hook keeps outside the bytes (TC: the
    /// socket buffer's tag field): only the stack knows how the egress wants it.
    fn vlan_tagged(&self) -> bool;

    /// `tot_len` for `bpf_fib_lookup`'s MTU check (0: let the kernel check the packet
    /// itself, which knows a GSO packet leaves as segments).
    fn fib_tot_len(&self, p: &Parsed) -> u16;

    /// Makes the first `len` bytes (or the whole packet, if shorter) directly readable. The
    /// entry point makes the headers of a TCP/UDP packet readable; an ICMP error needs the
    /// headers it quotes too.
    fn make_readable(&self, len: u32);

    /// Adds `delta`, a change to bytes of an IPv4 header already written, to its checksum at
    /// `offset`. `None`: the packet cannot be changed there.
    fn update_ipv4_checksum(&self, offset: usize, delta: CsumDelta) -> Option<()>;

    /// Adds `delta` to the ICMP or ICMPv6 checksum at `offset`: a change to bytes of the
    /// message already written, or with `ipv6_pseudo_header` a change to the IPv6 addresses
    /// the ICMPv6 checksum covers through its pseudo-header.
    fn update_icmp_checksum(
        &self,
        offset: usize,
        delta: CsumDelta,
        ipv6_pseudo_header: bool,
    ) -> Option<()>;

    /// The length that must fit a route's MTU with a tunnel in front (from the IP header
    /// on); `None` when the kernel fits the packet itself (a GSO buffer, whose segments it
    /// cuts to size when the tunnel is added).
    fn length_to_fit(&self, p: &Parsed) -> Option<u32>;

    /// Inserts `len` bytes between the Ethernet header (kept, `ETH_HLEN` bytes) and the IP
    /// header, for `room`. Views of the packet taken before are stale afterwards.
    fn open_room(&self, len: u16, room: Room) -> Option<()>;

    /// Cuts the packet to its first `len` bytes (shorter packets are left alone). Views of
    /// the packet taken before are stale afterwards.
    fn truncate(&self, len: u32) -> Option<()>;

    /// The verdict that sends the packet out of `ifindex` (the ingress interface: back where
    /// it came from), settled before the packet is changed; `None` when this hook cannot.
    fn send_out(&self, ifindex: u32) -> Option<u32>;

    /// Applies `t` and hands the packet on: out of an interface when the next hop is known
    /// (`cache` is where it is kept for the flow), through the stack otherwise.
    fn emit(&self, p: &Parsed, t: &Translation, cache: HopCache) -> u32;
}
