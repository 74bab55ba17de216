//! Where the live view's data comes from, sampled apart from drawing: a
//! task fetches the statistics every interval and publishes the latest on a
//! watch channel, so a slow or dead agent never blocks the keyboard.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use tokio::sync::watch;

use super::stats::AgentStats;
pub use crate::agent::client::AgentUrl;
use crate::agent::{client, http::AgentState};

/// What the view watches.
#[derive(Clone)]
pub enum Source {
    /// An agent's HTTP endpoint.
    Agent(AgentUrl),
    /// An agent running in this process.
    Local(Arc<AgentState>),
    /// Every agent, through the Prometheus that scrapes them.
    Prometheus(AgentUrl),
}

impl Source {
    /// What the header calls it.
    pub fn describe(&self) -> String {
        match self {
            Source::Agent(url) => url.to_string(),
            Source::Local(_) => "in-process".into(),
            Source::Prometheus(url) => format!("prometheus {url}"),
        }
    }

    /// The statistics document as JSON text.
    pub async fn fetch_json(&self, timeout: Duration) -> anyhow::Result<String> {
        match self {
            Source::Agent(url) => match tokio::time::timeout(
                timeout,
                client::get_text(url, &url.path("/api/v1/stats")),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => bail!("no answer within {:.1} s", timeout.as_secs_f64()),
            },
            Source::Local(state) => Ok(state.stats_json()),
            Source::Prometheus(url) => {
                serde_json::to_string(&from_prometheus(url, timeout).await?).context("encoding")
            }
        }
    }

    pub async fn fetch(&self, timeout: Duration) -> anyhow::Result<AgentStats> {
        if let Source::Prometheus(url) = self {
            return from_prometheus(url, timeout).await;
        }
        let json = self.fetch_json(timeout).await?;
        serde_json::from_str(&json)
            .context("the agent's statistics are not what this version reads")
    }
}

async fn from_prometheus(url: &AgentUrl, timeout: Duration) -> anyhow::Result<AgentStats> {
    match tokio::time::timeout(timeout, super::prometheus::fetch(url)).await {
        Ok(result) => result,
        Err(_) => bail!("no answer within {:.1} s", timeout.as_secs_f64()),
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
