//! A lab's pods and services: the topology file a running lab writes for
//! the agent (`mesh-trace run --lab DIR`), what Kubernetes would hold. Part
//! of the agent, so a node without the lab can still read one.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabTopology {
    /// Kubernetes namespace the pods and services pretend to live in.
    pub namespace: String,
    /// The node bridge's address and prefix, e.g. "10.244.0.1/24".
    pub bridge_cidr: String,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    /// Pod name, e.g. "reviews-v2".
    pub name: String,
    /// The `app` label (the workload), e.g. "reviews".
    pub app: String,
    /// The `version` label.
    #[serde(default)]
    pub version: String,
    pub ip: Ipv4Addr,
    /// Whether the pod has a sidecar (and the istio-iptables rules).
    pub sidecar: bool,
    /// Port the app listens on; 0 for a client-only pod (the load generator's).
    #[serde(default)]
    pub port: u16,
    /// Milliseconds of work per request.
    #[serde(default)]
    pub service_time_ms: f64,
    /// URLs the app calls, in order, for each request it serves.
    #[serde(default)]
    pub calls: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    /// Pods whose `app` label equals this are the endpoints.
    pub app: String,
}

impl LabTopology {
    pub fn parse(text: &str) -> anyhow::Result<LabTopology> {
        serde_json::from_str(text).context("parsing the lab topology")
    }

    pub fn load(path: &Path) -> anyhow::Result<LabTopology> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| path.display().to_string())
    }

    pub fn pod(&self, name: &str) -> Option<&PodSpec> {
        self.pods.iter().find(|p| p.name == name)
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name == name)
    }

    /// `name:port` -> VIP:port, what cluster DNS would answer for apps.
    pub fn service_addresses(&self) -> BTreeMap<String, SocketAddr> {
        self.services
            .iter()
            .map(|s| {
                (
                    format!("{}:{}", s.name, s.port),
                    SocketAddr::new(s.vip.into(), s.port),
                )
            })
            .collect()
    }
}
