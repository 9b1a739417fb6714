//! The userspace side of xlb: the loaded data plane (`datapath`), the balancer state that is
//! programmed into it (`balancer`), and the agent and CLI built on them.

pub mod balancer;
pub mod datapath;
