//! `mesh-trace demo`: the Bookinfo lab with traffic, traced live by the
//! agent, with a summary every two seconds; everything removed on exit.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Seek, SeekFrom},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args;

use crate::{
    agent::{http::AgentState, metrics::KindLabel},
    cli::{init_logging, Failure},
    config::LogLevel,
    lab::{
        cmd::{describe, LabShape},
        records::{ClientRecord, ProxyRecord},
        topology::Lab,
    },
    run::{agent, stop_signal, Settings},
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
    /// Where the agent serves /metrics.
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
    let settings = Settings {
        metrics_addr: Some(args.metrics_addr),
        log_level: LogLevel::Info,
        ..Settings::in_process(Some(lab.dir.clone()))?
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(live(&lab, &args, settings));
    eprintln!("==> removing the lab");
    drop(lab);
    result
}

async fn live(lab: &Lab, args: &DemoArgs, settings: Settings) -> Result<(), Failure> {
    let state = Arc::new(AgentState::new());
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_task = tokio::spawn(agent(
        settings,
        state.clone(),
        async {
            let _ = agent_stopped.await;
        },
        |_| {},
    ));
    let mut ctrl_c = std::pin::pin!(stop_signal()?);
    // Traffic starts once the programs are attached: connections opened
    // before would be invisible for as long as they are kept alive.
    while !state.ready.load(std::sync::atomic::Ordering::Acquire) {
        if agent_task.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

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
                    println!("{}", view.line(started.elapsed(), &state));
                    for row in hop_rows(&state) {
                        println!("{row}");
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
    let _ = stop_agent.send(());
    agent_task.await.context("agent task")??;
    Ok(())
}

/// Per service pair, the median of each hop as the kernel measured it.
fn hop_rows(state: &AgentState) -> Vec<String> {
    let snapshot = state
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .snapshot(crate::clock::mono_ns());
    let short = [
        ("client_to_outbound", "app->sc"),
        ("outbound_proxy", "out-sc"),
        ("network", "net"),
        ("inbound_proxy", "in-sc"),
        ("inbound_to_app", "sc->app"),
        ("app", "app"),
    ];
    snapshot
        .rows
        .iter()
        .take(4)
        .map(|r| {
            let hops: Vec<String> = short
                .iter()
                .filter_map(|(k, name)| Some(format!("{name} {:.2}", r.hops.get(*k)?.p50_ms)))
                .collect();
            format!(
                "        {:>12} -> {:<8} {:>5.1} req/s  p50 {:>6.2} ms = {} ms  sidecars {}",
                r.source_workload,
                r.destination_service,
                r.rate,
                r.total.p50_ms,
                hops.join(" + "),
                r.sidecar_share
                    .map(|s| format!("{:.0}%", s * 100.0))
                    .unwrap_or_else(|| "-".into())
            )
        })
        .collect()
}

/// Reads new lines of a JSON-lines file since the last call.
struct Tail {
    path: PathBuf,
    offset: u64,
}

impl Tail {
    fn new(path: PathBuf) -> Tail {
        Tail { path, offset: 0 }
    }

    fn read_new<T: serde::de::DeserializeOwned>(&mut self) -> Vec<T> {
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut reader = BufReader::new(f);
        let mut line = String::new();
        // Only whole lines: a partial last line is read next time.
        while reader.read_line(&mut line).unwrap_or(0) > 0 && line.ends_with('\n') {
            self.offset += line.len() as u64;
            if let Ok(v) = serde_json::from_str(&line) {
                out.push(v);
            }
            line.clear();
        }
        out
    }
}

/// What the demo prints every two seconds: the lab's truth next to what
/// the agent received.
struct LiveSummary {
    client: Tail,
    proxies: Vec<Tail>,
    requests: u64,
    errors: u64,
    latencies_ms: Vec<f64>,
    reviews_split: BTreeMap<String, u64>,
    retries: u64,
}

impl LiveSummary {
    fn new(lab: &Lab, client_records: PathBuf) -> LiveSummary {
        let proxies = lab
            .pods
            .iter()
            .filter(|p| p.spec.sidecar)
            .map(|p| Tail::new(lab.proxy_log(&p.spec.name)))
            .collect();
        LiveSummary {
            client: Tail::new(client_records),
            proxies,
            requests: 0,
            errors: 0,
            latencies_ms: Vec::new(),
            reviews_split: BTreeMap::new(),
            retries: 0,
        }
    }

    fn line(&mut self, elapsed: Duration, state: &AgentState) -> String {
        for r in self.client.read_new::<ClientRecord>() {
            self.requests += 1;
            if !(200..300).contains(&r.status) {
                self.errors += 1;
            }
            self.latencies_ms
                .push(r.t_end_ns.saturating_sub(r.t_start_ns) as f64 / 1e6);
        }
        for tail in &mut self.proxies {
            for r in tail.read_new::<ProxyRecord>() {
                self.retries += u64::from(r.attempts.saturating_sub(1));
                if r.cluster.contains("reviews") && r.cluster.contains("|v") {
                    let version = r.cluster.split('|').nth(2).unwrap_or("?").to_string();
                    *self.reviews_split.entry(version).or_default() += 1;
                }
            }
        }
        // Keep the window bounded: percentiles over the last 10,000 requests.
        if self.latencies_ms.len() > 10_000 {
            let cut = self.latencies_ms.len() - 10_000;
            self.latencies_ms.drain(..cut);
        }
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let events = |kind: &'static str| {
            state
                .metrics
                .events
                .get_or_create(&KindLabel { kind })
                .get()
        };
        let lost: u64 = ["ringbuf_full", "map_full", "undecodable"]
            .into_iter()
            .map(|reason| {
                state
                    .metrics
                    .events_lost
                    .get_or_create(&crate::agent::metrics::ReasonLabel { reason })
                    .get()
            })
            .sum();
        let split: Vec<String> = self
            .reviews_split
            .iter()
            .map(|(v, n)| format!("{v}={n}"))
            .collect();
        format!(
            "[{:>5.0}s] requests {} (errors {}) p50 {:.1} ms p99 {:.1} ms | reviews {} retries {} | kernel: connects {} established {} closed {} lost {}",
            elapsed.as_secs_f64(),
            self.requests,
            self.errors,
            pct(0.5),
            pct(0.99),
            if split.is_empty() { "-".to_string() } else { split.join(" ") },
            self.retries,
            events("connect"),
            events("established"),
            events("closed"),
            lost,
        )
    }
}
