//! `top --prometheus URL`: the cluster's rows, from a Prometheus that
//! scrapes every node's agent, rather than one agent's own window.
//!
//! Each node reports the hops it measures (`reporter` says which side), so
//! a row puts together the client's hops from one node and the server's
//! from another. A request both sides saw is counted by both reporters:
//! a row's requests are the source's count, or the destination's where no
//! source reported (a client this mesh does not trace). Percentiles come
//! from the histograms' buckets (`histogram_quantile`), so they are as
//! coarse as the buckets; Prometheus has no per-request detail, so rows
//! carry no slowest requests and no maximum.
use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context as _};
use serde_json::Value;

use super::stats::AgentStats;
use crate::{
    agent::{client, client::AgentUrl, http::AgentInfo},
    spans::{
        live::{Percentiles, Row},
        span::GRPC_ERRORS,
    },
};

/// The range each rate is taken over: the agents' own live window.
pub const WINDOW_S: u64 = 60;

/// The sidecar hops of `sidecar_share`, as the recording rule sums them.
const SIDECAR_HOPS: [&str; 4] = [
    "client_to_outbound",
    "outbound_proxy",
    "inbound_proxy",
    "inbound_to_app",
];

type Pair = (String, String);

/// One instant query's samples: labels and value.
type Samples = Vec<(HashMap<String, String>, f64)>;

/// The statistics document `top` shows, built from PromQL queries.
pub async fn fetch(url: &AgentUrl) -> anyhow::Result<AgentStats> {
    let w = format!("[{WINDOW_S}s]");
    let pair = "source_workload, destination_service";
    let requests = query(
        url,
        &format!("sum by ({pair}, reporter) (increase(mesh_trace_requests_total{w}))"),
    )
    .await?;
    let errors = query(
        url,
        &format!(
            "sum by ({pair}, reporter) (increase(mesh_trace_requests_total{{status_code=~\"5..|0\"}}{w}) \
             or increase(mesh_trace_requests_total{{grpc_response_status=~\"{GRPC_ERRORS}\"}}{w}))"
        ),
    )
    .await?;
    let mut totals = Vec::new();
    let mut hops = Vec::new();
    for q in ["0.5", "0.9", "0.99"] {
        totals.push(
            query(
                url,
                &format!(
                    "histogram_quantile({q}, sum by (le, {pair}, reporter) (rate(mesh_trace_request_duration_seconds_bucket{w})))"
                ),
            )
            .await?,
        );
        hops.push(
            query(
                url,
                &format!(
                    "histogram_quantile({q}, sum by (le, {pair}, hop) (rate(mesh_trace_hop_duration_seconds_bucket{w})))"
                ),
            )
            .await?,
        );
    }
    let hop_counts = query(
        url,
        &format!("sum by ({pair}, hop) (increase(mesh_trace_hop_duration_seconds_count{w}))"),
    )
    .await?;
    let hop_sums = query(
        url,
        &format!("sum by ({pair}, hop) (increase(mesh_trace_hop_duration_seconds_sum{w}))"),
    )
    .await?;
    let total_sums = query(
        url,
        &format!(
            "sum by ({pair}) (increase(mesh_trace_request_duration_seconds_sum{{reporter=\"source\"}}{w}))"
        ),
    )
    .await?;
    let scalar = |expr: &'static str| async move {
        Ok::<_, anyhow::Error>(query(url, expr).await?.first().map_or(0.0, |(_, v)| *v))
    };
    let agent = AgentInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        agents: Some(scalar("count(mesh_trace_build_info)").await? as usize),
        events_total: scalar("sum(mesh_trace_events_total)").await? as u64,
        events_lost: scalar("sum(mesh_trace_events_lost_total)").await? as u64,
        flows_tracked: scalar("sum(mesh_trace_flows_tracked)").await? as usize,
        requests_in_flight: scalar("sum(mesh_trace_requests_in_flight)").await? as usize,
        ..AgentInfo::default()
    };
    Ok(AgentStats {
        agent,
        window_s: WINDOW_S as f64,
        rows: rows(&Queried {
            requests,
            errors,
            totals,
            hops,
            hop_counts,
            hop_sums,
            total_sums,
        }),
    })
}

/// What the queries returned.
struct Queried {
    requests: Samples,
    errors: Samples,
    /// p50, p90, p99 of the total, by reporter.
    totals: Vec<Samples>,
    /// p50, p90, p99 of each hop.
    hops: Vec<Samples>,
    hop_counts: Samples,
    hop_sums: Samples,
    total_sums: Samples,
}

fn pair_of(labels: &HashMap<String, String>) -> Option<Pair> {
    Some((
        labels.get("source_workload")?.clone(),
        labels.get("destination_service")?.clone(),
    ))
}

fn label<'a>(labels: &'a HashMap<String, String>, name: &str) -> &'a str {
    labels.get(name).map_or("", String::as_str)
}

/// Per pair: the source reporter's value, else the destination's.
fn by_pair_preferring_source(samples: &Samples) -> BTreeMap<Pair, f64> {
    let mut source = BTreeMap::new();
    let mut destination = BTreeMap::new();
    for (labels, v) in samples {
        let Some(pair) = pair_of(labels) else {
            continue;
        };
        match label(labels, "reporter") {
            "source" => source.insert(pair, *v),
            _ => destination.insert(pair, *v),
        };
    }
    for (pair, v) in destination {
        source.entry(pair).or_insert(v);
    }
    source
}

/// Per pair and hop, the values of one query.
fn by_pair_and_hop(samples: &Samples) -> HashMap<(Pair, String), f64> {
    samples
        .iter()
        .filter_map(|(labels, v)| Some(((pair_of(labels)?, label(labels, "hop").to_string()), *v)))
        .collect()
}

fn ms(seconds: Option<f64>) -> f64 {
    seconds.filter(|s| s.is_finite()).map_or(0.0, |s| s * 1e3)
}

fn rows(q: &Queried) -> Vec<Row> {
    let requests = by_pair_preferring_source(&q.requests);
    let errors = by_pair_preferring_source(&q.errors);
    let totals: Vec<BTreeMap<Pair, f64>> = q.totals.iter().map(by_pair_preferring_source).collect();
    let hops: Vec<HashMap<(Pair, String), f64>> = q.hops.iter().map(by_pair_and_hop).collect();
    let hop_sums = by_pair_and_hop(&q.hop_sums);
    let total_sums: BTreeMap<Pair, f64> = q
        .total_sums
        .iter()
        .filter_map(|(labels, v)| Some((pair_of(labels)?, *v)))
        .collect();
    let mut out: Vec<Row> = requests
        .iter()
        .filter(|(_, &n)| n > 0.0)
        .map(|(pair, &n)| {
            let count = n.round() as u64;
            let errors = errors.get(pair).copied().unwrap_or(0.0).round() as u64;
            let pct = |tables: &[BTreeMap<Pair, f64>]| Percentiles {
                count,
                p50_ms: ms(tables[0].get(pair).copied()),
                p90_ms: ms(tables[1].get(pair).copied()),
                p99_ms: ms(tables[2].get(pair).copied()),
                max_ms: 0.0,
            };
            let mut row_hops = BTreeMap::new();
            for (labels, c) in &q.hop_counts {
                if pair_of(labels).as_ref() != Some(pair) || *c <= 0.0 {
                    continue;
                }
                let hop = label(labels, "hop").to_string();
                let key = (pair.clone(), hop.clone());
                let at = |i: usize| ms(hops[i].get(&key).copied());
                row_hops.insert(
                    hop,
                    Percentiles {
                        count: c.round() as u64,
                        p50_ms: at(0),
                        p90_ms: at(1),
                        p99_ms: at(2),
                        max_ms: 0.0,
                    },
                );
            }
            let sidecar: Option<f64> = SIDECAR_HOPS
                .iter()
                .map(|h| hop_sums.get(&(pair.clone(), h.to_string())).copied())
                .sum();
            let sidecar_share = match (sidecar, total_sums.get(pair)) {
                (Some(s), Some(&t)) if t > 0.0 => Some((s / t).clamp(0.0, 1.0)),
                _ => None,
            };
            Row {
                source_workload: pair.0.clone(),
                destination_service: pair.1.clone(),
                requests: count,
                rate: n / WINDOW_S as f64,
                errors,
                error_rate: if count > 0 {
                    errors as f64 / count as f64
                } else {
                    0.0
                },
                retries: 0,
                total: pct(&totals),
                hops: row_hops,
                sidecar_share,
                slowest: Vec::new(),
                tcp: BTreeMap::new(),
            }
        })
        .collect();
    out.sort_by(|a, b| b.rate.total_cmp(&a.rate));
    out
}

/// An instant query: each sample's labels and value.
async fn query(url: &AgentUrl, expr: &str) -> anyhow::Result<Samples> {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", expr)
        .finish();
    let text = client::get_text(url, &format!("{}?{q}", url.path("/api/v1/query")))
        .await
        .with_context(|| format!("querying {expr}"))?;
    parse(&text).with_context(|| format!("the answer to {expr}"))
}

fn parse(text: &str) -> anyhow::Result<Samples> {
    let v: Value = serde_json::from_str(text).context("not JSON")?;
    if v["status"] != "success" {
        bail!("{}", v["error"].as_str().unwrap_or("the query failed"));
    }
    let data = &v["data"];
    let sample = |value: &Value| -> Option<f64> { value.get(1)?.as_str()?.parse().ok() };
    match data["resultType"].as_str() {
        Some("vector") => Ok(data["result"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|r| {
                let labels = r["metric"]
                    .as_object()?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                Some((labels, sample(&r["value"])?))
            })
            .collect()),
        Some("scalar") => Ok(sample(&data["result"])
            .map(|v| vec![(HashMap::new(), v)])
            .unwrap_or_default()),
        other => bail!("result type {other:?}, not a vector"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(samples: &[(&[(&str, &str)], f64)]) -> Samples {
        samples
            .iter()
            .map(|(labels, v)| {
                (
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    *v,
                )
            })
            .collect()
    }

    #[test]
    fn answers_parse_and_failures_say_why() {
        let ok = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"source_workload":"a","destination_service":"b"},"value":[1.5,"42"]},
            {"metric":{},"value":[1.5,"NaN"]}]}}"#;
        let s = parse(ok).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].1, 42.0);
        assert!(s[1].1.is_nan());
        let bad = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert!(format!("{:#}", parse(bad).unwrap_err()).contains("parse error"));
        assert!(parse("<html>").is_err());
    }

    /// Two nodes: the client's reports its hops and its count, the
    /// server's its own hops and the same requests again; a third pair is
    /// only seen by a server (its client is not traced).
    #[test]
    fn a_row_joins_both_halves_and_counts_each_request_once() {
        let ab = [("source_workload", "a"), ("destination_service", "b")];
        let with = |extra: (&'static str, &'static str)| -> Vec<(&'static str, &'static str)> {
            let mut v = ab.to_vec();
            v.push(extra);
            v
        };
        let src = with(("reporter", "source"));
        let dst = with(("reporter", "destination"));
        let only_dst = [
            ("source_workload", "unknown"),
            ("destination_service", "b"),
            ("reporter", "destination"),
        ];
        let out_hop = with(("hop", "outbound_proxy"));
        let app_hop = with(("hop", "app"));
        let in_hop = with(("hop", "inbound_proxy"));
        let q = Queried {
            requests: vector(&[(&src, 600.0), (&dst, 600.0), (&only_dst, 60.0)]),
            errors: vector(&[(&src, 6.0)]),
            totals: vec![
                vector(&[(&src, 0.030), (&dst, 0.025)]),
                vector(&[(&src, 0.040)]),
                vector(&[(&src, 0.050)]),
            ],
            hops: vec![
                vector(&[(&out_hop, 0.002), (&app_hop, 0.020), (&in_hop, 0.003)]),
                vector(&[(&out_hop, 0.003)]),
                vector(&[(&out_hop, f64::NAN)]),
            ],
            hop_counts: vector(&[(&out_hop, 600.0), (&app_hop, 600.0), (&in_hop, 600.0)]),
            hop_sums: vector(&[(&out_hop, 1.2), (&in_hop, 1.8), (&app_hop, 12.0)]),
            total_sums: vector(&[(&ab, 18.0)]),
        };
        let rows = rows(&q);
        assert_eq!(rows.len(), 2);
        let r = &rows[0];
        assert_eq!((r.source_workload.as_str(), r.requests), ("a", 600));
        assert_eq!(r.rate, 10.0);
        assert_eq!((r.errors, r.error_rate), (6, 0.01));
        assert_eq!(r.total.p50_ms, 30.0);
        assert_eq!(r.hops["outbound_proxy"].p50_ms, 2.0);
        assert_eq!(r.hops["outbound_proxy"].p90_ms, 3.0);
        assert_eq!(r.hops["outbound_proxy"].p99_ms, 0.0, "NaN is no value");
        assert_eq!(r.hops["inbound_proxy"].p50_ms, 3.0);
        assert_eq!(r.hops["app"].p50_ms, 20.0);
        // Not all four sidecar hops were seen: no share.
        assert_eq!(r.sidecar_share, None);
        let u = &rows[1];
        assert_eq!((u.source_workload.as_str(), u.requests), ("unknown", 60));
        assert!(u.hops.is_empty());
    }
}
