//! The agent's control API: newline-delimited JSON requests and replies over a Unix socket.
//! The CLI is one client of it; anything that speaks JSON can be another.
//!
//! The framing, for both ends: each request and each reply is one JSON value on one line,
//! ended by `'\n'` ([`encode_line`], [`decode_line`]); a request line holds at most
//! [`MAX_REQUEST_LINE`] bytes before its newline, a reply line at most [`MAX_REPLY_LINE`].
//! A client may send several requests on one connection; replies come in order.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use lb_common::Counter;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;
use tokio_util::codec::LinesCodec;

use crate::{
    balancer::{BackendState, Conns, Explanation, Forwarding, VipSettings, VipSpec, VipStatus},
    health::HealthSpec,
};

/// Longest request line: the largest real request (a health check with a payload) is a few
/// kilobytes; the agent refuses a longer line and closes the connection.
pub const MAX_REQUEST_LINE: usize = 1024 * 1024;
/// Longest reply line a client reads: a listing of [`lb_common::MAX_BACKENDS`] backends with
/// their health and counters is a few megabytes.
pub const MAX_REPLY_LINE: usize = 64 * 1024 * 1024;

/// `value` as one line of JSON with its `'\n'`: compact JSON escapes every newline inside
/// strings, so the line ends only there.
///
/// # Panics
/// Never for the API's types: they always serialise.
#[must_use]
pub fn encode_line(value: &impl Serialize) -> String {
    let mut line = serde_json::to_string(value).expect("the API's types always serialise");
    line.push('\n');
    line
}

/// One line (its newline, and a `'\r'` before it, may be left on: JSON ignores them) as a
/// request or reply.
///
/// # Errors
/// The line is not one JSON value of type `T`.
pub fn decode_line<T: DeserializeOwned>(line: &str) -> Result<T, serde_json::Error> {
    serde_json::from_str(line)
}

/// The agent's reader of request lines: splits at `'\n'`, strips a `'\r'` before it, and
/// fails on a line longer than [`MAX_REQUEST_LINE`] without buffering more of it.
#[must_use]
pub fn request_codec() -> LinesCodec {
    LinesCodec::new_with_max_length(MAX_REQUEST_LINE)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    VipAdd {
        vip: VipSpec,
        /// Health checks for the VIP's backends (none: all count as healthy).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health: Option<HealthSpec>,
        /// Seconds a flow may idle before its next packet is balanced afresh (none: the
        /// protocol's default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idle_timeout_s: Option<u32>,
        /// `nat` (the default), or direct server return: `ipip`, `gue`.
        #[serde(default, skip_serializing_if = "Forwarding::is_nat")]
        forwarding: Forwarding,
        /// Change an agent that runs from a --config file anyway (the next reload undoes it).
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    /// Change a VIP's health checks and/or idle timeout in place (its backends and flows stay).
    VipSet {
        vip: VipSpec,
        #[serde(flatten)]
        settings: VipSettings,
        /// Change an agent that runs from a --config file anyway (the next reload undoes it).
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    VipDel {
        vip: VipSpec,
        /// Change an agent that runs from a --config file anyway (the next reload undoes it).
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    VipList,
    BackendAdd {
        vip: VipSpec,
        /// Port 0: the VIP's own port, for a direct-server-return VIP (refused for NAT).
        backend: SocketAddr,
        weight: u32,
        /// Change an agent that runs from a --config file anyway (the next reload undoes it).
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    /// Adds the container `container` as a backend: the agent finds its address (and, without
    /// `port`, its single exposed port) and follows it from then on.
    ContainerBackendAdd {
        vip: VipSpec,
        container: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        weight: u32,
        /// Change an agent that runs from a --config file anyway (the next reload undoes it).
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    BackendDel {
        vip: VipSpec,
        backend: SocketAddr,
        /// Change an agent that runs from a --config file anyway (the next reload undoes it).
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    /// Change a backend's weight and/or state (draining: no new flows, established ones go on).
    BackendSet {
        vip: VipSpec,
        backend: SocketAddr,
        weight: Option<u32>,
        state: Option<BackendState>,
        /// Change an agent that runs from a --config file anyway (the next reload undoes it).
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    BackendList {
        vip: VipSpec,
    },
    Stats,
    /// The agent, its interfaces and hooks, and everything `stats` says: `xlb status`.
    Status,
    /// A VIP's tracked flows (only those to `backend`, if given), at most `limit` of them.
    Conns {
        vip: VipSpec,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<SocketAddr>,
        limit: u32,
    },
    Explain {
        client: SocketAddr,
        vip: VipSpec,
    },
    /// Re-read the agent's --config file and apply what changed (with `dry_run`, only say
    /// what would change).
    Reload {
        #[serde(default, skip_serializing_if = "is_false")]
        dry_run: bool,
    },
    /// The node's announcements: `drain` true withdraws every VIP from the routers (flows
    /// already here keep being forwarded), false announces again; none only reports.
    Node {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drain: Option<bool>,
    },
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if"
)]
const fn is_false(b: &bool) -> bool {
    !*b
}

impl Request {
    /// The request's name on the wire (its `op`).
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::VipAdd { .. } => "vip_add",
            Self::VipSet { .. } => "vip_set",
            Self::VipDel { .. } => "vip_del",
            Self::VipList => "vip_list",
            Self::BackendAdd { .. } => "backend_add",
            Self::ContainerBackendAdd { .. } => "container_backend_add",
            Self::BackendDel { .. } => "backend_del",
            Self::BackendSet { .. } => "backend_set",
            Self::BackendList { .. } => "backend_list",
            Self::Stats => "stats",
            Self::Status => "status",
            Self::Conns { .. } => "conns",
            Self::Explain { .. } => "explain",
            Self::Reload { .. } => "reload",
            Self::Node { .. } => "node",
        }
    }

    /// Whether the request changes the desired state (and so is persisted).
    #[must_use]
    pub const fn mutates(&self) -> bool {
        matches!(
            self,
            Self::VipAdd { .. }
                | Self::VipSet { .. }
                | Self::VipDel { .. }
                | Self::BackendAdd { .. }
                | Self::ContainerBackendAdd { .. }
                | Self::BackendDel { .. }
                | Self::BackendSet { .. }
                | Self::Reload { dry_run: false }
        )
    }

    /// For a change made by hand (not a reload): whether it says to go ahead on an agent
    /// that runs from a config file.
    #[must_use]
    pub const fn forced(&self) -> Option<bool> {
        match self {
            Self::VipAdd { force, .. }
            | Self::VipSet { force, .. }
            | Self::VipDel { force, .. }
            | Self::BackendAdd { force, .. }
            | Self::ContainerBackendAdd { force, .. }
            | Self::BackendDel { force, .. }
            | Self::BackendSet { force, .. } => Some(*force),
            _ => None,
        }
    }
}

/// One global counter, by its stable name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterValue {
    pub name: String,
    pub value: u64,
}

impl CounterValue {
    #[must_use]
    pub fn new(counter: Counter, value: u64) -> Self {
        Self {
            name: counter.name().to_owned(),
            value,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub vips: Vec<VipStatus>,
    pub global: Vec<CounterValue>,
}

/// One interface the agent was given, and the hook it has there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub index: u32,
    /// `native`, `skb` (XDP) or `tc`; none while the interface is gone (it is re-attached
    /// when one of that name appears).
    pub hook: Option<String>,
}

/// The agent itself: what `xlb status` shows before the VIPs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub pid: u32,
    pub uptime_s: u64,
    pub socket: String,
    pub bpffs: String,
    pub state_file: String,
    /// The `--config` file, when the agent runs from one.
    pub config: Option<String>,
    pub keep_attached: bool,
    /// The direct-server-return tunnels' settings in force.
    #[serde(default)]
    pub encap: crate::encap::Encap,
    /// The part of them given on the command line, which wins over the config file's (so
    /// `xlb config diff` words a file's change as a reload would).
    #[serde(default)]
    pub encap_flags: crate::encap::Encap,
}

/// What the node announces to its routers (`xlb node`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// `xlb node drain` is in force: nothing is announced.
    pub drained: bool,
    /// The routing table the agent announces through; none: it announces nothing
    /// (`--announce-table` not given).
    pub announce_table: Option<u32>,
    /// The VIP addresses in that table now.
    pub announced: Vec<std::net::IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub agent: AgentInfo,
    pub interfaces: Vec<InterfaceStatus>,
    pub vips: Vec<VipStatus>,
    pub global: Vec<CounterValue>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum Reply {
    Done,
    /// Done, and worth a look: `{"kind":"done_with_warnings","data":["backend … is reached
    /// through eth2, which xlb is not attached to …"]}`.
    DoneWithWarnings(Vec<String>),
    /// A container became a backend at this address (with warnings, as `DoneWithWarnings`).
    ContainerBackendAdded {
        backend: SocketAddr,
        warnings: Vec<String>,
    },
    Vips(Vec<VipStatus>),
    Vip(VipStatus),
    Stats(Stats),
    Status(Box<Status>),
    Conns(Conns),
    Explanation(Explanation),
    /// What a reload changed, one line each (`+ vip …`, `- backend …`, `~ backend …`).
    Changes(Vec<String>),
    Node(NodeStatus),
    Error(String),
}

impl Reply {
    /// The reply's kind on the wire.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::DoneWithWarnings(_) => "done_with_warnings",
            Self::ContainerBackendAdded { .. } => "container_backend_added",
            Self::Vips(_) => "vips",
            Self::Vip(_) => "vip",
            Self::Stats(_) => "stats",
            Self::Status(_) => "status",
            Self::Conns(_) => "conns",
            Self::Explanation(_) => "explanation",
            Self::Changes(_) => "changes",
            Self::Node(_) => "node",
            Self::Error(_) => "error",
        }
    }
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "no xlb agent is listening on {path}: start one with `xlb run --iface IF` (or point --socket / XLB_SOCKET at it)"
    )]
    NoAgent {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "not allowed to connect to the agent's socket {path} (it is the agent's user's only): run xlb as that user, usually root"
    )]
    NotPermitted {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent sent a reply this CLI does not understand")]
    BadReply(#[source] serde_json::Error),
    #[error("the agent sent a reply longer than {MAX_REPLY_LINE} bytes")]
    ReplyTooLong,
    #[error("{0}")]
    Refused(String),
    #[error(
        "the agent answered {request} with a {got} reply where this CLI expects {expected}: are the agent and the CLI the same version?"
    )]
    UnexpectedReply {
        request: &'static str,
        expected: &'static str,
        got: &'static str,
    },
}

/// Sends one request and waits for its reply. An error reply becomes `ClientError::Refused`.
///
/// # Errors
/// No agent, I/O failure, an unreadable reply, or the agent refusing the request.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let path = socket.display().to_string();
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| {
        // The socket (0600) or its directory is someone else's: an agent may well be there.
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ClientError::NotPermitted {
                path: path.clone(),
                source,
            }
        } else {
            ClientError::NoAgent {
                path: path.clone(),
                source,
            }
        }
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    stream
        .write_all(encode_line(request).as_bytes())
        .map_err(io)?;
    let mut reply = String::new();
    let limit = u64::try_from(MAX_REPLY_LINE + 1).unwrap_or(u64::MAX);
    BufReader::new((&stream).take(limit))
        .read_line(&mut reply)
        .map_err(io)?;
    if !reply.ends_with('\n') && reply.len() > MAX_REPLY_LINE {
        return Err(ClientError::ReplyTooLong);
    }
    match decode_line(&reply).map_err(ClientError::BadReply)? {
        Reply::Error(message) => Err(ClientError::Refused(message)),
        reply => Ok(reply),
    }
}

/// The control API with a typed reply per request: a reply of another kind is
/// [`ClientError::UnexpectedReply`], naming what was expected.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    socket: &'a Path,
    /// Changes go ahead on an agent that runs from a config file.
    force: bool,
}

/// Warnings the agent attached to a change it made (empty: none).
pub type Warnings = Vec<String>;

impl<'a> Client<'a> {
    #[must_use]
    pub const fn new(socket: &'a Path) -> Self {
        Self {
            socket,
            force: false,
        }
    }

    /// Changes made through this client go ahead on an agent that runs from a config file
    /// (until its next reload).
    #[must_use]
    pub const fn forcing(self, force: bool) -> Self {
        Self { force, ..self }
    }

    /// Sends `request` and hands its reply to `pick`, which returns it typed, or none when it
    /// is of another kind than `expected`.
    fn typed<T>(
        &self,
        request: &Request,
        expected: &'static str,
        pick: impl FnOnce(Reply) -> Option<T>,
    ) -> Result<T, ClientError> {
        let reply = call(self.socket, request)?;
        let got = reply.kind();
        pick(reply).ok_or(ClientError::UnexpectedReply {
            request: request.name(),
            expected,
            got,
        })
    }

    /// A request that changes something: done, perhaps with warnings.
    fn change(&self, request: &Request) -> Result<Warnings, ClientError> {
        self.typed(request, "done", |reply| match reply {
            Reply::Done => Some(Vec::new()),
            Reply::DoneWithWarnings(warnings) => Some(warnings),
            _ => None,
        })
    }

    /// # Errors
    /// See [`call`]; a reply other than done.
    pub fn vip_add(
        &self,
        vip: VipSpec,
        health: Option<HealthSpec>,
        idle_timeout_s: Option<u32>,
        forwarding: Forwarding,
    ) -> Result<Warnings, ClientError> {
        self.change(&Request::VipAdd {
            vip,
            health,
            idle_timeout_s,
            forwarding,
            force: self.force,
        })
    }

    /// # Errors
    /// See [`call`]; a reply other than done.
    pub fn vip_set(&self, vip: VipSpec, settings: VipSettings) -> Result<Warnings, ClientError> {
        self.change(&Request::VipSet {
            vip,
            settings,
            force: self.force,
        })
    }

    /// # Errors
    /// See [`call`]; a reply other than done.
    pub fn vip_del(&self, vip: VipSpec) -> Result<Warnings, ClientError> {
        self.change(&Request::VipDel {
            vip,
            force: self.force,
        })
    }

    /// # Errors
    /// See [`call`]; a reply other than the VIPs.
    pub fn vip_list(&self) -> Result<Vec<VipStatus>, ClientError> {
        self.typed(&Request::VipList, "vips", |reply| match reply {
            Reply::Vips(vips) => Some(vips),
            _ => None,
        })
    }

    /// # Errors
    /// See [`call`]; a reply other than done.
    pub fn backend_add(
        &self,
        vip: VipSpec,
        backend: SocketAddr,
        weight: u32,
    ) -> Result<Warnings, ClientError> {
        self.change(&Request::BackendAdd {
            vip,
            backend,
            weight,
            force: self.force,
        })
    }

    /// Adds the container `name` as a backend (the agent resolves it, and follows it from
    /// then on); returns the address it resolved to.
    ///
    /// # Errors
    /// See [`call`]; a reply other than a container backend added.
    pub fn container_backend_add(
        &self,
        vip: VipSpec,
        container: String,
        port: Option<u16>,
        weight: u32,
    ) -> Result<(SocketAddr, Warnings), ClientError> {
        let request = Request::ContainerBackendAdd {
            vip,
            container,
            port,
            weight,
            force: self.force,
        };
        self.typed(&request, "container_backend_added", |reply| match reply {
            Reply::ContainerBackendAdded { backend, warnings } => Some((backend, warnings)),
            _ => None,
        })
    }

    /// # Errors
    /// See [`call`]; a reply other than done.
    pub fn backend_del(&self, vip: VipSpec, backend: SocketAddr) -> Result<Warnings, ClientError> {
        self.change(&Request::BackendDel {
            vip,
            backend,
            force: self.force,
        })
    }

    /// # Errors
    /// See [`call`]; a reply other than done.
    pub fn backend_set(
        &self,
        vip: VipSpec,
        backend: SocketAddr,
        weight: Option<u32>,
        state: Option<BackendState>,
    ) -> Result<Warnings, ClientError> {
        self.change(&Request::BackendSet {
            vip,
            backend,
            weight,
            state,
            force: self.force,
        })
    }

    /// # Errors
    /// See [`call`]; a reply other than one VIP.
    pub fn backend_list(&self, vip: VipSpec) -> Result<VipStatus, ClientError> {
        self.typed(&Request::BackendList { vip }, "vip", |reply| match reply {
            Reply::Vip(status) => Some(status),
            _ => None,
        })
    }

    /// # Errors
    /// See [`call`]; a reply other than stats.
    pub fn stats(&self) -> Result<Stats, ClientError> {
        self.typed(&Request::Stats, "stats", |reply| match reply {
            Reply::Stats(stats) => Some(stats),
            _ => None,
        })
    }

    /// Drains the node (`Some(true)`), announces again (`Some(false)`), or only reports.
    ///
    /// # Errors
    /// See [`call`]; a reply other than the node's status.
    pub fn node(&self, drain: Option<bool>) -> Result<NodeStatus, ClientError> {
        self.typed(&Request::Node { drain }, "node", |reply| match reply {
            Reply::Node(status) => Some(status),
            _ => None,
        })
    }

    /// # Errors
    /// See [`call`]; a reply other than the status.
    pub fn status(&self) -> Result<Status, ClientError> {
        self.typed(&Request::Status, "status", |reply| match reply {
            Reply::Status(status) => Some(*status),
            _ => None,
        })
    }

    /// # Errors
    /// See [`call`]; a reply other than the flows.
    pub fn conns(
        &self,
        vip: VipSpec,
        backend: Option<SocketAddr>,
        limit: u32,
    ) -> Result<Conns, ClientError> {
        self.typed(
            &Request::Conns {
                vip,
                backend,
                limit,
            },
            "conns",
            |reply| match reply {
                Reply::Conns(conns) => Some(conns),
                _ => None,
            },
        )
    }

    /// # Errors
    /// See [`call`]; a reply other than an explanation.
    pub fn explain(&self, client: SocketAddr, vip: VipSpec) -> Result<Explanation, ClientError> {
        self.typed(
            &Request::Explain { client, vip },
            "explanation",
            |reply| match reply {
                Reply::Explanation(e) => Some(e),
                _ => None,
            },
        )
    }

    /// What the reload changed (with `dry_run`: would change), one line each (warnings
    /// start with `warning: `).
    ///
    /// # Errors
    /// See [`call`]; a reply other than changes.
    pub fn reload(&self, dry_run: bool) -> Result<Vec<String>, ClientError> {
        self.typed(
            &Request::Reload { dry_run },
            "changes",
            |reply| match reply {
                Reply::Changes(changes) => Some(changes),
                _ => None,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = Request::BackendAdd {
            vip: "10.0.0.1:80/tcp".parse().unwrap(),
            backend: "10.1.0.2:8080".parse().unwrap(),
            weight: 2,
            force: false,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"op":"backend_add","vip":"10.0.0.1:80/tcp","backend":"10.1.0.2:8080","weight":2}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r);
    }

    #[test]
    fn a_vip_add_names_its_forwarding_method_unless_nat() {
        let add = |forwarding| Request::VipAdd {
            vip: "10.0.0.1:80/tcp".parse().unwrap(),
            health: None,
            idle_timeout_s: None,
            forwarding,
            force: false,
        };
        let json = serde_json::to_string(&add(Forwarding::Ipip)).unwrap();
        assert_eq!(
            json,
            r#"{"op":"vip_add","vip":"10.0.0.1:80/tcp","forwarding":"ipip"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(&json).unwrap(),
            add(Forwarding::Ipip)
        );
        // A client that predates forwarding adds a NAT VIP, as it always did.
        let old = r#"{"op":"vip_add","vip":"10.0.0.1:80/tcp"}"#;
        assert_eq!(
            serde_json::from_str::<Request>(old).unwrap(),
            add(Forwarding::Nat)
        );
    }

    #[test]
    fn a_container_backend_is_sent_by_name() {
        let r = Request::ContainerBackendAdd {
            vip: "10.0.0.1:80/tcp".parse().unwrap(),
            container: "web-1".into(),
            port: None,
            weight: 1,
            force: false,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"op":"container_backend_add","vip":"10.0.0.1:80/tcp","container":"web-1","weight":1}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r);
        assert!(r.mutates());
    }

    /// An agent answering with a reply of another kind than the request's is an error that
    /// names both, never a silent success.
    #[test]
    fn a_mismatched_reply_names_what_was_expected() {
        let dir = std::env::temp_dir().join(format!("xlb-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let agent = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut request = String::new();
            BufReader::new(&stream).read_line(&mut request).unwrap();
            (&stream)
                .write_all(b"{\"kind\":\"vips\",\"data\":[]}\n")
                .unwrap();
            request
        });
        let error = Client::new(&socket).stats().unwrap_err();
        assert_eq!(agent.join().unwrap(), "{\"op\":\"stats\"}\n");
        assert!(
            matches!(
                error,
                ClientError::UnexpectedReply {
                    request: "stats",
                    expected: "stats",
                    got: "vips"
                }
            ),
            "{error:?}"
        );
        assert!(
            error.to_string().starts_with(
                "the agent answered stats with a vips reply where this CLI expects stats"
            ),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
