//! `mesh-trace flows`: legs as JSON lines as they open and close, like
//! `hubble observe`: a running agent's (`--agent`), or from probes it loads
//! itself.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Args;

use crate::{
    agent::{agent, feed::LegFilter, http::AgentState, Settings},
    error::Failure,
    flows::legs::LegKind,
    logging::{init_logging, LogLevel},
    shutdown::stop_on,
};

#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// Follow the agent serving here (`mesh-trace run` on this node, or a
    /// port-forward to it) instead of loading the probes.
    #[arg(long, value_name = "URL", conflicts_with = "lab")]
    pub agent: Option<String>,
    /// Pod and service metadata from a running lab's directory.
    #[arg(long, value_name = "DIR")]
    pub lab: Option<PathBuf>,
    /// Only legs with a socket in this pod.
    #[arg(long)]
    pub pod: Option<String>,
    /// Only legs with this port on either end or as original destination.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only these leg kinds (repeatable).
    #[arg(long, value_enum)]
    pub leg: Vec<LegKind>,
    /// Only closed legs (with bytes, RTT and durations).
    #[arg(long)]
    pub closed: bool,
    /// Stop after printing this many legs.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
}

impl FlowsArgs {
    pub fn filter(&self) -> LegFilter {
        LegFilter {
            pod: self.pod.clone(),
            port: self.port,
            kinds: self.leg.clone(),
            closed: self.closed,
        }
    }
}

pub fn main(args: FlowsArgs) -> Result<(), Failure> {
    init_logging(LogLevel::Warn);
    let filter = args.filter();
    let duration = args.duration.map(Duration::from_secs_f64);
    if let Some(url) = &args.agent {
        return super::follow_agent_feed(
            url,
            "/api/v1/flows",
            &filter.to_query(),
            args.count,
            duration,
        );
    }
    let settings = Settings::in_process(args.lab.clone())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let stop = stop_on(duration, done_rx)?;
        let mut printer = super::LinePrinter::new(args.count, done_tx);
        agent(settings, Arc::new(AgentState::new()), stop, |rec| {
            if filter.matches(rec) {
                printer.print(serde_json::to_string(rec).unwrap_or_default());
            }
        })
        .await
    })
}
