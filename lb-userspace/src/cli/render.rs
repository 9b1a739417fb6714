//! How replies are shown: tables for people, pretty JSON for scripts (`--json`).

use std::net::SocketAddr;

use lb_userspace::{
    api,
    balancer::{Explanation, VipStatus},
    health::HealthSpec,
};

pub fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("serialisable")
    );
}

pub fn print_vips(vips: &[VipStatus]) {
    if vips.is_empty() {
        println!("no VIPs (add one with `xlb vip add ADDR:PORT/tcp`)");
        return;
    }
    println!(
        "{:<32} {:>8} {:>12} {:>14} {:>10} {:>12}  HEALTH CHECK",
        "VIP", "BACKENDS", "PACKETS", "BYTES", "NEW FLOWS", "IDLE TIMEOUT"
    );
    for v in vips {
        println!(
            "{:<32} {:>8} {:>12} {:>14} {:>10} {:>12}  {}",
            v.vip.to_string(),
            v.backends.len(),
            v.packets,
            v.bytes,
            v.new_flows,
            format!("{} s", v.idle_timeout_s),
            health_check(v.health_check.as_ref())
        );
    }
}

pub fn print_backends(v: &VipStatus) {
    println!("{}  ({} slots in the ring)", v.vip, v.ring_size);
    println!(
        "  idle timeout {} s; health check: {}",
        v.idle_timeout_s,
        health_check(v.health_check.as_ref())
    );
    if v.backends.is_empty() {
        println!(
            "  no backends (add one with `xlb backend add {} ADDR:PORT`)",
            v.vip
        );
        return;
    }
    println!(
        "  {:<40} {:>6} {:>9} {:>7} {:>12} {:>14} {:>10} {:>10}",
        "BACKEND", "WEIGHT", "STATE", "SLOTS", "PACKETS", "BYTES", "NEW FLOWS", "LIVE FLOWS"
    );
    for b in &v.backends {
        println!(
            "  {:<40} {:>6} {:>9} {:>7} {:>12} {:>14} {:>10} {:>10}",
            b.addr.to_string(),
            b.weight,
            format!("{:?}", b.state).to_lowercase(),
            b.slots,
            b.packets,
            b.bytes,
            b.new_flows,
            b.live_flows.map_or("-".to_owned(), |f| f.to_string())
        );
    }
}

pub fn print_stats(stats: &api::Stats) {
    for v in &stats.vips {
        println!(
            "{}  packets {}  bytes {}  new flows {}",
            v.vip, v.packets, v.bytes, v.new_flows
        );
        for b in &v.backends {
            println!(
                "  -> {:<40} packets {:>10}  bytes {:>12}  new flows {:>8}",
                b.addr.to_string(),
                b.packets,
                b.bytes,
                b.new_flows
            );
        }
    }
    if stats.vips.is_empty() {
        println!("no VIPs");
    }
    println!("global:");
    for c in &stats.global {
        println!("  {:<26} {:>14}", c.name, c.value);
    }
}

pub fn print_explanation(e: &Explanation) {
    let show = |b: Option<SocketAddr>| b.map_or("none".to_owned(), |b| b.to_string());
    println!(
        "flow {} -> {}: hash {:#010x}, ring slot {}",
        e.client, e.vip, e.flow_hash, e.ring_slot
    );
    println!("  a new flow goes to:        {}", show(e.new_flow_backend));
    println!("  connection table holds:    {}", show(e.tracked_backend));
}

/// A VIP's health check in one phrase: what is probed, how often, and the rise/fall counts.
pub fn health_check(spec: Option<&HealthSpec>) -> String {
    spec.map_or_else(
        || "none".to_owned(),
        |h| {
            format!(
                "{} every {} ms (timeout {} ms, rise {}, fall {})",
                h.probe,
                h.interval.as_millis(),
                h.timeout.as_millis(),
                h.rise,
                h.fall
            )
        },
    )
}
