//! `mesh-trace lab ...`: bring the lab up or down by hand, and the hidden
//! subcommands the lab runs inside its pods (proxy, app, load generator).
use std::collections::BTreeMap;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::{
    app::{self, AppOptions},
    config::OutboundTrafficPolicy,
    loadgen::{self, LoadOptions},
    pod_exec::set_comm,
    proxy::{self, ProxyOptions},
    topology::{self, Lab, LabOptions},
};
use crate::cli::{init_logging, Failure};

#[derive(Debug, Args)]
pub struct LabArgs {
    #[command(subcommand)]
    pub command: LabCommand,
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Start the Bookinfo lab and keep it up until Ctrl-C (poke it with curl).
    Up(LabUpArgs),
    /// Remove namespaces and processes left by a lab that was killed.
    Down,
    /// Measure overhead and capacity and write BENCHMARKS.md.
    Bench(crate::bench::BenchArgs),
    /// The sidecar proxy (run by the lab inside each pod).
    #[command(hide = true)]
    Proxy(ProxyOptions),
    /// A Bookinfo app (run by the lab inside each pod).
    #[command(hide = true)]
    App(AppOptions),
    /// The load generator; prints a JSON summary.
    #[command(hide = true)]
    Load(LoadOptions),
    /// Holds loopback connections open until stdin closes (for `lab bench`).
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        connections: usize,
    },
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
}

impl LabShape {
    pub fn options(&self) -> anyhow::Result<LabOptions> {
        let mut opts = LabOptions::bookinfo()?;
        opts.policy = self.policy;
        opts.delay_outbound_ms = self.delay_outbound_ms;
        opts.delay_inbound_ms = self.delay_inbound_ms;
        opts.error_rate = parse_pod_values(&self.error_rate)?;
        opts.mtls = self.mtls;
        for pod in opts.error_rate.keys() {
            anyhow::ensure!(
                opts.topology.pod(pod).is_some(),
                "--error-rate: no pod {pod}"
            );
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

#[derive(Debug, Args)]
pub struct LabUpArgs {
    #[command(flatten)]
    pub shape: LabShape,
}

pub fn main(args: LabArgs) -> Result<(), Failure> {
    match args.command {
        LabCommand::Up(up) => {
            init_logging(crate::config::LogLevel::Info);
            let opts = up.shape.options().map_err(Failure::usage)?;
            let lab = Lab::up(&opts)?;
            print!("{}", describe(&lab));
            println!("lab is up; Ctrl-C tears it down");
            runtime(1, "mesh-trace")?.block_on(async {
                crate::run::stop_signal()?.await;
                anyhow::Ok(())
            })?;
            drop(lab);
            println!("lab removed");
            Ok(())
        }
        LabCommand::Bench(args) => {
            init_logging(crate::config::LogLevel::Warn);
            crate::bench::main(args)?;
            Ok(())
        }
        LabCommand::Hold { connections } => Ok(crate::bench::hold(connections)?),
        LabCommand::Down => {
            let removed = topology::remove_leftovers()?;
            println!(
                "removed {} namespace(s): {}",
                removed.len(),
                removed.join(" ")
            );
            Ok(())
        }
        LabCommand::Proxy(opts) => in_pod_process("envoy", proxy::run(opts)),
        LabCommand::App(opts) => {
            let comm = opts.pod.clone();
            in_pod_process(&comm, app::run(opts))
        }
        LabCommand::Load(opts) => {
            set_comm("loadgen");
            init_logging(crate::config::LogLevel::Warn);
            let summary = runtime(2, "loadgen")?.block_on(loadgen::run(opts))?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
    }
}

/// Runs a pod process: named `comm` (what the tracer sees), logging to stderr.
fn in_pod_process(
    comm: &str,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> Result<(), Failure> {
    set_comm(comm);
    init_logging(crate::config::LogLevel::Warn);
    runtime(2, comm)?.block_on(fut)?;
    Ok(())
}

fn runtime(workers: usize, name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    let builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let mut builder = builder;
    builder
        .enable_all()
        .thread_name(name)
        .build()
        .context("starting the runtime")
}

/// A table of the lab's pods and services and how to reach them.
pub fn describe(lab: &Lab) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "{:<16} {:<14} {:<8} NETNS", "POD", "IP", "SIDECAR");
    for p in &lab.pods {
        let _ = writeln!(
            o,
            "{:<16} {:<14} {:<8} {}",
            p.spec.name,
            p.spec.ip,
            if p.spec.sidecar { "yes" } else { "no" },
            p.ns.name()
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
