//! The lab's load generator: open loop at a fixed rate, or closed loop over N
//! connections, recording each request's id and client-side latency.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use serde::Serialize;
use tokio::task::JoinSet;

use super::{
    app::{CLIENT_ID, CLIENT_ID_BODY, REQUEST_ID, SERVED_BY},
    grpc,
    http_client::{self, HttpClient},
    ioclock::RequestKey,
    records::{mono_ns, ClientRecord, RecordWriter},
};

#[derive(Debug, Clone, clap::Args)]
pub struct LoadOptions {
    /// URL to request, e.g. http://reviews:9080/reviews/0.
    #[arg(long)]
    pub url: String,
    /// Name resolution, `name:port=ip:port` (repeatable).
    #[arg(long)]
    pub resolve: Vec<String>,
    /// Open loop: requests per second, sent on schedule whatever the latency.
    #[arg(long, conflicts_with = "connections")]
    pub rate: Option<f64>,
    /// Closed loop: connections, each sending its next request when the last returns.
    #[arg(long)]
    pub connections: Option<usize>,
    /// Stop after this many requests.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// JSON-lines file of ClientRecords.
    #[arg(long)]
    pub records: Option<PathBuf>,
    /// Open a new connection for every request (no keep-alive).
    #[arg(long)]
    pub new_connections: bool,
    /// Send no x-request-id: each request's id goes in `x-lab-client-id`
    /// instead (a header proxies pass on as written), so that an id a
    /// sidecar adds can be joined to it.
    #[arg(long)]
    pub no_request_id: bool,
    /// Send no x-request-id and nothing in the head that tells requests
    /// apart: each request is a POST whose body is its id (content type
    /// `application/x-lab-client-id`, recorded by the app as the client's
    /// id), so that concurrent requests to one URL look the same to
    /// anything that reads their heads.
    #[arg(long, conflicts_with_all = ["no_request_id", "grpc"])]
    pub client_id_in_body: bool,
    /// Also call this URL (repeatable) at the same moment as `--url`, with
    /// the same `x-request-id`: as an app propagates the id of the request
    /// it serves to every call it makes for it (Istio asks apps to). Each
    /// call is recorded on its own, with its URL.
    #[arg(long, value_name = "URL", conflicts_with_all = ["no_request_id", "client_id_in_body", "grpc"])]
    pub also_url: Vec<String>,
    /// The share of requests (0 to 1, spread evenly) that carry a W3C
    /// `traceparent` with a new trace id and span id, as an app
    /// instrumented with OpenTelemetry sends.
    #[arg(long, value_name = "SHARE", default_value_t = 0.0)]
    pub traceparent: f64,
    /// Call the lab's gRPC service (`lab.Reviews`, served by apps started
    /// with `--http2`) at the URL's authority instead of GET: every call a
    /// stream on one HTTP/2 connection per service.
    #[arg(long, value_enum, value_name = "KIND")]
    pub grpc: Option<grpc::CallKind>,
    /// Replies per server-streaming call (`--grpc server-stream`).
    #[arg(long, default_value_t = 5, requires = "grpc")]
    pub messages: u32,
}

#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct Summary {
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub by_served_by: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub rate: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

struct Shared {
    opts: LoadOptions,
    resolve: BTreeMap<String, SocketAddr>,
    client: HttpClient,
    grpc: grpc::GrpcClient,
    records: Option<RecordWriter>,
    /// Requests started so far, to spread `--traceparent` evenly.
    started: std::sync::atomic::AtomicU64,
}

pub async fn run(opts: LoadOptions) -> anyhow::Result<Summary> {
    anyhow::ensure!(
        opts.requests.is_some() || opts.duration_s.is_some(),
        "give --requests or --duration-s so the load stops by itself"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&opts.traceparent),
        "--traceparent is a share of requests, from 0 to 1"
    );
    anyhow::ensure!(
        !(opts.grpc.is_some() && opts.new_connections),
        "--grpc calls share one HTTP/2 connection per service: --new-connections does not apply"
    );
    let records = match &opts.records {
        Some(p) => {
            super::ioclock::write_bounds_beside(p)
                .with_context(|| format!("creating bounds beside {}", p.display()))?;
            Some(RecordWriter::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        grpc: grpc::client(&http_client::parse_resolve(&opts.resolve)?),
        resolve: http_client::parse_resolve(&opts.resolve)?,
        client: if opts.new_connections {
            http_client::unpooled_client()
        } else {
            http_client::pooled_client()
        },
        records,
        opts,
        started: Default::default(),
    });
    let started = Instant::now();
    let deadline = shared
        .opts
        .duration_s
        .map(|s| started + Duration::from_secs_f64(s));
    let limit = shared.opts.requests.unwrap_or(u64::MAX);
    let mut tasks = JoinSet::new();
    let mut results = Vec::new();
    match (shared.opts.rate, shared.opts.connections) {
        (Some(rate), _) => {
            anyhow::ensure!(rate > 0.0, "--rate must be positive");
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            for _ in 0..limit {
                tick.tick().await;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let s = shared.clone();
                tasks.spawn(async move { s.one().await });
                // Finished requests leave the set as they go: an hour at
                // thousands a second would otherwise hold every task.
                while let Some(done) = tasks.try_join_next() {
                    results.extend(done.context("request task")?);
                }
            }
        }
        (None, conns) => {
            let conns = conns.unwrap_or(1).max(1) as u64;
            for worker in 0..conns {
                // Spread the request budget over the workers.
                let share = limit / conns + u64::from(worker < limit % conns);
                let s = shared.clone();
                tasks.spawn(async move {
                    let mut out = Vec::new();
                    for _ in 0..share {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            break;
                        }
                        out.extend(s.one().await);
                    }
                    out
                });
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        results.extend(done.context("request task")?);
    }
    Ok(summarize(&results, started.elapsed()))
}

/// (latency, status or 0, served_by)
type Outcome = (Duration, u16, Option<String>);

impl Shared {
    /// One request: to `--url`, and to each `--also-url` at once with the
    /// same id.
    async fn one(self: &Arc<Self>) -> Vec<Outcome> {
        let id = uuid::Uuid::new_v4().to_string();
        let k = self
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed) as f64;
        let share = self.opts.traceparent;
        let traceparent = ((k + 1.0) * share).floor() > (k * share).floor();
        let traceparent = traceparent.then(new_traceparent);
        if let Some(kind) = self.opts.grpc {
            return vec![self.call_grpc(kind, id, traceparent).await];
        }
        if self.opts.also_url.is_empty() {
            return vec![self.fetch(&self.opts.url, id, traceparent).await];
        }
        let mut calls = JoinSet::new();
        for url in std::iter::once(&self.opts.url).chain(&self.opts.also_url) {
            let (s, url, id, tp) = (self.clone(), url.clone(), id.clone(), traceparent.clone());
            calls.spawn(async move { s.fetch(&url, id, tp).await });
        }
        let mut out = Vec::new();
        while let Some(done) = calls.join_next().await {
            // A call that panicked has no outcome to report.
            out.extend(done.ok());
        }
        out
    }

    /// One HTTP request to `url` with id `id`, recorded.
    async fn fetch(&self, url: &str, id: String, traceparent: Option<String>) -> Outcome {
        let t0 = Instant::now();
        let t_start_ns = mono_ns();
        let result = async {
            let header = if self.opts.no_request_id {
                CLIENT_ID
            } else {
                REQUEST_ID
            };
            let req = http_client::request_to(url, &self.resolve)?;
            let (mut req, body) = if self.opts.client_id_in_body {
                let req = req
                    .method(hyper::Method::POST)
                    .header(hyper::header::CONTENT_TYPE, CLIENT_ID_BODY);
                (req, Bytes::from(id.clone()))
            } else {
                (req.header(header, &id), Bytes::new())
            };
            if let Some(tp) = &traceparent {
                req = req.header("traceparent", tp);
            }
            let req = req.body(Full::new(body))?;
            http_client::fetch(&self.client, req).await
        }
        .await;
        let t_end_ns = mono_ns();
        let latency = t0.elapsed();
        // The socket's view of the same exchange: looked up after the body
        // was read, which is fine, as the first write from `t_start_ns` on
        // and the first read after it stay what they were.
        let io = result
            .as_ref()
            .ok()
            .and_then(|(resp, _)| http_client::exchange(resp, t_start_ns));
        let (status, served_by, error) = match result {
            Ok((resp, _)) => (
                resp.status().as_u16(),
                resp.headers()
                    .get(SERVED_BY)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                None,
            ),
            Err(e) => (0, None, Some(format!("{e:#}"))),
        };
        let rec = ClientRecord {
            request_id: id,
            url: url.to_owned(),
            status,
            error,
            served_by,
            t_start_ns,
            t_end_ns,
            t_write_ns: io.map_or(0, |x| x.write_ns),
            t_read_ns: io.and_then(|x| x.read_ns).unwrap_or(0),
            traceparent,
        };
        self.record(rec, latency)
    }

    /// Writes `rec` if records are kept; what the summary counts of it.
    fn record(&self, rec: ClientRecord, latency: Duration) -> Outcome {
        let outcome = (latency, rec.status, rec.served_by.clone());
        if let Some(r) = &self.records {
            r.write(&rec);
        }
        outcome
    }
}

impl Shared {
    /// One gRPC call: recorded as a request whose status is 200 when the
    /// call's status was OK.
    async fn call_grpc(
        &self,
        kind: grpc::CallKind,
        id: String,
        traceparent: Option<String>,
    ) -> Outcome {
        let header = if self.opts.no_request_id {
            CLIENT_ID
        } else {
            REQUEST_ID
        };
        let mut metadata = vec![(header, id.as_str())];
        if let Some(tp) = &traceparent {
            metadata.push(("traceparent", tp.as_str()));
        }
        let t0 = Instant::now();
        let t_start_ns = mono_ns();
        let result = grpc::call(
            &self.grpc,
            &self.opts.url,
            kind,
            self.opts.messages,
            &id,
            &metadata,
        )
        .await;
        let t_end_ns = mono_ns();
        let latency = t0.elapsed();
        // Calls share the connection: the clock tells the call's stream by
        // its head (path and id), the write of its HEADERS frame and the
        // read of its last frame (a call ends with its stream). Without an
        // id on the wire, the first write from its start and the last read
        // before it returned.
        let key = RequestKey {
            path: kind.path().to_owned(),
            request_id: (!self.opts.no_request_id).then(|| id.clone()),
            attempt: None,
        };
        let clock = result.as_ref().ok().and_then(|o| o.clock.clone());
        let stream = clock.as_ref().and_then(|c| c.h2_exchange(&key));
        let t_write_ns = match (stream, &clock) {
            (Some(x), _) => x.write_ns,
            (None, Some(c)) => c.first_write_from(t_start_ns).unwrap_or(0),
            (None, None) => 0,
        };
        let t_read_ns = match (stream.and_then(|x| x.end_ns), &clock) {
            (Some(read), _) => read,
            (None, Some(c)) => c.last_read_until(t_end_ns).unwrap_or(0),
            (None, None) => 0,
        };
        let (status, served_by, error) = match result {
            Ok(o) => (200, o.served_by, None),
            Err(e) => (0, None, Some(format!("{e:#}"))),
        };
        let rec = ClientRecord {
            request_id: id,
            url: self.opts.url.clone(),
            status,
            error,
            served_by,
            t_start_ns,
            t_end_ns,
            t_write_ns,
            t_read_ns,
            traceparent,
        };
        self.record(rec, latency)
    }
}

/// `00-<trace id>-<span id>-01`, both random.
fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

fn summarize(results: &[Outcome], elapsed: Duration) -> Summary {
    let mut s = Summary {
        sent: results.len() as u64,
        elapsed_s: elapsed.as_secs_f64(),
        ..Summary::default()
    };
    let mut lat: Vec<f64> = Vec::with_capacity(results.len());
    for (latency, status, served_by) in results {
        if *status == 0 {
            s.errors += 1;
            continue;
        }
        *s.by_status.entry(*status).or_default() += 1;
        if (200..300).contains(status) {
            s.ok += 1;
        }
        if let Some(p) = served_by {
            *s.by_served_by.entry(p.clone()).or_default() += 1;
        }
        lat.push(latency.as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
        lat[i]
    };
    s.p50_ms = pct(0.5);
    s.p90_ms = pct(0.9);
    s.p99_ms = pct(0.99);
    s.max_ms = lat.last().copied().unwrap_or(0.0);
    s.rate = s.sent as f64 / s.elapsed_s.max(1e-9);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_and_percentiles() {
        let ms = Duration::from_millis;
        let results: Vec<Outcome> = (1..=100)
            .map(|i| {
                (
                    ms(i),
                    if i % 10 == 0 { 503 } else { 200 },
                    Some("reviews-v2".into()),
                )
            })
            .chain([(ms(1000), 0, None)])
            .collect();
        let s = summarize(&results, Duration::from_secs(1));
        assert_eq!(s.sent, 101);
        assert_eq!(s.errors, 1);
        assert_eq!(s.ok, 90);
        assert_eq!(s.by_status[&503], 10);
        assert_eq!(s.by_served_by["reviews-v2"], 100);
        assert_eq!(s.p50_ms, 51.0);
        assert_eq!(s.max_ms, 100.0);
    }
}
