//! TCP health per leg, checked against the kernel's own accounting: packet
//! loss and delay put on one pod's eth0 (an iptables statistic rule and an
//! NFQUEUE relay, `lab::impair`), resets provoked by an abortive close, and
//! each pod namespace's `nstat` counters. Needs root.
mod common;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

use common::Traced;
use mesh_trace::lab::{
    impair::Impairment,
    topology::{Lab, LabOptions},
};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-trace");
const CLIENT: &str = "loadgen-v1";
const URL: &str = "http://reviews:9080/reviews/0";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "TCP health tests load eBPF programs and build a lab: run them as root"
    );
}

fn lab_with(pod: &str, imp: Impairment) -> Lab {
    let mut o = LabOptions::bookinfo().unwrap();
    o.exe = BIN.into();
    o.impairments.insert(pod.into(), imp);
    Lab::up(&o).unwrap()
}

/// One counter of `nstat` in a pod's namespace (absolute, history untouched).
fn nstat(lab: &Lab, pod: &str, counter: &str) -> u64 {
    let out = lab
        .pod(pod)
        .ns
        .exec("nstat", &["-asz", counter])
        .expect("nstat (iproute2) in the pod's namespace");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(counter)).then(|| f.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {counter} in nstat's output: {text}"))
}

fn nstat_all(lab: &Lab, counter: &str) -> BTreeMap<String, u64> {
    lab.pods
        .iter()
        .map(|p| (p.spec.name.clone(), nstat(lab, &p.spec.name, counter)))
        .collect()
}

/// The agent's metrics in the text exposition format, as Prometheus scrapes them.
fn exposition(traced: &Traced) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &traced.state.metrics.registry).unwrap();
    text
}

/// Samples of one metric: labels and value.
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// Sum of a counter's samples by one label.
fn by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (labels, v) in samples(text, name) {
        *out.entry(labels.get(label).cloned().unwrap_or_default())
            .or_default() += v as u64;
    }
    out
}

/// The bounds of the bucket that holds a leg's median sample of an RTT
/// histogram (both sides together), and the number of samples.
fn median_bucket(text: &str, histogram: &str, leg: &str) -> ((f64, f64), u64) {
    let mut cumulative: BTreeMap<u64, f64> = BTreeMap::new();
    for (labels, v) in samples(text, &format!("{histogram}_bucket")) {
        if labels.get("leg").map(String::as_str) != Some(leg) {
            continue;
        }
        let le: f64 = match labels["le"].as_str() {
            "+Inf" => f64::INFINITY,
            x => x.parse().unwrap(),
        };
        // Keyed by the bound's bits: positive floats order as their bits.
        *cumulative.entry(le.to_bits()).or_default() += v;
    }
    let total = cumulative.values().copied().fold(0.0, f64::max) as u64;
    let mut lower = 0.0;
    for (bits, count) in &cumulative {
        let upper = f64::from_bits(*bits);
        if *count as u64 * 2 >= total && total > 0 {
            return ((lower, upper), total);
        }
        lower = upper;
    }
    ((0.0, 0.0), total)
}

#[test]
fn retransmits_are_counted_on_the_leg_that_lost_packets() {
    require_root();
    // 5% of the client pod's packets leaving eth0 are dropped: only the
    // mesh leg from its sidecar crosses eth0.
    let lab = lab_with(
        CLIENT,
        Impairment {
            loss: 0.05,
            delay_ms: 0.0,
        },
    );
    // Every retransmit must reach the agent, here the test's unoptimized
    // build sharing two cores with the lab: a ring of 16 MiB (the default
    // is 1 MiB) rides out its pauses (a 4 MiB one lost 16,297 events once).
    let traced = Traced::start_with_settings(&lab, |s| s.ring_buffer_bytes = 1 << 24);
    // Every TCP tracepoint attached, the SYN-ACK one included.
    let programs = traced.state.info.lock().unwrap().programs.join(", ");
    for tp in ["tcp_retransmit_skb", "tcp_retransmit_synack"] {
        assert!(programs.contains(tp), "{tp} not attached: {programs}");
    }
    let before = nstat_all(&lab, "TcpRetransSegs");
    let summary = lab
        .load(
            CLIENT,
            &["--url", URL, "--rate", "400", "--requests", "4000"],
            &lab.dir.join("client.jsonl"),
        )
        .unwrap();
    assert_eq!(summary.ok, 4000, "{summary:?}");
    // Retransmissions still in flight settle (the kernel's minimum RTO is
    // 200 ms), then the two counts must stay equal.
    std::thread::sleep(Duration::from_secs(2));
    let kernel = |after: &BTreeMap<String, u64>| -> u64 {
        after.iter().map(|(pod, n)| n - before[pod]).sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (want, legs) = loop {
        let want = kernel(&nstat_all(&lab, "TcpRetransSegs"));
        let legs = by_label(
            &exposition(&traced),
            "mesh_trace_tcp_retransmits_total",
            "leg",
        );
        let got: u64 = legs.values().sum();
        if got >= want || Instant::now() > deadline {
            break (want, legs);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let got: u64 = legs.values().sum();
    let per_pod: BTreeMap<String, u64> = nstat_all(&lab, "TcpRetransSegs")
        .into_iter()
        .map(|(pod, n)| (pod.clone(), n - before[&pod]))
        .filter(|(_, n)| *n > 0)
        .collect();
    let synack = nstat_all(&lab, "TcpExtTCPSynRetrans");
    let text = exposition(&traced);
    eprintln!(
        "failed retransmits since the lab started: {:?}; events lost: {:?}; unknown sockets: {:?}",
        nstat_all(&lab, "TcpExtTCPRetransFail"),
        samples(&text, "mesh_trace_events_lost_total"),
        samples(&text, "mesh_trace_unknown_socket_events_total"),
    );
    eprintln!(
        "retransmitted segments: kernel {want} by pod {per_pod:?} (SYN/SYN-ACK retransmits \
         since the lab started: {synack:?}), mesh-trace {got} by leg {legs:?}, by side {:?}",
        by_label(
            &exposition(&traced),
            "mesh_trace_tcp_retransmits_total",
            "side"
        )
    );
    assert!(want >= 20, "5% loss retransmitted only {want} segments");
    assert!(
        got.abs_diff(want) as f64 <= 0.02 * want as f64,
        "mesh-trace counted {got} retransmitted segments, the namespaces {want}: {legs:?}"
    );
    assert_eq!(legs.get("mesh").copied().unwrap_or(0), got, "{legs:?}");
    for leg in ["redirect", "delivery"] {
        assert_eq!(legs.get(leg).copied().unwrap_or(0), 0, "{legs:?}");
    }
}

#[test]
fn rtt_per_leg_shows_the_delay_on_the_mesh_leg_only() {
    require_root();
    // 5 ms on every packet leaving the client pod: the mesh leg's RTT seen
    // from both of its ends; the loopback legs are untouched.
    let lab = lab_with(
        CLIENT,
        Impairment {
            loss: 0.0,
            delay_ms: 5.0,
        },
    );
    let traced = Traced::start(&lab);
    // Six seconds on pooled connections: samples at open and about once a
    // second while they carry traffic.
    let summary = lab
        .load(
            CLIENT,
            &["--url", URL, "--rate", "100", "--requests", "600"],
            &lab.dir.join("client.jsonl"),
        )
        .unwrap();
    assert_eq!(summary.ok, 600, "{summary:?}");
    std::thread::sleep(Duration::from_millis(500));
    let text = exposition(&traced);
    let median = |histogram: &str, leg: &str| {
        let ((lo, hi), n) = median_bucket(&text, histogram, leg);
        eprintln!("{histogram} {leg}: median in ({lo}, {hi}] s over {n} samples");
        assert!(n >= 10, "{n} samples of {histogram} on the {leg} leg");
        (lo, hi)
    };
    // The path: 5 ms or more on the mesh leg, under 1 ms on loopback.
    let (lo, hi) = median("mesh_trace_tcp_min_rtt_seconds", "mesh");
    assert!(
        lo >= 0.005,
        "mesh min RTT median in ({lo}, {hi}] s, want 5 ms or more"
    );
    for leg in ["redirect", "delivery"] {
        let (lo, hi) = median("mesh_trace_tcp_min_rtt_seconds", leg);
        assert!(
            hi <= 0.001,
            "{leg} min RTT median in ({lo}, {hi}] s, want below 1 ms"
        );
    }
    // Smoothed RTT holds the delay too; on request/response connections it
    // also holds the peer's delayed ACK, so it is no less than the minimum.
    let (lo, hi) = median("mesh_trace_tcp_rtt_seconds", "mesh");
    assert!(
        lo >= 0.005,
        "mesh smoothed RTT median in ({lo}, {hi}] s, want 5 ms or more"
    );
    for leg in ["redirect", "delivery"] {
        median("mesh_trace_tcp_rtt_seconds", leg);
    }
    // What `top`'s detail view shows for loadgen -> reviews.
    let snapshot = traced
        .state
        .live
        .lock()
        .unwrap()
        .snapshot(mesh_trace::clock::mono_ns());
    let row = snapshot
        .rows
        .iter()
        .find(|r| r.source_workload == "loadgen" && r.destination_service == "reviews")
        .expect("a loadgen -> reviews row");
    eprintln!("top's TCP health for loadgen -> reviews: {:?}", row.tcp);
    let mesh = &row.tcp["mesh"];
    assert!(
        mesh.rtt_samples >= 10 && mesh.min_rtt_p50_ms >= 5.0,
        "{mesh:?}"
    );
    assert!(row.tcp["redirect"].min_rtt_p50_ms < 1.0, "{:?}", row.tcp);
}

#[test]
fn an_abortive_close_is_one_reset_on_its_leg_each_way() {
    require_root();
    let lab = lab_with(CLIENT, Impairment::default());
    let traced = Traced::start(&lab);
    let vip = lab.topology.service("reviews").unwrap().vip;
    let out_before = nstat(&lab, CLIENT, "TcpOutRsts");
    // An app in the client pod asks reviews once, then closes with
    // SO_LINGER 0: the kernel resets the connection to its sidecar.
    lab.pod(CLIENT)
        .ns
        .enter(move || {
            let mut s = std::net::TcpStream::connect((vip, 9080)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /reviews/0 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger).unwrap();
        })
        .unwrap();
    let resets = || samples(&exposition(&traced), "mesh_trace_tcp_resets_total");
    let deadline = Instant::now() + Duration::from_secs(10);
    while resets().iter().map(|(_, v)| *v as u64).sum::<u64>() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let seen = resets();
    eprintln!("resets: {seen:?}");
    assert_eq!(nstat(&lab, CLIENT, "TcpOutRsts") - out_before, 1);
    let one = |side: &str, direction: &str| -> Vec<&BTreeMap<String, String>> {
        seen.iter()
            .filter(|(l, v)| {
                *v > 0.0
                    && l["leg"] == "redirect"
                    && l["side"] == side
                    && l["direction"] == direction
            })
            .map(|(l, _)| l)
            .collect()
    };
    let sent = one("client", "sent");
    assert_eq!(sent.len(), 1, "{seen:?}");
    assert_ne!(
        sent[0]["reason"], "unknown",
        "this kernel names its reasons"
    );
    assert_eq!(one("server", "received").len(), 1, "{seen:?}");
    assert_eq!(
        seen.iter().map(|(_, v)| *v as u64).sum::<u64>(),
        2,
        "one reset sent and received, nothing else: {seen:?}"
    );
}
