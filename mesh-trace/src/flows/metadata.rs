//! Who a socket belongs to: pods by network namespace and IP, services by
//! virtual IP. The lab provides this from its topology; on Kubernetes nodes
//! the API server does ([`super::kubernetes`]).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::lab_topology::LabTopology;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// The workload (Deployment, StatefulSet, ...; the `app` label in the
    /// lab): what metrics use as source_workload.
    pub workload: String,
    /// The `app` label.
    pub app: String,
    pub version: String,
    pub ip: IpAddr,
    /// Whether traffic is intercepted by a sidecar.
    pub sidecar: bool,
    /// The service whose endpoint this pod is, if any.
    pub service: Option<String>,
}

/// Lookups the flow table needs. Implementations must be cheap: they run
/// for every new socket.
pub trait Metadata: Send + Sync {
    fn pod_by_netns(&self, netns_cookie: u64) -> Option<Arc<Pod>>;
    fn pod_by_ip(&self, ip: IpAddr) -> Option<Arc<Pod>>;
    /// The service a virtual IP and port belong to.
    fn service_by_vip(&self, addr: SocketAddr) -> Option<String>;
    /// The Kubernetes namespace of a service, by the name
    /// [`Metadata::service_by_vip`] gives it.
    fn service_namespace(&self, _service: &str) -> Option<String> {
        None
    }
    /// Namespace cookies of pods with a sidecar, whose traffic is captured.
    fn meshed_netns(&self) -> Vec<u64> {
        Vec::new()
    }
    /// Pods and services held now.
    fn counts(&self) -> (usize, usize) {
        (0, 0)
    }
    /// Whether the source has its first complete view (for /readyz).
    fn synced(&self) -> bool {
        true
    }
    /// Looks at the network namespaces under `netns_dir` again (called
    /// every few seconds): sources that find pods by namespace do it here.
    fn refresh(&self, _netns_dir: &Path) {}
}

/// No metadata: everything is "unknown".
pub struct NoMetadata;

impl Metadata for NoMetadata {
    fn pod_by_netns(&self, _: u64) -> Option<Arc<Pod>> {
        None
    }
    fn pod_by_ip(&self, _: IpAddr) -> Option<Arc<Pod>> {
        None
    }
    fn service_by_vip(&self, _: SocketAddr) -> Option<String> {
        None
    }
}

/// What a running lab writes to `<lab dir>/lab.json` for the agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabManifest {
    pub topology: LabTopology,
    /// Pod name -> network namespace name (under /var/run/netns).
    pub netns: HashMap<String, String>,
    /// The lab's nodes (one unless it was started with several).
    #[serde(default)]
    pub nodes: Vec<LabNode>,
    /// Pod name -> the name of the node it runs on.
    #[serde(default)]
    pub pod_nodes: HashMap<String, String>,
}

/// One node of a lab: on one kernel, a node is the set of its pods'
/// processes (a cgroup, which their sockets keep) and of their network
/// namespaces (a directory naming them). An agent scoped to those traces
/// what a node's agent would.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabNode {
    pub name: String,
    /// The cgroup v2 directory of its pods' processes; None when the lab
    /// has one node, whose processes stay in the lab's own cgroup.
    pub cgroup: Option<std::path::PathBuf>,
    /// A directory of links to its pods' network namespaces.
    pub netns_dir: std::path::PathBuf,
}

impl LabManifest {
    pub const FILE: &'static str = "lab.json";

    pub fn load(lab_dir: &Path) -> anyhow::Result<LabManifest> {
        let path = lab_dir.join(Self::FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (is the lab up?)", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The node named `name`, or an error naming the lab's nodes.
    pub fn node(&self, name: &str) -> anyhow::Result<&LabNode> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            format!(
                "the lab has no node {name:?} (its nodes: {})",
                names.join(", ")
            )
        })
    }
}

/// Metadata from a lab's topology, with each pod's namespace cookie found by
/// asking a socket created inside it.
pub struct LabMetadata {
    namespace: String,
    /// Service names, for [`Metadata::service_namespace`] (asked at every
    /// request's start: a set, not a walk over the addresses).
    services: std::collections::HashSet<String>,
    by_netns: HashMap<u64, Arc<Pod>>,
    by_ip: HashMap<IpAddr, Arc<Pod>>,
    vips: HashMap<SocketAddr, String>,
}

impl LabMetadata {
    /// Every pod's address and owner; the network namespaces (whose
    /// traffic is captured) of the pods on `node` only, or of all pods.
    pub fn from_manifest(m: &LabManifest, node: Option<&str>) -> anyhow::Result<LabMetadata> {
        if let Some(node) = node {
            m.node(node)?;
        }
        let on_node =
            |pod: &str| node.is_none_or(|n| m.pod_nodes.get(pod).map(String::as_str) == Some(n));
        let topo = &m.topology;
        let mut by_netns = HashMap::new();
        let mut by_ip = HashMap::new();
        for spec in &topo.pods {
            let service = topo
                .services
                .iter()
                .find(|s| s.app == spec.app)
                .map(|s| s.name.clone());
            let pod = Arc::new(Pod {
                namespace: topo.namespace.clone(),
                name: spec.name.clone(),
                workload: spec.app.clone(),
                app: spec.app.clone(),
                version: spec.version.clone(),
                ip: spec.ip.into(),
                sidecar: spec.sidecar,
                service,
            });
            by_ip.insert(pod.ip, pod.clone());
            if let Some(ns) = m.netns.get(&spec.name).filter(|_| on_node(&spec.name)) {
                let cookie = netns_cookie_of(ns)
                    .with_context(|| format!("network namespace of pod {}", spec.name))?;
                by_netns.insert(cookie, pod);
            }
        }
        let vips = topo
            .services
            .iter()
            .map(|s| (SocketAddr::new(s.vip.into(), s.port), s.name.clone()))
            .collect();
        Ok(LabMetadata {
            namespace: topo.namespace.clone(),
            services: topo.services.iter().map(|s| s.name.clone()).collect(),
            by_netns,
            by_ip,
            vips,
        })
    }
}

impl Metadata for LabMetadata {
    fn pod_by_netns(&self, netns_cookie: u64) -> Option<Arc<Pod>> {
        self.by_netns.get(&netns_cookie).cloned()
    }
    fn pod_by_ip(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        self.by_ip.get(&ip).cloned()
    }
    fn service_by_vip(&self, addr: SocketAddr) -> Option<String> {
        self.vips.get(&addr).cloned()
    }
    fn service_namespace(&self, service: &str) -> Option<String> {
        self.services
            .contains(service)
            .then(|| self.namespace.clone())
    }
    fn counts(&self) -> (usize, usize) {
        let services: std::collections::HashSet<&String> = self.vips.values().collect();
        (self.by_ip.len(), services.len())
    }
    fn meshed_netns(&self) -> Vec<u64> {
        self.by_netns
            .iter()
            .filter(|(_, p)| p.sidecar)
            .map(|(&c, _)| c)
            .collect()
    }
}

/// The namespace cookie of a named network namespace.
pub fn netns_cookie_of(name: &str) -> anyhow::Result<u64> {
    netns_cookie_at(&crate::netns::NetNs::existing(name).path())
}

/// The namespace cookie of the network namespace at `path` (a bind mount
/// under /var/run/netns or /proc/PID/ns/net): a socket made inside says.
pub fn netns_cookie_at(path: &Path) -> anyhow::Result<u64> {
    crate::netns::in_namespace(path, || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        crate::netns::netns_cookie(&sock).context("SO_NETNS_COOKIE")
    })
}
