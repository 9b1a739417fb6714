//! Turning off TX checksum offload on the veths whose traffic XDP rewrites.
//!
//! A socket sending through a veth with TX checksum offload leaves only the pseudo-header sum
//! in the TCP checksum field (`CHECKSUM_PARTIAL`); the peer's stack would normally never
//! check it. XDP on the LB sees that partial sum, updates it incrementally for the NAT, and
//! redirects the frame as raw bytes, which drops the "checksum still to be done" mark: the
//! receiver then finds a wrong checksum and discards the segment (`TcpInCsumErrors`). Real
//! NICs fill in the checksum before the wire, so only a veth lab needs this: the client and
//! the containers compute full checksums in software.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result};
use xlb_netns::Netns;

// include/uapi/linux/ethtool.h
const ETHTOOL_STXCSUM: u32 = 0x0000_0017;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `ethtool -K IFNAME tx off` inside `ns`.
pub fn disable_tx_checksum(ns: &Netns, ifname: &str) -> Result<()> {
    ns.run(|| ethtool_set(ifname, ETHTOOL_STXCSUM, 0))?
        .with_context(|| {
            format!(
                "turning off TX checksum offload on {ifname} in {}",
                ns.name()
            )
        })
}

/// Must run on a thread inside the namespace: the ioctl acts on the socket's namespace.
fn ethtool_set(ifname: &str, cmd: u32, data: u32) -> io::Result<()> {
    // SAFETY: a plain C struct of integers, arrays and a pointer; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= ifr.ifr_name.len() || name.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = src.cast_signed();
    }
    let mut value = EthtoolValue { cmd, data };
    ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `ifr` is a valid ifreq whose data pointer refers to `value`, which outlives
    // the call; SIOCETHTOOL reads and writes only those.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut ifr) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
