//! Terminal tables and the JSON/SVG files of a benchmark run.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    Machine,
    cost::{CostRow, Scaling},
    plot::scaling_svg,
};

#[derive(Serialize)]
pub struct CostReport<'a> {
    pub machine: Machine,
    pub method: &'static str,
    /// The VIP's forwarding method: `nat`, `ipip` or `gue`.
    pub forwarding: String,
    pub rows: &'a [CostRow],
}

pub const COST_METHOD: &str = "BPF_PROG_TEST_RUN, repeat=1 per call, kernel-reported duration, calling thread pinned to one CPU; min/median/max of per-run medians";

pub fn print_cost(rows: &[CostRow]) {
    println!("Program cost per packet ({COST_METHOD})");
    println!(
        "{:<28} {:>22} {:>9} {:>10} {:>11} {:>9} {:>10} {:>12}",
        "packet",
        "xlb ns min/med/max",
        "Mpps/core",
        "pass floor",
        "parse floor",
        "x pass",
        "x parse",
        "Katran ns*"
    );
    for r in rows {
        println!(
            "{:<28} {:>22} {:>9.2} {:>10.0} {:>11.0} {:>9.2} {:>10.2} {:>12}",
            r.packet,
            format!(
                "{:.0}/{:.0}/{:.0}",
                r.xlb.min_ns, r.xlb.median_ns, r.xlb.max_ns
            ),
            r.mpps_per_core,
            r.floor_pass.median_ns,
            r.floor_parse.median_ns,
            r.ratio_to_pass_floor,
            r.ratio_to_parse_floor,
            r.katran_reference_ns
                .map_or("-".to_owned(), |k| format!("{k:.0}")),
        );
    }
    println!(
        "* Katran's balancer, same method, same machine kind, taken from ../shared/design.md (not re-measured here)."
    );
}

pub fn print_scaling(s: &Scaling) {
    println!("Cost per packet as the tables grow (median kernel-reported ns):");
    for (title, points) in [
        ("flows", &s.flows),
        ("backends/VIP", &s.backends),
        ("VIPs", &s.vips),
    ] {
        println!(
            "  {title:<13} {:>10} {:>14} {:>10} {:>9}",
            "n", "established", "new flow", "hit ratio"
        );
        for p in points.iter() {
            println!(
                "  {:<13} {:>10} {:>14.0} {:>10.0} {:>9.2}",
                "", p.x, p.established_ns, p.new_flow_ns, p.established_hit_ratio
            );
        }
        if let (Some(lo), Some(hi)) = (
            points.iter().map(|p| p.established_ns).reduce(f64::min),
            points.iter().map(|p| p.established_ns).reduce(f64::max),
        ) {
            println!(
                "  {title}: established cost spread {:.2}x (max/min)",
                hi / lo
            );
        }
    }
    println!("Control plane: building one 65537-slot Maglev ring");
    for m in &s.maglev_build {
        println!(
            "  {:>5} backends: {:>8.2} ms (median of 7)",
            m.backends, m.median_ms
        );
    }
}

pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn write_scaling_plots(dir: &Path, s: &Scaling) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    scaling_svg(
        &dir.join("scaling-flows.svg"),
        "xlb cost vs concurrent flows",
        "concurrent flows",
        &s.flows,
    )?;
    scaling_svg(
        &dir.join("scaling-backends.svg"),
        "xlb cost vs backends per VIP",
        "backends per VIP",
        &s.backends,
    )?;
    scaling_svg(
        &dir.join("scaling-vips.svg"),
        "xlb cost vs VIPs",
        "VIPs",
        &s.vips,
    )
}
