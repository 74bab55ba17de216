//! Command-line interface: parsing, logging set-up, exit codes.
use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use crate::config::LogLevel;

/// Exit codes. 2 is also what clap uses for usage errors.
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-trace",
    version,
    about = "eBPF datapath tracer for Istio sidecar traffic: where each request's time goes, hop by hop"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report what this kernel allows (each hook type is tried for real) and
    /// whether the tracer can run here.
    Check(CheckArgs),
    /// Run the agent: load and attach the programs, serve /metrics, /healthz
    /// and /readyz (the DaemonSet's command).
    Run(RunArgs),
    /// Stream the connections of the sidecar data path (legs) as JSON lines.
    Flows(crate::flows_cmd::FlowsArgs),
    /// Stream stitched requests as JSON lines: every moment and every hop.
    Spans(crate::spans_cmd::SpansArgs),
    /// A local Bookinfo mesh with sidecars, traced live: the quickest way to
    /// see mesh-trace work, no cluster needed.
    Demo(crate::demo::DemoArgs),
    /// The mesh lab: a local Istio sidecar data path in network namespaces.
    Lab(crate::lab::cmd::LabArgs),
    /// Live view of each service pair's latency, hop by hop, from an agent
    /// (or the probes run in-process with --standalone).
    Top(crate::top::TopArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Do not mount tracefs or bpffs when they are missing.
    #[arg(long)]
    pub no_mount: bool,
}

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
    /// This node's name, whose pods are watched with --kubernetes.
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
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn usage(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code: EXIT_USAGE,
            error: error.into(),
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: EXIT_FAILURE,
            error: e.into(),
        }
    }
}

pub fn init_logging(level: LogLevel) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_TRACE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.as_filter()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line naming the problem; --help has the rest.
            let rendered = e.render().to_string();
            let first = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            eprintln!(
                "mesh-trace: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = match cli.command {
        Command::Check(args) => crate::check::main(args),
        Command::Run(args) => crate::run::main(args),
        Command::Demo(args) => crate::demo::main(args),
        Command::Flows(args) => crate::flows_cmd::main(args),
        Command::Spans(args) => crate::spans_cmd::main(args),
        Command::Lab(args) => crate::lab::cmd::main(args),
        Command::Top(args) => crate::top::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("mesh-trace: error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
