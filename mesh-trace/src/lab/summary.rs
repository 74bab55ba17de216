//! The demo's summary when its output is not a terminal: every two seconds,
//! what the lab did (its own records, the ground truth) next to what the
//! kernel reported, then the median of each hop per service pair.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Seek, SeekFrom},
    path::PathBuf,
    time::Duration,
};

use super::{
    records::{ClientRecord, ProxyRecord},
    topology::Lab,
};
use crate::agent::{http::AgentState, metrics::KindLabel};

/// Per service pair, the median of each hop as the kernel measured it.
pub fn hop_rows(state: &AgentState) -> Vec<String> {
    let snapshot = state
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .snapshot(crate::clock::mono_ns());
    let short = [
        ("client_to_outbound", "app->sc"),
        ("outbound_proxy", "out-sc"),
        ("network", "net"),
        ("inbound_proxy", "in-sc"),
        ("inbound_to_app", "sc->app"),
        ("app", "app"),
    ];
    snapshot
        .rows
        .iter()
        .take(4)
        .map(|r| {
            let p50 = |k: &str| r.hops.get(k).map(|h| h.p50_ms);
            // With the other side on another node, this node has one half:
            // the client's (its hops and `upstream`), or the server's (its
            // hops, whose whole is `server_side`).
            let whole = p50("network").is_some();
            let (what, total, extra) = match (whole, p50("upstream"), p50("server_side")) {
                (false, Some(up), _) => ("p50", r.total.p50_ms, Some(("upstream", up))),
                (false, None, Some(server)) => ("server side p50", server, None),
                _ => ("p50", r.total.p50_ms, None),
            };
            let hops: Vec<String> = short
                .iter()
                .filter_map(|(k, name)| Some(format!("{name} {:.2}", p50(k)?)))
                .chain(extra.map(|(name, ms)| format!("{name} {ms:.2}")))
                .collect();
            format!(
                "        {:>12} -> {:<8} {:>5.1} req/s  {what} {:>6.2} ms = {} ms  sidecars {}",
                r.source_workload,
                r.destination_service,
                r.rate,
                total,
                hops.join(" + "),
                r.sidecar_share
                    .map(|s| format!("{:.0}%", s * 100.0))
                    .unwrap_or_else(|| "-".into())
            )
        })
        .collect()
}

/// Reads new lines of a JSON-lines file since the last call.
struct Tail {
    path: PathBuf,
    offset: u64,
}

impl Tail {
    fn new(path: PathBuf) -> Tail {
        Tail { path, offset: 0 }
    }

    fn read_new<T: serde::de::DeserializeOwned>(&mut self) -> Vec<T> {
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut reader = BufReader::new(f);
        let mut line = String::new();
        // Only whole lines: a partial last line is read next time.
        while reader.read_line(&mut line).unwrap_or(0) > 0 && line.ends_with('\n') {
            self.offset += line.len() as u64;
            if let Ok(v) = serde_json::from_str(&line) {
                out.push(v);
            }
            line.clear();
        }
        out
    }
}

/// What the demo prints every two seconds: the lab's truth next to what
/// the agent received.
pub struct LiveSummary {
    client: Tail,
    proxies: Vec<Tail>,
    requests: u64,
    errors: u64,
    latencies_ms: Vec<f64>,
    reviews_split: BTreeMap<String, u64>,
    retries: u64,
}

impl LiveSummary {
    pub fn new(lab: &Lab, client_records: PathBuf) -> LiveSummary {
        let proxies = lab
            .pods
            .iter()
            .filter(|p| p.spec.sidecar)
            .map(|p| Tail::new(lab.proxy_log(&p.spec.name)))
            .collect();
        LiveSummary {
            client: Tail::new(client_records),
            proxies,
            requests: 0,
            errors: 0,
            latencies_ms: Vec::new(),
            reviews_split: BTreeMap::new(),
            retries: 0,
        }
    }

    /// One line: what the lab did (its own records) and what the kernel
    /// reported since the start.
    pub fn line(&mut self, elapsed: Duration, state: &AgentState) -> String {
        for r in self.client.read_new::<ClientRecord>() {
            self.requests += 1;
            if !(200..300).contains(&r.status) {
                self.errors += 1;
            }
            self.latencies_ms
                .push(r.t_end_ns.saturating_sub(r.t_start_ns) as f64 / 1e6);
        }
        for tail in &mut self.proxies {
            for r in tail.read_new::<ProxyRecord>() {
                self.retries += u64::from(r.attempts.saturating_sub(1));
                if r.cluster.contains("reviews") && r.cluster.contains("|v") {
                    let version = r.cluster.split('|').nth(2).unwrap_or("?").to_string();
                    *self.reviews_split.entry(version).or_default() += 1;
                }
            }
        }
        // Keep the window bounded: percentiles over the last 10,000 requests.
        if self.latencies_ms.len() > 10_000 {
            let cut = self.latencies_ms.len() - 10_000;
            self.latencies_ms.drain(..cut);
        }
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let events = |kind: &'static str| {
            state
                .metrics
                .events
                .get_or_create(&KindLabel { kind })
                .get()
        };
        let lost: u64 = ["ringbuf_full", "map_full", "undecodable"]
            .into_iter()
            .map(|reason| {
                state
                    .metrics
                    .events_lost
                    .get_or_create(&crate::agent::metrics::ReasonLabel { reason })
                    .get()
            })
            .sum();
        let split: Vec<String> = self
            .reviews_split
            .iter()
            .map(|(v, n)| format!("{v}={n}"))
            .collect();
        format!(
            "[{:>5.0}s] requests {} (errors {}) p50 {:.1} ms p99 {:.1} ms | reviews {} retries {} | kernel: connects {} established {} closed {} lost {}",
            elapsed.as_secs_f64(),
            self.requests,
            self.errors,
            pct(0.5),
            pct(0.99),
            if split.is_empty() { "-".to_string() } else { split.join(" ") },
            self.retries,
            events("connect"),
            events("established"),
            events("closed"),
            lost,
        )
    }
}
