//! `xlb bench cost` and `xlb bench scaling` (the `xlb-bench` program) on tiny configurations:
//! they run, check every measured packet, and print well-formed JSON. Figures are never
//! asserted: benchmarks report, tests check behaviour. Needs root (loads XDP programs): fails
//! without it.

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> Value {
    let out_dir = std::env::temp_dir().join(format!(
        "xlb-bench-smoke-{}-{}",
        std::process::id(),
        args[0]
    ));
    let output = Command::new(env!("CARGO_BIN_EXE_xlb-bench"))
        .args(args)
        .args(["--json", "--out"])
        .arg(&out_dir)
        .output()
        .expect("running xlb-bench");
    let _ = std::fs::remove_dir_all(&out_dir);
    assert!(
        output.status.success(),
        "xlb bench {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("bench output is JSON")
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}

#[test]
fn cost_reports_every_packet_type_against_both_floors() {
    let report = bench(&[
        "cost",
        "--calls",
        "200",
        "--runs",
        "2",
        "--warmup",
        "20",
        "--backends",
        "4",
    ]);
    assert!(
        report["machine"]["kernel"]
            .as_str()
            .is_some_and(|k| !k.is_empty())
    );
    let rows = report["rows"].as_array().expect("rows");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["packet"].as_str()).collect();
    for wanted in [
        "tcp_syn_new_flow",
        "tcp_ack_new_flow",
        "tcp_ack_established",
        "tcp_ack_100k_flows",
        "udp_not_for_vip",
        "junk_64_bytes",
    ] {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }
    for r in rows {
        for program in ["xlb", "floor_pass", "floor_parse"] {
            let s = &r[program];
            let (min, med, max) = (
                positive(&s["min_ns"], "min"),
                positive(&s["median_ns"], "median"),
                positive(&s["max_ns"], "max"),
            );
            assert!(
                min <= med && med <= max,
                "{program} spread out of order: {s}"
            );
        }
        positive(&r["mpps_per_core"], "mpps");
        positive(&r["ratio_to_pass_floor"], "ratio");
        positive(&r["ratio_to_parse_floor"], "ratio");
    }
}

#[test]
fn scaling_quick_covers_flows_backends_and_vips() {
    let report = bench(&["scaling", "--quick", "--calls", "200"]);
    for axis in ["flows", "backends", "vips"] {
        let points = report[axis]
            .as_array()
            .unwrap_or_else(|| panic!("{axis} missing"));
        assert!(points.len() >= 2, "{axis}: {points:?}");
        for p in points {
            positive(&p["established_ns"], "established");
            positive(&p["new_flow_ns"], "new flow");
            let hits = p["established_hit_ratio"].as_f64().expect("hit ratio");
            assert!((0.0..=1.0).contains(&hits));
        }
    }
}
