//! The `xlb.toml` loader: parsing and validation, and what the agent does next with a
//! config it accepted (its desired state, reload diffs, the state file it writes).

use lb_common::{DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE};
use lb_userspace::{
    agent::{encode_state, parse_state},
    balancer::{DesiredState, check_limits},
    config::{ConfigError, diff, parse},
};

/// Properties: the loader never panics; a rejected file gets an `Invalid` error whose line
/// and column (from 1) lie inside the text; an accepted one gives a desired state that
/// the limits check can judge, that reloading unchanged diffs to nothing, that a start from
/// nothing adds VIP by VIP and backend by backend, and that survives the state file the
/// agent writes from it.
pub fn check_config(data: &[u8]) {
    // `config::load` refuses a file that is not UTF-8 before parsing it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text) {
        Err(ConfigError::Invalid {
            line,
            column,
            message,
            ..
        }) => {
            assert!(line >= 1 && column >= 1, "{line}:{column}: {message}");
            let lines = text.split('\n').count();
            assert!(line <= lines, "line {line} of {lines}: {message}");
            assert!(!message.is_empty());
        }
        Err(e @ ConfigError::Read { .. }) => panic!("parsing text cannot fail to read: {e}"),
        Ok(config) => {
            let state = config.desired_state();
            let _ = check_limits(&state, DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE);
            let _ = config.health();
            assert!(diff(&state, &state).is_empty(), "{state:?}");
            let backends: usize = state.vips.iter().map(|v| v.backends.len()).sum();
            assert_eq!(
                diff(&DesiredState::default(), &state).len(),
                state.vips.len() + backends,
                "{state:?}"
            );
            let saved = encode_state(&state);
            let restored = parse_state(&saved).unwrap_or_else(|e| {
                panic!(
                    "{} does not load back: {e}",
                    String::from_utf8_lossy(&saved)
                )
            });
            assert_eq!(restored, state);
        }
    }
}
