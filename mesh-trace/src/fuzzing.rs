//! Entry points of the fuzz targets (`mesh-trace/fuzz/`, cargo-fuzz) and of
//! their regression tests (`tests/parsers.rs` replays every file under
//! `tests/fixtures/fuzz-regressions/<target>/`): one function per parser
//! family fed from the kernel, named as its target, that turns any bytes
//! into input for the parser, runs it and panics when a result breaks the
//! parser's stated bounds. A panic, an overflow or a hang is a bug.
use mesh_trace_common::{EventKind, DATA_FIXED_LEN, DATA_PREFIX_MAX};

use crate::{
    kernel::{
        btf::KernelBtf,
        events::{decode_record, to_json, DecodeError, Event},
    },
    spans::http::{
        is_tls_handshake, starts_http, template_path, Chunk, Dir, Framer, Head, Message,
    },
};

/// An entry point: bytes in, a panic on a bug.
pub type Target = fn(&[u8]);

/// The targets, as named in `mesh-trace/fuzz/fuzz_targets/` and in the
/// regression directories.
pub const TARGETS: [(&str, Target); 5] = [
    ("event_records", event_records),
    ("h2_frames", h2_frames),
    ("http_framing", http_framing),
    ("tls_and_templates", tls_and_templates),
    ("btf", btf),
];

/// One ring buffer record, as the agent reads it: a single event or a batch
/// of data events (`decode_record`), each decoded event then shown as
/// `--print-events` does.
pub fn event_records(data: &[u8]) {
    let mut out = Vec::new();
    decode_record(data, &mut out);
    let batch = Event::decode(data) == Err(DecodeError::Batch);
    if !batch {
        assert_eq!(out.len(), 1, "one event per record outside batches");
    }
    // Entries are at least 8 bytes apart after the batch's header.
    assert!(out.len() <= data.len() / 8 + 1, "{} results", out.len());
    for ev in out.iter().flatten() {
        if batch {
            let Event::Data(d) = ev else {
                panic!("a batch holds data events only: {ev:?}");
            };
            assert!(d.prefix_len as usize <= DATA_PREFIX_MAX);
            assert!(DATA_FIXED_LEN + d.prefix_len as usize <= data.len());
        } else {
            let kind = u32::from_ne_bytes(data[..4].try_into().expect("4 bytes"));
            assert_eq!(EventKind::from_u32(kind), Some(ev.kind()));
        }
        let _ = (ev.sock_cookie(), ev.ts_ns());
        let _ = to_json(ev);
    }
}

/// HTTP/2 frame events of a few connections, as the kernel's walk reports
/// them, through the agent's header decoding. The input is a sequence of
/// events, each `[control, type, flags, stream, n, n bytes of payload]`
/// (a short last one takes what is left). Control bits 0-1: the socket (of
/// four); bit 2: the direction; bits 3-4: what it is (frame, continued
/// bytes, the walk's loss, frame again); bits 5-7: where it starts (0-5
/// where its direction left off, 6 a byte further, 7 far off). The payload
/// is often a real header block: bit 0 of `stream` set, `n` picks how many
/// of a few encoded heads are glued before the bytes.
pub fn h2_frames(data: &[u8]) {
    use mesh_trace_common::{H2_BLOCK_MAX, H2_WHAT_CONTINUED, H2_WHAT_FRAME, H2_WHAT_LOST};

    use crate::spans::h2::{H2Decoder, H2Message};

    let mut decoder = H2Decoder::new(2);
    let mut encoder = loona_hpack::Encoder::new();
    let mut next = [0u32; 8];
    let mut rest = data;
    let mut frames = 0usize;
    let mut out = Vec::new();
    while let [control, kind, flags, stream, n, tail @ ..] = rest {
        let (raw, after) = tail.split_at(usize::from(*n).min(tail.len()));
        rest = after;
        frames += 1;
        let side = usize::from(control & 7);
        let mut payload = Vec::new();
        if stream & 1 == 1 {
            for i in 0..(n % 4) {
                let path = format!("/svc.Method/{i}");
                payload.extend(encoder.encode([
                    (&b":method"[..], &b"POST"[..]),
                    (b":path", path.as_bytes()),
                    (b"content-type", b"application/grpc"),
                ]));
            }
        }
        payload.extend_from_slice(raw);
        let seq = match control >> 5 {
            0..=5 => next[side],
            6 => next[side].wrapping_add(1),
            _ => next[side].wrapping_add(1 << 30),
        };
        let what = match (control >> 3) & 3 {
            1 => H2_WHAT_CONTINUED,
            2 => H2_WHAT_LOST,
            _ => H2_WHAT_FRAME,
        };
        next[side] = seq.wrapping_add(9 + payload.len() as u32);
        let f = crate::kernel::events::H2Frame {
            ts_ns: frames as u64,
            sock_cookie: u64::from(control & 3),
            pid_tgid: 0,
            direction: u32::from((control >> 2) & 1),
            seq,
            length: payload.len() as u32 + u32::from(*flags & 0x40) * 64,
            stream_id: u32::from(*stream >> 1),
            frame_type: *kind % 11,
            flags: *flags,
            what,
            payload: payload[..payload.len().min(H2_BLOCK_MAX)].to_vec(),
        };
        decoder.frame(&f, &mut out);
    }
    // Bounded: at most one message per event; connections as many as the
    // decoder holds; every head's values cut to their bound.
    assert!(
        out.len() <= frames,
        "{} messages of {frames} events",
        out.len()
    );
    assert!(decoder.len() <= 4, "{} directions held", decoder.len());
    for m in &out {
        if let H2Message::Headers { fields, .. } = m {
            for v in [
                &fields.method,
                &fields.path,
                &fields.authority,
                &fields.request_id,
            ]
            .into_iter()
            .flatten()
            {
                assert!(v.len() <= 3 * 256, "{v:?}");
            }
        }
    }
}

/// A connection's chunks, both directions, as the data path reports them.
/// The input is a sequence of chunks, each `[control, n, n bytes of prefix]`
/// (a short last one takes what is left). Control bit 0: the direction
/// (0 send, 1 receive); bits 1-3: where it starts (0-3 where its direction
/// left off, 4 a million bytes further, as after lost events, 5 one byte
/// back, 6 one byte ahead, 7 near the end of the offset space); bits 4-7:
/// bytes moved (0 the prefix's length, 1-13 more than the prefix, 14
/// `u32::MAX`, 15 half the prefix: fewer bytes than the prefix holds).
pub fn http_framing(data: &[u8]) {
    let mut framer = Framer::new();
    let mut next = [0u64; 2];
    let mut rest = data;
    let mut started = 0u64;
    let mut ts_ns = 0u64;
    while let [control, n, tail @ ..] = rest {
        let (prefix, after) = tail.split_at(usize::from(*n).min(tail.len()));
        rest = after;
        ts_ns += 1;
        let dir = if control & 1 == 0 {
            Dir::Send
        } else {
            Dir::Recv
        };
        let side = usize::from(control & 1);
        let offset = match (control >> 1) & 7 {
            0..=3 => next[side],
            4 => next[side].saturating_add(1_000_000),
            5 => next[side].saturating_sub(1),
            6 => next[side].saturating_add(1),
            _ => u64::MAX - u64::from(*n),
        };
        let prefix_len = prefix.len() as u32;
        let len = match control >> 4 {
            0 => prefix_len,
            14 => u32::MAX,
            15 => prefix_len / 2,
            k => prefix_len + u32::from(k) * u32::from(k) * 97,
        };
        next[side] = offset.saturating_add(u64::from(len));
        let chunk = Chunk {
            ts_ns,
            tid: 1,
            dir,
            offset,
            len,
            prefix,
        };
        if let Some(m) = framer.push(&chunk) {
            started += 1;
            assert!(len > 0, "a chunk that moves no bytes starts nothing");
            // A message starts at the chunk that carries it.
            assert_eq!((m.dir, m.offset, m.ts_ns), (dir, offset, ts_ns));
            check_head(&m);
        }
    }
    let stats = framer.stats();
    assert_eq!(stats.messages, started, "{stats:?}");
    assert!(
        stats.malformed + stats.opaque <= stats.messages,
        "{stats:?}"
    );
    assert!(stats.pipelined <= stats.messages, "{stats:?}");
}

/// What a message's head may hold: values within their bounds.
fn check_head(m: &Message) {
    match &m.head {
        Head::Request {
            method,
            path,
            target,
            host,
            request_id,
            ..
        } => {
            assert!(method.len() <= 7, "{method:?}");
            assert!(path.len() <= 128 && target.len() <= 256, "{:?}", m.head);
            assert!(!path.contains(['?', '#']), "{path:?}");
            assert!(host.as_ref().is_none_or(|h| h.len() <= 255), "{host:?}");
            assert!(request_id.as_ref().is_none_or(|r| r.len() <= 128));
        }
        Head::Response { request_id, .. } => {
            assert!(request_id.as_ref().is_none_or(|r| r.len() <= 128));
        }
        Head::Opaque { .. } | Head::Malformed => {}
    }
}

/// The first bytes of a message: TLS and HTTP sniffing, the head's
/// parsing (the first chunk of a connection), and the path templating of
/// metric labels, on the bytes as a path.
pub fn tls_and_templates(data: &[u8]) {
    let tls = is_tls_handshake(data);
    let http = starts_http(data);
    assert!(!(tls && http), "both TLS and HTTP");
    if !data.is_empty() {
        let chunk = Chunk {
            ts_ns: 1,
            tid: 1,
            dir: Dir::Send,
            offset: 0,
            len: u32::try_from(data.len()).unwrap_or(u32::MAX),
            prefix: data,
        };
        let m = Framer::new()
            .push(&chunk)
            .expect("a connection's first chunk starts a message");
        check_head(&m);
        match &m.head {
            Head::Request { .. } | Head::Response { .. } => assert!(http, "{:?}", m.head),
            Head::Opaque { tls: true } => assert!(matches!(data, [0x14..=0x17, 3, ..])),
            Head::Opaque { tls: false } => assert!(!http && !tls),
            Head::Malformed => assert!(http),
        }
    }
    let path = String::from_utf8_lossy(data);
    let templated = template_path(&path);
    assert!(
        templated == "*" || templated.starts_with('/'),
        "{templated:?}"
    );
    assert!(!templated.contains(['?', '#']), "{templated:?}");
    // Four segments at most, then `/…`.
    assert!(templated.split('/').count() <= 6, "{templated:?}");
    assert_eq!(template_path(&templated), templated, "not a fixed point");
}

/// A kernel's BTF (`/sys/kernel/btf/vmlinux`), then every lookup the
/// agent makes in it.
pub fn btf(data: &[u8]) {
    let Ok(btf) = KernelBtf::parse(data) else {
        return;
    };
    for (name, member) in [
        ("tcp_sock", "write_seq"),
        ("tcp_sock", "srtt_us"),
        ("sock_common", "skc_v6_daddr"),
        ("sk_buff", "cb"),
        ("nf_conn", "status"),
    ] {
        let _ = btf.member_offset(name, member);
    }
    for path in ["tuplehash.tuple.dst.u3", "tuplehash.tuple.dst.u"] {
        let _ = btf.member_path_offset("nf_conn", path);
    }
    for tp in ["sock_send_length", "sock_recv_length", "tcp_retransmit_skb"] {
        let _ = btf.tracepoint_args(tp);
    }
    let _ = btf.enum_values("sk_rst_reason");
}
