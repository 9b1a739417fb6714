//! The balancer's desired state (VIPs, their backends and weights) and how it is programmed
//! into the data plane's maps: id allocation, Maglev rings written aside and switched in one
//! map update, backend entries, counters.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, Backend, EndpointVip, FlowKey, MAX_BACKENDS,
    PORT_HAS_SHARED_ENDPOINT, PORT_IS_BACKEND, PORT_IS_VIP, TrafficCounters, VipInfo, VipKey,
    addr::to_bytes,
    hash::flow_hash,
    maglev::{MaglevBackend, build_ring},
};
pub use xlb_core::model::{
    BackendConfig, BackendState, BackendStatus, DesiredState, Explanation, IdleTimeoutError,
    MAX_WEIGHT, ParseVipError, Protocol, VipConfig, VipSpec, VipStatus, validate_idle_timeout,
};
use xlb_core::{
    health::HealthSpec,
    ids::IdPool,
    limits::{family, validate_backend, validate_vip_timeout, validate_weight},
    plan::{self, MapContents, MapWrite, ServiceKey, choose_half, ring_base},
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

#[derive(Debug)]
struct BackendEntry {
    id: u32,
    weight: u32,
    state: BackendState,
    /// Failing health checks take a backend out of the ring and end its flows, whatever
    /// its state; it returns when the checks pass again.
    healthy: bool,
}

impl VipEntry {
    /// The timeout the data plane applies to the VIP's flows.
    fn idle_timeout_s(&self, proto: Protocol) -> u32 {
        self.idle_timeout_s
            .unwrap_or_else(|| proto.default_idle_timeout_s())
    }
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of `FlowState::last_seen_ns`
/// (`bpf_ktime_get_coarse_ns`).
fn monotonic_coarse_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(u64::MAX)
}

impl BackendEntry {
    /// What the data plane is told about the backend.
    const fn flags(&self) -> u8 {
        match (self.healthy, self.state) {
            (false, _) => 0,
            (true, BackendState::Active) => BACKEND_ACTIVE,
            (true, BackendState::Draining) => BACKEND_DRAINING,
        }
    }

    /// Whether it owns ring slots (takes new flows).
    fn in_ring(&self) -> bool {
        self.healthy && self.state == BackendState::Active
    }
}

#[derive(Debug)]
struct VipEntry {
    id: u32,
    health: Option<HealthSpec>,
    /// Seconds; `None`: the protocol's default.
    idle_timeout_s: Option<u32>,
    /// Which half of the VIP's double buffer is live.
    live_half: usize,
    /// What each half holds, so a rebuild only writes the slots that change.
    halves: [Vec<u32>; 2],
    backends: BTreeMap<SocketAddr, BackendEntry>,
}

pub struct Balancer {
    datapath: Datapath,
    vips: BTreeMap<VipSpec, VipEntry>,
    /// How many VIPs and backends use each port: the data plane's `XLB_PORTS` filter.
    port_users: BTreeMap<u16, PortUsers>,
    /// The VIPs each backend endpoint serves, oldest first: the data plane's
    /// `XLB_ENDPOINTS` (see `lb_common::EndpointVip`).
    endpoint_vips: BTreeMap<(SocketAddr, Protocol), Vec<VipSpec>>,
    vip_ids: IdPool,
    backend_ids: IdPool,
}

#[derive(Clone, Copy, Debug, Default)]
struct PortUsers {
    vips: u32,
    backends: u32,
}

impl PortUsers {
    const fn roles(self) -> u8 {
        (if self.vips > 0 { PORT_IS_VIP } else { 0 })
            | (if self.backends > 0 {
                PORT_IS_BACKEND
            } else {
                0
            })
    }
}

impl Balancer {
    #[must_use]
    pub fn new(datapath: Datapath) -> Self {
        let max_vips = datapath.config().max_vips;
        Self {
            datapath,
            vips: BTreeMap::new(),
            port_users: BTreeMap::new(),
            endpoint_vips: BTreeMap::new(),
            vip_ids: IdPool::new(max_vips),
            backend_ids: IdPool::new(MAX_BACKENDS),
        }
    }

    #[must_use]
    pub const fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    pub const fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    /// Counts one more (or, with `delta` -1, one fewer) VIP or backend on `port` and writes
    /// the port's roles to the data plane when they change. Called before a VIP or backend
    /// entry is written and after one is removed, so the filter never hides a live entry.
    fn use_port(&mut self, port: u16, vip: bool, delta: i32) -> Result<(), DatapathError> {
        let before = self.port_roles(port);
        let users = self.port_users.entry(port).or_default();
        let count = if vip {
            &mut users.vips
        } else {
            &mut users.backends
        };
        *count = count.saturating_add_signed(delta);
        if users.roles() == 0 {
            self.port_users.remove(&port);
        }
        let after = self.port_roles(port);
        if before != after {
            self.write_port_roles(port, after)?;
        }
        Ok(())
    }

    /// The `XLB_PORTS` entry `port` should hold: its VIP and backend roles, and whether an
    /// endpoint on it serves several VIPs.
    fn port_roles(&self, port: u16) -> u8 {
        let users = self.port_users.get(&port).map_or(0, |u| u.roles());
        let shared = self
            .endpoint_vips
            .iter()
            .any(|((addr, _), vips)| addr.port() == port && vips.len() > 1);
        users | if shared { PORT_HAS_SHARED_ENDPOINT } else { 0 }
    }

    fn write_port_roles(&mut self, port: u16, roles: u8) -> Result<(), DatapathError> {
        self.datapath
            .ports()?
            .set(u32::from(port), &roles, 0)
            .map_err(|source| DatapathError::Map {
                name: lb_common::map_names::PORTS,
                source,
            })
    }

    /// Records that `backend` serves `vip` (`join`) or no longer does, and writes the
    /// endpoint's entry: the oldest VIP it serves and how many. Called before a backend entry
    /// is written and after one is removed.
    fn update_endpoint(
        &mut self,
        backend: SocketAddr,
        vip: VipSpec,
        join: bool,
    ) -> Result<(), DatapathError> {
        let port = backend.port();
        let roles_before = self.port_roles(port);
        let list = self.endpoint_vips.entry((backend, vip.proto)).or_default();
        if join {
            list.push(vip);
        } else {
            list.retain(|v| *v != vip);
        }
        let first = list.first().copied();
        let vips = list.len();
        if first.is_none() {
            self.endpoint_vips.remove(&(backend, vip.proto));
        }
        // A port that gains "shared" says so before the endpoint entry does; one that loses
        // it, after: a new flow never skips a reverse entry its replies need.
        let roles_after = self.port_roles(port);
        if roles_after & !roles_before != 0 {
            self.write_port_roles(port, roles_after)?;
        }
        let key = VipKey::new(backend, vip.proto.number());
        let err = |source| DatapathError::Map {
            name: lb_common::map_names::ENDPOINTS,
            source,
        };
        match first {
            Some(first) => self
                .datapath
                .endpoints()?
                .insert(&key, &endpoint_entry(first, vips), 0)
                .map_err(err)?,
            None => match self.datapath.endpoints()?.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(err(source)),
            },
        }
        if roles_before & !roles_after != 0 {
            self.write_port_roles(port, roles_after)?;
        }
        Ok(())
    }

    fn ring_size(&self) -> u32 {
        self.datapath.config().ring_size
    }

    /// [`check_limits`] against this agent's data plane.
    ///
    /// # Errors
    /// As [`check_limits`].
    pub fn check_limits(&self, state: &DesiredState) -> Result<()> {
        let config = self.datapath.config();
        check_limits(state, config.max_vips, config.ring_size)
    }

    /// Adds a VIP whose flows idle out after the protocol's default timeout.
    ///
    /// # Errors
    /// The VIP exists already, or no slot is free.
    pub fn add_vip(&mut self, vip: VipSpec) -> Result<()> {
        self.add_vip_with_timeout(vip, None)
    }

    /// Adds a VIP whose flows idle out after `idle_timeout_s` seconds (`None`: the default).
    ///
    /// # Errors
    /// The VIP exists already, an idle timeout out of range, or no slot is free.
    pub fn add_vip_with_timeout(
        &mut self,
        vip: VipSpec,
        idle_timeout_s: Option<u32>,
    ) -> Result<()> {
        if self.vips.contains_key(&vip) {
            return Err(BalancerError::DuplicateVip(vip));
        }
        validate_vip_timeout(&vip, idle_timeout_s)?;
        let max = self.datapath.config().max_vips;
        let id = self
            .vip_ids
            .take()
            .ok_or(BalancerError::VipSlotsExhausted(max))?;
        let entry = VipEntry {
            id,
            health: None,
            idle_timeout_s,
            live_half: 0,
            halves: [Vec::new(), Vec::new()],
            backends: BTreeMap::new(),
        };
        let written = self
            .datapath
            .reset_vip_traffic(id)
            .and_then(|()| self.use_port(vip.addr.port(), true, 1))
            .and_then(|()| self.write_vip_info(&vip, &entry));
        if let Err(e) = written {
            self.vip_ids.give_back(id);
            return Err(e.into());
        }
        self.vips.insert(vip, entry);
        Ok(())
    }

    /// Sets (`None`: back to the default) how long the VIP's flows may idle. Returns whether
    /// it changed. The new value reaches the data plane in one `VipInfo` update, the way a
    /// ring switch does; flows are judged by it from their next packet on.
    ///
    /// # Errors
    /// Unknown VIP, a timeout out of range, or the map update failing.
    pub fn set_vip_idle_timeout(
        &mut self,
        vip: &VipSpec,
        idle_timeout_s: Option<u32>,
    ) -> Result<bool> {
        validate_vip_timeout(vip, idle_timeout_s)?;
        let entry = self
            .vips
            .get_mut(vip)
            .ok_or(BalancerError::UnknownVip(*vip))?;
        if entry.idle_timeout_s == idle_timeout_s {
            return Ok(false);
        }
        let before = std::mem::replace(&mut entry.idle_timeout_s, idle_timeout_s);
        let entry = self.vips.remove(vip).expect("checked above");
        let written = self.write_vip_info(vip, &entry);
        self.vips.insert(*vip, entry);
        if let Err(e) = written {
            self.vips.get_mut(vip).expect("put back").idle_timeout_s = before;
            return Err(e.into());
        }
        Ok(true)
    }

    fn write_vip_info(&mut self, vip: &VipSpec, entry: &VipEntry) -> Result<(), DatapathError> {
        let ring_size = self.ring_size();
        let live = &entry.halves[entry.live_half];
        let info = VipInfo {
            vip_id: entry.id,
            ring_base: ring_base(entry.id, entry.live_half, ring_size),
            ring_size: if live.is_empty() { 0 } else { ring_size },
            idle_timeout_s: entry.idle_timeout_s(vip.proto),
        };
        self.datapath
            .vips()?
            .insert(&VipKey::new(vip.addr, vip.proto.number()), &info, 0)
            .map_err(|source| DatapathError::Map {
                name: lb_common::map_names::VIPS,
                source,
            })
    }

    /// Removes a VIP and all its backends. Packets to it pass to the stack from then on.
    ///
    /// # Errors
    /// Unknown VIP, or a map update failing.
    pub fn remove_vip(&mut self, vip: &VipSpec) -> Result<()> {
        let entry = self
            .vips
            .remove(vip)
            .ok_or(BalancerError::UnknownVip(*vip))?;
        let key = VipKey::new(vip.addr, vip.proto.number());
        self.datapath
            .vips()?
            .remove(&key)
            .map_err(|source| DatapathError::Map {
                name: lb_common::map_names::VIPS,
                source,
            })?;
        self.use_port(vip.addr.port(), true, -1)?;
        for (addr, backend) in &entry.backends {
            self.release_backend(vip, backend.id, *addr)?;
        }
        self.vip_ids.give_back(entry.id);
        Ok(())
    }

    /// Adds a backend to a VIP and rebuilds its ring.
    ///
    /// # Errors
    /// Unknown VIP, duplicate backend, family mismatch, bad weight, no free id.
    pub fn add_backend(&mut self, vip: &VipSpec, backend: SocketAddr, weight: u32) -> Result<()> {
        let entry = self.vips.get(vip).ok_or(BalancerError::UnknownVip(*vip))?;
        validate_backend(vip, backend, weight, &entry.backends)?;
        let vip_id = entry.id;
        let id = self
            .backend_ids
            .take()
            .ok_or(BalancerError::BackendSlotsExhausted(MAX_BACKENDS))?;
        if let Err(e) = self
            .use_port(backend.port(), false, 1)
            .and_then(|()| self.update_endpoint(backend, *vip, true))
            .map_err(BalancerError::from)
            .and_then(|()| self.write_backend(id, vip_id, backend, BACKEND_ACTIVE))
        {
            self.backend_ids.give_back(id);
            return Err(e);
        }
        self.vips
            .get_mut(vip)
            .expect("checked above")
            .backends
            .insert(
                backend,
                BackendEntry {
                    id,
                    weight,
                    state: BackendState::Active,
                    healthy: true,
                },
            );
        self.rebuild_ring(vip)
    }

    /// A new backend's entry, its id's counters zeroed first (the id may have served a
    /// removed backend).
    fn write_backend(&mut self, id: u32, vip_id: u32, addr: SocketAddr, flags: u8) -> Result<()> {
        self.datapath.reset_backend_slots(id)?;
        self.write_flags(id, vip_id, addr, flags)
    }

    /// Removes a backend: its ring slots move to the others, and its established flows are
    /// re-balanced on their next packet (use `drain` to let them finish instead).
    ///
    /// # Errors
    /// Unknown VIP or backend, or a map update failing.
    pub fn remove_backend(&mut self, vip: &VipSpec, backend: SocketAddr) -> Result<()> {
        let entry = self
            .vips
            .get_mut(vip)
            .ok_or(BalancerError::UnknownVip(*vip))?;
        let removed = entry
            .backends
            .remove(&backend)
            .ok_or(BalancerError::UnknownBackend { vip: *vip, backend })?;
        // Ring first, so no packet can pick the backend after its entry is cleared.
        self.rebuild_ring(vip)?;
        self.release_backend(vip, removed.id, backend)
    }

    /// Clears a removed backend's entry (its flows stop matching), keeps its traffic in the
    /// VIP's totals, frees its id and its port.
    fn release_backend(&mut self, vip: &VipSpec, id: u32, addr: SocketAddr) -> Result<()> {
        self.datapath
            .backends()?
            .set(id, &Backend::default(), 0)
            .map_err(|source| DatapathError::Map {
                name: lb_common::map_names::BACKENDS,
                source,
            })?;
        if let Some(vip_id) = self.vips.get(vip).map(|e| e.id) {
            self.datapath.retire_backend_traffic(id, vip_id)?;
        }
        self.backend_ids.give_back(id);
        self.use_port(addr.port(), false, -1)?;
        self.update_endpoint(addr, *vip, false)?;
        Ok(())
    }

    /// Changes a backend's weight or state and rebuilds the ring.
    ///
    /// # Errors
    /// Unknown VIP or backend, bad weight, or a map update failing.
    pub fn update_backend(
        &mut self,
        vip: &VipSpec,
        backend: SocketAddr,
        weight: Option<u32>,
        state: Option<BackendState>,
    ) -> Result<()> {
        if let Some(w) = weight {
            validate_weight(w)?;
        }
        self.change_backend(vip, backend, |b| {
            if let Some(w) = weight {
                b.weight = w;
            }
            if let Some(s) = state {
                b.state = s;
            }
        })
    }

    /// Records a health-check verdict. Returns whether anything changed.
    ///
    /// # Errors
    /// Unknown VIP or backend, or a map update failing.
    pub fn set_health(
        &mut self,
        vip: &VipSpec,
        backend: SocketAddr,
        healthy: bool,
    ) -> Result<bool> {
        let entry = self.vips.get(vip).ok_or(BalancerError::UnknownVip(*vip))?;
        let b = entry
            .backends
            .get(&backend)
            .ok_or(BalancerError::UnknownBackend { vip: *vip, backend })?;
        if b.healthy == healthy {
            return Ok(false);
        }
        self.change_backend(vip, backend, |b| b.healthy = healthy)?;
        Ok(true)
    }

    /// Applies `change` to a backend, then tells the data plane in the order that never lets a
    /// packet see a half-made change. Leaving the ring: the ring first, then the flags (its
    /// established flows still match until the flags say otherwise). Joining, or staying:
    /// the flags first, then the ring.
    fn change_backend(
        &mut self,
        vip: &VipSpec,
        backend: SocketAddr,
        change: impl FnOnce(&mut BackendEntry),
    ) -> Result<()> {
        let entry = self
            .vips
            .get_mut(vip)
            .ok_or(BalancerError::UnknownVip(*vip))?;
        let vip_id = entry.id;
        let b = entry
            .backends
            .get_mut(&backend)
            .ok_or(BalancerError::UnknownBackend { vip: *vip, backend })?;
        let was_in_ring = b.in_ring();
        change(b);
        let (id, flags, in_ring) = (b.id, b.flags(), b.in_ring());
        if was_in_ring && !in_ring {
            self.rebuild_ring(vip)?;
            return self.write_flags(id, vip_id, backend, flags);
        }
        self.write_flags(id, vip_id, backend, flags)?;
        self.rebuild_ring(vip)
    }

    /// Sets (or clears) the VIP's health-check spec; the agent runs the checks.
    ///
    /// # Errors
    /// Unknown VIP.
    pub fn set_vip_health(&mut self, vip: &VipSpec, health: Option<HealthSpec>) -> Result<()> {
        let entry = self
            .vips
            .get_mut(vip)
            .ok_or(BalancerError::UnknownVip(*vip))?;
        entry.health = health;
        Ok(())
    }

    /// Health specs and backends of every VIP, for the health checker.
    #[must_use]
    pub fn health_targets(&self) -> Vec<(VipSpec, Option<HealthSpec>, Vec<SocketAddr>)> {
        self.vips
            .iter()
            .map(|(vip, e)| (*vip, e.health.clone(), e.backends.keys().copied().collect()))
            .collect()
    }

    fn write_flags(&mut self, id: u32, vip_id: u32, backend: SocketAddr, flags: u8) -> Result<()> {
        let value = backend_entry(backend, vip_id, flags);
        self.datapath
            .backends()?
            .set(id, &value, 0)
            .map_err(|source| DatapathError::Map {
                name: lb_common::map_names::BACKENDS,
                source,
            })?;
        Ok(())
    }

    /// Builds the VIP's ring from its active backends, writes it into the idle half of its
    /// double buffer (only the slots that differ from what that half held) and then switches
    /// the VIP to it with one map update.
    fn rebuild_ring(&mut self, vip: &VipSpec) -> Result<()> {
        let ring_size = self.ring_size();
        let entry = self.vips.get(vip).ok_or(BalancerError::UnknownVip(*vip))?;
        let members: Vec<MaglevBackend> = entry
            .backends
            .iter()
            .filter(|(_, b)| b.in_ring())
            .map(|(addr, b)| MaglevBackend::new(b.id, to_bytes(addr.ip()), addr.port(), b.weight))
            .collect();
        let ring = build_ring(&members, ring_size)?;
        let idle = 1 - entry.live_half;
        let base = ring_base(entry.id, idle, ring_size);
        let previous = &entry.halves[idle];
        let changed: Vec<(u32, u32)> = ring
            .iter()
            .enumerate()
            .filter(|(slot, id)| previous.get(*slot) != Some(*id))
            .map(|(slot, id)| (base + slot as u32, *id))
            .collect();
        if let Err(e) = self.datapath.write_ring_slots(&changed) {
            // Some slots of the idle half may have been written: forget what it held, so the
            // next rebuild writes all of it rather than trusting a stale copy.
            let entry = self.vips.get_mut(vip).expect("checked above");
            entry.halves[idle].clear();
            return Err(e.into());
        }
        let entry = self.vips.get_mut(vip).expect("checked above");
        entry.halves[idle] = ring;
        entry.live_half = idle;
        let entry = self.vips.remove(vip).expect("checked above");
        let written = self.write_vip_info(vip, &entry);
        self.vips.insert(*vip, entry);
        written.map_err(Into::into)
    }

    /// Adds the interface to the set the data plane may redirect to.
    ///
    /// # Errors
    /// The devmap refusing the interface (e.g. it does not support XDP redirect).
    pub fn allow_egress(&mut self, ifindex: u32) -> Result<()> {
        self.datapath
            .egress_ports()?
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| DatapathError::Egress { ifindex, source }.into())
    }

    #[must_use]
    pub fn vip_specs(&self) -> Vec<VipSpec> {
        self.vips.keys().copied().collect()
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
        let timeouts: BTreeMap<u32, u32> = self
            .vips
            .iter()
            .flat_map(|(vip, e)| {
                let timeout = e.idle_timeout_s(vip.proto);
                e.backends.values().map(move |b| (b.id, timeout))
            })
            .collect();
        let mut counts = BTreeMap::new();
        for item in self.datapath.conntrack()?.iter() {
            let Ok((_, state)) = item else {
                // An entry evicted while we walk: the walk goes on from the next one.
                continue;
            };
            if let Some(timeout) = timeouts.get(&state.backend_id)
                && state.is_live(now, *timeout)
            {
                *counts.entry(state.backend_id).or_default() += 1;
            }
        }
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

    /// # Errors
    /// Unknown VIP or a failing map read.
    pub fn vip_status(&self, vip: &VipSpec) -> Result<VipStatus> {
        let entry = self.vips.get(vip).ok_or(BalancerError::UnknownVip(*vip))?;
        let live = &entry.halves[entry.live_half];
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for id in live {
            *slots.entry(*id).or_default() += 1;
        }
        let retired = self.datapath.retired_vip_traffic(entry.id)?;
        let backends = entry
            .backends
            .iter()
            .map(|(addr, b)| {
                let t: TrafficCounters = self.datapath.backend_traffic(b.id)?;
                Ok(BackendStatus {
                    addr: *addr,
                    id: b.id,
                    weight: b.weight,
                    state: b.state,
                    healthy: b.healthy,
                    health: None,
                    slots: slots.get(&b.id).copied().unwrap_or(0),
                    packets: t.packets,
                    bytes: t.bytes,
                    new_flows: t.new_flows,
                    live_flows: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The data path counts per backend; the VIP adds what its removed backends carried.
        let traffic = backends.iter().fold(retired, |acc, b| {
            acc.merged(TrafficCounters {
                packets: b.packets,
                bytes: b.bytes,
                new_flows: b.new_flows,
            })
        });
        Ok(VipStatus {
            vip: *vip,
            id: entry.id,
            ring_size: if live.is_empty() { 0 } else { self.ring_size() },
            idle_timeout_s: entry.idle_timeout_s(vip.proto),
            packets: traffic.packets,
            bytes: traffic.bytes,
            new_flows: traffic.new_flows,
            backends,
        })
    }

    /// # Errors
    /// A failing map read.
    pub fn status(&self) -> Result<Vec<VipStatus>> {
        self.vips.keys().map(|v| self.vip_status(v)).collect()
    }

    /// Which backend a flow from `client` to `vip` gets, by the kernel's hash and ring.
    ///
    /// # Errors
    /// Unknown VIP, family mismatch, or a failing map read.
    pub fn explain(&self, client: SocketAddr, vip: &VipSpec) -> Result<Explanation> {
        let entry = self.vips.get(vip).ok_or(BalancerError::UnknownVip(*vip))?;
        if family(&client) != family(&vip.addr) {
            return Err(BalancerError::FamilyMismatch {
                vip: *vip,
                backend: client,
            });
        }
        let key = FlowKey::new(client, vip.addr, vip.proto.number());
        let hash = flow_hash(&key, self.datapath.config().hash_seed);
        let ring = &entry.halves[entry.live_half];
        let slot = lb_common::hash::ring_offset(hash, self.ring_size());
        let by_id = |id: u32| {
            entry
                .backends
                .iter()
                .find(|(_, b)| b.id == id)
                .map(|(addr, _)| *addr)
        };
        let new_flow_backend = ring.get(slot as usize).and_then(|id| by_id(*id));
        // An entry the data plane would no longer honour (idle or closed too long) is no
        // tracked flow: the next packet gets `new_flow_backend`.
        let timeout = entry.idle_timeout_s(vip.proto);
        let tracked_backend = match self.datapath.conntrack()?.get(&key, 0) {
            Ok(state) if state.is_current(monotonic_coarse_ns(), timeout) => {
                by_id(state.backend_id)
            }
            Ok(_) => None,
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(source) => {
                return Err(DatapathError::Map {
                    name: lb_common::map_names::CONNTRACK,
                    source,
                }
                .into());
            }
        };
        Ok(Explanation {
            client,
            vip: *vip,
            flow_hash: hash,
            ring_slot: slot,
            new_flow_backend,
            tracked_backend,
        })
    }

    /// The configuration as it stands, for persisting.
    #[must_use]
    pub fn desired_state(&self) -> DesiredState {
        DesiredState {
            vips: self
                .vips
                .iter()
                .map(|(vip, entry)| VipConfig {
                    vip: *vip,
                    id: Some(entry.id),
                    health: entry.health.clone(),
                    idle_timeout_s: entry.idle_timeout_s,
                    backends: entry
                        .backends
                        .iter()
                        .map(|(addr, b)| BackendConfig {
                            addr: *addr,
                            weight: b.weight,
                            state: b.state,
                            id: Some(b.id),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Programs a whole desired state into an empty balancer at agent start-up, adopting
    /// whatever the maps hold: pinned maps left by a previous agent keep forwarding while
    /// this runs. The model is built against what the maps hold (a VIP or backend they hold
    /// keeps its id, so its flows and counters), then only the entries that differ are
    /// written, in the order `xlb_core::plan::plan` gives; VIPs and backends the maps hold but
    /// the desired state lacks are removed. Maps just created get everything.
    ///
    /// On a validation error nothing is written.
    ///
    /// # Errors
    /// An invalid desired state (duplicates, bad weights, no free id) or a map access
    /// failing.
    ///
    /// # Panics
    /// If the balancer has VIPs already.
    pub fn adopt(&mut self, state: &DesiredState) -> Result<Adoption> {
        assert!(self.vips.is_empty(), "adopt starts from an empty balancer");
        self.check_limits(state)?;
        let current = self.read_maps()?;
        let ghosts = match self.build_model(state, &current) {
            Ok(ghosts) => ghosts,
            Err(e) => {
                self.clear_model();
                return Err(e);
            }
        };
        let (desired, halves) = match self.desired_contents(&current) {
            Ok(desired) => desired,
            Err(e) => {
                self.clear_model();
                return Err(e);
            }
        };
        let writes = plan::plan(&current, &desired);
        for write in &writes {
            self.carry_out(write)?;
        }
        for (vip, (live, ring, other)) in halves {
            let entry = self.vips.get_mut(&vip).expect("built above");
            entry.live_half = live;
            entry.halves[live] = ring;
            entry.halves[1 - live] = other;
        }
        // Only now: until their entries were cleared, a packet could still reach them.
        for id in &ghosts.vip_ids {
            self.vip_ids.give_back(*id);
        }
        for id in &ghosts.backend_ids {
            self.backend_ids.give_back(*id);
        }
        let adoption = Adoption {
            kept_vips: state
                .vips
                .iter()
                .filter(|v| {
                    let id = self.vips[&v.vip].id;
                    current
                        .vips
                        .get(&service_key(&v.vip))
                        .is_some_and(|i| i.vip_id == id)
                })
                .count(),
            removed_vips: ghosts.vips,
            writes: writes.len(),
        };
        Ok(adoption)
    }

    fn clear_model(&mut self) {
        self.vips.clear();
        self.port_users.clear();
        self.endpoint_vips.clear();
        self.vip_ids = IdPool::new(self.datapath.config().max_vips);
        self.backend_ids = IdPool::new(MAX_BACKENDS);
    }

    /// Reads back what the balancer's maps hold (for each VIP, only its live ring).
    fn read_maps(&mut self) -> Result<MapContents, DatapathError> {
        let mut held = MapContents::default();
        let err = |name| move |source| DatapathError::Map { name, source };
        for item in self.datapath.vips()?.iter() {
            let (key, info) = item.map_err(err(lb_common::map_names::VIPS))?;
            held.vips.insert((key.socket_addr(), key.proto), info);
        }
        {
            let rings = self.datapath.rings()?;
            for info in held.vips.values().filter(|i| i.ring_size > 0) {
                let ring = (info.ring_base..info.ring_base + info.ring_size)
                    .map(|slot| rings.get(&slot, 0))
                    .collect::<Result<Vec<u32>, _>>()
                    .map_err(err(lb_common::map_names::MAGLEV))?;
                held.rings.insert(info.ring_base, ring);
            }
        }
        for (id, item) in self.datapath.backends()?.iter().enumerate() {
            let backend = item.map_err(err(lb_common::map_names::BACKENDS))?;
            if backend.family != 0 {
                held.backends.insert(id as u32, backend);
            }
        }
        for item in self.datapath.endpoints()?.iter() {
            let (key, value) = item.map_err(err(lb_common::map_names::ENDPOINTS))?;
            held.endpoints.insert((key.socket_addr(), key.proto), value);
        }
        for (port, item) in self.datapath.ports()?.iter().enumerate() {
            let roles = item.map_err(err(lb_common::map_names::PORTS))?;
            if roles != 0 {
                held.ports.insert(port as u16, roles);
            }
        }
        Ok(held)
    }

    /// Fills the (empty) model with `state`. Ids: what the maps hold a VIP or backend under,
    /// else the id recorded in the state, else a fresh one. Ids the maps use for entries
    /// the state lacks are held back until those entries are gone, so nothing new takes
    /// one that a live ring or connection still names.
    fn build_model(&mut self, state: &DesiredState, held: &MapContents) -> Result<Ghosts> {
        let mut vip_ids: BTreeMap<VipSpec, u32> = BTreeMap::new();
        for v in &state.vips {
            if let Some(info) = held.vips.get(&service_key(&v.vip))
                && let Some(id) = self.vip_ids.take_exact(info.vip_id)
            {
                vip_ids.insert(v.vip, id);
            }
        }
        let mut ghosts = Ghosts::default();
        for (key, info) in &held.vips {
            if !state.vips.iter().any(|v| service_key(&v.vip) == *key) {
                ghosts.vips += 1;
            }
            if let Some(id) = self.vip_ids.take_exact(info.vip_id) {
                ghosts.vip_ids.push(id);
            }
        }
        for v in &state.vips {
            if !vip_ids.contains_key(&v.vip)
                && let Some(id) = v.id.and_then(|id| self.vip_ids.take_exact(id))
            {
                vip_ids.insert(v.vip, id);
            }
        }
        let max_vips = self.datapath.config().max_vips;
        for v in &state.vips {
            if let std::collections::btree_map::Entry::Vacant(slot) = vip_ids.entry(v.vip) {
                slot.insert(
                    self.vip_ids
                        .take()
                        .ok_or(BalancerError::VipSlotsExhausted(max_vips))?,
                );
            }
        }

        let backend_pairs = || {
            state
                .vips
                .iter()
                .flat_map(|v| v.backends.iter().map(move |b| (v, b)))
        };
        let mut backend_ids: BTreeMap<(VipSpec, SocketAddr), u32> = BTreeMap::new();
        for (v, b) in backend_pairs() {
            let wanted = backend_entry(b.addr, vip_ids[&v.vip], 0);
            let held_id = held
                .backends
                .iter()
                .find(|(_, h)| Backend { flags: 0, ..**h } == wanted)
                .map(|(id, _)| *id);
            if let Some(id) = held_id.and_then(|id| self.backend_ids.take_exact(id)) {
                backend_ids.insert((v.vip, b.addr), id);
            }
        }
        for id in held.backends.keys() {
            if let Some(id) = self.backend_ids.take_exact(*id) {
                ghosts.backend_ids.push(id);
            }
        }
        for (v, b) in backend_pairs() {
            if !backend_ids.contains_key(&(v.vip, b.addr))
                && let Some(id) = b.id.and_then(|id| self.backend_ids.take_exact(id))
            {
                backend_ids.insert((v.vip, b.addr), id);
            }
        }
        for (v, b) in backend_pairs() {
            if let std::collections::btree_map::Entry::Vacant(slot) =
                backend_ids.entry((v.vip, b.addr))
            {
                slot.insert(
                    self.backend_ids
                        .take()
                        .ok_or(BalancerError::BackendSlotsExhausted(MAX_BACKENDS))?,
                );
            }
        }

        for v in &state.vips {
            let mut entry = VipEntry {
                id: vip_ids[&v.vip],
                health: v.health.clone(),
                idle_timeout_s: v.idle_timeout_s,
                live_half: 0,
                halves: [Vec::new(), Vec::new()],
                backends: BTreeMap::new(),
            };
            self.port_users.entry(v.vip.addr.port()).or_default().vips += 1;
            for b in &v.backends {
                entry.backends.insert(
                    b.addr,
                    BackendEntry {
                        id: backend_ids[&(v.vip, b.addr)],
                        weight: b.weight,
                        state: b.state,
                        healthy: true,
                    },
                );
                self.port_users.entry(b.addr.port()).or_default().backends += 1;
                self.endpoint_vips
                    .entry((b.addr, v.vip.proto))
                    .or_default()
                    .push(v.vip);
            }
            self.vips.insert(v.vip, entry);
        }
        // An endpoint keeps naming the VIP it names now, if that one stays: flows of that
        // VIP may have no reverse entry.
        for ((addr, proto), list) in &mut self.endpoint_vips {
            if let Some(named) = held.endpoints.get(&(*addr, proto.number())) {
                let named = SocketAddr::new(
                    lb_common::addr::from_bytes(&named.vip_addr),
                    u16::from_be(named.vip_port_be),
                );
                if let Some(at) = list.iter().position(|v| v.addr == named) {
                    let first = list.remove(at);
                    list.insert(0, first);
                }
            }
        }
        Ok(ghosts)
    }

    /// What the maps should hold for the model, rings placed by `choose_half`; with, per
    /// VIP, the live half, its ring and what the other half is known to hold (empty when
    /// unknown).
    #[allow(clippy::type_complexity)]
    fn desired_contents(
        &self,
        held: &MapContents,
    ) -> Result<(MapContents, BTreeMap<VipSpec, (usize, Vec<u32>, Vec<u32>)>)> {
        let ring_size = self.ring_size();
        let mut desired = MapContents::default();
        let mut halves = BTreeMap::new();
        for (vip, entry) in &self.vips {
            let key = service_key(vip);
            let members: Vec<MaglevBackend> = entry
                .backends
                .iter()
                .filter(|(_, b)| b.in_ring())
                .map(|(addr, b)| {
                    MaglevBackend::new(b.id, to_bytes(addr.ip()), addr.port(), b.weight)
                })
                .collect();
            let ring = build_ring(&members, ring_size)?;
            let held_info = held.vips.get(&key);
            let held_ring = held_info
                .and_then(|i| held.rings.get(&i.ring_base))
                .map(Vec::as_slice);
            let live = choose_half(held_info, held_ring, entry.id, ring_size, &ring);
            let base = ring_base(entry.id, live, ring_size);
            let other_base = ring_base(entry.id, 1 - live, ring_size);
            // The half switched away from holds the ring just read; an untouched one is
            // unknown.
            let other = held_info
                .filter(|i| i.vip_id == entry.id && i.ring_base == other_base)
                .and(held_ring)
                .map(<[u32]>::to_vec)
                .unwrap_or_default();
            desired.vips.insert(
                key,
                VipInfo {
                    vip_id: entry.id,
                    ring_base: base,
                    ring_size: if ring.is_empty() { 0 } else { ring_size },
                    idle_timeout_s: entry.idle_timeout_s(vip.proto),
                },
            );
            if !ring.is_empty() {
                desired.rings.insert(base, ring.clone());
            }
            for (addr, b) in &entry.backends {
                desired
                    .backends
                    .insert(b.id, backend_entry(*addr, entry.id, b.flags()));
            }
            halves.insert(*vip, (live, ring, other));
        }
        for ((addr, proto), list) in &self.endpoint_vips {
            if let Some(first) = list.first() {
                desired
                    .endpoints
                    .insert((*addr, proto.number()), endpoint_entry(*first, list.len()));
            }
        }
        let ports: std::collections::BTreeSet<u16> = self
            .port_users
            .keys()
            .copied()
            .chain(self.endpoint_vips.keys().map(|(addr, _)| addr.port()))
            .collect();
        for port in ports {
            let roles = self.port_roles(port);
            if roles != 0 {
                desired.ports.insert(port, roles);
            }
        }
        Ok((desired, halves))
    }

    /// One map update of an adoption plan.
    fn carry_out(&mut self, write: &MapWrite) -> Result<(), DatapathError> {
        use lb_common::map_names;
        let err = |name| move |source| DatapathError::Map { name, source };
        let absent_is_fine = |r: Result<(), aya::maps::MapError>| match r {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            other => other,
        };
        match write {
            MapWrite::ResetVipCounters(id) => self.datapath.reset_vip_traffic(*id),
            MapWrite::ResetBackendSlots(id) => self.datapath.reset_backend_slots(*id),
            MapWrite::Port { port, roles } => self
                .datapath
                .ports()?
                .set(u32::from(*port), roles, 0)
                .map_err(err(map_names::PORTS)),
            MapWrite::Endpoint { key, value } => self
                .datapath
                .endpoints()?
                .insert(&VipKey::new(key.0, key.1), value, 0)
                .map_err(err(map_names::ENDPOINTS)),
            MapWrite::RemoveEndpoint(key) => absent_is_fine(
                self.datapath
                    .endpoints()?
                    .remove(&VipKey::new(key.0, key.1)),
            )
            .map_err(err(map_names::ENDPOINTS)),
            MapWrite::Backend { id, value } => self
                .datapath
                .backends()?
                .set(*id, value, 0)
                .map_err(err(map_names::BACKENDS)),
            MapWrite::RingSlots { base, slots } => {
                let absolute: Vec<(u32, u32)> = slots
                    .iter()
                    .map(|(offset, id)| (base + offset, *id))
                    .collect();
                self.datapath.write_ring_slots(&absolute)
            }
            MapWrite::Vip { key, info } => self
                .datapath
                .vips()?
                .insert(&VipKey::new(key.0, key.1), info, 0)
                .map_err(err(map_names::VIPS)),
            MapWrite::RemoveVip(key) => {
                absent_is_fine(self.datapath.vips()?.remove(&VipKey::new(key.0, key.1)))
                    .map_err(err(map_names::VIPS))
            }
        }
    }
}

/// Entries the maps held that the desired state does not have.
#[derive(Debug, Default)]
struct Ghosts {
    vips: usize,
    /// Ids held back while the maps still use them.
    vip_ids: Vec<u32>,
    backend_ids: Vec<u32>,
}

/// What `Balancer::adopt` found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Desired VIPs the maps held already (under the same id).
    pub kept_vips: usize,
    /// VIPs the maps held that the desired state lacks, now removed.
    pub removed_vips: usize,
    /// Map updates written: 0 when the maps held exactly the desired state.
    pub writes: usize,
}

fn service_key(vip: &VipSpec) -> ServiceKey {
    (vip.addr, vip.proto.number())
}

fn backend_entry(addr: SocketAddr, vip_id: u32, flags: u8) -> Backend {
    Backend {
        addr: to_bytes(addr.ip()),
        port_be: addr.port().to_be(),
        family: family(&addr),
        flags,
        vip_id,
    }
}

fn endpoint_entry(first: VipSpec, vips: usize) -> EndpointVip {
    EndpointVip {
        vip_addr: to_bytes(first.addr.ip()),
        vip_port_be: first.addr.port().to_be(),
        _pad: 0,
        vips: vips as u32,
    }
}
