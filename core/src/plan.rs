//! The planner: what the maps should hold is compared with what they hold, and only the
//! difference is written, in an order that never lets a packet see a half-made state (an
//! agent adopting a data path a previous one left running, pinned maps and all, writes
//! nothing when they match). Pure data in, pure data out, so the ordering rules are
//! unit-tested without a kernel; `lb-userspace`'s `Balancer::adopt` reads the maps, builds
//! the desired contents and carries the writes out.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::{BACKEND_ACTIVE, Backend, EndpointVip, VipInfo};

/// A `VipKey` (VIP or endpoint) as an ordered key: address and IP protocol number.
pub type ServiceKey = (SocketAddr, u8);

/// First slot of half `half` of VIP `vip_id`'s double-buffered ring in `XLB_MAGLEV`.
#[must_use]
pub const fn ring_base(vip_id: u32, half: usize, ring_size: u32) -> u32 {
    (vip_id * 2 + half as u32) * ring_size
}

/// The balancer's part of the data plane's maps, as plain data. Describes either what the
/// pinned maps hold (read back) or what they should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    /// `XLB_VIPS`.
    pub vips: BTreeMap<ServiceKey, VipInfo>,
    /// Each VIP's live ring (the slots its `VipInfo` points at), keyed by its first slot.
    /// VIPs whose ring is empty (`ring_size` 0) have none. As `current` of [`plan`], it may
    /// also hold what an idle half is known to hold: a ring written there then gets only
    /// the slots that differ.
    pub rings: BTreeMap<u32, Vec<u32>>,
    /// `XLB_BACKENDS` slots in use (`family != 0`), by id; other ids hold
    /// `Backend::default()`.
    pub backends: BTreeMap<u32, Backend>,
    /// `XLB_ENDPOINTS`.
    pub endpoints: BTreeMap<ServiceKey, EndpointVip>,
    /// `XLB_PORTS` entries with any role; other ports have none.
    pub ports: BTreeMap<u16, u8>,
}

/// One map update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapWrite {
    /// Zeroes the counters of a VIP slot the maps did not hold this VIP in.
    ResetVipCounters(u32),
    /// Zeroes the counters of a backend id the maps did not hold this backend under.
    ResetBackendSlots(u32),
    Port {
        port: u16,
        roles: u8,
    },
    Endpoint {
        key: ServiceKey,
        value: EndpointVip,
    },
    RemoveEndpoint(ServiceKey),
    /// `Backend::default()` clears the slot.
    Backend {
        id: u32,
        value: Backend,
    },
    /// `(offset, backend id)` pairs, written from `base + offset` on.
    RingSlots {
        base: u32,
        slots: Vec<(u32, u32)>,
    },
    Vip {
        key: ServiceKey,
        info: VipInfo,
    },
    RemoveVip(ServiceKey),
}

/// Which half of its double buffer a VIP's ring should live in: the live one if the ring it
/// holds is the one wanted (nothing to write), else the other one, so the new ring is
/// written where no packet looks and then switched to with one `VipInfo` update. A VIP the
/// maps do not hold under this id gets half 0.
#[must_use]
pub fn choose_half(
    current: Option<&VipInfo>,
    current_live_ring: Option<&[u32]>,
    vip_id: u32,
    ring_size: u32,
    desired_ring: &[u32],
) -> usize {
    let Some(info) = current.filter(|i| i.vip_id == vip_id) else {
        return 0;
    };
    let Some(live) = (0..2).find(|h| ring_base(vip_id, *h, ring_size) == info.ring_base) else {
        return 0;
    };
    let live_ring = if info.ring_size == 0 {
        &[][..]
    } else {
        current_live_ring.unwrap_or(&[])
    };
    if live_ring == desired_ring {
        live
    } else {
        1 - live
    }
}

/// Whether a backend entry change takes it out of the ring: the ring must stop naming it
/// before its flags say it takes no new flows.
fn leaves_ring(current: &Backend, desired: &Backend) -> bool {
    current.flags & BACKEND_ACTIVE != 0
        && desired.flags & BACKEND_ACTIVE == 0
        && same_identity(current, desired)
}

/// The same backend of the same VIP, reached the same way: its counters carry on.
fn same_identity(a: &Backend, b: &Backend) -> bool {
    (a.addr, a.port_be, a.family, a.vip_id, a.forwarding)
        == (b.addr, b.port_be, b.family, b.vip_id, b.forwarding)
}

/// The writes that turn `current` into `desired`, in an order that is safe for packets
/// arriving at any point in between:
///
/// 1. counters of slots new to their VIP or backend are zeroed, before anything counts there;
/// 2. ports gain roles (the filter must not hide an entry that is about to be written);
/// 3. endpoint entries that are new or count more VIPs (a reply must find its endpoint
///    before a flow can go to it);
/// 4. backend entries, except those leaving the ring, before any ring that names them;
/// 5. per VIP whose ring or info changes: the ring into the half no packet reads (see
///    [`choose_half`]), then its `VipInfo`, which switches to it in one update; a VIP whose
///    ring stays (only its idle timeout changed) gets its `VipInfo` alone;
/// 6. VIPs the desired state does not have are removed;
/// 7. backends leaving the ring get their new flags, now that no live ring names them;
/// 8. backend entries nothing wants any more are cleared, now that nothing points at them;
/// 9. endpoint entries that shrink or go;
/// 10. ports lose the roles nothing needs any more.
///
/// Nothing is written where `current` already holds what is wanted, so adopting maps that
/// match the desired state writes nothing at all.
#[must_use]
pub fn plan(current: &MapContents, desired: &MapContents) -> Vec<MapWrite> {
    let mut writes = Vec::new();
    let no_backend = Backend::default();

    for (key, info) in &desired.vips {
        if current
            .vips
            .get(key)
            .is_none_or(|c| c.vip_id != info.vip_id)
        {
            writes.push(MapWrite::ResetVipCounters(info.vip_id));
        }
    }
    for (id, value) in &desired.backends {
        if current
            .backends
            .get(id)
            .is_none_or(|c| !same_identity(c, value))
        {
            writes.push(MapWrite::ResetBackendSlots(*id));
        }
    }

    let all_ports: std::collections::BTreeSet<u16> = current
        .ports
        .keys()
        .chain(desired.ports.keys())
        .copied()
        .collect();
    let roles = |map: &BTreeMap<u16, u8>, port: u16| map.get(&port).copied().unwrap_or(0);
    for port in &all_ports {
        let (had, wanted) = (roles(&current.ports, *port), roles(&desired.ports, *port));
        if had | wanted != had {
            writes.push(MapWrite::Port {
                port: *port,
                roles: had | wanted,
            });
        }
    }

    let mut late_endpoints = Vec::new();
    for (key, value) in &desired.endpoints {
        match current.endpoints.get(key) {
            None => writes.push(MapWrite::Endpoint {
                key: *key,
                value: *value,
            }),
            Some(had) if had == value => {}
            Some(had) if value.vips > had.vips => writes.push(MapWrite::Endpoint {
                key: *key,
                value: *value,
            }),
            Some(_) => late_endpoints.push(MapWrite::Endpoint {
                key: *key,
                value: *value,
            }),
        }
    }

    let mut late_backends = Vec::new();
    for (id, value) in &desired.backends {
        let had = current.backends.get(id).unwrap_or(&no_backend);
        if had == value {
            continue;
        }
        let write = MapWrite::Backend {
            id: *id,
            value: *value,
        };
        if leaves_ring(had, value) {
            late_backends.push(write);
        } else {
            writes.push(write);
        }
    }

    for (key, info) in &desired.vips {
        let ring = desired.rings.get(&info.ring_base);
        let ring_in_place = info.ring_size == 0 || current.rings.get(&info.ring_base) == ring;
        if ring_in_place && current.vips.get(key) == Some(info) {
            continue;
        }
        if let Some(ring) = ring.filter(|_| !ring_in_place) {
            // A half known to hold a ring already gets only the slots that differ.
            let known = current.rings.get(&info.ring_base);
            writes.push(MapWrite::RingSlots {
                base: info.ring_base,
                slots: ring
                    .iter()
                    .enumerate()
                    .filter(|(offset, id)| known.and_then(|k| k.get(*offset)) != Some(*id))
                    .map(|(offset, id)| (offset as u32, *id))
                    .collect(),
            });
        }
        writes.push(MapWrite::Vip {
            key: *key,
            info: *info,
        });
    }

    for key in current.vips.keys() {
        if !desired.vips.contains_key(key) {
            writes.push(MapWrite::RemoveVip(*key));
        }
    }
    writes.extend(late_backends);
    for id in current.backends.keys() {
        if !desired.backends.contains_key(id) {
            writes.push(MapWrite::Backend {
                id: *id,
                value: no_backend,
            });
        }
    }
    writes.extend(late_endpoints);
    for key in current.endpoints.keys() {
        if !desired.endpoints.contains_key(key) {
            writes.push(MapWrite::RemoveEndpoint(*key));
        }
    }
    for port in &all_ports {
        let (had, wanted) = (roles(&current.ports, *port), roles(&desired.ports, *port));
        if had | wanted != wanted {
            writes.push(MapWrite::Port {
                port: *port,
                roles: wanted,
            });
        }
    }
    writes
}

#[cfg(test)]
mod tests {
    use lb_common::{
        BACKEND_DRAINING, IPPROTO_TCP, IPPROTO_UDP, PORT_IS_BACKEND, PORT_IS_VIP, addr::to_bytes,
    };

    use super::*;
    use crate::{fake::FakeMaps, maps::carry_out};

    const RING: u32 = 7;

    fn vip_key(n: u8, port: u16) -> ServiceKey {
        (format!("192.0.2.{n}:{port}").parse().unwrap(), IPPROTO_TCP)
    }

    fn backend(n: u8, vip_id: u32, flags: u8) -> Backend {
        let addr: SocketAddr = format!("10.0.0.{n}:8080").parse().unwrap();
        Backend {
            addr: to_bytes(addr.ip()),
            port_be: addr.port().to_be(),
            family: 4,
            flags,
            vip_id,
            ..Backend::default()
        }
    }

    fn endpoint(n: u8) -> ServiceKey {
        (format!("10.0.0.{n}:8080").parse().unwrap(), IPPROTO_TCP)
    }

    fn endpoint_of(vip: ServiceKey, vips: u32) -> EndpointVip {
        EndpointVip {
            vip_addr: to_bytes(vip.0.ip()),
            vip_port_be: vip.0.port().to_be(),
            _pad: 0,
            vips,
        }
    }

    /// A ring of `RING` slots alternating over `ids`.
    fn ring(ids: &[u32]) -> Vec<u32> {
        (0..RING as usize).map(|i| ids[i % ids.len()]).collect()
    }

    /// One VIP (`vip_id`, live in `half`) on port 80 with the given backends (id, addr
    /// number, flags); the ring holds the active ones.
    fn one_vip(
        key: ServiceKey,
        vip_id: u32,
        half: usize,
        backends: &[(u32, u8, u8)],
    ) -> MapContents {
        let mut m = MapContents::default();
        add_vip(&mut m, key, vip_id, half, backends);
        m
    }

    fn add_vip(
        m: &mut MapContents,
        key: ServiceKey,
        vip_id: u32,
        half: usize,
        backends: &[(u32, u8, u8)],
    ) {
        let active: Vec<u32> = backends
            .iter()
            .filter(|(_, _, f)| f & BACKEND_ACTIVE != 0)
            .map(|(id, _, _)| *id)
            .collect();
        let base = ring_base(vip_id, half, RING);
        m.vips.insert(
            key,
            VipInfo {
                vip_id,
                ring_base: base,
                ring_size: if active.is_empty() { 0 } else { RING },
                idle_timeout_s: 300,
            },
        );
        if !active.is_empty() {
            m.rings.insert(base, ring(&active));
        }
        *m.ports.entry(key.0.port()).or_default() |= PORT_IS_VIP;
        for (id, n, flags) in backends {
            m.backends.insert(*id, backend(*n, vip_id, *flags));
            let e = m
                .endpoints
                .entry(endpoint(*n))
                .or_insert_with(|| endpoint_of(key, 0));
            e.vips += 1;
            *m.ports.entry(8080).or_default() |= PORT_IS_BACKEND;
        }
    }

    /// Carries out the plan from `current` to `desired` one write at a time, checking the
    /// packet-visible invariants after each; returns the plan.
    fn run(current: &MapContents, desired: &MapContents) -> Vec<MapWrite> {
        let writes = plan(current, desired);
        let mut maps = FakeMaps::holding(current);
        maps.check_live_entries();
        for w in &writes {
            carry_out(&mut maps, w).unwrap();
            maps.check_live_entries();
        }
        assert_eq!(
            maps.contents(),
            *desired,
            "the plan reaches the desired state"
        );
        writes
    }

    fn position(writes: &[MapWrite], what: impl Fn(&MapWrite) -> bool) -> usize {
        writes
            .iter()
            .position(what)
            .unwrap_or_else(|| panic!("no such write in {writes:#?}"))
    }

    #[test]
    fn adopting_maps_that_match_writes_nothing() {
        let m = one_vip(
            vip_key(1, 80),
            3,
            1,
            &[(5, 1, BACKEND_ACTIVE), (6, 2, BACKEND_DRAINING)],
        );
        assert_eq!(plan(&m, &m), vec![]);
    }

    #[test]
    fn new_maps_get_everything_backends_before_the_ring_before_the_vip() {
        let key = vip_key(1, 80);
        let desired = one_vip(key, 0, 0, &[(0, 1, BACKEND_ACTIVE), (1, 2, BACKEND_ACTIVE)]);
        let writes = run(&MapContents::default(), &desired);
        let vip = position(&writes, |w| matches!(w, MapWrite::Vip { .. }));
        let ring = position(&writes, |w| matches!(w, MapWrite::RingSlots { .. }));
        let last_backend = writes
            .iter()
            .rposition(|w| matches!(w, MapWrite::Backend { .. }))
            .unwrap();
        let first_endpoint = position(&writes, |w| matches!(w, MapWrite::Endpoint { .. }));
        let vip_port = position(&writes, |w| matches!(w, MapWrite::Port { port: 80, .. }));
        let counters = position(&writes, |w| matches!(w, MapWrite::ResetVipCounters(0)));
        assert!(counters < vip && vip_port < vip, "{writes:#?}");
        assert!(first_endpoint < last_backend && last_backend < ring && ring < vip);
        assert_eq!(writes.len(), 1 + 2 + 2 + 2 + 2 + 1 + 1, "{writes:#?}");
    }

    #[test]
    fn a_changed_ring_goes_into_the_idle_half_and_is_switched_to() {
        let key = vip_key(1, 80);
        let current = one_vip(key, 2, 1, &[(4, 1, BACKEND_ACTIVE)]);
        let wanted_ring = ring(&[4, 5]);
        let half = choose_half(
            current.vips.get(&key),
            current.rings.get(&ring_base(2, 1, RING)).map(Vec::as_slice),
            2,
            RING,
            &wanted_ring,
        );
        assert_eq!(half, 0);
        let desired = one_vip(
            key,
            2,
            half,
            &[(4, 1, BACKEND_ACTIVE), (5, 2, BACKEND_ACTIVE)],
        );
        let writes = run(&current, &desired);
        assert!(
            writes.contains(&MapWrite::RingSlots {
                base: ring_base(2, 0, RING),
                slots: wanted_ring
                    .iter()
                    .enumerate()
                    .map(|(i, id)| (i as u32, *id))
                    .collect(),
            })
        );
        // The untouched backend keeps its entry and its counters.
        assert!(!writes.iter().any(|w| matches!(
            w,
            MapWrite::Backend { id: 4, .. } | MapWrite::ResetBackendSlots(4)
        )));
        assert!(!writes.contains(&MapWrite::ResetVipCounters(2)));
    }

    #[test]
    fn a_changed_idle_timeout_rewrites_the_vip_info_alone() {
        let key = vip_key(1, 80);
        let current = one_vip(
            key,
            2,
            1,
            &[(4, 1, BACKEND_ACTIVE), (5, 2, BACKEND_DRAINING)],
        );
        let live = current.rings.get(&ring_base(2, 1, RING)).unwrap();
        assert_eq!(
            choose_half(current.vips.get(&key), Some(live), 2, RING, live),
            1,
            "the ring stays where it is"
        );
        let mut desired = current.clone();
        desired.vips.get_mut(&key).unwrap().idle_timeout_s = 30;
        let writes = run(&current, &desired);
        assert_eq!(
            writes,
            vec![MapWrite::Vip {
                key,
                info: desired.vips[&key]
            }]
        );
        // Maps written before timeouts existed hold 0 there: adopting them writes it.
        let mut old = current.clone();
        old.vips.get_mut(&key).unwrap().idle_timeout_s = 0;
        assert_eq!(
            run(&old, &current),
            vec![MapWrite::Vip {
                key,
                info: current.vips[&key]
            }]
        );
    }

    #[test]
    fn choose_half_keeps_a_ring_that_is_already_right() {
        let key = vip_key(1, 80);
        let current = one_vip(key, 2, 1, &[(4, 1, BACKEND_ACTIVE)]);
        let live = current.rings.get(&ring_base(2, 1, RING)).unwrap();
        assert_eq!(
            choose_half(current.vips.get(&key), Some(live), 2, RING, live),
            1
        );
        // Under another id, or not there at all: the VIP starts in half 0.
        assert_eq!(
            choose_half(current.vips.get(&key), Some(live), 3, RING, live),
            0
        );
        assert_eq!(choose_half(None, None, 2, RING, live), 0);
        // No backend before or after: nothing to switch.
        let empty = one_vip(key, 2, 1, &[]);
        assert_eq!(choose_half(empty.vips.get(&key), None, 2, RING, &[]), 1);
    }

    #[test]
    fn a_backend_leaving_the_ring_changes_flags_after_the_switch() {
        let key = vip_key(1, 80);
        let current = one_vip(key, 0, 0, &[(0, 1, BACKEND_ACTIVE), (1, 2, BACKEND_ACTIVE)]);
        let desired = one_vip(
            key,
            0,
            1,
            &[(0, 1, BACKEND_ACTIVE), (1, 2, BACKEND_DRAINING)],
        );
        let writes = run(&current, &desired);
        let vip = position(&writes, |w| matches!(w, MapWrite::Vip { .. }));
        let flags = position(&writes, |w| matches!(w, MapWrite::Backend { id: 1, .. }));
        assert!(vip < flags, "{writes:#?}");
    }

    /// Backend `n` of a direct-server-return VIP `key`: on the VIP's port, tunnelled.
    fn dsr_backend(n: u8, key: ServiceKey, vip_id: u32) -> Backend {
        let addr = SocketAddr::new(format!("10.0.0.{n}").parse().unwrap(), key.0.port());
        Backend {
            addr: to_bytes(addr.ip()),
            port_be: addr.port().to_be(),
            family: 4,
            flags: BACKEND_ACTIVE,
            vip_id,
            vip: lb_common::VipKey::new(key.0, key.1),
            forwarding: lb_common::FORWARD_IPIP,
            ..Backend::default()
        }
    }

    #[test]
    fn a_dsr_vip_is_planned_without_endpoints_or_backend_port_roles() {
        let key = vip_key(1, 80);
        let mut desired = MapContents::default();
        add_vip(&mut desired, key, 0, 0, &[]);
        desired.vips.get_mut(&key).unwrap().ring_size = RING;
        desired.rings.insert(0, ring(&[0, 1]));
        for (id, n) in [(0, 1), (1, 2)] {
            desired.backends.insert(id, dsr_backend(n, key, 0));
        }
        // `run` checks after every write that the tunnelled backends need nothing more.
        let writes = run(&MapContents::default(), &desired);
        assert!(
            !writes.iter().any(|w| matches!(
                w,
                MapWrite::Endpoint { .. }
                    | MapWrite::Port {
                        roles: PORT_IS_BACKEND,
                        ..
                    }
            )),
            "{writes:#?}"
        );
        assert_eq!(desired.ports, [(80, PORT_IS_VIP)].into());
    }

    #[test]
    fn a_backend_reached_another_way_under_the_same_id_counts_afresh() {
        let key = vip_key(1, 80);
        let current = one_vip(key, 0, 0, &[(0, 1, BACKEND_ACTIVE)]);
        let mut desired = current.clone();
        desired.backends.get_mut(&0).unwrap().forwarding = lb_common::FORWARD_GUE;
        let writes = plan(&current, &desired);
        assert!(
            writes.contains(&MapWrite::ResetBackendSlots(0)),
            "{writes:#?}"
        );
        assert!(writes.contains(&MapWrite::Backend {
            id: 0,
            value: desired.backends[&0]
        }));
    }

    #[test]
    fn a_backend_joining_the_ring_is_written_before_it() {
        let key = vip_key(1, 80);
        let current = one_vip(
            key,
            0,
            0,
            &[(0, 1, BACKEND_ACTIVE), (1, 2, BACKEND_DRAINING)],
        );
        let desired = one_vip(key, 0, 1, &[(0, 1, BACKEND_ACTIVE), (1, 2, BACKEND_ACTIVE)]);
        let writes = run(&current, &desired);
        let ring = position(&writes, |w| matches!(w, MapWrite::RingSlots { .. }));
        let flags = position(&writes, |w| matches!(w, MapWrite::Backend { id: 1, .. }));
        assert!(flags < ring, "{writes:#?}");
    }

    #[test]
    fn ghost_vips_and_backends_are_removed_after_nothing_points_at_them() {
        let kept = vip_key(1, 80);
        let ghost = vip_key(9, 443);
        let mut current = one_vip(kept, 0, 0, &[(0, 1, BACKEND_ACTIVE)]);
        add_vip(&mut current, ghost, 1, 1, &[(1, 7, BACKEND_ACTIVE)]);
        let desired = one_vip(kept, 0, 0, &[(0, 1, BACKEND_ACTIVE)]);
        let writes = run(&current, &desired);
        let vip_gone = position(&writes, |w| *w == MapWrite::RemoveVip(ghost));
        let backend_gone = position(&writes, |w| {
            *w == MapWrite::Backend {
                id: 1,
                value: Backend::default(),
            }
        });
        let endpoint_gone = position(&writes, |w| *w == MapWrite::RemoveEndpoint(endpoint(7)));
        let port_gone = position(&writes, |w| {
            *w == MapWrite::Port {
                port: 443,
                roles: 0,
            }
        });
        assert!(
            vip_gone < backend_gone && backend_gone < endpoint_gone,
            "{writes:#?}"
        );
        assert!(vip_gone < port_gone);
        assert_eq!(writes.len(), 4, "only the ghost is touched: {writes:#?}");
    }

    #[test]
    fn a_ghost_backend_of_a_kept_vip_leaves_its_ring_first() {
        let key = vip_key(1, 80);
        let current = one_vip(key, 0, 0, &[(0, 1, BACKEND_ACTIVE), (1, 2, BACKEND_ACTIVE)]);
        let desired = one_vip(key, 0, 1, &[(0, 1, BACKEND_ACTIVE)]);
        let writes = run(&current, &desired);
        let vip = position(&writes, |w| matches!(w, MapWrite::Vip { .. }));
        let cleared = position(&writes, |w| matches!(w, MapWrite::Backend { id: 1, .. }));
        assert!(vip < cleared, "{writes:#?}");
    }

    #[test]
    fn a_shared_endpoint_counts_down_only_after_the_ghost_is_gone() {
        let kept = vip_key(1, 80);
        let ghost = (vip_key(1, 80).0, IPPROTO_UDP);
        let mut current = one_vip(kept, 0, 0, &[(0, 1, BACKEND_ACTIVE)]);
        add_vip(&mut current, ghost, 1, 0, &[(1, 1, BACKEND_ACTIVE)]);
        assert_eq!(current.endpoints[&endpoint(1)].vips, 2);
        let desired = one_vip(kept, 0, 0, &[(0, 1, BACKEND_ACTIVE)]);
        let writes = run(&current, &desired);
        let count_down = position(&writes, |w| matches!(w, MapWrite::Endpoint { .. }));
        let backend_gone = position(&writes, |w| matches!(w, MapWrite::Backend { id: 1, .. }));
        assert!(backend_gone < count_down, "{writes:#?}");
        // Port 80 stays a VIP port (the TCP VIP) and a backend port stays a backend port.
        assert!(!writes.iter().any(|w| matches!(w, MapWrite::Port { .. })));
    }

    #[test]
    fn a_vip_under_a_new_id_gets_fresh_counters_and_its_old_backends_go() {
        let key = vip_key(1, 80);
        let current = one_vip(key, 4, 0, &[(2, 1, BACKEND_ACTIVE)]);
        let desired = one_vip(key, 0, 0, &[(0, 1, BACKEND_ACTIVE)]);
        let writes = run(&current, &desired);
        assert!(writes.contains(&MapWrite::ResetVipCounters(0)));
        assert!(writes.contains(&MapWrite::ResetBackendSlots(0)));
        let vip = position(&writes, |w| matches!(w, MapWrite::Vip { .. }));
        let old_gone = position(&writes, |w| matches!(w, MapWrite::Backend { id: 2, .. }));
        assert!(vip < old_gone, "{writes:#?}");
    }
}
