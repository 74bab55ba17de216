//! HTTP/2 from the frames the kernel walks out of each connection that
//! began with HTTP/2 (`mesh-trace-ebpf/src/probes/h2.rs`): header blocks
//! gathered from HEADERS, PUSH_PROMISE and CONTINUATION frames (their
//! payload continued across sends and receives by sequence number),
//! decoded with one HPACK decoder per connection and direction, and the
//! frames that end or reset streams.
//!
//! HPACK is a shared state: one block missed or cut leaves every later
//! block of that direction undecodable, or worse, decoded wrong (an index
//! into a table that is no longer the sender's). So a direction is decoded
//! only while every byte of every block has been seen in order; from the
//! first gap (the kernel lost the frame boundaries, a block past
//! `H2_BLOCK_MAX`, bytes out of place, a block the decoder refuses) it is
//! lost for good, and each header block it carries afterwards is reported
//! as [`H2Message::Undecodable`], never guessed at.
use std::borrow::Cow;

use lru::LruCache;
use mesh_trace_common::{DIR_RECV, H2_BLOCK_MAX, H2_WHAT_CONTINUED, H2_WHAT_FRAME};

use crate::kernel::events::H2Frame;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const PUSH_PROMISE: u8 = 5;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Largest dynamic table a peer may ask a decoder to keep (bytes as HPACK
/// counts them). Peers rarely go past the default 4,096; this bounds the
/// memory of one direction of one connection.
pub const MAX_TABLE: usize = 65_536;
/// Most header bytes of one block gathered (several frames of up to
/// `H2_BLOCK_MAX` each); past it the direction is lost.
pub const MAX_BLOCK: usize = 4 * H2_BLOCK_MAX;
/// Values longer than this are cut (a path, an authority, an id).
const MAX_VALUE: usize = 256;

/// What a request or response shows in its header block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct H2Fields {
    pub method: Option<String>,
    pub path: Option<String>,
    pub authority: Option<String>,
    pub status: Option<u16>,
    pub content_type: Option<String>,
    pub content_length: Option<u64>,
    pub request_id: Option<String>,
    /// gRPC's status, in the trailers (or a trailers-only response).
    pub grpc_status: Option<u32>,
}

impl H2Fields {
    fn note(&mut self, name: &[u8], value: &[u8]) {
        let text = || {
            let v = &value[..value.len().min(MAX_VALUE)];
            String::from_utf8_lossy(v).into_owned()
        };
        let number = || std::str::from_utf8(value).ok()?.trim().parse().ok();
        match name {
            b":method" => self.method = Some(text()),
            b":path" => self.path = Some(text()),
            b":authority" => self.authority = Some(text()),
            // A proxy converting HTTP/1.1 may keep `Host` instead.
            b"host" if self.authority.is_none() => self.authority = Some(text()),
            b":status" => self.status = number().and_then(|n: u64| u16::try_from(n).ok()),
            b"content-type" => self.content_type = Some(text()),
            b"content-length" => self.content_length = number(),
            b"x-request-id" => self.request_id = Some(text()),
            b"grpc-status" => self.grpc_status = number().and_then(|n: u64| u32::try_from(n).ok()),
            _ => {}
        }
    }

    /// A request's head (it has a method), not a response's or trailers.
    pub fn is_request(&self) -> bool {
        self.method.is_some()
    }

    /// gRPC, by its content type.
    pub fn is_grpc(&self) -> bool {
        self.content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("application/grpc"))
    }
}

/// What the frames of one connection direction say, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum H2Message {
    /// A whole header block: a request's or response's head, or trailers.
    Headers {
        stream_id: u32,
        /// Sequence number and time of its first frame.
        seq: u32,
        ts_ns: u64,
        /// The stream ends with this block (no body, or trailers).
        end_stream: bool,
        fields: H2Fields,
    },
    /// A DATA frame that ends its stream.
    EndStream {
        stream_id: u32,
        seq: u32,
        ts_ns: u64,
    },
    /// The stream was reset (RST_STREAM), with its error code.
    Reset {
        stream_id: u32,
        ts_ns: u64,
        error_code: u32,
    },
    /// The connection goes away: streams above `last_stream_id` were not
    /// processed.
    GoAway { last_stream_id: u32, ts_ns: u64 },
    /// A header block of a direction whose HPACK state is lost: its stream
    /// cannot be known for what it is.
    Undecodable {
        stream_id: u32,
        seq: u32,
        ts_ns: u64,
        end_stream: bool,
    },
}

/// Why a direction's header state was lost (for metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LostBecause {
    /// The kernel lost the frame boundaries (bytes unwalked, bounds).
    Walk,
    /// A header frame or block longer than what is captured.
    TooLong,
    /// Header bytes missing or out of place.
    Gap,
    /// The decoder refused a block (it was not what the sender encoded).
    Refused,
}

impl LostBecause {
    pub const ALL: [LostBecause; 4] = [
        LostBecause::Walk,
        LostBecause::TooLong,
        LostBecause::Gap,
        LostBecause::Refused,
    ];

    pub fn label(self) -> &'static str {
        match self {
            LostBecause::Walk => "walk",
            LostBecause::TooLong => "too_long",
            LostBecause::Gap => "gap",
            LostBecause::Refused => "refused",
        }
    }
}

/// A header block being gathered.
struct Block {
    stream_id: u32,
    seq: u32,
    ts_ns: u64,
    end_stream: bool,
    /// PUSH_PROMISE: a block for a promised stream, decoded only to keep
    /// the table.
    push: bool,
    /// The fragments of the frames done.
    bytes: Vec<u8>,
    /// The current frame's payload as far as it came, the length it will
    /// have, where its next bytes start, its type and flags.
    frame: Vec<u8>,
    frame_len: usize,
    next_seq: u32,
    frame_type: u8,
    frame_flags: u8,
}

/// One direction of a connection.
struct Direction {
    hpack: loona_hpack::Decoder<'static>,
    lost: bool,
    /// The kernel stopped walking its frames: none come any more.
    unwalked: bool,
    block: Option<Block>,
}

impl Direction {
    fn new() -> Direction {
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(MAX_TABLE);
        Direction {
            hpack,
            lost: false,
            unwalked: false,
            block: None,
        }
    }
}

/// Connections decoded at once; the least recently active go first.
pub const MAX_CONNECTIONS: usize = 16_384;

/// HPACK decoding state of every HTTP/2 connection direction seen.
pub struct H2Decoder {
    conns: LruCache<(u64, bool), Direction>,
    /// Directions lost, by why.
    pub lost: std::collections::HashMap<LostBecause, u64>,
    /// Header blocks decoded, and those that could not be (their
    /// direction's state was lost).
    pub blocks: [u64; 2],
}

impl Default for H2Decoder {
    fn default() -> Self {
        H2Decoder::new(MAX_CONNECTIONS)
    }
}

impl H2Decoder {
    pub fn new(max_connections: usize) -> H2Decoder {
        H2Decoder {
            conns: LruCache::new(
                std::num::NonZeroUsize::new(2 * max_connections.max(1)).expect("non-zero"),
            ),
            lost: std::collections::HashMap::new(),
            blocks: [0; 2],
        }
    }

    /// Directions of connections held.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Whether the kernel stopped walking the frames of a direction of
    /// socket `cookie` (it lost their boundaries): what goes by there from
    /// then on is reported by no frame.
    pub fn unwalked(&self, cookie: u64, recv: bool) -> bool {
        self.conns.peek(&(cookie, recv)).is_some_and(|d| d.unwalked)
    }

    /// Forgets a closed socket's state.
    pub fn closed(&mut self, cookie: u64) {
        self.conns.pop(&(cookie, false));
        self.conns.pop(&(cookie, true));
    }

    /// Every direction loses its state: the ring buffer dropped events,
    /// which may have been any connection's frames.
    pub fn lose_all(&mut self) {
        let n = self.conns.len() as u64;
        for (_, d) in self.conns.iter_mut() {
            d.lost = true;
            d.block = None;
        }
        if n > 0 {
            *self.lost.entry(LostBecause::Walk).or_default() += n;
        }
    }

    /// Feeds one frame event; what it completes goes to `out`.
    pub fn frame(&mut self, f: &H2Frame, out: &mut Vec<H2Message>) {
        let key = (f.sock_cookie, f.direction & DIR_RECV != 0);
        let d = self.conns.get_or_insert_mut(key, Direction::new);
        let before = out.len();
        let result = step(d, f, out);
        for m in &out[before..] {
            match m {
                H2Message::Headers { .. } => self.blocks[0] += 1,
                H2Message::Undecodable { .. } => self.blocks[1] += 1,
                _ => {}
            }
        }
        let lost = match result {
            Ok(()) => return,
            Err(why) => why,
        };
        if !d.lost {
            d.lost = true;
            *self.lost.entry(lost).or_default() += 1;
        }
        // A block begun when it was lost is reported undecodable, once.
        if let Some(b) = d.block.take() {
            if !b.push {
                self.blocks[1] += 1;
                out.push(H2Message::Undecodable {
                    stream_id: b.stream_id,
                    seq: b.seq,
                    ts_ns: b.ts_ns,
                    end_stream: b.end_stream,
                });
            }
        }
    }
}

/// One frame event on direction `d`.
fn step(d: &mut Direction, f: &H2Frame, out: &mut Vec<H2Message>) -> Result<(), LostBecause> {
    match f.what {
        H2_WHAT_FRAME => {}
        H2_WHAT_CONTINUED => {
            let Some(b) = d.block.as_mut().filter(|_| !d.lost) else {
                return Ok(());
            };
            if f.seq != b.next_seq || b.frame.len() + f.payload.len() > b.frame_len {
                return Err(LostBecause::Gap);
            }
            b.frame.extend_from_slice(&f.payload);
            b.next_seq = b.next_seq.wrapping_add(f.payload.len() as u32);
            return finish_frame(d, out);
        }
        _ => {
            d.unwalked = true;
            return Err(LostBecause::Walk);
        }
    }
    match f.frame_type {
        HEADERS | PUSH_PROMISE => {
            if d.block.is_some() {
                // A new block before the last one ended.
                return Err(LostBecause::Gap);
            }
            if d.lost {
                if f.frame_type == HEADERS {
                    out.push(H2Message::Undecodable {
                        stream_id: f.stream_id,
                        seq: f.seq,
                        ts_ns: f.ts_ns,
                        end_stream: f.flags & END_STREAM != 0,
                    });
                }
                return Ok(());
            }
            d.block = Some(Block {
                stream_id: f.stream_id,
                seq: f.seq,
                ts_ns: f.ts_ns,
                end_stream: f.flags & END_STREAM != 0,
                push: f.frame_type == PUSH_PROMISE,
                bytes: Vec::new(),
                frame: Vec::new(),
                frame_len: 0,
                next_seq: 0,
                frame_type: 0,
                frame_flags: 0,
            });
            begin_frame(d, f, out)
        }
        CONTINUATION => {
            if d.lost {
                return Ok(());
            }
            match &d.block {
                Some(b) if b.stream_id == f.stream_id && b.frame.len() == b.frame_len => {
                    begin_frame(d, f, out)
                }
                _ => Err(LostBecause::Gap),
            }
        }
        DATA if f.flags & END_STREAM != 0 => {
            out.push(H2Message::EndStream {
                stream_id: f.stream_id,
                seq: f.seq,
                ts_ns: f.ts_ns,
            });
            Ok(())
        }
        RST_STREAM => {
            out.push(H2Message::Reset {
                stream_id: f.stream_id,
                ts_ns: f.ts_ns,
                error_code: be32(&f.payload, 0).unwrap_or(0),
            });
            Ok(())
        }
        GOAWAY => {
            out.push(H2Message::GoAway {
                last_stream_id: be32(&f.payload, 0).unwrap_or(0) & 0x7fff_ffff,
                ts_ns: f.ts_ns,
            });
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A header frame of the current block starts with what `f` carries.
fn begin_frame(
    d: &mut Direction,
    f: &H2Frame,
    out: &mut Vec<H2Message>,
) -> Result<(), LostBecause> {
    let b = d.block.as_mut().expect("a block is being gathered");
    let len = f.length as usize;
    if len > H2_BLOCK_MAX || b.bytes.len() + len > MAX_BLOCK {
        return Err(LostBecause::TooLong);
    }
    if f.payload.len() > len {
        return Err(LostBecause::Gap);
    }
    b.frame.clear();
    b.frame.extend_from_slice(&f.payload);
    b.frame_len = len;
    // The payload starts after the frame's 9-byte header.
    b.next_seq = f.seq.wrapping_add(9 + f.payload.len() as u32);
    b.frame_type = f.frame_type;
    b.frame_flags = f.flags;
    finish_frame(d, out)
}

/// When the current frame's payload is whole: its fragment joins the block;
/// when that was the block's last frame, the block is decoded.
fn finish_frame(d: &mut Direction, out: &mut Vec<H2Message>) -> Result<(), LostBecause> {
    let b = d.block.as_mut().expect("a block is being gathered");
    if b.frame.len() < b.frame_len {
        return Ok(());
    }
    let fragment = fragment(b.frame_type, b.frame_flags, &b.frame).ok_or(LostBecause::Refused)?;
    b.bytes.extend_from_slice(fragment);
    if b.frame_flags & END_HEADERS == 0 {
        return Ok(());
    }
    let b = d.block.take().expect("a block is being gathered");
    let mut fields = H2Fields::default();
    d.hpack
        .decode_with_cb(&b.bytes, |name: Cow<[u8]>, value: Cow<[u8]>| {
            fields.note(&name, &value)
        })
        .map_err(|_| LostBecause::Refused)?;
    if !b.push {
        out.push(H2Message::Headers {
            stream_id: b.stream_id,
            seq: b.seq,
            ts_ns: b.ts_ns,
            end_stream: b.end_stream,
            fields,
        });
    }
    Ok(())
}

/// The header block fragment of a frame's payload: without its padding,
/// priority fields or promised stream id.
pub(crate) fn fragment(frame_type: u8, flags: u8, payload: &[u8]) -> Option<&[u8]> {
    if frame_type == CONTINUATION {
        return Some(payload);
    }
    let (pad, mut start) = if flags & PADDED != 0 {
        (usize::from(*payload.first()?), 1)
    } else {
        (0, 0)
    };
    if frame_type == HEADERS && flags & PRIORITY != 0 {
        start += 5;
    }
    if frame_type == PUSH_PROMISE {
        start += 4;
    }
    let end = payload.len().checked_sub(pad)?;
    payload.get(start..end)
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_trace_common::{DIR_SEND, H2_WHAT_LOST};

    /// Frame events of one direction of one connection, numbered as the
    /// kernel numbers them.
    struct Wire {
        seq: u32,
        ts_ns: u64,
        encoder: loona_hpack::Encoder<'static>,
    }

    impl Wire {
        fn new() -> Wire {
            Wire {
                seq: 1000,
                ts_ns: 0,
                encoder: loona_hpack::Encoder::new(),
            }
        }

        fn event(&mut self, frame_type: u8, flags: u8, stream_id: u32, payload: &[u8]) -> H2Frame {
            self.ts_ns += 1;
            let f = H2Frame {
                ts_ns: self.ts_ns,
                sock_cookie: 7,
                pid_tgid: 0,
                direction: DIR_SEND,
                seq: self.seq,
                length: payload.len() as u32,
                stream_id,
                frame_type,
                flags,
                what: H2_WHAT_FRAME,
                payload: payload.to_vec(),
            };
            self.seq = self.seq.wrapping_add(9 + payload.len() as u32);
            f
        }

        fn block(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
            self.encoder
                .encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
        }
    }

    fn feed(dec: &mut H2Decoder, frames: &[H2Frame]) -> Vec<H2Message> {
        let mut out = Vec::new();
        for f in frames {
            dec.frame(f, &mut out);
        }
        out
    }

    fn request(path: &str, id: &str) -> Vec<(&'static str, String)> {
        vec![
            (":method", "POST".into()),
            (":scheme", "http".into()),
            (":path", path.into()),
            (":authority", "ratings:9080".into()),
            ("content-type", "application/grpc".into()),
            ("x-request-id", id.into()),
        ]
    }

    fn as_refs<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        h.iter().map(|(n, v)| (*n, v.as_str())).collect()
    }

    #[test]
    fn requests_decode_through_the_dynamic_table() {
        let mut wire = Wire::new();
        let mut frames = Vec::new();
        // The second block refers to entries the first one added.
        for (stream, id) in [(1, "a-1"), (3, "a-2"), (5, "a-3")] {
            let block = wire.block(&as_refs(&request("/ratings.Ratings/Get", id)));
            frames.push(wire.event(HEADERS, END_HEADERS, stream, &block));
            frames.push(wire.event(DATA, END_STREAM, stream, &[0; 5]));
        }
        let out = feed(&mut H2Decoder::default(), &frames);
        let heads: Vec<&H2Fields> = out
            .iter()
            .filter_map(|m| match m {
                H2Message::Headers { fields, .. } => Some(fields),
                _ => None,
            })
            .collect();
        assert_eq!(heads.len(), 3);
        for (f, id) in heads.iter().zip(["a-1", "a-2", "a-3"]) {
            assert_eq!(f.method.as_deref(), Some("POST"));
            assert_eq!(f.path.as_deref(), Some("/ratings.Ratings/Get"));
            assert_eq!(f.authority.as_deref(), Some("ratings:9080"));
            assert_eq!(f.request_id.as_deref(), Some(id));
            assert!(f.is_grpc() && f.is_request());
        }
        let ends = out
            .iter()
            .filter(|m| matches!(m, H2Message::EndStream { .. }))
            .count();
        assert_eq!(ends, 3);
    }

    #[test]
    fn a_block_in_frames_and_pieces_is_one_head() {
        let mut wire = Wire::new();
        let block = wire.block(&as_refs(&request("/a", "split-1")));
        let (first, second) = block.split_at(block.len() / 2);
        // HEADERS, padded and with priority, cut across two calls; then a
        // CONTINUATION that ends the block.
        let mut payload = vec![3];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(first);
        payload.extend_from_slice(&[0; 3]);
        let mut head = wire.event(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload);
        let rest = head.payload.split_off(4);
        let continued = H2Frame {
            what: H2_WHAT_CONTINUED,
            seq: head.seq + 9 + 4,
            length: 0,
            payload: rest,
            ..head.clone()
        };
        let cont = wire.event(CONTINUATION, END_HEADERS, 1, second);
        let out = feed(&mut H2Decoder::default(), &[head, continued, cont]);
        match &out[..] {
            [H2Message::Headers {
                stream_id: 1,
                end_stream: true,
                fields,
                ..
            }] => assert_eq!(fields.request_id.as_deref(), Some("split-1")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lost_direction_is_never_decoded_again() {
        let mut wire = Wire::new();
        let mut dec = H2Decoder::default();
        let one = wire.block(&as_refs(&request("/one", "l-1")));
        let two = wire.block(&as_refs(&request("/two", "l-2")));
        let mut frames = vec![wire.event(HEADERS, END_HEADERS, 1, &one)];
        // The kernel lost the boundaries: the next block (which refers to
        // the first's table entries) is reported, not decoded.
        let mut lost = wire.event(0, 0, 0, &[]);
        lost.what = H2_WHAT_LOST;
        frames.push(lost);
        frames.push(wire.event(HEADERS, END_HEADERS | END_STREAM, 3, &two));
        let out = feed(&mut dec, &frames);
        assert!(matches!(&out[0], H2Message::Headers { stream_id: 1, .. }));
        assert_eq!(
            out[1],
            H2Message::Undecodable {
                stream_id: 3,
                seq: frames[2].seq,
                ts_ns: frames[2].ts_ns,
                end_stream: true
            }
        );
        assert_eq!(dec.lost.get(&LostBecause::Walk), Some(&1));
    }

    #[test]
    fn a_block_past_the_capture_loses_the_direction() {
        let mut wire = Wire::new();
        let mut dec = H2Decoder::default();
        let big = "x".repeat(H2_BLOCK_MAX + 100);
        let block = wire.block(&[(":method", "GET"), (":path", "/"), ("x-big", &big)]);
        let mut f = wire.event(HEADERS, END_HEADERS, 1, &block);
        f.payload.truncate(H2_BLOCK_MAX);
        let out = feed(&mut dec, &[f]);
        assert!(matches!(
            out[..],
            [H2Message::Undecodable { stream_id: 1, .. }]
        ));
        assert_eq!(dec.lost.get(&LostBecause::TooLong), Some(&1));
    }

    #[test]
    fn bytes_out_of_place_lose_the_direction() {
        let mut wire = Wire::new();
        let mut dec = H2Decoder::default();
        let block = wire.block(&as_refs(&request("/gap", "g-1")));
        let mut head = wire.event(HEADERS, END_HEADERS, 1, &block);
        let rest = head.payload.split_off(3);
        let continued = H2Frame {
            what: H2_WHAT_CONTINUED,
            // One byte further than where the payload goes on.
            seq: head.seq + 9 + 3 + 1,
            payload: rest,
            ..head.clone()
        };
        let out = feed(&mut dec, &[head, continued]);
        assert!(matches!(out[..], [H2Message::Undecodable { .. }]));
        assert_eq!(dec.lost.get(&LostBecause::Gap), Some(&1));
    }

    #[test]
    fn responses_trailers_and_resets() {
        let mut wire = Wire::new();
        let head = wire.block(&[(":status", "200"), ("content-type", "application/grpc")]);
        let trailers = wire.block(&[("grpc-status", "5")]);
        let frames = [
            wire.event(HEADERS, END_HEADERS, 1, &head),
            wire.event(DATA, 0, 1, &[0; 8]),
            wire.event(HEADERS, END_HEADERS | END_STREAM, 1, &trailers),
            wire.event(RST_STREAM, 0, 3, &8u32.to_be_bytes()),
            wire.event(GOAWAY, 0, 0, &[0, 0, 0, 3, 0, 0, 0, 0]),
        ];
        let out = feed(&mut H2Decoder::default(), &frames);
        match &out[..] {
            [H2Message::Headers {
                fields: response,
                end_stream: false,
                ..
            }, H2Message::Headers {
                fields: trailers,
                end_stream: true,
                ..
            }, H2Message::Reset {
                stream_id: 3,
                error_code: 8,
                ..
            }, H2Message::GoAway {
                last_stream_id: 3, ..
            }] => {
                assert_eq!(response.status, Some(200));
                assert!(response.is_grpc() && !response.is_request());
                assert_eq!(trailers.grpc_status, Some(5));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connections_are_bounded_and_forgotten_at_close() {
        let mut wire = Wire::new();
        let mut dec = H2Decoder::new(4);
        let block = wire.block(&[(":status", "204")]);
        let mut out = Vec::new();
        for cookie in 0..100 {
            let mut f = wire.event(HEADERS, END_HEADERS, 1, &block);
            f.sock_cookie = cookie;
            // Each connection's own table: a fresh encoder per block would
            // be the same bytes; the first block of each decodes alone.
            dec.frame(&f, &mut out);
        }
        assert!(dec.len() <= 8);
        dec.closed(99);
        assert!(dec.len() <= 7);
    }
}
