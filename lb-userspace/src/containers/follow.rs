//! What the agent makes of the engine's answers: following named containers (out of the
//! ring while stopped, back where they run), the config's containers, and label discovery.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    ContainerInfo, Engine, EngineChoice, EngineEvent, find, inspect, labelled, watch_events,
};
use crate::{
    balancer::{
        BackendConfig, BackendState, Balancer, DesiredState, MAX_WEIGHT, Protocol, VipSpec,
    },
    config::{Config, ContainerDecl},
    health::{HealthSpec, Probe},
    validate,
};

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
    /// `--containers`: labelled containers become backends.
    discover: bool,
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
            discover: discover.is_some(),
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
        if !self.discover {
            return;
        }
        for v in &running.vips {
            let kept: Vec<BackendConfig> = v
                .backends
                .iter()
                .filter(|b| b.discovered)
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
        if self.watching || (!self.discover && self.names(balancer).is_empty()) {
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
                    labelled: self.discover,
                    stopping: false,
                    gone: false,
                });
                Vec::new()
            }
            Notice::Changed(engine, event) => {
                if self.discover || self.names(balancer).contains(&event.name) {
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
                self.discover,
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
                        host: None,
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
/// discovery on (`discover`), a labelled container becomes a backend of its VIP, drained while
/// the engine stops it and removed once stopped or gone (also when an earlier agent made it
/// one: the state file says so). Returns one line per change; a change that fails is logged and the rest
/// go on.
pub fn reconcile(
    balancer: &mut Balancer,
    name: &str,
    info: Option<&ContainerInfo>,
    stopping: bool,
    discover: bool,
    declared: &[(VipSpec, ContainerDecl)],
) -> Vec<String> {
    let mut changes = Vec::new();
    let running = info.is_some_and(|i| i.running);
    let labels = info
        .filter(|_| discover)
        .and_then(|i| label_spec(&i.labels));
    let discovered_vip = match &labels {
        Some(Ok(spec)) => Some(spec.vip),
        Some(Err(e)) => {
            warn!(container = name, "not made a backend: {e}");
            None
        }
        None => None,
    };
    let backends: Vec<(VipSpec, SocketAddr, BackendState, bool)> = balancer
        .desired_state()
        .vips
        .iter()
        .flat_map(|v| {
            v.backends
                .iter()
                .filter(|b| b.container.as_deref() == Some(name))
                .map(move |b| (v.vip, b.addr, b.state, b.discovered))
        })
        .collect();
    for (vip, addr, state, by_labels) in &backends {
        let (vip, addr) = (*vip, *addr);
        let discovered = discover && (*by_labels || discovered_vip == Some(vip));
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
    let Some(info) = info.filter(|i| i.running && !stopping) else {
        return changes;
    };
    for (vip, decl) in declared {
        if decl.name == name && !backends.iter().any(|(v, ..)| v == vip) {
            match add_declared(balancer, info, *vip, decl) {
                Ok(addr) => changes.push(format!(
                    "container {name} started: backend {addr} of {vip} (from the config)"
                )),
                Err(e) => warn!(container = name, %vip, "not made a backend: {e}"),
            }
        }
    }
    if let Some(Ok(spec)) = labels
        && !backends.iter().any(|(vip, ..)| *vip == spec.vip)
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
    balancer.set_backend_container(&vip, addr, Some(decl.name.clone()), false)?;
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
                discovered: false,
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
    balancer.set_backend_container(&spec.vip, addr, Some(name.to_owned()), true)?;
    Ok(format!(
        "container {name} started: backend {addr} of {} (weight {})",
        spec.vip, spec.weight
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(text: &str) -> VipSpec {
        text.parse().unwrap()
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
                expect_status: 200,
                host: None,
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
}
