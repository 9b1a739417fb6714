//! Backend health checks. The agent probes each backend of a VIP that has a [`HealthSpec`]
//! from its own network namespace (directly, not through the VIP) and takes a backend out of
//! the ring when it stops answering, so a dead container stops getting new flows without an
//! operator in the loop.
//!
//! A backend starts out healthy: adding one (or restarting the agent) then takes effect at
//! once instead of after `rise` probes, and a backend that is really down leaves again after
//! `fall` probes. Flapping is damped by needing `fall` consecutive failures to go down and
//! `rise` consecutive successes to come back.
//!
//! A probe must speak the VIP's protocol: TCP and HTTP probes for TCP VIPs, the UDP probe for
//! UDP VIPs. A TCP connect to a UDP service is refused by every backend, so a mismatched probe
//! would take all of them out; [`HealthSpec::check_protocol`] refuses that combination.
//!
//! This module holds what needs no I/O: the specs, their validation, and the rise/fall
//! state machine ([`HealthTracker`]), which is given each probe's outcome and the time;
//! the agent runs the probes.

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::{Protocol, VipSpec};

/// Serialised with a `kind` tag: `{"kind":"tcp"}`,
/// `{"kind":"http","path":"/healthz","expect_status":200}` (plus `"host":"..."` when set),
/// `{"kind":"udp","payload_hex":"70696e67","expect_reply":true}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Probe {
    /// A completed TCP handshake: cheap, but only proves the socket is open.
    Tcp,
    /// `GET path HTTP/1.1`, healthy when the response carries `expect_status`: proves the
    /// application answers, and lets it report itself unhealthy (e.g. 503 while draining).
    Http {
        path: String,
        expect_status: u16,
        /// The `Host` header sent, for backends that route by name; `None`: the backend's
        /// own `address:port`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
    },
    /// One datagram carrying `payload` (empty by default, which no service should act on).
    /// With `expect_reply`, healthy when any answer arrives within the timeout: proves the
    /// service answers. Without, healthy unless an ICMP port-unreachable comes back (a
    /// connected UDP socket reports it as ECONNREFUSED): proves only that the port is open,
    /// for services that never answer the payload.
    Udp {
        #[serde(rename = "payload_hex", with = "hex", default)]
        payload: Vec<u8>,
        expect_reply: bool,
    },
}

impl Probe {
    /// The protocol the probe speaks, which must be its VIP's.
    #[must_use]
    pub const fn protocol(&self) -> Protocol {
        match self {
            Self::Tcp | Self::Http { .. } => Protocol::Tcp,
            Self::Udp { .. } => Protocol::Udp,
        }
    }

    /// `tcp`, `http` or `udp`, as `--health` and the config's `probe` take it.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http { .. } => "http",
            Self::Udp { .. } => "udp",
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("tcp"),
            Self::Http {
                path,
                expect_status,
                host: None,
            } => write!(f, "http GET {path} expecting {expect_status}"),
            Self::Http {
                path,
                expect_status,
                host: Some(host),
            } => write!(
                f,
                "http GET {path} (Host: {host}) expecting {expect_status}"
            ),
            Self::Udp {
                payload,
                expect_reply: true,
            } => write!(f, "udp ({} bytes) expecting a reply", payload.len()),
            Self::Udp {
                payload,
                expect_reply: false,
            } => write!(
                f,
                "udp ({} bytes) expecting no port-unreachable",
                payload.len()
            ),
        }
    }
}

/// How often and how strictly one VIP's backends are probed.
///
/// Serialised with durations in whole milliseconds, which the JSON API and the TOML config
/// both carry as plain integers: `{"probe":{"kind":"tcp"},"interval_ms":2000,"timeout_ms":1000,
/// "rise":2,"fall":3}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    pub probe: Probe,
    #[serde(rename = "interval_ms", with = "millis")]
    pub interval: Duration,
    #[serde(rename = "timeout_ms", with = "millis")]
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy backend back.
    pub rise: u32,
    /// Consecutive failures that take a healthy backend out.
    pub fall: u32,
}

impl Default for HealthSpec {
    /// TCP connect every 2 s with a 1 s timeout, down after 3 failures, up after 2 successes:
    /// a dead backend is out within about 6 s, and one lost SYN does not evict it.
    fn default() -> Self {
        Self {
            probe: Probe::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HealthSpecError {
    #[error("the health check interval must be more than 0 ms")]
    ZeroInterval,
    #[error("the health check timeout must be more than 0 ms")]
    ZeroTimeout,
    #[error(
        "the health check timeout ({timeout_ms} ms) must not exceed its interval ({interval_ms} ms)"
    )]
    TimeoutExceedsInterval { timeout_ms: u128, interval_ms: u128 },
    #[error("health check rise must be at least 1")]
    ZeroRise,
    #[error("health check fall must be at least 1")]
    ZeroFall,
    #[error(
        "the HTTP health check path must start with '/' and hold only printable ASCII (no spaces; percent-encode the rest), got {0:?}"
    )]
    BadPath(String),
    #[error(
        "the HTTP health check host must be a name or address with an optional :port (letters, digits and -._:[], at most {MAX_HOST_LEN} characters), got {0:?}"
    )]
    BadHost(String),
    #[error("the expected HTTP status must be between 100 and 599, got {0}")]
    BadStatus(u16),
    #[error(
        "a {probe} health check cannot probe {} VIP {vip}: every backend would fail it (use {})",
        proto_name(vip.proto),
        suggestion(vip.proto)
    )]
    WrongProtocol { probe: &'static str, vip: VipSpec },
    #[error("the UDP health check payload is {0} bytes, at most {MAX_UDP_PAYLOAD}")]
    PayloadTooLarge(usize),
    #[error(
        "a UDP health check that expects no reply relies on ICMP port-unreachable messages, which Linux sends at most once per second per peer: use an interval of at least {MIN_SILENT_UDP_INTERVAL_MS} ms (or expect a reply)"
    )]
    SilentUdpTooFrequent,
}

fn proto_name(proto: Protocol) -> &'static str {
    match proto {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

fn suggestion(proto: Protocol) -> &'static str {
    match proto {
        Protocol::Tcp => "a tcp or http health check",
        Protocol::Udp => "a udp health check",
    }
}

/// Longest `Host` an HTTP probe sends: a DNS name (253) and a port fit.
pub const MAX_HOST_LEN: usize = 260;

/// Whether `host` may be sent as an HTTP probe's `Host` header: a name or an address
/// (IPv6 in brackets) with an optional port, nothing that could end the header or smuggle
/// a path or credentials into it.
#[must_use]
pub fn is_valid_host(host: &str) -> bool {
    (1..=MAX_HOST_LEN).contains(&host.len())
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:[]".contains(c))
}

/// Largest UDP probe payload: fits one unfragmented datagram on any link.
pub const MAX_UDP_PAYLOAD: usize = 1024;

/// Shortest interval of a UDP probe that judges by the absence of ICMP port-unreachable:
/// Linux sends those at most once per `net.ipv4.icmp_ratelimit` (1000 ms) per peer after a
/// short burst, so faster probes would see silence from a dead port and call it healthy.
pub const MIN_SILENT_UDP_INTERVAL_MS: u64 = 1000;

impl HealthSpec {
    /// Rejects specs that could never settle: probes overlapping their own interval, or a
    /// threshold of zero that would flip state without any evidence.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), HealthSpecError> {
        if self.interval.is_zero() {
            return Err(HealthSpecError::ZeroInterval);
        }
        if self.timeout.is_zero() {
            return Err(HealthSpecError::ZeroTimeout);
        }
        if self.timeout > self.interval {
            return Err(HealthSpecError::TimeoutExceedsInterval {
                timeout_ms: self.timeout.as_millis(),
                interval_ms: self.interval.as_millis(),
            });
        }
        if self.rise == 0 {
            return Err(HealthSpecError::ZeroRise);
        }
        if self.fall == 0 {
            return Err(HealthSpecError::ZeroFall);
        }
        if let Probe::Http {
            path,
            expect_status,
            host,
        } = &self.probe
        {
            // What an HTTP request line can carry as it is: the probe sends the path verbatim.
            if !path.starts_with('/') || !path.chars().all(|c| c.is_ascii_graphic()) {
                return Err(HealthSpecError::BadPath(path.clone()));
            }
            if !(100..=599).contains(expect_status) {
                return Err(HealthSpecError::BadStatus(*expect_status));
            }
            if let Some(host) = host
                && !is_valid_host(host)
            {
                return Err(HealthSpecError::BadHost(host.clone()));
            }
        }
        if let Probe::Udp {
            payload,
            expect_reply,
        } = &self.probe
        {
            if payload.len() > MAX_UDP_PAYLOAD {
                return Err(HealthSpecError::PayloadTooLarge(payload.len()));
            }
            if !expect_reply && self.interval < Duration::from_millis(MIN_SILENT_UDP_INTERVAL_MS) {
                return Err(HealthSpecError::SilentUdpTooFrequent);
            }
        }
        Ok(())
    }

    /// Refuses a probe that does not speak `vip`'s protocol.
    ///
    /// # Errors
    /// [`HealthSpecError::WrongProtocol`].
    pub fn check_protocol(&self, vip: &VipSpec) -> Result<(), HealthSpecError> {
        if self.probe.protocol() == vip.proto {
            Ok(())
        } else {
            Err(HealthSpecError::WrongProtocol {
                probe: self.probe.kind(),
                vip: *vip,
            })
        }
    }

    /// [`Self::validate`] and [`Self::check_protocol`].
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate_for(&self, vip: &VipSpec) -> Result<(), HealthSpecError> {
        self.validate()?;
        self.check_protocol(vip)
    }
}

/// Bytes as lowercase hex in JSON and the state file, so any payload (a DNS query, say)
/// survives as text.
mod hex {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        decode(&String::deserialize(d)?).map_err(D::Error::custom)
    }

    #[must_use]
    pub fn encode(bytes: &[u8]) -> String {
        use std::fmt::Write as _;
        bytes.iter().fold(String::new(), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
    }

    /// # Errors
    /// An odd number of digits or a character that is not a hex digit.
    pub fn decode(text: &str) -> Result<Vec<u8>, String> {
        if !text.len().is_multiple_of(2) {
            return Err(format!("'{text}' has an odd number of hex digits"));
        }
        text.as_bytes()
            .chunks(2)
            .map(|pair| {
                std::str::from_utf8(pair)
                    .ok()
                    .and_then(|p| u8::from_str_radix(p, 16).ok())
                    .ok_or_else(|| format!("'{text}' is not hex (two digits per byte, e.g. 0a1b)"))
            })
            .collect()
    }
}

pub use hex::decode as decode_hex;

mod millis {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// What the last probes of one backend said, for `xlb` to show and the metrics to export.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HealthStatus {
    pub healthy: bool,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    /// Human-readable outcome of the last probe: `ok 1.2 ms`, `connect refused`, `http 503`.
    pub last_result: String,
    /// 0 until the first probe has finished.
    pub last_checked_unix_ms: u64,
}

impl HealthStatus {
    /// Before the first probe: `healthy` as the backend starts out.
    #[must_use]
    pub fn fresh(healthy: bool) -> Self {
        Self {
            healthy,
            consecutive_ok: 0,
            consecutive_fail: 0,
            last_result: "not checked yet".to_owned(),
            last_checked_unix_ms: 0,
        }
    }
}

/// Which way a backend's verdict turned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// `fall` consecutive failures: out of the ring.
    WentDown,
    /// `rise` consecutive successes: back in the ring.
    CameBack,
}

/// The verdict on one backend, moved by probe outcomes: down after `fall` consecutive
/// failures, up again after `rise` consecutive successes. Time is given, never read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthTracker {
    rise: u32,
    fall: u32,
    status: HealthStatus,
}

impl HealthTracker {
    /// A backend judged by `spec`, starting out `healthy`.
    #[must_use]
    pub fn new(spec: &HealthSpec, healthy: bool) -> Self {
        Self {
            rise: spec.rise,
            fall: spec.fall,
            status: HealthStatus::fresh(healthy),
        }
    }

    /// Records one probe's outcome (`Ok(detail)`: passed, `Err(detail)`: failed), finished at
    /// `now_unix_ms`; returns the transition it causes, if any.
    pub fn observe(
        &mut self,
        outcome: Result<String, String>,
        now_unix_ms: u64,
    ) -> Option<Transition> {
        let status = &mut self.status;
        let passed = outcome.is_ok();
        if passed {
            status.consecutive_ok = status.consecutive_ok.saturating_add(1);
            status.consecutive_fail = 0;
        } else {
            status.consecutive_fail = status.consecutive_fail.saturating_add(1);
            status.consecutive_ok = 0;
        }
        status.last_result = match outcome {
            Ok(detail) | Err(detail) => detail,
        };
        status.last_checked_unix_ms = now_unix_ms;
        let transition = if status.healthy {
            (status.consecutive_fail >= self.fall).then_some(Transition::WentDown)
        } else {
            (status.consecutive_ok >= self.rise).then_some(Transition::CameBack)
        };
        if transition.is_some() {
            status.healthy = !status.healthy;
        }
        transition
    }

    #[must_use]
    pub const fn status(&self) -> &HealthStatus {
        &self.status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip() -> VipSpec {
        "192.0.2.10:80/tcp".parse().unwrap()
    }

    #[test]
    fn specs_validate_and_serialise_in_milliseconds() {
        let spec = HealthSpec::default();
        spec.validate().unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(
            json,
            r#"{"probe":{"kind":"tcp"},"interval_ms":2000,"timeout_ms":1000,"rise":2,"fall":3}"#
        );
        assert_eq!(serde_json::from_str::<HealthSpec>(&json).unwrap(), spec);
        let http: Probe =
            serde_json::from_str(r#"{"kind":"http","path":"/healthz","expect_status":204}"#)
                .unwrap();
        assert_eq!(
            http,
            Probe::Http {
                path: "/healthz".into(),
                expect_status: 204,
                host: None,
            }
        );
        // A probe without a Host is written as before, so older agents read new state files.
        assert_eq!(
            serde_json::to_string(&http).unwrap(),
            r#"{"kind":"http","path":"/healthz","expect_status":204}"#
        );
        let named = Probe::Http {
            path: "/".into(),
            expect_status: 200,
            host: Some("web.example:8080".into()),
        };
        let json = serde_json::to_string(&named).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"http","path":"/","expect_status":200,"host":"web.example:8080"}"#
        );
        assert_eq!(serde_json::from_str::<Probe>(&json).unwrap(), named);
        assert_eq!(
            named.to_string(),
            "http GET / (Host: web.example:8080) expecting 200"
        );

        let bad = |f: fn(&mut HealthSpec)| {
            let mut s = HealthSpec::default();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert_eq!(
            bad(|s| s.interval = Duration::ZERO),
            HealthSpecError::ZeroInterval
        );
        assert!(matches!(
            bad(|s| s.timeout = Duration::from_secs(3)),
            HealthSpecError::TimeoutExceedsInterval { .. }
        ));
        assert_eq!(bad(|s| s.rise = 0), HealthSpecError::ZeroRise);
        assert_eq!(bad(|s| s.fall = 0), HealthSpecError::ZeroFall);
        assert!(matches!(
            bad(|s| s.probe = Probe::Http {
                path: "healthz".into(),
                expect_status: 200,
                host: None,
            }),
            HealthSpecError::BadPath(_)
        ));
        assert!(matches!(
            bad(|s| s.probe = Probe::Http {
                path: "/h\u{e9}".into(),
                expect_status: 200,
                host: None,
            }),
            HealthSpecError::BadPath(_)
        ));
        let with_host = |host: &str| HealthSpec {
            probe: Probe::Http {
                path: "/".into(),
                expect_status: 200,
                host: Some(host.into()),
            },
            ..HealthSpec::default()
        };
        for good in [
            "web.example",
            "web.example:8080",
            "10.0.0.2",
            "[fd00::2]:80",
        ] {
            with_host(good).validate().unwrap();
        }
        let too_long = "a".repeat(MAX_HOST_LEN + 1);
        for wrong in [
            "",
            "a b",
            "a\r\nX-Injected: 1",
            "user@web.example",
            "web.example/path",
            too_long.as_str(),
        ] {
            let error = with_host(wrong).validate().unwrap_err();
            assert_eq!(error, HealthSpecError::BadHost(wrong.into()), "{wrong:?}");
            assert!(!error.to_string().contains('\n'), "one line: {error}");
        }
    }

    fn udp(payload: &[u8], expect_reply: bool) -> Probe {
        Probe::Udp {
            payload: payload.to_vec(),
            expect_reply,
        }
    }

    #[test]
    fn udp_specs_serialise_and_validate() {
        let probe = udp(b"ping", true);
        let json = serde_json::to_string(&probe).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"udp","payload_hex":"70696e67","expect_reply":true}"#
        );
        assert_eq!(serde_json::from_str::<Probe>(&json).unwrap(), probe);
        assert_eq!(
            serde_json::from_str::<Probe>(r#"{"kind":"udp","expect_reply":false}"#).unwrap(),
            udp(b"", false)
        );
        assert!(
            serde_json::from_str::<Probe>(
                r#"{"kind":"udp","payload_hex":"7","expect_reply":true}"#
            )
            .is_err()
        );
        assert_eq!(decode_hex("00ff1A").unwrap(), [0, 0xff, 0x1a]);
        assert!(decode_hex("zz").unwrap_err().contains("not hex"));

        let spec = |probe, interval_ms| HealthSpec {
            probe,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(100),
            ..HealthSpec::default()
        };
        spec(udp(b"", false), 1000).validate().unwrap();
        spec(udp(b"x", true), 200).validate().unwrap();
        assert_eq!(
            spec(udp(b"", false), 999).validate().unwrap_err(),
            HealthSpecError::SilentUdpTooFrequent
        );
        assert_eq!(
            spec(udp(&[0; MAX_UDP_PAYLOAD + 1], true), 1000)
                .validate()
                .unwrap_err(),
            HealthSpecError::PayloadTooLarge(MAX_UDP_PAYLOAD + 1)
        );
    }

    #[test]
    fn probes_must_speak_the_vips_protocol() {
        let dns: VipSpec = "192.0.2.53:53/udp".parse().unwrap();
        let web = vip();
        let tcp_spec = HealthSpec::default();
        let e = tcp_spec.check_protocol(&dns).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a tcp health check cannot probe UDP VIP 192.0.2.53:53/udp: every backend would fail it (use a udp health check)"
        );
        let http_spec = HealthSpec {
            probe: Probe::Http {
                path: "/".into(),
                expect_status: 200,
                host: None,
            },
            ..HealthSpec::default()
        };
        assert!(http_spec.validate_for(&dns).is_err());
        let udp_spec = HealthSpec {
            probe: udp(b"", false),
            ..HealthSpec::default()
        };
        udp_spec.validate_for(&dns).unwrap();
        tcp_spec.validate_for(&web).unwrap();
        assert!(
            udp_spec
                .check_protocol(&web)
                .unwrap_err()
                .to_string()
                .contains("use a tcp or http health check")
        );
    }

    fn tracker(rise: u32, fall: u32, healthy: bool) -> HealthTracker {
        HealthTracker::new(
            &HealthSpec {
                rise,
                fall,
                ..HealthSpec::default()
            },
            healthy,
        )
    }

    fn pass(detail: &str) -> Result<String, String> {
        Ok(detail.to_owned())
    }

    fn fail(detail: &str) -> Result<String, String> {
        Err(detail.to_owned())
    }

    #[test]
    fn a_healthy_backend_goes_down_after_fall_consecutive_failures() {
        let mut t = tracker(2, 3, true);
        assert_eq!(t.status().last_result, "not checked yet");
        assert_eq!(t.observe(fail("connect refused"), 1_000), None);
        assert_eq!(t.observe(fail("connect refused"), 2_000), None);
        // A success in between starts the count again.
        assert_eq!(t.observe(pass("ok 0.1 ms"), 3_000), None);
        assert_eq!(t.observe(fail("connect refused"), 4_000), None);
        assert_eq!(t.observe(fail("connect refused"), 5_000), None);
        assert!(t.status().healthy);
        assert_eq!(
            t.observe(fail("timed out after 1000 ms"), 6_000),
            Some(Transition::WentDown)
        );
        assert_eq!(
            *t.status(),
            HealthStatus {
                healthy: false,
                consecutive_ok: 0,
                consecutive_fail: 3,
                last_result: "timed out after 1000 ms".to_owned(),
                last_checked_unix_ms: 6_000,
            }
        );
        // Further failures change nothing.
        assert_eq!(t.observe(fail("connect refused"), 7_000), None);
        assert!(!t.status().healthy);
    }

    #[test]
    fn an_unhealthy_backend_comes_back_after_rise_consecutive_successes() {
        let mut t = tracker(2, 1, false);
        assert_eq!(t.observe(pass("ok"), 10), None);
        assert_eq!(t.observe(fail("http 503 (expected 200)"), 20), None);
        assert_eq!(t.observe(pass("ok"), 30), None);
        assert_eq!(
            t.observe(pass("ok http 200"), 40),
            Some(Transition::CameBack)
        );
        assert!(t.status().healthy);
        assert_eq!(t.status().consecutive_ok, 2);
        // With fall 1, one failure takes it out again at once.
        assert_eq!(
            t.observe(fail("connect refused"), 50),
            Some(Transition::WentDown)
        );
        assert_eq!(t.status().last_checked_unix_ms, 50);
    }

    #[test]
    fn counts_saturate_instead_of_wrapping() {
        let mut t = tracker(1, 1, true);
        t.status.consecutive_ok = u32::MAX;
        assert_eq!(t.observe(pass("ok"), 1), None);
        assert_eq!(t.status().consecutive_ok, u32::MAX);
    }
}
