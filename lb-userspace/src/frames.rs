//! Frames for test runs of the loaded program (`Datapath::test_run`): Ethernet + IPv4 +
//! TCP/UDP with valid checksums (checksums from `lb_common::csum`; the golden tests check the
//! program's output with an independent library, the benchmarks and the map-filling tests only
//! need well-formed input). Here rather than in `xlb-bench`: the integration tests of this
//! crate build with them too, and they pull in nothing.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::csum::{checksum, pseudo_header_sum};

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + 20 + l4.len());
    frame.extend_from_slice(&DST_MAC);
    frame.extend_from_slice(&SRC_MAC);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(0, &ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(l4);
    frame
}

/// A 54-byte TCP segment without payload (as in Katran's published measurement).
#[must_use]
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&src.port().to_be_bytes());
    t[2..4].copy_from_slice(&dst.port().to_be_bytes());
    t[4..8].copy_from_slice(&1u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let sum = pseudo_header_sum(&src.ip().octets(), &dst.ip().octets(), 6, 20);
    let c = checksum(sum, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4(*src.ip(), *dst.ip(), 6, &t)
}

/// A UDP datagram with `payload` bytes; `with_checksum: false` leaves the checksum 0.
#[must_use]
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: usize, with_checksum: bool) -> Vec<u8> {
    let mut u = vec![0u8; 8 + payload];
    u[0..2].copy_from_slice(&src.port().to_be_bytes());
    u[2..4].copy_from_slice(&dst.port().to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    if with_checksum {
        let sum = pseudo_header_sum(&src.ip().octets(), &dst.ip().octets(), 17, u.len() as u32);
        let c = match checksum(sum, &u) {
            0 => 0xffff,
            c => c,
        };
        u[6..8].copy_from_slice(&c.to_be_bytes());
    }
    ipv4(*src.ip(), *dst.ip(), 17, &u)
}

/// The destination of an IPv4 frame built here (after the program rewrote it).
#[must_use]
pub fn destination(frame: &[u8]) -> Option<SocketAddrV4> {
    let ip: [u8; 4] = frame.get(30..34)?.try_into().ok()?;
    let port: [u8; 2] = frame.get(36..38)?.try_into().ok()?;
    Some(SocketAddrV4::new(ip.into(), u16::from_be_bytes(port)))
}

/// Whether the IPv4 header and L4 checksums of a frame built here verify.
#[must_use]
pub fn checksums_valid(frame: &[u8]) -> bool {
    if frame.len() < 34 {
        return false;
    }
    let ip = &frame[14..34];
    if checksum(0, ip) != 0 {
        return false;
    }
    let l4 = &frame[34..];
    if ip[9] == 17 && l4.get(6..8) == Some(&[0, 0]) {
        return true;
    }
    let sum = pseudo_header_sum(&ip[12..16], &ip[16..20], ip[9], l4.len() as u32);
    checksum(sum, l4) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_valid_checksums() {
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 1000);
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 80);
        assert!(checksums_valid(&tcp(a, b, TCP_SYN)));
        assert!(checksums_valid(&udp(a, b, 18, true)));
        assert_eq!(tcp(a, b, TCP_ACK).len(), 54);
        assert_eq!(destination(&udp(a, b, 0, false)), Some(b));
        let mut broken = tcp(a, b, TCP_ACK);
        broken[40] ^= 1;
        assert!(!checksums_valid(&broken));
    }
}
