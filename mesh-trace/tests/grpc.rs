//! gRPC through sidecars no one here wrote, HAProxy from Debian's packages,
//! and through the lab's own (hyper's HTTP/2 client on every leg, whose
//! vectored writes carry many buffers), speaking HTTP/2 from app to app
//! (`Http2::EndToEnd`), the lab's gRPC pair
//! on tonic (`lab::grpc`): 16 callers sharing one HTTP/2 connection, so
//! that their calls are streams multiplexed on it and on the sidecars'
//! pooled upstreams, an app whose service time is 2 ms or 40 ms at random.
//! Each span is judged against its own call's truth (the client's and the
//! app's records of it). Needs root.
mod common;

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::Duration,
};

use common::{
    truth::{hop_of, moment_bounds, outside, varied_lab, BIN, CLIENT, REVIEWS},
    Traced,
};
use mesh_trace::{
    lab::{
        config::Http2,
        haproxy::RequestIds,
        records::{read_records, AppRecord, ClientRecord},
        topology::{Lab, Sidecar},
    },
    spans::span::{Hop, Protocol, Span},
};

const HAPROXY: Sidecar = Sidecar::Haproxy {
    ids: RequestIds::Untouched,
    threads: 2,
};

#[test]
fn grpc_unary_calls_through_haproxy_sidecars_are_exact_next_to_http1() {
    grpc_unary_calls(HAPROXY, false);
}

#[test]
fn grpc_unary_calls_through_haproxy_sidecars_over_mutual_tls_are_exact() {
    grpc_unary_calls(HAPROXY, true);
}

/// The lab's own sidecars: one HTTP/2 connection per endpoint upstream,
/// `:authority` kept from the app's request.
#[test]
fn grpc_unary_calls_through_the_labs_own_sidecars_are_exact_next_to_http1() {
    grpc_unary_calls(Sidecar::Lab, false);
}

/// A lab whose sidecars speak HTTP/2 end to end, traced.
fn grpc_lab(sidecar: Sidecar, mtls: bool) -> (Lab, Traced) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "gRPC tests load eBPF programs and build a lab: run them as root"
    );
    let lab = Lab::up(&varied_lab(sidecar, Http2::EndToEnd, mtls)).unwrap();
    // A lost header block costs its connection's HPACK state for good, and
    // this agent is the test's unoptimized build sharing two cores with the
    // lab: a ring of 16 MiB (the default is 1 MiB) rides out its pauses.
    let traced = Traced::start_with_settings(&lab, |s| s.ring_buffer_bytes = 1 << 24);
    if mtls {
        common::wait_for_libssl_probed(&traced);
    }
    (lab, traced)
}

/// Each app record under its request id.
fn app_records() -> impl Fn(&Lab) -> HashMap<String, AppRecord> {
    |lab| {
        REVIEWS
            .iter()
            .flat_map(|pod| read_records::<AppRecord>(&lab.app_log(pod)).unwrap())
            .filter_map(|a| Some((a.request_id.clone()?, a)))
            .collect()
    }
}

/// The spans of the client's requests among `ids`, waiting up to 60 s for
/// all of them: the agent here is the test's unoptimized build, and the lab's
/// own sidecars (also unoptimized) leave it tens of seconds behind by the
/// end of the load.
fn spans_of(traced: &Traced, ids: &HashSet<&str>) -> Vec<Span> {
    let collect = || -> Vec<Span> {
        traced
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.source_workload == "loadgen")
            .filter(|s| s.request_id.as_deref().is_some_and(|id| ids.contains(id)))
            .cloned()
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while collect().len() < ids.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    collect()
}

/// How a set of requests' spans compare with their truth.
#[derive(Debug, Default)]
struct Judged {
    wanted: usize,
    spans: usize,
    compared: usize,
    /// App hop within 0.5 ms of the truth, and the client's moments right
    /// (see [`judge`]).
    exact: usize,
    /// Exact only within the truth's bounds, not on its recorded points.
    exact_by_bounds: usize,
    /// The client's moments within 0.5 ms of its record's.
    client_exact: usize,
    /// The app hop holds another request's time (off by more than 30 ms,
    /// when service times are 2 or 40 ms).
    wrong: Vec<String>,
}

fn judge(
    lab: &Lab,
    client: &[ClientRecord],
    apps: &HashMap<String, AppRecord>,
    spans: &[Span],
    protocol: Protocol,
) -> Judged {
    let bounds = moment_bounds(lab);
    let mut j = Judged {
        wanted: client.len(),
        spans: spans.len(),
        ..Judged::default()
    };
    let mut seen = HashSet::new();
    for s in spans {
        let id = s.request_id.clone().unwrap();
        assert!(seen.insert(id.clone()), "two spans for {id}");
        assert_eq!(s.protocol, protocol, "{s:?}");
        assert_eq!(s.status, 200, "{s:?}");
        if protocol == Protocol::Grpc {
            assert_eq!(s.grpc_status, Some(0), "{s:?}");
        }
        assert!(s.moments.iter().all(Option::is_some), "{s:?}");
        let c = client.iter().find(|c| c.request_id == id).unwrap();
        let Some(a) = apps.get(&id) else { continue };
        assert!(
            a.t_write_ns != 0,
            "the app's truth lost its stream's end: {a:?}"
        );
        j.compared += 1;
        // Within 0.5 ms of the app's time as far as its record knows it
        // (a read's moment lies within its call: `common::truth::judge`).
        let (point, range) = hop_of(&bounds, &[(a.t_read_ns, a.t_write_ns)]);
        let app = outside(range, s.hop_ns(Hop::App).unwrap());
        // The client's end: the span's client moments must lie inside the
        // call as the caller timed it. The client's record has the write
        // that carried the call's HEADERS frame and the read that carried
        // its last frame (its clock tells its streams apart by their
        // heads): counted, not held to, as that write's moment is the
        // kernel's transmit stamp and mesh-trace stamps a send when its
        // call returns (README, Limitations).
        let client_ok =
            s.moments[0].unwrap() >= c.t_start_ns && s.moments[11].unwrap() <= c.t_end_ns;
        if s.moments[0].unwrap().abs_diff(c.t_write_ns) <= 500_000
            && s.moments[11].unwrap().abs_diff(c.t_read_ns) <= 500_000
        {
            j.client_exact += 1;
        }
        if app <= 500_000 && client_ok {
            j.exact += 1;
            if s.hop_ns(Hop::App).unwrap().abs_diff(point) > 500_000 {
                j.exact_by_bounds += 1;
            }
        } else if j.compared - j.exact <= 5 {
            eprintln!(
                "{id}: app off {app} ns, client's moments ok: {client_ok}: {s:?} {a:?} {c:?}"
            );
        }
        if app > 30_000_000 {
            j.wrong.push(format!("{id}: app off {app} ns"));
        }
    }
    j
}

fn load(lab: &Lab, args: &[&str], records: &Path) -> Vec<ClientRecord> {
    let summary = lab.load_with(BIN.as_ref(), CLIENT, args, records).unwrap();
    let client: Vec<ClientRecord> = read_records(records).unwrap();
    assert_eq!(summary.ok as usize, client.len(), "{summary:?}");
    client
}

fn grpc_unary_calls(sidecar: Sidecar, mtls: bool) {
    let (lab, traced) = grpc_lab(sidecar, mtls);
    let unary = [
        "--url",
        "http://reviews:9080",
        "--grpc",
        "unary",
        "--connections",
        "16",
    ];
    load(
        &lab,
        &[&unary[..], &["--requests", "160"]].concat(),
        &lab.dir.join("warmup.jsonl"),
    );
    // HTTP/1.1 from the same app at the same time (plaintext run): its
    // requests cross the same sidecars and connections as HTTP/2 streams.
    let http1_records = lab.dir.join("http1.jsonl");
    let mut http1 = (!mtls).then(|| {
        lab.spawn_load(
            CLIENT,
            &[
                "--url",
                "http://reviews:9080/reviews/0",
                "--connections",
                "4",
                "--requests",
                "400",
            ],
            &http1_records,
        )
        .unwrap()
    });
    let n = 1600;
    let client = load(
        &lab,
        &[&unary[..], &["--requests", &n.to_string()]].concat(),
        &lab.dir.join("client.jsonl"),
    );
    assert_eq!(client.len(), n);
    let http1_client: Vec<ClientRecord> = match http1.as_mut() {
        Some(child) => {
            assert!(child.wait().unwrap().success());
            read_records(&http1_records).unwrap()
        }
        None => Vec::new(),
    };
    let apps = app_records()(&lab);

    let ids: HashSet<&str> = client.iter().map(|c| c.request_id.as_str()).collect();
    let spans = spans_of(&traced, &ids);
    let unstitched = traced.unstitched();
    let grpc = judge(&lab, &client, &apps, &spans, Protocol::Grpc);

    eprintln!("gRPC: {grpc:?}; unstitched: {unstitched:?}");
    let m = &traced.state.metrics;
    let blocks = |result| {
        m.h2_header_blocks
            .get_or_create(&mesh_trace::agent::metrics::ResultLabel { result })
            .get()
    };
    let text = m.encode();
    let lines =
        |prefix: &str| -> Vec<&str> { text.lines().filter(|l| l.starts_with(prefix)).collect() };
    eprintln!(
        "HTTP/2 header blocks: {} decoded, {} undecodable; {:?}; {:?}",
        blocks("decoded"),
        blocks("undecodable"),
        lines("mesh_trace_h2_header_state_lost_total"),
        lines("mesh_trace_events_lost_total"),
    );
    assert_eq!(blocks("undecodable"), 0);
    assert!(
        grpc.wrong.is_empty(),
        "spans holding another call's moments: {:?}",
        grpc.wrong
    );
    assert!(
        grpc.spans as f64 >= 0.999 * n as f64,
        "{} of {n} calls have a span; unstitched: {unstitched:?}",
        grpc.spans
    );
    let counted: u64 = unstitched.values().sum();
    assert!(counted >= (n - grpc.spans) as u64, "{unstitched:?}");
    assert!(grpc.compared as f64 >= 0.99 * n as f64, "{grpc:?}");
    // Few need the truth's bounds: a stamping error of mesh-trace's that
    // they would hide shows as more (as in `Judged::assert_nearly_all_exact`).
    assert!(grpc.exact_by_bounds as f64 <= 0.03 * n as f64, "{grpc:?}");
    // At least 99.9% of calls have a span exact to 0.5 ms.
    assert!(
        grpc.exact as f64 >= 0.999 * n as f64,
        "{} of {n} exact ({} compared)",
        grpc.exact,
        grpc.compared
    );
    // The calls in the request metrics: by protocol, with their gRPC status.
    let text = traced.state.metrics.encode();
    let counted = |protocol: &str, grpc: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("mesh_trace_requests_total{reporter=\"source\""))
            .filter(|l| {
                l.contains(&format!(
                    "request_protocol=\"{protocol}\",grpc_response_status=\"{grpc}\""
                ))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(counted("grpc", "0") >= grpc.spans as f64, "{text}");
    if !http1_client.is_empty() {
        let ids: HashSet<&str> = http1_client.iter().map(|c| c.request_id.as_str()).collect();
        let spans = spans_of(&traced, &ids);
        let http1 = judge(&lab, &http1_client, &apps, &spans, Protocol::Http);
        eprintln!("HTTP/1.1 beside it: {http1:?}");
        assert!(counted("http", "") >= http1.spans as f64, "{text}");
        assert!(http1.wrong.is_empty(), "{:?}", http1.wrong);
        // 400 requests: one without a span (counted) is 0.25%.
        assert!(
            http1.spans as f64 >= 0.99 * http1.wanted as f64,
            "{http1:?}"
        );
        assert!(
            http1.exact as f64 >= 0.98 * http1.compared as f64,
            "{http1:?}"
        );
    }
}

/// A server-streaming call is one span, from its request to its last
/// message and trailers, with the call's status.
#[test]
fn a_server_streaming_grpc_call_is_one_span_to_its_last_message() {
    let (lab, traced) = grpc_lab(HAPROXY, false);
    let n = 200;
    let client = load(
        &lab,
        &[
            "--url",
            "http://reviews:9080",
            "--grpc",
            "server-stream",
            "--messages",
            "5",
            "--connections",
            "16",
            "--requests",
            &n.to_string(),
        ],
        &lab.dir.join("client.jsonl"),
    );
    let apps = app_records()(&lab);
    let ids: HashSet<&str> = client.iter().map(|c| c.request_id.as_str()).collect();
    let spans = spans_of(&traced, &ids);
    let streamed = judge(&lab, &client, &apps, &spans, Protocol::Grpc);
    eprintln!("{streamed:?}; unstitched: {:?}", traced.unstitched());
    assert!(streamed.wrong.is_empty(), "{:?}", streamed.wrong);
    assert!(streamed.spans as f64 >= 0.99 * n as f64, "{streamed:?}");
    // Five replies of 2 or 40 ms each: the span runs to the last one.
    for s in &spans {
        let app = s.hop_ns(Hop::App).unwrap();
        assert!(
            app >= 10_000_000,
            "app hop {app} ns: ended before the last reply: {s:?}"
        );
        assert!(s.path.ends_with("/lab.Reviews/List"), "{s:?}");
    }
    assert!(
        streamed.exact as f64 >= 0.98 * streamed.compared as f64,
        "{streamed:?}"
    );
}
