//! The join across a leg (app <-> 15001, sidecar <-> 15006, 127.0.0.6 <->
//! app): a request written by the client end is matched to the read at the
//! server end that covers the stream offset where it began, whatever the
//! bytes are (TLS included), in whichever order the two are reported.
//!
//! Stream offsets are TCP sequence numbers, the same at both ends of a
//! connection; each end's are widened to 64 bits on its own, so they are
//! compared on their low 32 bits, modulo 2^32 (a connection has far less
//! than 2 GiB in flight between a write and its read).
use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt as _};

use super::{place::Place, SpanId, Unstitched, MAX_QUEUE};
use crate::spans::http::Head;

/// How far `x` is past `from` in the sequence space: negative when before.
fn seq_delta(x: u64, from: u64) -> i64 {
    i64::from((x as u32).wrapping_sub(from as u32) as i32)
}

/// Whether stream offset `x` falls within the read `[start, end)`.
fn within(x: u64, start: u64, end: u64) -> bool {
    let d = seq_delta(x, start);
    d >= 0 && d < seq_delta(end, start)
}

/// A request written on a socket, waiting to be read at the other end.
#[derive(Clone, Copy)]
struct Sent {
    offset: u64,
    span: SpanId,
}

/// A read at the server end of a leg: the moment a request arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Arrival {
    pub(super) cookie: u64,
    pub(super) place: Place,
    pub(super) tgid: u32,
    pub(super) ts_ns: u64,
    pub(super) tid: u32,
    /// The request's head, when the read started with it.
    pub(super) head: Option<Head>,
    /// Stream range the read covered.
    pub(super) offset: u64,
    pub(super) end: u64,
    /// Where, in the other direction, the response to a request read here
    /// would start (`Outstanding`).
    pub(super) anchor: u64,
    /// The HTTP/2 stream the request is, on an HTTP/2 connection (its
    /// response is found by stream, not by order).
    pub(super) stream: Option<u32>,
    /// Its position is in a TLS session's plaintext (HTTP/2 inside TLS),
    /// not a TCP sequence number: joined among such positions only.
    pub(super) in_tls: bool,
}

/// What became of a request written by the client end of a leg.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Write {
    /// The other end had already read it: this is when it arrived.
    Read(Box<Arrival>),
    /// Waiting for the other end to read it; the reason to count when the
    /// oldest waiting write was dropped to make room.
    Queued(Option<Unstitched>),
}

/// The writes and early reads of every leg, by the cookie of the socket
/// that sends the requests.
pub(super) struct Legs {
    /// Per sending socket: requests written, not yet read at the other end,
    /// in stream order. Reads are matched by stream offset, so a read that
    /// coalesces several writes (a TLS handshake and a request) still finds
    /// the request inside it.
    sent: HashMap<u64, VecDeque<Sent>>,
    /// Per sending socket: reads reported before the matching write. On
    /// loopback the reader can run (and its event be queued) before the
    /// writer's tracepoint does.
    early: HashMap<u64, VecDeque<Arrival>>,
}

impl Legs {
    pub(super) fn new() -> Legs {
        Legs {
            sent: HashMap::new(),
            early: HashMap::new(),
        }
    }

    /// Gives back the memory of a peak of connections.
    pub(super) fn shrink(&mut self) {
        crate::shrink::shrink_sparse(&mut self.sent);
        crate::shrink::shrink_sparse(&mut self.early);
    }

    /// A request of span `span` written at stream `offset` by the sending
    /// socket `cookie`.
    pub(super) fn written(&mut self, cookie: u64, offset: u64, span: SpanId) -> Write {
        // The other end may already have read it.
        let early = self.early.get_mut(&cookie).and_then(|q| {
            let i = q.iter().position(|a| within(offset, a.offset, a.end))?;
            q.remove(i)
        });
        match early {
            Some(a) => Write::Read(Box::new(a)),
            None => {
                let mut dropped = None;
                let queue = self.sent.entry(cookie).or_default();
                if queue.len() == MAX_QUEUE {
                    queue.pop_front();
                    dropped = Some(Unstitched::Evicted);
                }
                queue.push_back(Sent { offset, span });
                Write::Queued(dropped)
            }
        }
    }

    /// A read at the server end of a leg whose sending socket is `peer`:
    /// every request written by the peer that starts inside the bytes read
    /// arrived now, and goes to `delivered` with its span (the head only
    /// when the read starts with it). A read that delivers nothing and
    /// starts a message is held for the write. Returns how many writes the
    /// read passed over: their read was never reported
    /// ([`Unstitched::NoSender`] each).
    pub(super) fn read(
        &mut self,
        peer: u64,
        a: Arrival,
        starts_message: bool,
        delivered: &mut Vec<(Arrival, SpanId)>,
    ) -> u64 {
        let mut unreported = 0;
        let mut any = false;
        while let Some(front) = self.sent.get(&peer).and_then(|q| q.front().copied()) {
            if seq_delta(front.offset, a.end) >= 0 {
                break;
            }
            self.sent.get_mut(&peer).map(VecDeque::pop_front);
            if seq_delta(front.offset, a.offset) < 0 {
                // Its read was never reported.
                unreported += 1;
                continue;
            }
            let mut arrival = a.clone();
            if seq_delta(front.offset, a.offset) != 0 {
                arrival.head = None;
            }
            delivered.push((arrival, front.span));
            any = true;
        }
        if !any && starts_message {
            let queue = self.early.entry(peer).or_default();
            if queue.len() == MAX_QUEUE {
                queue.pop_front();
            }
            queue.push_back(a);
        }
        unreported
    }

    /// Requests written by `cookie` and not yet read at the other end.
    pub(super) fn unread(&self, cookie: u64) -> impl Iterator<Item = SpanId> + '_ {
        self.sent.get(&cookie).into_iter().flatten().map(|s| s.span)
    }

    /// Forgets a closed sending socket.
    pub(super) fn closed(&mut self, cookie: u64) {
        self.sent.remove(&cookie);
        self.early.remove(&cookie);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: u64 = 1;
    const SERVER: u64 = 2;

    fn head(path: &str) -> Head {
        Head::Request {
            method: "GET".into(),
            path: path.into(),
            target: path.into(),
            host: None,
            request_id: None,
            content_length: None,
            trace_context: None,
            grpc: false,
            end_to_end: Default::default(),
        }
    }

    /// A read at the server end of `offset..end`, starting with `head`.
    fn read_at(ts_ns: u64, offset: u64, end: u64, head: Option<Head>) -> Arrival {
        Arrival {
            cookie: SERVER,
            place: Place::OutboundDown,
            tgid: 20,
            ts_ns,
            tid: 21,
            head,
            offset,
            end,
            anchor: 0,
            stream: None,
            in_tls: false,
        }
    }

    #[test]
    fn read_at_the_write_offset_delivers_it_with_its_head() {
        let mut legs = Legs::new();
        assert_eq!(legs.written(CLIENT, 0, 7), Write::Queued(None));
        let mut out = Vec::new();
        let a = read_at(100, 0, 80, Some(head("/a")));
        assert_eq!(legs.read(CLIENT, a.clone(), true, &mut out), 0);
        assert_eq!(out, vec![(a, 7)]);
        // Delivered once: the next read of the stream finds nothing.
        out.clear();
        assert_eq!(
            legs.read(CLIENT, read_at(200, 80, 90, None), false, &mut out),
            0
        );
        assert!(out.is_empty());
    }

    #[test]
    fn read_covering_two_writes_delivers_both() {
        let mut legs = Legs::new();
        legs.written(CLIENT, 0, 7);
        legs.written(CLIENT, 80, 8);
        // A third write past the read stays for a later read.
        legs.written(CLIENT, 160, 9);
        let mut out = Vec::new();
        let a = read_at(100, 0, 160, Some(head("/a")));
        assert_eq!(legs.read(CLIENT, a.clone(), true, &mut out), 0);
        let second = Arrival {
            head: None,
            ..a.clone()
        };
        assert_eq!(out, vec![(a, 7), (second, 8)]);
        out.clear();
        let later = read_at(300, 160, 240, Some(head("/c")));
        legs.read(CLIENT, later.clone(), true, &mut out);
        assert_eq!(out, vec![(later, 9)]);
    }

    #[test]
    fn read_before_its_write_is_held_until_the_write() {
        let mut legs = Legs::new();
        let mut out = Vec::new();
        let a = read_at(100, 0, 80, Some(head("/a")));
        assert_eq!(legs.read(CLIENT, a.clone(), true, &mut out), 0);
        assert!(out.is_empty());
        // A write inside the read's range finds it.
        assert_eq!(legs.written(CLIENT, 0, 7), Write::Read(Box::new(a)));
        // Taken once: the next write at the same offset waits.
        assert_eq!(legs.written(CLIENT, 0, 8), Write::Queued(None));
    }

    #[test]
    fn held_read_matches_a_write_anywhere_inside_it() {
        let mut legs = Legs::new();
        let mut out = Vec::new();
        let a = read_at(100, 40, 120, None);
        legs.read(CLIENT, a.clone(), true, &mut out);
        assert_eq!(legs.written(CLIENT, 120, 6), Write::Queued(None));
        assert_eq!(legs.written(CLIENT, 60, 7), Write::Read(Box::new(a)));
    }

    #[test]
    fn read_that_starts_no_message_is_not_held() {
        let mut legs = Legs::new();
        let mut out = Vec::new();
        legs.read(CLIENT, read_at(100, 0, 80, None), false, &mut out);
        assert_eq!(legs.written(CLIENT, 0, 7), Write::Queued(None));
    }

    #[test]
    fn write_whose_read_was_never_reported_is_counted() {
        let mut legs = Legs::new();
        legs.written(CLIENT, 0, 7);
        legs.written(CLIENT, 80, 8);
        let mut out = Vec::new();
        // The read of 0..80 was lost; this one starts at 80.
        let a = read_at(100, 80, 160, Some(head("/b")));
        assert_eq!(legs.read(CLIENT, a.clone(), true, &mut out), 1);
        assert_eq!(out, vec![(a, 8)]);
    }

    #[test]
    fn full_write_queue_drops_the_oldest_and_says_so() {
        let mut legs = Legs::new();
        for i in 0..MAX_QUEUE as u64 {
            assert_eq!(legs.written(CLIENT, i, i), Write::Queued(None));
        }
        let last = MAX_QUEUE as u64;
        assert_eq!(
            legs.written(CLIENT, last, last),
            Write::Queued(Some(Unstitched::Evicted))
        );
        // The write at offset 0 is gone; the one at 1 is still there.
        let mut out = Vec::new();
        legs.read(CLIENT, read_at(100, 0, 2, None), false, &mut out);
        assert_eq!(out.iter().map(|(_, s)| *s).collect::<Vec<_>>(), vec![1],);
    }

    #[test]
    fn legs_are_kept_apart_by_sending_socket() {
        let mut legs = Legs::new();
        legs.written(CLIENT, 0, 7);
        let mut out = Vec::new();
        let other = Arrival {
            cookie: 4,
            ..read_at(100, 0, 80, None)
        };
        legs.read(3, other, false, &mut out);
        assert!(out.is_empty());
        legs.read(CLIENT, read_at(100, 0, 80, None), false, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn offsets_match_across_the_wrap_of_the_sequence_space() {
        let mut legs = Legs::new();
        // The client end widened 0xffff_fff0 without a wrap, the server end
        // first saw the bytes after it, so their high bits differ.
        let client_offset = 0xffff_fff0u64;
        legs.written(CLIENT, client_offset, 7);
        let server_read = read_at(
            5,
            (1 << 32) + 0xffff_fff0,
            (1 << 33) + 0x10,
            Some(head("/a")),
        );
        let mut delivered = Vec::new();
        assert_eq!(legs.read(CLIENT, server_read, true, &mut delivered), 0);
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].1, 7);
        assert!(delivered[0].0.head.is_some());
        // And a read that ends before a write that starts past the wrap.
        legs.written(CLIENT, 0x20, 8);
        let before = read_at(6, 0xffff_ff00, 0xffff_ff80, None);
        delivered.clear();
        assert_eq!(legs.read(CLIENT, before, false, &mut delivered), 0);
        assert!(delivered.is_empty());
        assert_eq!(legs.unread(CLIENT).collect::<Vec<_>>(), vec![8]);
    }

    #[test]
    fn closed_sender_forgets_its_writes_and_early_reads() {
        let mut legs = Legs::new();
        legs.written(CLIENT, 200, 7);
        let mut out = Vec::new();
        // Ends before the write: held.
        legs.read(CLIENT, read_at(50, 100, 180, None), true, &mut out);
        legs.closed(CLIENT);
        legs.read(CLIENT, read_at(100, 200, 280, None), false, &mut out);
        assert!(out.is_empty());
        assert_eq!(legs.written(CLIENT, 120, 8), Write::Queued(None));
    }
}
