//! Runs golden cases through the real XDP program with `BPF_PROG_TEST_RUN` and checks the
//! action, the output bytes and how the global counters moved.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{Counter, DEFAULT_HASH_SEED, FlowKey, FlowState, program_names};
use lb_userspace::{
    balancer::{Balancer, VipSpec},
    datapath::{Datapath, DatapathConfig},
};

use crate::packet::{Frame, hex, verify_checksums};

/// XDP verdicts, as the kernel's UAPI numbers them (`enum xdp_action`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Aborted = 0,
    Drop = 1,
    Pass = 2,
    Tx = 3,
    Redirect = 4,
}

impl Action {
    #[must_use]
    pub fn from_raw(raw: u32) -> Option<Self> {
        [
            Self::Aborted,
            Self::Drop,
            Self::Pass,
            Self::Tx,
            Self::Redirect,
        ]
        .into_iter()
        .find(|a| *a as u32 == raw)
    }

    /// The global counter every packet with this verdict bumps.
    #[must_use]
    pub const fn counter(self) -> Counter {
        match self {
            Self::Aborted => Counter::ActionAborted,
            Self::Drop => Counter::ActionDrop,
            Self::Pass => Counter::ActionPass,
            Self::Tx => Counter::ActionTx,
            Self::Redirect => Counter::ActionRedirect,
        }
    }
}

/// What the program must leave in the frame.
#[derive(Clone, Debug)]
pub enum Expect {
    /// The input, byte for byte.
    Unmodified,
    /// This frame, byte for byte; its checksums are also verified with etherparse.
    Frame(Vec<u8>),
}

/// The program's two hooks, for tests that put the same frames through both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

/// One golden fixture: {description, input packet, expected action, expected output packet},
/// plus the global counters it must bump (besides its action's counter, which is implied).
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub input: Vec<u8>,
    pub action: Action,
    pub output: Expect,
    /// Each entry bumps that counter by one (list a counter twice for two); every counter not
    /// listed, apart from the action's, must not move.
    pub counters: Vec<Counter>,
    /// The interface the frame arrives on; `None`: the namespace's `lo` (test_run's default).
    pub ingress: Option<u32>,
}

impl Case {
    /// A packet the program must rewrite into `output`.
    #[must_use]
    pub fn rewritten(
        name: impl Into<String>,
        input: &impl Frame,
        action: Action,
        output: &impl Frame,
        counters: &[Counter],
    ) -> Self {
        Self {
            name: name.into(),
            input: input.frame(),
            action,
            output: Expect::Frame(output.frame()),
            counters: counters.to_vec(),
            ingress: None,
        }
    }

    /// A frame the program must leave as it is.
    #[must_use]
    pub fn unmodified(
        name: impl Into<String>,
        input: Vec<u8>,
        action: Action,
        counters: &[Counter],
    ) -> Self {
        Self {
            name: name.into(),
            input,
            action,
            output: Expect::Unmodified,
            counters: counters.to_vec(),
            ingress: None,
        }
    }

    /// The frame arrives on interface `ifindex` instead of `lo`.
    #[must_use]
    pub const fn arriving_on(mut self, ifindex: u32) -> Self {
        self.ingress = Some(ifindex);
        self
    }
}

/// Ring size for the tests: prime, and small so that loading and ring rebuilds are quick.
pub const TEST_RING_SIZE: u32 = 251;
/// VIP slots for the tests.
pub const TEST_MAX_VIPS: u32 = 8;

/// A freshly loaded data plane and the balancer that programs it.
pub struct Lab {
    pub balancer: Balancer,
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Lab {
    /// Loads the XDP object with a small ring.
    ///
    /// # Panics
    /// The kernel refusing the object.
    #[must_use]
    pub fn new() -> Self {
        let datapath = Datapath::load(DatapathConfig {
            ring_size: TEST_RING_SIZE,
            max_vips: TEST_MAX_VIPS,
            hash_seed: DEFAULT_HASH_SEED,
            ..DatapathConfig::default()
        })
        .unwrap_or_else(|e| panic!("loading the XDP program: {}", chain(&e)));
        Self {
            balancer: Balancer::new(datapath),
        }
    }

    /// # Panics
    /// A bad spec, or the balancer refusing it.
    pub fn add_vip(&mut self, spec: &str) -> VipSpec {
        let vip: VipSpec = spec.parse().unwrap_or_else(|e| panic!("VIP {spec}: {e}"));
        self.balancer
            .add_vip(vip)
            .unwrap_or_else(|e| panic!("add VIP {vip}: {}", chain(&e)));
        vip
    }

    /// A VIP whose flows idle out after `idle_timeout_s` seconds.
    ///
    /// # Panics
    /// A bad spec, or the balancer refusing it.
    pub fn add_vip_with_timeout(&mut self, spec: &str, idle_timeout_s: u32) -> VipSpec {
        let vip: VipSpec = spec.parse().unwrap_or_else(|e| panic!("VIP {spec}: {e}"));
        self.balancer
            .add_vip_with_timeout(vip, Some(idle_timeout_s))
            .unwrap_or_else(|e| panic!("add VIP {vip}: {}", chain(&e)));
        vip
    }

    /// Changes a running VIP's idle timeout.
    ///
    /// # Panics
    /// The balancer refusing it.
    pub fn set_idle_timeout(&mut self, vip: &VipSpec, idle_timeout_s: u32) {
        self.balancer
            .set_vip_idle_timeout(vip, Some(idle_timeout_s))
            .unwrap_or_else(|e| panic!("idle timeout of {vip}: {}", chain(&e)));
    }

    /// The connection-table entry of the flow `client → vip`, if any.
    ///
    /// # Panics
    /// The map read failing.
    #[must_use]
    pub fn flow_state(&self, client: SocketAddr, vip: &VipSpec) -> Option<FlowState> {
        let key = FlowKey::new(client, vip.addr, vip.proto.number());
        self.balancer
            .datapath()
            .flow(&key)
            .unwrap_or_else(|e| panic!("reading the entry of {client} -> {vip}: {}", chain(&e)))
    }

    /// The handshake record of `client → vip` (a SYN's, until the connection's next packet
    /// creates its entry), if there is one.
    ///
    /// # Panics
    /// The map read failing.
    #[must_use]
    pub fn handshake_state(&self, client: SocketAddr, vip: &VipSpec) -> Option<FlowState> {
        let key = FlowKey::new(client, vip.addr, vip.proto.number());
        let table = self
            .balancer
            .datapath()
            .handshakes()
            .unwrap_or_else(|e| panic!("the handshake table: {}", chain(&e)));
        match table.get(&key, 0) {
            Ok(state) => Some(state),
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(e) => panic!("reading the handshake of {client} -> {vip}: {}", chain(&e)),
        }
    }

    /// Makes the flow `client → vip` look as if its last packet was `idle` ago, the way time
    /// would (the data plane reads `CLOCK_MONOTONIC_COARSE`).
    ///
    /// # Panics
    /// No such entry, or the map update failing.
    pub fn age_flow(&mut self, client: SocketAddr, vip: &VipSpec, idle: Duration) {
        let mut state = self
            .flow_state(client, vip)
            .unwrap_or_else(|| panic!("no connection-table entry for {client} -> {vip}"));
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
            .expect("CLOCK_MONOTONIC_COARSE");
        let now_ns = u64::try_from(Duration::from(now).as_nanos()).expect("u64 nanoseconds");
        state.last_seen_ns = now_ns - u64::try_from(idle.as_nanos()).expect("u64 nanoseconds");
        let key = FlowKey::new(client, vip.addr, vip.proto.number());
        self.balancer
            .datapath_mut()
            .set_flow(&key, &state)
            .unwrap_or_else(|e| panic!("ageing {client} -> {vip}: {}", chain(&e)));
    }

    /// # Panics
    /// The balancer refusing the backend.
    pub fn add_backend(&mut self, vip: &VipSpec, backend: SocketAddr, weight: u32) {
        self.balancer
            .add_backend(vip, backend, weight)
            .unwrap_or_else(|e| panic!("add backend {backend} to {vip}: {}", chain(&e)));
    }

    /// # Panics
    /// The balancer refusing the removal.
    pub fn remove_backend(&mut self, vip: &VipSpec, backend: SocketAddr) {
        self.balancer
            .remove_backend(vip, backend)
            .unwrap_or_else(|e| panic!("remove backend {backend} from {vip}: {}", chain(&e)));
    }

    /// The backend `Balancer::explain` says a new flow from `client` gets.
    ///
    /// # Panics
    /// `explain` failing or naming no backend.
    #[must_use]
    pub fn new_flow_backend(&self, client: SocketAddr, vip: &VipSpec) -> SocketAddr {
        self.explain(client, vip)
            .0
            .unwrap_or_else(|| panic!("explain: no backend for a new flow {client} -> {vip}"))
    }

    /// `(new_flow_backend, tracked_backend)` as `Balancer::explain` reports them.
    ///
    /// # Panics
    /// `explain` failing.
    #[must_use]
    pub fn explain(
        &self,
        client: SocketAddr,
        vip: &VipSpec,
    ) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let e = self
            .balancer
            .explain(client, vip)
            .unwrap_or_else(|e| panic!("explain {client} -> {vip}: {}", chain(&e)));
        (e.new_flow_backend, e.tracked_backend)
    }

    /// The global counters, indexed by `Counter as usize`.
    ///
    /// # Panics
    /// The map read failing.
    #[must_use]
    pub fn counters(&self) -> Vec<u64> {
        let all = self
            .balancer
            .datapath()
            .global_counters()
            .unwrap_or_else(|e| panic!("reading the global counters: {}", chain(&e)));
        assert_eq!(all.len(), Counter::ALL.len());
        for (i, (c, _)) in all.iter().enumerate() {
            assert_eq!(
                *c as usize, i,
                "global_counters() out of Counter::ALL order"
            );
        }
        all.into_iter().map(|(_, v)| v).collect()
    }

    /// Runs the program once on `frame` (repeat = 1: it rewrites in place) and returns the
    /// raw verdict and the output frame.
    ///
    /// # Panics
    /// The kernel refusing the test run.
    #[must_use]
    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(frame, None)
    }

    /// As [`Self::run`], with the frame arriving on `ingress` (an interface of the calling
    /// thread's namespace) instead of `lo`: the kernel takes `xdp_md.ingress_ifindex` from
    /// the context passed in (`ctx_in`).
    ///
    /// # Panics
    /// The kernel refusing the test run.
    #[must_use]
    pub fn run_on(&self, frame: &[u8], ingress: Option<u32>) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 512];
        let (action, len) = match ingress {
            None => {
                let r = self
                    .balancer
                    .datapath()
                    .test_run(program_names::XLB, frame, &mut out, 1)
                    .unwrap_or_else(|e| panic!("test_run on {}: {}", hex(frame), chain(&e)));
                (r.action, r.len)
            }
            Some(ifindex) => {
                let ctx = xdp_md(frame.len(), ifindex);
                let xdp = self
                    .balancer
                    .datapath()
                    .program(program_names::XLB)
                    .unwrap_or_else(|e| panic!("the xlb program: {}", chain(&e)));
                let r = xdp
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut out),
                        ctx_in: Some(&ctx),
                        repeat: 1,
                        ..TestRunOptions::new()
                    })
                    .unwrap_or_else(|e| {
                        panic!(
                            "test_run on ifindex {ifindex} with {}: {}",
                            hex(frame),
                            chain(&e)
                        )
                    });
                (r.return_value, r.data_size_out as usize)
            }
        };
        assert!(len <= out.len(), "test_run reported {len} bytes");
        out.truncate(len);
        (action, out)
    }

    /// Loads the TC classifier, for [`Self::run_tc_on`].
    ///
    /// # Panics
    /// The verifier rejecting it.
    pub fn load_tc(&mut self) {
        self.balancer
            .datapath_mut()
            .load_classifier()
            .unwrap_or_else(|e| panic!("loading the TC program: {}", chain(&e)));
    }

    /// As [`Self::run_on`], through the TC hook (loaded with [`Self::load_tc`]): the frame
    /// becomes a socket buffer arriving on `ingress`. The verdict is returned as the XDP
    /// action it stands for (the program counts it under that action too). `None`: the
    /// kernel builds no socket buffer from this frame (`EINVAL`, e.g. an IPv6 frame cut
    /// inside its header), so the program never sees it.
    ///
    /// # Panics
    /// The kernel refusing the test run otherwise.
    #[must_use]
    pub fn run_tc_on(&self, frame: &[u8], ingress: u32) -> Option<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 512];
        let tc = self
            .balancer
            .datapath()
            .classifier()
            .unwrap_or_else(|e| panic!("the TC program: {}", chain(&e)));
        let ctx = sk_buff(ingress);
        let r = tc.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..TestRunOptions::new()
        });
        let r = match r {
            Ok(r) => r,
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(nix::libc::EINVAL) =>
            {
                return None;
            }
            Err(e) => panic!("TC test_run with {}: {}", hex(frame), chain(&e)),
        };
        let action = match r.return_value {
            TC_ACT_OK => Action::Pass,
            TC_ACT_SHOT => Action::Drop,
            TC_ACT_REDIRECT => Action::Redirect,
            _ => Action::Aborted,
        };
        let len = r.data_size_out as usize;
        assert!(len <= out.len(), "test_run reported {len} bytes");
        out.truncate(len);
        Some((action as u32, out))
    }

    /// Runs `frame`, arriving on `ingress`, through `hook` (TC once loaded with
    /// [`Self::load_tc`]). `None` as from [`Self::run_tc_on`]: no socket buffer for it.
    ///
    /// # Panics
    /// As [`Self::run_on`] and [`Self::run_tc_on`].
    #[must_use]
    pub fn run_at(&self, hook: Hook, frame: &[u8], ingress: u32) -> Option<(u32, Vec<u8>)> {
        match hook {
            Hook::Xdp => Some(self.run_on(frame, Some(ingress))),
            Hook::Tc => self.run_tc_on(frame, ingress),
        }
    }

    /// Runs one case and describes every way it went wrong.
    ///
    /// # Errors
    /// A description of the mismatches.
    pub fn check(&self, case: &Case) -> Result<(), String> {
        let before = self.counters();
        let (raw, out) = self.run_on(&case.input, case.ingress);
        let after = self.counters();
        let mut problems = String::new();

        let action = Action::from_raw(raw);
        if action != Some(case.action) {
            let _ = write!(
                problems,
                "\n  action: got {action:?} ({raw}), want {:?}",
                case.action
            );
        }

        let want_out = match &case.output {
            Expect::Unmodified => &case.input,
            Expect::Frame(f) => f,
        };
        if out != *want_out {
            let at = out.iter().zip(want_out).position(|(a, b)| a != b);
            let _ = write!(
                problems,
                "\n  output differs (first at byte {at:?})\n  got {}\n  want {}\n  input {}",
                hex(&out),
                hex(want_out),
                hex(&case.input)
            );
        } else if matches!(case.output, Expect::Frame(_)) {
            // Byte equality with an etherparse-built frame already implies valid checksums;
            // this checks the output itself, independently of how the fixture was made.
            if let Err(e) = verify_checksums(&out) {
                let _ = write!(problems, "\n  {e}");
            }
        }

        let mut want = vec![0u64; Counter::ALL.len()];
        want[case.action.counter() as usize] += 1;
        for c in &case.counters {
            want[*c as usize] += 1;
        }
        let got: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        if got != want {
            let show = |v: &[u64]| {
                Counter::ALL
                    .iter()
                    .zip(v)
                    .filter(|(_, n)| **n != 0)
                    .map(|(c, n)| format!("{}+{n}", c.name()))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let _ = write!(
                problems,
                "\n  counters: got [{}], want [{}]",
                show(&got),
                show(&want)
            );
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("case '{}':{problems}", case.name))
        }
    }

    /// Runs one case; panics with every mismatch.
    ///
    /// # Panics
    /// The case failing.
    pub fn assert(&self, case: &Case) {
        if let Err(e) = self.check(case) {
            panic!("{e}");
        }
    }

    /// Runs a table of cases in order; panics listing every failing case.
    ///
    /// # Panics
    /// Any case failing.
    pub fn assert_all(&self, cases: &[Case]) {
        let failures: Vec<String> = cases.iter().filter_map(|c| self.check(c).err()).collect();
        assert!(
            failures.is_empty(),
            "{} of {} golden cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
}

/// A `struct xdp_md` for test_run's `ctx_in`: the frame spans `[0, len)`, no metadata, and
/// it arrives on `ingress_ifindex` (RX queue 0).
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// A `struct __sk_buff` for a TC test run: the packet arrived on `ifindex` (its
/// `ingress_ifindex` and `ifindex`, at bytes 36 and 40); every other field zero, as the
/// kernel requires of the ones it does not take.
fn sk_buff(ifindex: u32) -> [u8; 192] {
    let mut ctx = [0u8; 192];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

fn xdp_md(len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let fields: [u32; 6] = [
        0,                                         // data
        u32::try_from(len).expect("frame length"), // data_end
        0,                                         // data_meta
        ingress_ifindex,                           // ingress_ifindex
        0,                                         // rx_queue_index
        0,                                         // egress_ifindex (must be 0)
    ];
    let mut ctx = [0u8; 24];
    for (chunk, field) in ctx.as_chunks_mut::<4>().0.iter_mut().zip(fields) {
        *chunk = field.to_ne_bytes();
    }
    ctx
}

/// An error and its sources, on one line.
#[must_use]
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let _ = write!(s, ": {cause}");
        source = cause.source();
    }
    s
}
