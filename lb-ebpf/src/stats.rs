//! Per-CPU counters: each CPU writes its own slot, so there is no contention to count.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, xdp_action};
use lb_common::{Counter, TrafficCounters};

use crate::maps::{BACKEND_STATS, GLOBAL_STATS};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = GLOBAL_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, written only by this CPU with preemption disabled.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count_xdp_action(action: u32) {
    count(match action {
        xdp_action::XDP_DROP => Counter::ActionDrop,
        xdp_action::XDP_PASS => Counter::ActionPass,
        xdp_action::XDP_TX => Counter::ActionTx,
        xdp_action::XDP_REDIRECT => Counter::ActionRedirect,
        _ => Counter::ActionAborted,
    });
}

/// TC verdicts under the XDP action they stand for, so one set of counters reads the same
/// whichever hook an interface uses.
#[inline(always)]
pub fn count_tc_verdict(verdict: u32) {
    count(match verdict {
        v if v == TC_ACT_SHOT as u32 => Counter::ActionDrop,
        v if v == TC_ACT_OK as u32 => Counter::ActionPass,
        v if v == TC_ACT_REDIRECT as u32 => Counter::ActionRedirect,
        _ => Counter::ActionAborted,
    });
}

#[inline(always)]
fn add(slot: Option<*mut TrafficCounters>, bytes: u64, new_flow: bool) {
    if let Some(c) = slot {
        // SAFETY: as in `count`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += u64::from(new_flow);
        }
    }
}

/// A packet forwarded from a client to `backend_id`. Only the backend's counters: a VIP's
/// traffic is the sum of its backends' (the agent folds a removed backend's counters into
/// `XLB_VIPSTATS`), which saves every packet a second per-CPU update.
#[inline(always)]
pub fn count_forwarded(backend_id: u32, bytes: u64, new_flow: bool) {
    add(BACKEND_STATS.get_ptr_mut(backend_id), bytes, new_flow);
}
