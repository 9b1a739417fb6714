//! The one definition of what crosses the kernel/user boundary in xlb, and the pure logic both
//! sides share: header parsing, checksum arithmetic, the flow hash and the Maglev table builder.
//!
//! Everything here is deterministic and free of I/O, so it is unit-tested on the host and used
//! unchanged by the XDP program (`lb-ebpf`) and the agent (`lb-userspace`).
#![cfg_attr(not(any(feature = "std", test)), no_std)]

pub mod abi;
pub mod addr;
pub mod csum;
pub mod encap;
pub mod flow_table;
pub mod hash;
pub mod icmp;
#[cfg(any(feature = "std", test))]
pub mod maglev;
pub mod parse;

pub use abi::*;
