//! The long churn (`cargo xtask bench --only churn`): the churn test's pod
//! churn at a larger count, with the agent as a separate process, as on a
//! node, while the lab's client keeps a steady rate: the agent's peak
//! memory, what it holds once the pods are gone, and whether the surviving
//! pods' requests all still yield spans.
use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use super::{stop, Agent, CLIENT, URL};
use crate::lab::{
    churn::{Churn, ChurnOptions},
    topology::Lab,
};

/// The surviving pods' steady rate during the churn.
const RATE: &str = "200";

pub fn run(
    exe: &std::path::Path,
    lab: &Lab,
    pods: usize,
    per_pod: usize,
) -> anyhow::Result<String> {
    let agent = Agent::start(exe, lab, false)?;
    // The lab's own namespaces, observed and meshed, before any churn.
    std::thread::sleep(Duration::from_millis(1500));
    let gauges = |a: &Agent| {
        (
            a.metric("mesh_trace_meshed_netns"),
            a.metric("mesh_trace_nat_watched_netns"),
        )
    };
    let before = gauges(&agent);
    let records = lab.dir.join("bench-churn.jsonl");
    let mut client = lab.spawn_load(
        CLIENT,
        &["--url", URL, "--rate", RATE, "--duration-s", "86400"],
        &records,
    )?;
    let opts = ChurnOptions {
        pods,
        connections_per_pod: per_pod,
        workers: 2,
        alive_per_worker: 6,
        max_per_s: None,
        // As fast as it goes: the agent's capacity is what is measured.
        background: false,
    };
    eprintln!(
        "==> churn: {pods} pods, {} connections, the lab's client at {RATE} requests/s",
        pods * per_pod
    );
    let churn = Churn::start(&format!("mt-bench-churn-{}", std::process::id()), opts);
    let (mut max_meshed, mut max_watched, mut max_rss) = (0.0f64, 0.0f64, 0.0f64);
    let mut report_at = Instant::now();
    while !churn.is_finished() {
        let (meshed, watched) = gauges(&agent);
        max_meshed = max_meshed.max(meshed - before.0);
        max_watched = max_watched.max(watched - before.1);
        max_rss = max_rss.max(agent.rss_now_mib());
        if report_at.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "    {} connections, RSS {:.1} MiB",
                churn.connections(),
                agent.rss_now_mib()
            );
            report_at = Instant::now();
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let (connections, took) = churn.join()?;
    stop(&mut client, nix::sys::signal::Signal::SIGTERM);
    // What the agent keeps per namespace leaves within a scan or two.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gauges(&agent) != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = gauges(&agent);
    let requests = std::fs::read_to_string(&records)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"status\":200"))
        .count();
    let spans =
        agent.metric("mesh_trace_requests_total{reporter=\"source\",source_workload=\"loadgen\"");
    let (cpu_s, peak_rss) = agent.usage();
    let mut o = String::new();
    let _ = writeln!(o, "## Churn\n");
    let _ = writeln!(
        o,
        "`cargo xtask bench --only churn --churn-pods {pods}`: {pods} pod-like namespaces \
         (each redirecting 9080 to a local 15001 listener) created and deleted, {per_pod} short \
         connections through each one's REDIRECT, two at a time with six alive per worker, while \
         the lab's client sends {RATE} requests/s to details.\n"
    );
    let _ = writeln!(o, "| what | value |\n|---|---|");
    let _ = writeln!(
        o,
        "| connections | {connections} in {:.0} s ({:.0}/s) |",
        took.as_secs_f64(),
        connections as f64 / took.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "| churned namespaces at once | at most {max_meshed:.0} meshed, {max_watched:.0} observed at the NAT step |"
    );
    let _ = writeln!(
        o,
        "| after | meshed {:.0} (before {:.0}), observed {:.0} (before {:.0}), {:.0} sockets tracked |",
        after.0,
        before.0,
        after.1,
        before.1,
        agent.metric("mesh_trace_flows_tracked")
    );
    let _ = writeln!(
        o,
        "| agent | peak RSS {peak_rss:.1} MiB (sampled at most {max_rss:.1} MiB), {cpu_s:.0} CPU seconds |"
    );
    let _ = writeln!(
        o,
        "| surviving pods | {spans:.0} spans for {requests} requests answered 200 |"
    );
    let _ = writeln!(
        o,
        "| events lost | {:.0} |",
        agent.metric("mesh_trace_events_lost_total{")
    );
    Ok(o)
}
