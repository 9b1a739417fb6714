//! What a desired state must satisfy before anything of it is written: the agent's limits
//! (VIP slots, backend ids, ring size) and each VIP's and backend's own rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use lb_common::{MAX_BACKENDS, maglev::MaglevError};
use thiserror::Error;

use crate::model::{
    DesiredState, Forwarding, IdleTimeoutError, MAX_WEIGHT, VipSpec, validate_idle_timeout,
};

/// Why a change to the balancer was refused or failed. `E` is the error of the maps it
/// writes to (see [`crate::maps::Maps`]): the only failure that is not about the change
/// itself.
#[derive(Debug, Error)]
pub enum BalancerError<E> {
    #[error("VIP {0} already exists")]
    DuplicateVip(VipSpec),
    #[error("no VIP {0} (see `xlb vip list`)")]
    UnknownVip(VipSpec),
    #[error("backend {backend} is already behind {vip}")]
    DuplicateBackend { vip: VipSpec, backend: SocketAddr },
    #[error("backend {backend} is not behind {vip} (see `xlb backend list {vip}`)")]
    UnknownBackend { vip: VipSpec, backend: SocketAddr },
    #[error(
        "backend {backend} and VIP {vip} are of different address families (xlb does not translate between IPv4 and IPv6)"
    )]
    FamilyMismatch { vip: VipSpec, backend: SocketAddr },
    #[error(
        "client {client} and VIP {vip} are of different address families: no such flow can reach the VIP"
    )]
    ClientFamilyMismatch { vip: VipSpec, client: SocketAddr },
    #[error("backend port 0 is not valid")]
    BackendPortZero,
    #[error(
        "backend {backend} needs a port: VIP {vip} forwards by NAT (only a direct-server-return VIP's backends take the VIP's port)"
    )]
    BackendPortMissing {
        vip: VipSpec,
        backend: std::net::IpAddr,
    },
    #[error(
        "backend {backend} must serve port {port} of VIP {vip} ({forwarding}): the packet reaches it unchanged, still addressed to the VIP (give {ip} alone, or with that port)",
        port = vip.addr.port(),
        forwarding = forwarding.describe(),
        ip = backend.ip()
    )]
    DsrBackendPort {
        vip: VipSpec,
        backend: SocketAddr,
        forwarding: Forwarding,
    },
    #[error("weight must be between 0 (drain) and {max}, got {weight}")]
    InvalidWeight { weight: u32, max: u32 },
    #[error("all {0} VIP slots are in use (start the agent with a larger --max-vips)")]
    VipSlotsExhausted(u32),
    #[error("all {0} backend slots are in use")]
    BackendSlotsExhausted(u32),
    #[error(
        "{wanted} VIPs wanted, but this agent has {max} VIP slots (start it with a larger --max-vips)"
    )]
    TooManyVips { wanted: usize, max: u32 },
    #[error("{wanted} backends wanted, but the data plane holds at most {max}")]
    TooManyBackends { wanted: usize, max: u32 },
    #[error("VIP {vip}: {source}")]
    VipRing {
        vip: VipSpec,
        #[source]
        source: MaglevError,
    },
    #[error("VIP {vip}: {source}")]
    IdleTimeout {
        vip: VipSpec,
        #[source]
        source: IdleTimeoutError,
    },
    #[error(transparent)]
    Maglev(#[from] MaglevError),
    #[error(transparent)]
    Datapath(E),
    /// A write of a whole change failed, and so did undoing the writes before it: the maps
    /// hold part of the change.
    #[error(
        "{source}; undoing the writes before it failed too ({undo}): the maps hold part of the change"
    )]
    PartlyApplied {
        #[source]
        source: E,
        undo: Box<E>,
    },
}

/// Whether the agent can hold `state` whole: its VIP slots, the data plane's backend ids,
/// each VIP's ring, and every VIP and backend on its own (duplicates, weights, families,
/// timeouts). Cheap: it counts before it looks at any entry, so a huge file is refused at
/// once, and it writes nothing. A state that passes programs without running out of room,
/// whether into empty maps or over a running model (removals give their ids back first).
///
/// # Errors
/// The first limit or rule `state` breaks.
pub fn check_limits<E>(
    state: &DesiredState,
    max_vips: u32,
    ring_size: u32,
) -> Result<(), BalancerError<E>> {
    if state.vips.len() > max_vips as usize {
        return Err(BalancerError::TooManyVips {
            wanted: state.vips.len(),
            max: max_vips,
        });
    }
    let backends: usize = state.vips.iter().map(|v| v.backends.len()).sum();
    if backends > MAX_BACKENDS as usize {
        return Err(BalancerError::TooManyBackends {
            wanted: backends,
            max: MAX_BACKENDS,
        });
    }
    let mut seen = BTreeSet::new();
    for v in &state.vips {
        if !seen.insert(v.vip) {
            return Err(BalancerError::DuplicateVip(v.vip));
        }
        validate_vip_timeout(&v.vip, v.idle_timeout_s)?;
        let mut backends = BTreeMap::new();
        for b in &v.backends {
            validate_backend(&v.vip, v.forwarding, b.addr, b.weight, &backends)?;
            backends.insert(b.addr, ());
        }
        if backends.len() > ring_size as usize {
            return Err(BalancerError::VipRing {
                vip: v.vip,
                source: MaglevError::TooSmall {
                    size: ring_size,
                    backends: backends.len(),
                },
            });
        }
    }
    Ok(())
}

/// An idle timeout set for `vip` (`None`: the protocol's default, always fine).
///
/// # Errors
/// [`BalancerError::IdleTimeout`].
pub fn validate_vip_timeout<E>(
    vip: &VipSpec,
    idle_timeout_s: Option<u32>,
) -> Result<(), BalancerError<E>> {
    if let Some(secs) = idle_timeout_s {
        validate_idle_timeout(vip.proto, u64::from(secs))
            .map_err(|source| BalancerError::IdleTimeout { vip: *vip, source })?;
    }
    Ok(())
}

/// A weight of 0 is valid: as in IPVS and HAProxy it drains the backend (no new flows, its
/// established flows go on), whatever its state.
///
/// # Errors
/// [`BalancerError::InvalidWeight`].
pub fn validate_weight<E>(weight: u32) -> Result<(), BalancerError<E>> {
    if weight > MAX_WEIGHT {
        return Err(BalancerError::InvalidWeight {
            weight,
            max: MAX_WEIGHT,
        });
    }
    Ok(())
}

/// A backend address as given for `vip`, port 0 standing for "none given": the VIP's own
/// port when the VIP forwards by direct server return (its backends serve that port, since
/// the packet reaches them unchanged); refused for a NAT VIP.
///
/// # Errors
/// [`BalancerError::BackendPortMissing`].
pub fn backend_address<E>(
    vip: &VipSpec,
    forwarding: Forwarding,
    given: SocketAddr,
) -> Result<SocketAddr, BalancerError<E>> {
    match (given.port(), forwarding.is_dsr()) {
        (0, true) => Ok(SocketAddr::new(given.ip(), vip.addr.port())),
        (0, false) => Err(BalancerError::BackendPortMissing {
            vip: *vip,
            backend: given.ip(),
        }),
        _ => Ok(given),
    }
}

/// Whether `backend` (with `weight`) may join `vip`, which forwards by `forwarding` and has
/// `existing` backends.
///
/// # Errors
/// A bad weight, port 0, a duplicate, another address family, or (direct server return)
/// another port than the VIP's.
pub fn validate_backend<T, E>(
    vip: &VipSpec,
    forwarding: Forwarding,
    backend: SocketAddr,
    weight: u32,
    existing: &BTreeMap<SocketAddr, T>,
) -> Result<(), BalancerError<E>> {
    validate_weight(weight)?;
    if backend.port() == 0 {
        return Err(BalancerError::BackendPortZero);
    }
    if forwarding.is_dsr() && backend.port() != vip.addr.port() {
        return Err(BalancerError::DsrBackendPort {
            vip: *vip,
            backend,
            forwarding,
        });
    }
    if existing.contains_key(&backend) {
        return Err(BalancerError::DuplicateBackend { vip: *vip, backend });
    }
    if family(&backend) != family(&vip.addr) {
        return Err(BalancerError::FamilyMismatch { vip: *vip, backend });
    }
    Ok(())
}

/// The data plane's address family number of `addr`: 4 or 6.
#[must_use]
pub const fn family(addr: &SocketAddr) -> u8 {
    if addr.is_ipv4() { 4 } else { 6 }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use crate::model::{BackendConfig, BackendState, VipConfig};

    fn vip_with_backends(i: u32, backends: u32) -> VipConfig {
        VipConfig {
            vip: format!("10.0.{}.{}:80", i / 256, i % 256).parse().unwrap(),
            backends: (0..backends)
                .map(|b| BackendConfig {
                    addr: SocketAddr::from(([10, 1, (b / 256) as u8, (b % 256) as u8], 8080)),
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
        }
    }

    #[test]
    fn limits_are_checked_before_any_entry() {
        let check = check_limits::<Infallible>;
        let state = |vips: u32, backends: u32| DesiredState {
            vips: (0..vips).map(|i| vip_with_backends(i, backends)).collect(),
        };
        assert!(check(&state(64, 2), 64, 65_537).is_ok());
        assert_eq!(
            check(&state(70, 0), 64, 65_537).unwrap_err().to_string(),
            "70 VIPs wanted, but this agent has 64 VIP slots (start it with a larger --max-vips)"
        );
        assert!(matches!(
            check(&state(2, 10_000), 64, 65_537),
            Err(BalancerError::TooManyBackends {
                wanted: 20_000,
                max: MAX_BACKENDS
            })
        ));
        assert!(matches!(
            check(&state(1, 12), 64, 11),
            Err(BalancerError::VipRing { .. })
        ));
        let mut bad_weight = state(1, 1);
        bad_weight.vips[0].backends[0].weight = MAX_WEIGHT + 1;
        assert_eq!(
            check(&bad_weight, 64, 65_537).unwrap_err().to_string(),
            "weight must be between 0 (drain) and 1000, got 1001"
        );
        let mut draining = state(1, 2);
        draining.vips[0].backends[0].weight = 0;
        assert!(check(&draining, 64, 65_537).is_ok());
    }

    #[test]
    fn a_dsr_backend_serves_the_vips_port() {
        let check = check_limits::<Infallible>;
        let mut dsr = DesiredState {
            vips: vec![vip_with_backends(0, 2)],
        };
        dsr.vips[0].forwarding = Forwarding::Ipip;
        // Backends on 8080 behind a VIP on 80: fine for NAT, refused for DSR.
        assert_eq!(
            check(&dsr, 64, 65_537).unwrap_err().to_string(),
            "backend 10.1.0.0:8080 must serve port 80 of VIP 10.0.0.0:80/tcp (dsr/ipip): the \
             packet reaches it unchanged, still addressed to the VIP (give 10.1.0.0 alone, or \
             with that port)"
        );
        for b in &mut dsr.vips[0].backends {
            b.addr.set_port(80);
        }
        assert!(check(&dsr, 64, 65_537).is_ok());
        dsr.vips[0].backends[1].addr = "[fd00::2]:80".parse().unwrap();
        assert!(matches!(
            check(&dsr, 64, 65_537),
            Err(BalancerError::FamilyMismatch { .. })
        ));
    }

    #[test]
    fn a_backend_without_a_port_takes_a_dsr_vips_port() {
        let vip: VipSpec = "192.0.2.10:443/tcp".parse().unwrap();
        let bare: SocketAddr = "10.0.2.5:0".parse().unwrap();
        let resolve = backend_address::<Infallible>;
        assert_eq!(
            resolve(&vip, Forwarding::Gue, bare).unwrap(),
            "10.0.2.5:443".parse().unwrap()
        );
        assert_eq!(
            resolve(&vip, Forwarding::Nat, bare)
                .unwrap_err()
                .to_string(),
            "backend 10.0.2.5 needs a port: VIP 192.0.2.10:443/tcp forwards by NAT (only a \
             direct-server-return VIP's backends take the VIP's port)"
        );
        let given: SocketAddr = "10.0.2.5:8443".parse().unwrap();
        assert_eq!(resolve(&vip, Forwarding::Ipip, given).unwrap(), given);
        assert_eq!(resolve(&vip, Forwarding::Nat, given).unwrap(), given);
    }
}
