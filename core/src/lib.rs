//! xlb's control-plane core: what the balancer holds and how a change to it becomes map
//! writes, without doing any I/O and without reading a clock (time is passed in).
//!
//! - [`announce`]: which VIP addresses a node announces to its routers (BGP through the
//!   kernel's routing table), and the route changes that get there;
//! - [`model`]: VIPs, backends, weights, states, as configured and as reported;
//! - [`limits`]: what a desired state must satisfy before anything of it is written;
//! - [`ids`]: VIP slot and backend id allocation;
//! - [`health`]: health-check specs and the rise/fall verdict ([`health::HealthTracker`]);
//! - [`address`]: addresses refused as VIPs or backends;
//! - [`plan`]: the map writes that turn what the maps hold into what they should hold, in
//!   an order no packet can see half-done;
//! - [`balancer`]: the balancer's state and its operations (add a VIP, remove a backend, a
//!   health verdict, adopting running maps), each written through [`maps::Maps`] in that
//!   order;
//! - [`maps`]: what the balancer needs of the data plane's maps; [`fake`] implements it over
//!   plain collections for tests (with the `fake` feature, for other crates' tests too).
//!
//! `lb-userspace`'s `Datapath` implements [`maps::Maps`] over the kernel's maps.

pub mod address;
pub mod announce;
pub mod balancer;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod health;
pub mod ids;
pub mod limits;
pub mod maps;
pub mod model;
pub mod plan;
