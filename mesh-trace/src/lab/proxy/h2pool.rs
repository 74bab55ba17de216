//! HTTP/2 upstream: one connection per endpoint carrying every request to
//! it as a stream, as Envoy's HTTP/2 connection pools do (to other sidecars
//! when upgrading, to the app end to end).
//!
//! Built on hyper's connection API rather than hyper-util's pooled client:
//! that one sends the address it connects to as `:authority`, where Envoy
//! keeps the request's Host. Each connection's socket is timed
//! ([`Clocked`]), and the clock follows its frames (plaintext only: under
//! TLS it sees records, and the access log keeps the times taken around the
//! call).
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, client::conn::http2::SendRequest, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use openssl::ssl::SslConnector;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpSocket,
};

use super::CONNECT_TIMEOUT;
use crate::lab::ioclock::{Clocked, IoClock};

/// An upstream byte stream: plaintext TCP or TLS over it.
trait UpstreamIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> UpstreamIo for T {}

/// One endpoint's connection.
#[derive(Clone)]
pub(super) struct H2Conn {
    send: SendRequest<Full<Bytes>>,
    pub(super) clock: Arc<IoClock>,
    pub(super) local: SocketAddr,
}

/// Why a request got no response.
#[derive(Debug)]
pub(super) enum H2Failure {
    /// No connection could be made.
    Connect(io::Error),
    /// The stream or its connection broke before response headers.
    Reset(hyper::Error),
}

pub(super) struct H2Pool {
    /// The local address upstream connections are bound to (the inbound
    /// passthrough source), if any.
    local: Option<IpAddr>,
    /// Mutual TLS to the endpoints, if on.
    tls: Option<SslConnector>,
    conns: tokio::sync::Mutex<HashMap<SocketAddr, H2Conn>>,
}

impl H2Pool {
    pub(super) fn new(local: Option<IpAddr>, tls: Option<SslConnector>) -> H2Pool {
        H2Pool {
            local,
            tls,
            conns: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Sends `req` as a stream on `endpoint`'s connection, opening it first
    /// if there is none (or it closed). Returns the connection with the
    /// response: its clock and local address go into the access record.
    pub(super) async fn send(
        &self,
        endpoint: SocketAddr,
        req: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, H2Conn), H2Failure> {
        let conn = self.conn(endpoint).await.map_err(H2Failure::Connect)?;
        let mut send = conn.send.clone();
        match send.send_request(req).await {
            Ok(resp) => Ok((resp, conn)),
            Err(e) => Err(H2Failure::Reset(e)),
        }
    }

    async fn conn(&self, endpoint: SocketAddr) -> io::Result<H2Conn> {
        // Held while connecting, so concurrent requests share one connection.
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&endpoint).filter(|c| !c.send.is_closed()) {
            return Ok(c.clone());
        }
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(endpoint))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))??;
        conns.insert(endpoint, conn.clone());
        Ok(conn)
    }

    async fn connect(&self, endpoint: SocketAddr) -> io::Result<H2Conn> {
        let socket = match endpoint {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = self.local {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.set_nodelay(true)?;
        let stream = socket.connect(endpoint).await?;
        let local = stream.local_addr()?;
        let (stream, clock) = Clocked::with_tx_stamps(stream);
        let builder = {
            let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new());
            b
        };
        let io: Box<dyn UpstreamIo> = match &self.tls {
            None => Box::new(stream),
            Some(tls) => {
                // The endpoint's certificate names its IP.
                let ssl = tls
                    .configure()
                    .and_then(|c| c.into_ssl(&endpoint.ip().to_string()))
                    .map_err(io::Error::other)?;
                let mut tls =
                    tokio_openssl::SslStream::new(ssl, stream).map_err(io::Error::other)?;
                std::pin::Pin::new(&mut tls)
                    .connect()
                    .await
                    .map_err(io::Error::other)?;
                Box::new(tls)
            }
        };
        let (send, conn) = builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(drive(endpoint, conn));
        Ok(H2Conn { send, clock, local })
    }
}

/// Runs a connection until it closes.
async fn drive(endpoint: SocketAddr, conn: impl std::future::Future<Output = hyper::Result<()>>) {
    if let Err(e) = conn.await {
        tracing::debug!("HTTP/2 connection to {endpoint}: {e}");
    }
}
