//! What the demo prints about traffic: who served how much, and which flows moved. Pure, so
//! the arithmetic and the layout are unit-tested without namespaces or an agent.

use std::{collections::BTreeMap, fmt::Write as _};

/// One line of the "who served" table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub service: String,
    pub vip: String,
    pub container: String,
    pub served: usize,
    /// Requests sent to this VIP, for the share column.
    pub total: usize,
}

/// Counts answers per container, in the order `containers` lists them (so replicas that
/// served nothing still get a row), then any unexpected names alphabetically.
#[must_use]
pub fn tally(answers: &[String], containers: &[&str]) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for a in answers {
        *counts.entry(a.as_str()).or_default() += 1;
    }
    let mut out: Vec<(String, usize)> = containers
        .iter()
        .map(|c| ((*c).to_owned(), counts.remove(c).unwrap_or(0)))
        .collect();
    out.extend(counts.into_iter().map(|(c, n)| (c.to_owned(), n)));
    out
}

const BAR_WIDTH: usize = 30;

/// Renders rows as an aligned table with a share bar; the service and VIP are only written on
/// the first row of each group.
#[must_use]
pub fn render_table(rows: &[Row]) -> String {
    let headers = ["service", "VIP", "container", "served", "share"];
    let w_service = col_width(headers[0], rows.iter().map(|r| r.service.len()));
    let w_vip = col_width(headers[1], rows.iter().map(|r| r.vip.len()));
    let w_container = col_width(headers[2], rows.iter().map(|r| r.container.len()));
    let w_served = col_width(headers[3], rows.iter().map(|r| r.served.to_string().len()));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "    {:<w_service$}  {:<w_vip$}  {:<w_container$}  {:>w_served$}  {}",
        headers[0], headers[1], headers[2], headers[3], headers[4]
    );
    let rule = w_service + w_vip + w_container + w_served + 8 + 5 + 2 + BAR_WIDTH;
    let _ = writeln!(out, "    {}", "-".repeat(rule));
    let mut previous: Option<(&str, &str)> = None;
    for r in rows {
        let group = (r.service.as_str(), r.vip.as_str());
        let (service, vip) = if previous == Some(group) {
            ("", "")
        } else {
            if previous.is_some() {
                out.push('\n');
            }
            group
        };
        previous = Some(group);
        let pct = percent(r.served, r.total);
        let bar = "#".repeat(bar_len(r.served, r.total));
        let _ = writeln!(
            out,
            "    {service:<w_service$}  {vip:<w_vip$}  {:<w_container$}  {:>w_served$}  {pct:>3}%  {bar}",
            r.container, r.served
        );
    }
    out
}

fn col_width(header: &str, cells: impl Iterator<Item = usize>) -> usize {
    cells.fold(header.len(), usize::max)
}

/// `n / total` scaled to `scale`, rounded; 0 when nothing was sent.
fn scaled(n: usize, total: usize, scale: usize) -> usize {
    (n * scale + total / 2).checked_div(total).unwrap_or(0)
}

fn percent(n: usize, total: usize) -> usize {
    scaled(n, total, 100)
}

fn bar_len(n: usize, total: usize) -> usize {
    scaled(n, total, BAR_WIDTH)
}

/// How the flows of a fixed set of source ports changed backends between two rounds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moves {
    pub flows: usize,
    pub moved: usize,
    /// Moved flows that were on the removed replica or are now on the added one: the only moves
    /// Maglev's minimal disruption allows.
    pub explained: usize,
    /// Flows still answered by the removed replica (must be none).
    pub on_removed_after: usize,
    /// `(before, after) -> count` for the moved flows.
    pub pairs: BTreeMap<(String, String), usize>,
}

impl Moves {
    /// Every move involves a changed replica and nothing reaches the removed one.
    #[must_use]
    pub const fn minimal(&self) -> bool {
        self.explained == self.moved && self.on_removed_after == 0
    }
}

/// Compares the answers for the same source ports before and after replacing `removed` by
/// `added`. Both slices are indexed by source port offset.
///
/// # Panics
/// If the rounds have different lengths (a caller bug).
#[must_use]
pub fn compare(before: &[String], after: &[String], removed: &str, added: &str) -> Moves {
    assert_eq!(before.len(), after.len(), "both rounds use the same ports");
    let mut m = Moves {
        flows: before.len(),
        ..Moves::default()
    };
    for (b, a) in before.iter().zip(after) {
        if a == removed {
            m.on_removed_after += 1;
        }
        if a == b {
            continue;
        }
        m.moved += 1;
        if b == removed || a == added {
            m.explained += 1;
        }
        *m.pairs.entry((b.clone(), a.clone())).or_default() += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn tally_keeps_idle_replicas_and_unknown_names() {
        let t = tally(
            &names(&["web-2", "web-2", "zzz", "web-1"]),
            &["web-1", "web-2", "web-3"],
        );
        assert_eq!(
            t,
            vec![
                ("web-1".to_owned(), 1),
                ("web-2".to_owned(), 2),
                ("web-3".to_owned(), 0),
                ("zzz".to_owned(), 1)
            ]
        );
    }

    #[test]
    fn table_groups_and_aligns() {
        let row = |service: &str, container: &str, served| Row {
            service: service.to_owned(),
            vip: format!("{service}-vip"),
            container: container.to_owned(),
            served,
            total: 100,
        };
        let t = render_table(&[
            row("web", "web-1", 34),
            row("web", "web-2", 66),
            row("db", "db-1", 100),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 6, "{t}");
        assert!(lines[0].contains("service") && lines[0].contains("share"));
        assert!(lines[2].starts_with("    web      web-vip  web-1"), "{t}");
        assert!(
            lines[3].starts_with(&format!("{}web-2", " ".repeat(22))),
            "{t}"
        );
        assert!(lines[2].contains(" 34%  ##########"), "{t}");
        assert!(lines[4].is_empty());
        assert!(
            lines[5].contains("100%  ##############################"),
            "{t}"
        );
        // Columns line up: "served" values end where the header ends.
        let end = lines[0].find("served").unwrap() + "served".len();
        assert_eq!(&lines[2][end - 2..end], "34");
        assert_eq!(&lines[5][end - 3..end], "100");
    }

    #[test]
    fn percent_rounds_and_survives_zero() {
        assert_eq!(percent(1, 3), 33);
        assert_eq!(percent(2, 3), 67);
        assert_eq!(percent(0, 0), 0);
        assert_eq!(bar_len(100, 100), BAR_WIDTH);
    }

    #[test]
    fn compare_explains_moves() {
        let before = names(&["web-1", "web-2", "web-3", "web-1", "web-2"]);
        let after = names(&["web-4", "web-2", "web-4", "web-3", "web-2"]);
        let m = compare(&before, &after, "web-1", "web-4");
        assert_eq!(
            (m.flows, m.moved, m.explained, m.on_removed_after),
            (5, 3, 3, 0)
        );
        assert!(m.minimal());
        assert_eq!(m.pairs[&("web-1".to_owned(), "web-4".to_owned())], 1);
        assert_eq!(m.pairs[&("web-1".to_owned(), "web-3".to_owned())], 1);
        assert_eq!(m.pairs[&("web-3".to_owned(), "web-4".to_owned())], 1);
    }

    #[test]
    fn compare_flags_disruption() {
        let m = compare(
            &names(&["web-2", "web-1"]),
            &names(&["web-3", "web-1"]),
            "web-1",
            "web-4",
        );
        assert_eq!((m.moved, m.explained, m.on_removed_after), (1, 0, 1));
        assert!(!m.minimal());
    }
}
