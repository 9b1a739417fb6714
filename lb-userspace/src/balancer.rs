//! The balancer over the kernel's maps: `xlb_core::balancer::Balancer` (the model and the
//! order of every map write) carried out by [`Datapath`], plus what only the kernel can
//! answer: live flows and tracked flows from the connection table, and the egress devmap.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::FlowKey;
use xlb_core::health::HealthSpec;
pub use xlb_core::{
    balancer::{Adoption, Applied},
    model::{
        BackendConfig, BackendState, BackendStatus, Conns, DesiredState, Explanation, Forwarding,
        IdleTimeoutError, MAX_WEIGHT, ParseForwardingError, ParseVipError, Protocol, Setting,
        TrackedFlow, VipConfig, VipSettings, VipSpec, VipStatus, validate_idle_timeout,
    },
};

use crate::datapath::{Datapath, DatapathError};

/// Why a balancer change was refused or failed; a failing map update is
/// [`BalancerError::Datapath`].
pub type BalancerError = xlb_core::limits::BalancerError<DatapathError>;

impl From<DatapathError> for BalancerError {
    fn from(e: DatapathError) -> Self {
        Self::Datapath(e)
    }
}

type Result<T, E = BalancerError> = std::result::Result<T, E>;

/// [`xlb_core::limits::check_limits`], with a map update failure as the error's other case.
///
/// # Errors
/// The first limit or rule `state` breaks.
pub fn check_limits(state: &DesiredState, max_vips: u32, ring_size: u32) -> Result<()> {
    xlb_core::limits::check_limits(state, max_vips, ring_size)
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of `FlowState::last_seen_ns`
/// (`bpf_ktime_get_coarse_ns`).
fn monotonic_coarse_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(u64::MAX)
}

/// The balancer's operations, documented on `xlb_core::balancer::Balancer`, carried out
/// on the loaded data path.
pub struct Balancer {
    core: xlb_core::balancer::Balancer<Datapath>,
}

impl Balancer {
    #[must_use]
    pub const fn new(datapath: Datapath) -> Self {
        let config = datapath.config();
        Self {
            core: xlb_core::balancer::Balancer::new(datapath, config.max_vips, config.ring_size),
        }
    }

    #[must_use]
    pub const fn datapath(&self) -> &Datapath {
        self.core.maps()
    }

    pub const fn datapath_mut(&mut self) -> &mut Datapath {
        self.core.maps_mut()
    }

    /// # Errors
    /// As [`check_limits`].
    pub fn check_limits(&self, state: &DesiredState) -> Result<()> {
        self.core.check_limits(state)
    }

    /// # Errors
    /// The VIP exists already, or no slot is free.
    pub fn add_vip(&mut self, vip: VipSpec) -> Result<()> {
        self.core.add_vip(vip)
    }

    /// # Errors
    /// The VIP exists already, an idle timeout out of range, or no slot is free.
    pub fn add_vip_with_timeout(
        &mut self,
        vip: VipSpec,
        idle_timeout_s: Option<u32>,
    ) -> Result<()> {
        self.core.add_vip_with_timeout(vip, idle_timeout_s)
    }

    /// # Errors
    /// The VIP exists already, an idle timeout out of range, or no slot is free.
    pub fn add_vip_with(
        &mut self,
        vip: VipSpec,
        idle_timeout_s: Option<u32>,
        forwarding: Forwarding,
    ) -> Result<()> {
        self.core.add_vip_with(vip, idle_timeout_s, forwarding)
    }

    /// The backend `given` names for `vip` (port 0: the VIP's port, for a direct-server-
    /// return VIP).
    ///
    /// # Errors
    /// Unknown VIP; port 0 for a NAT VIP.
    pub fn resolve_backend(&self, vip: &VipSpec, given: SocketAddr) -> Result<SocketAddr> {
        self.core.resolve_backend(vip, given)
    }

    /// # Errors
    /// Unknown VIP.
    pub fn forwarding(&self, vip: &VipSpec) -> Result<Forwarding> {
        self.core.forwarding(vip)
    }

    /// # Errors
    /// Unknown VIP, a timeout out of range, or the map update failing.
    pub fn set_vip_idle_timeout(
        &mut self,
        vip: &VipSpec,
        idle_timeout_s: Option<u32>,
    ) -> Result<bool> {
        self.core.set_vip_idle_timeout(vip, idle_timeout_s)
    }

    /// # Errors
    /// Unknown VIP, a timeout out of range, or a map update failing (undone).
    pub fn set_vip(&mut self, vip: &VipSpec, settings: &VipSettings) -> Result<bool> {
        self.core.set_vip(vip, settings)
    }

    /// # Errors
    /// Unknown VIP, or a map update failing.
    pub fn remove_vip(&mut self, vip: &VipSpec) -> Result<()> {
        self.core.remove_vip(vip)
    }

    /// # Errors
    /// Unknown VIP, duplicate backend, family mismatch, bad weight, no free id.
    pub fn add_backend(&mut self, vip: &VipSpec, backend: SocketAddr, weight: u32) -> Result<()> {
        self.core.add_backend(vip, backend, weight)
    }

    /// # Errors
    /// Unknown VIP or backend, or a map update failing.
    pub fn remove_backend(&mut self, vip: &VipSpec, backend: SocketAddr) -> Result<()> {
        self.core.remove_backend(vip, backend)
    }

    /// # Errors
    /// Unknown VIP or backend, bad weight, or a map update failing.
    pub fn update_backend(
        &mut self,
        vip: &VipSpec,
        backend: SocketAddr,
        weight: Option<u32>,
        state: Option<BackendState>,
    ) -> Result<()> {
        self.core.update_backend(vip, backend, weight, state)
    }

    /// # Errors
    /// Unknown VIP or backend, or a map update failing.
    pub fn set_health(
        &mut self,
        vip: &VipSpec,
        backend: SocketAddr,
        healthy: bool,
    ) -> Result<bool> {
        self.core.set_health(vip, backend, healthy)
    }

    /// # Errors
    /// Unknown VIP or backend.
    pub fn set_backend_container(
        &mut self,
        vip: &VipSpec,
        backend: SocketAddr,
        name: Option<String>,
        discovered: bool,
    ) -> Result<()> {
        self.core
            .set_backend_container(vip, backend, name, discovered)
    }

    /// # Errors
    /// Unknown VIP or backend, or a map update failing.
    pub fn set_container_running(
        &mut self,
        vip: &VipSpec,
        backend: SocketAddr,
        running: bool,
    ) -> Result<bool> {
        self.core.set_container_running(vip, backend, running)
    }

    /// # Errors
    /// Unknown VIP or backend, the new address invalid or taken, or a map update failing
    /// (undone).
    pub fn move_backend(
        &mut self,
        vip: &VipSpec,
        from: SocketAddr,
        to: SocketAddr,
    ) -> Result<Applied> {
        self.core.move_backend(vip, from, to)
    }

    /// # Errors
    /// Unknown VIP.
    pub fn set_vip_health(&mut self, vip: &VipSpec, health: Option<HealthSpec>) -> Result<()> {
        self.core.set_vip_health(vip, health)
    }

    #[must_use]
    pub fn health_targets(&self) -> Vec<(VipSpec, Option<HealthSpec>, Vec<SocketAddr>)> {
        self.core.health_targets()
    }

    #[must_use]
    pub fn vip_readiness(&self) -> Vec<(VipSpec, bool)> {
        self.core.vip_readiness()
    }

    #[must_use]
    pub fn vip_specs(&self) -> Vec<VipSpec> {
        self.core.vip_specs()
    }

    #[must_use]
    pub fn desired_state(&self) -> DesiredState {
        self.core.desired_state()
    }

    /// # Errors
    /// An invalid desired state (duplicates, bad weights, no free id) or a map access
    /// failing.
    ///
    /// # Panics
    /// If the balancer has VIPs already.
    pub fn adopt(&mut self, state: &DesiredState) -> Result<Adoption> {
        self.core.adopt(state)
    }

    /// Makes the balancer hold `wanted`, all of it or nothing (see
    /// `xlb_core::balancer::Balancer::apply`).
    ///
    /// # Errors
    /// `wanted` breaking a limit or rule (nothing written), or a map update failing (undone;
    /// [`BalancerError::PartlyApplied`] when undoing failed too).
    pub fn apply(&mut self, wanted: &DesiredState) -> Result<Applied> {
        self.core.apply(wanted)
    }

    /// # Errors
    /// Unknown VIP or a failing map read.
    pub fn vip_status(&self, vip: &VipSpec) -> Result<VipStatus> {
        self.core.vip_status(vip)
    }

    /// # Errors
    /// A failing map read.
    pub fn status(&self) -> Result<Vec<VipStatus>> {
        self.core.status()
    }

    /// Adds the interface to the set the data plane may redirect to.
    ///
    /// # Errors
    /// The devmap refusing the interface (e.g. it does not support XDP redirect).
    pub fn allow_egress(&mut self, ifindex: u32) -> Result<()> {
        self.datapath_mut()
            .egress_ports()?
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| DatapathError::Egress { ifindex, source }.into())
    }

    /// Live flows per backend id: connection-table entries that are neither closing nor
    /// idle past their VIP's timeout (`FlowState::is_live`, the data plane's own rule). An
    /// LRU keeps finished flows until it needs the room, so that rule is what tells a
    /// draining backend's remaining flows from ones that ended.
    ///
    /// # Errors
    /// A failing map read.
    pub fn live_flows(&self) -> Result<BTreeMap<u32, u64>> {
        let now = monotonic_coarse_ns();
        let timeouts = self.core.backend_idle_timeouts();
        let mut counts = BTreeMap::new();
        self.datapath().for_each_flow(|_, state| {
            if let Some(timeout) = timeouts.get(&state.backend_id)
                && state.is_live(now, *timeout)
            {
                *counts.entry(state.backend_id).or_default() += 1;
            }
        })?;
        Ok(counts)
    }

    /// As `vip_status`, with each backend's live flows counted.
    ///
    /// # Errors
    /// Unknown VIP or a failing map read.
    pub fn vip_status_with_flows(&self, vip: &VipSpec) -> Result<VipStatus> {
        let mut status = self.vip_status(vip)?;
        let flows = self.live_flows()?;
        for b in &mut status.backends {
            b.live_flows = Some(flows.get(&b.id).copied().unwrap_or(0));
        }
        Ok(status)
    }

    /// The connection table's entries for `vip` (only those to `backend`, if given): how
    /// many there are, and the first `limit` of them in the table's order, sorted by client.
    ///
    /// # Errors
    /// Unknown VIP, a backend not behind it, or a failing map read.
    pub fn conns(&self, vip: &VipSpec, backend: Option<SocketAddr>, limit: usize) -> Result<Conns> {
        let status = self.vip_status(vip)?;
        if let Some(backend) = backend
            && !status.backends.iter().any(|b| b.addr == backend)
        {
            return Err(BalancerError::UnknownBackend { vip: *vip, backend });
        }
        let by_id: BTreeMap<u32, SocketAddr> =
            status.backends.iter().map(|b| (b.id, b.addr)).collect();
        let wanted = FlowKey::new(vip.addr, vip.addr, vip.proto.number());
        let now = monotonic_coarse_ns();
        let mut conns = Conns {
            vip: *vip,
            total: 0,
            flows: Vec::new(),
        };
        self.datapath().for_each_flow(|key, state| {
            if (key.dst, key.dport_be, key.proto) != (wanted.dst, wanted.dport_be, wanted.proto) {
                return;
            }
            let to = by_id.get(&state.backend_id).copied();
            if backend.is_some() && to != backend {
                return;
            }
            conns.total += 1;
            if conns.flows.len() < limit {
                conns.flows.push(TrackedFlow {
                    client: SocketAddr::new(
                        lb_common::addr::from_bytes(&key.src),
                        u16::from_be(key.sport_be),
                    ),
                    backend: to,
                    state: flow_state_name(vip.proto, state.closing).to_owned(),
                    idle_s: now.saturating_sub(state.last_seen_ns) / 1_000_000_000,
                    live: to.is_some() && state.is_current(now, status.idle_timeout_s),
                });
            }
        })?;
        conns.flows.sort_by_key(|f| f.client);
        Ok(conns)
    }

    /// Which backend a flow from `client` to `vip` gets, by the kernel's hash and ring, and
    /// which one the connection table holds for it.
    ///
    /// # Errors
    /// Unknown VIP, family mismatch, or a failing map read.
    pub fn explain(&self, client: SocketAddr, vip: &VipSpec) -> Result<Explanation> {
        let datapath = self.datapath();
        let tracked = |key: &FlowKey| datapath.flow(key);
        self.core.explain(
            client,
            vip,
            datapath.config().hash_seed,
            tracked,
            monotonic_coarse_ns(),
        )
    }
}

/// A connection-table entry's `closing` bits in words.
const fn flow_state_name(proto: Protocol, closing: u8) -> &'static str {
    use lb_common::{CLOSE_FIN_FROM_BACKEND, CLOSE_FIN_FROM_CLIENT, CLOSE_RESET};
    if matches!(proto, Protocol::Udp) {
        return "udp";
    }
    if closing & CLOSE_RESET != 0 {
        return "reset";
    }
    match closing & (CLOSE_FIN_FROM_CLIENT | CLOSE_FIN_FROM_BACKEND) {
        0 => "established",
        CLOSE_FIN_FROM_CLIENT => "fin from client",
        CLOSE_FIN_FROM_BACKEND => "fin from backend",
        _ => "closed",
    }
}
