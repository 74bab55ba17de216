//! Upstream clusters: the pooled clients (plaintext, mutual TLS, and the
//! inbound one from 127.0.0.6), the endpoint chosen for each attempt, and
//! forwarding under Envoy's retry policy, down to the outcome the access
//! record and the downstream response are made from.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
    http::request::Parts,
    Request, Response, StatusCode, Uri,
};
use hyper_openssl::client::legacy::HttpsConnector;
use hyper_util::{
    client::legacy::{
        connect::{Connect, HttpConnector, HttpInfo},
        Client, ResponseFuture,
    },
    rt::{TokioExecutor, TokioTimer},
};
use rand::{rngs::StdRng, Rng, SeedableRng as _};

use super::{
    h2pool::{H2Failure, H2Pool},
    local_reply, strip_hop_by_hop, tls, Proxy, ProxyBody, CONNECT_TIMEOUT,
};
use crate::lab::{
    config::RetryPolicy,
    ioclock::{ClockConnector, ConnectionClock, IoClock, RequestKey},
    records::{mono_ns, ProxyRecord},
};

const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Envoy sets it on upstream requests when the virtual host has
/// `include_request_attempt_count`, as every Istio virtual host does.
const ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");

/// TCP connections whose reads and writes are timed for the access log.
pub(super) type TimedConnector = ClockConnector<HttpConnector>;
pub(super) type PlainClient = Client<TimedConnector, Full<Bytes>>;
/// Speaks mutual TLS to `https` URIs only, over timed TCP connections.
pub(super) type MeshClient = Client<HttpsConnector<TimedConnector>, Full<Bytes>>;

/// The pooled client for mesh endpoints.
pub(super) fn mesh_client(tls: openssl::ssl::SslConnectorBuilder) -> anyhow::Result<MeshClient> {
    Ok(pooled(tls::https(tls, http_connector(None))?))
}

/// The pooled client one request's attempts go through.
#[derive(Clone, Copy)]
pub(super) enum UpstreamClient<'a> {
    Plain(&'a PlainClient),
    /// Mutual TLS with this pod's certificate.
    Mutual(&'a MeshClient),
    /// HTTP/2, over mutual TLS if the pool says so.
    H2(&'a H2Pool),
}

impl UpstreamClient<'_> {
    fn scheme(self) -> &'static str {
        if self.is_tls() {
            "https"
        } else {
            "http"
        }
    }

    fn is_tls(self) -> bool {
        match self {
            UpstreamClient::Plain(_) => false,
            UpstreamClient::Mutual(_) => true,
            UpstreamClient::H2(pool) => pool.is_tls(),
        }
    }
}

impl Proxy {
    /// The client for an outbound cluster: to mesh endpoints HTTP/2 when
    /// upgrading, mutual TLS when mTLS is on; HTTP/1.1 in plaintext
    /// otherwise and to what leaves the mesh.
    pub(super) fn outbound_client(&self, mesh: bool) -> UpstreamClient<'_> {
        match (mesh, &self.mesh_h2, &self.mesh_client) {
            (true, Some(h2), _) => UpstreamClient::H2(h2),
            (true, None, Some(c)) => UpstreamClient::Mutual(c),
            _ => UpstreamClient::Plain(&self.outbound_client),
        }
    }

    /// The client to the app: HTTP/2 end to end.
    pub(super) fn inbound_client(&self) -> UpstreamClient<'_> {
        match &self.inbound_h2 {
            Some(h2) => UpstreamClient::H2(h2),
            None => UpstreamClient::Plain(&self.inbound_client),
        }
    }
}

#[derive(Debug)]
/// A request sent as an HTTP/2 stream: its connection's clock finds the
/// stream's moments once its response has been read to the end.
pub(super) struct UpstreamStream {
    clock: Arc<IoClock>,
    key: RequestKey,
}

impl UpstreamStream {
    /// The record's upstream times from the stream's frames, where the
    /// clock could tell them (see [`IoClock::h2_exchange`]).
    pub(super) fn refine(&self, rec: &mut ProxyRecord) {
        if let Some(x) = self.clock.h2_exchange(&self.key) {
            rec.t_upstream_write_ns = x.write_ns;
            if let Some(read) = x.read_ns {
                rec.t_upstream_read_ns = read;
            }
            rec.t_upstream_read_end_ns = x.end_ns;
        }
    }
}

/// Upstream TCP connections, their reads and writes timed: responses carry
/// the connection's clock (`ConnectionClock`), which the access log's
/// upstream times come from.
pub(super) fn http_connector(local: Option<IpAddr>) -> TimedConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_local_address(local);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    // The TLS connector hands it `https` URIs; the plain clients only build `http` ones.
    connector.enforce_http(false);
    ClockConnector::new(connector)
}

/// One pooled HTTP/1.1 client: keep-alive connections are reused per endpoint.
pub(super) fn pooled<C>(connector: C) -> Client<C, Full<Bytes>>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(UPSTREAM_IDLE_TIMEOUT)
        .build(connector)
}

/// A downstream request with its body read, so it can be sent more than once.
#[derive(Clone, Debug)]
struct BufferedRequest {
    parts: Parts,
    body: Bytes,
}

impl BufferedRequest {
    /// The request for one attempt at `endpoint`, minus hop-by-hop headers.
    /// `scheme` picks the connection: "https" is mutual TLS.
    fn to_upstream(
        &self,
        client: UpstreamClient<'_>,
        endpoint: SocketAddr,
        attempt: u32,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let path = self.parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let h2 = matches!(client, UpstreamClient::H2(_));
        // The request's authority: its Host, or HTTP/2's `:authority`.
        let authority = self.parts.headers.get(header::HOST).cloned().or_else(|| {
            let a = self.parts.uri.authority()?;
            HeaderValue::from_str(a.as_str()).ok()
        });
        // HTTP/2 carries it as `:authority`, as Envoy does; hyper's pooled
        // HTTP/1.1 client connects to the URI's authority, so there the
        // endpoint goes in the URI and the authority in Host.
        let uri_authority = match (&authority, h2) {
            (Some(a), true) => a.to_str()?.to_owned(),
            _ => endpoint.to_string(),
        };
        let uri = Uri::builder()
            .scheme(client.scheme())
            .authority(uri_authority)
            .path_and_query(path)
            .build()?;
        let mut req = Request::builder()
            .method(self.parts.method.clone())
            .uri(uri)
            .body(Full::new(self.body.clone()))?;
        let headers = req.headers_mut();
        *headers = self.parts.headers.clone();
        let trailers = headers.get(header::TE) == Some(&HeaderValue::from_static("trailers"));
        strip_hop_by_hop(headers);
        if trailers {
            // gRPC's `te: trailers` is end to end, the one TE HTTP/2 allows.
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        match (authority, h2) {
            (_, true) => {
                headers.remove(header::HOST);
            }
            (Some(a), false) => {
                headers.insert(header::HOST, a);
            }
            (None, false) => {}
        }
        // The body is re-framed from the buffer.
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(ATTEMPT_COUNT, HeaderValue::from(attempt));
        Ok(req)
    }
}

/// Where and how one request is sent on.
pub(super) struct Upstream<'a> {
    pub(super) client: UpstreamClient<'a>,
    pub(super) endpoints: &'a [SocketAddr],
    pub(super) retry: Option<&'a RetryPolicy>,
    /// The artificial processing delay of this side.
    pub(super) delay: Duration,
}

impl Upstream<'_> {
    /// Reads the body, waits the configured delay, then tries the endpoints.
    pub(super) async fn forward(
        &self,
        rec: &mut ProxyRecord,
        parts: Parts,
        body: Incoming,
    ) -> (Response<ProxyBody>, Option<UpstreamStream>) {
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                tracing::debug!("reading the request body from {}: {e}", rec.downstream_peer);
                let reply = local_reply(
                    StatusCode::BAD_REQUEST,
                    "downstream request body read error",
                );
                return (reply, None);
            }
        };
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let req = BufferedRequest { parts, body };
        // Seeded from the thread rng, which cannot be held across awaits.
        let mut rng = StdRng::from_rng(&mut rand::rng());
        let mut outcome =
            forward_with_retries(self.client, &req, self.endpoints, self.retry, &mut rng).await;
        outcome.fill(rec);
        let stream = outcome.stream.take();
        (outcome.into_response(), stream)
    }
}

/// An endpoint at random, preferring one not tried yet for this request
/// (Envoy's previous_hosts retry predicate).
fn pick_endpoint(
    endpoints: &[SocketAddr],
    tried: &[SocketAddr],
    rng: &mut impl Rng,
) -> Option<SocketAddr> {
    let fresh: Vec<SocketAddr> = endpoints
        .iter()
        .copied()
        .filter(|e| !tried.contains(e))
        .collect();
    let pool = if fresh.is_empty() { endpoints } else { &fresh };
    if pool.is_empty() {
        return None;
    }
    Some(pool[rng.random_range(0..pool.len())])
}

// ---------------------------------------------------------------- retries

/// How one upstream attempt ended, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AttemptResult {
    /// No connection could be made.
    ConnectFailure,
    /// Connected, but the exchange broke before response headers.
    Reset,
    Status(u16),
}

/// Whether to try again after `attempts` attempts ended with `result`.
fn should_retry(policy: Option<&RetryPolicy>, result: AttemptResult, attempts: u32) -> bool {
    let Some(policy) = policy else {
        return false;
    };
    if attempts > policy.num_retries {
        return false;
    }
    match result {
        AttemptResult::ConnectFailure => policy.on("connect-failure"),
        AttemptResult::Reset => policy.on("reset"),
        AttemptResult::Status(code) => {
            (policy.on("retriable-status-codes") && policy.retriable_status_codes.contains(&code))
                || (code >= 500 && policy.on("5xx"))
        }
    }
}

/// What the attempts for one request came to.
#[derive(Debug)]
struct Outcome {
    /// The last attempt's response, or why there is none.
    response: Result<Response<Incoming>, AttemptResult>,
    attempts: u32,
    upstream_host: Option<SocketAddr>,
    upstream_local: Option<SocketAddr>,
    /// The last attempt went over mutual TLS.
    upstream_tls: bool,
    /// The last attempt's request write and response read (see `ProxyRecord`).
    t_upstream_write_ns: u64,
    t_upstream_read_ns: u64,
    /// The last attempt's HTTP/2 stream, whose moments come later.
    stream: Option<UpstreamStream>,
}

impl Outcome {
    fn fill(&self, rec: &mut ProxyRecord) {
        rec.attempts = self.attempts;
        rec.upstream_tls = self.upstream_tls;
        rec.upstream_host = self.upstream_host;
        rec.upstream_local = self.upstream_local;
        rec.t_upstream_write_ns = self.t_upstream_write_ns;
        rec.t_upstream_read_ns = self.t_upstream_read_ns;
    }

    fn into_response(self) -> Response<ProxyBody> {
        match self.response {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.boxed())
            }
            Err(AttemptResult::ConnectFailure) => local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            ),
            Err(_) => local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            ),
        }
    }
}

/// Sends `req` to `endpoints` under the retry policy; returns the last attempt.
async fn forward_with_retries(
    client: UpstreamClient<'_>,
    req: &BufferedRequest,
    endpoints: &[SocketAddr],
    retry: Option<&RetryPolicy>,
    rng: &mut (impl Rng + Send),
) -> Outcome {
    let mut out = Outcome {
        response: Err(AttemptResult::ConnectFailure),
        attempts: 0,
        upstream_host: None,
        upstream_local: None,
        upstream_tls: false,
        t_upstream_write_ns: 0,
        t_upstream_read_ns: 0,
        stream: None,
    };
    let mut tried = Vec::new();
    while let Some(endpoint) = pick_endpoint(endpoints, &tried, rng) {
        tried.push(endpoint);
        out.attempts += 1;
        out.upstream_host = Some(endpoint);
        out.upstream_local = None;
        out.upstream_tls = client.is_tls();
        out.t_upstream_read_ns = 0;
        out.stream = None;
        let result = attempt(client, req, endpoint, out.attempts, &mut out).await;
        if !should_retry(retry, result, out.attempts) {
            break;
        }
        if let Ok(resp) = std::mem::replace(&mut out.response, Err(result)) {
            // Read the abandoned answer so its connection can go back to the pool.
            if let Err(e) = resp.into_body().collect().await {
                tracing::debug!("draining a retried response from {endpoint}: {e}");
            }
        }
    }
    out
}

/// One attempt; its response (or failure) and timings land in `out`.
async fn attempt(
    client: UpstreamClient<'_>,
    req: &BufferedRequest,
    endpoint: SocketAddr,
    number: u32,
    out: &mut Outcome,
) -> AttemptResult {
    let upstream_req = match req.to_upstream(client, endpoint, number) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("building the request for {endpoint}: {e}");
            out.response = Err(AttemptResult::Reset);
            return AttemptResult::Reset;
        }
    };
    // The request is handed over now; its connection's clock tells when
    // it was written and the answer read (see `ioclock`).
    let sent = mono_ns();
    out.t_upstream_write_ns = sent;
    let request: ResponseFuture = match client {
        UpstreamClient::Plain(c) => c.request(upstream_req),
        UpstreamClient::Mutual(c) => c.request(upstream_req),
        UpstreamClient::H2(pool) => {
            return attempt_h2(pool, upstream_req, endpoint, number, sent, out).await
        }
    };
    let result = match request.await {
        Ok(resp) => {
            let arrived = mono_ns();
            let io = resp
                .extensions()
                .get::<ConnectionClock>()
                .and_then(|c| c.0.exchange_until(sent, arrived));
            out.t_upstream_write_ns = io.map_or(sent, |x| x.write_ns);
            out.t_upstream_read_ns = io.and_then(|x| x.read_ns).unwrap_or(arrived);
            out.upstream_local = resp
                .extensions()
                .get::<HttpInfo>()
                .map(HttpInfo::local_addr);
            let status = resp.status().as_u16();
            out.response = Ok(resp);
            return AttemptResult::Status(status);
        }
        Err(e) if e.is_connect() => {
            tracing::debug!("attempt {number} to {endpoint}: {e:?}");
            AttemptResult::ConnectFailure
        }
        Err(e) => {
            tracing::debug!("attempt {number} to {endpoint}: {e:?}");
            AttemptResult::Reset
        }
    };
    out.response = Err(result);
    result
}

/// [`attempt`] as an HTTP/2 stream.
async fn attempt_h2(
    pool: &H2Pool,
    req: Request<Full<Bytes>>,
    endpoint: SocketAddr,
    number: u32,
    sent: u64,
    out: &mut Outcome,
) -> AttemptResult {
    let key = RequestKey {
        path: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        request_id: req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        attempt: Some(number.to_string()),
    };
    let result = match pool.send(endpoint, req).await {
        Ok((resp, conn)) => {
            // Until the frames tell (at the record, once the response is read).
            out.t_upstream_write_ns = sent;
            out.t_upstream_read_ns = mono_ns();
            out.upstream_local = Some(conn.local);
            out.stream = Some(UpstreamStream {
                clock: conn.clock,
                key,
            });
            let status = resp.status().as_u16();
            out.response = Ok(resp);
            return AttemptResult::Status(status);
        }
        Err(H2Failure::Connect(e)) => {
            tracing::debug!("attempt {number} to {endpoint}: {e}");
            AttemptResult::ConnectFailure
        }
        Err(H2Failure::Reset(e)) => {
            tracing::debug!("attempt {number} to {endpoint}: {e}");
            AttemptResult::Reset
        }
    };
    out.response = Err(result);
    result
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::net::TcpListener;

    use super::*;
    use crate::lab::proxy::tests::{addr, http_server};

    fn policy(retry_on: &str, num_retries: u32, codes: &[u16]) -> RetryPolicy {
        RetryPolicy {
            retry_on: retry_on.to_owned(),
            num_retries,
            retriable_status_codes: codes.to_vec(),
        }
    }

    #[test]
    fn endpoint_choice_avoids_previous_hosts() {
        let eps = [
            addr("10.0.0.1:9080"),
            addr("10.0.0.2:9080"),
            addr("10.0.0.3:9080"),
        ];
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            assert_eq!(pick_endpoint(&eps, &eps[..2], &mut rng), Some(eps[2]));
        }
        // Everything tried: any endpoint will do.
        let again = pick_endpoint(&eps, &eps, &mut rng);
        assert!(again.is_some_and(|e| eps.contains(&e)));
        assert_eq!(pick_endpoint(&[], &[], &mut rng), None);
    }

    #[test]
    fn retry_decisions() {
        let p = policy(
            "connect-failure,refused-stream,retriable-status-codes",
            2,
            &[503],
        );
        let p = Some(&p);
        assert!(should_retry(p, AttemptResult::ConnectFailure, 1));
        assert!(should_retry(p, AttemptResult::Status(503), 1));
        assert!(should_retry(p, AttemptResult::Status(503), 2));
        assert!(
            !should_retry(p, AttemptResult::Status(503), 3),
            "2 retries at most"
        );
        assert!(
            !should_retry(p, AttemptResult::Status(500), 1),
            "500 is not retriable"
        );
        assert!(!should_retry(p, AttemptResult::Status(200), 1));
        assert!(!should_retry(p, AttemptResult::Reset, 1));
        assert!(!should_retry(None, AttemptResult::ConnectFailure, 1));
        let codes_only = policy("retriable-status-codes", 2, &[503]);
        assert!(!should_retry(
            Some(&codes_only),
            AttemptResult::ConnectFailure,
            1
        ));
        let no_codes = policy("connect-failure", 2, &[503]);
        assert!(!should_retry(
            Some(&no_codes),
            AttemptResult::Status(503),
            1
        ));
    }

    // ------------------------------------------------------ real sockets
    /// A port nothing listens on.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("local addr")
    }

    fn get(path: &str) -> BufferedRequest {
        let (parts, ()) = Request::get(path).body(()).expect("request").into_parts();
        BufferedRequest {
            parts,
            body: Bytes::new(),
        }
    }

    /// A seeded rng whose first endpoint choice is `first`.
    fn rng_starting_at(endpoints: &[SocketAddr], first: SocketAddr) -> StdRng {
        (0..)
            .map(StdRng::seed_from_u64)
            .find(|rng| pick_endpoint(endpoints, &[], &mut rng.clone()) == Some(first))
            .expect("some seed picks it")
    }

    #[tokio::test]
    async fn retries_503_on_another_endpoint() {
        let first_attempt = Duration::from_millis(20);
        let bad = http_server(503, first_attempt).await;
        let good = http_server(200, Duration::ZERO).await;
        let endpoints = [bad, good];
        let p = policy("connect-failure,retriable-status-codes", 2, &[503]);
        let mut rng = rng_starting_at(&endpoints, bad);
        let plain = pooled(http_connector(None));
        let client = UpstreamClient::Plain(&plain);
        let started = mono_ns();
        let out = forward_with_retries(client, &get("/x"), &endpoints, Some(&p), &mut rng).await;
        assert_eq!(out.attempts, 2);
        assert_eq!(out.upstream_host, Some(good));
        assert_eq!(
            out.response.as_ref().map(|r| r.status()).ok(),
            Some(StatusCode::OK)
        );
        let local = out
            .upstream_local
            .expect("local address of the last attempt");
        assert_eq!(local.ip(), IpAddr::from(Ipv4Addr::LOCALHOST));
        assert!(0 < out.t_upstream_write_ns && out.t_upstream_write_ns <= out.t_upstream_read_ns);
        // The times are the last attempt's, after the first one's answer.
        let first_answer = started + first_attempt.as_nanos() as u64;
        assert!(
            out.t_upstream_write_ns > first_answer,
            "{} ns early",
            first_answer - out.t_upstream_write_ns
        );
    }

    #[tokio::test]
    async fn retries_connect_failures_and_gives_up() {
        let dead = closed_port().await;
        let good = http_server(200, Duration::ZERO).await;
        let p = policy("connect-failure,retriable-status-codes", 2, &[503]);
        let plain = pooled(http_connector(None));
        let client = UpstreamClient::Plain(&plain);
        let endpoints = [dead, good];
        let mut rng = rng_starting_at(&endpoints, dead);
        let out = forward_with_retries(client, &get("/"), &endpoints, Some(&p), &mut rng).await;
        assert_eq!((out.attempts, out.upstream_host), (2, Some(good)));

        // Only a dead endpoint: 1 + 2 retries, then 503 downstream.
        let out = forward_with_retries(client, &get("/"), &[dead], Some(&p), &mut rng).await;
        assert_eq!((out.attempts, out.upstream_local), (3, None));
        assert_eq!(
            out.response.as_ref().err(),
            Some(&AttemptResult::ConnectFailure)
        );
        assert_eq!(
            out.into_response().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );

        // A 503 everywhere: the last 503 goes downstream.
        let bad = http_server(503, Duration::ZERO).await;
        let out = forward_with_retries(client, &get("/"), &[bad], Some(&p), &mut rng).await;
        assert_eq!(out.attempts, 3);
        assert_eq!(
            out.into_response().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
