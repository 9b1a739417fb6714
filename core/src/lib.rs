//! xlb's control-plane core: what the balancer holds and how a change to it becomes map
//! writes, without doing any I/O and without reading a clock (time is passed in).
//!
//! - [`model`]: VIPs, backends, weights, states, as configured and as reported;
//! - [`limits`]: what a desired state must satisfy before anything of it is written;
//! - [`ids`]: VIP slot and backend id allocation;
//! - [`health`]: health-check specs and the rise/fall verdict ([`health::HealthTracker`]);
//! - [`address`]: addresses refused as VIPs or backends;
//! - [`plan`]: the map writes that turn what the maps hold into what they should hold, in
//!   an order no packet can see half-done.
//!
//! `lb-userspace` carries the writes out against the kernel's maps.

pub mod address;
pub mod health;
pub mod ids;
pub mod limits;
pub mod model;
pub mod plan;
