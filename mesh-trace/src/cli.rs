//! The command line: the clap tree, and each subcommand handed to its
//! command in [`crate::commands`]. Nothing imports this module back.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{
    commands,
    error::{Failure, EXIT_USAGE},
};

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
    Check(commands::check::CheckArgs),
    /// Run the agent: load and attach the programs, serve /metrics, /healthz
    /// and /readyz (the DaemonSet's command).
    Run(commands::run::RunArgs),
    /// Stream the connections of the sidecar data path (legs) as JSON lines.
    Flows(commands::flows::FlowsArgs),
    /// Stream stitched requests as JSON lines: every moment and every hop.
    Spans(commands::spans::SpansArgs),
    /// A local Bookinfo mesh with sidecars, traced live: the quickest way to
    /// see mesh-trace work, no cluster needed.
    #[cfg(feature = "lab")]
    Demo(commands::demo::DemoArgs),
    /// The mesh lab: a local Istio sidecar data path in network namespaces.
    #[cfg(feature = "lab")]
    Lab(commands::lab::LabArgs),
    /// Live view of each service pair's latency, hop by hop, from an agent
    /// (or the probes run in-process with --standalone).
    Top(commands::top::TopArgs),
}

impl Command {
    fn run(self) -> Result<(), Failure> {
        match self {
            Command::Check(args) => commands::check::main(args),
            Command::Run(args) => commands::run::main(args),
            Command::Flows(args) => commands::flows::main(args),
            Command::Spans(args) => commands::spans::main(args),
            #[cfg(feature = "lab")]
            Command::Demo(args) => commands::demo::main(args),
            #[cfg(feature = "lab")]
            Command::Lab(args) => commands::lab::main(args),
            Command::Top(args) => commands::top::main(args),
        }
    }
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
    match cli.command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("mesh-trace: error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
