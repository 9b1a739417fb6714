//! Containers as backends: what podman or docker says about a container (its address, ports,
//! labels, whether it runs), the engine's event stream, and what the agent makes of both.
//!
//! The engines are reached through their command-line clients (`inspect`, `ps`, `events`),
//! not their HTTP APIs: podman is daemonless, and its API socket exists only where
//! `podman.socket` is enabled, while the client works on every podman host; docker's client
//! speaks to whatever daemon or context the host has. Their JSON is read with serde.
//!
//! A backend added by container name (`xlb backend add VIP --container NAME`, `container =`
//! in `xlb.toml`) is *followed*: when the engine reports the container stopped, died or gone,
//! the backend leaves the ring (its flows re-hash, as for a failed health check); when it runs
//! again it comes back, at its new address if it has one (a new endpoint). With
//! `xlb run --containers ENGINE`, containers labelled `xlb.vip=ADDR:PORT/PROTO` are
//! *discovered*: made backends of that VIP (created if missing) when they start, drained when
//! the engine starts stopping them, removed once they are stopped.

mod engine;
mod follow;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use thiserror::Error;

pub use self::{
    engine::{EngineEvent, find, inspect, labelled, parse_event, parse_inspect, watch_events},
    follow::{Following, LabelSpec, Notice, followed, label_spec, reconcile, resolve_declared},
};
use crate::{
    balancer::{Protocol, VipSpec},
    validate::{self, ContainerNameError},
};

/// Which engine `xlb run --containers` watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    Podman,
    Docker,
    /// podman if installed, else docker.
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Podman,
    Docker,
}

impl Engine {
    const fn program(self) -> &'static str {
        match self {
            Self::Podman => "podman",
            Self::Docker => "docker",
        }
    }

    fn installed(self) -> bool {
        std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join(self.program()).is_file())
        })
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program())
    }
}

impl EngineChoice {
    /// The engines to ask, in order.
    fn engines(self) -> &'static [Engine] {
        match self {
            Self::Podman => &[Engine::Podman],
            Self::Docker => &[Engine::Docker],
            Self::Auto => &[Engine::Podman, Engine::Docker],
        }
    }
}

#[derive(Debug, Error)]
pub enum ContainerError {
    #[error(transparent)]
    Name(#[from] ContainerNameError),
    #[error("no container engine to ask: {0}")]
    NoEngine(String),
    #[error("no container named '{name}' ({tried})")]
    NotFound { name: String, tried: String },
    #[error("`{engine} {what}` failed: {detail}")]
    Engine {
        engine: Engine,
        what: String,
        detail: String,
    },
    #[error("`{engine} {what}` gave no answer within {} s", engine::ENGINE_TIMEOUT.as_secs())]
    Timeout { engine: Engine, what: String },
    #[error("`{engine} {what}` printed JSON xlb cannot read: {source}")]
    Unreadable {
        engine: Engine,
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("container '{0}' is not running: start it first")]
    NotRunning(String),
    #[error("container '{name}' has no {family} address on any of its networks")]
    NoAddress { name: String, family: &'static str },
    #[error("container '{name}' exposes no {proto} port: give one (--container {name}:PORT)")]
    NoPort { name: String, proto: Protocol },
    #[error(
        "container '{name}' exposes several {proto} ports ({ports}): say which (--container {name}:PORT)"
    )]
    ManyPorts {
        name: String,
        proto: Protocol,
        ports: String,
    },
}

/// What an engine says about a container, as far as xlb cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    /// Running and not paused: able to answer.
    pub running: bool,
    /// Its addresses on all its networks.
    pub addrs: Vec<IpAddr>,
    /// The ports it exposes or publishes, on the container's side.
    pub ports: BTreeSet<(u16, Protocol)>,
    pub labels: BTreeMap<String, String>,
    /// Its main process while it runs (`State.Pid`): the way into its network namespace.
    pub pid: Option<u32>,
}

impl ContainerInfo {
    /// Where the container serves `vip`: its address of the VIP's family, and `port`, else
    /// its single exposed port of the VIP's protocol.
    ///
    /// # Errors
    /// Not running, no address of the family, no port given and not exactly one exposed.
    pub fn endpoint(&self, vip: &VipSpec, port: Option<u16>) -> Result<SocketAddr, ContainerError> {
        if !self.running {
            return Err(ContainerError::NotRunning(self.name.clone()));
        }
        let ip = self
            .addrs
            .iter()
            .find(|ip| ip.is_ipv4() == vip.addr.is_ipv4())
            .ok_or_else(|| ContainerError::NoAddress {
                name: self.name.clone(),
                family: if vip.addr.is_ipv4() { "IPv4" } else { "IPv6" },
            })?;
        let port = match port {
            Some(port) => port,
            None => {
                let exposed: Vec<u16> = self
                    .ports
                    .iter()
                    .filter(|(_, proto)| *proto == vip.proto)
                    .map(|(port, _)| *port)
                    .collect();
                match exposed.as_slice() {
                    [one] => *one,
                    [] => {
                        return Err(ContainerError::NoPort {
                            name: self.name.clone(),
                            proto: vip.proto,
                        });
                    }
                    many => {
                        return Err(ContainerError::ManyPorts {
                            name: self.name.clone(),
                            proto: vip.proto,
                            ports: many
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", "),
                        });
                    }
                }
            }
        };
        Ok(SocketAddr::new(*ip, port))
    }
}
/// Reads `--container NAME[:PORT]`.
///
/// # Errors
/// A port that is not 1-65535, or a name podman and docker would refuse.
pub fn parse_container_arg(spec: &str) -> Result<(String, Option<u16>), String> {
    let (name, port) = match spec.rsplit_once(':') {
        Some((name, port)) => (
            name,
            Some(
                port.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("'{port}' is not a port (1-65535)"))?,
            ),
        ),
        None => (spec, None),
    };
    validate::check_container_name(name).map_err(|e| e.to_string())?;
    Ok((name.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_arguments_are_a_valid_name_and_a_port() {
        for bad in ["--latest", "-l", "a b", ""] {
            assert!(
                parse_container_arg(&format!("{bad}:80")).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_container_arg("web-1:8080"),
            Ok(("web-1".to_owned(), Some(8080)))
        );
        assert_eq!(parse_container_arg("web-1"), Ok(("web-1".to_owned(), None)));
        assert!(parse_container_arg("web-1:0").is_err());
    }
}
