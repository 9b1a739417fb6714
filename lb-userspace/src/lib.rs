//! The userspace side of xlb: the loaded data plane (`datapath`), the balancer state that is
//! programmed into it (`balancer`), the agent (`agent`) with its control API (`api`), and
//! where it keeps things (`paths`).

pub mod agent;
pub mod announce;
pub mod api;
pub mod attach;
pub mod balancer;
pub mod batch;
pub mod cli_args;
pub mod config;
pub mod containers;
pub mod control;
pub mod datapath;
pub mod decap;
pub mod encap;
pub mod frames;
pub mod health;
pub mod mapped;
pub mod metrics;
pub mod neighbours;
pub mod ownership;
pub mod paths;
pub mod relink;
pub mod validate;
