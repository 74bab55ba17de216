//! `mesh-trace demo`: the Bookinfo lab with traffic, traced live by the
//! agent, with a summary every two seconds; everything removed on exit.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args;

use crate::{
    agent::{agent, http::AgentState, Settings},
    error::Failure,
    lab::{
        shape::{describe, LabShape},
        summary::{hop_rows, LiveSummary},
        topology::Lab,
    },
    logging::{init_logging, LogLevel},
    shutdown::stop_signal,
};

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub shape: LabShape,
    /// Requests per second sent to productpage from the loadgen pod.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Stop after this many seconds [default: run until Ctrl-C].
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// After the traffic stops, keep the lab and the agent up until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
    /// Where the agent serves /metrics (with --nodes N, node-1's agent;
    /// node-K's serves on the port K-1 above it).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
}

const CLIENT_POD: &str = "loadgen-v1";
const SUMMARY_EVERY: Duration = Duration::from_secs(2);

pub fn main(args: DemoArgs) -> Result<(), Failure> {
    init_logging(LogLevel::Info);
    if args.rate <= 0.0 {
        return Err(Failure::usage(anyhow::anyhow!("--rate must be positive")));
    }
    let opts = args.shape.options().map_err(Failure::usage)?;
    eprintln!("==> starting the Bookinfo lab (network namespaces, istio-iptables, sidecars)");
    let lab = Lab::up(&opts)?;
    print!("{}", describe(&lab));
    // One agent per node, each scoped to it as a node's agent would be.
    let mut settings = Vec::new();
    for (k, node) in lab.nodes.iter().enumerate() {
        let mut addr = args.metrics_addr;
        addr.set_port(args.metrics_addr.port().saturating_add(k as u16));
        let mut s = Settings {
            metrics_addr: Some(addr),
            log_level: LogLevel::Info,
            ..Settings::in_process(Some(lab.dir.clone()))?
        };
        if lab.nodes.len() > 1 {
            s.on_lab_node(&node.name)?;
        }
        settings.push(s);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(live(&lab, &args, settings));
    eprintln!("==> removing the lab");
    drop(lab);
    result
}

async fn live(lab: &Lab, args: &DemoArgs, settings: Vec<Settings>) -> Result<(), Failure> {
    let mut agents = Vec::new();
    for s in settings {
        let addr = s.metrics_addr;
        let state = Arc::new(AgentState::new());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(agent(
            s,
            state.clone(),
            async {
                let _ = stopped.await;
            },
            |_| {},
        ));
        agents.push((state, stop, task, addr));
    }
    let mut ctrl_c = std::pin::pin!(stop_signal()?);
    // Traffic starts once the programs are attached: connections opened
    // before would be invisible for as long as they are kept alive.
    for (state, _, task, _) in &agents {
        while !state.ready.load(std::sync::atomic::Ordering::Acquire) && !task.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if agents.len() > 1 {
        for ((_, _, _, addr), node) in agents.iter().zip(&lab.nodes) {
            if let Some(addr) = addr {
                eprintln!(
                    "==> {}'s agent: http://{addr}/metrics (mesh-trace top --agent http://{addr})",
                    node.name
                );
            }
        }
    }
    let state = agents[0].0.clone();

    let records = lab.dir.join("demo-client.jsonl");
    let url = "http://productpage:9080/productpage";
    let duration = args.duration.unwrap_or(365.0 * 24.0 * 3600.0).to_string();
    let rate = args.rate.to_string();
    eprintln!(
        "==> tracing; {} req/s from {CLIENT_POD} to {url}; metrics on http://{}/metrics; Ctrl-C stops",
        args.rate, args.metrics_addr
    );
    // On a terminal, the live view (`mesh-trace top`) replaces the summary
    // lines; it starts first so that the load generator's stderr goes to
    // the view's log rather than over the screen.
    let top = crate::top::view_if_terminal(&state)?;
    let mut loadgen = lab.spawn_load(
        CLIENT_POD,
        &["--url", url, "--rate", &rate, "--duration-s", &duration],
        &records,
    )?;

    let started = Instant::now();
    let mut view = LiveSummary::new(lab, records);
    let mut tick = tokio::time::interval(SUMMARY_EVERY);
    tick.tick().await;
    let interrupted = if let Some(top) = top {
        // q in the view ends the demo as Ctrl-C does.
        let end = async {
            tokio::select! {
                _ = &mut ctrl_c => true,
                _ = async {
                    match args.duration {
                        Some(d) => tokio::time::sleep(Duration::from_secs_f64(d)).await,
                        None => std::future::pending().await,
                    }
                } => false,
            }
        };
        top.run_until(end).await?.unwrap_or(true)
    } else {
        loop {
            tokio::select! {
                _ = &mut ctrl_c => break true,
                _ = tick.tick() => {
                    for ((state, ..), node) in agents.iter().zip(&lab.nodes) {
                        let prefix = if agents.len() > 1 { format!("{} ", node.name) } else { String::new() };
                        println!("{prefix}{}", view.line(started.elapsed(), state));
                        for row in hop_rows(state) {
                            println!("{prefix}{row}");
                        }
                    }
                    if args.duration.is_some_and(|d| started.elapsed().as_secs_f64() >= d) {
                        break false;
                    }
                }
            }
        }
    };
    let _ = loadgen.kill();
    let _ = loadgen.wait();
    if args.keep && !interrupted {
        println!("traffic stopped; the lab and agent stay up until Ctrl-C");
        print!("{}", describe(lab));
        ctrl_c.await;
    }
    for (_, stop, task, _) in agents {
        let _ = stop.send(());
        task.await.context("agent task")??;
    }
    Ok(())
}
