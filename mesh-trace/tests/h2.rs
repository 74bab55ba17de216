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
        let mut decoder = H2Decoder::default();
        let mut ours = HashSet::new();
        let mut messages = Vec::new();
        let mut batch = Vec::new();
        let mut exited_at = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Events keep coming for a moment after the client exits.
        while exited_at.is_none_or(|t: Instant| t.elapsed() < Duration::from_millis(500)) {
            assert!(Instant::now() < deadline, "{client:?} did not finish");
            if exited_at.is_none() && child.try_wait().unwrap().is_some() {
                exited_at = Some(Instant::now());
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
        assert!(child.wait().unwrap().success(), "{client:?} failed");
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
