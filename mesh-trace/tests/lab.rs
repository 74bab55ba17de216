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
        let recs = proxy_records(&lab, CLIENT);
        assert!(!recs.is_empty());
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
        let recs = proxy_records(&lab, CLIENT);
        assert!(!recs.is_empty());
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
