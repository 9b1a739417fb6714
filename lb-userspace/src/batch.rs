//! Many entries of a `u32 -> u32` BPF array in one `BPF_MAP_UPDATE_BATCH` call. aya 0.16 has
//! no batch API, and a Maglev ring (65 537 slots) written one `bpf(2)` call per slot costs
//! tens of milliseconds: the first backend of a VIP writes every slot.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `values[i]` at `keys[i]`, for every `i`, into the array map `map`.
///
/// # Errors
/// The kernel refusing the batch (`EINVAL`/`ENOTSUPP` on kernels without batch updates for
/// arrays, before 5.6), or a key out of range. On error the first `done` entries were written
/// (the caller may write the rest one by one).
pub fn update_u32_array(
    map: BorrowedFd<'_>,
    keys: &[u32],
    values: &[u32],
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut done = 0usize;
    while done < keys.len() {
        let count = u32::try_from(keys.len() - done).unwrap_or(u32::MAX);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; `keys` and `values`
        // outlive the call and hold `count` elements each of the map's key and value size.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        if ret < 0 {
            return Err(BatchError {
                done: done + attr.count as usize,
                source: io::Error::last_os_error(),
            });
        }
        // The kernel reports how many it wrote; it may stop early only on error.
        done += (attr.count as usize).max(1);
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("BPF_MAP_UPDATE_BATCH failed after {done} entries")]
pub struct BatchError {
    /// Entries written before the failure.
    pub done: usize,
    #[source]
    pub source: io::Error,
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use super::*;

    /// A fresh `u32 -> u32` array map (root needed).
    fn array_map(entries: u32) -> OwnedFd {
        #[repr(C)]
        #[derive(Default)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let mut attr = CreateAttr {
            map_type: 2, // BPF_MAP_TYPE_ARRAY
            key_size: 4,
            value_size: 4,
            max_entries: entries,
            ..CreateAttr::default()
        };
        // SAFETY: a valid BPF_MAP_CREATE attribute prefix of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0,
                &raw mut attr,
                size_of::<CreateAttr>() as libc::c_uint,
            )
        };
        assert!(
            fd >= 0,
            "creating a BPF array needs root: {}",
            io::Error::last_os_error()
        );
        // SAFETY: the kernel just handed us this descriptor.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    /// One `BPF_MAP_LOOKUP_ELEM` (1) or `BPF_MAP_UPDATE_ELEM` (2) on a `u32 -> u32` array.
    fn elem(map: BorrowedFd<'_>, cmd: libc::c_long, key: u32, value: &mut u32) {
        #[repr(C)]
        struct ElemAttr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let mut attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: (&raw const key) as u64,
            value: (&raw mut *value) as u64,
            flags: 0,
        };
        // SAFETY: a single-element command with pointers to a live key and value.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &raw mut attr,
                size_of::<ElemAttr>() as libc::c_uint,
            )
        };
        assert_eq!(ret, 0, "bpf command {cmd}: {}", io::Error::last_os_error());
    }

    fn read(map: BorrowedFd<'_>, key: u32) -> u32 {
        let mut value = 0;
        elem(map, 1, key, &mut value);
        value
    }

    fn write_one(map: BorrowedFd<'_>, key: u32, mut value: u32) {
        elem(map, 2, key, &mut value);
    }

    /// A whole Maglev ring and then a sparse change of it, written both ways into two maps:
    /// they must read back the same, slot for slot.
    #[test]
    fn batch_writes_the_same_ring_as_one_by_one() {
        const RING: u32 = 65_537;
        let base = RING; // the second half of a VIP's double buffer
        let (batched, single) = (array_map(2 * RING), array_map(2 * RING));
        let members: Vec<_> = (1..=7)
            .map(|id| lb_common::maglev::MaglevBackend::new(id, [id as u8; 16], 80, id))
            .collect();
        let first = lb_common::maglev::build_ring(&members, RING).unwrap();
        let second = lb_common::maglev::build_ring(&members[1..], RING).unwrap();
        for ring in [&first, &second] {
            let changed: Vec<(u32, u32)> = (0..RING)
                .map(|slot| (base + slot, ring[slot as usize]))
                .filter(|(key, value)| read(single.as_fd(), *key) != *value)
                .collect();
            let (keys, values): (Vec<u32>, Vec<u32>) = changed.iter().copied().unzip();
            update_u32_array(batched.as_fd(), &keys, &values).unwrap();
            for (key, value) in changed {
                write_one(single.as_fd(), key, value);
            }
            for key in 0..2 * RING {
                assert_eq!(
                    read(batched.as_fd(), key),
                    read(single.as_fd(), key),
                    "slot {key}"
                );
            }
            for slot in 0..RING {
                assert_eq!(read(batched.as_fd(), base + slot), ring[slot as usize]);
            }
        }
    }
}
