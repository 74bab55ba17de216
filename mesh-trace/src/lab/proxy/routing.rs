//! What the proxy does with one HTTP request: the route table's answer
//! (listener by port, virtual host by Host or VIP:port, route by path, one
//! of weighted clusters) or a reply of its own, and the request id it
//! ensures.
use std::{net::SocketAddr, sync::Arc};

use hyper::{
    body::Incoming,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    http::request::Parts,
    Request, Response, StatusCode, Uri,
};
use rand::Rng;

use super::{
    admin::Downstream,
    clusters::{Upstream, UpstreamStream},
    listeners::Conn,
    local_reply, Proxy, ProxyBody,
};
use crate::lab::{
    config::{
        OutboundTrafficPolicy, ProxyConfig, RetryPolicy, RouteAction, WeightedCluster,
        BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER,
    },
    ioclock::IoClock,
    records::{mono_ns, Direction, ProxyRecord},
};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const PEER_METADATA_ID: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");
const PEER_METADATA: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");

/// The peer metadata a sidecar sends other sidecars, as Istio's Envoy
/// does: its node id, and its labels as base64 (here filler of the size
/// asked for).
pub(super) struct PeerMetadata {
    id: HeaderValue,
    labels: HeaderValue,
}

impl PeerMetadata {
    /// `bytes` of metadata for `pod`'s sidecar; None for 0.
    pub(super) fn of(pod: &str, bytes: usize) -> Option<PeerMetadata> {
        if bytes == 0 {
            return None;
        }
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let labels: String = (0..bytes)
            .map(|i| char::from(B64[(i * 7 + pod.len()) % B64.len()]))
            .collect();
        Some(PeerMetadata {
            id: HeaderValue::from_str(&format!(
                "sidecar~10.0.0.1~{pod}.default~default.svc.cluster.local"
            ))
            .ok()?,
            labels: HeaderValue::from_str(&labels).ok()?,
        })
    }

    /// Puts both lines before every other line of `headers`.
    pub(super) fn put_first(&self, headers: &mut HeaderMap) {
        let rest = std::mem::take(headers);
        headers.insert(PEER_METADATA_ID, self.id.clone());
        headers.insert(PEER_METADATA, self.labels.clone());
        let mut last = None;
        for (name, value) in rest {
            // `None`: another value of the name before.
            if let Some(n) = name {
                last = Some(n);
            }
            if let Some(n) = &last {
                headers.append(n.clone(), value);
            }
        }
    }
}

impl Proxy {
    /// One downstream request: route, forward, answer, write the record
    /// (once the response is written).
    ///
    /// `h2` is the request's HTTP/2 stream and the read that brought its
    /// HEADERS frame, when it came over HTTP/2 in plaintext.
    pub(super) async fn http(
        self: Arc<Self>,
        conn: Conn,
        clock: &Arc<IoClock>,
        h2: Option<(u32, u64)>,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let entered = mono_ns();
        let mut rec = self.record(&conn, "http");
        // hyper calls us once the head is parsed: its last read completed it.
        rec.t_downstream_read_ns = match h2 {
            Some((_, read)) => read,
            None => clock.last_read_until(entered).unwrap_or(entered),
        };
        let (mut parts, body) = req.into_parts();
        rec.method = Some(parts.method.to_string());
        rec.path = Some(request_path(&parts.uri).to_owned());
        rec.host = host_header(&parts.headers).map(str::to_owned);
        rec.request_id = Some(ensure_request_id(&mut parts.headers));
        let (response, upstream) = match conn.direction {
            Direction::Outbound => self.outbound_http(&conn, &mut rec, parts, body).await,
            Direction::Inbound => self.inbound_http(&conn, &mut rec, parts, body).await,
        };
        rec.status = response.status().as_u16();
        let downstream = Downstream {
            clock: Arc::clone(clock),
            stream: h2.map(|(stream, _)| stream),
        };
        self.record_when_written(rec, downstream, upstream);
        response
    }

    async fn outbound_http(
        &self,
        conn: &Conn,
        rec: &mut ProxyRecord,
        mut parts: Parts,
        body: Incoming,
    ) -> (Response<ProxyBody>, Option<UpstreamStream>) {
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
            Action::Reply(status, text) => return (local_reply(status, text), None),
        };
        if let (true, Some(m)) = (mesh, &self.peer_metadata) {
            m.put_first(&mut parts.headers);
        }
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
        mut parts: Parts,
        body: Incoming,
    ) -> (Response<ProxyBody>, Option<UpstreamStream>) {
        // Istio's inbound sidecar keeps its peer's metadata to itself.
        parts.headers.remove(PEER_METADATA_ID);
        parts.headers.remove(PEER_METADATA);
        let port = conn.original_dst.port();
        rec.route = format!("inbound|http|{port}");
        rec.cluster = format!("inbound|{port}||");
        let upstream = Upstream {
            client: self.inbound_client(),
            endpoints: &[conn.original_dst],
            retry: None,
            delay: self.delay_inbound,
        };
        upstream.forward(rec, parts, body).await
    }
}

/// The request-target Envoy matches route prefixes against (`:path`).
fn request_path(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

pub(super) fn host_header(headers: &HeaderMap) -> Option<&str> {
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

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, SeedableRng as _};

    use super::*;
    use crate::lab::{config::BOOKINFO_PROXY, proxy::tests::addr};

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
    fn peer_metadata_goes_before_the_request_s_own_lines() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("reviews:9080"));
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        let m = PeerMetadata::of("productpage-v1", 1200).unwrap();
        m.put_first(&mut headers);
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "x-envoy-peer-metadata-id",
                "x-envoy-peer-metadata",
                "host",
                "x-request-id",
                "cookie",
                "cookie"
            ]
        );
        assert_eq!(headers[&PEER_METADATA].len(), 1200);
        assert!(PeerMetadata::of("p", 0).is_none());
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
}
