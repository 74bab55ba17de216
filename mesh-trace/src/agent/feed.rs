//! The agent's spans and legs as they happen, served as JSON lines on
//! `/api/v1/spans` and `/api/v1/flows` to `mesh-trace spans --agent` and
//! `flows --agent` on the node: a second set of probes beside the agent's
//! would contend for its hooks, so they read the agent's instead.
//!
//! Each feed is a broadcast channel of [`FEED_CAPACITY`] items that costs
//! nothing while no one follows it. A reader that falls behind misses the
//! oldest items and is told how many in a line of its own,
//! `{"skipped":N}`: the agent never waits for a reader.
use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::{broadcast, mpsc, watch};

use crate::{
    flows::{legs::LegKind, table::LegRecord},
    spans::span::Span,
};

/// Items a feed holds for its slowest reader.
pub const FEED_CAPACITY: usize = 4096;

/// The two feeds.
pub struct Feeds {
    spans: broadcast::Sender<Arc<Span>>,
    legs: broadcast::Sender<Arc<LegRecord>>,
}

impl Default for Feeds {
    fn default() -> Self {
        Feeds {
            spans: broadcast::channel(FEED_CAPACITY).0,
            legs: broadcast::channel(FEED_CAPACITY).0,
        }
    }
}

impl Feeds {
    /// Offers a span to whoever follows; copied only if someone does.
    pub fn publish_span(&self, span: &Span) {
        if self.spans.receiver_count() > 0 {
            let _ = self.spans.send(Arc::new(span.clone()));
        }
    }

    pub fn publish_leg(&self, leg: &LegRecord) {
        if self.legs.receiver_count() > 0 {
            let _ = self.legs.send(Arc::new(leg.clone()));
        }
    }

    /// The body of `/api/v1/spans?QUERY`, or why the query is wrong.
    pub fn spans(&self, query: &str, stop: watch::Receiver<bool>) -> Result<FeedBody, String> {
        let filter = SpanFilter::from_query(query)?;
        Ok(follow(self.spans.subscribe(), stop, move |s: &Span| {
            filter.matches(s).then(|| s.to_json().to_string())
        }))
    }

    /// The body of `/api/v1/flows?QUERY`, or why the query is wrong.
    pub fn legs(&self, query: &str, stop: watch::Receiver<bool>) -> Result<FeedBody, String> {
        let filter = LegFilter::from_query(query)?;
        Ok(follow(self.legs.subscribe(), stop, move |l: &LegRecord| {
            filter
                .matches(l)
                .then(|| serde_json::to_string(l).unwrap_or_default())
        }))
    }
}

/// Which spans a reader wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpanFilter {
    /// Only requests to this service.
    pub service: Option<String>,
    /// Only requests from this workload.
    pub workload: Option<String>,
}

impl SpanFilter {
    pub fn matches(&self, s: &Span) -> bool {
        self.service
            .as_ref()
            .is_none_or(|want| &s.destination_service == want)
            && self
                .workload
                .as_ref()
                .is_none_or(|want| &s.source_workload == want)
    }

    pub fn to_query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        if let Some(s) = &self.service {
            q.append_pair("service", s);
        }
        if let Some(w) = &self.workload {
            q.append_pair("workload", w);
        }
        q.finish()
    }

    pub fn from_query(query: &str) -> Result<SpanFilter, String> {
        let mut f = SpanFilter::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "service" => f.service = Some(value.into_owned()),
                "workload" => f.workload = Some(value.into_owned()),
                other => return Err(format!("unknown filter {other:?}: try service, workload")),
            }
        }
        Ok(f)
    }
}

/// Which legs a reader wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LegFilter {
    /// Only legs with a socket in this pod.
    pub pod: Option<String>,
    /// Only legs with this port on either end or as original destination.
    pub port: Option<u16>,
    /// Only these kinds (any when empty).
    pub kinds: Vec<LegKind>,
    /// Only closed legs.
    pub closed: bool,
}

impl LegFilter {
    pub fn matches(&self, rec: &LegRecord) -> bool {
        let sockets = || rec.client.iter().chain(rec.server.iter());
        (!self.closed || rec.event == "close")
            && (self.kinds.is_empty() || self.kinds.contains(&rec.leg))
            && self.pod.as_ref().is_none_or(|want| {
                sockets().any(|s| s.pod.as_ref().is_some_and(|p| &p.name == want))
            })
            && self.port.is_none_or(|port| {
                rec.original_dst.is_some_and(|d| d.port() == port)
                    || sockets().any(|s| s.local.port() == port || s.remote.port() == port)
            })
    }

    pub fn to_query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        if let Some(p) = &self.pod {
            q.append_pair("pod", p);
        }
        if let Some(p) = self.port {
            q.append_pair("port", &p.to_string());
        }
        for k in &self.kinds {
            q.append_pair("leg", k.label());
        }
        if self.closed {
            q.append_pair("closed", "true");
        }
        q.finish()
    }

    pub fn from_query(query: &str) -> Result<LegFilter, String> {
        let mut f = LegFilter::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "pod" => f.pod = Some(value.into_owned()),
                "port" => {
                    f.port = Some(
                        value
                            .parse()
                            .map_err(|_| format!("port={value}: not a port"))?,
                    )
                }
                "leg" => f.kinds.push(
                    // As metrics label it, or as the command line writes it.
                    LegKind::ALL
                        .into_iter()
                        .find(|k| k.label() == value.replace('-', "_"))
                        .ok_or_else(|| format!("leg={value}: not a leg kind"))?,
                ),
                "closed" => {
                    f.closed = value
                        .parse()
                        .map_err(|_| format!("closed={value}: true or false"))?
                }
                other => {
                    return Err(format!(
                        "unknown filter {other:?}: try pod, port, leg, closed"
                    ))
                }
            }
        }
        Ok(f)
    }
}

/// A streamed response body: the lines a forwarding task sends.
pub struct FeedBody {
    lines: mpsc::Receiver<Bytes>,
}

impl Body for FeedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.lines
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

/// Forwards what `keep` turns into a line, until the reader goes away or
/// the agent stops.
fn follow<T: Send + Sync + 'static>(
    mut items: broadcast::Receiver<Arc<T>>,
    mut stop: watch::Receiver<bool>,
    keep: impl Fn(&T) -> Option<String> + Send + 'static,
) -> FeedBody {
    let (tx, lines) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let line = tokio::select! {
                _ = tx.closed() => return,
                _ = stop.changed() => return,
                item = items.recv() => match item {
                    Ok(item) => match keep(&item) {
                        Some(line) => line,
                        None => continue,
                    },
                    Err(broadcast::error::RecvError::Lagged(n)) => format!("{{\"skipped\":{n}}}"),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(Bytes::from(line + "\n")).await.is_err() {
                return;
            }
        }
    });
    FeedBody { lines }
}

/// A `{"skipped":N}` line: N items the reader fell too far behind to get.
pub fn skipped(line: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let obj = v.as_object()?;
    (obj.len() == 1).then(|| obj.get("skipped")?.as_u64())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_go_through_the_query_string_and_back() {
        let spans = SpanFilter {
            service: Some("reviews".into()),
            workload: Some("a b&c".into()),
        };
        assert_eq!(SpanFilter::from_query(&spans.to_query()), Ok(spans));
        assert_eq!(SpanFilter::from_query(""), Ok(SpanFilter::default()));
        assert!(SpanFilter::from_query("pod=x").is_err());
        let legs = LegFilter {
            pod: Some("reviews-v1".into()),
            port: Some(9080),
            kinds: vec![LegKind::Mesh, LegKind::Passthrough],
            closed: true,
        };
        assert_eq!(LegFilter::from_query(&legs.to_query()), Ok(legs));
        assert!(LegFilter::from_query("port=99999").is_err());
        assert!(LegFilter::from_query("leg=sideways").is_err());
        assert!(LegFilter::from_query("closed=maybe").is_err());
    }

    #[test]
    fn skipped_lines_are_told_apart_from_items() {
        assert_eq!(skipped("{\"skipped\":12}"), Some(12));
        assert_eq!(skipped("{\"skipped\":12,\"method\":\"GET\"}"), None);
        assert_eq!(skipped("{\"method\":\"GET\"}"), None);
        assert_eq!(skipped("not json"), None);
    }

    #[tokio::test]
    async fn a_feed_costs_nothing_unfollowed_and_tells_a_slow_reader_what_it_missed() {
        use http_body_util::BodyExt as _;
        let feeds = Feeds::default();
        let legs_only = |n: usize| LegRecord {
            event: "open",
            leg: LegKind::Mesh,
            direction: "outbound",
            source_workload: "a".into(),
            destination_service: "b".into(),
            original_dst: None,
            client: None,
            server: None,
            opened_ns: n as u64,
            closed_ns: None,
        };
        // No reader: nothing is kept.
        feeds.publish_leg(&legs_only(0));
        assert_eq!(feeds.legs.len(), 0);
        let (_stop, stopped) = watch::channel(false);
        let mut body = feeds.legs("", stopped).unwrap();
        for n in 0..FEED_CAPACITY + 10 {
            feeds.publish_leg(&legs_only(n));
        }
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(
            skipped(std::str::from_utf8(&first).unwrap().trim()),
            Some(10)
        );
        let next = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(std::str::from_utf8(&next).unwrap().contains("\"event\""));
    }
}
