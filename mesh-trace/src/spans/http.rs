//! HTTP/1.1 framing of one socket's byte stream.
//!
//! The kernel reports every send and receive on a traced socket as a
//! [`Chunk`]: when, which thread, which direction, the stream offset and the
//! first bytes. A [`Framer`] cuts each direction into messages from those
//! alone (the payload beyond the prefix is never seen) and describes where
//! each message starts ([`Message`]): request line or status, and the headers
//! that join hops (`Host`, `x-request-id`) or name the caller's trace
//! (`traceparent`, B3).
//!
//! Framing, per socket:
//! - HTTP/1.1 without pipelining alternates directions, so a message starts
//!   at the first chunk after each direction change.
//! - When a head was parsed completely and its body length is known
//!   (`Content-Length`, or no body by rule), a chunk that begins exactly at
//!   the message's end starts a new message in the same direction
//!   (pipelining), and a chunk that begins before it continues the message
//!   even after a direction change (a body sent after `100 Continue`).
//! - A gap or a backwards offset starts a new message: events were lost.
//!
//! Limit: only messages that start at a chunk's first byte are reported.
//! When a chunk holds the end of one message and the start of another
//! (several pipelined messages in one write), the framer forgets the length
//! and lets the current message last until the direction changes, rather
//! than place later boundaries in the middle of a message.

use super::trace_id::TraceContext;

/// Longest request path kept, in bytes.
const MAX_PATH: usize = 128;
/// Longest request target (path and query) kept, in bytes.
const MAX_TARGET: usize = 256;
/// Longest `x-request-id` kept, in bytes.
const MAX_REQUEST_ID: usize = 128;
/// Longest `Host` kept, in bytes (a DNS name is at most 253).
const MAX_HOST: usize = 255;
/// Header slots for httparse on the stack: more than any head of 192 bytes
/// holds, and than most of 2 KiB (a request head's capture); a head with
/// more lines is parsed again with a slot per line.
const MAX_HEADERS: usize = 96;
/// Path segments kept by [`template_path`].
const MAX_SEGMENTS: usize = 4;

/// Methods that mark bytes as an HTTP/1.1 request.
const METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];

/// Direction of a chunk, seen from the traced socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    Send,
    Recv,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::Send => 0,
            Dir::Recv => 1,
        }
    }
}

/// One send or receive on a traced socket, as the kernel reports it.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    /// When the syscall moved the bytes (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Thread that did it.
    pub tid: u32,
    pub dir: Dir,
    /// Stream offset (in this direction) of the chunk's first byte.
    pub offset: u64,
    /// Bytes moved by this syscall (may be larger than `prefix`).
    pub len: u32,
    /// The first bytes of the chunk.
    pub prefix: &'a [u8],
}

impl Chunk<'_> {
    /// The bytes seen: the prefix, never more than the syscall moved.
    fn seen(&self) -> &[u8] {
        let n = usize::try_from(self.len).unwrap_or(usize::MAX);
        &self.prefix[..n.min(self.prefix.len())]
    }

    /// Stream offset right after the chunk; None if it does not fit a u64.
    fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.len))
    }
}

/// A message that starts in a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub dir: Dir,
    /// Timestamp of the chunk where it starts.
    pub ts_ns: u64,
    pub tid: u32,
    /// Stream offset of its first byte.
    pub offset: u64,
    pub head: Head,
}

/// What the start of a message says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Head {
    Request {
        method: String,
        /// Without the query string, at most 128 bytes.
        path: String,
        /// The whole request target as written, query included, at most
        /// 256 bytes: a proxy forwards it untouched, so it identifies the
        /// request on both of the proxy's sides.
        target: String,
        host: Option<String>,
        request_id: Option<String>,
        /// `Content-Length`, when the prefix holds it.
        content_length: Option<u64>,
        /// The caller's trace context (`traceparent`, else B3), when the
        /// prefix holds it.
        trace_context: Option<TraceContext>,
        /// A gRPC call (`content-type: application/grpc`, HTTP/2 heads).
        grpc: bool,
        /// Its other header lines within the prefix (HTTP/1.1 heads).
        end_to_end: EndToEnd,
    },
    Response {
        /// 0 when the prefix ends before the status code.
        status: u16,
        request_id: Option<String>,
        /// `Content-Length`, when the prefix holds it.
        content_length: Option<u64>,
    },
    /// Bytes that are not HTTP/1.1 (TLS records, other protocols): still
    /// framed by direction changes, so stream offsets and write boundaries
    /// can be joined.
    Opaque { tls: bool },
    /// Looked like HTTP but could not be parsed.
    Malformed,
}

/// Counters of one framer. `messages` counts every message reported,
/// including the malformed and opaque ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FramerStats {
    pub messages: u64,
    pub malformed: u64,
    pub opaque: u64,
    /// Messages that started in the same direction as the previous one,
    /// at its known end (not counting final responses after a 1xx).
    pub pipelined: u64,
}

/// Per-socket HTTP/1.1 framer; a few integers, no payload.
#[derive(Clone, Debug, Default)]
pub struct Framer {
    sides: [Side; 2],
    last_dir: Option<Dir>,
    pending: Pending,
    stats: FramerStats,
}

/// What the framer knows about one direction.
#[derive(Clone, Copy, Debug, Default)]
struct Side {
    /// Offset right after the last chunk seen in this direction.
    next: Option<u64>,
    /// Where the current message ends, when its length is known.
    end: Option<u64>,
    /// The current message is a 1xx interim response: the final response
    /// follows in the same direction without that being pipelining.
    interim: bool,
    /// The current message is a TLS handshake flight: the first application
    /// data record after it, in the same direction, starts a new message
    /// (a client's Finished and its first request often leave back to back).
    tls_handshake: bool,
}

/// Requests not answered yet, oldest first, one bit each: set for HEAD,
/// whose response has no body whatever its headers say. Bounded: requests
/// beyond 64 outstanding are forgotten.
#[derive(Clone, Copy, Debug, Default)]
struct Pending {
    bits: u64,
    len: u32,
}

impl Pending {
    fn push(&mut self, head: bool) {
        if self.len < u64::BITS {
            self.bits |= u64::from(head) << self.len;
            self.len += 1;
        }
    }

    /// Whether the oldest outstanding request was a HEAD.
    fn pop(&mut self) -> bool {
        if self.len == 0 {
            return false;
        }
        let head = self.bits & 1 == 1;
        self.bits >>= 1;
        self.len -= 1;
        head
    }
}

/// Why a message starts at a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// The chunk continues the current message.
    Continue,
    /// First chunk in this direction, or the direction changed.
    Turn,
    /// Same direction, at the known end of the previous message.
    Pipelined,
    /// Same direction, right after a 1xx interim response.
    AfterInterim,
    /// Offsets jumped: events were lost or reordered.
    Resync,
}

impl Framer {
    pub fn new() -> Framer {
        Framer::default()
    }

    /// Feeds one chunk; returns a message that starts in this chunk, if any.
    pub fn push(&mut self, chunk: &Chunk) -> Option<Message> {
        if chunk.len == 0 {
            // Moves no bytes (EOF, empty write): neither starts nor continues.
            return None;
        }
        let start = self.start(chunk);
        self.last_dir = Some(chunk.dir);
        self.sides[chunk.dir.index()].next = chunk.end();
        let message = match start {
            Start::Continue => None,
            _ => Some(self.begin(chunk, start)),
        };
        self.forget_end_inside(chunk);
        message
    }

    pub fn stats(&self) -> FramerStats {
        self.stats
    }

    fn start(&self, chunk: &Chunk) -> Start {
        let side = self.sides[chunk.dir.index()];
        let turned = self.last_dir != Some(chunk.dir);
        match side.next {
            None => return Start::Turn,
            Some(next) if next != chunk.offset => return Start::Resync,
            Some(_) => {}
        }
        if !turned && side.tls_handshake && chunk.seen().first() == Some(&TLS_APPLICATION_DATA) {
            return Start::Turn;
        }
        match side.end {
            Some(end) if chunk.offset >= end => match (turned, side.interim) {
                (true, _) => Start::Turn,
                (false, true) => Start::AfterInterim,
                (false, false) => Start::Pipelined,
            },
            // A message of known length is not over before its end.
            Some(_) => Start::Continue,
            None if turned => Start::Turn,
            None => Start::Continue,
        }
    }

    fn begin(&mut self, chunk: &Chunk, start: Start) -> Message {
        if start == Start::Resync {
            // Lost events may have held requests or responses.
            self.pending = Pending::default();
        }
        let parsed = parse_head(chunk.seen());
        let (body, interim) = self.body(&parsed);
        let side = &mut self.sides[chunk.dir.index()];
        side.end = parsed
            .head_len
            .and_then(|n| u64::try_from(n).ok())
            .zip(body)
            .and_then(|(head, body)| chunk.offset.checked_add(head)?.checked_add(body));
        side.interim = interim;
        side.tls_handshake = is_tls_handshake(chunk.seen());
        self.count(&parsed.head, start);
        Message {
            dir: chunk.dir,
            ts_ns: chunk.ts_ns,
            tid: chunk.tid,
            offset: chunk.offset,
            head: parsed.head,
        }
    }

    /// Body length of a new message (None: lasts until the direction
    /// changes), and whether it is an interim response. Tracks outstanding
    /// requests so that responses to HEAD get no body.
    fn body(&mut self, parsed: &Parsed) -> (Option<u64>, bool) {
        match &parsed.head {
            Head::Request { method, .. } => {
                self.pending.push(method == "HEAD");
                (request_body(method, &parsed.fields), false)
            }
            Head::Response { status, .. } => {
                let interim = is_interim(*status);
                let to_head = !interim && self.pending.pop();
                (response_body(*status, to_head, &parsed.fields), interim)
            }
            Head::Opaque { .. } | Head::Malformed => (None, false),
        }
    }

    /// When another message starts inside this chunk, its start is not at
    /// a chunk boundary and cannot be reported: forget the length so that
    /// later chunks are not mistaken for message starts.
    fn forget_end_inside(&mut self, chunk: &Chunk) {
        let side = &mut self.sides[chunk.dir.index()];
        if let Some(end) = side.end {
            let inside = end > chunk.offset && chunk.end().is_none_or(|e| end < e);
            if inside {
                side.end = None;
            }
        }
    }

    fn count(&mut self, head: &Head, start: Start) {
        self.stats.messages += 1;
        match head {
            Head::Malformed => self.stats.malformed += 1,
            Head::Opaque { .. } => self.stats.opaque += 1,
            Head::Request { .. } | Head::Response { .. } => {}
        }
        if start == Start::Pipelined {
            self.stats.pipelined += 1;
        }
    }
}

/// 1xx responses other than 101 are followed by the final response.
fn is_interim(status: u16) -> bool {
    (100..200).contains(&status) && status != 101
}

fn request_body(method: &str, fields: &Fields) -> Option<u64> {
    if method == "CONNECT" || fields.upgrade || fields.transfer_encoding {
        // Tunnels and chunked bodies: until the direction changes.
        return None;
    }
    match fields.content_length {
        // A request without Content-Length or Transfer-Encoding has no body.
        Length::Absent => Some(0),
        Length::Known(n) => Some(n),
        Length::Invalid => None,
    }
}

fn response_body(status: u16, to_head: bool, fields: &Fields) -> Option<u64> {
    match status {
        // Switching protocols: what follows is not HTTP/1.1.
        101 => None,
        100..=199 | 204 | 304 => Some(0),
        _ if to_head => Some(0),
        _ if fields.transfer_encoding => None,
        _ => match fields.content_length {
            Length::Known(n) => Some(n),
            // Without a length the body lasts until the connection closes.
            Length::Absent | Length::Invalid => None,
        },
    }
}

/// A message start, parsed from the prefix of its first chunk.
struct Parsed {
    head: Head,
    /// Length of the head, when it ends within the prefix.
    head_len: Option<usize>,
    fields: Fields,
}

impl Parsed {
    fn other(head: Head) -> Parsed {
        Parsed {
            head,
            head_len: None,
            fields: Fields::default(),
        }
    }
}

/// Header lines of a request that a proxy passes on as the client wrote
/// them (a cookie, an authorization, a user agent, the app's own headers),
/// kept as hashes of name and value, at most [`MAX_END_TO_END`]: where a
/// request read by a sidecar and one it wrote both show a line of one name
/// with different values, they are different requests. Lines proxies add,
/// remove or rewrite as a rule ([`set_by_proxies`]) are left out, and so
/// is a name that occurs twice (a proxy may join them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndToEnd(Vec<(u64, Option<u64>)>);

/// Header lines kept per request head in [`EndToEnd`].
const MAX_END_TO_END: usize = 16;
/// The longest header name kept in [`EndToEnd`].
const MAX_END_TO_END_NAME: usize = 64;

impl EndToEnd {
    fn note(&mut self, name: &str, value: &[u8]) {
        // Lowercased on the stack: this runs for every header line of every
        // request head the agent reads. A longer name is no evidence.
        let mut lower = [0u8; MAX_END_TO_END_NAME];
        let Some(lower) = lower.get_mut(..name.len()) else {
            return;
        };
        if set_by_proxies(name) {
            return;
        }
        for (l, b) in lower.iter_mut().zip(name.bytes()) {
            *l = b.to_ascii_lowercase();
        }
        let name = hash_of(lower);
        let value = hash_of(value.trim_ascii());
        if let Some(line) = self.0.iter_mut().find(|(n, _)| *n == name) {
            line.1 = None;
        } else if self.0.len() < MAX_END_TO_END {
            self.0.push((name, Some(value)));
        }
    }

    /// Whether the two show a line of one name with different values.
    pub fn differs(&self, other: &EndToEnd) -> bool {
        self.0.iter().any(|&(name, value)| {
            other
                .0
                .iter()
                .any(|&(n, v)| n == name && value.is_some() && v.is_some() && v != value)
        })
    }
}

fn hash_of(bytes: &[u8]) -> u64 {
    use std::hash::BuildHasher as _;
    // One seed for the process: the two sides' hashes compare.
    foldhash::fast::FixedState::with_seed(0).hash_one(bytes)
}

/// Headers a proxy adds, removes or rewrites as a rule: hop-by-hop ones,
/// forwarding and tracing headers (Envoy starts a span of its own), Istio's
/// and Envoy's own, `Expect` (answered by the proxy) and `Accept-Encoding`
/// (rewritten by compressing proxies). `Host`, `Content-Length` and
/// `x-request-id` are compared on their own terms.
fn set_by_proxies(name: &str) -> bool {
    const NAMES: [&str; 23] = [
        "host",
        "content-length",
        "x-request-id",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "via",
        "forwarded",
        "expect",
        "accept-encoding",
        "x-real-ip",
        "traceparent",
        "tracestate",
        "b3",
        "uber-trace-id",
        "grpc-trace-bin",
        "x-cloud-trace-context",
        "x-amzn-trace-id",
    ];
    const PREFIXES: [&str; 8] = [
        "x-forwarded-",
        "x-envoy-",
        "x-istio-",
        "x-b3-",
        "x-ot-",
        "x-datadog-",
        "x-client-trace-",
        "sw8",
    ];
    NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
        || PREFIXES.iter().any(|p| {
            name.len() >= p.len() && name.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
        })
}

/// The headers the framer uses.
#[derive(Default)]
struct Fields {
    host: Option<String>,
    request_id: Option<String>,
    traceparent: Option<TraceContext>,
    b3: Option<TraceContext>,
    b3_trace_id: Option<Vec<u8>>,
    b3_span_id: Option<Vec<u8>>,
    content_length: Length,
    transfer_encoding: bool,
    upgrade: bool,
    end_to_end: EndToEnd,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Length {
    #[default]
    Absent,
    Known(u64),
    /// Unparsable, or several that disagree.
    Invalid,
}

impl Length {
    fn and(self, value: &[u8]) -> Length {
        match (self, parse_decimal(value)) {
            (Length::Absent, Some(n)) => Length::Known(n),
            (Length::Known(a), Some(n)) if a == n => Length::Known(a),
            _ => Length::Invalid,
        }
    }
}

fn parse_decimal(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The fields of a head's headers; with `end_to_end`, its other lines too
/// (a request's: responses are not matched by them).
fn fields(headers: &[httparse::Header], end_to_end: bool) -> Fields {
    let mut fields = Fields::default();
    for header in headers {
        let is = |name: &str| header.name.eq_ignore_ascii_case(name);
        if is("host") && fields.host.is_none() {
            fields.host = bounded_value(header.value, MAX_HOST);
        } else if is("x-request-id") && fields.request_id.is_none() {
            fields.request_id = bounded_value(header.value, MAX_REQUEST_ID);
        } else if is("traceparent") && fields.traceparent.is_none() {
            fields.traceparent = TraceContext::from_traceparent(header.value);
        } else if is("b3") && fields.b3.is_none() {
            fields.b3 = TraceContext::from_b3(header.value);
        } else if is("x-b3-traceid") && fields.b3_trace_id.is_none() {
            fields.b3_trace_id = Some(header.value.to_vec());
        } else if is("x-b3-spanid") && fields.b3_span_id.is_none() {
            fields.b3_span_id = Some(header.value.to_vec());
        } else if is("content-length") {
            fields.content_length = fields.content_length.and(header.value);
        } else if is("transfer-encoding") {
            fields.transfer_encoding = true;
        } else if is("upgrade") {
            fields.upgrade = true;
        } else if end_to_end {
            fields.end_to_end.note(header.name, header.value);
        }
    }
    fields
}

impl Fields {
    /// W3C first (Envoy and OpenTelemetry send both during migrations and
    /// read `traceparent` first), then B3's single header, then its pair.
    fn trace_context(&self) -> Option<TraceContext> {
        self.traceparent.or(self.b3).or_else(|| {
            TraceContext::from_b3_ids(self.b3_trace_id.as_deref()?, self.b3_span_id.as_deref())
        })
    }
}

/// A header value, trimmed and cut to `max` bytes; None if empty.
fn bounded_value(value: &[u8], max: usize) -> Option<String> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return None;
    }
    let mut value = String::from_utf8_lossy(value).into_owned();
    truncate(&mut value, max);
    Some(value)
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
}

/// The request or response head `bytes` start with, if any (a TLS
/// call's plaintext).
pub fn http_head(bytes: &[u8]) -> Option<Head> {
    match parse_head(bytes).head {
        head @ (Head::Request { .. } | Head::Response { .. }) => Some(head),
        _ => None,
    }
}

fn parse_head(bytes: &[u8]) -> Parsed {
    if is_tls_record(bytes) {
        return Parsed::other(Head::Opaque { tls: true });
    }
    if bytes.starts_with(b"HTTP/1.") {
        return parse_response(bytes);
    }
    match request_method(bytes) {
        Some(method) => parse_request(bytes, method),
        None => Parsed::other(Head::Opaque { tls: false }),
    }
}

/// TLS record header: content type 20..=23 (change cipher spec, alert,
/// handshake, application data), then major version 3.
const TLS_APPLICATION_DATA: u8 = 0x17;

/// Whether bytes start a TLS handshake or change-cipher-spec record: part of
/// setting up a connection, not a request or response.
pub fn is_tls_handshake(bytes: &[u8]) -> bool {
    matches!(bytes, [0x14 | 0x16, 0x03, ..])
}

/// Whether bytes start a TLS record (any content type).
pub fn is_tls_record(bytes: &[u8]) -> bool {
    matches!(bytes, [0x14..=0x17, 0x03, ..])
}

/// Whether a connection's first bytes in a direction open HTTP/2, as the
/// kernel tells it: the client's preface, or a SETTINGS frame on stream 0.
pub fn starts_h2(bytes: &[u8]) -> bool {
    if bytes.starts_with(mesh_trace_common::H2_PREFACE) {
        return true;
    }
    match bytes.get(..9) {
        Some(h) => {
            let length = u32::from(h[0]) << 16 | u32::from(h[1]) << 8 | u32::from(h[2]);
            h[3] == 4 && h[4] & !1 == 0 && h[5..9] == [0; 4] && length % 6 == 0 && length <= 96
        }
        None => false,
    }
}

/// Whether bytes start an HTTP/1.1 request or response.
pub fn starts_http(bytes: &[u8]) -> bool {
    bytes.starts_with(b"HTTP/1.") || request_method(bytes).is_some()
}

fn request_method(bytes: &[u8]) -> Option<&'static str> {
    METHODS
        .into_iter()
        .find(|m| bytes.starts_with(m.as_bytes()) && bytes.get(m.len()) == Some(&b' '))
}

fn parse_request(bytes: &[u8], method: &'static str) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut many = Vec::new();
    let slots = slots_for(bytes, &mut headers, &mut many);
    let mut req = httparse::Request::new(slots);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => request(
            method,
            req.path.unwrap_or(""),
            fields(req.headers, true),
            Some(n),
        ),
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            partial_request(bytes, method)
        }
        Err(_) => Parsed::other(Head::Malformed),
    }
}

/// Header slots for `bytes`: the stack's, unless it has more lines than
/// they hold (then `many`, a slot per line). Counting lines costs a pass
/// over the bytes, so only heads longer than the short capture count them.
fn slots_for<'a, 'b>(
    bytes: &[u8],
    stack: &'a mut [httparse::Header<'b>; MAX_HEADERS],
    many: &'a mut Vec<httparse::Header<'b>>,
) -> &'a mut [httparse::Header<'b>] {
    if bytes.len() > 4 * MAX_HEADERS {
        let lines = bytes.iter().filter(|&&b| b == b'\n').count();
        if lines >= MAX_HEADERS {
            many.resize(lines + 1, httparse::EMPTY_HEADER);
            return many;
        }
    }
    stack
}

/// The head does not end within the prefix: parse its complete lines as if
/// it ended there, or the cut request line by hand.
fn partial_request(bytes: &[u8], method: &'static str) -> Parsed {
    if let Some(closed) = close_head(bytes) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut many = Vec::new();
        let slots = slots_for(&closed, &mut headers, &mut many);
        let mut req = httparse::Request::new(slots);
        if let Ok(httparse::Status::Complete(_)) = req.parse(&closed) {
            return request(
                method,
                req.path.unwrap_or(""),
                fields(req.headers, true),
                None,
            );
        }
    }
    let target = bytes.get(method.len() + 1..).unwrap_or_default();
    let end = target
        .iter()
        .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
        .unwrap_or(target.len());
    let path = String::from_utf8_lossy(&target[..end]);
    request(method, &path, Fields::default(), None)
}

fn request(method: &str, path: &str, fields: Fields, head_len: Option<usize>) -> Parsed {
    let mut target = path.to_string();
    truncate(&mut target, MAX_TARGET);
    let head = Head::Request {
        method: method.to_string(),
        path: clean_path(path),
        target,
        host: fields.host.clone(),
        request_id: fields.request_id.clone(),
        content_length: match fields.content_length {
            Length::Known(n) => Some(n),
            Length::Absent | Length::Invalid => None,
        },
        trace_context: fields.trace_context(),
        grpc: false,
        end_to_end: fields.end_to_end.clone(),
    };
    Parsed {
        head,
        head_len,
        fields,
    }
}

/// The path without query string or fragment, at most [`MAX_PATH`] bytes.
fn clean_path(target: &str) -> String {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    let mut path = target[..end].to_string();
    truncate(&mut path, MAX_PATH);
    path
}

fn parse_response(bytes: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => {
            response(resp.code.unwrap_or(0), fields(resp.headers, false), Some(n))
        }
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            partial_response(bytes)
        }
        Err(_) => Parsed::other(Head::Malformed),
    }
}

/// Like [`partial_request`]: complete lines, else the cut status line.
fn partial_response(bytes: &[u8]) -> Parsed {
    if let Some(closed) = close_head(bytes) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(_)) = resp.parse(&closed) {
            return response(resp.code.unwrap_or(0), fields(resp.headers, false), None);
        }
    }
    // "HTTP/1.x NNN": the code is bytes 9..12, if the prefix reaches them.
    let code = bytes.get(9..12).and_then(parse_decimal);
    let status = code.and_then(|c| u16::try_from(c).ok()).unwrap_or(0);
    response(status, Fields::default(), None)
}

fn response(status: u16, fields: Fields, head_len: Option<usize>) -> Parsed {
    let head = Head::Response {
        status,
        request_id: fields.request_id.clone(),
        content_length: match fields.content_length {
            Length::Known(n) => Some(n),
            Length::Absent | Length::Invalid => None,
        },
    };
    Parsed {
        head,
        head_len,
        fields,
    }
}

/// The complete lines of a cut head, closed by an empty line; None when
/// not even the first line is complete.
fn close_head(bytes: &[u8]) -> Option<Vec<u8>> {
    let last = bytes.iter().rposition(|&b| b == b'\n')?;
    let mut closed = Vec::with_capacity(last + 3);
    closed.extend_from_slice(&bytes[..=last]);
    closed.extend_from_slice(b"\r\n");
    Some(closed)
}

/// A request path with bounded cardinality, for metric labels.
///
/// Drops the query string and fragment, and the scheme and authority of an
/// absolute URI; replaces segments that look like ids (numbers, UUIDs,
/// tokens of 16+ characters with a digit) with `:id`; keeps the first four
/// segments and marks the rest with `/…`. Empty segments are dropped (so a
/// trailing slash goes). Letters keep their case. `*` stays `*`.
///
/// `/api/v1/users/<uuid>/orders?x=1` becomes `/api/v1/users/:id/…`.
pub fn template_path(path: &str) -> String {
    let path = strip_authority(clean_target(path));
    if path == "*" {
        return path.to_string();
    }
    let mut out = String::new();
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    for segment in segments.by_ref().take(MAX_SEGMENTS) {
        out.push('/');
        out.push_str(if is_id(segment) { ":id" } else { segment });
    }
    if segments.next().is_some() {
        out.push_str("/…");
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn clean_target(target: &str) -> &str {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    &target[..end]
}

/// `http://host:port/p` -> `/p` (absolute form, as sent to proxies).
fn strip_authority(path: &str) -> &str {
    if path.starts_with('/') {
        return path;
    }
    let Some((_, rest)) = path.split_once("://") else {
        return path;
    };
    rest.find('/').map_or("/", |slash| &rest[slash..])
}

fn is_id(segment: &str) -> bool {
    is_number(segment) || is_uuid(segment) || is_long_token(segment)
}

fn is_number(segment: &str) -> bool {
    !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit())
}

/// 8-4-4-4-12 hex digits.
fn is_uuid(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, &b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Hex, base64 and similar ids: long, with a digit, no spaces or slashes.
fn is_long_token(segment: &str) -> bool {
    segment.len() >= 16
        && segment.bytes().any(|b| b.is_ascii_digit())
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=+%.~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(dir: Dir, ts_ns: u64, offset: u64, bytes: &[u8]) -> Chunk<'_> {
        Chunk {
            ts_ns,
            tid: 7,
            dir,
            offset,
            len: u32::try_from(bytes.len()).unwrap(),
            prefix: bytes,
        }
    }

    /// Feeds chunks laid end to end per direction; returns the messages.
    fn feed(framer: &mut Framer, parts: &[(Dir, &[u8])]) -> Vec<Message> {
        let mut next = [0u64; 2];
        let mut out = Vec::new();
        for (i, &(dir, bytes)) in parts.iter().enumerate() {
            let offset = next[dir.index()];
            next[dir.index()] += bytes.len() as u64;
            out.extend(framer.push(&chunk(dir, 1000 + i as u64, offset, bytes)));
        }
        out
    }

    fn req(method: &str, path: &str, host: Option<&str>, id: Option<&str>) -> Head {
        Head::Request {
            method: method.into(),
            path: path.into(),
            target: path.into(),
            host: host.map(Into::into),
            request_id: id.map(Into::into),
            content_length: None,
            trace_context: None,
            grpc: false,
            end_to_end: Default::default(),
        }
    }

    /// `head` with the full target and Content-Length the framer reports.
    fn with_target(head: Head, full: &str, length: Option<u64>) -> Head {
        match head {
            Head::Request {
                method,
                path,
                host,
                request_id,
                trace_context,
                ..
            } => Head::Request {
                method,
                path,
                target: full.into(),
                host,
                request_id,
                content_length: length,
                trace_context,
                grpc: false,
                end_to_end: Default::default(),
            },
            other => other,
        }
    }

    fn resp(status: u16, id: Option<&str>) -> Head {
        resp_len(status, id, None)
    }

    fn resp_len(status: u16, id: Option<&str>, content_length: Option<u64>) -> Head {
        Head::Response {
            status,
            request_id: id.map(Into::into),
            content_length,
        }
    }

    #[test]
    fn request_and_response_alternate_over_keep_alive() {
        let mut f = Framer::new();
        let req1 =
            b"GET /reviews/0?u=1 HTTP/1.1\r\nHost: reviews:9080\r\nX-Request-ID:  abc-1 \r\n";
        let req2 = b"accept: */*\r\n\r\n";
        let resp1 = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nx-request-id: abc-1\r\n\r\n";
        let parts: [(Dir, &[u8]); 5] = [
            (Dir::Send, req1),
            (Dir::Send, req2),
            (Dir::Recv, resp1),
            (Dir::Recv, b"01234"),
            (Dir::Recv, b"56789"),
        ];
        let got = feed(&mut f, &parts);
        assert_eq!(got.len(), 2);
        let expect_req = with_target(
            req("GET", "/reviews/0", Some("reviews:9080"), Some("abc-1")),
            "/reviews/0?u=1",
            None,
        );
        assert_eq!(
            got[0],
            Message {
                dir: Dir::Send,
                ts_ns: 1000,
                tid: 7,
                offset: 0,
                head: expect_req
            }
        );
        assert_eq!(
            got[1],
            Message {
                dir: Dir::Recv,
                ts_ns: 1002,
                tid: 7,
                offset: 0,
                head: resp_len(200, Some("abc-1"), Some(10))
            }
        );

        // Next exchange on the same connection starts where the first ended.
        let send_off = (req1.len() + req2.len()) as u64;
        let next = f.push(&chunk(
            Dir::Send,
            2000,
            send_off,
            b"GET /b HTTP/1.1\r\n\r\n",
        ));
        assert_eq!(next.map(|m| (m.offset, m.ts_ns)), Some((send_off, 2000)));
        let recv_off = (resp1.len() + 10) as u64;
        let next = f.push(&chunk(
            Dir::Recv,
            2001,
            recv_off,
            b"HTTP/1.1 404 Not Found\r\n\r\n",
        ));
        assert_eq!(
            next.map(|m| (m.offset, m.head)),
            Some((recv_off, resp(404, None)))
        );
        assert_eq!(
            f.stats(),
            FramerStats {
                messages: 4,
                ..FramerStats::default()
            }
        );
    }

    #[test]
    fn known_content_length_splits_pipelined_requests() {
        let mut f = Framer::new();
        let head = b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 4000\r\n\r\n";
        let len = head.len() as u64 + 4000;
        // The body is beyond the prefix: only the head is seen.
        let first = Chunk {
            len: len as u32,
            ..chunk(Dir::Send, 1, 0, head)
        };
        assert!(f.push(&first).is_some());
        let second = f.push(&chunk(
            Dir::Send,
            2,
            len,
            b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n",
        ));
        let second = second.expect("pipelined request");
        assert_eq!(second.offset, len);
        assert_eq!(second.head, req("GET", "/b", Some("h"), None));
        let stats = f.stats();
        assert_eq!((stats.messages, stats.pipelined), (2, 1));
    }

    #[test]
    fn body_split_across_writes_is_not_a_new_message() {
        let mut f = Framer::new();
        let parts: [(Dir, &[u8]); 3] = [
            (Dir::Send, b"PUT /x HTTP/1.1\r\nContent-Length: 6\r\n\r\n"),
            (Dir::Send, b"abc"),
            (Dir::Send, b"def"),
        ];
        assert_eq!(feed(&mut f, &parts).len(), 1);
        assert_eq!(f.stats().pipelined, 0);
    }

    #[test]
    fn chunked_response_over_several_writes_is_one_message() {
        let mut f = Framer::new();
        let parts: [(Dir, &[u8]); 5] = [
            (Dir::Send, b"GET / HTTP/1.1\r\n\r\n"),
            (
                Dir::Recv,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            ),
            (Dir::Recv, b"5\r\nhello\r\n"),
            (Dir::Recv, b"5\r\nworld\r\n"),
            (Dir::Recv, b"0\r\n\r\n"),
        ];
        let got = feed(&mut f, &parts);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].head, resp(200, None));
        assert_eq!(f.stats().pipelined, 0);
    }

    #[test]
    fn body_after_100_continue_belongs_to_the_request() {
        let mut f = Framer::new();
        let parts: [(Dir, &[u8]); 4] = [
            (
                Dir::Send,
                b"POST /p HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            ),
            (Dir::Recv, b"HTTP/1.1 100 Continue\r\n\r\n"),
            (Dir::Send, b"hello"),
            (
                Dir::Recv,
                b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            ),
        ];
        let heads: Vec<Head> = feed(&mut f, &parts).into_iter().map(|m| m.head).collect();
        assert_eq!(
            heads,
            [
                with_target(req("POST", "/p", None, None), "/p", Some(5)),
                resp(100, None),
                resp_len(201, None, Some(0))
            ]
        );
        // Interim then final in one write each, same direction: not pipelining.
        let parts: [(Dir, &[u8]); 3] = [
            (Dir::Send, b"GET /q HTTP/1.1\r\n\r\n"),
            (Dir::Recv, b"HTTP/1.1 103 Early Hints\r\n\r\n"),
            (Dir::Recv, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ];
        let mut g = Framer::new();
        assert_eq!(feed(&mut g, &parts).len(), 3);
        assert_eq!(f.stats().pipelined + g.stats().pipelined, 0);
    }

    #[test]
    fn response_to_head_has_no_body() {
        let mut f = Framer::new();
        let parts: [(Dir, &[u8]); 4] = [
            (Dir::Send, b"HEAD /a HTTP/1.1\r\n\r\n"),
            (Dir::Send, b"GET /b HTTP/1.1\r\n\r\n"),
            (
                Dir::Recv,
                b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
            ),
            (Dir::Recv, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ];
        assert_eq!(feed(&mut f, &parts).len(), 4);
        assert_eq!(f.stats().pipelined, 2);
    }

    #[test]
    fn several_messages_in_one_write_do_not_misplace_later_starts() {
        let mut f = Framer::new();
        let parts: [(Dir, &[u8]); 2] = [
            (
                Dir::Send,
                b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nHost: ",
            ),
            (Dir::Send, b"h\r\n\r\n"),
        ];
        assert_eq!(feed(&mut f, &parts).len(), 1);
    }

    #[test]
    fn partial_head_still_gives_the_request_line() {
        let mut f = Framer::new();
        let prefix = b"GET /productpage?u=1 HTTP/1.1\r\nHost: productpage:9080\r\nx-request-id: 12";
        let first = Chunk {
            len: 2000,
            ..chunk(Dir::Recv, 5, 0, prefix)
        };
        let m = f.push(&first).expect("message");
        assert_eq!(
            m.head,
            with_target(
                req("GET", "/productpage", Some("productpage:9080"), None),
                "/productpage?u=1",
                None
            )
        );
        // Unknown length: the next chunk in the same direction continues it.
        assert!(f
            .push(&chunk(Dir::Recv, 6, 2000, b"GET / HTTP/1.1\r\n\r\n"))
            .is_none());

        let heads = [
            (
                &b"DELETE /very/long/pa"[..],
                req("DELETE", "/very/long/pa", None, None),
            ),
            (b"GET /x HTTP/1.1\r", req("GET", "/x", None, None)),
            (b"HTTP/1.1 503 Service Unavail", resp(503, None)),
            (
                b"HTTP/1.1 200 OK\r\nx-request-id: r1\r\nServer: env",
                resp(200, Some("r1")),
            ),
            (b"HTTP/1.1 5", resp(0, None)),
        ];
        for (prefix, head) in heads {
            let c = Chunk {
                len: 4096,
                ..chunk(Dir::Send, 1, 0, prefix)
            };
            assert_eq!(Framer::new().push(&c).map(|m| m.head), Some(head));
        }
    }

    #[test]
    fn end_to_end_lines_compare_by_name_and_value() {
        let lines = |head: &str| match http_head(head.as_bytes()) {
            Some(Head::Request { end_to_end, .. }) => end_to_end,
            other => panic!("{other:?}"),
        };
        let a = lines("GET / HTTP/1.1\r\nCookie: s=1\r\nAccept: */*\r\n\r\n");
        // Names compare without case, values trimmed.
        let same = lines("GET / HTTP/1.1\r\ncookie:  s=1 \r\nVia: p\r\n\r\n");
        let other = lines("GET / HTTP/1.1\r\nCookie: s=2\r\n\r\n");
        assert!(!a.differs(&same) && !same.differs(&a));
        assert!(a.differs(&other) && other.differs(&a));
        // A line only one side shows, or that a proxy sets, is no evidence.
        let none = lines("GET / HTTP/1.1\r\nX-Forwarded-For: 9\r\nTE: trailers\r\n\r\n");
        assert!(!a.differs(&none));
        assert_eq!(none, EndToEnd::default());
        // A name twice (a proxy may join the lines) is no evidence either.
        let twice = lines("GET / HTTP/1.1\r\nCookie: s=2\r\nCookie: t=3\r\n\r\n");
        assert!(!a.differs(&twice) && !twice.differs(&a));
        // Nor is a name longer than 64 bytes.
        let long = format!("GET / HTTP/1.1\r\n{}: 1\r\n\r\n", "n".repeat(65));
        assert_eq!(lines(&long), EndToEnd::default());
        // A line the prefix cuts is not kept.
        let cut = lines("GET / HTTP/1.1\r\nAccept: */*\r\nCookie: s=");
        assert!(!a.differs(&cut));
    }

    #[test]
    fn long_values_are_bounded() {
        let path = format!("/{}?q", "a".repeat(300));
        let id = "é".repeat(100);
        let head = format!("GET {path} HTTP/1.1\r\nx-request-id: {id}\r\n\r\n");
        let m = Framer::new().push(&chunk(Dir::Send, 1, 0, head.as_bytes()));
        let Some(Message {
            head: Head::Request {
                path, request_id, ..
            },
            ..
        }) = m
        else {
            panic!("not a request: {m:?}");
        };
        assert_eq!(path.len(), MAX_PATH);
        assert_eq!(request_id.map(|r| r.len()), Some(128));
    }

    #[test]
    fn the_callers_trace_context_is_read_w3c_first() {
        let trace = |head: &str| match Framer::new()
            .push(&chunk(Dir::Send, 1, 0, head.as_bytes()))
            .map(|m| m.head)
        {
            Some(Head::Request { trace_context, .. }) => trace_context.map(|t| t.trace_hex()),
            other => panic!("not a request: {other:?}"),
        };
        let w3c = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n";
        let b3 = "b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n";
        let pair = "X-B3-TraceId: a3ce929d0e0e4736\r\nX-B3-SpanId: 00f067aa0ba902b7\r\n";
        let get = |headers: &str| format!("GET / HTTP/1.1\r\nhost: a\r\n{headers}\r\n");
        assert_eq!(
            trace(&get(&format!("{b3}{pair}{w3c}"))).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            trace(&get(&format!("{pair}{b3}"))).as_deref(),
            Some("80f198ee56343ba864fe8b2a57d3eff7")
        );
        assert_eq!(
            trace(&get(pair)).as_deref(),
            Some("0000000000000000a3ce929d0e0e4736")
        );
        assert_eq!(trace(&get("traceparent: junk\r\n")), None);
        // A head cut by the prefix still yields the lines it holds whole.
        assert_eq!(
            trace(&format!("GET / HTTP/1.1\r\n{w3c}x-cut: ab")).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn tls_is_opaque_and_framed_by_direction() {
        let mut f = Framer::new();
        let hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
        let server = [0x16, 0x03, 0x03, 0x00, 0x7a, 0x02];
        let ccs = [0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
        let app = [0x17, 0x03, 0x03, 0x00, 0x20];
        let alert = [0x15, 0x03, 0x03, 0x00, 0x02];
        let pushes: [(Dir, u64, u32, &[u8]); 6] = [
            (Dir::Send, 0, 517, &hello),
            (Dir::Recv, 0, 1400, &server),
            (Dir::Recv, 1400, 600, &app),
            (Dir::Send, 517, 6, &ccs),
            (Dir::Send, 523, 100, &app),
            (Dir::Recv, 2000, 31, &alert),
        ];
        let mut starts = Vec::new();
        for (i, (dir, offset, len, prefix)) in pushes.into_iter().enumerate() {
            let c = Chunk {
                len,
                ..chunk(dir, i as u64, offset, prefix)
            };
            if let Some(m) = f.push(&c) {
                assert_eq!(m.head, Head::Opaque { tls: true });
                starts.push((m.dir, m.offset, m.ts_ns));
            }
        }
        // Application data right after a handshake flight, in the same
        // direction, starts its own message: it is the first request or
        // response, not more of the handshake.
        let expect = [
            (Dir::Send, 0, 0),
            (Dir::Recv, 0, 1),
            (Dir::Recv, 1400, 2),
            (Dir::Send, 517, 3),
            (Dir::Send, 523, 4),
            (Dir::Recv, 2000, 5),
        ];
        assert_eq!(starts, expect);
        assert_eq!(f.stats().opaque, 6);
    }

    #[test]
    fn other_bytes_are_opaque_and_broken_http_is_malformed() {
        let cases: [(&[u8], Head); 8] = [
            (b"\x00\x00\x00\x12hello", Head::Opaque { tls: false }),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                Head::Opaque { tls: false },
            ),
            (b"GETX / HTTP/1.1\r\n", Head::Opaque { tls: false }),
            (b"", Head::Opaque { tls: false }),
            (b"GET \x01\x02 nonsense\r\n\r\n", Head::Malformed),
            (b"GET / HTTP/9.9\r\n\r\n", Head::Malformed),
            (b"HTTP/1.1 abc OK\r\n\r\n", Head::Malformed),
            (b"POST / HTTP/1.1\r\nbad header\r\n\r\n", Head::Malformed),
        ];
        for (prefix, head) in cases {
            let mut f = Framer::new();
            let c = Chunk {
                len: 64,
                ..chunk(Dir::Send, 1, 0, prefix)
            };
            assert_eq!(f.push(&c).map(|m| m.head), Some(head.clone()), "{prefix:?}");
            let stats = f.stats();
            assert_eq!(stats.malformed, u64::from(head == Head::Malformed));
        }
    }

    #[test]
    fn gaps_backwards_offsets_and_empty_chunks() {
        let mut f = Framer::new();
        let body = b"xxxxxxxxxx";
        let head = b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let at = head.len() as u64;
        assert!(f.push(&chunk(Dir::Send, 1, 0, head)).is_some());
        // Zero-length chunks are ignored, even with a stray prefix.
        let empty = Chunk {
            len: 0,
            ..chunk(Dir::Send, 2, at, b"GET / HTTP/1.1\r\n\r\n")
        };
        assert!(f.push(&empty).is_none());
        assert!(f.push(&chunk(Dir::Send, 3, at, body)).is_none());
        // Gap forwards, then backwards: both start messages.
        assert_eq!(
            f.push(&chunk(Dir::Send, 4, 500, body)).map(|m| m.offset),
            Some(500)
        );
        assert_eq!(
            f.push(&chunk(Dir::Send, 5, 10, body)).map(|m| m.offset),
            Some(10)
        );
        // A prefix longer than the bytes moved is cut to them.
        let short = Chunk {
            len: 3,
            ..chunk(Dir::Recv, 6, 0, b"HTTP/1.1 200 OK\r\n\r\n")
        };
        assert_eq!(
            f.push(&short).map(|m| m.head),
            Some(Head::Opaque { tls: false })
        );
        // Offsets at the end of the u64 range.
        let top = Chunk {
            len: 10,
            ..chunk(Dir::Recv, 7, u64::MAX - 3, body)
        };
        assert!(f.push(&top).is_some());
        assert!(f.push(&chunk(Dir::Recv, 8, 0, body)).is_some());
        assert_eq!(f.stats().pipelined, 0);
    }

    #[test]
    fn a_head_with_more_lines_than_the_stack_slots_keeps_its_identity() {
        // 200 short lines of a sidecar's own before Host and the id, whole
        // (a request head's capture) and cut before its end.
        let mut head = b"GET /reviews/0 HTTP/1.1\r\n".to_vec();
        for i in 0..200 {
            head.extend(format!("x-m{i}: 1\r\n").as_bytes());
        }
        head.extend(b"host: reviews:9080\r\nx-request-id: abc\r\n");
        for cut in [&b"\r\n"[..], &b"x-cut"[..]] {
            let mut bytes = head.clone();
            bytes.extend(cut);
            let Some(Head::Request {
                host, request_id, ..
            }) = http_head(&bytes)
            else {
                panic!("no request head");
            };
            assert_eq!(host.as_deref(), Some("reviews:9080"));
            assert_eq!(request_id.as_deref(), Some("abc"));
        }
    }

    #[test]
    fn template_path_cases() {
        let cases = [
            ("/reviews/0", "/reviews/:id"),
            ("/reviews/0?x=1#top", "/reviews/:id"),
            (
                "/api/v1/users/3f2c1b9e-8d4a-4c1e-9b7a-0e5d6c4b3a21/orders?x=1",
                "/api/v1/users/:id/…",
            ),
            (
                "/api/v1/users/abcdefab-cdef-abcd-efab-cdefabcdefab",
                "/api/v1/users/:id",
            ),
            ("/blob/5f2b9c8e0a1d4e7f9b3c", "/blob/:id"),
            ("/t/aGVsbG8gd29ybGQxMjM0NTY=", "/t/:id"),
            ("/Products/ShortV2", "/Products/ShortV2"),
            (
                "/static/aaaaaaaaaaaaaaaaaaaa",
                "/static/aaaaaaaaaaaaaaaaaaaa",
            ),
            ("/a/b/c/d", "/a/b/c/d"),
            ("/a/b/c/d/e/f", "/a/b/c/d/…"),
            ("/a//b/", "/a/b"),
            ("/", "/"),
            ("", "/"),
            ("?q=1", "/"),
            ("*", "*"),
            ("http://reviews:9080/reviews/12", "/reviews/:id"),
            ("http://reviews:9080", "/"),
        ];
        for (path, want) in cases {
            assert_eq!(template_path(path), want, "{path}");
        }
    }

    /// Deterministic xorshift64 generator for the fuzz test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const FRAGMENTS: [&[u8]; 12] = [
        b"GET /reviews/0 HTTP/1.1\r\nHost: reviews\r\nx-request-id: a\r\n\r\n",
        b"POST /p HTTP/1.1\r\nContent-Length: 100\r\n\r\n",
        b"HEAD / HTTP/1.1\r\n\r\n",
        b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"CONNECT h:443 HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"\x16\x03\x01\x02\x00",
        b"\x17\x03\x03",
        b"GET ",
    ];

    fn random_prefix(rng: &mut Rng, buf: &mut Vec<u8>) {
        buf.clear();
        while buf.len() < 256 && rng.below(3) != 0 {
            if rng.below(2) == 0 {
                let frag = FRAGMENTS[rng.below(FRAGMENTS.len() as u64) as usize];
                let cut = rng.below(frag.len() as u64 + 1) as usize;
                buf.extend_from_slice(&frag[..cut]);
            } else {
                let n = rng.below(16);
                buf.extend((0..n).map(|_| rng.next() as u8));
            }
        }
        buf.truncate(256);
    }

    #[test]
    fn fuzz_never_panics_and_keeps_stats_consistent() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut f = Framer::new();
        let mut next = [0u64; 2];
        let mut prefix = Vec::new();
        let mut reported = 0u64;
        for i in 0..200_000u64 {
            let dir = if rng.below(3) == 0 {
                Dir::Recv
            } else {
                Dir::Send
            };
            random_prefix(&mut rng, &mut prefix);
            // Sometimes the whole write is seen, so that known ends line up.
            let len = match rng.below(8) {
                0 => prefix.len() as u32,
                _ => rng.below(4097) as u32,
            };
            let offset = match rng.below(10) {
                0 => rng.next(),
                1 => next[dir.index()].saturating_sub(rng.below(100)),
                _ => next[dir.index()],
            };
            let c = Chunk {
                ts_ns: i,
                tid: rng.next() as u32,
                dir,
                offset,
                len,
                prefix: &prefix,
            };
            if let Some(m) = f.push(&c) {
                assert_eq!((m.dir, m.offset, m.ts_ns), (dir, offset, i));
                reported += 1;
            }
            next[dir.index()] = offset.wrapping_add(u64::from(len));
        }
        let stats = f.stats();
        assert_eq!(stats.messages, reported);
        assert!(stats.messages >= stats.malformed + stats.opaque);
        assert!(stats.pipelined <= stats.messages);
        assert!(stats.malformed > 0 && stats.opaque > 0 && stats.pipelined > 0);
    }
}
