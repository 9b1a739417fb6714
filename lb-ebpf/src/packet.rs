//! Bounds-checked access to the frame. Every read and write compares against `data_end`,
//! which is what lets the verifier accept the offsets the parser computed.

use aya_ebpf::programs::XdpContext;
use lb_common::parse::PacketBytes;

pub struct XdpPacket {
    start: usize,
    end: usize,
}

impl XdpPacket {
    /// Volatile reads of `data`/`data_end`: otherwise LLVM may hoist the loads into the
    /// caller of a non-inlined function and pass them truncated to 32 bits, and the verifier
    /// refuses arithmetic on a truncated `data_end`.
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        // SAFETY: ctx points at the kernel's xdp_md for this run.
        unsafe {
            Self {
                start: core::ptr::read_volatile(&raw const (*ctx.ctx).data) as usize,
                end: core::ptr::read_volatile(&raw const (*ctx.ctx).data_end) as usize,
            }
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

    #[inline(always)]
    pub fn read_u16(&self, offset: usize) -> Option<u16> {
        self.read::<2>(offset).map(u16::from_be_bytes)
    }

    #[inline(always)]
    pub fn write_u16(&self, offset: usize, value: u16) -> Option<()> {
        self.write(offset, value.to_be_bytes())
    }
}

impl PacketBytes for XdpPacket {
    #[inline(always)]
    fn len(&self) -> usize {
        self.end - self.start
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
