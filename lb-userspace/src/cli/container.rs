//! Container backends: a container name resolved to its address by podman or docker.

use std::net::SocketAddr;

use anyhow::{Context as _, Result, bail};
use lb_userspace::balancer::VipSpec;

/// Resolves a container's address through podman or docker (whichever knows it).
pub fn container_backend(spec: &str, vip: &VipSpec) -> Result<SocketAddr> {
    let (name, port) = match spec.rsplit_once(':') {
        Some((name, port)) => (
            name,
            port.parse::<u16>()
                .with_context(|| format!("'{port}' in --container {spec} is not a port"))?,
        ),
        None => (spec, vip.addr.port()),
    };
    lb_userspace::validate::check_container_name(name)?;
    let format = if vip.addr.is_ipv4() {
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    } else {
        "{{range .NetworkSettings.Networks}}{{.GlobalIPv6Address}} {{end}}"
    };
    let mut tried = Vec::new();
    for runtime in ["podman", "docker"] {
        let output = match std::process::Command::new(runtime)
            // `--`: whatever the name, it is never read as an option.
            .args(["inspect", "--format", format, "--", name])
            .output()
        {
            Ok(o) => o,
            Err(_) => {
                tried.push(format!("{runtime}: not installed"));
                continue;
            }
        };
        if !output.status.success() {
            tried.push(format!("{runtime}: no container '{name}'"));
            continue;
        }
        let text = String::from_utf8_lossy(&output.stdout);
        if let Some(ip) = text.split_whitespace().find_map(|w| w.parse().ok()) {
            return Ok(SocketAddr::new(ip, port));
        }
        tried.push(format!(
            "{runtime}: container '{name}' has no address of the VIP's family"
        ));
    }
    bail!("cannot resolve container '{name}' ({})", tried.join("; "))
}
