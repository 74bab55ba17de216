//! Flow tagging in the lab: the kernel programs and the flow table join
//! every connection of the sidecar data path into legs. Needs root.
use std::{
    collections::HashSet,
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::{agent::AgentProcess, Traced};
use mesh_trace::{
    agent::metrics::DirectionLabel,
    flows::{legs::LegKind, table::LegRecord},
    lab::{
        config::OutboundTrafficPolicy,
        records::{read_records, Direction, ProxyRecord},
        topology::{Lab, LabOptions},
    },
};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-trace");

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "flow tests load eBPF programs and build a lab: run them as root"
    );
}

fn summary(legs: &[LegRecord]) -> String {
    legs.iter()
        .map(|l| {
            format!(
                "{} {:?} {}->{} dst={:?} client={:?} server={:?}",
                l.event,
                l.leg,
                l.source_workload,
                l.destination_service,
                l.original_dst,
                l.client.as_ref().map(|s| (s.local, pod_name(Some(s)))),
                l.server.as_ref().map(|s| (s.local, pod_name(Some(s)))),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn pod_name(s: Option<&mesh_trace::flows::socket::Socket>) -> String {
    s.and_then(|s| s.pod.as_ref())
        .map(|p| p.name.clone())
        .unwrap_or_default()
}

fn client_pod(l: &LegRecord) -> String {
    pod_name(l.client.as_ref())
}

fn server_pod(l: &LegRecord) -> String {
    pod_name(l.server.as_ref())
}

fn options() -> LabOptions {
    let mut o = LabOptions::bookinfo().unwrap();
    o.exe = BIN.into();
    o
}

fn load(lab: &Lab, pod: &str, url: &str, n: u32, extra: &[&str]) {
    let records = lab
        .dir
        .join(format!("load-{pod}-{}.jsonl", rand::random::<u32>()));
    let n = n.to_string();
    let mut args = vec!["--url", url, "--requests", &n];
    args.extend_from_slice(extra);
    let summary = lab.load_with(BIN.as_ref(), pod, &args, &records).unwrap();
    assert_eq!(summary.sent, n.parse::<u64>().unwrap(), "{summary:?}");
}

fn opened(legs: &[LegRecord]) -> impl Iterator<Item = &LegRecord> {
    legs.iter().filter(|l| l.event == "open")
}

#[test]
fn every_connection_of_a_request_is_joined_into_its_leg() {
    require_root();
    let lab = Lab::up(&options()).unwrap();
    let traced = Traced::start(&lab);
    let n = 30;
    load(
        &lab,
        "productpage-v1",
        "http://reviews:9080/reviews/0",
        n,
        &["--new-connections"],
    );
    let reviews = lab.topology.service("reviews").unwrap();
    let vip = SocketAddr::new(reviews.vip.into(), reviews.port);
    let is_redirect = |l: &&LegRecord| {
        l.leg == LegKind::Redirect
            && client_pod(l) == "productpage-v1"
            && l.original_dst == Some(vip)
    };
    traced.wait_for("the redirect legs", |legs| {
        opened(legs).filter(is_redirect).count() >= n as usize
    });
    std::thread::sleep(Duration::from_millis(800));
    let legs = traced.legs.lock().unwrap().clone();

    // Exactly N outbound redirect legs: app socket <-> the sidecar's 15001 socket.
    let redirects: Vec<_> = opened(&legs).filter(is_redirect).collect();
    assert_eq!(redirects.len(), n as usize, "{}", summary(&legs));
    for l in &redirects {
        let (c, s) = (l.client.as_ref().unwrap(), l.server.as_ref().unwrap());
        assert_eq!(l.direction, "outbound");
        assert_eq!(l.source_workload, "productpage");
        assert_eq!(l.destination_service, "reviews");
        assert_eq!(c.remote, vip, "the app's socket still points at the VIP");
        assert_eq!(c.local.ip().to_string(), "10.244.0.10");
        assert_eq!(s.local.port(), 15001);
        assert_eq!(s.remote, c.local);
        assert_eq!(server_pod(l), "productpage-v1");
        assert_eq!(c.connect.as_ref().unwrap().task.uid, 1000);
    }

    // Every upstream connection the outbound sidecar used has its mesh leg,
    // and every connection the inbound sidecars made to the app its delivery leg.
    let outbound: Vec<ProxyRecord> = read_records(&lab.proxy_log("productpage-v1")).unwrap();
    let upstreams: HashSet<SocketAddr> = outbound.iter().filter_map(|r| r.upstream_local).collect();
    assert!(!upstreams.is_empty());
    for u in &upstreams {
        let mesh = opened(&legs)
            .find(|l| l.client.as_ref().is_some_and(|c| c.local == *u))
            .unwrap_or_else(|| panic!("no leg for upstream {u}:\n{}", summary(&legs)));
        assert_eq!(mesh.leg, LegKind::Mesh, "{}", summary(&legs));
        assert!(server_pod(mesh).starts_with("reviews-"));
        assert_eq!(mesh.server.as_ref().unwrap().local.port(), 15006);
        assert_eq!(mesh.destination_service, "reviews");
    }
    for pod in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        let inbound: Vec<ProxyRecord> = read_records(&lab.proxy_log(pod)).unwrap();
        let deliveries: HashSet<SocketAddr> = inbound
            .iter()
            .filter(|r| r.direction == Direction::Inbound)
            .filter_map(|r| r.upstream_local)
            .collect();
        for d in deliveries {
            let leg = opened(&legs)
                .find(|l| {
                    l.client
                        .as_ref()
                        .is_some_and(|c| c.local == d && client_pod(l) == pod)
                })
                .unwrap_or_else(|| panic!("no leg for delivery {d} in {pod}:\n{}", summary(&legs)));
            assert_eq!(leg.leg, LegKind::Delivery);
            assert_eq!(leg.direction, "inbound");
            assert_eq!(server_pod(leg), pod);
            assert_eq!(leg.server.as_ref().unwrap().local.port(), 9080);
        }
    }
}

/// Packets counted by the REDIRECT rule of `chain` in a pod's nat table.
fn redirect_packets(lab: &Lab, pod: &str, chain: &str) -> u64 {
    let out = lab
        .pod(pod)
        .ns
        .exec("iptables", &["-t", "nat", "-L", chain, "-v", "-x", "-n"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("REDIRECT"))
        .map(|l| l.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn redirect_counts_equal_the_iptables_counters() {
    require_root();
    let lab = Lab::up(&options()).unwrap();
    let traced = Traced::start(&lab);
    load(
        &lab,
        "loadgen-v1",
        "http://productpage:9080/productpage",
        40,
        &["--connections", "4"],
    );
    load(
        &lab,
        "loadgen-v1",
        "http://reviews:9080/reviews/0",
        20,
        &["--new-connections"],
    );
    let sidecars: Vec<String> = lab
        .pods
        .iter()
        .filter(|p| p.spec.sidecar)
        .map(|p| p.spec.name.clone())
        .collect();
    let iptables = |chain: &str| -> u64 {
        sidecars
            .iter()
            .map(|p| redirect_packets(&lab, p, chain))
            .sum()
    };
    let (want_out, want_in) = (iptables("ISTIO_REDIRECT"), iptables("ISTIO_IN_REDIRECT"));
    assert!(want_out >= 20 && want_in >= 20, "{want_out} {want_in}");
    let counted = |direction: &'static str| {
        traced
            .state
            .metrics
            .redirects
            .get_or_create(&DirectionLabel { direction })
            .get()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while (counted("outbound"), counted("inbound")) != (want_out, want_in)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(counted("outbound"), want_out, "outbound redirects");
    assert_eq!(counted("inbound"), want_in, "inbound redirects");
    // Counted where the nat table did them: by the netfilter programs.
    let at_nat = traced
        .state
        .metrics
        .events
        .get_or_create(&mesh_trace::agent::metrics::KindLabel { kind: "redirect" })
        .get();
    assert_eq!(
        at_nat,
        want_out + want_in,
        "redirect events from the netfilter programs"
    );
}

#[test]
fn passthrough_blackhole_and_bypass_are_classified() {
    require_root();
    let external = "http://10.244.0.200:8080/";
    {
        let lab = Lab::up(&options()).unwrap();
        let traced = Traced::start(&lab);
        // Passthrough: an unregistered destination under ALLOW_ANY.
        load(&lab, "loadgen-v1", external, 3, &["--new-connections"]);
        // Bypass: loopback from a sidecar pod, and a pod without a sidecar.
        load(
            &lab,
            "productpage-v1",
            "http://127.0.0.1:9080/",
            2,
            &["--new-connections"],
        );
        load(
            &lab,
            "external",
            "http://10.244.0.200:8080/",
            2,
            &["--new-connections"],
        );
        let legs = traced.wait_for("passthrough and bypass legs", |legs| {
            legs.iter()
                .filter(|l| l.event == "close" && l.leg == LegKind::Passthrough)
                .count()
                >= 3
                && opened(legs).filter(|l| l.leg == LegKind::Bypass).count() >= 4
        });
        let to_external: Vec<_> = opened(&legs)
            .filter(|l| server_pod(l) == "external")
            .collect();
        let kinds: Vec<_> = to_external.iter().map(|l| (l.leg, client_pod(l))).collect();
        let passthrough = kinds
            .iter()
            .filter(|(k, p)| *k == LegKind::Passthrough && p == "loadgen-v1")
            .count();
        let bypass_self = kinds
            .iter()
            .filter(|(k, p)| *k == LegKind::Bypass && p == "external")
            .count();
        assert_eq!((passthrough, bypass_self), (3, 2), "{kinds:?}");
        assert_eq!(
            to_external.len(),
            5,
            "nothing else reaches external: {kinds:?}"
        );
        for l in to_external.iter().filter(|l| l.leg == LegKind::Passthrough) {
            assert_eq!(l.destination_service, "external");
            assert_eq!(l.original_dst, Some("10.244.0.200:8080".parse().unwrap()));
        }
        // The app's own connections to the unregistered destination are plain redirects.
        let app_side: Vec<_> = opened(&legs)
            .filter(|l| {
                l.original_dst == Some("10.244.0.200:8080".parse().unwrap())
                    && client_pod(l) == "loadgen-v1"
            })
            .map(|l| l.leg)
            .collect();
        assert_eq!(
            app_side.iter().filter(|k| **k == LegKind::Redirect).count(),
            3,
            "{app_side:?}"
        );
        let loopback: Vec<_> = opened(&legs)
            .filter(|l| {
                l.client.as_ref().is_some_and(|c| {
                    c.local.ip().is_loopback()
                        && c.role == mesh_trace::flows::socket::Role::AppClient
                })
            })
            .collect();
        assert_eq!(loopback.len(), 2, "{}", summary(&legs));
        assert!(loopback.iter().all(|l| l.leg == LegKind::Bypass));
        assert_eq!(traced.state.metrics.passthrough.get(), 3);
        assert!(
            legs.iter().all(|l| l.leg != LegKind::Blackhole),
            "{}",
            summary(&legs)
        );
    }
    {
        let mut opts = options();
        opts.policy = Some(OutboundTrafficPolicy::RegistryOnly);
        let lab = Lab::up(&opts).unwrap();
        let traced = Traced::start(&lab);
        load(&lab, "loadgen-v1", external, 3, &["--new-connections"]);
        let legs = traced.wait_for("blackhole legs", |legs| {
            legs.iter()
                .filter(|l| l.event == "close" && l.leg == LegKind::Blackhole)
                .count()
                >= 3
        });
        std::thread::sleep(Duration::from_millis(800));
        let from_client: Vec<_> = traced
            .legs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| client_pod(l) == "loadgen-v1" && l.event == "close")
            .map(|l| l.leg)
            .collect();
        assert_eq!(
            from_client,
            vec![LegKind::Blackhole; 3],
            "{}",
            summary(&legs)
        );
        assert_eq!(traced.state.metrics.blackhole.get(), 3);
        assert_eq!(traced.state.metrics.passthrough.get(), 0);
    }
}

/// A sample's value, which must be there.
fn metric(text: &str, series: &str) -> u64 {
    common::agent::metric(text, series).unwrap_or_else(|| panic!("{series} missing")) as u64
}

#[test]
fn a_full_ring_buffer_is_counted_and_the_agent_keeps_working() {
    require_root();
    let agent = AgentProcess::start(&["--ring-buffer-bytes", "4096"], &[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = std::thread::spawn(move || {
        for c in listener.incoming().take(3000) {
            drop(c);
        }
    });
    // A burst far larger than 4 KiB of events.
    let mut open = Vec::new();
    for _ in 0..3000 {
        open.push(TcpStream::connect(addr).unwrap());
    }
    drop(open);
    acceptor.join().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let text = agent.scrape();
    let lost = metric(
        &text,
        "mesh_trace_events_lost_total{reason=\"ringbuf_full\"}",
    );
    assert!(lost > 0, "no loss counted:\n{text}");
    // Still working: a new connection is seen.
    let before = metric(&text, "mesh_trace_events_total{kind=\"connect\"}");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = metric(&agent.scrape(), "mesh_trace_events_total{kind=\"connect\"}");
        if now > before {
            break;
        }
        assert!(Instant::now() < deadline, "agent stopped receiving events");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn memory_stays_bounded_under_connection_churn() {
    require_root();
    let max_flows = 1000;
    let agent = AgentProcess::start(&["--max-flows", &max_flows.to_string()], &[]);
    let ns = mesh_trace::netns::NetNs::create(&format!("mt-churn-{}", std::process::id())).unwrap();
    let total = 50_000;
    let held = 3_000;
    ns.enter(move || {
        // Four listeners, so 50,000 connections never run out of 4-tuples.
        let listeners: Vec<TcpListener> = (0..4)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let acceptors: Vec<_> = listeners
            .into_iter()
            .map(|l| {
                std::thread::spawn(move || {
                    for c in l.incoming().take(total / 4) {
                        drop(c);
                    }
                })
            })
            .collect();
        let mut open = std::collections::VecDeque::new();
        for i in 0..total {
            open.push_back(TcpStream::connect(addrs[i % 4]).unwrap());
            if open.len() > held {
                open.pop_front();
            }
        }
        drop(open);
        for a in acceptors {
            a.join().unwrap();
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let text = agent.scrape();
    let tracked = metric(&text, "mesh_trace_flows_tracked");
    let evicted = metric(&text, "mesh_trace_flows_evicted_total");
    let map_full = metric(&text, "mesh_trace_events_lost_total{reason=\"map_full\"}");
    let rss_mib = agent.peak_rss_kib() / 1024;
    eprintln!(
        "churn: tracked {tracked} evicted {evicted} map_full {map_full} peak RSS {rss_mib} MiB"
    );
    assert!(tracked <= max_flows, "flow table over its limit: {tracked}");
    assert!(evicted > 0, "evictions are counted");
    // The kernel's per-socket state lives on the sockets: nothing to fill.
    assert_eq!(map_full, 0, "socket storage failed under churn");
    assert!(rss_mib < 128, "peak RSS {rss_mib} MiB");
}

#[test]
fn non_http_bytes_are_counted_and_other_traffic_is_unaffected() {
    require_root();
    let lab = Lab::up(&options()).unwrap();
    let traced = Traced::start(&lab);
    // Garbage and a malformed request to reviews through the sidecar.
    lab.pod("loadgen-v1")
        .ns
        .enter(|| {
            use std::io::Write;
            for bytes in [
                &b"\x00\x01\x02 not http at all\r\n\r\n"[..],
                b"GET /reviews/0 HTTP/1.1\r\nbroken header line\r\n\r\n",
            ] {
                let mut s = TcpStream::connect("10.96.0.12:9080").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s.write_all(bytes).unwrap();
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
        })
        .unwrap();
    load(&lab, "loadgen-v1", "http://reviews:9080/reviews/0", 20, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = || {
        traced
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.source_workload == "loadgen" && s.status == 200)
            .count()
    };
    while spans() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(spans(), 20, "normal requests still stitched");
    let not_http = || {
        traced
            .state
            .metrics
            .requests_unstitched
            .get_or_create(&mesh_trace::agent::metrics::ReasonLabel { reason: "not_http" })
            .get()
    };
    while not_http() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        not_http() >= 2,
        "garbage and malformed requests counted: {}; {:?}\n{}",
        not_http(),
        traced.state.metrics.requests_unstitched,
        summary(&traced.legs.lock().unwrap())
    );
}

#[test]
fn metrics_stay_valid_under_load() {
    require_root();
    let lab = Lab::up(&options()).unwrap();
    let dir = lab.dir.to_str().unwrap().to_string();
    let agent = AgentProcess::start(&["--lab", &dir], &[]);
    let loader = {
        let records = lab.dir.join("bg.jsonl");
        let args = [
            "--url",
            "http://productpage:9080/productpage",
            "--rate",
            "50",
            "--duration-s",
            "3",
        ];
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let child = lab.spawn_load(
            "loadgen-v1",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &records,
        );
        child.unwrap()
    };
    std::thread::sleep(Duration::from_millis(1500));
    let during = agent.scrape();
    let mut loader = loader;
    loader.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after = agent.scrape();
    for text in [&during, &after] {
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or(text);
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus) must be installed");
        use std::io::Write;
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = promtool.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for series in [
        "mesh_trace_request_duration_seconds_count{",
        "mesh_trace_hop_duration_seconds_count{hop=\"outbound_proxy\"",
        "mesh_trace_sidecar_overhead_seconds_count{direction=\"outbound\"",
        "mesh_trace_requests_total{reporter=\"source\",source_workload=\"loadgen\",destination_service=\"productpage\",status_code=\"200\",request_protocol=\"http\",grpc_response_status=\"\",source_workload_namespace=\"bookinfo\",destination_service_namespace=\"bookinfo\"}",
        "mesh_trace_connections_opened_total{leg=\"mesh\"",
    ] {
        assert!(after.contains(series), "{series} missing:\n{after}");
    }
}
