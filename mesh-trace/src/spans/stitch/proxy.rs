//! The matching inside a sidecar: a request read downstream is held until
//! the sidecar writes it upstream, and matched to that write only on
//! evidence that holds on any proxy:
//! - the same process and side (outbound or inbound);
//! - causality: read no later than it was written;
//! - the request's identity, which a proxy forwards untouched: method,
//!   whole target (query included), `Host`, `Content-Length`, the header
//!   lines proxies pass on as written (`EndToEnd`: where both sides show
//!   one, with different values, they are different requests); an
//!   `x-request-id` only together with it (apps propagate one id to several
//!   concurrent calls, and a sidecar may add it upstream only).
//!
//! When more than one held request fits a write, or the write is
//! encrypted (mutual TLS) and shows nothing, the match is open:
//! every candidate is reported, and none of them is exported unless what
//! the request shows further on (the inbound sidecar's plaintext behind
//! mutual TLS, an id) settles which it was. When none fits, the write is
//! unmatched. A write that fits no held request but
//! repeats the id and target of one already forwarded, whose attempt was
//! answered, is a retry. Thread and arrival order are never used: proxies
//! forward on other threads and out of order.
//!
//! Writes that could each be any request a side holds are counted against
//! them: once as many plaintext requests were written as the set holds,
//! every one of them went upstream (each write is one request), and none
//! is held any more, though which write was which stays unknown. A write
//! that some held request does not fit is not counted: that request may
//! be the one written, rewritten past recognition.
//! So one crowded moment contests only the requests it held, not every
//! request after them for as long as those wait for their responses. After
//! a lost event or I/O the node could not follow, a sidecar side counts
//! nothing until it holds no request: an unseen request's write would be
//! counted against the wrong set. Orphans (requests read encrypted whose
//! client's write could not be told apart) are left to the evidence that
//! settles them one by one.
use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt as _};

use lru::LruCache;

use super::{SpanId, MAX_QUEUE};
use crate::spans::http::{EndToEnd, Head, Message};

/// A sidecar process and the side of it a request crosses. Apps propagate
/// x-request-id, so the same id crosses a sidecar inbound and again
/// outbound (reviews calling ratings): the two sides never match each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ProxySide {
    pub(super) tgid: u32,
    pub(super) inbound: bool,
}

/// What identifies an HTTP/1.1 request on both sides of a proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Identity {
    method: String,
    target: String,
    host: Option<String>,
    content_length: Option<u64>,
    request_id: Option<String>,
    end_to_end: EndToEnd,
}

impl Identity {
    /// The identity a request head shows; None for anything else (an
    /// encrypted read or write shows none).
    pub(super) fn of(head: Option<&Head>) -> Option<Identity> {
        match head? {
            Head::Request {
                method,
                target,
                host,
                request_id,
                content_length,
                end_to_end,
                ..
            } => Some(Identity {
                method: method.clone(),
                target: target.clone(),
                host: host.clone(),
                content_length: *content_length,
                request_id: request_id.clone(),
                end_to_end: end_to_end.clone(),
            }),
            _ => None,
        }
    }

    pub(super) fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// Whether a request read with this identity can be the request
    /// written with `written`'s. What either side does not show (a header
    /// past the captured prefix, an id added upstream) is no evidence
    /// against it.
    pub(super) fn fits(&self, written: &Identity) -> bool {
        fn agree<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
        }
        self.method == written.method
            && self.target == written.target
            && agree(&self.host, &written.host)
            && agree(&self.content_length, &written.content_length)
            && agree(&self.request_id, &written.request_id)
            && !self.end_to_end.differs(&written.end_to_end)
    }
}

/// A request read by a sidecar and not yet written upstream.
#[derive(Debug)]
pub(super) struct Forwardable {
    span: SpanId,
    ts_ns: u64,
    /// From the read's head, else what the span knows (a read of encrypted
    /// bytes shows none; the client's request did).
    identity: Option<Identity>,
}

impl Forwardable {
    /// The request of `span`, read at `ts_ns`, known by `identity`.
    pub(super) fn new(span: SpanId, ts_ns: u64, identity: Option<Identity>) -> Forwardable {
        Forwardable {
            span,
            ts_ns,
            identity,
        }
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
    /// Each of these could be the request written: none can be told.
    Ambiguous(Vec<SpanId>),
    /// No request read fits the write; the spans still held on that side,
    /// which the write may have been (their identity as read may not be
    /// the one forwarded), can no longer be trusted.
    Unmatched(Vec<SpanId>),
}

/// Held requests of one side that writes could each have been, and how
/// many such writes there were.
#[derive(Debug, Default)]
struct Group {
    spans: Vec<SpanId>,
    writes: usize,
}

pub(super) struct Proxies {
    /// Per sidecar process and side: requests read, not yet forwarded.
    forwardable: HashMap<ProxySide, VecDeque<Forwardable>>,
    /// Per side: the open groups of requests written ambiguously.
    groups: HashMap<ProxySide, Vec<Group>>,
    /// Sides that count no group until they hold no request (a lost event
    /// or unseen I/O).
    untrusted: foldhash::HashSet<ProxySide>,
    /// Per outbound sidecar process: (request id, target) -> span, to see
    /// retries. The target too: an app propagates one id to several
    /// services.
    forwarded: HashMap<ProxySide, LruCache<(String, String), SpanId>>,
}

impl Proxies {
    pub(super) fn new() -> Proxies {
        Proxies {
            forwardable: HashMap::new(),
            groups: HashMap::new(),
            untrusted: foldhash::HashSet::default(),
            forwarded: HashMap::new(),
        }
    }

    /// Counts no group on `side` until it holds no request.
    pub(super) fn distrust(&mut self, side: ProxySide) {
        self.untrusted.insert(side);
        self.groups.remove(&side);
    }

    /// Counts no group anywhere until each side holds no request.
    pub(super) fn distrust_all(&mut self) {
        let sides: Vec<ProxySide> = self.forwardable.keys().copied().collect();
        for side in sides {
            self.distrust(side);
        }
    }

    /// Counts a plaintext write that could be any of `spans` (all held on
    /// `side`); when a group has seen as many writes as it holds requests,
    /// they all went upstream and leave the queue. Returns them.
    fn count_write(&mut self, side: ProxySide, spans: &[SpanId]) -> Vec<SpanId> {
        if self.untrusted.contains(&side) {
            return Vec::new();
        }
        let groups = self.groups.entry(side).or_default();
        let mut merged = Group {
            spans: spans.to_vec(),
            writes: 1,
        };
        groups.retain_mut(|g| {
            if g.spans.iter().any(|s| merged.spans.contains(s)) {
                for &s in &g.spans {
                    if !merged.spans.contains(&s) {
                        merged.spans.push(s);
                    }
                }
                merged.writes += g.writes;
                false
            } else {
                true
            }
        });
        if merged.writes < merged.spans.len() {
            groups.push(merged);
            return Vec::new();
        }
        if let Some(queue) = self.forwardable.get_mut(&side) {
            queue.retain(|f| !merged.spans.contains(&f.span));
        }
        merged.spans
    }

    /// `span` left `side`'s queue otherwise than by a counted write:
    /// `forwarded` when it went upstream all the same (a write of its was
    /// counted in its group, or its response came back).
    fn left_group(&mut self, side: ProxySide, span: SpanId, forwarded: bool) {
        let Some(groups) = self.groups.get_mut(&side) else {
            return;
        };
        let mut drained = Vec::new();
        groups.retain_mut(|g| {
            let Some(i) = g.spans.iter().position(|&s| s == span) else {
                return true;
            };
            g.spans.swap_remove(i);
            if forwarded {
                g.writes = g.writes.saturating_sub(1);
            }
            if g.writes >= g.spans.len() {
                drained.append(&mut g.spans);
                return false;
            }
            true
        });
        if let Some(queue) = self.forwardable.get_mut(&side) {
            queue.retain(|f| !drained.contains(&f.span));
        }
    }

    /// Holds a request a sidecar read until it writes it upstream; the
    /// span dropped to make room, if any (counted as evicted).
    pub(super) fn hold(&mut self, side: ProxySide, f: Forwardable) -> Option<SpanId> {
        let queue = self.forwardable.entry(side).or_default();
        let dropped = if queue.len() == MAX_QUEUE {
            queue.pop_front().map(|f| f.span)
        } else {
            None
        };
        queue.push_back(f);
        if dropped.is_some() {
            // Its write may yet come: nothing counted until the side is
            // empty again.
            self.distrust(side);
        }
        dropped
    }

    /// Drops what `side` holds for requests no longer in flight (timed out,
    /// dropped, or answered unseen), so a stale one never stands beside a
    /// new request with the same identity.
    pub(super) fn forget_gone(&mut self, side: ProxySide, in_flight: impl Fn(SpanId) -> bool) {
        let mut gone = Vec::new();
        let mut empty = true;
        if let Some(queue) = self.forwardable.get_mut(&side) {
            queue.retain(|f| {
                let keep = in_flight(f.span);
                if !keep {
                    gone.push(f.span);
                }
                keep
            });
            empty = queue.is_empty();
        }
        if empty {
            self.untrusted.remove(&side);
            self.groups.remove(&side);
            return;
        }
        // A request whose response came back went upstream: one of its
        // group's writes was its own. One in no group left unmatched
        // (evicted, timed out, or written with an uncounted write): a
        // write of its may yet come, so the side counts nothing until it
        // holds no request (as when nothing is held, such a write then
        // matches nothing or, as it would without counting, a request read
        // after it).
        let grouped = |span: SpanId, groups: &HashMap<ProxySide, Vec<Group>>| {
            groups
                .get(&side)
                .is_some_and(|gs| gs.iter().any(|g| g.spans.contains(&span)))
        };
        if gone.iter().any(|&span| !grouped(span, &self.groups)) {
            self.distrust(side);
        }
        for span in gone {
            self.left_group(side, span, true);
        }
    }

    /// Takes `span` out of what `side` holds: the sidecar answered it
    /// itself, or (`forwarded`) what it showed further on says which
    /// write it was. False when it was not held (it went upstream).
    pub(super) fn take(&mut self, side: ProxySide, span: SpanId, forwarded: bool) -> bool {
        let Some(queue) = self.forwardable.get_mut(&side) else {
            return false;
        };
        let taken = match queue.iter().position(|f| f.span == span) {
            Some(i) => queue.remove(i).is_some(),
            None => false,
        };
        if taken {
            self.left_group(side, span, forwarded);
        }
        taken
    }

    /// Which request a sidecar is writing upstream. `answered` says
    /// whether a span is in flight and its last upstream attempt got a
    /// response (the condition for a retry).
    /// `could_be` gives, for a held request known by no identity of its own
    /// (an orphan read encrypted), the identities of the requests it may
    /// be; without an entry, causality alone decides.
    pub(super) fn forward(
        &mut self,
        side: ProxySide,
        msg: &Message,
        answered: impl Fn(SpanId) -> bool,
        could_be: &HashMap<SpanId, Vec<Identity>>,
    ) -> Forwarded {
        let written = Identity::of(Some(&msg.head));
        let queue = self.forwardable.entry(side).or_default();
        let fits = |f: &Forwardable| {
            f.ts_ns <= msg.ts_ns
                && match (&f.identity, &written) {
                    (Some(read), Some(w)) => read.fits(w),
                    (None, Some(w)) => could_be
                        .get(&f.span)
                        .is_none_or(|ids| ids.iter().any(|i| i.fits(w))),
                    // Encrypted: causality only.
                    (_, None) => true,
                }
        };
        let mut candidates: Vec<usize> = (0..queue.len()).filter(|&i| fits(&queue[i])).collect();
        if candidates.len() > 1 {
            // Several fit: an id on both sides that agrees is evidence.
            if let Some(rid) = written.as_ref().and_then(|w| w.request_id.as_deref()) {
                let same_id: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|&i| {
                        queue[i].identity.as_ref().and_then(Identity::request_id) == Some(rid)
                    })
                    .collect();
                if same_id.len() == 1 {
                    candidates = same_id;
                }
            }
        }
        // The same id and target written again after its attempt was
        // answered: a retry (outbound only; the same id arriving twice at
        // an inbound sidecar is the outbound sidecar's retry landing on the
        // same pod).
        let retry_key = written
            .as_ref()
            .and_then(|w| Some((w.request_id.clone()?, w.target.clone())));
        let retry = match (&retry_key, side.inbound) {
            (Some(key), false) => self
                .forwarded
                .get_mut(&side)
                .and_then(|l| l.get(key).copied())
                .filter(|&id| answered(id)),
            _ => None,
        };
        if written.is_none() && !candidates.is_empty() {
            // Encrypted: causality alone proves nothing (the write may be a
            // TLS alert, or a request whose read was not seen). What the
            // request shows further on settles it.
            let spans = candidates.iter().map(|&i| queue[i].span).collect();
            return Forwarded::Ambiguous(spans);
        }
        match (candidates.as_slice(), retry) {
            ([], Some(id)) => Forwarded::Retry(id),
            ([], None) => Forwarded::Unmatched(queue.iter().map(|f| f.span).collect()),
            (&[i], None) => {
                let f = queue.remove(i).expect("index from the queue");
                let request_id = written
                    .and_then(|w| w.request_id)
                    .or_else(|| f.identity.and_then(|id| id.request_id));
                if let (Some(rid), Some(key), false) = (&request_id, retry_key, side.inbound) {
                    self.forwarded
                        .entry(side)
                        .or_insert_with(|| {
                            LruCache::new(std::num::NonZeroUsize::new(MAX_QUEUE).expect("non-zero"))
                        })
                        .put((rid.clone(), key.1), f.span);
                }
                Forwarded::Read {
                    span: f.span,
                    request_id,
                }
            }
            (many, retry) => {
                // They stay held, what the request shows further on (the
                // inbound sidecar's plaintext, its id) may still tell. A
                // request's plaintext write counts against them only when
                // every request held fits it: then the one written is
                // surely among them, whatever the sidecar rewrote. Not
                // against orphans, which later evidence settles one by one.
                let every_held = many.len() == queue.len();
                let mut spans: Vec<SpanId> = many.iter().map(|&i| queue[i].span).collect();
                if retry.is_none() && every_held && spans.iter().all(|s| !could_be.contains_key(s))
                {
                    self.count_write(side, &spans);
                }
                spans.extend(retry);
                Forwarded::Ambiguous(spans)
            }
        }
    }

    /// What request `span`, held by `side`, is: its plaintext as the
    /// sidecar read it (behind TLS), which replaces what the client's
    /// request showed.
    pub(super) fn identify(&mut self, side: ProxySide, span: SpanId, identity: Identity) {
        if let Some(f) = self
            .forwardable
            .get_mut(&side)
            .and_then(|q| q.iter_mut().find(|f| f.span == span))
        {
            f.identity = Some(identity);
        }
    }

    /// The requests `side` holds that show no identity of their own.
    pub(super) fn held_unknown(&self, side: ProxySide) -> Vec<SpanId> {
        self.forwardable
            .get(&side)
            .into_iter()
            .flatten()
            .filter(|f| f.identity.is_none())
            .map(|f| f.span)
            .collect()
    }

    /// Whether `side` still holds `span` (read, not yet known to be
    /// forwarded or answered).
    pub(super) fn holds(&self, side: ProxySide, span: SpanId) -> bool {
        self.forwardable
            .get(&side)
            .is_some_and(|q| q.iter().any(|f| f.span == span))
    }

    /// The requests `side` holds: one of them may be what it wrote when a
    /// write of its went unseen.
    pub(super) fn held_by(&self, side: ProxySide) -> impl Iterator<Item = SpanId> + '_ {
        self.forwardable
            .get(&side)
            .into_iter()
            .flatten()
            .map(|f| f.span)
    }

    /// Requests held, over all sidecars (for tests and bounds).
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.forwardable.values().map(VecDeque::len).sum()
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

    fn request(target: &str, request_id: Option<&str>) -> Head {
        Head::Request {
            method: "GET".into(),
            path: target.split('?').next().unwrap_or_default().into(),
            target: target.into(),
            host: Some("reviews:9080".into()),
            request_id: request_id.map(str::to_string),
            content_length: None,
            trace_context: None,
            grpc: false,
            end_to_end: Default::default(),
        }
    }

    /// The sidecar's upstream write of `head` at `ts_ns`.
    fn write(ts_ns: u64, head: Head) -> Message {
        Message {
            dir: Dir::Send,
            ts_ns,
            tid: 1,
            offset: 0,
            head,
        }
    }

    fn opaque() -> Head {
        Head::Opaque { tls: true }
    }

    fn read(span: SpanId, ts_ns: u64, head: &Head) -> Forwardable {
        Forwardable::new(span, ts_ns, Identity::of(Some(head)))
    }

    fn never(_: SpanId) -> bool {
        false
    }

    fn none() -> HashMap<SpanId, Vec<Identity>> {
        HashMap::new()
    }

    fn matched(span: SpanId, request_id: Option<&str>) -> Forwarded {
        Forwarded::Read {
            span,
            request_id: request_id.map(str::to_string),
        }
    }

    #[test]
    fn the_one_request_whose_identity_fits_is_matched_whatever_the_order() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, &request("/r?u=1", None)));
        p.hold(OUTBOUND, read(2, 11, &request("/r?u=2", None)));
        // Forwarded out of order, with an id the sidecar added upstream.
        let w = p.forward(
            OUTBOUND,
            &write(20, request("/r?u=2", Some("x"))),
            never,
            &none(),
        );
        assert_eq!(w, matched(2, Some("x")));
        let w = p.forward(
            OUTBOUND,
            &write(21, request("/r?u=1", Some("y"))),
            never,
            &none(),
        );
        assert_eq!(w, matched(1, Some("y")));
        assert_eq!(p.held(), 0);
    }

    #[test]
    fn identical_requests_held_together_are_ambiguous_never_guessed() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, &request("/r", None)));
        p.hold(OUTBOUND, read(2, 11, &request("/r", None)));
        let w = p.forward(
            OUTBOUND,
            &write(20, request("/r", Some("x"))),
            never,
            &none(),
        );
        assert_eq!(w, Forwarded::Ambiguous(vec![1, 2]));
        // Both stay held until something tells them apart.
        assert_eq!(p.held(), 2);
        assert!(p.holds(OUTBOUND, 1) && p.holds(OUTBOUND, 2));
    }

    #[test]
    fn an_id_seen_on_both_sides_tells_identical_requests_apart() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, &request("/r", Some("a"))));
        p.hold(OUTBOUND, read(2, 11, &request("/r", Some("b"))));
        let w = p.forward(
            OUTBOUND,
            &write(20, request("/r", Some("b"))),
            never,
            &none(),
        );
        assert_eq!(w, matched(2, Some("b")));
    }

    /// Heads as the wire shows them: the header lines a proxy passes on
    /// as written tell requests apart; the ones it sets do not.
    #[test]
    fn header_lines_the_proxy_passes_on_tell_identical_targets_apart() {
        let head = |lines: &str| {
            let bytes = format!("GET /r HTTP/1.1\r\nHost: reviews:9080\r\n{lines}\r\n");
            crate::spans::http::http_head(bytes.as_bytes()).unwrap()
        };
        let mut p = Proxies::new();
        p.hold(
            OUTBOUND,
            read(1, 10, &head("Cookie: s=1\r\nUser-Agent: c\r\n")),
        );
        p.hold(
            OUTBOUND,
            read(2, 11, &head("Cookie: s=2\r\nUser-Agent: c\r\n")),
        );
        // Forwarded with lines of the sidecar's own, the cookie untouched.
        let w = p.forward(
            OUTBOUND,
            &write(
                20,
                head("Cookie: s=2\r\nUser-Agent: c\r\nx-forwarded-proto: http\r\nx-request-id: x\r\n"),
            ),
            never,
            &none(),
        );
        assert_eq!(w, matched(2, Some("x")));
        // Lines proxies set (forwarding, tracing) are no evidence.
        let mut p = Proxies::new();
        p.hold(
            OUTBOUND,
            read(
                1,
                10,
                &head("traceparent: 00-a-b-01\r\nx-forwarded-for: 1\r\n"),
            ),
        );
        p.hold(
            OUTBOUND,
            read(
                2,
                11,
                &head("traceparent: 00-c-d-01\r\nx-forwarded-for: 2\r\n"),
            ),
        );
        let w = p.forward(
            OUTBOUND,
            &write(20, head("traceparent: 00-e-f-01\r\nx-forwarded-for: 3\r\n")),
            never,
            &none(),
        );
        assert_eq!(w, Forwarded::Ambiguous(vec![1, 2]));
    }

    #[test]
    fn one_propagated_id_on_several_calls_is_told_apart_by_target() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, &request("/details/0", Some("a"))));
        p.hold(OUTBOUND, read(2, 10, &request("/reviews/0", Some("a"))));
        let w = p.forward(
            OUTBOUND,
            &write(20, request("/reviews/0", Some("a"))),
            never,
            &none(),
        );
        assert_eq!(w, matched(2, Some("a")));
    }

    #[test]
    fn a_different_id_is_evidence_against() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, &request("/r", Some("a"))));
        let w = p.forward(
            OUTBOUND,
            &write(20, request("/r", Some("b"))),
            never,
            &none(),
        );
        assert_eq!(w, Forwarded::Unmatched(vec![1]));
    }

    #[test]
    fn written_before_it_was_read_cannot_be_it() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 30, &request("/r", None)));
        let w = p.forward(OUTBOUND, &write(20, request("/r", None)), never, &none());
        assert_eq!(w, Forwarded::Unmatched(vec![1]));
    }

    #[test]
    fn encrypted_writes_are_left_open_even_with_one_request_held() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, &request("/r?u=1", None)));
        assert_eq!(
            p.forward(OUTBOUND, &write(20, opaque()), never, &none()),
            Forwarded::Ambiguous(vec![1])
        );
        assert!(p.take(OUTBOUND, 1, false));
        p.hold(OUTBOUND, read(2, 30, &request("/r?u=2", None)));
        p.hold(OUTBOUND, read(3, 31, &request("/r?u=3", None)));
        assert_eq!(
            p.forward(OUTBOUND, &write(40, opaque()), never, &none()),
            Forwarded::Ambiguous(vec![2, 3])
        );
    }

    #[test]
    fn encrypted_reads_are_known_by_the_identity_their_span_carries() {
        let mut p = Proxies::new();
        let id = |t: &str| Identity::of(Some(&request(t, None)));
        p.hold(INBOUND, Forwardable::new(1, 10, id("/r?u=1")));
        p.hold(INBOUND, Forwardable::new(2, 11, id("/r?u=2")));
        let w = p.forward(
            INBOUND,
            &write(20, request("/r?u=1", Some("x"))),
            never,
            &none(),
        );
        assert_eq!(w, matched(1, Some("x")));
    }

    #[test]
    fn requests_read_encrypted_are_told_apart_by_what_they_may_be() {
        let mut p = Proxies::new();
        // Two orphans held, read encrypted: one may be /a or /b, the other
        // /c.
        p.hold(INBOUND, Forwardable::new(1, 10, None));
        p.hold(INBOUND, Forwardable::new(2, 11, None));
        let id = |t: &str| Identity::of(Some(&request(t, None))).unwrap();
        let could_be = HashMap::from_iter([(1, vec![id("/a"), id("/b")]), (2, vec![id("/c")])]);
        let w = p.forward(
            INBOUND,
            &write(20, request("/c", Some("x"))),
            never,
            &could_be,
        );
        assert_eq!(w, matched(2, Some("x")));
        // Without that knowledge the same write could be either.
        p.hold(INBOUND, Forwardable::new(3, 21, None));
        let w = p.forward(INBOUND, &write(30, request("/c", None)), never, &none());
        assert_eq!(w, Forwarded::Ambiguous(vec![1, 3]));
    }

    #[test]
    fn the_same_id_and_target_again_after_an_answer_is_a_retry() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, &request("/r", None)));
        assert_eq!(
            p.forward(
                OUTBOUND,
                &write(20, request("/r", Some("x"))),
                never,
                &none()
            ),
            matched(1, Some("x"))
        );
        // Not answered yet: not a retry (nothing fits either).
        assert_eq!(
            p.forward(
                OUTBOUND,
                &write(25, request("/r", Some("x"))),
                never,
                &none()
            ),
            Forwarded::Unmatched(vec![])
        );
        assert_eq!(
            p.forward(
                OUTBOUND,
                &write(30, request("/r", Some("x"))),
                |s| s == 1,
                &none()
            ),
            Forwarded::Retry(1)
        );
    }

    #[test]
    fn a_retry_that_could_also_be_a_new_request_is_ambiguous() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, &request("/r", Some("x"))));
        assert_eq!(
            p.forward(
                OUTBOUND,
                &write(20, request("/r", Some("x"))),
                never,
                &none()
            ),
            matched(1, Some("x"))
        );
        // The app sends the same id and target again while the first
        // attempt's 503 is in: retry or new request, no one can tell.
        p.hold(OUTBOUND, read(2, 30, &request("/r", Some("x"))));
        assert_eq!(
            p.forward(
                OUTBOUND,
                &write(31, request("/r", Some("x"))),
                |s| s == 1,
                &none()
            ),
            Forwarded::Ambiguous(vec![2, 1])
        );
    }

    #[test]
    fn inbound_sidecars_see_no_retries() {
        let mut p = Proxies::new();
        p.hold(INBOUND, read(1, 10, &request("/r", Some("x"))));
        assert_eq!(
            p.forward(
                INBOUND,
                &write(20, request("/r", Some("x"))),
                never,
                &none()
            ),
            matched(1, Some("x"))
        );
        assert_eq!(
            p.forward(
                INBOUND,
                &write(30, request("/r", Some("x"))),
                |_| true,
                &none()
            ),
            Forwarded::Unmatched(vec![])
        );
    }

    #[test]
    fn sides_and_processes_never_match_each_other() {
        let mut p = Proxies::new();
        p.hold(INBOUND, read(1, 10, &request("/r", None)));
        let other = ProxySide {
            tgid: 21,
            inbound: false,
        };
        p.hold(other, read(2, 10, &request("/r", None)));
        assert_eq!(
            p.forward(OUTBOUND, &write(20, request("/r", None)), never, &none()),
            Forwarded::Unmatched(vec![])
        );
        assert_eq!(p.held(), 2);
    }

    #[test]
    fn a_local_reply_takes_its_request_out_of_matching() {
        let mut p = Proxies::new();
        p.hold(OUTBOUND, read(1, 10, &request("/r", None)));
        assert!(p.take(OUTBOUND, 1, false));
        assert!(!p.take(OUTBOUND, 1, false));
        // The next identical request is not mistaken for the answered one.
        p.hold(OUTBOUND, read(2, 20, &request("/r", None)));
        assert_eq!(
            p.forward(OUTBOUND, &write(30, request("/r", None)), never, &none()),
            matched(2, None)
        );
    }

    #[test]
    fn full_hold_queue_drops_the_oldest_and_says_which() {
        let mut p = Proxies::new();
        for i in 0..MAX_QUEUE as u64 {
            assert_eq!(p.hold(OUTBOUND, read(i, i, &request("/r", None))), None);
        }
        assert_eq!(
            p.hold(OUTBOUND, read(9999, 9999, &request("/r", None))),
            Some(0)
        );
        assert_eq!(p.held(), MAX_QUEUE);
    }

    #[test]
    fn identity_ignores_what_one_side_does_not_show() {
        let full = Identity::of(Some(&Head::Request {
            method: "POST".into(),
            path: "/p".into(),
            target: "/p?a=1".into(),
            host: Some("h".into()),
            request_id: Some("i".into()),
            content_length: Some(5),
            trace_context: None,
            grpc: false,
            end_to_end: Default::default(),
        }))
        .unwrap();
        let cut = Identity {
            host: None,
            content_length: None,
            request_id: None,
            ..full.clone()
        };
        assert!(cut.fits(&full) && full.fits(&cut));
        let longer = Identity {
            content_length: Some(6),
            ..full.clone()
        };
        assert!(!full.fits(&longer));
        let other_method = Identity {
            method: "GET".into(),
            ..full.clone()
        };
        assert!(!full.fits(&other_method));
        assert_eq!(Identity::of(Some(&opaque())), None);
    }

    /// Requests read encrypted (no identity) and written in plaintext two
    /// at once: the two writes are the two requests, which no longer
    /// crowd the next one; after a lost event nothing is counted until
    /// the side holds no request.
    #[test]
    fn writes_count_against_the_requests_they_could_be() {
        let encrypted = |span| Forwardable::new(span, 10, None);
        let run = |p: &mut Proxies| {
            p.hold(INBOUND, encrypted(1));
            p.hold(INBOUND, encrypted(2));
            let w = write(20, request("/r", None));
            assert_eq!(
                p.forward(INBOUND, &w, never, &none()),
                Forwarded::Ambiguous(vec![1, 2])
            );
            assert_eq!(
                p.forward(INBOUND, &w, never, &none()),
                Forwarded::Ambiguous(vec![1, 2])
            );
            p.hold(INBOUND, encrypted(3));
            p.forward(INBOUND, &write(30, request("/r", None)), never, &none())
        };
        let mut p = Proxies::new();
        assert_eq!(run(&mut p), matched(3, None));
        assert_eq!(p.held(), 0);
        // Distrusted (a request held across a lost event): nothing is
        // counted, everything stays held.
        let mut p = Proxies::new();
        p.hold(INBOUND, encrypted(9));
        p.distrust_all();
        p.hold(INBOUND, encrypted(1));
        for _ in 0..3 {
            assert_eq!(
                p.forward(INBOUND, &write(20, request("/r", None)), never, &none()),
                Forwarded::Ambiguous(vec![9, 1])
            );
        }
        assert_eq!(p.held(), 2);
        // Once it holds nothing, the side counts again.
        p.forget_gone(INBOUND, never);
        assert_eq!(run(&mut p), matched(3, None));
        // A held request leaving unmatched and in no group (evicted, or
        // written with an uncounted write) may still have a write to come:
        // nothing is counted until the side holds nothing.
        let mut p = Proxies::new();
        p.hold(INBOUND, encrypted(7));
        p.hold(INBOUND, encrypted(1));
        p.forget_gone(INBOUND, |id| id != 7);
        p.hold(INBOUND, encrypted(2));
        for _ in 0..2 {
            p.forward(INBOUND, &write(20, request("/r", None)), never, &none());
        }
        assert_eq!(p.held(), 2);
        // A held request the write does not fit (its path rewritten by the
        // sidecar, say) may be the one written: nothing is counted.
        let mut p = Proxies::new();
        p.hold(INBOUND, read(1, 10, &request("/a", None)));
        p.hold(INBOUND, read(2, 10, &request("/b", None)));
        p.hold(INBOUND, read(3, 10, &request("/b", None)));
        for _ in 0..2 {
            assert_eq!(
                p.forward(INBOUND, &write(20, request("/b", None)), never, &none()),
                Forwarded::Ambiguous(vec![2, 3])
            );
        }
        assert_eq!(p.held(), 3);
        // A request answered while its group waits went upstream: the
        // group's one write was its own, and the other is still held.
        let mut p = Proxies::new();
        p.hold(INBOUND, encrypted(1));
        p.hold(INBOUND, encrypted(2));
        p.forward(INBOUND, &write(20, request("/r", None)), never, &none());
        p.forget_gone(INBOUND, |id| id != 1);
        assert!(p.holds(INBOUND, 2) && !p.holds(INBOUND, 1));
        assert_eq!(
            p.forward(INBOUND, &write(30, request("/r", None)), never, &none()),
            matched(2, None)
        );
    }
}
