//! The lab's shape as flags (shared by `lab up` and `demo`), and a table
//! describing a running lab.
use std::collections::BTreeMap;

use anyhow::Context as _;
use clap::Args;

use super::{
    config::{Http2, OutboundTrafficPolicy},
    haproxy::RequestIds,
    topology::{Lab, LabOptions, Sidecar},
};

/// `--sidecar`: which proxy the sidecars run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarKind {
    /// The lab's own Envoy-like proxy.
    #[default]
    Lab,
    /// HAProxy from Debian's packages (two threads, pooled upstreams).
    Haproxy,
}

/// Settings shared by `lab up` and `demo`.
#[derive(Debug, Clone, Args)]
pub struct LabShape {
    /// What sidecars do with unregistered destinations.
    #[arg(long, value_enum)]
    pub policy: Option<OutboundTrafficPolicy>,
    /// Processing delay each sidecar adds on the outbound side (ms).
    #[arg(long, default_value_t = 0.0)]
    pub delay_outbound_ms: f64,
    /// Processing delay each sidecar adds on the inbound side (ms).
    #[arg(long, default_value_t = 0.0)]
    pub delay_inbound_ms: f64,
    /// Share of 503s a pod's app answers, as POD=RATE (repeatable).
    #[arg(long, value_name = "POD=RATE")]
    pub error_rate: Vec<String>,
    /// Mutual TLS between sidecars (certificates made at start; app legs stay plaintext).
    #[arg(long)]
    pub mtls: bool,
    /// The proxy the sidecars run.
    #[arg(long, value_enum, default_value_t = SidecarKind::Lab)]
    pub sidecar: SidecarKind,
    /// Where the sidecars speak HTTP/2: between them (Istio's
    /// h2UpgradePolicy UPGRADE), or also to the apps, which then serve
    /// gRPC (`lab load --grpc`).
    #[arg(long, value_enum, default_value_t = Http2::Off)]
    pub http2: Http2,
    /// Share of the packets leaving a pod's eth0 that are dropped, as
    /// POD=RATE (repeatable; an iptables statistic rule).
    #[arg(long, value_name = "POD=RATE")]
    pub packet_loss: Vec<String>,
    /// Delay on the packets leaving a pod's eth0, as POD=MS (repeatable; an
    /// NFQUEUE relay, since netem may be absent).
    #[arg(long, value_name = "POD=MS")]
    pub packet_delay_ms: Vec<String>,
    /// Nodes to spread the pods over (in turn, or as --place says): one
    /// kernel, each node a cgroup of its pods' processes and a set of
    /// their network namespaces, traced by an agent of its own.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nodes: usize,
    /// The node (1-based) a pod runs on, as POD=NODE (repeatable).
    #[arg(long, value_name = "POD=NODE")]
    pub place: Vec<String>,
    /// Bytes of peer metadata the lab's own sidecars put before a request's
    /// header lines between them, as Istio's Envoy does (often over a
    /// kilobyte); the inbound sidecar removes it before the app.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    pub peer_metadata_bytes: usize,
}

impl LabShape {
    pub fn options(&self) -> anyhow::Result<LabOptions> {
        let mut opts = LabOptions::bookinfo()?;
        opts.policy = self.policy;
        opts.delay_outbound_ms = self.delay_outbound_ms;
        opts.delay_inbound_ms = self.delay_inbound_ms;
        opts.error_rate = parse_pod_values(&self.error_rate)?;
        opts.mtls = self.mtls;
        opts.peer_metadata_bytes = self.peer_metadata_bytes;
        opts.sidecar = match self.sidecar {
            SidecarKind::Lab => Sidecar::Lab,
            SidecarKind::Haproxy => Sidecar::Haproxy {
                ids: RequestIds::Untouched,
                threads: 2,
            },
        };
        opts.http2 = self.http2;
        for (pod, loss) in parse_pod_values(&self.packet_loss)? {
            opts.impairments.entry(pod).or_default().loss = loss;
        }
        for (pod, ms) in parse_pod_values(&self.packet_delay_ms)? {
            opts.impairments.entry(pod).or_default().delay_ms = ms;
        }
        for (flag, pods) in [
            ("--error-rate", opts.error_rate.keys().collect::<Vec<_>>()),
            (
                "--packet-loss/--packet-delay-ms",
                opts.impairments.keys().collect(),
            ),
        ] {
            for pod in pods {
                anyhow::ensure!(opts.topology.pod(pod).is_some(), "{flag}: no pod {pod}");
            }
        }
        opts.nodes = self.nodes;
        for (pod, node) in parse_pod_values(&self.place)? {
            anyhow::ensure!(opts.topology.pod(&pod).is_some(), "--place: no pod {pod}");
            anyhow::ensure!(
                node >= 1.0 && node.fract() == 0.0 && node as usize <= self.nodes,
                "--place {pod}={node}: nodes are numbered 1 to {}",
                self.nodes
            );
            opts.placement.insert(pod, node as usize - 1);
        }
        for (pod, imp) in &opts.impairments {
            imp.validate().with_context(|| format!("pod {pod}"))?;
        }
        Ok(opts)
    }
}

fn parse_pod_values(pairs: &[String]) -> anyhow::Result<BTreeMap<String, f64>> {
    pairs
        .iter()
        .map(|p| {
            let (pod, v) = p
                .split_once('=')
                .with_context(|| format!("{p}: expected POD=VALUE"))?;
            let v: f64 = v.parse().with_context(|| format!("{p}: not a number"))?;
            Ok((pod.to_string(), v))
        })
        .collect()
}

/// A table of the lab's pods and services and how to reach them.
pub fn describe(lab: &Lab) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<16} {:<14} {:<8} {:<8} NETNS",
        "POD", "IP", "SIDECAR", "NODE"
    );
    for p in &lab.pods {
        let _ = writeln!(
            o,
            "{:<16} {:<14} {:<8} {:<8} {}",
            p.spec.name,
            p.spec.ip,
            if p.spec.sidecar { "yes" } else { "no" },
            lab.nodes[p.node].name,
            p.ns.name()
        );
    }
    if lab.nodes.len() > 1 {
        let _ = writeln!(
            o,
            "
an agent per node: mesh-trace run --lab {} --node-name NODE --metrics-addr 127.0.0.1:PORT",
            lab.dir.display()
        );
    }
    let _ = writeln!(o, "\n{:<16} {:<14} PORT", "SERVICE", "VIP");
    for s in &lab.topology.services {
        let _ = writeln!(o, "{:<16} {:<14} {}", s.name, s.vip, s.port);
    }
    if let (Some(client), Some(reviews)) = (
        lab.pods.iter().find(|p| p.spec.app == "loadgen"),
        lab.topology.service("reviews"),
    ) {
        let _ = writeln!(
            o,
            "\ntry:  ip netns exec {} curl -s -H 'Host: reviews:9080' http://{}:9080/reviews/0",
            client.ns.name(),
            reviews.vip
        );
    }
    let _ = writeln!(o, "logs and access records: {}", lab.dir.display());
    o
}
