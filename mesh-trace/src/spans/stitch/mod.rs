//! Stitching: the messages framed on each socket, joined into one span per
//! request across the six sockets it crosses.
//!
//! - `place`: where a socket sits on a request's path, which says which
//!   moments its messages are.
//! - `leg`: across a leg (app <-> 15001, sidecar <-> 15006, 127.0.0.6 <->
//!   app) a request is matched exactly: the receiver's message starts at the
//!   stream offset where the sender's began, whatever the bytes are (TLS
//!   included).
//! - `assemble`: the spans in flight. Responses come back on the socket the
//!   request went out on: each socket keeps its outstanding requests in
//!   order (HTTP/1.1).
//! - `proxy`: inside a sidecar, a request read downstream is matched to the
//!   request written upstream by x-request-id, else by method and path, else
//!   by thread, else by order; a second upstream write with the same id is a
//!   retry (its moments replace the failed attempt's).
//!
//! What cannot be matched is counted by reason, never guessed. This module
//! reads each socket's place and peer from the flow table, frames its bytes,
//! and passes what it finds between the parts.
mod assemble;
mod leg;
mod place;
mod proxy;

use foldhash::{HashMap, HashMapExt as _};

use self::{
    assemble::{Outstanding, Spans},
    leg::{Arrival, Legs, Write},
    place::Place,
    proxy::{Forwardable, Forwarded, Proxies, ProxySide},
};
use super::{
    http::{Chunk, Dir, Framer, Head, Message},
    span::Span,
};
use crate::flows::table::FlowTable;

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

type SpanId = u64;

struct SockState {
    framer: Framer,
    /// Requests sent (client end) or received (server end), oldest first,
    /// waiting for their response.
    outstanding: Outstanding,
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

/// Most requests a sidecar may hold between reading and forwarding, and
/// most requests in flight on one connection.
const MAX_QUEUE: usize = 4096;

pub struct Stitcher {
    cfg: StitchConfig,
    spans: Spans,
    sockets: HashMap<u64, SockState>,
    legs: Legs,
    proxies: Proxies,
    /// The requests one read delivered, kept to reuse the allocation.
    delivered: Vec<(Arrival, SpanId)>,
    pub unstitched: HashMap<Unstitched, u64>,
}

impl Stitcher {
    pub fn new(cfg: StitchConfig) -> Stitcher {
        Stitcher {
            spans: Spans::new(cfg.max_pending),
            sockets: HashMap::new(),
            legs: Legs::new(),
            proxies: Proxies::new(),
            delivered: Vec::new(),
            unstitched: HashMap::new(),
            cfg,
        }
    }

    fn count(&mut self, why: Unstitched) {
        *self.unstitched.entry(why).or_default() += 1;
    }

    fn count_n(&mut self, why: Unstitched, n: u64) {
        if n > 0 {
            *self.unstitched.entry(why).or_default() += n;
        }
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
                outstanding: Outstanding::default(),
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
        if let Err(why) = self
            .spans
            .request(id, place.moments().0, msg.ts_ns, Some(&msg.head))
        {
            self.count(why);
            return;
        }
        if let Some(s) = self.sockets.get_mut(&cookie) {
            s.outstanding.push(id);
        }
        match self.legs.written(cookie, msg.offset, id) {
            Write::Read(a) => self.arrived(flows, a, id),
            Write::Queued(dropped) => {
                if let Some(why) = dropped {
                    self.count(why);
                }
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
        let mut delivered = std::mem::take(&mut self.delivered);
        let unreported = self.legs.read(peer, a, starts_message, &mut delivered);
        self.count_n(Unstitched::NoSender, unreported);
        for (arrival, id) in delivered.drain(..) {
            self.arrived(flows, arrival, id);
        }
        self.delivered = delivered;
    }

    /// Records a request's arrival at the server end of a leg.
    fn arrived(&mut self, flows: &FlowTable, a: Arrival, id: SpanId) {
        let span = match self
            .spans
            .request(id, a.place.moments().0, a.ts_ns, a.head.as_ref())
        {
            Ok(span) => span,
            Err(why) => {
                self.count(why);
                return;
            }
        };
        if a.place == Place::AppServer {
            span.destination_pod = flows
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
            s.outstanding.push(id);
        }
    }

    /// A new span from the app's request.
    fn start(&mut self, flows: &FlowTable, cookie: u64, msg: &Message) -> SpanId {
        let (source, destination) = flows
            .leg_info(cookie)
            .map(|(_, s, d)| (s.to_string(), d.to_string()))
            .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
        let (id, evicted) = self.spans.start(source, destination, msg);
        if let Some(why) = evicted {
            self.count(why);
        }
        id
    }

    fn hold_for_forwarding(&mut self, side: ProxySide, id: SpanId, a: &Arrival) {
        let f = Forwardable::new(id, a.ts_ns, a.tid, a.head.as_ref());
        self.spans.note_request_id(id, f.request_id());
        if let Some(why) = self.proxies.hold(side, f) {
            self.count(why);
        }
    }

    /// The request a sidecar is writing upstream: one it read before.
    fn forward(&mut self, side: ProxySide, msg: &Message) -> Option<SpanId> {
        let spans = &self.spans;
        match self.proxies.forward(side, msg, |id| spans.request_id(id)) {
            Ok(Forwarded::Retry(id)) => {
                self.spans.retried(id);
                Some(id)
            }
            Ok(Forwarded::Read { span, request_id }) => {
                if let Some(r) = request_id {
                    self.spans.note_request_id(span, Some(&r));
                }
                Some(span)
            }
            Err(why) => {
                self.count(why);
                None
            }
        }
    }

    fn response(
        &mut self,
        flows: &FlowTable,
        cookie: u64,
        place: Place,
        msg: &Message,
        out: &mut Vec<Span>,
    ) {
        let peer_here = place.sends_requests() && flows.peer(cookie).is_some();
        let outstanding = self.sockets.get_mut(&cookie).map(|s| &mut s.outstanding);
        match self.spans.response(outstanding, place, peer_here, msg) {
            Ok(Some(done)) => out.push(done),
            Ok(None) => {}
            Err(why) => self.count(why),
        }
    }

    /// Forgets a closed socket.
    pub fn closed(&mut self, cookie: u64) {
        self.sockets.remove(&cookie);
        self.legs.closed(cookie);
    }

    /// Drops requests older than the timeout; returns how many.
    pub fn expire(&mut self, now_ns: u64) {
        let expired = self.spans.expire(now_ns, self.cfg.timeout_ns);
        self.count_n(Unstitched::Timeout, expired);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mesh_trace_common::{
        ConnectEvent, DataEvent, Endpoint, EventKind, SockEvent, DIR_RECV, DIR_SEND,
    };

    use super::*;
    use crate::{
        flows::{legs::LegKind, metadata::NoMetadata, table::FlowTableConfig},
        kernel::events::Event,
    };

    /// Processes: the client app, its outbound sidecar, the server's
    /// inbound sidecar, the server app.
    const APP: u32 = 10;
    const OUTBOUND: u32 = 20;
    const INBOUND: u32 = 30;
    const SERVER: u32 = 40;

    fn ep(ip: [u8; 4], port: u16) -> Endpoint {
        Endpoint::v4(u32::from_ne_bytes(ip), port)
    }

    fn connect(cookie: u64, netns: u64, uid: u64, tgid: u32, dst: Endpoint) -> Event {
        let mut c = ConnectEvent::default();
        c.header.kind = EventKind::Connect as u32;
        c.sock_cookie = cookie;
        c.netns_cookie = netns;
        c.task.pid_tgid = u64::from(tgid) << 32 | u64::from(tgid);
        c.task.uid_gid = uid << 32 | uid;
        c.dst = dst;
        Event::Connect(c)
    }

    fn established(
        cookie: u64,
        netns: u64,
        local: Endpoint,
        remote: Endpoint,
        active: bool,
    ) -> Event {
        let mut s = SockEvent::default();
        s.header.kind = EventKind::Established as u32;
        s.sock_cookie = cookie;
        s.netns_cookie = netns;
        s.local = local;
        s.remote = remote;
        s.active = u32::from(active);
        Event::Established(s)
    }

    /// A flow table and a stitcher fed data events as the agent feeds them.
    struct Node {
        table: FlowTable,
        stitcher: Stitcher,
        ts_ns: u64,
        /// Next stream offset per socket and direction.
        offsets: HashMap<(u64, u32), u64>,
        spans: Vec<Span>,
    }

    impl Node {
        fn new(events: &[Event]) -> (Node, Vec<LegKind>) {
            let mut table = FlowTable::new(FlowTableConfig::default(), Arc::new(NoMetadata));
            let mut legs = Vec::new();
            for ev in events {
                table.apply(ev, &mut legs);
            }
            let node = Node {
                table,
                stitcher: Stitcher::new(StitchConfig::default()),
                ts_ns: 0,
                offsets: HashMap::new(),
                spans: Vec::new(),
            };
            (node, legs.iter().map(|l| l.leg).collect())
        }

        /// A client app (netns 1) calling a server app (netns 2) on the
        /// same node: its six sockets, joined into three legs.
        fn six_sockets() -> Node {
            let vip = ep([10, 96, 0, 12], 9080);
            let server = ep([10, 244, 0, 9], 9080);
            let (node, legs) = Node::new(&[
                connect(1, 1, 1000, APP, vip),
                established(1, 1, ep([10, 244, 0, 5], 40000), vip, true),
                established(
                    2,
                    1,
                    ep([127, 0, 0, 1], 15001),
                    ep([10, 244, 0, 5], 40000),
                    false,
                ),
                connect(3, 1, 1337, OUTBOUND, server),
                established(3, 1, ep([10, 244, 0, 5], 50000), server, true),
                established(
                    4,
                    2,
                    ep([10, 244, 0, 9], 15006),
                    ep([10, 244, 0, 5], 50000),
                    false,
                ),
                connect(5, 2, 1337, INBOUND, server),
                established(5, 2, ep([127, 0, 0, 6], 41000), server, true),
                established(6, 2, server, ep([127, 0, 0, 6], 41000), false),
            ]);
            assert_eq!(
                legs,
                vec![LegKind::Redirect, LegKind::Mesh, LegKind::Delivery]
            );
            node
        }

        /// Socket `cookie` of process `tgid` moves `payload` in `dir`;
        /// returns when.
        fn io(&mut self, cookie: u64, tgid: u32, dir: u32, payload: &[u8]) -> u64 {
            self.ts_ns += 1_000;
            let offset = self.offsets.entry((cookie, dir)).or_default();
            let mut d = DataEvent::default();
            d.header.kind = EventKind::Data as u32;
            d.header.ts_ns = self.ts_ns;
            d.sock_cookie = cookie;
            d.pid_tgid = u64::from(tgid) << 32 | u64::from(tgid);
            d.direction = dir;
            d.offset = *offset;
            d.len = payload.len() as u32;
            let n = payload.len().min(d.prefix.len());
            d.prefix_len = n as u32;
            d.prefix[..n].copy_from_slice(&payload[..n]);
            *offset += payload.len() as u64;
            // Data first: the table forgets a socket at its close.
            self.stitcher.data(&self.table, &d, &mut self.spans);
            self.table.apply(&Event::Data(Box::new(d)), &mut Vec::new());
            self.ts_ns
        }
    }

    /// The app's request with x-request-id `id`.
    fn request(id: &str) -> Vec<u8> {
        format!("GET /reviews/0 HTTP/1.1\r\nhost: reviews:9080\r\nx-request-id: {id}\r\n\r\n")
            .into_bytes()
    }
    /// The request as a sidecar forwards it.
    fn forwarded(id: &str) -> Vec<u8> {
        format!(
            "GET /reviews/0 HTTP/1.1\r\nhost: reviews:9080\r\nx-request-id: {id}\r\nx-forwarded-proto: http\r\n\r\n"
        )
        .into_bytes()
    }
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    /// A TLS application data record.
    const ENCRYPTED: &[u8] = b"\x17\x03\x03\x00\x20 thirty-two bytes of ciphertext";

    /// One request with x-request-id `id` through all six sockets, the
    /// sidecars' leg between them in plain text or (mutual TLS) encrypted:
    /// t0..t11.
    fn one_request(node: &mut Node, id: &str, encrypted: bool) -> [u64; 12] {
        let (request, forwarded) = (request(id), forwarded(id));
        let (mesh_request, mesh_response) = if encrypted {
            (ENCRYPTED, ENCRYPTED)
        } else {
            (&forwarded[..], RESPONSE)
        };
        [
            node.io(1, APP, DIR_SEND, &request),
            node.io(2, OUTBOUND, DIR_RECV, &request),
            node.io(3, OUTBOUND, DIR_SEND, mesh_request),
            node.io(4, INBOUND, DIR_RECV, mesh_request),
            node.io(5, INBOUND, DIR_SEND, &forwarded),
            node.io(6, SERVER, DIR_RECV, &forwarded),
            node.io(6, SERVER, DIR_SEND, RESPONSE),
            node.io(5, INBOUND, DIR_RECV, RESPONSE),
            node.io(4, INBOUND, DIR_SEND, mesh_response),
            node.io(3, OUTBOUND, DIR_RECV, mesh_response),
            node.io(2, OUTBOUND, DIR_SEND, RESPONSE),
            node.io(1, APP, DIR_RECV, RESPONSE),
        ]
    }

    #[test]
    fn a_request_through_all_six_sockets_is_one_span_with_twelve_moments() {
        for encrypted in [false, true] {
            let mut node = Node::six_sockets();
            // Two in turn on the same connections (keep-alive).
            for id in ["8c1e-4f55", "9d2f-5a66"] {
                let t = one_request(&mut node, id, encrypted);
                let spans = std::mem::take(&mut node.spans);
                assert_eq!(spans.len(), 1, "encrypted: {encrypted}");
                let span = &spans[0];
                assert_eq!(span.moments, t.map(Some), "encrypted: {encrypted}");
                assert_eq!(span.method, "GET");
                assert_eq!(span.path, "/reviews/:id");
                assert_eq!(span.status, 200);
                assert_eq!(span.request_id.as_deref(), Some(id));
                assert_eq!(span.retries, 0);
                assert_eq!(span.source_workload, "unknown");
            }
            assert_eq!(node.stitcher.pending(), 0);
            assert!(
                node.stitcher.unstitched.is_empty(),
                "{:?}",
                node.stitcher.unstitched
            );
            assert_eq!(node.stitcher.open_sockets(), 6);
            for cookie in 1..=6 {
                node.stitcher.closed(cookie);
            }
            assert_eq!(node.stitcher.open_sockets(), 0);
        }
    }

    #[test]
    fn what_cannot_be_stitched_is_counted() {
        let mut node = Node::six_sockets();
        // Not HTTP from the app.
        node.io(1, APP, DIR_SEND, b"\x00\x00\x00\x05hello");
        // A read at an inbound sidecar whose client is not on this node.
        node.table.apply(
            &established(
                7,
                2,
                ep([10, 244, 0, 9], 15006),
                ep([10, 244, 1, 7], 50000),
                false,
            ),
            &mut Vec::new(),
        );
        node.io(7, INBOUND, DIR_RECV, &forwarded("a"));
        // The inbound sidecar writes upstream a request it never read.
        node.io(5, INBOUND, DIR_SEND, &forwarded("b"));
        // A response on the server app's socket that received no request.
        node.io(6, SERVER, DIR_SEND, RESPONSE);
        let count = |why| node.stitcher.unstitched.get(&why).copied();
        assert_eq!(count(Unstitched::NotHttp), Some(1));
        assert_eq!(count(Unstitched::NoSender), Some(1));
        assert_eq!(count(Unstitched::NoDownstream), Some(1));
        assert_eq!(count(Unstitched::NoRequest), Some(1));
        assert_eq!(node.stitcher.pending(), 0);
        // Requests in flight past the timeout.
        let mut node = Node::six_sockets();
        node.io(1, APP, DIR_SEND, &request("c"));
        assert_eq!(node.stitcher.pending(), 1);
        node.stitcher.expire(StitchConfig::default().timeout_ns);
        assert_eq!(node.stitcher.pending(), 1);
        node.stitcher
            .expire(StitchConfig::default().timeout_ns + 1_000);
        assert_eq!(node.stitcher.pending(), 0);
        assert_eq!(node.stitcher.unstitched.get(&Unstitched::Timeout), Some(&1));
    }

    #[test]
    fn every_reason_has_its_own_label() {
        let labels: std::collections::HashSet<_> =
            Unstitched::ALL.iter().map(|u| u.label()).collect();
        assert_eq!(labels.len(), Unstitched::ALL.len());
        assert_eq!(Unstitched::NoDownstream.label(), "no_downstream");
    }
}
