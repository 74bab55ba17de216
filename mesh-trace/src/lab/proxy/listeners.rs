//! The two listeners, 15001 (outbound) and 15006 (inbound): accepting the
//! redirected connections, learning where each was headed (SO_ORIGINAL_DST),
//! and serving it as HTTP, after the PERMISSIVE TLS sniff on 15006 when mTLS
//! is on, or, on outbound ports without a listener, as TCP passed through or
//! dropped. At shutdown they stop accepting and drain.
use openssl::ssl::SslAcceptor;
use std::{
    convert::Infallible,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{
        conn::auto,
        graceful::{GracefulConnection, GracefulShutdown, Watcher},
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};

use super::{Proxy, CONNECT_TIMEOUT};
use crate::lab::{
    config::{OutboundTrafficPolicy, BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER},
    ioclock::{Clocked, IoClock},
    records::{mono_ns, Direction, ProxyRecord},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The first byte of a TLS connection: a handshake record (content type 22).
const TLS_HANDSHAKE: u8 = 0x16;

pub(super) async fn bind(port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .await
        .with_context(|| format!("binding 0.0.0.0:{port}"))
}

/// The destination the app asked for, as the nat REDIRECT rule recorded it.
pub(super) fn so_original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt::OriginalDst};
    let sin = getsockopt(stream, OriginalDst)?;
    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Ok(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)).into())
}

/// How the proxy learns where an accepted connection was headed: the kernel's
/// SO_ORIGINAL_DST in production, a fixed answer in tests without iptables.
pub(super) type DstLookup =
    Arc<dyn Fn(&TcpStream, Direction) -> io::Result<SocketAddr> + Send + Sync>;

/// One accepted downstream connection.
#[derive(Clone, Copy, Debug)]
pub(super) struct Conn {
    pub(super) direction: Direction,
    pub(super) original_dst: SocketAddr,
    pub(super) peer: SocketAddr,
    accepted_ns: u64,
    /// The downstream connection is TLS (only inbound, from another sidecar).
    pub(super) tls: bool,
}

/// Accepts on both listeners until `shutdown` resolves, then stops accepting
/// and gives open connections up to `drain` to finish.
pub(super) async fn serve(
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
            let watcher = conns.graceful.watcher();
            let mut stopping = conns.stopping.subscribe();
            conns.tasks.spawn(async move {
                let h2 = tokio::select! {
                    h2 = speaks_h2(&stream) => h2,
                    // Not serving HTTP yet: nothing in flight to let finish.
                    _ = stopping.changed() => return,
                };
                let (stream, clock) = Clocked::with_tx_stamps(stream);
                let served = http_connection(&proxy, conn, stream, clock, h2);
                serve_http(conn, watcher.watch(served)).await;
            });
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
        acceptor: Arc<SslAcceptor>,
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
            Ok((io, tls, clock, h2)) => {
                conn.tls = tls;
                let watched = watcher.watch(http_connection(&self, conn, io, clock, h2));
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
/// TLS, the clock of the TCP socket's reads and writes (under TLS, so the
/// times are the socket's, as for plaintext), and whether it speaks HTTP/2
/// (by ALPN under TLS, else by its preface).
async fn open_permissive(
    acceptor: &SslAcceptor,
    stream: TcpStream,
) -> io::Result<(Box<dyn DownstreamIo>, bool, Arc<IoClock>, bool)> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    if n == 0 || first[0] != TLS_HANDSHAKE {
        let h2 = speaks_h2(&stream).await;
        let (stream, clock) = Clocked::with_tx_stamps(stream);
        return Ok((Box::new(stream), false, clock, h2));
    }
    let (stream, clock) = Clocked::with_tx_stamps(stream);
    let ssl = openssl::ssl::Ssl::new(acceptor.context()).map_err(io::Error::other)?;
    let mut tls = tokio_openssl::SslStream::new(ssl, stream).map_err(io::Error::other)?;
    std::pin::Pin::new(&mut tls)
        .accept()
        .await
        .map_err(io::Error::other)?;
    let h2 = tls.ssl().selected_alpn_protocol() == Some(b"h2");
    Ok((Box::new(tls), true, clock, h2))
}

/// Whether a plaintext connection opens with HTTP/2's preface, peeked (left
/// in the socket): the protocol is chosen before anything is read, so the
/// first read takes whatever came, as Envoy's does, not a preface's worth
/// of a request head (hyper's own detection reads those 24 bytes first,
/// which cuts an HTTP/1.1 head in two reads).
async fn speaks_h2(stream: &TcpStream) -> bool {
    let preface = mesh_trace_common::H2_PREFACE;
    let mut buf = [0u8; 24];
    loop {
        let n = match stream.peek(&mut buf[..preface.len()]).await {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 || buf[..n] != preface[..n] {
            return false;
        }
        if n == preface.len() {
            return true;
        }
        // A preface begun and not whole yet (peek returns at once while
        // bytes wait unread).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// HTTP/1.1 (keep-alive) or, if `h2`, HTTP/2 on one downstream
/// connection; `clock` times its socket's reads and writes.
fn http_connection(
    proxy: &Arc<Proxy>,
    conn: Conn,
    stream: impl DownstreamIo,
    clock: Arc<IoClock>,
    h2: bool,
) -> impl GracefulConnection<Error = BoxError> + Send + 'static {
    let proxy = Arc::clone(proxy);
    let service = service_fn(move |req| {
        let (proxy, clock) = (Arc::clone(&proxy), Arc::clone(&clock));
        // hyper calls this in the order HTTP/2 requests came: the clock's
        // next request head is this one (none over HTTP/1.1).
        let h2 = clock.next_h2_request();
        async move { Ok::<_, Infallible>(proxy.http(conn, &clock, h2, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        // Envoy keeps idle downstream connections for an hour; never time out.
        .header_read_timeout(None);
    let builder = if h2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned()
}

/// Runs a (watched) HTTP connection to its end.
async fn serve_http(conn: Conn, watched: impl Future<Output = Result<(), BoxError>>) {
    if let Err(e) = watched.await {
        tracing::debug!("{:?} connection from {}: {e}", conn.direction, conn.peer);
    }
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
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::lab::config::Http2;
    use crate::lab::proxy::tests::{exchange, http_server, lab_config, TestCerts, TestProxy};

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
        let proxy = TestProxy::to_app(slow_app, None, Http2::Off).await;
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

    #[tokio::test]
    async fn drain_closes_inbound_connections_that_sent_nothing_yet() {
        let certs = TestCerts::new();
        let app = http_server(200, Duration::ZERO).await;
        let proxy = TestProxy::start_with(
            |inbound| lab_config(&[inbound]),
            OutboundTrafficPolicy::AllowAny,
            move |_| app,
            Some(certs.dir.clone()),
            Http2::Off,
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
}
