//! Smoke test of `xlb bench forward` in its quick form: the mode runs end to end and its report
//! is well-formed, and the direct-server-return row (IPIP) is measured with frames reaching the
//! sinks. Figures are never asserted (they depend on the machine). Needs root (namespaces,
//! BPF): fails without it.

use xlb_bench::forward::{self, ForwardOptions};

fn non_negative(v: Option<f64>, what: &str) {
    if let Some(v) = v {
        assert!(v.is_finite() && v >= 0.0, "{what} = {v}");
    }
}

#[test]
fn quick_forward_bench_reports_every_row() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (namespaces, BPF): run the tests as root"
    );
    // This build's own object as the `--against` build: the row must load and be measured.
    let object = std::env::temp_dir().join(format!("xlb-bench-against-{}.o", std::process::id()));
    std::fs::write(&object, lb_userspace::datapath::XLB_OBJECT).expect("writing the object");
    let options = ForwardOptions {
        against: Some(object.clone()),
        ..ForwardOptions::quick()
    };
    let report = forward::run(&options, true);
    std::fs::remove_file(&object).expect("removing the object");
    let report = report.expect("quick forward bench");
    forward::print(&report);

    let names: Vec<_> = report.packets.iter().map(|r| r.name).collect();
    assert_eq!(
        names,
        [
            "routing",
            "xdp_redirect",
            "xdp_redirect_spread",
            "nftables",
            "xlb",
            "xlb_one_backend",
            "xlb_against",
            "xlb_dsr_ipip"
        ]
    );
    for r in &report.packets {
        match &r.skipped {
            Some(why) => {
                assert!(!why.is_empty(), "{} skipped without a reason", r.name);
                assert!(
                    r.delivered_mpps.is_none(),
                    "{} skipped but has figures",
                    r.name
                );
            }
            None => {
                let (g, d, l) = (r.generated.unwrap(), r.delivered.unwrap(), r.lost.unwrap());
                assert_eq!(
                    r.round_mpps.len(),
                    ForwardOptions::quick().rounds as usize,
                    "{}: one rate per round",
                    r.name
                );
                assert_eq!(
                    l,
                    g.saturating_sub(d),
                    "{}: lost = generated - delivered",
                    r.name
                );
                for (v, what) in [
                    (r.seconds, "seconds"),
                    (r.generated_mpps, "generated_mpps"),
                    (r.delivered_mpps, "delivered_mpps"),
                    (r.loss_ratio, "loss_ratio"),
                    (r.xlb_ratio, "xlb_ratio"),
                ] {
                    assert!(
                        v.is_some() || what == "xlb_ratio",
                        "{}: {what} missing",
                        r.name
                    );
                    non_negative(v, what);
                }
            }
        }
    }
    assert!(
        report
            .packets
            .iter()
            .any(|r| r.name == "xlb" && r.skipped.is_none()),
        "the xlb row itself must be measured: {:?}",
        report.packets
    );

    // Both ceiling rows and both xlb rows are measured, so both shares are there.
    assert_eq!(report.ceiling_share.len(), 2);
    for c in &report.ceiling_share {
        let (share, min, max) = (c.median.unwrap(), c.min.unwrap(), c.max.unwrap());
        assert!(
            share > 0.0 && min <= share && share <= max,
            "ceiling share {c:?}"
        );
    }

    let against = report.against.as_ref().expect("the --against ratio");
    assert!(
        against.median.is_some_and(|r| r > 0.0),
        "--against ratio not measured: {against:?}"
    );

    // A skipped DSR row would mean xlb's IPIP output failed its check or nothing got through.
    let dsr = report
        .packets
        .iter()
        .find(|r| r.name == "xlb_dsr_ipip")
        .expect("the DSR row");
    assert!(dsr.skipped.is_none(), "DSR row not measured: {dsr:?}");
    assert!(
        dsr.delivered.unwrap() > 0,
        "no encapsulated frame reached a sink: {dsr:?}"
    );

    let names: Vec<_> = report.connections.iter().map(|r| r.name).collect();
    assert_eq!(names, ["xlb", "nftables", "haproxy"]);
    for r in &report.connections {
        match &r.skipped {
            Some(why) => assert!(!why.is_empty(), "{} skipped without a reason", r.name),
            None => {
                non_negative(r.connections_per_s, "connections_per_s");
                non_negative(r.requests_per_s, "requests_per_s");
                assert!(r.connections_per_s.is_some() && r.requests_per_s.is_some());
            }
        }
    }

    let a = &report.backend_add;
    if a.skipped.is_none() {
        for v in &a.trials_us {
            non_negative(Some(*v), "backend add latency");
        }
        assert_eq!(a.min_us.is_some(), !a.trials_us.is_empty());
    }
    assert!(report.ipvs.contains("IPVS") || report.ipvs.contains("IP_VS"));

    let json = serde_json::to_value(&report).expect("serializable");
    assert!(json["packets"].is_array() && json["connections"].is_array());
}
