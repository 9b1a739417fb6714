//! A read-only `mmap` of a `BPF_F_MMAPABLE` array map: every element readable without a
//! `bpf(2)` call each. `XLB_FLOWS4` holds 131 072 sets at the default size, and reading them
//! one lookup at a time made a flow listing take about 45 ms.

use std::{
    io,
    marker::PhantomData,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
};

/// The first `len` elements of an mmapable array map of `T`, mapped read-only. The data path
/// writes them while they are read: an element is copied out with one volatile read, and
/// may be torn by a concurrent write, as a lookup through the syscall may be.
pub struct MappedArray<T> {
    base: NonNull<T>,
    len: usize,
    bytes: usize,
    _values: PhantomData<T>,
}

impl<T: aya::Pod> MappedArray<T> {
    /// Maps the first `len` elements of the array behind `map` (whose values must be `T`).
    ///
    /// # Errors
    /// The kernel refusing the mapping: a map without `BPF_F_MMAPABLE`, or `len` beyond its
    /// size.
    pub fn new(map: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        // The kernel lays an array's values out 8-aligned, one after the other.
        assert!(
            size_of::<T>().is_multiple_of(8) && align_of::<T>() <= 8,
            "array values are laid out at a stride of their size rounded up to 8"
        );
        let bytes = (len * size_of::<T>()).max(1);
        // SAFETY: a fresh read-only shared mapping of the map's value area; the kernel
        // checks the fd, the length and the protection.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast::<T>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            base,
            len,
            bytes,
            _values: PhantomData,
        })
    }

    /// A copy of element `index`.
    #[must_use]
    pub fn get(&self, index: usize) -> Option<T> {
        (index < self.len).then(|| {
            // SAFETY: `index` is inside the mapping, which is page-aligned and holds
            // `T`s at their size's stride (asserted in `new`); `T: Pod` takes any bits.
            unsafe { self.base.as_ptr().add(index).read_volatile() }
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        (0..self.len).filter_map(|i| self.get(i))
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
