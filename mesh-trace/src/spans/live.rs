//! Live percentiles per (source workload, destination service) row and per
//! hop, over a sliding window, for `mesh-trace top` and the agent's JSON
//! endpoint.
//!
//! The window is a ring of `slots` sub-windows ("slots"), each holding its
//! own histograms and counters; a snapshot merges the live slots. Expiring a
//! whole slot at once keeps recording O(1) and bounds memory, at the price of
//! a window edge quantised to one slot length.
//!
//! Time is always passed in (CLOCK_MONOTONIC ns): no clock is read here, so
//! the logic is deterministic under test.
use std::collections::{hash_map::Entry, BTreeMap, HashMap};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::span::{Hop, Span};
use crate::flows::health::Health;

/// Values above one hour (in microseconds) are clamped: anything that slow is
/// a stuck connection, and its exact length does not change any percentile
/// worth showing.
const MAX_US: u64 = 3_600_000_000;
/// Significant decimal digits kept by every histogram (0.1 % resolution).
const SIGFIG: u8 = 3;
/// Slowest requests kept per row: per slot while recording, and in a snapshot.
const SLOWEST: usize = 10;
/// Shortest time a rate is computed over, so that a window that has just
/// started does not turn a single request into thousands per second.
const MIN_RATE_SPAN_NS: u64 = 1_000_000_000;
/// The row that rows beyond `max_rows` fold into.
const OTHER: &str = "other";
/// Distinct (destination service, leg) pairs of TCP health kept per slot;
/// further services fold into "other".
const MAX_TCP_KEYS: usize = 1_024;
/// Hops whose sum is the time the two sidecars add to a request.
const SIDECAR_HOPS: [Hop; 4] = [
    Hop::ClientToOutbound,
    Hop::OutboundProxy,
    Hop::InboundProxy,
    Hop::InboundToApp,
];

/// What the agent serves: one row per (source, destination) seen in the window.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Snapshot {
    /// Configured window length, seconds.
    pub window_s: f64,
    /// Busiest rows first.
    pub rows: Vec<Row>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Row {
    pub source_workload: String,
    pub destination_service: String,
    /// Requests in the window.
    pub requests: u64,
    /// Requests per second over the part of the window that was observed.
    pub rate: f64,
    /// Failed requests ([`Span::is_error`]): responses with status >= 500,
    /// none at all (status 0), gRPC server errors.
    pub errors: u64,
    /// errors / requests.
    pub error_rate: f64,
    pub retries: u64,
    /// Of `Span::total_ns`.
    pub total: Percentiles,
    /// Keyed by `Hop::label()`; only hops observed in the window.
    pub hops: BTreeMap<String, Percentiles>,
    /// Share of the total time spent in and around the sidecars, in 0..=1,
    /// over the spans where all of it was observed; None when there were none.
    pub sidecar_share: Option<f64>,
    /// The slowest requests of the window, slowest first.
    pub slowest: Vec<SlowRequest>,
    /// TCP health of the legs towards this row's destination service (from
    /// every source on this node), keyed by leg label.
    #[serde(default)]
    pub tcp: BTreeMap<String, LegHealth>,
}

/// One leg's TCP health over the window.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct LegHealth {
    pub rtt_samples: u64,
    /// Smoothed RTT (a peer's delayed ACK counts in it).
    pub rtt_p50_ms: f64,
    pub rtt_p99_ms: f64,
    /// The kernel's windowed minimum RTT: the path.
    pub min_rtt_p50_ms: f64,
    pub retransmits: u64,
    pub resets: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SlowRequest {
    pub request_id: Option<String>,
    pub method: String,
    pub path: String,
    pub status: u16,
    /// A gRPC call's status code, from its trailers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// Whether it failed ([`Span::is_error`]).
    #[serde(default)]
    pub error: bool,
    pub total_ms: f64,
    /// Keyed by `Hop::label()`; only hops observed for this request.
    pub hops_ms: BTreeMap<String, f64>,
    pub retries: u32,
}

/// Sliding-window statistics. Memory is bounded by
/// `slots x (max_rows + 1) x (1 + Hop::ALL.len())` histograms plus
/// `SLOWEST` requests per row and slot.
pub struct LiveStats {
    window: Duration,
    slot_ns: u64,
    slots: Vec<Slot>,
    rows: RowTable,
    /// Latest time seen: time never moves backwards inside, so that a late
    /// timestamp lands in the current slot instead of an expired one.
    latest_ns: Option<u64>,
    /// First time seen: before it nothing was observed, so it bounds the part
    /// of the window a rate is computed over.
    started_ns: Option<u64>,
}

impl LiveStats {
    /// `window`: sliding window length, made of `slots` sub-windows (for
    /// example 12 x 5 s). `max_rows`: distinct rows kept; further pairs fold
    /// into ("other", "other"), so a snapshot has at most `max_rows + 1` rows.
    pub fn new(window: Duration, slots: usize, max_rows: usize) -> LiveStats {
        let slots = slots.max(1);
        let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        let slot_ns = (window_ns / slots as u64).max(1);
        LiveStats {
            window,
            slot_ns,
            slots: (0..slots).map(|_| Slot::default()).collect(),
            rows: RowTable::new(max_rows),
            latest_ns: None,
            started_ns: None,
        }
    }

    /// Records one stitched span observed at `now_ns`.
    pub fn record(&mut self, span: &Span, now_ns: u64) {
        let now = self.advance(now_ns);
        let key = self
            .rows
            .admit(&span.source_workload, &span.destination_service);
        let index = self.open_slot(now);
        // Disjoint field borrows: the slot's map and the row table.
        let acc = match self.slots[index].rows.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                self.rows.hold(e.key());
                e.insert(RowAcc::default())
            }
        };
        acc.add(span);
    }

    /// Records one TCP health observation on a leg towards `destination`.
    pub fn record_tcp(&mut self, destination: &str, leg: &'static str, h: Health, now_ns: u64) {
        let now = self.advance(now_ns);
        let index = self.open_slot(now);
        let tcp = &mut self.slots[index].tcp;
        let mut key = (destination.to_owned(), leg);
        if !tcp.contains_key(&key) && tcp.len() >= MAX_TCP_KEYS {
            key.0 = OTHER.to_owned();
        }
        tcp.entry(key).or_default().add(h);
    }

    /// Snapshot of the window ending at `now_ns`; expired slots are dropped.
    pub fn snapshot(&mut self, now_ns: u64) -> Snapshot {
        let now = self.advance(now_ns);
        let covered_s = self.covered_ns(now) as f64 / 1e9;
        let mut merged: HashMap<&RowKey, RowAcc> = HashMap::new();
        // After `advance`, every slot still holding data is live.
        for slot in &self.slots {
            for (key, acc) in &slot.rows {
                merged.entry(key).or_default().merge(acc);
            }
        }
        let mut tcp: HashMap<&str, BTreeMap<&str, TcpAcc>> = HashMap::new();
        for slot in &self.slots {
            for ((service, leg), acc) in &slot.tcp {
                tcp.entry(service)
                    .or_default()
                    .entry(leg)
                    .or_default()
                    .merge(acc);
            }
        }
        let mut rows: Vec<Row> = merged
            .into_iter()
            .map(|(key, acc)| {
                let mut row = acc.into_row(key, covered_s);
                if let Some(legs) = tcp.get(row.destination_service.as_str()) {
                    row.tcp = legs
                        .iter()
                        .map(|(leg, acc)| (leg.to_string(), acc.health()))
                        .collect();
                }
                row
            })
            .collect();
        rows.sort_by(|a, b| {
            b.requests
                .cmp(&a.requests)
                .then_with(|| a.source_workload.cmp(&b.source_workload))
                .then_with(|| a.destination_service.cmp(&b.destination_service))
        });
        Snapshot {
            window_s: self.window.as_secs_f64(),
            rows,
        }
    }

    fn epoch(&self, ns: u64) -> u64 {
        ns / self.slot_ns
    }

    /// Moves the clock to `now_ns` (never backwards) and drops the slots
    /// that fell out of the window. Returns the effective time.
    fn advance(&mut self, now_ns: u64) -> u64 {
        self.started_ns.get_or_insert(now_ns);
        let now = self.latest_ns.map_or(now_ns, |latest| latest.max(now_ns));
        let previous = self.latest_ns.replace(now);
        if previous.map(|p| self.epoch(p)) != Some(self.epoch(now)) {
            self.expire(self.epoch(now));
        }
        now
    }

    /// Clears every slot older than the window ending in epoch `current`;
    /// after a jump longer than the window that is all of them.
    fn expire(&mut self, current: u64) {
        let live = self.slots.len() as u64;
        for index in 0..self.slots.len() {
            let expired = self.slots[index]
                .epoch
                .is_some_and(|e| current.saturating_sub(e) >= live);
            if expired {
                self.clear_slot(index);
            }
        }
    }

    fn clear_slot(&mut self, index: usize) {
        let slot = std::mem::take(&mut self.slots[index]);
        for key in slot.rows.keys() {
            self.rows.release(key);
        }
    }

    /// The slot that records at `now` go to, claimed for its epoch.
    fn open_slot(&mut self, now: u64) -> usize {
        let epoch = self.epoch(now);
        let index = (epoch % self.slots.len() as u64) as usize;
        if self.slots[index].epoch != Some(epoch) {
            // Already emptied by `expire` (same index, older epoch), unless
            // it was never used; clearing again keeps that invariant local.
            self.clear_slot(index);
            self.slots[index].epoch = Some(epoch);
        }
        index
    }

    /// How much of the window ending at `now` was observed: from the start
    /// of the oldest live slot, or from the first time seen if later.
    fn covered_ns(&self, now: u64) -> u64 {
        let live = self.slots.len() as u64;
        let window_start = self
            .epoch(now)
            .saturating_add(1)
            .saturating_sub(live)
            .saturating_mul(self.slot_ns);
        let start = window_start.max(self.started_ns.unwrap_or(now));
        let floor = MIN_RATE_SPAN_NS.min(self.slot_ns.saturating_mul(live));
        now.saturating_sub(start).max(floor).max(1)
    }
}

/// (source_workload, destination_service).
type RowKey = (String, String);

fn other_key() -> RowKey {
    (OTHER.to_owned(), OTHER.to_owned())
}

/// Which rows exist: each admitted row with the number of live slots that
/// hold it, so that a row frees its place once it has expired everywhere.
struct RowTable {
    max_rows: usize,
    /// Excludes the overflow row, which is always allowed.
    live_slots: HashMap<RowKey, usize>,
}

impl RowTable {
    fn new(max_rows: usize) -> RowTable {
        RowTable {
            max_rows,
            live_slots: HashMap::new(),
        }
    }

    /// The row a span of (source, destination) is counted in.
    fn admit(&self, source: &str, destination: &str) -> RowKey {
        let key = (source.to_owned(), destination.to_owned());
        let fits = self.live_slots.contains_key(&key) || self.live_slots.len() < self.max_rows;
        if fits || is_other(&key) {
            key
        } else {
            other_key()
        }
    }

    /// A slot started holding `key`.
    fn hold(&mut self, key: &RowKey) {
        if !is_other(key) {
            *self.live_slots.entry(key.clone()).or_default() += 1;
        }
    }

    /// A slot holding `key` expired.
    fn release(&mut self, key: &RowKey) {
        if let Some(count) = self.live_slots.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.live_slots.remove(key);
            }
        }
    }
}

fn is_other(key: &RowKey) -> bool {
    key.0 == OTHER && key.1 == OTHER
}

/// One sub-window.
#[derive(Default)]
struct Slot {
    /// Which sub-window (`now_ns / slot_ns`) the data belongs to; None when
    /// empty.
    epoch: Option<u64>,
    rows: HashMap<RowKey, RowAcc>,
    /// (destination service, leg label).
    tcp: HashMap<(String, &'static str), TcpAcc>,
}

/// What one leg's TCP health accumulates in a slot.
struct TcpAcc {
    rtt: Histogram<u64>,
    min_rtt: Histogram<u64>,
    retransmits: u64,
    resets: u64,
}

impl Default for TcpAcc {
    fn default() -> TcpAcc {
        TcpAcc {
            rtt: new_histogram(),
            min_rtt: new_histogram(),
            retransmits: 0,
            resets: 0,
        }
    }
}

impl TcpAcc {
    fn add(&mut self, h: Health) {
        match h {
            Health::Retransmits(n) => self.retransmits += u64::from(n),
            Health::ResetSent(_) | Health::ResetReceived => self.resets += 1,
            Health::Rtt { srtt_us, min_us } => {
                record_ns(&mut self.rtt, u64::from(srtt_us) * 1_000);
                if let Some(min) = min_us {
                    record_ns(&mut self.min_rtt, u64::from(min) * 1_000);
                }
            }
        }
    }

    fn merge(&mut self, other: &TcpAcc) {
        merge_histogram(&mut self.rtt, &other.rtt);
        merge_histogram(&mut self.min_rtt, &other.min_rtt);
        self.retransmits += other.retransmits;
        self.resets += other.resets;
    }

    fn health(&self) -> LegHealth {
        let rtt = percentiles(&self.rtt);
        LegHealth {
            rtt_samples: rtt.count,
            rtt_p50_ms: rtt.p50_ms,
            rtt_p99_ms: rtt.p99_ms,
            min_rtt_p50_ms: percentiles(&self.min_rtt).p50_ms,
            retransmits: self.retransmits,
            resets: self.resets,
        }
    }
}

/// What one row accumulates in a slot; also used to merge slots.
struct RowAcc {
    requests: u64,
    errors: u64,
    retries: u64,
    total: Histogram<u64>,
    /// Created on first observation: most rows never see some hops (for
    /// example the server side of a cross-node request).
    hops: BTreeMap<Hop, Histogram<u64>>,
    /// Sidecar time and total time, over spans where both are known.
    sidecar_ns: u64,
    sidecar_total_ns: u64,
    /// Slowest first, at most `SLOWEST`.
    slowest: Vec<Slow>,
}

impl Default for RowAcc {
    fn default() -> RowAcc {
        RowAcc {
            requests: 0,
            errors: 0,
            retries: 0,
            total: new_histogram(),
            hops: BTreeMap::new(),
            sidecar_ns: 0,
            sidecar_total_ns: 0,
            slowest: Vec::new(),
        }
    }
}

impl RowAcc {
    fn add(&mut self, span: &Span) {
        self.requests += 1;
        if span.is_error() {
            self.errors += 1;
        }
        self.retries += u64::from(span.retries);
        for hop in Hop::ALL {
            if let Some(ns) = span.hop_ns(hop) {
                record_ns(self.hops.entry(hop).or_insert_with(new_histogram), ns);
            }
        }
        let Some(total_ns) = span.total_ns() else {
            return;
        };
        record_ns(&mut self.total, total_ns);
        if let Some(sidecar_ns) = sidecar_ns(span) {
            self.sidecar_ns = self.sidecar_ns.saturating_add(sidecar_ns);
            self.sidecar_total_ns = self.sidecar_total_ns.saturating_add(total_ns);
        }
        // Most spans are not among the slowest: decide before copying one.
        if would_keep(&self.slowest, total_ns) {
            keep_slowest(&mut self.slowest, Slow::new(span, total_ns));
        }
    }

    fn merge(&mut self, other: &RowAcc) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.retries += other.retries;
        merge_histogram(&mut self.total, &other.total);
        for (hop, histogram) in &other.hops {
            merge_histogram(
                self.hops.entry(*hop).or_insert_with(new_histogram),
                histogram,
            );
        }
        self.sidecar_ns = self.sidecar_ns.saturating_add(other.sidecar_ns);
        self.sidecar_total_ns = self.sidecar_total_ns.saturating_add(other.sidecar_total_ns);
        for slow in &other.slowest {
            keep_slowest(&mut self.slowest, slow.clone());
        }
    }

    fn into_row(self, key: &RowKey, covered_s: f64) -> Row {
        let ratio = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        Row {
            source_workload: key.0.clone(),
            destination_service: key.1.clone(),
            requests: self.requests,
            rate: self.requests as f64 / covered_s,
            errors: self.errors,
            error_rate: ratio(self.errors, self.requests),
            retries: self.retries,
            total: percentiles(&self.total),
            hops: self
                .hops
                .iter()
                .map(|(hop, h)| (hop.label().to_owned(), percentiles(h)))
                .collect(),
            sidecar_share: (self.sidecar_total_ns > 0)
                .then(|| ratio(self.sidecar_ns, self.sidecar_total_ns).clamp(0.0, 1.0)),
            slowest: self.slowest.into_iter().map(|s| s.request).collect(),
            tcp: BTreeMap::new(),
        }
    }
}

/// A slow request with its exact total, which orders it.
#[derive(Clone)]
struct Slow {
    total_ns: u64,
    request: SlowRequest,
}

impl Slow {
    fn new(span: &Span, total_ns: u64) -> Slow {
        let hops_ms = Hop::ALL
            .into_iter()
            .filter_map(|hop| Some((hop.label().to_owned(), ns_to_ms(span.hop_ns(hop)?))))
            .collect();
        Slow {
            total_ns,
            request: SlowRequest {
                request_id: span.request_id.clone(),
                method: span.method.clone(),
                path: span.path.clone(),
                status: span.status,
                grpc_status: span.grpc_status,
                error: span.is_error(),
                total_ms: ns_to_ms(total_ns),
                hops_ms,
                retries: span.retries,
            },
        }
    }
}

/// Inserts `slow` into `list` (slowest first) if it ranks in the top `SLOWEST`.
/// Whether a request taking `total_ns` belongs in the slowest `list`.
fn would_keep(list: &[Slow], total_ns: u64) -> bool {
    list.len() < SLOWEST || list.last().is_some_and(|s| s.total_ns < total_ns)
}

fn keep_slowest(list: &mut Vec<Slow>, slow: Slow) {
    if !would_keep(list, slow.total_ns) {
        return;
    }
    // After equals, so that earlier requests win ties.
    let at = list.partition_point(|s| s.total_ns >= slow.total_ns);
    list.insert(at, slow);
    list.truncate(SLOWEST);
}

/// Time in and around both sidecars, when all of it was observed.
fn sidecar_ns(span: &Span) -> Option<u64> {
    SIDECAR_HOPS.iter().try_fold(0u64, |sum, &hop| {
        Some(sum.saturating_add(span.hop_ns(hop)?))
    })
}

/// Auto-resizing rather than sized for one hour up front: at 3 digits a
/// histogram sized for an hour is ~190 KB, while one that only grows to the
/// values seen (milliseconds, typically) stays a fraction of that, which
/// matters with rows x slots x hops of them.
fn new_histogram() -> Histogram<u64> {
    Histogram::new(SIGFIG).expect("3 significant digits is a valid histogram configuration")
}

fn record_ns(histogram: &mut Histogram<u64>, ns: u64) {
    // Rounded to the nearest microsecond, so sub-microsecond hops are not
    // all biased down to 0.
    let us = (ns.saturating_add(500) / 1_000).min(MAX_US);
    histogram
        .record(us)
        .expect("an auto-resizing histogram takes any value up to MAX_US");
}

fn merge_histogram(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    into.add(from)
        .expect("an auto-resizing histogram takes any value up to MAX_US");
}

fn percentiles(histogram: &Histogram<u64>) -> Percentiles {
    if histogram.is_empty() {
        return Percentiles::default();
    }
    let ms = |us: u64| us as f64 / 1_000.0;
    Percentiles {
        count: histogram.len(),
        p50_ms: ms(histogram.value_at_quantile(0.50)),
        p90_ms: ms(histogram.value_at_quantile(0.90)),
        p99_ms: ms(histogram.value_at_quantile(0.99)),
        max_ms: ms(histogram.max()),
    }
}

fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    /// A slot boundary, far from 0 like a real monotonic clock.
    const T0: u64 = 1_000 * S;

    fn stats() -> LiveStats {
        LiveStats::new(Duration::from_secs(60), 12, 100)
    }

    fn span_with(moments_ms: [Option<u64>; 12]) -> Span {
        Span {
            request_id: None,
            method: "GET".into(),
            path: "/items/{id}".into(),
            status: 200,
            source_workload: "frontend".into(),
            source_namespace: None,
            destination_service: "items".into(),
            destination_namespace: None,
            destination_pod: None,
            moments: moments_ms.map(|m| m.map(|m| m * MS)),
            retries: 0,
            local_reply: None,
            trace_id: None,
            mesh_leg_id: None,
            parent_span_id: None,
            grpc_status: None,
            protocol: Default::default(),
        }
    }

    /// All twelve moments, in ms.
    fn full_span(ms: [u64; 12]) -> Span {
        span_with(ms.map(Some))
    }

    /// Only t0 and t11: a total and no hops.
    fn total_span(total_ms: u64) -> Span {
        let mut m = [None; 12];
        m[0] = Some(0);
        m[11] = Some(total_ms);
        span_with(m)
    }

    /// Only the client side: the server ran on another node.
    fn client_side_span() -> Span {
        let mut m = [None; 12];
        for (i, t) in [(0, 0), (1, 1), (2, 2), (9, 12), (10, 13), (11, 14)] {
            m[i] = Some(t);
        }
        span_with(m)
    }

    fn only_row(snapshot: &Snapshot) -> &Row {
        assert_eq!(snapshot.rows.len(), 1, "{snapshot:?}");
        &snapshot.rows[0]
    }

    #[test]
    fn tcp_health_joins_the_rows_of_its_destination_and_expires_with_the_window() {
        let mut live = stats();
        live.record(&total_span(10), T0);
        let rtt = |srtt_us, min_us| Health::Rtt {
            srtt_us,
            min_us: Some(min_us),
        };
        for i in 0..10 {
            live.record_tcp(
                "items",
                "mesh",
                rtt(5_000 + 100 * i, 4_900),
                T0 + i as u64 * MS,
            );
        }
        live.record_tcp("items", "mesh", Health::Retransmits(3), T0);
        live.record_tcp("items", "redirect", Health::ResetReceived, T0);
        // Another service's legs stay off this row.
        live.record_tcp("ratings", "mesh", Health::Retransmits(9), T0);
        let snapshot = live.snapshot(T0 + S);
        let row = only_row(&snapshot);
        let mesh = &row.tcp["mesh"];
        assert_eq!(mesh.rtt_samples, 10);
        assert!((5.3..=5.6).contains(&mesh.rtt_p50_ms), "{mesh:?}");
        assert!((4.89..=4.91).contains(&mesh.min_rtt_p50_ms), "{mesh:?}");
        assert_eq!((mesh.retransmits, mesh.resets), (3, 0));
        assert_eq!(row.tcp["redirect"].resets, 1);
        assert_eq!(row.tcp["redirect"].rtt_samples, 0);
        assert_eq!(row.tcp.len(), 2);
        // A new span after the window: the old health is gone.
        live.record(&total_span(10), T0 + 120 * S);
        assert!(only_row(&live.snapshot(T0 + 121 * S)).tcp.is_empty());
    }

    /// Within hdr precision (3 significant digits) of `expected`.
    fn assert_close(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() <= expected * 0.002 + 0.001,
            "{actual} is not ~{expected}"
        );
    }

    #[test]
    fn percentiles_of_known_totals() {
        let mut live = stats();
        for ms in 1..=100 {
            live.record(&total_span(ms), T0 + ms * MS);
        }
        let snapshot = live.snapshot(T0 + S);
        let row = only_row(&snapshot);
        assert_eq!(row.requests, 100);
        assert_eq!(row.total.count, 100);
        assert_close(row.total.p50_ms, 50.0);
        assert_close(row.total.p90_ms, 90.0);
        assert_close(row.total.p99_ms, 99.0);
        assert_close(row.total.max_ms, 100.0);
        assert!(row.hops.is_empty());
        assert_eq!(row.sidecar_share, None);
    }

    #[test]
    fn spans_without_total_count_as_requests_only() {
        let mut live = stats();
        live.record(&span_with([None; 12]), T0);
        let snapshot = live.snapshot(T0);
        let row = only_row(&snapshot);
        assert_eq!(row.requests, 1);
        assert_eq!(row.total.count, 0);
        assert_eq!(row.total.p99_ms, 0.0);
        assert!(row.slowest.is_empty());
    }

    #[test]
    fn only_observed_hops_are_reported() {
        let mut live = stats();
        live.record(&client_side_span(), T0);
        let snapshot = live.snapshot(T0);
        let row = only_row(&snapshot);
        let labels: Vec<&str> = row.hops.keys().map(String::as_str).collect();
        assert_eq!(labels, ["client_to_outbound", "outbound_proxy", "upstream"]);
        assert_close(row.hops["upstream"].p50_ms, 10.0);
        assert_close(row.hops["client_to_outbound"].max_ms, 2.0);
        // The server side's sidecar time is unknown: no share.
        assert_eq!(row.sidecar_share, None);
    }

    #[test]
    fn sidecar_share_over_spans_where_it_is_known() {
        let mut live = stats();
        // Sidecar hops 2 + 4 + 6 + 2 = 14 of 36 ms.
        live.record(&full_span([0, 1, 3, 4, 7, 8, 28, 29, 32, 33, 35, 36]), T0);
        // Sidecar hops 2 + 2 + 2 + 2 = 8 of 20 ms.
        live.record(&full_span([0, 1, 2, 3, 4, 5, 15, 16, 17, 18, 19, 20]), T0);
        // Excluded: only half of its sidecar time is known.
        live.record(&client_side_span(), T0);
        let snapshot = live.snapshot(T0);
        let row = only_row(&snapshot);
        let share = row.sidecar_share.expect("two spans are complete");
        assert!((share - 22.0 / 56.0).abs() < 1e-12, "{share}");
        assert_eq!(row.hops.len(), Hop::ALL.len());
        assert_eq!(row.hops["app"].count, 2);
        assert_eq!(row.hops["upstream"].count, 3);
    }

    #[test]
    fn records_older_than_the_window_expire() {
        let mut live = stats();
        live.record(&total_span(10), T0);
        live.record(&total_span(10), T0 + 30 * S);
        assert_eq!(only_row(&live.snapshot(T0 + 59 * S)).requests, 2);
        // The first record's slot is now one window old.
        assert_eq!(only_row(&live.snapshot(T0 + 60 * S)).requests, 1);
        assert!(live.snapshot(T0 + 90 * S).rows.is_empty());
    }

    #[test]
    fn a_jump_past_the_window_clears_everything() {
        let mut live = stats();
        for i in 0..50 {
            live.record(&total_span(i), T0 + i * S);
        }
        let later = T0 + 1_000_000 * S;
        assert!(live.snapshot(later).rows.is_empty());
        live.record(&total_span(7), later);
        let snapshot = live.snapshot(later);
        let row = only_row(&snapshot);
        assert_eq!(row.requests, 1);
        assert_close(row.total.max_ms, 7.0);
    }

    #[test]
    fn a_slightly_late_timestamp_goes_to_the_current_slot() {
        let mut live = stats();
        live.record(&total_span(1), T0 + 10 * S);
        // Earlier than the previous record, in the previous slot's range.
        live.record(&total_span(1), T0 + 10 * S - MS);
        // Had it been filed in the previous slot, it would have expired here.
        assert_eq!(only_row(&live.snapshot(T0 + 65 * S)).requests, 2);
        assert!(live.snapshot(T0 + 70 * S).rows.is_empty());
    }

    #[test]
    fn rate_uses_the_observed_part_of_the_window() {
        let mut live = stats();
        for i in 0..10 {
            live.record(&total_span(1), T0 + i * 200 * MS);
        }
        let row = only_row(&live.snapshot(T0 + 2 * S)).clone();
        assert!((row.rate - 5.0).abs() < 1e-9, "{}", row.rate);
    }

    #[test]
    fn rate_over_a_full_window() {
        let mut live = stats();
        live.snapshot(T0);
        // One request per second for two windows, snapshot at a slot's end.
        for i in 0..120 {
            live.record(&total_span(1), T0 + i * S);
        }
        let now = T0 + 120 * S - 1;
        let row = only_row(&live.snapshot(now)).clone();
        assert_eq!(row.requests, 60);
        assert!((row.rate - 1.0).abs() < 1e-6, "{}", row.rate);
    }

    #[test]
    fn rate_right_after_the_first_record_is_bounded() {
        let mut live = stats();
        live.record(&total_span(1), T0);
        let row = only_row(&live.snapshot(T0)).clone();
        assert!((row.rate - 1.0).abs() < 1e-9, "{}", row.rate);
    }

    #[test]
    fn rows_beyond_the_cap_fold_into_other() {
        let mut live = LiveStats::new(Duration::from_secs(60), 12, 2);
        for (source, destination) in [("a", "b"), ("a", "c"), ("d", "e"), ("a", "b")] {
            let mut span = total_span(1);
            span.source_workload = source.into();
            span.destination_service = destination.into();
            live.record(&span, T0);
        }
        let snapshot = live.snapshot(T0);
        let rows: Vec<(&str, &str, u64)> = snapshot
            .rows
            .iter()
            .map(|r| {
                let (s, d) = (&r.source_workload, &r.destination_service);
                (s.as_str(), d.as_str(), r.requests)
            })
            .collect();
        assert_eq!(rows, [("a", "b", 2), ("a", "c", 1), ("other", "other", 1)]);

        // Once the old rows have expired, a new pair gets a row of its own.
        let mut span = total_span(1);
        span.source_workload = "d".into();
        span.destination_service = "e".into();
        live.record(&span, T0 + 120 * S);
        let snapshot = live.snapshot(T0 + 120 * S);
        assert_eq!(only_row(&snapshot).source_workload, "d");
    }

    #[test]
    fn errors_and_retries() {
        let mut live = stats();
        for (status, retries) in [(200, 0), (500, 2), (503, 1), (0, 0), (404, 0)] {
            let mut span = total_span(1);
            span.status = status;
            span.retries = retries;
            live.record(&span, T0);
        }
        let snapshot = live.snapshot(T0);
        let row = only_row(&snapshot);
        assert_eq!(row.errors, 3);
        assert!((row.error_rate - 0.6).abs() < 1e-12);
        assert_eq!(row.retries, 3);
    }

    #[test]
    fn slowest_are_sorted_and_capped_across_slots() {
        let mut live = stats();
        // 25 totals in a scrambled order, spread over several slots.
        for i in 0..25u64 {
            let total_ms = (i * 7) % 25 + 1;
            let mut span = full_span([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10 + total_ms]);
            span.request_id = Some(format!("req-{total_ms}"));
            live.record(&span, T0 + i * 2 * S);
        }
        let snapshot = live.snapshot(T0 + 50 * S);
        let slowest = &only_row(&snapshot).slowest;
        let totals: Vec<f64> = slowest.iter().map(|s| s.total_ms).collect();
        let expected: Vec<f64> = (16..=25).rev().map(|ms| (ms + 10) as f64).collect();
        assert_eq!(totals, expected);
        assert_eq!(slowest[0].request_id.as_deref(), Some("req-25"));
        // t10 -> t11 carries the slowness: client_to_outbound = 1 + 25 ms.
        assert_eq!(slowest[0].hops_ms["client_to_outbound"], 26.0);
        assert_eq!(slowest[0].hops_ms.len(), Hop::ALL.len());
    }

    #[test]
    fn keep_slowest_keeps_the_top_ten() {
        let mut list = Vec::new();
        for ns in [5, 1, 9, 3, 12, 7, 11, 2, 8, 10, 4, 6, 13, 0] {
            keep_slowest(&mut list, Slow::new(&total_span(0), ns));
        }
        let kept: Vec<u64> = list.iter().map(|s| s.total_ns).collect();
        assert_eq!(kept, [13, 12, 11, 10, 9, 8, 7, 6, 5, 4]);
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let mut live = stats();
        live.record(&full_span([0, 1, 3, 4, 7, 8, 28, 29, 32, 33, 35, 36]), T0);
        let snapshot = live.snapshot(T0);
        let json = serde_json::to_string(&snapshot).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back.window_s, 60.0);
        assert_eq!(back.rows[0].hops.len(), Hop::ALL.len());
        assert_eq!(back.rows[0].total.count, 1);
    }

    #[test]
    fn degenerate_configuration_does_not_panic() {
        let mut live = LiveStats::new(Duration::ZERO, 0, 0);
        live.record(&total_span(1), T0);
        live.record(&total_span(1), 0);
        let snapshot = live.snapshot(u64::MAX);
        assert!(snapshot.rows.is_empty());
        live.record(&total_span(1), u64::MAX);
        assert_eq!(only_row(&live.snapshot(u64::MAX)).source_workload, OTHER);
    }
}
