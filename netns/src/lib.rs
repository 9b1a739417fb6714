//! Network-namespace topologies for xlb's integration tests, demo and benchmarks.
//!
//! XDP behaviour depends on real kernel plumbing (veth NAPI, redirect, neighbour
//! resolution), so tests need real interfaces; namespaces give each test its own
//! private copy of that plumbing, so tests can run in parallel and leave nothing
//! behind on the host.
//!
//! Everything is done through netlink ([`rtnetlink`]), `setns(2)` and `/proc/sys`
//! rather than by running `ip`: a missing or different `iproute2` cannot change
//! what a test sets up, and failures come back as typed errors instead of
//! parsed stderr.
//!
//! The public API is synchronous. Each netlink call runs on a short-lived thread
//! that has entered the target namespace, with its own current-thread tokio
//! runtime, because `setns(2)` only moves the calling thread and a netlink socket
//! talks to the namespace it was opened in.
//!
//! Everything here needs root (`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`).
//!
//! Code that must act on a namespace's interfaces (attaching XDP by name,
//! binding sockets, `if_nametoindex`) has to run inside it, via
//! [`Netns::run`] or [`Netns::spawn`]:
//!
//! ```no_run
//! use std::net::{SocketAddr, TcpStream};
//! use std::time::Duration;
//!
//! let topo = xlb_netns::Topology::new(2)?;
//! let lb_if = &topo.client_link.a; // attach XDP here, inside topo.lb().run(..)
//! println!("LB faces the client on {} (ifindex {})", lb_if.ifname, lb_if.ifindex);
//! let backend = SocketAddr::new(topo.backend_links[0].b.ip4().into(), 80);
//! let _conn = topo
//!     .client()
//!     .run(|| TcpStream::connect_timeout(&backend, Duration::from_secs(3)))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Code that acts on the calling thread's own namespace rather than a named one
//! (`BPF_PROG_TEST_RUN`, which feeds frames in through the caller's `lo`, and
//! `bpf_fib_lookup` behind it) runs on a thread of its own in a namespace of
//! its own, via [`in_fresh_netns`], which hands it the same [`Netns`] API.

mod error;
mod ethtool;
mod fresh;
mod link;
mod ns;
mod scale_out;
mod topology;

pub use ipnet;

pub use crate::{
    error::Error,
    fresh::in_fresh_netns,
    link::{LinkInfo, LinkStats},
    ns::{Netns, cleanup_stale},
    scale_out::ScaleOutTopology,
    topology::{DsrTopology, Endpoint, Network, NsId, Topology, Veth},
};
