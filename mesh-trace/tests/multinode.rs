//! Two nodes: the client pod on one, the server pods on the other, an
//! agent for each scoped to its node (cgroup, network namespaces, NAT
//! steps). Each node reports its half of every request, judged against
//! that request's own truth. Needs root.
mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    agent::free_port,
    otlp::OtlpReceiver,
    prometheus::{dashboards, panel_queries, repo, substitute, Prometheus},
    truth::{delayed_lab, judge, require_root, truths, BIN, CLIENT, REVIEWS},
    Traced,
};
use mesh_trace::{
    flows::legs::LegKind,
    lab::{
        records::{read_records, ClientRecord},
        topology::{Lab, LabOptions},
    },
    spans::span::{Hop, Span},
};

/// The acceptance lab on two nodes: the load generator (and productpage,
/// details) on node-1, reviews and ratings on node-2.
fn two_nodes(mtls: bool) -> LabOptions {
    let mut o = delayed_lab(mtls);
    o.nodes = 2;
    for pod in ["loadgen-v1", "productpage-v1", "details-v1"] {
        o.placement.insert(pod.into(), 0);
    }
    for pod in REVIEWS.iter().chain(&["ratings-v1"]) {
        o.placement.insert(pod.to_string(), 1);
    }
    o
}

#[test]
fn each_node_reports_its_half_of_every_request_in_plaintext() {
    halves_on_two_nodes(false);
}

/// With mutual TLS the bytes between the nodes show nothing of the
/// requests: each node learns which request an encrypted record carries
/// from its sidecar's TLS plaintext (`SSL_write`/`SSL_read`, the TLS
/// probes), and reports its half of every request as in plaintext.
#[test]
fn each_node_reports_its_half_of_every_request_over_mutual_tls() {
    halves_on_two_nodes(true);
}

fn halves_on_two_nodes(mtls: bool) {
    require_root();
    let lab = Lab::up(&two_nodes(mtls)).unwrap();
    assert_eq!(lab.node_of(CLIENT).name, "node-1");
    assert_eq!(lab.node_of(REVIEWS[0]).name, "node-2");
    // Both agents send their traces to one collector.
    let collector = OtlpReceiver::start();
    // One node over OTLP/HTTP, the other over OTLP/gRPC.
    use mesh_trace::agent::otlp::{Endpoint, Protocol};
    let http = Endpoint::parse(&collector.endpoint(), Protocol::HttpProtobuf).unwrap();
    let grpc = Endpoint::parse(&collector.grpc_endpoint(), Protocol::Grpc).unwrap();
    let client_node = Traced::start_on_node(&lab, "node-1", |s| s.otlp_endpoint = Some(http));
    let server_node = Traced::start_on_node(&lab, "node-2", |s| s.otlp_endpoint = Some(grpc));
    let load = |requests: u64, records: &std::path::Path| {
        let requests = requests.to_string();
        let args = [
            "--url",
            "http://reviews:9080/reviews/0",
            "--rate",
            "200",
            "--requests",
            &requests,
            // Half the requests carry the app's own trace context.
            "--traceparent",
            "0.5",
        ];
        lab.load_with(BIN.as_ref(), CLIENT, &args, records)
    };
    // The sidecars' pooled connections open first: the measured load is
    // the steady state.
    load(200, &lab.dir.join("warmup.jsonl")).unwrap();
    let records = lab.dir.join("client.jsonl");
    let n = 2_000u64;
    let summary = load(n, &records).unwrap();
    assert_eq!(summary.ok, n, "{summary:?}");
    let client: Vec<ClientRecord> = read_records(&records).unwrap();
    let ids: std::collections::HashSet<&str> =
        client.iter().map(|c| c.request_id.as_str()).collect();
    // reviews v2/v3 pass the id on to ratings: the client's requests only.
    let mine = |s: &Span| {
        s.source_workload == "loadgen"
            && s.destination_service == "reviews"
            && s.request_id.as_deref().is_some_and(|id| ids.contains(id))
    };
    let of = |traced: &Traced| -> Vec<Span> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let spans: Vec<Span> = traced
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| mine(s))
                .cloned()
                .collect();
            if spans.len() >= n as usize || std::time::Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let truth = truths(&lab, &client);
    let callers = callers(&client);
    let mut traces: HashMap<String, Vec<String>> = HashMap::new();
    for (node, traced, half) in [
        ("node-1", &client_node, "client"),
        ("node-2", &server_node, "server"),
    ] {
        let spans = of(traced);
        let unstitched = traced.unstitched();
        let mut per_id: HashMap<&str, usize> = HashMap::new();
        for s in &spans {
            *per_id.entry(s.request_id.as_deref().unwrap()).or_default() += 1;
            assert_eq!(s.half(), half, "{node}: {s:?}");
            let trace = s.trace_id.clone().expect("a trace id");
            // The app's own trace when its request named one, else the
            // one derived from the mesh leg.
            match callers.get(s.request_id.as_deref().unwrap()) {
                Some(caller) => {
                    assert_eq!(trace, caller.trace, "{node}: {s:?}");
                    if half == "client" {
                        assert_eq!(s.parent_span_id.as_ref(), Some(&caller.span), "{s:?}");
                    }
                }
                None => assert_eq!(s.trace_id, s.mesh_leg_id, "{node}: {s:?}"),
            }
            traces
                .entry(s.request_id.clone().unwrap())
                .or_default()
                .push(trace);
        }
        assert!(
            per_id.values().all(|&k| k == 1),
            "{node}: a request with two spans"
        );
        let judged = judge(&spans, &truth);
        eprintln!(
            "{node} ({half} halves, mtls {mtls}): {} of {n} requests with a span, {} judged, {} exact to 0.5 ms ({} only within their moments' bounds), {} wrong; unstitched {unstitched:?}",
            per_id.len(),
            judged.compared,
            judged.exact,
            judged.exact_by_bounds,
            judged.wrong.len()
        );
        assert!(
            judged.wrong.is_empty(),
            "{node}: spans off their truth: {:?}",
            &judged.wrong[..judged.wrong.len().min(5)]
        );
        // Behind mutual TLS too: the sidecars' TLS plaintext (the TLS
        // probes) says which request each encrypted record carries.
        let wanted = 0.999;
        if mtls && half == "server" {
            // Every request the inbound sidecar held alone (no other read
            // and not yet forwarded within a millisecond of it, from its
            // own records) has its span; the others may be counted.
            let alone = held_alone(&lab, &ids);
            let with_span = alone.iter().filter(|id| per_id.contains_key(*id)).count();
            eprintln!(
                "{node}: {} of {n} requests held alone by the inbound sidecar, {with_span} of them with a span",
                alone.len()
            );
            assert!(
                alone.len() >= 20,
                "only {} requests held alone",
                alone.len()
            );
            assert!(
                with_span as f64 >= 0.99 * alone.len() as f64,
                "{node}: {with_span} of {} requests held alone have a span; unstitched {unstitched:?}",
                alone.len()
            );
        }
        assert!(
            per_id.len() as f64 >= wanted * n as f64,
            "{node}: {} of {n} requests have a span; unstitched: {unstitched:?}",
            per_id.len()
        );
        let counted: u64 = unstitched.values().sum();
        assert!(
            counted >= n - per_id.len() as u64,
            "{node}: {} requests without a span, {counted} counted: {unstitched:?}",
            n - per_id.len() as u64
        );
        // Runs give 1,998 to 2,000 of 2,000.
        judged.assert_nearly_all_exact(n, node);
        // Each side's hops and nothing of the other's.
        let (have, lack): (&[Hop], &[Hop]) = if half == "client" {
            (
                &[Hop::ClientToOutbound, Hop::OutboundProxy, Hop::Upstream],
                &[Hop::Network, Hop::InboundProxy, Hop::App, Hop::ServerSide],
            )
        } else {
            (
                &[
                    Hop::InboundProxy,
                    Hop::InboundToApp,
                    Hop::App,
                    Hop::ServerSide,
                ],
                &[Hop::ClientToOutbound, Hop::Network, Hop::Upstream],
            )
        };
        for s in &spans {
            assert!(have.iter().all(|&h| s.hop_ns(h).is_some()), "{node}: {s:?}");
            assert!(lack.iter().all(|&h| s.hop_ns(h).is_none()), "{node}: {s:?}");
            assert_eq!((s.method.as_str(), s.status), ("GET", 200), "{node}: {s:?}");
            // Both sides name both namespaces, the server's from the
            // client's address.
            let namespaces = (
                s.source_namespace.as_deref(),
                s.destination_namespace.as_deref(),
            );
            assert_eq!(
                namespaces,
                (Some("bookinfo"), Some("bookinfo")),
                "{node}: {s:?}"
            );
        }
    }
    // Where both nodes report a request, both derive one trace id for it,
    // and no two requests share one.
    let both: Vec<&Vec<String>> = traces.values().filter(|t| t.len() == 2).collect();
    assert!(
        both.iter().all(|t| t[0] == t[1]),
        "halves of one request under two trace ids"
    );
    let distinct: std::collections::HashSet<&String> = traces.values().flatten().collect();
    assert_eq!(
        distinct.len(),
        traces.len(),
        "two requests under one trace id"
    );
    eprintln!(
        "{} requests with both halves under one trace id, {} of them the app's own",
        both.len(),
        traces
            .iter()
            .filter(|(id, t)| t.len() == 2 && callers.contains_key(id.as_str()))
            .count()
    );
    for (node, traced) in [("node-1", &client_node), ("node-2", &server_node)] {
        let m = &traced.state.metrics;
        let dropped: Vec<(&str, u64)> = ["queue_full", "export_failed"]
            .into_iter()
            .map(|reason| {
                let n = m
                    .otlp_dropped
                    .get_or_create(&mesh_trace::agent::metrics::ReasonLabel { reason })
                    .get();
                (reason, n)
            })
            .collect();
        eprintln!(
            "{node}: OTLP exported {} requests, dropped {dropped:?}",
            m.otlp_exported.get()
        );
    }
    collected_into_one_trace_each(&collector, &ids, &callers, n);
    // The sidecar's pooled connections to the other node are mesh legs on
    // both nodes, never passthrough.
    for (node, traced) in [("node-1", &client_node), ("node-2", &server_node)] {
        let legs = traced.legs.lock().unwrap();
        let count = |kind: LegKind| {
            legs.iter()
                .filter(|l| l.event == "open" && l.leg == kind)
                .count()
        };
        eprintln!(
            "{node}: legs opened: mesh {}, passthrough {}",
            count(LegKind::Mesh),
            count(LegKind::Passthrough)
        );
        assert!(count(LegKind::Mesh) > 0, "{node}: no mesh leg");
        assert_eq!(
            count(LegKind::Passthrough),
            0,
            "{node}: mesh legs taken for passthrough"
        );
    }
}

/// The client's requests that a reviews pod's inbound sidecar held alone,
/// from its records: between its read of the request and its write to the
/// app (a millisecond more each way, for the time the records are taken
/// after the calls return), it read no other request.
fn held_alone<'a>(lab: &Lab, ids: &std::collections::HashSet<&'a str>) -> Vec<&'a str> {
    use mesh_trace::lab::records::{Direction, ProxyRecord};
    const MARGIN_NS: u64 = 1_000_000;
    let mut out = Vec::new();
    for pod in REVIEWS {
        let records: Vec<ProxyRecord> = read_records(&lab.proxy_log(pod)).unwrap();
        let inbound: Vec<&ProxyRecord> = records
            .iter()
            .filter(|r| r.direction == Direction::Inbound && r.kind == "http")
            .collect();
        for r in &inbound {
            let Some(id) = r.request_id.as_deref().and_then(|id| ids.get(id)) else {
                continue;
            };
            let (from, to) = (
                r.t_downstream_read_ns.saturating_sub(MARGIN_NS),
                r.t_upstream_write_ns + MARGIN_NS,
            );
            let crowded = inbound.iter().any(|q| {
                !std::ptr::eq(*q, *r)
                    && q.t_downstream_read_ns.saturating_sub(MARGIN_NS) < to
                    && q.t_upstream_write_ns + MARGIN_NS > from
            });
            if !crowded {
                out.push(*id);
            }
        }
    }
    out
}

/// The trace context a request was sent with (`--traceparent`).
struct Caller {
    trace: String,
    span: String,
}

fn callers(records: &[ClientRecord]) -> HashMap<&str, Caller> {
    records
        .iter()
        .filter_map(|r| {
            let tp = r.traceparent.as_deref()?;
            let mut parts = tp.split('-').skip(1);
            let caller = Caller {
                trace: parts.next()?.to_string(),
                span: parts.next()?.to_string(),
            };
            Some((r.request_id.as_str(), caller))
        })
        .collect()
}

/// The collector got, for at least 99.9% of the requests, the client's
/// segments from node-1 and the server's from node-2 under one trace id
/// (the app's own when it sent one, the client app's segment then a child
/// of the app's span), the server's inbound sidecar a child of the
/// client's upstream span.
fn collected_into_one_trace_each(
    collector: &OtlpReceiver,
    ids: &std::collections::HashSet<&str>,
    callers: &HashMap<&str, Caller>,
    n: u64,
) {
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let complete = || -> usize {
        let spans = collector.spans.lock().unwrap();
        let mut by_request: HashMap<&str, Vec<&common::otlp::Received>> = HashMap::new();
        for r in spans.iter() {
            // reviews v2/v3 pass the id on to ratings: the calls to reviews.
            if r.attribute("server.address") != Some("reviews") {
                continue;
            }
            if let Some(id) = r
                .attribute("mesh_trace.request_id")
                .filter(|id| ids.contains(id))
            {
                by_request.entry(id).or_default().push(r);
            }
        }
        by_request
            .iter()
            .filter(|(id, segments)| {
                let find = |name: &str, node: &str| {
                    segments
                        .iter()
                        .find(|r| r.span.name == name && r.node == node)
                };
                match (
                    find("upstream", "node-1"),
                    find("inbound sidecar", "node-2"),
                ) {
                    (Some(up), Some(inbound)) => {
                        let apps = callers.get(*id).is_none_or(|c| {
                            hex(&up.span.trace_id) == c.trace
                                && find("client app", "node-1")
                                    .is_some_and(|app| hex(&app.span.parent_span_id) == c.span)
                        });
                        apps && up.span.trace_id == inbound.span.trace_id
                            && inbound.span.parent_span_id == up.span.span_id
                            && segments.iter().all(|r| r.span.trace_id == up.span.trace_id)
                    }
                    _ => false,
                }
            })
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while complete() < n as usize && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let joined = complete();
    eprintln!("OTLP: {joined} of {n} requests with both nodes' segments in one trace");
    assert!(
        joined as f64 >= 0.999 * n as f64,
        "{joined} of {n} requests joined in one trace at the collector"
    );
}

/// One node's agent restarted while requests flow: the other node's halves
/// go on as before, and the restarted agent's are exact again for the
/// requests that start after it is ready (the pooled connections it finds
/// open are adopted).
#[test]
fn one_node_restarted_mid_traffic_leaves_the_other_whole() {
    require_root();
    let lab = Lab::up(&two_nodes(false)).unwrap();
    let client_node = Traced::start_on_node(&lab, "node-1", |_| {});
    let server_node = Traced::start_on_node(&lab, "node-2", |_| {});
    let records = lab.dir.join("client.jsonl");
    let mut load = common::truth::spawn_reviews_load(&lab, &records);
    std::thread::sleep(Duration::from_secs(3));
    drop(server_node);
    std::thread::sleep(Duration::from_secs(1));
    let restarted = Traced::start_on_node(&lab, "node-2", |_| {});
    let ready_ns = mesh_trace::clock::mono_ns();
    std::thread::sleep(Duration::from_secs(5));
    let _ = load.kill();
    let _ = load.wait();
    std::thread::sleep(Duration::from_secs(2));
    let client = common::truth::killed_client_records(&records);
    let truth = truths(&lab, &client);
    let to_reviews = |traced: &Traced| -> Vec<Span> {
        traced
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.source_workload == "loadgen" && s.destination_service == "reviews")
            .cloned()
            .collect()
    };
    // The client's node, through the whole run.
    let spans = to_reviews(&client_node);
    let judged = judge(&spans, &truth);
    eprintln!(
        "node-1: {} requests, {} client halves judged, {} exact, {} wrong",
        client.len(),
        judged.compared,
        judged.exact,
        judged.wrong.len()
    );
    assert!(judged.wrong.is_empty(), "{:?}", judged.wrong);
    assert!(judged.compared as f64 >= 0.99 * truth.len() as f64);
    // The restarted node, for requests after it was ready.
    let after: std::collections::HashMap<String, common::truth::Truth> = client
        .iter()
        .filter(|c| c.t_start_ns > ready_ns)
        .filter_map(|c| Some((c.request_id.clone(), truth.get(&c.request_id)?.clone())))
        .collect();
    let spans = to_reviews(&restarted);
    let judged = judge(&spans, &after);
    eprintln!(
        "node-2 restarted: {} requests after it was ready, {} server halves judged, {} exact, {} wrong; unstitched {:?}",
        after.len(),
        judged.compared,
        judged.exact,
        judged.wrong.len(),
        restarted.unstitched()
    );
    assert!(
        after.len() > 100,
        "{} requests after the restart",
        after.len()
    );
    assert!(judged.wrong.is_empty(), "{:?}", judged.wrong);
    assert!(
        judged.compared as f64 >= 0.99 * after.len() as f64,
        "{} of {} requests after the restart with a server half",
        judged.compared,
        after.len()
    );
    // Some 250 requests: each is 0.4%.
    assert!(
        judged.exact as f64 >= 0.99 * after.len() as f64,
        "{} of {} requests after the restart exact",
        judged.exact,
        after.len()
    );
}

/// A real Prometheus scraping both nodes' agents: `top --prometheus` shows
/// the cluster's row with the client's hops from one node and the
/// server's from the other, each request counted once; and the dashboards'
/// request and hop panels and the recording rules return data from the
/// two halves.
#[test]
fn top_and_the_dashboards_read_both_halves_from_one_prometheus() {
    require_root();
    let lab = Lab::up(&two_nodes(false)).unwrap();
    let (addr_1, addr_2) = (free_port(), free_port());
    let _client_node = Traced::start_on_node(&lab, "node-1", |s| s.metrics_addr = Some(addr_1));
    let _server_node = Traced::start_on_node(&lab, "node-2", |s| s.metrics_addr = Some(addr_2));
    let rules = repo().join("deploy/prometheus/rules.yaml");
    let prometheus =
        Prometheus::start_scraping(&[addr_1, addr_2], &rules, &lab.dir.join("prometheus"));
    let load = |n: u64, records: &str| {
        let summary = lab
            .load_with(
                BIN.as_ref(),
                CLIENT,
                &[
                    "--url",
                    "http://reviews:9080/reviews/0",
                    "--rate",
                    "100",
                    "--requests",
                    &n.to_string(),
                ],
                &lab.dir.join(records),
            )
            .unwrap();
        assert_eq!(summary.ok, n, "{summary:?}");
    };
    // A counter's first sample is where `increase` starts counting: both
    // agents are scraped, and their request series exist, before the
    // measured load.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while prometheus.query("up == 1").len() < 2 {
        assert!(std::time::Instant::now() < deadline, "agents not scraped");
        std::thread::sleep(Duration::from_millis(200));
    }
    let warmup = 100u64;
    load(warmup, "warmup.jsonl");
    std::thread::sleep(Duration::from_secs(3));
    let n = 1_000u64;
    load(n, "client.jsonl");
    // Both agents scraped since the load ended.
    let scraped = |p: &Prometheus| -> f64 {
        p.query("sum(increase(mesh_trace_requests_total{reporter=\"destination\"}[1m]))")
            .first()
            .and_then(|v| v["value"][1].as_str()?.parse().ok())
            .unwrap_or(0.0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while scraped(&prometheus) < 0.9 * n as f64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the server's node not scraped"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(prometheus.query("up == 1").len(), 2, "both agents scraped");

    let url = format!("http://{}", prometheus.addr);
    let out = std::process::Command::new(BIN)
        .args(["top", "--prometheus", &url, "--once", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: mesh_trace::top::stats::AgentStats = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats.agent.agents, Some(2));
    let row = stats
        .rows
        .iter()
        .find(|r| r.source_workload == "loadgen" && r.destination_service == "reviews")
        .unwrap_or_else(|| panic!("no loadgen -> reviews row: {stats:?}"));
    // Counted once, though both nodes report it: the measured load and
    // part of the warmup are in the 60 s window (`increase` extrapolates
    // to its edges, hence the slack).
    assert!(
        (0.9 * n as f64..1.2 * (n + warmup) as f64).contains(&(row.requests as f64)),
        "{} requests in the row for {n} sent ({warmup} before)",
        row.requests
    );
    let p50 = |hop: &str| row.hops.get(hop).map(|p| p.p50_ms).unwrap_or(0.0);
    // The lab's sidecars add 2 ms (outbound) and 3 ms (inbound); the
    // buckets make medians coarse.
    for (hop, at_least) in [
        ("client_to_outbound", 0.0),
        ("outbound_proxy", 1.5),
        ("upstream", 5.0),
        ("inbound_proxy", 2.5),
        ("inbound_to_app", 0.0),
        ("app", 1.5),
    ] {
        assert!(row.hops.contains_key(hop), "no {hop} in {row:?}");
        assert!(p50(hop) >= at_least, "{hop} p50 {} ms in {row:?}", p50(hop));
    }
    let text = std::process::Command::new(BIN)
        .args(["top", "--prometheus", &url, "--once"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    println!("{text}");
    assert!(
        text.contains("agents 2") && text.contains("loadgen -> reviews"),
        "{text}"
    );

    // The request and hop panels of every dashboard, and the recording
    // rules over requests, latency, hops and the sidecars' share.
    let about_requests = |expr: &str| {
        [
            "mesh_trace_requests_total",
            "mesh_trace_request_duration",
            "mesh_trace_hop_duration",
            "mesh_trace:requests",
            "mesh_trace:request_duration",
            "mesh_trace:hop_duration",
            "mesh_trace:sidecar_share",
        ]
        .iter()
        .any(|m| expr.contains(m))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (checked, empty) = loop {
        let mut empty = Vec::new();
        let mut checked = 0;
        for (file, dashboard) in dashboards() {
            for (what, expr) in panel_queries(&dashboard) {
                if !about_requests(&expr) {
                    continue;
                }
                let expr = substitute(&expr);
                checked += 1;
                if prometheus.query(&expr).is_empty() {
                    empty.push(format!("{file} {what}: {expr}"));
                }
            }
        }
        for rule in [
            "mesh_trace:requests:rate5m",
            "mesh_trace:request_errors:ratio_rate5m",
            "mesh_trace:request_duration_seconds:p50",
            "mesh_trace:hop_duration_seconds:p50",
            "mesh_trace:sidecar_share:ratio_rate5m",
        ] {
            checked += 1;
            if prometheus.query(rule).is_empty() {
                empty.push(format!("rule {rule}"));
            }
        }
        if empty.is_empty() || std::time::Instant::now() > deadline {
            break (checked, empty);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("{checked} request and hop queries over two nodes");
    assert!(empty.is_empty(), "no data:\n{}", empty.join("\n"));
    assert!(checked >= 15, "only {checked} queries");
}
