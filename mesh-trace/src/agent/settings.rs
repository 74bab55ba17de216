//! The agent's settings: defaults, the configuration file and flags merged
//! into one value, and the metadata source they name.
use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;

use crate::{
    flows::{
        kubernetes::KubeMetadata,
        metadata::{LabManifest, LabMetadata, Metadata, NoMetadata},
        table::FlowTableConfig,
    },
    kernel::sysfs,
    logging::LogLevel,
};

use super::{config, http::StatsAccess};

/// The agent's settings after merging defaults, the config file and flags.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where to serve /metrics, /healthz and /readyz; None serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    pub log_level: LogLevel,
    pub ring_buffer_bytes: u32,
    pub cgroup: PathBuf,
    pub print_events: bool,
    /// Metadata from a running lab's directory (pods, services).
    pub lab: Option<PathBuf>,
    /// With `lab`: the lab node this agent traces (its pods' traffic only).
    pub lab_node: Option<String>,
    /// Metadata from the Kubernetes API server: this node's name.
    pub kubernetes_node: Option<String>,
    /// Sockets the flow table tracks at once.
    pub max_flows: usize,
    /// Where named network namespaces (pods) are mounted; each is watched
    /// at the NAT step.
    pub netns_dir: PathBuf,
    /// Programs attached but returning at once (benchmark floor).
    pub noop: bool,
    /// Data events go to the ring buffer in per-CPU batches.
    pub batch_events: bool,
    /// Data events one network namespace may send per CPU per second
    /// (0: no limit).
    pub netns_events_per_s: u32,
    /// Bytes captured of a send or receive that begins an HTTP/1.x request.
    pub request_head_bytes: u32,
    /// Uprobes on the TLS libraries of traced processes, for the plaintext
    /// of requests behind mutual TLS.
    pub tls_plaintext: bool,
    /// Who may read the per-request detail of `/api/v1/stats`.
    pub stats_access: StatsAccess,
    /// Where request traces go over OTLP/HTTP, if anywhere.
    pub otlp_endpoint: Option<super::otlp::Endpoint>,
}

pub const DEFAULT_NETNS_DIR: &str = "/var/run/netns";

impl Settings {
    /// Defaults for a command that runs the probes in-process and serves no
    /// HTTP (`flows`, `spans`, `demo`).
    pub fn in_process(lab: Option<PathBuf>) -> anyhow::Result<Settings> {
        Ok(Settings {
            metrics_addr: None,
            log_level: LogLevel::Warn,
            ring_buffer_bytes: config::default_ring_buffer_bytes(),
            cgroup: sysfs::cgroup2_root().context("no cgroup v2 hierarchy mounted")?,
            print_events: false,
            lab,
            lab_node: None,
            kubernetes_node: None,
            max_flows: FlowTableConfig::default().max_sockets,
            netns_dir: DEFAULT_NETNS_DIR.into(),
            noop: false,
            batch_events: true,
            netns_events_per_s: crate::kernel::tracer::DEFAULT_NETNS_EVENTS_PER_S,
            request_head_bytes: crate::kernel::tracer::DEFAULT_HEAD_LEN,
            tls_plaintext: true,
            stats_access: StatsAccess::LoopbackOnly,
            otlp_endpoint: None,
        })
    }

    /// Scopes these settings to one node of the lab they read: its pods'
    /// namespaces, processes (cgroup) and NAT steps.
    pub fn on_lab_node(&mut self, node: &str) -> anyhow::Result<()> {
        let dir = self.lab.as_ref().context("a lab node needs --lab")?;
        let manifest = LabManifest::load(dir)?;
        let n = manifest.node(node)?;
        if let Some(cgroup) = &n.cgroup {
            self.cgroup = cgroup.clone();
        }
        self.netns_dir = n.netns_dir.clone();
        self.lab_node = Some(node.to_string());
        Ok(())
    }

    /// The node this agent runs on, as its traces name it.
    pub fn node_label(&self) -> String {
        self.kubernetes_node
            .clone()
            .or_else(|| self.lab_node.clone())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into())
    }

    /// The metadata source these settings name. A Kubernetes source starts
    /// watching at once and is also returned as itself, for its metrics.
    pub async fn metadata(&self) -> anyhow::Result<(Arc<dyn Metadata>, Option<Arc<KubeMetadata>>)> {
        if let Some(node) = &self.kubernetes_node {
            let kube = KubeMetadata::new(node.clone());
            kube.spawn_watchers(KubeMetadata::client().await?);
            return Ok((kube.clone(), Some(kube)));
        }
        Ok(match &self.lab {
            Some(dir) => (
                Arc::new(LabMetadata::from_manifest(
                    &LabManifest::load(dir)?,
                    self.lab_node.as_deref(),
                )?),
                None,
            ),
            None => (Arc::new(NoMetadata), None),
        })
    }
}
