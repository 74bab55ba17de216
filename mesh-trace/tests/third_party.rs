//! Spans through a sidecar no one here wrote: HAProxy from Debian's
//! packages in the Istio port layout (two worker threads, pooled keep-alive
//! upstreams, no x-request-id of its own, 403s it answers itself), 16
//! concurrent keep-alive clients, an app whose service time is 2 ms or
//! 40 ms at random. Each span is judged against its own request's truth:
//! the client's and the app's records of that request. Needs root.
mod common;

use std::{collections::HashMap, time::Duration};

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
    spans::span::{Hop, LocalReply, Span},
};

/// Where each request's `x-request-id` comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ids {
    /// The client sends one; the sidecars forward it untouched.
    FromClient,
    /// The client sends none (its own id rides in `x-lab-client-id`, for
    /// the truth: a header proxies pass on as written); the outbound
    /// sidecar adds one upstream, as Envoy does.
    AddedUpstream,
    /// As `AddedUpstream`, the requests' heads alike in every byte (the
    /// client's id rides in the body, for the truth).
    AddedUpstreamToIdenticalRequests,
}

impl Ids {
    fn added_upstream(self) -> bool {
        self != Ids::FromClient
    }
}

#[test]
fn spans_through_haproxy_sidecars_are_each_their_own_requests() {
    spans_through_haproxy(Ids::FromClient, false, false);
}

/// HTTP/1.1 apps, HTTP/2 between the HAProxy sidecars (Istio's
/// `h2UpgradePolicy: UPGRADE`): requests multiplexed as streams on the
/// sidecars' pooled connections, their heads decoded from the frames the
/// kernel walks (HPACK), answered in any order. As exact as HTTP/1.1.
#[test]
fn spans_through_haproxy_sidecars_upgrading_to_http2_are_exact() {
    spans_through_haproxy(Ids::FromClient, false, true);
}

/// The same with mutual TLS between the sidecars (ALPN h2): the frames
/// are walked in the plaintext of their `SSL_write`/`SSL_read` calls,
/// numbered by position in the session's plaintext, the same at both ends.
#[test]
fn spans_through_haproxy_sidecars_upgrading_to_http2_over_mutual_tls_are_exact() {
    spans_through_haproxy(Ids::FromClient, true, true);
}

/// Mutual TLS between the HAProxy sidecars (OpenSSL): the bytes between
/// them show nothing, so what each sidecar matches on comes from the
/// plaintext of its `SSL_write`/`SSL_read` calls (the TLS probes). As
/// exact as plaintext.
#[test]
fn spans_through_haproxy_sidecars_over_mutual_tls_are_exact_from_their_plaintext() {
    spans_through_haproxy(Ids::FromClient, true, false);
}

/// Envoy adds `x-request-id` upstream when the app sent none. Requests to
/// one URL are then told apart inside the sidecar by the header lines it
/// passes on as written: what is exported must carry the id that was on
/// the wire, though its client request had none, and be its own request's.
#[test]
fn an_id_added_by_the_outbound_sidecar_is_on_its_span_or_the_request_is_counted() {
    spans_through_haproxy(Ids::AddedUpstream, false, false);
}

/// The same with heads alike in every byte: the requests are told apart
/// by nothing a proxy forwards, only by which response came back first
/// (README, Spans); two answered before either goes downstream stay
/// `ambiguous`, counted.
#[test]
fn identical_requests_given_an_id_upstream_are_told_apart_by_their_responses_or_counted() {
    spans_through_haproxy(Ids::AddedUpstreamToIdenticalRequests, false, false);
}

fn spans_through_haproxy(ids: Ids, mtls: bool, h2: bool) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "span tests load eBPF programs and build a lab: run them as root"
    );
    let sidecar = Sidecar::Haproxy {
        ids: match ids {
            Ids::FromClient => RequestIds::Untouched,
            _ => RequestIds::AddedUpstream,
        },
        threads: 2,
    };
    let http2 = if h2 {
        Http2::BetweenSidecars
    } else {
        Http2::Off
    };
    let id_flag: &[&str] = match ids {
        Ids::FromClient => &[],
        Ids::AddedUpstream => &["--no-request-id"],
        Ids::AddedUpstreamToIdenticalRequests => &["--client-id-in-body"],
    };
    let lab = Lab::up(&varied_lab(sidecar, http2, mtls)).unwrap();
    // Over HTTP/2 a lost header block costs its connection's header state
    // for good: a ring of 16 MiB for this unoptimized agent (tests/spans.rs).
    let traced = if h2 {
        Traced::start_with_settings(&lab, |s| s.ring_buffer_bytes = 1 << 24)
    } else {
        Traced::start(&lab)
    };
    if mtls {
        common::wait_for_libssl_probed(&traced);
    }
    let warmup = lab.dir.join("warmup.jsonl");
    let args = |more: &[&'static str]| -> Vec<&'static str> { [more, id_flag].concat() };
    lab.load_with(
        BIN.as_ref(),
        CLIENT,
        &args(&[
            "--url",
            "http://reviews:9080/reviews/0",
            "--connections",
            "16",
            "--requests",
            "160",
        ]),
        &warmup,
    )
    .unwrap();
    // Requests the sidecar denies itself, mixed in while the main load runs.
    let denied_records = lab.dir.join("denied.jsonl");
    let mut denied = lab
        .spawn_load(
            CLIENT,
            &args(&[
                "--url",
                "http://reviews:9080/denied/0",
                "--rate",
                "10",
                "--duration-s",
                "3",
            ]),
            &denied_records,
        )
        .unwrap();
    let records = lab.dir.join("client.jsonl");
    let n = 1600u64;
    let summary = lab
        .load_with(
            BIN.as_ref(),
            CLIENT,
            &args(&[
                "--url",
                "http://reviews:9080/reviews/0",
                "--connections",
                "16",
                "--requests",
                "1600",
            ]),
            &records,
        )
        .unwrap();
    assert_eq!(summary.ok, n, "{summary:?}");
    denied.wait().unwrap();
    let client: Vec<ClientRecord> = read_records(&records).unwrap();
    let denied_client: Vec<ClientRecord> = read_records(&denied_records).unwrap();
    assert!(
        denied_client.len() >= 20,
        "{} denied requests",
        denied_client.len()
    );
    assert!(
        denied_client.iter().all(|c| c.status == 403),
        "HAProxy denies /denied"
    );

    // Each app record under its client's id, and the id on the wire
    // (the client's, or the one the sidecar added) to the client's.
    let mut apps: HashMap<String, AppRecord> = HashMap::new();
    let mut to_client: HashMap<String, String> = HashMap::new();
    for pod in REVIEWS {
        for a in read_records::<AppRecord>(&lab.app_log(pod)).unwrap() {
            let Some(wire) = a.request_id.clone() else {
                continue;
            };
            let client_id = match ids {
                Ids::FromClient => wire.clone(),
                _ => {
                    let own = a
                        .client_id
                        .clone()
                        .expect("the client's id in x-lab-client-id or the body");
                    assert_ne!(own, wire, "the sidecar added an id of its own");
                    own
                }
            };
            to_client.insert(wire, client_id.clone());
            apps.insert(client_id, a);
        }
    }
    let client_id = |s: &Span| -> Option<String> {
        let wire = s.request_id.as_deref()?;
        match ids {
            Ids::FromClient => Some(wire.to_string()),
            _ => to_client.get(wire).cloned(),
        }
    };
    // Requests the sidecar denies carry no id anywhere when the client
    // sends none: only the forwarded ones can be joined then.
    let joinable: Vec<&ClientRecord> = match ids {
        Ids::FromClient => client.iter().chain(&denied_client).collect(),
        _ => client.iter().collect(),
    };
    let mine: std::collections::HashSet<&str> =
        joinable.iter().map(|c| c.request_id.as_str()).collect();
    let wanted = joinable.len();
    let collect = || -> Vec<Span> {
        traced
            .spans
            .lock()
            .unwrap()
            .iter()
            // reviews v2/v3 propagate the id to ratings: the client's only.
            .filter(|s| s.source_workload == "loadgen")
            .filter(|s| client_id(s).is_some_and(|id| mine.contains(id.as_str())))
            .cloned()
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while collect().len() < wanted && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let spans = collect();
    let unstitched = traced.unstitched();
    eprintln!(
        "{} of {wanted} requests yield a span; unstitched: {unstitched:?}",
        spans.len()
    );
    if mtls {
        // The evidence behind mutual TLS: request heads from the sidecars'
        // SSL_write/SSL_read, joined to their records on the wire.
        let m = &traced.state.metrics;
        let tls = |result| {
            m.tls_plaintext
                .get_or_create(&mesh_trace::agent::metrics::ResultLabel { result })
                .get()
        };
        eprintln!(
            "TLS plaintext: {} files probed, {} request heads joined, {} not",
            m.tls_files_probed.get(),
            tls("joined"),
            tls("unjoined")
        );
        assert!(
            m.tls_files_probed.get() >= 1,
            "HAProxy's libssl was not probed"
        );
        if !h2 {
            // HTTP/1.1 heads in the plaintext (HTTP/2's are frames).
            assert!(tls("joined") >= 2 * n, "{} heads joined", tls("joined"));
        }
    }
    if h2 {
        // The sidecars spoke HTTP/2: each request's head and response's
        // head decoded where the outbound sidecar wrote and read them and
        // where the inbound one read and wrote them.
        let m = &traced.state.metrics;
        let blocks = |result| {
            m.h2_header_blocks
                .get_or_create(&mesh_trace::agent::metrics::ResultLabel { result })
                .get()
        };
        eprintln!(
            "HTTP/2 header blocks: {} decoded, {} undecodable",
            blocks("decoded"),
            blocks("undecodable")
        );
        assert!(blocks("decoded") >= 4 * n, "{} blocks", blocks("decoded"));
        assert_eq!(blocks("undecodable"), 0);
    }

    // Each request at most one span; at least 99.9% of them one; the rest
    // counted.
    let mut seen = std::collections::HashSet::new();
    assert!(
        spans.iter().all(|s| seen.insert(s.request_id.clone())),
        "a request with two spans"
    );
    // With the id added upstream to heads alike in every byte, two writes
    // answered upstream with the same status before either response goes
    // downstream stay ambiguous: 1,589 to 1,597 of 1,600 with a span in
    // three runs (GET requests alike but for an id header the tracer did
    // not read: 1,576 to 1,594 in five; before responses were evidence,
    // 1,405 to 1,480).
    let bar = match ids {
        Ids::AddedUpstreamToIdenticalRequests => 0.97,
        _ => 0.999,
    };
    assert!(
        spans.len() as f64 >= bar * wanted as f64,
        "{} of {wanted} requests have a span; unstitched: {unstitched:?}",
        spans.len()
    );
    if ids.added_upstream() {
        // Every forwarded request's span names the id the sidecar added.
        let unnamed: Vec<Span> = traced
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.source_workload == "loadgen" && s.local_reply.is_none())
            .filter(|s| s.status != 403 && client_id(s).is_none())
            .cloned()
            .collect();
        assert!(
            unnamed.is_empty(),
            "{} spans without the id on the wire, e.g. {:?}",
            unnamed.len(),
            unnamed.first()
        );
    }
    let counted: u64 = unstitched.values().sum();
    assert!(counted >= (wanted - spans.len()) as u64, "{unstitched:?}");

    // The sidecar's own replies are spans of their own, flagged, and no
    // forwarded request is taken for one.
    let by_id: HashMap<&str, &ClientRecord> = client
        .iter()
        .chain(&denied_client)
        .map(|c| (c.request_id.as_str(), c))
        .collect();
    let bounds = moment_bounds(&lab);
    let mut local = 0;
    let (mut exact, mut compared, mut wrong) = (0, 0, Vec::new());
    // Exact only within the truth's bounds, not on its recorded points.
    let mut exact_by_bounds = 0usize;
    for s in &spans {
        let id = client_id(s).unwrap();
        let id = id.as_str();
        let c = by_id[id];
        if c.status == 403 {
            assert_eq!(s.status, 403);
            assert!(s.moments[2..10].iter().all(Option::is_none), "{s:?}");
            match s.local_reply {
                Some(LocalReply::Outbound) => {
                    assert!(s.hop_ns(Hop::OutboundProxy).is_some(), "{s:?}");
                    local += 1;
                }
                // The sidecar's write of the reply was not seen (t10):
                // nothing says it answered, and the span has no hops.
                None => assert_eq!(s.moments[10], None, "{s:?}"),
                Some(LocalReply::Inbound) => panic!("{s:?}"),
            }
            continue;
        }
        assert_eq!(s.local_reply, None, "{s:?}");
        assert_eq!(s.status, 200);
        assert!(s.moments.iter().all(Option::is_some), "{s:?}");
        // Against this request's own truth: the app's time between reading
        // it and writing the response, and the client's socket exchange.
        let Some(a) = apps.get(id) else { continue };
        compared += 1;
        // Each as far as the records know it (a read's moment lies within
        // its call: `common::truth::judge`).
        let (app_point, app_range) = hop_of(&bounds, &[(a.t_read_ns, a.t_write_ns)]);
        let app = outside(app_range, s.hop_ns(Hop::App).unwrap());
        let (total_point, total_range) = hop_of(&bounds, &[(c.t_write_ns, c.t_read_ns)]);
        let total = outside(total_range, s.total_ns().unwrap());
        // Another request's moments inside the span show in the app hop
        // (2 ms against 40 ms). The total's ends are the client socket's
        // own write (the kernel's transmit stamp) and read.
        if app <= 500_000 && total <= 500_000 {
            exact += 1;
            let on_points = s.hop_ns(Hop::App).unwrap().abs_diff(app_point) <= 500_000
                && s.total_ns().unwrap().abs_diff(total_point) <= 500_000;
            exact_by_bounds += usize::from(!on_points);
        } else if compared - exact <= 5 {
            let off = |m: Option<u64>, t: u64| m.map(|m| (m as i64 - t as i64) / 1000);
            eprintln!(
                "not exact: {id}: app off {} us, total off {} us; client write {:?} us, read {:?} us, app read {:?} us, write {:?} us off the records",
                app / 1000,
                total / 1000,
                off(s.moments[0], c.t_write_ns),
                off(s.moments[11], c.t_read_ns),
                off(s.moments[5], a.t_read_ns),
                off(s.moments[6], a.t_write_ns),
            );
        }
        if app > 30_000_000 {
            wrong.push(format!("{id}: app off {app} ns"));
        }
        if total > 30_000_000 {
            eprintln!(
                "{id}: total off {total} ns (span t0 {:?} t11 {:?}; client write {} read {})",
                s.moments[0], s.moments[11], c.t_write_ns, c.t_read_ns
            );
        }
    }
    eprintln!(
        "{local} local replies; {exact} of {compared} spans exact to 0.5 ms ({exact_by_bounds} only within their moments' bounds), {} wrong",
        wrong.len()
    );
    // Few need the bounds: a stamping error of mesh-trace's that they would
    // hide shows as more (as in `Judged::assert_nearly_all_exact`).
    assert!(
        exact_by_bounds as f64 <= 0.03 * compared as f64,
        "{exact_by_bounds} of {compared} spans exact only within their moments' bounds"
    );
    if ids == Ids::FromClient {
        assert!(
            local as f64 >= 0.9 * denied_client.len() as f64,
            "{local} local-reply spans"
        );
    }
    assert!(
        wrong.is_empty(),
        "spans holding another request's moments: {wrong:?}"
    );
    // Among identical requests some are counted instead: none of the
    // spans is wrong (above).
    if ids != Ids::AddedUpstreamToIdenticalRequests {
        assert!(
            compared as f64 >= 0.99 * n as f64,
            "{compared} spans compared"
        );
        assert!(
            exact as f64 >= 0.999 * n as f64,
            "{exact} of {n} exact ({compared} compared)"
        );
    }
}
