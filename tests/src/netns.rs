//! A private network namespace per test, and the few netlink operations the golden tests need.
//!
//! `BPF_PROG_TEST_RUN` runs an XDP program as if the frame arrived on the loopback device of
//! the caller's network namespace, and `bpf_fib_lookup` consults that namespace's routes and
//! neighbours. Each test therefore runs on a thread of its own that has unshared its network
//! namespace: the routes it sees are exactly the ones it made, tests cannot disturb each other
//! or the host, and the namespace (with any interfaces in it) is gone when the thread ends.
//!
//! Interfaces are made over netlink (`rtnetlink`), not by running `ip`.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    sync::mpsc,
    thread,
    time::Duration,
};

use futures_util::TryStreamExt as _;
use nix::sched::{CloneFlags, unshare};
use rtnetlink::{
    Handle, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags},
        link::LinkAttribute,
        neighbour::NeighbourState,
    },
};

/// Netlink to the local kernel answers in microseconds; the bound turns a wedged socket into
/// a failed test instead of a hung one.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `f` on a new thread inside a new, empty network namespace (only a `lo`, down).
///
/// The namespace lives as long as the thread. A panic in `f` is re-raised here; a thread still
/// running after `limit` fails the test (it is left behind, to be ended with the process).
///
/// # Panics
/// `unshare` failing (not root), `f` panicking, or `limit` exceeded.
pub fn in_fresh_netns<T, F>(name: &str, limit: Duration, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let worker = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // Only this thread moves: the rest of the test binary stays where it was.
            unshare(CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET) failed: the golden tests must run as root");
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
        })
        .expect("spawning the test thread");
    match rx.recv_timeout(limit) {
        Ok(Ok(value)) => {
            worker.join().expect("the test thread ended cleanly");
            value
        }
        Ok(Err(panic)) => {
            let _ = worker.join();
            resume_unwind(panic)
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{name} did not finish within {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The thread died before reporting: unshare failed; join re-raises its panic.
            match worker.join() {
                Ok(()) => panic!("{name}: test thread ended without a result"),
                Err(panic) => resume_unwind(panic),
            }
        }
    }
}

/// Writes a sysctl of the calling thread's network namespace (`/proc/sys/net/...` resolves
/// against the namespace of the thread that opens it).
///
/// # Panics
/// The write failing.
pub fn set_net_sysctl(path: &str, value: &str) {
    let full = format!("/proc/sys/net/{path}");
    std::fs::write(&full, value).unwrap_or_else(|e| panic!("writing {value} to {full}: {e}"));
}

/// Reads a sysctl of the calling thread's network namespace.
///
/// # Panics
/// The read failing.
#[must_use]
pub fn net_sysctl(path: &str) -> String {
    let full = format!("/proc/sys/net/{path}");
    std::fs::read_to_string(&full)
        .unwrap_or_else(|e| panic!("reading {full}: {e}"))
        .trim()
        .to_owned()
}

/// A netlink session in the calling thread's network namespace.
///
/// Holds a current-thread tokio runtime; every call blocks on it, which is also what drives
/// the netlink connection. Create and use it on the namespace's thread only.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// # Panics
    /// The runtime or the socket cannot be created.
    #[must_use]
    pub fn open() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .expect("tokio runtime");
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().expect("netlink socket");
            tokio::spawn(conn);
            handle
        });
        Self { rt, handle }
    }

    fn run<T, Fut>(&self, what: &str, fut: Fut) -> T
    where
        Fut: Future<Output = Result<T, rtnetlink::Error>>,
    {
        self.rt.block_on(async {
            match tokio::time::timeout(NETLINK_TIMEOUT, fut).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => panic!("netlink: {what}: {e}"),
                Err(_) => panic!("netlink: {what}: no answer within {NETLINK_TIMEOUT:?}"),
            }
        })
    }

    /// Index and MAC address of `name`.
    ///
    /// # Panics
    /// No such link.
    #[must_use]
    pub fn link(&self, name: &str) -> (u32, [u8; 6]) {
        let handle = self.handle.clone();
        let msg = self.run(&format!("get link {name}"), async move {
            handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute()
                .try_next()
                .await
        });
        let msg = msg.unwrap_or_else(|| panic!("no link {name}"));
        let mac = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(a) => <[u8; 6]>::try_from(a.as_slice()).ok(),
                _ => None,
            })
            .unwrap_or([0; 6]);
        (msg.header.index, mac)
    }

    /// Creates a veth pair with fixed MAC addresses, both ends down.
    ///
    /// # Panics
    /// Netlink refusing (a name is taken).
    pub fn add_veth(&self, name: &str, mac: [u8; 6], peer: &str, peer_mac: [u8; 6]) {
        let handle = self.handle.clone();
        let msg = LinkVeth::new(name, peer).address(mac.to_vec()).build();
        self.run(&format!("add veth {name}/{peer}"), async move {
            handle.link().add(msg).execute().await
        });
        let (peer_index, _) = self.link(peer);
        let handle = self.handle.clone();
        let msg = LinkUnspec::new_with_index(peer_index)
            .address(peer_mac.to_vec())
            .build();
        self.run(&format!("set {peer} address"), async move {
            handle.link().set(msg).execute().await
        });
    }

    /// # Panics
    /// No such link, or netlink refusing.
    pub fn set_up(&self, name: &str) {
        let (index, _) = self.link(name);
        let handle = self.handle.clone();
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.run(&format!("set {name} up"), async move {
            handle.link().set(msg).execute().await
        });
    }

    /// Adds `addr/prefix_len` to `name` (IPv6 without duplicate address detection, so it is
    /// usable at once).
    ///
    /// # Panics
    /// No such link, or netlink refusing.
    pub fn add_address(&self, name: &str, addr: IpAddr, prefix_len: u8) {
        let (index, _) = self.link(name);
        let mut req = self.handle.address().add(index, addr, prefix_len);
        if addr.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.run(&format!("add {addr}/{prefix_len} to {name}"), req.execute());
    }

    /// A permanent neighbour entry: `addr` is at `mac` behind `name`, no resolution needed.
    /// Replaces an entry for `addr` that is there already.
    ///
    /// # Panics
    /// No such link, or netlink refusing.
    pub fn set_permanent_neighbour(&self, name: &str, addr: IpAddr, mac: [u8; 6]) {
        let (index, _) = self.link(name);
        let req = self
            .handle
            .neighbours()
            .add(index, addr)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace();
        self.run(&format!("add neighbour {addr} on {name}"), req.execute());
    }

    /// A route to `dst/prefix_len` out of `name`, through `via` if given (else on-link).
    ///
    /// # Panics
    /// Mixed families, no such link, or netlink refusing.
    pub fn add_route(&self, dst: IpAddr, prefix_len: u8, name: &str, via: Option<IpAddr>) {
        let (index, _) = self.link(name);
        let msg = match (dst, via) {
            (IpAddr::V4(d), None) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, prefix_len)
                .output_interface(index)
                .build(),
            (IpAddr::V4(d), Some(IpAddr::V4(g))) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, prefix_len)
                .output_interface(index)
                .gateway(g)
                .build(),
            (IpAddr::V6(d), None) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, prefix_len)
                .output_interface(index)
                .build(),
            (IpAddr::V6(d), Some(IpAddr::V6(g))) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, prefix_len)
                .output_interface(index)
                .gateway(g)
                .build(),
            _ => panic!("route to {dst} via {via:?} mixes families"),
        };
        let handle = self.handle.clone();
        self.run(
            &format!("add route {dst}/{prefix_len} dev {name} via {via:?}"),
            async move { handle.route().add(msg).execute().await },
        );
    }
}
