//! Trace export over OTLP, HTTP/protobuf (`POST /v1/traces`) or gRPC (the
//! protocol's generated client over tonic): one trace per request, a span
//! per segment of its path. Spans wait in a bounded queue;
//! a task sends them in batches, retrying with backoff; what the queue
//! cannot take, or what could not be sent, is counted by reason.
//!
//! The two nodes of a request put their halves into one trace without
//! talking to each other: the trace id is the caller's own when its request
//! carried one (`traceparent`, B3), else derived from the request's mesh leg
//! ([`crate::spans::trace_id`]); each segment's span id comes from the mesh
//! leg and the segment's name, so the server's node names as parent the
//! client's `upstream` span without having seen it. The client app's segment
//! is a child of the app's own span when its request named one.
use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{trace_service_client::TraceServiceClient, ExportTraceServiceRequest},
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    resource::v1::Resource,
    trace::v1::{span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status},
};
use prost::Message as _;
use tokio::sync::mpsc;

use super::http::AgentState;
use crate::spans::span::{Protocol as RequestProtocol, Span as RequestSpan};

/// Spans waiting to be sent, at most.
pub const QUEUE: usize = 16_384;
/// Requests per export.
const BATCH: usize = 512;
/// Longest wait before a partial batch goes.
const LINGER: Duration = Duration::from_secs(1);
/// Attempts per batch, and the first and longest pause between them.
const ATTEMPTS: u32 = 5;
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// One export's time limit.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the collector is reached, named as `OTEL_EXPORTER_OTLP_PROTOCOL`
/// names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `http/protobuf`: `POST /v1/traces` with a protobuf body.
    HttpProtobuf,
    /// `grpc`: `TraceService/Export` over HTTP/2.
    Grpc,
}

impl std::str::FromStr for Protocol {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Protocol> {
        match s {
            "http/protobuf" | "http" => Ok(Protocol::HttpProtobuf),
            "grpc" => Ok(Protocol::Grpc),
            other => anyhow::bail!(
                "--otlp-protocol {other:?}: grpc or http/protobuf (http/json is not supported)"
            ),
        }
    }
}

/// Where traces go: `http://host:port`, or for HTTP/protobuf a URL whose
/// path ends in `/v1/traces`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub protocol: Protocol,
    pub authority: String,
    /// The HTTP path (HTTP/protobuf); empty for gRPC, whose path is the
    /// method's.
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str, protocol: Protocol) -> anyhow::Result<Endpoint> {
        let uri: hyper::Uri = url
            .parse()
            .with_context(|| format!("--otlp-endpoint {url:?}: not a URL"))?;
        anyhow::ensure!(
            uri.scheme_str() == Some("http"),
            "--otlp-endpoint {url:?}: only http:// is supported (plaintext OTLP to a collector on the node or in the cluster)"
        );
        let authority = uri
            .authority()
            .with_context(|| format!("--otlp-endpoint {url:?}: no host"))?
            .to_string();
        let authority = if uri.port().is_some() {
            authority
        } else {
            format!("{authority}:80")
        };
        let base = uri.path().trim_end_matches('/');
        let path = match protocol {
            Protocol::Grpc => {
                anyhow::ensure!(
                    base.is_empty(),
                    "--otlp-endpoint {url:?}: a gRPC endpoint is host:port, with no path"
                );
                String::new()
            }
            Protocol::HttpProtobuf if base.ends_with("/v1/traces") => base.to_string(),
            Protocol::HttpProtobuf => format!("{base}/v1/traces"),
        };
        Ok(Endpoint {
            protocol,
            authority,
            path,
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.protocol {
            Protocol::HttpProtobuf => write!(f, "http://{}{}", self.authority, self.path),
            Protocol::Grpc => write!(f, "grpc http://{}", self.authority),
        }
    }
}

/// A connection to the collector, kept between batches.
enum Client {
    Http(Endpoint),
    /// tonic's channel connects lazily and reconnects by itself.
    Grpc(TraceServiceClient<tonic::transport::Channel>),
}

impl Client {
    fn new(endpoint: &Endpoint) -> anyhow::Result<Client> {
        Ok(match endpoint.protocol {
            Protocol::HttpProtobuf => Client::Http(endpoint.clone()),
            Protocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(format!(
                    "http://{}",
                    endpoint.authority
                ))
                .context("the gRPC endpoint")?
                .connect_timeout(EXPORT_TIMEOUT)
                .connect_lazy();
                Client::Grpc(TraceServiceClient::new(channel))
            }
        })
    }

    async fn send(&mut self, request: &ExportTraceServiceRequest) -> anyhow::Result<()> {
        match self {
            Client::Http(endpoint) => post(endpoint, Bytes::from(request.encode_to_vec())).await,
            Client::Grpc(client) => {
                // A partial success is still a success, as over HTTP.
                client
                    .export(request.clone())
                    .await
                    .map(|_| ())
                    .map_err(|status| {
                        anyhow::anyhow!("gRPC {:?}: {}", status.code(), status.message())
                    })
            }
        }
    }
}

/// The agent's side of the queue.
pub struct Exporter {
    queue: mpsc::Sender<RequestSpan>,
    state: Arc<AgentState>,
}

impl Exporter {
    /// Starts the sending task on the current runtime.
    pub fn start(endpoint: Endpoint, node: String, state: Arc<AgentState>) -> Exporter {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(send_loop(endpoint, node, rx, state.clone()));
        Exporter { queue, state }
    }

    /// Queues a request's span; counted as dropped when the queue is full
    /// (the collector is slower than the traffic, or down).
    pub fn offer(&self, span: &RequestSpan) {
        if self.queue.try_send(span.clone()).is_err() {
            self.state.metrics.otlp_dropped("queue_full", 1);
        }
    }
}

async fn send_loop(
    endpoint: Endpoint,
    node: String,
    mut rx: mpsc::Receiver<RequestSpan>,
    state: Arc<AgentState>,
) {
    let metrics = &state.metrics;
    let mut client = match Client::new(&endpoint) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("OTLP export to {endpoint}: {e:#}; no traces will be sent");
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        // A batch: the first span, then what comes within the linger.
        match rx.recv().await {
            Some(s) => batch.push(s),
            None => return,
        }
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let export = request(&batch, &node);
        let mut pause = BACKOFF_FIRST;
        let mut sent = false;
        for attempt in 1..=ATTEMPTS {
            match tokio::time::timeout(EXPORT_TIMEOUT, client.send(&export)).await {
                Ok(Ok(())) => {
                    sent = true;
                    break;
                }
                Ok(Err(e)) => tracing::debug!("OTLP export, attempt {attempt}: {e:#}"),
                Err(_) => tracing::debug!("OTLP export, attempt {attempt}: timed out"),
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BACKOFF_MAX);
            }
        }
        if sent {
            metrics.otlp_exported(batch.len() as u64);
        } else {
            tracing::warn!(
                "OTLP export to {endpoint} failed {ATTEMPTS} times: {} requests' spans dropped",
                batch.len()
            );
            metrics.otlp_dropped("export_failed", batch.len() as u64);
        }
        batch.clear();
    }
}

/// One POST; success is a 2xx (OTLP/HTTP: partial success is still 200).
async fn post(endpoint: &Endpoint, body: Bytes) -> anyhow::Result<()> {
    let stream = tokio::net::TcpStream::connect(&endpoint.authority)
        .await
        .with_context(|| format!("connecting to {}", endpoint.authority))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::post(endpoint.path.as_str())
        .header(hyper::header::HOST, endpoint.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    // Read the body so the connection ends cleanly.
    let _ = resp.into_body().collect().await;
    conn.abort();
    anyhow::ensure!(status.is_success(), "the collector answered {status}");
    Ok(())
}

/// The segments of a request's path, as OTLP spans: (name, kind, first
/// moment, last moment, parent).
const SEGMENTS: [(&str, SpanKind, usize, usize, Option<&str>); 5] = [
    ("client app", SpanKind::Client, 0, 11, None),
    (
        "outbound sidecar",
        SpanKind::Client,
        1,
        10,
        Some("client app"),
    ),
    ("upstream", SpanKind::Client, 2, 9, Some("outbound sidecar")),
    ("inbound sidecar", SpanKind::Server, 3, 8, Some("upstream")),
    (
        "server app",
        SpanKind::Server,
        5,
        6,
        Some("inbound sidecar"),
    ),
];

/// The request for one batch.
pub fn request(spans: &[RequestSpan], node: &str) -> ExportTraceServiceRequest {
    // CLOCK_MONOTONIC moments to Unix time, as of now.
    let offset = unix_minus_monotonic_ns();
    let otlp: Vec<Span> = spans.iter().flat_map(|s| segments(s, offset)).collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    string("service.name", "mesh-trace"),
                    string("k8s.node.name", node),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "mesh-trace".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans: otlp,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// The OTLP spans of one request: each segment whose two moments this node
/// saw.
pub fn segments(s: &RequestSpan, unix_offset_ns: i64) -> Vec<Span> {
    let names = segment_names(s);
    let trace = s
        .trace_id
        .as_deref()
        .and_then(from_hex::<16>)
        .unwrap_or(names);
    // The client app's own span, when its request named it.
    let caller = s.parent_span_id.as_deref().and_then(from_hex::<8>);
    let unix = |mono: u64| (mono as i64 + unix_offset_ns).max(0) as u64;
    let error = s.is_error();
    SEGMENTS
        .iter()
        .filter_map(|&(name, kind, from, to, parent)| {
            let (start, end) = (s.moments[from]?, s.moments[to]?);
            let mut attributes = vec![
                string("http.request.method", &s.method),
                string("http.route", &s.path),
                int("http.response.status_code", i64::from(s.status)),
                string("server.address", &s.destination_service),
                string("mesh_trace.source_workload", &s.source_workload),
            ];
            if let Some(pod) = &s.destination_pod {
                attributes.push(string("k8s.pod.name", pod));
            }
            if s.protocol == RequestProtocol::Grpc {
                attributes.push(string("rpc.system", "grpc"));
                // `/package.Service/Method`.
                if let Some((service, method)) = s.path.trim_start_matches('/').split_once('/') {
                    attributes.push(string("rpc.service", service));
                    attributes.push(string("rpc.method", method));
                }
                if let Some(code) = s.grpc_status {
                    attributes.push(int("rpc.grpc.status_code", i64::from(code)));
                }
            }
            if let Some(id) = &s.request_id {
                attributes.push(string("mesh_trace.request_id", id));
            }
            let parent = match parent {
                Some(p) => span_id(&names, p).to_vec(),
                None => caller.map(|c| c.to_vec()).unwrap_or_default(),
            };
            Some(Span {
                trace_id: trace.to_vec(),
                span_id: span_id(&names, name).to_vec(),
                parent_span_id: parent,
                name: name.into(),
                kind: kind as i32,
                start_time_unix_nano: unix(start),
                end_time_unix_nano: unix(end),
                attributes,
                status: Some(Status {
                    code: if error {
                        StatusCode::Error
                    } else {
                        StatusCode::Unset
                    } as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
        .collect()
}

/// What names the request's segments: the id derived from its mesh leg,
/// which both nodes derive alike, else what identifies it on this node
/// alone.
fn segment_names(s: &RequestSpan) -> [u8; 16] {
    if let Some(id) = s.mesh_leg_id.as_deref().and_then(from_hex::<16>) {
        return id;
    }
    let first = s.moments.iter().flatten().next().copied().unwrap_or(0);
    let mut input = first.to_be_bytes().to_vec();
    input.extend_from_slice(s.request_id.as_deref().unwrap_or("").as_bytes());
    input.extend_from_slice(s.source_workload.as_bytes());
    let d = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    out
}

/// `N` bytes from `2N` hex digits.
fn from_hex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A segment's span id, the same on every node.
fn span_id(names: &[u8; 16], segment: &str) -> [u8; 8] {
    let mut input = names.to_vec();
    input.extend_from_slice(segment.as_bytes());
    let d = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut out = [0u8; 8];
    out.copy_from_slice(&d.as_ref()[..8]);
    out
}

fn unix_minus_monotonic_ns() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    unix - crate::clock::mono_ns() as i64
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(moments: [Option<u64>; 12], trace: &str) -> RequestSpan {
        RequestSpan {
            request_id: Some("r-1".into()),
            method: "GET".into(),
            path: "/reviews/:id".into(),
            status: 200,
            source_workload: "productpage".into(),
            source_namespace: None,
            destination_service: "reviews".into(),
            destination_namespace: None,
            destination_pod: None,
            moments,
            retries: 0,
            local_reply: None,
            trace_id: Some(trace.into()),
            mesh_leg_id: Some(trace.into()),
            parent_span_id: None,
            grpc_status: None,
            protocol: Default::default(),
        }
    }

    #[test]
    fn endpoints_take_the_traces_path_and_refuse_what_is_not_http() {
        let http = Protocol::HttpProtobuf;
        let e = Endpoint::parse("http://collector:4318", http).unwrap();
        assert_eq!(
            (e.authority.as_str(), e.path.as_str()),
            ("collector:4318", "/v1/traces")
        );
        let e = Endpoint::parse("http://10.0.0.1:4318/otlp/v1/traces", http).unwrap();
        assert_eq!(e.path, "/otlp/v1/traces");
        assert_eq!(
            Endpoint::parse("http://collector", http).unwrap().authority,
            "collector:80"
        );
        assert!(Endpoint::parse("https://collector:4318", http).is_err());
        assert!(Endpoint::parse("collector", http).is_err());
        let g = Endpoint::parse("http://collector:4317/", Protocol::Grpc).unwrap();
        assert_eq!(
            (g.authority.as_str(), g.path.as_str()),
            ("collector:4317", "")
        );
        assert_eq!(g.to_string(), "grpc http://collector:4317");
        assert!(Endpoint::parse("http://collector:4317/v1/traces", Protocol::Grpc).is_err());
        assert_eq!("grpc".parse::<Protocol>().unwrap(), Protocol::Grpc);
        assert_eq!(
            "http/protobuf".parse::<Protocol>().unwrap(),
            Protocol::HttpProtobuf
        );
        assert!("http/json".parse::<Protocol>().is_err());
    }

    /// The client's and the server's nodes each send their segments; put
    /// together they are one trace, each segment under the one before it.
    #[test]
    fn two_halves_make_one_trace_with_parents_across_nodes() {
        let trace = "0af7651916cd43dd8448eb211c80319c";
        let ms = |i: usize| Some(1_000_000 * i as u64);
        let mut client = [None; 12];
        for i in [0, 1, 2, 9, 10, 11] {
            client[i] = ms(i);
        }
        let mut server = [None; 12];
        for (i, m) in server.iter_mut().enumerate().take(9).skip(3) {
            *m = ms(i);
        }
        let a = segments(&span(client, trace), 0);
        let b = segments(&span(server, trace), 0);
        let names = |v: &[Span]| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&a), ["client app", "outbound sidecar", "upstream"]);
        assert_eq!(names(&b), ["inbound sidecar", "server app"]);
        let all: Vec<&Span> = a.iter().chain(&b).collect();
        assert!(all.iter().all(|s| s.trace_id == all[0].trace_id));
        assert_eq!(hex(&all[0].trace_id), trace);
        // Each parent is the segment before it, across the nodes too.
        for pair in all.windows(2) {
            assert_eq!(pair[1].parent_span_id, pair[0].span_id, "{}", pair[1].name);
        }
        assert!(all[0].parent_span_id.is_empty());
        assert_eq!(b[0].start_time_unix_nano, 3_000_000);
        assert_eq!(b[0].end_time_unix_nano, 8_000_000);
        // Encodes and decodes as the protocol's message.
        let req = request(&[span(client, trace)], "node-1");
        let back = ExportTraceServiceRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, req);
    }

    /// A request that carried the app's trace context lands in the app's
    /// trace, under the app's span; its segments keep the names the mesh
    /// leg gives them, so the halves still join.
    #[test]
    fn the_callers_trace_is_used_and_its_span_is_the_parent() {
        let leg = "0af7651916cd43dd8448eb211c80319c";
        let caller = "4bf92f3577b34da6a3ce929d0e0e4736";
        let ms = |i: usize| Some(1_000_000 * i as u64);
        let with_caller = |moments: [Option<u64>; 12], parent: Option<&str>| RequestSpan {
            trace_id: Some(caller.into()),
            parent_span_id: parent.map(Into::into),
            ..span(moments, leg)
        };
        let mut client = [None; 12];
        for i in [0, 1, 2, 9, 10, 11] {
            client[i] = ms(i);
        }
        let mut server = [None; 12];
        for (i, m) in server.iter_mut().enumerate().take(9).skip(3) {
            *m = ms(i);
        }
        let a = segments(&with_caller(client, Some("00f067aa0ba902b7")), 0);
        let b = segments(&with_caller(server, None), 0);
        assert!(a.iter().chain(&b).all(|s| hex(&s.trace_id) == caller));
        assert_eq!(hex(&a[0].parent_span_id), "00f067aa0ba902b7");
        // The same span ids as without the caller's trace.
        let plain = segments(&span(server, leg), 0);
        assert_eq!(b[0].span_id, plain[0].span_id);
        assert_eq!(b[0].parent_span_id, a[2].span_id);
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A gRPC call's segments say so as OpenTelemetry's RPC conventions
    /// do; a server error fails them though the HTTP status is 200.
    #[test]
    fn grpc_calls_carry_the_rpc_attributes_and_their_status() {
        let ms = |i: usize| Some(1_000_000 * i as u64);
        let mut call = span(std::array::from_fn(ms), "0af7651916cd43dd8448eb211c80319c");
        call.method = "POST".into();
        call.path = "/lab.Reviews/Get".into();
        call.protocol = RequestProtocol::Grpc;
        call.grpc_status = Some(14);
        let spans = segments(&call, 0);
        assert!(!spans.is_empty());
        for s in &spans {
            let attr = |key: &str| s.attributes.iter().find(|kv| kv.key == key).cloned();
            let text = |key: &str| match attr(key)?.value?.value? {
                any_value::Value::StringValue(v) => Some(v),
                _ => None,
            };
            assert_eq!(text("rpc.system").as_deref(), Some("grpc"));
            assert_eq!(text("rpc.service").as_deref(), Some("lab.Reviews"));
            assert_eq!(text("rpc.method").as_deref(), Some("Get"));
            assert!(matches!(
                attr("rpc.grpc.status_code").and_then(|kv| kv.value?.value),
                Some(any_value::Value::IntValue(14))
            ));
            assert_eq!(s.status.as_ref().unwrap().code, StatusCode::Error as i32);
        }
        // HTTP requests carry none of it.
        let plain = segments(
            &span(std::array::from_fn(ms), "0af7651916cd43dd8448eb211c80319c"),
            0,
        );
        assert!(plain[0]
            .attributes
            .iter()
            .all(|kv| !kv.key.starts_with("rpc.")));
    }
}
