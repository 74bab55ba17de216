//! Stitching: the messages framed on each socket, joined into one span per
//! request across the six sockets it crosses.
//!
//! - Across a leg (app <-> 15001, sidecar <-> 15006, 127.0.0.6 <-> app) a
//!   request is matched exactly: the receiver's message starts at the stream
//!   offset where the sender's began, whatever the bytes are (TLS included).
//! - Responses come back on the socket the request went out on: each
//!   socket keeps its outstanding requests in order (HTTP/1.1).
//! - Inside a sidecar, a request read downstream is matched to the request
//!   written upstream by x-request-id, else by method and path, else by
//!   thread, else by order; a second upstream write with the same id is a
//!   retry (its moments replace the failed attempt's).
//!
//! What cannot be matched is counted by reason, never guessed.
use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt as _};

use lru::LruCache;

use super::{
    http::{Chunk, Dir, Framer, Head, Message},
    span::Span,
};
use crate::flows::{
    legs::LegKind,
    socket::{Role, Socket, INBOUND_PORT, OUTBOUND_PORT},
    table::FlowTable,
};

/// Why a request produced no span. Label values of
/// `mesh_trace_requests_unstitched_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unstitched {
    /// A sidecar read a request no traced app socket sent (e.g. the client
    /// was not redirected on this node, or its bytes were lost).
    NoSender,
    /// A sidecar wrote upstream a request it was never seen reading.
    NoDownstream,
    /// A response arrived on a socket with no outstanding request.
    NoRequest,
    /// The request never completed within the time limit.
    Timeout,
    /// Dropped to keep memory bounded.
    Evicted,
    /// The app sent bytes that are not an HTTP/1.1 request (other protocols,
    /// malformed requests): tracked as TCP only.
    NotHttp,
}

impl Unstitched {
    pub const ALL: [Unstitched; 6] = [
        Unstitched::NoSender,
        Unstitched::NoDownstream,
        Unstitched::NoRequest,
        Unstitched::Timeout,
        Unstitched::Evicted,
        Unstitched::NotHttp,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Unstitched::NoSender => "no_sender",
            Unstitched::NoDownstream => "no_downstream",
            Unstitched::NoRequest => "no_request",
            Unstitched::Timeout => "timeout",
            Unstitched::Evicted => "evicted",
            Unstitched::NotHttp => "not_http",
        }
    }
}

/// Where a socket sits on a request's path, which says which moment its
/// messages are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// App socket to its outbound sidecar: t0 send request, t11 recv response.
    AppClient,
    /// Outbound sidecar's 15001 socket: t1, t10.
    OutboundDown,
    /// Outbound sidecar's upstream socket: t2, t9.
    OutboundUp,
    /// Inbound sidecar's 15006 socket: t3, t8.
    InboundDown,
    /// Inbound sidecar's socket to the app from 127.0.0.6: t4, t7.
    InboundUp,
    /// The server app's socket: t5, t6.
    AppServer,
}

impl Place {
    fn of(sock: &Socket, leg: Option<LegKind>) -> Option<Place> {
        let passthrough_ip = std::net::IpAddr::from(crate::flows::socket::INBOUND_PASSTHROUGH_IP);
        Some(match sock.role {
            // Data can be reported before the leg is joined (the server's
            // ESTABLISHED may come later); in a meshed pod every outgoing
            // app connection but loopback is redirected.
            Role::AppClient
                if leg == Some(LegKind::Redirect)
                    || (leg.is_none() && !sock.remote.ip().is_loopback()) =>
            {
                Place::AppClient
            }
            Role::ProxyDownstream if sock.local.port() == OUTBOUND_PORT => Place::OutboundDown,
            Role::ProxyDownstream if sock.local.port() == INBOUND_PORT => Place::InboundDown,
            Role::ProxyUpstream if sock.local.ip() == passthrough_ip => Place::InboundUp,
            Role::ProxyUpstream => Place::OutboundUp,
            Role::AppServer if sock.remote.ip() == passthrough_ip => Place::AppServer,
            _ => return None,
        })
    }

    /// Indexes of (request moment, response moment).
    fn moments(self) -> (usize, usize) {
        match self {
            Place::AppClient => (0, 11),
            Place::OutboundDown => (1, 10),
            Place::OutboundUp => (2, 9),
            Place::InboundDown => (3, 8),
            Place::InboundUp => (4, 7),
            Place::AppServer => (5, 6),
        }
    }

    /// Whether this socket sends the requests (client end of its leg).
    fn sends_requests(self) -> bool {
        matches!(
            self,
            Place::AppClient | Place::OutboundUp | Place::InboundUp
        )
    }
}

type SpanId = u64;

struct Pending {
    span: Span,
    started_ns: u64,
}

/// A request read by a sidecar and not yet written upstream.
struct Forwardable {
    span: SpanId,
    ts_ns: u64,
    tid: u32,
    request_id: Option<String>,
    method: String,
    path: String,
}

/// A request written on a socket, waiting to be read at the other end.
#[derive(Clone, Copy)]
struct Sent {
    offset: u64,
    span: SpanId,
}

/// A read at the server end of a leg: the moment a request arrived.
#[derive(Clone)]
struct Arrival {
    cookie: u64,
    place: Place,
    tgid: u32,
    ts_ns: u64,
    tid: u32,
    /// The request's head, when the read started with it.
    head: Option<Head>,
    /// Stream range the read covered.
    offset: u64,
    end: u64,
}

struct SockState {
    framer: Framer,
    /// Requests sent (client end) or received (server end), oldest first,
    /// waiting for their response.
    outstanding: VecDeque<SpanId>,
}

#[derive(Clone, Debug)]
pub struct StitchConfig {
    /// Requests in flight at once.
    pub max_pending: usize,
    /// A request not answered within this time is dropped.
    pub timeout_ns: u64,
}

impl Default for StitchConfig {
    fn default() -> Self {
        StitchConfig {
            max_pending: 65_536,
            timeout_ns: 60_000_000_000,
        }
    }
}

/// A sidecar process and the side of it a request crosses. Apps propagate
/// x-request-id, so the same id crosses a sidecar inbound and again
/// outbound (reviews calling ratings): the two sides never match each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ProxySide {
    tgid: u32,
    inbound: bool,
}

/// Most requests a sidecar may hold between reading and forwarding, and
/// most requests in flight on one connection.
const MAX_QUEUE: usize = 4096;

pub struct Stitcher {
    cfg: StitchConfig,
    spans: LruCache<SpanId, Pending>,
    next: SpanId,
    sockets: HashMap<u64, SockState>,
    /// Per sending socket: requests written, not yet read at the other end,
    /// in stream order. Reads are matched by stream offset, so a read that
    /// coalesces several writes (a TLS handshake and a request) still finds
    /// the request inside it.
    sent: HashMap<u64, VecDeque<Sent>>,
    /// Per sending socket: reads reported before the matching write. On
    /// loopback the reader can run (and its event be queued) before the
    /// writer's tracepoint does.
    early: HashMap<u64, VecDeque<Arrival>>,
    /// Per sidecar process and side: requests read, not yet forwarded.
    forwardable: HashMap<ProxySide, VecDeque<Forwardable>>,
    /// Per outbound sidecar process: (request id, path) -> span, to see
    /// retries. The path too: an app propagates one id to several services.
    forwarded: HashMap<ProxySide, LruCache<(String, String), SpanId>>,
    pub unstitched: HashMap<Unstitched, u64>,
}

impl Stitcher {
    pub fn new(cfg: StitchConfig) -> Stitcher {
        let cap = std::num::NonZeroUsize::new(cfg.max_pending.max(1)).expect("max(1)");
        Stitcher {
            spans: LruCache::new(cap),
            next: 1,
            sockets: HashMap::new(),
            sent: HashMap::new(),
            early: HashMap::new(),
            forwardable: HashMap::new(),
            forwarded: HashMap::new(),
            unstitched: HashMap::new(),
            cfg,
        }
    }

    fn count(&mut self, why: Unstitched) {
        *self.unstitched.entry(why).or_default() += 1;
    }

    /// Feeds one data event; completed spans go to `out`.
    pub fn data(
        &mut self,
        flows: &FlowTable,
        ev: &mesh_trace_common::DataEvent,
        out: &mut Vec<Span>,
    ) {
        let Some(sock) = flows.socket(ev.sock_cookie) else {
            return;
        };
        let Some(place) = Place::of(sock, flows.leg_info(ev.sock_cookie).map(|l| l.0)) else {
            return;
        };
        let state = self
            .sockets
            .entry(ev.sock_cookie)
            .or_insert_with(|| SockState {
                framer: Framer::new(),
                outstanding: VecDeque::new(),
            });
        let prefix = &ev.prefix[..(ev.prefix_len as usize).min(ev.prefix.len())];
        let chunk = Chunk {
            ts_ns: ev.header.ts_ns,
            tid: ev.pid_tgid as u32,
            dir: if ev.direction == mesh_trace_common::DIR_SEND {
                Dir::Send
            } else {
                Dir::Recv
            },
            offset: ev.offset,
            len: ev.len,
            prefix,
        };
        let msg = state.framer.push(&chunk);
        let tgid = (ev.pid_tgid >> 32) as u32;
        let handshake = super::http::is_tls_handshake(prefix);
        if !place.sends_requests() && chunk.dir == Dir::Recv {
            let arrival = Arrival {
                cookie: ev.sock_cookie,
                place,
                tgid,
                ts_ns: chunk.ts_ns,
                tid: chunk.tid,
                head: msg.as_ref().map(|m| m.head.clone()),
                offset: chunk.offset,
                end: chunk.offset.saturating_add(u64::from(chunk.len)),
            };
            self.receive(flows, arrival, msg.is_some() && !handshake);
            return;
        }
        // Connection set-up is neither a request nor a response.
        let Some(msg) = msg.filter(|_| !handshake) else {
            return;
        };
        if place.sends_requests() && msg.dir == Dir::Send {
            self.send(flows, ev.sock_cookie, place, tgid, &msg);
        } else {
            self.response(flows, ev.sock_cookie, place, &msg, out);
        }
    }

    /// A request written by the client end of a leg.
    fn send(&mut self, flows: &FlowTable, cookie: u64, place: Place, tgid: u32, msg: &Message) {
        let id = match place {
            Place::AppClient if !matches!(msg.head, Head::Request { .. }) => {
                self.count(Unstitched::NotHttp);
                return;
            }
            Place::AppClient => self.start(flows, cookie, msg),
            _ => {
                let side = ProxySide {
                    tgid,
                    inbound: place == Place::InboundUp,
                };
                match self.forward(side, msg) {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        let Some(p) = self.spans.get_mut(&id) else {
            self.count(Unstitched::Evicted);
            return;
        };
        p.span.moments[place.moments().0] = Some(msg.ts_ns);
        if let Head::Request { method, path, .. } = &msg.head {
            if p.span.method.is_empty() {
                p.span.method = method.clone();
                p.span.path = super::http::template_path(path);
            }
        }
        if let Some(s) = self.sockets.get_mut(&cookie) {
            s.outstanding.push_back(id);
        }
        // The other end may already have read it.
        let early = self.early.get_mut(&cookie).and_then(|q| {
            let i = q
                .iter()
                .position(|a| a.offset <= msg.offset && msg.offset < a.end)?;
            q.remove(i)
        });
        match early {
            Some(a) => self.arrived(flows, a, id),
            None => {
                let queue = self.sent.entry(cookie).or_default();
                if queue.len() == MAX_QUEUE {
                    queue.pop_front();
                    *self.unstitched.entry(Unstitched::Evicted).or_default() += 1;
                }
                queue.push_back(Sent {
                    offset: msg.offset,
                    span: id,
                });
            }
        }
    }

    /// A read at the server end of a leg: every request written by the peer
    /// that starts inside the bytes read arrived now.
    fn receive(&mut self, flows: &FlowTable, a: Arrival, starts_message: bool) {
        let Some(peer) = flows.peer(a.cookie) else {
            if starts_message {
                // The client is not on this node (or not traced).
                self.count(Unstitched::NoSender);
            }
            return;
        };
        let mut delivered = false;
        while let Some(front) = self.sent.get(&peer).and_then(|q| q.front().copied()) {
            if front.offset >= a.end {
                break;
            }
            self.sent.get_mut(&peer).map(VecDeque::pop_front);
            if front.offset < a.offset {
                // Its read was never reported.
                self.count(Unstitched::NoSender);
                continue;
            }
            let mut arrival = a.clone();
            if front.offset != a.offset {
                arrival.head = None;
            }
            self.arrived(flows, arrival, front.span);
            delivered = true;
        }
        if !delivered && starts_message {
            let queue = self.early.entry(peer).or_default();
            if queue.len() == MAX_QUEUE {
                queue.pop_front();
            }
            queue.push_back(a);
        }
    }

    /// Records a request's arrival at the server end of a leg.
    fn arrived(&mut self, flows: &FlowTable, a: Arrival, id: SpanId) {
        let Some(p) = self.spans.get_mut(&id) else {
            self.count(Unstitched::Evicted);
            return;
        };
        p.span.moments[a.place.moments().0] = Some(a.ts_ns);
        if let Some(Head::Request { method, path, .. }) = &a.head {
            if p.span.method.is_empty() {
                p.span.method = method.clone();
                p.span.path = super::http::template_path(path);
            }
        }
        if a.place == Place::AppServer {
            p.span.destination_pod = flows
                .socket(a.cookie)
                .and_then(|s| s.pod.as_ref())
                .map(|pod| pod.name.clone());
        }
        if matches!(a.place, Place::OutboundDown | Place::InboundDown) {
            let side = ProxySide {
                tgid: a.tgid,
                inbound: a.place == Place::InboundDown,
            };
            self.hold_for_forwarding(side, id, &a);
        }
        if let Some(s) = self.sockets.get_mut(&a.cookie) {
            s.outstanding.push_back(id);
        }
    }

    /// A new span from the app's request.
    fn start(&mut self, flows: &FlowTable, cookie: u64, msg: &Message) -> SpanId {
        let (source, destination) = flows
            .leg_info(cookie)
            .map(|(_, s, d)| (s.to_string(), d.to_string()))
            .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
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
        if self
            .spans
            .push(
                id,
                Pending {
                    span,
                    started_ns: msg.ts_ns,
                },
            )
            .is_some_and(|(old, _)| old != id)
        {
            self.count(Unstitched::Evicted);
        }
        id
    }

    fn hold_for_forwarding(&mut self, side: ProxySide, id: SpanId, a: &Arrival) {
        let (request_id, method, path) = match &a.head {
            Some(Head::Request {
                request_id,
                method,
                path,
                ..
            }) => (request_id.clone(), method.clone(), path.clone()),
            _ => (None, String::new(), String::new()),
        };
        if let (Some(rid), Some(p)) = (&request_id, self.spans.get_mut(&id)) {
            p.span.request_id.get_or_insert_with(|| rid.clone());
        }
        let queue = self.forwardable.entry(side).or_default();
        if queue.len() == MAX_QUEUE {
            queue.pop_front();
            *self.unstitched.entry(Unstitched::Evicted).or_default() += 1;
        }
        queue.push_back(Forwardable {
            span: id,
            ts_ns: a.ts_ns,
            tid: a.tid,
            request_id,
            method,
            path,
        });
    }

    /// The request a sidecar is writing upstream: one it read before.
    fn forward(&mut self, side: ProxySide, msg: &Message) -> Option<SpanId> {
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
            if let Some(p) = self.spans.get_mut(&id) {
                p.span.retries += 1;
            }
            return Some(id);
        }
        let spans = &self.spans;
        let queue = self.forwardable.entry(side).or_default();
        let eligible = |f: &Forwardable| f.ts_ns <= msg.ts_ns;
        // A request read encrypted (mutual TLS) shows no id; its span knows
        // the id the client side sent.
        let id_of = |f: &Forwardable| {
            f.request_id
                .clone()
                .or_else(|| spans.peek(&f.span).and_then(|p| p.span.request_id.clone()))
        };
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
        let Some(i) = pick else {
            self.count(Unstitched::NoDownstream);
            return None;
        };
        let f = queue.remove(i)?;
        if let Some(r) = rid.clone().or(f.request_id) {
            if let Some(p) = self.spans.get_mut(&f.span) {
                p.span.request_id.get_or_insert_with(|| r.clone());
            }
        }
        if let (Some(key), false) = (retry_key, side.inbound) {
            self.forwarded
                .get_mut(&side)
                .expect("inserted above")
                .put(key, f.span);
        }
        Some(f.span)
    }

    fn response(
        &mut self,
        flows: &FlowTable,
        cookie: u64,
        place: Place,
        msg: &Message,
        out: &mut Vec<Span>,
    ) {
        let (_, at) = place.moments();
        // Bytes from a server on this node that has not received the request
        // yet are not its response (e.g. a TLS session ticket).
        if place.sends_requests() && flows.peer(cookie).is_some() {
            let next = place.moments().0 + 1;
            let waiting = self
                .sockets
                .get(&cookie)
                .and_then(|s| s.outstanding.front())
                .and_then(|id| self.spans.peek(id))
                .is_some_and(|p| p.span.moments[next].is_none());
            if waiting {
                self.count(Unstitched::NoRequest);
                return;
            }
        }
        let Some(id) = self
            .sockets
            .get_mut(&cookie)
            .and_then(|s| s.outstanding.pop_front())
        else {
            self.count(Unstitched::NoRequest);
            return;
        };
        let Some(p) = self.spans.get_mut(&id) else {
            self.count(Unstitched::Evicted);
            return;
        };
        p.span.moments[at] = Some(msg.ts_ns);
        if let Head::Response { status, .. } = msg.head {
            // The status the client finally sees wins: it is written last.
            p.span.status = status;
        }
        if place == Place::AppClient {
            if let Some(done) = self.spans.pop(&id) {
                out.push(done.span);
            }
        }
    }

    /// Forgets a closed socket.
    pub fn closed(&mut self, cookie: u64) {
        self.sockets.remove(&cookie);
        self.sent.remove(&cookie);
        self.early.remove(&cookie);
    }

    /// Drops requests older than the timeout; returns how many.
    pub fn expire(&mut self, now_ns: u64) {
        let mut expired = 0;
        while let Some((_, p)) = self.spans.peek_lru() {
            if now_ns.saturating_sub(p.started_ns) < self.cfg.timeout_ns {
                break;
            }
            self.spans.pop_lru();
            expired += 1;
        }
        if expired > 0 {
            *self.unstitched.entry(Unstitched::Timeout).or_default() += expired;
        }
    }

    /// Requests in flight.
    pub fn pending(&self) -> usize {
        self.spans.len()
    }

    /// Framing counters summed over open sockets (for metrics).
    pub fn open_sockets(&self) -> usize {
        self.sockets.len()
    }
}
