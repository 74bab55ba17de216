//! `mesh-trace lab bench`: the overhead and capacity figures of
//! BENCHMARKS.md, measured side by side in one run on this machine.
//!
//! - Traffic overhead: the lab under closed-loop load with no tracing, with
//!   the floor (every program attached but returning at once, `--noop`) and
//!   with mesh-trace in full, in alternation.
//! - Kernel cost per program from the kernel's own accounting
//!   (`kernel.bpf_stats_enabled`), for meshed traffic and for unrelated I/O,
//!   per request and per NAT packet, beside a bpftrace peer ([`kernel`]).
//! - Agent CPU and memory per 1,000 requests, at fixed rates.
//! - Pipeline capacity: synthetic events through decoding, flow tagging,
//!   framing and stitching on one core.
use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

mod churn;
mod kernel;
mod soak;
mod tls;

use anyhow::{bail, Context as _};
use clap::Args;
use kernel::KernelCosts;

use crate::{
    flows::{
        metadata::NoMetadata,
        table::{FlowTable, FlowTableConfig},
    },
    kernel::events::Event,
    lab::{
        loadgen::Summary,
        topology::{Lab, LabOptions},
    },
    spans::stitch::{StitchConfig, Stitcher},
};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Seconds per load run.
    #[arg(long, default_value_t = 8.0)]
    pub seconds: f64,
    /// Rounds of the three configurations, in alternation.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Closed-loop connections.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Measure only one section and print it, for quick work on one part:
    /// `kernel` (cost per program, NAT, the bpftrace peer), `agent` (agent
    /// CPU and memory at fixed rates), `pipeline` (capacity on one core) or
    /// `tls` (the TLS plaintext probes' cost under mutual TLS).
    #[arg(long, value_enum)]
    pub only: Option<Section>,
    /// How long the soak runs (`--only soak`), in seconds.
    #[arg(long, default_value_t = 3600.0)]
    pub soak_s: f64,
    /// Pods `--only churn` creates and deletes (a thousand connections each).
    #[arg(long, default_value_t = 5_000)]
    pub churn_pods: usize,
    /// Where `--only soak` and `--only churn` write their reports
    /// (`soak.md`, `churn.md`).
    #[arg(long, default_value = "docs")]
    pub long_out: PathBuf,
    /// Bytes of peer metadata the lab's sidecars put in each request head
    /// between them (`lab up --peer-metadata-bytes`): what Istio's Envoy
    /// sends, for the price of capturing long request heads.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    pub peer_metadata_bytes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Kernel,
    Agent,
    Pipeline,
    /// The agent for `--soak-s` (an hour) at the lab's highest steady
    /// rate; memory and unstitched counts sampled every minute.
    Soak,
    /// `--churn-pods` pods created and deleted under short connections,
    /// beside the lab's steady traffic.
    Churn,
    /// The TLS plaintext probes' cost: the lab with mutual TLS, without an
    /// agent, with the agent and `--no-tls-plaintext`, and with the probes.
    Tls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    None,
    Floor,
    Full,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::None => "no tracing",
            Mode::Floor => "floor (programs attached, returning at once)",
            Mode::Full => "mesh-trace",
        }
    }
}

/// The agent as a separate process, as on a node.
struct Agent {
    child: Child,
    addr: SocketAddr,
}

impl Agent {
    fn start(exe: &std::path::Path, lab: &Lab, noop: bool) -> anyhow::Result<Agent> {
        Self::start_with(exe, lab, noop, &[])
    }

    fn start_with(
        exe: &std::path::Path,
        lab: &Lab,
        noop: bool,
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut c = Command::new(exe);
        c.args(["run", "--metrics-addr", &addr.to_string(), "--lab"])
            .arg(&lab.dir)
            .args(extra)
            .env("MESH_TRACE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if noop {
            c.arg("--noop");
        }
        let child = c.spawn().context("starting the agent")?;
        let agent = Agent { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent.get("/readyz").is_ok_and(|b| b.starts_with("ready")) {
            if Instant::now() > deadline {
                bail!("agent not ready in 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    fn get(&self, path: &str) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        Ok(raw
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default())
    }

    /// Resident memory now, in MiB.
    fn rss_now_mib(&self) -> f64 {
        self.status_mib("VmRSS:")
    }

    /// A memory field of the agent's /proc status (`VmRSS:`, `RssAnon:`,
    /// ...), in MiB.
    fn status_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    }

    /// (CPU seconds, peak RSS in MiB) of the agent process so far.
    fn usage(&self) -> (f64, f64) {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15; index 11 and 12 after ')'.
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let cpu = (ticks(11) + ticks(12)) / hz;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hwm_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        (cpu, hwm_kib / 1024.0)
    }

    fn metric(&self, series: &str) -> f64 {
        self.get("/metrics")
            .ok()
            .and_then(|text| {
                text.lines()
                    .filter(|l| l.starts_with(series))
                    .map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
                    .sum()
            })
            .unwrap_or(0.0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        stop(&mut self.child, nix::sys::signal::Signal::SIGTERM);
    }
}

/// Sends `signal` to a child the bench started and waits for it to exit.
fn stop(child: &mut Child, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
    let _ = child.wait();
}

struct Run {
    mode: Mode,
    summary: Summary,
    /// CPU time of the whole machine (every process, the kernel) during
    /// the load.
    machine_cpu_s: f64,
    agent_cpu_s: f64,
    agent_rss_mib: f64,
    lost: f64,
    spans: f64,
}

pub fn main(args: BenchArgs) -> anyhow::Result<()> {
    if args.only == Some(Section::Pipeline) {
        println!(
            "pipeline: {:.0} events/s on one core",
            pipeline_capacity(400_000)
        );
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut opts = LabOptions::bookinfo()?;
    opts.exe = exe.clone();
    opts.mtls = args.only == Some(Section::Tls);
    opts.peer_metadata_bytes = args.peer_metadata_bytes;
    eprintln!("==> lab up");
    let lab = Lab::up(&opts)?;
    let load = |name: &str, extra: &[&str]| -> anyhow::Result<Summary> {
        let secs = args.seconds.to_string();
        let mut a = vec!["--url", URL, "--duration-s", &secs];
        a.extend_from_slice(extra);
        lab.load(CLIENT, &a, &lab.dir.join(format!("bench-{name}.jsonl")))
    };
    let conns = args.connections.to_string();
    // Warm the lab's connections and caches once.
    load("warmup", &["--connections", &conns])?;

    if args.only == Some(Section::Tls) {
        print!("{}", tls::measure(&exe, &lab, &load, &conns, args.rounds)?);
        return Ok(());
    }
    if args.only == Some(Section::Kernel) {
        let kernel = kernel::measure(&exe, &lab, &load, &conns, args.rounds)?;
        print!(
            "{}",
            kernel::render(&kernel, args.rounds, args.peer_metadata_bytes)
        );
        return Ok(());
    }
    let long = match args.only {
        Some(Section::Soak) => Some((
            "soak.md",
            soak::run(&exe, &lab, &load, &conns, args.soak_s)?,
        )),
        Some(Section::Churn) => Some(("churn.md", churn::run(&exe, &lab, args.churn_pods, 1_000)?)),
        _ => None,
    };
    if let Some((file, report)) = long {
        print!("{report}");
        let path = args.long_out.join(file);
        std::fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("==> wrote {}", path.display());
        return Ok(());
    }
    if args.only == Some(Section::Agent) {
        // The lab's capacity untraced, which sets the highest fixed rate.
        let lab_max = load("capacity", &["--connections", &conns])?.rate;
        let rated = agent_at_rates(&exe, &lab, &load, lab_max)?;
        print!("{}", render_rated(&args, &rated));
        return Ok(());
    }
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        for mode in [Mode::None, Mode::Floor, Mode::Full] {
            eprintln!("==> round {} {}", round + 1, mode.label());
            let agent = match mode {
                Mode::None => None,
                Mode::Floor => Some(Agent::start(&exe, &lab, true)?),
                Mode::Full => Some(Agent::start(&exe, &lab, false)?),
            };
            let before = agent.as_ref().map(Agent::usage).unwrap_or_default();
            let busy = machine_busy_s()?;
            let summary = load(&format!("{round}-{mode:?}"), &["--connections", &conns])?;
            let machine_cpu_s = machine_busy_s()? - busy;
            std::thread::sleep(Duration::from_millis(500));
            let (cpu, rss) = agent.as_ref().map(Agent::usage).unwrap_or_default();
            let lost = agent
                .as_ref()
                .map(|a| a.metric("mesh_trace_events_lost_total"))
                .unwrap_or(0.0);
            let spans = agent
                .as_ref()
                .map(|a| a.metric("mesh_trace_requests_total{reporter=\"source\""))
                .unwrap_or(0.0);
            runs.push(Run {
                mode,
                summary,
                machine_cpu_s,
                agent_cpu_s: cpu - before.0,
                agent_rss_mib: rss,
                lost,
                spans,
            });
        }
    }

    eprintln!("==> kernel cost per program (kernel.bpf_stats_enabled), with a bpftrace peer");
    let kernel = kernel::measure(&exe, &lab, &load, &conns, args.rounds)?;

    eprintln!("==> agent cost and loss at fixed rates");
    let lab_max = median(
        runs.iter()
            .filter(|r| r.mode == Mode::None)
            .map(|r| r.summary.rate)
            .collect(),
    );
    let rated = agent_at_rates(&exe, &lab, &load, lab_max)?;

    eprintln!("==> agent cost with idle pods");
    let mut pods = Vec::new();
    for n in [10usize, 50, 100] {
        pods.push(idle_pods(&exe, &lab, n)?);
    }

    eprintln!("==> agent memory with 100k tracked flows");
    let flows = many_flows(&exe, &lab, 50_000)?;

    eprintln!("==> pipeline capacity");
    let pipeline = pipeline_capacity(400_000);

    let mut report = render(&args, &runs, &kernel, pipeline, &rated);
    let closed_loop = runs
        .iter()
        .filter(|r| r.mode == Mode::Full)
        .collect::<Vec<_>>();
    report.push_str(&render_scaling(&args, &rated, &closed_loop, &pods, &flows));
    report.push_str(DESIGN_NOTE);
    std::fs::write(&args.out, report).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("==> wrote {}", args.out.display());
    Ok(())
}

const CLIENT: &str = "loadgen-v1";
/// What the lab's client asks for in every run.
const URL: &str = "http://details:9080/details/0";

/// Seconds every CPU of the machine spent busy so far (/proc/stat: all but
/// idle and iowait).
fn machine_busy_s() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("/proc/stat is empty")?;
    let ticks: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy: f64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|&(i, _)| i != 3 && i != 4)
        .map(|(_, t)| t)
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok(busy / hz)
}

/// The agent in full mode under open-loop load at fixed rates: 1k, 2k and
/// 5k requests/s, and the lab's own highest steady rate, 90% of what the
/// closed loop reached untraced (`lab_max`), below which an open loop
/// keeps up.
fn agent_at_rates(
    exe: &std::path::Path,
    lab: &Lab,
    load: &dyn Fn(&str, &[&str]) -> anyhow::Result<Summary>,
    lab_max: f64,
) -> anyhow::Result<Vec<Rated>> {
    let mut rates = vec![
        1000.0,
        2000.0,
        5000.0,
        (lab_max * 0.9 / 100.0).round() * 100.0,
    ];
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let mut rated = Vec::new();
    // With and without batches in alternation: what the agent pays for
    // putting batched events back in order.
    for (rate, batched) in rates.into_iter().flat_map(|r| [(r, true), (r, false)]) {
        eprintln!(
            "    {rate:.0} req/s{}",
            if batched { "" } else { ", --no-batch" }
        );
        let extra: &[&str] = if batched { &[] } else { &["--no-batch"] };
        let agent = Agent::start_with(exe, lab, false, extra)?;
        let before = agent.usage();
        let r = rate.to_string();
        let summary = load(&format!("rate-{rate}"), &["--rate", &r])?;
        std::thread::sleep(Duration::from_millis(500));
        let (cpu, rss) = agent.usage();
        rated.push(Rated {
            target: rate,
            batched,
            summary,
            cpu_s: cpu - before.0,
            rss_mib: rss,
            lost: agent.metric("mesh_trace_events_lost_total"),
        });
    }
    Ok(rated)
}

/// An open-loop run at a target rate with the full agent.
struct Rated {
    target: f64,
    /// Data events in per-CPU batches (else `--no-batch`).
    batched: bool,
    summary: Summary,
    cpu_s: f64,
    rss_mib: f64,
    lost: f64,
}

impl Rated {
    /// Whether the lab served the rate asked for; past its capacity
    /// requests queue everywhere, the agent's in-flight tables too.
    fn kept_up(&self) -> bool {
        self.summary.rate >= 0.95 * self.target
    }

    /// Agent CPU seconds per 1,000 requests, which is also its vCPU per
    /// 1,000 requests/s.
    fn cpu_per_k(&self) -> f64 {
        self.cpu_s / (self.summary.sent.max(1) as f64 / 1000.0)
    }
}

/// The agent idle with `pods` extra pod namespaces to watch.
struct Pods {
    pods: usize,
    ready_s: f64,
    cpu_per_s: f64,
    rss_mib: f64,
}

/// Adds `n` idle pod namespaces (loopback up), starts the agent, and
/// measures its start-up time, idle CPU and memory; removes them after.
fn idle_pods(exe: &std::path::Path, lab: &Lab, n: usize) -> anyhow::Result<Pods> {
    let tag = std::process::id();
    let namespaces: Vec<crate::netns::NetNs> = (0..n)
        .map(|i| crate::netns::NetNs::create(&format!("mtb-{tag}-{i}")))
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let agent = Agent::start(exe, lab, false)?;
    let ready_s = started.elapsed().as_secs_f64();
    // Let the namespace watcher settle, then measure idle.
    std::thread::sleep(Duration::from_secs(2));
    let (cpu0, _) = agent.usage();
    let idle = Duration::from_secs(5);
    std::thread::sleep(idle);
    let (cpu1, rss_mib) = agent.usage();
    drop(agent);
    drop(namespaces);
    Ok(Pods {
        pods: n,
        ready_s,
        cpu_per_s: (cpu1 - cpu0) / idle.as_secs_f64(),
        rss_mib,
    })
}

/// The agent holding many flows at once.
struct ManyFlows {
    connections: usize,
    tracked: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
    settle_s: f64,
    lost: f64,
    evicted: f64,
}

/// Opens `connections` loopback connections (two tracked sockets each) and
/// holds them while the agent's memory is read. The sockets are spread over
/// holder processes (`lab hold`) so no process needs more open files than
/// the usual limit allows.
fn many_flows(exe: &std::path::Path, lab: &Lab, connections: usize) -> anyhow::Result<ManyFlows> {
    let max_flows = (connections * 2 + 16_384).to_string();
    let agent = Agent::start_with(exe, lab, false, &["--max-flows", &max_flows])?;
    let (_, baseline_mib) = agent.usage();
    let started = Instant::now();
    let mut holders = Vec::new();
    let mut left = connections;
    while left > 0 {
        let n = left.min(HOLD_PER_PROCESS);
        left -= n;
        let mut child = Command::new(exe)
            .args(["lab", "hold", "--connections", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting `mesh-trace lab hold`")?;
        // One line once every connection is open.
        let mut line = String::new();
        use std::io::BufRead as _;
        std::io::BufReader::new(child.stdout.take().context("holder stdout")?)
            .read_line(&mut line)?;
        anyhow::ensure!(line.trim() == "ready", "holder said {line:?}");
        holders.push(child);
    }
    let want = (connections * 2) as f64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tracked = 0.0;
    while Instant::now() < deadline {
        tracked = agent.metric("mesh_trace_flows_tracked");
        if tracked >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let settle_s = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let flows = ManyFlows {
        connections,
        tracked: agent.metric("mesh_trace_flows_tracked").max(tracked),
        rss_mib: agent.rss_now_mib(),
        peak_rss_mib: agent.usage().1,
        settle_s,
        lost: agent.metric("mesh_trace_events_lost_total"),
        evicted: agent.metric("mesh_trace_flows_evicted_total"),
    };
    eprintln!(
        "    {} sockets tracked, RSS {:.1} MiB (was {baseline_mib:.1} MiB)",
        flows.tracked, flows.rss_mib
    );
    for mut h in holders {
        drop(h.stdin.take()); // EOF: the holder closes its sockets and exits
        let _ = h.wait();
    }
    Ok(flows)
}

/// Connections per holder process: two descriptors each, under the common
/// limit of 20,000 open files.
const HOLD_PER_PROCESS: usize = 9_000;

/// `lab hold`: opens `connections` loopback connections to listeners of its
/// own, prints `ready`, and holds them until its standard input closes.
pub fn hold(connections: usize) -> anyhow::Result<()> {
    // Several listeners, so that ephemeral ports do not run out.
    let listeners: Vec<TcpListener> = (0..4)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<_, _>>()?;
    let mut clients = Vec::with_capacity(connections);
    let mut servers = Vec::with_capacity(connections);
    for i in 0..connections {
        clients.push(TcpStream::connect(addrs[i % addrs.len()]).context("connecting")?);
        servers.push(listeners[i % addrs.len()].accept().context("accepting")?.0);
    }
    println!("ready");
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    Ok(())
}

/// The "Agent cost and loss at fixed rates" section.
fn render_rated(args: &BenchArgs, rated: &[Rated]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "\n## Agent cost and loss at fixed rates\n");
    let _ = writeln!(
        o,
        "Open loop from the loadgen pod to `details`, {} s per rate, default settings (1 MiB ring buffer). The lab's own processes share the machine's 2 cores, so high target rates are not reached. Reproduce this section alone with `cargo xtask bench --only agent`.\n",
        args.seconds
    );
    let _ = writeln!(o, "| target req/s | batches | achieved req/s | p99 ms | agent CPU s per 1,000 req | vCPU per 1,000 req/s | peak RSS MiB | events lost |\n|---|---|---|---|---|---|---|---|");
    for r in rated {
        let _ = writeln!(
            o,
            "| {:.0} | {} | {:.0} | {:.2} | {:.3} | {:.3} | {:.1} | {:.0} |",
            r.target,
            if r.batched {
                "yes"
            } else {
                "no (`--no-batch`)"
            },
            r.summary.rate,
            r.summary.p99_ms,
            r.cpu_per_k(),
            r.cpu_per_k(),
            r.rss_mib,
            r.lost
        );
    }
    let overloaded: Vec<String> = rated
        .iter()
        .filter(|r| r.batched && !r.kept_up())
        .map(|r| format!("{:.0}", r.target))
        .collect();
    if !overloaded.is_empty() {
        let _ = writeln!(
            o,
            "\nAt {} req/s the open loop asked for more than the lab's sidecars and apps serve on this \
             machine: requests queue, latency grows and fewer complete (the closed loop above shows its capacity).",
            overloaded.join(" and ")
        );
    }
    o
}

fn render_scaling(
    args: &BenchArgs,
    rated: &[Rated],
    closed_loop: &[&Run],
    pods: &[Pods],
    flows: &ManyFlows,
) -> String {
    let mut o = render_rated(args, rated);
    // Closed-loop runs count too: they are the highest rates the lab reaches.
    let no_loss = rated
        .iter()
        .filter(|r| r.batched)
        .map(|r| (r.summary.rate, r.lost))
        .chain(closed_loop.iter().map(|r| (r.summary.rate, r.lost)))
        .filter(|&(_, lost)| lost == 0.0)
        .map(|(rate, _)| rate)
        .fold(0.0, f64::max);
    let all_clean = rated.iter().filter(|r| r.batched).all(|r| r.lost == 0.0)
        && closed_loop.iter().all(|r| r.lost == 0.0);
    let _ = writeln!(
        o,
        "\nHighest rate reached with no event lost, open or closed loop (with batches): {no_loss:.0} req/s{}.\n",
        if all_clean {
            " (nothing was lost in any run)"
        } else {
            ""
        }
    );
    let _ = writeln!(o, "## Agent cost with the node's size\n");
    let _ = writeln!(o, "Idle agent with extra pod network namespaces to watch (each gets its NAT observers), on top of the lab's 9.\n");
    let _ = writeln!(
        o,
        "| extra pods | agent ready in s | idle vCPU | peak RSS MiB |\n|---|---|---|---|"
    );
    for p in pods {
        let _ = writeln!(
            o,
            "| {} | {:.2} | {:.4} | {:.1} |",
            p.pods, p.ready_s, p.cpu_per_s, p.rss_mib
        );
    }
    let idle_rss = pods.iter().map(|p| p.rss_mib).fold(0.0, f64::max);
    let (first, last) = (pods.first(), pods.last());
    let flat = first
        .zip(last)
        .is_some_and(|(a, b)| b.cpu_per_s <= a.cpu_per_s + 0.01);
    let _ = writeln!(o, "\n| target | met | measured |\n|---|---|---|");
    let _ = writeln!(
        o,
        "| Agent RSS <= 64 MiB idle | {} | {idle_rss:.1} MiB with up to 100 extra pods |",
        if idle_rss <= 64.0 { "yes" } else { "not yet" }
    );
    let _ = writeln!(
        o,
        "| Agent cost flat in the number of idle pods | {} | idle vCPU {} |",
        if flat { "yes" } else { "not yet" },
        pods.iter()
            .map(|p| format!("{:.4} ({} pods)", p.cpu_per_s, p.pods))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        o,
        "| Agent RSS <= 128 MiB at 100k tracked flows | {} | {:.1} MiB with {:.0} sockets tracked |",
        if flows.rss_mib <= 128.0 && flows.tracked >= 100_000.0 {
            "yes"
        } else {
            "not yet"
        },
        flows.rss_mib,
        flows.tracked
    );
    let _ = writeln!(o, "\n## Agent memory with many tracked flows\n");
    let _ = writeln!(
        o,
        "{} loopback connections held open on the node (both ends are tracked sockets), agent started with `--max-flows {}`.\n",
        flows.connections,
        flows.connections * 2 + 16_384
    );
    let _ = writeln!(
        o,
        "| sockets tracked | RSS MiB | peak RSS MiB | all tracked after s | events lost | evicted |\n|---|---|---|---|---|---|"
    );
    let _ = writeln!(
        o,
        "| {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} |",
        flows.tracked, flows.rss_mib, flows.peak_rss_mib, flows.settle_s, flows.lost, flows.evicted
    );
    o
}

/// Events per second through decoding, flow tagging, framing and stitching
/// on one core, with a synthetic request pattern on a pair of legs.
pub fn pipeline_capacity(requests: u64) -> f64 {
    let records = synthetic_events(requests);
    let started = Instant::now();
    let events = run_pipeline(&records);
    events as f64 / started.elapsed().as_secs_f64()
}

/// Feeds raw ring buffer records through decoding, a fresh flow table and
/// a fresh stitcher, as the agent does; returns the events they held.
pub fn run_pipeline(records: &[Vec<u8>]) -> usize {
    let mut table = FlowTable::new(FlowTableConfig::default(), Arc::new(NoMetadata));
    let mut stitcher = Stitcher::new(StitchConfig::default());
    let (mut legs, mut spans) = (Vec::new(), Vec::new());
    let mut decoded = Vec::new();
    let mut events = 0;
    for raw in records {
        crate::kernel::events::decode_record(raw, &mut decoded);
        for ev in decoded.drain(..) {
            let Ok(ev) = ev else { continue };
            events += 1;
            match &ev {
                Event::Data(d) => stitcher.data(&table, d, &mut spans),
                Event::H2Frame(f) => stitcher.h2_frame(&table, f, &mut spans),
                _ => {}
            }
            table.apply(&ev, &mut legs);
            legs.clear();
            spans.clear();
            crate::kernel::events::recycle(ev);
        }
    }
    events
}

/// Data events packed as the kernel sends them: batch records of at most
/// `BATCH_MAX` bytes, each event cut after its prefix.
fn batched(events: &[mesh_trace_common::DataEvent]) -> Vec<Vec<u8>> {
    use mesh_trace_common::*;
    let mut out = Vec::new();
    let mut batch: Vec<u8> = Vec::new();
    for d in events {
        let entry = &bytes_of(d)[..DATA_FIXED_LEN + d.prefix_len as usize];
        if batch.len() + size_of::<BatchEntry>() + entry.len() + 8 > BATCH_MAX {
            out.push(std::mem::take(&mut batch));
        }
        if batch.is_empty() {
            let header = EventHeader {
                kind: EventKind::Batch as u32,
                ..Default::default()
            };
            batch.extend(bytes_of(&header));
        }
        let len = entry.len() as u32;
        batch.extend(bytes_of(&BatchEntry { len, _pad: 0 }));
        batch.extend(entry);
        batch.resize((batch.len() + 7) & !7, 0);
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: the event types are repr(C) plain old data.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

/// An app socket and its sidecar's 15001 socket, joined, then `requests`
/// request/response exchanges over keep-alive: four data events each, in
/// batch records as the kernel sends them.
pub fn synthetic_events(requests: u64) -> Vec<Vec<u8>> {
    synthetic_events_with_metadata(requests, 0)
}

/// [`synthetic_events`], each request head carrying `metadata` bytes of
/// peer metadata first, as a sidecar's between sidecars (cut to what a
/// data event holds).
pub fn synthetic_events_with_metadata(requests: u64, metadata: usize) -> Vec<Vec<u8>> {
    use mesh_trace_common::*;
    let ep = |ip: [u8; 4], port| Endpoint::v4(u32::from_ne_bytes(ip), port);
    let mut out = Vec::new();
    let mut connect = ConnectEvent::default();
    connect.header.kind = EventKind::Connect as u32;
    connect.sock_cookie = 1;
    connect.task.uid_gid = 1000;
    connect.dst = ep([10, 96, 0, 12], 9080);
    out.push(bytes_of(&connect));
    let mut app = SockEvent::default();
    app.header.kind = EventKind::Established as u32;
    app.sock_cookie = 1;
    app.local = ep([10, 244, 0, 5], 40000);
    app.remote = ep([10, 96, 0, 12], 9080);
    app.active = 1;
    out.push(bytes_of(&app));
    let mut proxy = app;
    proxy.sock_cookie = 2;
    proxy.local = ep([127, 0, 0, 1], 15001);
    proxy.remote = ep([10, 244, 0, 5], 40000);
    proxy.active = 0;
    out.push(bytes_of(&proxy));
    let mut head = b"GET /reviews/0 HTTP/1.1\r\n".to_vec();
    if metadata > 0 {
        head.extend(b"x-envoy-peer-metadata: ");
        head.extend(std::iter::repeat_n(b'A', metadata));
        head.extend(b"\r\n");
    }
    head.extend(
        &b"host: reviews:9080\r\nx-request-id: 8c1e1d9e-3b8a-4f55-9a4e-1f2d3c4b5a69\r\n\r\n"[..],
    );
    head.truncate(DATA_PREFIX_MAX);
    let request = &head[..];
    let response = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let mut offsets = [0u64; 2];
    let mut ts = 1_000u64;
    let mut data = Vec::new();
    for _ in 0..requests {
        for (cookie, dir, payload) in [
            (1u64, DIR_SEND, request),
            (2, DIR_RECV, request),
            (2, DIR_SEND, &response[..]),
            (1, DIR_RECV, &response[..]),
        ] {
            let mut d = DataEvent::default();
            d.header.kind = EventKind::Data as u32;
            ts += 1_000;
            d.header.ts_ns = ts;
            d.sock_cookie = cookie;
            d.pid_tgid = 7 << 32 | 7;
            d.direction = dir;
            // Request bytes flow 1 -> 2, response bytes 2 -> 1.
            let stream = usize::from(payload.as_ptr() == response.as_ptr());
            d.offset = offsets[stream];
            d.len = payload.len() as u32;
            d.prefix_len = payload.len() as u32;
            d.prefix[..payload.len()].copy_from_slice(payload);
            if dir == DIR_RECV {
                offsets[stream] += payload.len() as u64;
            }
            data.push(d);
        }
    }
    out.extend(batched(&data));
    out
}

/// What was decided because of these numbers, and what comes next.
const DESIGN_NOTE: &str = "
## What the numbers decided

The design note, with the experiments behind each choice and how to repeat them, is
[docs/performance.md](docs/performance.md). In short:

- **Socket tracepoints, not syscall tracepoints, for the data path** (`tp_btf`
  `sock_send_length` / `sock_recv_length`): file I/O runs no program at all.
- **Per-socket state in socket-local storage** (`BPF_MAP_TYPE_SK_STORAGE`), not a
  cookie-keyed hash, and none for the host network namespace's sockets: the node's own
  socket I/O costs a storage miss over the floor. Sockets open before the agent are
  adopted by an `iter/tcp` program.
- **Capture only in meshed namespaces**, a 192-byte prefix.
- **Wake the agent only past an eighth of the ring** (it also reads every 20 ms): an
  interrupt per event had made each traced call cost about 3 us.
- **Data events in per-CPU batches**: a ring buffer reservation per socket call was the
  largest part of the traced path; the batch goes out in one record, and the agent puts
  events back in time order (the kernel cost table shows the traced path without them).
- **NAT observed per pod namespace by one program per hook**, after the nat table, that
  leaves every packet but a connection's first on its conntrack state alone.
";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn render(
    args: &BenchArgs,
    runs: &[Run],
    kernel: &KernelCosts,
    pipeline: f64,
    rated: &[Rated],
) -> String {
    let mut o = String::new();
    let host = crate::kernel::sysfs::kernel_release();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let _ = writeln!(o, "# Benchmarks\n");
    let _ = writeln!(
        o,
        "Measured on this repository's reference machine kind: Linux {host}, {cpus} cores. \
         Reproduce with `cargo xtask bench` (which runs `mesh-trace lab bench --seconds {} --rounds {} --connections {}`; \
         `cargo xtask bench --only kernel|agent|pipeline` measures one section). \
         Figures from one run; the machine is shared and noisy, so compare ratios within the run.\n",
        args.seconds, args.rounds, args.connections
    );
    let by_mode = |m: Mode| -> Vec<&Run> { runs.iter().filter(|r| r.mode == m).collect() };
    let rate = |m: Mode| median(by_mode(m).iter().map(|r| r.summary.rate).collect());
    let p50 = |m: Mode| median(by_mode(m).iter().map(|r| r.summary.p50_ms).collect());
    let p99 = |m: Mode| median(by_mode(m).iter().map(|r| r.summary.p99_ms).collect());
    let _ = writeln!(o, "## Traffic overhead\n");
    let _ = writeln!(
        o,
        "Closed loop, {} connections from the lab's loadgen pod to `details` through both sidecars, {} s per run, configurations in alternation ({} rounds; medians of the rounds).\n",
        args.connections, args.seconds, args.rounds
    );
    let _ = writeln!(
        o,
        "| configuration | requests/s | p50 ms | p99 ms |\n|---|---|---|---|"
    );
    for m in [Mode::None, Mode::Floor, Mode::Full] {
        let _ = writeln!(
            o,
            "| {} | {:.0} | {:.2} | {:.2} |",
            m.label(),
            rate(m),
            p50(m),
            p99(m)
        );
    }
    let (none, full) = (rate(Mode::None), rate(Mode::Full));
    let throughput = full / none;
    let p99_ratio = p99(Mode::Full) / p99(Mode::None);
    // What a request cost the whole machine (apps, sidecars, kernel and
    // agent), from /proc/stat over the runs of each configuration.
    let cpu_ns = |m: Mode| {
        let runs = by_mode(m);
        let cpu: f64 = runs.iter().map(|r| r.machine_cpu_s).sum();
        let sent: u64 = runs.iter().map(|r| r.summary.sent).sum();
        cpu * 1e9 / sent.max(1) as f64
    };
    let added_machine_ns = cpu_ns(Mode::Full) - cpu_ns(Mode::Floor);
    let _ = writeln!(
        o,
        "\nThroughput with mesh-trace: {:.1}% of no tracing; p99 {:.2}x. CPU time of the whole machine per request \
         (/proc/stat over the runs: apps, sidecars, kernel and agent): {:.0} ns untraced, {:.0} ns with the floor, \
         {:.0} ns with mesh-trace: **{:.0} ns per request added over the floor**, of which the kernel's own accounting \
         below gives the BPF part.\n",
        throughput * 100.0,
        p99_ratio,
        cpu_ns(Mode::None),
        cpu_ns(Mode::Floor),
        cpu_ns(Mode::Full),
        added_machine_ns
    );
    o.push_str(&kernel::render(
        kernel,
        args.rounds,
        args.peer_metadata_bytes,
    ));
    let _ = writeln!(o, "## Agent cost under closed-loop load\n");
    let _ = writeln!(o, "| run | requests | agent CPU s | CPU s per 1,000 req | vCPU per 1,000 req/s | peak RSS MiB | spans | events lost |\n|---|---|---|---|---|---|---|---|");
    for r in runs.iter().filter(|r| r.mode == Mode::Full) {
        let per_k = r.agent_cpu_s / (r.summary.sent as f64 / 1000.0);
        let _ = writeln!(
            o,
            "| {:.0} req/s | {} | {:.2} | {:.3} | {:.3} | {:.1} | {:.0} | {:.0} |",
            r.summary.rate,
            r.summary.sent,
            r.agent_cpu_s,
            per_k,
            per_k,
            r.agent_rss_mib,
            r.spans,
            r.lost
        );
    }
    let _ = writeln!(o, "\n## Pipeline capacity\n");
    let _ = writeln!(
        o,
        "Synthetic events (an app socket and its sidecar socket joined, then keep-alive request/response exchanges) through decoding, flow tagging, HTTP framing and stitching, one core: **{:.0} events/s**.\n",
        pipeline
    );
    // The `--no-batch` runs are a comparison, not the product.
    let lost: f64 = runs.iter().map(|r| r.lost).sum::<f64>()
        + rated
            .iter()
            .filter(|r| r.batched)
            .map(|r| r.lost)
            .sum::<f64>();
    let kept_up = || rated.iter().filter(|r| r.batched && r.kept_up());
    let highest = kept_up().max_by(|a, b| a.summary.rate.total_cmp(&b.summary.rate));
    let rss = runs
        .iter()
        .map(|r| r.agent_rss_mib)
        .chain(kept_up().map(|r| r.rss_mib))
        .fold(0.0, f64::max);
    o.push_str(&render_goals(&Goals {
        added_per_request: kernel.added_per_request(),
        per_io: kernel.per_io(),
        per_io_floor: kernel.per_io_floor(),
        nat_added: kernel.nat_added_per_packet(),
        agent: highest.map(|r| (r.summary.rate, r.cpu_per_k())),
        rss,
        pipeline,
        throughput,
        p99_ratio,
        added_machine_ns,
        unrelated_added: kernel.unrelated_added(),
        lost,
    }));
    o
}

/// The figures each goal is judged on.
struct Goals {
    added_per_request: f64,
    per_io: f64,
    per_io_floor: f64,
    nat_added: f64,
    /// (rate, vCPU per 1,000 req/s) at the highest fixed rate kept up with.
    agent: Option<(f64, f64)>,
    rss: f64,
    pipeline: f64,
    throughput: f64,
    p99_ratio: f64,
    added_machine_ns: f64,
    unrelated_added: f64,
    lost: f64,
}

/// The "Goals" section: each goal met, or its figure and the next step.
fn render_goals(g: &Goals) -> String {
    let (agent_rate, agent_cpu) = g.agent.unwrap_or((0.0, f64::NAN));
    let rows: [(&str, bool, String, &str); 10] = [
        (
            "Per request through both sidecars, every program together: <= 2,000 ns of BPF time above the floor",
            g.added_per_request <= 2000.0,
            format!("{:.0} ns", g.added_per_request),
            "twelve socket calls a request each copy a payload prefix from user memory: copy it only where a \
             message can start, decided in the kernel from the stream position",
        ),
        (
            "<= 250 ns per traced socket call, everything included",
            g.per_io <= 250.0,
            format!("{:.0} ns (floor {:.0} ns)", g.per_io, g.per_io_floor),
            "the prefix only where a message can start; the socket-local storage and namespace lookups folded into one",
        ),
        (
            "NAT observation: <= 15 ns per packet that is not a connection's first",
            g.nat_added <= 15.0,
            format!("{:.0} ns above the empty program", g.nat_added),
            "on kernels with fentry, a per-connection hook on the REDIRECT itself instead of a per-packet program",
        ),
        (
            "Agent <= 0.005 vCPU per 1,000 req/s at the lab's highest rate",
            agent_cpu <= 0.005,
            format!("{agent_cpu:.3} at {agent_rate:.0} req/s"),
            "profile-driven: per-socket slots instead of hashing per event, head parsing once, shared label values",
        ),
        (
            "Agent RSS < 64 MiB under load the lab keeps up with",
            g.rss < 64.0,
            format!("{:.1} MiB", g.rss),
            "",
        ),
        (
            "Pipeline >= 5,000,000 events/s on one core",
            g.pipeline >= 5e6,
            format!("{:.0}", g.pipeline),
            "the agent's profile steps above; decoding without copying the record",
        ),
        (
            "Traced throughput >= 98% of untraced",
            g.throughput >= 0.98,
            format!("{:.1}%", g.throughput * 100.0),
            "follows the BPF time per call",
        ),
        (
            "p99 <= 1.03x untraced",
            g.p99_ratio <= 1.03,
            format!("{:.2}x", g.p99_ratio),
            "follows the BPF time per call",
        ),
        (
            "Added cost per request over the floor shown in ns",
            true,
            format!(
                "{:.0} ns of BPF time (kernel accounting); {:.0} ns of the machine's CPU time, agent included (/proc/stat)",
                g.added_per_request, g.added_machine_ns
            ),
            "",
        ),
        (
            "No events lost at the lab's maximum rate; <= 80 ns added per unrelated socket call",
            g.lost == 0.0 && g.unrelated_added <= 80.0,
            format!("{:.0} events lost; {:.0} ns per unrelated call", g.lost, g.unrelated_added),
            "",
        ),
    ];
    let mut o = String::new();
    let _ = writeln!(o, "## Goals\n");
    let _ = writeln!(
        o,
        "| goal | met | measured | next step |\n|---|---|---|---|"
    );
    for (goal, met, measured, next) in rows {
        let _ = writeln!(
            o,
            "| {goal} | {} | {measured} | {} |",
            if met { "yes" } else { "not yet" },
            if met { "" } else { next }
        );
    }
    o
}
