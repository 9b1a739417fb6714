//! `xlb vip`: add, change, remove and list VIPs.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Subcommand;
use lb_userspace::{
    api::Client,
    balancer::{Forwarding, Protocol, Setting, VipSettings, VipSpec, validate_idle_timeout},
    health::{HealthSpec, Probe, decode_hex},
};

use super::render::{print_json, print_vips};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeArg {
    Tcp,
    Http,
    Udp,
}

/// Health-check options of `xlb vip add` and `xlb vip set`.
#[derive(clap::Args)]
pub struct HealthArgs {
    /// Check the VIP's backends: tcp (connect) or http (GET, expect a status) for a TCP VIP,
    /// udp (send a datagram, see --health-payload) for a UDP VIP.
    #[arg(long)]
    health: Option<ProbeArg>,
    /// HTTP path to GET.
    #[arg(long, default_value = "/", requires = "health")]
    health_path: String,
    /// Host header of the HTTP probe (a name, with :PORT if needed) [default: the backend's
    /// ADDRESS:PORT].
    #[arg(long, requires = "health", value_name = "HOST")]
    health_host: Option<String>,
    /// HTTP status a healthy backend answers with.
    #[arg(long, default_value_t = 200, requires = "health")]
    health_status: u16,
    /// Milliseconds between two probes of a backend.
    #[arg(long, default_value_t = 2000, requires = "health")]
    health_interval_ms: u64,
    /// Milliseconds a probe may take before it counts as failed.
    #[arg(long, default_value_t = 1000, requires = "health")]
    health_timeout_ms: u64,
    /// Consecutive successes that bring a backend back.
    #[arg(long, default_value_t = 2, requires = "health")]
    health_rise: u32,
    /// Consecutive failures that take a backend out.
    #[arg(long, default_value_t = 3, requires = "health")]
    health_fall: u32,
    /// UDP probe payload, as text [default: an empty datagram].
    #[arg(long, requires = "health", conflicts_with = "health_payload_hex")]
    health_payload: Option<String>,
    /// UDP probe payload, as hex bytes (e.g. a DNS query).
    #[arg(long, requires = "health", value_name = "HEX")]
    health_payload_hex: Option<String>,
    /// true: healthy only if the backend answers the UDP probe within the timeout; false:
    /// healthy unless an ICMP port-unreachable comes back (needs an interval of at least
    /// 1000 ms) [default: true with a payload, false without]
    #[arg(long, requires = "health", value_name = "BOOL", action = clap::ArgAction::Set)]
    health_expect_reply: Option<bool>,
}

impl HealthArgs {
    fn spec(&self) -> Result<Option<HealthSpec>> {
        let Some(kind) = self.health else {
            return Ok(None);
        };
        let udp_options = self.health_payload.is_some()
            || self.health_payload_hex.is_some()
            || self.health_expect_reply.is_some();
        if kind != ProbeArg::Http && self.health_host.is_some() {
            bail!("--health-host only applies to --health http");
        }
        if kind != ProbeArg::Udp && udp_options {
            bail!(
                "--health-payload, --health-payload-hex and --health-expect-reply only apply to --health udp"
            );
        }
        let probe = match kind {
            ProbeArg::Tcp => Probe::Tcp,
            ProbeArg::Http => Probe::Http {
                path: self.health_path.clone(),
                expect_status: self.health_status,
                host: self.health_host.clone(),
            },
            ProbeArg::Udp => {
                let payload = match (&self.health_payload, &self.health_payload_hex) {
                    (Some(text), _) => text.as_bytes().to_vec(),
                    (None, Some(hex)) => {
                        decode_hex(hex).map_err(|e| anyhow!("--health-payload-hex: {e}"))?
                    }
                    (None, None) => Vec::new(),
                };
                // A payload of the operator's choosing is one the service answers; an empty
                // datagram only finds out whether the port is closed.
                Probe::Udp {
                    expect_reply: self.health_expect_reply.unwrap_or(!payload.is_empty()),
                    payload,
                }
            }
        };
        Ok(Some(HealthSpec {
            probe,
            interval: Duration::from_millis(self.health_interval_ms),
            timeout: Duration::from_millis(self.health_timeout_ms),
            rise: self.health_rise,
            fall: self.health_fall,
        }))
    }
}

/// Idle timeouts of `xlb vip add` and `xlb vip set`: one per protocol, so the flag says which kind of flow it
/// is about; only the VIP's own applies.
#[derive(clap::Args)]
pub struct TimeoutArgs {
    /// A TCP VIP's connections idle this many seconds are forgotten: their next packet is
    /// balanced afresh (10-604800) [default: 300]. Closed connections go 10 s after their
    /// last packet; a SYN always gets a fresh choice.
    #[arg(long, value_name = "SECS", conflicts_with = "udp_timeout")]
    tcp_timeout: Option<u64>,
    /// A UDP VIP's flows idle this many seconds are forgotten: their next datagram is
    /// balanced afresh (1-604800) [default: 60].
    #[arg(long, value_name = "SECS")]
    udp_timeout: Option<u64>,
}

impl TimeoutArgs {
    fn idle_timeout_s(&self, vip: &VipSpec) -> Result<Option<u32>> {
        let (given, flag, other) = match vip.proto {
            Protocol::Tcp => (self.tcp_timeout, "--tcp-timeout", self.udp_timeout),
            Protocol::Udp => (self.udp_timeout, "--udp-timeout", self.tcp_timeout),
        };
        if other.is_some() {
            bail!("{vip} is a {} VIP: give it {flag}", vip.proto);
        }
        given
            .map(|secs| validate_idle_timeout(vip.proto, secs).map_err(|e| anyhow!("{flag}: {e}")))
            .transpose()
    }
}

#[derive(Subcommand)]
pub enum VipCommand {
    /// Add a VIP: ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp).
    #[command(
        after_help = "Examples:\n  xlb vip add 192.0.2.10:80/tcp\n  xlb vip add [2001:db8::10]:53/udp\n  xlb vip add 192.0.2.10:443/tcp --forwarding ipip   # direct server return\n  xlb vip add 192.0.2.10:22/tcp --tcp-timeout 3600\n  xlb vip add 192.0.2.53:53/udp --udp-timeout 10\n  xlb vip add 192.0.2.10:80/tcp --health http --health-path /healthz --health-fall 2\n  xlb vip add 192.0.2.10:80/tcp --health http --health-host www.example\n  xlb vip add 192.0.2.53:53/udp --health udp\n  xlb vip add 192.0.2.53:5000/udp --health udp --health-payload ping"
    )]
    Add {
        /// The VIP: ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp).
        vip: VipSpec,
        /// How packets reach the backends: nat rewrites them to the backend's address and
        /// port (replies come back through xlb); ipip and gue are direct server return: the
        /// client's packet, unchanged, tunnelled to the backend on the VIP's port, which
        /// answers the client itself (see `xlb backend prepare`).
        #[arg(long, default_value = "nat", value_parser = parse_forwarding)]
        forwarding: Forwarding,
        #[command(flatten)]
        timeouts: TimeoutArgs,
        #[command(flatten)]
        health: HealthArgs,
        /// Change an agent that runs from a --config file anyway (until its next reload).
        #[arg(long)]
        force: bool,
    },
    /// Change a VIP's idle timeout or health checks in place: its backends and their
    /// established flows stay (one change, applied whole or not at all).
    #[command(
        after_help = "Examples:\n  xlb vip set 192.0.2.10:80/tcp --tcp-timeout 900\n  xlb vip set 192.0.2.10:80/tcp --health http --health-path /healthz\n  xlb vip set 192.0.2.10:80/tcp --no-health --default-timeout"
    )]
    Set {
        /// The VIP: ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp).
        vip: VipSpec,
        #[command(flatten)]
        timeouts: TimeoutArgs,
        /// Back to the protocol's default idle timeout (TCP 300 s, UDP 60 s).
        #[arg(long, conflicts_with_all = ["tcp_timeout", "udp_timeout"])]
        default_timeout: bool,
        #[command(flatten)]
        health: HealthArgs,
        /// Stop checking the VIP's backends: every backend counts as healthy again.
        #[arg(long, conflicts_with = "health")]
        no_health: bool,
        /// Refused: a VIP's forwarding method does not change in place (see the error).
        #[arg(long, hide = true, value_parser = parse_forwarding)]
        forwarding: Option<Forwarding>,
        /// Change an agent that runs from a --config file anyway (until its next reload).
        #[arg(long)]
        force: bool,
    },
    /// Remove a VIP and its backends.
    #[command(after_help = "Example:\n  xlb vip del 192.0.2.10:80/tcp")]
    Del {
        /// The VIP: ADDR:PORT[/tcp|/udp] (IPv6 as [2001:db8::1]:443/tcp).
        vip: VipSpec,
        /// Change an agent that runs from a --config file anyway (until its next reload).
        #[arg(long)]
        force: bool,
    },
    /// List VIPs.
    #[command(after_help = "Examples:\n  xlb vip list\n  xlb vip list --json")]
    List {
        /// Print JSON (for scripts) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `--forwarding`: nat, ipip or gue.
fn parse_forwarding(text: &str) -> Result<Forwarding, String> {
    text.parse().map_err(|e| format!("{e}"))
}

/// Why `vip set --forwarding` is refused, and what to do instead.
fn forwarding_is_fixed(vip: &VipSpec, to: Forwarding) -> anyhow::Error {
    anyhow!(
        "a VIP's forwarding method does not change in place (its established flows could not \
         go on either way): `xlb vip del {vip}`, then `xlb vip add {vip} --forwarding {to}` and \
         its backends again; from a config file, change forwarding and `xlb reload` (which \
         replaces its backends)"
    )
}

impl VipCommand {
    const fn force(&self) -> bool {
        match self {
            Self::Add { force, .. } | Self::Set { force, .. } | Self::Del { force, .. } => *force,
            Self::List { .. } => false,
        }
    }
}

pub fn run(client: Client<'_>, command: VipCommand) -> Result<()> {
    let client = client.forcing(command.force());
    match command {
        VipCommand::Add {
            vip,
            forwarding,
            timeouts,
            health,
            ..
        } => {
            let idle_timeout_s = timeouts.idle_timeout_s(&vip)?;
            let health = health.spec()?;
            if let Some(spec) = &health {
                spec.validate_for(&vip).context("invalid health check")?;
            }
            client.vip_add(vip, health.clone(), idle_timeout_s, forwarding)?;
            let mut notes = Vec::new();
            if forwarding.is_dsr() {
                notes.push(format!("forwarding {}", forwarding.describe()));
            }
            if let Some(spec) = health {
                notes.push(format!("health checks: {}", spec.probe));
            }
            if notes.is_empty() {
                println!("added VIP {vip}");
            } else {
                println!("added VIP {vip} ({})", notes.join("; "));
            }
        }
        VipCommand::Set {
            vip,
            timeouts,
            default_timeout,
            health,
            no_health,
            forwarding,
            ..
        } => {
            if let Some(to) = forwarding {
                return Err(forwarding_is_fixed(&vip, to));
            }
            let idle_timeout_s = match (timeouts.idle_timeout_s(&vip)?, default_timeout) {
                (Some(secs), _) => Setting::To(secs),
                (None, true) => Setting::Default,
                (None, false) => Setting::Keep,
            };
            let health = match (health.spec()?, no_health) {
                (Some(spec), _) => {
                    spec.validate_for(&vip).context("invalid health check")?;
                    Setting::To(spec)
                }
                (None, true) => Setting::Default,
                (None, false) => Setting::Keep,
            };
            if idle_timeout_s == Setting::Keep && health == Setting::Keep {
                bail!(
                    "nothing to change: give --{}-timeout SECS, --default-timeout, --health KIND or --no-health",
                    vip.proto
                );
            }
            let mut changed = Vec::new();
            match &idle_timeout_s {
                Setting::To(secs) => changed.push(format!("idle timeout {secs} s")),
                Setting::Default => changed.push(format!(
                    "idle timeout {} s (the default)",
                    vip.proto.default_idle_timeout_s()
                )),
                Setting::Keep => {}
            }
            match &health {
                Setting::To(spec) => changed.push(format!("health checks: {}", spec.probe)),
                Setting::Default => changed.push("no health checks".to_owned()),
                Setting::Keep => {}
            }
            client.vip_set(
                vip,
                VipSettings {
                    health,
                    idle_timeout_s,
                },
            )?;
            println!("updated VIP {vip}: {}", changed.join(", "));
        }
        VipCommand::Del { vip, .. } => {
            client.vip_del(vip)?;
            println!("removed VIP {vip}");
        }
        VipCommand::List { json } => {
            let vips = client.vip_list()?;
            if json {
                print_json(&vips);
            } else {
                print_vips(&vips);
            }
        }
    }
    Ok(())
}
