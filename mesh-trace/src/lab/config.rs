//! The lab's two configuration files, both shipped in `mesh-trace/lab/`:
//!
//! - the topology ([`LabTopology`]): pods, their IPs, apps and sidecars, and
//!   services with their virtual IPs (what Kubernetes would hold);
//! - the sidecar configuration ([`ProxyConfig`]): listeners, Envoy-shaped
//!   RouteConfiguration and clusters, as `istioctl proxy-config` shows them
//!   (what istiod would push). Unknown Envoy fields are accepted and ignored.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// What a sidecar does with a destination it has no listener or route for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[clap(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficPolicy {
    /// PassthroughCluster: connect to the original destination.
    #[default]
    AllowAny,
    /// BlackHoleCluster: no upstream connection; 502 for HTTP, close for TCP.
    RegistryOnly,
}

/// Where the sidecars speak HTTP/2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Http2 {
    /// HTTP/1.1 everywhere.
    #[default]
    Off,
    /// Between sidecars only; the apps' legs stay HTTP/1.1.
    BetweenSidecars,
    /// Between sidecars and to the apps (which then serve HTTP/2, gRPC
    /// among it); apps may send either.
    EndToEnd,
}

// The topology's types are the agent's too (`--lab DIR` reads them).
pub use crate::flows::lab_topology::{LabTopology, PodSpec, ServiceSpec};

// ---------------------------------------------------------- sidecar config

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProxyConfig {
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// Outbound listeners by port, like `0.0.0.0_9080` (bind_to_port false:
    /// reached through the VirtualOutbound listener on 15001).
    pub listeners: Vec<Listener>,
    pub route_configs: Vec<RouteConfiguration>,
    pub clusters: Vec<Cluster>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Listener {
    pub name: String,
    pub port: u16,
    /// Name of the RouteConfiguration for HTTP on this port.
    pub route_config_name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouteConfiguration {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtualHost {
    pub name: String,
    /// Host header values (with and without port) and VIPs; "*" matches all.
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Route {
    #[serde(rename = "match")]
    pub match_: RouteMatch,
    pub route: RouteAction,
    #[serde(default)]
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouteMatch {
    pub prefix: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouteAction {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub weighted_clusters: Option<WeightedClusters>,
    #[serde(default)]
    pub retry_policy: Option<RetryPolicy>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WeightedClusters {
    pub clusters: Vec<WeightedCluster>,
    #[serde(default)]
    pub total_weight: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Comma-separated conditions, e.g. "connect-failure,retriable-status-codes".
    pub retry_on: String,
    pub num_retries: u32,
    #[serde(default)]
    pub retriable_status_codes: Vec<u16>,
}

impl RetryPolicy {
    pub fn on(&self, condition: &str) -> bool {
        self.retry_on.split(',').any(|c| c.trim() == condition)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cluster {
    pub name: String,
    /// "EDS", "STATIC" or "ORIGINAL_DST".
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub load_assignment: Option<LoadAssignment>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadAssignment {
    pub endpoints: Vec<LocalityEndpoints>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalityEndpoints {
    pub lb_endpoints: Vec<LbEndpoint>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LbEndpoint {
    pub endpoint: Endpoint,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Endpoint {
    pub address: Address,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Address {
    pub socket_address: SocketAddress,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SocketAddress {
    pub address: Ipv4Addr,
    pub port_value: u16,
}

pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

impl Cluster {
    /// Whether the endpoints are sidecar pods of the mesh: Istio gives EDS
    /// clusters (services of the registry) ISTIO_MUTUAL TLS when mTLS is on,
    /// while ORIGINAL_DST and STATIC ones lead out of the mesh.
    pub fn is_mesh(&self) -> bool {
        self.kind == "EDS"
    }

    /// The cluster's endpoint addresses (empty for ORIGINAL_DST and BlackHole).
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.load_assignment
            .iter()
            .flat_map(|la| &la.endpoints)
            .flat_map(|le| &le.lb_endpoints)
            .map(|lb| {
                let sa = &lb.endpoint.address.socket_address;
                SocketAddr::new(sa.address.into(), sa.port_value)
            })
            .collect()
    }
}

impl ProxyConfig {
    pub fn parse(text: &str) -> anyhow::Result<ProxyConfig> {
        let cfg: ProxyConfig =
            serde_json::from_str(text).context("parsing the sidecar configuration")?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> anyhow::Result<ProxyConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| path.display().to_string())
    }

    /// Every name referenced exists.
    pub fn validate(&self) -> anyhow::Result<()> {
        for l in &self.listeners {
            anyhow::ensure!(
                self.route_config(&l.route_config_name).is_some(),
                "listener {} names unknown route configuration {}",
                l.name,
                l.route_config_name
            );
        }
        for rc in &self.route_configs {
            for vh in &rc.virtual_hosts {
                for r in &vh.routes {
                    let names: Vec<&str> = match (&r.route.cluster, &r.route.weighted_clusters) {
                        (Some(c), _) => vec![c.as_str()],
                        (None, Some(w)) => w.clusters.iter().map(|c| c.name.as_str()).collect(),
                        (None, None) => {
                            anyhow::bail!("route {} in {} has no cluster", r.name, vh.name)
                        }
                    };
                    for n in names {
                        anyhow::ensure!(
                            self.cluster(n).is_some(),
                            "virtual host {} routes to unknown cluster {n}",
                            vh.name
                        );
                    }
                }
            }
        }
        Ok(())
    }

    pub fn listener(&self, port: u16) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.port == port)
    }

    pub fn route_config(&self, name: &str) -> Option<&RouteConfiguration> {
        self.route_configs.iter().find(|r| r.name == name)
    }

    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

impl RouteConfiguration {
    /// The virtual host for a Host header (or "VIP:port" when there is none):
    /// exact domain first, then "*", as Envoy does for these domain lists.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        self.virtual_hosts
            .iter()
            .find(|vh| vh.domains.iter().any(|d| d.eq_ignore_ascii_case(host)))
            .or_else(|| {
                self.virtual_hosts
                    .iter()
                    .find(|vh| vh.domains.iter().any(|d| d == "*"))
            })
    }
}

impl VirtualHost {
    /// The first route whose prefix matches the path.
    pub fn route(&self, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| path.starts_with(&r.match_.prefix))
    }
}

/// The Bookinfo lab shipped with mesh-trace.
pub const BOOKINFO_TOPOLOGY: &str = include_str!("../../lab/bookinfo-topology.json");
pub const BOOKINFO_PROXY: &str = include_str!("../../lab/bookinfo-envoy.json");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_parse_and_agree() {
        let topo = LabTopology::parse(BOOKINFO_TOPOLOGY).unwrap();
        let proxy = ProxyConfig::parse(BOOKINFO_PROXY).unwrap();
        // Every service VIP is a domain of a virtual host, with and without port.
        let rc = proxy.route_config("9080").unwrap();
        for s in &topo.services {
            let vip = s.vip.to_string();
            let vh = rc.virtual_host(&vip).unwrap();
            assert_ne!(vh.name, "allow_any", "{vip}");
            assert_eq!(
                rc.virtual_host(&format!("{vip}:{}", s.port)).unwrap().name,
                vh.name
            );
            assert_eq!(
                rc.virtual_host(&format!("{}:{}", s.name, s.port))
                    .unwrap()
                    .name,
                vh.name
            );
        }
        // Every endpoint is a pod of the topology on its port.
        for c in &proxy.clusters {
            for ep in c.endpoints() {
                assert!(
                    topo.pods
                        .iter()
                        .any(|p| SocketAddr::new(p.ip.into(), p.port) == ep),
                    "{} endpoint {ep} is no pod",
                    c.name
                );
            }
        }
    }

    #[test]
    fn reviews_is_weighted_10_40_50_with_retries() {
        let proxy = ProxyConfig::parse(BOOKINFO_PROXY).unwrap();
        let vh = proxy
            .route_config("9080")
            .unwrap()
            .virtual_host("reviews")
            .unwrap();
        let route = &vh.route("/reviews/0").unwrap().route;
        let weights: Vec<u32> = route
            .weighted_clusters
            .as_ref()
            .unwrap()
            .clusters
            .iter()
            .map(|c| c.weight)
            .collect();
        assert_eq!(weights, vec![10, 40, 50]);
        let retry = route.retry_policy.as_ref().unwrap();
        assert_eq!(retry.num_retries, 2);
        assert!(retry.on("connect-failure") && retry.on("retriable-status-codes"));
        assert_eq!(retry.retriable_status_codes, vec![503]);
    }

    #[test]
    fn unknown_host_falls_to_allow_any() {
        let proxy = ProxyConfig::parse(BOOKINFO_PROXY).unwrap();
        let rc = proxy.route_config("9080").unwrap();
        assert_eq!(rc.virtual_host("example.com").unwrap().name, "allow_any");
    }
}
