//! The lab's I/O clock: when a connection's reads and writes return.
//!
//! mesh-trace stamps a request where the kernel sees it, at the read and
//! write system calls. Stamps taken in a handler or around
//! `client.request()` miss those moments by hyper's parsing and tokio's
//! wake-ups (a few hundred microseconds each way), so the lab's records take
//! their times from here instead: [`Clocked`] wraps a connection's byte
//! stream (a TCP socket, under TLS if any, so the times are the socket's)
//! and notes `mono_ns()` whenever a read returns data or a write accepts
//! some (when its work in the kernel ended: see [`Clocked`]; for a TCP
//! socket, when the kernel stamped its last byte's packet as it left, see
//! [`super::txstamp`]), in an [`IoClock`] shared with whoever writes the
//! record.
//!
//! - Servers (apps, the sidecars' downstream side) wrap each accepted
//!   socket. A request was read by the last read before its handler ran
//!   ([`IoClock::last_read_until`]); its response was written by the first
//!   write after the handler returned ([`IoClock::wait_write_from`]).
//! - Clients (the sidecars' upstream side, the load generator) build their
//!   pooled client on [`ClockConnector`], which wraps each new connection;
//!   every response carries its connection's clock ([`ConnectionClock`]),
//!   and [`IoClock::exchange_from`] finds the request's write and the
//!   response's read. HTTP/1.1 sends one request at a time on a connection,
//!   so the first write after the request was handed to the client is
//!   its own.
//! - HTTP/2 servers: a read or a write carries frames of many streams, so
//!   the clock follows the frames ([`H2Frames`]): the read that brought
//!   each request's HEADERS frame (its frame header), in the order they came (hyper hands the
//!   requests to the service in that order: [`IoClock::next_h2_request`]),
//!   and the write that carried each stream's last frame
//!   ([`IoClock::wait_h2_end`]).
//! - HTTP/2 clients (a sidecar's upstream side): the write that carried each
//!   stream's HEADERS frame, whose block is decoded to tell which request it
//!   was ([`RequestKey`]), and the read that carried its response's last
//!   frame ([`IoClock::h2_exchange`]).
use std::{
    collections::VecDeque,
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use hyper::Uri;
use hyper_util::{
    client::legacy::connect::{Connected, Connection},
    rt::TokioIo,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};

use serde::{Deserialize, Serialize};

use super::{
    records::{mono_ns, RecordWriter},
    txstamp::TxStamps,
};

/// Reads and writes remembered per connection. A lookup happens while its
/// request is the connection's latest (or next to latest), a handful of
/// calls back: this is plenty, and bounds a long-lived connection's memory.
const KEPT: usize = 64;

/// How long a server's record waits for its response to reach the socket
/// before it falls back to the moment the handler returned.
pub const WRITE_WAIT: Duration = Duration::from_secs(1);

/// How far a transmit stamp may follow its call's return and still be
/// taken inside it: the clocks' conversion is good to a few microseconds.
const TX_SLACK_NS: u64 = 50_000;

/// When one connection's reads and writes ended, CLOCK_MONOTONIC ns.
#[derive(Debug, Default)]
pub struct IoClock {
    times: Mutex<Times>,
    /// Woken on every write and at close, for [`IoClock::wait_write_from`].
    wrote: Notify,
}

#[derive(Debug, Default)]
struct Times {
    /// Oldest first, at most [`KEPT`].
    reads: VecDeque<Read>,
    writes: VecDeque<u64>,
    /// Client side: when the connector handed the connection over, so a
    /// TLS handshake's reads and writes are not taken for a request's.
    ready_ns: u64,
    /// The stream was dropped: no more writes will come.
    closed: bool,
    /// HTTP/2 frames, on a server connection that began with the preface.
    h2: H2Frames,
}

/// One read that returned data.
#[derive(Debug, Clone, Copy)]
struct Read {
    returned: u64,
    entered: u64,
    /// It returned exactly a TLS application-data record's header: its
    /// body is the next read.
    tls_header: bool,
}

/// The client preface that begins an HTTP/2 connection.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request heads and stream ends kept per HTTP/2 connection: many more
/// than the streams a peer keeps in flight.
const H2_KEPT: usize = 1024;

/// The largest HPACK table a client's header blocks may use: hyper's
/// encoder keeps to the peer's SETTINGS, 4 KiB unless raised.
const HPACK_TABLE: usize = 64 * 1024;

/// A connection's HTTP/2 frames as they were read and written. The preface
/// tells a server's connection (read first) from a client's (written
/// first); every frame after it is followed, in both directions.
#[derive(Debug, Default)]
struct H2Frames {
    read_preface: Preface,
    write_preface: Preface,
    reads: FrameCursor,
    writes: FrameCursor,
    server: ServerStreams,
    client: ClientStreams,
}

/// Looking for the preface at a byte stream's start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Preface {
    /// None of the stream seen yet.
    #[default]
    Looking,
    /// This many of its bytes seen so far.
    Partly(usize),
    Found,
    Absent,
}

impl Preface {
    /// Takes the preface's bytes off the front of `bytes`: what is left
    /// is frames (or, when the preface is absent, whatever the stream is).
    fn strip<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let seen = match *self {
            Preface::Found | Preface::Absent => return bytes,
            Preface::Looking => 0,
            Preface::Partly(n) => n,
        };
        let n = (PREFACE.len() - seen).min(bytes.len());
        if bytes[..n] != PREFACE[seen..seen + n] {
            *self = Preface::Absent;
            return bytes;
        }
        *self = if seen + n == PREFACE.len() {
            Preface::Found
        } else {
            Preface::Partly(seen + n)
        };
        &bytes[n..]
    }
}

/// A server connection: requests read, responses written.
#[derive(Debug, Default)]
struct ServerStreams {
    /// Requests' HEADERS frames, in arrival order: (stream, read ns).
    heads: StreamMoments,
    /// Streams the peer opened so far (the highest id).
    last_opened: u32,
    /// Frames that ended a stream on the way out: (stream, write ns).
    ends: StreamMoments,
    /// Responses' heads (each stream's first HEADERS frame out).
    answers: StreamMoments,
}

impl ServerStreams {
    fn wrote_frame(&mut self, f: FrameHead, t: u64) {
        if f.ty == FRAME_HEADERS {
            note_first(&mut self.answers, f.stream, t);
        }
        if ends_stream(f) {
            push_bounded(&mut self.ends, (f.stream, t));
        }
    }
}

/// A client connection: requests written, responses read. Which request a
/// stream carries is read from its header block (HPACK-decoded as it is
/// written, every block in order, as the peer decodes them).
#[derive(Debug, Default)]
struct ClientStreams {
    /// Streams opened, oldest first, at most [`H2_KEPT`].
    sent: VecDeque<SentStream>,
    last_opened: u32,
    /// The header block being written: its stream and bytes so far.
    block: Option<(u32, Vec<u8>)>,
    /// The payload of the frame being written, when it carries a block.
    frame: Vec<u8>,
    frame_type: u8,
    frame_flags: u8,
    hpack: Option<Hpack>,
    /// A block could not be decoded: the table is lost for good.
    lost: bool,
    /// Responses' heads (each stream's first HEADERS frame in): (stream,
    /// read ns).
    answers: StreamMoments,
    /// Frames that ended a stream on the way in: (stream, read ns).
    ends: StreamMoments,
}

struct Hpack(loona_hpack::Decoder<'static>);

impl std::fmt::Debug for Hpack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hpack")
    }
}

#[derive(Debug)]
struct SentStream {
    stream: u32,
    /// The write that carried its HEADERS frame's header.
    head_ns: u64,
    key: Option<RequestKey>,
}

/// What names a request on a client connection: its path and the header
/// lines a sidecar sets on each attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestKey {
    pub path: String,
    pub request_id: Option<String>,
    pub attempt: Option<String>,
}

impl RequestKey {
    fn note(&mut self, name: &[u8], value: &[u8]) {
        let value = || Some(String::from_utf8_lossy(value).into_owned());
        match name {
            b":path" => self.path = value().unwrap_or_default(),
            b"x-request-id" => self.request_id = value(),
            b"x-envoy-attempt-count" => self.attempt = value(),
            _ => {}
        }
    }
}

/// Where a byte stream is among its frames.
#[derive(Debug, Default)]
struct FrameCursor {
    header: [u8; 9],
    /// Bytes of `header` filled.
    have: usize,
    /// Payload bytes left to pass over.
    skip: usize,
}

/// A frame's header.
#[derive(Clone, Copy, Debug)]
struct FrameHead {
    stream: u32,
    ty: u8,
    flags: u8,
}

/// What feeding bytes to a [`FrameCursor`] finds.
enum Framing<'a> {
    /// A frame header completed.
    Head(FrameHead),
    /// A piece of the current frame's payload, and whether it was the last
    /// (an empty last one for an empty payload).
    Payload(&'a [u8], bool),
}

impl FrameCursor {
    /// Feeds `bytes`, calling `found` with what they complete.
    fn feed<'a>(&mut self, mut bytes: &'a [u8], mut found: impl FnMut(Framing<'a>)) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                found(Framing::Payload(&bytes[..n], self.skip == 0));
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                let h = self.header;
                self.have = 0;
                self.skip = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                found(Framing::Head(FrameHead {
                    stream,
                    ty: h[3],
                    flags: h[4],
                }));
                if self.skip == 0 {
                    found(Framing::Payload(&[], true));
                }
            }
        }
    }
}

const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_CONTINUATION: u8 = 9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;

/// Moments per stream, oldest first.
type StreamMoments = VecDeque<(u32, u64)>;

/// `stream`'s moment in `q`.
fn moment_of(q: &StreamMoments, stream: u32) -> Option<u64> {
    q.iter().find(|(s, _)| *s == stream).map(|&(_, t)| t)
}

/// Keeps `t` as `stream`'s moment unless it has one (its first frame of a
/// kind is the one that counts).
fn note_first(q: &mut StreamMoments, stream: u32, t: u64) {
    if moment_of(q, stream).is_none() {
        push_bounded(q, (stream, t));
    }
}

fn push_bounded<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() == H2_KEPT {
        q.pop_front();
    }
    q.push_back(item);
}

fn ends_stream(f: FrameHead) -> bool {
    (f.ty == FRAME_DATA || f.ty == FRAME_HEADERS) && f.flags & FLAG_END_STREAM != 0
}

impl H2Frames {
    fn read(&mut self, t: u64, bytes: &[u8]) {
        let bytes = self.read_preface.strip(bytes);
        let server = self.read_preface == Preface::Found;
        let client = self.write_preface == Preface::Found;
        if !server && !client {
            return;
        }
        let (s, c) = (&mut self.server, &mut self.client);
        self.reads.feed(bytes, |found| {
            let Framing::Head(f) = found else {
                return;
            };
            // A HEADERS frame on a stream newer than any opened is a
            // request's head (later ones on it are its trailers).
            if server && f.ty == FRAME_HEADERS && f.stream > s.last_opened {
                s.last_opened = f.stream;
                push_bounded(&mut s.heads, (f.stream, t));
            }
            if client && f.ty == FRAME_HEADERS {
                note_first(&mut c.answers, f.stream, t);
            }
            if client && ends_stream(f) {
                push_bounded(&mut c.ends, (f.stream, t));
            }
        });
    }

    fn wrote(&mut self, t: u64, bytes: &[u8]) {
        let bytes = self.write_preface.strip(bytes);
        // A server writes its SETTINGS before it has read the preface, so
        // its frames are followed from its first write, until its reads
        // turn out not to begin with the preface (HTTP/1.1).
        let client = match (self.write_preface, self.read_preface) {
            (Preface::Found, _) => true,
            (Preface::Absent, Preface::Absent) => return,
            (Preface::Absent, _) => false,
            _ => return,
        };
        let (s, c) = (&mut self.server, &mut self.client);
        self.writes.feed(bytes, |found| match found {
            Framing::Head(f) if client => c.begin_frame(f, t),
            Framing::Head(f) => s.wrote_frame(f, t),
            Framing::Payload(chunk, last) if client => c.frame_payload(chunk, last),
            _ => {}
        });
    }
}

impl ClientStreams {
    fn begin_frame(&mut self, f: FrameHead, t: u64) {
        self.frame.clear();
        self.frame_type = f.ty;
        self.frame_flags = f.flags;
        if f.ty == FRAME_HEADERS && f.stream > self.last_opened {
            self.last_opened = f.stream;
            let sent = SentStream {
                stream: f.stream,
                head_ns: t,
                key: None,
            };
            push_bounded(&mut self.sent, sent);
        }
        if f.ty == FRAME_HEADERS {
            self.block = Some((f.stream, Vec::new()));
        }
    }

    /// Gathers header blocks; decodes each when its last frame is whole.
    fn frame_payload(&mut self, chunk: &[u8], last: bool) {
        if !matches!(self.frame_type, FRAME_HEADERS | FRAME_CONTINUATION) || self.block.is_none() {
            return;
        }
        self.frame.extend_from_slice(chunk);
        if !last {
            return;
        }
        let Some(fragment) =
            crate::spans::h2::fragment(self.frame_type, self.frame_flags, &self.frame)
        else {
            self.lost = true;
            return;
        };
        let Some((stream, block)) = self.block.as_mut() else {
            return;
        };
        block.extend_from_slice(fragment);
        if self.frame_flags & FLAG_END_HEADERS == 0 {
            return;
        }
        let (stream, block) = (*stream, std::mem::take(block));
        self.block = None;
        let Hpack(hpack) = self.hpack.get_or_insert_with(|| {
            let mut d = loona_hpack::Decoder::new();
            d.set_max_allowed_table_size(HPACK_TABLE);
            Hpack(d)
        });
        let mut key = RequestKey::default();
        let decoded = hpack.decode_with_cb(&block, |name, value| key.note(&name, &value));
        if decoded.is_err() {
            self.lost = true;
            return;
        }
        // The stream's first block is its request head; a later one its trailers.
        if let Some(sent) = self.sent.iter_mut().rev().find(|s| s.stream == stream) {
            sent.key.get_or_insert(key);
        }
    }
}

/// A request's exchange on a client connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// The first write of the request returned.
    pub write_ns: u64,
    /// The first read after it returned: the response's beginning.
    pub read_ns: Option<u64>,
    /// HTTP/2: the read that carried the response's last frame.
    pub end_ns: Option<u64>,
}

fn push<T>(times: &mut VecDeque<T>, t: T) {
    if times.len() == KEPT {
        times.pop_front();
    }
    times.push_back(t);
}

/// The first time at or after `t` (the deques are in time order).
fn first_from(times: &VecDeque<u64>, t: u64) -> Option<u64> {
    times.iter().copied().find(|&x| x >= t)
}

impl IoClock {
    pub fn new() -> Arc<IoClock> {
        Arc::new(IoClock::default())
    }

    fn lock(&self) -> MutexGuard<'_, Times> {
        // Nothing is left half-updated under the lock: a panic elsewhere
        // while holding it leaves the times valid.
        self.times.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note_read(&self, t: u64, entered: u64, bytes: &[u8]) {
        let mut times = self.lock();
        let read = Read {
            returned: t,
            entered,
            tls_header: matches!(bytes, [0x17, 0x03, _, _, _]),
        };
        push(&mut times.reads, read);
        times.h2.read(t, bytes);
    }

    fn note_write<'a>(&self, t: u64, bytes: impl IntoIterator<Item = &'a [u8]>) {
        {
            let mut times = self.lock();
            push(&mut times.writes, t);
            for b in bytes {
                times.h2.wrote(t, b);
            }
        }
        self.wrote.notify_waiters();
    }

    /// On an HTTP/2 server connection, the next request's stream and the
    /// read that brought its HEADERS frame: to be taken once per request
    /// as hyper hands them to the service (in their arrival order). `None`
    /// on other connections.
    pub fn next_h2_request(&self) -> Option<(u32, u64)> {
        self.lock().h2.server.heads.pop_front()
    }

    /// The write that carried the last frame of `stream` (its END_STREAM),
    /// waiting up to `limit` for it.
    pub async fn wait_h2_end(&self, stream: u32, limit: Duration) -> Option<u64> {
        let wait = async {
            loop {
                let notified = self.wrote.notified();
                {
                    let times = self.lock();
                    if let Some(t) = moment_of(&times.h2.server.ends, stream) {
                        return Some(t);
                    }
                    if times.closed {
                        return None;
                    }
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.ok().flatten()
    }

    /// On an HTTP/2 client connection, the exchange of the one request
    /// whose head carried `key`: the write that carried its HEADERS frame,
    /// the read that brought its response's head and the one that ended
    /// it (`None` while they have not come).
    /// `None` when no stream, or more than one, carried it, or the
    /// connection's header blocks could not all be decoded.
    pub fn h2_exchange(&self, key: &RequestKey) -> Option<Exchange> {
        let times = self.lock();
        let c = &times.h2.client;
        if c.lost {
            return None;
        }
        let mut carried = c.sent.iter().filter(|s| s.key.as_ref() == Some(key));
        let sent = carried.next()?;
        if carried.next().is_some() {
            return None;
        }
        Some(Exchange {
            write_ns: sent.head_ns,
            read_ns: moment_of(&c.answers, sent.stream),
            end_ns: moment_of(&c.ends, sent.stream),
        })
    }

    /// On an HTTP/2 server connection, the write that carried the head of
    /// `stream`'s response (its first HEADERS frame), once it went.
    pub fn h2_response_head(&self, stream: u32) -> Option<u64> {
        moment_of(&self.lock().h2.server.answers, stream)
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wrote.notify_waiters();
    }

    /// Marks the connection as handed to its user; only later I/O belongs
    /// to requests. The first mark counts.
    fn mark_ready(&self) {
        let mut times = self.lock();
        if times.ready_ns == 0 {
            times.ready_ns = mono_ns();
        }
    }

    /// The last read that returned at or before `t`: on a server, with `t`
    /// taken as the handler starts, the read that completed the request head.
    ///
    /// TLS reads a record's header (5 bytes) and its body apart, and
    /// mesh-trace knows a request by the read of its record's first bytes.
    /// Between the two the thread may be off the CPU, so when the read just
    /// before was an application-data record's header, the moment's bounds
    /// reach back to that read's entry.
    pub fn last_read_until(&self, t: u64) -> Option<u64> {
        let (returned, from) = {
            let times = self.lock();
            let last = times.reads.iter().rposition(|r| r.returned <= t)?;
            let read = times.reads[last];
            let header = last
                .checked_sub(1)
                .map(|i| times.reads[i])
                .filter(|h| h.tls_header);
            (read.returned, header.map(|h| h.entered))
        };
        if let Some(from) = from {
            note_bounds(returned, from, returned);
        }
        Some(returned)
    }

    /// The first write that returned at or after `t`.
    pub fn first_write_from(&self, t: u64) -> Option<u64> {
        first_from(&self.lock().writes, t)
    }

    /// The first write at or after `t`, waiting up to `limit` for it. `None`
    /// when none came in time or the connection closed without one.
    ///
    /// A server's handler returns its response before hyper writes it: the
    /// record is completed from here once the response is on the wire.
    pub async fn wait_write_from(&self, t: u64, limit: Duration) -> Option<u64> {
        let wait = async {
            loop {
                // Registered before looking, so a write between the look
                // and the await still wakes us.
                let notified = self.wrote.notified();
                {
                    let times = self.lock();
                    if let Some(w) = first_from(&times.writes, t) {
                        return Some(w);
                    }
                    if times.closed {
                        return None;
                    }
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.ok().flatten()
    }

    /// A client request's write and the response's first read on an
    /// HTTP/1.1 connection (one exchange at a time), for a request handed
    /// to the client at `sent_ns` whose response head was handed back at
    /// `arrived_ns`: the last read by then completed the head; the last
    /// write before it ended the request, whose first write followed the
    /// read before (a head and a body may be two writes); the response's
    /// first read followed the request's last write. A request that waited
    /// for a pooled connection is not given the writes of the exchanges
    /// before it on the connection it got, as [`IoClock::exchange_from`]
    /// would give it. That, where these cannot tell.
    pub fn exchange_until(&self, sent_ns: u64, arrived_ns: u64) -> Option<Exchange> {
        let found = {
            let times = self.lock();
            let from = sent_ns.max(times.ready_ns);
            let reads = || times.reads.iter().map(|r| r.returned);
            let last_read = reads().rev().find(|&r| r <= arrived_ns);
            let last_write = last_read
                .and_then(|lr| times.writes.iter().rev().copied().find(|&w| w < lr))
                .filter(|&w| w >= from);
            last_write.and_then(|end| {
                let read_before = reads().rev().find(|&r| r < end).unwrap_or(0);
                let write_ns = times
                    .writes
                    .iter()
                    .copied()
                    .find(|&w| w > read_before && w >= from)?;
                Some(Exchange {
                    write_ns,
                    read_ns: reads().find(|&r| r > end),
                    end_ns: None,
                })
            })
        };
        found.or_else(|| self.exchange_from(sent_ns))
    }

    /// A client request's write and the response's first read, for a
    /// request handed to the client at `sent_ns`: the first write at or
    /// after it (and after the connection was ready, past any TLS
    /// handshake), and the first read after that write.
    pub fn exchange_from(&self, sent_ns: u64) -> Option<Exchange> {
        let times = self.lock();
        let write_ns = first_from(&times.writes, sent_ns.max(times.ready_ns))?;
        let read_ns = times
            .reads
            .iter()
            .map(|r| r.returned)
            .find(|&r| r > write_ns);
        Some(Exchange {
            write_ns,
            read_ns,
            end_ns: None,
        })
    }
}

/// A byte stream whose reads and writes are timed into an [`IoClock`].
/// Dropping it marks the clock closed.
///
/// The kernel's moment for a read or a write is the end of the transfer in
/// the system call, just before it returns. A read is stamped when it
/// returns, late by any time the thread spent off the CPU on its way back
/// (its [`MomentBounds`] say how late it can be). A write is stamped by
/// the kernel where it can be: on loopback it delivers to the reader
/// within the call and wakes it, and on a busy machine the writer is often
/// preempted on its way back to user space, for a time slice (~0.3 ms in
/// the lab). See [`WriteStart`].
#[derive(Debug)]
pub struct Clocked<T> {
    inner: T,
    clock: Arc<IoClock>,
    /// The kernel's transmit stamps of the writes, when turned on.
    tx: Option<TxStamps>,
}

impl<T> Clocked<T> {
    /// Wraps `inner` with a new clock; returns the clock too.
    pub fn new(inner: T) -> (Clocked<T>, Arc<IoClock>) {
        let clock = IoClock::new();
        let stream = Clocked {
            inner,
            clock: Arc::clone(&clock),
            tx: None,
        };
        (stream, clock)
    }

    /// [`Clocked::new`] for a TCP socket that has sent nothing yet, its
    /// writes timed by the kernel's transmit stamps ([`TxStamps`]) where
    /// the packet left within the call (else by the call's return).
    pub fn with_tx_stamps(inner: T) -> (Clocked<T>, Arc<IoClock>)
    where
        T: std::os::fd::AsRawFd,
    {
        let tx = TxStamps::enable(inner.as_raw_fd())
            .inspect_err(|e| tracing::warn!("no kernel transmit stamps for the lab's truth: {e}"))
            .ok();
        let (mut stream, clock) = Clocked::new(inner);
        stream.tx = tx;
        (stream, clock)
    }

    /// When a write of `n` bytes, begun at `started`, moved its bytes: the
    /// kernel's transmit stamp of its last byte when the packet left inside
    /// the call; with stamps but none inside the call, the packet was held
    /// back (by the congestion window, TCP's small queues or autocorking)
    /// and left after the call returned, so the return is the closest moment
    /// known (the thread's time off the CPU inside such a call was before
    /// its bytes left: 0.7 to 7 ms early, for 7 to 12 of 1,600 gRPC
    /// responses through the lab's own sidecars); without stamps, as
    /// [`WriteStart`] says.
    fn written_at(&mut self, started: WriteStart, n: usize) -> u64 {
        let returned = mono_ns();
        let started_wall = started.wall_ns;
        let done = started.done_by(returned);
        // Only a stamp inside the call is its moment (the stamp's clock is
        // converted through CLOCK_REALTIME: a few us of slack). One from
        // before it is not this write's, whatever its key says: 0.1 to 2 ms
        // early, a few times in a few thousand writes under load.
        let stamped = self.tx.as_mut().and_then(|tx| {
            tx.after_write(n)
                .filter(|&t| t + TX_SLACK_NS >= started_wall && t <= returned + TX_SLACK_NS)
        });
        // The call's return in the kernel lies between its start and
        // `returned` (later by any time off the CPU on the way back). Not
        // after `done`: the thread's CPU time in the call may include
        // softirq work done after its bytes left (milliseconds under load).
        if let Some(t) = stamped {
            // A packet may also leave after the kernel's return, while the
            // thread is off the CPU before `returned`: the moment was then
            // that return, between the start and the stamp.
            note_bounds(t, started_wall.min(t), t);
            return t;
        }
        let t = if self.tx.is_some() { returned } else { done };
        note_bounds(t, started_wall, returned);
        t
    }
}

/// Where the lab's records of this process note the bounds of their
/// moments (see [`MomentBounds`]); off until [`write_bounds_beside`].
static BOUNDS: std::sync::OnceLock<RecordWriter> = std::sync::OnceLock::new();

/// Bounds narrower than this are not written: they are well inside the
/// 0.5 ms a span's hop is judged to.
const BOUNDS_NOTED_FROM_NS: u64 = 100_000;

/// The bounds of one moment, as the process knew them. A read (or a write
/// without a transmit stamp inside its call) is stamped when the call has
/// returned to user space; the kernel's return, where mesh-trace stamps
/// it, lies between the call's entry and that stamp. A thread preempted after the call,
/// or inside it, leaves a stamp late by up to the time it was off the CPU
/// (milliseconds on a busy two-core machine). A write whose packet left
/// within its call may also have left after the kernel's return, while
/// the thread was off the CPU: its moment lies between the call's entry
/// and the transmit stamp. Judging a span, the moment is known to lie in
/// `lo..=hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MomentBounds {
    /// The moment as recorded.
    pub t: u64,
    pub lo: u64,
    pub hi: u64,
}

/// From now on, this process writes the bounds of its moments that are
/// 0.1 ms wide or more to [`bounds_path`]`(records)`.
pub fn write_bounds_beside(records: &Path) -> io::Result<()> {
    let w = RecordWriter::create(&bounds_path(records))?;
    // A second call in one process keeps the first file.
    let _ = BOUNDS.set(w);
    Ok(())
}

/// The file beside a records file that holds its moments' bounds.
pub fn bounds_path(records: &Path) -> PathBuf {
    let mut name = records.as_os_str().to_owned();
    name.push(".bounds");
    PathBuf::from(name)
}

fn note_bounds(t: u64, lo: u64, hi: u64) {
    if hi.saturating_sub(lo) < BOUNDS_NOTED_FROM_NS {
        return;
    }
    if let Some(w) = BOUNDS.get() {
        w.write(&MomentBounds { t, lo, hi });
    }
}

impl<T> Drop for Clocked<T> {
    fn drop(&mut self) {
        self.clock.close();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Clocked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let entered = mono_ns();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        // An empty read is EOF (or an empty buffer), not data arriving.
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let returned = mono_ns();
            note_bounds(returned, entered, returned);
            self.clock
                .note_read(returned, entered, &buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Clocked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let started = WriteStart::now();
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n @ 1..)) = polled {
            let t = self.written_at(started, n);
            self.clock.note_write(t, [&buf[..n]]);
        }
        polled
    }

    // Delegated so hyper keeps writing head and body in one writev, as it
    // does on a bare socket: the wrapper must not change the system calls.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let started = WriteStart::now();
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n @ 1..)) = polled {
            // The first n bytes across the buffers (empty ones among them).
            let written = bufs.iter().scan(n, |left, b| {
                let take = (*left).min(b.len());
                *left -= take;
                Some(&b[..take])
            });
            let t = self.written_at(started, n);
            self.clock.note_write(t, written);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// When a write began, to tell when its system call's work ended where the
/// kernel's transmit stamps are not on: the start plus the CPU time the
/// thread spent since. A stamp after the call
/// would take in the preemption, one before it would lead by the call's
/// work (some 40 us in the lab: TCP, netfilter and the delivery to the
/// reader, all run by the writing thread). Time off the CPU inside the call
/// is that preemption on the way out, after the kernel's moment, so it is
/// left out; the result is never later than the call's return.
struct WriteStart {
    wall_ns: u64,
    cpu_ns: Option<u64>,
}

/// CPU time of the calling thread, ns. A system call (no vDSO for it), but
/// a cheap one, and not socket I/O: invisible to mesh-trace.
fn thread_cpu_ns() -> Option<u64> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
    Some(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
}

impl WriteStart {
    fn now() -> WriteStart {
        WriteStart {
            wall_ns: mono_ns(),
            cpu_ns: thread_cpu_ns(),
        }
    }

    /// The write returned at `returned`: when its work in the kernel ended.
    fn done_by(self, returned: u64) -> u64 {
        match (self.cpu_ns, thread_cpu_ns()) {
            (Some(before), Some(after)) => {
                let spent = after.saturating_sub(before);
                returned.min(self.wall_ns.saturating_add(spent))
            }
            // No thread CPU clock (not on Linux): the return will do.
            _ => returned,
        }
    }
}

/// The clock of the connection a response came on, in the response's
/// extensions (next to `HttpInfo`).
#[derive(Clone, Debug)]
pub struct ConnectionClock(pub Arc<IoClock>);

impl<T: Connection> Connection for Clocked<T> {
    fn connected(&self) -> Connected {
        // hyper-util asks a new connection for this once, when the
        // connector is done with it (TLS handshake included) and before
        // any request is written: the moment request I/O can begin.
        self.clock.mark_ready();
        self.inner
            .connected()
            .extra(ConnectionClock(Arc::clone(&self.clock)))
    }
}

/// A connector whose connections are [`Clocked`]: wraps a connector that
/// yields tokio streams in `TokioIo` (as `HttpConnector` does). Under a TLS
/// connector it times the TCP socket, below the encryption.
#[derive(Clone, Debug)]
pub struct ClockConnector<C> {
    inner: C,
}

impl<C> ClockConnector<C> {
    pub fn new(inner: C) -> Self {
        ClockConnector { inner }
    }
}

type Connecting<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<C, T> tower_service::Service<Uri> for ClockConnector<C>
where
    C: tower_service::Service<Uri, Response = TokioIo<T>>,
    C::Future: Send + 'static,
    T: AsyncRead + AsyncWrite + std::os::fd::AsRawFd + Unpin + Send + 'static,
{
    type Response = TokioIo<Clocked<T>>;
    type Error = C::Error;
    type Future = Connecting<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.inner.call(dst);
        Box::pin(async move {
            let io = connecting.await?;
            let (stream, _) = Clocked::with_tx_stamps(io.into_inner());
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn reads_and_writes_with_data_are_timed() {
        let (a, mut b) = tokio::io::duplex(64);
        let (mut a, clock) = Clocked::new(a);
        let before = mono_ns();
        a.write_all(b"request").await.expect("write");
        let wrote = clock.first_write_from(before).expect("a write");
        assert!(wrote >= before);
        let mut buf = [0u8; 7];
        b.read_exact(&mut buf).await.expect("read");
        b.write_all(b"response").await.expect("write");
        let mut got = [0u8; 8];
        a.read_exact(&mut got).await.expect("read");
        let read = clock.last_read_until(mono_ns()).expect("a read");
        assert!(read > wrote);
        assert_eq!(
            clock.exchange_from(before),
            Some(Exchange {
                write_ns: wrote,
                read_ns: Some(read),
                end_ns: None,
            })
        );
        // EOF is no data: not a read.
        drop(b);
        assert_eq!(a.read(&mut got).await.expect("eof"), 0);
        assert_eq!(clock.lock().reads.len(), 1);
        assert_eq!(clock.last_read_until(wrote), None, "nothing read before");
    }

    #[tokio::test]
    async fn waiting_for_a_write_wakes_on_it_or_on_close() {
        let (a, _b) = tokio::io::duplex(64);
        let (mut a, clock) = Clocked::new(a);
        let from = mono_ns();
        let waiter = {
            let clock = Arc::clone(&clock);
            tokio::spawn(async move { clock.wait_write_from(from, WRITE_WAIT).await })
        };
        tokio::task::yield_now().await;
        a.write_all(b"x").await.expect("write");
        let got = waiter.await.expect("waiter").expect("woken by the write");
        assert!(got >= from);
        // Already there: no wait.
        assert_eq!(clock.wait_write_from(from, Duration::ZERO).await, Some(got));
        // None comes after `later`: closing ends the wait early.
        let later = mono_ns() + 1;
        let waiter = {
            let clock = Arc::clone(&clock);
            tokio::spawn(async move { clock.wait_write_from(later, WRITE_WAIT).await })
        };
        tokio::task::yield_now().await;
        let started = std::time::Instant::now();
        drop(a);
        assert_eq!(waiter.await.expect("waiter"), None);
        assert!(started.elapsed() < WRITE_WAIT / 2);
    }

    #[test]
    fn a_write_ends_between_its_start_and_its_return() {
        let before = mono_ns();
        let started = WriteStart::now();
        // Work on the CPU counts; time asleep (as if preempted) does not.
        // Spin for 2 ms of this thread's CPU time, not of wall time: on a
        // busy machine the spinning thread can itself be preempted.
        let cpu = || {
            let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
                .expect("thread CPU clock");
            t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
        };
        let busy = cpu();
        while cpu() < busy + 2_000_000 {}
        std::thread::sleep(Duration::from_millis(20));
        let done = started.done_by(mono_ns());
        let after = mono_ns();
        assert!(before + 2_000_000 <= done, "{}", done - before);
        assert!(done + 15_000_000 <= after, "{}", after - done);
    }

    /// A frame header: length, type, flags, stream.
    fn frame(len: usize, ty: u8, flags: u8, stream: u32) -> Vec<u8> {
        let mut f = (len as u32).to_be_bytes()[1..].to_vec();
        f.extend([ty, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(std::iter::repeat_n(0u8, len));
        f
    }

    #[tokio::test]
    async fn http2_request_heads_and_stream_ends_by_stream_whatever_the_cuts() {
        let clock = IoClock::new();
        let mut read = PREFACE.to_vec();
        read.extend(frame(6, 4, 0, 0)); // SETTINGS
        read.extend(frame(20, FRAME_HEADERS, 0x4, 1));
        read.extend(frame(5, FRAME_DATA, FLAG_END_STREAM, 1));
        read.extend(frame(20, FRAME_HEADERS, 0x5, 3));
        // Cut anywhere: the preface too. A head is stamped with the read
        // that brought its frame's header, as mesh-trace stamps a frame
        // with the call where it began.
        let (first, rest) = read.split_at(30);
        let (second, third) = rest.split_at(rest.len() - 12);
        clock.note_read(100, 100, first);
        clock.note_read(200, 200, second);
        clock.note_read(300, 300, third);
        assert_eq!(clock.next_h2_request(), Some((1, 200)));
        assert_eq!(clock.next_h2_request(), Some((3, 200)));
        assert_eq!(clock.next_h2_request(), None);
        // Stream 3 answered first: its trailers end it; stream 1's DATA
        // ends it, written in two buffers of one writev.
        let mut out = frame(10, FRAME_HEADERS, 0x4, 3);
        out.extend(frame(12, FRAME_HEADERS, 0x5, 3));
        clock.note_write(400, [&out[..]]);
        let a = frame(10, FRAME_HEADERS, 0x4, 1);
        let b = frame(3, FRAME_DATA, FLAG_END_STREAM, 1);
        clock.note_write(500, [&a[..], &[][..], &b[..]]);
        assert_eq!(clock.wait_h2_end(3, Duration::ZERO).await, Some(400));
        assert_eq!(clock.wait_h2_end(1, Duration::ZERO).await, Some(500));
        // HTTP/1.1 is not followed.
        let http1 = IoClock::new();
        http1.note_read(100, 100, b"POST / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(http1.next_h2_request(), None);
    }

    /// A client's streams named by their decoded heads: hyper's HTTP/2
    /// client over a timed stream, calls in flight at once, the HPACK
    /// table carried from block to block.
    #[tokio::test]
    async fn http2_client_streams_are_told_apart_by_their_heads() {
        use http_body_util::{BodyExt as _, Full};
        use hyper::{body::Incoming, Request, Response};
        use hyper_util::rt::TokioExecutor;
        let (a, b) = tokio::io::duplex(1 << 16);
        let (a, clock) = Clocked::new(a);
        // The server notes when each request reached it and when it answered.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::clone(&seen);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let seen = Arc::clone(&served);
            async move {
                let came = mono_ns();
                let path = req.uri().path().to_owned();
                // The later calls answer first.
                let wait = 30 - 10 * path.len() as u64 % 3;
                tokio::time::sleep(Duration::from_millis(wait)).await;
                seen.lock().unwrap().push((path, came, mono_ns()));
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(bytes::Bytes::from(
                    "ok",
                ))))
            }
        });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(b), service),
        );
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(a))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let key = |path: &str, id: &str| RequestKey {
            path: path.to_owned(),
            request_id: Some(id.to_owned()),
            attempt: Some("1".to_owned()),
        };
        let calls = ["/a", "/bb", "/ccc"].map(|path| {
            let mut send = send.clone();
            tokio::spawn(async move {
                let req = Request::get(format!("http://svc{path}"))
                    .header("x-request-id", format!("id{path}"))
                    .header("x-envoy-attempt-count", "1")
                    .body(Full::new(bytes::Bytes::new()))
                    .expect("request");
                let resp = send.send_request(req).await.expect("response");
                resp.into_body().collect().await.expect("body");
            })
        });
        for call in calls {
            call.await.expect("call");
        }
        for (path, came, answered) in seen.lock().unwrap().iter() {
            let x = clock
                .h2_exchange(&key(path, &format!("id{path}")))
                .expect("its stream");
            assert!(x.write_ns <= *came, "{path}: written after it came");
            let head = x.read_ns.expect("its head read");
            let end = x.end_ns.expect("its end read");
            assert!(head >= *answered, "{path}: read before it was answered");
            assert!(end >= head, "{path}");
        }
        // Another attempt's key, or none of these, names no stream.
        let mut other = key("/a", "id/a");
        other.attempt = Some("2".to_owned());
        assert_eq!(clock.h2_exchange(&other), None);
    }

    #[test]
    fn bounded_and_ordered() {
        let clock = IoClock::new();
        for t in 1..=(KEPT as u64 + 10) {
            clock.note_write(t * 10, [&b"x"[..]]);
            clock.note_read(t * 10 + 5, t * 10 + 5, b"x");
        }
        assert_eq!(clock.lock().writes.len(), KEPT);
        assert_eq!(clock.lock().reads.len(), KEPT);
        assert_eq!(clock.first_write_from(701), Some(710));
        assert_eq!(clock.last_read_until(709), Some(705));
        let e = clock.exchange_from(700).expect("exchange");
        assert_eq!(
            e,
            Exchange {
                write_ns: 700,
                read_ns: Some(705),
                end_ns: None,
            }
        );
        // A connection handed over later: earlier I/O was its handshake.
        clock.lock().ready_ns = 731;
        assert_eq!(clock.exchange_from(700).map(|e| e.write_ns), Some(740));
    }

    /// A request that waited for a pooled connection: the connection
    /// carried another exchange after the request was handed over, then
    /// its own (a head and a body in two writes).
    #[test]
    fn a_request_that_waited_for_its_connection_gets_its_own_exchange() {
        let clock = IoClock::new();
        clock.note_write(100, [&b"GET /other"[..]]);
        clock.note_read(150, 150, b"HTTP/1.1 200");
        clock.note_write(200, [&b"POST /mine"[..]]);
        clock.note_write(210, [&b"body"[..]]);
        clock.note_read(250, 240, b"HTTP/1.1 201");
        clock.note_read(270, 265, b"rest of the body");
        // Handed over at 90, its head back at 255.
        assert_eq!(clock.exchange_from(90).map(|e| e.write_ns), Some(100));
        assert_eq!(
            clock.exchange_until(90, 255),
            Some(Exchange {
                write_ns: 200,
                read_ns: Some(250),
                end_ns: None,
            })
        );
        // Nothing written since it was handed over by then: as before.
        assert_eq!(
            clock.exchange_until(160, 170).map(|e| e.write_ns),
            Some(200)
        );
    }
}
