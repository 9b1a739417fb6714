//! The balancer: its desired state (VIPs, their backends and weights) and how each change
//! is programmed into the data plane's maps through [`Maps`]: id allocation, Maglev rings
//! written aside and switched in one map update, backend entries, endpoints and port roles,
//! each in the order that never lets a packet see a half-made change. No I/O of its own and
//! no clock: the maps and the time come from the caller.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, Backend, EndpointVip, FlowKey, FlowState, MAX_BACKENDS,
    PORT_HAS_SHARED_ENDPOINT, PORT_IS_BACKEND, PORT_IS_VIP, TrafficCounters, VipInfo, VipKey,
    addr::to_bytes,
    hash::flow_hash,
    maglev::{MaglevBackend, build_ring},
};

use crate::{
    health::HealthSpec,
    ids::IdPool,
    limits::{
        BalancerError, backend_address, check_limits, family, validate_backend,
        validate_vip_timeout, validate_weight,
    },
    maps::{Maps, carry_out},
    model::{
        BackendConfig, BackendState, BackendStatus, DesiredState, Explanation, Forwarding,
        Protocol, VipConfig, VipSettings, VipSpec, VipStatus,
    },
    plan::{self, MapContents, ServiceKey, choose_half, ring_base},
};

#[derive(Clone, Debug)]
struct BackendEntry {
    id: u32,
    weight: u32,
    state: BackendState,
    /// Failing health checks take a backend out of the ring and end its flows, whatever
    /// its state; it returns when the checks pass again.
    healthy: bool,
    /// The container it is, if added by name.
    container: Option<String>,
    /// Added by its container's labels.
    discovered: bool,
    /// False while its container is stopped: out of the ring, its flows end, as for a
    /// failed health check, but kept apart from the checks' verdict so that neither undoes
    /// the other.
    running: bool,
}

impl VipEntry {
    /// The timeout the data plane applies to the VIP's flows.
    fn idle_timeout_s(&self, proto: Protocol) -> u32 {
        self.idle_timeout_s
            .unwrap_or_else(|| proto.default_idle_timeout_s())
    }
}

impl BackendEntry {
    /// What the data plane is told about the backend. Weight 0 drains, as in IPVS.
    const fn flags(&self) -> u8 {
        match (self.healthy && self.running, self.state, self.weight) {
            (false, _, _) => 0,
            (true, BackendState::Active, 1..) => BACKEND_ACTIVE,
            (true, BackendState::Active, 0) | (true, BackendState::Draining, _) => BACKEND_DRAINING,
        }
    }

    /// Whether it owns ring slots (takes new flows).
    fn in_ring(&self) -> bool {
        self.healthy && self.running && self.state == BackendState::Active && self.weight > 0
    }
}

#[derive(Clone, Debug)]
struct VipEntry {
    id: u32,
    health: Option<HealthSpec>,
    /// Seconds; `None`: the protocol's default.
    idle_timeout_s: Option<u32>,
    /// Fixed for the VIP's life: a change replaces the VIP (new ids, so no flow carries
    /// over into a method its backend did not open it with).
    forwarding: Forwarding,
    /// Which half of the VIP's double buffer is live.
    live_half: usize,
    /// What each half holds, so a rebuild only writes the slots that change.
    halves: [Vec<u32>; 2],
    backends: BTreeMap<SocketAddr, BackendEntry>,
}

pub struct Balancer<M> {
    maps: M,
    max_vips: u32,
    ring_size: u32,
    model: Model,
}

/// What the balancer holds; the maps hold it too, once the writes for it are done.
#[derive(Clone, Debug)]
struct Model {
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

type Result<T, E> = std::result::Result<T, BalancerError<E>>;

impl<M: Maps> Balancer<M> {
    /// The model's entry of `vip`.
    fn vip_entry(&self, vip: &VipSpec) -> Result<&VipEntry, M::Error> {
        self.model
            .vips
            .get(vip)
            .ok_or(BalancerError::UnknownVip(*vip))
    }

    /// An empty balancer over `maps`, with `max_vips` VIP slots and rings of `ring_size`.
    #[must_use]
    pub const fn new(maps: M, max_vips: u32, ring_size: u32) -> Self {
        Self {
            maps,
            max_vips,
            ring_size,
            model: Model {
                vips: BTreeMap::new(),
                port_users: BTreeMap::new(),
                endpoint_vips: BTreeMap::new(),
                vip_ids: IdPool::new(max_vips),
                backend_ids: IdPool::new(MAX_BACKENDS),
            },
        }
    }

    #[must_use]
    pub const fn maps(&self) -> &M {
        &self.maps
    }

    pub const fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Counts one more (or, with `delta` -1, one fewer) VIP or backend on `port` and writes
    /// the port's roles to the data plane when they change. Called before a VIP or backend
    /// entry is written and after one is removed, so the filter never hides a live entry.
    fn use_port(&mut self, port: u16, vip: bool, delta: i32) -> std::result::Result<(), M::Error> {
        let before = self.port_roles(port);
        let users = self.model.port_users.entry(port).or_default();
        let count = if vip {
            &mut users.vips
        } else {
            &mut users.backends
        };
        *count = count.saturating_add_signed(delta);
        if users.roles() == 0 {
            self.model.port_users.remove(&port);
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
        let users = self.model.port_users.get(&port).map_or(0, |u| u.roles());
        let shared = self
            .model
            .endpoint_vips
            .iter()
            .any(|((addr, _), vips)| addr.port() == port && vips.len() > 1);
        users | if shared { PORT_HAS_SHARED_ENDPOINT } else { 0 }
    }

    fn write_port_roles(&mut self, port: u16, roles: u8) -> std::result::Result<(), M::Error> {
        self.maps.set_port_roles(port, roles)
    }

    /// Records that `backend` serves `vip` (`join`) or no longer does, and writes the
    /// endpoint's entry: the oldest VIP it serves and how many. Called before a backend entry
    /// is written and after one is removed.
    fn update_endpoint(
        &mut self,
        backend: SocketAddr,
        vip: VipSpec,
        join: bool,
    ) -> std::result::Result<(), M::Error> {
        let port = backend.port();
        let roles_before = self.port_roles(port);
        let list = self
            .model
            .endpoint_vips
            .entry((backend, vip.proto))
            .or_default();
        if join {
            list.push(vip);
        } else {
            list.retain(|v| *v != vip);
        }
        let first = list.first().copied();
        let vips = list.len();
        if first.is_none() {
            self.model.endpoint_vips.remove(&(backend, vip.proto));
        }
        // A port that gains "shared" says so before the endpoint entry does; one that loses
        // it, after: a new flow never skips a reverse entry its replies need.
        let roles_after = self.port_roles(port);
        if roles_after & !roles_before != 0 {
            self.write_port_roles(port, roles_after)?;
        }
        let key = (backend, vip.proto.number());
        match first {
            Some(first) => self.maps.put_endpoint(key, &endpoint_entry(first, vips))?,
            None => self.maps.remove_endpoint(key)?,
        }
        if roles_before & !roles_after != 0 {
            self.write_port_roles(port, roles_after)?;
        }
        Ok(())
    }

    const fn ring_size(&self) -> u32 {
        self.ring_size
    }

    /// [`check_limits`] against this agent's data plane.
    ///
    /// # Errors
    /// As [`check_limits`].
    pub fn check_limits(&self, state: &DesiredState) -> Result<(), M::Error> {
        check_limits(state, self.max_vips, self.ring_size)
    }

    /// Adds a VIP whose flows idle out after the protocol's default timeout.
    ///
    /// # Errors
    /// The VIP exists already, or no slot is free.
    pub fn add_vip(&mut self, vip: VipSpec) -> Result<(), M::Error> {
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
    ) -> Result<(), M::Error> {
        self.add_vip_with(vip, idle_timeout_s, Forwarding::Nat)
    }

    /// Adds a VIP whose flows idle out after `idle_timeout_s` seconds (`None`: the default)
    /// and reach its backends by `forwarding`.
    ///
    /// # Errors
    /// The VIP exists already, an idle timeout out of range, or no slot is free.
    pub fn add_vip_with(
        &mut self,
        vip: VipSpec,
        idle_timeout_s: Option<u32>,
        forwarding: Forwarding,
    ) -> Result<(), M::Error> {
        if self.model.vips.contains_key(&vip) {
            return Err(BalancerError::DuplicateVip(vip));
        }
        validate_vip_timeout(&vip, idle_timeout_s)?;
        let max = self.max_vips;
        let id = self
            .model
            .vip_ids
            .take()
            .ok_or(BalancerError::VipSlotsExhausted(max))?;
        let entry = VipEntry {
            id,
            health: None,
            idle_timeout_s,
            forwarding,
            live_half: 0,
            halves: [Vec::new(), Vec::new()],
            backends: BTreeMap::new(),
        };
        let written = self
            .maps
            .reset_vip_counters(id)
            .and_then(|()| self.use_port(vip.addr.port(), true, 1))
            .and_then(|()| self.write_vip_info(&vip, &entry));
        if let Err(e) = written {
            self.model.vip_ids.give_back(id);
            return Err(BalancerError::Datapath(e));
        }
        self.model.vips.insert(vip, entry);
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
    ) -> Result<bool, M::Error> {
        validate_vip_timeout(vip, idle_timeout_s)?;
        let entry = self
            .model
            .vips
            .get_mut(vip)
            .ok_or(BalancerError::UnknownVip(*vip))?;
        if entry.idle_timeout_s == idle_timeout_s {
            return Ok(false);
        }
        let before = std::mem::replace(&mut entry.idle_timeout_s, idle_timeout_s);
        if let Err(e) = self.write_idle_timeout(vip) {
            self.model
                .vips
                .get_mut(vip)
                .expect("checked above")
                .idle_timeout_s = before;
            // Back to the old timeout everywhere it was already written.
            let _ = self.write_idle_timeout(vip);
            return Err(e);
        }
        Ok(true)
    }

    /// Writes the VIP's timeout where the data plane reads it: its `VipInfo` (new flows)
    /// and each of its backends' entries (established flows). Each write is one map update,
    /// so a packet sees either timeout, never a torn one.
    fn write_idle_timeout(&mut self, vip: &VipSpec) -> Result<(), M::Error> {
        let entry = self.model.vips.remove(vip).expect("checked by the caller");
        let written = self.write_vip_info(vip, &entry);
        let backends: Vec<(u32, SocketAddr, u8)> = entry
            .backends
            .iter()
            .map(|(addr, b)| (b.id, *addr, b.flags()))
            .collect();
        self.model.vips.insert(*vip, entry);
        written.map_err(BalancerError::Datapath)?;
        for (id, addr, flags) in backends {
            self.write_flags(id, vip, addr, flags)?;
        }
        Ok(())
    }

    /// Changes a VIP's health checks and idle timeout in place (`xlb vip set`): one plan
    /// through [`Self::apply`], so it is checked in full before anything is written and a
    /// failing write leaves the previous settings; its backends, ring and flows stay.
    /// Returns whether anything changed.
    ///
    /// # Errors
    /// Unknown VIP, a timeout out of range (nothing written), or a map update failing
    /// (undone).
    pub fn set_vip(&mut self, vip: &VipSpec, settings: &VipSettings) -> Result<bool, M::Error> {
        let mut wanted = self.desired_state();
        let entry = wanted
            .vips
            .iter_mut()
            .find(|v| v.vip == *vip)
            .ok_or(BalancerError::UnknownVip(*vip))?;
        let before = (entry.health.clone(), entry.idle_timeout_s);
        entry.health = settings.health.applied_to(entry.health.take());
        entry.idle_timeout_s = settings.idle_timeout_s.applied_to(entry.idle_timeout_s);
        if (entry.health.clone(), entry.idle_timeout_s) == before {
            return Ok(false);
        }
        self.apply(&wanted)?;
        Ok(true)
    }

    fn write_vip_info(
        &mut self,
        vip: &VipSpec,
        entry: &VipEntry,
    ) -> std::result::Result<(), M::Error> {
        let ring_size = self.ring_size();
        let live = &entry.halves[entry.live_half];
        let info = VipInfo {
            vip_id: entry.id,
            ring_base: ring_base(entry.id, entry.live_half, ring_size),
            ring_size: if live.is_empty() { 0 } else { ring_size },
            idle_timeout_s: entry.idle_timeout_s(vip.proto),
        };
        self.maps.put_vip(service_key(vip), &info)
    }

    /// Removes a VIP and all its backends. Packets to it pass to the stack from then on.
    ///
    /// # Errors
    /// Unknown VIP, or a map update failing.
    pub fn remove_vip(&mut self, vip: &VipSpec) -> Result<(), M::Error> {
        let entry = self
            .model
            .vips
            .remove(vip)
            .ok_or(BalancerError::UnknownVip(*vip))?;
        self.maps
            .remove_vip(service_key(vip))
            .map_err(BalancerError::Datapath)?;
        self.use_port(vip.addr.port(), true, -1)
            .map_err(BalancerError::Datapath)?;
        for (addr, backend) in &entry.backends {
            self.release_backend(vip, entry.forwarding, backend.id, *addr)?;
        }
        self.model.vip_ids.give_back(entry.id);
        Ok(())
    }

    /// The backend `given` names for `vip`: port 0 (none given) stands for the VIP's own
    /// port on a direct-server-return VIP.
    ///
    /// # Errors
    /// Unknown VIP; port 0 for a NAT VIP.
    pub fn resolve_backend(
        &self,
        vip: &VipSpec,
        given: SocketAddr,
    ) -> Result<SocketAddr, M::Error> {
        backend_address(vip, self.vip_entry(vip)?.forwarding, given)
    }

    /// How `vip` reaches its backends.
    ///
    /// # Errors
    /// Unknown VIP.
    pub fn forwarding(&self, vip: &VipSpec) -> Result<Forwarding, M::Error> {
        Ok(self.vip_entry(vip)?.forwarding)
    }

    /// Adds a backend to a VIP and rebuilds its ring; port 0 stands for the VIP's port on a
    /// direct-server-return VIP ([`Self::resolve_backend`]). A NAT VIP's backend gets its
    /// endpoint entry and port role (its replies are translated back); a direct-server-return
    /// VIP's backend gets neither, since its replies never come through the balancer.
    ///
    /// # Errors
    /// Unknown VIP, duplicate backend, family mismatch, bad weight, a DSR backend on another
    /// port than the VIP's, no free id.
    pub fn add_backend(
        &mut self,
        vip: &VipSpec,
        backend: SocketAddr,
        weight: u32,
    ) -> Result<(), M::Error> {
        let backend = self.resolve_backend(vip, backend)?;
        let entry = self.vip_entry(vip)?;
        let forwarding = entry.forwarding;
        validate_backend(vip, forwarding, backend, weight, &entry.backends)?;
        let id = self
            .model
            .backend_ids
            .take()
            .ok_or(BalancerError::BackendSlotsExhausted(MAX_BACKENDS))?;
        let new = BackendEntry {
            id,
            weight,
            state: BackendState::Active,
            healthy: true,
            container: None,
            discovered: false,
            running: true,
        };
        let reply_state = if forwarding.is_dsr() {
            Ok(())
        } else {
            self.use_port(backend.port(), false, 1)
                .and_then(|()| self.update_endpoint(backend, *vip, true))
        };
        if let Err(e) = reply_state
            .map_err(BalancerError::Datapath)
            .and_then(|()| self.write_backend(id, vip, backend, new.flags()))
        {
            self.model.backend_ids.give_back(id);
            return Err(e);
        }
        self.model
            .vips
            .get_mut(vip)
            .expect("checked above")
            .backends
            .insert(backend, new);
        self.rebuild_ring(vip)
    }

    /// A new backend's entry, its id's counters zeroed first (the id may have served a
    /// removed backend).
    fn write_backend(
        &mut self,
        id: u32,
        vip: &VipSpec,
        addr: SocketAddr,
        flags: u8,
    ) -> Result<(), M::Error> {
        self.maps
            .reset_backend_slots(id)
            .map_err(BalancerError::Datapath)?;
        self.write_flags(id, vip, addr, flags)
    }

    /// Removes a backend: its ring slots move to the others, and its established flows are
    /// re-balanced on their next packet (use `drain` to let them finish instead).
    ///
    /// # Errors
    /// Unknown VIP or backend, or a map update failing.
    pub fn remove_backend(&mut self, vip: &VipSpec, backend: SocketAddr) -> Result<(), M::Error> {
        let backend = self.resolve_backend(vip, backend)?;
        let entry = self
            .model
            .vips
            .get_mut(vip)
            .ok_or(BalancerError::UnknownVip(*vip))?;
        let removed = entry
            .backends
            .remove(&backend)
            .ok_or(BalancerError::UnknownBackend { vip: *vip, backend })?;
        let forwarding = entry.forwarding;
        // Ring first, so no packet can pick the backend after its entry is cleared.
        self.rebuild_ring(vip)?;
        self.release_backend(vip, forwarding, removed.id, backend)
    }

    /// Clears a removed backend's entry (its flows stop matching), keeps its traffic in the
    /// VIP's totals, frees its id and (NAT) its port and endpoint.
    fn release_backend(
        &mut self,
        vip: &VipSpec,
        forwarding: Forwarding,
        id: u32,
        addr: SocketAddr,
    ) -> Result<(), M::Error> {
        let dp = BalancerError::Datapath;
        self.maps.put_backend(id, &Backend::default()).map_err(dp)?;
        if let Some(vip_id) = self.model.vips.get(vip).map(|e| e.id) {
            self.maps.retire_backend_traffic(id, vip_id).map_err(dp)?;
        }
        self.model.backend_ids.give_back(id);
        if !forwarding.is_dsr() {
            self.use_port(addr.port(), false, -1).map_err(dp)?;
            self.update_endpoint(addr, *vip, false).map_err(dp)?;
        }
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
    ) -> Result<(), M::Error> {
        if let Some(w) = weight {
            validate_weight(w)?;
        }
        let backend = self.resolve_backend(vip, backend)?;
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
    ) -> Result<bool, M::Error> {
        self.set_condition(vip, backend, healthy, |b| &mut b.healthy)
    }

    /// Sets one of the conditions a backend needs to take flows (`field`); a change goes
    /// through [`Self::change_backend`]'s ordering. Returns whether anything changed.
    fn set_condition(
        &mut self,
        vip: &VipSpec,
        backend: SocketAddr,
        value: bool,
        field: fn(&mut BackendEntry) -> &mut bool,
    ) -> Result<bool, M::Error> {
        let b = self
            .model
            .vips
            .get_mut(vip)
            .ok_or(BalancerError::UnknownVip(*vip))?
            .backends
            .get_mut(&backend)
            .ok_or(BalancerError::UnknownBackend { vip: *vip, backend })?;
        if *field(b) == value {
            return Ok(false);
        }
        self.change_backend(vip, backend, |b| *field(b) = value)?;
        Ok(true)
    }

    /// Records that the backend is the container `name` (None: a plain address again), and
    /// whether its labels made it one. No map changes: the name only says what to follow.
    ///
    /// # Errors
    /// Unknown VIP or backend.
    pub fn set_backend_container(
        &mut self,
        vip: &VipSpec,
        backend: SocketAddr,
        name: Option<String>,
        discovered: bool,
    ) -> Result<(), M::Error> {
        let b = self
            .model
            .vips
            .get_mut(vip)
            .ok_or(BalancerError::UnknownVip(*vip))?
            .backends
            .get_mut(&backend)
            .ok_or(BalancerError::UnknownBackend { vip: *vip, backend })?;
        b.container = name;
        b.discovered = discovered;
        Ok(())
    }

    /// Records whether a container backend's container runs. Stopped, it leaves the ring
    /// and its flows re-hash, as on a failed health check; running again, it comes back.
    /// Returns whether anything changed.
    ///
    /// # Errors
    /// Unknown VIP or backend, or a map update failing.
    pub fn set_container_running(
        &mut self,
        vip: &VipSpec,
        backend: SocketAddr,
        running: bool,
    ) -> Result<bool, M::Error> {
        self.set_condition(vip, backend, running, |b| &mut b.running)
    }

    /// Gives a backend a new address (its container came back elsewhere): a new endpoint
    /// with a new id, weight, state and container name carried over, the old one gone;
    /// one plan through [`Self::apply`], so written in the planner's order and undone
    /// whole if a write fails.
    ///
    /// # Errors
    /// Unknown VIP or backend, the new address taken or invalid, or a map update failing.
    pub fn move_backend(
        &mut self,
        vip: &VipSpec,
        from: SocketAddr,
        to: SocketAddr,
    ) -> Result<Applied, M::Error> {
        let mut wanted = self.desired_state();
        let config = wanted
            .vips
            .iter_mut()
            .find(|v| v.vip == *vip)
            .ok_or(BalancerError::UnknownVip(*vip))?;
        let moved = config.backends.iter_mut().find(|b| b.addr == from).ok_or(
            BalancerError::UnknownBackend {
                vip: *vip,
                backend: from,
            },
        )?;
        moved.addr = to;
        moved.id = None;
        self.apply(&wanted)
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
    ) -> Result<(), M::Error> {
        let entry = self
            .model
            .vips
            .get_mut(vip)
            .ok_or(BalancerError::UnknownVip(*vip))?;
        let b = entry
            .backends
            .get_mut(&backend)
            .ok_or(BalancerError::UnknownBackend { vip: *vip, backend })?;
        let was_in_ring = b.in_ring();
        change(b);
        let (id, flags, in_ring) = (b.id, b.flags(), b.in_ring());
        if was_in_ring && !in_ring {
            self.rebuild_ring(vip)?;
            return self.write_flags(id, vip, backend, flags);
        }
        self.write_flags(id, vip, backend, flags)?;
        self.rebuild_ring(vip)
    }

    /// Sets (or clears) the VIP's health-check spec; the agent runs the checks.
    ///
    /// # Errors
    /// Unknown VIP.
    pub fn set_vip_health(
        &mut self,
        vip: &VipSpec,
        health: Option<HealthSpec>,
    ) -> Result<(), M::Error> {
        let entry = self
            .model
            .vips
            .get_mut(vip)
            .ok_or(BalancerError::UnknownVip(*vip))?;
        entry.health = health;
        Ok(())
    }

    /// Health specs and backends of every VIP, for the health checker.
    #[must_use]
    pub fn health_targets(&self) -> Vec<(VipSpec, Option<HealthSpec>, Vec<SocketAddr>)> {
        self.model
            .vips
            .iter()
            .map(|(vip, e)| (*vip, e.health.clone(), e.backends.keys().copied().collect()))
            .collect()
    }

    fn write_flags(
        &mut self,
        id: u32,
        vip: &VipSpec,
        backend: SocketAddr,
        flags: u8,
    ) -> Result<(), M::Error> {
        let entry = self.vip_entry(vip)?;
        let value = backend_entry(
            backend,
            vip,
            entry.id,
            entry.idle_timeout_s(vip.proto),
            entry.forwarding,
            flags,
        );
        self.maps
            .put_backend(id, &value)
            .map_err(BalancerError::Datapath)
    }

    /// Builds the VIP's ring from its active backends, writes it into the idle half of its
    /// double buffer (only the slots that differ from what that half held) and then switches
    /// the VIP to it with one map update.
    fn rebuild_ring(&mut self, vip: &VipSpec) -> Result<(), M::Error> {
        let ring_size = self.ring_size();
        let entry = self.vip_entry(vip)?;
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
        if let Err(e) = self.maps.put_ring_slots(&changed) {
            // Some slots of the idle half may have been written: forget what it held, so the
            // next rebuild writes all of it rather than trusting a stale copy.
            let entry = self.model.vips.get_mut(vip).expect("checked above");
            entry.halves[idle].clear();
            return Err(BalancerError::Datapath(e));
        }
        let entry = self.model.vips.get_mut(vip).expect("checked above");
        entry.halves[idle] = ring;
        entry.live_half = idle;
        let entry = self.model.vips.remove(vip).expect("checked above");
        let written = self.write_vip_info(vip, &entry);
        self.model.vips.insert(*vip, entry);
        written.map_err(BalancerError::Datapath)
    }

    /// Each VIP and whether it can take a new flow: at least one of its backends owns ring
    /// slots (active, weight above 0, healthy, its container running). What a node announces
    /// is decided from this (`crate::announce`).
    #[must_use]
    pub fn vip_readiness(&self) -> Vec<(VipSpec, bool)> {
        self.model
            .vips
            .iter()
            .map(|(vip, entry)| (*vip, entry.backends.values().any(BackendEntry::in_ring)))
            .collect()
    }

    #[must_use]
    pub fn vip_specs(&self) -> Vec<VipSpec> {
        self.model.vips.keys().copied().collect()
    }

    /// Each backend id's VIP idle timeout in seconds: how long the data plane keeps its
    /// flows (`FlowState::is_live` needs it to count them).
    #[must_use]
    pub fn backend_idle_timeouts(&self) -> BTreeMap<u32, u32> {
        self.model
            .vips
            .iter()
            .flat_map(|(vip, e)| {
                let timeout = e.idle_timeout_s(vip.proto);
                e.backends.values().map(move |b| (b.id, timeout))
            })
            .collect()
    }

    /// # Errors
    /// Unknown VIP or a failing map read.
    pub fn vip_status(&self, vip: &VipSpec) -> Result<VipStatus, M::Error> {
        let entry = self.vip_entry(vip)?;
        let live = &entry.halves[entry.live_half];
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for id in live {
            *slots.entry(*id).or_default() += 1;
        }
        let retired = self
            .maps
            .retired_vip_traffic(entry.id)
            .map_err(BalancerError::Datapath)?;
        let backends = entry
            .backends
            .iter()
            .map(|(addr, b)| {
                let t: TrafficCounters = self
                    .maps
                    .backend_traffic(b.id)
                    .map_err(BalancerError::Datapath)?;
                Ok(BackendStatus {
                    addr: *addr,
                    container: b.container.clone(),
                    container_running: b.container.as_ref().map(|_| b.running),
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
            .collect::<Result<Vec<_>, M::Error>>()?;
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
            forwarding: entry.forwarding,
            health_check: entry.health.clone(),
            packets: traffic.packets,
            bytes: traffic.bytes,
            new_flows: traffic.new_flows,
            backends,
        })
    }

    /// # Errors
    /// A failing map read.
    pub fn status(&self) -> Result<Vec<VipStatus>, M::Error> {
        self.model.vips.keys().map(|v| self.vip_status(v)).collect()
    }

    /// Which backend a flow from `client` to `vip` gets, by the kernel's hash (seeded with
    /// `hash_seed`) and ring. `tracked` looks the flow up in the connection table; `now_ns` is
    /// the data plane's clock (`CLOCK_MONOTONIC_COARSE`), which its entries are judged by.
    ///
    /// # Errors
    /// Unknown VIP, family mismatch, or a failing map read.
    pub fn explain(
        &self,
        client: SocketAddr,
        vip: &VipSpec,
        hash_seed: u32,
        tracked: impl FnOnce(&FlowKey) -> std::result::Result<Option<FlowState>, M::Error>,
        now_ns: u64,
    ) -> Result<Explanation, M::Error> {
        let entry = self.vip_entry(vip)?;
        if family(&client) != family(&vip.addr) {
            return Err(BalancerError::ClientFamilyMismatch { vip: *vip, client });
        }
        let key = FlowKey::new(client, vip.addr, vip.proto.number());
        let hash = flow_hash(&key, hash_seed);
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
        let tracked_backend = tracked(&key)
            .map_err(BalancerError::Datapath)?
            .filter(|state| state.is_current(now_ns, timeout))
            .and_then(|state| by_id(state.backend_id));
        Ok(Explanation {
            client,
            vip: *vip,
            flow_hash: hash,
            ring_slot: slot,
            forwarding: entry.forwarding,
            new_flow_backend,
            tracked_backend,
        })
    }

    /// The configuration as it stands, for persisting.
    #[must_use]
    pub fn desired_state(&self) -> DesiredState {
        DesiredState {
            vips: self
                .model
                .vips
                .iter()
                .map(|(vip, entry)| VipConfig {
                    vip: *vip,
                    id: Some(entry.id),
                    health: entry.health.clone(),
                    idle_timeout_s: entry.idle_timeout_s,
                    forwarding: entry.forwarding,
                    backends: entry
                        .backends
                        .iter()
                        .map(|(addr, b)| BackendConfig {
                            addr: *addr,
                            weight: b.weight,
                            state: b.state,
                            id: Some(b.id),
                            container: b.container.clone(),
                            discovered: b.discovered,
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
    pub fn adopt(&mut self, state: &DesiredState) -> Result<Adoption, M::Error> {
        assert!(
            self.model.vips.is_empty(),
            "adopt starts from an empty balancer"
        );
        self.check_limits(state)?;
        let current = self.maps.read_contents().map_err(BalancerError::Datapath)?;
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
            carry_out(&mut self.maps, write).map_err(BalancerError::Datapath)?;
        }
        for (vip, (live, ring, other)) in halves {
            let entry = self.model.vips.get_mut(&vip).expect("built above");
            entry.live_half = live;
            entry.halves[live] = ring;
            entry.halves[1 - live] = other;
        }
        // Only now: until their entries were cleared, a packet could still reach them.
        for id in &ghosts.vip_ids {
            self.model.vip_ids.give_back(*id);
        }
        for id in &ghosts.backend_ids {
            self.model.backend_ids.give_back(*id);
        }
        let adoption = Adoption {
            kept_vips: state
                .vips
                .iter()
                .filter(|v| {
                    let id = self.model.vips[&v.vip].id;
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

    /// Makes the balancer hold `wanted` (a reloaded config): all of it or nothing. The whole
    /// state is checked and the whole difference planned before the first write; the writes
    /// then go out in the planner's order (see [`plan::plan`]), only the ring slots that
    /// differ from what a half is known to hold. VIPs and backends that stay keep their
    /// ids, ring halves, health verdicts and flows; their health specs, weights, states and
    /// idle timeouts become `wanted`'s. A write failing is undone with the writes before it,
    /// and the balancer keeps the state it had.
    ///
    /// Only where the new entries need ids or VIP slots that the leaving ones free (at the
    /// agent's limits) do the leaving ones go first, in a plan of their own; should the
    /// second plan fail, they are put back (under new ids where theirs were taken meanwhile).
    ///
    /// # Errors
    /// `wanted` breaking a limit or rule (nothing written), or a map update failing
    /// ([`BalancerError::Datapath`]: undone; [`BalancerError::PartlyApplied`]: the undoing
    /// failed too).
    pub fn apply(&mut self, wanted: &DesiredState) -> Result<Applied, M::Error> {
        self.check_limits(wanted)?;
        if self.has_room_for(wanted) {
            let writes = self.apply_whole(wanted)?;
            return Ok(Applied { writes });
        }
        let before = self.desired_state();
        let leaving_first = self.kept_part_of(wanted);
        let writes = self.apply_whole(&leaving_first)?;
        match self.apply_whole(wanted) {
            Ok(more) => Ok(Applied {
                writes: writes + more,
            }),
            // The leaving entries come back (under new ids where theirs were taken).
            Err(BalancerError::Datapath(failed)) => match self.apply_whole(&before) {
                Ok(_) => Err(BalancerError::Datapath(failed)),
                Err(
                    BalancerError::Datapath(undo)
                    | BalancerError::PartlyApplied { source: undo, .. },
                ) => Err(BalancerError::PartlyApplied {
                    source: failed,
                    undo: Box::new(undo),
                }),
                Err(other) => Err(other),
            },
            Err(other) => Err(other),
        }
    }

    /// The backends of `wanted`'s VIP that stay as they are: all of the model's, unless
    /// the VIP is new or changes its forwarding method. A VIP whose method changes keeps its
    /// slot, counters and ring halves, but all its backends are replaced (new ids), so no
    /// flow carries over into a method its backend did not open it with.
    fn staying_backends(&self, wanted: &VipConfig) -> Option<&BTreeMap<SocketAddr, BackendEntry>> {
        self.model
            .vips
            .get(&wanted.vip)
            .filter(|e| e.forwarding == wanted.forwarding)
            .map(|e| &e.backends)
    }

    /// Whether the VIPs and backends `wanted` adds fit beside the ones it removes.
    fn has_room_for(&self, wanted: &DesiredState) -> bool {
        let current = &self.model.vips;
        let new_vips = wanted
            .vips
            .iter()
            .filter(|v| !current.contains_key(&v.vip))
            .count();
        let new_backends = wanted
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(move |b| (v, b.addr)))
            .filter(|(v, addr)| {
                self.staying_backends(v)
                    .is_none_or(|backends| !backends.contains_key(addr))
            })
            .count();
        new_vips <= self.model.vip_ids.available()
            && new_backends <= self.model.backend_ids.available()
    }

    /// The current state without what `wanted` drops, and without anything it adds or
    /// changes.
    fn kept_part_of(&self, wanted: &DesiredState) -> DesiredState {
        let mut kept = self.desired_state();
        kept.vips.retain_mut(|v| {
            let Some(w) = wanted.vips.iter().find(|w| w.vip == v.vip) else {
                return false;
            };
            v.backends.retain(|b| {
                w.forwarding == v.forwarding && w.backends.iter().any(|wb| wb.addr == b.addr)
            });
            true
        });
        kept
    }

    /// One plan from the model to `wanted`, carried out or undone.
    fn apply_whole(&mut self, wanted: &DesiredState) -> Result<usize, M::Error> {
        let held = self.model_contents(false);
        let known = self.model_contents(true);
        let (next, released) = self.successor(wanted)?;
        let previous = std::mem::replace(&mut self.model, next);
        let (desired, halves) = match self.desired_contents(&held) {
            Ok(desired) => desired,
            Err(e) => {
                self.model = previous;
                return Err(e);
            }
        };
        let writes = plan::plan(&known, &desired);
        // A removed backend's counters join its VIP's totals once its entry is cleared (the
        // last plan write naming it): no packet counts for it after that.
        let retiring: Vec<(u32, u32)> = released
            .backends
            .iter()
            .filter_map(|(id, vip_id)| vip_id.map(|vip_id| (*id, vip_id)))
            .collect();
        let written = writes
            .iter()
            .try_for_each(|write| carry_out(&mut self.maps, write))
            .and_then(|()| {
                retiring
                    .iter()
                    .try_for_each(|(id, vip_id)| self.maps.retire_backend_traffic(*id, *vip_id))
            });
        if let Err(failed) = written {
            self.model = previous;
            return Err(self.undo(&held, failed));
        }
        for (vip, (live, ring, other)) in halves {
            let entry = self.model.vips.get_mut(&vip).expect("planned above");
            if live != entry.live_half {
                entry.halves[1 - live] = other;
            }
            entry.live_half = live;
            entry.halves[live] = ring;
        }
        // Only now: until their entries were cleared, a packet could still reach them.
        for (id, _) in released.backends {
            self.model.backend_ids.give_back(id);
        }
        for id in released.vips {
            self.model.vip_ids.give_back(id);
        }
        Ok(writes.len() + retiring.len())
    }

    /// Brings the maps back to `held` (what the model says they held) after a write of a
    /// plan failed: whatever of it went out is planned back.
    fn undo(&mut self, held: &MapContents, failed: M::Error) -> BalancerError<M::Error> {
        // Slots may have gone into idle halves: what they hold is no longer known.
        for entry in self.model.vips.values_mut() {
            entry.halves[1 - entry.live_half].clear();
        }
        let undone = self.maps.read_contents().and_then(|now| {
            plan::plan(&now, held)
                .iter()
                .try_for_each(|w| carry_out(&mut self.maps, w))
        });
        match undone {
            Ok(()) => BalancerError::Datapath(failed),
            Err(undo) => BalancerError::PartlyApplied {
                source: failed,
                undo: Box::new(undo),
            },
        }
    }

    /// What the maps hold when they hold the model: each VIP's live ring, and with
    /// `idle_halves` also what each idle half is known to hold.
    fn model_contents(&self, idle_halves: bool) -> MapContents {
        let ring_size = self.ring_size();
        let mut contents = MapContents::default();
        for (vip, entry) in &self.model.vips {
            let live = &entry.halves[entry.live_half];
            let base = ring_base(entry.id, entry.live_half, ring_size);
            contents.vips.insert(
                service_key(vip),
                VipInfo {
                    vip_id: entry.id,
                    ring_base: base,
                    ring_size: if live.is_empty() { 0 } else { ring_size },
                    idle_timeout_s: entry.idle_timeout_s(vip.proto),
                },
            );
            if !live.is_empty() {
                contents.rings.insert(base, live.clone());
            }
            let idle = &entry.halves[1 - entry.live_half];
            if idle_halves && !idle.is_empty() {
                let idle_base = ring_base(entry.id, 1 - entry.live_half, ring_size);
                contents.rings.insert(idle_base, idle.clone());
            }
        }
        self.add_entries(&mut contents);
        contents
    }

    /// The model for `wanted`, built from this one: what stays keeps its id, ring halves
    /// and health verdict; what is new takes ids in the order single operations would
    /// (new VIPs, their backends, then new backends of kept VIPs); what leaves is listed
    /// for its ids to be freed once its entries are gone.
    fn successor(&self, wanted: &DesiredState) -> Result<(Model, Released), M::Error> {
        let old = &self.model;
        let mut next = Model {
            vips: BTreeMap::new(),
            port_users: BTreeMap::new(),
            endpoint_vips: BTreeMap::new(),
            vip_ids: old.vip_ids.clone(),
            backend_ids: old.backend_ids.clone(),
        };
        let wanted: BTreeMap<VipSpec, &VipConfig> =
            wanted.vips.iter().map(|v| (v.vip, v)).collect();
        let (kept, added): (Vec<&VipConfig>, Vec<&VipConfig>) =
            wanted.values().partition(|v| old.vips.contains_key(&v.vip));
        let mut joined = Vec::new();
        for v in added.iter().chain(&kept) {
            let before = old.vips.get(&v.vip);
            let staying_backends = self.staying_backends(v);
            let id = match before {
                Some(e) => e.id,
                None => next
                    .vip_ids
                    .take()
                    .ok_or(BalancerError::VipSlotsExhausted(self.max_vips))?,
            };
            let mut entry = VipEntry {
                id,
                health: v.health.clone(),
                idle_timeout_s: v.idle_timeout_s,
                forwarding: v.forwarding,
                live_half: before.map_or(0, |e| e.live_half),
                halves: before.map_or_else(|| [Vec::new(), Vec::new()], |e| e.halves.clone()),
                backends: BTreeMap::new(),
            };
            let configs: BTreeMap<SocketAddr, &BackendConfig> =
                v.backends.iter().map(|b| (b.addr, b)).collect();
            for (addr, b) in configs {
                let was = staying_backends.and_then(|backends| backends.get(&addr));
                let id = match was {
                    Some(w) => w.id,
                    None => {
                        if !v.forwarding.is_dsr() {
                            joined.push((addr, v.vip));
                        }
                        next.backend_ids
                            .take()
                            .ok_or(BalancerError::BackendSlotsExhausted(MAX_BACKENDS))?
                    }
                };
                entry.backends.insert(
                    addr,
                    BackendEntry {
                        id,
                        weight: b.weight,
                        state: b.state,
                        healthy: was.is_none_or(|w| w.healthy),
                        container: b.container.clone(),
                        discovered: b.discovered,
                        running: was.is_none_or(|w| w.running),
                    },
                );
                if !v.forwarding.is_dsr() {
                    next.port_users.entry(addr.port()).or_default().backends += 1;
                }
            }
            next.port_users.entry(v.vip.addr.port()).or_default().vips += 1;
            next.vips.insert(v.vip, entry);
        }
        // An endpoint keeps naming the VIPs it names, oldest first; new ones join behind.
        for ((addr, proto), list) in &old.endpoint_vips {
            let staying: Vec<VipSpec> = list
                .iter()
                .filter(|v| {
                    old.vips.get(v).map(|e| e.forwarding) == next.vips.get(v).map(|e| e.forwarding)
                        && next
                            .vips
                            .get(v)
                            .is_some_and(|e| e.backends.contains_key(addr))
                })
                .copied()
                .collect();
            if !staying.is_empty() {
                next.endpoint_vips.insert((*addr, *proto), staying);
            }
        }
        for (addr, vip) in joined {
            next.endpoint_vips
                .entry((addr, vip.proto))
                .or_default()
                .push(vip);
        }
        let mut released = Released::default();
        for (vip, entry) in &old.vips {
            let staying = next.vips.get(vip);
            for (addr, b) in &entry.backends {
                if staying.is_none_or(|s| {
                    s.forwarding != entry.forwarding || !s.backends.contains_key(addr)
                }) {
                    released.backends.push((b.id, staying.map(|_| entry.id)));
                }
            }
            if staying.is_none() {
                released.vips.push(entry.id);
            }
        }
        // Removed VIPs' ids go back before those of backends that left kept VIPs, as a
        // reload's single removals would give them.
        released
            .backends
            .sort_by_key(|(_, vip_id)| vip_id.is_some());
        Ok((next, released))
    }

    fn clear_model(&mut self) {
        self.model.vips.clear();
        self.model.port_users.clear();
        self.model.endpoint_vips.clear();
        self.model.vip_ids = IdPool::new(self.max_vips);
        self.model.backend_ids = IdPool::new(MAX_BACKENDS);
    }

    /// Fills the (empty) model with `state`. Ids: what the maps hold a VIP or backend under,
    /// else the id recorded in the state, else a fresh one. Ids the maps use for entries
    /// the state lacks are held back until those entries are gone, so nothing new takes
    /// one that a live ring or connection still names.
    fn build_model(
        &mut self,
        state: &DesiredState,
        held: &MapContents,
    ) -> Result<Ghosts, M::Error> {
        let mut vip_ids: BTreeMap<VipSpec, u32> = BTreeMap::new();
        for v in &state.vips {
            if let Some(info) = held.vips.get(&service_key(&v.vip))
                && let Some(id) = self.model.vip_ids.take_exact(info.vip_id)
            {
                vip_ids.insert(v.vip, id);
            }
        }
        let mut ghosts = Ghosts::default();
        for (key, info) in &held.vips {
            if !state.vips.iter().any(|v| service_key(&v.vip) == *key) {
                ghosts.vips += 1;
            }
            if let Some(id) = self.model.vip_ids.take_exact(info.vip_id) {
                ghosts.vip_ids.push(id);
            }
        }
        for v in &state.vips {
            if !vip_ids.contains_key(&v.vip)
                && let Some(id) = v.id.and_then(|id| self.model.vip_ids.take_exact(id))
            {
                vip_ids.insert(v.vip, id);
            }
        }
        let max_vips = self.max_vips;
        for v in &state.vips {
            if let std::collections::btree_map::Entry::Vacant(slot) = vip_ids.entry(v.vip) {
                slot.insert(
                    self.model
                        .vip_ids
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
            // The same backend of the same VIP, forwarded alike, whatever its state and
            // timeout.
            let wanted = backend_entry(b.addr, &v.vip, vip_ids[&v.vip], 0, v.forwarding, 0);
            let held_id = held
                .backends
                .iter()
                .find(|(_, h)| {
                    Backend {
                        flags: 0,
                        idle_timeout_s: 0,
                        ..**h
                    } == wanted
                })
                .map(|(id, _)| *id);
            if let Some(id) = held_id.and_then(|id| self.model.backend_ids.take_exact(id)) {
                backend_ids.insert((v.vip, b.addr), id);
            }
        }
        for id in held.backends.keys() {
            if let Some(id) = self.model.backend_ids.take_exact(*id) {
                ghosts.backend_ids.push(id);
            }
        }
        for (v, b) in backend_pairs() {
            if !backend_ids.contains_key(&(v.vip, b.addr))
                && let Some(id) = b.id.and_then(|id| self.model.backend_ids.take_exact(id))
            {
                backend_ids.insert((v.vip, b.addr), id);
            }
        }
        for (v, b) in backend_pairs() {
            if let std::collections::btree_map::Entry::Vacant(slot) =
                backend_ids.entry((v.vip, b.addr))
            {
                slot.insert(
                    self.model
                        .backend_ids
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
                forwarding: v.forwarding,
                live_half: 0,
                halves: [Vec::new(), Vec::new()],
                backends: BTreeMap::new(),
            };
            self.model
                .port_users
                .entry(v.vip.addr.port())
                .or_default()
                .vips += 1;
            for b in &v.backends {
                entry.backends.insert(
                    b.addr,
                    BackendEntry {
                        id: backend_ids[&(v.vip, b.addr)],
                        weight: b.weight,
                        state: b.state,
                        healthy: true,
                        container: b.container.clone(),
                        discovered: b.discovered,
                        running: true,
                    },
                );
                if v.forwarding.is_dsr() {
                    continue;
                }
                self.model
                    .port_users
                    .entry(b.addr.port())
                    .or_default()
                    .backends += 1;
                self.model
                    .endpoint_vips
                    .entry((b.addr, v.vip.proto))
                    .or_default()
                    .push(v.vip);
            }
            self.model.vips.insert(v.vip, entry);
        }
        // An endpoint keeps naming the VIP it names now, if that one stays: flows of that
        // VIP may have no reverse entry.
        for ((addr, proto), list) in &mut self.model.endpoint_vips {
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
    ) -> Result<(MapContents, BTreeMap<VipSpec, (usize, Vec<u32>, Vec<u32>)>), M::Error> {
        let ring_size = self.ring_size();
        let mut desired = MapContents::default();
        let mut halves = BTreeMap::new();
        for (vip, entry) in &self.model.vips {
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
            halves.insert(*vip, (live, ring, other));
        }
        self.add_entries(&mut desired);
        Ok((desired, halves))
    }

    /// The model's backend, endpoint and port entries, as the maps hold them.
    fn add_entries(&self, contents: &mut MapContents) {
        for (vip, entry) in &self.model.vips {
            let timeout = entry.idle_timeout_s(vip.proto);
            for (addr, b) in &entry.backends {
                contents.backends.insert(
                    b.id,
                    backend_entry(*addr, vip, entry.id, timeout, entry.forwarding, b.flags()),
                );
            }
        }
        for ((addr, proto), list) in &self.model.endpoint_vips {
            if let Some(first) = list.first() {
                contents
                    .endpoints
                    .insert((*addr, proto.number()), endpoint_entry(*first, list.len()));
            }
        }
        let ports: std::collections::BTreeSet<u16> = self
            .model
            .port_users
            .keys()
            .copied()
            .chain(self.model.endpoint_vips.keys().map(|(addr, _)| addr.port()))
            .collect();
        for port in ports {
            let roles = self.port_roles(port);
            if roles != 0 {
                contents.ports.insert(port, roles);
            }
        }
    }
}

/// What a whole change frees once its writes are done: backend ids (with the kept VIP whose
/// totals take over their counters) and VIP slots.
#[derive(Debug, Default)]
struct Released {
    backends: Vec<(u32, Option<u32>)>,
    vips: Vec<u32>,
}

/// What `Balancer::apply` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Map updates written, counters moved included (0: the maps held the state already).
    pub writes: usize,
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

/// A backend's `XLB_BACKENDS` entry. It repeats its VIP's key, idle timeout and forwarding
/// method, which is all an established flow's packet is checked against and sent by (no VIP
/// lookup): whatever changes them rewrites the VIP's backend entries too.
fn backend_entry(
    addr: SocketAddr,
    vip: &VipSpec,
    vip_id: u32,
    idle_timeout_s: u32,
    forwarding: Forwarding,
    flags: u8,
) -> Backend {
    Backend {
        addr: to_bytes(addr.ip()),
        port_be: addr.port().to_be(),
        family: family(&addr),
        flags,
        vip_id,
        vip: VipKey::new(vip.addr, vip.proto.number()),
        idle_timeout_s,
        forwarding: forwarding.abi(),
        _pad: [0; 3],
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

#[cfg(test)]
mod tests {
    use lb_common::{IPPROTO_TCP, PORT_HAS_SHARED_ENDPOINT, TrafficCounters};

    use super::*;
    use crate::fake::{FakeMaps, Write};

    /// Prime, and small enough to read a ring in a failure message.
    const RING: u32 = 13;
    const MAX_VIPS: u32 = 8;

    fn vip(n: u8) -> VipSpec {
        format!("192.0.2.{n}:80/tcp").parse().unwrap()
    }

    fn backend(n: u8) -> SocketAddr {
        format!("10.1.0.{n}:8080").parse().unwrap()
    }

    /// A balancer over fake maps that check, after every write, what a packet relies on.
    fn balancer() -> Balancer<FakeMaps> {
        Balancer::new(FakeMaps::new().checking_every_write(), MAX_VIPS, RING)
    }

    /// `vip(1)` with backends 1..=n, each of weight 1; the writes so far forgotten.
    fn with_backends(n: u8) -> Balancer<FakeMaps> {
        let mut b = balancer();
        b.add_vip(vip(1)).unwrap();
        for i in 1..=n {
            b.add_backend(&vip(1), backend(i), 1).unwrap();
        }
        b.maps_mut().take_writes();
        b
    }

    fn id_of(b: &Balancer<FakeMaps>, vip: &VipSpec, addr: SocketAddr) -> u32 {
        b.model.vips[vip].backends[&addr].id
    }

    fn position(writes: &[Write], what: impl Fn(&Write) -> bool) -> usize {
        writes
            .iter()
            .position(what)
            .unwrap_or_else(|| panic!("no such write in {writes:#?}"))
    }

    /// The VIP's live ring as the maps hold it.
    fn live_ring(maps: &FakeMaps, vip: &VipSpec) -> Vec<u32> {
        let info = maps.vips[&service_key(vip)];
        maps.contents()
            .rings
            .get(&info.ring_base)
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn removing_a_backend_switches_the_ring_before_clearing_its_entry() {
        let mut b = with_backends(3);
        let gone = id_of(&b, &vip(1), backend(2));
        b.remove_backend(&vip(1), backend(2)).unwrap();
        let writes = b.maps_mut().take_writes();
        let switch = position(&writes, |w| matches!(w, Write::Vip { .. }));
        let cleared = position(&writes, |w| {
            *w == Write::Backend {
                id: gone,
                value: Backend::default(),
            }
        });
        assert!(switch < cleared, "{writes:#?}");
        assert!(!live_ring(b.maps(), &vip(1)).contains(&gone));
        // Its counters stay in the VIP's totals, moved only once no packet counts for it.
        let retired = position(
            &writes,
            |w| matches!(w, Write::RetireBackendTraffic { backend_id, .. } if *backend_id == gone),
        );
        assert!(cleared < retired, "{writes:#?}");
    }

    #[test]
    fn a_backend_leaving_the_ring_keeps_its_flows_until_the_switch() {
        for leave in [
            |b: &mut Balancer<FakeMaps>| {
                b.update_backend(&vip(1), backend(1), None, Some(BackendState::Draining))
            },
            |b: &mut Balancer<FakeMaps>| b.set_health(&vip(1), backend(1), false).map(|_| ()),
            |b: &mut Balancer<FakeMaps>| b.update_backend(&vip(1), backend(1), Some(0), None),
        ] {
            let mut b = with_backends(2);
            let id = id_of(&b, &vip(1), backend(1));
            leave(&mut b).unwrap();
            let writes = b.maps_mut().take_writes();
            let switch = position(&writes, |w| matches!(w, Write::Vip { .. }));
            let flags = position(
                &writes,
                |w| matches!(w, Write::Backend { id: i, .. } if *i == id),
            );
            assert!(switch < flags, "{writes:#?}");
            assert!(!live_ring(b.maps(), &vip(1)).contains(&id));
        }
    }

    /// Weight 0 drains, as in IPVS and HAProxy: no ring slots, and an entry whose flags keep
    /// its established flows going; a weight again brings it back into the ring.
    #[test]
    fn weight_zero_drains_a_backend() {
        let mut b = with_backends(2);
        b.add_backend(&vip(1), backend(3), 0).unwrap();
        let added = id_of(&b, &vip(1), backend(3));
        assert_eq!(b.maps().backends[&added].flags, BACKEND_DRAINING);
        assert!(!live_ring(b.maps(), &vip(1)).contains(&added));

        let first = id_of(&b, &vip(1), backend(1));
        b.update_backend(&vip(1), backend(1), Some(0), None)
            .unwrap();
        assert_eq!(b.maps().backends[&first].flags, BACKEND_DRAINING);
        let ring = live_ring(b.maps(), &vip(1));
        let second = id_of(&b, &vip(1), backend(2));
        assert!(ring.iter().all(|id| *id == second), "{ring:?}");
        let status = b.status().unwrap();
        let zero = &status[0]
            .backends
            .iter()
            .find(|s| s.addr == backend(1))
            .unwrap();
        assert_eq!(
            (zero.weight, zero.state, zero.slots),
            (0, BackendState::Active, 0)
        );

        b.update_backend(&vip(1), backend(1), Some(2), None)
            .unwrap();
        assert_eq!(b.maps().backends[&first].flags, BACKEND_ACTIVE);
        assert!(live_ring(b.maps(), &vip(1)).contains(&first));

        // A restart adopting a state with weight 0 writes the same thing.
        let held = b.maps().contents();
        let mut wanted = b.desired_state();
        wanted.vips[0].backends.iter_mut().for_each(|c| {
            if c.addr == backend(2) {
                c.weight = 0;
            }
        });
        let mut restarted = Balancer::new(FakeMaps::holding(&held), MAX_VIPS, RING);
        restarted.adopt(&wanted).unwrap();
        assert_eq!(restarted.maps().backends[&second].flags, BACKEND_DRAINING);
        assert!(!live_ring(restarted.maps(), &vip(1)).contains(&second));
    }

    /// `xlb vip set`: a new idle timeout is written to the `VipInfo` and the backends'
    /// entries (ring and flows stay), health checks change no map at all, a failing write keeps the old settings,
    /// and a timeout out of range writes nothing.
    #[test]
    fn vip_settings_change_in_place() {
        use crate::{
            health::{HealthSpec, Probe},
            model::Setting,
        };
        let mut b = with_backends(2);
        let ring = live_ring(b.maps(), &vip(1));
        let timeout = |secs| VipSettings {
            idle_timeout_s: Setting::To(secs),
            ..VipSettings::default()
        };
        assert!(b.set_vip(&vip(1), &timeout(600)).unwrap());
        let writes = b.maps_mut().take_writes();
        // The VIP's entry (new flows) and its backends' (established flows), nothing else.
        assert_eq!(writes.len(), 3, "{writes:#?}");
        for w in &writes {
            match w {
                Write::Vip { info, .. } => assert_eq!(info.idle_timeout_s, 600),
                Write::Backend { value, .. } => assert_eq!(value.idle_timeout_s, 600),
                other => panic!("{other:?} in {writes:#?}"),
            }
        }
        assert_eq!(live_ring(b.maps(), &vip(1)), ring);
        assert_eq!(b.vip_status(&vip(1)).unwrap().idle_timeout_s, 600);
        assert!(!b.set_vip(&vip(1), &timeout(600)).unwrap(), "unchanged");

        let check = HealthSpec {
            probe: Probe::Tcp,
            interval: std::time::Duration::from_millis(500),
            timeout: std::time::Duration::from_millis(200),
            rise: 1,
            fall: 1,
        };
        let health = VipSettings {
            health: Setting::To(check.clone()),
            ..VipSettings::default()
        };
        assert!(b.set_vip(&vip(1), &health).unwrap());
        assert!(b.maps_mut().take_writes().is_empty());
        assert_eq!(b.vip_status(&vip(1)).unwrap().health_check, Some(check));

        let before = b.desired_state();
        let start = b.maps().writes().len();
        b.maps_mut().fail_at(start);
        let back = VipSettings {
            health: Setting::Default,
            idle_timeout_s: Setting::Default,
        };
        assert!(matches!(
            b.set_vip(&vip(1), &back),
            Err(BalancerError::Datapath(_))
        ));
        assert_eq!(b.desired_state(), before);
        assert_eq!(b.maps().vips[&service_key(&vip(1))].idle_timeout_s, 600);

        assert!(matches!(
            b.set_vip(&vip(1), &timeout(5)),
            Err(BalancerError::IdleTimeout { .. })
        ));
        assert!(matches!(
            b.set_vip(&vip(9), &timeout(60)),
            Err(BalancerError::UnknownVip(_))
        ));
        b.maps_mut().take_writes();
        assert!(b.set_vip(&vip(1), &back).unwrap());
        let status = b.vip_status(&vip(1)).unwrap();
        assert_eq!((status.idle_timeout_s, status.health_check), (300, None));
    }

    #[test]
    fn a_backend_joining_the_ring_is_written_before_the_switch() {
        let mut b = with_backends(1);
        b.add_backend(&vip(1), backend(2), 1).unwrap();
        let id = id_of(&b, &vip(1), backend(2));
        let writes = b.maps_mut().take_writes();
        let entry = position(
            &writes,
            |w| matches!(w, Write::Backend { id: i, .. } if *i == id),
        );
        let ring = position(&writes, |w| matches!(w, Write::RingSlots(_)));
        let switch = position(&writes, |w| matches!(w, Write::Vip { .. }));
        assert!(entry < ring && ring < switch, "{writes:#?}");
        assert!(live_ring(b.maps(), &vip(1)).contains(&id));
    }

    #[test]
    fn backend_entries_carry_their_vips_key_and_current_idle_timeout() {
        let mut b = with_backends(2);
        let ids = [1, 2].map(|n| id_of(&b, &vip(1), backend(n)));
        let key = VipKey::new(vip(1).addr, vip(1).proto.number());
        for id in ids {
            let entry = b.maps().backends[&id];
            assert_eq!(entry.vip, key, "{entry:?}");
            assert_eq!(entry.idle_timeout_s, Protocol::Tcp.default_idle_timeout_s());
        }
        assert!(b.set_vip_idle_timeout(&vip(1), Some(42)).unwrap());
        let writes = b.maps_mut().take_writes();
        for id in ids {
            assert_eq!(b.maps().backends[&id].idle_timeout_s, 42);
            position(
                &writes,
                |w| matches!(w, Write::Backend { id: i, .. } if *i == id),
            );
        }
        assert_eq!(b.maps().vips[&service_key(&vip(1))].idle_timeout_s, 42);
    }

    #[test]
    fn a_rebuild_writes_only_the_slots_that_change() {
        let mut b = with_backends(3);
        // Both halves hold a ring by now; the idle one the ring before the last.
        let before = b.maps().clone();
        b.update_backend(&vip(1), backend(3), Some(4), None)
            .unwrap();
        let writes = b.maps_mut().take_writes();
        let slots: Vec<(u32, u32)> = writes
            .iter()
            .filter_map(|w| match w {
                Write::RingSlots(s) => Some(s.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(!slots.is_empty());
        assert!(slots.len() < RING as usize, "{slots:?}");
        for (slot, id) in &slots {
            assert_ne!(
                before.slots.get(slot),
                Some(id),
                "slot {slot} rewritten with what it held"
            );
        }
        // What was not written is what the new ring wants there anyway.
        let members: Vec<MaglevBackend> = b.model.vips[&vip(1)]
            .backends
            .iter()
            .map(|(addr, e)| MaglevBackend::new(e.id, to_bytes(addr.ip()), addr.port(), e.weight))
            .collect();
        assert_eq!(
            live_ring(b.maps(), &vip(1)),
            build_ring(&members, RING).unwrap()
        );
        // Once both halves hold the ring, rebuilding it writes no slot at all.
        b.update_backend(&vip(1), backend(3), Some(4), None)
            .unwrap();
        b.maps_mut().take_writes();
        b.update_backend(&vip(1), backend(3), Some(4), None)
            .unwrap();
        let writes = b.maps_mut().take_writes();
        assert!(
            writes.iter().all(|w| !matches!(w, Write::RingSlots(_))),
            "{writes:#?}"
        );
    }

    #[test]
    fn a_ports_role_is_cleared_with_its_last_user() {
        let mut b = balancer();
        let (one, two) = (vip(1), vip(2));
        for v in [one, two] {
            b.add_vip(v).unwrap();
        }
        b.add_backend(&one, backend(1), 1).unwrap();
        b.add_backend(&two, backend(2), 1).unwrap();
        assert_eq!(
            b.maps().ports[&80] & PORT_IS_VIP,
            PORT_IS_VIP,
            "both VIPs on port 80"
        );
        b.maps_mut().take_writes();

        b.remove_vip(&one).unwrap();
        let writes = b.maps_mut().take_writes();
        assert!(
            !writes.iter().any(|w| matches!(
                w,
                Write::Port {
                    port: 80 | 8080,
                    ..
                }
            )),
            "port 80 still has a VIP and 8080 a backend: {writes:#?}"
        );

        let last = id_of(&b, &two, backend(2));
        b.remove_backend(&two, backend(2)).unwrap();
        let writes = b.maps_mut().take_writes();
        let cleared = position(
            &writes,
            |w| matches!(w, Write::Backend { id, .. } if *id == last),
        );
        let role_gone = position(&writes, |w| {
            *w == Write::Port {
                port: 8080,
                roles: 0,
            }
        });
        assert!(cleared < role_gone, "{writes:#?}");

        b.remove_vip(&two).unwrap();
        let writes = b.maps_mut().take_writes();
        let vip_gone = position(&writes, |w| matches!(w, Write::RemoveVip(_)));
        let role_gone = position(&writes, |w| *w == Write::Port { port: 80, roles: 0 });
        assert!(vip_gone < role_gone, "{writes:#?}");
        assert!(b.maps().contents().ports.is_empty());
    }

    #[test]
    fn an_endpoint_shared_by_two_vips_marks_its_port_first_and_unmarks_it_last() {
        let mut b = balancer();
        let (tcp, udp): (VipSpec, VipSpec) = (
            "192.0.2.1:53/tcp".parse().unwrap(),
            "192.0.2.2:53/tcp".parse().unwrap(),
        );
        let shared: SocketAddr = "10.1.0.9:5353".parse().unwrap();
        for v in [tcp, udp] {
            b.add_vip(v).unwrap();
        }
        b.add_backend(&tcp, shared, 1).unwrap();
        b.maps_mut().take_writes();
        // The fake checks after every write that a count above one comes with the mark.
        b.add_backend(&udp, shared, 1).unwrap();
        assert_ne!(b.maps().ports[&5353] & PORT_HAS_SHARED_ENDPOINT, 0);
        b.remove_backend(&tcp, shared).unwrap();
        assert_eq!(b.maps().ports[&5353] & PORT_HAS_SHARED_ENDPOINT, 0);
        assert_eq!(b.maps().endpoints[&(shared, 6)].vips, 1);
    }

    /// A running balancer's maps and its state as the state file records it, after
    /// operations of every kind.
    fn running() -> (FakeMaps, DesiredState) {
        let mut b = balancer();
        b.add_vip(vip(1)).unwrap();
        b.add_vip_with_timeout(vip(2), Some(30)).unwrap();
        b.add_vip(vip(3)).unwrap();
        for i in 1..=4 {
            b.add_backend(&vip(1), backend(i), i.into()).unwrap();
        }
        b.add_backend(&vip(2), backend(9), 1).unwrap();
        b.add_backend(&vip(2), backend(10), 1).unwrap();
        b.remove_backend(&vip(1), backend(2)).unwrap();
        b.remove_vip(&vip(3)).unwrap();
        b.add_backend(&vip(1), backend(5), 2).unwrap();
        b.update_backend(&vip(1), backend(3), None, Some(BackendState::Draining))
            .unwrap();
        let state = b.desired_state();
        let Balancer { maps, .. } = b;
        (maps, state)
    }

    #[test]
    fn a_restart_over_unchanged_maps_writes_nothing() {
        let (maps, state) = running();
        let held = maps.contents();
        let mut restarted = Balancer::new(
            FakeMaps::holding(&held).checking_every_write(),
            MAX_VIPS,
            RING,
        );
        let adoption = restarted.adopt(&state).unwrap();
        assert_eq!(restarted.maps().writes(), []);
        assert_eq!(
            adoption,
            Adoption {
                kept_vips: 2,
                removed_vips: 0,
                writes: 0
            }
        );
        assert_eq!(restarted.maps().contents(), held);
        assert_eq!(restarted.desired_state(), state);
    }

    #[test]
    fn a_restart_without_the_recorded_ids_writes_nothing_either() {
        let (maps, state) = running();
        let held = maps.contents();
        let mut forgotten = state.clone();
        for v in &mut forgotten.vips {
            v.id = None;
            for b in &mut v.backends {
                b.id = None;
            }
        }
        let mut restarted = Balancer::new(FakeMaps::holding(&held), MAX_VIPS, RING);
        restarted.adopt(&forgotten).unwrap();
        assert_eq!(restarted.maps().writes(), []);
        // The maps told it every id.
        assert_eq!(restarted.desired_state(), state);
    }

    #[test]
    fn a_restart_with_a_changed_state_writes_only_the_change() {
        let (maps, mut state) = running();
        let held = maps.contents();
        state.vips[0].backends.retain(|b| b.addr != backend(4));
        let mut restarted = Balancer::new(
            FakeMaps::holding(&held).checking_every_write(),
            MAX_VIPS,
            RING,
        );
        restarted.adopt(&state).unwrap();
        let writes = restarted.maps().writes();
        // The first VIP's ring and switch, then its old backend cleared; the other VIP untouched.
        assert!(
            writes.iter().all(|w| match w {
                Write::Vip { key, .. } => *key == service_key(&vip(1)),
                _ => true,
            }),
            "{writes:#?}"
        );
        assert!(writes.iter().any(|w| matches!(w, Write::RingSlots(_))));
    }

    #[test]
    fn a_state_beyond_the_limits_writes_nothing() {
        let (maps, state) = running();
        let held = maps.contents();
        let too_many = DesiredState {
            vips: (1..=MAX_VIPS as u8 + 1)
                .map(|n| VipConfig {
                    vip: vip(n),
                    backends: Vec::new(),
                    id: None,
                    health: None,
                    idle_timeout_s: None,
                    forwarding: Forwarding::Nat,
                })
                .collect(),
        };
        let mut ring_too_small = state.clone();
        ring_too_small.vips[1].backends = (20..=20 + RING as u8)
            .map(|n| BackendConfig {
                addr: backend(n),
                weight: 1,
                state: BackendState::Active,
                id: None,
                container: None,
                discovered: false,
            })
            .collect();
        let mut bad_last_weight = state;
        bad_last_weight.vips[1].backends[1].weight = crate::model::MAX_WEIGHT + 1;
        for (wanted, what) in [
            (too_many, "too many VIPs"),
            (ring_too_small, "more backends than ring slots"),
            (bad_last_weight, "a bad weight in the last VIP"),
        ] {
            let mut restarted = Balancer::new(FakeMaps::holding(&held), MAX_VIPS, RING);
            assert!(restarted.adopt(&wanted).is_err(), "{what}");
            assert_eq!(restarted.maps().writes(), [], "{what}");
            assert_eq!(restarted.maps().contents(), held, "{what}");
        }
    }

    #[test]
    fn a_failed_ring_write_is_not_switched_to_and_is_rewritten_whole() {
        let mut b = with_backends(2);
        let first_failing = b.maps().writes().len();
        // add_backend: port role, endpoint, counters, entry, then the ring slots.
        b.maps_mut().fail_at(first_failing + 3);
        let before = live_ring(b.maps(), &vip(1));
        assert!(matches!(
            b.add_backend(&vip(1), backend(3), 1),
            Err(BalancerError::Datapath(_))
        ));
        assert_eq!(live_ring(b.maps(), &vip(1)), before, "no switch");
        b.maps_mut().take_writes();
        b.update_backend(&vip(1), backend(1), Some(2), None)
            .unwrap();
        let rewritten = b
            .maps()
            .writes()
            .iter()
            .find_map(|w| match w {
                Write::RingSlots(s) => Some(s.len()),
                _ => None,
            })
            .unwrap();
        assert_eq!(rewritten, RING as usize, "the idle half is not trusted");
    }

    #[test]
    fn status_counts_what_removed_backends_carried() {
        let mut b = with_backends(2);
        let (one, two) = (
            id_of(&b, &vip(1), backend(1)),
            id_of(&b, &vip(1), backend(2)),
        );
        let carried = |packets| TrafficCounters {
            packets,
            bytes: packets * 100,
            new_flows: 1,
        };
        b.maps_mut().backend_traffic.insert(one, carried(3));
        b.maps_mut().backend_traffic.insert(two, carried(5));
        b.remove_backend(&vip(1), backend(2)).unwrap();
        let status = b.vip_status(&vip(1)).unwrap();
        assert_eq!(
            (status.packets, status.bytes, status.new_flows),
            (8, 800, 2)
        );
        assert_eq!(status.backends.len(), 1);
        assert_eq!(status.backends[0].slots, RING);
    }

    /// `state` as a config file gives it: no ids.
    fn as_config(state: &DesiredState) -> DesiredState {
        let mut state = state.clone();
        for v in &mut state.vips {
            v.id = None;
            for b in &mut v.backends {
                b.id = None;
            }
        }
        state
    }

    fn backend_config(n: u8, weight: u32, state: BackendState) -> BackendConfig {
        BackendConfig {
            addr: backend(n),
            weight,
            state,
            id: None,
            container: None,
            discovered: false,
        }
    }

    /// `running()`'s balancer, checking every write from here on.
    fn running_balancer() -> Balancer<FakeMaps> {
        let (maps, state) = running();
        let mut b = Balancer::new(
            FakeMaps::holding(&maps.contents()).checking_every_write(),
            MAX_VIPS,
            RING,
        );
        b.adopt(&state).unwrap();
        b
    }

    /// Whether the maps hold exactly what the balancer says: a restart over them writes
    /// nothing.
    fn assert_in_step(b: &Balancer<FakeMaps>) {
        let mut restarted = Balancer::new(FakeMaps::holding(&b.maps().contents()), MAX_VIPS, RING);
        restarted.adopt(&b.desired_state()).unwrap();
        assert_eq!(restarted.maps().writes(), [], "the maps hold the model");
    }

    /// Many changes at once: a weight, a backend in, one out, one draining, a VIP gone, a
    /// new VIP with a backend and a timeout.
    fn many_changes(b: &Balancer<FakeMaps>) -> DesiredState {
        let mut wanted = as_config(&b.desired_state());
        let web = &mut wanted.vips[0];
        web.backends.retain(|c| c.addr != backend(4));
        web.backends[0].weight = 3;
        web.backends
            .push(backend_config(6, 1, BackendState::Active));
        web.backends[1].state = BackendState::Draining;
        wanted.vips.remove(1);
        wanted.vips.push(VipConfig {
            vip: vip(7),
            backends: vec![backend_config(11, 2, BackendState::Active)],
            id: None,
            health: Some(HealthSpec::default()),
            idle_timeout_s: Some(60),
            forwarding: Forwarding::Nat,
        });
        wanted
    }

    #[test]
    fn a_reload_reaches_the_wanted_state_in_one_ordered_plan() {
        let mut b = running_balancer();
        let kept_id = id_of(&b, &vip(1), backend(1));
        let wanted = many_changes(&b);
        let applied = b.apply(&wanted).unwrap();
        assert_eq!(applied.writes, b.maps().writes().len());
        assert_eq!(as_config(&b.desired_state()), {
            let mut sorted = wanted.clone();
            sorted.vips.sort_by_key(|v| v.vip);
            for v in &mut sorted.vips {
                v.backends.sort_by_key(|b| b.addr);
            }
            sorted
        });
        assert_eq!(
            id_of(&b, &vip(1), backend(1)),
            kept_id,
            "what stays keeps its id"
        );
        assert_in_step(&b);
        // The same again changes nothing.
        b.maps_mut().take_writes();
        assert_eq!(b.apply(&wanted).unwrap().writes, 0);
        assert_eq!(b.maps().writes(), []);
    }

    #[test]
    fn a_reload_keeps_health_verdicts_and_writes_only_changed_slots() {
        let mut b = running_balancer();
        b.set_health(&vip(1), backend(1), false).unwrap();
        let original = as_config(&b.desired_state());
        let mut heavier = original.clone();
        heavier.vips[0].backends[2].weight = 5;
        b.maps_mut().take_writes();
        b.apply(&heavier).unwrap();
        assert!(!b.model.vips[&vip(1)].backends[&backend(1)].healthy);
        assert!(!live_ring(b.maps(), &vip(1)).contains(&id_of(&b, &vip(1), backend(1))));
        // Back to the original weights: the idle half holds that ring, so only the switch.
        b.maps_mut().take_writes();
        b.apply(&original).unwrap();
        let writes = b.maps_mut().take_writes();
        assert!(
            writes.iter().all(|w| !matches!(w, Write::RingSlots(_))),
            "{writes:#?}"
        );
        assert!(writes.iter().any(|w| matches!(w, Write::Vip { .. })));
        assert!(!b.model.vips[&vip(1)].backends[&backend(1)].healthy);
    }

    #[test]
    fn a_reload_beyond_the_limits_writes_nothing() {
        let mut b = running_balancer();
        let before = b.desired_state();
        let held = b.maps().contents();
        let mut too_many = as_config(&before);
        too_many
            .vips
            .extend((20..20 + MAX_VIPS as u8).map(|n| VipConfig {
                vip: vip(n),
                backends: Vec::new(),
                id: None,
                health: None,
                idle_timeout_s: None,
                forwarding: Forwarding::Nat,
            }));
        b.maps_mut().take_writes();
        assert!(matches!(
            b.apply(&too_many),
            Err(BalancerError::TooManyVips { .. })
        ));
        assert_eq!(b.maps().writes(), []);
        assert_eq!(b.maps().contents(), held);
        assert_eq!(b.desired_state(), before);
    }

    #[test]
    fn a_reload_whose_write_fails_is_undone_whatever_write_fails() {
        let count = {
            let mut b = running_balancer();
            let wanted = many_changes(&b);
            b.apply(&wanted).unwrap().writes
        };
        assert!(count > 10, "{count}");
        for failing in 0..count {
            let mut b = running_balancer();
            let wanted = many_changes(&b);
            let before = b.desired_state();
            let held = b.maps().contents();
            let start = b.maps().writes().len();
            b.maps_mut().fail_at(start + failing);
            assert!(
                matches!(b.apply(&wanted), Err(BalancerError::Datapath(_))),
                "write {failing}"
            );
            assert_eq!(b.maps().contents(), held, "write {failing} undone");
            assert_eq!(b.desired_state(), before, "write {failing}");
            // And the reload goes through once the maps take it.
            b.apply(&wanted).unwrap();
            assert_in_step(&b);
        }
    }

    /// Every VIP slot in use, and a config that swaps two VIPs for two new ones.
    fn at_the_vip_limit() -> (Balancer<FakeMaps>, DesiredState) {
        let mut b = balancer();
        for n in 1..=MAX_VIPS as u8 {
            b.add_vip(vip(n)).unwrap();
            b.add_backend(&vip(n), backend(n), 1).unwrap();
        }
        let mut wanted = as_config(&b.desired_state());
        wanted.vips.truncate(MAX_VIPS as usize - 2);
        for n in [30, 31] {
            wanted.vips.push(VipConfig {
                vip: vip(n),
                backends: vec![backend_config(n, 1, BackendState::Active)],
                id: None,
                health: None,
                idle_timeout_s: None,
                forwarding: Forwarding::Nat,
            });
        }
        b.maps_mut().take_writes();
        (b, wanted)
    }

    #[test]
    fn at_the_vip_limit_a_failing_second_plan_puts_the_leaving_vips_back() {
        let writes = {
            let (mut b, wanted) = at_the_vip_limit();
            b.apply(&wanted).unwrap().writes
        };
        let (mut b, wanted) = at_the_vip_limit();
        let before = as_config(&b.desired_state());
        b.maps_mut().fail_at(writes - 1);
        assert!(matches!(b.apply(&wanted), Err(BalancerError::Datapath(_))));
        assert_eq!(as_config(&b.desired_state()), before);
        assert_in_step(&b);
    }

    #[test]
    fn at_the_vip_limit_leaving_vips_go_first() {
        let (mut b, wanted) = at_the_vip_limit();
        b.apply(&wanted).unwrap();
        let writes = b.maps().writes();
        let last_removal = writes
            .iter()
            .rposition(|w| matches!(w, Write::RemoveVip(_)))
            .unwrap();
        let first_new = position(
            writes,
            |w| matches!(w, Write::Vip { key, .. } if key.0.ip() == vip(30).addr.ip()),
        );
        assert!(last_removal < first_new, "{writes:#?}");
        assert_eq!(b.vip_specs().len(), MAX_VIPS as usize);
        assert_in_step(&b);
    }

    #[test]
    fn with_every_backend_id_in_use_leaving_backends_go_first() {
        const BIG_RING: u32 = 4099;
        let per_vip = MAX_BACKENDS / 4;
        let addr = |i: u32| SocketAddr::from(([10, 2, (i >> 8) as u8, i as u8], 8080));
        let full = DesiredState {
            vips: (0..4)
                .map(|v| VipConfig {
                    vip: vip(v as u8 + 1),
                    backends: (v * per_vip..(v + 1) * per_vip)
                        .map(|i| BackendConfig {
                            addr: addr(i),
                            weight: 1,
                            state: BackendState::Active,
                            id: None,
                            container: None,
                            discovered: false,
                        })
                        .collect(),
                    id: None,
                    health: None,
                    idle_timeout_s: None,
                    forwarding: Forwarding::Nat,
                })
                .collect(),
        };
        let mut b = Balancer::new(FakeMaps::new(), MAX_VIPS, BIG_RING);
        b.apply(&full).unwrap();
        let maps = std::mem::take(b.maps_mut());
        *b.maps_mut() = maps.checking_every_write();
        // Four backends of the first VIP swapped for four new ones: no id is free for them
        // until the old ones are gone.
        let mut swapped = full.clone();
        let new = (MAX_BACKENDS..MAX_BACKENDS + 4).map(addr);
        for (slot, addr) in swapped.vips[0].backends.iter_mut().zip(new) {
            slot.addr = addr;
        }
        b.apply(&swapped).unwrap();
        let writes = b.maps().writes();
        let last_clear = writes
            .iter()
            .rposition(|w| matches!(w, Write::Backend { value, .. } if value.family == 0))
            .unwrap();
        let first_new = position(
            writes,
            |w| matches!(w, Write::Backend { value, .. } if value.addr[12..] == [10, 2, 64, 0]),
        );
        assert!(last_clear < first_new, "{writes:#?}");
        assert_eq!(b.desired_state().vips[0].backends.len(), per_vip as usize);
    }

    #[test]
    fn a_stopped_container_leaves_the_ring_before_its_entry_stops_matching() {
        let mut b = with_backends(3);
        b.set_backend_container(&vip(1), backend(2), Some("web-2".to_owned()), false)
            .unwrap();
        let stopped = id_of(&b, &vip(1), backend(2));
        assert!(b.set_container_running(&vip(1), backend(2), false).unwrap());
        let writes = b.maps_mut().take_writes();
        let switch = position(&writes, |w| matches!(w, Write::Vip { .. }));
        let cleared = position(
            &writes,
            |w| matches!(w, Write::Backend { id, value } if *id == stopped && value.flags == 0),
        );
        assert!(switch < cleared, "{writes:#?}");
        assert!(!live_ring(b.maps(), &vip(1)).contains(&stopped));
        // A health verdict does not bring a stopped container back, nor the reverse.
        assert!(!b.set_health(&vip(1), backend(2), true).unwrap());
        b.set_health(&vip(1), backend(2), false).unwrap();
        assert!(b.set_container_running(&vip(1), backend(2), true).unwrap());
        assert!(!live_ring(b.maps(), &vip(1)).contains(&stopped));
        b.set_health(&vip(1), backend(2), true).unwrap();
        assert!(live_ring(b.maps(), &vip(1)).contains(&stopped));
        let listed = b.vip_status(&vip(1)).unwrap();
        let two = listed
            .backends
            .iter()
            .find(|s| s.addr == backend(2))
            .unwrap();
        assert_eq!(two.container.as_deref(), Some("web-2"));
        assert_eq!(two.container_running, Some(true));
        assert_eq!(listed.backends[0].container_running, None);
        assert_in_step(&b);
    }

    #[test]
    fn a_container_at_a_new_address_is_a_new_endpoint_with_its_name_and_weight() {
        let mut b = with_backends(2);
        b.update_backend(&vip(1), backend(2), Some(3), None)
            .unwrap();
        b.set_backend_container(&vip(1), backend(2), Some("web-2".to_owned()), false)
            .unwrap();
        b.set_container_running(&vip(1), backend(2), false).unwrap();
        let old = id_of(&b, &vip(1), backend(2));
        b.maps_mut().take_writes();
        b.move_backend(&vip(1), backend(2), backend(9)).unwrap();
        let writes = b.maps_mut().take_writes();
        let moved = id_of(&b, &vip(1), backend(9));
        let entry_written = position(
            &writes,
            |w| matches!(w, Write::Backend { id, value } if *id == moved && value.flags != 0),
        );
        let switch = position(&writes, |w| matches!(w, Write::Vip { .. }));
        assert!(entry_written < switch, "{writes:#?}");
        let ring = live_ring(b.maps(), &vip(1));
        assert!(ring.contains(&moved) && (moved == old || !ring.contains(&old)));
        let state = b.desired_state();
        let config = state.vips[0]
            .backends
            .iter()
            .find(|c| c.addr == backend(9))
            .unwrap();
        assert_eq!(
            (config.weight, config.container.as_deref()),
            (3, Some("web-2"))
        );
        assert!(!state.vips[0].backends.iter().any(|c| c.addr == backend(2)));
        assert!(matches!(
            b.move_backend(&vip(1), backend(2), backend(10)),
            Err(BalancerError::UnknownBackend { .. })
        ));
        assert_in_step(&b);
    }

    #[test]
    fn a_reload_keeps_a_stopped_container_out_and_its_name() {
        let mut b = with_backends(2);
        b.set_backend_container(&vip(1), backend(2), Some("web-2".to_owned()), true)
            .unwrap();
        b.set_container_running(&vip(1), backend(2), false).unwrap();
        let stopped = id_of(&b, &vip(1), backend(2));
        let wanted = as_config(&b.desired_state());
        assert_eq!(
            wanted.vips[0].backends[1].container.as_deref(),
            Some("web-2")
        );
        assert!(wanted.vips[0].backends[1].discovered);
        b.maps_mut().take_writes();
        assert_eq!(b.apply(&wanted).unwrap().writes, 0);
        assert!(!live_ring(b.maps(), &vip(1)).contains(&stopped));
        assert_eq!(
            b.vip_status(&vip(1)).unwrap().backends[1].container_running,
            Some(false)
        );
    }

    /// Backend `n` on port 80: a direct-server-return backend of a VIP on port 80.
    fn on_port_80(n: u8) -> SocketAddr {
        SocketAddr::new(backend(n).ip(), 80)
    }

    /// A direct-server-return VIP at 192.0.2.`n`:80/tcp.
    fn add_dsr_vip(b: &mut Balancer<FakeMaps>, n: u8, forwarding: Forwarding) {
        b.add_vip_with(vip(n), None, forwarding).unwrap();
    }

    fn roles(maps: &FakeMaps, port: u16) -> u8 {
        maps.ports.get(&port).copied().unwrap_or(0)
    }

    #[test]
    fn a_dsr_backend_gets_its_vips_port_and_no_reply_side_state() {
        let mut b = balancer();
        add_dsr_vip(&mut b, 1, Forwarding::Ipip);
        // Given without a port: the VIP's.
        b.add_backend(&vip(1), "10.1.0.1:0".parse().unwrap(), 1)
            .unwrap();
        let id = id_of(&b, &vip(1), on_port_80(1));
        let entry = b.maps().backends[&id];
        assert_eq!(entry.forwarding, lb_common::FORWARD_IPIP);
        assert_eq!(u16::from_be(entry.port_be), 80);
        assert!(b.maps().endpoints.is_empty(), "{:?}", b.maps().endpoints);
        assert_eq!(
            roles(b.maps(), 80),
            PORT_IS_VIP,
            "no backend role for port 80"
        );
        assert_eq!(b.vip_status(&vip(1)).unwrap().forwarding, Forwarding::Ipip);
        assert_eq!(b.desired_state().vips[0].forwarding, Forwarding::Ipip);

        // Another port is refused before anything is written.
        b.maps_mut().take_writes();
        let refused = b.add_backend(&vip(1), backend(2), 1).unwrap_err();
        assert!(
            matches!(refused, BalancerError::DsrBackendPort { .. }),
            "{refused}"
        );
        assert_eq!(b.maps().writes(), []);

        // Draining and removing it by its bare address touch no endpoint or port either.
        b.update_backend(
            &vip(1),
            "10.1.0.1:0".parse().unwrap(),
            None,
            Some(BackendState::Draining),
        )
        .unwrap();
        b.remove_backend(&vip(1), "10.1.0.1:0".parse().unwrap())
            .unwrap();
        let writes = b.maps_mut().take_writes();
        assert!(
            !writes.iter().any(|w| matches!(
                w,
                Write::Endpoint { .. } | Write::RemoveEndpoint(_) | Write::Port { .. }
            )),
            "{writes:#?}"
        );
        assert_eq!(b.maps().backends[&id], Backend::default());
    }

    #[test]
    fn a_nat_vip_refuses_a_backend_without_a_port() {
        let mut b = balancer();
        b.add_vip(vip(1)).unwrap();
        let refused = b
            .add_backend(&vip(1), "10.1.0.1:0".parse().unwrap(), 1)
            .unwrap_err();
        assert!(
            matches!(refused, BalancerError::BackendPortMissing { .. }),
            "{refused}"
        );
    }

    #[test]
    fn gue_reaches_the_backend_entry() {
        let mut b = balancer();
        add_dsr_vip(&mut b, 1, Forwarding::Gue);
        b.add_backend(&vip(1), on_port_80(1), 1).unwrap();
        let id = id_of(&b, &vip(1), on_port_80(1));
        assert_eq!(b.maps().backends[&id].forwarding, lb_common::FORWARD_GUE);
        // A later change of the VIP's timeout rewrites the entry with its method intact.
        b.set_vip_idle_timeout(&vip(1), Some(42)).unwrap();
        let entry = b.maps().backends[&id];
        assert_eq!(
            (entry.idle_timeout_s, entry.forwarding),
            (42, lb_common::FORWARD_GUE)
        );
    }

    /// One address on port 80 behind a NAT VIP and a DSR VIP at once: the endpoint entry
    /// and the port's backend role are the NAT VIP's alone, and go with it.
    fn shared_with_nat(b: &mut Balancer<FakeMaps>) {
        b.add_vip(vip(1)).unwrap();
        add_dsr_vip(b, 2, Forwarding::Ipip);
        b.add_backend(&vip(1), on_port_80(9), 1).unwrap();
        b.add_backend(&vip(2), on_port_80(9), 1).unwrap();
    }

    fn assert_nat_reply_state_only(maps: &FakeMaps) {
        let key = (on_port_80(9), IPPROTO_TCP);
        let endpoint = maps.endpoints[&key];
        assert_eq!(endpoint.vips, 1, "only the NAT VIP counts: {endpoint:?}");
        assert_eq!(endpoint.vip_addr, to_bytes(vip(1).addr.ip()));
        assert_eq!(roles(maps, 80), PORT_IS_VIP | PORT_IS_BACKEND, "not shared");
    }

    #[test]
    fn a_backend_of_a_nat_and_a_dsr_vip_keeps_the_nat_vips_reply_state() {
        let mut b = balancer();
        shared_with_nat(&mut b);
        assert_nat_reply_state_only(b.maps());

        // The same state planned whole (a reload into empty maps, an adoption) is the same.
        let mut planned = balancer();
        planned.apply(&as_config(&b.desired_state())).unwrap();
        assert_nat_reply_state_only(planned.maps());
        assert_same_entries(planned.maps(), b.maps());
        assert_in_step(&b);

        // The NAT VIP's backend leaves: the endpoint and the backend role go with it, the
        // DSR VIP's backend stays as it was.
        let dsr_id = id_of(&b, &vip(2), on_port_80(9));
        let dsr_entry = b.maps().backends[&dsr_id];
        b.remove_backend(&vip(1), on_port_80(9)).unwrap();
        assert!(b.maps().endpoints.is_empty());
        assert_eq!(roles(b.maps(), 80), PORT_IS_VIP);
        assert_eq!(b.maps().backends[&dsr_id], dsr_entry);
        let mut wanted = as_config(&planned.desired_state());
        wanted.vips[0].backends.clear();
        planned.apply(&wanted).unwrap();
        assert_same_entries(planned.maps(), b.maps());
    }

    /// The same backend, endpoint and port entries (rings may live in other halves).
    fn assert_same_entries(a: &FakeMaps, b: &FakeMaps) {
        let (a, b) = (a.contents(), b.contents());
        assert_eq!(a.backends, b.backends);
        assert_eq!(a.endpoints, b.endpoints);
        assert_eq!(a.ports, b.ports);
    }

    #[test]
    fn a_reload_that_changes_the_forwarding_method_replaces_the_backends() {
        let mut b = balancer();
        b.add_vip(vip(1)).unwrap();
        b.add_backend(&vip(1), on_port_80(1), 1).unwrap();
        b.add_backend(&vip(1), on_port_80(2), 1).unwrap();
        let vip_id = b.vip_status(&vip(1)).unwrap().id;
        let old_ids = [
            id_of(&b, &vip(1), on_port_80(1)),
            id_of(&b, &vip(1), on_port_80(2)),
        ];
        b.maps_mut().take_writes();

        let mut wanted = as_config(&b.desired_state());
        wanted.vips[0].forwarding = Forwarding::Gue;
        b.apply(&wanted).unwrap();
        let writes = b.maps_mut().take_writes();
        let status = b.vip_status(&vip(1)).unwrap();
        assert_eq!((status.id, status.forwarding), (vip_id, Forwarding::Gue));
        for addr in [on_port_80(1), on_port_80(2)] {
            let id = id_of(&b, &vip(1), addr);
            assert!(!old_ids.contains(&id), "a new id, so no flow carries over");
            assert_eq!(b.maps().backends[&id].forwarding, lb_common::FORWARD_GUE);
        }
        // The old entries are cleared only once the new ring is live.
        let switch = position(&writes, |w| matches!(w, Write::Vip { .. }));
        for old in old_ids {
            assert_eq!(
                b.maps().backends.get(&old).copied().unwrap_or_default(),
                Backend::default()
            );
            let cleared = position(&writes, |w| {
                *w == Write::Backend {
                    id: old,
                    value: Backend::default(),
                }
            });
            assert!(switch < cleared, "{writes:#?}");
        }
        assert!(b.maps().endpoints.is_empty());
        assert_eq!(roles(b.maps(), 80), PORT_IS_VIP);
        assert_in_step(&b);

        // And back to NAT: endpoints and the port's backend role return.
        wanted.vips[0].forwarding = Forwarding::Nat;
        b.apply(&wanted).unwrap();
        assert_eq!(b.maps().endpoints.len(), 2);
        assert_eq!(roles(b.maps(), 80), PORT_IS_VIP | PORT_IS_BACKEND);
        assert_in_step(&b);
    }

    #[test]
    fn a_restart_with_another_forwarding_method_gives_the_backends_new_ids() {
        let mut b = balancer();
        b.add_vip(vip(1)).unwrap();
        b.add_backend(&vip(1), on_port_80(1), 1).unwrap();
        let old_id = id_of(&b, &vip(1), on_port_80(1));
        let mut state = b.desired_state();
        state.vips[0].forwarding = Forwarding::Ipip;
        let mut restarted = Balancer::new(
            FakeMaps::holding(&b.maps().contents()).checking_every_write(),
            MAX_VIPS,
            RING,
        );
        restarted.adopt(&state).unwrap();
        let new_id = id_of(&restarted, &vip(1), on_port_80(1));
        assert_ne!(new_id, old_id);
        let maps = restarted.maps();
        assert_eq!(maps.backends[&new_id].forwarding, lb_common::FORWARD_IPIP);
        assert_eq!(
            maps.backends.get(&old_id).copied().unwrap_or_default(),
            Backend::default()
        );
        assert!(maps.endpoints.is_empty());
        assert_in_step(&restarted);
    }

    #[test]
    fn explain_names_the_forwarding_method() {
        let mut b = balancer();
        add_dsr_vip(&mut b, 1, Forwarding::Ipip);
        b.add_backend(&vip(1), on_port_80(5), 1).unwrap();
        let e = b
            .explain(
                "198.51.100.7:40000".parse().unwrap(),
                &vip(1),
                7,
                |_| Ok(None),
                0,
            )
            .unwrap();
        assert_eq!(e.forwarding, Forwarding::Ipip);
        assert_eq!(e.new_flow_backend, Some(on_port_80(5)));
    }
}
