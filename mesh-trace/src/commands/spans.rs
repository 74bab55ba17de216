//! `mesh-trace spans`: every stitched request as a JSON line, with its
//! twelve moments and its hops: a running agent's (`--agent`), or from
//! probes it loads itself.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Args;

use crate::{
    agent::{agent_with_spans, feed::SpanFilter, http::AgentState, Settings},
    error::Failure,
    logging::{init_logging, LogLevel},
    shutdown::stop_on,
};

#[derive(Debug, Args)]
pub struct SpansArgs {
    /// Follow the agent serving here (`mesh-trace run` on this node, or a
    /// port-forward to it) instead of loading the probes.
    #[arg(long, value_name = "URL", conflicts_with = "lab")]
    pub agent: Option<String>,
    /// Pod and service metadata from a running lab's directory.
    #[arg(long, value_name = "DIR")]
    pub lab: Option<PathBuf>,
    /// Only requests to this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Only requests from this workload.
    #[arg(long)]
    pub workload: Option<String>,
    /// Stop after printing this many spans.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
}

pub fn main(args: SpansArgs) -> Result<(), Failure> {
    init_logging(LogLevel::Warn);
    let filter = SpanFilter {
        service: args.service.clone(),
        workload: args.workload.clone(),
    };
    let duration = args.duration.map(Duration::from_secs_f64);
    if let Some(agent) = &args.agent {
        return super::follow_agent_feed(
            agent,
            "/api/v1/spans",
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
        agent_with_spans(
            settings,
            Arc::new(AgentState::new()),
            stop,
            |_| {},
            |span| {
                if filter.matches(span) {
                    printer.print(span.to_json());
                }
            },
        )
        .await
    })
}
