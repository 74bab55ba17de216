//! Stitching: the messages framed on each socket, joined into one span per
//! request across the six sockets it crosses.
//!
//! - `place`: where a socket sits on a request's path, which says which
//!   moments its messages are.
//! - `leg`: across a leg (app <-> 15001, sidecar <-> 15006, 127.0.0.6 <->
//!   app) a request is matched exactly: the receiver's message starts at the
//!   TCP sequence number where the sender's began, whatever the bytes are
//!   (TLS included).
//! - `assemble`: the spans in flight. Responses come back on the socket the
//!   request went out on: each socket keeps its outstanding requests in
//!   order (HTTP/1.1), each anchored where its response will start (the
//!   other direction's sequence number when it was sent or read), so that
//!   after bytes went by unseen a response still finds its own request, or
//!   none. Only exact spans are exported.
//! - `proxy`: inside a sidecar, a request read downstream is matched to the
//!   request written upstream on evidence only (causality and the request's
//!   identity); a request the sidecar answers itself is a local reply, a
//!   span of its own.
//!
//! What cannot be matched is counted by reason, never guessed: a request
//! that could be another is `ambiguous`, one that may have lost an event
//! (a gap in a socket's sequence numbers, or events the kernel could not
//! deliver) is `lost_event`, one whose moments are out of order is
//! `inconsistent`. This module reads each socket's place and peer from the
//! flow table, frames its bytes, and passes what it finds between the parts.
mod assemble;
mod leg;
mod place;
mod proxy;

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt as _};

use self::{
    assemble::{Answers, Outstanding, Spans},
    leg::{Arrival, Legs, Write},
    place::Place,
    proxy::{Forwardable, Forwarded, Identity, Proxies, ProxySide},
};
use super::{
    h2::{H2Decoder, H2Fields, H2Message},
    http::{Chunk, Dir, Framer, Head, Message},
    span::{LocalReply, Span},
    trace_id,
};
use crate::{flows::table::FlowTable, kernel::events::H2Frame};

/// Why a request produced no span. Label values of
/// `mesh_trace_requests_unstitched_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unstitched {
    /// A sidecar read a request no traced app socket sent (e.g. the client
    /// was not redirected on this node, or its bytes were lost).
    NoSender,
    /// A sidecar wrote upstream a request it was never seen reading, or
    /// whose identity fits none it read.
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
    /// A sidecar held other requests it could not be told from.
    Ambiguous,
    /// An event on its way may have been lost.
    LostEvent,
    /// Its moments are out of the path's order: a negative hop.
    Inconsistent,
    /// A request or response on a socket the flow table does not know.
    UnknownSocket,
    /// An HTTP/2 request or response whose header block could not be
    /// decoded: its connection's header compression state was lost.
    HpackLost,
    /// An HTTP/2 stream reset (RST_STREAM) before its response ended.
    StreamReset,
}

impl Unstitched {
    pub const ALL: [Unstitched; 12] = [
        Unstitched::NoSender,
        Unstitched::NoDownstream,
        Unstitched::NoRequest,
        Unstitched::Timeout,
        Unstitched::Evicted,
        Unstitched::NotHttp,
        Unstitched::Ambiguous,
        Unstitched::LostEvent,
        Unstitched::Inconsistent,
        Unstitched::UnknownSocket,
        Unstitched::HpackLost,
        Unstitched::StreamReset,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Unstitched::NoSender => "no_sender",
            Unstitched::NoDownstream => "no_downstream",
            Unstitched::NoRequest => "no_request",
            Unstitched::Timeout => "timeout",
            Unstitched::Evicted => "evicted",
            Unstitched::NotHttp => "not_http",
            Unstitched::Ambiguous => "ambiguous",
            Unstitched::LostEvent => "lost_event",
            Unstitched::Inconsistent => "inconsistent",
            Unstitched::UnknownSocket => "unknown_socket",
            Unstitched::HpackLost => "hpack_lost",
            Unstitched::StreamReset => "stream_reset",
        }
    }
}

type SpanId = u64;

struct SockState {
    framer: Framer,
    /// Requests sent (client end) or received (server end), oldest first,
    /// waiting for their response.
    outstanding: Outstanding,
    /// Per direction (send, receive): the 64-bit stream position right
    /// after the last bytes seen, widened from 32-bit sequence numbers.
    next: [Option<u64>; 2],
    /// Bytes went by unseen in the direction responses take since the
    /// last response began.
    unseen_reply: bool,
    /// Per direction (send, receive): encrypted requests framed here whose
    /// plaintext the TLS probes have not reported yet, oldest first: where
    /// each starts and its span.
    tls: [VecDeque<(u64, SpanId)>; 2],
    /// The last reads of an encrypted socket: where each starts and ends,
    /// and when. A TLS call's plaintext says which read its record began
    /// in.
    tls_reads: VecDeque<(u64, u64, u64)>,
    /// TLS records went by on this socket.
    encrypted: bool,
    /// The connection speaks HTTP/2: its requests are streams, from the
    /// frames the kernel walks ([`Stitcher::h2_frame`]), and its bytes are
    /// not framed as HTTP/1.1.
    h2: bool,
    /// Per HTTP/2 stream still open on this socket: its request's span and
    /// what its response showed so far.
    streams: Option<Box<lru::LruCache<u32, H2Stream>>>,
}

/// An HTTP/2 stream in flight on a socket.
#[derive(Clone, Copy, Debug)]
struct H2Stream {
    span: SpanId,
    /// From the response's head (`:status`), once read or written.
    status: u16,
    grpc_status: Option<u32>,
}

/// Open streams remembered per HTTP/2 connection (a peer's usual
/// SETTINGS_MAX_CONCURRENT_STREAMS is 100 to 1,000).
const MAX_STREAMS: usize = 4096;

/// Encrypted requests per socket and direction waiting for their plaintext:
/// HTTP/1.1 has one in flight per connection, so a few cover reordering.
const MAX_TLS_WAITING: usize = 8;

impl SockState {
    fn new() -> SockState {
        SockState {
            framer: Framer::new(),
            outstanding: Outstanding::default(),
            next: [None; 2],
            unseen_reply: false,
            tls: Default::default(),
            tls_reads: VecDeque::new(),
            encrypted: false,
            h2: false,
            streams: None,
        }
    }

    /// The streams of an HTTP/2 connection.
    fn streams(&mut self) -> &mut lru::LruCache<u32, H2Stream> {
        self.streams.get_or_insert_with(|| {
            Box::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MAX_STREAMS).expect("non-zero"),
            ))
        })
    }

    /// The 64-bit position of `len` bytes at sequence number `seq` in
    /// `dir`, and whether bytes before them went by unseen (a lost event).
    fn position(&mut self, dir: Dir, seq: u32, len: u32) -> (u64, bool) {
        let i = usize::from(dir == Dir::Recv);
        let (pos, gap) = match self.next[i] {
            // High bits set so a position never goes below zero.
            None => ((1 << 32) | u64::from(seq), false),
            Some(next) => {
                let delta = i64::from(seq.wrapping_sub(next as u32) as i32);
                (next.wrapping_add_signed(delta), delta != 0)
            }
        };
        self.next[i] = Some(pos + u64::from(len));
        (pos, gap)
    }

    /// The 64-bit position of sequence number `seq` in `dir`, without
    /// moving on.
    fn peek_position(&self, dir: Dir, seq: u32) -> u64 {
        match self.next[usize::from(dir == Dir::Recv)] {
            None => (1 << 32) | u64::from(seq),
            Some(next) => next.wrapping_add_signed(i64::from(seq.wrapping_sub(next as u32) as i32)),
        }
    }

    /// A read of `len` bytes at `offset`, at `ts_ns`, on an encrypted socket.
    fn read(&mut self, offset: u64, len: u32, ts_ns: u64) {
        if self.tls_reads.len() == MAX_TLS_WAITING {
            self.tls_reads.pop_front();
        }
        self.tls_reads
            .push_back((offset, offset + u64::from(len), ts_ns));
    }

    /// When the read that moved the byte at `pos` was, if still known.
    fn read_at(&self, pos: u64) -> Option<u64> {
        self.tls_reads
            .iter()
            .find(|&&(from, to, _)| from <= pos && pos < to)
            .map(|&(_, _, ts_ns)| ts_ns)
    }

    /// An encrypted request that started at `offset` in `dir` as span `id`:
    /// its plaintext may follow.
    fn await_plaintext(&mut self, dir: Dir, offset: u64, id: SpanId) {
        let queue = &mut self.tls[usize::from(dir == Dir::Recv)];
        if queue.len() == MAX_TLS_WAITING {
            queue.pop_front();
        }
        queue.push_back((offset, id));
    }

    /// The encrypted request a TLS call's plaintext belongs to: the last
    /// one that started at or before the call's last I/O on the wire
    /// (`at`), or, for a read served from bytes read before, the last one.
    /// Those before it will get none.
    fn plaintext_of(&mut self, dir: Dir, at: Option<u32>) -> Option<(u64, SpanId)> {
        let pos = at.map(|seq| self.peek_position(dir, seq));
        let queue = &mut self.tls[usize::from(dir == Dir::Recv)];
        let i = match pos {
            Some(pos) => queue.iter().rposition(|&(offset, _)| offset <= pos)?,
            None if dir == Dir::Recv => queue.len().checked_sub(1)?,
            // A write the library makes only later (e.g. through a buffer
            // of its own): which record carries it is unknown.
            None => return None,
        };
        let found = queue.remove(i)?;
        queue.drain(..i);
        Some(found)
    }

    /// The 64-bit position of sequence number `seq` in the direction
    /// opposite `dir`, widened as [`SockState::position`] widens.
    fn opposite_position(&self, dir: Dir, seq: u32) -> u64 {
        match self.next[usize::from(dir != Dir::Recv)] {
            None => (1 << 32) | u64::from(seq),
            Some(next) => next.wrapping_add_signed(i64::from(seq.wrapping_sub(next as u32) as i32)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct StitchConfig {
    /// Requests in flight at once.
    pub max_pending: usize,
    /// Requests in flight at once from one pod (network namespace) or
    /// written upstream by one sidecar as orphans: past it, that owner's
    /// oldest are evicted, so one pod cannot push out the others'.
    pub max_pending_per_owner: usize,
    /// A request not answered within this time is dropped.
    pub timeout_ns: u64,
}

impl Default for StitchConfig {
    fn default() -> Self {
        StitchConfig {
            max_pending: 65_536,
            max_pending_per_owner: 8_192,
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
    /// Per sidecar side, recent upstream writes that no request it held
    /// could be told to be (orphans) and when each was made. The client's
    /// write of a request may be reported after the sidecar's forward of
    /// it (the app's thread ran its tracepoint late): such a request may
    /// be any of those made after its read.
    recent_orphans: HashMap<ProxySide, VecDeque<(SpanId, u64)>>,
    /// Per sidecar side, when the last still unsettled orphan dropped from
    /// `recent_orphans` was written.
    orphans_forgotten_upto: HashMap<ProxySide, u64>,
    pub unstitched: HashMap<Unstitched, u64>,
    /// TLS plaintext request heads joined to their encrypted request, and
    /// those that found none (for metrics).
    pub tls_plaintext: [u64; 2],
    /// Processes whose TLS calls the probes report: their encrypted
    /// responses upstream are taken from the plaintext, which a TLS session
    /// ticket or other post-handshake record never shows.
    tls_processes: foldhash::HashSet<u32>,
    /// Header decoding of every HTTP/2 connection.
    pub h2: H2Decoder,
    /// The messages one frame completed, kept to reuse the allocation.
    h2_messages: Vec<H2Message>,
}

/// Processes remembered as reporting TLS plaintext; past it the set starts
/// over (their responses are then framed on the wire until their next call).
const MAX_TLS_PROCESSES: usize = 4096;

/// Orphan upstream writes remembered per sidecar side (behind mutual TLS
/// each write is one until its plaintext is reported, just after it).
const MAX_RECENT_ORPHANS: usize = 256;

impl Stitcher {
    pub fn new(cfg: StitchConfig) -> Stitcher {
        Stitcher {
            spans: Spans::new(cfg.max_pending, cfg.max_pending_per_owner),
            sockets: HashMap::new(),
            legs: Legs::new(),
            proxies: Proxies::new(),
            delivered: Vec::new(),
            recent_orphans: HashMap::new(),
            orphans_forgotten_upto: HashMap::new(),
            unstitched: HashMap::new(),
            tls_plaintext: [0; 2],
            tls_processes: foldhash::HashSet::default(),
            h2: H2Decoder::default(),
            h2_messages: Vec::new(),
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

    /// The kernel could not deliver some events, stamped before `before_ns`
    /// (when the agent learnt of the loss): any request in flight then may
    /// have lost one, so none of them is exported, including those whose
    /// first events come after this call (a request read by a sidecar, its
    /// forward lost, its answer downstream read in one batch would
    /// otherwise pass for a local reply).
    pub fn events_lost(&mut self, before_ns: u64) {
        self.spans.mark_all_lost(before_ns);
        self.proxies.distrust_all();
        // Any connection's frames may have been among them.
        self.h2.lose_all();
    }

    /// Feeds one data event; completed spans go to `out`.
    pub fn data(
        &mut self,
        flows: &FlowTable,
        ev: &mesh_trace_common::DataEvent,
        out: &mut Vec<Span>,
    ) {
        let prefix = &ev.prefix[..(ev.prefix_len as usize).min(ev.prefix.len())];
        if ev.direction & mesh_trace_common::DIR_TLS_PLAINTEXT != 0 {
            self.plaintext(flows, ev, prefix, out);
            return;
        }
        let Some(sock) = flows.socket(ev.sock_cookie) else {
            // Its connection was never reported, or the table dropped it.
            if super::http::starts_http(prefix) {
                self.count(Unstitched::UnknownSocket);
                // If a sidecar did this, it may have been forwarding or
                // answering any request it holds.
                self.unseen_proxy_io((ev.pid_tgid >> 32) as u32, None);
            }
            return;
        };
        let Some(place) = Place::of(sock, flows.leg_info(ev.sock_cookie).map(|l| l.0)) else {
            return;
        };
        let dir = if ev.direction == mesh_trace_common::DIR_SEND {
            Dir::Send
        } else {
            Dir::Recv
        };
        let state = self
            .sockets
            .entry(ev.sock_cookie)
            .or_insert_with(SockState::new);
        let first_bytes = state.next[usize::from(dir == Dir::Recv)].is_none();
        let (offset, gap) = state.position(dir, ev.offset as u32, ev.len);
        // HTTP/2 is told from a connection's first bytes, as the kernel
        // tells it (the frames come as their own events).
        if first_bytes && super::http::starts_h2(prefix) {
            state.h2 = true;
        }
        if state.h2 {
            if gap {
                // Bytes went by unseen: so did frames of what waits here.
                let mut touched: Vec<SpanId> = state
                    .streams
                    .iter()
                    .flat_map(|s| s.iter().map(|(_, st)| st.span))
                    .collect();
                touched.extend(self.legs.unread(ev.sock_cookie));
                for id in touched {
                    self.spans.mark_lost(id);
                }
            }
            // A client's requests written where the kernel no longer walks
            // the frames start no span: each such write counts one at least.
            if place == Place::AppClient
                && dir == Dir::Send
                && self.h2.unwalked(ev.sock_cookie, false)
            {
                self.count(Unstitched::HpackLost);
            }
            return;
        }
        // Where the response to a request in these bytes would start.
        let anchor = state.opposite_position(dir, ev.opposite_seq);
        // A read on a socket whose every byte written so far was seen: it
        // cannot answer a request written unseen.
        let writes_seen = dir == Dir::Recv && state.next[0] == Some(anchor);
        let reply_dir = if place.sends_requests() {
            Dir::Recv
        } else {
            Dir::Send
        };
        state.unseen_reply |= gap && dir == reply_dir;
        let chunk = Chunk {
            ts_ns: ev.header.ts_ns,
            tid: ev.pid_tgid as u32,
            dir,
            offset,
            len: ev.len,
            prefix,
        };
        let msg = state.framer.push(&chunk);
        let tgid = (ev.pid_tgid >> 32) as u32;
        state.encrypted |= super::http::is_tls_record(prefix);
        if dir == Dir::Recv && state.encrypted {
            state.read(offset, ev.len, ev.header.ts_ns);
        }
        if gap {
            // Bytes went by unseen: whatever waits on this socket may have
            // lost its request or response.
            let mut touched: Vec<SpanId> = state.outstanding.iter().collect();
            touched.extend(self.legs.unread(ev.sock_cookie));
            for id in touched {
                self.spans.mark_lost(id);
            }
        }
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
                anchor,
                stream: None,
                in_tls: false,
            };
            self.receive(flows, arrival, msg.is_some() && !handshake);
            return;
        }
        if place == Place::OutboundUp
            && dir == Dir::Recv
            && self.tls_processes.contains(&tgid)
            && msg
                .as_ref()
                .is_some_and(|m| matches!(m.head, Head::Opaque { tls: true }))
        {
            // Its responses come from the plaintext (`plaintext_response`),
            // where they start.
            return;
        }
        // Connection set-up is neither a request nor a response.
        let Some(msg) = msg.filter(|_| !handshake) else {
            return;
        };
        if place.sends_requests() && msg.dir == Dir::Send {
            self.send(flows, ev.sock_cookie, place, tgid, &msg, anchor);
        } else {
            self.response(flows, ev.sock_cookie, place, tgid, &msg, writes_seen, out);
        }
    }

    /// A request written by the client end of a leg.
    fn send(
        &mut self,
        flows: &FlowTable,
        cookie: u64,
        place: Place,
        tgid: u32,
        msg: &Message,
        anchor: u64,
    ) {
        if place == Place::AppClient && !matches!(msg.head, Head::Request { .. }) {
            self.count(Unstitched::NotHttp);
            return;
        }
        let Some(id) = self.written_span(flows, cookie, place, tgid, msg) else {
            return;
        };
        if let Some(s) = self.sockets.get_mut(&cookie) {
            s.outstanding.push(id, anchor);
            if matches!(msg.head, Head::Opaque { tls: true }) {
                s.await_plaintext(Dir::Send, msg.offset, id);
            }
        }
        self.written_on_leg(flows, cookie, cookie, place, id, msg.offset);
    }

    /// The span of a request written by the client end of a leg at
    /// `place`: a new one from the app, or a sidecar's forward; None when
    /// it is no longer in flight.
    fn written_span(
        &mut self,
        flows: &FlowTable,
        cookie: u64,
        place: Place,
        tgid: u32,
        msg: &Message,
    ) -> Option<SpanId> {
        let id = match place {
            Place::AppClient => self.start(flows, cookie, msg),
            _ => {
                let side = ProxySide {
                    tgid,
                    inbound: place == Place::InboundUp,
                };
                self.forward(side, place, msg)
            }
        };
        self.spans
            .request(id, place.moments().0, msg.ts_ns, Some(&msg.head))
            .map(|_| id)
    }

    /// Request `id` went out at stream `offset` of socket `cookie`, whose
    /// writes are joined under `key`: on the mesh leg it names the trace,
    /// and it arrived if the other end's read was reported first.
    fn written_on_leg(
        &mut self,
        flows: &FlowTable,
        cookie: u64,
        key: u64,
        place: Place,
        id: SpanId,
        offset: u64,
    ) {
        if place == Place::OutboundUp {
            // The attempt that went out last names the trace.
            if let Some(sock) = flows.socket(cookie) {
                let leg = trace_id::MeshLeg {
                    client: sock.local,
                    server: sock.remote.ip(),
                    seq: offset as u32,
                };
                self.spans.note_mesh_leg(id, leg, true);
            }
        }
        match self.legs.written(key, offset, id) {
            Write::Read(a) => self.arrived(flows, *a, id),
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
            if starts_message && a.place == Place::InboundDown {
                // The client is on another node (or not traced): this node
                // has the server's half of the request.
                let id = self.start_server_half(flows, &a);
                self.arrived(flows, a, id);
            } else if starts_message {
                self.count(Unstitched::NoSender);
            }
            return;
        };
        let mut delivered = std::mem::take(&mut self.delivered);
        let key = legs_key(peer, a.in_tls);
        let unreported = self.legs.read(key, a, starts_message, &mut delivered);
        self.count_n(Unstitched::NoSender, unreported);
        for (arrival, id) in delivered.drain(..) {
            self.arrived(flows, arrival, id);
        }
        self.delivered = delivered;
    }

    /// Records a request's arrival at the server end of a leg.
    fn arrived(&mut self, flows: &FlowTable, a: Arrival, id: SpanId) {
        let Some(span) = self
            .spans
            .request(id, a.place.moments().0, a.ts_ns, a.head.as_ref())
        else {
            return;
        };
        if a.place == Place::AppServer {
            span.destination_pod = flows
                .socket(a.cookie)
                .and_then(|s| s.pod.as_ref())
                .map(|pod| pod.name.clone());
        }
        if a.place == Place::InboundDown {
            // A server's half: its read starts the request (a whole span
            // has its id from the client's write already).
            if let Some(sock) = flows.socket(a.cookie) {
                let leg = trace_id::MeshLeg {
                    client: sock.remote,
                    server: sock.local.ip(),
                    seq: a.offset as u32,
                };
                self.spans.note_mesh_leg(id, leg, false);
            }
        }
        if matches!(a.place, Place::OutboundDown | Place::InboundDown) {
            let side = ProxySide {
                tgid: a.tgid,
                inbound: a.place == Place::InboundDown,
            };
            self.hold_for_forwarding(side, id, &a);
        }
        if let Some(s) = self.sockets.get_mut(&a.cookie) {
            if let Some(stream_id) = a.stream {
                s.streams().put(
                    stream_id,
                    H2Stream {
                        span: id,
                        status: 0,
                        grpc_status: None,
                    },
                );
                return;
            }
            s.outstanding.push(id, a.anchor);
            // Encrypted, or inside a read that continued an encrypted
            // message (the handshake's last record and the request read by
            // one call).
            if matches!(a.head, Some(Head::Opaque { tls: true }) | None) {
                s.await_plaintext(Dir::Recv, a.offset, id);
            }
        }
    }

    /// A response a sidecar read from upstream through its TLS library: it
    /// started on the wire where the call's first read did, at that read's
    /// time. Records read before it that the library returned nothing of
    /// (session tickets) were no response.
    fn plaintext_response(
        &mut self,
        flows: &FlowTable,
        ev: &mesh_trace_common::DataEvent,
        head: Head,
        out: &mut Vec<Span>,
    ) {
        let cookie = ev.sock_cookie;
        let (Some(sock), Some(state)) = (flows.socket(cookie), self.sockets.get_mut(&cookie))
        else {
            return;
        };
        if Place::of(sock, flows.leg_info(cookie).map(|l| l.0)) != Some(Place::OutboundUp)
            || ev.direction & mesh_trace_common::DIR_TLS_NO_SEQ != 0
        {
            return;
        }
        let start = state.peek_position(Dir::Recv, ev.opposite_seq);
        let ts_ns = match state.read_at(start) {
            Some(ts_ns) => ts_ns,
            None => {
                // Its read was not seen, or left the window: when the
                // response began is unknown, so whatever it answers is
                // counted, not exported.
                let waiting: Vec<SpanId> = state.outstanding.iter().collect();
                for id in waiting {
                    self.spans.mark_lost(id);
                }
                ev.header.ts_ns
            }
        };
        state.tls_reads.retain(|&(from, _, _)| from > start);
        let msg = Message {
            dir: Dir::Recv,
            ts_ns,
            tid: ev.pid_tgid as u32,
            offset: start,
            head,
        };
        let tgid = (ev.pid_tgid >> 32) as u32;
        self.response(flows, cookie, Place::OutboundUp, tgid, &msg, true, out);
    }

    /// Request `id`, read by a sidecar at `place`, began at `first` on the
    /// wire (its TLS call's first read), later than the read it was taken
    /// from, which was the handshake's: its moment is that read's (counted
    /// `lost_event` when it is no longer known), and on the mesh leg its
    /// trace is named by the request's own sequence number.
    fn restart_at(
        &mut self,
        sock: &crate::flows::socket::Socket,
        place: Place,
        id: SpanId,
        first: u64,
        read: Option<u64>,
    ) {
        match read {
            Some(ts_ns) => {
                let _ = self.spans.request(id, place.moments().0, ts_ns, None);
            }
            None => self.spans.mark_lost(id),
        }
        if place == Place::InboundDown {
            let leg = trace_id::MeshLeg {
                client: sock.remote,
                server: sock.local.ip(),
                seq: first as u32,
            };
            self.spans.note_mesh_leg(id, leg, true);
        }
    }

    /// The plaintext of a TLS call on a traced socket (the TLS probes):
    /// a request head says what the encrypted request it belongs to was.
    /// Written upstream by a sidecar, it settles which request it held
    /// that write was; read by a sidecar, it is what the sidecar holds.
    fn plaintext(
        &mut self,
        flows: &FlowTable,
        ev: &mesh_trace_common::DataEvent,
        prefix: &[u8],
        out: &mut Vec<Span>,
    ) {
        let Some(head) = super::http::http_head(prefix) else {
            // Bodies: the wire's framing has them.
            return;
        };
        let dir = if ev.direction & mesh_trace_common::DIR_RECV != 0 {
            Dir::Recv
        } else {
            Dir::Send
        };
        let tgid = (ev.pid_tgid >> 32) as u32;
        if self.tls_processes.len() >= MAX_TLS_PROCESSES {
            self.tls_processes.clear();
        }
        self.tls_processes.insert(tgid);
        if let Head::Response { .. } = head {
            if dir == Dir::Recv {
                self.plaintext_response(flows, ev, head, out);
            }
            return;
        }
        let at =
            (ev.direction & mesh_trace_common::DIR_TLS_NO_SEQ == 0).then_some(ev.offset as u32);
        let (Some(sock), Some(state)) = (
            flows.socket(ev.sock_cookie),
            self.sockets.get_mut(&ev.sock_cookie),
        ) else {
            self.tls_plaintext[1] += 1;
            return;
        };
        let Some((offset, id)) = state.plaintext_of(dir, at) else {
            self.tls_plaintext[1] += 1;
            return;
        };
        // A read that began before the call's first one was a record of the
        // handshake's (the client's Finished): the request began at the
        // call's first read, then.
        let first = (dir == Dir::Recv && at.is_some())
            .then(|| state.peek_position(Dir::Recv, ev.opposite_seq))
            .filter(|&first| first > offset);
        let restart = first.map(|first| (first, state.read_at(first)));
        let Some(identity) = Identity::of(Some(&head)) else {
            return;
        };
        self.tls_plaintext[0] += 1;
        let place = Place::of(sock, flows.leg_info(ev.sock_cookie).map(|l| l.0));
        let request_id = identity.request_id().map(str::to_owned);
        match (place, dir) {
            (Some(Place::OutboundUp | Place::InboundUp), Dir::Send) => {
                // What a request whose read is reported later compares.
                self.spans.identify_orphan(id, &identity);
                self.settle(id, &identity);
            }
            (Some(p @ (Place::OutboundDown | Place::InboundDown)), Dir::Recv) => {
                let side = ProxySide {
                    tgid,
                    inbound: p == Place::InboundDown,
                };
                if let Some((first, read)) = restart {
                    self.restart_at(sock, p, id, first, read);
                }
                self.settle(id, &identity);
                self.proxies.identify(side, id, identity);
            }
            _ => {}
        }
        // After settling: an orphan settled now stands for its request.
        self.spans.note_request_id(id, request_id.as_deref());
    }

    /// An HTTP/2 frame the kernel walked out of a connection: what it
    /// completes (a request's head, a response's end) joins the spans as
    /// an HTTP/1.1 message at the same place would, a request found by its
    /// stream instead of by order.
    pub fn h2_frame(&mut self, flows: &FlowTable, f: &H2Frame, out: &mut Vec<Span>) {
        let mut messages = std::mem::take(&mut self.h2_messages);
        self.h2.frame(f, &mut messages);
        let dir = if f.direction & mesh_trace_common::DIR_RECV != 0 {
            Dir::Recv
        } else {
            Dir::Send
        };
        let tgid = (f.pid_tgid >> 32) as u32;
        let in_tls = f.direction & mesh_trace_common::H2_IN_TLS != 0;
        if in_tls && !messages.is_empty() {
            self.h2_inside_tls(f.sock_cookie, tgid);
        }
        for m in messages.drain(..) {
            self.h2_message(flows, f.sock_cookie, tgid, dir, in_tls, m, out);
        }
        self.h2_messages = messages;
    }

    #[allow(clippy::too_many_arguments)]
    fn h2_message(
        &mut self,
        flows: &FlowTable,
        cookie: u64,
        tgid: u32,
        dir: Dir,
        in_tls: bool,
        m: H2Message,
        out: &mut Vec<Span>,
    ) {
        let Some(sock) = flows.socket(cookie) else {
            if matches!(m, H2Message::Headers { .. }) {
                self.count(Unstitched::UnknownSocket);
            }
            return;
        };
        let Some(place) = Place::of(sock, flows.leg_info(cookie).map(|l| l.0)) else {
            return;
        };
        let requests = if place.sends_requests() {
            Dir::Send
        } else {
            Dir::Recv
        };
        let state = self.sockets.entry(cookie).or_insert_with(SockState::new);
        state.h2 = true;
        match m {
            H2Message::Headers {
                stream_id,
                seq,
                ts_ns,
                fields,
                ..
            } if dir == requests => {
                if !fields.is_request() {
                    // Request trailers.
                    return;
                }
                let offset = h2_position(state, dir, seq, in_tls);
                let msg = Message {
                    dir,
                    ts_ns,
                    tid: 0,
                    offset,
                    head: h2_request_head(&fields),
                };
                self.h2_request(flows, cookie, place, tgid, stream_id, in_tls, msg);
            }
            H2Message::Headers {
                stream_id,
                seq,
                ts_ns,
                end_stream,
                fields,
            } => {
                let Some(stream) = state.streams().get_mut(&stream_id) else {
                    if fields.status.is_some() {
                        self.count(Unstitched::NoRequest);
                    }
                    return;
                };
                if let Some(status) = fields.status {
                    let first = stream.status == 0;
                    stream.status = status;
                    if first {
                        let span = stream.span;
                        self.spans.note_h2_response_head(span, place, ts_ns);
                    }
                }
                stream.grpc_status = fields.grpc_status.or(stream.grpc_status);
                if end_stream {
                    let at = (seq, in_tls);
                    self.h2_response_end(place, tgid, cookie, dir, stream_id, at, ts_ns, out);
                }
            }
            H2Message::EndStream {
                stream_id,
                seq,
                ts_ns,
            } => {
                if dir != requests {
                    let at = (seq, in_tls);
                    self.h2_response_end(place, tgid, cookie, dir, stream_id, at, ts_ns, out);
                }
            }
            H2Message::Reset { stream_id, .. } => {
                if let Some(stream) = state.streams().pop(&stream_id) {
                    if self.spans.abandon(stream.span) {
                        self.count(Unstitched::StreamReset);
                    }
                }
            }
            H2Message::GoAway { .. } => {}
            H2Message::Undecodable { stream_id, .. } => {
                if let Some(stream) = state.streams().pop(&stream_id) {
                    self.spans.abandon(stream.span);
                }
                self.count(Unstitched::HpackLost);
                if matches!(
                    place,
                    Place::OutboundDown | Place::InboundDown | Place::OutboundUp | Place::InboundUp
                ) {
                    // A sidecar moved a request or response this node
                    // cannot read: any request it holds may be that one.
                    let inbound = matches!(place, Place::InboundDown | Place::InboundUp);
                    self.unseen_proxy_io(tgid, Some(inbound));
                }
            }
        }
    }

    /// A TLS socket found to carry HTTP/2 (frames walked in its plaintext):
    /// its encrypted records were framed as HTTP/1.1 messages until now,
    /// each an orphan write or a read held as a request of its own. They
    /// were no requests: the frames are. Those still waiting for their
    /// plaintext leave the spans and the sidecar's queue, and stop
    /// contesting the requests they stood beside.
    fn h2_inside_tls(&mut self, cookie: u64, tgid: u32) {
        let Some(state) = self.sockets.get_mut(&cookie) else {
            return;
        };
        if state.h2 {
            return;
        }
        state.h2 = true;
        let writes: Vec<SpanId> = state.tls[0].drain(..).map(|(_, id)| id).collect();
        let reads: Vec<SpanId> = state.tls[1].drain(..).map(|(_, id)| id).collect();
        let answered = state.outstanding.iter().count();
        state.outstanding.drop_front(answered);
        for orphan in writes {
            if let Some((_, candidates)) = self.spans.candidates(orphan) {
                for c in candidates {
                    self.spans.uncontest(c);
                }
            }
            if self.spans.is_unsettled_orphan(orphan) {
                self.spans.abandon(orphan);
            }
        }
        for id in reads {
            for inbound in [false, true] {
                self.proxies.take(ProxySide { tgid, inbound }, id, false);
            }
            self.spans.abandon(id);
        }
    }

    /// A request's head as an HTTP/2 stream on a socket at `place`: written
    /// by the client end (a new span, or a sidecar's forward), or read by
    /// the server end.
    #[allow(clippy::too_many_arguments)]
    fn h2_request(
        &mut self,
        flows: &FlowTable,
        cookie: u64,
        place: Place,
        tgid: u32,
        stream_id: u32,
        in_tls: bool,
        msg: Message,
    ) {
        if !place.sends_requests() {
            let arrival = Arrival {
                cookie,
                place,
                tgid,
                ts_ns: msg.ts_ns,
                tid: 0,
                head: Some(msg.head),
                offset: msg.offset,
                // The frame's own sequence number: both ends see it.
                end: msg.offset + 1,
                anchor: 0,
                stream: Some(stream_id),
                in_tls,
            };
            self.receive(flows, arrival, true);
            return;
        }
        let Some(id) = self.written_span(flows, cookie, place, tgid, &msg) else {
            return;
        };
        if let Some(s) = self.sockets.get_mut(&cookie) {
            s.streams().put(
                stream_id,
                H2Stream {
                    span: id,
                    status: 0,
                    grpc_status: None,
                },
            );
        }
        let key = legs_key(cookie, in_tls);
        self.written_on_leg(flows, cookie, key, place, id, msg.offset);
    }

    /// The frame that ends stream `stream_id`'s response on a socket at
    /// `place`: the response's moment there (for a stream of several
    /// messages, its last).
    #[allow(clippy::too_many_arguments)]
    fn h2_response_end(
        &mut self,
        place: Place,
        tgid: u32,
        cookie: u64,
        dir: Dir,
        stream_id: u32,
        (seq, in_tls): (u32, bool),
        ts_ns: u64,
        out: &mut Vec<Span>,
    ) {
        let Some(state) = self.sockets.get_mut(&cookie) else {
            return;
        };
        let Some(stream) = state.streams().pop(&stream_id) else {
            self.count(Unstitched::NoRequest);
            return;
        };
        let msg = Message {
            dir,
            ts_ns,
            tid: 0,
            offset: h2_position(state, dir, seq, in_tls),
            head: Head::Response {
                status: stream.status,
                request_id: None,
                content_length: None,
            },
        };
        if let Some(code) = stream.grpc_status {
            self.spans.note_grpc_status(stream.span, code);
        }
        self.answered(place, tgid, stream.span, &msg, out);
    }

    /// A new span from the app's request.
    fn start(&mut self, flows: &FlowTable, cookie: u64, msg: &Message) -> SpanId {
        let (source, destination) = flows
            .leg_info(cookie)
            .map(|(_, s, d)| (s.to_string(), d.to_string()))
            .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
        let owner = flows.socket(cookie).map_or(0, |s| s.netns);
        let (id, evicted) = self.spans.start(owner, source, destination, msg);
        self.count_n(Unstitched::Evicted, evicted);
        self.spans
            .note_namespaces(id, flows.namespaces(cookie, false));
        id
    }

    /// A new span from a request the inbound sidecar read from a client
    /// this node does not trace, labelled with the client's workload (from
    /// its address) and the service of the pod it reached.
    fn start_server_half(&mut self, flows: &FlowTable, a: &Arrival) -> SpanId {
        let labels = flows.server_side_labels(a.cookie);
        let owner = flows.socket(a.cookie).map_or(0, |s| s.netns);
        let (id, evicted) =
            self.spans
                .start_at(owner, Place::InboundDown, labels, a.ts_ns, a.head.as_ref());
        self.count_n(Unstitched::Evicted, evicted);
        self.spans
            .note_namespaces(id, flows.namespaces(a.cookie, true));
        id
    }

    fn hold_for_forwarding(&mut self, side: ProxySide, id: SpanId, a: &Arrival) {
        let read = Identity::of(a.head.as_ref());
        if let Some(seen) = &read {
            self.settle(id, seen);
        }
        // An encrypted read shows nothing: the span knows what the client's
        // request was.
        let identity = read.or_else(|| self.spans.identity(id));
        self.spans
            .note_request_id(id, identity.as_ref().and_then(Identity::request_id));
        if self.join_earlier_writes(side, id, a.ts_ns, identity.as_ref()) {
            return;
        }
        if let Some(dropped) = self
            .proxies
            .hold(side, Forwardable::new(id, a.ts_ns, identity))
        {
            // Too many held on one side: that request can no longer be
            // matched.
            self.spans.contest(dropped);
        }
    }

    /// A request read by a sidecar whose read is learnt only now, when the
    /// client's write of it is (the two ends of a leg may be reported in
    /// either order): the sidecar may have forwarded it already, as an
    /// upstream write that became an orphan. The one such write made after
    /// this read, showing the same request with the same `x-request-id`
    /// and no other request it could be, is it: its moments join this
    /// request's, which is then no longer held. Otherwise every write made
    /// after the read that could be it (an encrypted one whose plaintext
    /// is still to come, a fitting one) counts it among its candidates, and
    /// the request is contested until what the write shows further on
    /// settles it: never a local reply by mistake.
    fn join_earlier_writes(
        &mut self,
        side: ProxySide,
        id: SpanId,
        read_ns: u64,
        read: Option<&Identity>,
    ) -> bool {
        if self
            .orphans_forgotten_upto
            .get(&side)
            .is_some_and(|&upto| upto >= read_ns)
        {
            // A write forgotten for room may have been this request.
            self.spans.contest(id);
        }
        let Some(queue) = self.recent_orphans.get_mut(&side) else {
            return false;
        };
        let spans = &self.spans;
        queue.retain(|&(orphan, _)| spans.is_unsettled_orphan(orphan));
        let mut could_be = Vec::new();
        let mut shown = Vec::new();
        for &(orphan, _) in queue.iter().filter(|&&(_, w)| w >= read_ns) {
            match spans.identity(orphan) {
                Some(written) if read.is_none_or(|r| r.fits(&written)) => {
                    shown.push((orphan, written));
                    could_be.push(orphan);
                }
                Some(_) => {}
                None => could_be.push(orphan),
            }
        }
        let same_request_id = |written: &Identity| {
            read.and_then(Identity::request_id)
                .is_some_and(|rid| written.request_id() == Some(rid))
        };
        match (&could_be[..], &shown[..]) {
            ([], _) => false,
            ([only], [(_, written)])
                if same_request_id(written) && spans.candidates(*only).is_none() =>
            {
                let only = *only;
                queue.retain(|&(orphan, _)| orphan != only);
                self.spans.settle(only, id);
                true
            }
            _ => {
                for &orphan in &could_be {
                    self.spans.add_candidate(orphan, side, id);
                    self.spans.contest(id);
                }
                false
            }
        }
    }

    /// For each request `side` holds without an identity of its own (an
    /// orphan read encrypted): the identities of the requests it may be.
    fn could_be(&self, side: ProxySide) -> HashMap<SpanId, Vec<Identity>> {
        let mut out = HashMap::new();
        for id in self.proxies.held_unknown(side) {
            if let Some((origin, candidates)) = self.spans.candidates(id) {
                let ids = candidates
                    .into_iter()
                    .filter(|&c| self.proxies.holds(origin, c))
                    .filter_map(|c| self.spans.identity(c))
                    .collect();
                out.insert(id, ids);
            }
        }
        out
    }

    /// Orphan `id`, written upstream by a sidecar that held several
    /// requests it could be, shows `seen` further on: if exactly one of
    /// them (still held) fits, it is that request.
    fn settle(&mut self, id: SpanId, seen: &Identity) {
        let Some((side, candidates)) = self.spans.candidates(id) else {
            return;
        };
        let fitting: Vec<SpanId> = candidates
            .iter()
            .copied()
            .filter(|&c| self.proxies.holds(side, c))
            .filter(|&c| self.spans.identity(c).is_none_or(|i| i.fits(seen)))
            .collect();
        if let [only] = fitting[..] {
            // Its write may have been counted in a group: counting it out
            // again can only keep the others held longer.
            self.proxies.take(side, only, true);
            self.spans.settle(id, only);
            // The others were contested by this write, which is not theirs.
            for other in candidates.into_iter().filter(|&c| c != only) {
                self.spans.uncontest(other);
            }
        }
    }

    /// The span of the request a sidecar is writing upstream: the one it
    /// read before, a retry, or an orphan when that cannot be told.
    fn forward(&mut self, side: ProxySide, place: Place, msg: &Message) -> SpanId {
        let spans = &self.spans;
        self.proxies.forget_gone(side, |id| spans.in_flight(id));
        let could_be = self.could_be(side);
        let spans = &self.spans;
        match self
            .proxies
            .forward(side, msg, |id| spans.answered(id), &could_be)
        {
            Forwarded::Retry(id) => {
                self.spans.retried(id);
                id
            }
            Forwarded::Read { span, request_id } => {
                if let Some(seen) = Identity::of(Some(&msg.head)) {
                    self.settle(span, &seen);
                }
                if let Some(r) = request_id {
                    self.spans.note_request_id(span, Some(&r));
                }
                span
            }
            Forwarded::Ambiguous(candidates) => {
                for &id in &candidates {
                    self.spans.contest(id);
                }
                self.orphan(place, side, candidates, msg)
            }
            Forwarded::Unmatched(held) => {
                // It may have been any of them, rewritten past recognition.
                for id in held {
                    self.spans.contest(id);
                }
                // Counted when seen (a counter never goes back): a request
                // whose read is reported later may still claim it.
                self.count(Unstitched::NoDownstream);
                self.orphan(place, side, Vec::new(), msg)
            }
        }
    }

    fn orphan(
        &mut self,
        place: Place,
        side: ProxySide,
        candidates: Vec<SpanId>,
        msg: &Message,
    ) -> SpanId {
        let (id, evicted) = self.spans.orphan(place, side, candidates, msg);
        self.count_n(Unstitched::Evicted, evicted);
        let spans = &self.spans;
        let queue = self.recent_orphans.entry(side).or_default();
        if queue.len() == MAX_RECENT_ORPHANS {
            queue.retain(|&(orphan, _)| spans.is_unsettled_orphan(orphan));
        }
        if queue.len() == MAX_RECENT_ORPHANS {
            if let Some((_, written_ns)) = queue.pop_front() {
                // A request read before it and reported later cannot be
                // told from it any more.
                let forgotten = self.orphans_forgotten_upto.entry(side).or_default();
                *forgotten = (*forgotten).max(written_ns);
            }
        }
        queue.push_back((id, msg.ts_ns));
        id
    }

    #[allow(clippy::too_many_arguments)]
    fn response(
        &mut self,
        flows: &FlowTable,
        cookie: u64,
        place: Place,
        tgid: u32,
        msg: &Message,
        writes_seen: bool,
        out: &mut Vec<Span>,
    ) {
        let peer_here = place.sends_requests() && flows.peer(cookie).is_some();
        let Some(state) = self.sockets.get_mut(&cookie) else {
            return;
        };
        let answer = state
            .outstanding
            .answered_by(msg.offset, state.unseen_reply);
        // Bytes from a server on this node that has not received the
        // request yet are not its response (e.g. a TLS session ticket).
        if let Answers::Request { id, .. } = answer {
            if peer_here && self.spans.not_yet_arrived(id, place) {
                self.count(Unstitched::NoRequest);
                return;
            }
        }
        state.unseen_reply = false;
        let (id, skipped) = match answer {
            Answers::Request { id, skipped } => (Some(id), skipped),
            Answers::Unknown(could_be) => (None, could_be),
            Answers::Nothing => (None, Vec::new()),
        };
        // The answered request and those before it lead the queue.
        state
            .outstanding
            .drop_front(skipped.len() + usize::from(id.is_some()));
        // Requests whose responses went by unseen, or that this response
        // may answer: none can be exact any more.
        let accounted = id.is_none() && !skipped.is_empty();
        for lost in skipped {
            if self.spans.abandon(lost) {
                self.count(Unstitched::LostEvent);
            }
        }
        let Some(id) = id else {
            if accounted {
                return;
            }
            self.count(Unstitched::NoRequest);
            if matches!(place, Place::OutboundUp | Place::InboundUp) && !writes_seen {
                // A response upstream to no request seen: the sidecar
                // wrote one unseen, which may be any request it holds
                // (and none of them is a local reply for sure). Not when
                // every byte it wrote on this socket was seen: then it is
                // no response (a TLS session ticket after the handshake, a
                // server closing an idle connection with a 408).
                self.unseen_proxy_io(tgid, Some(place == Place::InboundUp));
            }
            return;
        };
        self.answered(place, tgid, id, msg, out);
    }

    /// The response to span `id` on a socket at `place` of process `tgid`.
    fn answered(
        &mut self,
        place: Place,
        tgid: u32,
        id: SpanId,
        msg: &Message,
        out: &mut Vec<Span>,
    ) {
        // A sidecar answering downstream a request it still holds never
        // forwarded it: a local reply, and no longer one to match; unless
        // the response itself says which of its writes upstream it was.
        if matches!(place, Place::OutboundDown | Place::InboundDown) {
            let side = ProxySide {
                tgid,
                inbound: place == Place::InboundDown,
            };
            // Only a request surely written upstream: one still held may
            // be answered by the sidecar itself.
            if self.spans.is_contested(id) && !self.proxies.holds(side, id) {
                let live: Vec<SpanId> = self
                    .recent_orphans
                    .get(&side)
                    .map(|q| q.iter().map(|&(orphan, _)| orphan).collect())
                    .unwrap_or_default();
                self.spans
                    .resolve_by_response(id, side, &msg.head, msg.ts_ns, &live);
            }
            if self.proxies.take(side, id, false) {
                let by = if side.inbound {
                    LocalReply::Inbound
                } else {
                    LocalReply::Outbound
                };
                self.spans.local_reply(id, by);
            }
        }
        match self.spans.response(id, place, msg) {
            Ok(Some(done)) => out.push(done),
            Ok(None) => {}
            Err(why) => self.count(why),
        }
    }

    /// A sidecar process did I/O this node could not follow (on one side,
    /// or either): the requests it holds can no longer be trusted.
    fn unseen_proxy_io(&mut self, tgid: u32, inbound: Option<bool>) {
        let sides = match inbound {
            Some(i) => vec![i],
            None => vec![false, true],
        };
        for inbound in sides {
            self.proxies.distrust(ProxySide { tgid, inbound });
            let held: Vec<SpanId> = self.proxies.held_by(ProxySide { tgid, inbound }).collect();
            for id in held {
                self.spans.mark_lost(id);
            }
        }
    }

    /// Forgets a closed socket.
    pub fn closed(&mut self, cookie: u64) {
        self.h2.closed(cookie);
        if let Some(state) = self.sockets.remove(&cookie) {
            // Encrypted records a server's half began with that never went
            // on to the app were no request: a TLS alert (close_notify).
            for id in state.outstanding.iter() {
                self.spans.drop_if_never_forwarded(id, Place::InboundDown);
            }
        }
        self.legs.closed(cookie);
        self.legs.closed(legs_key(cookie, true));
    }

    /// Drops requests older than the timeout; tables left sparse after a
    /// peak give their memory back.
    pub fn expire(&mut self, now_ns: u64) {
        let expired = self.spans.expire(now_ns, self.cfg.timeout_ns);
        self.count_n(Unstitched::Timeout, expired);
        self.drop_settled_orphans(now_ns);
        crate::shrink::shrink_sparse(&mut self.sockets);
        self.legs.shrink();
    }

    /// Forgets the recent orphan writes that completed, were settled or
    /// dropped, and the sides left with none.
    fn drop_settled_orphans(&mut self, now_ns: u64) {
        let spans = &self.spans;
        self.recent_orphans.retain(|_, queue| {
            queue.retain(|&(orphan, _)| spans.is_unsettled_orphan(orphan));
            !queue.is_empty()
        });
        // A request read before a forgotten write has timed out by now.
        let timeout_ns = self.cfg.timeout_ns;
        self.orphans_forgotten_upto
            .retain(|_, &mut upto| now_ns.saturating_sub(upto) < timeout_ns);
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

/// Joins across a leg are kept by sending socket; positions in a TLS
/// session's plaintext under a key of their own, never compared with TCP
/// sequence numbers.
fn legs_key(sender: u64, in_tls: bool) -> u64 {
    if in_tls {
        sender | 1 << 63
    } else {
        sender
    }
}

/// Where an HTTP/2 frame at `seq` starts on a socket: its TCP sequence
/// number widened as the socket's data widens them, or (inside TLS) its
/// position in the session's plaintext, which both ends count alike.
fn h2_position(state: &SockState, dir: Dir, seq: u32, in_tls: bool) -> u64 {
    if in_tls {
        (1 << 32) | u64::from(seq)
    } else {
        state.peek_position(dir, seq)
    }
}

/// An HTTP/2 request's head as the HTTP/1.1 head the matching compares:
/// `:path` is the target, `:authority` the host.
fn h2_request_head(f: &H2Fields) -> Head {
    let target = f.path.clone().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    Head::Request {
        method: f.method.clone().unwrap_or_default(),
        path: path.chars().take(128).collect(),
        target: target.chars().take(256).collect(),
        host: f.authority.clone(),
        request_id: f.request_id.clone(),
        content_length: f.content_length,
        trace_context: None,
        grpc: f.is_grpc(),
        end_to_end: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mesh_trace_common::{DataEvent, EventKind, DIR_RECV, DIR_SEND};

    use super::*;
    use crate::spans::span::Hop;
    use crate::{
        flows::{
            legs::LegKind,
            metadata::NoMetadata,
            table::FlowTableConfig,
            test_events::{connect, ep, established},
        },
        kernel::events::Event,
    };

    /// Processes: the client app, its outbound sidecar, the server's
    /// inbound sidecar, the server app.
    const APP: u32 = 10;
    const OUTBOUND: u32 = 20;
    const INBOUND: u32 = 30;
    const SERVER: u32 = 40;

    /// Chain `k`'s six sockets, cookies `10 k + 1 ..= 10 k + 6`: the app's
    /// connection to 15001, the outbound sidecar's to the server pod (15006
    /// after REDIRECT), the inbound sidecar's from 127.0.0.6 to the app.
    fn chain(k: u64) -> Vec<Event> {
        let c = |i: u64| 10 * k + i;
        let port = |p: u16| p + k as u16;
        let vip = ep([10, 96, 0, 12], 9080);
        let server = ep([10, 244, 0, 9], 9080);
        vec![
            connect(c(1), 1, 1000, APP, vip),
            established(c(1), 1, ep([10, 244, 0, 5], port(40000)), vip, true),
            established(
                c(2),
                1,
                ep([127, 0, 0, 1], 15001),
                ep([10, 244, 0, 5], port(40000)),
                false,
            ),
            connect(c(3), 1, 1337, OUTBOUND, server),
            established(c(3), 1, ep([10, 244, 0, 5], port(50000)), server, true),
            established(
                c(4),
                2,
                ep([10, 244, 0, 9], 15006),
                ep([10, 244, 0, 5], port(50000)),
                false,
            ),
            connect(c(5), 2, 1337, INBOUND, server),
            established(c(5), 2, ep([127, 0, 0, 6], port(41000)), server, true),
            established(c(6), 2, server, ep([127, 0, 0, 6], port(41000)), false),
        ]
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
            let (node, legs) = Node::new(&chain(0));
            assert_eq!(
                legs,
                vec![LegKind::Redirect, LegKind::Mesh, LegKind::Delivery]
            );
            node
        }

        /// Two such chains: two app connections to the outbound sidecar,
        /// two pooled upstream connections, two to the server app.
        fn two_chains() -> Node {
            let mut events = chain(0);
            events.extend(chain(1));
            Node::new(&events).0
        }

        /// A data event of process `tgid` on socket `cookie`, a microsecond
        /// after the last one, carrying `payload` as its prefix.
        fn event(&mut self, cookie: u64, tgid: u32, direction: u32, payload: &[u8]) -> DataEvent {
            self.ts_ns += 1_000;
            let mut d = DataEvent::default();
            d.header.kind = EventKind::Data as u32;
            d.header.ts_ns = self.ts_ns;
            d.sock_cookie = cookie;
            d.pid_tgid = u64::from(tgid) << 32 | u64::from(tgid);
            d.direction = direction;
            d.len = payload.len() as u32;
            let n = payload.len().min(d.prefix.len());
            d.prefix_len = n as u32;
            d.prefix[..n].copy_from_slice(&payload[..n]);
            d
        }

        /// Socket `cookie` of process `tgid` moves `payload` in `dir`;
        /// returns when.
        fn io(&mut self, cookie: u64, tgid: u32, dir: u32, payload: &[u8]) -> u64 {
            let mut d = self.event(cookie, tgid, dir, payload);
            // As the kernel reports it: how far the other direction had got.
            let other = if dir == DIR_SEND { DIR_RECV } else { DIR_SEND };
            d.opposite_seq = self.next_offset(cookie, other) as u32;
            let offset = self.offsets.entry((cookie, dir)).or_default();
            d.offset = *offset;
            *offset += payload.len() as u64;
            // Data first: the table forgets a socket at its close.
            self.stitcher.data(&self.table, &d, &mut self.spans);
            self.table.apply(&Event::Data(Box::new(d)), &mut Vec::new());
            self.ts_ns
        }

        /// Where socket `cookie`'s next bytes in `dir` start.
        fn next_offset(&self, cookie: u64, dir: u32) -> u64 {
            self.offsets.get(&(cookie, dir)).copied().unwrap_or(0)
        }

        /// The TLS probes report the plaintext of a call on socket
        /// `cookie` whose I/O on the wire began at `first` and whose last
        /// I/O began at `last` (None: the call moved nothing on the wire).
        fn tls_call(
            &mut self,
            cookie: u64,
            tgid: u32,
            dir: u32,
            wire: Option<(u64, u64)>,
            text: &[u8],
        ) {
            let flags = match wire {
                Some(_) => mesh_trace_common::DIR_TLS_PLAINTEXT,
                None => mesh_trace_common::DIR_TLS_PLAINTEXT | mesh_trace_common::DIR_TLS_NO_SEQ,
            };
            let mut d = self.event(cookie, tgid, dir | flags, text);
            let (first, last) = wire.unwrap_or_default();
            d.offset = last;
            d.opposite_seq = first as u32;
            self.stitcher.data(&self.table, &d, &mut self.spans);
        }

        /// The plaintext of a call whose one I/O on the wire began at `at`.
        fn plaintext(&mut self, cookie: u64, tgid: u32, dir: u32, at: u64, text: &[u8]) {
            self.tls_call(cookie, tgid, dir, Some((at, at)), text);
        }
    }

    /// A request for `target` without x-request-id, as an app sends it.
    fn plain(target: &str) -> Vec<u8> {
        format!("GET {target} HTTP/1.1\r\nhost: reviews:9080\r\n\r\n").into_bytes()
    }
    /// The request as a sidecar forwards it, with an id of its own.
    fn plain_forwarded(target: &str, id: &str) -> Vec<u8> {
        format!("GET {target} HTTP/1.1\r\nhost: reviews:9080\r\nx-request-id: {id}\r\n\r\n")
            .into_bytes()
    }
    const NOT_FOUND: &[u8] = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";

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
        // A read at an outbound sidecar whose app is not traced.
        node.table.apply(
            &established(
                7,
                1,
                ep([127, 0, 0, 1], 15001),
                ep([10, 244, 0, 5], 47000),
                false,
            ),
            &mut Vec::new(),
        );
        node.io(7, OUTBOUND, DIR_RECV, &request("a"));
        // The inbound sidecar writes upstream a request it never read.
        node.io(5, INBOUND, DIR_SEND, &forwarded("b"));
        // A response on the server app's socket that received no request.
        node.io(6, SERVER, DIR_SEND, RESPONSE);
        let count = |why| node.stitcher.unstitched.get(&why).copied();
        assert_eq!(count(Unstitched::NotHttp), Some(1));
        assert_eq!(count(Unstitched::NoSender), Some(1));
        assert_eq!(count(Unstitched::NoDownstream), Some(1));
        assert_eq!(count(Unstitched::NoRequest), Some(1));
        // The unmatched write goes on as an orphan, so the responses on its
        // socket still pair with the right requests; it is not a request.
        assert_eq!(node.stitcher.pending(), 1);
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

    /// The server's node of a request whose client runs on another node:
    /// the inbound sidecar's 15006 socket has no peer here.
    fn server_node() -> Node {
        let (node, _) = Node::new(&[
            established(
                4,
                2,
                ep([10, 244, 0, 9], 15006),
                ep([10, 244, 1, 5], 50000),
                false,
            ),
            connect(5, 2, 1337, INBOUND, ep([10, 244, 0, 9], 9080)),
            established(
                5,
                2,
                ep([127, 0, 0, 6], 41000),
                ep([10, 244, 0, 9], 9080),
                true,
            ),
            established(
                6,
                2,
                ep([10, 244, 0, 9], 9080),
                ep([127, 0, 0, 6], 41000),
                false,
            ),
        ]);
        node
    }

    /// The server's half of a request from a client on another node.
    fn server_half(node: &mut Node, id: &str, encrypted: bool) -> [u64; 6] {
        let forwarded = forwarded(id);
        let (mesh_request, mesh_response) = if encrypted {
            (ENCRYPTED, ENCRYPTED)
        } else {
            (&forwarded[..], RESPONSE)
        };
        [
            node.io(4, INBOUND, DIR_RECV, mesh_request),
            node.io(5, INBOUND, DIR_SEND, &forwarded),
            node.io(6, SERVER, DIR_RECV, &forwarded),
            node.io(6, SERVER, DIR_SEND, RESPONSE),
            node.io(5, INBOUND, DIR_RECV, RESPONSE),
            node.io(4, INBOUND, DIR_SEND, mesh_response),
        ]
    }

    #[test]
    fn a_client_on_another_node_leaves_the_server_half_on_this_one() {
        for encrypted in [false, true] {
            let mut node = server_node();
            let mut traces = Vec::new();
            for id in ["srv-1", "srv-2"] {
                let t = server_half(&mut node, id, encrypted);
                let spans = std::mem::take(&mut node.spans);
                assert_eq!(spans.len(), 1, "encrypted: {encrypted}");
                let span = &spans[0];
                let mut want = [None; 12];
                for (i, ts) in t.into_iter().enumerate() {
                    want[3 + i] = Some(ts);
                }
                assert_eq!(span.moments, want, "encrypted: {encrypted}");
                assert_eq!(span.half(), "server");
                assert_eq!((span.method.as_str(), span.status), ("GET", 200));
                assert_eq!(span.request_id.as_deref(), Some(id));
                assert_eq!(span.hop_ns(Hop::ServerSide), Some(t[5] - t[0]));
                assert_eq!(span.hop_ns(Hop::App), Some(t[3] - t[2]));
                assert_eq!(span.hop_ns(Hop::Network), None);
                let reporters: Vec<_> = span.reporters().collect();
                assert_eq!(reporters, [crate::spans::span::Reporter::Destination]);
                traces.push(span.trace_id.clone().expect("a trace id"));
            }
            // The first request starts the connection's byte stream.
            let client = "10.244.1.5:50000".parse().unwrap();
            let server = "10.244.0.9".parse().unwrap();
            assert_eq!(traces[0], trace_id::from_mesh_leg(client, server, 0));
            assert_ne!(traces[0], traces[1]);
            assert!(
                node.stitcher.unstitched.is_empty(),
                "{:?}",
                node.stitcher.unstitched
            );
            assert_eq!(node.stitcher.pending(), 0);
        }
    }

    /// Two connections from another node's sidecar to this one's 15006,
    /// each with its own connection from 127.0.0.6 to the app.
    fn server_node_two_connections() -> Node {
        let mut events = Vec::new();
        for k in [0u8, 1] {
            let c = |i: u64| 10 * u64::from(k) + i;
            let port = |p: u16| p + u16::from(k);
            events.extend([
                established(
                    c(4),
                    2,
                    ep([10, 244, 0, 9], 15006),
                    ep([10, 244, 1, 5], port(50000)),
                    false,
                ),
                connect(c(5), 2, 1337, INBOUND, ep([10, 244, 0, 9], 9080)),
                established(
                    c(5),
                    2,
                    ep([127, 0, 0, 6], port(41000)),
                    ep([10, 244, 0, 9], 9080),
                    true,
                ),
                established(
                    c(6),
                    2,
                    ep([10, 244, 0, 9], 9080),
                    ep([127, 0, 0, 6], port(41000)),
                    false,
                ),
            ]);
        }
        Node::new(&events).0
    }

    /// Behind mutual TLS the inbound sidecar's reads show nothing: two
    /// requests it holds at once can only be told apart by the plaintext
    /// its TLS library returned. Without it they are counted; with it each
    /// is exact, whatever order they go on to the app in.
    #[test]
    fn requests_read_behind_tls_are_told_apart_by_their_plaintext() {
        for with_plaintext in [false, true] {
            let mut node = server_node_two_connections();
            let ids = ["tls-a", "tls-b"];
            let mut t = [[0u64; 6]; 2];
            for (i, down) in [(0, 4), (1, 14)] {
                let at = node.next_offset(down, DIR_RECV);
                t[i][0] = node.io(down, INBOUND, DIR_RECV, ENCRYPTED);
                if with_plaintext && i == 0 {
                    node.plaintext(down, INBOUND, DIR_RECV, at, &forwarded(ids[i]));
                } else if with_plaintext {
                    // Returned from bytes the library had read before: no
                    // I/O on the wire names the record, the socket does.
                    node.tls_call(down, INBOUND, DIR_RECV, None, &forwarded(ids[i]));
                }
            }
            // b goes on to the app first, on the first connection to it.
            for (i, up) in [(1, 5), (0, 15)] {
                let fwd = forwarded(ids[i]);
                t[i][1] = node.io(up, INBOUND, DIR_SEND, &fwd);
                t[i][2] = node.io(up + 1, SERVER, DIR_RECV, &fwd);
                t[i][3] = node.io(up + 1, SERVER, DIR_SEND, RESPONSE);
                t[i][4] = node.io(up, INBOUND, DIR_RECV, RESPONSE);
            }
            for (i, down) in [(0, 4), (1, 14)] {
                t[i][5] = node.io(down, INBOUND, DIR_SEND, ENCRYPTED);
            }
            let spans = std::mem::take(&mut node.spans);
            if !with_plaintext {
                assert!(spans.is_empty(), "{spans:?}");
                assert_eq!(
                    node.stitcher.unstitched.get(&Unstitched::Ambiguous),
                    Some(&2),
                    "{:?}",
                    node.stitcher.unstitched
                );
                continue;
            }
            assert_eq!(spans.len(), 2, "{:?}", node.stitcher.unstitched);
            for (i, id) in ids.into_iter().enumerate() {
                let span = spans
                    .iter()
                    .find(|s| s.request_id.as_deref() == Some(id))
                    .expect("a span per request");
                let mut want = [None; 12];
                for (k, ts) in t[i].into_iter().enumerate() {
                    want[3 + k] = Some(ts);
                }
                assert_eq!(span.moments, want, "{id}");
            }
            assert!(
                node.stitcher.unstitched.is_empty(),
                "{:?}",
                node.stitcher.unstitched
            );
            assert_eq!(node.stitcher.tls_plaintext, [2, 0]);
        }
    }

    /// A new connection from another node's sidecar: its handshake ends
    /// with the client's Finished, an encrypted record read on its own,
    /// which starts a message like a request would; the request's record
    /// follows in the same direction long after. The plaintext's first read
    /// says where the request began: its moment and its trace are that
    /// read's, not the handshake's.
    #[test]
    fn a_request_read_behind_the_handshakes_last_record_starts_at_its_own_read() {
        let mut node = server_node();
        node.io(4, INBOUND, DIR_RECV, b"\x16\x03\x01\x00\x40 client hello");
        node.io(
            4,
            INBOUND,
            DIR_SEND,
            b"\x16\x03\x03\x00\x40 server hello..finished",
        );
        node.io(4, INBOUND, DIR_RECV, b"\x14\x03\x03\x00\x01\x01");
        let finished = node.io(
            4,
            INBOUND,
            DIR_RECV,
            b"\x17\x03\x03\x00\x35 client finished",
        );
        let at = node.next_offset(4, DIR_RECV);
        let fwd = forwarded("late-1");
        let t3 = node.io(4, INBOUND, DIR_RECV, ENCRYPTED);
        node.plaintext(4, INBOUND, DIR_RECV, at, &fwd);
        let t4 = node.io(5, INBOUND, DIR_SEND, &fwd);
        node.io(6, SERVER, DIR_RECV, &fwd);
        node.io(6, SERVER, DIR_SEND, RESPONSE);
        node.io(5, INBOUND, DIR_RECV, RESPONSE);
        node.io(4, INBOUND, DIR_SEND, ENCRYPTED);
        let span = node.spans.pop().expect("a span");
        assert!(finished < t3);
        assert_eq!(span.moments[3], Some(t3), "{span:?}");
        assert_eq!(
            span.hop_ns(Hop::InboundProxy).map(|h| h >= t4 - t3),
            Some(true)
        );
        assert_eq!(span.request_id.as_deref(), Some("late-1"));
        // Named by the request's own sequence number on the mesh leg.
        let client = "10.244.1.5:50000".parse().unwrap();
        let server = "10.244.0.9".parse().unwrap();
        let want = trace_id::from_mesh_leg(client, server, at as u32);
        assert_eq!(span.trace_id.as_deref(), Some(want.as_str()));
    }

    /// The client's node behind mutual TLS: two requests the outbound
    /// sidecar holds go upstream encrypted, the second first; the
    /// plaintext of each `SSL_write` says which it was (its first record
    /// on the wire at the write's sequence number).
    #[test]
    fn encrypted_upstream_writes_are_settled_by_their_plaintext() {
        let mut events = chain(0)[..5].to_vec();
        events.extend_from_slice(&chain(1)[..5]);
        let (mut node, _) = Node::new(&events);
        let (a, b) = (plain("/a?x=1"), plain("/b?x=2"));
        let mut t = [[0u64; 6]; 2];
        t[0][0] = node.io(1, APP, DIR_SEND, &a);
        t[1][0] = node.io(11, APP, DIR_SEND, &b);
        t[0][1] = node.io(2, OUTBOUND, DIR_RECV, &a);
        t[1][1] = node.io(12, OUTBOUND, DIR_RECV, &b);
        for (i, up, text) in [
            (1, 3, plain_forwarded("/b?x=2", "sidecar-b")),
            (0, 13, plain_forwarded("/a?x=1", "sidecar-a")),
        ] {
            let at = node.next_offset(up, DIR_SEND);
            t[i][2] = node.io(up, OUTBOUND, DIR_SEND, ENCRYPTED);
            node.plaintext(up, OUTBOUND, DIR_SEND, at, &text);
        }
        // A session ticket on the first connection before the response:
        // the library returns nothing of it, so it answers nothing.
        node.io(3, OUTBOUND, DIR_RECV, ENCRYPTED);
        for (i, up) in [(1, 3), (0, 13)] {
            let at = node.next_offset(up, DIR_RECV);
            t[i][3] = node.io(up, OUTBOUND, DIR_RECV, ENCRYPTED);
            // An SSL_read: its first read (the record's header) is where
            // the response starts.
            let last = node.next_offset(up, DIR_RECV) - 1;
            node.tls_call(up, OUTBOUND, DIR_RECV, Some((at, last)), RESPONSE);
        }
        for (i, down) in [(0, 2), (1, 12)] {
            t[i][4] = node.io(down, OUTBOUND, DIR_SEND, RESPONSE);
            t[i][5] = node.io(down - 1, APP, DIR_RECV, RESPONSE);
        }
        let spans = std::mem::take(&mut node.spans);
        assert_eq!(spans.len(), 2, "{:?}", node.stitcher.unstitched);
        for (i, (path, id)) in [("/a", "sidecar-a"), ("/b", "sidecar-b")]
            .into_iter()
            .enumerate()
        {
            let span = spans
                .iter()
                .find(|s| s.path == path)
                .expect("a span per request");
            // The id the sidecar added upstream, seen only in plaintext.
            assert_eq!(span.request_id.as_deref(), Some(id));
            let want = [0, 1, 2, 9, 10, 11];
            for (k, m) in want.into_iter().enumerate() {
                assert_eq!(span.moments[m], Some(t[i][k]), "{path} moment {m}");
            }
        }
        assert!(
            node.stitcher.unstitched.is_empty(),
            "{:?}",
            node.stitcher.unstitched
        );
    }

    /// On loopback the app can read its response before the sidecar's
    /// write of it is reported: the span waits for that moment and goes
    /// out whole.
    #[test]
    fn a_response_read_before_its_write_is_reported_waits_for_the_write() {
        let mut node = Node::six_sockets();
        let (req, fwd) = (request("skew-1"), forwarded("skew-1"));
        let mut t = vec![
            node.io(1, APP, DIR_SEND, &req),
            node.io(2, OUTBOUND, DIR_RECV, &req),
            node.io(3, OUTBOUND, DIR_SEND, &fwd),
            node.io(4, INBOUND, DIR_RECV, &fwd),
            node.io(5, INBOUND, DIR_SEND, &fwd),
            node.io(6, SERVER, DIR_RECV, &fwd),
            node.io(6, SERVER, DIR_SEND, RESPONSE),
            node.io(5, INBOUND, DIR_RECV, RESPONSE),
            node.io(4, INBOUND, DIR_SEND, RESPONSE),
            node.io(3, OUTBOUND, DIR_RECV, RESPONSE),
        ];
        let t11 = node.io(1, APP, DIR_RECV, RESPONSE);
        assert!(node.spans.is_empty(), "out without t10");
        let t10 = node.io(2, OUTBOUND, DIR_SEND, RESPONSE);
        assert!(t10 - t11 <= crate::spans::span::LEG_SKEW_NS);
        let span = node.spans.pop().expect("completed by t10");
        // The sidecar's write moves back to the app's read (the same instant).
        t.extend([t11, t11]);
        assert_eq!(
            span.moments.to_vec(),
            t.into_iter().map(Some).collect::<Vec<_>>()
        );
        assert!(
            node.stitcher.unstitched.is_empty(),
            "{:?}",
            node.stitcher.unstitched
        );
    }

    /// An encrypted record that never goes on to the app (a TLS alert as
    /// the client's sidecar closes a pooled connection) is no request: it
    /// leaves with its socket, uncounted, and stands beside no other.
    #[test]
    fn a_tls_alert_before_close_is_no_server_half() {
        let mut node = server_node();
        node.io(4, INBOUND, DIR_RECV, ENCRYPTED);
        assert_eq!(node.stitcher.pending(), 1);
        node.stitcher.closed(4);
        assert_eq!(node.stitcher.pending(), 0);
        assert!(
            node.stitcher.unstitched.is_empty(),
            "{:?}",
            node.stitcher.unstitched
        );
    }

    /// The client's node of a request whose server runs on another node:
    /// the outbound sidecar's upstream socket has no peer here.
    #[test]
    fn a_server_on_another_node_leaves_the_client_half_on_this_one() {
        let (mut node, _) = Node::new(&chain(0)[..5]);
        let (req, fwd) = (request("cli-1"), forwarded("cli-1"));
        let t = [
            node.io(1, APP, DIR_SEND, &req),
            node.io(2, OUTBOUND, DIR_RECV, &req),
            node.io(3, OUTBOUND, DIR_SEND, &fwd),
            node.io(3, OUTBOUND, DIR_RECV, RESPONSE),
            node.io(2, OUTBOUND, DIR_SEND, RESPONSE),
            node.io(1, APP, DIR_RECV, RESPONSE),
        ];
        let span = node.spans.pop().expect("a span");
        assert_eq!(span.half(), "client");
        assert_eq!(span.hop_ns(Hop::Upstream), Some(t[3] - t[2]));
        assert_eq!(span.hop_ns(Hop::ServerSide), None);
        assert_eq!(
            span.duration_ns(crate::spans::span::Reporter::Source),
            Some(t[5] - t[0])
        );
        assert!(
            node.stitcher.unstitched.is_empty(),
            "{:?}",
            node.stitcher.unstitched
        );
    }

    /// The app's send is reported after its sidecar read the request and
    /// even forwarded it (the app's thread ran its tracepoint late): the
    /// forward, unmatched when seen, is claimed by the request when it
    /// arrives, and the span is whole, exact, and no local reply.
    #[test]
    fn a_client_write_reported_after_the_sidecar_forwarded_it_is_still_one_span() {
        let mut node = Node::six_sockets();
        let (req, fwd) = (request("late-1"), forwarded("late-1"));
        let t1 = node.io(2, OUTBOUND, DIR_RECV, &req);
        let t2 = node.io(3, OUTBOUND, DIR_SEND, &fwd);
        let _late_t0 = node.io(1, APP, DIR_SEND, &req);
        let rest = [
            node.io(4, INBOUND, DIR_RECV, &fwd),
            node.io(5, INBOUND, DIR_SEND, &fwd),
            node.io(6, SERVER, DIR_RECV, &fwd),
            node.io(6, SERVER, DIR_SEND, RESPONSE),
            node.io(5, INBOUND, DIR_RECV, RESPONSE),
            node.io(4, INBOUND, DIR_SEND, RESPONSE),
            node.io(3, OUTBOUND, DIR_RECV, RESPONSE),
            node.io(2, OUTBOUND, DIR_SEND, RESPONSE),
            node.io(1, APP, DIR_RECV, RESPONSE),
        ];
        let spans = std::mem::take(&mut node.spans);
        assert_eq!(spans.len(), 1, "{:?}", node.stitcher.unstitched);
        let s = &spans[0];
        assert_eq!(s.local_reply, None);
        assert_eq!(s.request_id.as_deref(), Some("late-1"));
        // The send moved back to the read that proves it had happened.
        let mut want = [t1, t1, t2, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        want[3..].copy_from_slice(&rest);
        assert_eq!(s.moments, want.map(Some));
        assert!(s.is_consistent());
    }

    /// The same behind mutual TLS: the sidecar's encrypted write of the
    /// request is reported before the app's send, with another request
    /// held or none, and its plaintext before or after that send. The
    /// late request joins the write's candidates, and the plaintext
    /// settles it: never held on as if its sidecar had answered it itself.
    #[test]
    fn a_client_write_reported_after_the_sidecar_encrypted_it_is_still_one_span() {
        for (other_held, plaintext_first) in
            [(false, false), (false, true), (true, false), (true, true)]
        {
            let case = format!("other held: {other_held}, plaintext first: {plaintext_first}");
            let mut events = chain(0);
            events.extend(chain(1));
            let (mut node, _) = Node::new(&events);
            let (req, fwd) = (request("late-1"), forwarded("late-1"));
            if other_held {
                // Another request, read on the other app connection and
                // still held when the late one's write goes upstream.
                let other = plain("/other");
                node.io(11, APP, DIR_SEND, &other);
                node.io(12, OUTBOUND, DIR_RECV, &other);
            }
            let t1 = node.io(2, OUTBOUND, DIR_RECV, &req);
            let at = node.next_offset(3, DIR_SEND);
            let t2 = node.io(3, OUTBOUND, DIR_SEND, ENCRYPTED);
            if plaintext_first {
                node.plaintext(3, OUTBOUND, DIR_SEND, at, &fwd);
            }
            let _late_t0 = node.io(1, APP, DIR_SEND, &req);
            if !plaintext_first {
                node.plaintext(3, OUTBOUND, DIR_SEND, at, &fwd);
            }
            let mut rest = vec![];
            let at = node.next_offset(4, DIR_RECV);
            rest.push(node.io(4, INBOUND, DIR_RECV, ENCRYPTED));
            node.plaintext(4, INBOUND, DIR_RECV, at, &fwd);
            rest.push(node.io(5, INBOUND, DIR_SEND, &fwd));
            rest.push(node.io(6, SERVER, DIR_RECV, &fwd));
            rest.push(node.io(6, SERVER, DIR_SEND, RESPONSE));
            rest.push(node.io(5, INBOUND, DIR_RECV, RESPONSE));
            let at = node.next_offset(4, DIR_SEND);
            rest.push(node.io(4, INBOUND, DIR_SEND, ENCRYPTED));
            node.plaintext(4, INBOUND, DIR_SEND, at, RESPONSE);
            let at = node.next_offset(3, DIR_RECV);
            rest.push(node.io(3, OUTBOUND, DIR_RECV, ENCRYPTED));
            node.plaintext(3, OUTBOUND, DIR_RECV, at, RESPONSE);
            rest.push(node.io(2, OUTBOUND, DIR_SEND, RESPONSE));
            rest.push(node.io(1, APP, DIR_RECV, RESPONSE));
            let spans = std::mem::take(&mut node.spans);
            assert_eq!(spans.len(), 1, "{case}: {:?}", node.stitcher.unstitched);
            let s = &spans[0];
            assert_eq!(s.local_reply, None, "{case}");
            assert_eq!(s.request_id.as_deref(), Some("late-1"), "{case}");
            let mut want = [t1, t1, t2, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            want[3..].copy_from_slice(&rest);
            assert_eq!(s.moments, want.map(Some), "{case}");
        }
    }

    /// HTTP/2 frames a connection's send or receive carries: a frame header
    /// and payload each.
    fn h2_bytes(frames: &[(u8, u8, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, flags, stream, payload) in frames {
            let n = payload.len() as u32;
            out.extend_from_slice(&n.to_be_bytes()[1..]);
            out.extend_from_slice(&[*kind, *flags]);
            out.extend_from_slice(&stream.to_be_bytes());
            out.extend_from_slice(payload);
        }
        out
    }

    impl Node {
        /// Socket `cookie` moves HTTP/2 `frames` in `dir` (after the
        /// client's preface when `preface`): the data event, then a frame
        /// event per frame the kernel reports. Returns when.
        fn h2(
            &mut self,
            cookie: u64,
            tgid: u32,
            dir: u32,
            preface: bool,
            frames: &[(u8, u8, u32, Vec<u8>)],
        ) -> u64 {
            let mut bytes = Vec::new();
            if preface {
                bytes.extend_from_slice(mesh_trace_common::H2_PREFACE);
            }
            let start = bytes.len() as u64;
            bytes.extend_from_slice(&h2_bytes(frames));
            let at = self.next_offset(cookie, dir);
            let ts = self.io(cookie, tgid, dir, &bytes);
            let mut seq = at + start;
            for (kind, flags, stream, payload) in frames {
                let reported = matches!(kind, 1 | 3 | 7 | 9) || (*kind == 0 && flags & 1 != 0);
                if reported {
                    let captured = if *kind == 0 {
                        Vec::new()
                    } else {
                        payload.clone()
                    };
                    let f = H2Frame {
                        ts_ns: ts,
                        sock_cookie: cookie,
                        pid_tgid: u64::from(tgid) << 32 | u64::from(tgid),
                        direction: dir,
                        seq: seq as u32,
                        length: payload.len() as u32,
                        stream_id: *stream,
                        frame_type: *kind,
                        flags: *flags,
                        what: mesh_trace_common::H2_WHAT_FRAME,
                        payload: captured,
                    };
                    self.stitcher.h2_frame(&self.table, &f, &mut self.spans);
                }
                seq += 9 + payload.len() as u64;
            }
            ts
        }
    }

    /// HTTP/1.1 apps, HTTP/2 between the sidecars (Istio's upgrade): two
    /// requests multiplexed on one pooled upstream connection, answered
    /// out of order, one response's head passed on before its body's end.
    /// Each span is its own request's, its response moments its heads'.
    #[test]
    fn requests_upgraded_to_http2_between_the_sidecars_are_each_exact() {
        let mut events = chain(0);
        // A second app connection to the outbound sidecar, and a second
        // connection from the inbound sidecar to the app.
        let mut second = chain(1);
        second.retain(
            |e| !matches!(e, Event::Connect(c) if c.sock_cookie == 13 || c.sock_cookie == 14),
        );
        events.extend(second.into_iter().filter(
            |e| !matches!(e, Event::Established(s) if s.sock_cookie == 13 || s.sock_cookie == 14),
        ));
        let (mut node, _) = Node::new(&events);
        let mut enc = loona_hpack::Encoder::new();
        let mut head = |path: &str| {
            enc.encode([
                (&b":method"[..], &b"GET"[..]),
                (b":scheme", b"http"),
                (b":path", path.as_bytes()),
                (b":authority", b"reviews:9080"),
            ])
        };
        let (a, b) = (plain("/a?x=1"), plain("/b?x=2"));
        let mut t = [[0u64; 12]; 2];
        t[0][0] = node.io(1, APP, DIR_SEND, &a);
        t[1][0] = node.io(11, APP, DIR_SEND, &b);
        t[0][1] = node.io(2, OUTBOUND, DIR_RECV, &a);
        t[1][1] = node.io(12, OUTBOUND, DIR_RECV, &b);
        // Both go out on socket 3, on streams 1 and 3, in one write.
        let (ha, hb) = (head("/a?x=1"), head("/b?x=2"));
        let upstream = [(4u8, 0u8, 0u32, vec![]), (1, 0x5, 1, ha), (1, 0x5, 3, hb)];
        let w = node.h2(3, OUTBOUND, DIR_SEND, true, &upstream);
        t[0][2] = w;
        t[1][2] = w;
        let r = node.h2(4, INBOUND, DIR_RECV, true, &upstream);
        t[0][3] = r;
        t[1][3] = r;
        // The inbound sidecar delivers b first, on the second connection.
        for (i, (to, req)) in [(1usize, (15u64, &b)), (0, (5, &a))] {
            t[i][4] = node.io(to, INBOUND, DIR_SEND, req);
            t[i][5] = node.io(to + 1, SERVER, DIR_RECV, req);
        }
        let mut enc = loona_hpack::Encoder::new();
        let status = enc.encode([(&b":status"[..], &b"200"[..])]);
        for (i, (to, stream)) in [(1usize, (15u64, 3u32)), (0, (5, 1))] {
            t[i][6] = node.io(to + 1, SERVER, DIR_SEND, RESPONSE);
            t[i][7] = node.io(to, INBOUND, DIR_RECV, RESPONSE);
            let head = [(1u8, 0x4u8, stream, status.clone())];
            let body = [(0u8, 0x1u8, stream, b"ok".to_vec())];
            if i == 1 {
                // Head and body, the body ending the stream, in one write.
                let frames = [head[0].clone(), body[0].clone()];
                t[i][8] = node.h2(4, INBOUND, DIR_SEND, false, &frames);
                t[i][9] = node.h2(3, OUTBOUND, DIR_RECV, false, &frames);
                continue;
            }
            // The head alone first: the outbound sidecar passes it on to the
            // app before the body's end comes. On the HTTP/1.1 legs the
            // response's moments are its head's, and so, in this span, on
            // the HTTP/2 leg too.
            t[i][8] = node.h2(4, INBOUND, DIR_SEND, false, &head);
            t[i][9] = node.h2(3, OUTBOUND, DIR_RECV, false, &head);
        }
        for (i, down) in [(1usize, 12u64), (0, 2)] {
            t[i][10] = node.io(down, OUTBOUND, DIR_SEND, RESPONSE);
            t[i][11] = node.io(down - 1, APP, DIR_RECV, RESPONSE);
        }
        node.h2(
            4,
            INBOUND,
            DIR_SEND,
            false,
            &[(0u8, 0x1u8, 1, b"ok".to_vec())],
        );
        node.h2(
            3,
            OUTBOUND,
            DIR_RECV,
            false,
            &[(0u8, 0x1u8, 1, b"ok".to_vec())],
        );
        let spans = std::mem::take(&mut node.spans);
        assert_eq!(spans.len(), 2, "{:?}", node.stitcher.unstitched);
        for (i, path) in ["/a", "/b"].into_iter().enumerate() {
            let span = spans.iter().find(|s| s.path == path).expect("a span each");
            assert_eq!(span.moments, t[i].map(Some), "{path}");
            assert_eq!(span.status, 200);
            assert!(span.is_consistent());
        }
        assert!(
            node.stitcher.unstitched.is_empty(),
            "{:?}",
            node.stitcher.unstitched
        );
    }

    /// The kernel lost the frame boundaries of the app's HTTP/2 writes (it
    /// walks the first buffers of a vectored call only) and walks that
    /// direction no more: the requests written there from then on start no
    /// span, and each write counts one at least, never silently.
    #[test]
    fn writes_where_the_kernel_stopped_walking_frames_are_counted() {
        let (mut node, _) = Node::new(&chain(0));
        let mut enc = loona_hpack::Encoder::new();
        let head = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/lab.Reviews/Get"),
            (b":authority", b"reviews:9080"),
        ]);
        let frames = [(4u8, 0u8, 0u32, vec![]), (1, 0x4, 1, head)];
        node.h2(1, APP, DIR_SEND, true, &frames);
        assert!(node.stitcher.unstitched.is_empty());
        let lost = H2Frame {
            ts_ns: node.ts_ns,
            sock_cookie: 1,
            pid_tgid: u64::from(APP) << 32 | u64::from(APP),
            direction: DIR_SEND,
            seq: node.next_offset(1, DIR_SEND) as u32,
            length: 0,
            stream_id: 0,
            frame_type: 0,
            flags: 0,
            what: mesh_trace_common::H2_WHAT_LOST,
            payload: Vec::new(),
        };
        node.stitcher.h2_frame(&node.table, &lost, &mut node.spans);
        for _ in 0..3 {
            node.io(1, APP, DIR_SEND, &[0u8; 64]);
        }
        assert_eq!(
            node.stitcher.unstitched.get(&Unstitched::HpackLost),
            Some(&3),
            "{:?}",
            node.stitcher.unstitched
        );
        // Its reads, and other sockets, count nothing.
        node.io(1, APP, DIR_RECV, &[0u8; 16]);
        assert_eq!(
            node.stitcher.unstitched.get(&Unstitched::HpackLost),
            Some(&3)
        );
    }

    /// gRPC calls, HTTP/2 on every leg: a call's span says gRPC and carries
    /// the status from its trailers; a call whose stream the upstream
    /// resets yields no span and is counted `stream_reset`.
    #[test]
    fn grpc_calls_carry_their_status_and_a_reset_stream_is_counted() {
        let (mut node, _) = Node::new(&chain(0));
        // A new encoder per connection direction, as HPACK keeps them.
        let heads = |first: bool| {
            let mut enc = loona_hpack::Encoder::new();
            let mut h = |path: &str| {
                enc.encode([
                    (&b":method"[..], &b"POST"[..]),
                    (b":scheme", b"http"),
                    (b":path", path.as_bytes()),
                    (b":authority", b"reviews:9080"),
                    (b"content-type", b"application/grpc"),
                ])
            };
            let a = h("/lab.Reviews/Get");
            let b = h("/lab.Reviews/List");
            let mut frames = Vec::new();
            if first {
                frames.push((4u8, 0u8, 0u32, vec![]));
            }
            frames.push((1, 0x4, 1, a));
            frames.push((1, 0x4, 3, b));
            frames
        };
        let mut t = [0u64; 12];
        // Each leg: the request heads of streams 1 and 3, in one write.
        for (i, (send, recv, from, to)) in [
            (1u64, 2u64, APP, OUTBOUND),
            (3, 4, OUTBOUND, INBOUND),
            (5, 6, INBOUND, SERVER),
        ]
        .into_iter()
        .enumerate()
        {
            t[2 * i] = node.h2(send, from, DIR_SEND, true, &heads(true));
            t[2 * i + 1] = node.h2(recv, to, DIR_RECV, true, &heads(true));
        }
        // Stream 1's response on each leg back: head, message, trailers
        // with grpc-status 14 ending it.
        let response = || {
            let mut enc = loona_hpack::Encoder::new();
            let status = enc.encode([
                (&b":status"[..], &b"200"[..]),
                (b"content-type", b"application/grpc"),
            ]);
            let trailers = enc.encode([(&b"grpc-status"[..], &b"14"[..])]);
            [
                (1u8, 0x4u8, 1u32, status),
                (0, 0x0, 1, b"\0\0\0\0\0".to_vec()),
                (1, 0x5, 1, trailers),
            ]
        };
        for (i, (send, recv, from, to)) in [
            (6u64, 5u64, SERVER, INBOUND),
            (4, 3, INBOUND, OUTBOUND),
            (2, 1, OUTBOUND, APP),
        ]
        .into_iter()
        .enumerate()
        {
            t[6 + 2 * i] = node.h2(send, from, DIR_SEND, false, &response());
            t[7 + 2 * i] = node.h2(recv, to, DIR_RECV, false, &response());
        }
        // Stream 3: the server resets it.
        let reset = [(3u8, 0u8, 3u32, 8u32.to_be_bytes().to_vec())];
        node.h2(6, SERVER, DIR_SEND, false, &reset);
        node.h2(5, INBOUND, DIR_RECV, false, &reset);
        let spans = std::mem::take(&mut node.spans);
        assert_eq!(spans.len(), 1, "{spans:?} {:?}", node.stitcher.unstitched);
        let s = &spans[0];
        assert_eq!(s.path, "/lab.Reviews/Get");
        assert_eq!(s.moments, t.map(Some));
        assert_eq!(s.protocol, crate::spans::span::Protocol::Grpc);
        assert_eq!(s.grpc_status, Some(14));
        assert!(s.is_error(), "UNAVAILABLE is a server error");
        assert_eq!(
            node.stitcher.unstitched.get(&Unstitched::StreamReset),
            Some(&1),
            "{:?}",
            node.stitcher.unstitched
        );
    }

    impl Node {
        /// As [`Node::h2`], inside TLS: an encrypted record on the wire
        /// (before the frames when `record_first`, as a late plaintext
        /// event would leave it), the frames numbered by position in the
        /// session's plaintext.
        fn h2_tls(
            &mut self,
            cookie: u64,
            tgid: u32,
            dir: u32,
            preface: bool,
            frames: &[(u8, u8, u32, Vec<u8>)],
            record_first: bool,
        ) -> u64 {
            let plain_key = (cookie, dir | 0x100);
            let mut at = self.offsets.get(&plain_key).copied().unwrap_or(0);
            if preface {
                at += mesh_trace_common::H2_PREFACE.len() as u64;
            }
            self.ts_ns += 1_000;
            let ts = self.ts_ns;
            let mut events = Vec::new();
            for (kind, flags, stream, payload) in frames {
                if matches!(kind, 1 | 3 | 7 | 9) || (*kind == 0 && flags & 1 != 0) {
                    events.push(H2Frame {
                        ts_ns: ts,
                        sock_cookie: cookie,
                        pid_tgid: u64::from(tgid) << 32 | u64::from(tgid),
                        direction: dir | mesh_trace_common::H2_IN_TLS,
                        seq: at as u32,
                        length: payload.len() as u32,
                        stream_id: *stream,
                        frame_type: *kind,
                        flags: *flags,
                        what: mesh_trace_common::H2_WHAT_FRAME,
                        payload: if *kind == 0 {
                            Vec::new()
                        } else {
                            payload.clone()
                        },
                    });
                }
                at += 9 + payload.len() as u64;
            }
            self.offsets.insert(plain_key, at);
            if record_first {
                self.io(cookie, tgid, dir, ENCRYPTED);
            }
            for f in &events {
                self.stitcher.h2_frame(&self.table, f, &mut self.spans);
            }
            if !record_first {
                self.io(cookie, tgid, dir, ENCRYPTED);
            }
            ts
        }
    }

    /// HTTP/2 inside mutual TLS between the sidecars: the frames come from
    /// the sidecars' TLS calls, numbered by plaintext position (the same at
    /// both ends); the encrypted records on the wire, whether reported
    /// before or after the frames, are no requests of their own.
    #[test]
    fn http2_inside_tls_between_the_sidecars_is_exact() {
        for record_first in [false, true] {
            let mut node = Node::six_sockets();
            let mut enc = loona_hpack::Encoder::new();
            let mut status_enc = loona_hpack::Encoder::new();
            for (k, stream) in [(0u64, 1u32), (1, 3)] {
                let path = format!("/a?k={k}");
                let req = plain(&path);
                let mut t = [0u64; 12];
                t[0] = node.io(1, APP, DIR_SEND, &req);
                t[1] = node.io(2, OUTBOUND, DIR_RECV, &req);
                let head = enc.encode([
                    (&b":method"[..], &b"GET"[..]),
                    (b":scheme", b"https"),
                    (b":path", path.as_bytes()),
                    (b":authority", b"reviews:9080"),
                ]);
                let mut up = vec![(1u8, 0x5u8, stream, head)];
                if k == 0 {
                    up.insert(0, (4, 0, 0, vec![]));
                }
                t[2] = node.h2_tls(3, OUTBOUND, DIR_SEND, k == 0, &up, record_first);
                t[3] = node.h2_tls(4, INBOUND, DIR_RECV, k == 0, &up, record_first);
                t[4] = node.io(5, INBOUND, DIR_SEND, &req);
                t[5] = node.io(6, SERVER, DIR_RECV, &req);
                t[6] = node.io(6, SERVER, DIR_SEND, RESPONSE);
                t[7] = node.io(5, INBOUND, DIR_RECV, RESPONSE);
                let status = status_enc.encode([(&b":status"[..], &b"200"[..])]);
                let mut down = vec![
                    (1u8, 0x4u8, stream, status),
                    (0, 0x1, stream, b"ok".to_vec()),
                ];
                if k == 0 {
                    down.insert(0, (4, 0, 0, vec![]));
                }
                t[8] = node.h2_tls(4, INBOUND, DIR_SEND, false, &down, record_first);
                t[9] = node.h2_tls(3, OUTBOUND, DIR_RECV, false, &down, record_first);
                t[10] = node.io(2, OUTBOUND, DIR_SEND, RESPONSE);
                t[11] = node.io(1, APP, DIR_RECV, RESPONSE);
                let spans = std::mem::take(&mut node.spans);
                let case = format!("record first: {record_first}, request {k}");
                assert_eq!(spans.len(), 1, "{case}: {:?}", node.stitcher.unstitched);
                assert_eq!(spans[0].moments, t.map(Some), "{case}");
                assert_eq!(spans[0].local_reply, None, "{case}");
            }
            assert!(
                node.stitcher.unstitched.is_empty(),
                "record first: {record_first}: {:?}",
                node.stitcher.unstitched
            );
        }
    }

    #[test]
    fn a_local_reply_is_a_span_of_its_own_and_leaves_nothing_to_match() {
        let mut node = Node::six_sockets();
        let req = plain("/reviews/0");
        let t = [
            node.io(1, APP, DIR_SEND, &req),
            node.io(2, OUTBOUND, DIR_RECV, &req),
            node.io(2, OUTBOUND, DIR_SEND, NOT_FOUND),
            node.io(1, APP, DIR_RECV, NOT_FOUND),
        ];
        let spans = std::mem::take(&mut node.spans);
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(s.local_reply, Some(LocalReply::Outbound));
        assert_eq!(s.status, 404);
        assert_eq!(
            s.hop_ns(crate::spans::span::Hop::OutboundProxy),
            Some(t[2] - t[1])
        );
        assert_eq!(s.total_ns(), Some(t[3] - t[0]));
        // The next request, identical, is forwarded: it must not take the
        // answered one's place.
        let t = one_request(&mut node, "after", false);
        let spans = std::mem::take(&mut node.spans);
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].moments, t.map(Some));
        assert_eq!(spans[0].local_reply, None);
        assert!(
            node.stitcher.unstitched.is_empty(),
            "{:?}",
            node.stitcher.unstitched
        );
    }

    #[test]
    fn identical_requests_the_sidecar_holds_together_are_counted_ambiguous() {
        let mut node = Node::two_chains();
        let req = plain("/reviews/0");
        // Both apps' requests are read before either goes upstream.
        node.io(1, APP, DIR_SEND, &req);
        node.io(11, APP, DIR_SEND, &req);
        node.io(2, OUTBOUND, DIR_RECV, &req);
        node.io(12, OUTBOUND, DIR_RECV, &req);
        for (up, id) in [(3, "x"), (13, "y")] {
            let fwd = plain_forwarded("/reviews/0", id);
            node.io(up, OUTBOUND, DIR_SEND, &fwd);
            node.io(up + 1, INBOUND, DIR_RECV, &fwd);
            node.io(up + 2, INBOUND, DIR_SEND, &fwd);
            node.io(up + 3, SERVER, DIR_RECV, &fwd);
            node.io(up + 3, SERVER, DIR_SEND, RESPONSE);
            node.io(up + 2, INBOUND, DIR_RECV, RESPONSE);
            node.io(up + 1, INBOUND, DIR_SEND, RESPONSE);
            node.io(up, OUTBOUND, DIR_RECV, RESPONSE);
        }
        for down in [2, 12] {
            node.io(down, OUTBOUND, DIR_SEND, RESPONSE);
            node.io(down - 1, APP, DIR_RECV, RESPONSE);
        }
        assert!(node.spans.is_empty(), "{:?}", node.spans);
        assert_eq!(
            node.stitcher.unstitched.get(&Unstitched::Ambiguous),
            Some(&2)
        );
        // Nothing is left behind: the orphan of the unattributed write
        // ended with its response.
        assert_eq!(node.stitcher.pending(), 0);
    }

    /// The same two identical requests, but the app behind answers the
    /// first write upstream before the second: the first response written
    /// downstream can only be that write's (a response goes downstream
    /// after it was read upstream, with its status), so both requests are
    /// exact, each with its own write's moments. A response written before
    /// any upstream answer of its status proves nothing.
    #[test]
    fn identical_requests_are_told_apart_by_which_answer_came_back_first() {
        for (first_down, statuses) in [(2u64, [200, 200]), (12, [503, 200])] {
            let mut node = Node::two_chains();
            let req = plain("/reviews/0");
            let mut t = [[0u64; 12]; 2];
            let mut ids = [""; 2];
            t[0][0] = node.io(1, APP, DIR_SEND, &req);
            t[1][0] = node.io(11, APP, DIR_SEND, &req);
            t[0][1] = node.io(2, OUTBOUND, DIR_RECV, &req);
            t[1][1] = node.io(12, OUTBOUND, DIR_RECV, &req);
            // Upstream write k carries the request read on downstream
            // socket `first_down` for k = 0.
            let chain = |k: usize| usize::from((k == 0) != (first_down == 2));
            for (k, (up, id)) in [(3u64, "x"), (13, "y")].into_iter().enumerate() {
                let fwd = plain_forwarded("/reviews/0", id);
                let c = chain(k);
                ids[c] = id;
                t[c][2] = node.io(up, OUTBOUND, DIR_SEND, &fwd);
                t[c][3] = node.io(up + 1, INBOUND, DIR_RECV, &fwd);
                t[c][4] = node.io(up + 2, INBOUND, DIR_SEND, &fwd);
                t[c][5] = node.io(up + 3, SERVER, DIR_RECV, &fwd);
            }
            for (k, up) in [3u64, 13].into_iter().enumerate() {
                let c = chain(k);
                let status = statuses[k];
                let resp = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
                let resp = resp.as_bytes();
                t[c][6] = node.io(up + 3, SERVER, DIR_SEND, resp);
                t[c][7] = node.io(up + 2, INBOUND, DIR_RECV, resp);
                t[c][8] = node.io(up + 1, INBOUND, DIR_SEND, resp);
                t[c][9] = node.io(up, OUTBOUND, DIR_RECV, resp);
                let down = if c == 0 { 2 } else { 12 };
                t[c][10] = node.io(down, OUTBOUND, DIR_SEND, resp);
                t[c][11] = node.io(down - 1, APP, DIR_RECV, resp);
            }
            let case = format!("first answered downstream on {first_down}");
            let mut spans = std::mem::take(&mut node.spans);
            spans.sort_by_key(|s| s.moments[0]);
            assert_eq!(spans.len(), 2, "{case}: {:?}", node.stitcher.unstitched);
            for c in 0..2 {
                assert_eq!(spans[c].moments, t[c].map(Some), "{case}, request {c}");
                assert_eq!(spans[c].local_reply, None, "{case}");
                // The id the sidecar added upstream names the span.
                assert_eq!(spans[c].request_id.as_deref(), Some(ids[c]), "{case}");
            }
            assert!(
                node.stitcher.unstitched.is_empty(),
                "{case}: {:?}",
                node.stitcher.unstitched
            );
        }
        // One write upstream: the request answered downstream with a status
        // it was not answered with is not its (a local reply); the other,
        // answered with its status after it, is.
        let mut node = Node::two_chains();
        let req = plain("/reviews/0");
        let mut t = [0u64; 12];
        t[0] = node.io(1, APP, DIR_SEND, &req);
        node.io(11, APP, DIR_SEND, &req);
        t[1] = node.io(2, OUTBOUND, DIR_RECV, &req);
        node.io(12, OUTBOUND, DIR_RECV, &req);
        let fwd = plain_forwarded("/reviews/0", "x");
        t[2] = node.io(3, OUTBOUND, DIR_SEND, &fwd);
        t[3] = node.io(4, INBOUND, DIR_RECV, &fwd);
        t[4] = node.io(5, INBOUND, DIR_SEND, &fwd);
        t[5] = node.io(6, SERVER, DIR_RECV, &fwd);
        t[6] = node.io(6, SERVER, DIR_SEND, RESPONSE);
        t[7] = node.io(5, INBOUND, DIR_RECV, RESPONSE);
        t[8] = node.io(4, INBOUND, DIR_SEND, RESPONSE);
        t[9] = node.io(3, OUTBOUND, DIR_RECV, RESPONSE);
        node.io(12, OUTBOUND, DIR_SEND, NOT_FOUND);
        node.io(11, APP, DIR_RECV, NOT_FOUND);
        t[10] = node.io(2, OUTBOUND, DIR_SEND, RESPONSE);
        t[11] = node.io(1, APP, DIR_RECV, RESPONSE);
        assert_eq!(node.spans.len(), 1, "{:?}", node.spans);
        assert_eq!(node.spans[0].moments, t.map(Some));
        // The local reply could have been the write until its status said
        // otherwise: counted, not exported.
        assert_eq!(
            node.stitcher.unstitched.get(&Unstitched::Ambiguous),
            Some(&1)
        );
    }

    /// What the response rule must not conclude from: a request still
    /// held (the sidecar may have answered it itself with the status the
    /// one write got), and writes among which one is a retry of another
    /// (the same id added upstream: one request written twice).
    #[test]
    fn a_response_proves_nothing_for_a_request_that_may_be_a_local_reply_or_a_retry() {
        let upstream = |node: &mut Node, up: u64, fwd: &[u8], resp: &[u8]| {
            node.io(up, OUTBOUND, DIR_SEND, fwd);
            node.io(up + 1, INBOUND, DIR_RECV, fwd);
            node.io(up + 2, INBOUND, DIR_SEND, fwd);
            node.io(up + 3, SERVER, DIR_RECV, fwd);
            node.io(up + 3, SERVER, DIR_SEND, resp);
            node.io(up + 2, INBOUND, DIR_RECV, resp);
            node.io(up + 1, INBOUND, DIR_SEND, resp);
            node.io(up, OUTBOUND, DIR_RECV, resp);
        };
        let unavailable = b"HTTP/1.1 503 X\r\ncontent-length: 2\r\n\r\nno";
        for retry in [false, true] {
            let mut node = Node::two_chains();
            let req = plain("/reviews/0");
            node.io(1, APP, DIR_SEND, &req);
            node.io(11, APP, DIR_SEND, &req);
            node.io(2, OUTBOUND, DIR_RECV, &req);
            node.io(12, OUTBOUND, DIR_RECV, &req);
            if retry {
                // One id, written twice (the first answered 503): two
                // writes for two held requests, yet one request.
                upstream(
                    &mut node,
                    3,
                    &plain_forwarded("/reviews/0", "x"),
                    unavailable,
                );
                upstream(&mut node, 13, &plain_forwarded("/reviews/0", "x"), RESPONSE);
            } else {
                // One write for two held requests: the other may be
                // answered by the sidecar itself.
                upstream(&mut node, 3, &plain_forwarded("/reviews/0", "x"), RESPONSE);
            }
            node.io(2, OUTBOUND, DIR_SEND, RESPONSE);
            node.io(1, APP, DIR_RECV, RESPONSE);
            assert!(node.spans.is_empty(), "retry {retry}: {:?}", node.spans);
            assert_eq!(
                node.stitcher.unstitched.get(&Unstitched::Ambiguous),
                Some(&1),
                "retry {retry}"
            );
        }
    }

    #[test]
    fn distinct_requests_forwarded_out_of_order_are_each_exact() {
        let mut node = Node::two_chains();
        let (a, b) = (plain("/reviews/0?u=1"), plain("/reviews/0?u=2"));
        let mut t = [[0u64; 12]; 2];
        t[0][0] = node.io(1, APP, DIR_SEND, &a);
        t[1][0] = node.io(11, APP, DIR_SEND, &b);
        t[0][1] = node.io(2, OUTBOUND, DIR_RECV, &a);
        t[1][1] = node.io(12, OUTBOUND, DIR_RECV, &b);
        // b goes first, on the first pooled connection.
        for (i, up, target) in [(1, 3, "/reviews/0?u=2"), (0, 13, "/reviews/0?u=1")] {
            let fwd = plain_forwarded(target, "id");
            t[i][2] = node.io(up, OUTBOUND, DIR_SEND, &fwd);
            t[i][3] = node.io(up + 1, INBOUND, DIR_RECV, &fwd);
            t[i][4] = node.io(up + 2, INBOUND, DIR_SEND, &fwd);
            t[i][5] = node.io(up + 3, SERVER, DIR_RECV, &fwd);
            t[i][6] = node.io(up + 3, SERVER, DIR_SEND, RESPONSE);
            t[i][7] = node.io(up + 2, INBOUND, DIR_RECV, RESPONSE);
            t[i][8] = node.io(up + 1, INBOUND, DIR_SEND, RESPONSE);
            t[i][9] = node.io(up, OUTBOUND, DIR_RECV, RESPONSE);
        }
        for (i, down) in [(0, 2), (1, 12)] {
            t[i][10] = node.io(down, OUTBOUND, DIR_SEND, RESPONSE);
            t[i][11] = node.io(down - 1, APP, DIR_RECV, RESPONSE);
        }
        let spans = std::mem::take(&mut node.spans);
        assert_eq!(spans.len(), 2, "{:?}", node.stitcher.unstitched);
        assert_eq!(spans[0].moments, t[0].map(Some));
        assert_eq!(spans[1].moments, t[1].map(Some));
    }

    #[test]
    fn encrypted_writes_the_sidecar_could_not_tell_apart_are_settled_by_the_inbound_plaintext() {
        let mut node = Node::two_chains();
        let (a, b) = (request("id-a"), request("id-b"));
        let mut t = [[0u64; 12]; 2];
        // Both held by the outbound sidecar before either goes upstream,
        // encrypted (mutual TLS): the writes alone cannot say which is which.
        t[0][0] = node.io(1, APP, DIR_SEND, &a);
        t[1][0] = node.io(11, APP, DIR_SEND, &b);
        t[0][1] = node.io(2, OUTBOUND, DIR_RECV, &a);
        t[1][1] = node.io(12, OUTBOUND, DIR_RECV, &b);
        // b leaves first, on the first pooled connection; a on the second.
        t[1][2] = node.io(3, OUTBOUND, DIR_SEND, ENCRYPTED);
        t[0][2] = node.io(13, OUTBOUND, DIR_SEND, ENCRYPTED);
        for (i, up, id) in [(1, 3, "id-b"), (0, 13, "id-a")] {
            let fwd = forwarded(id);
            t[i][3] = node.io(up + 1, INBOUND, DIR_RECV, ENCRYPTED);
            // The inbound sidecar's plaintext names the request.
            t[i][4] = node.io(up + 2, INBOUND, DIR_SEND, &fwd);
            t[i][5] = node.io(up + 3, SERVER, DIR_RECV, &fwd);
            t[i][6] = node.io(up + 3, SERVER, DIR_SEND, RESPONSE);
            t[i][7] = node.io(up + 2, INBOUND, DIR_RECV, RESPONSE);
            t[i][8] = node.io(up + 1, INBOUND, DIR_SEND, ENCRYPTED);
            t[i][9] = node.io(up, OUTBOUND, DIR_RECV, ENCRYPTED);
        }
        for (i, down) in [(0, 2), (1, 12)] {
            t[i][10] = node.io(down, OUTBOUND, DIR_SEND, RESPONSE);
            t[i][11] = node.io(down - 1, APP, DIR_RECV, RESPONSE);
        }
        let spans = std::mem::take(&mut node.spans);
        assert_eq!(spans.len(), 2, "{:?}", node.stitcher.unstitched);
        let by_id = |id: &str| {
            spans
                .iter()
                .find(|s| s.request_id.as_deref() == Some(id))
                .unwrap()
        };
        assert_eq!(by_id("id-a").moments, t[0].map(Some));
        assert_eq!(by_id("id-b").moments, t[1].map(Some));
        assert!(
            node.stitcher.unstitched.is_empty(),
            "{:?}",
            node.stitcher.unstitched
        );
        assert_eq!(node.stitcher.pending(), 0);
    }

    #[test]
    fn a_lost_upstream_write_costs_only_the_requests_it_may_have_been() {
        let mut node = Node::six_sockets();
        // Request A: read by the outbound sidecar, forwarded, but the
        // kernel's event for that write was lost.
        let a = plain("/reviews/0?u=1");
        node.io(1, APP, DIR_SEND, &a);
        node.io(2, OUTBOUND, DIR_RECV, &a);
        let fwd_a = plain_forwarded("/reviews/0?u=1", "a");
        *node.offsets.entry((3, DIR_SEND)).or_default() += fwd_a.len() as u64;
        node.io(4, INBOUND, DIR_RECV, &fwd_a);
        node.io(5, INBOUND, DIR_SEND, &fwd_a);
        node.io(6, SERVER, DIR_RECV, &fwd_a);
        node.io(6, SERVER, DIR_SEND, RESPONSE);
        node.io(5, INBOUND, DIR_RECV, RESPONSE);
        node.io(4, INBOUND, DIR_SEND, RESPONSE);
        node.io(3, OUTBOUND, DIR_RECV, RESPONSE);
        // Without the write, A still looks held; the response upstream to
        // no request seen says otherwise, so A's response downstream does
        // not pass for a local reply.
        node.io(2, OUTBOUND, DIR_SEND, RESPONSE);
        node.io(1, APP, DIR_RECV, RESPONSE);
        // B after it on the same connections: the sequence numbers show the
        // gap at its write, and B itself is exact.
        let t = one_request(&mut node, "b", false);
        let spans = std::mem::take(&mut node.spans);
        assert_eq!(spans.len(), 1, "{spans:?}");
        assert_eq!(spans[0].moments, t.map(Some));
        assert_eq!(spans[0].local_reply, None);
        let count = |why| node.stitcher.unstitched.get(&why).copied().unwrap_or(0);
        assert_eq!(
            count(Unstitched::LostEvent) + count(Unstitched::Ambiguous),
            1
        );
    }

    #[test]
    fn ring_buffer_loss_withholds_the_requests_in_flight_only() {
        let mut node = Node::six_sockets();
        let req = request("in-flight");
        node.io(1, APP, DIR_SEND, &req);
        node.stitcher.events_lost(node.ts_ns);
        node.io(2, OUTBOUND, DIR_RECV, &req);
        for (cookie, tgid, dir, bytes) in [
            (3, OUTBOUND, DIR_SEND, forwarded("in-flight")),
            (4, INBOUND, DIR_RECV, forwarded("in-flight")),
            (5, INBOUND, DIR_SEND, forwarded("in-flight")),
            (6, SERVER, DIR_RECV, forwarded("in-flight")),
            (6, SERVER, DIR_SEND, RESPONSE.to_vec()),
            (5, INBOUND, DIR_RECV, RESPONSE.to_vec()),
            (4, INBOUND, DIR_SEND, RESPONSE.to_vec()),
            (3, OUTBOUND, DIR_RECV, RESPONSE.to_vec()),
            (2, OUTBOUND, DIR_SEND, RESPONSE.to_vec()),
            (1, APP, DIR_RECV, RESPONSE.to_vec()),
        ] {
            node.io(cookie, tgid, dir, &bytes);
        }
        assert!(node.spans.is_empty());
        assert_eq!(
            node.stitcher.unstitched.get(&Unstitched::LostEvent),
            Some(&1)
        );
        // The next request started after the loss: exact.
        let t = one_request(&mut node, "next", false);
        assert_eq!(node.spans.len(), 1);
        assert_eq!(node.spans[0].moments, t.map(Some));
    }

    #[test]
    fn a_loss_learnt_before_the_events_around_it_are_read_withholds_their_requests() {
        let mut node = Node::six_sockets();
        // The agent learns of a loss, then reads the events stamped before
        // it: the sidecar read a request, its forward upstream (and all
        // that followed) was lost, and it wrote the answer downstream. That
        // is no local reply.
        node.stitcher.events_lost(node.ts_ns + 10_000_000);
        let req = request("forward-lost");
        node.io(1, APP, DIR_SEND, &req);
        node.io(2, OUTBOUND, DIR_RECV, &req);
        node.io(2, OUTBOUND, DIR_SEND, RESPONSE);
        node.io(1, APP, DIR_RECV, RESPONSE);
        assert!(node.spans.is_empty(), "{:?}", node.spans);
        assert_eq!(
            node.stitcher.unstitched.get(&Unstitched::LostEvent),
            Some(&1)
        );
        // Requests begun after the loss are exact again.
        node.ts_ns += 10_000_000;
        let t = one_request(&mut node, "next", false);
        assert_eq!(node.spans.len(), 1);
        assert_eq!(node.spans[0].moments, t.map(Some));
    }

    #[test]
    fn a_request_that_timed_out_in_a_sidecar_never_stands_beside_a_new_one() {
        let mut node = Node::six_sockets();
        let req = plain("/healthz");
        // Read by the outbound sidecar, then nothing: its answer was never
        // seen, and the request times out.
        node.io(1, APP, DIR_SEND, &req);
        node.io(2, OUTBOUND, DIR_RECV, &req);
        node.stitcher
            .expire(node.ts_ns + StitchConfig::default().timeout_ns);
        assert_eq!(node.stitcher.unstitched.get(&Unstitched::Timeout), Some(&1));
        // The same request again is matched: nothing stale beside it.
        node.io(1, APP, DIR_SEND, &req);
        node.io(2, OUTBOUND, DIR_RECV, &req);
        node.io(3, OUTBOUND, DIR_SEND, &plain_forwarded("/healthz", "h"));
        // Matched to the new request: no orphan was needed for the write.
        assert_eq!(node.stitcher.pending(), 1);
        assert_eq!(
            node.stitcher.unstitched.get(&Unstitched::NoDownstream),
            None
        );
    }

    #[test]
    fn data_on_a_socket_the_table_does_not_know_is_counted() {
        let mut node = Node::six_sockets();
        node.io(99, APP, DIR_SEND, &request("u"));
        node.io(99, APP, DIR_SEND, b"\x00binary");
        assert_eq!(
            node.stitcher.unstitched.get(&Unstitched::UnknownSocket),
            Some(&1)
        );
    }

    #[test]
    fn every_reason_has_its_own_label() {
        let labels: std::collections::HashSet<_> =
            Unstitched::ALL.iter().map(|u| u.label()).collect();
        assert_eq!(labels.len(), Unstitched::ALL.len());
        assert_eq!(Unstitched::NoDownstream.label(), "no_downstream");
    }
}
