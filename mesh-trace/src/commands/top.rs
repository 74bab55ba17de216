//! `mesh-trace top`: the live view in the terminal, or one snapshot printed
//! as text or JSON for scripts.
use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::Args;

use crate::{
    agent::local::LocalAgent,
    error::Failure,
    logging::{init_logging, LogLevel},
    shutdown::stop_signal,
    top::{
        once_text, source,
        source::{AgentUrl, Source},
        stats, View,
    },
};

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The agent to watch: where it serves /metrics.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9464")]
    pub agent: String,
    /// Run the probes in this process instead of reading an agent (root).
    #[arg(long, conflicts_with = "agent")]
    pub standalone: bool,
    /// The whole cluster: read the rows from the Prometheus that scrapes
    /// every node's agent (its HTTP API), both halves of cross-node
    /// requests together.
    #[arg(long, value_name = "URL", conflicts_with_all = ["agent", "standalone"])]
    pub prometheus: Option<String>,
    /// With --standalone: pod and service metadata from a running lab.
    #[arg(long, value_name = "DIR")]
    pub lab: Option<PathBuf>,
    /// Seconds between samples.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub interval: f64,
    /// Print one snapshot as plain text and exit (no terminal needed).
    #[arg(long)]
    pub once: bool,
    /// With --once: print the agent's JSON document instead.
    #[arg(long)]
    pub json: bool,
}

/// Shortest interval: below it the view would redraw faster than anyone
/// reads, and a remote agent would serve a snapshot every few milliseconds.
const MIN_INTERVAL: f64 = 0.1;

pub fn main(args: TopArgs) -> Result<(), Failure> {
    if !(args.interval.is_finite() && args.interval >= MIN_INTERVAL) {
        return Err(Failure::usage(anyhow::anyhow!(
            "--interval must be at least {MIN_INTERVAL} s"
        )));
    }
    // Checked here rather than by clap, whose message for a missing
    // companion flag does not fit the one-line usage error.
    if args.json && !args.once {
        return Err(Failure::usage(anyhow::anyhow!("--json needs --once")));
    }
    if args.lab.is_some() && !args.standalone {
        return Err(Failure::usage(anyhow::anyhow!(
            "--lab needs --standalone (an agent has its own metadata)"
        )));
    }
    let interval = Duration::from_secs_f64(args.interval);
    if !args.once && !std::io::stdout().is_terminal() {
        return Err(Failure::usage(anyhow::anyhow!(
            "the live view needs a terminal; use --once (or --once --json) in scripts"
        )));
    }
    let prometheus = match &args.prometheus {
        Some(url) => {
            Some(AgentUrl::parse(url).map_err(|e| Failure::usage(e.context("--prometheus")))?)
        }
        None => None,
    };
    let remote = if args.standalone || prometheus.is_some() {
        None
    } else {
        Some(AgentUrl::parse(&args.agent).map_err(Failure::usage)?)
    };
    if args.standalone {
        // While the view is up these go to a file (see `StderrToFile`).
        init_logging(LogLevel::Warn);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let local = match args.standalone {
            true => Some(LocalAgent::start(args.lab.clone()).await?),
            false => None,
        };
        let source = match (&remote, &local, &prometheus) {
            (Some(url), _, _) => Source::Agent(url.clone()),
            (_, Some(agent), _) => Source::Local(agent.state.clone()),
            (_, _, Some(url)) => Source::Prometheus(url.clone()),
            (None, None, None) => unreachable!("one of the three is set"),
        };
        let result = if args.once {
            if local.is_some() {
                // Just attached: give the probes one interval of traffic.
                tokio::time::sleep(interval).await;
            }
            print_once(&source, args.json, interval).await
        } else {
            let stop = stop_signal()?;
            match View::start(source, interval) {
                Ok(view) => view
                    .run_until(stop)
                    .await
                    .map(|_| ())
                    .map_err(Failure::from),
                Err(e) => Err(e.into()),
            }
        };
        if let Some(agent) = local {
            agent.stop().await?;
        }
        result
    })
}

/// `--once`: one fetch, printed, or the failure as the exit status.
async fn print_once(source: &Source, json: bool, interval: Duration) -> Result<(), Failure> {
    let timeout = source::fetch_timeout(interval);
    let described = source.describe();
    let text = source
        .fetch_json(timeout)
        .await
        .with_context(|| format!("agent unreachable at {described}"))?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", text.trim_end())?;
        return Ok(());
    }
    let stats: stats::AgentStats = serde_json::from_str(&text)
        .context("the agent's statistics are not what this version reads")?;
    write!(out, "{}", once_text(&stats, &described))?;
    Ok(())
}
