//! The spans being assembled: started by the app's request, given a moment
//! at every socket the request and its response cross, completed when the
//! response reaches the app. Responses come back on the socket the request
//! went out on: each socket keeps its outstanding requests in order
//! (HTTP/1.1), each with the position its response starts at. Bounded:
//! the least recently touched span is dropped first, and no one owner (the
//! network namespace a request started in, or the sidecar process that
//! wrote an orphan) holds more than its share, so a pod that floods the
//! agent evicts its own requests, never another pod's.
//!
//! A span is exported only when it is exact: not ambiguous inside a
//! sidecar, touched by no lost event, and with its moments in the order of
//! the request's path (hops non-negative, adding up to the total). Writes
//! upstream that belong to no known request get an orphan span, so that
//! the responses on their sockets still pair with the right requests; an
//! orphan is dropped, uncounted, when its response comes back where it
//! started.
use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt as _};
use lru::LruCache;

use super::{
    place::Place,
    proxy::{Identity, ProxySide},
    SpanId, Unstitched,
};
use crate::spans::{
    http::{Head, Message},
    span::{LocalReply, Span},
    trace_id::{MeshLeg, TraceContext},
};

struct Pending {
    span: Span,
    started_ns: u64,
    /// What the app's request showed (method, target, host, ...).
    identity: Option<Identity>,
    /// A sidecar wrote upstream a request it could not tell from this
    /// one: exported only if later evidence settles which it was.
    /// Writes it could not be told from, not yet known to be others.
    contested: u32,
    /// An event that may have been its own was lost.
    lost: bool,
    /// An orphan: started by an unmatched upstream write at this place.
    orphan_at: Option<Place>,
    /// Where the request crossed its mesh leg: its trace id, derived when
    /// the span is exported.
    mesh_leg: Option<MeshLeg>,
    /// The caller's trace context, from the first of its heads that held
    /// one.
    trace_context: Option<TraceContext>,
    /// The response reached the origin before this moment was reported:
    /// the span completes when it is.
    waiting_for: Option<usize>,
    /// Where the request started, and so where its response completes it:
    /// the client app's socket, or the inbound sidecar's when the client
    /// is not on this node (the server's half).
    origin: Place,
    /// For an orphan: the sidecar side that wrote it and the requests it
    /// held that it may be, until what the request shows further on says.
    candidates: Option<(ProxySide, Vec<SpanId>)>,
    /// Response moments taken over HTTP/2 (at the stream's end): when the
    /// response's head was read or written there.
    h2_heads: [Option<u64>; 12],
    /// An orphan joined this request: orphans that listed it beside that
    /// one may still name it, so its contests are no longer all counted by
    /// what lists it ([`Spans::resolve_by_response`] leaves it alone).
    absorbed: bool,
}

impl Pending {
    /// Orphan `o` turned out to be this request: its moments join this
    /// span's, and the writes that contested it were others'; what
    /// contested the orphan further on (the inbound sidecar's writes)
    /// still does.
    fn absorb(&mut self, o: Pending) {
        self.absorbed = true;
        for (mine, theirs) in self.span.moments.iter_mut().zip(o.span.moments) {
            if mine.is_none() {
                *mine = theirs;
            }
        }
        self.contested = o.contested;
        // What the request showed further on: the id its sidecar added, the
        // pod that served it.
        let span = &mut self.span;
        if span.request_id.is_none() {
            span.request_id = o.span.request_id.or_else(|| {
                o.identity
                    .as_ref()
                    .and_then(|i| i.request_id().map(str::to_owned))
            });
        }
        span.destination_pod = span.destination_pod.take().or(o.span.destination_pod);
        span.grpc_status = span.grpc_status.or(o.span.grpc_status);
        self.lost |= o.lost;
        // The orphan was the write on the mesh leg.
        if o.mesh_leg.is_some() {
            self.mesh_leg = o.mesh_leg;
        }
        self.trace_context = self.trace_context.or(o.trace_context);
    }

    /// A response moment means one thing along a span: over HTTP/1.1 the
    /// response's head, over HTTP/2 its stream's end, so that a streaming
    /// call lasts to its last message. Where the legs mix the two (sidecars
    /// upgrading to HTTP/2 between HTTP/1.1 apps, which may forward a head
    /// before its body's end came), the HTTP/2 legs' heads stand in.
    fn settle_response_moments(&mut self) {
        let responses = 6..12;
        let http1 = |i: usize| self.span.moments[i].is_some() && self.h2_heads[i].is_none();
        let mixed = responses.clone().any(http1) && self.h2_heads[6..].iter().any(Option::is_some);
        if !mixed {
            return;
        }
        for i in responses {
            if let Some(head) = self.h2_heads[i] {
                self.span.moments[i] = Some(head);
            }
        }
    }
}

/// A span with no moments yet.
fn blank(request_id: Option<String>, source: String, destination: String) -> Span {
    Span {
        request_id,
        method: String::new(),
        path: String::new(),
        status: 0,
        source_workload: source,
        source_namespace: None,
        destination_service: destination,
        destination_namespace: None,
        destination_pod: None,
        moments: [None; 12],
        retries: 0,
        local_reply: None,
        trace_id: None,
        mesh_leg_id: None,
        parent_span_id: None,
        grpc_status: None,
        protocol: Default::default(),
    }
}

/// A socket's requests sent (client end) or received (server end), oldest
/// first, waiting for their response, each with its anchor: the stream
/// position in the response direction when the request was sent or read.
/// On a connection that does not pipeline, a request's response starts at
/// its anchor; none starts before it.
#[derive(Default)]
pub(super) struct Outstanding(VecDeque<(SpanId, u64)>);

/// Which outstanding request a response answers.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answers {
    /// This one; `skipped`, older, lost their responses unseen.
    Request { id: SpanId, skipped: Vec<SpanId> },
    /// Bytes went by unseen before the response, and it may answer any of
    /// these.
    Unknown(Vec<SpanId>),
    /// None: no request waits whose response could start there.
    Nothing,
}

impl Outstanding {
    pub(super) fn push(&mut self, id: SpanId, anchor: u64) {
        self.0.push_back((id, anchor));
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = SpanId> + '_ {
        self.0.iter().map(|(id, _)| *id)
    }

    /// The request a response starting at stream position `at` answers,
    /// `unseen` when bytes before it in its direction went by unseen since
    /// the previous response. Only requests anchored at or before `at` can
    /// be answered. The oldest anchored exactly at `at` is the one (those
    /// before it lost their responses); without one, the oldest, unless
    /// bytes went by unseen: then it cannot be told.
    pub(super) fn answered_by(&self, at: u64, unseen: bool) -> Answers {
        // Anchors never decrease along the queue: the candidates lead it.
        let candidates = self.0.iter().take_while(|(_, anchor)| *anchor <= at);
        let ids = |n: usize| self.0.iter().take(n).map(|(id, _)| *id).collect();
        if let Some(i) = candidates.clone().position(|(_, anchor)| *anchor == at) {
            return Answers::Request {
                id: self.0[i].0,
                skipped: ids(i),
            };
        }
        match self.0.front() {
            Some(&(id, anchor)) if anchor <= at && !unseen => Answers::Request {
                id,
                skipped: Vec::new(),
            },
            Some(&(_, anchor)) if anchor <= at => Answers::Unknown(ids(candidates.count())),
            _ => Answers::Nothing,
        }
    }

    /// Forgets the `n` oldest (what [`Outstanding::answered_by`] named
    /// leads the queue).
    pub(super) fn drop_front(&mut self, n: usize) {
        self.0.drain(..n.min(self.0.len()));
    }
}

/// Who a span in flight counts against: the network namespace of the
/// socket its request started on, or, for an orphan, the sidecar process
/// that wrote it (tagged by the top bit; namespace cookies count up from 1).
pub(super) type Owner = u64;

pub(super) fn orphan_owner(side: ProxySide) -> Owner {
    (1 << 63) | u64::from(side.tgid)
}

/// The spans in flight.
pub(super) struct Spans {
    spans: LruCache<SpanId, Pending>,
    /// Each owner's spans, oldest first; ids of spans gone since linger
    /// until the owner is next full or the next `expire`.
    owners: HashMap<Owner, VecDeque<SpanId>>,
    per_owner: usize,
    next: SpanId,
    /// Orphans found to be a request: orphan -> that request's span.
    /// Bounded with the spans: an alias is dropped with its target.
    aliases: HashMap<SpanId, SpanId>,
    /// Per sidecar side, orphans answered upstream while they could still
    /// be any of several requests it held, oldest first: kept until one of
    /// those is answered downstream ([`Spans::resolve_by_response`]).
    answered_orphans: HashMap<ProxySide, VecDeque<AnsweredOrphan>>,
    /// Events stamped before this (kernel clock) may have been lost
    /// unseen: a span begun before it is never exact.
    lost_before_ns: u64,
}

/// An orphan whose response its sidecar read upstream.
struct AnsweredOrphan {
    id: SpanId,
    pending: Pending,
    /// When the response was read, and what its head showed.
    read_ns: u64,
    status: u16,
    content_length: Option<u64>,
}

/// Answered orphans kept per sidecar side.
const MAX_ANSWERED_ORPHANS: usize = 256;

impl Spans {
    /// At most `max_pending` in flight, `per_owner` of them one owner's.
    pub(super) fn new(max_pending: usize, per_owner: usize) -> Spans {
        let cap = std::num::NonZeroUsize::new(max_pending.max(1)).expect("max(1)");
        Spans {
            spans: LruCache::new(cap),
            owners: HashMap::new(),
            per_owner: per_owner.max(1),
            next: 1,
            aliases: HashMap::new(),
            answered_orphans: HashMap::new(),
            lost_before_ns: 0,
        }
    }

    /// The span an id stands for (an orphan found to be a request stands
    /// for that request).
    fn alias(&self, id: SpanId) -> SpanId {
        self.aliases.get(&id).copied().unwrap_or(id)
    }

    /// Adds a span; returns its id and how many requests were dropped to
    /// make room (counted `evicted`; orphans are not requests).
    fn push(&mut self, owner: Owner, mut pending: Pending) -> (SpanId, u64) {
        // Begun before a loss the agent learnt of while reading the events
        // that follow it: the lost event may have been its own.
        pending.lost |= pending.started_ns < self.lost_before_ns;
        let id = self.next;
        self.next += 1;
        let mut evicted = 0;
        let queue = self.owners.entry(owner).or_default();
        if queue.len() >= self.per_owner {
            let spans = &self.spans;
            queue.retain(|id| spans.contains(id));
            if queue.len() >= self.per_owner {
                // All still in flight: the owner's oldest eighth goes, at
                // once, so that a flood costs one pass per eighth.
                let n = (self.per_owner / 8).max(1);
                for old in queue.drain(..n) {
                    if let Some(p) = self.spans.pop(&old) {
                        evicted += u64::from(p.orphan_at.is_none());
                        self.aliases.retain(|from, to| *to != old && *from != old);
                    }
                }
            }
        }
        queue.push_back(id);
        if let Some((old, p)) = self.spans.push(id, pending) {
            if old != id {
                self.aliases.retain(|from, to| *to != old && *from != old);
                evicted += u64::from(p.orphan_at.is_none());
            }
        }
        (id, evicted)
    }

    /// A new span from the app's request, labelled with its leg's source
    /// and destination. The reason to count when an older span was dropped
    /// to make room.
    pub(super) fn start(
        &mut self,
        owner: Owner,
        source: String,
        destination: String,
        msg: &Message,
    ) -> (SpanId, u64) {
        let labels = (source, destination);
        self.start_at(owner, Place::AppClient, labels, msg.ts_ns, Some(&msg.head))
    }

    /// A new span from a request first seen at `origin` (the app's send,
    /// or the inbound sidecar's read of a client on another node: the
    /// server's half), labelled (source, destination), as
    /// [`Spans::start`].
    pub(super) fn start_at(
        &mut self,
        owner: Owner,
        origin: Place,
        labels: (String, String),
        msg_ts_ns: u64,
        head: Option<&Head>,
    ) -> (SpanId, u64) {
        let (source, destination) = labels;
        let request_id = match head {
            Some(Head::Request { request_id, .. }) => request_id.clone(),
            _ => None,
        };
        self.push(
            owner,
            Pending {
                span: blank(request_id, source, destination),
                started_ns: msg_ts_ns,
                identity: Identity::of(head),
                contested: 0,
                lost: false,
                orphan_at: None,
                mesh_leg: None,
                trace_context: None,
                waiting_for: None,
                origin,
                candidates: None,
                h2_heads: [None; 12],
                absorbed: false,
            },
        )
    }

    /// A span for an upstream write at `at` by `side` that belongs to no
    /// request this node saw start, or to one of `candidates` (none can
    /// tell which yet); known by what the write showed.
    pub(super) fn orphan(
        &mut self,
        at: Place,
        side: ProxySide,
        candidates: Vec<SpanId>,
        msg: &Message,
    ) -> (SpanId, u64) {
        self.push(
            orphan_owner(side),
            Pending {
                span: blank(None, String::new(), String::new()),
                started_ns: msg.ts_ns,
                identity: Identity::of(Some(&msg.head)),
                contested: 0,
                lost: false,
                orphan_at: Some(at),
                mesh_leg: None,
                trace_context: None,
                waiting_for: None,
                origin: at,
                candidates: (!candidates.is_empty()).then_some((side, candidates)),
                h2_heads: [None; 12],
                absorbed: false,
            },
        )
    }

    /// For orphan `id` still to be settled: the side that wrote it and the
    /// requests it may be.
    pub(super) fn candidates(&self, id: SpanId) -> Option<(ProxySide, Vec<SpanId>)> {
        self.spans
            .peek(&self.alias(id))
            .and_then(|p| p.candidates.clone())
    }

    /// What orphan `id`'s write was, shown later (its TLS plaintext).
    pub(super) fn identify_orphan(&mut self, id: SpanId, identity: &Identity) {
        if let Some(p) = self.spans.peek_mut(&id) {
            if p.orphan_at.is_some() && p.identity.is_none() {
                p.identity = Some(identity.clone());
            }
        }
    }

    /// Request `span`, read by `side` and reported only now, may be what
    /// orphan `id`'s write was.
    pub(super) fn add_candidate(&mut self, id: SpanId, side: ProxySide, span: SpanId) {
        if let Some(p) = self.spans.peek_mut(&id) {
            if p.orphan_at.is_some() {
                let (_, candidates) = p.candidates.get_or_insert_with(|| (side, Vec::new()));
                if !candidates.contains(&span) {
                    candidates.push(span);
                }
            }
        }
    }

    /// Orphan `orphan` is request `span`: its moments so far join the
    /// span's, and from now on it stands for it.
    pub(super) fn settle(&mut self, orphan: SpanId, span: SpanId) {
        let Some(o) = self.spans.pop(&orphan) else {
            return;
        };
        if let Some(p) = self.spans.get_mut(&span) {
            p.absorb(o);
            self.aliases.insert(orphan, span);
        }
    }

    /// Records the request of span `id` at request moment `moment`; the
    /// first head that shows a request gives the span its method and path,
    /// the first with a trace context its trace.
    /// The span, for more to record; None when it is no longer in flight
    /// (completed, or dropped and counted then).
    pub(super) fn request(
        &mut self,
        id: SpanId,
        moment: usize,
        ts_ns: u64,
        head: Option<&Head>,
    ) -> Option<&mut Span> {
        let p = self.spans.get_mut(&self.alias(id))?;
        p.span.moments[moment] = Some(ts_ns);
        if let Some(Head::Request {
            method,
            path,
            trace_context,
            grpc,
            ..
        }) = head
        {
            if *grpc {
                p.span.protocol = crate::spans::span::Protocol::Grpc;
            }
            if p.span.method.is_empty() {
                p.span.method = method.clone();
                p.span.path = crate::spans::http::template_path(path);
            }
            if p.trace_context.is_none() {
                p.trace_context = *trace_context;
                // The client app's write names the app's own span; a
                // sidecar's may name the sidecar's.
                if moment == 0 {
                    p.span.parent_span_id = trace_context.and_then(|t| t.parent_hex());
                }
            }
        }
        Some(&mut p.span)
    }

    /// A request id seen for span `id`, kept unless it has one.
    pub(super) fn note_request_id(&mut self, id: SpanId, request_id: Option<&str>) {
        let id = self.alias(id);
        if let (Some(rid), Some(p)) = (request_id, self.spans.get_mut(&id)) {
            p.span.request_id.get_or_insert_with(|| rid.to_owned());
        }
    }

    /// The trace id of span `id`: set, or kept if it has one unless
    /// `replace`.
    pub(super) fn note_mesh_leg(&mut self, id: SpanId, leg: MeshLeg, replace: bool) {
        let id = self.alias(id);
        if let Some(p) = self.spans.peek_mut(&id) {
            if replace || p.mesh_leg.is_none() {
                p.mesh_leg = Some(leg);
            }
        }
    }

    /// The namespaces of span `id`'s source workload and destination
    /// service.
    pub(super) fn note_namespaces(
        &mut self,
        id: SpanId,
        (source, destination): (Option<String>, Option<String>),
    ) {
        if let Some(p) = self.spans.peek_mut(&id) {
            p.span.source_namespace = source;
            p.span.destination_namespace = destination;
        }
    }

    /// The request id span `id` is known by.
    #[cfg(test)]
    pub(super) fn request_id(&self, id: SpanId) -> Option<String> {
        self.spans
            .peek(&self.alias(id))
            .and_then(|p| p.span.request_id.clone())
    }

    /// Whether span `id` is still in flight.
    /// Whether `id` is an orphan still standing for itself (not settled,
    /// not completed).
    pub(super) fn is_unsettled_orphan(&self, id: SpanId) -> bool {
        self.spans.peek(&id).is_some_and(|p| p.orphan_at.is_some())
    }

    pub(super) fn in_flight(&self, id: SpanId) -> bool {
        self.spans.contains(&self.alias(id))
    }

    /// What the request of span `id` showed where it started.
    pub(super) fn identity(&self, id: SpanId) -> Option<Identity> {
        self.spans
            .peek(&self.alias(id))
            .and_then(|p| p.identity.clone())
    }

    /// Whether span `id` is in flight and its upstream attempt has been
    /// answered (t9): a second write of it can be a retry.
    pub(super) fn answered(&self, id: SpanId) -> bool {
        self.spans
            .peek(&self.alias(id))
            .is_some_and(|p| p.span.moments[9].is_some())
    }

    /// The gRPC status (from trailers) of span `id`'s response.
    /// Span `id`'s response moment at `place` is an HTTP/2 stream's end,
    /// whose head was read or written at `head_ns`.
    pub(super) fn note_h2_response_head(&mut self, id: SpanId, place: Place, head_ns: u64) {
        let id = self.alias(id);
        if let Some(p) = self.spans.peek_mut(&id) {
            p.h2_heads[place.moments().1] = Some(head_ns);
        }
    }

    pub(super) fn note_grpc_status(&mut self, id: SpanId, code: u32) {
        let id = self.alias(id);
        if let Some(p) = self.spans.peek_mut(&id) {
            p.span.grpc_status = Some(code);
        }
    }

    /// Another upstream attempt of span `id`.
    pub(super) fn retried(&mut self, id: SpanId) {
        let id = self.alias(id);
        if let Some(p) = self.spans.get_mut(&id) {
            p.span.retries += 1;
        }
    }

    /// Whether a write span `id` could not be told from contests it.
    pub(super) fn is_contested(&self, id: SpanId) -> bool {
        self.spans
            .peek(&self.alias(id))
            .is_some_and(|p| p.contested > 0)
    }

    /// A sidecar wrote a request it could not tell from span `id`.
    pub(super) fn contest(&mut self, id: SpanId) {
        let id = self.alias(id);
        if let Some(p) = self.spans.peek_mut(&id) {
            p.contested += 1;
        }
    }

    /// A write span `id` was contested by turned out to be another
    /// request's.
    pub(super) fn uncontest(&mut self, id: SpanId) {
        let id = self.alias(id);
        if let Some(p) = self.spans.peek_mut(&id) {
            p.contested = p.contested.saturating_sub(1);
        }
    }

    /// An event that may have been span `id`'s was lost.
    pub(super) fn mark_lost(&mut self, id: SpanId) {
        let id = self.alias(id);
        if let Some(p) = self.spans.peek_mut(&id) {
            p.lost = true;
        }
    }

    /// Events stamped before `before_ns` may have been lost: every span in
    /// flight, and every span yet to come that begins before then (its
    /// first events may still be on their way, read in the same batch as
    /// the loss was learnt), may have lost one.
    pub(super) fn mark_all_lost(&mut self, before_ns: u64) {
        self.lost_before_ns = self.lost_before_ns.max(before_ns);
        for (_, p) in self.spans.iter_mut() {
            p.lost = true;
        }
        for orphans in self.answered_orphans.values_mut() {
            for o in orphans.iter_mut() {
                o.pending.lost = true;
            }
        }
    }

    /// A sidecar answered span `id` itself.
    pub(super) fn local_reply(&mut self, id: SpanId, by: LocalReply) {
        let id = self.alias(id);
        if let Some(p) = self.spans.peek_mut(&id) {
            p.span.local_reply = Some(by);
        }
    }

    /// Whether span `id`'s request has yet to reach the server end of the
    /// leg whose client end is at `place`: bytes from that server are then
    /// not its response (e.g. a TLS session ticket).
    pub(super) fn not_yet_arrived(&self, id: SpanId, place: Place) -> bool {
        let next = place.moments().0 + 1;
        self.spans
            .peek(&self.alias(id))
            .is_some_and(|p| p.span.moments[next].is_none())
    }

    /// Drops span `id`, uncounted, if it began at `origin` from bytes that
    /// showed no request (encrypted) and was never written on from there:
    /// its socket closed, so it can never be answered, and it was no
    /// request.
    pub(super) fn drop_if_never_forwarded(&mut self, id: SpanId, origin: Place) {
        let id = self.alias(id);
        let next = origin.moments().0 + 1;
        let unseen = self.spans.peek(&id).is_some_and(|p| {
            p.origin == origin && p.identity.is_none() && p.span.moments[next].is_none()
        });
        if unseen {
            self.spans.pop(&id);
        }
    }

    /// Drops span `id`, which lost an event that cannot be made up for;
    /// whether it was a request (to count), not an orphan.
    pub(super) fn abandon(&mut self, id: SpanId) -> bool {
        let id = self.alias(id);
        let Some(p) = self.spans.pop(&id) else {
            return false;
        };
        self.aliases.retain(|_, to| *to != id);
        p.orphan_at.is_none()
    }

    /// The response to span `id` on a socket at `place`. The span it
    /// completes, when it reached the app and is exact; the reason it is
    /// not exported otherwise.
    pub(super) fn response(
        &mut self,
        id: SpanId,
        place: Place,
        msg: &Message,
    ) -> Result<Option<Span>, Unstitched> {
        let (_, at) = place.moments();
        let id = self.alias(id);
        let Some(p) = self.spans.get_mut(&id) else {
            // Completed or dropped already, and counted then.
            return Ok(None);
        };
        p.span.moments[at] = Some(msg.ts_ns);
        if let Head::Response { status, .. } = msg.head {
            // The status the client finally sees wins: it is written last.
            p.span.status = status;
        }
        if p.orphan_at == Some(place) {
            if let Some(p) = self.spans.pop(&id) {
                self.keep_answered_orphan(id, p, msg);
            }
            return Ok(None);
        }
        if place == p.origin {
            // On loopback the reader can return before the writer's event
            // is taken: the response reached the origin before the sidecar's
            // write of it (t10, or t7 for a server's half) is reported. The
            // span waits for that moment rather than going out without it.
            let (pass, before) = (p.origin.moments().0 + 1, at - 1);
            if p.span.moments[pass].is_some() && p.span.moments[before].is_none() {
                p.waiting_for = Some(before);
                return Ok(None);
            }
        } else if p.waiting_for != Some(at) {
            return Ok(None);
        }
        let Some(mut done) = self.spans.pop(&id) else {
            return Ok(None);
        };
        done.settle_response_moments();
        done.span.settle_leg_skew();
        self.aliases.retain(|_, to| *to != id);
        if done.contested > 0 {
            Err(Unstitched::Ambiguous)
        } else if done.lost {
            Err(Unstitched::LostEvent)
        } else if !done.span.is_consistent() {
            Err(Unstitched::Inconsistent)
        } else {
            done.span.mesh_leg_id = done.mesh_leg.map(|l| l.trace_id());
            done.span.trace_id = match done.trace_context {
                Some(caller) => Some(caller.trace_hex()),
                None => done.span.mesh_leg_id.clone(),
            };
            Ok(Some(done.span))
        }
    }

    /// Orphan `id` (`p`), answered upstream by `msg`: kept if it may still
    /// be one of several requests its sidecar held.
    fn keep_answered_orphan(&mut self, id: SpanId, p: Pending, msg: &Message) {
        let Head::Response {
            status,
            content_length,
            ..
        } = msg.head
        else {
            return;
        };
        // An interim response (100 Continue) is not the answer.
        if status < 200 {
            return;
        }
        let Some((side, candidates)) = &p.candidates else {
            return;
        };
        if candidates.is_empty() {
            return;
        }
        // Over HTTP/2 the moment is the stream's end; the response's head,
        // read before, is what the sidecar may pass on first.
        let at = p.origin.moments().1;
        let read_ns = p.h2_heads[at].unwrap_or(msg.ts_ns);
        let queue = self.answered_orphans.entry(*side).or_default();
        if queue.len() == MAX_ANSWERED_ORPHANS {
            queue.pop_front();
        }
        queue.push_back(AnsweredOrphan {
            id,
            pending: p,
            read_ns,
            status,
            content_length,
        });
    }

    /// Request `id`, which `side` held among others it could not be told
    /// from and surely wrote upstream (no longer held: as many writes as
    /// requests held went up, so no local reply is among them), is answered
    /// downstream at `written_ns` with `head`. `live`: the orphans of
    /// `side` still unanswered upstream. A response goes downstream after
    /// the sidecar read it upstream, with its status and length: when
    /// every write that contested the request is known, none of them a
    /// retry of another (the same `x-request-id`), and exactly one was
    /// answered upstream before this response with the same status (and
    /// length, where both show one), that write was this request's. It
    /// joins the request, and the other writes are no longer its. Whether
    /// it did.
    pub(super) fn resolve_by_response(
        &mut self,
        id: SpanId,
        side: ProxySide,
        head: &Head,
        written_ns: u64,
        live: &[SpanId],
    ) -> bool {
        let Head::Response {
            status,
            content_length,
            ..
        } = *head
        else {
            return false;
        };
        if status < 200 {
            return false;
        }
        let id = self.alias(id);
        let Some(contested) = self
            .spans
            .peek(&id)
            .filter(|p| !p.absorbed)
            .map(|p| p.contested)
        else {
            return false;
        };
        if contested == 0 {
            return false;
        }
        let lists = |p: &Pending| {
            p.candidates
                .as_ref()
                .is_some_and(|(s, c)| *s == side && c.contains(&id))
        };
        let live: Vec<SpanId> = live
            .iter()
            .copied()
            .filter(|o| self.spans.peek(o).is_some_and(&lists))
            .collect();
        let Some(answered) = self.answered_orphans.get_mut(&side) else {
            return false;
        };
        let listing: Vec<usize> = (0..answered.len())
            .filter(|&i| lists(&answered[i].pending))
            .collect();
        // A contest this side cannot name (a write forgotten for room, one
        // rewritten past recognition, an orphan dropped): no evidence.
        if listing.len() + live.len() != contested as usize {
            return false;
        }
        // A retry is a second write of one request: it breaks "one write,
        // one request" (and the sidecar's count of writes against what it
        // held), so nothing is concluded where one may be among them.
        let ids: Vec<&str> = listing
            .iter()
            .filter_map(|&i| answered[i].pending.identity.as_ref()?.request_id())
            .chain(
                live.iter()
                    .filter_map(|o| self.spans.peek(o)?.identity.as_ref()?.request_id()),
            )
            .collect();
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        if unique.len() != ids.len() {
            return false;
        }
        let fits = |a: &AnsweredOrphan| {
            a.read_ns < written_ns
                && a.status == status
                && match (a.content_length, content_length) {
                    (Some(up), Some(down)) => up == down,
                    _ => true,
                }
        };
        let fitting: Vec<usize> = listing
            .iter()
            .copied()
            .filter(|&i| fits(&answered[i]))
            .collect();
        let [one] = fitting[..] else {
            return false;
        };
        let Some(found) = answered.remove(one) else {
            return false;
        };
        for other in answered.iter_mut() {
            if let Some((_, c)) = other.pending.candidates.as_mut() {
                c.retain(|&s| s != id);
            }
        }
        for o in live {
            if let Some((_, c)) = self.spans.peek_mut(&o).and_then(|p| p.candidates.as_mut()) {
                c.retain(|&s| s != id);
            }
        }
        // The write was this request's: the others it could have been are
        // no longer contested by it (one already joined to a write counts
        // its contests otherwise, and keeps them).
        if let Some((_, others)) = &found.pending.candidates {
            for &other in others.iter().filter(|&&c| c != id) {
                let joined = self
                    .spans
                    .peek(&self.alias(other))
                    .is_some_and(|p| p.absorbed);
                if !joined {
                    self.uncontest(other);
                }
            }
        }
        if let Some(p) = self.spans.get_mut(&id) {
            p.absorb(found.pending);
            self.aliases.insert(found.id, id);
        }
        true
    }

    /// Drops spans started `timeout_ns` or longer before `now_ns`; returns
    /// how many requests (orphans are not requests).
    pub(super) fn expire(&mut self, now_ns: u64, timeout_ns: u64) -> u64 {
        let mut expired = 0;
        while let Some((_, p)) = self.spans.peek_lru() {
            if now_ns.saturating_sub(p.started_ns) < timeout_ns {
                break;
            }
            if let Some((id, p)) = self.spans.pop_lru() {
                expired += u64::from(p.orphan_at.is_none());
                self.aliases.retain(|_, to| *to != id);
            }
        }
        self.answered_orphans.retain(|_, queue| {
            queue.retain(|a| now_ns.saturating_sub(a.pending.started_ns) < timeout_ns);
            !queue.is_empty()
        });
        // Owners keep only what is still in flight; those with none leave.
        let spans = &self.spans;
        self.owners.retain(|_, queue| {
            queue.retain(|id| spans.contains(id));
            !queue.is_empty()
        });
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
            target: path.into(),
            host: None,
            request_id: request_id.map(str::to_string),
            content_length: None,
            trace_context: None,
            grpc: false,
            end_to_end: Default::default(),
        }
    }

    fn response(status: u16) -> Head {
        Head::Response {
            status,
            request_id: None,
            content_length: None,
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
        let (id, evicted) = spans.start(1, "productpage".into(), "reviews".into(), &m);
        assert_eq!(evicted, 0);
        spans.request(id, 0, ts_ns, Some(&m.head)).unwrap();
        id
    }

    fn at_app_client(spans: &mut Spans, id: SpanId) -> Option<Span> {
        spans
            .response(id, Place::AppClient, &msg(Dir::Recv, 1_000, response(200)))
            .unwrap()
    }

    #[test]
    fn start_labels_the_span_and_takes_the_request_id() {
        let mut spans = Spans::new(8, 8);
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
        let mut spans = Spans::new(8, 8);
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

    /// A socket's queue of (request, anchor).
    fn queue(requests: &[(SpanId, u64)]) -> Outstanding {
        let mut out = Outstanding::default();
        for &(id, anchor) in requests {
            out.push(id, anchor);
        }
        out
    }

    #[test]
    fn a_response_answers_the_oldest_request_when_nothing_went_unseen() {
        // Anchors before the response (a TLS session ticket read before
        // the request was sent, say): the oldest, in order.
        let out = queue(&[(1, 100), (2, 100)]);
        let want = Answers::Request {
            id: 1,
            skipped: vec![],
        };
        assert_eq!(out.answered_by(150, false), want);
        // Pipelined: both anchored where the first response starts.
        assert_eq!(out.answered_by(100, false), want);
    }

    #[test]
    fn after_unseen_bytes_only_a_request_anchored_at_the_response_is_answered() {
        // Request 1's response went by unseen; request 2 was sent after the
        // client read it, so its response starts where the client was.
        let out = queue(&[(1, 100), (2, 180)]);
        let want = Answers::Request {
            id: 2,
            skipped: vec![1],
        };
        assert_eq!(out.answered_by(180, true), want);
        assert_eq!(out.answered_by(180, false), want);
        // Anchored elsewhere: any of them may be the one.
        assert_eq!(out.answered_by(200, true), Answers::Unknown(vec![1, 2]));
    }

    #[test]
    fn a_request_read_after_the_response_began_is_not_what_it_answers() {
        // A server end: request 9 arrived unseen between 1 and 2, and its
        // response (at 150) is written before request 2 could have been read.
        let out = queue(&[(1, 100), (2, 200)]);
        assert!(matches!(
            out.answered_by(100, false),
            Answers::Request { id: 1, .. }
        ));
        let mut out = queue(&[(2, 200)]);
        assert_eq!(out.answered_by(150, false), Answers::Nothing);
        assert_eq!(
            Outstanding::default().answered_by(0, false),
            Answers::Nothing
        );
        out.drop_front(1);
        assert_eq!(out.answered_by(200, false), Answers::Nothing);
    }

    #[test]
    fn a_response_gives_its_moment_to_the_request_it_answers_only() {
        let mut spans = Spans::new(8, 8);
        let first = started(&mut spans, 10, "/a");
        let second = started(&mut spans, 20, "/b");
        // The inbound sidecar's 15006 socket answered the first.
        let r = spans.response(
            first,
            Place::InboundDown,
            &msg(Dir::Send, 100, response(503)),
        );
        assert!(matches!(r, Ok(None)));
        let done = at_app_client(&mut spans, first).expect("completed");
        assert_eq!(done.moments[8], Some(100));
        let other = at_app_client(&mut spans, second).expect("completed");
        assert_eq!(other.moments[8], None);
    }

    #[test]
    fn an_abandoned_request_is_gone_and_counted_once() {
        let mut spans = Spans::new(8, 8);
        let id = started(&mut spans, 10, "/a");
        assert!(spans.abandon(id));
        assert!(!spans.abandon(id));
        assert!(matches!(
            spans.response(id, Place::AppClient, &msg(Dir::Recv, 50, response(200))),
            Ok(None)
        ));
        assert_eq!(spans.len(), 0);
    }

    #[test]
    fn status_written_last_wins() {
        let mut spans = Spans::new(8, 8);
        let id = started(&mut spans, 10, "/a");
        spans
            .response(id, Place::AppServer, &msg(Dir::Send, 50, response(503)))
            .unwrap();
        let done = at_app_client(&mut spans, id).expect("completed");
        assert_eq!(done.status, 200);
        assert_eq!(done.moments[6], Some(50));
    }

    #[test]
    fn bytes_before_the_server_here_received_the_request_are_no_response() {
        let mut spans = Spans::new(8, 8);
        let id = started(&mut spans, 10, "/a");
        // The app client's peer (the sidecar's 15001 socket) has not read
        // it: t1 is missing.
        assert!(spans.not_yet_arrived(id, Place::AppClient));
        spans.request(id, 1, 15, None).unwrap();
        assert!(!spans.not_yet_arrived(id, Place::AppClient));
    }

    #[test]
    fn completion_only_at_the_app_client() {
        let mut spans = Spans::new(8, 8);
        let id = started(&mut spans, 10, "/a");
        spans.request(id, 1, 11, None).unwrap();
        let r = spans.response(id, Place::OutboundDown, &msg(Dir::Send, 90, response(200)));
        assert!(matches!(r, Ok(None)));
        assert_eq!(spans.len(), 1);
        let done = spans
            .response(id, Place::AppClient, &msg(Dir::Recv, 100, response(200)))
            .unwrap()
            .expect("completed");
        assert_eq!(done.moments[10], Some(90));
        assert_eq!(done.moments[11], Some(100));
        assert_eq!(spans.len(), 0);
    }

    #[test]
    fn retries_and_request_ids_noted() {
        let mut spans = Spans::new(8, 8);
        let m = msg(Dir::Send, 10, request("/a", None));
        let (id, _) = spans.start(1, "a".into(), "b".into(), &m);
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
        let mut spans = Spans::new(8, 8);
        let old = started(&mut spans, 0, "/a");
        let young = started(&mut spans, 50, "/b");
        assert_eq!(spans.expire(59, 60), 0);
        assert_eq!(spans.expire(100, 60), 1);
        assert_eq!(spans.len(), 1);
        assert!(spans.request(old, 1, 1, None).is_none());
        assert!(spans.request(young, 1, 1, None).is_some());
        assert_eq!(spans.expire(u64::MAX, 60), 1);
        assert_eq!(spans.len(), 0);
    }

    #[test]
    fn an_owner_past_its_share_evicts_its_own_oldest_not_anothers() {
        let mut spans = Spans::new(64, 16);
        let m = |ts| msg(Dir::Send, ts, request("/flood", None));
        let (quiet, _) = spans.start(7, "a".into(), "b".into(), &m(0));
        let mut flood = Vec::new();
        let mut evicted = 0;
        for ts in 1..=40 {
            let (id, n) = spans.start(9, "x".into(), "y".into(), &m(ts));
            flood.push(id);
            evicted += n;
        }
        // The flood's oldest went, an eighth of its share at a time.
        assert_eq!(evicted, 40 - 16);
        assert!(
            spans.request(quiet, 1, 50, None).is_some(),
            "another owner's span stays"
        );
        assert!(spans.request(flood[0], 1, 50, None).is_none());
        assert!(spans.request(*flood.last().unwrap(), 1, 50, None).is_some());
        // Owners with nothing in flight leave at the next expiry pass.
        spans.expire(u64::MAX, 1);
        assert!(spans.owners.is_empty());
    }

    #[test]
    fn eviction_when_full_is_counted_and_the_dropped_span_is_gone() {
        let mut spans = Spans::new(2, 8);
        let first = started(&mut spans, 1, "/a");
        let second = started(&mut spans, 2, "/b");
        // Touching the first makes the second the least recently used.
        spans.request(first, 1, 3, None).unwrap();
        let m = msg(Dir::Send, 4, request("/c", None));
        let (third, evicted) = spans.start(1, "a".into(), "b".into(), &m);
        assert_eq!(evicted, 1);
        assert_eq!(spans.len(), 2);
        assert!(spans.request(second, 1, 5, None).is_none());
        assert!(spans.request(first, 2, 5, None).is_some());
        assert!(spans.request(third, 1, 5, None).is_some());
        // A response for a dropped span: counted when it was dropped.
        let r = spans.response(
            second,
            Place::InboundDown,
            &msg(Dir::Send, 6, response(200)),
        );
        assert!(matches!(r, Ok(None)));
    }
}
