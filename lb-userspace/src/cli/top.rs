//! `xlb top`: a live terminal view of the VIPs and their backends, with rates, health, ring
//! slots and live flows, sortable (ratatui). `xlb stats --watch` stays the view for scripts.

use std::{
    collections::BTreeMap,
    io::IsTerminal as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use lb_userspace::{
    api::Client,
    balancer::{BackendState, Forwarding, VipSpec, VipStatus},
};
use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    widgets::{Block, Paragraph, Row, Table},
};

#[derive(clap::Args)]
pub struct TopArgs {
    /// Seconds between two refreshes (rates are over that interval).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=60))]
    interval: u64,
}

/// What the rows are ordered by (`s` steps through them): VIPs by their own figure, each
/// VIP's backends under it by theirs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SortBy {
    Address,
    Packets,
    Bytes,
    NewFlows,
    LiveFlows,
}

impl SortBy {
    const fn next(self) -> Self {
        match self {
            Self::Address => Self::Packets,
            Self::Packets => Self::Bytes,
            Self::Bytes => Self::NewFlows,
            Self::NewFlows => Self::LiveFlows,
            Self::LiveFlows => Self::Address,
        }
    }

    const fn label(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::Packets => "packets/s",
            Self::Bytes => "bytes/s",
            Self::NewFlows => "new flows/s",
            Self::LiveFlows => "live flows",
        }
    }
}

/// One line of the view: a VIP, or one of its backends.
#[derive(Clone, Debug, PartialEq)]
struct Line {
    vip: VipSpec,
    /// How the VIP reaches its backends: shown on the VIP's line when not NAT.
    forwarding: Forwarding,
    backend: Option<SocketAddr>,
    /// The container a backend is, by name.
    container: Option<String>,
    weight: Option<u32>,
    state: String,
    health: String,
    slots: Option<u32>,
    packets_per_s: f64,
    bytes_per_s: f64,
    new_flows_per_s: f64,
    live_flows: u64,
}

impl Line {
    fn key(&self, sort: SortBy) -> f64 {
        match sort {
            SortBy::Address => 0.0,
            SortBy::Packets => self.packets_per_s,
            SortBy::Bytes => self.bytes_per_s,
            SortBy::NewFlows => self.new_flows_per_s,
            #[expect(clippy::cast_precision_loss, reason = "an ordering key")]
            SortBy::LiveFlows => self.live_flows as f64,
        }
    }
}

/// Counter growth per second between two snapshots (none before: zero).
fn rate(now: u64, before: Option<u64>, secs: f64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a rate on screen")]
    before.map_or(0.0, |b| now.saturating_sub(b) as f64 / secs)
}

/// The view's lines: each VIP followed by its backends, in `sort`'s order (largest first;
/// by address ascending), with rates over the `secs` since `before`.
fn lines(before: &[VipStatus], now: &[VipStatus], secs: f64, sort: SortBy) -> Vec<Line> {
    let old_vips: BTreeMap<VipSpec, &VipStatus> = before.iter().map(|v| (v.vip, v)).collect();
    let order = |a: &Line, b: &Line| match sort {
        SortBy::Address => (a.vip, a.backend).cmp(&(b.vip, b.backend)),
        _ => b.key(sort).total_cmp(&a.key(sort)),
    };
    let mut groups: Vec<(Line, Vec<Line>)> = now
        .iter()
        .map(|v| {
            let was = old_vips.get(&v.vip);
            let old_backend =
                |addr: SocketAddr| was.and_then(|w| w.backends.iter().find(|b| b.addr == addr));
            let mut backends: Vec<Line> =
                v.backends
                    .iter()
                    .map(|b| {
                        let old = old_backend(b.addr);
                        Line {
                            vip: v.vip,
                            forwarding: v.forwarding,
                            backend: Some(b.addr),
                            container: b.container.clone(),
                            weight: Some(b.weight),
                            state: match (b.container_running, b.state, b.weight) {
                                (Some(false), _, _) => "stopped".to_owned(),
                                (_, BackendState::Draining, _) => "draining".to_owned(),
                                (_, BackendState::Active, 0) => "weight 0".to_owned(),
                                (_, BackendState::Active, _) => "active".to_owned(),
                            },
                            health: match (&b.health, b.healthy) {
                                (_, false) => b.health.as_ref().map_or("down".to_owned(), |h| {
                                    format!("down: {}", h.last_result)
                                }),
                                (Some(_), true) => "up".to_owned(),
                                (None, true) => "-".to_owned(),
                            },
                            slots: Some(b.slots),
                            packets_per_s: rate(b.packets, old.map(|o| o.packets), secs),
                            bytes_per_s: rate(b.bytes, old.map(|o| o.bytes), secs),
                            new_flows_per_s: rate(b.new_flows, old.map(|o| o.new_flows), secs),
                            live_flows: b.live_flows.unwrap_or(0),
                        }
                    })
                    .collect();
            backends.sort_by(order);
            let down = v.backends.iter().filter(|b| !b.healthy).count();
            let vip = Line {
                vip: v.vip,
                forwarding: v.forwarding,
                backend: None,
                container: None,
                weight: None,
                state: format!("{} backends", v.backends.len()),
                health: if down > 0 {
                    format!("{down} down")
                } else {
                    String::new()
                },
                slots: None,
                packets_per_s: rate(v.packets, was.map(|w| w.packets), secs),
                bytes_per_s: rate(v.bytes, was.map(|w| w.bytes), secs),
                new_flows_per_s: rate(v.new_flows, was.map(|w| w.new_flows), secs),
                live_flows: backends.iter().map(|b| b.live_flows).sum(),
            };
            (vip, backends)
        })
        .collect();
    groups.sort_by(|(a, _), (b, _)| order(a, b));
    groups
        .into_iter()
        .flat_map(|(vip, backends)| std::iter::once(vip).chain(backends))
        .collect()
}

/// `1234567` as `1.2M`, for a column of rates.
fn short(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e4 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn draw(frame: &mut Frame<'_>, lines: &[Line], sort: SortBy, note: &str) {
    let [table_area, footer] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1)]).areas(frame.area());
    let header = Row::new([
        "VIP / BACKEND",
        "WEIGHT",
        "STATE",
        "SLOTS",
        "PKT/S",
        "BYTES/S",
        "NEW/S",
        "LIVE",
        "HEALTH",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = lines.iter().map(|l| {
        let name = match (l.backend, &l.container) {
            (None, _) if l.forwarding.is_dsr() => {
                format!("{} {}", l.vip, l.forwarding.describe())
            }
            (None, _) => l.vip.to_string(),
            (Some(b), None) => format!("  {b}"),
            (Some(b), Some(c)) => format!("  {b} ({c})"),
        };
        let row = Row::new([
            name,
            l.weight.map_or(String::new(), |w| w.to_string()),
            l.state.clone(),
            l.slots.map_or(String::new(), |s| s.to_string()),
            short(l.packets_per_s),
            short(l.bytes_per_s),
            short(l.new_flows_per_s),
            l.live_flows.to_string(),
            l.health.clone(),
        ]);
        if l.backend.is_none() {
            row.style(Style::new().add_modifier(Modifier::BOLD))
        } else {
            row
        }
    });
    let widths = [
        Constraint::Min(28),
        Constraint::Length(6),
        Constraint::Length(11),
        Constraint::Length(6),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Min(8),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::bordered().title(format!(" xlb top: sorted by {} ", sort.label())));
    frame.render_widget(table, table_area);
    frame.render_widget(
        Paragraph::new(format!("s: sort by the next column   q: quit   {note}")),
        footer,
    );
}

/// The VIPs with each backend's live flows counted (`backend list` walks the connection
/// table for them; `stats` does not).
fn snapshot(client: Client<'_>) -> Result<Vec<VipStatus>> {
    let vips = client.stats()?.vips;
    vips.into_iter()
        .map(|v| {
            let flows = client.backend_list(v.vip)?;
            Ok(VipStatus {
                backends: v
                    .backends
                    .into_iter()
                    .map(|mut b| {
                        b.live_flows = flows
                            .backends
                            .iter()
                            .find(|f| f.addr == b.addr)
                            .and_then(|f| f.live_flows);
                        b
                    })
                    .collect(),
                ..v
            })
        })
        .collect()
}

pub fn run(client: Client<'_>, TopArgs { interval }: TopArgs) -> Result<()> {
    if !std::io::stdout().is_terminal() {
        bail!(
            "xlb top draws on a terminal and stdout is not one: for pipes and scripts use `xlb stats --watch` or `xlb stats --json`"
        );
    }
    // Fails here, before the screen is taken over, when no agent answers.
    let mut before = snapshot(client)?;
    let mut taken = Instant::now();
    let mut terminal = ratatui::init();
    let result = (|| -> Result<()> {
        let interval = Duration::from_secs(interval);
        let mut sort = SortBy::Address;
        let mut shown = lines(&before, &before, 1.0, sort);
        let mut note = String::from("rates from the next refresh on");
        let mut next = Instant::now() + interval;
        loop {
            terminal.draw(|frame| draw(frame, &shown, sort, &note))?;
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait)? {
                if let Event::Key(key) = event::read()?
                    && key.kind == KeyEventKind::Press
                {
                    match key.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('s') => {
                            sort = sort.next();
                            shown.clear();
                            next = Instant::now();
                        }
                        _ => {}
                    }
                }
                continue;
            }
            next = Instant::now() + interval;
            match snapshot(client) {
                Ok(now) => {
                    let secs = taken.elapsed().as_secs_f64().max(0.001);
                    shown = lines(&before, &now, secs, sort);
                    before = now;
                    taken = Instant::now();
                    note.clear();
                }
                // The agent restarting: keep the last view, say so, keep trying.
                Err(e) => note = format!("agent unreachable ({e:#}): retrying"),
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use lb_userspace::balancer::BackendStatus;
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;

    fn vip(spec: &str, packets: u64, backends: &[(&str, u32, u64, bool)]) -> VipStatus {
        VipStatus {
            vip: spec.parse().unwrap(),
            id: 0,
            ring_size: 13,
            idle_timeout_s: 300,
            forwarding: Forwarding::Nat,
            health_check: None,
            packets,
            bytes: packets * 100,
            new_flows: packets / 10,
            backends: backends
                .iter()
                .map(|(addr, weight, packets, healthy)| BackendStatus {
                    addr: addr.parse().unwrap(),
                    id: 0,
                    weight: *weight,
                    state: BackendState::Active,
                    healthy: *healthy,
                    health: None,
                    slots: 1,
                    packets: *packets,
                    bytes: packets * 100,
                    new_flows: packets / 10,
                    live_flows: Some(*packets / 100),
                    container: None,
                    container_running: None,
                })
                .collect(),
        }
    }

    #[test]
    fn rates_are_counter_growth_per_second_and_sorting_keeps_backends_under_their_vip() {
        let before = [
            vip(
                "10.0.0.1:80/tcp",
                1000,
                &[("10.1.0.1:80", 1, 600, true), ("10.1.0.2:80", 1, 400, true)],
            ),
            vip("10.0.0.2:80/tcp", 0, &[("10.2.0.1:80", 0, 0, false)]),
        ];
        let now = [
            vip(
                "10.0.0.1:80/tcp",
                3000,
                &[
                    ("10.1.0.1:80", 1, 800, true),
                    ("10.1.0.2:80", 1, 2200, true),
                ],
            ),
            vip("10.0.0.2:80/tcp", 5000, &[("10.2.0.1:80", 0, 5000, false)]),
        ];
        let by_address = lines(&before, &now, 2.0, SortBy::Address);
        let names: Vec<String> = by_address
            .iter()
            .map(|l| l.backend.map_or(l.vip.to_string(), |b| b.to_string()))
            .collect();
        assert_eq!(
            names,
            [
                "10.0.0.1:80/tcp",
                "10.1.0.1:80",
                "10.1.0.2:80",
                "10.0.0.2:80/tcp",
                "10.2.0.1:80"
            ]
        );
        assert_eq!(by_address[0].packets_per_s, 1000.0);
        assert_eq!(by_address[1].packets_per_s, 100.0);
        assert_eq!(by_address[2].bytes_per_s, 90_000.0);
        assert_eq!(by_address[4].state, "weight 0");
        assert_eq!(by_address[3].health, "1 down");
        let by_packets = lines(&before, &now, 2.0, SortBy::Packets);
        let names: Vec<String> = by_packets
            .iter()
            .map(|l| l.backend.map_or(l.vip.to_string(), |b| b.to_string()))
            .collect();
        assert_eq!(
            names,
            [
                "10.0.0.2:80/tcp",
                "10.2.0.1:80",
                "10.0.0.1:80/tcp",
                "10.1.0.2:80",
                "10.1.0.1:80"
            ]
        );
        // A VIP that is new since the last snapshot shows no rate yet, not its total.
        let fresh = lines(&before[..1], &now, 2.0, SortBy::Address);
        assert_eq!(fresh[3].packets_per_s, 0.0);
    }

    /// The view as a 110x8 terminal shows it.
    fn rendered(shown: &[Line], sort: SortBy) -> String {
        let mut terminal = Terminal::new(TestBackend::new(110, 8)).unwrap();
        terminal.draw(|f| draw(f, shown, sort, "")).unwrap();
        terminal
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect()
    }

    #[test]
    fn the_view_shows_every_line_and_the_sort() {
        let before = [vip("10.0.0.1:80/tcp", 0, &[("10.1.0.1:80", 3, 0, true)])];
        let now = [vip(
            "10.0.0.1:80/tcp",
            20_000,
            &[("10.1.0.1:80", 3, 20_000, true)],
        )];
        let shown = lines(&before, &now, 1.0, SortBy::Bytes);
        let screen = rendered(&shown, SortBy::Bytes);
        for needle in [
            "sorted by bytes/s",
            "10.0.0.1:80/tcp",
            "10.1.0.1:80",
            "2.0M",
            "20.0k",
            "200",
            "q: quit",
        ] {
            assert!(screen.contains(needle), "{needle} missing from:\n{screen}");
        }
    }

    /// A container backend shows its name, and "stopped" while its container is down.
    #[test]
    fn a_container_backend_shows_its_name_and_a_stopped_container_says_so() {
        let mut now = vip("10.0.0.1:80/tcp", 0, &[("10.1.0.1:80", 1, 0, true)]);
        now.backends[0].container = Some("web-1".into());
        now.backends[0].container_running = Some(false);
        let shown = lines(&[], &[now], 1.0, SortBy::Address);
        assert_eq!(shown[1].state, "stopped");
        let screen = rendered(&shown, SortBy::Address);
        assert!(screen.contains("10.1.0.1:80 (web-1)"), "{screen}");
        assert!(screen.contains("stopped"), "{screen}");
    }

    /// A direct-server-return VIP says so on its line; a NAT VIP's line stays as it was.
    #[test]
    fn a_dsr_vip_shows_its_forwarding_method() {
        let mut dsr = vip("10.0.0.2:443/tcp", 0, &[("10.1.0.5:443", 1, 0, true)]);
        dsr.forwarding = Forwarding::Gue;
        let nat = vip("10.0.0.1:80/tcp", 0, &[("10.1.0.1:80", 1, 0, true)]);
        let shown = lines(&[], &[nat, dsr], 1.0, SortBy::Address);
        let screen = rendered(&shown, SortBy::Address);
        assert!(screen.contains("10.0.0.2:443/tcp dsr/gue"), "{screen}");
        assert!(!screen.contains("10.0.0.1:80/tcp nat"), "{screen}");
    }
}
