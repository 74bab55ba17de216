//! Every parser fed from the kernel, given bytes chosen at random within a
//! bounded number of cases (the README test command's fuzzing; each case
//! is reproducible from the seed proptest prints on failure): ring buffer
//! records, HTTP/1.1 framing of captured prefixes, HTTP/2 frames and their
//! header blocks (HPACK), TLS record sniffing, path templating and the
//! kernel's BTF. None may panic, and what they
//! return stays within its stated bounds.
//!
//! Then every input under `tests/fixtures/fuzz-regressions/<target>/`
//! (seeds at each parser's edges, and any input a fuzz target of
//! `mesh-trace/fuzz/` once crashed on), replayed through the fuzz targets'
//! own entry points (`mesh_trace::fuzzing`).
use mesh_trace::{
    kernel::{btf::KernelBtf, events::Event},
    spans::http::{is_tls_handshake, starts_http, template_path, Chunk, Dir, Framer, Head},
};
use mesh_trace_common::{
    ConnectEvent, DataEvent, EventKind, OwnerEvent, RedirectEvent, SockEvent, TcpIssueEvent,
    DATA_PREFIX_MAX, MAX_EVENT_SIZE,
};
use proptest::{prelude::*, test_runner::FileFailurePersistence};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures are shrunk and printed, and their seeds kept here (the
        // path is relative to mesh-trace/, where cargo runs the tests):
        // every later run tries them first.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fixtures/proptest-regressions/parsers.txt",
        ))),
        ..ProptestConfig::default()
    }
}

/// A record as the ring buffer could hold it: a valid or invalid kind,
/// then anything, of any length up to the largest event and a bit more.
fn record() -> impl Strategy<Value = Vec<u8>> {
    use std::mem::size_of;
    // Half of them at an event's exact size, so that many decode.
    let sizes = vec![
        size_of::<ConnectEvent>(),
        size_of::<SockEvent>(),
        size_of::<OwnerEvent>(),
        size_of::<TcpIssueEvent>(),
        size_of::<RedirectEvent>(),
        size_of::<DataEvent>(),
    ];
    let len = prop_oneof![proptest::sample::select(sizes), 0..MAX_EVENT_SIZE + 16];
    (0u32..10, len)
        .prop_flat_map(|(kind, len)| (Just(kind), proptest::collection::vec(any::<u8>(), len)))
        .prop_map(|(kind, mut bytes)| {
            if bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&kind.to_ne_bytes());
            }
            bytes
        })
}

/// Bytes that look like HTTP/1.1 often enough to reach the header parser:
/// pieces of real heads glued to random bytes.
fn http_like() -> impl Strategy<Value = Vec<u8>> {
    let pieces = prop_oneof![
        Just(b"GET /reviews/0?x=1 HTTP/1.1\r\n".to_vec()),
        Just(b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_vec()),
        Just(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()),
        Just(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()),
        Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
        Just(b"x-request-id: 0b7e1c9a\r\nHost: reviews:9080\r\n\r\n".to_vec()),
        Just(b"Content-Length: 99999999999999999999\r\n".to_vec()),
        Just(vec![0x16, 0x03, 0x01, 0x00, 0x05]),
        Just(vec![0x17, 0x03, 0x03, 0xff, 0xff]),
        proptest::collection::vec(any::<u8>(), 0..64),
    ];
    proptest::collection::vec(pieces, 0..8).prop_map(|p| p.concat())
}

/// A chunk of a connection as the data path reports it: a direction, an
/// offset near the expected one (or far from it, as after lost events), a
/// length at least its prefix, a prefix of at most DATA_PREFIX_MAX bytes.
fn chunks() -> impl Strategy<Value = Vec<(bool, i64, u32, Vec<u8>)>> {
    proptest::collection::vec((any::<bool>(), -3i64..3, 0u32..5000, http_like()), 1..40)
}

proptest! {
    #![proptest_config(config(4000))]

    #[test]
    fn ring_buffer_records_decode_or_are_refused(bytes in record()) {
        // Refused, or decoded only as the kind it names.
        if let Ok(ev) = Event::decode(&bytes) {
            let kind = u32::from_ne_bytes(bytes[..4].try_into().unwrap());
            prop_assert_eq!(EventKind::from_u32(kind), Some(ev.kind()));
        }
    }

    #[test]
    fn sniffing_and_templating_take_any_bytes(bytes in http_like()) {
        let _ = is_tls_handshake(&bytes);
        let _ = starts_http(&bytes);
        let path = String::from_utf8_lossy(&bytes);
        let templated = template_path(&path);
        prop_assert!(templated.len() <= path.len().max(16) + 16, "{templated:?}");
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn framing_takes_any_chunk_sequence(chunks in chunks()) {
        let mut framer = Framer::new();
        let mut next = [0u64; 2];
        for (i, (send, jitter, extra, prefix)) in chunks.iter().enumerate() {
            let dir = if *send { Dir::Send } else { Dir::Recv };
            let side = usize::from(!*send);
            let prefix = &prefix[..prefix.len().min(DATA_PREFIX_MAX)];
            let len = prefix.len() as u32 + extra;
            // Mostly where the stream is, sometimes a little off or far.
            let offset = match jitter {
                0 | 1 => next[side],
                2 => next[side] + 1_000_000,
                j => next[side].saturating_add_signed(*j),
            };
            next[side] = offset + u64::from(len);
            let chunk = Chunk { ts_ns: i as u64, tid: 1, dir, offset, len, prefix };
            if let Some(m) = framer.push(&chunk) {
                // A message starts at the chunk that carries it.
                prop_assert_eq!(m.offset, offset);
                prop_assert_eq!(m.ts_ns, i as u64);
                if let Head::Request { path, target, .. } = &m.head {
                    prop_assert!(path.len() <= 128 && target.len() <= 256);
                }
            }
        }
    }

    #[test]
    fn http2_frames_and_header_blocks_take_any_sequence(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096)
    ) {
        // Real header blocks glued to random bytes, cut, continued, lost
        // and out of place (see the entry point): no panic, bounded.
        mesh_trace::fuzzing::h2_frames(&bytes);
    }

    #[test]
    fn btf_parsing_takes_any_bytes(mut bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        // Half the cases start like BTF, to get past the magic.
        if bytes.len() >= 24 && bytes[0] % 2 == 0 {
            bytes[..4].copy_from_slice(&[0x9f, 0xeb, 1, 0]);
            bytes[4..8].copy_from_slice(&24u32.to_le_bytes());
        }
        if let Ok(btf) = KernelBtf::parse(&bytes) {
            let _ = btf.member_offset("tcp_sock", "srtt_us");
            let _ = btf.tracepoint_args("tcp_retransmit_skb");
            let _ = btf.enum_values("sk_rst_reason");
        }
    }
}

/// Every file under `tests/fixtures/fuzz-regressions/<target>/`, fed to
/// the target's entry point; each target must have some, and every
/// directory must name a target.
#[test]
fn fuzz_regressions_replay() {
    use mesh_trace::fuzzing::TARGETS;
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz-regressions");
    let list = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut paths: Vec<_> = entries
            .map(|e| e.expect("directory entry").path())
            .collect();
        paths.sort();
        paths
    };
    for dir in list(&root) {
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        assert!(
            TARGETS.iter().any(|(t, _)| *t == name),
            "{}: no fuzz target of that name",
            dir.display()
        );
    }
    let mut failed = Vec::new();
    for (target, run) in TARGETS {
        let files: Vec<_> = list(&root.join(target))
            .into_iter()
            .filter(|p| p.is_file())
            .collect();
        assert!(!files.is_empty(), "no regression inputs for {target}");
        for file in &files {
            let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if std::panic::catch_unwind(|| run(&bytes)).is_err() {
                failed.push(file.display().to_string());
            }
        }
        println!("{target}: {} inputs replayed", files.len());
    }
    assert!(failed.is_empty(), "inputs that still fail: {failed:?}");
}
