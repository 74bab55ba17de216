//! `mesh-trace run`: the agent.
use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use crate::{
    agent::{
        http::{self, AgentState},
        metrics::{KindLabel, LossTracker, ReasonLabel, UNDECODABLE},
    },
    cli::{init_logging, Failure, RunArgs},
    config::{self, ConfigFile, LogLevel},
    kernel::{
        events::{self, kind_label},
        sysfs,
        tracer::{Tracer, TracerOptions},
    },
};

/// How often the kernel's loss counters are read.
const LOSS_POLL: Duration = Duration::from_secs(1);

/// The agent's settings after merging defaults, the config file and flags.
#[derive(Clone, Debug)]
pub struct Settings {
    pub metrics_addr: SocketAddr,
    pub log_level: LogLevel,
    pub ring_buffer_bytes: u32,
    pub cgroup: PathBuf,
    pub print_events: bool,
}

impl Settings {
    /// Merges flags over the config file over defaults. Errors are usage errors.
    pub fn resolve(args: &RunArgs) -> Result<Settings, Failure> {
        let file = match &args.config {
            Some(path) => ConfigFile::load(path).map_err(Failure::usage)?,
            None => ConfigFile::default(),
        };
        let ring = args
            .ring_buffer_bytes
            .or(file.ring_buffer_bytes)
            .unwrap_or_else(config::default_ring_buffer_bytes);
        let ring_buffer_bytes = config::check_ring_buffer_bytes(ring).map_err(Failure::usage)?;
        let cgroup = match args.cgroup.clone().or(file.cgroup) {
            Some(c) => c,
            None => sysfs::cgroup2_root()
                .context("no cgroup v2 hierarchy is mounted (looked for /sys/fs/cgroup and /sys/fs/cgroup/unified); pass --cgroup")?,
        };
        Ok(Settings {
            metrics_addr: args
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| config::DEFAULT_METRICS_ADDR.parse().unwrap()),
            log_level: args.log_level.or(file.log_level).unwrap_or_default(),
            ring_buffer_bytes,
            cgroup,
            print_events: args.print_events,
        })
    }
}

pub fn main(args: RunArgs) -> Result<(), Failure> {
    let settings = Settings::resolve(&args)?;
    init_logging(settings.log_level);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let stop = stop_signal()?;
        agent(settings, Arc::new(AgentState::new()), stop).await
    })
}

/// Resolves on the first SIGINT or SIGTERM.
pub fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    })
}

/// Runs the agent until `stop` resolves, then detaches everything.
pub async fn agent(
    settings: Settings,
    state: Arc<AgentState>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), Failure> {
    let listener = TcpListener::bind(settings.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {}", settings.metrics_addr))?;
    let (stop_http, stop_rx) = watch::channel(false);
    let server = tokio::spawn(http::serve(listener, state.clone(), stop_rx));

    let mut tracer = Tracer::load(&TracerOptions {
        ring_buffer_bytes: settings.ring_buffer_bytes,
        ..TracerOptions::new(settings.cgroup.clone())
    })?;
    tracer.spawn_kernel_log_forwarder()?;
    state
        .metrics
        .programs_attached
        .set(tracer.attached.len() as i64);
    state.ready.store(true, Ordering::Release);
    for a in &tracer.attached {
        tracing::info!(program = a.program, hook = %a.hook, "attached");
    }
    tracing::info!(
        "ready: serving /metrics, /healthz and /readyz on {}",
        settings.metrics_addr
    );

    let mut stop = std::pin::pin!(stop);
    let mut loss_poll = tokio::time::interval(LOSS_POLL);
    let mut loss = LossTracker::default();
    let mut batch = Vec::with_capacity(1024);
    let stdout = std::io::stdout();
    let result: anyhow::Result<()> = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = loss_poll.tick() => {
                for (reason, delta) in loss.update(&tracer.lost()?) {
                    state.metrics.events_lost.get_or_create(&ReasonLabel { reason: reason.label() }).inc_by(delta);
                }
            }
            r = tracer.next_batch(&mut batch) => {
                if let Err(e) = r {
                    break Err(e);
                }
                let mut out = stdout.lock();
                for ev in batch.drain(..) {
                    match ev {
                        Ok(ev) => {
                            state.metrics.events.get_or_create(&KindLabel { kind: kind_label(ev.kind()) }).inc();
                            if settings.print_events {
                                let _ = writeln!(out, "{}", events::to_json(&ev));
                            }
                        }
                        Err(e) => {
                            tracing::debug!("undecodable event: {e}");
                            state.metrics.events_lost.get_or_create(&ReasonLabel { reason: UNDECODABLE }).inc();
                        }
                    }
                }
                let _ = out.flush();
            }
        }
    };
    tracing::info!("stopping: detaching programs");
    state.ready.store(false, Ordering::Release);
    drop(tracer);
    let _ = stop_http.send(true);
    let _ = server.await;
    tracing::info!("stopped");
    result.map_err(Failure::from)
}
