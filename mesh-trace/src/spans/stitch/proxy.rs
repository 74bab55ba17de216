//! The matching inside a sidecar: a request read downstream is held until
//! the sidecar writes it upstream, and matched to that write by
//! x-request-id, else by method and path, else by thread, else by order; a
//! second upstream write with the same id is a retry (its moments replace
//! the failed attempt's).
use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt as _};

use lru::LruCache;

use super::{SpanId, Unstitched, MAX_QUEUE};
use crate::spans::http::{Head, Message};

/// A sidecar process and the side of it a request crosses. Apps propagate
/// x-request-id, so the same id crosses a sidecar inbound and again
/// outbound (reviews calling ratings): the two sides never match each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ProxySide {
    pub(super) tgid: u32,
    pub(super) inbound: bool,
}

/// A request read by a sidecar and not yet written upstream.
#[derive(Debug)]
pub(super) struct Forwardable {
    span: SpanId,
    ts_ns: u64,
    tid: u32,
    request_id: Option<String>,
    method: String,
    path: String,
}

impl Forwardable {
    /// The request of `span`, read at `ts_ns` by thread `tid`; `head` when
    /// the read started with it.
    pub(super) fn new(span: SpanId, ts_ns: u64, tid: u32, head: Option<&Head>) -> Forwardable {
        let (request_id, method, path) = match head {
            Some(Head::Request {
                request_id,
                method,
                path,
                ..
            }) => (request_id.clone(), method.clone(), path.clone()),
            _ => (None, String::new(), String::new()),
        };
        Forwardable {
            span,
            ts_ns,
            tid,
            request_id,
            method,
            path,
        }
    }

    /// The x-request-id the read showed.
    pub(super) fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }
}

/// Which span a sidecar's upstream write belongs to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Forwarded {
    /// The same request written again by an outbound sidecar: a retry of
    /// this span.
    Retry(SpanId),
    /// The request read downstream as this span, and the request id it is
    /// known by (the write's, else the read's).
    Read {
        span: SpanId,
        request_id: Option<String>,
    },
}

pub(super) struct Proxies {
    /// Per sidecar process and side: requests read, not yet forwarded.
    forwardable: HashMap<ProxySide, VecDeque<Forwardable>>,
    /// Per outbound sidecar process: (request id, path) -> span, to see
    /// retries. The path too: an app propagates one id to several services.
    forwarded: HashMap<ProxySide, LruCache<(String, String), SpanId>>,
}

impl Proxies {
    pub(super) fn new() -> Proxies {
        Proxies {
            forwardable: HashMap::new(),
            forwarded: HashMap::new(),
        }
    }

    /// Holds a request a sidecar read until it writes it upstream; the
    /// reason to count when the oldest held request was dropped to make
    /// room.
    pub(super) fn hold(&mut self, side: ProxySide, f: Forwardable) -> Option<Unstitched> {
        let mut dropped = None;
        let queue = self.forwardable.entry(side).or_default();
        if queue.len() == MAX_QUEUE {
            queue.pop_front();
            dropped = Some(Unstitched::Evicted);
        }
        queue.push_back(f);
        dropped
    }

    /// The request a sidecar is writing upstream: one it read before.
    /// `known_id` is the request id a span already knows.
    pub(super) fn forward(
        &mut self,
        side: ProxySide,
        msg: &Message,
        known_id: impl Fn(SpanId) -> Option<String>,
    ) -> Result<Forwarded, Unstitched> {
        let (rid, method, path) = match &msg.head {
            Head::Request {
                request_id,
                method,
                path,
                ..
            } => (
                request_id.clone(),
                Some(method.as_str()),
                Some(path.as_str()),
            ),
            _ => (None, None, None),
        };
        let retries = self
            .forwarded
            .entry(side)
            .or_insert_with(|| LruCache::new(std::num::NonZeroUsize::new(4096).expect("non-zero")));
        // The same request id written again by an outbound sidecar: a retry.
        // (Inbound sidecars do not retry; the same id arriving twice there is
        // the outbound sidecar's retry landing on the same pod.)
        let retry_key = rid.clone().zip(path.map(str::to_string));
        let retried = (!side.inbound)
            .then(|| retry_key.as_ref().and_then(|k| retries.get(k).copied()))
            .flatten();
        if let Some(id) = retried {
            return Ok(Forwarded::Retry(id));
        }
        let queue = self.forwardable.entry(side).or_default();
        let eligible = |f: &Forwardable| f.ts_ns <= msg.ts_ns;
        // A request read encrypted (mutual TLS) shows no id; its span knows
        // the id the client side sent.
        let id_of = |f: &Forwardable| f.request_id.clone().or_else(|| known_id(f.span));
        let pick = rid
            .as_ref()
            .and_then(|r| {
                queue
                    .iter()
                    .position(|f| eligible(f) && id_of(f).as_ref() == Some(r))
            })
            .or_else(|| {
                queue.iter().position(|f| {
                    eligible(f)
                        && Some(f.method.as_str()) == method
                        && Some(f.path.as_str()) == path
                })
            })
            .or_else(|| queue.iter().position(|f| eligible(f) && f.tid == msg.tid))
            .or_else(|| queue.iter().position(eligible));
        let Some(f) = pick.and_then(|i| queue.remove(i)) else {
            return Err(Unstitched::NoDownstream);
        };
        let request_id = rid.or(f.request_id);
        if let (Some(key), false) = (retry_key, side.inbound) {
            self.forwarded
                .get_mut(&side)
                .expect("inserted above")
                .put(key, f.span);
        }
        Ok(Forwarded::Read {
            span: f.span,
            request_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::http::Dir;

    const OUTBOUND: ProxySide = ProxySide {
        tgid: 20,
        inbound: false,
    };
    const INBOUND: ProxySide = ProxySide {
        tgid: 20,
        inbound: true,
    };

    fn request(method: &str, path: &str, request_id: Option<&str>) -> Head {
        Head::Request {
            method: method.into(),
            path: path.into(),
            host: None,
            request_id: request_id.map(str::to_string),
        }
    }

    /// The sidecar's upstream write of `head` at `ts_ns` by thread `tid`.
    fn write(ts_ns: u64, tid: u32, head: Head) -> Message {
        Message {
            dir: Dir::Send,
            ts_ns,
            tid,
            offset: 0,
            head,
        }
    }

    fn unknown(_: SpanId) -> Option<String> {
        None
    }

    fn read(span: SpanId, ts_ns: u64, tid: u32, head: &Head) -> Forwardable {
        Forwardable::new(span, ts_ns, tid, Some(head))
    }

    #[test]
    fn matches_by_request_id_before_method_and_path() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, 1, &request("GET", "/r", Some("a"))));
        p.hold(OUTBOUND, read(2, 11, 2, &request("GET", "/r", Some("b"))));
        let got = p.forward(
            OUTBOUND,
            &write(20, 1, request("GET", "/r", Some("b"))),
            unknown,
        );
        assert_eq!(
            got,
            Ok(Forwarded::Read {
                span: 2,
                request_id: Some("b".into())
            })
        );
    }

    #[test]
    fn request_id_known_by_the_span_when_the_read_was_encrypted() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, Forwardable::new(1, 10, 1, None));
        p.hold(OUTBOUND, Forwardable::new(2, 11, 2, None));
        let known = |span: SpanId| (span == 2).then(|| "b".to_string());
        // Thread 1 wrote it, but the id says span 2.
        let got = p.forward(
            OUTBOUND,
            &write(20, 1, request("GET", "/r", Some("b"))),
            known,
        );
        assert_eq!(
            got,
            Ok(Forwarded::Read {
                span: 2,
                request_id: Some("b".into())
            })
        );
    }

    #[test]
    fn then_by_method_and_path() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, 1, &request("GET", "/a", None)));
        p.hold(OUTBOUND, read(2, 11, 2, &request("GET", "/b", Some("b"))));
        // An id no held request has: method and path decide.
        let got = p.forward(
            OUTBOUND,
            &write(20, 1, request("GET", "/b", Some("x"))),
            unknown,
        );
        assert_eq!(
            got,
            Ok(Forwarded::Read {
                span: 2,
                request_id: Some("x".into())
            })
        );
    }

    #[test]
    fn then_by_thread_then_oldest() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, 1, &request("GET", "/a", None)));
        p.hold(OUTBOUND, read(2, 11, 2, &request("GET", "/b", None)));
        p.hold(OUTBOUND, read(3, 12, 3, &request("GET", "/c", None)));
        let span = |r: Result<Forwarded, Unstitched>| match r {
            Ok(Forwarded::Read { span, .. }) => Some(span),
            _ => None,
        };
        // Rewritten path: no head matches, thread 2 read span 2.
        let rewritten = || request("GET", "/rewritten", None);
        assert_eq!(
            span(p.forward(OUTBOUND, &write(20, 2, rewritten()), unknown)),
            Some(2)
        );
        // No thread matches either: the oldest.
        assert_eq!(
            span(p.forward(OUTBOUND, &write(21, 9, rewritten()), unknown)),
            Some(1)
        );
        assert_eq!(
            span(p.forward(OUTBOUND, &write(22, 9, Head::Opaque { tls: true }), unknown)),
            Some(3)
        );
    }

    #[test]
    fn request_id_of_the_read_when_the_write_shows_none() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, 1, &request("GET", "/a", Some("a"))));
        let got = p.forward(OUTBOUND, &write(20, 1, Head::Opaque { tls: true }), unknown);
        assert_eq!(
            got,
            Ok(Forwarded::Read {
                span: 1,
                request_id: Some("a".into())
            })
        );
    }

    #[test]
    fn outbound_write_again_by_id_and_path_is_a_retry() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, 1, &request("GET", "/r", Some("a"))));
        let w = request("GET", "/r", Some("a"));
        assert!(matches!(
            p.forward(OUTBOUND, &write(20, 1, w.clone()), unknown),
            Ok(Forwarded::Read { span: 1, .. })
        ));
        assert_eq!(
            p.forward(OUTBOUND, &write(30, 1, w), unknown),
            Ok(Forwarded::Retry(1))
        );
        // The same id to another path is another request, not a retry.
        assert_eq!(
            p.forward(
                OUTBOUND,
                &write(40, 1, request("GET", "/s", Some("a"))),
                unknown
            ),
            Err(Unstitched::NoDownstream)
        );
    }

    #[test]
    fn inbound_sidecars_see_no_retries() {
        let mut p = Proxies::new();
        p.hold(INBOUND, read(1, 10, 1, &request("GET", "/r", Some("a"))));
        let w = request("GET", "/r", Some("a"));
        assert!(matches!(
            p.forward(INBOUND, &write(20, 1, w.clone()), unknown),
            Ok(Forwarded::Read { span: 1, .. })
        ));
        assert_eq!(
            p.forward(INBOUND, &write(30, 1, w), unknown),
            Err(Unstitched::NoDownstream)
        );
    }

    #[test]
    fn written_before_it_was_read_is_no_downstream() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 100, 1, &request("GET", "/r", Some("a"))));
        let w = || write(50, 1, request("GET", "/r", Some("a")));
        assert_eq!(
            p.forward(OUTBOUND, &w(), unknown),
            Err(Unstitched::NoDownstream)
        );
        // Still held for a later write.
        let later = write(150, 1, request("GET", "/r", Some("a")));
        assert!(matches!(
            p.forward(OUTBOUND, &later, unknown),
            Ok(Forwarded::Read { span: 1, .. })
        ));
    }

    #[test]
    fn sides_and_processes_never_match_each_other() {
        let mut p = Proxies::new();
        p.hold(INBOUND, read(1, 10, 1, &request("GET", "/r", Some("a"))));
        let w = || write(20, 1, request("GET", "/r", Some("a")));
        assert_eq!(
            p.forward(OUTBOUND, &w(), unknown),
            Err(Unstitched::NoDownstream)
        );
        let other = ProxySide {
            tgid: 21,
            inbound: true,
        };
        assert_eq!(
            p.forward(other, &w(), unknown),
            Err(Unstitched::NoDownstream)
        );
        assert!(p.forward(INBOUND, &w(), unknown).is_ok());
    }

    #[test]
    fn full_hold_queue_drops_the_oldest_and_says_so() {
        let mut p = Proxies::new();
        let h = request("GET", "/r", None);
        for i in 0..MAX_QUEUE as u64 {
            assert_eq!(p.hold(OUTBOUND, read(i, 10, 1, &h)), None);
        }
        assert_eq!(
            p.hold(OUTBOUND, read(MAX_QUEUE as u64, 10, 1, &h)),
            Some(Unstitched::Evicted)
        );
        // Span 0 is gone: the oldest left is span 1.
        assert!(matches!(
            p.forward(OUTBOUND, &write(20, 1, h), unknown),
            Ok(Forwarded::Read { span: 1, .. })
        ));
    }

    #[test]
    fn read_head_gives_request_id() {
        let f = read(1, 10, 1, &request("GET", "/r", Some("a")));
        assert_eq!(f.request_id(), Some("a"));
        assert_eq!(Forwardable::new(1, 10, 1, None).request_id(), None);
    }
}
