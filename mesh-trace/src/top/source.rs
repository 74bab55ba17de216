//! Where the live view's data comes from, sampled apart from drawing: a
//! task fetches the statistics every interval and publishes the latest on a
//! watch channel, so a slow or dead agent never blocks the keyboard.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{header, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use super::stats::AgentStats;
use crate::agent::http::AgentState;

/// A statistics document larger than this is refused rather than buffered:
/// 2,001 rows with ten slow requests each stay well under it.
const MAX_BODY: usize = 64 << 20;

/// What the view watches.
#[derive(Clone)]
pub enum Source {
    /// An agent's HTTP endpoint.
    Agent(AgentUrl),
    /// An agent running in this process.
    Local(Arc<AgentState>),
}

impl Source {
    /// What the header calls it.
    pub fn describe(&self) -> String {
        match self {
            Source::Agent(url) => url.to_string(),
            Source::Local(_) => "in-process".into(),
        }
    }

    /// The statistics document as JSON text.
    pub async fn fetch_json(&self, timeout: Duration) -> anyhow::Result<String> {
        match self {
            Source::Agent(url) => match tokio::time::timeout(timeout, get(url)).await {
                Ok(result) => result,
                Err(_) => bail!("no answer within {:.1} s", timeout.as_secs_f64()),
            },
            Source::Local(state) => Ok(state.stats_json()),
        }
    }

    pub async fn fetch(&self, timeout: Duration) -> anyhow::Result<AgentStats> {
        let json = self.fetch_json(timeout).await?;
        serde_json::from_str(&json)
            .context("the agent's statistics are not what this version reads")
    }
}

/// `http://host:port[/prefix]` of an agent, split once so that each fetch
/// only connects.
#[derive(Clone, Debug)]
pub struct AgentUrl {
    /// host:port, to connect to and for the Host header.
    authority: String,
    /// Path of the statistics under the agent's prefix.
    path: String,
}

impl AgentUrl {
    pub fn parse(text: &str) -> anyhow::Result<AgentUrl> {
        // A bare host:port is taken as http: the agent serves nothing else.
        let with_scheme = if text.contains("://") {
            text.to_string()
        } else {
            format!("http://{text}")
        };
        let uri: Uri = with_scheme
            .parse()
            .with_context(|| format!("--agent {text}: not a URL"))?;
        if uri.scheme_str() != Some("http") {
            bail!("--agent {text}: only http:// is supported (the agent serves plain HTTP)");
        }
        let Some(authority) = uri.authority() else {
            bail!("--agent {text}: no host");
        };
        let port = authority.port_u16().unwrap_or(80);
        let prefix = uri.path().trim_end_matches('/');
        Ok(AgentUrl {
            authority: format!("{}:{port}", authority.host()),
            path: format!("{prefix}/api/v1/stats"),
        })
    }
}

impl std::fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let base = self.path.trim_end_matches("/api/v1/stats");
        write!(f, "http://{}{base}", self.authority)
    }
}

/// One HTTP/1.1 GET on a fresh connection: the agent is local or a node
/// away, a request per second, so pooling would only add state to recover
/// when it restarts.
async fn get(url: &AgentUrl) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(&url.authority)
        .await
        .with_context(|| format!("connecting to {}", url.authority))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    // The connection is driven next to the request, and dropped with it.
    let request = async move {
        let req = Request::get(url.path.as_str())
            .header(header::HOST, url.authority.as_str())
            .header(header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .context("building the request")?;
        let resp = sender
            .send_request(req)
            .await
            .context("sending the request")?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the response: {e}"))?
            .to_bytes();
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body);
            bail!("HTTP {status} from {}: {}", url.path, text.trim());
        }
        String::from_utf8(body.to_vec()).context("the response is not UTF-8")
    };
    tokio::select! {
        r = request => r,
        r = connection => match r {
            Ok(()) => bail!("the agent closed the connection without answering"),
            Err(e) => Err(anyhow::Error::new(e).context("HTTP connection")),
        },
    }
}

/// One fetch: the statistics or why there are none.
#[derive(Debug)]
pub struct Sample {
    /// Counts fetches, so the view can tell a new sample from the last one.
    pub seq: u64,
    /// When the fetch completed: rates from counters use the time between
    /// samples, not the nominal interval.
    pub at: Instant,
    pub result: Result<AgentStats, String>,
}

pub type Samples = watch::Receiver<Option<Arc<Sample>>>;

/// How long one fetch may take: at least a second so a short interval does
/// not turn a busy agent into an unreachable one, at most five.
pub fn fetch_timeout(interval: Duration) -> Duration {
    interval.clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// Starts fetching from `source` every `interval` on the current tokio
/// runtime; stops when every receiver is dropped.
pub fn spawn_sampler(source: Source, interval: Duration) -> Samples {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        // After a slow fetch, wait a whole interval again rather than
        // catching up with a burst.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0;
        loop {
            tokio::select! {
                _ = tx.closed() => break,
                _ = tick.tick() => {}
            }
            let result = tokio::select! {
                _ = tx.closed() => break,
                r = source.fetch(fetch_timeout(interval)) => r.map_err(|e| reason(&e)),
            };
            seq += 1;
            let sample = Sample {
                seq,
                at: Instant::now(),
                result,
            };
            if tx.send(Some(Arc::new(sample))).is_err() {
                break;
            }
        }
    });
    rx
}

/// A failure on one line: the innermost causes say what happened
/// ("Connection refused"), the outer ones where.
fn reason(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    text.replace(" (os error 111)", "")
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls() {
        let u = AgentUrl::parse("http://127.0.0.1:9464").unwrap();
        assert_eq!(u.authority, "127.0.0.1:9464");
        assert_eq!(u.path, "/api/v1/stats");
        assert_eq!(u.to_string(), "http://127.0.0.1:9464");
        let u = AgentUrl::parse("localhost:1234/").unwrap();
        assert_eq!(u.authority, "localhost:1234");
        assert_eq!(u.path, "/api/v1/stats");
        let u = AgentUrl::parse("http://node-1/mesh-trace/").unwrap();
        assert_eq!(u.authority, "node-1:80");
        assert_eq!(u.path, "/mesh-trace/api/v1/stats");
        assert_eq!(u.to_string(), "http://node-1:80/mesh-trace");
        assert!(AgentUrl::parse("https://node:9464").is_err());
        assert!(AgentUrl::parse("http://").is_err());
    }

    #[test]
    fn fetch_timeout_is_bounded() {
        assert_eq!(
            fetch_timeout(Duration::from_millis(100)),
            Duration::from_secs(1)
        );
        assert_eq!(
            fetch_timeout(Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        assert_eq!(
            fetch_timeout(Duration::from_secs(60)),
            Duration::from_secs(5)
        );
    }

    #[tokio::test]
    async fn an_unreachable_agent_is_a_sample_with_a_reason() {
        // A port nobody listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = AgentUrl::parse(&format!("127.0.0.1:{port}")).unwrap();
        let mut rx = spawn_sampler(Source::Agent(url), Duration::from_millis(50));
        rx.changed().await.unwrap();
        let sample = rx.borrow_and_update().clone().unwrap();
        assert_eq!(sample.seq, 1);
        let reason = sample.result.as_ref().unwrap_err();
        assert!(reason.contains("refused"), "{reason}");
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().as_ref().unwrap().seq, 2);
    }

    #[tokio::test]
    async fn reads_a_local_agents_statistics() {
        let state = Arc::new(AgentState::new());
        let stats = Source::Local(state)
            .fetch(Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(stats.agent.version, env!("CARGO_PKG_VERSION"));
        assert!(stats.rows.is_empty());
    }

    #[tokio::test]
    async fn fetches_over_http_from_the_agents_server() {
        let state = Arc::new(AgentState::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, stop_rx) = watch::channel(false);
        tokio::spawn(crate::agent::http::serve(
            listener,
            state,
            Default::default(),
            stop_rx,
        ));
        let url = AgentUrl::parse(&format!("http://{addr}")).unwrap();
        let stats = Source::Agent(url)
            .fetch(Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(stats.window_s, 60.0);
        // A wrong prefix is a 404, reported with its status.
        let url = AgentUrl::parse(&format!("http://{addr}/nope")).unwrap();
        let err = Source::Agent(url)
            .fetch(Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("404"), "{err:#}");
    }
}
