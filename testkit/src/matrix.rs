//! A connectivity matrix: for each (from pod, target) pair and address family, what real traffic
//! did ([`Verdict`]) next to what the reference evaluation of the SecurityGroups says it should
//! do. The end-to-end tests assert that the two agree everywhere; the demo prints it for people,
//! with the cells that changed since the previous matrix marked.
//!
//! Probing is [`crate::cluster::LocalCluster::matrix`]'s job; this module holds the result, its
//! comparison and its rendering.

use std::{collections::BTreeMap, fmt::Write as _};

use crate::probe::{Probe, Verdict};

/// A column: a probe to one pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// The pod probed.
    pub pod: String,
    /// How.
    pub probe: Probe,
}

impl Target {
    /// A TCP connection to `pod`:`port`.
    pub fn tcp(pod: &str, port: u16) -> Target {
        Target {
            pod: pod.to_owned(),
            probe: Probe::Tcp(port),
        }
    }

    /// A UDP request to `pod`:`port`.
    pub fn udp(pod: &str, port: u16) -> Target {
        Target {
            pod: pod.to_owned(),
            probe: Probe::Udp(port),
        }
    }

    /// An ICMP echo to `pod`.
    pub fn ping(pod: &str) -> Target {
        Target {
            pod: pod.to_owned(),
            probe: Probe::Ping,
        }
    }

    /// `pod:port/proto` (`pod:ping`).
    pub fn label(&self) -> String {
        format!("{}:{}", self.pod, self.probe)
    }
}

/// One probe's outcome and the reference's verdict for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cell {
    /// What the traffic did.
    pub observed: Verdict,
    /// What the reference evaluation says.
    pub expected: Verdict,
}

/// A cell's key: (row, column, IPv6?).
pub type CellKey = (usize, usize, bool);

/// The matrix: rows are pods that open connections, columns the targets, each cell probed once
/// per address family. A pod does not probe itself (its traffic never leaves its namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix {
    /// The pods that open connections.
    pub rows: Vec<String>,
    /// The targets.
    pub columns: Vec<Target>,
    /// The probed cells.
    pub cells: BTreeMap<CellKey, Cell>,
}

/// One disagreement between traffic and the reference, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The pod that opened the connection.
    pub from: String,
    /// The target.
    pub to: Target,
    /// IPv6?
    pub v6: bool,
    /// The verdicts.
    pub cell: Cell,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {} ({}): traffic {}, reference {}",
            self.from,
            self.to.label(),
            if self.v6 { "IPv6" } else { "IPv4" },
            self.cell.observed,
            self.cell.expected
        )
    }
}

impl Matrix {
    /// Every cell where traffic and the reference disagree.
    pub fn mismatches(&self) -> Vec<Mismatch> {
        self.cells
            .iter()
            .filter(|(_, c)| c.observed != c.expected)
            .map(|(&(r, col, v6), &cell)| Mismatch {
                from: self.rows[r].clone(),
                to: self.columns[col].clone(),
                v6,
                cell,
            })
            .collect()
    }

    /// The observed verdicts of (row, column) across the families probed; `None` when the cell
    /// was not probed (a pod and itself).
    fn observed(&self, row: usize, col: usize) -> Option<Vec<Verdict>> {
        let v: Vec<Verdict> = [false, true]
            .iter()
            .filter_map(|v6| self.cells.get(&(row, col, *v6)).map(|c| c.observed))
            .collect();
        (!v.is_empty()).then_some(v)
    }

    fn agrees(&self, row: usize, col: usize) -> bool {
        [false, true].iter().all(|v6| {
            self.cells
                .get(&(row, col, *v6))
                .is_none_or(|c| c.observed == c.expected)
        })
    }

    /// The observed verdict of `from` → `to` (families agreeing), if probed.
    pub fn verdict(&self, from: &str, to: &Target) -> Option<Verdict> {
        let row = self.rows.iter().position(|r| r == from)?;
        let col = self.columns.iter().position(|c| c == to)?;
        let v = self.observed(row, col)?;
        v.iter().all(|x| *x == v[0]).then_some(v[0])
    }

    /// (from, target) pairs whose observed verdicts differ from `before`'s.
    pub fn changes_since(&self, before: &Matrix) -> Vec<(String, Target)> {
        let mut out = Vec::new();
        for (r, from) in self.rows.iter().enumerate() {
            for (c, to) in self.columns.iter().enumerate() {
                let now = self.observed(r, c);
                let then = before
                    .rows
                    .iter()
                    .position(|x| x == from)
                    .zip(before.columns.iter().position(|x| x == to))
                    .and_then(|(br, bc)| before.observed(br, bc));
                if now != then {
                    out.push((from.clone(), to.clone()));
                }
            }
        }
        out
    }

    /// The matrix as a table for people: `✓` allowed, `✗` refused, `·` not probed (a pod and
    /// itself); `!` marks a cell where traffic and the reference disagree, `*` (and, with
    /// `color`, reverse video) one that changed since `before`. A cell probed over IPv4 and
    /// IPv6 shows one sign when both agree, `✓/✗` otherwise.
    pub fn render(&self, before: Option<&Matrix>, color: bool) -> String {
        let changed: Vec<(String, Target)> =
            before.map(|b| self.changes_since(b)).unwrap_or_default();
        let row_width = self
            .rows
            .iter()
            .map(|r| r.chars().count())
            .max()
            .unwrap_or(0)
            .max("from \\ to".len());
        let widths: Vec<usize> = self
            .columns
            .iter()
            .map(|c| c.label().chars().count().max(5))
            .collect();
        let mut s = String::new();
        let _ = write!(s, "{:<row_width$}", "from \\ to");
        for (c, w) in self.columns.iter().zip(&widths) {
            let _ = write!(s, "  {:^w$}", c.label());
        }
        s.push('\n');
        for (r, from) in self.rows.iter().enumerate() {
            let _ = write!(s, "{from:<row_width$}");
            for (c, w) in widths.iter().enumerate() {
                let mut text = match self.observed(r, c) {
                    None => "·".to_owned(),
                    Some(v) if v.iter().all(|x| *x == v[0]) => sign(v[0]).to_owned(),
                    Some(v) => v.iter().map(|x| sign(*x)).collect::<Vec<_>>().join("/"),
                };
                if !self.agrees(r, c) {
                    text.push('!');
                }
                let is_changed = changed
                    .iter()
                    .any(|(f, t)| f == from && *t == self.columns[c]);
                if is_changed {
                    text.push('*');
                }
                let pad = w.saturating_sub(text.chars().count());
                let (left, right) = (pad / 2, pad - pad / 2);
                let _ = write!(s, "  {}", " ".repeat(left));
                if is_changed && color {
                    let _ = write!(s, "\x1b[7m{text}\x1b[0m");
                } else {
                    s.push_str(&text);
                }
                s.push_str(&" ".repeat(right));
            }
            s.push('\n');
        }
        s
    }
}

fn sign(v: Verdict) -> &'static str {
    match v {
        Verdict::Allowed => "✓",
        Verdict::Refused => "✗",
    }
}
