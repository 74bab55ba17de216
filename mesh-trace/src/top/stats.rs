//! Pure helpers of the live view: rates, the dominant hop, sorting,
//! filtering, which columns fit, the bounded history behind the sparklines,
//! and the cells of the table, shared by the terminal UI and `--once`.
//!
//! Nothing here reads a clock or touches the terminal, so all of it is
//! tested directly.
use std::{
    cmp::Ordering,
    collections::{HashMap, VecDeque},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{agent::http::AgentInfo, spans::live::Row};

/// The document of `GET /api/v1/stats`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStats {
    pub agent: AgentInfo,
    pub window_s: f64,
    /// Busiest first, as the agent sends them.
    pub rows: Vec<Row>,
}

/// The hops in request order: `Hop::label()` and the column header. The
/// last one, `upstream`, only exists when the server side runs on another
/// node, so its column is shown only when some row has it.
pub const HOPS: [(&str, &str); 7] = [
    ("client_to_outbound", "app>sc"),
    ("outbound_proxy", "out-sc"),
    ("network", "net"),
    ("inbound_proxy", "in-sc"),
    ("inbound_to_app", "sc>app"),
    ("app", "app"),
    ("upstream", "upstrm"),
];
const CLIENT_TO_OUTBOUND: usize = 0;
const OUTBOUND_PROXY: usize = 1;
const NETWORK: usize = 2;
const INBOUND_PROXY: usize = 3;
const INBOUND_TO_APP: usize = 4;
const APP: usize = 5;
pub const UPSTREAM: usize = 6;

/// (source workload, destination service): what identifies a row across
/// snapshots.
pub type RowKey = (String, String);

pub fn row_key(row: &Row) -> RowKey {
    (row.source_workload.clone(), row.destination_service.clone())
}

pub fn is_row(row: &Row, key: &RowKey) -> bool {
    row.source_workload == key.0 && row.destination_service == key.1
}

/// The median of a hop in a row, when that hop was observed and means
/// something on its own: `upstream` (t9 - t2) is also reported when the
/// server is on this node, where it is just network + inbound sidecar +
/// app, so it only counts for rows where none of those was seen.
pub fn hop_p50(row: &Row, hop: usize) -> Option<f64> {
    if hop == UPSTREAM && SERVER_SIDE.iter().any(|&h| observed_p50(row, h).is_some()) {
        return None;
    }
    observed_p50(row, hop)
}

/// Hops only seen when the server runs on this node.
const SERVER_SIDE: [usize; 4] = [NETWORK, INBOUND_PROXY, INBOUND_TO_APP, APP];

fn observed_p50(row: &Row, hop: usize) -> Option<f64> {
    row.hops
        .get(HOPS[hop].0)
        .filter(|p| p.count > 0)
        .map(|p| p.p50_ms)
}

/// Per-second rate of a monotonic counter between two readings
/// `elapsed` apart. A counter that went down was restarted (the agent came
/// back), so what it counts now all happened since: Prometheus' rule.
/// None when no time passed.
pub fn counter_rate(previous: u64, current: u64, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return None;
    }
    let delta = if current >= previous {
        current - previous
    } else {
        current
    };
    Some(delta as f64 / secs)
}

/// The index in [`HOPS`] of the hop with the largest median in a row: where
/// that pair's time goes. Ties go to the earlier hop; None without hops.
pub fn dominant_hop(row: &Row) -> Option<usize> {
    (0..HOPS.len())
        .filter_map(|i| Some((i, hop_p50(row, i)?)))
        .fold(None, |best: Option<(usize, f64)>, (i, v)| match best {
            Some((_, b)) if v.total_cmp(&b) != Ordering::Greater => best,
            _ => Some((i, v)),
        })
        .map(|(i, _)| i)
}

/// What the table is sorted by; `s` cycles through them in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    Rate,
    Errors,
    P50,
    P90,
    P99,
    Hop(usize),
    Sidecar,
    Name,
}

impl SortKey {
    /// Every key in cycling order (the upstream hop's only when shown).
    fn cycle(upstream: bool) -> Vec<SortKey> {
        let mut keys = vec![
            SortKey::Rate,
            SortKey::Errors,
            SortKey::P50,
            SortKey::P90,
            SortKey::P99,
        ];
        let hops = if upstream { HOPS.len() } else { UPSTREAM };
        keys.extend((0..hops).map(SortKey::Hop));
        keys.extend([SortKey::Sidecar, SortKey::Name]);
        keys
    }

    pub fn next(self, upstream: bool) -> SortKey {
        let keys = SortKey::cycle(upstream);
        let at = keys.iter().position(|&k| k == self).unwrap_or(0);
        keys[(at + 1) % keys.len()]
    }

    /// Numbers sort largest first (the busiest, slowest, most failing rows
    /// are the interesting ones), names alphabetically.
    pub fn descending_by_default(self) -> bool {
        self != SortKey::Name
    }

    /// The column this key sorts, for the indicator in its header.
    pub fn column(self) -> Column {
        match self {
            SortKey::Rate => Column::Rate,
            SortKey::Errors => Column::Errors,
            SortKey::P50 => Column::P50,
            SortKey::P90 => Column::P90,
            SortKey::P99 => Column::P99,
            SortKey::Hop(h) => Column::Hop(h),
            SortKey::Sidecar => Column::Sidecar,
            SortKey::Name => Column::Pair,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            other => other.column().header(),
        }
    }

    fn value(self, row: &Row) -> Option<f64> {
        match self {
            SortKey::Rate => Some(row.rate),
            SortKey::Errors => Some(row.error_rate),
            SortKey::P50 => percentile(row, |p| p.p50_ms),
            SortKey::P90 => percentile(row, |p| p.p90_ms),
            SortKey::P99 => percentile(row, |p| p.p99_ms),
            SortKey::Hop(h) => hop_p50(row, h),
            SortKey::Sidecar => row.sidecar_share,
            SortKey::Name => None,
        }
    }
}

/// A percentile of the total, when any total was observed: a row of
/// requests with no complete span has zeros that are not latencies.
fn percentile(row: &Row, f: impl Fn(&crate::spans::live::Percentiles) -> f64) -> Option<f64> {
    (row.total.count > 0).then(|| f(&row.total))
}

/// Sorts rows by `key`, in its natural direction unless `reversed`. Rows
/// without a value (a hop never observed) come last either way, and ties
/// keep a stable order by name so rows do not jump between refreshes.
pub fn sort_rows(rows: &mut [&Row], key: SortKey, reversed: bool) {
    let descending = key.descending_by_default() != reversed;
    let by_name = |a: &Row, b: &Row| {
        a.source_workload
            .cmp(&b.source_workload)
            .then_with(|| a.destination_service.cmp(&b.destination_service))
    };
    rows.sort_by(|a, b| {
        let primary = match key {
            SortKey::Name => by_name(a, b),
            _ => match (key.value(a), key.value(b)) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                // Present before missing, whatever the direction: undo
                // the reversal below.
                (Some(_), None) => return Ordering::Less,
                (None, Some(_)) => return Ordering::Greater,
                (None, None) => Ordering::Equal,
            },
        };
        let primary = if descending {
            primary.reverse()
        } else {
            primary
        };
        primary.then_with(|| by_name(a, b))
    });
}

/// Whether a row matches the filter: a case-insensitive substring of its
/// source workload or destination service. An empty filter matches all.
pub fn matches_filter(row: &Row, filter: &str) -> bool {
    let filter = filter.trim().to_lowercase();
    filter.is_empty()
        || row.source_workload.to_lowercase().contains(&filter)
        || row.destination_service.to_lowercase().contains(&filter)
}

/// The rows to show: filtered, then sorted.
pub fn visible_rows<'a>(
    rows: &'a [Row],
    filter: &str,
    key: SortKey,
    reversed: bool,
) -> Vec<&'a Row> {
    let mut out: Vec<&Row> = rows.iter().filter(|r| matches_filter(r, filter)).collect();
    sort_rows(&mut out, key, reversed);
    out
}

/// Whether any row has the upstream hop (a server on another node).
pub fn any_upstream(rows: &[&Row]) -> bool {
    rows.iter().any(|r| hop_p50(r, UPSTREAM).is_some())
}

/// A column of the main table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    /// "source -> service".
    Pair,
    Rate,
    Errors,
    P50,
    P90,
    P99,
    Hop(usize),
    Sidecar,
}

/// Narrowest the pair column gets before other columns are dropped.
pub const PAIR_MIN: usize = 20;
/// Widest it gets: past that the space is better left empty.
const PAIR_MAX: usize = 44;

impl Column {
    pub fn header(self) -> &'static str {
        match self {
            Column::Pair => "SOURCE -> SERVICE",
            Column::Rate => "req/s",
            Column::Errors => "err%",
            Column::P50 => "p50",
            Column::P90 => "p90",
            Column::P99 => "p99",
            Column::Hop(h) => HOPS[h].1,
            Column::Sidecar => "side%",
        }
    }

    /// Width of a numeric column (the pair's is computed).
    pub fn width(self) -> usize {
        match self {
            Column::Pair => PAIR_MIN,
            Column::Errors | Column::Sidecar => 5,
            _ => 6,
        }
    }

    pub fn is_numeric(self) -> bool {
        self != Column::Pair
    }
}

/// Every column, in display order.
pub fn all_columns(upstream: bool) -> Vec<Column> {
    let mut cols = vec![
        Column::Pair,
        Column::Rate,
        Column::Errors,
        Column::P50,
        Column::P90,
        Column::P99,
    ];
    let hops = if upstream { HOPS.len() } else { UPSTREAM };
    cols.extend((0..hops).map(Column::Hop));
    cols.push(Column::Sidecar);
    cols
}

/// Columns are dropped in this order when the terminal is too narrow: the
/// least telling first. The hops inside the sidecars and the app stay
/// almost to the end, since they are what the tool is for; the median of
/// the whole request goes last.
const DROP_ORDER: [Column; 13] = [
    Column::P90,
    Column::Sidecar,
    Column::Hop(CLIENT_TO_OUTBOUND),
    Column::Hop(INBOUND_TO_APP),
    Column::P99,
    Column::Errors,
    Column::Hop(NETWORK),
    Column::Hop(UPSTREAM),
    Column::Rate,
    Column::Hop(INBOUND_PROXY),
    Column::Hop(OUTBOUND_PROXY),
    Column::Hop(APP),
    Column::P50,
];

/// The columns that fit in `width` characters (one space between columns),
/// and the width of the pair column, which takes what is left.
#[derive(Clone, Debug, PartialEq)]
pub struct TableLayout {
    pub columns: Vec<Column>,
    pub pair_width: usize,
}

pub fn columns_for_width(width: usize, upstream: bool) -> TableLayout {
    let mut columns = all_columns(upstream);
    let needed = |cols: &[Column]| -> usize {
        cols.iter()
            .map(|c| c.width())
            .sum::<usize>()
            .saturating_add(cols.len().saturating_sub(1))
    };
    for drop in DROP_ORDER {
        if needed(&columns) <= width {
            break;
        }
        columns.retain(|&c| c != drop);
    }
    let others = needed(&columns) - PAIR_MIN;
    let pair_width = width.saturating_sub(others).clamp(PAIR_MIN, PAIR_MAX);
    TableLayout {
        columns,
        pair_width,
    }
}

/// Milliseconds in at most six characters, with the precision that matters
/// at that size.
pub fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() || ms < 0.0 {
        "-".into()
    } else if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else if ms < 100_000.0 {
        format!("{ms:.0}")
    } else {
        format!("{:.0}s", ms / 1000.0)
    }
}

pub fn fmt_rate(rate: f64) -> String {
    if !rate.is_finite() || rate < 0.0 {
        "-".into()
    } else if rate < 1000.0 {
        format!("{rate:.1}")
    } else {
        format!("{rate:.0}")
    }
}

/// A share in 0..=1 as a percentage, without the sign (the header has it).
pub fn fmt_share(share: f64, decimals: usize) -> String {
    if share.is_finite() {
        format!("{:.*}", decimals, share * 100.0)
    } else {
        "-".into()
    }
}

/// "source -> service", cut to `width` characters with an ellipsis.
pub fn pair_label(row: &Row, width: usize) -> String {
    truncate(
        &format!("{} -> {}", row.source_workload, row.destination_service),
        width,
    )
}

pub fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else if width == 0 {
        String::new()
    } else {
        let mut out: String = s.chars().take(width - 1).collect();
        out.push('…');
        out
    }
}

/// The text of one cell.
pub fn cell(row: &Row, column: Column, pair_width: usize) -> String {
    let or_dash = |v: Option<f64>| v.map(fmt_ms).unwrap_or_else(|| "-".into());
    match column {
        Column::Pair => pair_label(row, pair_width),
        Column::Rate => fmt_rate(row.rate),
        Column::Errors => fmt_share(row.error_rate, 1),
        Column::P50 => or_dash(percentile(row, |p| p.p50_ms)),
        Column::P90 => or_dash(percentile(row, |p| p.p90_ms)),
        Column::P99 => or_dash(percentile(row, |p| p.p99_ms)),
        Column::Hop(h) => or_dash(hop_p50(row, h)),
        Column::Sidecar => row
            .sidecar_share
            .map(|s| fmt_share(s, 0))
            .unwrap_or_else(|| "-".into()),
    }
}

/// The table as aligned plain text, every column, for `--once`: the
/// dominant hop of each row is marked with `*` since there is no color.
pub fn plain_table(rows: &[&Row]) -> String {
    let columns = all_columns(any_upstream(rows));
    let pair_width = rows
        .iter()
        .map(|r| pair_label(r, usize::MAX).chars().count())
        .chain([Column::Pair.header().len()])
        .max()
        .unwrap_or(PAIR_MIN);
    let mut lines = Vec::with_capacity(rows.len() + 1);
    let header: Vec<String> = columns
        .iter()
        .map(|&c| pad(c.header(), c, pair_width))
        .collect();
    lines.push(header.join(" "));
    for row in rows {
        let dominant = dominant_hop(row);
        let cells: Vec<String> = columns
            .iter()
            .map(|&c| {
                let mut text = cell(row, c, pair_width);
                if matches!(c, Column::Hop(h) if Some(h) == dominant) {
                    text.push('*');
                }
                pad(&text, c, pair_width)
            })
            .collect();
        lines.push(cells.join(" "));
    }
    let mut out: String = lines
        .iter()
        .map(|l| l.trim_end())
        .collect::<Vec<_>>()
        .join("\n");
    out.push('\n');
    out
}

/// Numbers right-aligned, each followed by its `*` mark or a space; the
/// pair left-aligned.
fn pad(text: &str, column: Column, pair_width: usize) -> String {
    match column {
        Column::Pair => format!("{text:<pair_width$}"),
        // Six characters hold every formatted number and header, plus one
        // for the mark, so that a marked cell does not push the next one.
        _ => match text.strip_suffix('*') {
            Some(bare) => format!("{bare:>6}*"),
            None => format!("{text:>6} "),
        },
    }
}

/// A fixed-capacity ring: pushing past capacity drops the oldest.
#[derive(Clone, Debug)]
pub struct Ring<T> {
    items: VecDeque<T>,
    capacity: usize,
}

impl<T> Ring<T> {
    pub fn new(capacity: usize) -> Ring<T> {
        let capacity = capacity.max(1);
        Ring {
            items: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub fn push(&mut self, item: T) {
        if self.items.len() == self.capacity {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> + ExactSizeIterator {
        self.items.iter()
    }
}

/// One sample of a row: the median of the total and of each hop.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Point {
    pub total_p50: Option<f64>,
    pub hops_p50: [Option<f64>; HOPS.len()],
}

impl Point {
    fn of(row: &Row) -> Point {
        let mut hops_p50 = [None; HOPS.len()];
        for (h, v) in hops_p50.iter_mut().enumerate() {
            *v = hop_p50(row, h);
        }
        Point {
            total_p50: percentile(row, |p| p.p50_ms),
            hops_p50,
        }
    }

    fn is_gap(&self) -> bool {
        *self == Point::default()
    }
}

/// Samples kept per row for the sparklines.
pub const HISTORY_SAMPLES: usize = 120;

/// The last samples of every row seen recently. A row missing from a
/// snapshot gets a gap, so all rows stay aligned in time, and a row whose
/// samples are all gaps is forgotten: memory is bounded by the rows seen
/// in the last `capacity` samples.
#[derive(Debug)]
pub struct History {
    capacity: usize,
    rows: HashMap<RowKey, Ring<Point>>,
}

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            capacity,
            rows: HashMap::new(),
        }
    }

    pub fn record(&mut self, rows: &[Row]) {
        let mut seen: HashMap<RowKey, Point> =
            rows.iter().map(|r| (row_key(r), Point::of(r))).collect();
        for (key, ring) in &mut self.rows {
            ring.push(seen.remove(key).unwrap_or_default());
        }
        for (key, point) in seen {
            let mut ring = Ring::new(self.capacity);
            ring.push(point);
            self.rows.insert(key, ring);
        }
        self.rows.retain(|_, ring| ring.iter().any(|p| !p.is_gap()));
    }

    pub fn row(&self, key: &RowKey) -> Option<&Ring<Point>> {
        self.rows.get(key)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::spans::live::Percentiles;

    fn p(p50: f64) -> Percentiles {
        Percentiles {
            count: 1,
            p50_ms: p50,
            p90_ms: p50 * 1.5,
            p99_ms: p50 * 2.0,
            max_ms: p50 * 3.0,
        }
    }

    fn row(src: &str, dst: &str, rate: f64, hops: &[(&str, f64)]) -> Row {
        let total: f64 = hops.iter().map(|(_, v)| v).sum();
        Row {
            source_workload: src.into(),
            destination_service: dst.into(),
            requests: (rate * 60.0) as u64,
            rate,
            errors: 0,
            error_rate: 0.0,
            retries: 0,
            total: if hops.is_empty() {
                Percentiles::default()
            } else {
                p(total)
            },
            hops: hops
                .iter()
                .map(|(h, v)| (h.to_string(), p(*v)))
                .collect::<BTreeMap<_, _>>(),
            sidecar_share: None,
            slowest: Vec::new(),
            tcp: Default::default(),
        }
    }

    fn names(rows: &[&Row]) -> Vec<String> {
        rows.iter()
            .map(|r| format!("{}>{}", r.source_workload, r.destination_service))
            .collect()
    }

    #[test]
    fn counter_rate_over_time() {
        let r = counter_rate(100, 350, Duration::from_millis(500)).unwrap();
        assert!((r - 500.0).abs() < 1e-9);
        assert_eq!(counter_rate(5, 5, Duration::from_secs(1)), Some(0.0));
    }

    #[test]
    fn counter_rate_after_a_restart_counts_from_zero() {
        let r = counter_rate(1_000_000, 40, Duration::from_secs(2)).unwrap();
        assert!((r - 20.0).abs() < 1e-9);
    }

    #[test]
    fn counter_rate_needs_elapsed_time() {
        assert_eq!(counter_rate(1, 2, Duration::ZERO), None);
        // Extremes do not overflow.
        assert_eq!(
            counter_rate(0, u64::MAX, Duration::from_secs(1)),
            Some(u64::MAX as f64)
        );
    }

    #[test]
    fn dominant_hop_is_the_largest_median() {
        let r = row(
            "a",
            "b",
            1.0,
            &[
                ("outbound_proxy", 4.0),
                ("app", 20.0),
                ("inbound_proxy", 6.0),
            ],
        );
        assert_eq!(dominant_hop(&r), Some(5));
        let r = row("a", "b", 1.0, &[("outbound_proxy", 4.0), ("network", 0.1)]);
        assert_eq!(HOPS[dominant_hop(&r).unwrap()].0, "outbound_proxy");
        assert_eq!(dominant_hop(&row("a", "b", 1.0, &[])), None);
    }

    #[test]
    fn dominant_hop_ties_go_to_the_earlier_hop_and_unobserved_hops_are_ignored() {
        let mut r = row("a", "b", 1.0, &[("network", 3.0), ("app", 3.0)]);
        assert_eq!(dominant_hop(&r), Some(NETWORK));
        r.hops.insert(
            "inbound_proxy".into(),
            Percentiles {
                count: 0,
                p50_ms: 99.0,
                ..Percentiles::default()
            },
        );
        assert_eq!(dominant_hop(&r), Some(NETWORK));
        r.hops.insert("app".into(), p(f64::NAN));
        // total_cmp orders NaN above every number; a NaN median is not one
        // the agent sends, but it must not panic or be skipped silently.
        assert_eq!(dominant_hop(&r), Some(APP));
    }

    #[test]
    fn upstream_counts_only_when_the_server_side_is_not_seen() {
        // Server on this node: upstream is the sum of the finer hops.
        let local = row(
            "a",
            "b",
            1.0,
            &[("outbound_proxy", 4.0), ("app", 20.0), ("upstream", 30.0)],
        );
        assert_eq!(hop_p50(&local, UPSTREAM), None);
        assert_eq!(dominant_hop(&local), Some(APP));
        assert!(!any_upstream(&[&local]));
        // Server on another node: upstream is all there is past the sidecar.
        let remote = row(
            "a",
            "b",
            1.0,
            &[("outbound_proxy", 4.0), ("upstream", 30.0)],
        );
        assert_eq!(hop_p50(&remote, UPSTREAM), Some(30.0));
        assert_eq!(dominant_hop(&remote), Some(UPSTREAM));
        assert!(any_upstream(&[&local, &remote]));
    }

    #[test]
    fn sort_by_rate_descending_then_reversed() {
        let rows = [
            row("a", "x", 5.0, &[("app", 1.0)]),
            row("b", "x", 50.0, &[("app", 2.0)]),
            row("c", "x", 0.5, &[("app", 3.0)]),
        ];
        let mut v: Vec<&Row> = rows.iter().collect();
        sort_rows(&mut v, SortKey::Rate, false);
        assert_eq!(names(&v), ["b>x", "a>x", "c>x"]);
        sort_rows(&mut v, SortKey::Rate, true);
        assert_eq!(names(&v), ["c>x", "a>x", "b>x"]);
        sort_rows(&mut v, SortKey::Name, false);
        assert_eq!(names(&v), ["a>x", "b>x", "c>x"]);
        sort_rows(&mut v, SortKey::Name, true);
        assert_eq!(names(&v), ["c>x", "b>x", "a>x"]);
    }

    #[test]
    fn rows_without_the_value_sort_last_in_both_directions() {
        let rows = [
            row("a", "x", 1.0, &[("outbound_proxy", 1.0)]),
            row("b", "x", 1.0, &[("app", 9.0)]),
            row("c", "x", 1.0, &[("outbound_proxy", 7.0)]),
        ];
        let mut v: Vec<&Row> = rows.iter().collect();
        let key = SortKey::Hop(1);
        sort_rows(&mut v, key, false);
        assert_eq!(names(&v), ["c>x", "a>x", "b>x"]);
        sort_rows(&mut v, key, true);
        assert_eq!(names(&v), ["a>x", "c>x", "b>x"]);
    }

    #[test]
    fn sorting_is_total_with_nan_and_stable_by_name() {
        let mut rows = [
            row("b", "x", 1.0, &[("app", 1.0)]),
            row("a", "x", 1.0, &[("app", 1.0)]),
            row("c", "x", f64::NAN, &[("app", 1.0)]),
        ];
        rows[0].rate = 2.0;
        let mut v: Vec<&Row> = rows.iter().collect();
        sort_rows(&mut v, SortKey::Rate, false);
        // Positive NaN is above every number with total_cmp.
        assert_eq!(names(&v), ["c>x", "b>x", "a>x"]);
        rows[0].rate = 1.0;
        let mut v: Vec<&Row> = rows.iter().collect();
        sort_rows(&mut v, SortKey::P50, false);
        // Equal p50 everywhere: by name.
        assert_eq!(names(&v), ["a>x", "b>x", "c>x"]);
    }

    #[test]
    fn sort_key_cycles_through_every_column() {
        let mut key = SortKey::Rate;
        let mut seen = vec![key];
        loop {
            key = key.next(false);
            if key == SortKey::Rate {
                break;
            }
            seen.push(key);
        }
        assert_eq!(seen.len(), 5 + 6 + 2);
        assert!(!seen.contains(&SortKey::Hop(UPSTREAM)));
        assert_eq!(SortKey::Hop(5).next(true), SortKey::Hop(UPSTREAM));
        // A key that is no longer offered restarts the cycle.
        assert_eq!(SortKey::Hop(UPSTREAM).next(false), SortKey::Errors);
    }

    #[test]
    fn filter_is_a_case_insensitive_substring_of_either_name() {
        let r = row("productpage", "Reviews", 1.0, &[]);
        assert!(matches_filter(&r, ""));
        assert!(matches_filter(&r, "  "));
        assert!(matches_filter(&r, "review"));
        assert!(matches_filter(&r, "PRODUCT"));
        assert!(!matches_filter(&r, "ratings"));
        let rows = [
            row("productpage", "reviews", 3.0, &[]),
            row("reviews", "ratings", 2.0, &[]),
            row("loadgen", "productpage", 1.0, &[]),
        ];
        let v = visible_rows(&rows, "reviews", SortKey::Rate, false);
        assert_eq!(names(&v), ["productpage>reviews", "reviews>ratings"]);
    }

    #[test]
    fn everything_fits_in_120_columns() {
        let layout = columns_for_width(118, false);
        assert_eq!(layout.columns, all_columns(false));
        assert!(layout.pair_width >= 28, "{layout:?}");
    }

    #[test]
    fn narrow_terminals_drop_the_least_telling_columns_first() {
        // 80 columns less the table's borders.
        let layout = columns_for_width(78, false);
        assert!(!layout.columns.contains(&Column::P90));
        assert!(!layout.columns.contains(&Column::Sidecar));
        for kept in [
            Column::Pair,
            Column::Rate,
            Column::P50,
            Column::Hop(1),
            Column::Hop(3),
            Column::Hop(5),
        ] {
            assert!(layout.columns.contains(&kept), "{kept:?} in {layout:?}");
        }
        let used: usize = layout
            .columns
            .iter()
            .map(|c| match c {
                Column::Pair => layout.pair_width,
                c => c.width(),
            })
            .sum::<usize>()
            + layout.columns.len()
            - 1;
        assert!(used <= 78, "{used}");
        assert!(layout.pair_width >= PAIR_MIN);
    }

    #[test]
    fn columns_shrink_monotonically_and_never_below_the_pair() {
        let mut previous = usize::MAX;
        for width in (0..200).rev() {
            let layout = columns_for_width(width, true);
            assert!(layout.columns.len() <= previous);
            assert_eq!(layout.columns[0], Column::Pair);
            previous = layout.columns.len();
        }
        assert_eq!(columns_for_width(0, false).columns, [Column::Pair]);
        assert!(columns_for_width(300, true)
            .columns
            .contains(&Column::Hop(UPSTREAM)));
        assert!(columns_for_width(300, true).pair_width <= PAIR_MAX);
    }

    #[test]
    fn number_formats_fit_their_columns() {
        assert_eq!(fmt_ms(0.123), "0.12");
        assert_eq!(fmt_ms(12.34), "12.3");
        assert_eq!(fmt_ms(123.4), "123");
        assert_eq!(fmt_ms(99_999.0), "99999");
        assert_eq!(fmt_ms(3_600_000.0), "3600s");
        assert_eq!(fmt_ms(f64::NAN), "-");
        assert_eq!(fmt_rate(49.96), "50.0");
        assert_eq!(fmt_rate(12_345.0), "12345");
        assert_eq!(fmt_share(0.306, 0), "31");
        assert_eq!(fmt_share(1.0, 1), "100.0");
        assert_eq!(truncate("loadgen -> productpage", 10), "loadgen -…");
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abc", 0), "");
    }

    #[test]
    fn plain_table_is_aligned_and_marks_the_dominant_hop() {
        let rows = [
            row(
                "loadgen",
                "reviews",
                50.0,
                &[
                    ("client_to_outbound", 0.1),
                    ("outbound_proxy", 4.1),
                    ("network", 0.2),
                    ("inbound_proxy", 6.2),
                    ("inbound_to_app", 0.1),
                    ("app", 20.5),
                ],
            ),
            row("reviews", "ratings", 30.0, &[]),
        ];
        let refs: Vec<&Row> = rows.iter().collect();
        let text = plain_table(&refs);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        let first: Vec<&str> = lines[1].split_whitespace().collect();
        // Same number of fields: the pair is three words on both lines.
        assert_eq!(header.len(), first.len(), "{text}");
        let at = |name: &str| header.iter().position(|h| *h == name).unwrap();
        assert_eq!(first[at("out-sc")], "4.10");
        assert_eq!(first[at("in-sc")], "6.20");
        assert_eq!(first[at("app")], "20.5*");
        assert_eq!(first[at("req/s")], "50.0");
        // Columns line up: each header ends where its cells end.
        let end = |line: &str, field: &str| line.find(field).unwrap() + field.len();
        assert_eq!(end(lines[0], "out-sc"), end(lines[1], " 4.10"));
        assert!(!text.contains('\x1b'));
        let second: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(second[at("p50")], "-");
    }

    #[test]
    fn ring_keeps_the_newest_within_capacity() {
        let mut ring = Ring::new(3);
        assert!(ring.is_empty());
        for i in 0..10 {
            ring.push(i);
            assert!(ring.len() <= 3);
        }
        assert_eq!(ring.iter().copied().collect::<Vec<_>>(), [7, 8, 9]);
        let mut zero = Ring::new(0);
        zero.push(1);
        zero.push(2);
        assert_eq!(zero.iter().copied().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn history_is_bounded_and_forgets_rows_that_left() {
        let mut history = History::new(4);
        let a = row("a", "x", 1.0, &[("app", 1.0)]);
        let b = row("b", "x", 1.0, &[("app", 2.0)]);
        history.record(&[a.clone(), b.clone()]);
        for _ in 0..10 {
            history.record(std::slice::from_ref(&a));
        }
        let ring = history.row(&row_key(&a)).unwrap();
        assert_eq!(ring.len(), 4);
        assert!(ring.iter().all(|p| p.hops_p50[5] == Some(1.0)));
        // b was absent for more than the capacity: forgotten.
        assert!(history.row(&row_key(&b)).is_none());
        assert_eq!(history.len(), 1);

        // A row that comes back after a short absence keeps its past, with
        // gaps where it was missing.
        history.record(&[a.clone(), b.clone()]);
        history.record(std::slice::from_ref(&a));
        history.record(&[a.clone(), b.clone()]);
        let points: Vec<Option<f64>> = history
            .row(&row_key(&b))
            .unwrap()
            .iter()
            .map(|p| p.hops_p50[5])
            .collect();
        assert_eq!(points, [Some(2.0), None, Some(2.0)]);
        history.record(&[]);
        history.record(&[]);
        history.record(&[]);
        history.record(&[]);
        assert!(history.is_empty());
    }
}
