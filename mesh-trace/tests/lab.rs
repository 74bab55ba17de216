//! The mesh lab reproduces the Istio sidecar data path: real namespaces,
//! real istio-iptables rules, real processes. Needs root.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_trace::lab::{
    config::OutboundTrafficPolicy,
    loadgen::Summary,
    records::{read_records, AppRecord, ClientRecord, Direction, ProxyRecord},
    topology::{leftover_namespaces, Lab, LabOptions},
};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-trace");
const CLIENT: &str = "loadgen-v1";
const REVIEWS_URL: &str = "http://reviews:9080/reviews/0";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "lab tests create network namespaces and iptables rules: run them as root"
    );
}

fn options() -> LabOptions {
    let mut o = LabOptions::bookinfo().unwrap();
    o.exe = BIN.into();
    o
}

fn load(lab: &Lab, args: &[&str], name: &str) -> (Summary, Vec<ClientRecord>) {
    load_from(lab, CLIENT, args, name)
}

/// Runs the load generator as an app process of `pod`.
fn load_from(lab: &Lab, pod: &str, args: &[&str], name: &str) -> (Summary, Vec<ClientRecord>) {
    let records = lab.dir.join(format!("{name}.jsonl"));
    let summary = lab
        .load_with(BIN.as_ref(), pod, args, &records)
        .expect("load generator");
    (summary, read_records(&records).unwrap())
}

fn proxy_records(lab: &Lab, pod: &str) -> Vec<ProxyRecord> {
    read_records(&lab.proxy_log(pod)).unwrap()
}

/// The client sidecar's records once at least `n` are written: a TCP
/// connection's record is written when the sidecar sees it close, which
/// can be after the load generator has exited.
fn tcp_records(lab: &Lab, n: usize) -> Vec<ProxyRecord> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let recs = proxy_records(lab, CLIENT);
        if recs.len() >= n {
            return recs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} TCP records after 5 s",
            recs.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Packet count of the first rule of `chain` in the pod's nat table.
fn rule_packets(lab: &Lab, pod: &str, chain: &str) -> u64 {
    let out = lab
        .pod(pod)
        .ns
        .exec("iptables", &["-t", "nat", "-L", chain, "-v", "-x", "-n"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("REDIRECT"))
        .unwrap_or_else(|| panic!("no REDIRECT rule in {chain}:\n{text}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn a_request_travels_app_outbound_sidecar_inbound_sidecar_app() {
    require_root();
    // From productpage's pod, as productpage itself calls reviews.
    const CLIENT: &str = "productpage-v1";
    let lab = Lab::up(&options()).unwrap();
    let (summary, client) = load_from(
        &lab,
        CLIENT,
        &[
            "--url",
            REVIEWS_URL,
            "--connections",
            "1",
            "--requests",
            "20",
        ],
        "path",
    );
    assert_eq!(summary.ok, 20, "{summary:?}");
    let reviews = lab.topology.service("reviews").unwrap();
    let vip = SocketAddr::new(reviews.vip.into(), reviews.port);

    // The client's sidecar: original destination is the VIP, cluster and endpoint chosen.
    let out: Vec<_> = proxy_records(&lab, CLIENT)
        .into_iter()
        .filter(|r| r.direction == Direction::Outbound)
        .collect();
    assert_eq!(out.len(), 20, "{out:#?}");
    let client_ip: IpAddr = lab.pod(CLIENT).spec.ip.into();
    for r in &out {
        assert_eq!(r.original_dst, vip);
        assert!(
            r.cluster.starts_with("outbound|9080|v") && r.cluster.contains("reviews"),
            "{r:?}"
        );
        assert!(
            r.downstream_peer.ip().is_loopback() || r.downstream_peer.ip() == client_ip,
            "{r:?}"
        );
        let host = r.upstream_host.expect("an endpoint");
        let pod = lab
            .pods
            .iter()
            .find(|p| IpAddr::from(p.spec.ip) == host.ip())
            .unwrap();
        assert_eq!(pod.spec.app, "reviews");
        assert_eq!(
            r.request_id.as_deref(),
            client
                .iter()
                .find(|c| Some(&c.request_id) == r.request_id.as_ref())
                .map(|c| c.request_id.as_str())
        );
    }
    // Each request arrived at a reviews pod's inbound sidecar and reached the app from 127.0.0.6.
    let mut inbound = 0;
    for pod in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        // reviews v2/v3 also call ratings: their outbound records are not ours.
        for r in proxy_records(&lab, pod)
            .into_iter()
            .filter(|r| r.direction == Direction::Inbound)
        {
            assert_eq!(r.cluster, "inbound|9080||");
            assert_eq!(
                r.upstream_local.unwrap().ip().to_string(),
                "127.0.0.6",
                "{r:?}"
            );
            assert_eq!(
                r.downstream_peer.ip(),
                client_ip,
                "mesh leg comes from the client pod"
            );
            inbound += 1;
        }
        for a in read_records::<AppRecord>(&lab.app_log(pod)).unwrap() {
            assert_eq!(a.peer.ip().to_string(), "127.0.0.6");
        }
    }
    assert_eq!(inbound, 20);
    // The REDIRECT rules fired: outbound in the client pod, inbound in reviews.
    assert!(rule_packets(&lab, CLIENT, "ISTIO_REDIRECT") >= 1);
    let inbound_redirects: u64 = ["reviews-v1", "reviews-v2", "reviews-v3"]
        .iter()
        .map(|p| rule_packets(&lab, p, "ISTIO_IN_REDIRECT"))
        .sum();
    assert!(inbound_redirects >= 1);
}

#[test]
fn weighted_routing_matches_10_40_50() {
    require_root();
    let lab = Lab::up(&options()).unwrap();
    let n = 2000;
    let (summary, _) = load(
        &lab,
        &[
            "--url",
            REVIEWS_URL,
            "--connections",
            "8",
            "--requests",
            &n.to_string(),
        ],
        "split",
    );
    assert_eq!(summary.ok, n, "{summary:?}");
    let observed: Vec<f64> = ["reviews-v1", "reviews-v2", "reviews-v3"]
        .iter()
        .map(|p| summary.by_served_by.get(*p).copied().unwrap_or(0) as f64)
        .collect();
    let expected = [0.1, 0.4, 0.5].map(|w| w * n as f64);
    let chi2: f64 = observed
        .iter()
        .zip(expected)
        .map(|(o, e)| (o - e).powi(2) / e)
        .sum();
    // Chi-square with 2 degrees of freedom at p = 0.001.
    assert!(
        chi2 < 13.816,
        "split {observed:?} vs {expected:?}: chi2 {chi2}"
    );
}

#[test]
fn the_sidecar_retries_503s() {
    require_root();
    let mut opts = options();
    for pod in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        opts.error_rate.insert(pod.to_string(), 0.2);
    }
    let lab = Lab::up(&opts).unwrap();
    let n = 1000u64;
    let (summary, _) = load(
        &lab,
        &[
            "--url",
            REVIEWS_URL,
            "--connections",
            "4",
            "--requests",
            &n.to_string(),
        ],
        "retries",
    );
    // Without retries 80% would succeed; with two retries 1 - 0.2^3 = 99.2%.
    let success = summary.ok as f64 / n as f64;
    assert!(success > 0.97, "success {success}: {summary:?}");
    let out: Vec<_> = proxy_records(&lab, CLIENT);
    assert!(
        out.iter().all(|r| (1..=3).contains(&r.attempts)),
        "at most 2 retries"
    );
    let attempts: u64 = out.iter().map(|r| u64::from(r.attempts)).sum();
    assert!(attempts > n, "some requests were retried");
    // Every attempt reached a reviews app.
    let served: usize = ["reviews-v1", "reviews-v2", "reviews-v3"]
        .iter()
        .map(|p| read_records::<AppRecord>(&lab.app_log(p)).unwrap().len())
        .sum();
    assert_eq!(served as u64, attempts);
}

#[test]
fn unregistered_destinations_follow_the_outbound_policy() {
    require_root();
    let external = "http://10.244.0.200:8080/";
    // ALLOW_ANY: PassthroughCluster connects to the original destination.
    {
        let lab = Lab::up(&options()).unwrap();
        let (summary, _) = load(&lab, &["--url", external, "--requests", "3"], "pass");
        assert_eq!(summary.ok, 3, "{summary:?}");
        let recs = tcp_records(&lab, 1);
        for r in &recs {
            assert_eq!(r.kind, "tcp");
            assert_eq!(r.cluster, "PassthroughCluster");
            assert_eq!(r.upstream_host, Some("10.244.0.200:8080".parse().unwrap()));
        }
        let served = read_records::<AppRecord>(&lab.app_log("external")).unwrap();
        assert_eq!(served.len(), 3);
    }
    // REGISTRY_ONLY: BlackHoleCluster, no upstream connection at all.
    {
        let mut opts = options();
        opts.policy = Some(OutboundTrafficPolicy::RegistryOnly);
        let lab = Lab::up(&opts).unwrap();
        let (summary, _) = load(&lab, &["--url", external, "--requests", "3"], "hole");
        assert_eq!(summary.ok, 0, "{summary:?}");
        assert_eq!(summary.errors, 3, "{summary:?}");
        let recs = tcp_records(&lab, 1);
        for r in &recs {
            assert_eq!(r.cluster, "BlackHoleCluster");
            assert_eq!(r.upstream_host, None);
        }
        let served = read_records::<AppRecord>(&lab.app_log("external")).unwrap();
        assert!(served.is_empty(), "nothing reached the external server");
        // Registered services still work.
        let (ok, _) = load(
            &lab,
            &["--url", REVIEWS_URL, "--requests", "5"],
            "registered",
        );
        assert_eq!(ok.ok, 5);
    }
}

/// Process ids of everything running in the lab's namespaces.
fn lab_pids(lab: &Lab) -> Vec<i32> {
    lab.pods
        .iter()
        .flat_map(|p| {
            let out = Command::new("ip")
                .args(["netns", "pids", p.ns.name()])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(|s| s.parse::<i32>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    // A zombie is gone for our purposes; kill(0) still succeeds on it.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

fn assert_gone(id: &str, pids: &[i32]) {
    let left: Vec<_> = leftover_namespaces()
        .into_iter()
        .filter(|n| n.contains(id))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let running: Vec<_> = pids.iter().filter(|&&p| alive(p)).collect();
    assert!(running.is_empty(), "processes left: {running:?}");
}

#[test]
fn teardown_leaves_nothing_on_drop_and_on_panic() {
    require_root();
    let lab = Lab::up(&options()).unwrap();
    let (id, pids) = (lab.id.clone(), lab_pids(&lab));
    assert!(pids.len() >= 13, "sidecars and apps running: {pids:?}");
    drop(lab);
    assert_gone(&id, &pids);

    let seen = std::sync::Mutex::new(None);
    let panicked = std::panic::catch_unwind(|| {
        let lab = Lab::up(&options()).unwrap();
        *seen.lock().unwrap() = Some((lab.id.clone(), lab_pids(&lab)));
        panic!("on purpose, with the lab up");
    });
    assert!(panicked.is_err());
    let (id, pids) = seen.into_inner().unwrap().unwrap();
    assert_gone(&id, &pids);
}

#[test]
fn lab_up_cleans_up_on_sigint() {
    require_root();
    let mut child = Command::new(BIN)
        .args(["lab", "up"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut namespaces = BTreeMap::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(ns) = line
            .split_whitespace()
            .last()
            .filter(|w| w.starts_with("mtl-"))
        {
            namespaces.insert(ns.to_string(), ());
        }
        if line.contains("lab is up") {
            break;
        }
        assert!(Instant::now() < deadline, "lab up took too long");
    }
    assert!(namespaces.len() >= 8, "{namespaces:?}");
    let id = namespaces
        .keys()
        .next()
        .unwrap()
        .split('-')
        .nth(1)
        .unwrap()
        .to_string();
    let pids: Vec<i32> = namespaces
        .keys()
        .flat_map(|ns| {
            let out = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(|s| s.parse::<i32>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "lab up exited with {status}");
    assert_gone(&id, &pids);
}

/// A packet socket on one pod's eth0: a copy of every frame in and out of
/// the pod, taken before iptables (as tcpdump would, which the lab does not need).
struct Capture {
    fd: std::os::fd::OwnedFd,
}

impl Capture {
    /// Opened inside the pod's network namespace; the socket stays in it.
    fn on_eth0(lab: &Lab, pod: &str) -> Capture {
        let fd = lab
            .pod(pod)
            .ns
            .enter(open_eth0_packet_socket)
            .unwrap()
            .expect("an AF_PACKET socket on the pod's eth0");
        Capture { fd }
    }

    /// The TCP payloads to or from `port`, in order, from what the socket
    /// holds now (its buffer is large enough for a whole test).
    fn tcp_payloads(&self, port: u16) -> Vec<Vec<u8>> {
        use std::os::fd::AsRawFd as _;
        let mut payloads = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "capture: {e}");
                return payloads;
            }
            if let Some(p) = tcp_payload(&buf[..n as usize], port) {
                payloads.push(p.to_vec());
            }
        }
    }

    /// Frames the kernel dropped because the socket's buffer was full.
    fn drops(&self) -> u32 {
        use std::os::fd::AsRawFd as _;
        // struct tpacket_stats from <linux/if_packet.h>.
        let mut stats = [0u32; 2];
        let mut len = std::mem::size_of_val(&stats) as libc::socklen_t;
        // SAFETY: stats and len are valid for writes of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                stats.as_mut_ptr().cast(),
                &mut len,
            )
        };
        assert_eq!(
            rc,
            0,
            "PACKET_STATISTICS: {}",
            std::io::Error::last_os_error()
        );
        stats[1]
    }
}

/// An AF_PACKET socket bound to eth0 of the calling thread's network namespace.
fn open_eth0_packet_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    let all = (libc::ETH_P_ALL as u16).to_be();
    // Protocol 0 receives nothing until bind, so no frame from another
    // interface (lo, where the app legs are) slips in before it.
    // SAFETY: plain system calls on a descriptor we own, with valid pointers.
    unsafe {
        let fd = check(libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let fd = OwnedFd::from_raw_fd(fd);
        let ifindex = libc::if_nametoindex(c"eth0".as_ptr());
        if ifindex == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let size: libc::c_int = 64 << 20;
        check(libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ))?;
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        sll.sll_ifindex = ifindex as i32;
        check(libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ))?;
        Ok(fd)
    }
}

/// The payload of an IPv4 TCP segment from or to `port`. SOCK_DGRAM packet
/// sockets hand over the frame from the IP header on.
fn tcp_payload(packet: &[u8], port: u16) -> Option<&[u8]> {
    let (version, ihl) = (packet.first()? >> 4, usize::from(packet[0] & 0x0f) * 4);
    if version != 4 || packet.get(9) != Some(&6) {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    let tcp = packet.get(ihl..total.min(packet.len()))?;
    let (src, dst) = (
        u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]),
        u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]),
    );
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    (src == port || dst == port)
        .then(|| tcp.get(data_offset..))
        .flatten()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Requests from productpage to reviews, with the middle leg captured where
/// it leaves productpage's pod (every request crosses its eth0 to a reviews pod).
fn reviews_with_capture(mtls: bool, n: u64) -> (Lab, Vec<Vec<u8>>) {
    const CLIENT: &str = "productpage-v1";
    let mut opts = options();
    opts.mtls = mtls;
    let lab = Lab::up(&opts).unwrap();
    let capture = Capture::on_eth0(&lab, CLIENT);
    let name = if mtls { "mtls" } else { "plaintext" };
    let (summary, _) = load_from(
        &lab,
        CLIENT,
        &[
            "--url",
            REVIEWS_URL,
            "--connections",
            "2",
            "--requests",
            &n.to_string(),
        ],
        name,
    );
    assert_eq!(summary.ok, n, "{summary:?}");
    let payloads = capture.tcp_payloads(9080);
    assert_eq!(capture.drops(), 0, "the capture lost frames");
    (lab, payloads)
}

#[test]
fn mutual_tls_encrypts_the_middle_leg() {
    require_root();
    let n = 50;
    const REQUEST_LINE: &[u8] = b"GET /reviews/0";
    // Without mTLS the capture sees the requests: it does look at the right bytes.
    let (lab, plain) = reviews_with_capture(false, n);
    drop(lab);
    let seen = plain.iter().filter(|p| contains(p, REQUEST_LINE)).count();
    assert!(seen as u64 >= n, "plaintext requests on the wire: {seen}");

    let (lab, wire) = reviews_with_capture(true, n);
    let bytes: Vec<u8> = wire.concat();
    assert!(
        !contains(&bytes, REQUEST_LINE),
        "a request went in the clear"
    );
    assert!(
        !contains(&bytes, b"HTTP/1.1"),
        "a response went in the clear"
    );
    // TLS records: handshakes (22) open the connections, application data (23) follows.
    let records = |kind: u8| wire.iter().filter(|p| p.starts_with(&[kind, 3])).count();
    assert!(
        records(0x16) >= 2,
        "ClientHello and ServerHello per connection"
    );
    let app_data = records(0x17) as u64;
    assert!(
        app_data >= n,
        "requests as TLS records: {app_data} segments"
    );

    let out: Vec<_> = proxy_records(&lab, "productpage-v1");
    assert_eq!(out.len() as u64, n, "{out:#?}");
    assert!(
        out.iter().all(|r| r.upstream_tls && r.status == 200),
        "{out:#?}"
    );
    let mut inbound = 0;
    for pod in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        for r in proxy_records(&lab, pod) {
            if r.direction == Direction::Inbound {
                assert!(r.downstream_tls, "{r:?}");
                inbound += 1;
            }
        }
    }
    assert_eq!(inbound, n);
    // Each sidecar's key is its alone.
    use std::os::unix::fs::MetadataExt as _;
    let key = std::fs::metadata(lab.dir.join("reviews-v1-key.pem")).unwrap();
    assert_eq!((key.uid(), key.mode() & 0o777), (1337, 0o600));
}
