//! Many entries of a `u32 -> u32` BPF array in one `BPF_MAP_UPDATE_BATCH` or
//! `BPF_MAP_LOOKUP_BATCH` call. aya 0.16 has no batch API, and a Maglev ring (65 537 slots)
//! written or read one `bpf(2)` call per slot costs tens of milliseconds: the first backend of
//! a VIP writes every slot, and a restart reads every VIP's live ring back.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
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

/// The `count` entries of the array map `map` from key `first` on, in key order.
///
/// # Errors
/// The kernel refusing the batch (kernels before 5.6), or the range running past the map's
/// end. The caller may read one by one instead.
pub fn lookup_u32_array(
    map: BorrowedFd<'_>,
    first: u32,
    count: usize,
) -> Result<Vec<u32>, BatchError> {
    let mut keys = vec![0u32; count];
    let mut values = vec![0u32; count];
    let mut done = 0usize;
    // An array batch starts after the key `in_batch` points at (none: at key 0) and leaves
    // the last key it read in `out_batch`.
    let mut cursor = first.wrapping_sub(1);
    while done < count {
        let mut last = 0u32;
        let mut attr = BatchAttr {
            in_batch: if done == 0 && first == 0 {
                0
            } else {
                (&raw const cursor) as u64
            },
            out_batch: (&raw mut last) as u64,
            keys: keys[done..].as_mut_ptr() as u64,
            values: values[done..].as_mut_ptr() as u64,
            count: u32::try_from(count - done).unwrap_or(u32::MAX),
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: as in `update_u32_array`; the kernel writes at most `count` keys and values
        // into buffers that hold that many, and one key into `last`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        let got = attr.count as usize;
        // ENOENT: the map ended, with `got` entries read in this call.
        if ret < 0 && (io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT) || got == 0)
        {
            return Err(BatchError {
                done,
                source: io::Error::last_os_error(),
            });
        }
        if got == 0 {
            break;
        }
        done += got;
        cursor = last;
    }
    let expected = (0..count as u32).map(|i| first.wrapping_add(i));
    if done != count || !keys.iter().copied().eq(expected) {
        return Err(BatchError {
            done,
            source: io::Error::new(io::ErrorKind::InvalidData, "keys out of sequence"),
        });
    }
    Ok(values)
}

#[derive(Debug, thiserror::Error)]
#[error("a BPF batch operation failed after {done} entries")]
pub struct BatchError {
    /// Entries written (or read) before the failure.
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

    /// A ring read back in one batch is the ring read slot by slot, from either half.
    #[test]
    fn batch_reads_what_one_by_one_reads() {
        const RING: u32 = 1009;
        let map = array_map(2 * RING);
        for key in 0..2 * RING {
            write_one(map.as_fd(), key, key.wrapping_mul(2_654_435_761));
        }
        for first in [0, RING] {
            let batch = lookup_u32_array(map.as_fd(), first, RING as usize).unwrap();
            let single: Vec<u32> = (first..first + RING)
                .map(|k| read(map.as_fd(), k))
                .collect();
            assert_eq!(batch, single, "ring at {first}");
        }
        assert!(
            lookup_u32_array(map.as_fd(), RING + 1, RING as usize).is_err(),
            "a range past the map's end is refused"
        );
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
