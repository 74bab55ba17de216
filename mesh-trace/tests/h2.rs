//! HTTP/2 in the kernel: the frames of connections that began with HTTP/2
//! are walked in each send and receive, and their header blocks decode
//! (HPACK, one table per connection direction) to what the peers sent.
//! The peers are Debian's nghttp2 tools, written by no one here: nghttpd
//! serves, h2load multiplexes many streams on each connection, nghttp
//! sends a header block past the capture. They need root; without it they
//! fail, never skip.
use std::{
    collections::{HashMap, HashSet},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mesh_trace::{
    kernel::{
        events::Event,
        sysfs,
        tracer::{Tracer, TracerOptions},
    },
    netns::{netns_cookie, NetNs},
    spans::h2::{H2Decoder, H2Message, LostBecause},
};
use mesh_trace_common::DIR_RECV;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "kernel tests load eBPF programs and create network namespaces: run them as root"
    );
}

/// A meshed namespace with nghttpd serving `/index.html` in plaintext
/// HTTP/2 on port 18080, and the tracer watching it.
struct Served {
    ns: NetNs,
    netns: u64,
    server: Child,
    tracer: Tracer,
    _docs: tempfile_dir::Dir,
}

mod tempfile_dir {
    /// A directory under /tmp removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Served {
    fn start(tag: &str) -> Served {
        Served::start_with(tag, false)
    }

    /// nghttpd over TLS (ALPN h2, OpenSSL's libssl), its libssl carrying
    /// the TLS plaintext probes before any connection.
    fn start_with(tag: &str, tls: bool) -> Served {
        require_root();
        for tool in ["nghttpd", "h2load", "nghttp"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap()
                    .success(),
                "{tool} is missing: `cargo xtask setup` installs nghttp2-client and nghttp2-server"
            );
        }
        let cgroup = sysfs::cgroup2_root().expect("a cgroup v2 hierarchy must be mounted");
        let mut tracer = Tracer::load(&TracerOptions::new(cgroup)).expect("loading the tracer");
        let ns = NetNs::create(&format!("mt-h2-{tag}-{}", std::process::id())).unwrap();
        let netns = ns
            .enter(|| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                netns_cookie(&l).unwrap()
            })
            .unwrap();
        tracer.mark_meshed(netns).unwrap();
        let docs = std::env::temp_dir().join(format!("mt-h2-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::write(docs.join("index.html"), "hello from nghttpd\n").unwrap();
        let mut server = Command::new("ip");
        server
            .args(["netns", "exec", ns.name(), "nghttpd", "-d"])
            .arg(&docs);
        if tls {
            let (key, cert) = (docs.join("key.pem"), docs.join("cert.pem"));
            let made = Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .args(["-subj", "/CN=localhost", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(made.success(), "openssl req");
            server.arg("18080").arg(&key).arg(&cert);
        } else {
            server.args(["--no-tls", "18080"]);
        }
        let server = server
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns
            .enter(|| TcpStream::connect("127.0.0.1:18080").is_err())
            .unwrap()
        {
            assert!(Instant::now() < deadline, "nghttpd did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        if tls {
            // nghttpd runs under `ip netns exec`: its own pid is a child's.
            let probed = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "nghttpd")
                })
                .flat_map(|pid| mesh_trace::kernel::tls::files_of(pid).unwrap_or_default())
                .filter(|f| f.library)
                .map(|f| tracer.attach_tls(&f).expect("probing nghttpd's libssl"))
                .count();
            assert!(probed >= 1, "nghttpd maps no libssl");
        }
        Served {
            ns,
            netns,
            server,
            tracer,
            _docs: tempfile_dir::Dir(docs),
        }
    }

    /// Runs a client in the namespace while collecting events; the
    /// decoded messages of this namespace's sockets, by (socket,
    /// received), after the client exits.
    async fn run(&mut self, client: &[&str]) -> (H2Decoder, Vec<((u64, bool), H2Message)>) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.ns.name()])
            .args(client)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = self
            .collect(
                || child.try_wait().unwrap().is_some(),
                &format!("{client:?}"),
            )
            .await;
        assert!(child.wait().unwrap().success(), "{client:?} failed");
        out
    }

    /// Collects events until `finished` (and a moment after: events keep
    /// coming); the decoded messages as [`Served::run`] returns them.
    async fn collect(
        &mut self,
        mut finished: impl FnMut() -> bool,
        client: &str,
    ) -> (H2Decoder, Vec<((u64, bool), H2Message)>) {
        let mut decoder = H2Decoder::default();
        let mut ours = HashSet::new();
        let mut messages = Vec::new();
        let mut batch = Vec::new();
        let mut finished_at = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        while finished_at.is_none_or(|t: Instant| t.elapsed() < Duration::from_millis(500)) {
            assert!(Instant::now() < deadline, "{client} did not finish");
            if finished_at.is_none() && finished() {
                finished_at = Some(Instant::now());
            }
            let _ = tokio::time::timeout(
                Duration::from_millis(100),
                self.tracer.next_batch(&mut batch),
            )
            .await;
            for ev in batch.drain(..) {
                match ev.expect("every event decodes") {
                    Event::Established(s) if s.netns_cookie == self.netns => {
                        ours.insert(s.sock_cookie);
                    }
                    Event::H2Frame(f) if ours.contains(&f.sock_cookie) => {
                        let key = (f.sock_cookie, f.direction & DIR_RECV != 0);
                        let mut out = Vec::new();
                        decoder.frame(&f, &mut out);
                        messages.extend(out.into_iter().map(|m| (key, m)));
                    }
                    _ => {}
                }
            }
        }
        (decoder, messages)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Request heads, response heads and stream ends, counted per direction
/// (client send, server receive, server send, client receive are four
/// directions of the same streams).
fn heads(messages: &[((u64, bool), H2Message)]) -> HashMap<(u64, bool), (usize, usize, usize)> {
    let mut per = HashMap::new();
    for (key, m) in messages {
        let e: &mut (usize, usize, usize) = per.entry(*key).or_default();
        match m {
            H2Message::Headers { fields, .. } if fields.is_request() => {
                assert_eq!(fields.method.as_deref(), Some("GET"), "{m:?}");
                assert_eq!(fields.path.as_deref(), Some("/index.html"), "{m:?}");
                assert_eq!(fields.authority.as_deref(), Some("127.0.0.1:18080"));
                e.0 += 1;
            }
            H2Message::Headers { fields, .. } => {
                assert_eq!(fields.status, Some(200), "{m:?}");
                e.1 += 1;
            }
            H2Message::EndStream { .. } => e.2 += 1,
            H2Message::Undecodable { .. } => panic!("undecodable: {m:?}"),
            _ => {}
        }
    }
    per
}

/// The same over TLS (ALPN h2): the frames are walked in the plaintext of
/// each side's `SSL_write`/`SSL_read` (h2load and nghttpd both use
/// OpenSSL's libssl), and every head decodes on both ends.
#[tokio::test]
async fn multiplexed_streams_inside_tls_decode_on_both_ends() {
    let mut served = Served::start_with("tls", true);
    let (decoder, messages) = served
        .run(&[
            "h2load",
            "-n",
            "400",
            "-c",
            "2",
            "-m",
            "8",
            "https://127.0.0.1:18080/index.html",
        ])
        .await;
    assert!(decoder.lost.is_empty(), "lost: {:?}", decoder.lost);
    let per = heads(&messages);
    let sum = |recv: bool, i: usize| -> usize {
        per.iter()
            .filter(|(k, _)| k.1 == recv)
            .map(|(_, v)| [v.0, v.1, v.2][i])
            .sum()
    };
    assert_eq!(
        (sum(false, 0), sum(true, 0), sum(false, 1), sum(true, 1)),
        (400, 400, 400, 400),
        "request heads sent and received, response heads sent and read"
    );
}

/// h2load: 4 connections, 16 streams in flight on each, 2,000 requests.
/// Every request head decodes on both ends (through each connection's
/// dynamic table, which h2load fills with its first request), and so does
/// every response.
#[tokio::test]
async fn multiplexed_streams_decode_on_both_ends_of_every_connection() {
    let mut served = Served::start("load");
    let (decoder, messages) = served
        .run(&[
            "h2load",
            "-n",
            "2000",
            "-c",
            "4",
            "-m",
            "16",
            "http://127.0.0.1:18080/index.html",
        ])
        .await;
    assert!(decoder.lost.is_empty(), "lost: {:?}", decoder.lost);
    let per = heads(&messages);
    let sent: usize = per.iter().filter(|(k, _)| !k.1).map(|(_, v)| v.0).sum();
    let received: usize = per.iter().filter(|(k, _)| k.1).map(|(_, v)| v.0).sum();
    let responses_sent: usize = per.iter().filter(|(k, _)| !k.1).map(|(_, v)| v.1).sum();
    let responses_read: usize = per.iter().filter(|(k, _)| k.1).map(|(_, v)| v.1).sum();
    assert_eq!(
        (sent, received, responses_sent, responses_read),
        (2000, 2000, 2000, 2000),
        "request heads sent and received, response heads sent and read"
    );
    // Each response ends its stream with a DATA frame (the body).
    let ends: usize = per.values().map(|v| v.2).sum();
    assert_eq!(ends, 4000, "responses end their streams, sent and read");
}

/// A header block longer than the capture (a 6 KB header): its direction
/// is lost, counted, and its requests are reported undecodable, never
/// decoded from a table that is no longer the sender's.
#[tokio::test]
async fn a_block_past_the_capture_is_counted_and_never_decoded() {
    let mut served = Served::start("big");
    let big = format!("x-big: {}", "y".repeat(6000));
    let (decoder, messages) = served
        .run(&["nghttp", "-H", &big, "http://127.0.0.1:18080/index.html"])
        .await;
    assert!(
        decoder
            .lost
            .get(&LostBecause::TooLong)
            .copied()
            .unwrap_or(0)
            >= 1,
        "lost: {:?}",
        decoder.lost
    );
    let undecodable = messages
        .iter()
        .filter(|(_, m)| matches!(m, H2Message::Undecodable { .. }))
        .count();
    let decoded_requests = messages
        .iter()
        .filter(|(_, m)| matches!(m, H2Message::Headers { fields, .. } if fields.is_request()))
        .count();
    assert!(undecodable >= 1, "{messages:?}");
    assert_eq!(decoded_requests, 0, "{messages:?}");
}

/// A client whose every send and receive is vectored over many small
/// buffers (48 to 64 per call, more than any fixed window; Envoy writes 16
/// at a time, hyper's HTTP/2 more), frame headers and header blocks cut
/// across them, by writev, sendmsg and readv: each of its 40 requests and
/// nghttpd's responses decodes on both ends, nothing lost.
#[tokio::test]
async fn frames_cut_across_many_buffers_of_vectored_calls_decode() {
    let mut served = Served::start("iov");
    let stream = served
        .ns
        .enter(|| TcpStream::connect("127.0.0.1:18080").unwrap())
        .unwrap();
    let client = std::thread::spawn(move || vectored_client(stream, 40));
    let (decoder, messages) = served
        .collect(|| client.is_finished(), "the vectored client")
        .await;
    let read = client.join().unwrap();
    assert!(decoder.lost.is_empty(), "lost: {:?}", decoder.lost);
    let paths = |received: bool| -> Vec<String> {
        messages
            .iter()
            .filter(|(key, _)| key.1 == received)
            .filter_map(|(_, m)| match m {
                H2Message::Headers { fields, .. } if fields.is_request() => fields.path.clone(),
                _ => None,
            })
            .collect()
    };
    let sent: Vec<String> = (0..40).map(|i| format!("/index.html?n={i}")).collect();
    assert_eq!(paths(false), sent, "request heads as the client wrote them");
    assert_eq!(paths(true), sent, "request heads as nghttpd read them");
    let statuses = |received: bool| {
        messages
            .iter()
            .filter(|(key, m)| {
                key.1 == received
                    && matches!(m, H2Message::Headers { fields, .. } if fields.status == Some(200))
            })
            .count()
    };
    assert_eq!(
        (statuses(false), statuses(true)),
        (40, 40),
        "response heads written by nghttpd and read by the client ({read} bytes read)"
    );
}

/// Writes the preface, SETTINGS and `requests` GET heads (one HPACK
/// table, so later heads refer to earlier ones) in pieces of 1 to 13
/// bytes, 48 pieces per call, writev and sendmsg in turn; then reads the
/// responses by readv into 64 buffers of 5 bytes until they stop coming.
/// Returns the bytes read.
fn vectored_client(mut stream: TcpStream, requests: u32) -> usize {
    use std::io::{IoSlice, IoSliceMut, Read, Write};
    use std::os::fd::AsRawFd;

    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream_id.to_be_bytes());
        out.extend_from_slice(payload);
    }
    let mut bytes = mesh_trace_common::H2_PREFACE.to_vec();
    frame(&mut bytes, 4, 0, 0, &[]);
    let mut encoder = loona_hpack::Encoder::new();
    for i in 0..requests {
        let path = format!("/index.html?n={i}");
        let block = encoder.encode([
            (&b":method"[..], &b"GET"[..]),
            (b":scheme", b"http"),
            (b":authority", b"127.0.0.1:18080"),
            (b":path", path.as_bytes()),
        ]);
        // END_STREAM | END_HEADERS
        frame(&mut bytes, 1, 0x5, 2 * i + 1, &block);
    }
    let sizes = [1, 2, 3, 5, 8, 13, 1, 9, 4];
    let mut pieces = Vec::new();
    let mut at = 0;
    for size in sizes.iter().cycle() {
        if at == bytes.len() {
            break;
        }
        let end = (at + size).min(bytes.len());
        pieces.push(&bytes[at..end]);
        at = end;
    }
    for (n, call) in pieces.chunks(48).enumerate() {
        let slices: Vec<IoSlice> = call.iter().map(|p| IoSlice::new(p)).collect();
        let want: usize = call.iter().map(|p| p.len()).sum();
        let wrote = if n % 2 == 0 {
            stream.write_vectored(&slices).unwrap()
        } else {
            nix::sys::socket::sendmsg::<nix::sys::socket::SockaddrIn>(
                stream.as_raw_fd(),
                &slices,
                &[],
                nix::sys::socket::MsgFlags::empty(),
                None,
            )
            .unwrap()
        };
        assert_eq!(wrote, want, "a short vectored write");
    }
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut bufs = [[0u8; 5]; 64];
    let mut read = 0;
    loop {
        let mut slices: Vec<IoSliceMut> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        match stream.read_vectored(&mut slices) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => panic!("reading the responses: {e}"),
        }
    }
    read
}
