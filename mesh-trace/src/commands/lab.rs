//! `mesh-trace lab ...`: bring the lab up or down by hand, `lab bench`, and
//! the hidden subcommands the lab runs inside its pods (proxy, app, load
//! generator).
use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::{
    bench::BenchArgs,
    error::Failure,
    lab::{
        app::{self, AppOptions},
        impair::{self, DelayOptions},
        loadgen::{self, LoadOptions},
        pod_exec::set_comm,
        proxy::{self, ProxyOptions},
        shape::{describe, LabShape},
        topology::{self, Lab},
    },
    logging::{init_logging, LogLevel},
    shutdown::stop_signal,
};

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
    Bench(BenchArgs),
    /// The sidecar proxy (run by the lab inside each pod).
    #[command(hide = true)]
    Proxy(ProxyOptions),
    /// A Bookinfo app (run by the lab inside each pod).
    #[command(hide = true)]
    App(AppOptions),
    /// The load generator; prints a JSON summary.
    #[command(hide = true)]
    Load(LoadOptions),
    /// Delays the packets leaving a pod (run by the lab inside the pod).
    #[command(hide = true)]
    DelayPackets(DelayOptions),
    /// Holds loopback connections open until stdin closes (for `lab bench`).
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        connections: usize,
    },
}

#[derive(Debug, Args)]
pub struct LabUpArgs {
    #[command(flatten)]
    pub shape: LabShape,
}

pub fn main(args: LabArgs) -> Result<(), Failure> {
    match args.command {
        LabCommand::Up(up) => {
            init_logging(LogLevel::Info);
            let opts = up.shape.options().map_err(Failure::usage)?;
            let lab = Lab::up(&opts)?;
            print!("{}", describe(&lab));
            println!("lab is up; Ctrl-C tears it down");
            runtime(1, "mesh-trace")?.block_on(async {
                stop_signal()?.await;
                anyhow::Ok(())
            })?;
            drop(lab);
            println!("lab removed");
            Ok(())
        }
        LabCommand::Bench(args) => super::bench::main(args),
        LabCommand::DelayPackets(opts) => {
            set_comm("delay-packets");
            init_logging(LogLevel::Warn);
            Ok(impair::run_delay(opts)?)
        }
        LabCommand::Hold { connections } => super::bench::hold(connections),
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
            init_logging(LogLevel::Warn);
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
    init_logging(LogLevel::Warn);
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
