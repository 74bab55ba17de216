//! Mutual TLS between sidecars, on the proxy's side: the connector that
//! speaks it to mesh endpoints (`clusters` pools it). The certificates and
//! the OpenSSL configurations come from `lab::mtls`; the inbound acceptor is
//! made from them in `Proxy::new`, and `listeners` peeks for the handshake.
use anyhow::Context as _;
use hyper_openssl::client::legacy::HttpsConnector;
use openssl::ssl::SslConnectorBuilder;

/// TLS over `tcp` to `https` URIs (mesh endpoints; the server is verified
/// by its IP address, which its certificate names). The plain TCP
/// connector's `HttpInfo` (local and remote address) and clock (the TCP
/// socket's reads and writes, under the encryption) still reach the
/// responses.
pub(super) fn https<C>(tls: SslConnectorBuilder, tcp: C) -> anyhow::Result<HttpsConnector<C>> {
    HttpsConnector::with_connector(tcp, tls).context("the mesh TLS connector")
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        net::{IpAddr, Ipv4Addr, SocketAddr},
        time::Duration,
    };

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };

    use crate::lab::{
        config::Http2,
        mtls::{MeshCa, SidecarTls, CA_FILE},
        proxy::tests::{exchange, http_server, test_workload, TestCerts, TestProxy},
        records::{Direction, ProxyRecord},
    };

    /// Sends `request` over TLS with `tls`'s client certificate and reads
    /// until the server closes; the error if the server refuses us.
    async fn tls_exchange(to: SocketAddr, tls: SidecarTls, request: &str) -> io::Result<String> {
        let ssl = tls
            .client
            .build()
            .configure()
            .and_then(|c| c.into_ssl(&to.ip().to_string()))
            .map_err(io::Error::other)?;
        let tcp = TcpStream::connect(to).await?;
        let mut s = tokio_openssl::SslStream::new(ssl, tcp).map_err(io::Error::other)?;
        std::pin::Pin::new(&mut s)
            .connect()
            .await
            .map_err(io::Error::other)?;
        s.write_all(request.as_bytes()).await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn mutual_tls_between_sidecars_with_permissive_inbound() {
        let certs = TestCerts::new();
        let app = http_server(200, Duration::ZERO).await;
        let proxy = TestProxy::to_app(app, Some(certs.dir.clone()), Http2::Off).await;
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
        refused.expect_err("a foreign certificate was served");

        let records = proxy.finish().await;
        assert_mtls_records(&records);
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
