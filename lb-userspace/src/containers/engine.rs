//! Talking to the engine: `inspect` and `ps` through its command-line client (bounded in
//! time), their JSON, and the `events` stream, restarted with back-off while the engine is down.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Read as _,
    net::IpAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    sync::mpsc,
};
use tracing::{debug, info, warn};

use super::{ContainerError, ContainerInfo, Engine, EngineChoice, follow::Notice};
use crate::{balancer::Protocol, validate};

/// How long one `inspect` or `ps` may take before the engine counts as not answering.
pub(super) const ENGINE_TIMEOUT: Duration = Duration::from_secs(10);
// `inspect`'s JSON: podman's and docker's share these fields.
#[derive(Deserialize)]
struct Inspected {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "State")]
    state: InspectedState,
    #[serde(rename = "Config", default)]
    config: Option<InspectedConfig>,
    #[serde(rename = "NetworkSettings", default)]
    network: Option<InspectedNetworkSettings>,
}

#[derive(Deserialize)]
struct InspectedState {
    #[serde(rename = "Running", default)]
    running: bool,
    #[serde(rename = "Paused", default)]
    paused: bool,
    #[serde(rename = "Pid", default)]
    pid: u32,
}

#[derive(Deserialize)]
struct InspectedConfig {
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "ExposedPorts", default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct InspectedNetworkSettings {
    #[serde(rename = "IPAddress", default)]
    ip_address: Option<String>,
    #[serde(rename = "GlobalIPv6Address", default)]
    global_ipv6_address: Option<String>,
    #[serde(rename = "Ports", default)]
    ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(rename = "Networks", default)]
    networks: Option<BTreeMap<String, InspectedNetwork>>,
}

#[derive(Deserialize)]
struct InspectedNetwork {
    #[serde(rename = "IPAddress", default)]
    ip_address: Option<String>,
    #[serde(rename = "GlobalIPv6Address", default)]
    global_ipv6_address: Option<String>,
}

/// `8080/tcp` (docker and podman's key for a port), or a bare `8080` (tcp).
fn parse_port_key(key: &str) -> Option<(u16, Protocol)> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    let proto = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    Some((port.parse().ok().filter(|p| *p != 0)?, proto))
}

/// Reads `podman inspect` / `docker inspect` output (a JSON array).
///
/// # Errors
/// Not such an array.
pub fn parse_inspect(json: &[u8]) -> Result<Vec<ContainerInfo>, serde_json::Error> {
    let inspected: Vec<Inspected> = serde_json::from_slice(json)?;
    Ok(inspected
        .into_iter()
        .map(|c| {
            let mut addrs = Vec::new();
            let mut ports = BTreeSet::new();
            if let Some(n) = &c.network {
                let texts = n
                    .networks
                    .iter()
                    .flat_map(|nets| nets.values())
                    .flat_map(|net| [&net.ip_address, &net.global_ipv6_address])
                    .chain([&n.ip_address, &n.global_ipv6_address]);
                for text in texts.flatten() {
                    if let Ok(ip) = text.parse::<IpAddr>()
                        && !addrs.contains(&ip)
                    {
                        addrs.push(ip);
                    }
                }
                ports.extend(
                    n.ports
                        .iter()
                        .flatten()
                        .filter_map(|(k, _)| parse_port_key(k)),
                );
            }
            let (labels, exposed) = c
                .config
                .map_or((None, None), |config| (config.labels, config.exposed_ports));
            ports.extend(
                exposed
                    .iter()
                    .flatten()
                    .filter_map(|(k, _)| parse_port_key(k)),
            );
            ContainerInfo {
                // docker names start with '/'.
                name: c.name.trim_start_matches('/').to_owned(),
                running: c.state.running && !c.state.paused,
                addrs,
                ports,
                labels: labels.unwrap_or_default(),
                // Both engines say 0 for a container that does not run.
                pid: (c.state.pid != 0).then_some(c.state.pid),
            }
        })
        .collect())
}

/// Runs `engine args`, killed after [`ENGINE_TIMEOUT`]; returns its stdout, or its stderr as
/// the error.
fn run_engine(engine: Engine, args: &[&str]) -> Result<Result<Vec<u8>, String>, ContainerError> {
    let what = args.first().copied().unwrap_or_default().to_owned();
    let mut child = Command::new(engine.program())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ContainerError::Engine {
            engine,
            what: what.clone(),
            detail: e.to_string(),
        })?;
    // Read on threads of their own: a full pipe would otherwise stall the engine.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let err = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + ENGINE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ContainerError::Timeout { engine, what });
            }
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    Ok(if status.success() {
        Ok(out)
    } else {
        Err(String::from_utf8_lossy(&err).trim().to_owned())
    })
}
/// Looks the container up with `engine`; `None`: the engine knows no such container.
///
/// # Errors
/// An invalid name, the engine failing or not answering, or output xlb cannot read.
pub fn inspect(engine: Engine, name: &str) -> Result<Option<ContainerInfo>, ContainerError> {
    validate::check_container_name(name)?;
    // `--`: whatever the name, it is never read as an option.
    match run_engine(engine, &["inspect", "--type", "container", "--", name])? {
        Ok(json) => {
            let found = parse_inspect(&json).map_err(|source| ContainerError::Unreadable {
                engine,
                what: "inspect".to_owned(),
                source,
            })?;
            Ok(found.into_iter().next())
        }
        Err(stderr) if stderr.to_ascii_lowercase().contains("no such") => Ok(None),
        Err(detail) => Err(ContainerError::Engine {
            engine,
            what: "inspect".to_owned(),
            detail,
        }),
    }
}

/// Looks the container up with each engine of `choice` in turn; the first that knows it wins.
///
/// # Errors
/// No engine installed, none knowing the container, or one failing.
pub fn find(choice: EngineChoice, name: &str) -> Result<ContainerInfo, ContainerError> {
    let mut tried = Vec::new();
    for engine in choice.engines() {
        if !engine.installed() {
            tried.push(format!("{engine}: not installed"));
            continue;
        }
        match inspect(*engine, name) {
            Ok(Some(info)) => return Ok(info),
            Ok(None) => tried.push(format!("{engine}: no such container")),
            Err(e @ ContainerError::Name(_)) => return Err(e),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(ContainerError::NotFound {
        name: name.to_owned(),
        tried: tried.join("; "),
    })
}

/// Names of the running containers labelled `xlb.vip`.
///
/// # Errors
/// The engine failing or not answering.
pub fn labelled(engine: Engine) -> Result<Vec<String>, ContainerError> {
    let args = ["ps", "--filter", "label=xlb.vip", "--format", "{{.Names}}"];
    match run_engine(engine, &args)? {
        Ok(out) => Ok(String::from_utf8_lossy(&out)
            .split_whitespace()
            .map(str::to_owned)
            .collect()),
        Err(detail) => Err(ContainerError::Engine {
            engine,
            what: "ps".to_owned(),
            detail,
        }),
    }
}

/// One line of the engine's event stream, reduced to what xlb acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineEvent {
    pub name: String,
    pub action: String,
}

/// Reads one line of `podman events --format json` (`Name`, `Status`) or `docker events
/// --format '{{json .}}'` (`Actor.Attributes.name`, `Action`). None: not a container
/// lifecycle event xlb acts on.
#[must_use]
pub fn parse_event(line: &str) -> Option<EngineEvent> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    let name = v
        .get("Name")
        .and_then(text)
        .or_else(|| v.pointer("/Actor/Attributes/name").and_then(text))?;
    let action = v
        .get("Status")
        .and_then(text)
        .or_else(|| v.get("Action").and_then(text))?;
    const LIFECYCLE: [&str; 11] = [
        "start", "restart", "died", "die", "stop", "kill", "remove", "destroy", "pause", "unpause",
        "rename",
    ];
    LIFECYCLE.contains(&action.as_str()).then(|| EngineEvent {
        name: name.trim_start_matches('/').to_owned(),
        action,
    })
}

/// The longest wait between attempts to reach an engine that is down.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Follows the engine's event stream until the receiver is gone, restarting it with
/// back-off whenever it fails or ends. The child is killed when the task is dropped.
pub async fn watch_events(choice: EngineChoice, notices: mpsc::Sender<Notice>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let engine = choice
            .engines()
            .iter()
            .copied()
            .find(|e| e.installed())
            .unwrap_or(choice.engines()[0]);
        let started = Instant::now();
        let ended = follow_stream(engine, &notices).await;
        if notices.is_closed() {
            return;
        }
        if started.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_secs(1);
        }
        warn!(
            "container engine {engine}: {ended}; container backends are kept as they are; \
             retrying in {} s",
            backoff.as_secs()
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Runs one `events` child; returns why it stopped.
async fn follow_stream(engine: Engine, notices: &mpsc::Sender<Notice>) -> String {
    let mut command = tokio::process::Command::new(engine.program());
    match engine {
        Engine::Podman => command.args(["events", "--format", "json"]),
        Engine::Docker => command.args(["events", "--format", "{{json .}}"]),
    };
    command
        .args(["--filter", "type=container"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return "not installed (no such program on PATH)".to_owned();
        }
        Err(e) => return format!("cannot start `{engine} events`: {e}"),
    };
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut stderr = child.stderr.take().expect("piped");
    // An engine that refuses at once (docker without its daemon) says why within moments;
    // `podman events` prints nothing until something happens.
    let connected = tokio::time::timeout(Duration::from_millis(500), child.wait()).await;
    if let Ok(status) = connected {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        return format!(
            "`{engine} events` exited ({}): {}",
            status.map_or_else(|e| e.to_string(), |s| s.to_string()),
            text.trim()
        );
    }
    info!(%engine, "following container events");
    if notices.send(Notice::Connected(engine)).await.is_err() {
        return "agent stopping".to_owned();
    }
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => {
                if let Some(event) = parse_event(&line) {
                    debug!(%engine, name = %event.name, action = %event.action, "container event");
                    if notices.send(Notice::Changed(engine, event)).await.is_err() {
                        return "agent stopping".to_owned();
                    }
                }
            }
            Ok(None) => break,
            Err(e) => return format!("reading `{engine} events`: {e}"),
        }
    }
    let status = child.wait().await;
    let mut text = String::new();
    let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
    format!(
        "`{engine} events` ended ({}){}",
        status.map_or_else(|e| e.to_string(), |s| s.to_string()),
        if text.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", text.trim())
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::VipSpec;

    /// Trimmed from `podman inspect` (podman 4.3) of a container run with `--expose 8080`.
    const PODMAN: &str = r#"[{"Id":"7931","Name":"web-1","State":{"Status":"running",
        "Running":true,"Paused":false},"Config":{"Labels":{"xlb.vip":"10.0.0.10:80/tcp"}},
        "NetworkSettings":{"IPAddress":"10.88.0.128","GlobalIPv6Address":"",
        "Ports":{"8080/tcp":null},"Networks":{"podman":{"IPAddress":"10.88.0.128",
        "GlobalIPv6Address":"fd00::5"}}}}]"#;

    /// Trimmed from `docker inspect` of a stopped container publishing two ports.
    const DOCKER: &str = r#"[{"Id":"ab12","Name":"/db","State":{"Running":false},
        "Config":{"ExposedPorts":{"5432/tcp":{},"9187/tcp":{}},"Labels":null},
        "NetworkSettings":{"Ports":{},"Networks":{"bridge":{"IPAddress":"172.17.0.3"}}}}]"#;

    fn vip(text: &str) -> VipSpec {
        text.parse().unwrap()
    }

    #[test]
    fn inspect_output_gives_addresses_ports_labels_and_state() {
        let web = &parse_inspect(PODMAN.as_bytes()).unwrap()[0];
        assert_eq!(web.name, "web-1");
        assert!(web.running);
        assert_eq!(
            web.addrs,
            [
                "10.88.0.128".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(web.ports, BTreeSet::from([(8080, Protocol::Tcp)]));
        assert_eq!(web.labels["xlb.vip"], "10.0.0.10:80/tcp");
        let db = &parse_inspect(DOCKER.as_bytes()).unwrap()[0];
        assert_eq!(db.name, "db");
        assert!(!db.running);
        assert_eq!(db.ports.len(), 2);
        assert!(parse_inspect(b"{}").is_err());
    }

    #[test]
    fn the_port_is_the_given_one_else_the_single_exposed_one_else_refused() {
        let web = &parse_inspect(PODMAN.as_bytes()).unwrap()[0];
        let v4 = vip("10.0.0.10:80/tcp");
        assert_eq!(
            web.endpoint(&v4, None).unwrap(),
            "10.88.0.128:8080".parse().unwrap()
        );
        assert_eq!(
            web.endpoint(&v4, Some(9000)).unwrap(),
            "10.88.0.128:9000".parse().unwrap()
        );
        assert_eq!(
            web.endpoint(&vip("[2001:db8::1]:80/tcp"), None).unwrap(),
            "[fd00::5]:8080".parse().unwrap()
        );
        assert_eq!(
            web.endpoint(&vip("10.0.0.10:53/udp"), None)
                .unwrap_err()
                .to_string(),
            "container 'web-1' exposes no udp port: give one (--container web-1:PORT)"
        );
        let mut db = parse_inspect(DOCKER.as_bytes()).unwrap().remove(0);
        assert!(matches!(
            db.endpoint(&v4, Some(5432)),
            Err(ContainerError::NotRunning(_))
        ));
        db.running = true;
        assert_eq!(
            db.endpoint(&v4, None).unwrap_err().to_string(),
            "container 'db' exposes several tcp ports (5432, 9187): say which (--container db:PORT)"
        );
        assert!(matches!(
            db.endpoint(&vip("[2001:db8::1]:80/tcp"), Some(5432)),
            Err(ContainerError::NoAddress { .. })
        ));
    }

    #[test]
    fn podman_and_docker_events_are_read_alike() {
        let podman = r#"{"ID":"7931","Name":"web-1","Status":"died","Type":"container","ContainerExitCode":137}"#;
        let docker = r#"{"status":"start","id":"ab12","Type":"container","Action":"start","Actor":{"ID":"ab12","Attributes":{"name":"db"}}}"#;
        assert_eq!(
            parse_event(podman),
            Some(EngineEvent {
                name: "web-1".into(),
                action: "died".into()
            })
        );
        assert_eq!(
            parse_event(docker),
            Some(EngineEvent {
                name: "db".into(),
                action: "start".into()
            })
        );
        assert_eq!(parse_event(r#"{"Name":"web-1","Status":"exec"}"#), None);
        assert_eq!(parse_event("not json"), None);
    }

    #[test]
    fn names_that_are_options_never_reach_the_engine() {
        for bad in ["--latest", "-l", "a b", ""] {
            assert!(
                matches!(inspect(Engine::Podman, bad), Err(ContainerError::Name(_))),
                "{bad:?}"
            );
        }
    }
}
