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
//! [`ProxyRecord`](super::records::ProxyRecord) in the access log: the ground
//! truth for mesh-trace's tests.
//!
//! The parts: `listeners` accepts on both ports and serves each connection
//! (HTTP, the PERMISSIVE TLS sniff, TCP passthrough); `routing` turns an
//! HTTP request into a route and cluster, or a local reply; `clusters` sends
//! it to the cluster's endpoints under the retry policy; `tls` makes the
//! mutual-TLS upstream client; `admin` writes the access records and catches
//! the signal that starts the drain. `Proxy` holds what they share.
use std::{net::Ipv4Addr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::{
    header::{self, HeaderValue},
    HeaderMap, Response, StatusCode,
};
use tokio::task::JoinSet;

use super::{
    config::{Http2, OutboundTrafficPolicy, ProxyConfig},
    mtls::SidecarTls,
    records::RecordWriter,
};

mod admin;
mod clusters;
mod h2pool;
mod listeners;
mod routing;
mod tls;

use self::{
    admin::shutdown_signal,
    clusters::{http_connector, mesh_client, pooled, MeshClient, PlainClient},
    h2pool::H2Pool,
    listeners::{bind, serve, so_original_dst, DstLookup},
};

const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15006;
/// Istio's inbound passthrough source: exempt from redirection on `lo`.
const INBOUND_PASSTHROUGH_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

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
    /// Where this sidecar speaks HTTP/2 upstream: to other sidecars
    /// (h2UpgradePolicy UPGRADE), or to its app as well. Downstream it
    /// takes either, from the preface.
    #[arg(long, value_enum, default_value_t = Http2::Off)]
    pub http2: Http2,
    /// Mutual TLS with the other sidecars: the directory with `ca.pem`,
    /// `<pod>.pem` and `<pod>-key.pem` (see `lab::mtls`). Plaintext without it.
    #[arg(long, value_name = "DIR")]
    pub mtls_dir: Option<PathBuf>,
    /// On requests to other sidecars, `x-envoy-peer-metadata-id` and this
    /// many bytes of base64 in `x-envoy-peer-metadata` before the
    /// request's own header lines (Istio's Envoy sends its peer's labels
    /// so, often over a kilobyte); the inbound side removes both before
    /// the app. 0: none.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    pub peer_metadata_bytes: usize,
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

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Istio's default cluster connect_timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// A response the proxy makes up itself (no upstream answer to relay).
pub(super) fn local_reply(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

struct Proxy {
    config: ProxyConfig,
    policy: OutboundTrafficPolicy,
    pod: String,
    records: RecordWriter,
    /// HTTP/1.1, to mesh endpoints in plaintext and to what leaves the mesh.
    outbound_client: PlainClient,
    /// For mesh endpoints when mTLS is on.
    mesh_client: Option<MeshClient>,
    /// For mesh endpoints when upgrading to HTTP/2 (over mTLS if on).
    mesh_h2: Option<H2Pool>,
    /// Connections bound to 127.0.0.6, so the app's replies skip redirection.
    inbound_client: PlainClient,
    /// The same, HTTP/2 end to end.
    inbound_h2: Option<H2Pool>,
    /// Accepts TLS on 15006 when mTLS is on.
    inbound_tls: Option<Arc<openssl::ssl::SslAcceptor>>,
    delay_outbound: Duration,
    delay_inbound: Duration,
    /// Headers put first on requests to other sidecars.
    peer_metadata: Option<routing::PeerMetadata>,
    original_dst: DstLookup,
    /// HTTP records waiting for their response to be written downstream;
    /// finished ones are reaped as new ones come, the rest awaited at exit.
    pending_records: std::sync::Mutex<JoinSet<()>>,
}

impl Proxy {
    fn new(
        config: ProxyConfig,
        opts: &ProxyOptions,
        original_dst: DstLookup,
    ) -> anyhow::Result<Self> {
        let records = RecordWriter::create(&opts.access_log)
            .with_context(|| format!("creating {}", opts.access_log.display()))?;
        crate::lab::ioclock::write_bounds_beside(&opts.access_log)
            .with_context(|| format!("creating bounds beside {}", opts.access_log.display()))?;
        let tls = match &opts.mtls_dir {
            Some(dir) => Some(SidecarTls::load(dir, &opts.pod).context("--mtls-dir")?),
            None => None,
        };
        let inbound_tls = tls.as_ref().map(|t| Arc::clone(&t.server));
        let (mesh_client, mesh_h2) = match (tls, opts.http2) {
            (None, Http2::Off) => (None, None),
            (None, _) => (None, Some(H2Pool::new(None, None))),
            (Some(t), Http2::Off) => (Some(mesh_client(t.client)?), None),
            (Some(mut t), _) => {
                t.client
                    .set_alpn_protos(b"\x02h2")
                    .context("offering h2 by ALPN")?;
                (None, Some(H2Pool::new(None, Some(t.client.build()))))
            }
        };
        let inbound_h2 = (opts.http2 == Http2::EndToEnd)
            .then(|| H2Pool::new(Some(INBOUND_PASSTHROUGH_SOURCE.into()), None));
        Ok(Proxy {
            policy: opts
                .outbound_traffic_policy
                .unwrap_or(config.outbound_traffic_policy),
            config,
            pod: opts.pod.clone(),
            records,
            outbound_client: pooled(http_connector(None)),
            mesh_client,
            mesh_h2,
            inbound_client: pooled(http_connector(Some(INBOUND_PASSTHROUGH_SOURCE.into()))),
            inbound_h2,
            inbound_tls,
            delay_outbound: delay(opts.delay_outbound_ms).context("--delay-outbound-ms")?,
            delay_inbound: delay(opts.delay_inbound_ms).context("--delay-inbound-ms")?,
            peer_metadata: routing::PeerMetadata::of(&opts.pod, opts.peer_metadata_bytes),
            original_dst,
            pending_records: std::sync::Mutex::new(JoinSet::new()),
        })
    }
}

fn delay(ms: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(ms / 1000.0).map_err(|e| anyhow::anyhow!("bad delay {ms} ms: {e}"))
}

/// Fixtures the tests of every part share, and the end-to-end test.
#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        net::{IpAddr, SocketAddr},
    };

    use http_body_util::Full;
    use hyper::{body::Incoming, service::service_fn, Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::{routing::host_header, *};
    use crate::lab::{
        config::{BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER},
        mtls::{MeshCa, Workload},
        records::{read_records, Direction, ProxyRecord},
    };

    pub(super) const VIP: &str = "10.96.0.99";

    pub(super) fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    // ------------------------------------------------------ real sockets

    /// An HTTP server on 127.0.0.1 answering `status`, with the peer's
    /// address and the request's Host header in the body.
    pub(super) async fn http_server(status: u16, work: Duration) -> SocketAddr {
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

    /// A two-service config: `svc` at VIP:9080 with `endpoints`.
    pub(super) fn lab_config(endpoints: &[SocketAddr]) -> ProxyConfig {
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
    pub(super) struct TestProxy {
        pub(super) outbound: SocketAddr,
        pub(super) inbound: SocketAddr,
        log: PathBuf,
        stop: tokio::sync::oneshot::Sender<()>,
        done: tokio::task::JoinHandle<()>,
    }

    impl TestProxy {
        pub(super) async fn start(
            config: impl FnOnce(SocketAddr) -> ProxyConfig,
            policy: OutboundTrafficPolicy,
            lookup: impl Fn(Direction) -> SocketAddr + Send + Sync + 'static,
        ) -> TestProxy {
            Self::start_with(config, policy, lookup, None, Http2::Off).await
        }

        /// Like `start`, with mutual TLS from the certificates in `mtls_dir`
        /// and HTTP/2 upstream where `http2` says.
        pub(super) async fn start_with(
            config: impl FnOnce(SocketAddr) -> ProxyConfig,
            policy: OutboundTrafficPolicy,
            lookup: impl Fn(Direction) -> SocketAddr + Send + Sync + 'static,
            mtls_dir: Option<PathBuf>,
            http2: Http2,
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
                http2,
                mtls_dir,
                peer_metadata_bytes: 0,
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

        /// The usual chain: the app's connections headed for `svc` at the
        /// VIP, the inbound side's for `app`; mutual TLS from `mtls_dir`,
        /// HTTP/2 upstream where `http2` says.
        pub(super) async fn to_app(
            app: SocketAddr,
            mtls_dir: Option<PathBuf>,
            http2: Http2,
        ) -> TestProxy {
            let vip = SocketAddr::new(VIP.parse().expect("vip"), 9080);
            Self::start_with(
                |inbound| lab_config(&[inbound]),
                OutboundTrafficPolicy::AllowAny,
                move |d| match d {
                    Direction::Outbound => vip,
                    Direction::Inbound => app,
                },
                mtls_dir,
                http2,
            )
            .await
        }

        /// Drains the proxy and returns its access records.
        pub(super) async fn finish(self) -> Vec<ProxyRecord> {
            let _ = self.stop.send(());
            self.done.await.expect("serve task");
            let records = read_records(&self.log).expect("access log");
            let _ = std::fs::remove_file(&self.log);
            records
        }
    }

    /// Sends raw bytes and reads until the proxy closes the connection.
    pub(super) async fn exchange(to: SocketAddr, request: &str) -> String {
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
        let proxy = TestProxy::to_app(app, None, Http2::Off).await;
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

    /// Upgrading to HTTP/2 between the sidecars: HTTP/1.1 from and to the
    /// app, every request a stream on one connection from the outbound side
    /// to the inbound one, the request's Host carried as `:authority` and
    /// back. Each record's upstream moments are its own stream's: the
    /// outbound side wrote the stream's head before the inbound side read
    /// it, and read its end after the inbound side wrote it.
    #[tokio::test]
    async fn sidecars_upgrading_to_http2_between_them() {
        let app = http_server(200, Duration::from_millis(5)).await;
        let proxy = TestProxy::to_app(app, None, Http2::BetweenSidecars).await;
        let outbound = proxy.outbound;
        let calls = (0..8).map(|i| {
            tokio::spawn(async move {
                let request =
                    format!("GET /h2/{i} HTTP/1.1\r\nhost: svc:9080\r\nconnection: close\r\n\r\n");
                exchange(outbound, &request).await
            })
        });
        for call in calls {
            let answer = call.await.expect("call");
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(
                answer.ends_with("127.0.0.6 svc:9080"),
                "Host kept: {answer}"
            );
        }
        let records = proxy.finish().await;
        assert_eq!(records.len(), 16, "{records:#?}");
        let (outbound, inbound): (Vec<_>, Vec<_>) = records
            .iter()
            .partition(|r| r.direction == Direction::Outbound);
        let upstream_locals: std::collections::HashSet<_> =
            outbound.iter().map(|r| r.upstream_local).collect();
        assert_eq!(upstream_locals.len(), 1, "one connection: {outbound:#?}");
        for o in &outbound {
            let i = inbound
                .iter()
                .find(|i| i.request_id == o.request_id && i.path == o.path)
                .expect("the inbound side's record");
            assert_eq!(i.host.as_deref(), None, "`:authority`, no Host: {i:?}");
            // Taken from the frames, not around the calls.
            assert!(o.t_upstream_read_end_ns.is_some(), "{o:?}");
            assert!(i.t_downstream_write_end_ns.is_some(), "{i:?}");
            assert!(
                o.t_upstream_write_ns <= i.t_downstream_read_ns,
                "{o:?} {i:?}"
            );
            assert!(
                i.t_downstream_write_ns <= o.t_upstream_read_ns,
                "{o:?} {i:?}"
            );
            assert!(o.t_upstream_read_ns <= o.t_downstream_write_ns, "{o:?}");
        }
    }

    // ------------------------------------------------------ mutual TLS

    /// A mesh CA and the test pod's certificate for 127.0.0.1 (where its
    /// inbound listener is) in a temporary directory, removed on drop.
    pub(super) struct TestCerts {
        pub(super) dir: PathBuf,
    }

    impl TestCerts {
        pub(super) fn new() -> TestCerts {
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

    pub(super) fn test_workload(pod: &str) -> Workload<'_> {
        Workload {
            pod,
            namespace: "default",
            service_account: "svc",
            ip: Ipv4Addr::LOCALHOST.into(),
        }
    }
}
