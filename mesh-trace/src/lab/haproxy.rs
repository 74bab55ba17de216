//! A third-party sidecar: HAProxy from Debian's packages in the Istio port
//! layout, in place of the lab's own proxy, so the tests see a proxy no one
//! here wrote: its own worker threads, its own connection pooling and
//! reuse, no `x-request-id` of its own unless asked, and replies of its own
//! (403 for denied paths).
//!
//! With [`Http2::BetweenSidecars`], sidecars talk HTTP/2 to each other
//! (cleartext, prior knowledge; ALPN under TLS) while the apps speak
//! HTTP/1.1, as Istio's `h2UpgradePolicy: UPGRADE` has Envoy do. With
//! [`Http2::EndToEnd`], the inbound sidecar speaks HTTP/2 to its app as well
//! and the outbound one takes it from its app (detected by the preface), the
//! path gRPC takes.
//!
//! With mutual TLS (`--mtls`), sidecars talk TLS to each other through
//! OpenSSL (Debian's libssl), which is how the TLS plaintext probes are
//! tested on a proxy no one here wrote.
//!
//! Per pod: 15001 routes by `Host` to the service's endpoints (pod IPs,
//! round robin), 15006 hands requests to the local app from 127.0.0.6, as
//! Istio's inbound cluster does. HAProxy runs as uid 1337 like any sidecar,
//! so the pod's istio-iptables rules leave its own connections alone.
use std::{fmt::Write as _, path::PathBuf};

use super::config::{Http2, LabTopology, PodSpec};

/// Where Debian installs it (package `haproxy`).
pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// Requests whose path starts with this are answered 403 by the outbound
/// sidecar itself (an RBAC-style local reply).
pub const DENIED_PREFIX: &str = "/denied";

/// How the sidecars treat `x-request-id`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RequestIds {
    /// Forwarded as received; none added.
    #[default]
    Untouched,
    /// The outbound sidecar adds one upstream when the app sent none, as
    /// Envoy does.
    AddedUpstream,
}

/// Mutual TLS between HAProxy sidecars (OpenSSL, from Debian's
/// packages): each presents its pod's certificate and trusts only the
/// mesh CA, like the lab's own sidecars.
#[derive(Clone, Debug)]
pub struct SidecarTls {
    /// The pod's certificate followed by its key, as HAProxy's `crt` wants.
    pub bundle: PathBuf,
    /// The mesh CA certificate.
    pub ca: PathBuf,
}

impl SidecarTls {
    fn options(&self) -> String {
        format!(
            "ssl crt {} ca-file {} verify required",
            self.bundle.display(),
            self.ca.display()
        )
    }
}

/// The configuration of `pod`'s sidecar.
pub fn config(
    topology: &LabTopology,
    pod: &PodSpec,
    ids: RequestIds,
    threads: u32,
    tls: Option<&SidecarTls>,
    http2: Http2,
) -> String {
    // Between sidecars only: passthrough and the local app stay plaintext
    // HTTP/1.1.
    let mut mesh_tls = tls.map(|t| format!(" {}", t.options())).unwrap_or_default();
    if http2 != Http2::Off {
        mesh_tls.push_str(if tls.is_some() {
            " alpn h2"
        } else {
            " proto h2"
        });
    }
    let mut c = String::new();
    let _ = writeln!(
        c,
        "global\n    nbthread {threads}\n    maxconn 4096\n\n\
         defaults\n    mode http\n    option http-keep-alive\n    http-reuse always\n    \
         timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n    \
         timeout http-keep-alive 60s\n"
    );
    let _ = writeln!(c, "frontend outbound\n    bind 0.0.0.0:15001");
    let _ = writeln!(
        c,
        "    http-request deny deny_status 403 if {{ path_beg {DENIED_PREFIX} }}"
    );
    if ids == RequestIds::AddedUpstream {
        let _ = writeln!(
            c,
            "    http-request set-header x-request-id %[uuid()] unless {{ req.hdr(x-request-id) -m found }}"
        );
    }
    for s in &topology.services {
        let _ = writeln!(
            c,
            "    use_backend svc_{name} if {{ req.hdr(host),field(1,:) -i {name} }}",
            name = s.name
        );
    }
    let _ = writeln!(c, "    default_backend passthrough\n");
    for s in &topology.services {
        let _ = writeln!(c, "backend svc_{}\n    balance roundrobin", s.name);
        for p in topology
            .pods
            .iter()
            .filter(|p| p.app == s.app && p.port != 0)
        {
            let _ = writeln!(c, "    server {} {}:{}{mesh_tls}", p.name, p.ip, p.port);
        }
        let _ = writeln!(c);
    }
    // The original destination itself (SO_ORIGINAL_DST), as Istio's
    // PassthroughCluster.
    let _ = writeln!(c, "backend passthrough\n    server original 0.0.0.0\n");
    let _ = writeln!(
        c,
        "frontend inbound\n    bind 0.0.0.0:15006{mesh_tls}\n    default_backend local_app\n"
    );
    if pod.port != 0 {
        let to_app = if http2 == Http2::EndToEnd {
            " proto h2"
        } else {
            ""
        };
        let _ = writeln!(
            c,
            "backend local_app\n    server app 127.0.0.1:{} source 127.0.0.6{to_app}",
            pod.port
        );
    } else {
        let _ = writeln!(
            c,
            "backend local_app\n    http-request deny deny_status 503"
        );
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::config::BOOKINFO_TOPOLOGY;

    #[test]
    fn routes_each_service_to_its_pods_and_delivers_from_127_0_0_6() {
        let topo = LabTopology::parse(BOOKINFO_TOPOLOGY).unwrap();
        let reviews = topo.pod("reviews-v2").unwrap();
        let c = config(&topo, reviews, RequestIds::Untouched, 2, None, Http2::Off);
        assert!(c.contains("nbthread 2"));
        assert!(c.contains("bind 0.0.0.0:15001") && c.contains("bind 0.0.0.0:15006"));
        assert!(c.contains("use_backend svc_reviews if { req.hdr(host),field(1,:) -i reviews }"));
        for v in ["reviews-v1", "reviews-v2", "reviews-v3"] {
            let ip = topo.pod(v).unwrap().ip;
            assert!(c.contains(&format!("server {v} {ip}:9080")), "{c}");
        }
        assert!(c.contains("server app 127.0.0.1:9080 source 127.0.0.6"));
        assert!(c.contains("deny_status 403 if { path_beg /denied }"));
        assert!(!c.contains("x-request-id"));
        let with_ids = config(
            &topo,
            reviews,
            RequestIds::AddedUpstream,
            2,
            None,
            Http2::Off,
        );
        assert!(with_ids.contains("set-header x-request-id %[uuid()] unless"));
        assert!(!c.contains("ssl"));
        let tls = SidecarTls {
            bundle: "/lab/reviews-v2.bundle.pem".into(),
            ca: "/lab/ca.pem".into(),
        };
        let mtls = config(
            &topo,
            reviews,
            RequestIds::Untouched,
            2,
            Some(&tls),
            Http2::Off,
        );
        let opts = "ssl crt /lab/reviews-v2.bundle.pem ca-file /lab/ca.pem verify required";
        assert!(
            mtls.contains(&format!("bind 0.0.0.0:15006 {opts}")),
            "{mtls}"
        );
        let ip = topo.pod("reviews-v1").unwrap().ip;
        assert!(
            mtls.contains(&format!("server reviews-v1 {ip}:9080 {opts}")),
            "{mtls}"
        );
        assert!(mtls.contains("bind 0.0.0.0:15001\n"), "{mtls}");
        // HTTP/2 between sidecars only: by prior knowledge in cleartext,
        // by ALPN under TLS; the apps' side stays HTTP/1.1.
        let h2 = config(
            &topo,
            reviews,
            RequestIds::Untouched,
            2,
            None,
            Http2::BetweenSidecars,
        );
        assert!(h2.contains("bind 0.0.0.0:15006 proto h2\n"), "{h2}");
        assert!(
            h2.contains(&format!("server reviews-v1 {ip}:9080 proto h2")),
            "{h2}"
        );
        assert!(h2.contains("bind 0.0.0.0:15001\n") && h2.contains("source 127.0.0.6\n"));
        let h2_tls = config(
            &topo,
            reviews,
            RequestIds::Untouched,
            2,
            Some(&tls),
            Http2::BetweenSidecars,
        );
        assert!(
            h2_tls.contains(&format!("bind 0.0.0.0:15006 {opts} alpn h2")),
            "{h2_tls}"
        );
        assert!(
            mtls.contains("server app 127.0.0.1:9080 source 127.0.0.6\n"),
            "{mtls}"
        );
        // End to end: the app's leg too, inbound; outbound, the preface
        // tells HTTP/2 from HTTP/1.1 on the same port.
        let e2e = config(
            &topo,
            reviews,
            RequestIds::Untouched,
            2,
            None,
            Http2::EndToEnd,
        );
        assert!(e2e.contains("source 127.0.0.6 proto h2\n"), "{e2e}");
        assert!(e2e.contains("bind 0.0.0.0:15001\n"), "{e2e}");
    }
}
