//! What the balancer needs from the data plane's maps: the writes the planner and the
//! balancer's operations emit, the read-back an adopting agent starts from, and the counters
//! status reports. `lb-userspace`'s `Datapath` implements it over the kernel's maps; the
//! fake one (tests, or the `fake` feature) over plain collections, recording every write.

use lb_common::{Backend, EndpointVip, TrafficCounters, VipInfo};

use crate::plan::{MapContents, MapWrite, ServiceKey};

/// The balancer's part of the data plane's maps.
pub trait Maps {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Zeroes a VIP slot's counters (the slot may have served a removed VIP).
    ///
    /// # Errors
    /// The map update failing.
    fn reset_vip_counters(&mut self, vip_id: u32) -> Result<(), Self::Error>;

    /// Zeroes a backend id's per-CPU slots (counters, cached next hop): the id may have
    /// served a removed backend at another address.
    ///
    /// # Errors
    /// The map update failing.
    fn reset_backend_slots(&mut self, backend_id: u32) -> Result<(), Self::Error>;

    /// Moves a removed backend's counters into its VIP's retired tally and zeroes them, so
    /// the VIP's totals keep what the backend carried.
    ///
    /// # Errors
    /// A map read or update failing.
    fn retire_backend_traffic(&mut self, backend_id: u32, vip_id: u32) -> Result<(), Self::Error>;

    /// `XLB_PORTS[port] = roles` (0: no role).
    ///
    /// # Errors
    /// The map update failing.
    fn set_port_roles(&mut self, port: u16, roles: u8) -> Result<(), Self::Error>;

    /// `XLB_ENDPOINTS[key] = value`.
    ///
    /// # Errors
    /// The map update failing.
    fn put_endpoint(&mut self, key: ServiceKey, value: &EndpointVip) -> Result<(), Self::Error>;

    /// Removes `XLB_ENDPOINTS[key]`; an absent entry is no error.
    ///
    /// # Errors
    /// The map update failing.
    fn remove_endpoint(&mut self, key: ServiceKey) -> Result<(), Self::Error>;

    /// `XLB_BACKENDS[id] = value`; `Backend::default()` clears the entry.
    ///
    /// # Errors
    /// The map update failing.
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), Self::Error>;

    /// Maglev ring slots, `(absolute slot, backend id)`, in as few updates as the kernel
    /// allows. Only ever slots no live `VipInfo` points at.
    ///
    /// # Errors
    /// A slot out of range or an update failing.
    fn put_ring_slots(&mut self, slots: &[(u32, u32)]) -> Result<(), Self::Error>;

    /// `XLB_VIPS[key] = info`: what switches a VIP to another ring in one update.
    ///
    /// # Errors
    /// The map update failing.
    fn put_vip(&mut self, key: ServiceKey, info: &VipInfo) -> Result<(), Self::Error>;

    /// Removes `XLB_VIPS[key]`; an absent entry is no error.
    ///
    /// # Errors
    /// The map update failing.
    fn remove_vip(&mut self, key: ServiceKey) -> Result<(), Self::Error>;

    /// What the maps hold, each VIP with its live ring only.
    ///
    /// # Errors
    /// A map read failing.
    fn read_contents(&mut self) -> Result<MapContents, Self::Error>;

    /// A backend id's counters, summed over CPUs.
    ///
    /// # Errors
    /// A map read failing.
    fn backend_traffic(&self, backend_id: u32) -> Result<TrafficCounters, Self::Error>;

    /// What a VIP's removed backends carried.
    ///
    /// # Errors
    /// A map read failing.
    fn retired_vip_traffic(&self, vip_id: u32) -> Result<TrafficCounters, Self::Error>;
}

/// Carries out one write of a plan.
///
/// # Errors
/// The map update failing.
pub fn carry_out<M: Maps + ?Sized>(maps: &mut M, write: &MapWrite) -> Result<(), M::Error> {
    match write {
        MapWrite::ResetVipCounters(id) => maps.reset_vip_counters(*id),
        MapWrite::ResetBackendSlots(id) => maps.reset_backend_slots(*id),
        MapWrite::Port { port, roles } => maps.set_port_roles(*port, *roles),
        MapWrite::Endpoint { key, value } => maps.put_endpoint(*key, value),
        MapWrite::RemoveEndpoint(key) => maps.remove_endpoint(*key),
        MapWrite::Backend { id, value } => maps.put_backend(*id, value),
        MapWrite::RingSlots { base, slots } => {
            let absolute: Vec<(u32, u32)> = slots
                .iter()
                .map(|(offset, id)| (base + offset, *id))
                .collect();
            maps.put_ring_slots(&absolute)
        }
        MapWrite::Vip { key, info } => maps.put_vip(*key, info),
        MapWrite::RemoveVip(key) => maps.remove_vip(*key),
    }
}
