//! GRO and TX checksum offload through the legacy `SIOCETHTOOL` ioctl.
//!
//! The `ethtool` crate (0.3) can read features over the ethtool netlink family
//! but not set them, and `ETHTOOL_SGRO` is a stable kernel ABI that maps onto
//! the same `NETIF_F_GRO` feature bit, so a 20-line ioctl beats a hand-rolled
//! genetlink client.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::{Error, Netns};

// include/uapi/linux/ethtool.h
const ETHTOOL_GGRO: u32 = 0x0000_002b;
const ETHTOOL_SGRO: u32 = 0x0000_002c;
const ETHTOOL_STXCSUM: u32 = 0x0000_0017;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

impl Netns {
    /// Turns GRO on or off for `ifname`.
    ///
    /// Why it matters here: a frame that XDP redirects (or `XDP_TX`s) into a
    /// veth is queued on the *peer's* NAPI ring, which exists only while the
    /// peer has an XDP program or GRO on; otherwise the kernel drops the frame
    /// and counts it nowhere obvious. Turning GRO on is the cheap way to give
    /// the receiving end that ring.
    ///
    /// # Errors
    /// No such link, the name is longer than 15 bytes, or the driver refused.
    pub fn set_gro(&self, ifname: &str, on: bool) -> Result<(), Error> {
        self.ethtool(ifname, "ETHTOOL_SGRO", ETHTOOL_SGRO, u32::from(on))
            .map(drop)
    }

    /// Turns TX checksum offload on or off for `ifname`.
    ///
    /// Why it matters here: a local socket sending through a veth with TX
    /// checksum offload leaves only the pseudo-header sum in the L4 checksum
    /// field (`CHECKSUM_PARTIAL`), to be finished "by the hardware". XDP on
    /// the receiving end sees that unfinished value, and after a NAT rewrite
    /// and a redirect nobody finishes it: the receiver drops the segment as
    /// corrupt. Frames from a real NIC carry complete checksums, so test
    /// hosts that stand in for remote clients and servers turn this off.
    ///
    /// # Errors
    /// As for [`Netns::set_gro`].
    pub fn set_tx_checksum(&self, ifname: &str, on: bool) -> Result<(), Error> {
        self.ethtool(ifname, "ETHTOOL_STXCSUM", ETHTOOL_STXCSUM, u32::from(on))
            .map(drop)
    }

    /// Whether GRO is on for `ifname`, so tests can check the precondition
    /// described at [`Netns::set_gro`].
    ///
    /// # Errors
    /// As for [`Netns::set_gro`].
    pub fn gro(&self, ifname: &str) -> Result<bool, Error> {
        self.ethtool(ifname, "ETHTOOL_GGRO", ETHTOOL_GGRO, 0)
            .map(|v| v != 0)
    }

    fn ethtool(&self, ifname: &str, op: &'static str, cmd: u32, data: u32) -> Result<u32, Error> {
        self.run(|| ethtool_value(ifname, cmd, data))?
            .map_err(|source| Error::Ethtool {
                op,
                ifname: ifname.to_owned(),
                ns: self.name().to_owned(),
                source,
            })
    }
}

/// Must run on a thread inside the namespace: the ioctl acts on the
/// namespace of the socket it is issued on.
fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> io::Result<u32> {
    // SAFETY: plain zeroed C struct; every field is an integer, array or
    // pointer for which all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= ifr.ifr_name.len() || name.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = src as libc::c_char;
    }
    let mut value = EthtoolValue { cmd, data };
    ifr.ifr_ifru.ifru_data = (&raw mut value).cast();

    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `ifr` is a valid ifreq whose data pointer refers to `value`,
    // which outlives the call; SIOCETHTOOL reads and writes only those.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut ifr) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}
