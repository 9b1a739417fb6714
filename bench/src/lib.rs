//! `xlb bench` (the `xlb-bench` binary, which `xlb bench` runs): what xlb costs per packet,
//! how that scales and what it forwards, reported as a table, as JSON and as SVG plots.
//! Benchmarks report figures; they never pass or fail on them.
//!
//! A crate of its own so that the product (`lb-userspace`, the `xlb` binary) links neither
//! the namespace topologies of `xlb-netns` nor plotters; `tests/crate_graph.rs` keeps it so.

pub mod cost;
pub mod env;
pub mod forward;
pub mod plot;
pub mod report;

use serde::Serialize;

/// Where and when figures were taken: they only compare within one run on one machine.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub date_unix: u64,
}

impl Machine {
    #[must_use]
    pub fn current() -> Self {
        let kernel = nix::sys::utsname::uname()
            .map(|u| {
                format!(
                    "{} {}",
                    u.sysname().to_string_lossy(),
                    u.release().to_string_lossy()
                )
            })
            .unwrap_or_default();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        Self {
            kernel,
            cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            cpu_model,
            date_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// The median of `samples` (the upper one of an even count), sorting them.
///
/// # Panics
/// `samples` is empty.
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Pins the calling thread to the last CPU it may run on (its affinity mask as given, e.g. by
/// `taskset`), so that measurements stay on the CPUs the caller chose and every run of a
/// comparison uses the same one.
pub fn pin_to_one_cpu() {
    let this = nix::unistd::Pid::from_raw(0);
    let Ok(allowed) = nix::sched::sched_getaffinity(this) else {
        return;
    };
    let Some(cpu) = (0..nix::sched::CpuSet::count())
        .rev()
        .find(|&cpu| allowed.is_set(cpu).unwrap_or(false))
    else {
        return;
    };
    let mut one = nix::sched::CpuSet::new();
    if one.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(this, &one);
    }
}
