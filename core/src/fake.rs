//! A [`Maps`] over plain collections, for tests without a kernel: it records every write in
//! order, holds what the maps would hold (every ring slot, not only the live rings), can fail
//! a chosen write, and can check after every write what must hold whenever a packet may
//! arrive.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::{
    BACKEND_ACTIVE, Backend, EndpointVip, FORWARD_NAT, PORT_HAS_SHARED_ENDPOINT, PORT_IS_BACKEND,
    PORT_IS_VIP, TrafficCounters, VipInfo,
};
use thiserror::Error;

use crate::{
    maps::Maps,
    plan::{MapContents, ServiceKey},
};

/// One call of a [`Maps`] write, as [`FakeMaps`] records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    ResetVipCounters(u32),
    ResetBackendSlots(u32),
    RetireBackendTraffic {
        backend_id: u32,
        vip_id: u32,
    },
    Port {
        port: u16,
        roles: u8,
    },
    Endpoint {
        key: ServiceKey,
        value: EndpointVip,
    },
    RemoveEndpoint(ServiceKey),
    Backend {
        id: u32,
        value: Backend,
    },
    /// `(absolute slot, backend id)` pairs.
    RingSlots(Vec<(u32, u32)>),
    Vip {
        key: ServiceKey,
        info: VipInfo,
    },
    RemoveVip(ServiceKey),
}

impl Write {
    /// Whether a packet could tell the write happened: counters are not looked at by the
    /// data path, and ring slots no live `VipInfo` points at are not read (the fake refuses
    /// any other ring write).
    #[must_use]
    pub const fn packet_visible(&self) -> bool {
        !matches!(
            self,
            Self::ResetVipCounters(_)
                | Self::ResetBackendSlots(_)
                | Self::RetireBackendTraffic { .. }
                | Self::RingSlots(_)
        )
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("write {index} ({write:?}) failed as the test asked")]
pub struct InjectedFailure {
    pub index: usize,
    pub write: Write,
}

/// The maps as a packet sees them.
#[derive(Clone, Debug, Default)]
pub struct FakeMaps {
    pub vips: BTreeMap<ServiceKey, VipInfo>,
    /// Every `XLB_MAGLEV` slot ever written (absent: 0, as in the kernel's array).
    pub slots: BTreeMap<u32, u32>,
    pub backends: BTreeMap<u32, Backend>,
    pub endpoints: BTreeMap<ServiceKey, EndpointVip>,
    pub ports: BTreeMap<u16, u8>,
    pub backend_traffic: BTreeMap<u32, TrafficCounters>,
    pub retired_traffic: BTreeMap<u32, TrafficCounters>,
    writes: Vec<Write>,
    fail_at: Option<usize>,
    check_every_write: bool,
}

impl FakeMaps {
    /// Empty maps, as a fresh load creates them.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps holding `contents` (as a previous agent left them), with no write recorded.
    #[must_use]
    pub fn holding(contents: &MapContents) -> Self {
        let mut slots = BTreeMap::new();
        for (base, ring) in &contents.rings {
            for (offset, id) in ring.iter().enumerate() {
                slots.insert(base + offset as u32, *id);
            }
        }
        Self {
            vips: contents.vips.clone(),
            slots,
            backends: contents.backends.clone(),
            endpoints: contents.endpoints.clone(),
            ports: contents.ports.clone(),
            ..Self::default()
        }
    }

    /// From now on, checks [`Self::check`] after every write (panicking where it breaks).
    #[must_use]
    pub fn checking_every_write(mut self) -> Self {
        self.check();
        self.check_every_write = true;
        self
    }

    /// The write with this index (counted as [`Self::writes`] counts) fails, unapplied;
    /// the next one with that index goes through.
    pub const fn fail_at(&mut self, index: usize) {
        self.fail_at = Some(index);
    }

    /// Every write so far, in order.
    #[must_use]
    pub fn writes(&self) -> &[Write] {
        &self.writes
    }

    /// The writes so far, forgetting them (the failure index keeps counting from 0 again).
    pub fn take_writes(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.writes)
    }

    /// What must hold whenever a packet may arrive: [`Self::check_live_entries`], and the
    /// port of every endpoint shared by several VIPs is marked so (its flows need reverse
    /// entries).
    ///
    /// # Panics
    /// Where one of those breaks, naming it.
    pub fn check(&self) {
        self.check_live_entries();
        let roles = |port: u16| self.ports.get(&port).copied().unwrap_or(0);
        for ((addr, _), e) in &self.endpoints {
            assert!(
                e.vips <= 1 || roles(addr.port()) & PORT_HAS_SHARED_ENDPOINT != 0,
                "{}: endpoint {addr} serves {} VIPs but its port is not marked shared",
                self.last_write(),
                e.vips
            );
        }
    }

    fn last_write(&self) -> String {
        self.writes
            .last()
            .map_or_else(|| "before any write".to_owned(), |w| format!("after {w:?}"))
    }

    /// Every slot of every live ring names an active backend of that VIP; the port filter
    /// passes every VIP and every NAT backend that carries flows; every NAT backend that
    /// carries flows has its endpoint entry (a direct-server-return backend needs neither:
    /// its replies never come through the balancer), and every direct-server-return backend
    /// serves its VIP's port (the packet reaches it unchanged).
    ///
    /// # Panics
    /// Where one of those breaks, naming it.
    pub fn check_live_entries(&self) {
        let after = self.last_write();
        let roles = |port: u16| self.ports.get(&port).copied().unwrap_or(0);
        for (key, info) in &self.vips {
            assert!(
                roles(key.0.port()) & PORT_IS_VIP != 0,
                "{after}: the port filter hides VIP {key:?}"
            );
            for slot in info.ring_base..info.ring_base + info.ring_size {
                let id = self.slots.get(&slot).copied().unwrap_or(0);
                let b = self.backends.get(&id).copied().unwrap_or_default();
                assert!(
                    b.flags & BACKEND_ACTIVE != 0 && b.vip_id == info.vip_id,
                    "{after}: VIP {key:?} slot {slot} names backend {id}: {b:?}"
                );
            }
        }
        for b in self.backends.values().filter(|b| b.carries_flows()) {
            let addr = SocketAddr::new(
                lb_common::addr::from_bytes(&b.addr),
                u16::from_be(b.port_be),
            );
            if b.forwarding == FORWARD_NAT {
                assert!(
                    roles(addr.port()) & PORT_IS_BACKEND != 0,
                    "{after}: the port filter hides backend {addr}"
                );
                assert!(
                    self.endpoints
                        .range((addr, 0)..=(addr, u8::MAX))
                        .next()
                        .is_some(),
                    "{after}: backend {addr} has no endpoint entry"
                );
            } else {
                assert!(
                    addr.port() == b.vip.socket_addr().port(),
                    "{after}: tunnelled backend {addr} is not on its VIP's port: {b:?}"
                );
            }
            // Established flows are matched against the VIP key in the backend's entry.
            let vip = (b.vip.socket_addr(), b.vip.proto);
            if let Some(info) = self.vips.get(&vip) {
                assert!(
                    info.vip_id == b.vip_id,
                    "{after}: backend {addr} names VIP {vip:?}, which has another id"
                );
            }
        }
    }

    /// What the maps hold, as [`Maps::read_contents`] reads it back.
    #[must_use]
    pub fn contents(&self) -> MapContents {
        let rings = self
            .vips
            .values()
            .filter(|i| i.ring_size > 0)
            .map(|i| {
                let ring = (i.ring_base..i.ring_base + i.ring_size)
                    .map(|slot| self.slots.get(&slot).copied().unwrap_or(0))
                    .collect();
                (i.ring_base, ring)
            })
            .collect();
        MapContents {
            vips: self.vips.clone(),
            rings,
            backends: self
                .backends
                .iter()
                .filter(|(_, b)| b.family != 0)
                .map(|(id, b)| (*id, *b))
                .collect(),
            endpoints: self.endpoints.clone(),
            ports: self
                .ports
                .iter()
                .filter(|(_, r)| **r != 0)
                .map(|(p, r)| (*p, *r))
                .collect(),
        }
    }

    fn record(&mut self, write: Write) -> Result<(), InjectedFailure> {
        if self.fail_at == Some(self.writes.len()) {
            self.fail_at = None;
            return Err(InjectedFailure {
                index: self.writes.len(),
                write,
            });
        }
        match &write {
            Write::ResetVipCounters(id) => {
                self.retired_traffic.remove(id);
            }
            Write::ResetBackendSlots(id) => {
                self.backend_traffic.remove(id);
            }
            Write::RetireBackendTraffic { backend_id, vip_id } => {
                let carried = self.backend_traffic.remove(backend_id).unwrap_or_default();
                let retired = self.retired_traffic.entry(*vip_id).or_default();
                *retired = retired.merged(carried);
            }
            Write::Port { port, roles } => {
                self.ports.insert(*port, *roles);
            }
            Write::Endpoint { key, value } => {
                self.endpoints.insert(*key, *value);
            }
            Write::RemoveEndpoint(key) => {
                self.endpoints.remove(key);
            }
            Write::Backend { id, value } => {
                self.backends.insert(*id, *value);
            }
            Write::RingSlots(slots) => {
                for (key, info) in &self.vips {
                    let live = info.ring_base..info.ring_base + info.ring_size;
                    assert!(
                        slots.iter().all(|(slot, _)| !live.contains(slot)),
                        "a ring write into the live ring of {key:?}: {slots:?}"
                    );
                }
                self.slots.extend(slots.iter().copied());
            }
            Write::Vip { key, info } => {
                self.vips.insert(*key, *info);
            }
            Write::RemoveVip(key) => {
                self.vips.remove(key);
            }
        }
        self.writes.push(write);
        if self.check_every_write {
            self.check();
        }
        Ok(())
    }
}

impl Maps for FakeMaps {
    type Error = InjectedFailure;

    fn reset_vip_counters(&mut self, vip_id: u32) -> Result<(), Self::Error> {
        self.record(Write::ResetVipCounters(vip_id))
    }

    fn reset_backend_slots(&mut self, backend_id: u32) -> Result<(), Self::Error> {
        self.record(Write::ResetBackendSlots(backend_id))
    }

    fn retire_backend_traffic(&mut self, backend_id: u32, vip_id: u32) -> Result<(), Self::Error> {
        self.record(Write::RetireBackendTraffic { backend_id, vip_id })
    }

    fn set_port_roles(&mut self, port: u16, roles: u8) -> Result<(), Self::Error> {
        self.record(Write::Port { port, roles })
    }

    fn put_endpoint(&mut self, key: ServiceKey, value: &EndpointVip) -> Result<(), Self::Error> {
        self.record(Write::Endpoint { key, value: *value })
    }

    fn remove_endpoint(&mut self, key: ServiceKey) -> Result<(), Self::Error> {
        self.record(Write::RemoveEndpoint(key))
    }

    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), Self::Error> {
        self.record(Write::Backend { id, value: *value })
    }

    fn put_ring_slots(&mut self, slots: &[(u32, u32)]) -> Result<(), Self::Error> {
        if slots.is_empty() {
            return Ok(());
        }
        self.record(Write::RingSlots(slots.to_vec()))
    }

    fn put_vip(&mut self, key: ServiceKey, info: &VipInfo) -> Result<(), Self::Error> {
        self.record(Write::Vip { key, info: *info })
    }

    fn remove_vip(&mut self, key: ServiceKey) -> Result<(), Self::Error> {
        self.record(Write::RemoveVip(key))
    }

    fn read_contents(&mut self) -> Result<MapContents, Self::Error> {
        Ok(self.contents())
    }

    fn backend_traffic(&self, backend_id: u32) -> Result<TrafficCounters, Self::Error> {
        Ok(self
            .backend_traffic
            .get(&backend_id)
            .copied()
            .unwrap_or_default())
    }

    fn retired_vip_traffic(&self, vip_id: u32) -> Result<TrafficCounters, Self::Error> {
        Ok(self
            .retired_traffic
            .get(&vip_id)
            .copied()
            .unwrap_or_default())
    }
}
