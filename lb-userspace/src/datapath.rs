//! The loaded XDP object: loading, attaching, pinning, test runs, and typed access to its maps.
//! Everything that touches the kernel's BPF objects goes through here.

use std::{os::fd::AsFd, path::Path, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap as _, MapData, MapError, PerCpuArray, PerCpuValues,
        xdp::DevMapHash,
    },
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp,
        XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttach},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    Backend, CONNTRACK_ENTRIES, CachedHop, Counter, DEFAULT_HASH_SEED, DEFAULT_MAX_VIPS,
    DEFAULT_RING_SIZE, EncapSettings, EndpointVip, FlowKey, FlowState, HASH_SEED_SYMBOL,
    ReverseNat, TrafficCounters, VipInfo, VipKey,
    addr::is_v4_mapped,
    flow_table::{
        FLOW_MULTIPLIERS_SYMBOL, FLOW_SETS_SYMBOL, FlowKey4, FlowSet, SetMultipliers, flow_sets,
        flow_table_entries,
    },
    maglev::is_prime,
    map_names, program_names,
};
use thiserror::Error;
use xlb_core::{
    maps::Maps,
    plan::{MapContents, ServiceKey},
};

use crate::mapped::MappedArray;

/// The compiled XDP object, built by build.rs from `lb-ebpf`.
pub static XLB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Slots per Maglev ring (prime).
    pub ring_size: u32,
    /// How many VIPs the maps have room for.
    pub max_vips: u32,
    /// Flow-hash seed: the same on every node that must agree on backends.
    pub hash_seed: u32,
    /// Connection-table (and reverse-NAT) entries; the handshake tables get half as many.
    pub conntrack_entries: u32,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            ring_size: DEFAULT_RING_SIZE,
            max_vips: DEFAULT_MAX_VIPS,
            hash_seed: DEFAULT_HASH_SEED,
            conntrack_entries: CONNTRACK_ENTRIES,
        }
    }
}

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("ring size {0} is not prime (Maglev needs a prime, e.g. 65537 or 16381)")]
    RingSizeNotPrime(u32),
    #[error("max VIPs × 2 × ring size ({0}) does not fit a BPF array")]
    TooLarge(u64),
    #[error("loading the XDP object into the kernel failed (are you root, on a kernel with BPF?)")]
    Load(#[source] aya::EbpfError),
    #[error("the XDP object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("detaching from the interface")]
    Detach(#[source] ProgramError),
    #[error("pinning map {name} at {path}")]
    Pin {
        name: &'static str,
        path: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("adding interface {ifindex} to the redirect map")]
    Egress {
        ifindex: u32,
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("adopting the XDP link pinned at {path} (remove it with `xlb detach`)")]
    AdoptLink {
        path: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("removing the pin {path}")]
    Unpin {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("counting possible CPUs")]
    Cpus(#[source] std::io::Error),
    #[error("setting aside the pinned map {path}, whose layout this build does not share")]
    Retire {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping map {name} into memory to read it")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("choosing the connection table's seed")]
    Random(#[source] getrandom::Error),
    #[error("carrying the entries of the retired map {path} over")]
    CarryOver {
        path: String,
        #[source]
        source: MapError,
    },
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// Where a pinned map whose layout this build does not share is set aside.
fn retired_path(dir: &Path, name: &str) -> std::path::PathBuf {
    // bpffs refuses names with a dot in them.
    dir.join(format!("{name}_RETIRED"))
}

/// Sets aside a map pinned by another xlb build whose layout differs from this build's (an
/// upgrade across a layout change), so that loading creates this build's map in its place:
/// the running program keeps its reference, and the flow tables' entries are carried over
/// once the new maps exist (`Datapath::carry_over_retired`). A retired pin already there
/// (an earlier start stopped half way) holds the older entries and is kept.
fn retire_pin(dir: &Path, name: &str, property: &str, expected: u64, actual: u64) -> Result<()> {
    let from = dir.join(name);
    let to = retired_path(dir, name);
    let retire_err = |source| DatapathError::Retire {
        path: from.display().to_string(),
        source,
    };
    if to.exists() {
        std::fs::remove_file(&from).map_err(retire_err)?;
    } else {
        std::fs::rename(&from, &to).map_err(retire_err)?;
    }
    tracing::warn!(
        map = name,
        property,
        pinned = actual,
        this_build = expected,
        "a pinned map from another xlb build: replaced by this build's"
    );
    Ok(())
}

fn carry_over_error(path: &Path, source: MapError) -> DatapathError {
    DatapathError::CarryOver {
        path: path.display().to_string(),
        source,
    }
}

/// The retired map pinned at `path`, if its entries are `K` → `V` (sizes alike); `None` when
/// they mean something else.
fn open_retired<K, V>(path: &Path) -> Result<Option<MapData>> {
    let carry_err = |source| carry_over_error(path, source);
    let old = MapData::from_pin(path).map_err(carry_err)?;
    let info = old.info().map_err(carry_err)?;
    let alike =
        info.key_size() as usize == size_of::<K>() && info.value_size() as usize == size_of::<V>();
    Ok(alike.then_some(old))
}

/// The flows of a retired flow table (`name`: `XLB_FLOWS4` or `XLB_CONNTRACK`) opened at
/// `path`. An entry that goes while it is read is skipped.
fn retired_flows(name: &str, path: &Path, old: MapData) -> Result<Vec<(FlowKey, FlowState)>> {
    let carry_err = |source| carry_over_error(path, source);
    if name == map_names::CONNTRACK {
        let old: HashMap<MapData, FlowKey, FlowState> =
            HashMap::try_from(aya::maps::Map::LruHashMap(old)).map_err(carry_err)?;
        return Ok(old.iter().flatten().collect());
    }
    let old: Array<MapData, FlowSet> =
        Array::try_from(aya::maps::Map::Array(old)).map_err(carry_err)?;
    let mut flows = Vec::new();
    for set in old.iter() {
        let set = set.map_err(carry_err)?;
        if set.recorded_seed().is_none() {
            flows.extend(set.flows());
        }
    }
    Ok(flows)
}

/// The seed of the `XLB_FLOWS4` pinned in `dir`, if this build will reuse it (it has
/// `entries` elements) and it records one.
fn pinned_flow_seed(dir: &Path, entries: u32) -> Option<u32> {
    let pinned = MapData::from_pin(dir.join(map_names::FLOWS4)).ok()?;
    let info = pinned.info().ok()?;
    if info.max_entries() != entries || info.value_size() as usize != size_of::<FlowSet>() {
        return None;
    }
    let table: Array<MapData, FlowSet> = Array::try_from(aya::maps::Map::Array(pinned)).ok()?;
    table.get(&(entries - 1), 0).ok()?.recorded_seed()
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Where the balancer runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// XDP in the driver: the fastest, for NICs whose driver supports it.
    XdpNative,
    /// XDP on socket buffers (generic mode): any device, but GSO packets larger than the MTU
    /// cannot be redirected, so bulk TCP through it stalls.
    XdpGeneric,
    /// TC ingress through a tcx link: socket buffers after GRO, GSO and partial checksums
    /// handled; the right hook for veths and bridges.
    Tc,
}

impl Hook {
    pub const ALL: [Self; 3] = [Self::XdpNative, Self::XdpGeneric, Self::Tc];

    /// The name the CLI, the logs and the pins use.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::XdpNative => "native",
            Self::XdpGeneric => "skb",
            Self::Tc => "tc",
        }
    }

    /// Whether the attachment is one of the interface's XDP slot (at most one per device).
    #[must_use]
    pub const fn is_xdp(self) -> bool {
        matches!(self, Self::XdpNative | Self::XdpGeneric)
    }

    fn program(self) -> &'static str {
        if self.is_xdp() {
            program_names::XLB
        } else {
            program_names::XLB_TC
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Outcome of one `BPF_PROG_TEST_RUN` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunOutcome {
    pub action: u32,
    /// Bytes of the (possibly rewritten) packet in the output buffer.
    pub len: usize,
    /// Kernel-measured duration, averaged over `repeat`.
    pub duration: Duration,
}

pub struct Datapath {
    ebpf: Ebpf,
    config: DatapathConfig,
    /// `XLB_FLOWS4`'s own seed, as the loaded program has it.
    flow_seed: u32,
    /// Retired flow tables whose entries were carried over at load, kept open: the old
    /// program writes them until the agent attaches this build's (`finish_carry_over`).
    retired: Vec<RetiredTable>,
}

/// A retired table kept open after the first carry-over (its pin is gone).
struct RetiredTable {
    name: &'static str,
    path: std::path::PathBuf,
    map: MapData,
}

impl Datapath {
    /// Loads the object and the balancer program (not attached anywhere yet).
    ///
    /// # Errors
    /// Bad sizes, or the kernel refusing the maps or the program.
    pub fn load(config: DatapathConfig) -> Result<Self> {
        Self::load_with_pins(config, None, XLB_OBJECT)
    }

    /// As `load`, from another build's object file (a benchmark comparing two builds of the
    /// data path side by side). Its maps and globals must be this build's.
    ///
    /// # Errors
    /// As `load`; also an object this build cannot configure.
    pub fn load_object(config: DatapathConfig, object: &[u8]) -> Result<Self> {
        Self::load_with_pins(config, None, object)
    }

    /// As `load`, with every map pinned under `dir` by name; where a map is pinned there
    /// already (a previous agent left the data path running), the loader reuses it, so the
    /// connection table and counters survive an agent restart or upgrade.
    ///
    /// A pinned map whose layout or size differs from this build's is replaced, its
    /// connection-table entries carried over where their layout allows (`retire_pin`).
    ///
    /// # Errors
    /// As `load`; also a pinned map that cannot be set aside or carried over.
    pub fn load_pinned(config: DatapathConfig, dir: &Path) -> Result<Self> {
        Self::load_with_pins(config, Some(dir), XLB_OBJECT)
    }

    fn load_with_pins(config: DatapathConfig, pins: Option<&Path>, object: &[u8]) -> Result<Self> {
        if !is_prime(config.ring_size) {
            return Err(DatapathError::RingSizeNotPrime(config.ring_size));
        }
        let ring_slots = u64::from(config.max_vips) * 2 * u64::from(config.ring_size);
        let ring_slots_u32 =
            u32::try_from(ring_slots).map_err(|_| DatapathError::TooLarge(ring_slots))?;
        let flow_sets = flow_sets(config.conntrack_entries);
        // A pinned IPv4 table from a build before it existed: its flows are in
        // `XLB_CONNTRACK`, to be moved over once this build's table exists.
        let ipv4_flows_to_move = pins.is_some_and(|dir| {
            !dir.join(map_names::FLOWS4).exists() && dir.join(map_names::CONNTRACK).exists()
        });
        let flow_table_entries = flow_table_entries(config.conntrack_entries);
        // A pinned table this build reuses keeps its seed; a new one gets a fresh one.
        let flow_seed = match pins.and_then(|dir| pinned_flow_seed(dir, flow_table_entries)) {
            Some(seed) => seed,
            None => getrandom::u32().map_err(DatapathError::Random)?,
        };
        let flow_multipliers = SetMultipliers::of_seed(flow_seed);
        let mut loader = EbpfLoader::new();
        loader
            .override_global(HASH_SEED_SYMBOL, &config.hash_seed, true)
            .override_global(FLOW_SETS_SYMBOL, &flow_sets, true)
            .override_global(FLOW_MULTIPLIERS_SYMBOL, &flow_multipliers, true)
            .map_max_entries(map_names::FLOWS4, flow_table_entries)
            .map_max_entries(map_names::VIPS, config.max_vips)
            .map_max_entries(map_names::VIP_STATS, config.max_vips)
            .map_max_entries(map_names::MAGLEV, ring_slots_u32)
            .map_max_entries(map_names::CONNTRACK, config.conntrack_entries)
            .map_max_entries(map_names::REVERSE_NAT, config.conntrack_entries)
            .map_max_entries(
                map_names::HANDSHAKES,
                lb_common::handshake_entries(config.conntrack_entries),
            )
            .map_max_entries(
                map_names::HANDSHAKE_REPLIES,
                lb_common::handshake_entries(config.conntrack_entries),
            );
        if let Some(dir) = pins {
            for name in map_names::ALL {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let ebpf = loop {
            match loader.load(object) {
                Ok(ebpf) => break ebpf,
                Err(aya::EbpfError::MapError(MapError::IncompatiblePinnedMap {
                    name,
                    property,
                    expected,
                    actual,
                })) if pins.is_some() => {
                    let dir = pins.expect("checked by the guard");
                    retire_pin(dir, &name, property, expected, actual)?;
                }
                Err(e) => return Err(DatapathError::Load(e)),
            }
        };
        let mut datapath = Self {
            ebpf,
            config,
            flow_seed,
            retired: Vec::new(),
        };
        datapath.record_flow_seed()?;
        datapath.load_program(program_names::XLB)?;
        datapath.load_classifier()?;
        if let Some(dir) = pins {
            datapath.carry_over_retired(dir)?;
        }
        if ipv4_flows_to_move {
            let moved = datapath.move_ipv4_flows_out_of_conntrack()?;
            tracing::info!(flows = moved, "IPv4 flows moved to {}", map_names::FLOWS4);
        }
        Ok(datapath)
    }

    /// Writes the table's seed after its sets, where the next agent finds it.
    fn record_flow_seed(&mut self) -> Result<()> {
        let name = map_names::FLOWS4;
        let index = flow_sets(self.config.conntrack_entries);
        let record = FlowSet::seed_record(self.flow_seed);
        let mut table: Array<&mut MapData, FlowSet> = self.map_mut(name)?;
        table.set(index, &record, 0).map_err(map_err(name))
    }

    /// Moves the IPv4 entries of `XLB_CONNTRACK`, where builds before `XLB_FLOWS4` kept
    /// them, into `XLB_FLOWS4`.
    fn move_ipv4_flows_out_of_conntrack(&mut self) -> Result<usize> {
        let mut ipv4 = Vec::new();
        for (key, state) in self.conntrack()?.iter().flatten() {
            if is_v4_mapped(&key.dst) {
                ipv4.push((key, state));
            }
        }
        for (key, state) in &ipv4 {
            self.set_flow(key, state)?;
        }
        let name = map_names::CONNTRACK;
        let mut conntrack: HashMap<&mut MapData, FlowKey, FlowState> = self.map_mut(name)?;
        for (key, _) in &ipv4 {
            // Evicted meanwhile: gone either way.
            let _ = conntrack.remove(key);
        }
        Ok(ipv4.len())
    }

    /// Moves the entries of flow tables retired by [`retire_pin`] into this build's tables,
    /// where key and value layouts agree (a changed size or LRU flavour), then removes the
    /// retired pins. Runs before the agent attaches this build's program: the old program
    /// keeps using the old tables until then, so the flow tables stay open for a second
    /// pass once it is replaced (`finish_carry_over`). A retired pin left by an agent that
    /// stopped half way is picked up by the next start.
    fn carry_over_retired(&mut self, dir: &Path) -> Result<()> {
        for name in map_names::ALL {
            let path = retired_path(dir, name);
            if !path.exists() {
                continue;
            }
            let carried = match name {
                map_names::CONNTRACK => Some(self.carry_over_flows(&path)?),
                map_names::FLOWS4 => Some(self.carry_over_ipv4_flows(&path)?),
                map_names::HANDSHAKES => Some(self.carry_over::<FlowKey, FlowState>(name, &path)?),
                map_names::REVERSE_NAT | map_names::HANDSHAKE_REPLIES => {
                    Some(self.carry_over::<FlowKey, ReverseNat>(name, &path)?)
                }
                // Rings, VIPs, backends, ports, endpoints and the egress map are written
                // again from the desired state; counters and next-hop caches start over.
                _ => None,
            };
            if matches!(carried, Some(Some(_))) {
                let map =
                    MapData::from_pin(&path).map_err(|source| carry_over_error(&path, source))?;
                self.retired.push(RetiredTable {
                    name,
                    path: path.clone(),
                    map,
                });
            }
            match carried {
                Some(Some(n)) => tracing::info!(map = name, entries = n, "carried over"),
                Some(None) => tracing::warn!(
                    map = name,
                    "entries not carried over: their layout changed, so established flows \
                     are balanced afresh"
                ),
                None => tracing::warn!(
                    map = name,
                    "not carried over: rewritten from the desired state, or counters that \
                     start again from zero"
                ),
            }
            std::fs::remove_file(&path).map_err(|source| DatapathError::Unpin {
                path: path.display().to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// Copies what the old program wrote into the retired tables after `load` carried their
    /// entries over, once this build's program has replaced it everywhere (the caller has
    /// attached it), then lets the retired tables go. Only entries this build's tables lack
    /// are copied: an entry the new program wrote since is newer. Without this second pass,
    /// a connection that starts in between has no entry in the new table, and a server
    /// that speaks first (a greeting, a database handshake) has its replies leave
    /// untranslated until the client sends again. Returns the entries copied.
    ///
    /// # Errors
    /// A table failing to read or write.
    pub fn finish_carry_over(&mut self) -> Result<usize> {
        let mut copied = 0;
        for retired in std::mem::take(&mut self.retired) {
            let RetiredTable { name, path, map } = retired;
            copied += match name {
                map_names::FLOWS4 | map_names::CONNTRACK => {
                    let flows = retired_flows(name, &path, map)?;
                    self.copy_flows(flows, true)?
                }
                map_names::HANDSHAKES => {
                    self.copy_entries::<FlowKey, FlowState>(name, &path, map, true)?
                }
                _ => self.copy_entries::<FlowKey, ReverseNat>(name, &path, map, true)?,
            };
        }
        Ok(copied)
    }

    /// Writes `flows` into this build's tables: all of them, or with `only_missing` those
    /// the tables do not hold (the second pass: what they hold is newer).
    fn copy_flows(
        &mut self,
        flows: Vec<(FlowKey, FlowState)>,
        only_missing: bool,
    ) -> Result<usize> {
        let mut copied = 0;
        for (key, state) in flows {
            if only_missing && self.flow(&key)?.is_some() {
                continue;
            }
            self.set_flow(&key, &state)?;
            copied += 1;
        }
        Ok(copied)
    }

    /// Copies the entries of the retired hash map `old` into `name`: all of them, or with
    /// `only_missing` those `name` lacks (the second pass: what it holds is newer).
    fn copy_entries<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        path: &Path,
        old: MapData,
        only_missing: bool,
    ) -> Result<usize> {
        let carry_err = |source| carry_over_error(path, source);
        let old: HashMap<MapData, K, V> =
            HashMap::try_from(aya::maps::Map::LruHashMap(old)).map_err(carry_err)?;
        let mut new: HashMap<&mut MapData, K, V> = self.map_mut(name)?;
        let mut copied = 0;
        for entry in old.iter() {
            // An entry that goes between reading its key and its value is gone: skip it.
            let Ok((key, value)) = entry else { continue };
            if only_missing && new.get(&key, 0).is_ok() {
                continue;
            }
            new.insert(&key, &value, 0).map_err(carry_err)?;
            copied += 1;
        }
        Ok(copied)
    }

    /// Copies every entry of the retired hash map at `path` into `name`; `None` when their
    /// key or value sizes differ (the entries mean something else).
    fn carry_over<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        path: &Path,
    ) -> Result<Option<usize>> {
        let Some(old) = open_retired::<K, V>(path)? else {
            return Ok(None);
        };
        self.copy_entries::<K, V>(name, path, old, false).map(Some)
    }

    /// Copies a retired `XLB_CONNTRACK`'s flows into this build's tables, each to its
    /// family's; `None` when their layout differs.
    fn carry_over_flows(&mut self, path: &Path) -> Result<Option<usize>> {
        let Some(old) = open_retired::<FlowKey, FlowState>(path)? else {
            return Ok(None);
        };
        let flows = retired_flows(map_names::CONNTRACK, path, old)?;
        self.copy_flows(flows, false).map(Some)
    }

    /// Copies a retired `XLB_FLOWS4`'s flows (another size: other sets) into this build's.
    fn carry_over_ipv4_flows(&mut self, path: &Path) -> Result<Option<usize>> {
        let Some(old) = open_retired::<u32, FlowSet>(path)? else {
            return Ok(None);
        };
        let flows = retired_flows(map_names::FLOWS4, path, old)?;
        self.copy_flows(flows, false).map(Some)
    }

    /// Starts forwarding the program's aya-log records (rare events only; nothing is logged
    /// per packet) to the `log` facade, which `tracing` picks up.
    ///
    /// # Errors
    /// The object carrying no log ring buffer.
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }

    #[must_use]
    pub const fn config(&self) -> DatapathConfig {
        self.config
    }

    fn xdp_mut(&mut self, name: &'static str) -> Result<&mut Xdp> {
        let program = self.ebpf.program_mut(name).ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?;
        program
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    fn xdp(&self, name: &'static str) -> Result<&Xdp> {
        let program = self.ebpf.program(name).ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?;
        program
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    fn classifier_mut(&mut self) -> Result<&mut SchedClassifier> {
        let name = program_names::XLB_TC;
        let program = self.ebpf.program_mut(name).ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?;
        program
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// The TC classifier, for test runs through the TC hook (`load_classifier` first).
    ///
    /// # Errors
    /// The program missing or not loaded.
    pub fn classifier(&self) -> Result<&SchedClassifier> {
        let name = program_names::XLB_TC;
        let program = self.ebpf.program(name).ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?;
        program
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// Loads the TC classifier into the kernel if it is not yet (attaching does it too).
    ///
    /// # Errors
    /// The verifier rejecting the program.
    pub fn load_classifier(&mut self) -> Result<()> {
        let tc = self.classifier_mut()?;
        if tc.fd().is_err() {
            tc.load().map_err(|source| DatapathError::Program {
                name: program_names::XLB_TC,
                source,
            })?;
        }
        Ok(())
    }

    /// Loads one of the object's programs into the kernel (the benchmark floors are only
    /// loaded when a benchmark asks for them).
    ///
    /// # Errors
    /// The verifier rejecting the program.
    pub fn load_program(&mut self, name: &'static str) -> Result<()> {
        let xdp = self.xdp_mut(name)?;
        if xdp.fd().is_err() {
            xdp.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(())
    }

    /// Attaches the balancer to an interface.
    ///
    /// # Errors
    /// The kernel or driver refusing XDP in that mode.
    pub fn attach(&mut self, ifindex: u32, mode: XdpMode) -> Result<XdpLinkId> {
        self.xdp_mut(program_names::XLB)?
            .attach(ifindex, mode)
            .map_err(|source| DatapathError::Program {
                name: program_names::XLB,
                source,
            })
    }

    /// Attaches any of the object's XDP programs (benchmark programs on benchmark
    /// interfaces), loading it first if needed.
    ///
    /// # Errors
    /// The verifier or the interface refusing the program.
    pub fn attach_program(
        &mut self,
        name: &'static str,
        ifindex: u32,
        mode: XdpMode,
    ) -> Result<XdpLinkId> {
        self.load_program(name)?;
        self.xdp_mut(name)?
            .attach(ifindex, mode)
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// Typed access to any map of the object by name (the benchmark maps, say).
    ///
    /// # Errors
    /// No such map, or a different map type than `M`.
    pub fn map_mut<'a, M>(&'a mut self, name: &'static str) -> Result<M>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        M::try_from(self.map_data(name)?).map_err(map_err(name))
    }

    /// Read-only variant of [`Self::map_mut`].
    ///
    /// # Errors
    /// No such map, or a different map type than `M`.
    pub fn map<'a, M>(&'a self, name: &'static str) -> Result<M>
    where
        M: TryFrom<&'a aya::maps::Map, Error = MapError>,
    {
        M::try_from(self.map_ref(name)?).map_err(map_err(name))
    }

    /// Attaches the balancer to an interface at `hook` through a bpf_link pinned at `pin`, so
    /// the attachment outlives the agent. Where a link is pinned there already, its program
    /// is replaced atomically (no packet sees no program) instead: that is an agent upgrade.
    /// The caller keeps one pin path per interface and hook, so an adopted link is of `hook`.
    ///
    /// # Errors
    /// The kernel refusing the attachment, or the pin.
    pub fn attach_pinned(
        &mut self,
        ifindex: u32,
        hook: Hook,
        pin: &Path,
    ) -> Result<PinnedAttachment> {
        let name = hook.program();
        let program_err = |source| DatapathError::Program { name, source };
        let link_err = |source| DatapathError::AdoptLink {
            path: pin.display().to_string(),
            source,
        };
        let (adopted, link) = if pin.exists() {
            let pinned = PinnedLink::from_pin(pin).map_err(link_err)?;
            let link = FdLink::from(pinned);
            let link = if hook.is_xdp() {
                let xdp = self.xdp_mut(name)?;
                let id = xdp
                    .attach_to_link(XdpLink::try_from(link).map_err(link_err)?)
                    .map_err(program_err)?;
                // Out of aya's hands: dropping the program must not detach it.
                FdLink::try_from(xdp.take_link(id).map_err(program_err)?).map_err(link_err)?
            } else {
                let tc = self.classifier_mut()?;
                let id = tc
                    .attach_to_link(SchedClassifierLink::try_from(link).map_err(link_err)?)
                    .map_err(program_err)?;
                FdLink::try_from(tc.take_link(id).map_err(program_err)?).map_err(link_err)?
            };
            (true, link)
        } else {
            let link = match hook {
                Hook::XdpNative | Hook::XdpGeneric => {
                    let mode = if hook == Hook::XdpNative {
                        XdpMode::Driver
                    } else {
                        XdpMode::Skb
                    };
                    let xdp = self.xdp_mut(name)?;
                    let id = xdp.attach(ifindex, mode).map_err(program_err)?;
                    FdLink::try_from(xdp.take_link(id).map_err(program_err)?).map_err(link_err)?
                }
                Hook::Tc => {
                    let tc = self.classifier_mut()?;
                    let id = tc
                        .attach(
                            ifindex,
                            TcAttach::Tcx {
                                attach_type: TcAttachType::Ingress,
                                order: LinkOrder::default(),
                            },
                        )
                        .map_err(program_err)?;
                    FdLink::try_from(tc.take_link(id).map_err(program_err)?).map_err(link_err)?
                }
            };
            let pinned = link.pin(pin).map_err(|source| DatapathError::Pin {
                name: "link",
                path: pin.display().to_string(),
                source,
            })?;
            (false, FdLink::from(pinned))
        };
        Ok(PinnedAttachment {
            adopted,
            hook,
            link,
            pin: pin.to_owned(),
        })
    }

    /// Detaches one attachment made by `attach`.
    ///
    /// # Errors
    /// The link being gone already.
    pub fn detach(&mut self, link: XdpLinkId) -> Result<()> {
        self.detach_program(program_names::XLB, link)
    }

    /// Detaches one attachment made by `attach_program`.
    ///
    /// # Errors
    /// The program not loaded, or the link being gone already.
    pub fn detach_program(&mut self, name: &'static str, link: XdpLinkId) -> Result<()> {
        self.xdp_mut(name)?
            .detach(link)
            .map_err(DatapathError::Detach)
    }

    /// Runs `program` once on `packet` with `BPF_PROG_TEST_RUN`; the output lands in `out`.
    ///
    /// # Errors
    /// The kernel refusing the test run (e.g. a packet shorter than an Ethernet header).
    pub fn test_run(
        &self,
        program: &'static str,
        packet: &[u8],
        out: &mut [u8],
        repeat: u32,
    ) -> Result<TestRunOutcome> {
        let xdp = self.xdp(program)?;
        let result = xdp
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(out),
                repeat,
                ..TestRunOptions::new()
            })
            .map_err(|source| DatapathError::Program {
                name: program,
                source,
            })?;
        Ok(TestRunOutcome {
            action: result.return_value,
            len: result.data_size_out as usize,
            duration: result.duration,
        })
    }

    /// The loaded program itself, for test runs with options `test_run` does not cover
    /// (live frames, a context).
    ///
    /// # Errors
    /// `program` not loaded.
    pub fn program(&self, program: &'static str) -> Result<&Xdp> {
        self.xdp(program)
    }

    fn map_data(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::Missing { kind: "map", name })
    }

    fn map_ref(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or(DatapathError::Missing { kind: "map", name })
    }

    pub fn vips(&mut self) -> Result<HashMap<&mut MapData, VipKey, VipInfo>> {
        let name = map_names::VIPS;
        HashMap::try_from(self.map_data(name)?).map_err(map_err(name))
    }

    pub fn rings(&mut self) -> Result<Array<&mut MapData, u32>> {
        let name = map_names::MAGLEV;
        Array::try_from(self.map_data(name)?).map_err(map_err(name))
    }

    /// The Maglev array's map data, for batch calls (aya 0.16 has none).
    fn ring_map_data(&mut self) -> Result<&MapData> {
        let name = map_names::MAGLEV;
        match self.map_data(name)? {
            aya::maps::Map::Array(data) => Ok(data),
            _ => Err(DatapathError::Map {
                name,
                source: MapError::InvalidMapType { map_type: 0 },
            }),
        }
    }

    /// The `size` ring slots from `base` on, with one batch lookup, or one lookup per slot
    /// where the kernel has no batch lookups for arrays.
    ///
    /// # Errors
    /// A slot out of range or the kernel refusing a lookup.
    pub fn read_ring(&mut self, base: u32, size: u32) -> Result<Vec<u32>> {
        let name = map_names::MAGLEV;
        {
            let data = self.ring_map_data()?;
            if let Ok(ring) = crate::batch::lookup_u32_array(data.fd().as_fd(), base, size as usize)
            {
                return Ok(ring);
            }
        }
        let rings = self.rings()?;
        (base..base + size)
            .map(|slot| rings.get(&slot, 0))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(map_err(name))
    }

    /// Writes Maglev ring slots (`(slot, backend id)`, slots absolute) with one batch update,
    /// or one update per slot where the kernel has no batch updates for arrays.
    ///
    /// # Errors
    /// A slot out of range or the kernel refusing an update.
    pub fn write_ring_slots(&mut self, slots: &[(u32, u32)]) -> Result<()> {
        let name = map_names::MAGLEV;
        if slots.is_empty() {
            return Ok(());
        }
        let (keys, values): (Vec<u32>, Vec<u32>) = slots.iter().copied().unzip();
        let done = {
            let data = self.ring_map_data()?;
            match crate::batch::update_u32_array(data.fd().as_fd(), &keys, &values) {
                Ok(()) => return Ok(()),
                Err(e) => e.done,
            }
        };
        // Kernels before 5.6 refuse the batch outright; any other refusal shows again below,
        // on the slot that causes it.
        let mut rings = self.rings()?;
        for (key, value) in keys.iter().zip(&values).skip(done) {
            rings.set(*key, value, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    pub fn endpoints(&mut self) -> Result<HashMap<&mut MapData, VipKey, EndpointVip>> {
        let name = map_names::ENDPOINTS;
        HashMap::try_from(self.map_data(name)?).map_err(map_err(name))
    }

    pub fn ports(&mut self) -> Result<Array<&mut MapData, u8>> {
        let name = map_names::PORTS;
        Array::try_from(self.map_data(name)?).map_err(map_err(name))
    }

    pub fn backends(&mut self) -> Result<Array<&mut MapData, Backend>> {
        let name = map_names::BACKENDS;
        Array::try_from(self.map_data(name)?).map_err(map_err(name))
    }

    fn conntrack(&self) -> Result<HashMap<&MapData, FlowKey, FlowState>> {
        let name = map_names::CONNTRACK;
        HashMap::try_from(self.map_ref(name)?).map_err(map_err(name))
    }

    fn ipv4_flows(&self) -> Result<Array<&MapData, FlowSet>> {
        self.map(map_names::FLOWS4)
    }

    /// The `XLB_FLOWS4` set an IPv4 flow's key belongs in, as the data path finds it.
    fn ipv4_set_index(&self, key: &FlowKey4) -> u32 {
        key.set_index(
            &SetMultipliers::of_seed(self.flow_seed),
            flow_sets(self.config.conntrack_entries),
        )
    }

    /// Calls `f` with every connection-table entry, IPv4 and IPv6. An entry evicted during
    /// the walk is skipped.
    ///
    /// # Errors
    /// A table missing from the object, or failing to read.
    pub fn for_each_flow(&self, mut f: impl FnMut(FlowKey, FlowState)) -> Result<()> {
        let table = self.ipv4_flows()?;
        let sets = flow_sets(self.config.conntrack_entries) as usize;
        // Mapped, not read set by set: 131 072 lookups at the default size took 45 ms.
        let mapped =
            MappedArray::<FlowSet>::new(table.map().fd().as_fd(), sets).map_err(|source| {
                DatapathError::Mmap {
                    name: map_names::FLOWS4,
                    source,
                }
            })?;
        for set in mapped.iter() {
            for (key, state) in set.flows() {
                f(key, state);
            }
        }
        for (key, state) in self.conntrack()?.iter().flatten() {
            // IPv4 entries of an older build not yet moved are not the data path's.
            if !is_v4_mapped(&key.dst) {
                f(key, state);
            }
        }
        Ok(())
    }

    /// The connection-table entry of `key`, if there is one.
    ///
    /// # Errors
    /// Map access failing.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowState>> {
        if is_v4_mapped(&key.dst) {
            let key = FlowKey4::of(key);
            let mut set = self
                .ipv4_flows()?
                .get(&self.ipv4_set_index(&key), 0)
                .map_err(map_err(map_names::FLOWS4))?;
            return Ok(set.find(&key).copied());
        }
        match self.conntrack()?.get(key, 0) {
            Ok(state) => Ok(Some(state)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_err(map_names::CONNTRACK)(source)),
        }
    }

    /// Writes the connection-table entry of `key`, as the data path would record the flow:
    /// for carrying flows over, and for tests that age or plant entries. An IPv4 set is
    /// written whole, so a flow the data path records in the same set meanwhile may be
    /// lost (and balanced again by its ring).
    ///
    /// # Errors
    /// Map access failing.
    pub fn set_flow(&mut self, key: &FlowKey, state: &FlowState) -> Result<()> {
        if is_v4_mapped(&key.dst) {
            let name = map_names::FLOWS4;
            let key = FlowKey4::of(key);
            let index = self.ipv4_set_index(&key);
            let mut sets: Array<&mut MapData, FlowSet> = self.map_mut(name)?;
            let mut set = sets.get(&index, 0).map_err(map_err(name))?;
            set.put(&key, state);
            return sets.set(index, &set, 0).map_err(map_err(name));
        }
        let name = map_names::CONNTRACK;
        let mut table: HashMap<&mut MapData, FlowKey, FlowState> = self.map_mut(name)?;
        table.insert(key, state, 0).map_err(map_err(name))
    }

    /// The handshakes under way (`XLB_HANDSHAKES`), read-only.
    pub fn handshakes(&self) -> Result<HashMap<&MapData, FlowKey, FlowState>> {
        let name = map_names::HANDSHAKES;
        HashMap::try_from(self.map_ref(name)?).map_err(map_err(name))
    }

    pub fn reverse_nat(&self) -> Result<HashMap<&MapData, FlowKey, ReverseNat>> {
        let name = map_names::REVERSE_NAT;
        HashMap::try_from(self.map_ref(name)?).map_err(map_err(name))
    }

    /// Writes the node's direct-server-return settings (`XLB_ENCAP`'s one entry).
    ///
    /// # Errors
    /// Map access failing.
    pub fn set_encap(&mut self, settings: &EncapSettings) -> Result<()> {
        let name = map_names::ENCAP;
        let mut map: Array<&mut MapData, EncapSettings> =
            Array::try_from(self.map_data(name)?).map_err(map_err(name))?;
        map.set(0, settings, 0).map_err(map_err(name))
    }

    /// What `XLB_ENCAP` holds.
    ///
    /// # Errors
    /// Map access failing.
    pub fn encap(&self) -> Result<EncapSettings> {
        let name = map_names::ENCAP;
        let map: Array<&MapData, EncapSettings> =
            Array::try_from(self.map_ref(name)?).map_err(map_err(name))?;
        map.get(&0, 0).map_err(map_err(name))
    }

    pub fn egress_ports(&mut self) -> Result<DevMapHash<&mut MapData>> {
        let name = map_names::EGRESS_PORTS;
        DevMapHash::try_from(self.map_data(name)?).map_err(map_err(name))
    }

    /// Global counters summed over CPUs, in `Counter::ALL` order.
    ///
    /// # Errors
    /// Map access failing.
    pub fn global_counters(&self) -> Result<Vec<(Counter, u64)>> {
        let name = map_names::GLOBAL_STATS;
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map_ref(name)?).map_err(map_err(name))?;
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu = map.get(&(*c as u32), 0).map_err(map_err(name))?;
                Ok((*c, per_cpu.iter().sum()))
            })
            .collect()
    }

    fn traffic(&self, name: &'static str, index: u32) -> Result<TrafficCounters> {
        let map: PerCpuArray<&MapData, TrafficCounters> =
            PerCpuArray::try_from(self.map_ref(name)?).map_err(map_err(name))?;
        let per_cpu = map.get(&index, 0).map_err(map_err(name))?;
        Ok(per_cpu
            .iter()
            .fold(TrafficCounters::default(), |acc, c| acc.merged(*c)))
    }

    fn reset_traffic(&mut self, name: &'static str, index: u32) -> Result<()> {
        let mut map: PerCpuArray<&mut MapData, TrafficCounters> =
            PerCpuArray::try_from(self.map_data(name)?).map_err(map_err(name))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        let zeros = PerCpuValues::try_from(vec![TrafficCounters::default(); cpus.get() as usize])
            .map_err(DatapathError::Cpus)?;
        map.set(index, zeros, 0).map_err(map_err(name))
    }

    /// What a VIP's removed backends carried (the data path counts per backend only).
    pub fn retired_vip_traffic(&self, vip_id: u32) -> Result<TrafficCounters> {
        self.traffic(map_names::VIP_STATS, vip_id)
    }

    /// Moves a removed backend's counters into its VIP's retired tally, CPU by CPU, and
    /// zeroes the backend's, so the VIP's totals keep what the backend carried. Called once
    /// the backend's entry is cleared: no packet counts for it any more.
    ///
    /// # Errors
    /// A failing map read or write.
    pub fn retire_backend_traffic(&mut self, backend_id: u32, vip_id: u32) -> Result<()> {
        let backend = self.per_cpu_traffic(map_names::BACKEND_STATS, backend_id)?;
        let vip = self.per_cpu_traffic(map_names::VIP_STATS, vip_id)?;
        let merged: Vec<TrafficCounters> = vip
            .iter()
            .zip(backend.iter())
            .map(|(v, b)| v.merged(*b))
            .collect();
        let name = map_names::VIP_STATS;
        let mut map: PerCpuArray<&mut MapData, TrafficCounters> =
            PerCpuArray::try_from(self.map_data(name)?).map_err(map_err(name))?;
        map.set(
            vip_id,
            PerCpuValues::try_from(merged).map_err(DatapathError::Cpus)?,
            0,
        )
        .map_err(map_err(name))?;
        self.reset_backend_slots(backend_id)
    }

    fn per_cpu_traffic(&self, name: &'static str, index: u32) -> Result<Vec<TrafficCounters>> {
        let map: PerCpuArray<&MapData, TrafficCounters> =
            PerCpuArray::try_from(self.map_ref(name)?).map_err(map_err(name))?;
        Ok(map.get(&index, 0).map_err(map_err(name))?.to_vec())
    }

    pub fn backend_traffic(&self, backend_id: u32) -> Result<TrafficCounters> {
        self.traffic(map_names::BACKEND_STATS, backend_id)
    }

    /// Zeroes a VIP's counters (its slot may have served a removed VIP).
    pub fn reset_vip_traffic(&mut self, vip_id: u32) -> Result<()> {
        self.reset_traffic(map_names::VIP_STATS, vip_id)
    }

    /// Zeroes a backend's per-CPU slots, its counters and its cached next hop: its id may
    /// have served a removed backend at another address.
    pub fn reset_backend_slots(&mut self, backend_id: u32) -> Result<()> {
        self.reset_traffic(map_names::BACKEND_STATS, backend_id)?;
        let name = map_names::BACKEND_HOPS;
        let mut map: PerCpuArray<&mut MapData, CachedHop> =
            PerCpuArray::try_from(self.map_data(name)?).map_err(map_err(name))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        let empty = PerCpuValues::try_from(vec![CachedHop::default(); cpus.get() as usize])
            .map_err(DatapathError::Cpus)?;
        map.set(backend_id, empty, 0).map_err(map_err(name))
    }
}

/// The balancer's map writes (`xlb_core`'s planner and balancer decide which and in what
/// order), carried out on the kernel's maps.
impl Maps for Datapath {
    type Error = DatapathError;

    fn reset_vip_counters(&mut self, vip_id: u32) -> Result<()> {
        self.reset_vip_traffic(vip_id)
    }

    fn reset_backend_slots(&mut self, backend_id: u32) -> Result<()> {
        Self::reset_backend_slots(self, backend_id)
    }

    fn retire_backend_traffic(&mut self, backend_id: u32, vip_id: u32) -> Result<()> {
        Self::retire_backend_traffic(self, backend_id, vip_id)
    }

    fn set_port_roles(&mut self, port: u16, roles: u8) -> Result<()> {
        self.ports()?
            .set(u32::from(port), &roles, 0)
            .map_err(map_err(map_names::PORTS))
    }

    fn put_endpoint(&mut self, key: ServiceKey, value: &EndpointVip) -> Result<()> {
        self.endpoints()?
            .insert(&VipKey::new(key.0, key.1), value, 0)
            .map_err(map_err(map_names::ENDPOINTS))
    }

    fn remove_endpoint(&mut self, key: ServiceKey) -> Result<()> {
        absent_is_fine(self.endpoints()?.remove(&VipKey::new(key.0, key.1)))
            .map_err(map_err(map_names::ENDPOINTS))
    }

    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<()> {
        self.backends()?
            .set(id, value, 0)
            .map_err(map_err(map_names::BACKENDS))
    }

    fn put_ring_slots(&mut self, slots: &[(u32, u32)]) -> Result<()> {
        self.write_ring_slots(slots)
    }

    fn put_vip(&mut self, key: ServiceKey, info: &VipInfo) -> Result<()> {
        self.vips()?
            .insert(&VipKey::new(key.0, key.1), info, 0)
            .map_err(map_err(map_names::VIPS))
    }

    fn remove_vip(&mut self, key: ServiceKey) -> Result<()> {
        absent_is_fine(self.vips()?.remove(&VipKey::new(key.0, key.1)))
            .map_err(map_err(map_names::VIPS))
    }

    fn read_contents(&mut self) -> Result<MapContents> {
        let mut held = MapContents::default();
        for item in self.vips()?.iter() {
            let (key, info) = item.map_err(map_err(map_names::VIPS))?;
            held.vips.insert((key.socket_addr(), key.proto), info);
        }
        let live: Vec<VipInfo> = held
            .vips
            .values()
            .filter(|i| i.ring_size > 0)
            .copied()
            .collect();
        for info in live {
            let ring = self.read_ring(info.ring_base, info.ring_size)?;
            held.rings.insert(info.ring_base, ring);
        }
        for (id, item) in self.backends()?.iter().enumerate() {
            let backend = item.map_err(map_err(map_names::BACKENDS))?;
            if backend.family != 0 {
                held.backends.insert(id as u32, backend);
            }
        }
        for item in self.endpoints()?.iter() {
            let (key, value) = item.map_err(map_err(map_names::ENDPOINTS))?;
            held.endpoints.insert((key.socket_addr(), key.proto), value);
        }
        for (port, item) in self.ports()?.iter().enumerate() {
            let roles = item.map_err(map_err(map_names::PORTS))?;
            if roles != 0 {
                held.ports.insert(port as u16, roles);
            }
        }
        Ok(held)
    }

    fn backend_traffic(&self, backend_id: u32) -> Result<TrafficCounters> {
        Self::backend_traffic(self, backend_id)
    }

    fn retired_vip_traffic(&self, vip_id: u32) -> Result<TrafficCounters> {
        Self::retired_vip_traffic(self, vip_id)
    }
}

/// A removal of what is not there has nothing left to do.
fn absent_is_fine(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// An attachment that lives on bpffs, independent of the agent process.
pub struct PinnedAttachment {
    /// The link was pinned already: a previous agent left the data path running.
    pub adopted: bool,
    pub hook: Hook,
    link: FdLink,
    pin: std::path::PathBuf,
}

impl PinnedAttachment {
    /// Leaves the program attached after the agent exits (the pin keeps the link).
    pub fn keep(self) {
        drop(self.link);
    }

    /// Detaches: removes the pin, and closing the last reference ends the link.
    ///
    /// # Errors
    /// The pin cannot be removed.
    pub fn detach(self) -> std::io::Result<()> {
        std::fs::remove_file(&self.pin)?;
        drop(self.link);
        Ok(())
    }
}

/// Removes an attachment left pinned at `pin` by an agent that kept the data path running.
///
/// # Errors
/// The pin is not a link, or cannot be removed.
pub fn detach_pinned(pin: &Path) -> Result<()> {
    let pinned = PinnedLink::from_pin(pin).map_err(|source| DatapathError::AdoptLink {
        path: pin.display().to_string(),
        source,
    })?;
    pinned.unpin().map(drop).map_err(|e| DatapathError::Unpin {
        path: pin.display().to_string(),
        source: e,
    })
}

/// `XdpMode` by the names the CLI uses.
#[must_use]
pub const fn xdp_mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "skb",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "default",
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{map_names, program_names};

    use super::XLB_OBJECT;

    /// The maps and programs the object defines are the ones `lb-common` names: a map renamed
    /// on one side only would otherwise surface as a load-time "no such map" on a live host.
    #[test]
    fn object_defines_exactly_the_maps_and_programs_lb_common_names() {
        let object = aya_obj::Object::parse(XLB_OBJECT).expect("parsing the embedded object");
        let mut balancer_maps: Vec<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            .filter(|name| name.starts_with("XLB_") && !name.starts_with("XLB_BENCH_"))
            .collect();
        balancer_maps.sort_unstable();
        let mut named = map_names::ALL.to_vec();
        named.sort_unstable();
        assert_eq!(balancer_maps, named);
        for program in [program_names::XLB, program_names::XLB_TC] {
            assert!(
                object.programs.contains_key(program),
                "no program {program} in the object"
            );
        }
    }
}
