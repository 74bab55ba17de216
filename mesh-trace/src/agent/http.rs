//! `/metrics`, `/healthz` and `/readyz`; the per-request detail
//! (`/api/v1/stats`, and the feeds `/api/v1/spans` and `/api/v1/flows`) to
//! loopback clients unless asked.
use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{body::Incoming, header::CONTENT_TYPE, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

use super::{
    feed::{FeedBody, Feeds},
    metrics::Metrics,
};
use crate::spans::live::LiveStats;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves OpenMetrics to clients that ask for it (Prometheus does), and the
/// classic text format otherwise, as Prometheus' own client libraries do.
fn wants_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// What the endpoints report.
pub struct AgentState {
    pub metrics: Metrics,
    /// Set once every program is attached.
    pub ready: AtomicBool,
    /// Set once the metadata source has its first complete view.
    pub metadata_synced: AtomicBool,
    /// Sliding-window percentiles per service and hop.
    pub live: std::sync::Mutex<LiveStats>,
    /// What the agent is doing, for `top`'s header.
    pub info: std::sync::Mutex<AgentInfo>,
    /// Its spans and legs as they happen, for `spans` and `flows`.
    pub feeds: Feeds,
}

/// The agent's own state, served with the live statistics.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub programs: Vec<String>,
    /// Optional programs that could not be attached, with what that costs.
    pub fallbacks: Vec<String>,
    pub netns_watched: usize,
    pub flows_tracked: usize,
    pub requests_in_flight: usize,
    pub events_total: u64,
    pub events_lost: u64,
    /// Agents reporting, when the document was put together from a
    /// Prometheus that scrapes them all (`top --prometheus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<usize>,
}

/// Window of the live statistics.
pub const LIVE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl AgentState {
    pub fn new() -> Self {
        AgentState {
            metrics: Metrics::new(),
            ready: AtomicBool::new(false),
            metadata_synced: AtomicBool::new(false),
            live: std::sync::Mutex::new(LiveStats::new(LIVE_WINDOW, 12, 2_000)),
            info: std::sync::Mutex::new(AgentInfo {
                version: env!("CARGO_PKG_VERSION").into(),
                ..AgentInfo::default()
            }),
            feeds: Feeds::default(),
        }
    }

    /// The JSON document of `/api/v1/stats`.
    pub fn stats_json(&self) -> String {
        let snapshot = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot(crate::clock::mono_ns());
        let info = self.info.lock().unwrap_or_else(|p| p.into_inner()).clone();
        serde_json::json!({ "agent": info, "window_s": snapshot.window_s, "rows": snapshot.rows })
            .to_string()
    }
}

impl Default for AgentState {
    fn default() -> Self {
        Self::new()
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

/// Who may read the per-request detail (`/api/v1/stats` and the feeds),
/// which names request paths and `x-request-id`s: by default only clients
/// on the agent's own loopback (`mesh-trace top`, `spans` or `flows` on the
/// node, or `kubectl port-forward`); `/metrics` holds no per-request detail
/// and is served to anyone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StatsAccess {
    #[default]
    LoopbackOnly,
    Anyone,
}

impl StatsAccess {
    fn allows(self, peer: std::net::SocketAddr) -> bool {
        self == StatsAccess::Anyone || peer.ip().to_canonical().is_loopback()
    }
}

const STATS_REFUSED: &str = "/api/v1/stats, /api/v1/spans and /api/v1/flows name request \
    paths and ids: they are served to loopback clients only (run mesh-trace top, spans or \
    flows on the node, or kubectl port-forward to the agent's pod); start the agent with \
    --stats-from-anywhere to serve them to any client\n";

fn route(
    state: &AgentState,
    req: &Request<Incoming>,
    stats_allowed: bool,
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/metrics" if wants_openmetrics(req) => {
            respond(StatusCode::OK, OPENMETRICS, state.metrics.encode())
        }
        "/metrics" => respond(
            StatusCode::OK,
            PROMETHEUS_TEXT,
            state.metrics.encode_prometheus_text(),
        ),
        "/healthz" => respond(StatusCode::OK, TEXT, "ok\n"),
        "/api/v1/stats" if !stats_allowed => respond(StatusCode::FORBIDDEN, TEXT, STATS_REFUSED),
        "/api/v1/stats" => respond(StatusCode::OK, "application/json", state.stats_json()),
        "/readyz" => match (
            state.ready.load(Ordering::Acquire),
            state.metadata_synced.load(Ordering::Acquire),
        ) {
            (true, true) => respond(StatusCode::OK, TEXT, "ready\n"),
            (false, _) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "not ready: programs not attached yet\n",
            ),
            (true, false) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "not ready: pods and services not listed from the API server yet\n",
            ),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics, /healthz, /readyz, /api/v1/stats, /api/v1/spans or \
             /api/v1/flows\n",
        ),
    }
}

type Body = Either<Full<Bytes>, FeedBody>;

/// The feeds, streamed; everything else from [`route`].
fn route_or_follow(
    state: &AgentState,
    req: &Request<Incoming>,
    detail_allowed: bool,
    stop: &watch::Receiver<bool>,
) -> Response<Body> {
    let query = req.uri().query().unwrap_or("");
    let feed = match req.uri().path() {
        "/api/v1/spans" | "/api/v1/flows" if !detail_allowed => {
            return respond(
                StatusCode::FORBIDDEN,
                "text/plain; charset=utf-8",
                STATS_REFUSED,
            )
            .map(Either::Left)
        }
        "/api/v1/spans" => state.feeds.spans(query, stop.clone()),
        "/api/v1/flows" => state.feeds.legs(query, stop.clone()),
        _ => return route(state, req, detail_allowed).map(Either::Left),
    };
    match feed {
        Ok(body) => Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, "application/x-ndjson")
            .body(Either::Right(body))
            .expect("static response parts are valid"),
        Err(why) => respond(
            StatusCode::BAD_REQUEST,
            "text/plain; charset=utf-8",
            format!("{why}\n"),
        )
        .map(Either::Left),
    }
}

/// Serves until `shutdown` changes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AgentState>,
    stats: StatsAccess,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("metrics listener: {e}");
                    continue;
                }
            },
        };
        let state = state.clone();
        let stats_allowed = stats.allows(peer);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let resp = route_or_follow(&state, &req, stats_allowed, &stop);
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_access_by_peer() {
        let peer = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let only = StatsAccess::LoopbackOnly;
        assert!(only.allows(peer("127.0.0.1:5000")));
        assert!(only.allows(peer("127.3.2.1:5000")));
        assert!(only.allows(peer("[::1]:5000")));
        assert!(only.allows(peer("[::ffff:127.0.0.1]:5000")));
        assert!(!only.allows(peer("10.0.0.7:5000")));
        assert!(!only.allows(peer("[fd00::7]:5000")));
        assert!(StatsAccess::Anyone.allows(peer("10.0.0.7:5000")));
    }
}
