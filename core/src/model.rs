//! The balancer's desired state as the operator and the state file describe it: services
//! (VIPs), their backends, weights and states, and what status and explain report back.
//! Plain data, no I/O.

use std::{fmt, net::SocketAddr, str::FromStr};

use lb_common::{
    CLOSING_TIMEOUT_S, DEFAULT_TCP_IDLE_TIMEOUT_S, DEFAULT_UDP_IDLE_TIMEOUT_S, FORWARD_GUE,
    FORWARD_IPIP, FORWARD_NAT, IPPROTO_TCP, IPPROTO_UDP, MAX_IDLE_TIMEOUT_S,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::health::{HealthSpec, HealthStatus};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
        }
    }

    /// How long a flow of this protocol may idle unless its VIP says otherwise, in seconds.
    #[must_use]
    pub const fn default_idle_timeout_s(self) -> u32 {
        match self {
            Self::Tcp => DEFAULT_TCP_IDLE_TIMEOUT_S,
            Self::Udp => DEFAULT_UDP_IDLE_TIMEOUT_S,
        }
    }

    /// The shortest idle timeout accepted: a TCP connection's entry must not idle out
    /// before a closing one would.
    #[must_use]
    pub const fn min_idle_timeout_s(self) -> u32 {
        match self {
            Self::Tcp => CLOSING_TIMEOUT_S,
            Self::Udp => 1,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "a {proto} idle timeout must be between {min} and {max} seconds, got {given}",
    min = proto.min_idle_timeout_s(),
    max = MAX_IDLE_TIMEOUT_S
)]
pub struct IdleTimeoutError {
    pub proto: Protocol,
    pub given: u64,
}

/// Checks an idle timeout (seconds) for a VIP of protocol `proto`.
///
/// # Errors
/// Shorter than the protocol allows (a TCP timeout under the closing timeout), or longer
/// than a week.
pub fn validate_idle_timeout(proto: Protocol, given: u64) -> Result<u32, IdleTimeoutError> {
    u32::try_from(given)
        .ok()
        .filter(|s| (proto.min_idle_timeout_s()..=MAX_IDLE_TIMEOUT_S).contains(s))
        .ok_or(IdleTimeoutError { proto, given })
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// How a VIP's packets reach its backends.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// The destination becomes the backend's address and port; replies come back through
    /// the balancer, which puts the VIP back as their source.
    #[default]
    Nat,
    /// Direct server return: the client's packet, unchanged, inside an outer IP header to the
    /// backend, which answers the client itself (from the VIP).
    Ipip,
    /// Direct server return as `Ipip`, inside outer IP and UDP headers (GUE): the UDP source
    /// port carries the flow's entropy for the backend NIC's receive-side scaling.
    Gue,
}

impl Forwarding {
    pub const ALL: [Self; 3] = [Self::Nat, Self::Ipip, Self::Gue];

    /// `Backend::forwarding` in the data plane.
    #[must_use]
    pub const fn abi(self) -> u8 {
        match self {
            Self::Nat => FORWARD_NAT,
            Self::Ipip => FORWARD_IPIP,
            Self::Gue => FORWARD_GUE,
        }
    }

    /// Whether replies bypass the balancer (direct server return): the backend gets the
    /// packet as the client sent it, so it must serve the VIP's own port, and the balancer
    /// keeps no reply-side state for it.
    #[must_use]
    pub const fn is_dsr(self) -> bool {
        !matches!(self, Self::Nat)
    }

    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
    #[must_use]
    pub const fn is_nat(&self) -> bool {
        matches!(self, Self::Nat)
    }

    /// How status and explain name it: `nat`, `dsr/ipip`, `dsr/gue`.
    #[must_use]
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::Ipip => "dsr/ipip",
            Self::Gue => "dsr/gue",
        }
    }
}

/// The name in the CLI, the config file and JSON: `nat`, `ipip`, `gue`.
impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nat => "nat",
            Self::Ipip => "ipip",
            Self::Gue => "gue",
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown forwarding method '{0}' (use nat, ipip or gue)")]
pub struct ParseForwardingError(pub String);

impl FromStr for Forwarding {
    type Err = ParseForwardingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.to_string().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseForwardingError(s.to_owned()))
    }
}

/// A service address: `192.0.2.10:80/tcp`, `[2001:db8::1]:443/udp` (protocol defaults to tcp).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipSpec {
    pub addr: SocketAddr,
    pub proto: Protocol,
}

impl fmt::Display for VipSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseVipError {
    #[error("'{0}' is not ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp)")]
    Syntax(String),
    #[error("unknown protocol '{0}' (use tcp or udp)")]
    Protocol(String),
    #[error("port 0 is not a service port")]
    PortZero,
}

impl FromStr for VipSpec {
    type Err = ParseVipError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, proto) = match s.rsplit_once('/') {
            Some((addr, proto)) => (addr, proto),
            None => (s, "tcp"),
        };
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(ParseVipError::Protocol(proto.to_owned())),
        };
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| ParseVipError::Syntax(s.to_owned()))?;
        if addr.port() == 0 {
            return Err(ParseVipError::PortZero);
        }
        Ok(Self { addr, proto })
    }
}

impl Serialize for VipSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VipSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Largest weight accepted: a backend claims this many ring slots per Maglev turn. Weight 0
/// drains a backend, as `BackendState::Draining` does.
pub const MAX_WEIGHT: u32 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// In the ring: takes new flows.
    Active,
    /// Out of the ring; established flows continue.
    Draining,
}

/// A backend as configured: what `xlb backend add` sets and the state file keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    pub weight: u32,
    #[serde(default = "default_state")]
    pub state: BackendState,
    /// The id the data plane knows the backend by. Persisted so that an agent adopting a
    /// running data plane (pinned maps) gives every backend the same id again: connection-
    /// table entries name backends by id. Absent in hand-written configs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    /// The podman or docker container the backend is, by name: the agent follows it,
    /// re-resolving `addr` when it starts again and keeping it out of the ring while it is
    /// stopped. None: a plain address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Made a backend by its labels (`xlb run --containers`), not by the operator: removed,
    /// not only taken out, when its container stops. Persisted so that a restarted agent
    /// still tells the two apart.
    #[serde(default, skip_serializing_if = "is_false")]
    pub discovered: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
const fn is_false(b: &bool) -> bool {
    !*b
}

const fn default_state() -> BackendState {
    BackendState::Active
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipConfig {
    pub vip: VipSpec,
    pub backends: Vec<BackendConfig>,
    /// As `BackendConfig::id`, for the VIP's slot (its counters and rings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    /// Health checks for the VIP's backends; none: every backend counts as healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    /// How long its flows may idle before a packet gets a fresh choice, in seconds; none: the
    /// protocol's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u32>,
    /// NAT or direct server return; a state file from before it existed holds NAT VIPs.
    #[serde(default, skip_serializing_if = "Forwarding::is_nat")]
    pub forwarding: Forwarding,
}

/// One setting of a change to an existing VIP (`xlb vip set`): left as it is, back to its
/// default (no health checks; the protocol's idle timeout), or set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Setting<T> {
    #[default]
    Keep,
    Default,
    To(T),
}

impl<T: Clone> Setting<T> {
    /// `current` after this change.
    #[must_use]
    pub fn applied_to(&self, current: Option<T>) -> Option<T> {
        match self {
            Self::Keep => current,
            Self::Default => None,
            Self::To(value) => Some(value.clone()),
        }
    }
}

/// What `xlb vip set` changes on a VIP; its backends and their flows stay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipSettings {
    #[serde(default)]
    pub health: Setting<HealthSpec>,
    /// Seconds.
    #[serde(default)]
    pub idle_timeout_s: Setting<u32>,
}

/// The whole desired state, as persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub vips: Vec<VipConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub addr: SocketAddr,
    /// The container the backend is, when it was added by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// For a container: false while it is stopped (out of the ring, its flows moved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_running: Option<bool>,
    pub id: u32,
    pub weight: u32,
    pub state: BackendState,
    /// False while health checks fail: out of the ring, its flows moved elsewhere.
    pub healthy: bool,
    /// The last health check, when the VIP has checks (filled in by the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthStatus>,
    /// Ring slots this backend owns (0 while draining or unhealthy).
    pub slots: u32,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Flows in the connection table that are live: not closing, and within their VIP's
    /// idle timeout (only counted by `backend list`: it walks the whole table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_flows: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    pub vip: VipSpec,
    pub id: u32,
    pub ring_size: u32,
    /// How long its flows may idle, in seconds (the configured value or the default).
    #[serde(default)]
    pub idle_timeout_s: u32,
    /// NAT or direct server return (`ipip`, `gue`).
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Its backends' health checks (none: every backend counts as healthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthSpec>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendStatus>,
}

/// Where a flow goes, computed the way the kernel does it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub client: SocketAddr,
    pub vip: VipSpec,
    pub flow_hash: u32,
    pub ring_slot: u32,
    /// How the VIP's packets reach the backend named below.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// The backend a new flow with this 5-tuple gets from the live ring.
    pub new_flow_backend: Option<SocketAddr>,
    /// The backend the connection table holds for this 5-tuple, if its entry still holds
    /// (not idle past the VIP's timeout, not closed too long ago).
    pub tracked_backend: Option<SocketAddr>,
}

/// One connection-table entry of a VIP, as `xlb conns` lists it (like a line of
/// `ipvsadm -Lc`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackedFlow {
    pub client: SocketAddr,
    /// Where its packets go; none when the entry names a backend the VIP no longer has (its
    /// next packet is balanced afresh).
    pub backend: Option<SocketAddr>,
    /// `established`, `fin from client`, `fin from backend`, `closed` (both FINs) or `reset`
    /// for TCP; `udp` for a UDP flow.
    pub state: String,
    /// Seconds since its last packet (the data path keeps that time to the second).
    pub idle_s: u64,
    /// Whether the entry still decides where the flow's packets go: not idle past the VIP's
    /// timeout, not closed more than 10 s ago (`FlowState::is_current`).
    pub live: bool,
}

/// A VIP's tracked flows: `total` entries matched, `flows` holds at most the limit asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conns {
    pub vip: VipSpec,
    pub total: u64,
    pub flows: Vec<TrackedFlow>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vips() {
        let v: VipSpec = "192.0.2.10:80".parse().unwrap();
        assert_eq!(v.proto, Protocol::Tcp);
        assert_eq!(v.to_string(), "192.0.2.10:80/tcp");
        let v: VipSpec = "[2001:db8::1]:443/UDP".parse().unwrap();
        assert_eq!(v.to_string(), "[2001:db8::1]:443/udp");
        assert!(matches!(
            "10.0.0.1/tcp".parse::<VipSpec>(),
            Err(ParseVipError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0.1:80/sctp".parse::<VipSpec>(),
            Err(ParseVipError::Protocol(_))
        ));
        assert_eq!(
            "10.0.0.1:0".parse::<VipSpec>(),
            Err(ParseVipError::PortZero)
        );
        assert!("2001:db8::1:443".parse::<VipSpec>().is_err());
    }

    #[test]
    fn idle_timeouts_are_checked_per_protocol() {
        assert_eq!(validate_idle_timeout(Protocol::Udp, 1), Ok(1));
        assert_eq!(validate_idle_timeout(Protocol::Tcp, 10), Ok(10));
        assert_eq!(
            validate_idle_timeout(Protocol::Tcp, u64::from(MAX_IDLE_TIMEOUT_S)),
            Ok(MAX_IDLE_TIMEOUT_S)
        );
        for (proto, given) in [
            (Protocol::Udp, 0),
            (Protocol::Tcp, 9),
            (Protocol::Tcp, u64::from(MAX_IDLE_TIMEOUT_S) + 1),
            (Protocol::Udp, u64::MAX),
        ] {
            assert_eq!(
                validate_idle_timeout(proto, given),
                Err(IdleTimeoutError { proto, given })
            );
        }
        assert_eq!(
            IdleTimeoutError {
                proto: Protocol::Tcp,
                given: 5
            }
            .to_string(),
            "a tcp idle timeout must be between 10 and 604800 seconds, got 5"
        );
    }

    #[test]
    fn desired_state_round_trips_through_json() {
        let state = DesiredState {
            vips: vec![VipConfig {
                vip: "[2001:db8::1]:443/udp".parse().unwrap(),
                backends: vec![BackendConfig {
                    addr: "[fd00::2]:8443".parse().unwrap(),
                    weight: 3,
                    state: BackendState::Draining,
                    id: Some(7),
                    container: Some("web-1".to_owned()),
                    discovered: true,
                }],
                id: None,
                health: None,
                idle_timeout_s: Some(30),
                forwarding: Forwarding::Gue,
            }],
        };
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.contains(r#""forwarding":"gue""#), "{json}");
        assert_eq!(serde_json::from_str::<DesiredState>(&json).unwrap(), state);
    }

    #[test]
    fn a_state_file_without_forwarding_holds_nat_vips() {
        let old = r#"{"vips":[{"vip":"192.0.2.10:80/tcp","backends":[{"addr":"10.0.0.2:8080","weight":1}]}]}"#;
        let state: DesiredState = serde_json::from_str(old).unwrap();
        assert_eq!(state.vips[0].forwarding, Forwarding::Nat);
        // And a NAT VIP is written as before, so older agents read the file back.
        assert!(
            !serde_json::to_string(&state)
                .unwrap()
                .contains("forwarding")
        );
    }

    #[test]
    fn forwarding_methods_parse_and_print_alike() {
        for f in Forwarding::ALL {
            assert_eq!(f.to_string().parse::<Forwarding>(), Ok(f));
        }
        assert_eq!("IPIP".parse::<Forwarding>(), Ok(Forwarding::Ipip));
        assert_eq!(
            "dsr".parse::<Forwarding>().unwrap_err().to_string(),
            "unknown forwarding method 'dsr' (use nat, ipip or gue)"
        );
        assert_eq!(Forwarding::Gue.describe(), "dsr/gue");
        assert!(!Forwarding::Nat.is_dsr() && Forwarding::Ipip.is_dsr());
    }
}
