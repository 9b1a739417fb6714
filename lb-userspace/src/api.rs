//! The agent's control API: newline-delimited JSON requests and replies over a Unix socket.
//! The CLI is one client of it; anything that speaks JSON can be another.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use lb_common::Counter;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    balancer::{BackendState, Explanation, VipSpec, VipStatus},
    health::HealthSpec,
};

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
    },
    VipDel {
        vip: VipSpec,
    },
    VipList,
    BackendAdd {
        vip: VipSpec,
        backend: SocketAddr,
        weight: u32,
    },
    /// Adds the container `container` as a backend: the agent finds its address (and, without
    /// `port`, its single exposed port) and follows it from then on.
    ContainerBackendAdd {
        vip: VipSpec,
        container: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        weight: u32,
    },
    BackendDel {
        vip: VipSpec,
        backend: SocketAddr,
    },
    /// Change a backend's weight and/or state (draining: no new flows, established ones go on).
    BackendSet {
        vip: VipSpec,
        backend: SocketAddr,
        weight: Option<u32>,
        state: Option<BackendState>,
    },
    BackendList {
        vip: VipSpec,
    },
    Stats,
    Explain {
        client: SocketAddr,
        vip: VipSpec,
    },
    /// Re-read the agent's --config file and apply what changed.
    Reload,
}

impl Request {
    /// Whether the request changes the desired state (and so is persisted).
    #[must_use]
    pub const fn mutates(&self) -> bool {
        matches!(
            self,
            Self::VipAdd { .. }
                | Self::VipDel { .. }
                | Self::BackendAdd { .. }
                | Self::ContainerBackendAdd { .. }
                | Self::BackendDel { .. }
                | Self::BackendSet { .. }
                | Self::Reload
        )
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
    Explanation(Explanation),
    /// What a reload changed, one line each (`+ vip …`, `- backend …`, `~ backend …`).
    Changes(Vec<String>),
    Error(String),
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
    #[error("{0}")]
    Refused(String),
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
    let mut line = serde_json::to_string(request).expect("requests always serialise");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    match serde_json::from_str(&reply).map_err(ClientError::BadReply)? {
        Reply::Error(message) => Err(ClientError::Refused(message)),
        reply => Ok(reply),
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
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"op":"backend_add","vip":"10.0.0.1:80/tcp","backend":"10.1.0.2:8080","weight":2}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r);
    }

    #[test]
    fn a_container_backend_is_sent_by_name() {
        let r = Request::ContainerBackendAdd {
            vip: "10.0.0.1:80/tcp".parse().unwrap(),
            container: "web-1".into(),
            port: None,
            weight: 1,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"op":"container_backend_add","vip":"10.0.0.1:80/tcp","container":"web-1","weight":1}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r);
        assert!(r.mutates());
    }
}
