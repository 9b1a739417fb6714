//! The agent's state-file loader.

use lb_common::{DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE};
use lb_userspace::{
    agent::{encode_state, parse_state},
    balancer::check_limits,
    config::diff,
};

/// Properties: the loader never panics and reports anything it refuses as an error; the
/// limits and health-check validations the agent runs next judge any state it accepts; and the state, saved again
/// the way the agent saves it, loads back equal.
pub fn check_state_file(data: &[u8]) {
    let Ok(state) = parse_state(data) else {
        return;
    };
    let _ = check_limits(&state, DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE);
    // What the agent does with a restored VIP's health checks before starting them.
    for vip in &state.vips {
        if let Some(spec) = &vip.health {
            let _ = spec.validate_for(&vip.vip);
        }
    }
    assert!(diff(&state, &state).is_empty(), "{state:?}");
    let saved = encode_state(&state);
    let restored = parse_state(&saved).unwrap_or_else(|e| {
        panic!(
            "{} does not load back: {e}",
            String::from_utf8_lossy(&saved)
        )
    });
    assert_eq!(restored, state);
}
