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
        "{:<32} {:<10} {:>8} {:>12} {:>14} {:>10} {:>12}  HEALTH CHECK",
        "VIP", "FORWARDING", "BACKENDS", "PACKETS", "BYTES", "NEW FLOWS", "IDLE TIMEOUT"
    );
    for v in vips {
        println!(
            "{:<32} {:<10} {:>8} {:>12} {:>14} {:>10} {:>12}  {}",
            v.vip.to_string(),
            v.forwarding.describe(),
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
        "  forwarding {}; idle timeout {} s; health check: {}",
        v.forwarding.describe(),
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
        // A container backend shows its name, and "stopped" while its container is.
        let (backend, state) = match (&b.container, b.container_running) {
            (Some(name), Some(false)) => (format!("{} ({name})", b.addr), "stopped".to_owned()),
            (Some(name), _) => (
                format!("{} ({name})", b.addr),
                format!("{:?}", b.state).to_lowercase(),
            ),
            (None, _) => (b.addr.to_string(), format!("{:?}", b.state).to_lowercase()),
        };
        println!(
            "  {:<40} {:>6} {:>9} {:>7} {:>12} {:>14} {:>10} {:>10}",
            backend,
            b.weight,
            state,
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
    // "dsr/ipip to 10.0.2.5:443" where the packet is tunnelled; a NAT backend's address
    // alone, as ever.
    let show = |b: Option<SocketAddr>| match b {
        None => "none".to_owned(),
        Some(b) if e.forwarding.is_dsr() => format!("{} to {b}", e.forwarding.describe()),
        Some(b) => b.to_string(),
    };
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

/// Global counters that mean packets were lost or handled worse than they should be, with
/// what each means, in the order an operator would look at them.
const TROUBLE: [(&str, &str); 6] = [
    ("xdp_drop", "dropped"),
    ("xdp_aborted", "program errors"),
    ("no_backend", "VIP without a backend to take it"),
    (
        "next_hop_failure",
        "no next hop (route, neighbour, forwarding)",
    ),
    (
        "conntrack_insert_failed",
        "connection-table insert failures",
    ),
    ("ttl_expired", "TTL expired"),
];

/// Seconds as `3d 4h`, `2h 5m`, `4m 10s` or `12s`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

pub fn print_status(status: &api::Status) {
    let a = &status.agent;
    println!(
        "agent       xlb {}, pid {}, up {}{}",
        a.version,
        a.pid,
        duration(a.uptime_s),
        if a.keep_attached {
            ", data path stays attached when it stops"
        } else {
            ""
        }
    );
    println!(
        "            socket {}, pins {}, state {}",
        a.socket, a.bpffs, a.state_file
    );
    match &a.config {
        Some(config) => println!("            config {config} (`xlb reload` applies it)"),
        None => println!("            no config file: VIPs and backends come from the CLI"),
    }
    let interfaces: Vec<String> = status
        .interfaces
        .iter()
        .map(|i| match &i.hook {
            Some(hook) => format!("{} ({hook})", i.name),
            None => format!("{} (gone: re-attached when it returns)", i.name),
        })
        .collect();
    println!("interfaces  {}", interfaces.join(", "));
    let dsr = status.vips.iter().filter(|v| v.forwarding.is_dsr()).count();
    println!(
        "tunnels     {}{}",
        a.encap,
        match dsr {
            0 => String::new(),
            n => format!("; {n} direct-server-return VIPs"),
        }
    );

    let backends: Vec<_> = status.vips.iter().flat_map(|v| &v.backends).collect();
    let count = |pred: &dyn Fn(&&lb_userspace::balancer::BackendStatus) -> bool| {
        backends.iter().filter(|b| pred(b)).count()
    };
    use lb_userspace::balancer::BackendState;
    println!(
        "VIPs        {} ({} tcp, {} udp); backends {}: {} taking new flows, {} draining, {} weight 0, {} unhealthy",
        status.vips.len(),
        status
            .vips
            .iter()
            .filter(|v| v.vip.proto == lb_userspace::balancer::Protocol::Tcp)
            .count(),
        status
            .vips
            .iter()
            .filter(|v| v.vip.proto == lb_userspace::balancer::Protocol::Udp)
            .count(),
        backends.len(),
        count(&|b| b.slots > 0),
        count(&|b| b.state == BackendState::Draining),
        count(&|b| b.weight == 0),
        count(&|b| !b.healthy),
    );
    let without_backends: Vec<String> = status
        .vips
        .iter()
        .filter(|v| v.ring_size == 0)
        .map(|v| v.vip.to_string())
        .collect();
    if !without_backends.is_empty() {
        println!(
            "            no backend takes new flows on: {}",
            without_backends.join(", ")
        );
    }

    let checked: Vec<_> = status
        .vips
        .iter()
        .filter(|v| v.health_check.is_some())
        .collect();
    let down: Vec<String> = checked
        .iter()
        .flat_map(|v| {
            v.backends.iter().filter(|b| !b.healthy).map(|b| {
                let last = b
                    .health
                    .as_ref()
                    .map_or(String::new(), |h| format!(": {}", h.last_result));
                format!("{} of {}{last}", b.addr, v.vip)
            })
        })
        .collect();
    let probed: usize = checked.iter().map(|v| v.backends.len()).sum();
    if checked.is_empty() {
        println!("health      no VIP has health checks");
    } else {
        println!(
            "health      {} of {} VIPs checked: {} backends up, {} down",
            checked.len(),
            status.vips.len(),
            probed - down.len(),
            down.len()
        );
        for d in &down {
            println!("            down: {d}");
        }
    }

    let (packets, bytes, new_flows) = status.vips.iter().fold((0, 0, 0), |(p, b, f), v| {
        (p + v.packets, b + v.bytes, f + v.new_flows)
    });
    println!("traffic     {packets} packets, {bytes} bytes, {new_flows} new flows to the VIPs");
    let value = |name: &str| {
        status
            .global
            .iter()
            .find(|c| c.name == name)
            .map_or(0, |c| c.value)
    };
    let trouble: Vec<String> = TROUBLE
        .iter()
        .filter(|(name, _)| value(name) > 0)
        .map(|(name, what)| format!("{name} {} ({what})", value(name)))
        .collect();
    if trouble.is_empty() {
        println!("trouble     none: no drops, next-hop failures or insert failures counted");
    } else {
        println!("trouble     {}", trouble.join(", "));
    }
}

pub fn print_conns(conns: &lb_userspace::balancer::Conns) {
    println!(
        "{}: {} tracked flows{}",
        conns.vip,
        conns.total,
        if (conns.flows.len() as u64) < conns.total {
            format!(" (showing {}: see --limit)", conns.flows.len())
        } else {
            String::new()
        }
    );
    if conns.flows.is_empty() {
        return;
    }
    println!(
        "  {:<46} {:<46} {:<16} {:>8} {:>5}",
        "CLIENT", "BACKEND", "STATE", "IDLE", "LIVE"
    );
    for f in &conns.flows {
        println!(
            "  {:<46} {:<46} {:<16} {:>8} {:>5}",
            f.client.to_string(),
            f.backend.map_or("(gone)".to_owned(), |b| b.to_string()),
            f.state,
            format!("{} s", f.idle_s),
            if f.live { "yes" } else { "no" }
        );
    }
}
