//! Bounds-checked access to the frame. Every read and write compares against `data_end`,
//! which is what lets the verifier accept the offsets the parser computed.
//!
//! The same view serves both hooks: an XDP frame, and the linear head of a socket buffer at
//! the TC hook (the TC program pulls the headers into the head before parsing).

use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    programs::{TcContext, XdpContext},
};
use lb_common::{NextHop, parse::PacketBytes};

/// The directly accessible bytes of a packet, `[start, end)`, and its whole length (a
/// socket buffer's may run past `end`, in pages the parser never needs to read).
pub struct Packet {
    start: usize,
    end: usize,
    len: usize,
}

impl Packet {
    /// Volatile reads of `data`/`data_end`: otherwise LLVM may hoist the loads into the
    /// caller of a non-inlined function and pass them truncated to 32 bits, and the verifier
    /// refuses arithmetic on a truncated `data_end`.
    #[inline(always)]
    pub fn of_xdp(ctx: &XdpContext) -> Self {
        // SAFETY: ctx points at the kernel's xdp_md for this run.
        let (start, end) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*ctx.ctx).data) as usize,
                core::ptr::read_volatile(&raw const (*ctx.ctx).data_end) as usize,
            )
        };
        Self {
            start,
            end,
            len: end - start,
        }
    }

    /// The socket buffer's linear head. Helpers that may move the data (`bpf_skb_pull_data`,
    /// the checksum helpers) invalidate an earlier view: take a new one after calling them.
    ///
    /// Each field is one load instruction written out: the verifier only accepts context
    /// loads at a constant offset from the context pointer itself, and volatile reads let
    /// LLVM keep a field's address in a register across helper calls, while plain ones let
    /// it hoist the loads into a caller (as `of_xdp` says).
    #[inline(always)]
    pub fn of_skb(ctx: &TcContext) -> Self {
        let skb = ctx.as_ptr();
        let (start, end, len): (u64, u64, u64);
        // SAFETY: three 32-bit loads from the kernel's __sk_buff for this run, at the offsets
        // of `data`, `data_end` and `len` in its UAPI layout.
        unsafe {
            core::arch::asm!(
                "{start} = *(u32 *)({skb} + {data})",
                "{end} = *(u32 *)({skb} + {data_end})",
                "{len} = *(u32 *)({skb} + {skb_len})",
                skb = in(reg) skb,
                start = out(reg) start,
                end = out(reg) end,
                len = out(reg) len,
                data = const core::mem::offset_of!(__sk_buff, data),
                data_end = const core::mem::offset_of!(__sk_buff, data_end),
                skb_len = const core::mem::offset_of!(__sk_buff, len),
                options(readonly, nostack, preserves_flags),
            );
        }
        Self {
            start: start as usize,
            end: end as usize,
            len: len as usize,
        }
    }

    #[inline(always)]
    fn checked<const N: usize>(&self, offset: usize) -> Option<usize> {
        if self.start + offset + N > self.end {
            return None;
        }
        Some(self.start + offset)
    }

    #[inline(always)]
    pub fn write<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> Option<()> {
        let at = self.checked::<N>(offset)?;
        // SAFETY: `checked` proved [at, at + N) lies inside the frame; see `load` for the
        // width-matched stores.
        unsafe {
            match N {
                2 => core::ptr::write(at as *mut u16, core::mem::transmute_copy(&bytes)),
                4 => core::ptr::write(at as *mut u32, core::mem::transmute_copy(&bytes)),
                8 => core::ptr::write(at as *mut u64, core::mem::transmute_copy(&bytes)),
                16 => core::ptr::write(at as *mut [u64; 2], core::mem::transmute_copy(&bytes)),
                _ => core::ptr::write_unaligned(at as *mut [u8; N], bytes),
            }
        }
        Some(())
    }

    /// Points the frame's Ethernet header at `hop`: its destination and source MACs.
    #[inline(always)]
    pub fn write_macs(&self, hop: &NextHop) -> Option<()> {
        self.write_mac_words(hop.mac_words())
    }

    /// As `write_macs`, with the MACs as `NextHop::mac_words` gives them.
    #[inline(always)]
    pub fn write_mac_words(&self, [w0, w1, w2]: [u32; 3]) -> Option<()> {
        let at = self.checked::<12>(0)?;
        // SAFETY: `checked` proved [at, at + 12) lies inside the frame; 4-byte stores as in
        // `write`.
        unsafe {
            core::ptr::write(at as *mut u32, w0);
            core::ptr::write((at + 4) as *mut u32, w1);
            core::ptr::write((at + 8) as *mut u32, w2);
        }
        Some(())
    }

    /// A 16-bit field as the CPU loads it (native order: for checksums, whose arithmetic
    /// needs no byte order, and fields kept as stored, like `Parsed::sport_be`).
    #[inline(always)]
    pub fn read_u16_native(&self, offset: usize) -> Option<u16> {
        self.read::<2>(offset).map(u16::from_ne_bytes)
    }

    #[inline(always)]
    pub fn write_u16_native(&self, offset: usize, value: u16) -> Option<()> {
        self.write(offset, value.to_ne_bytes())
    }

    #[inline(always)]
    pub fn write_u32_native(&self, offset: usize, value: u32) -> Option<()> {
        self.write(offset, value.to_ne_bytes())
    }

    /// A 16-bit field in host order (the packet holds it big-endian).
    #[inline(always)]
    pub fn read_u16(&self, offset: usize) -> Option<u16> {
        self.read_u16_native(offset).map(u16::from_be)
    }

    #[inline(always)]
    pub fn write_u16(&self, offset: usize, value: u16) -> Option<()> {
        self.write_u16_native(offset, value.to_be())
    }
}

impl PacketBytes for Packet {
    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let at = self.checked::<N>(offset)?;
        // SAFETY: `checked` proved [at, at + N) lies inside the frame. Widths the eBPF ISA
        // has get one load of that width: the kernel accepts unaligned packet loads where it
        // JITs them efficiently (x86-64, arm64), while an unaligned-typed read would be
        // assembled from byte loads. `N` is a constant, so only one arm survives.
        Some(unsafe {
            match N {
                2 => core::mem::transmute_copy(&core::ptr::read(at as *const u16)),
                4 => core::mem::transmute_copy(&core::ptr::read(at as *const u32)),
                8 => core::mem::transmute_copy(&core::ptr::read(at as *const u64)),
                16 => core::mem::transmute_copy(&core::ptr::read(at as *const [u64; 2])),
                _ => core::ptr::read_unaligned(at as *const [u8; N]),
            }
        })
    }
}
