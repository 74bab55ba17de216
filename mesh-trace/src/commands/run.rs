//! `mesh-trace run`: the agent, as the DaemonSet runs it.
use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::Args;

use crate::{
    agent::{
        self,
        config::{self, ConfigFile},
        http::{AgentState, StatsAccess},
        settings::{Settings, DEFAULT_NETNS_DIR},
    },
    error::Failure,
    flows::table::FlowTableConfig,
    kernel::sysfs,
    logging::{init_logging, LogLevel},
    shutdown::stop_signal,
};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address for /metrics, /healthz and /readyz [default: 0.0.0.0:9464].
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Log verbosity [default: info].
    #[arg(long, value_enum)]
    pub log_level: Option<LogLevel>,
    /// TOML configuration file; flags override it.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Size of the kernel-to-agent ring buffer in bytes (power of two).
    #[arg(long, value_name = "BYTES")]
    pub ring_buffer_bytes: Option<u32>,
    /// cgroup v2 directory to attach to [default: the cgroup v2 root].
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// Print every kernel event as a JSON line on stdout.
    #[arg(long)]
    pub print_events: bool,
    /// Pod and service metadata from a running lab's directory.
    #[arg(long, value_name = "DIR", conflicts_with = "kubernetes")]
    pub lab: Option<PathBuf>,
    /// Pod and service metadata from the Kubernetes API server (in-cluster
    /// service account, else KUBECONFIG): the pods on --node-name and every
    /// service.
    #[arg(long)]
    pub kubernetes: bool,
    /// This node's name: whose pods are watched with --kubernetes; with
    /// --lab, the lab node to trace (its pods' processes, namespaces and NAT
    /// steps, as a node's agent would).
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Sockets tracked at once in the flow table.
    #[arg(long, value_name = "N")]
    pub max_flows: Option<usize>,
    /// Directory of named network namespaces (pods) to watch at the NAT
    /// step [default: /var/run/netns].
    #[arg(long, value_name = "DIR")]
    pub netns_dir: Option<PathBuf>,
    /// Attach every program but let each return at once: the cost of the
    /// hooks alone (the floor benchmarks compare against).
    #[arg(long)]
    pub noop: bool,
    /// Send every data event to the ring buffer on its own instead of in
    /// per-CPU batches (costlier per socket call; for comparison).
    #[arg(long)]
    pub no_batch: bool,
    /// Data events one pod's network namespace may send per CPU per second;
    /// past it they are dropped and counted (events_lost{reason="netns_budget"}),
    /// so that one pod cannot fill the ring buffer for the others. 0: no
    /// limit [default: 100000].
    #[arg(long, value_name = "N")]
    pub netns_events_per_s: Option<u32>,
    /// Bytes captured of a send or receive that begins an HTTP/1.x request
    /// (other bytes: the first 192): the head's lines tell requests apart
    /// inside sidecars, and sidecars write a kilobyte and more of their own
    /// (Istio's peer metadata) before those. At most 2048; 0 captures
    /// request heads like other bytes [default: 2048].
    #[arg(long, value_name = "BYTES")]
    pub request_head_bytes: Option<u32>,
    /// Set no uprobes on the TLS libraries of traced processes. Without
    /// them, requests behind mutual TLS are matched inside sidecars without
    /// their plaintext, and more are counted ambiguous; with them, every
    /// process mapping a probed library (libssl, or an executable with TLS
    /// linked in) pays a trap per SSL_write/SSL_read.
    #[arg(long)]
    pub no_tls_plaintext: bool,
    /// Serve /api/v1/stats, which names request paths and x-request-ids, to
    /// any client; by default only loopback clients get it (mesh-trace top
    /// on the node, kubectl port-forward).
    #[arg(long)]
    pub stats_from_anywhere: bool,
    /// Send each request's trace (a span per segment of its path) over
    /// OTLP to this collector, e.g. http://otel-collector:4318.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// How to reach it: `http/protobuf` (default; port 4318 by convention)
    /// or `grpc` (port 4317), as OTEL_EXPORTER_OTLP_PROTOCOL names them.
    #[arg(long, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<String>,
}

/// Merges flags over the config file over defaults. Errors are usage errors.
pub fn settings(args: &RunArgs) -> Result<Settings, Failure> {
    let file = match &args.config {
        Some(path) => ConfigFile::load(path).map_err(Failure::usage)?,
        None => ConfigFile::default(),
    };
    let kubernetes_node = kubernetes_node(args, &file)?;
    let ring = args
        .ring_buffer_bytes
        .or(file.ring_buffer_bytes)
        .unwrap_or_else(config::default_ring_buffer_bytes);
    let ring_buffer_bytes = config::check_ring_buffer_bytes(ring).map_err(Failure::usage)?;
    let request_head_bytes = config::check_request_head_bytes(
        args.request_head_bytes
            .or(file.request_head_bytes)
            .unwrap_or(crate::kernel::tracer::DEFAULT_HEAD_LEN),
    )
    .map_err(Failure::usage)?;
    let cgroup = match args.cgroup.clone().or(file.cgroup.clone()) {
            Some(c) => c,
            None => sysfs::cgroup2_root()
                .context("no cgroup v2 hierarchy is mounted (looked for /sys/fs/cgroup and /sys/fs/cgroup/unified); pass --cgroup")?,
        };
    let explicit_cgroup = args.cgroup.clone().or(file.cgroup.clone());
    let explicit_netns_dir = args.netns_dir.clone().or(file.netns_dir.clone());
    let lab_node = args
        .node_name
        .clone()
        .or(file.node_name.clone())
        .filter(|n| !n.is_empty());
    let otlp_endpoint = args
        .otlp_endpoint
        .clone()
        .or(file.otlp_endpoint.clone())
        .map(|u| {
            let protocol = args
                .otlp_protocol
                .clone()
                .or(file.otlp_protocol.clone())
                .unwrap_or_else(|| "http/protobuf".into());
            crate::agent::otlp::Endpoint::parse(&u, protocol.parse()?)
        })
        .transpose()
        .map_err(Failure::usage)?;
    if otlp_endpoint.is_none() && (args.otlp_protocol.is_some() || file.otlp_protocol.is_some()) {
        return Err(Failure::usage(anyhow::anyhow!(
            "--otlp-protocol needs --otlp-endpoint"
        )));
    }
    let mut settings = Settings {
        metrics_addr: Some(
            args.metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| config::DEFAULT_METRICS_ADDR.parse().unwrap()),
        ),
        log_level: args.log_level.or(file.log_level).unwrap_or_default(),
        ring_buffer_bytes,
        cgroup,
        print_events: args.print_events,
        kubernetes_node,
        lab: args.lab.clone().or(file.lab),
        lab_node: None,
        max_flows: args
            .max_flows
            .or(file.max_flows)
            .unwrap_or(FlowTableConfig::default().max_sockets),
        netns_dir: args
            .netns_dir
            .clone()
            .or(file.netns_dir)
            .unwrap_or_else(|| DEFAULT_NETNS_DIR.into()),
        noop: args.noop,
        batch_events: !args.no_batch,
        netns_events_per_s: args
            .netns_events_per_s
            .or(file.netns_events_per_s)
            .unwrap_or(crate::kernel::tracer::DEFAULT_NETNS_EVENTS_PER_S),
        request_head_bytes,
        tls_plaintext: !args.no_tls_plaintext && file.tls_plaintext != Some(false),
        stats_access: if args.stats_from_anywhere || file.stats_from_anywhere == Some(true) {
            StatsAccess::Anyone
        } else {
            StatsAccess::LoopbackOnly
        },
        otlp_endpoint,
    };
    // One node of a lab: its pods' namespaces, processes and NAT steps,
    // unless flags say otherwise.
    if let (Some(node), true) = (lab_node, settings.lab.is_some()) {
        settings.on_lab_node(&node).map_err(Failure::usage)?;
        if let Some(c) = explicit_cgroup {
            settings.cgroup = c;
        }
        if let Some(d) = explicit_netns_dir {
            settings.netns_dir = d;
        }
    }
    Ok(settings)
}

/// The node whose pods are watched, when Kubernetes metadata is asked for.
fn kubernetes_node(args: &RunArgs, file: &ConfigFile) -> Result<Option<String>, Failure> {
    if !(args.kubernetes || file.kubernetes == Some(true)) {
        return Ok(None);
    }
    if args.lab.is_some() || file.lab.is_some() {
        return Err(Failure::usage(anyhow::anyhow!(
            "choose one metadata source: --lab or --kubernetes"
        )));
    }
    match args.node_name.clone().or_else(|| file.node_name.clone()) {
        Some(n) if !n.is_empty() => Ok(Some(n)),
        _ => Err(Failure::usage(anyhow::anyhow!(
            "--kubernetes needs this node's name: --node-name or NODE_NAME (in a DaemonSet, from the downward API spec.nodeName)"
        ))),
    }
}

pub fn main(args: RunArgs) -> Result<(), Failure> {
    let settings = settings(&args)?;
    init_logging(settings.log_level);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let stop = stop_signal()?;
        agent::agent(settings, Arc::new(AgentState::new()), stop, |_| {}).await
    })
}
