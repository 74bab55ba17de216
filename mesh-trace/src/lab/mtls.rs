//! Mutual TLS between the lab's sidecars, as Istio's ISTIO_MUTUAL: a mesh CA
//! made when a lab starts (istiod's role) issues every sidecar pod a
//! certificate naming its SPIFFE identity and its pod IP. Sidecars present it
//! to each other and trust nothing but the mesh CA. Nothing is shipped: each
//! lab makes a new CA and new keys.
//!
//! The certificate directory (`mesh-trace lab proxy --mtls-dir DIR`) holds:
//! - `ca.pem`: the mesh CA certificate, the only trust anchor;
//! - `<pod>.pem`: the pod's certificate (the leaf alone; the peer has the CA);
//! - `<pod>-key.pem`: its private key (PKCS#8), mode 0600.
use std::{
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
    sync::Arc,
};

use anyhow::Context as _;
use openssl::{
    pkey::PKey,
    ssl::{
        SslAcceptor, SslConnector, SslConnectorBuilder, SslContextBuilder, SslMethod,
        SslVerifyMode, SslVersion,
    },
    x509::{store::X509StoreBuilder, X509},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The mesh CA certificate in the certificate directory.
pub const CA_FILE: &str = "ca.pem";

/// The pod's certificate in the certificate directory.
pub fn cert_file(pod: &str) -> String {
    format!("{pod}.pem")
}

/// The pod's private key in the certificate directory.
pub fn key_file(pod: &str) -> String {
    format!("{pod}-key.pem")
}

/// Istio's workload identity: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
pub fn spiffe_id(namespace: &str, service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/{namespace}/sa/{service_account}")
}

/// Who a certificate is issued to.
#[derive(Clone, Debug)]
pub struct Workload<'a> {
    pub pod: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// The pod IP: peers connect to endpoint IPs and verify the server by it.
    pub ip: IpAddr,
}

/// A PEM certificate and its PEM private key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The mesh's certificate authority, held in memory for the lab's start-up.
pub struct MeshCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl MeshCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<MeshCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().context("generating the CA key")?;
        let cert = params.self_signed(&key).context("signing the CA")?;
        Ok(MeshCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `w`, good for both ends of a mutual TLS connection
    /// (a sidecar is the client outbound and the server inbound).
    pub fn issue(&self, w: &Workload) -> anyhow::Result<Issued> {
        let spiffe = spiffe_id(w.namespace, w.service_account);
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, w.pod);
        params.subject_alt_names = vec![
            SanType::URI(spiffe.as_str().try_into().context("SPIFFE id as a URI")?),
            SanType::IpAddress(w.ip),
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generating a workload key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate of {}", w.pod))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem` into `dir`.
    pub fn write_ca(&self, dir: &Path) -> anyhow::Result<()> {
        write_file(&dir.join(CA_FILE), self.cert_pem.as_bytes(), 0o644)
    }

    /// Issues `w`'s certificate and writes `<pod>.pem` and `<pod>-key.pem` into `dir`.
    pub fn write_workload(&self, dir: &Path, w: &Workload) -> anyhow::Result<()> {
        let issued = self.issue(w)?;
        write_file(
            &dir.join(cert_file(w.pod)),
            issued.cert_pem.as_bytes(),
            0o644,
        )?;
        write_file(&dir.join(key_file(w.pod)), issued.key_pem.as_bytes(), 0o600)
    }
}

/// Writes a key (or a file holding one) readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_file(path, bytes, 0o600)
}

/// Writes `bytes` to `path` with `mode`, which applies from creation on so a
/// key is never readable by others, not even for a moment.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)?;
        // An existing file keeps its old mode through open().
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// One sidecar's TLS settings (OpenSSL): the client side for mesh
/// upstreams, the server side for the inbound listener. Both demand a peer
/// certificate from the mesh CA; TLS 1.3 only, as Istio's sidecars
/// negotiate between themselves.
pub struct SidecarTls {
    pub client: SslConnectorBuilder,
    pub server: Arc<SslAcceptor>,
}

impl SidecarTls {
    /// Reads `ca.pem`, `<pod>.pem` and `<pod>-key.pem` from `dir`.
    pub fn load(dir: &Path, pod: &str) -> anyhow::Result<SidecarTls> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read(&path).with_context(|| format!("reading {}", path.display()))
        };
        let (ca, cert, key) = (
            read(CA_FILE)?,
            read(&cert_file(pod))?,
            read(&key_file(pod))?,
        );
        SidecarTls::from_pem(&ca, &cert, &key)
            .with_context(|| format!("TLS files in {}", dir.display()))
    }

    /// From PEM text: the CA certificate(s) to trust, this pod's certificate
    /// chain and its private key.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> anyhow::Result<SidecarTls> {
        let roots = certificates(ca).context("the CA file")?;
        let chain = certificates(cert)?;
        let key = PKey::private_key_from_pem(key).context("reading the private key")?;
        // Both sides trust the mesh CA alone and present this pod's chain.
        let identify = |ctx: &mut SslContextBuilder, side: &str| -> anyhow::Result<()> {
            let mut store = X509StoreBuilder::new()?;
            for c in &roots {
                store.add_cert(c.clone()).context("adding the mesh CA")?;
            }
            ctx.set_cert_store(store.build());
            ctx.set_certificate(&chain[0])?;
            for c in &chain[1..] {
                ctx.add_extra_chain_cert(c.clone())?;
            }
            ctx.set_private_key(&key)?;
            ctx.check_private_key()
                .with_context(|| format!("the {side} certificate and key"))
        };

        let mut client = SslConnector::builder(SslMethod::tls_client())?;
        client.set_min_proto_version(Some(SslVersion::TLS1_3))?;
        identify(&mut client, "client")?;

        let mut server = SslAcceptor::mozilla_modern_v5(SslMethod::tls_server())?;
        identify(&mut server, "server")?;
        // Mandatory client certificates: the "mutual" in mTLS.
        server.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        // Sidecar connections are long-lived and pooled: resumption buys
        // nothing. (A tracer with the TLS probes tells tickets from
        // responses; one without them could not.)
        server.set_num_tickets(0)?;
        // ALPN as Istio's sidecars negotiate it: h2 when the client offers
        // it (sidecars upgrading to HTTP/2), else HTTP/1.1. The server
        // tells the two apart by the preface all the same.
        server.set_alpn_select_callback(|_, offered| {
            openssl::ssl::select_next_proto(b"\x02h2\x08http/1.1", offered)
                .ok_or(openssl::ssl::AlpnError::NOACK)
        });
        Ok(SidecarTls {
            client,
            server: Arc::new(server.build()),
        })
    }
}

fn certificates(pem: &[u8]) -> anyhow::Result<Vec<X509>> {
    let certs = X509::stack_from_pem(pem).context("reading PEM certificates")?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the PEM text");
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(pod: &'static str, ip: &str) -> Workload<'static> {
        Workload {
            pod,
            namespace: "bookinfo",
            service_account: "reviews",
            ip: ip.parse().expect("ip"),
        }
    }

    #[test]
    fn files_are_written_and_load_back() {
        let dir = std::env::temp_dir().join(format!("mtls-test-{}", uuid::Uuid::new_v4()));
        fs::create_dir(&dir).expect("temp dir");
        let ca = MeshCa::new("test mesh CA").expect("CA");
        ca.write_ca(&dir).expect("ca.pem");
        ca.write_workload(&dir, &workload("reviews-v1", "10.244.0.21"))
            .expect("workload files");
        let key_mode = fs::metadata(dir.join("reviews-v1-key.pem"))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        assert!(SidecarTls::load(&dir, "reviews-v1").is_ok());
        assert!(SidecarTls::load(&dir, "ratings-v1").is_err(), "no such pod");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn certificates_name_the_spiffe_id_and_ip() {
        let ca = MeshCa::new("test mesh CA").expect("CA");
        let issued = ca
            .issue(&workload("reviews-v1", "10.244.0.21"))
            .expect("issue");
        let der = certificates(issued.cert_pem.as_bytes()).expect("pem")[0]
            .to_der()
            .expect("der");
        // In DER a SAN is its tag, its length and its bytes: [6] URI, [7] IP address.
        let raw = der.as_slice();
        let has = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
        let uri = b"spiffe://cluster.local/ns/bookinfo/sa/reviews";
        assert!(has(&[&[0x86, uri.len() as u8][..], uri].concat()));
        assert!(has(&[0x87, 4, 10, 244, 0, 21]));
    }
}
