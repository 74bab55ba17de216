//! `mesh-trace spans`: every stitched request as a JSON line, with its
//! twelve moments and its hops. Loads the probes itself.
use std::{io::Write as _, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Args;

use crate::{
    agent::http::AgentState,
    cli::{init_logging, Failure},
    config::{self, LogLevel},
    flows::table::FlowTableConfig,
    run::{agent_with_spans, stop_signal, Settings},
};

#[derive(Debug, Args)]
pub struct SpansArgs {
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
    let cgroup = crate::kernel::sysfs::cgroup2_root().context("no cgroup v2 hierarchy mounted")?;
    let settings = Settings {
        metrics_addr: None,
        log_level: LogLevel::Warn,
        ring_buffer_bytes: config::default_ring_buffer_bytes(),
        cgroup,
        print_events: false,
        lab: args.lab.clone(),
        max_flows: FlowTableConfig::default().max_sockets,
        netns_dir: crate::run::DEFAULT_NETNS_DIR.into(),
        noop: false,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
        let signal = stop_signal()?;
        let limit = args.duration.map(Duration::from_secs_f64);
        let stop = async move {
            let timeout = async {
                match limit {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = signal => {}
                _ = timeout => {}
                _ = done_rx.wait_for(|d| *d) => {}
            }
        };
        let mut printed = 0u64;
        let stdout = std::io::stdout();
        agent_with_spans(
            settings,
            Arc::new(AgentState::new()),
            stop,
            |_| {},
            |span| {
                let wanted = args
                    .service
                    .as_ref()
                    .is_none_or(|s| &span.destination_service == s)
                    && args
                        .workload
                        .as_ref()
                        .is_none_or(|w| &span.source_workload == w);
                if !wanted || args.count.is_some_and(|c| printed >= c) {
                    return;
                }
                let mut out = stdout.lock();
                let _ = writeln!(out, "{}", span.to_json());
                let _ = out.flush();
                printed += 1;
                if args.count.is_some_and(|c| printed >= c) {
                    let _ = done_tx.send(true);
                }
            },
        )
        .await
    })
}
