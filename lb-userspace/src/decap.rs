//! The backend side of direct server return (`xlb backend prepare`): a balancer sends a
//! client's packet to a backend inside an IPIP, IPv6-in-IPv6 or GUE tunnel; the backend
//! takes the tunnel off (xlb's own `xlb_decap` TC program, since many hosts have no
//! `ipip`/`ip6_tnl`/`fou` devices), holds the VIP on `lo` so its service accepts the packet,
//! and answers from the VIP straight to the client.
//!
//! Everything happens in one network namespace: this process's, or another one (a
//! container's) entered by a thread of its own (`setns` moves only the calling thread, and
//! netlink sockets, BPF attachments by interface index and `/proc/sys/net` all follow the
//! thread's namespace).
//!
//! **The attachment is a netlink `cls_bpf` filter** at the interface's `clsact` ingress, in
//! direct-action mode, priority [`FILTER_PRIORITY`], handle [`FILTER_HANDLE`]. It belongs to
//! the interface: it outlives this command without any pin, goes away with the interface or
//! the container's namespace (a pinned tcx link would leave a pin on the host's bpffs
//! behind, in a mount namespace the container does not share), and `tc filter show dev IF
//! ingress` shows it. A second `prepare` swaps the program in place (the same priority and
//! handle), never adding a second filter.
//!
//! What `prepare` changed that was not there before (VIP addresses, sysctl values, a
//! `clsact` qdisc) is recorded in a small JSON file under `/run/xlb` (per namespace), so
//! `unprepare` removes exactly that and leaves what the operator had.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Map, MapData, PerCpuArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, loaded_programs,
        tc::{self, NlOptions, SchedClassifierLink, TcAttach, TcError, TcHandle},
    },
};
use futures_util::TryStreamExt as _;
use lb_common::decap;
use nix::sched::{CloneFlags, setns};
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressFlags, AddressMessage},
    link::LinkAttribute,
    route::{RouteAttribute, RouteMessage},
    tc::{TcAttribute, TcFilterBpfOption, TcMessage, TcOption},
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The compiled decapsulation object, built by build.rs from `lb-ebpf/src/decap.rs`.
pub static XLB_DECAP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-decap"));

/// The filter's priority at clsact ingress: 1 runs it before filters at the kernel's
/// default priorities, so they see the client's packet rather than the tunnel.
pub const FILTER_PRIORITY: u16 = 1;
/// The filter's handle ("xl"), which tells xlb's filter apart from others at that priority.
pub const FILTER_HANDLE: u32 = 0x786c;

#[derive(Debug, Error)]
pub enum DecapError {
    #[error("opening the network namespace {path}")]
    OpenNamespace {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entering the network namespace {path} (setns)")]
    EnterNamespace {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("the helper thread for the network namespace panicked")]
    Panicked,
    #[error("no interface named '{0}' in {1}")]
    NoSuchInterface(String, String),
    #[error(
        "'{0}' is the loopback interface: tunnelled packets arrive on the interfaces that face the balancer"
    )]
    Loopback(String),
    #[error(
        "no interface in {0} has a default route: name the ones the balancer's packets arrive on with --interface"
    )]
    NoDefaultRoute(String),
    #[error("{0} is not an address a VIP can have (unspecified, loopback or multicast)")]
    BadVip(IpAddr),
    #[error("give at least one --vip")]
    NoVip,
    #[error("the GUE port cannot be 0")]
    ZeroGuePort,
    #[error("loading the xlb-decap object into the kernel failed (are you root?)")]
    Load(#[source] aya::EbpfError),
    #[error("the xlb-decap object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the kernel refused the {name} program")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {program} at tc ingress of {iface}")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("{what} on {iface}")]
    Tc {
        what: &'static str,
        iface: String,
        #[source]
        source: TcError,
    },
    #[error(
        "{iface}: tc ingress priority {FILTER_PRIORITY} handle {FILTER_HANDLE:#x} holds a filter that is not xlb's ({name}); remove it (`tc filter del dev {iface} ingress pref {FILTER_PRIORITY}`) first"
    )]
    ForeignFilter { iface: String, name: String },
    #[error("{what} over netlink")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("opening a netlink socket")]
    NetlinkOpen(#[source] std::io::Error),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not hold a number")]
    NotANumber { path: String },
    #[error("the record {path} of what prepare changed is unreadable")]
    Record {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("reading the decapsulation counters (map id {id})")]
    Counters {
        id: u32,
        #[source]
        source: aya::maps::MapError,
    },
}

type Result<T, E = DecapError> = std::result::Result<T, E>;

/// The network namespace to work in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// This process's.
    Current,
    /// The one at this path: `/run/netns/NAME`, `/proc/PID/ns/net`.
    Netns(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Current => f.write_str("this network namespace"),
            Self::Netns(path) => write!(f, "the network namespace {}", path.display()),
        }
    }
}

/// What `prepare` is asked to set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareSpec {
    /// The VIPs this backend serves by direct server return; each goes on `lo`.
    pub vips: Vec<IpAddr>,
    /// Where the balancer's packets arrive; empty: every interface with a default route.
    pub interfaces: Vec<String>,
    /// The UDP port GUE packets come to (the balancer's `--gue-port`).
    pub gue_port: u16,
}

/// One line of `prepare --check`: something in place, or missing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckItem {
    pub ok: bool,
    pub what: String,
}

/// `prepare --check`'s answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub items: Vec<CheckItem>,
    /// `lb_common::decap::COUNTERS` names and their sums over the filters' programs.
    pub counters: Vec<(String, u64)>,
}

impl CheckReport {
    #[must_use]
    pub fn complete(&self) -> bool {
        self.items.iter().all(|i| i.ok)
    }

    fn ok(&mut self, what: String) {
        self.items.push(CheckItem { ok: true, what });
    }

    fn missing(&mut self, what: String) {
        self.items.push(CheckItem { ok: false, what });
    }
}

/// What `prepare` changed, kept until `unprepare` undoes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// VIPs that were not on `lo` before.
    vips_added: BTreeSet<IpAddr>,
    /// Interfaces that had no `clsact` qdisc before.
    clsact_added: BTreeSet<String>,
    /// Sysctl (path under `/proc/sys`) → the value it had before and the one set.
    sysctls: BTreeMap<String, SysctlChange>,
    gue_port: u16,
    /// The namespace's `SO_NETNS_COOKIE`.
    netns_cookie: Option<u64>,
}

impl Record {
    fn changed_anything(&self) -> bool {
        !(self.vips_added.is_empty() && self.clsact_added.is_empty() && self.sysctls.is_empty())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SysctlChange {
    was: i64,
    set: i64,
}

/// A per-interface IPv4 setting DSR needs, and the rule the kernel applies to it: each of
/// these three takes the larger of `all` and the interface's own value.
struct Setting {
    name: &'static str,
    fine: fn(i64) -> bool,
    want: i64,
    why: &'static str,
}

const SETTINGS: [Setting; 3] = [
    Setting {
        name: "rp_filter",
        // 1 is strict: a decapsulated packet's source (the client) must be routed out of
        // the interface it came in on. 0 (off) and 2 (loose) accept it.
        fine: |v| v != 1,
        want: 2,
        why: "loose, so decapsulated packets from clients are accepted",
    },
    Setting {
        name: "arp_ignore",
        fine: |v| v >= 1,
        want: 1,
        why: "no ARP answer for the VIP, which sits on lo",
    },
    Setting {
        name: "arp_announce",
        fine: |v| v >= 2,
        want: 2,
        why: "the VIP never used as the source of ARP requests",
    },
];

/// Runs `work` in `target`'s network namespace, on a thread of its own when that is not
/// this process's.
fn in_namespace<T: Send>(target: &Target, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Target::Netns(path) = target {
                    let file =
                        fs::File::open(path).map_err(|source| DecapError::OpenNamespace {
                            path: path.display().to_string(),
                            source,
                        })?;
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| {
                        DecapError::EnterNamespace {
                            path: path.display().to_string(),
                            source,
                        }
                    })?;
                }
                work()
            })
            .join()
            .unwrap_or(Err(DecapError::Panicked))
    })
}

/// A netlink conversation on the calling thread (so in its namespace).
fn netlink<T>(talk: impl AsyncFnOnce(rtnetlink::Handle) -> Result<T>) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(DecapError::NetlinkOpen)?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(DecapError::NetlinkOpen)?;
        let task = tokio::spawn(connection);
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), talk(handle))
            .await
            .unwrap_or_else(|_| {
                Err(DecapError::NetlinkOpen(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "netlink did not answer within 10 s",
                )))
            });
        task.abort();
        result
    })
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DecapError {
    let what = what.into();
    move |source| DecapError::Netlink { what, source }
}

/// The namespace's interfaces: name → index.
async fn links(h: &rtnetlink::Handle) -> Result<BTreeMap<String, u32>> {
    let mut out = BTreeMap::new();
    let mut dump = h.link().get().execute();
    while let Some(msg) = dump.try_next().await.map_err(nl("listing interfaces"))? {
        for attr in &msg.attributes {
            if let LinkAttribute::IfName(name) = attr {
                out.insert(name.clone(), msg.header.index);
            }
        }
    }
    Ok(out)
}

/// Indexes of the interfaces that carry a default route (either family, any table the
/// kernel dumps, multipath hops included).
async fn default_route_interfaces(h: &rtnetlink::Handle) -> Result<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for request in [
        rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let mut dump = h.route().get(request).execute();
        while let Some(route) = dump.try_next().await.map_err(nl("listing routes"))? {
            if route.header.destination_prefix_length == 0 {
                out.extend(route_oifs(&route));
            }
        }
    }
    Ok(out)
}

fn route_oifs(route: &RouteMessage) -> Vec<u32> {
    route
        .attributes
        .iter()
        .flat_map(|a| match a {
            RouteAttribute::Oif(index) => vec![*index],
            RouteAttribute::MultiPath(hops) => hops.iter().map(|h| h.interface_index).collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// The interfaces to work on: the ones named, else those with a default route.
async fn chosen_interfaces(
    h: &rtnetlink::Handle,
    named: &[String],
    target: &Target,
) -> Result<Vec<(String, u32)>> {
    let all = links(h).await?;
    if named.is_empty() {
        let defaults = default_route_interfaces(h).await?;
        let chosen: Vec<(String, u32)> = all
            .into_iter()
            .filter(|(name, index)| defaults.contains(index) && name != "lo")
            .collect();
        if chosen.is_empty() {
            return Err(DecapError::NoDefaultRoute(target.to_string()));
        }
        return Ok(chosen);
    }
    named
        .iter()
        .map(|name| {
            if name == "lo" {
                return Err(DecapError::Loopback(name.clone()));
            }
            all.get(name)
                .map(|index| (name.clone(), *index))
                .ok_or_else(|| DecapError::NoSuchInterface(name.clone(), target.to_string()))
        })
        .collect()
}

/// A filter at an interface's clsact ingress.
struct Filter {
    priority: u16,
    handle: u32,
    name: String,
    program_id: Option<u32>,
}

impl Filter {
    fn is_xlbs(&self) -> bool {
        self.name.starts_with(decap::OBJECT_PROGRAM)
    }

    fn is_at_xlbs_place(&self) -> bool {
        self.priority == FILTER_PRIORITY && self.handle == FILTER_HANDLE
    }
}

fn filter_of(msg: &TcMessage) -> Option<Filter> {
    let mut name = None;
    let mut program_id = None;
    for attr in &msg.attributes {
        if let TcAttribute::Options(options) = attr {
            for option in options {
                match option {
                    TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name = Some(n.clone()),
                    TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => program_id = Some(*id),
                    _ => {}
                }
            }
        }
    }
    let handle = u32::from(msg.header.handle);
    // A priority's chain head comes without a handle; only real filters have one.
    (handle != 0).then(|| Filter {
        priority: (msg.header.info >> 16) as u16,
        handle,
        name: name.unwrap_or_else(|| "not a BPF filter".to_owned()),
        program_id,
    })
}

/// The filters at `ifindex`'s ingress (`egress: false`) or egress. An interface without a
/// clsact qdisc has none.
async fn filters(h: &rtnetlink::Handle, ifindex: u32, egress: bool) -> Result<Vec<Filter>> {
    let request = h.traffic_filter(ifindex as i32).get();
    let request = if egress {
        request.egress()
    } else {
        request.ingress()
    };
    let mut dump = request.execute();
    let mut out = Vec::new();
    loop {
        match dump.try_next().await {
            Ok(Some(msg)) => out.extend(filter_of(&msg)),
            Ok(None) => break,
            // No clsact qdisc: nothing attached.
            Err(rtnetlink::Error::NetlinkError(e))
                if matches!(-e.raw_code(), libc::EINVAL | libc::ENOENT) =>
            {
                break;
            }
            Err(source) => {
                return Err(DecapError::Netlink {
                    what: "listing tc filters".to_owned(),
                    source,
                });
            }
        }
    }
    Ok(out)
}

async fn has_clsact(h: &rtnetlink::Handle, ifindex: u32) -> Result<bool> {
    let mut dump = h.qdisc().get().index(ifindex as i32).execute();
    while let Some(msg) = dump.try_next().await.map_err(nl("listing qdiscs"))? {
        if msg.header.index == ifindex as i32
            && msg
                .attributes
                .iter()
                .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn delete_clsact(h: &rtnetlink::Handle, ifindex: u32) -> Result<()> {
    use rtnetlink::packet_route::tc::TcHandle as NlHandle;
    let mut request = h.qdisc().del(ifindex as i32);
    request.message_mut().header.parent = NlHandle::CLSACT;
    request.message_mut().header.handle = NlHandle {
        major: 0xffff,
        minor: 0,
    };
    request
        .execute()
        .await
        .map_err(nl("removing the clsact qdisc"))
}

/// `lo`'s index and its addresses (as netlink gave them, for deletion).
async fn loopback_addresses(h: &rtnetlink::Handle) -> Result<(u32, Vec<(IpAddr, AddressMessage)>)> {
    let lo = *links(h)
        .await?
        .get("lo")
        .ok_or_else(|| DecapError::NoSuchInterface("lo".to_owned(), "this namespace".to_owned()))?;
    let mut out = Vec::new();
    let mut dump = h.address().get().set_link_index_filter(lo).execute();
    while let Some(msg) = dump.try_next().await.map_err(nl("listing addresses"))? {
        if msg.header.index != lo {
            continue;
        }
        let ip = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = ip {
            out.push((ip, msg));
        }
    }
    Ok((lo, out))
}

fn sysctl_path(iface: &str, name: &str) -> PathBuf {
    Path::new("/proc/sys/net/ipv4/conf").join(iface).join(name)
}

fn read_number(path: &Path) -> Result<i64> {
    let text = fs::read_to_string(path).map_err(|source| DecapError::Io {
        op: "reading",
        path: path.display().to_string(),
        source,
    })?;
    text.trim().parse().map_err(|_| DecapError::NotANumber {
        path: path.display().to_string(),
    })
}

fn write_number(path: &Path, value: i64) -> Result<()> {
    fs::write(path, value.to_string()).map_err(|source| DecapError::Io {
        op: "writing",
        path: path.display().to_string(),
        source,
    })
}

/// Where `prepare` records what it changed in the calling thread's namespace: next to the
/// agent's socket's default place (`/run/xlb` for the host, `/run/xlb/netns-INODE` for
/// another namespace, or when the host's cannot be told apart).
fn record_path() -> PathBuf {
    let inode = |path: &str| fs::metadata(path).ok().map(|m| m.ino());
    match (inode("/proc/thread-self/ns/net"), inode("/proc/1/ns/net")) {
        (Some(own), Some(host)) if own == host => PathBuf::from("/run/xlb/backend-prepare.json"),
        (Some(own), _) => PathBuf::from(format!("/run/xlb/netns-{own}/backend-prepare.json")),
        _ => PathBuf::from("/run/xlb/backend-prepare.json"),
    }
}

/// The calling thread's network namespace's cookie (`SO_NETNS_COOKIE`): unlike its inode,
/// never given to another namespace, so a record left by a namespace that is gone is told
/// from this one's. `None` on kernels before 5.14.
fn namespace_cookie() -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a live socket, and a buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

/// This namespace's record; one a gone namespace left behind under the same inode counts
/// as none.
fn read_record(path: &Path) -> Result<Option<Record>> {
    let record: Option<Record> = match fs::read(path) {
        Ok(bytes) => Some(
            serde_json::from_slice(&bytes).map_err(|source| DecapError::Record {
                path: path.display().to_string(),
                source,
            })?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(DecapError::Io {
                op: "reading",
                path: path.display().to_string(),
                source,
            });
        }
    };
    Ok(record.filter(|r| r.netns_cookie == namespace_cookie()))
}

fn write_record(path: &Path, record: &Record) -> Result<()> {
    let io = |op| {
        move |source| DecapError::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
    }
    let text = serde_json::to_string_pretty(record).expect("a record always serializes");
    let temporary = path.with_extension("json.tmp");
    fs::write(&temporary, text).map_err(io("writing"))?;
    fs::rename(&temporary, path).map_err(io("replacing"))
}

fn check_vips(vips: &[IpAddr]) -> Result<()> {
    for vip in vips {
        if vip.is_unspecified() || vip.is_loopback() || vip.is_multicast() {
            return Err(DecapError::BadVip(*vip));
        }
    }
    Ok(())
}

fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// Sets `target` up as a DSR backend (see the module's documentation); returns one line per
/// thing done or found already in place.
///
/// # Errors
/// Bad input (no VIP, an unknown interface, no default route), the kernel refusing the
/// program or the filter, netlink or `/proc/sys` failing. What was done before a failure
/// stays, and is recorded for `unprepare`.
pub fn prepare(target: &Target, spec: &PrepareSpec) -> Result<Vec<String>> {
    if spec.vips.is_empty() {
        return Err(DecapError::NoVip);
    }
    if spec.gue_port == 0 {
        return Err(DecapError::ZeroGuePort);
    }
    check_vips(&spec.vips)?;
    in_namespace(target, || {
        let path = record_path();
        let mut record = read_record(&path)?.unwrap_or_default();
        record.gue_port = spec.gue_port;
        record.netns_cookie = namespace_cookie();
        let mut done = Vec::new();
        let result = prepare_here(target, spec, &mut record, &mut done);
        // Nothing changed, nothing to undo: no file left behind (bad input, say).
        if record.changed_anything() {
            write_record(&path, &record)?;
        }
        result.map(|()| done)
    })
}

fn prepare_here(
    target: &Target,
    spec: &PrepareSpec,
    record: &mut Record,
    done: &mut Vec<String>,
) -> Result<()> {
    let interfaces = netlink(async |h| chosen_interfaces(&h, &spec.interfaces, target).await)?;

    let port_be = spec.gue_port.to_be();
    let mut object = EbpfLoader::new()
        .override_global(decap::GUE_PORT_SYMBOL, &port_be, true)
        .load(XLB_DECAP_OBJECT)
        .map_err(DecapError::Load)?;
    let name = decap::OBJECT_PROGRAM;
    let program: &mut SchedClassifier = object
        .program_mut(name)
        .ok_or(DecapError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DecapError::Program { name, source })?;
    program
        .load()
        .map_err(|source| DecapError::Program { name, source })?;

    for (iface, ifindex) in &interfaces {
        let (clsact, existing) = netlink(async |h| {
            Ok((
                has_clsact(&h, *ifindex).await?,
                filters(&h, *ifindex, false).await?,
            ))
        })?;
        if !clsact {
            tc::qdisc_add_clsact(*ifindex).map_err(|source| DecapError::Tc {
                what: "adding the clsact qdisc",
                iface: iface.clone(),
                source,
            })?;
            record.clsact_added.insert(iface.clone());
        }
        let attach_err = |source| DecapError::Attach {
            program: name,
            iface: iface.clone(),
            source,
        };
        let ours = existing.iter().find(|f| f.is_at_xlbs_place());
        let id = match ours {
            Some(filter) if !filter.is_xlbs() => {
                return Err(DecapError::ForeignFilter {
                    iface: iface.clone(),
                    name: filter.name.clone(),
                });
            }
            Some(_) => {
                let link = SchedClassifierLink::attached(
                    *ifindex,
                    TcAttachType::Ingress.into(),
                    FILTER_PRIORITY,
                    TcHandle::from(FILTER_HANDLE),
                    None,
                )
                .map_err(|source| attach_err(ProgramError::IOError(source)))?;
                program.attach_to_link(link).map_err(attach_err)?
            }
            None => program
                .attach(
                    *ifindex,
                    TcAttach::Netlink {
                        parent: TcAttachType::Ingress.into(),
                        options: NlOptions {
                            priority: FILTER_PRIORITY,
                            handle: TcHandle::from(FILTER_HANDLE),
                            classid: None,
                        },
                    },
                )
                .map_err(attach_err)?,
        };
        // The filter holds the program now; dropping aya's handle on it would detach it.
        std::mem::forget(program.take_link(id).map_err(attach_err)?);
        done.push(format!(
            "{} {name} at tc ingress of {iface} (GUE port {})",
            if ours.is_some() {
                "replaced"
            } else {
                "attached"
            },
            spec.gue_port
        ));
    }

    let (lo, present) = netlink(async |h| loopback_addresses(&h).await)?;
    for vip in &spec.vips {
        if present.iter().any(|(ip, _)| ip == vip) {
            done.push(format!("VIP {vip} already on lo"));
            continue;
        }
        let vip = *vip;
        netlink(async move |h| {
            let mut request = h.address().add(lo, vip, host_prefix(vip));
            if vip.is_ipv6() {
                // Loopback does no duplicate address detection anyway; say so explicitly,
                // so the address is usable at once.
                request
                    .message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            request
                .execute()
                .await
                .map_err(nl(format!("adding {vip} to lo")))
        })?;
        record.vips_added.insert(vip);
        done.push(format!("added VIP {vip}/{} to lo", host_prefix(vip)));
    }

    for setting in &SETTINGS {
        for scope in std::iter::once("all").chain(interfaces.iter().map(|(n, _)| n.as_str())) {
            let path = sysctl_path(scope, setting.name);
            let value = read_number(&path)?;
            if (setting.fine)(value) {
                continue;
            }
            write_number(&path, setting.want)?;
            record
                .sysctls
                .entry(path.display().to_string())
                .or_insert(SysctlChange {
                    was: value,
                    set: setting.want,
                });
            done.push(format!(
                "set net.ipv4.conf.{scope}.{} = {} (was {value}: {})",
                setting.name, setting.want, setting.why
            ));
        }
    }
    Ok(())
}

/// What is in place in `target` for serving `vips` by direct server return (the recorded
/// VIPs when none are given) on `interfaces` (default: those with a default route), and the
/// decapsulation counters.
///
/// # Errors
/// An unknown interface, netlink, `/proc/sys` or the counters map failing.
pub fn check(target: &Target, vips: &[IpAddr], interfaces: &[String]) -> Result<CheckReport> {
    in_namespace(target, || {
        let record = read_record(&record_path())?.unwrap_or_default();
        let mut report = CheckReport::default();
        let chosen = match netlink(async |h| chosen_interfaces(&h, interfaces, target).await) {
            Ok(chosen) => chosen,
            Err(DecapError::NoDefaultRoute(_)) if interfaces.is_empty() => {
                report.missing(
                    "interfaces: none has a default route (name them with --interface)".to_owned(),
                );
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let mut program_ids = BTreeSet::new();
        for (iface, ifindex) in &chosen {
            let found = netlink(async |h| filters(&h, *ifindex, false).await)?;
            match found.iter().find(|f| f.is_xlbs()) {
                Some(filter) => {
                    program_ids.extend(filter.program_id);
                    report.ok(format!(
                        "decapsulation: {} at tc ingress of {iface} (pref {}, program id {})",
                        decap::OBJECT_PROGRAM,
                        filter.priority,
                        filter
                            .program_id
                            .map_or_else(|| "unknown".to_owned(), |id| id.to_string())
                    ));
                }
                None => report.missing(format!(
                    "decapsulation: no {} filter at tc ingress of {iface}",
                    decap::OBJECT_PROGRAM
                )),
            }
        }

        let wanted: Vec<IpAddr> = if vips.is_empty() {
            record.vips_added.iter().copied().collect()
        } else {
            vips.to_vec()
        };
        let (_, present) = netlink(async |h| loopback_addresses(&h).await)?;
        if wanted.is_empty() {
            report.missing("VIPs: none given (--vip) and none recorded by prepare".to_owned());
        }
        for vip in &wanted {
            let prefix = present
                .iter()
                .find(|(ip, _)| ip == vip)
                .map(|(_, msg)| msg.header.prefix_len);
            match prefix {
                Some(len) => report.ok(format!("VIP {vip}/{len} on lo")),
                None => report.missing(format!("VIP {vip} is not on lo")),
            }
        }

        for setting in &SETTINGS {
            let all = read_number(&sysctl_path("all", setting.name))?;
            for (iface, _) in &chosen {
                let own = read_number(&sysctl_path(iface, setting.name))?;
                let effective = all.max(own);
                let line = format!(
                    "{} on {iface}: {effective} (all {all}, {iface} {own}; want {}{}: {})",
                    setting.name,
                    if setting.want == 2 && setting.name == "rp_filter" {
                        "0 or "
                    } else {
                        ""
                    },
                    setting.want,
                    setting.why
                );
                if (setting.fine)(effective) {
                    report.ok(line);
                } else {
                    report.missing(line);
                }
            }
        }
        report.counters = counters(&program_ids)?;
        Ok(report)
    })
}

/// The decapsulation counters summed over the programs (and CPUs) given.
fn counters(program_ids: &BTreeSet<u32>) -> Result<Vec<(String, u64)>> {
    let mut sums = vec![0u64; decap::COUNTERS.len()];
    let mut map_ids = BTreeSet::new();
    for info in loaded_programs().flatten() {
        if program_ids.contains(&info.id())
            && let Ok(Some(ids)) = info.map_ids()
        {
            map_ids.extend(ids);
        }
    }
    for id in map_ids {
        let data = MapData::from_id(id).map_err(|source| DecapError::Counters { id, source })?;
        let is_counters = data
            .info()
            .ok()
            .is_some_and(|info| info.name_as_str() == Some(decap::COUNTERS_MAP));
        if !is_counters {
            continue;
        }
        let map = Map::from_map_data(data).map_err(|source| DecapError::Counters { id, source })?;
        let array = PerCpuArray::<_, u64>::try_from(map)
            .map_err(|source| DecapError::Counters { id, source })?;
        for (index, sum) in sums.iter_mut().enumerate() {
            let values = array
                .get(&(index as u32), 0)
                .map_err(|source| DecapError::Counters { id, source })?;
            *sum += values.iter().sum::<u64>();
        }
    }
    Ok(decap::COUNTERS
        .iter()
        .map(|name| (*name).to_owned())
        .zip(sums)
        .collect())
}

/// Undoes `prepare` in `target`: removes xlb's filters from every interface, the clsact
/// qdiscs prepare added (when nothing else is attached to them), the VIPs it added (and
/// `vips`, if given), and restores the sysctls it changed where they still hold its value.
/// Returns one line per thing undone.
///
/// # Errors
/// Netlink or `/proc/sys` failing.
pub fn unprepare(target: &Target, vips: &[IpAddr]) -> Result<Vec<String>> {
    check_vips(vips)?;
    in_namespace(target, || {
        let path = record_path();
        let record = read_record(&path)?.unwrap_or_default();
        let mut done = Vec::new();
        let all = netlink(async |h| links(&h).await)?;
        for (iface, ifindex) in &all {
            let found = netlink(async |h| filters(&h, *ifindex, false).await)?;
            if found.iter().any(Filter::is_xlbs) {
                tc::qdisc_detach_program(
                    *ifindex,
                    TcAttachType::Ingress.into(),
                    decap::OBJECT_PROGRAM,
                )
                .map_err(|source| DecapError::Tc {
                    what: "removing the xlb_decap filter",
                    iface: iface.clone(),
                    source,
                })?;
                done.push(format!(
                    "removed {} from tc ingress of {iface}",
                    decap::OBJECT_PROGRAM
                ));
            }
            if record.clsact_added.contains(iface) {
                let unused = netlink(async |h| {
                    Ok(filters(&h, *ifindex, false).await?.is_empty()
                        && filters(&h, *ifindex, true).await?.is_empty()
                        && has_clsact(&h, *ifindex).await?)
                })?;
                if unused {
                    netlink(async |h| delete_clsact(&h, *ifindex).await)?;
                    done.push(format!("removed the clsact qdisc prepare added to {iface}"));
                }
            }
        }

        let (_, present) = netlink(async |h| loopback_addresses(&h).await)?;
        let remove: BTreeSet<IpAddr> = record.vips_added.iter().chain(vips).copied().collect();
        for (ip, msg) in present {
            if !remove.contains(&ip) {
                continue;
            }
            netlink(async move |h| {
                h.address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(nl(format!("removing {ip} from lo")))
            })?;
            done.push(format!("removed VIP {ip} from lo"));
        }

        for (key, change) in &record.sysctls {
            let key_path = Path::new(key);
            // An interface gone since: nothing left to restore.
            if !key_path.exists() {
                continue;
            }
            let now = read_number(key_path)?;
            if now == change.set {
                write_number(key_path, change.was)?;
                done.push(format!("restored {key} to {} (from {now})", change.was));
            } else {
                done.push(format!(
                    "left {key} at {now}: changed since prepare set it to {}",
                    change.set
                ));
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => {
                // A namespace's own directory goes with its last file; the host's
                // `/run/xlb` and anything still in use stay.
                if let Some(dir) = path.parent()
                    && dir
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("netns-"))
                {
                    let _ = fs::remove_dir(dir);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DecapError::Io {
                    op: "removing",
                    path: path.display().to_string(),
                    source,
                });
            }
        }
        Ok(done)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_object_carries_the_program_and_the_counters() {
        let object = aya_obj::Object::parse(XLB_DECAP_OBJECT).expect("a valid BPF object");
        assert!(object.programs.contains_key(decap::OBJECT_PROGRAM));
        assert!(object.maps.contains_key(decap::COUNTERS_MAP));
    }

    #[test]
    fn settings_accept_what_dsr_needs_and_refuse_the_rest() {
        let [rp, ignore, announce] = &SETTINGS;
        assert!((rp.fine)(0) && (rp.fine)(2) && !(rp.fine)(1));
        assert!(!(ignore.fine)(0) && (ignore.fine)(1) && (ignore.fine)(2));
        assert!(!(announce.fine)(1) && (announce.fine)(2));
        for s in &SETTINGS {
            assert!(
                (s.fine)(s.want),
                "{} = {} must count as fine",
                s.name,
                s.want
            );
        }
    }

    #[test]
    fn bad_vips_are_refused_before_anything_is_touched() {
        for bad in ["0.0.0.0", "127.0.0.1", "::1", "224.0.0.1", "::"] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(matches!(check_vips(&[ip]), Err(DecapError::BadVip(v)) if v == ip));
        }
        assert!(check_vips(&["10.0.0.100".parse().unwrap(), "fd00::1".parse().unwrap()]).is_ok());
        let spec = PrepareSpec {
            vips: Vec::new(),
            interfaces: Vec::new(),
            gue_port: 6080,
        };
        assert!(matches!(
            prepare(&Target::Current, &spec),
            Err(DecapError::NoVip)
        ));
    }
}
