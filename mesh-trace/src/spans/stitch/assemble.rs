//! The spans being assembled: started by the app's request, given a moment
//! at every socket the request and its response cross, completed when the
//! response reaches the app. Responses come back on the socket the request
//! went out on: each socket keeps its outstanding requests in order
//! (HTTP/1.1). Bounded: the least recently touched span is dropped first.
use std::collections::VecDeque;

use lru::LruCache;

use super::{place::Place, SpanId, Unstitched};
use crate::spans::{
    http::{Head, Message},
    span::Span,
};

struct Pending {
    span: Span,
    started_ns: u64,
}

/// A socket's requests sent (client end) or received (server end), oldest
/// first, waiting for their response.
#[derive(Debug, Default)]
pub(super) struct Outstanding(VecDeque<SpanId>);

impl Outstanding {
    pub(super) fn push(&mut self, id: SpanId) {
        self.0.push_back(id);
    }
}

/// The spans in flight.
pub(super) struct Spans {
    spans: LruCache<SpanId, Pending>,
    next: SpanId,
}

impl Spans {
    /// At most `max_pending` in flight.
    pub(super) fn new(max_pending: usize) -> Spans {
        let cap = std::num::NonZeroUsize::new(max_pending.max(1)).expect("max(1)");
        Spans {
            spans: LruCache::new(cap),
            next: 1,
        }
    }

    /// A new span from the app's request, labelled with its leg's source
    /// and destination. The reason to count when an older span was dropped
    /// to make room.
    pub(super) fn start(
        &mut self,
        source: String,
        destination: String,
        msg: &Message,
    ) -> (SpanId, Option<Unstitched>) {
        let request_id = match &msg.head {
            Head::Request { request_id, .. } => request_id.clone(),
            _ => None,
        };
        let id = self.next;
        self.next += 1;
        let span = Span {
            request_id,
            method: String::new(),
            path: String::new(),
            status: 0,
            source_workload: source,
            destination_service: destination,
            destination_pod: None,
            moments: [None; 12],
            retries: 0,
        };
        let evicted = self
            .spans
            .push(
                id,
                Pending {
                    span,
                    started_ns: msg.ts_ns,
                },
            )
            .is_some_and(|(old, _)| old != id);
        (id, evicted.then_some(Unstitched::Evicted))
    }

    /// Records the request of span `id` at request moment `moment`; the
    /// first head that shows a request gives the span its method and path.
    /// The span, for more to record, unless it was dropped.
    pub(super) fn request(
        &mut self,
        id: SpanId,
        moment: usize,
        ts_ns: u64,
        head: Option<&Head>,
    ) -> Result<&mut Span, Unstitched> {
        let Some(p) = self.spans.get_mut(&id) else {
            return Err(Unstitched::Evicted);
        };
        p.span.moments[moment] = Some(ts_ns);
        if let Some(Head::Request { method, path, .. }) = head {
            if p.span.method.is_empty() {
                p.span.method = method.clone();
                p.span.path = crate::spans::http::template_path(path);
            }
        }
        Ok(&mut p.span)
    }

    /// A request id seen for span `id`, kept unless it has one.
    pub(super) fn note_request_id(&mut self, id: SpanId, request_id: Option<&str>) {
        if let (Some(rid), Some(p)) = (request_id, self.spans.get_mut(&id)) {
            p.span.request_id.get_or_insert_with(|| rid.to_owned());
        }
    }

    /// The request id span `id` is known by.
    pub(super) fn request_id(&self, id: SpanId) -> Option<String> {
        self.spans.peek(&id).and_then(|p| p.span.request_id.clone())
    }

    /// Another upstream attempt of span `id`.
    pub(super) fn retried(&mut self, id: SpanId) {
        if let Some(p) = self.spans.get_mut(&id) {
            p.span.retries += 1;
        }
    }

    /// A response on a socket at `place` with the socket's `outstanding`
    /// requests (None when the socket is not tracked); `peer_here` when the
    /// other end of its leg is traced on this node. The span it completes,
    /// when it reached the app.
    pub(super) fn response(
        &mut self,
        outstanding: Option<&mut Outstanding>,
        place: Place,
        peer_here: bool,
        msg: &Message,
    ) -> Result<Option<Span>, Unstitched> {
        let (_, at) = place.moments();
        // Bytes from a server on this node that has not received the request
        // yet are not its response (e.g. a TLS session ticket).
        if place.sends_requests() && peer_here {
            let next = place.moments().0 + 1;
            let waiting = outstanding
                .as_ref()
                .and_then(|s| s.0.front())
                .and_then(|id| self.spans.peek(id))
                .is_some_and(|p| p.span.moments[next].is_none());
            if waiting {
                return Err(Unstitched::NoRequest);
            }
        }
        let Some(id) = outstanding.and_then(|s| s.0.pop_front()) else {
            return Err(Unstitched::NoRequest);
        };
        let Some(p) = self.spans.get_mut(&id) else {
            return Err(Unstitched::Evicted);
        };
        p.span.moments[at] = Some(msg.ts_ns);
        if let Head::Response { status, .. } = msg.head {
            // The status the client finally sees wins: it is written last.
            p.span.status = status;
        }
        if place == Place::AppClient {
            if let Some(done) = self.spans.pop(&id) {
                return Ok(Some(done.span));
            }
        }
        Ok(None)
    }

    /// Drops spans started `timeout_ns` or longer before `now_ns`; returns
    /// how many.
    pub(super) fn expire(&mut self, now_ns: u64, timeout_ns: u64) -> u64 {
        let mut expired = 0;
        while let Some((_, p)) = self.spans.peek_lru() {
            if now_ns.saturating_sub(p.started_ns) < timeout_ns {
                break;
            }
            self.spans.pop_lru();
            expired += 1;
        }
        expired
    }

    /// Spans in flight.
    pub(super) fn len(&self) -> usize {
        self.spans.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::http::Dir;

    fn request(path: &str, request_id: Option<&str>) -> Head {
        Head::Request {
            method: "GET".into(),
            path: path.into(),
            host: None,
            request_id: request_id.map(str::to_string),
        }
    }

    fn response(status: u16) -> Head {
        Head::Response {
            status,
            request_id: None,
        }
    }

    fn msg(dir: Dir, ts_ns: u64, head: Head) -> Message {
        Message {
            dir,
            ts_ns,
            tid: 1,
            offset: 0,
            head,
        }
    }

    /// A span started by the app's request at `ts_ns`, its t0 recorded.
    fn started(spans: &mut Spans, ts_ns: u64, path: &str) -> SpanId {
        let m = msg(Dir::Send, ts_ns, request(path, Some("rid")));
        let (id, evicted) = spans.start("productpage".into(), "reviews".into(), &m);
        assert_eq!(evicted, None);
        spans.request(id, 0, ts_ns, Some(&m.head)).unwrap();
        id
    }

    fn at_app_client(spans: &mut Spans, id: SpanId) -> Option<Span> {
        let mut out = Outstanding::default();
        out.push(id);
        spans
            .response(
                Some(&mut out),
                Place::AppClient,
                false,
                &msg(Dir::Recv, 1_000, response(200)),
            )
            .unwrap()
    }

    #[test]
    fn start_labels_the_span_and_takes_the_request_id() {
        let mut spans = Spans::new(8);
        let id = started(&mut spans, 10, "/reviews/0");
        assert_eq!(spans.len(), 1);
        assert_eq!(spans.request_id(id), Some("rid".into()));
        let done = at_app_client(&mut spans, id).expect("completed");
        assert_eq!(done.source_workload, "productpage");
        assert_eq!(done.destination_service, "reviews");
        assert_eq!(done.request_id.as_deref(), Some("rid"));
    }

    #[test]
    fn moments_recorded_and_the_first_head_names_the_request() {
        let mut spans = Spans::new(8);
        let id = started(&mut spans, 10, "/reviews/0?u=1");
        // A later head (the sidecar's rewrite) does not rename it.
        spans
            .request(id, 2, 30, Some(&request("/other", None)))
            .unwrap();
        // A read that did not start with the head still has its moment.
        spans.request(id, 3, 40, None).unwrap();
        let done = at_app_client(&mut spans, id).expect("completed");
        assert_eq!(done.method, "GET");
        assert_eq!(done.path, "/reviews/:id");
        let mut want = [None; 12];
        want[0] = Some(10);
        want[2] = Some(30);
        want[3] = Some(40);
        want[11] = Some(1_000);
        assert_eq!(done.moments, want);
        assert_eq!(done.status, 200);
    }

    #[test]
    fn response_pops_the_oldest_outstanding() {
        let mut spans = Spans::new(8);
        let first = started(&mut spans, 10, "/a");
        let second = started(&mut spans, 20, "/b");
        // The inbound sidecar's 15006 socket received both.
        let mut out = Outstanding::default();
        out.push(first);
        out.push(second);
        let r = spans.response(
            Some(&mut out),
            Place::InboundDown,
            true,
            &msg(Dir::Send, 100, response(503)),
        );
        assert!(matches!(r, Ok(None)));
        assert_eq!(out.0, VecDeque::from([second]));
        let done = at_app_client(&mut spans, first).expect("completed");
        assert_eq!(done.moments[8], Some(100));
        let other = at_app_client(&mut spans, second).expect("completed");
        assert_eq!(other.moments[8], None);
    }

    #[test]
    fn status_written_last_wins() {
        let mut spans = Spans::new(8);
        let id = started(&mut spans, 10, "/a");
        let mut out = Outstanding::default();
        out.push(id);
        spans
            .response(
                Some(&mut out),
                Place::AppServer,
                false,
                &msg(Dir::Send, 50, response(503)),
            )
            .unwrap();
        let done = at_app_client(&mut spans, id).expect("completed");
        assert_eq!(done.status, 200);
        assert_eq!(done.moments[6], Some(50));
    }

    #[test]
    fn response_with_nothing_outstanding_is_no_request() {
        let mut spans = Spans::new(8);
        let r = |spans: &mut Spans, out: Option<&mut Outstanding>| {
            spans.response(
                out,
                Place::OutboundDown,
                true,
                &msg(Dir::Send, 5, response(200)),
            )
        };
        assert_eq!(r(&mut spans, None).err(), Some(Unstitched::NoRequest));
        let mut empty = Outstanding::default();
        assert_eq!(
            r(&mut spans, Some(&mut empty)).err(),
            Some(Unstitched::NoRequest)
        );
    }

    #[test]
    fn bytes_before_the_server_here_received_the_request_are_no_response() {
        let mut spans = Spans::new(8);
        let id = started(&mut spans, 10, "/a");
        let mut out = Outstanding::default();
        out.push(id);
        let ticket = msg(Dir::Recv, 20, Head::Opaque { tls: true });
        // The app client's peer (the sidecar's 15001 socket) has not read
        // it: t1 is missing.
        assert_eq!(
            spans
                .response(Some(&mut out), Place::AppClient, true, &ticket)
                .err(),
            Some(Unstitched::NoRequest)
        );
        assert_eq!(out.0, VecDeque::from([id]));
        assert_eq!(spans.len(), 1);
        // With the server not on this node there is no t1 to wait for.
        let done = spans.response(Some(&mut out), Place::AppClient, false, &ticket);
        assert!(matches!(done, Ok(Some(ref s)) if s.moments[11] == Some(20)));
    }

    #[test]
    fn completion_only_at_the_app_client() {
        let mut spans = Spans::new(8);
        let id = started(&mut spans, 10, "/a");
        spans.request(id, 1, 11, None).unwrap();
        let mut out = Outstanding::default();
        out.push(id);
        out.push(id);
        let r = spans.response(
            Some(&mut out),
            Place::OutboundDown,
            false,
            &msg(Dir::Send, 90, response(200)),
        );
        assert!(matches!(r, Ok(None)));
        assert_eq!(spans.len(), 1);
        let done = spans
            .response(
                Some(&mut out),
                Place::AppClient,
                true,
                &msg(Dir::Recv, 100, response(200)),
            )
            .unwrap()
            .expect("completed");
        assert_eq!(done.moments[10], Some(90));
        assert_eq!(done.moments[11], Some(100));
        assert_eq!(spans.len(), 0);
    }

    #[test]
    fn retries_and_request_ids_noted() {
        let mut spans = Spans::new(8);
        let m = msg(Dir::Send, 10, request("/a", None));
        let (id, _) = spans.start("a".into(), "b".into(), &m);
        spans.note_request_id(id, None);
        assert_eq!(spans.request_id(id), None);
        spans.note_request_id(id, Some("first"));
        spans.note_request_id(id, Some("second"));
        spans.retried(id);
        spans.retried(id);
        let done = at_app_client(&mut spans, id).expect("completed");
        assert_eq!(done.request_id.as_deref(), Some("first"));
        assert_eq!(done.retries, 2);
    }

    #[test]
    fn expiry_drops_and_counts_the_timed_out() {
        let mut spans = Spans::new(8);
        let old = started(&mut spans, 0, "/a");
        let young = started(&mut spans, 50, "/b");
        assert_eq!(spans.expire(59, 60), 0);
        assert_eq!(spans.expire(100, 60), 1);
        assert_eq!(spans.len(), 1);
        assert_eq!(
            spans.request(old, 1, 1, None).err(),
            Some(Unstitched::Evicted)
        );
        assert!(spans.request(young, 1, 1, None).is_ok());
        assert_eq!(spans.expire(u64::MAX, 60), 1);
        assert_eq!(spans.len(), 0);
    }

    #[test]
    fn eviction_when_full_is_counted_and_the_dropped_span_is_gone() {
        let mut spans = Spans::new(2);
        let first = started(&mut spans, 1, "/a");
        let second = started(&mut spans, 2, "/b");
        // Touching the first makes the second the least recently used.
        spans.request(first, 1, 3, None).unwrap();
        let m = msg(Dir::Send, 4, request("/c", None));
        let (third, evicted) = spans.start("a".into(), "b".into(), &m);
        assert_eq!(evicted, Some(Unstitched::Evicted));
        assert_eq!(spans.len(), 2);
        assert_eq!(
            spans.request(second, 1, 5, None).err(),
            Some(Unstitched::Evicted)
        );
        assert!(spans.request(first, 2, 5, None).is_ok());
        assert!(spans.request(third, 1, 5, None).is_ok());
        // A response for a dropped span.
        let mut out = Outstanding::default();
        out.push(second);
        assert_eq!(
            spans
                .response(
                    Some(&mut out),
                    Place::InboundDown,
                    false,
                    &msg(Dir::Send, 6, response(200))
                )
                .err(),
            Some(Unstitched::Evicted)
        );
    }
}
