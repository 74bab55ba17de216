//! The lab's sidecar: an Envoy-like proxy that reproduces the Istio data path
//! mesh-trace observes (see `DATAPATH.md`).
//!
//! - 15001 (VirtualOutbound): the app's redirected outbound connections. The
//!   original destination's port picks a listener; HTTP on it is routed by
//!   Host header and path to a (weighted) cluster and one of its endpoints,
//!   with Envoy's retry policy. Ports without a listener are spliced to the
//!   original destination (PassthroughCluster) or dropped (BlackHoleCluster).
//! - 15006 (VirtualInbound): redirected inbound connections, forwarded to the
//!   app from 127.0.0.6 (inbound passthrough).
//!
//! With `--mtls-dir` the leg between sidecars is mutual TLS, as with Istio's
//! ISTIO_MUTUAL: upstream connections to mesh endpoints (EDS clusters) use
//! TLS with the pod's certificate, and 15006 accepts TLS with a client
//! certificate from the mesh CA, or plaintext (PERMISSIVE). Legs to and from
//! the app on loopback, and traffic leaving the mesh, stay plaintext.
//!
//! Every HTTP request and every listener-less TCP connection becomes one
//! [`ProxyRecord`] in the access log: the ground truth for mesh-trace's tests.
use std::{
    convert::Infallible,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::{
    body::Incoming,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    http::request::Parts,
    service::service_fn,
    Request, Response, StatusCode, Uri,
};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{
        connect::{Connect, HttpConnector, HttpInfo},
        Client, ResponseFuture,
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::{GracefulConnection, GracefulShutdown, Watcher},
};
use rand::{rngs::StdRng, Rng, SeedableRng as _};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    signal::unix::{signal, SignalKind},
    sync::watch,
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;

use super::{
    config::{
        OutboundTrafficPolicy, ProxyConfig, RetryPolicy, RouteAction, WeightedCluster,
        BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER,
    },
    ioclock::{ClockConnector, Clocked, ConnectionClock, IoClock, WRITE_WAIT},
    mtls::SidecarTls,
    records::{mono_ns, Direction, ProxyRecord, RecordWriter},
};

const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15006;
/// Istio's inbound passthrough source: exempt from redirection on `lo`.
const INBOUND_PASSTHROUGH_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// Istio's default cluster connect_timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Envoy sets it on upstream requests when the virtual host has
/// `include_request_attempt_count`, as every Istio virtual host does.
const ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
/// The first byte of a TLS connection: a handshake record (content type 22).
const TLS_HANDSHAKE: u8 = 0x16;
/// Connection-scoped headers that must not be forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

#[derive(Debug, Clone, clap::Args)]
pub struct ProxyOptions {
    /// Sidecar configuration (Envoy-shaped JSON).
    #[arg(long)]
    pub config: PathBuf,
    /// Pod name, written into access records.
    #[arg(long)]
    pub pod: String,
    /// JSON-lines access log (ProxyRecord per request / TCP connection).
    #[arg(long)]
    pub access_log: PathBuf,
    /// Overrides the config's outbound_traffic_policy.
    #[arg(long, value_enum)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// Artificial processing delay added to each request on the outbound side, milliseconds.
    #[arg(long, default_value_t = 0.0)]
    pub delay_outbound_ms: f64,
    /// Same for the inbound side.
    #[arg(long, default_value_t = 0.0)]
    pub delay_inbound_ms: f64,
    /// How long in-flight connections may finish after SIGTERM (terminationDrainDuration), ms.
    #[arg(long, default_value_t = 5000)]
    pub drain_ms: u64,
    /// Mutual TLS with the other sidecars: the directory with `ca.pem`,
    /// `<pod>.pem` and `<pod>-key.pem` (see `lab::mtls`). Plaintext without it.
    #[arg(long, value_name = "DIR")]
    pub mtls_dir: Option<PathBuf>,
}

/// Runs the sidecar until SIGTERM or SIGINT, then drains for `drain_ms`.
pub async fn run(opts: ProxyOptions) -> anyhow::Result<()> {
    let config = ProxyConfig::load(&opts.config)?;
    let lookup: DstLookup = Arc::new(|stream, _| so_original_dst(stream));
    let proxy = Arc::new(Proxy::new(config, &opts, lookup)?);
    let outbound = bind(OUTBOUND_PORT).await?;
    let inbound = bind(INBOUND_PORT).await?;
    let shutdown = shutdown_signal()?;
    let mtls = proxy.inbound_tls.is_some();
    tracing::info!(pod = %opts.pod, policy = ?proxy.policy, mtls, "sidecar listening on 15001 and 15006");
    serve(
        proxy,
        outbound,
        inbound,
        shutdown,
        Duration::from_millis(opts.drain_ms),
    )
    .await;
    Ok(())
}

async fn bind(port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .await
        .with_context(|| format!("binding 0.0.0.0:{port}"))
}

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed before
/// this returns, so a signal that arrives early is not lost.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
    })
}

/// The destination the app asked for, as the nat REDIRECT rule recorded it.
fn so_original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt::OriginalDst};
    let sin = getsockopt(stream, OriginalDst)?;
    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Ok(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)).into())
}

// ------------------------------------------------------------------ serving

/// How the proxy learns where an accepted connection was headed: the kernel's
/// SO_ORIGINAL_DST in production, a fixed answer in tests without iptables.
type DstLookup = Arc<dyn Fn(&TcpStream, Direction) -> io::Result<SocketAddr> + Send + Sync>;
/// TCP connections whose reads and writes are timed for the access log.
type TimedConnector = ClockConnector<HttpConnector>;
type PlainClient = Client<TimedConnector, Full<Bytes>>;
/// Speaks TLS to `https` URIs only, over timed TCP connections.
type MeshClient = Client<HttpsConnector<TimedConnector>, Full<Bytes>>;
type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The pooled client one request's attempts go through.
#[derive(Clone, Copy)]
enum UpstreamClient<'a> {
    Plain(&'a PlainClient),
    /// Mutual TLS with this pod's certificate.
    Mutual(&'a MeshClient),
}

impl UpstreamClient<'_> {
    fn scheme(self) -> &'static str {
        match self {
            UpstreamClient::Plain(_) => "http",
            UpstreamClient::Mutual(_) => "https",
        }
    }

    fn is_tls(self) -> bool {
        matches!(self, UpstreamClient::Mutual(_))
    }

    fn request(self, req: Request<Full<Bytes>>) -> ResponseFuture {
        match self {
            UpstreamClient::Plain(c) => c.request(req),
            UpstreamClient::Mutual(c) => c.request(req),
        }
    }
}

struct Proxy {
    config: ProxyConfig,
    policy: OutboundTrafficPolicy,
    pod: String,
    records: RecordWriter,
    outbound_client: PlainClient,
    /// For mesh endpoints when mTLS is on.
    mesh_client: Option<MeshClient>,
    /// Connections bound to 127.0.0.6, so the app's replies skip redirection.
    inbound_client: PlainClient,
    /// Accepts TLS on 15006 when mTLS is on.
    inbound_tls: Option<TlsAcceptor>,
    delay_outbound: Duration,
    delay_inbound: Duration,
    original_dst: DstLookup,
    /// HTTP records waiting for their response to be written downstream;
    /// finished ones are reaped as new ones come, the rest awaited at exit.
    pending_records: std::sync::Mutex<JoinSet<()>>,
}

/// One accepted downstream connection.
#[derive(Clone, Copy, Debug)]
struct Conn {
    direction: Direction,
    original_dst: SocketAddr,
    peer: SocketAddr,
    accepted_ns: u64,
    /// The downstream connection is TLS (only inbound, from another sidecar).
    tls: bool,
}

impl Proxy {
    fn new(
        config: ProxyConfig,
        opts: &ProxyOptions,
        original_dst: DstLookup,
    ) -> anyhow::Result<Self> {
        let records = RecordWriter::create(&opts.access_log)
            .with_context(|| format!("creating {}", opts.access_log.display()))?;
        let tls = match &opts.mtls_dir {
            Some(dir) => Some(SidecarTls::load(dir, &opts.pod).context("--mtls-dir")?),
            None => None,
        };
        Ok(Proxy {
            policy: opts
                .outbound_traffic_policy
                .unwrap_or(config.outbound_traffic_policy),
            config,
            pod: opts.pod.clone(),
            records,
            outbound_client: pooled(http_connector(None)),
            inbound_client: pooled(http_connector(Some(INBOUND_PASSTHROUGH_SOURCE.into()))),
            inbound_tls: tls
                .as_ref()
                .map(|t| TlsAcceptor::from(Arc::clone(&t.server))),
            mesh_client: tls.map(|t| mesh_client(t.client)),
            delay_outbound: delay(opts.delay_outbound_ms).context("--delay-outbound-ms")?,
            delay_inbound: delay(opts.delay_inbound_ms).context("--delay-inbound-ms")?,
            original_dst,
            pending_records: std::sync::Mutex::new(JoinSet::new()),
        })
    }

    /// A record with what the connection already tells; the handler fills in the rest.
    fn record(&self, conn: &Conn, kind: &str) -> ProxyRecord {
        ProxyRecord {
            pod: self.pod.clone(),
            direction: conn.direction,
            kind: kind.to_owned(),
            original_dst: conn.original_dst,
            downstream_peer: conn.peer,
            route: String::new(),
            cluster: String::new(),
            upstream_host: None,
            upstream_local: None,
            attempts: 0,
            status: 0,
            request_id: None,
            method: None,
            path: None,
            host: None,
            t_downstream_read_ns: 0,
            t_upstream_write_ns: 0,
            t_upstream_read_ns: 0,
            t_downstream_write_ns: 0,
            upstream_tls: false,
            downstream_tls: conn.tls,
        }
    }

    /// The client for an outbound cluster: mutual TLS to mesh endpoints when
    /// mTLS is on, plaintext otherwise and to what leaves the mesh.
    fn outbound_client(&self, mesh: bool) -> UpstreamClient<'_> {
        match (&self.mesh_client, mesh) {
            (Some(c), true) => UpstreamClient::Mutual(c),
            _ => UpstreamClient::Plain(&self.outbound_client),
        }
    }
}

fn delay(ms: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(ms / 1000.0).map_err(|e| anyhow::anyhow!("bad delay {ms} ms: {e}"))
}

/// Upstream TCP connections, their reads and writes timed: responses carry
/// the connection's clock (`ConnectionClock`), which the access log's
/// upstream times come from.
fn http_connector(local: Option<IpAddr>) -> TimedConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_local_address(local);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    // The TLS connector hands it `https` URIs; the plain clients only build `http` ones.
    connector.enforce_http(false);
    ClockConnector::new(connector)
}

/// One pooled HTTP/1.1 client: keep-alive connections are reused per endpoint.
fn pooled<C>(connector: C) -> Client<C, Full<Bytes>>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(UPSTREAM_IDLE_TIMEOUT)
        .build(connector)
}

/// The pooled client for mesh endpoints. TLS wraps the plain TCP connector,
/// whose `HttpInfo` (local and remote address) and clock (the TCP socket's
/// reads and writes, under the encryption) still reach the responses.
fn mesh_client(tls: rustls::ClientConfig) -> MeshClient {
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http_connector(None));
    pooled(connector)
}

/// Accepts on both listeners until `shutdown` resolves, then stops accepting
/// and gives open connections up to `drain` to finish.
async fn serve(
    proxy: Arc<Proxy>,
    outbound: TcpListener,
    inbound: TcpListener,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let mut conns = Connections::new();
    tokio::pin!(shutdown);
    loop {
        let (accepted, direction) = tokio::select! {
            () = &mut shutdown => break,
            a = outbound.accept() => (a, Direction::Outbound),
            a = inbound.accept() => (a, Direction::Inbound),
            // Reap finished connections so the set does not grow forever.
            Some(_) = conns.tasks.join_next(), if !conns.tasks.is_empty() => continue,
        };
        match accepted {
            Ok((stream, peer)) => on_accept(&proxy, &mut conns, direction, stream, peer),
            Err(e) => {
                tracing::warn!("accept ({direction:?}): {e}");
                // Out of descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    drop((outbound, inbound));
    conns.drain(drain).await;
    proxy.flush_records().await;
}

/// The tasks of accepted connections, and how to end them.
struct Connections {
    tasks: JoinSet<()>,
    /// Lets HTTP connections finish the request in flight, then closes them.
    graceful: GracefulShutdown,
    /// Turns true at shutdown, for connections not serving HTTP yet (being
    /// sniffed for TLS or in their handshake), which `graceful` cannot reach.
    stopping: watch::Sender<bool>,
}

impl Connections {
    fn new() -> Self {
        Connections {
            tasks: JoinSet::new(),
            graceful: GracefulShutdown::new(),
            stopping: watch::Sender::new(false),
        }
    }

    /// Closes idle connections now and waits up to `limit` for busy ones.
    async fn drain(self, limit: Duration) {
        let Connections {
            mut tasks,
            graceful,
            stopping,
        } = self;
        tracing::info!(
            connections = tasks.len(),
            ?limit,
            "stopped accepting; draining"
        );
        stopping.send_replace(true);
        let drained = tokio::time::timeout(limit, async {
            graceful.shutdown().await;
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = tasks.len(),
                "drain time over; closing the rest"
            );
        }
        // Dropping the set aborts whatever is still running.
    }
}

fn on_accept(
    proxy: &Arc<Proxy>,
    conns: &mut Connections,
    direction: Direction,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let accepted_ns = mono_ns();
    let original_dst = match (proxy.original_dst)(&stream, direction) {
        Ok(dst) => dst,
        Err(e) => {
            tracing::warn!("{direction:?} connection from {peer}: no original destination: {e}");
            return;
        }
    };
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY on {peer}: {e}");
    }
    let conn = Conn {
        direction,
        original_dst,
        peer,
        accepted_ns,
        tls: false,
    };
    let http =
        direction == Direction::Inbound || proxy.config.listener(original_dst.port()).is_some();
    let proxy = Arc::clone(proxy);
    match (&proxy.inbound_tls, direction) {
        (Some(acceptor), Direction::Inbound) => {
            let (acceptor, watcher) = (acceptor.clone(), conns.graceful.watcher());
            let stopping = conns.stopping.subscribe();
            let task = proxy.inbound_permissive(acceptor, conn, stream, watcher, stopping);
            conns.tasks.spawn(task);
        }
        _ if http => {
            let (stream, clock) = Clocked::new(stream);
            let watched = conns
                .graceful
                .watch(http_connection(&proxy, conn, stream, clock));
            conns.tasks.spawn(serve_http(conn, watched));
        }
        _ => {
            conns.tasks.spawn(proxy.tcp(conn, stream));
        }
    }
}

/// A downstream byte stream: plaintext TCP or TLS over it.
trait DownstreamIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> DownstreamIo for T {}

impl Proxy {
    /// An inbound connection under PERMISSIVE mTLS: TLS if it opens with a
    /// handshake, plaintext otherwise, then HTTP as for any connection.
    async fn inbound_permissive(
        self: Arc<Self>,
        acceptor: TlsAcceptor,
        mut conn: Conn,
        stream: TcpStream,
        watcher: Watcher,
        mut stopping: watch::Receiver<bool>,
    ) {
        let opened = tokio::select! {
            opened = open_permissive(&acceptor, stream) => opened,
            // Not serving HTTP yet: nothing in flight to let finish.
            _ = stopping.changed() => return,
        };
        match opened {
            Ok((io, tls, clock)) => {
                conn.tls = tls;
                let watched = watcher.watch(http_connection(&self, conn, io, clock));
                serve_http(conn, watched).await;
            }
            // A client certificate not from the mesh CA, or none, ends here.
            Err(e) => tracing::warn!("inbound TLS from {}: {e}", conn.peer),
        }
    }
}

/// Peeks at the first byte (left in the socket for whoever reads next): a
/// TLS handshake is accepted, verifying the peer's certificate against the
/// mesh CA; anything else is plaintext. Returns the stream, whether it is
/// TLS, and the clock of the TCP socket's reads and writes (under TLS, so
/// the times are the socket's, as for plaintext).
async fn open_permissive(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
) -> io::Result<(Box<dyn DownstreamIo>, bool, Arc<IoClock>)> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    let (stream, clock) = Clocked::new(stream);
    if n == 0 || first[0] != TLS_HANDSHAKE {
        return Ok((Box::new(stream), false, clock));
    }
    let tls = acceptor.accept(stream).await?;
    Ok((Box::new(tls), true, clock))
}

/// HTTP/1.1 (keep-alive) on one downstream connection; `clock` times its
/// socket's reads and writes.
fn http_connection(
    proxy: &Arc<Proxy>,
    conn: Conn,
    stream: impl DownstreamIo,
    clock: Arc<IoClock>,
) -> impl GracefulConnection<Error = hyper::Error> + Send + 'static {
    let proxy = Arc::clone(proxy);
    let service = service_fn(move |req| {
        let (proxy, clock) = (Arc::clone(&proxy), Arc::clone(&clock));
        async move { Ok::<_, Infallible>(proxy.http(conn, &clock, req).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        // Envoy keeps idle downstream connections for an hour; never time out.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service)
}

/// Runs a (watched) HTTP connection to its end.
async fn serve_http(conn: Conn, watched: impl Future<Output = Result<(), hyper::Error>>) {
    if let Err(e) = watched.await {
        tracing::debug!("{:?} connection from {}: {e}", conn.direction, conn.peer);
    }
}

// ------------------------------------------------------------------- HTTP

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
        scheme: &str,
        endpoint: SocketAddr,
        attempt: u32,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let path = self.parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = Uri::builder()
            .scheme(scheme)
            .authority(endpoint.to_string())
            .path_and_query(path)
            .build()?;
        let mut req = Request::builder()
            .method(self.parts.method.clone())
            .uri(uri)
            .body(Full::new(self.body.clone()))?;
        let headers = req.headers_mut();
        *headers = self.parts.headers.clone();
        strip_hop_by_hop(headers);
        // The body is re-framed from the buffer.
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(ATTEMPT_COUNT, HeaderValue::from(attempt));
        Ok(req)
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

impl Proxy {
    /// One downstream request: route, forward, answer, write the record
    /// (once the response is written).
    async fn http(
        self: Arc<Self>,
        conn: Conn,
        clock: &Arc<IoClock>,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let entered = mono_ns();
        let mut rec = self.record(&conn, "http");
        // hyper calls us once the head is parsed: its last read completed it.
        rec.t_downstream_read_ns = clock.last_read_until(entered).unwrap_or(entered);
        let (mut parts, body) = req.into_parts();
        rec.method = Some(parts.method.to_string());
        rec.path = Some(request_path(&parts.uri).to_owned());
        rec.host = host_header(&parts.headers).map(str::to_owned);
        rec.request_id = Some(ensure_request_id(&mut parts.headers));
        let response = match conn.direction {
            Direction::Outbound => self.outbound_http(&conn, &mut rec, parts, body).await,
            Direction::Inbound => self.inbound_http(&conn, &mut rec, parts, body).await,
        };
        rec.status = response.status().as_u16();
        self.record_when_written(rec, Arc::clone(clock));
        response
    }

    /// Writes `rec` once its response, returned to hyper now, is written
    /// downstream. Responses on a connection go out in order and the next
    /// request is not read before, so the first write from now on is this
    /// response's head.
    fn record_when_written(self: &Arc<Self>, mut rec: ProxyRecord, clock: Arc<IoClock>) {
        let answered = mono_ns();
        let proxy = Arc::clone(self);
        let mut pending = self
            .pending_records
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while pending.try_join_next().is_some() {}
        pending.spawn(async move {
            let written = clock.wait_write_from(answered, WRITE_WAIT).await;
            rec.t_downstream_write_ns = written.unwrap_or(answered);
            proxy.records.write(&rec);
        });
    }

    /// Waits for the records of answered requests (at most `WRITE_WAIT`,
    /// less once their connections are closed).
    async fn flush_records(&self) {
        let mut pending = std::mem::take(
            &mut *self
                .pending_records
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        while pending.join_next().await.is_some() {}
    }

    async fn outbound_http(
        &self,
        conn: &Conn,
        rec: &mut ProxyRecord,
        parts: Parts,
        body: Incoming,
    ) -> Response<ProxyBody> {
        let host = routing_host(&parts.headers, conn.original_dst);
        let path = request_path(&parts.uri);
        let decision = decide_outbound(
            &self.config,
            self.policy,
            conn.original_dst,
            &host,
            path,
            &mut rand::rng(),
        );
        rec.route = decision.vhost.to_owned();
        rec.cluster = decision.cluster.to_owned();
        let (endpoints, retry, mesh) = match decision.action {
            Action::Forward {
                endpoints,
                retry,
                mesh,
            } => (endpoints, retry, mesh),
            Action::Reply(status, text) => return local_reply(status, text),
        };
        let upstream = Upstream {
            client: self.outbound_client(mesh),
            endpoints: &endpoints,
            retry,
            delay: self.delay_outbound,
        };
        upstream.forward(rec, parts, body).await
    }

    async fn inbound_http(
        &self,
        conn: &Conn,
        rec: &mut ProxyRecord,
        parts: Parts,
        body: Incoming,
    ) -> Response<ProxyBody> {
        let port = conn.original_dst.port();
        rec.route = format!("inbound|http|{port}");
        rec.cluster = format!("inbound|{port}||");
        let upstream = Upstream {
            client: UpstreamClient::Plain(&self.inbound_client),
            endpoints: &[conn.original_dst],
            retry: None,
            delay: self.delay_inbound,
        };
        upstream.forward(rec, parts, body).await
    }
}

/// Where and how one request is sent on.
struct Upstream<'a> {
    client: UpstreamClient<'a>,
    endpoints: &'a [SocketAddr],
    retry: Option<&'a RetryPolicy>,
    /// The artificial processing delay of this side.
    delay: Duration,
}

impl Upstream<'_> {
    /// Reads the body, waits the configured delay, then tries the endpoints.
    async fn forward(
        &self,
        rec: &mut ProxyRecord,
        parts: Parts,
        body: Incoming,
    ) -> Response<ProxyBody> {
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                tracing::debug!("reading the request body from {}: {e}", rec.downstream_peer);
                return local_reply(
                    StatusCode::BAD_REQUEST,
                    "downstream request body read error",
                );
            }
        };
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let req = BufferedRequest { parts, body };
        // Seeded from the thread rng, which cannot be held across awaits.
        let mut rng = StdRng::from_rng(&mut rand::rng());
        let outcome =
            forward_with_retries(self.client, &req, self.endpoints, self.retry, &mut rng).await;
        outcome.fill(rec);
        outcome.into_response()
    }
}

/// The request-target Envoy matches route prefixes against (`:path`).
fn request_path(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

fn host_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
}

/// The Host header, or "VIP:port" of the original destination without one.
fn routing_host(headers: &HeaderMap, original_dst: SocketAddr) -> String {
    host_header(headers).map_or_else(|| original_dst.to_string(), str::to_owned)
}

/// The request's x-request-id, set to a new UUID when it has none.
fn ensure_request_id(headers: &mut HeaderMap) -> String {
    if let Some(id) = headers.get(&REQUEST_ID).and_then(|v| v.to_str().ok()) {
        if !id.is_empty() {
            return id.to_owned();
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    match HeaderValue::from_str(&id) {
        Ok(v) => {
            headers.insert(REQUEST_ID, v);
        }
        Err(e) => tracing::warn!("x-request-id {id}: {e}"),
    }
    id
}

/// A response the proxy makes up itself (no upstream answer to relay).
fn local_reply(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

// ---------------------------------------------------------------- routing

/// What the route table says about one outbound HTTP request.
#[derive(Debug)]
struct Decision<'a> {
    /// Virtual host name; empty when none matched.
    vhost: &'a str,
    /// Cluster name; empty when no route matched.
    cluster: &'a str,
    action: Action<'a>,
}

#[derive(Debug)]
enum Action<'a> {
    Forward {
        endpoints: Vec<SocketAddr>,
        retry: Option<&'a RetryPolicy>,
        /// The endpoints are sidecar pods (mutual TLS when it is on).
        mesh: bool,
    },
    /// Answer locally without an upstream connection.
    Reply(StatusCode, &'static str),
}

impl<'a> Decision<'a> {
    fn no_route(vhost: &'a str) -> Self {
        Decision {
            vhost,
            cluster: "",
            action: Action::Reply(StatusCode::NOT_FOUND, "route not found"),
        }
    }
}

/// Envoy's choice for a request to `original_dst` with this Host and path.
fn decide_outbound<'a>(
    cfg: &'a ProxyConfig,
    policy: OutboundTrafficPolicy,
    original_dst: SocketAddr,
    host: &str,
    path: &str,
    rng: &mut impl Rng,
) -> Decision<'a> {
    let vhost = cfg
        .listener(original_dst.port())
        .and_then(|l| cfg.route_config(&l.route_config_name))
        .and_then(|rc| rc.virtual_host(host));
    let Some(vhost) = vhost else {
        return Decision::no_route("");
    };
    let Some(route) = vhost.route(path) else {
        return Decision::no_route(&vhost.name);
    };
    let retry = route.route.retry_policy.as_ref();
    let cluster = pick_cluster(&route.route, rng).unwrap_or("");
    let blackhole = Decision {
        vhost: &vhost.name,
        cluster: BLACKHOLE_CLUSTER,
        action: Action::Reply(StatusCode::BAD_GATEWAY, "blackholed"),
    };
    let action = if cluster == PASSTHROUGH_CLUSTER {
        if policy == OutboundTrafficPolicy::RegistryOnly {
            return blackhole;
        }
        let endpoints = vec![original_dst];
        Action::Forward {
            endpoints,
            retry,
            mesh: false,
        }
    } else if cluster == BLACKHOLE_CLUSTER {
        return blackhole;
    } else {
        cluster_action(cfg, cluster, original_dst, retry)
    };
    Decision {
        vhost: &vhost.name,
        cluster,
        action,
    }
}

fn cluster_action<'a>(
    cfg: &ProxyConfig,
    cluster: &str,
    original_dst: SocketAddr,
    retry: Option<&'a RetryPolicy>,
) -> Action<'a> {
    let (endpoints, mesh) = match cfg.cluster(cluster) {
        Some(c) if c.kind == "ORIGINAL_DST" => (vec![original_dst], false),
        Some(c) => (c.endpoints(), c.is_mesh()),
        None => return Action::Reply(StatusCode::SERVICE_UNAVAILABLE, "cluster not found"),
    };
    if endpoints.is_empty() {
        return Action::Reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
    }
    Action::Forward {
        endpoints,
        retry,
        mesh,
    }
}

/// The route's cluster; for weighted clusters one drawn by weight.
fn pick_cluster<'a>(action: &'a RouteAction, rng: &mut impl Rng) -> Option<&'a str> {
    match (&action.cluster, &action.weighted_clusters) {
        (Some(c), _) => Some(c),
        (None, Some(w)) => pick_weighted(&w.clusters, rng),
        (None, None) => None,
    }
}

/// A cluster with probability weight / sum of weights (uniform if all are 0).
fn pick_weighted<'a>(clusters: &'a [WeightedCluster], rng: &mut impl Rng) -> Option<&'a str> {
    let total: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        let i = rng.random_range(0..clusters.len().max(1));
        return clusters.get(i).map(|c| c.name.as_str());
    }
    let mut ticket = rng.random_range(0..total);
    for c in clusters {
        let w = u64::from(c.weight);
        if ticket < w {
            return Some(&c.name);
        }
        ticket -= w;
    }
    None
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
    };
    let mut tried = Vec::new();
    while let Some(endpoint) = pick_endpoint(endpoints, &tried, rng) {
        tried.push(endpoint);
        out.attempts += 1;
        out.upstream_host = Some(endpoint);
        out.upstream_local = None;
        out.upstream_tls = client.is_tls();
        out.t_upstream_read_ns = 0;
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
    let upstream_req = match req.to_upstream(client.scheme(), endpoint, number) {
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
    let result = match client.request(upstream_req).await {
        Ok(resp) => {
            let arrived = mono_ns();
            let io = resp
                .extensions()
                .get::<ConnectionClock>()
                .and_then(|c| c.0.exchange_from(sent));
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

// -------------------------------------------------------------------- TCP

impl Proxy {
    /// A connection to a port without a listener: PassthroughCluster splices
    /// it to the original destination, BlackHoleCluster closes it.
    ///
    /// Record timestamps for TCP: accepted, connect started, connected, closed.
    async fn tcp(self: Arc<Self>, conn: Conn, downstream: TcpStream) {
        let mut rec = self.record(&conn, "tcp");
        rec.route = "tcp".to_owned();
        rec.t_downstream_read_ns = conn.accepted_ns;
        match self.policy {
            OutboundTrafficPolicy::RegistryOnly => {
                rec.cluster = BLACKHOLE_CLUSTER.to_owned();
                drop(downstream);
            }
            OutboundTrafficPolicy::AllowAny => {
                rec.cluster = PASSTHROUGH_CLUSTER.to_owned();
                passthrough(&mut rec, downstream).await;
            }
        }
        rec.t_downstream_write_ns = mono_ns();
        self.records.write(&rec);
    }
}

async fn passthrough(rec: &mut ProxyRecord, mut downstream: TcpStream) {
    let dst = rec.original_dst;
    rec.attempts = 1;
    rec.upstream_host = Some(dst);
    rec.t_upstream_write_ns = mono_ns();
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return tracing::debug!("passthrough to {dst}: {e}"),
        Err(_) => return tracing::debug!("passthrough to {dst}: connect timed out"),
    };
    rec.t_upstream_read_ns = mono_ns();
    rec.upstream_local = upstream.local_addr().ok();
    if let Err(e) = upstream.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY to {dst}: {e}");
    }
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((up, down)) => tracing::debug!("passthrough to {dst} done: {up} B up, {down} B down"),
        Err(e) => tracing::debug!("passthrough to {dst}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{
        config::BOOKINFO_PROXY,
        mtls::{MeshCa, Workload, CA_FILE},
        records::read_records,
    };
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const VIP: &str = "10.96.0.99";

    fn policy(retry_on: &str, num_retries: u32, codes: &[u16]) -> RetryPolicy {
        RetryPolicy {
            retry_on: retry_on.to_owned(),
            num_retries,
            retriable_status_codes: codes.to_vec(),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn weighted_clusters_follow_their_weights() {
        let clusters: Vec<WeightedCluster> = [("v1", 10), ("v2", 40), ("v3", 50)]
            .into_iter()
            .map(|(name, weight)| WeightedCluster {
                name: name.to_owned(),
                weight,
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = [0u32; 3];
        for _ in 0..10_000 {
            match pick_weighted(&clusters, &mut rng) {
                Some("v1") => counts[0] += 1,
                Some("v2") => counts[1] += 1,
                Some("v3") => counts[2] += 1,
                other => panic!("picked {other:?}"),
            }
        }
        for (count, expected) in counts.iter().zip([1_000, 4_000, 5_000]) {
            assert!(count.abs_diff(expected) < 250, "{counts:?}");
        }
        assert_eq!(pick_weighted(&[], &mut rng), None);
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

    #[test]
    fn missing_host_routes_by_vip_and_port() {
        let cfg = ProxyConfig::parse(BOOKINFO_PROXY).expect("shipped config");
        let dst = addr("10.96.0.12:9080");
        let host = routing_host(&HeaderMap::new(), dst);
        assert_eq!(host, "10.96.0.12:9080");
        let mut rng = StdRng::seed_from_u64(3);
        let d = decide_outbound(
            &cfg,
            OutboundTrafficPolicy::AllowAny,
            dst,
            &host,
            "/reviews/0",
            &mut rng,
        );
        assert_eq!(d.vhost, "reviews.bookinfo.svc.cluster.local:9080");
        assert!(d.cluster.starts_with("outbound|9080|v"), "{}", d.cluster);
        let Action::Forward {
            endpoints,
            retry,
            mesh,
        } = d.action
        else {
            panic!("{:?}", d.action);
        };
        assert!(!endpoints.is_empty());
        assert!(mesh, "reviews endpoints are sidecar pods (EDS)");
        assert_eq!(retry.map(|r| r.num_retries), Some(2));
    }

    #[test]
    fn unknown_hosts_pass_through_or_blackhole() {
        let cfg = ProxyConfig::parse(BOOKINFO_PROXY).expect("shipped config");
        let dst = addr("192.0.2.1:9080");
        let mut rng = StdRng::seed_from_u64(3);
        let allow = decide_outbound(
            &cfg,
            OutboundTrafficPolicy::AllowAny,
            dst,
            "example.com",
            "/",
            &mut rng,
        );
        assert_eq!(
            (allow.vhost, allow.cluster),
            ("allow_any", PASSTHROUGH_CLUSTER)
        );
        assert!(
            matches!(&allow.action, Action::Forward { endpoints, retry: None, mesh: false } if endpoints == &[dst]),
            "{:?}",
            allow.action
        );
        let deny = decide_outbound(
            &cfg,
            OutboundTrafficPolicy::RegistryOnly,
            dst,
            "example.com",
            "/",
            &mut rng,
        );
        assert_eq!((deny.vhost, deny.cluster), ("allow_any", BLACKHOLE_CLUSTER));
        assert!(matches!(
            deny.action,
            Action::Reply(StatusCode::BAD_GATEWAY, _)
        ));
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        assert_eq!(ensure_request_id(&mut headers), "abc");
        let mut headers = HeaderMap::new();
        let id = ensure_request_id(&mut headers);
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        assert_eq!(
            headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()),
            Some(id.as_str())
        );
    }

    // ------------------------------------------------------ real sockets

    /// An HTTP server on 127.0.0.1 answering `status`, with the peer's
    /// address and the request's Host header in the body.
    async fn http_server(status: u16, work: Duration) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let local = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let service = service_fn(move |req: Request<Incoming>| async move {
                    tokio::time::sleep(work).await;
                    let host = host_header(req.headers()).unwrap_or("-").to_owned();
                    let mut resp =
                        Response::new(Full::new(Bytes::from(format!("{} {host}", peer.ip()))));
                    *resp.status_mut() = StatusCode::from_u16(status).expect("status");
                    Ok::<_, Infallible>(resp)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        local
    }

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

    /// A two-service config: `svc` at VIP:9080 with `endpoints`.
    fn lab_config(endpoints: &[SocketAddr]) -> ProxyConfig {
        let eps: Vec<_> = endpoints
            .iter()
            .map(|e| {
                serde_json::json!({"endpoint": {"address": {"socket_address":
                    {"address": e.ip().to_string(), "port_value": e.port()}}}})
            })
            .collect();
        let cfg = serde_json::json!({
            "listeners": [{"name": "0.0.0.0_9080", "port": 9080, "route_config_name": "9080"}],
            "route_configs": [{"name": "9080", "virtual_hosts": [
                {"name": "allow_any", "domains": ["*"],
                 "routes": [{"match": {"prefix": "/"}, "route": {"cluster": PASSTHROUGH_CLUSTER}}]},
                {"name": "svc:9080", "domains": ["svc", "svc:9080", VIP, format!("{VIP}:9080")],
                 "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "outbound|9080||svc"}}]}
            ]}],
            "clusters": [
                {"name": "outbound|9080||svc", "type": "EDS",
                 "load_assignment": {"endpoints": [{"lb_endpoints": eps}]}},
                {"name": PASSTHROUGH_CLUSTER, "type": "ORIGINAL_DST"},
                {"name": BLACKHOLE_CLUSTER, "type": "STATIC"}
            ]
        });
        let cfg: ProxyConfig = serde_json::from_value(cfg).expect("test config");
        cfg.validate().expect("valid test config");
        cfg
    }

    /// A running proxy on 127.0.0.1 whose original destinations come from
    /// `lookup` instead of iptables.
    struct TestProxy {
        outbound: SocketAddr,
        inbound: SocketAddr,
        log: PathBuf,
        stop: tokio::sync::oneshot::Sender<()>,
        done: tokio::task::JoinHandle<()>,
    }

    impl TestProxy {
        async fn start(
            config: impl FnOnce(SocketAddr) -> ProxyConfig,
            policy: OutboundTrafficPolicy,
            lookup: impl Fn(Direction) -> SocketAddr + Send + Sync + 'static,
        ) -> TestProxy {
            Self::start_with(config, policy, lookup, None).await
        }

        /// Like `start`, with mutual TLS from the certificates in `mtls_dir`.
        async fn start_with(
            config: impl FnOnce(SocketAddr) -> ProxyConfig,
            policy: OutboundTrafficPolicy,
            lookup: impl Fn(Direction) -> SocketAddr + Send + Sync + 'static,
            mtls_dir: Option<PathBuf>,
        ) -> TestProxy {
            let out_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let in_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let inbound = in_l.local_addr().expect("addr");
            let log =
                std::env::temp_dir().join(format!("proxy-test-{}.jsonl", uuid::Uuid::new_v4()));
            let opts = ProxyOptions {
                config: PathBuf::new(),
                pod: "test-pod".to_owned(),
                access_log: log.clone(),
                outbound_traffic_policy: Some(policy),
                delay_outbound_ms: 1.0,
                delay_inbound_ms: 0.0,
                drain_ms: 2_000,
                mtls_dir,
            };
            let lookup: DstLookup = Arc::new(move |_, d| Ok(lookup(d)));
            let proxy = Proxy::new(config(inbound), &opts, lookup).expect("proxy");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let shutdown = async move {
                let _ = stopped.await;
            };
            let outbound = out_l.local_addr().expect("addr");
            let done = tokio::spawn(serve(
                Arc::new(proxy),
                out_l,
                in_l,
                shutdown,
                Duration::from_secs(2),
            ));
            TestProxy {
                outbound,
                inbound,
                log,
                stop,
                done,
            }
        }

        /// Drains the proxy and returns its access records.
        async fn finish(self) -> Vec<ProxyRecord> {
            let _ = self.stop.send(());
            self.done.await.expect("serve task");
            let records = read_records(&self.log).expect("access log");
            let _ = std::fs::remove_file(&self.log);
            records
        }
    }

    /// Sends raw bytes and reads until the proxy closes the connection.
    async fn exchange(to: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(to).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.expect("read");
        answer
    }

    #[tokio::test]
    async fn outbound_to_inbound_to_app() {
        let app = http_server(200, Duration::ZERO).await;
        let vip = SocketAddr::new(VIP.parse().expect("vip"), 9080);
        let proxy = TestProxy::start(
            |inbound| lab_config(&[inbound]),
            OutboundTrafficPolicy::AllowAny,
            move |d| match d {
                Direction::Outbound => vip,
                Direction::Inbound => app,
            },
        )
        .await;
        // No Host header: routed by VIP:port.
        let answer = exchange(
            proxy.outbound,
            "GET /a?b=1 HTTP/1.1\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // The app sees the inbound passthrough source.
        assert!(answer.contains("\r\n\r\n127.0.0.6 "), "{answer}");
        // Keep-alive: two requests on one downstream connection.
        let two = "GET /1 HTTP/1.1\r\nhost: svc:9080\r\n\r\nGET /2 HTTP/1.1\r\nhost: svc:9080\r\nconnection: close\r\n\r\n";
        let answer = exchange(proxy.outbound, two).await;
        assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
        assert!(
            answer.ends_with("127.0.0.6 svc:9080"),
            "Host is kept: {answer}"
        );
        let inbound_port = proxy.inbound.port();

        let records = proxy.finish().await;
        assert_eq!(records.len(), 6, "{records:#?}");
        let (outbound, inbound): (Vec<_>, Vec<_>) = records
            .iter()
            .partition(|r| r.direction == Direction::Outbound);
        for r in &outbound {
            assert_eq!(
                (r.route.as_str(), r.cluster.as_str()),
                ("svc:9080", "outbound|9080||svc")
            );
            assert_eq!((r.original_dst, r.attempts, r.status), (vip, 1, 200));
            assert_eq!(r.upstream_host.map(|h| h.port()), Some(inbound_port));
            assert!(r.upstream_local.is_some());
            assert!(!r.upstream_tls && !r.downstream_tls, "no mTLS configured");
            assert!(
                r.t_downstream_read_ns < r.t_upstream_write_ns,
                "delay_outbound_ms"
            );
            assert!(r.t_upstream_write_ns <= r.t_upstream_read_ns);
            assert!(r.t_upstream_read_ns <= r.t_downstream_write_ns);
        }
        assert_eq!(outbound[0].path.as_deref(), Some("/a?b=1"));
        assert_eq!(outbound[0].host, None);
        assert_eq!(outbound[1].host.as_deref(), Some("svc:9080"));
        // The second and third requests share the downstream connection.
        assert_eq!(outbound[1].downstream_peer, outbound[2].downstream_peer);
        for r in &inbound {
            assert_eq!(r.cluster, format!("inbound|{}||", app.port()));
            assert_eq!(
                (r.original_dst, r.upstream_host, r.status),
                (app, Some(app), 200)
            );
            let local = r.upstream_local.expect("inbound local address");
            assert_eq!(local.ip(), IpAddr::from(INBOUND_PASSTHROUGH_SOURCE));
            assert!(!r.upstream_tls && !r.downstream_tls, "no mTLS configured");
            // The outbound side's request id travels with the request.
            assert!(outbound.iter().any(|o| o.request_id == r.request_id));
        }
    }

    #[tokio::test]
    async fn tcp_without_listener_passes_through_or_blackholes() {
        // An echo server on a port no listener claims.
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        for policy in [
            OutboundTrafficPolicy::AllowAny,
            OutboundTrafficPolicy::RegistryOnly,
        ] {
            let proxy = TestProxy::start(|_| lab_config(&[]), policy, move |_| echo_addr).await;
            let mut s = TcpStream::connect(proxy.outbound).await.expect("connect");
            let _ = s.write_all(b"ping").await;
            let _ = s.shutdown().await;
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer).await;
            drop(s);
            let records = proxy.finish().await;
            assert_eq!(records.len(), 1, "{records:?}");
            let r = &records[0];
            assert_eq!(
                (r.kind.as_str(), r.route.as_str(), r.status),
                ("tcp", "tcp", 0)
            );
            match policy {
                OutboundTrafficPolicy::AllowAny => {
                    assert_eq!(answer, b"ping");
                    assert_eq!(r.cluster, PASSTHROUGH_CLUSTER);
                    assert_eq!((r.attempts, r.upstream_host), (1, Some(echo_addr)));
                }
                OutboundTrafficPolicy::RegistryOnly => {
                    assert!(answer.is_empty());
                    assert_eq!(r.cluster, BLACKHOLE_CLUSTER);
                    assert_eq!((r.attempts, r.upstream_host), (0, None));
                }
            }
        }
    }

    #[tokio::test]
    async fn drain_lets_in_flight_requests_finish() {
        let slow_app = http_server(200, Duration::from_millis(300)).await;
        let vip = SocketAddr::new(VIP.parse().expect("vip"), 9080);
        let proxy = TestProxy::start(
            |inbound| lab_config(&[inbound]),
            OutboundTrafficPolicy::AllowAny,
            move |d| match d {
                Direction::Outbound => vip,
                Direction::Inbound => slow_app,
            },
        )
        .await;
        let to = proxy.outbound;
        let request = tokio::spawn(exchange(to, "GET / HTTP/1.1\r\nhost: svc\r\n\r\n"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let records = proxy.finish().await;
        let answer = request.await.expect("request task");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(records.len(), 2, "{records:?}");
        // Stopped accepting: a new connection is refused.
        assert!(TcpStream::connect(to).await.is_err());
    }

    // ------------------------------------------------------ mutual TLS

    /// A mesh CA and the test pod's certificate for 127.0.0.1 (where its
    /// inbound listener is) in a temporary directory, removed on drop.
    struct TestCerts {
        dir: PathBuf,
    }

    impl TestCerts {
        fn new() -> TestCerts {
            let dir = std::env::temp_dir().join(format!("proxy-mtls-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir(&dir).expect("cert dir");
            let ca = MeshCa::new("test mesh CA").expect("CA");
            ca.write_ca(&dir).expect("ca.pem");
            ca.write_workload(&dir, &test_workload("test-pod"))
                .expect("test-pod certificate");
            TestCerts { dir }
        }
    }

    impl Drop for TestCerts {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn test_workload(pod: &str) -> Workload<'_> {
        Workload {
            pod,
            namespace: "default",
            service_account: "svc",
            ip: Ipv4Addr::LOCALHOST.into(),
        }
    }

    /// Sends `request` over TLS with `tls`'s client certificate and reads
    /// until the server closes; the error if the server refuses us.
    async fn tls_exchange(to: SocketAddr, tls: SidecarTls, request: &str) -> io::Result<String> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls.client));
        let tcp = TcpStream::connect(to).await?;
        let name = rustls::pki_types::ServerName::from(to.ip());
        let mut s = connector.connect(name, tcp).await?;
        s.write_all(request.as_bytes()).await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn mutual_tls_between_sidecars_with_permissive_inbound() {
        let certs = TestCerts::new();
        let app = http_server(200, Duration::ZERO).await;
        let vip = SocketAddr::new(VIP.parse().expect("vip"), 9080);
        let proxy = TestProxy::start_with(
            |inbound| lab_config(&[inbound]),
            OutboundTrafficPolicy::AllowAny,
            move |d| match d {
                Direction::Outbound => vip,
                Direction::Inbound => app,
            },
            Some(certs.dir.clone()),
        )
        .await;
        // App -> outbound (plaintext) -> inbound (mTLS) -> app (plaintext).
        let answer = exchange(
            proxy.outbound,
            "GET /tls HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("\r\n\r\n127.0.0.6 svc"), "{answer}");
        // PERMISSIVE: a plaintext peer is still served.
        let plain = "GET /plain HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n";
        let answer = exchange(proxy.inbound, plain).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // A certificate from another CA is refused, although ours is trusted.
        let rogue = MeshCa::new("rogue CA").expect("rogue CA");
        let intruder = rogue.issue(&test_workload("intruder")).expect("issue");
        let ca = std::fs::read(certs.dir.join(CA_FILE)).expect("ca.pem");
        let tls = SidecarTls::from_pem(
            &ca,
            intruder.cert_pem.as_bytes(),
            intruder.key_pem.as_bytes(),
        )
        .expect("intruder TLS");
        let rogue_request = "GET /rogue HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n";
        let refused = tokio::time::timeout(
            Duration::from_secs(5),
            tls_exchange(proxy.inbound, tls, rogue_request),
        )
        .await
        .expect("the inbound listener neither answered nor refused");
        // TLS 1.3: the client's handshake ends before the server checks its
        // certificate, so the refusal (an alert) arrives at the first read.
        let alert = refused.expect_err("a foreign certificate was served");
        assert_eq!(alert.kind(), io::ErrorKind::InvalidData, "{alert}");

        let records = proxy.finish().await;
        assert_mtls_records(&records);
    }

    #[tokio::test]
    async fn drain_closes_inbound_connections_that_sent_nothing_yet() {
        let certs = TestCerts::new();
        let app = http_server(200, Duration::ZERO).await;
        let proxy = TestProxy::start_with(
            |inbound| lab_config(&[inbound]),
            OutboundTrafficPolicy::AllowAny,
            move |_| app,
            Some(certs.dir.clone()),
        )
        .await;
        // Waiting in the TLS sniff: no HTTP connection yet for `graceful` to close.
        let mut silent = TcpStream::connect(proxy.inbound).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let records = proxy.finish().await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "drain waited {:?} for a silent connection (limit 2 s)",
            started.elapsed()
        );
        assert!(records.is_empty(), "{records:?}");
        let mut rest = Vec::new();
        let closed = silent.read_to_end(&mut rest).await;
        assert!(matches!(closed, Ok(0)), "{closed:?}");
    }

    /// One mTLS request (outbound and inbound record), one plaintext inbound
    /// request, and nothing from the intruder.
    fn assert_mtls_records(records: &[ProxyRecord]) {
        let find = |direction, path: &str| {
            let found: Vec<_> = records
                .iter()
                .filter(|r| r.direction == direction && r.path.as_deref() == Some(path))
                .collect();
            assert_eq!(found.len(), 1, "{direction:?} {path}: {records:#?}");
            found[0]
        };
        assert_eq!(records.len(), 3, "{records:#?}");
        let out = find(Direction::Outbound, "/tls");
        assert_eq!((out.status, out.attempts), (200, 1));
        assert!(out.upstream_tls && !out.downstream_tls, "{out:?}");
        // HttpInfo comes through the TLS connector.
        let local = out
            .upstream_local
            .expect("local address of the TLS connection");
        assert_eq!(local.ip(), IpAddr::from(Ipv4Addr::LOCALHOST));
        let inbound = find(Direction::Inbound, "/tls");
        assert!(
            inbound.downstream_tls && !inbound.upstream_tls,
            "{inbound:?}"
        );
        assert_eq!(inbound.downstream_peer, local, "the TLS leg's two ends");
        assert_eq!(inbound.request_id, out.request_id);
        let plain = find(Direction::Inbound, "/plain");
        assert!(!plain.downstream_tls, "{plain:?}");
    }
}
