use std::{io, path::PathBuf, time::Duration};

/// Every failure names the namespace or path involved, because with several
/// topologies alive at once "permission denied" alone does not say which one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid name {name:?}: use 1-{max} ASCII letters, digits, '-' or '_' ({why})")]
    InvalidName {
        name: String,
        max: usize,
        why: &'static str,
    },

    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{op} (namespace {ns})")]
    Sys {
        op: &'static str,
        ns: String,
        #[source]
        source: nix::Error,
    },

    #[error("no free namespace name for prefix {prefix:?} after {attempts} attempts")]
    NameExhausted { prefix: String, attempts: u32 },

    #[error("could not start a thread for namespace {ns}")]
    Thread {
        ns: String,
        #[source]
        source: io::Error,
    },

    #[error("netlink: {op} (namespace {ns})")]
    Netlink {
        op: String,
        ns: String,
        #[source]
        source: rtnetlink::Error,
    },

    #[error("{op} (namespace {ns})")]
    Runtime {
        op: &'static str,
        ns: String,
        #[source]
        source: io::Error,
    },

    #[error("netlink: {op} (namespace {ns}) did not answer within {secs} s")]
    NetlinkTimeout { op: String, ns: String, secs: u64 },

    #[error("link {ifname:?} not found in namespace {ns}")]
    LinkNotFound { ifname: String, ns: String },

    #[error("link {ifname:?} in namespace {ns} has no Ethernet address")]
    NoMac { ifname: String, ns: String },

    #[error("{what}: address family mismatch ({detail})")]
    FamilyMismatch { what: &'static str, detail: String },

    #[error("ethtool {op} on {ifname:?} (namespace {ns})")]
    Ethtool {
        op: &'static str,
        ifname: String,
        ns: String,
        #[source]
        source: io::Error,
    },

    #[error("subnet {subnet} is too small for two hosts")]
    SubnetTooSmall { subnet: ipnet::IpNet },

    #[error("namespace thread {ns} did not finish within {limit:?}")]
    TimedOut { ns: String, limit: Duration },

    #[error("{n} {what} requested, at most {max} supported")]
    TooMany {
        what: &'static str,
        n: usize,
        max: usize,
    },
}
