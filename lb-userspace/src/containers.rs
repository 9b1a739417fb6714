//! Containers as backends: what podman or docker says about a container (its address, ports,
//! labels, whether it runs), the engine's event stream, and what the agent makes of both.
//!
//! The engines are reached through their command-line clients (`inspect`, `ps`, `events`),
//! not their HTTP APIs: podman is daemonless, and its API socket exists only where
//! `podman.socket` is enabled, while the client works on every podman host; docker's client
//! speaks to whatever daemon or context the host has. Their JSON is read with serde.
//!
//! A backend added by container name (`xlb backend add VIP --container NAME`, `container =`
//! in `xlb.toml`) is *followed*: when the engine reports the container stopped, died or gone,
//! the backend leaves the ring (its flows re-hash, as for a failed health check); when it runs
//! again it comes back, at its new address if it has one (a new endpoint). With
//! `xlb run --containers ENGINE`, containers labelled `xlb.vip=ADDR:PORT/PROTO` are
//! *discovered*: made backends of that VIP (created if missing) when they start, drained when
//! the engine starts stopping them, removed once they are stopped.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::Read as _,
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    sync::mpsc,
};
use tracing::{debug, info, warn};

use crate::{
    balancer::{
        BackendConfig, BackendState, Balancer, DesiredState, MAX_WEIGHT, Protocol, VipSpec,
    },
    config::{Config, ContainerDecl},
    health::{HealthSpec, Probe},
    validate::{self, ContainerNameError},
};

/// Which engine `xlb run --containers` watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    Podman,
    Docker,
    /// podman if installed, else docker.
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Podman,
    Docker,
}

impl Engine {
    const fn program(self) -> &'static str {
        match self {
            Self::Podman => "podman",
            Self::Docker => "docker",
        }
    }

    fn installed(self) -> bool {
        std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join(self.program()).is_file())
        })
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program())
    }
}

impl EngineChoice {
    /// The engines to ask, in order.
    fn engines(self) -> &'static [Engine] {
        match self {
            Self::Podman => &[Engine::Podman],
            Self::Docker => &[Engine::Docker],
            Self::Auto => &[Engine::Podman, Engine::Docker],
        }
    }
}

/// How long one `inspect` or `ps` may take before the engine counts as not answering.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ContainerError {
    #[error(transparent)]
    Name(#[from] ContainerNameError),
    #[error("no container engine to ask: {0}")]
    NoEngine(String),
    #[error("no container named '{name}' ({tried})")]
    NotFound { name: String, tried: String },
    #[error("`{engine} {what}` failed: {detail}")]
    Engine {
        engine: Engine,
        what: String,
        detail: String,
    },
    #[error("`{engine} {what}` gave no answer within {} s", ENGINE_TIMEOUT.as_secs())]
    Timeout { engine: Engine, what: String },
    #[error("`{engine} {what}` printed JSON xlb cannot read: {source}")]
    Unreadable {
        engine: Engine,
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("container '{0}' is not running: start it first")]
    NotRunning(String),
    #[error("container '{name}' has no {family} address on any of its networks")]
    NoAddress { name: String, family: &'static str },
    #[error("container '{name}' exposes no {proto} port: give one (--container {name}:PORT)")]
    NoPort { name: String, proto: Protocol },
    #[error(
        "container '{name}' exposes several {proto} ports ({ports}): say which (--container {name}:PORT)"
    )]
    ManyPorts {
        name: String,
        proto: Protocol,
        ports: String,
    },
}

/// What an engine says about a container, as far as xlb cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    /// Running and not paused: able to answer.
    pub running: bool,
    /// Its addresses on all its networks.
    pub addrs: Vec<IpAddr>,
    /// The ports it exposes or publishes, on the container's side.
    pub ports: BTreeSet<(u16, Protocol)>,
    pub labels: BTreeMap<String, String>,
}

impl ContainerInfo {
    /// Where the container serves `vip`: its address of the VIP's family, and `port`, else
    /// its single exposed port of the VIP's protocol.
    ///
    /// # Errors
    /// Not running, no address of the family, no port given and not exactly one exposed.
    pub fn endpoint(&self, vip: &VipSpec, port: Option<u16>) -> Result<SocketAddr, ContainerError> {
        if !self.running {
            return Err(ContainerError::NotRunning(self.name.clone()));
        }
        let ip = self
            .addrs
            .iter()
            .find(|ip| ip.is_ipv4() == vip.addr.is_ipv4())
            .ok_or_else(|| ContainerError::NoAddress {
                name: self.name.clone(),
                family: if vip.addr.is_ipv4() { "IPv4" } else { "IPv6" },
            })?;
        let port = match port {
            Some(port) => port,
            None => {
                let exposed: Vec<u16> = self
                    .ports
                    .iter()
                    .filter(|(_, proto)| *proto == vip.proto)
                    .map(|(port, _)| *port)
                    .collect();
                match exposed.as_slice() {
                    [one] => *one,
                    [] => {
                        return Err(ContainerError::NoPort {
                            name: self.name.clone(),
                            proto: vip.proto,
                        });
                    }
                    many => {
                        return Err(ContainerError::ManyPorts {
                            name: self.name.clone(),
                            proto: vip.proto,
                            ports: many
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", "),
                        });
                    }
                }
            }
        };
        Ok(SocketAddr::new(*ip, port))
    }
}

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

/// Reads `--container NAME[:PORT]`.
///
/// # Errors
/// A port that is not 1-65535, or a name podman and docker would refuse.
pub fn parse_container_arg(spec: &str) -> Result<(String, Option<u16>), String> {
    let (name, port) = match spec.rsplit_once(':') {
        Some((name, port)) => (
            name,
            Some(
                port.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("'{port}' is not a port (1-65535)"))?,
            ),
        ),
        None => (spec, None),
    };
    validate::check_container_name(name).map_err(|e| e.to_string())?;
    Ok((name.to_owned(), port))
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

/// What the event watcher and the inspections it starts tell the agent.
#[derive(Debug)]
pub enum Notice {
    /// The event stream (re)started: events may have been missed, so every followed
    /// container is looked at again.
    Connected(Engine),
    /// Something happened to this container.
    Changed(Engine, EngineEvent),
    /// What the engine says about a container now (None: gone).
    Observed {
        name: String,
        info: Option<ContainerInfo>,
        /// The engine is stopping it (a `kill` or `stop` event while it still runs): a
        /// discovered backend drains.
        stopping: bool,
    },
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

/// One round of lookups for the inspector.
struct Lookup {
    engine: Engine,
    names: Vec<String>,
    /// The TCP endpoints (IPv4 or not, port) each container serves as a backend, or will.
    serves: BTreeMap<String, BTreeSet<(bool, u16)>>,
    /// Also look up every running container labelled `xlb.vip`.
    labelled: bool,
    stopping: bool,
    /// The engine reported them dead or removed: no need to ask, and every moment counts,
    /// since new connections still go to them.
    gone: bool,
}

/// Looks containers up one round at a time, in the order asked, and reports each as a
/// [`Notice::Observed`]: one at a time, so an answer about a container never overtakes a
/// newer one. A failing engine leaves the containers as they were.
async fn inspector(mut lookups: mpsc::UnboundedReceiver<Lookup>, notices: mpsc::Sender<Notice>) {
    while let Some(lookup) = lookups.recv().await {
        let notices = notices.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut names = lookup.names;
            if lookup.labelled {
                match labelled(lookup.engine) {
                    Ok(found) => {
                        for name in found {
                            if !names.contains(&name) {
                                names.push(name);
                            }
                        }
                    }
                    Err(e) => warn!("listing labelled containers: {e}"),
                }
            }
            for name in names {
                if lookup.gone {
                    let observed = Notice::Observed {
                        name,
                        info: None,
                        stopping: false,
                    };
                    if notices.blocking_send(observed).is_err() {
                        return;
                    }
                    continue;
                }
                match inspect(lookup.engine, &name) {
                    Ok(info) => {
                        if let Some(info) = info.as_ref().filter(|i| i.running && !lookup.stopping)
                        {
                            let known = lookup.serves.get(&name).cloned().unwrap_or_default();
                            wait_ready(info, known);
                        }
                        let observed = Notice::Observed {
                            name,
                            info,
                            stopping: lookup.stopping,
                        };
                        if notices.blocking_send(observed).is_err() {
                            return;
                        }
                    }
                    Err(e) => warn!(container = %name, "{e}; its backends are kept as they are"),
                }
            }
        })
        .await;
        if done.is_err() {
            return;
        }
    }
}

/// How long a starting container may take to accept connections before it joins the ring
/// anyway (the VIP's health checks, if it has any, then decide).
const READY_LIMIT: Duration = Duration::from_secs(5);

/// Waits until the container accepts TCP connections on the endpoints it serves (`known`,
/// plus what its labels ask for), at most [`READY_LIMIT`]: a container counts as running
/// from its first process on, well before its service listens, and a new connection sent
/// to it in between would be refused.
fn wait_ready(info: &ContainerInfo, mut known: BTreeSet<(bool, u16)>) {
    if let Some(Ok(spec)) = label_spec(&info.labels)
        && spec.vip.proto == Protocol::Tcp
        && let Ok(endpoint) = info.endpoint(&spec.vip, spec.port)
    {
        known.insert((endpoint.is_ipv4(), endpoint.port()));
    }
    let deadline = Instant::now() + READY_LIMIT;
    for (ipv4, port) in known {
        let Some(ip) = info.addrs.iter().find(|ip| ip.is_ipv4() == ipv4) else {
            continue;
        };
        let endpoint = SocketAddr::new(*ip, port);
        loop {
            match std::net::TcpStream::connect_timeout(&endpoint, Duration::from_millis(200)) {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    warn!(
                        container = %info.name,
                        %endpoint,
                        "does not accept connections {} s after starting ({e}): it joins the ring anyway",
                        READY_LIMIT.as_secs()
                    );
                    break;
                }
            }
        }
    }
}

/// The agent's side of following containers: the engines to ask, whether labelled
/// containers are discovered, and the tasks that watch and inspect.
pub struct Following {
    choice: EngineChoice,
    /// Names of the containers discovery made backends; None: discovery is off.
    discovered: Option<BTreeSet<String>>,
    /// The config file's container backends: added when their container starts.
    declared: Vec<(VipSpec, ContainerDecl)>,
    notices: mpsc::Sender<Notice>,
    lookups: mpsc::UnboundedSender<Lookup>,
    runtime: tokio::runtime::Handle,
    watching: bool,
}

impl Following {
    /// `discover`: `xlb run --containers ENGINE`; without it, named container backends are
    /// followed through whichever engine knows them (podman first). Must be called within the
    /// agent's runtime.
    #[must_use]
    pub fn new(discover: Option<EngineChoice>, notices: mpsc::Sender<Notice>) -> Self {
        let (lookups, queue) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Handle::current();
        runtime.spawn(inspector(queue, notices.clone()));
        Self {
            choice: discover.unwrap_or(EngineChoice::Auto),
            discovered: discover.map(|_| BTreeSet::new()),
            declared: Vec::new(),
            notices,
            lookups,
            runtime,
            watching: false,
        }
    }

    #[must_use]
    pub const fn engines(&self) -> EngineChoice {
        self.choice
    }

    /// The config file's container backends (from [`resolve_declared`]), the ones not yet
    /// backends included: they are added when their container runs.
    pub fn declare(&mut self, declared: Vec<(VipSpec, ContainerDecl)>) {
        self.declared = declared;
    }

    /// Carries the backends discovery made (and the VIPs holding them) from the running
    /// state into a reloaded config's `wanted`: the file does not list them, the labels do.
    pub fn keep_discovered(&self, running: &DesiredState, wanted: &mut DesiredState) {
        let Some(discovered) = &self.discovered else {
            return;
        };
        for v in &running.vips {
            let kept: Vec<BackendConfig> = v
                .backends
                .iter()
                .filter(|b| b.container.as_ref().is_some_and(|c| discovered.contains(c)))
                .map(|b| BackendConfig {
                    id: None,
                    ..b.clone()
                })
                .collect();
            if kept.is_empty() {
                continue;
            }
            let target = match wanted.vips.iter().position(|w| w.vip == v.vip) {
                Some(i) => &mut wanted.vips[i],
                None => {
                    wanted.vips.push(crate::balancer::VipConfig {
                        backends: Vec::new(),
                        id: None,
                        ..v.clone()
                    });
                    wanted.vips.last_mut().expect("just pushed")
                }
            };
            for b in kept {
                if !target.backends.iter().any(|t| t.addr == b.addr) {
                    target.backends.push(b);
                }
            }
            target.backends.sort_by_key(|b| b.addr);
        }
        wanted.vips.sort_by_key(|v| v.vip);
    }

    /// The TCP endpoints (IPv4 or not, port) each followed or declared container serves.
    fn serves(&self, balancer: &Balancer) -> BTreeMap<String, BTreeSet<(bool, u16)>> {
        let mut serves: BTreeMap<String, BTreeSet<(bool, u16)>> = BTreeMap::new();
        for v in balancer.desired_state().vips {
            if v.vip.proto != Protocol::Tcp {
                continue;
            }
            for b in v.backends {
                if let Some(name) = b.container {
                    serves
                        .entry(name)
                        .or_default()
                        .insert((b.addr.is_ipv4(), b.addr.port()));
                }
            }
        }
        for (vip, decl) in &self.declared {
            if let (Protocol::Tcp, Some(port)) = (vip.proto, decl.port) {
                serves
                    .entry(decl.name.clone())
                    .or_default()
                    .insert((vip.addr.is_ipv4(), port));
            }
        }
        serves
    }

    /// Every container name worth asking the engine about.
    fn names(&self, balancer: &Balancer) -> BTreeSet<String> {
        let mut names = followed(balancer);
        names.extend(self.declared.iter().map(|(_, d)| d.name.clone()));
        names
    }

    /// Starts watching the engine's events once there is something to follow: a container
    /// backend, or discovery. Agents without either start no engine process.
    pub fn ensure_watching(&mut self, balancer: &Balancer) {
        if self.watching || (self.discovered.is_none() && self.names(balancer).is_empty()) {
            return;
        }
        self.watching = true;
        self.runtime
            .spawn(watch_events(self.choice, self.notices.clone()));
    }

    /// Acts on a notice: asks the engine about the containers it concerns, or brings their
    /// backends in line with its answer. Returns the changes made, one line each.
    pub fn on_notice(&mut self, balancer: &mut Balancer, notice: Notice) -> Vec<String> {
        match notice {
            Notice::Connected(engine) => {
                let _ = self.lookups.send(Lookup {
                    engine,
                    names: self.names(balancer).into_iter().collect(),
                    serves: self.serves(balancer),
                    labelled: self.discovered.is_some(),
                    stopping: false,
                    gone: false,
                });
                Vec::new()
            }
            Notice::Changed(engine, event) => {
                if self.discovered.is_some() || self.names(balancer).contains(&event.name) {
                    let _ = self.lookups.send(Lookup {
                        engine,
                        serves: self.serves(balancer),
                        stopping: matches!(event.action.as_str(), "kill" | "stop"),
                        gone: matches!(
                            event.action.as_str(),
                            "died" | "die" | "remove" | "destroy"
                        ),
                        names: vec![event.name],
                        labelled: false,
                    });
                }
                Vec::new()
            }
            Notice::Observed {
                name,
                info,
                stopping,
            } => reconcile(
                balancer,
                &name,
                info.as_ref(),
                stopping,
                self.discovered.as_mut(),
                &self.declared,
            ),
        }
    }
}

/// What the labels of a discovered container ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSpec {
    pub vip: VipSpec,
    pub port: Option<u16>,
    pub weight: u32,
    pub health: Option<HealthSpec>,
}

/// Reads `xlb.vip`, `xlb.port`, `xlb.weight` and `xlb.health` (`tcp`, `udp`,
/// `http:/path`). None: no `xlb.vip` label.
///
/// # Errors
/// A label that does not parse, named in the message.
pub fn label_spec(labels: &BTreeMap<String, String>) -> Option<Result<LabelSpec, String>> {
    let vip = labels.get("xlb.vip")?;
    let spec = || -> Result<LabelSpec, String> {
        let vip: VipSpec = vip.parse().map_err(|e| format!("label xlb.vip: {e}"))?;
        let port = labels
            .get("xlb.port")
            .map(|p| {
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("label xlb.port '{p}' is not a port (1-65535)"))
            })
            .transpose()?;
        let weight = labels.get("xlb.weight").map_or(Ok(1), |w| {
            w.parse::<u32>()
                .ok()
                .filter(|w| (1..=MAX_WEIGHT).contains(w))
                .ok_or_else(|| format!("label xlb.weight '{w}' is not 1-{MAX_WEIGHT}"))
        })?;
        let health = labels
            .get("xlb.health")
            .map(|h| {
                let probe = match h.split_once(':') {
                    None if h == "tcp" => Probe::Tcp,
                    None if h == "udp" => Probe::Udp {
                        payload: Vec::new(),
                        expect_reply: false,
                    },
                    Some(("http", path)) if path.starts_with('/') => Probe::Http {
                        path: path.to_owned(),
                        expect_status: 200,
                    },
                    _ => {
                        return Err(format!(
                            "label xlb.health '{h}' is not tcp, udp or http:/PATH"
                        ));
                    }
                };
                let spec = HealthSpec {
                    probe,
                    ..HealthSpec::default()
                };
                spec.validate_for(&vip)
                    .map_err(|e| format!("label xlb.health: {e}"))?;
                Ok(spec)
            })
            .transpose()?;
        Ok(LabelSpec {
            vip,
            port,
            weight,
            health,
        })
    };
    Some(spec())
}

/// The names of the containers the balancer's backends are.
#[must_use]
pub fn followed(balancer: &Balancer) -> BTreeSet<String> {
    balancer
        .desired_state()
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().filter_map(|b| b.container.clone()))
        .collect()
}

/// Brings the backends that are container `name` in line with what its engine says: out of
/// the ring while it does not run, back (at its new address, if it moved) when it does. With
/// discovery on (`discovered`: the names of the containers it made backends), a labelled
/// container becomes a backend of its VIP, drained while the engine stops it and removed once
/// stopped or gone. Returns one line per change; a change that fails is logged and the rest
/// go on.
pub fn reconcile(
    balancer: &mut Balancer,
    name: &str,
    info: Option<&ContainerInfo>,
    stopping: bool,
    discovered: Option<&mut BTreeSet<String>>,
    declared: &[(VipSpec, ContainerDecl)],
) -> Vec<String> {
    let mut changes = Vec::new();
    let running = info.is_some_and(|i| i.running);
    let labels = info
        .filter(|_| discovered.is_some())
        .and_then(|i| label_spec(&i.labels));
    let was_discovered = discovered.as_ref().is_some_and(|d| d.contains(name));
    let discovered_vip = match &labels {
        Some(Ok(spec)) => Some(spec.vip),
        Some(Err(e)) => {
            warn!(container = name, "not made a backend: {e}");
            None
        }
        None => None,
    };
    let backends: Vec<(VipSpec, SocketAddr, BackendState)> = balancer
        .desired_state()
        .vips
        .iter()
        .flat_map(|v| {
            v.backends
                .iter()
                .filter(|b| b.container.as_deref() == Some(name))
                .map(move |b| (v.vip, b.addr, b.state))
        })
        .collect();
    for (vip, addr, state) in &backends {
        let (vip, addr) = (*vip, *addr);
        let discovered = discovered_vip == Some(vip) || (info.is_none() && was_discovered);
        if !running {
            if discovered {
                match balancer.remove_backend(&vip, addr) {
                    Ok(()) => changes.push(format!(
                        "container {name} stopped: removed backend {addr} from {vip}"
                    )),
                    Err(e) => warn!(%vip, %addr, "removing the stopped container's backend: {e}"),
                }
                continue;
            }
            match balancer.set_container_running(&vip, addr, false) {
                Ok(true) => changes.push(format!(
                    "container {name} stopped: backend {addr} of {vip} is out of the ring, its flows move"
                )),
                Ok(false) => {}
                Err(e) => warn!(%vip, %addr, "taking the stopped container out: {e}"),
            }
            continue;
        }
        let info = info.expect("running");
        if stopping && discovered && *state == BackendState::Active {
            match balancer.update_backend(&vip, addr, None, Some(BackendState::Draining)) {
                Ok(()) => changes.push(format!(
                    "container {name} is being stopped: draining backend {addr} of {vip}"
                )),
                Err(e) => warn!(%vip, %addr, "draining: {e}"),
            }
            continue;
        }
        let now = match info.endpoint(&vip, Some(addr.port())) {
            Ok(now) => now,
            Err(e) => {
                warn!(%vip, %addr, "container {name} runs but cannot serve: {e}");
                if let Err(e) = balancer.set_container_running(&vip, addr, false) {
                    warn!(%vip, %addr, "{e}");
                }
                continue;
            }
        };
        if now == addr {
            match balancer.set_container_running(&vip, addr, true) {
                Ok(true) => changes.push(format!(
                    "container {name} runs again: backend {addr} of {vip} is back in the ring"
                )),
                Ok(false) => {}
                Err(e) => warn!(%vip, %addr, "putting the container back: {e}"),
            }
            continue;
        }
        if let Err(e) = validate::check_backend(&vip, now) {
            warn!(%vip, %addr, "container {name} moved to an address xlb refuses: {e}");
            continue;
        }
        match balancer.move_backend(&vip, addr, now) {
            Ok(_) => changes.push(format!(
                "container {name} moved: backend {addr} of {vip} is now {now}"
            )),
            Err(e) => warn!(%vip, %addr, %now, "following the container to its new address: {e}"),
        }
    }
    if let Some(names) = discovered {
        if !running {
            names.remove(name);
        } else if discovered_vip.is_some() {
            // Made a backend now, or by an earlier agent (the state file kept it).
            names.insert(name.to_owned());
        }
    }
    let Some(info) = info.filter(|i| i.running && !stopping) else {
        return changes;
    };
    for (vip, decl) in declared {
        if decl.name == name && !backends.iter().any(|(v, _, _)| v == vip) {
            match add_declared(balancer, info, *vip, decl) {
                Ok(addr) => changes.push(format!(
                    "container {name} started: backend {addr} of {vip} (from the config)"
                )),
                Err(e) => warn!(container = name, %vip, "not made a backend: {e}"),
            }
        }
    }
    if let Some(Ok(spec)) = labels
        && !backends.iter().any(|(vip, _, _)| *vip == spec.vip)
    {
        match discover_backend(balancer, name, info, &spec) {
            Ok(line) => changes.push(line),
            Err(e) => warn!(container = name, vip = %spec.vip, "not made a backend: {e}"),
        }
    }
    changes
}

/// Makes a container the config names a backend of its VIP, now that it runs.
fn add_declared(
    balancer: &mut Balancer,
    info: &ContainerInfo,
    vip: VipSpec,
    decl: &ContainerDecl,
) -> anyhow::Result<SocketAddr> {
    let addr = info.endpoint(&vip, decl.port)?;
    validate::check_backend(&vip, addr)?;
    balancer.add_backend(&vip, addr, decl.weight)?;
    balancer.set_backend_container(&vip, addr, Some(decl.name.clone()))?;
    if decl.state != BackendState::Active {
        balancer.update_backend(&vip, addr, None, Some(decl.state))?;
    }
    Ok(addr)
}

/// Puts the config's container backends into `wanted` (the config's desired state) at the
/// addresses their engine gives now; a container not running keeps the address `known` (the
/// state file, or the running agent) has for it, and is taken out of the ring once the engine
/// is asked again; one never seen is left out, with a warning, and added when it starts.
/// Returns the config's container backends, for [`Following::declare`], and the warnings.
#[must_use]
pub fn resolve_declared(
    wanted: &mut DesiredState,
    config: &Config,
    engines: EngineChoice,
    known: Option<&DesiredState>,
) -> (Vec<(VipSpec, ContainerDecl)>, Vec<String>) {
    let mut declared = Vec::new();
    let mut warnings = Vec::new();
    for v in &config.vips {
        let Some(target) = wanted.vips.iter_mut().find(|w| w.vip == v.vip) else {
            continue;
        };
        for decl in &v.containers {
            declared.push((v.vip, decl.clone()));
            let now = find(engines, &decl.name).and_then(|info| info.endpoint(&v.vip, decl.port));
            let last_known = || {
                known?
                    .vips
                    .iter()
                    .find(|k| k.vip == v.vip)?
                    .backends
                    .iter()
                    .find(|b| b.container.as_deref() == Some(decl.name.as_str()))
                    .map(|b| b.addr)
            };
            let addr = match now {
                Ok(addr) => addr,
                Err(e) => match last_known() {
                    Some(addr) => addr,
                    None => {
                        warnings.push(format!(
                            "VIP {}: container {}: {e}; it becomes a backend when it starts",
                            v.vip, decl.name
                        ));
                        continue;
                    }
                },
            };
            if target.backends.iter().any(|b| b.addr == addr) {
                warnings.push(format!(
                    "VIP {}: container {} is at {addr}, which the config lists as an address \
                     already; left out",
                    v.vip, decl.name
                ));
                continue;
            }
            target.backends.push(BackendConfig {
                addr,
                weight: decl.weight,
                state: decl.state,
                id: None,
                container: Some(decl.name.clone()),
            });
        }
        target.backends.sort_by_key(|b| b.addr);
    }
    (declared, warnings)
}

/// Makes a labelled container a backend of its VIP, creating the VIP if needed.
fn discover_backend(
    balancer: &mut Balancer,
    name: &str,
    info: &ContainerInfo,
    spec: &LabelSpec,
) -> anyhow::Result<String> {
    let addr = info.endpoint(&spec.vip, spec.port)?;
    validate::check_backend(&spec.vip, addr)?;
    if !balancer.vip_specs().contains(&spec.vip) {
        validate::check_vip(&spec.vip)?;
        balancer.add_vip(spec.vip)?;
        balancer.set_vip_health(&spec.vip, spec.health.clone())?;
        info!(vip = %spec.vip, "VIP created for labelled containers");
    }
    balancer.add_backend(&spec.vip, addr, spec.weight)?;
    balancer.set_backend_container(&spec.vip, addr, Some(name.to_owned()))?;
    Ok(format!(
        "container {name} started: backend {addr} of {} (weight {})",
        spec.vip, spec.weight
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn labels_ask_for_a_vip_port_weight_and_health() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(label_spec(&labels(&[("app", "web")])), None);
        let spec = label_spec(&labels(&[
            ("xlb.vip", "10.0.0.10:80/tcp"),
            ("xlb.port", "8080"),
            ("xlb.weight", "2"),
            ("xlb.health", "http:/healthz"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(spec.vip, vip("10.0.0.10:80/tcp"));
        assert_eq!((spec.port, spec.weight), (Some(8080), 2));
        assert_eq!(
            spec.health.unwrap().probe,
            Probe::Http {
                path: "/healthz".into(),
                expect_status: 200
            }
        );
        for (key, bad) in [
            ("xlb.vip", "10.0.0.10"),
            ("xlb.port", "0"),
            ("xlb.weight", "1001"),
            ("xlb.health", "http:healthz"),
        ] {
            let mut l = labels(&[("xlb.vip", "10.0.0.10:80/tcp")]);
            l.insert(key.to_owned(), bad.to_owned());
            let e = label_spec(&l).unwrap().unwrap_err();
            assert!(e.contains(key), "{e}");
        }
        // A UDP probe on a TCP VIP is refused as the CLI refuses it.
        let l = labels(&[("xlb.vip", "10.0.0.10:80/tcp"), ("xlb.health", "udp")]);
        assert!(label_spec(&l).unwrap().is_err());
    }

    #[test]
    fn names_that_are_options_never_reach_the_engine() {
        for bad in ["--latest", "-l", "a b", ""] {
            assert!(
                matches!(inspect(Engine::Podman, bad), Err(ContainerError::Name(_))),
                "{bad:?}"
            );
            assert!(
                parse_container_arg(&format!("{bad}:80")).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_container_arg("web-1:8080"),
            Ok(("web-1".to_owned(), Some(8080)))
        );
        assert_eq!(parse_container_arg("web-1"), Ok(("web-1".to_owned(), None)));
        assert!(parse_container_arg("web-1:0").is_err());
    }
}
