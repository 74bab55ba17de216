//! The soak (`cargo xtask bench --only soak`): the agent for an hour (by
//! default) while the lab serves its highest steady rate on pooled
//! keep-alive connections, sampled once a minute: resident memory,
//! requests stitched and not, events lost, sockets and requests held.
//! After a warm-up, memory and the share of unstitched requests must stay
//! flat: a table that only grows, or counters that turn into noise on
//! long-lived connections, show here and nowhere shorter.
use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use super::{stop, Agent, CLIENT, URL};
use crate::lab::{loadgen::Summary, topology::Lab};

const MIB: f64 = 1024.0 * 1024.0;

struct Sample {
    at_s: f64,
    rss_mib: f64,
    /// Resident memory of the agent's own (anonymous: heap, stacks), as
    /// against pages of its executable and libraries, which processes
    /// running the same binary (the lab's) share and fault in around it.
    anon_mib: f64,
    /// What the allocator has handed out, and what it holds freed.
    heap_mib: f64,
    heap_free_mib: f64,
    requests: f64,
    unstitched: f64,
    lost: f64,
    flows: f64,
    in_flight: f64,
}

impl Sample {
    fn take(agent: &Agent, started: Instant) -> Sample {
        Sample {
            at_s: started.elapsed().as_secs_f64(),
            rss_mib: agent.rss_now_mib(),
            anon_mib: agent.status_mib("RssAnon:"),
            heap_mib: agent.metric("mesh_trace_heap_in_use_bytes") / MIB,
            heap_free_mib: agent.metric("mesh_trace_heap_free_bytes") / MIB,
            requests: agent.metric("mesh_trace_requests_total{reporter=\"source\""),
            unstitched: agent.metric("mesh_trace_requests_unstitched_total{"),
            lost: agent.metric("mesh_trace_events_lost_total{"),
            flows: agent.metric("mesh_trace_flows_tracked"),
            in_flight: agent.metric("mesh_trace_requests_in_flight"),
        }
    }
}

/// Runs the soak for `seconds` and returns its report (Markdown).
pub fn run(
    exe: &std::path::Path,
    lab: &Lab,
    load: &dyn Fn(&str, &[&str]) -> anyhow::Result<Summary>,
    conns: &str,
    seconds: f64,
) -> anyhow::Result<String> {
    // The highest steady rate: seven tenths of what the lab serves traced
    // in a closed loop. Open-loop load past that queues without end on
    // this lab's two cores (at nine tenths of the untraced capacity the
    // lab's own processes fell behind within two minutes and grew by
    // gigabytes), which would measure the lab, not the agent.
    let agent = Agent::start(exe, lab, false)?;
    let traced_max = load("soak-capacity", &["--connections", conns])?.rate;
    let rate = ((traced_max * 0.7 / 100.0).round() * 100.0).max(100.0);
    let every = Duration::from_secs_f64((seconds / 60.0).clamp(1.0, 60.0));
    eprintln!(
        "==> soak: {rate:.0} requests/s for {seconds:.0} s (traced capacity {traced_max:.0}), \
         sampled every {:.0} s",
        every.as_secs_f64()
    );
    let (r, s) = (rate.to_string(), seconds.to_string());
    // Per-request records of an hour would fill the disk; the summary is
    // what the soak needs of the client.
    let mut client = lab.spawn_load(
        CLIENT,
        &["--url", URL, "--rate", &r, "--duration-s", &s],
        std::path::Path::new("/dev/null"),
    )?;
    let started = Instant::now();
    let mut samples = vec![Sample::take(&agent, started)];
    while started.elapsed().as_secs_f64() < seconds {
        std::thread::sleep(every);
        let s = Sample::take(&agent, started);
        eprintln!(
            "    {:>5.0} s: RSS {:.1} MiB ({:.1} anonymous; heap {:.1} in use, {:.1} free), {:.0} spans, \
             {:.0} unstitched, {:.0} lost, {:.0} sockets, {:.0} in flight",
            s.at_s,
            s.rss_mib,
            s.anon_mib,
            s.heap_mib,
            s.heap_free_mib,
            s.requests,
            s.unstitched,
            s.lost,
            s.flows,
            s.in_flight
        );
        samples.push(s);
        if let Some(status) = client.try_wait()? {
            anyhow::ensure!(status.success(), "the soak's load generator: {status}");
            break;
        }
    }
    stop(&mut client, nix::sys::signal::Signal::SIGTERM);
    Ok(render(rate, seconds, &samples))
}

fn render(rate: f64, seconds: f64, samples: &[Sample]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "## Soak\n");
    let _ = writeln!(
        o,
        "`cargo xtask bench --only soak --soak-s {seconds:.0}`: the agent while the lab's \
         client sends {rate:.0} requests/s (seven tenths of the lab's traced capacity) to \
         details over pooled keep-alive connections, sampled every {:.0} s.\n",
        samples.get(1).map_or(0.0, |s| s.at_s)
    );
    let _ = writeln!(
        o,
        "| at | RSS | anonymous | heap in use | heap free | spans since last | unstitched since last | share | events lost | sockets | requests in flight |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|");
    for w in samples.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let spans = b.requests - a.requests;
        let unstitched = b.unstitched - a.unstitched;
        let _ = writeln!(
            o,
            "| {:.0} s | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {spans:.0} | {unstitched:.0} | {:.3}% | {:.0} | {:.0} | {:.0} |",
            b.at_s,
            b.rss_mib,
            b.anon_mib,
            b.heap_mib,
            b.heap_free_mib,
            100.0 * unstitched / (spans + unstitched).max(1.0),
            b.lost,
            b.flows,
            b.in_flight
        );
    }
    let _ = writeln!(o, "\n{}", verdict(samples));
    o
}

/// Flat after warm-up (the first tenth): the agent's anonymous memory
/// grows by at most 5% (or 2 MiB), and the unstitched share of the second
/// half is no more than half again that of the first (or under 0.1%).
/// Resident memory as a whole is reported beside it: it also counts pages
/// of the executable, which grow as more of its code runs, up to its size.
fn verdict(samples: &[Sample]) -> String {
    if samples.len() < 5 {
        return "Too few samples to judge.".into();
    }
    let warm = (samples.len() / 10).max(1);
    let span = |f: fn(&Sample) -> f64| {
        let base = f(&samples[warm]);
        let peak = samples[warm..].iter().map(f).fold(0.0, f64::max);
        (base, peak, peak - base)
    };
    let (anon_base, anon_peak, growth) = span(|s| s.anon_mib);
    let (rss_base, rss_peak, _) = span(|s| s.rss_mib);
    let anon_flat = growth <= (anon_base * 0.05).max(2.0);
    let mid = warm + (samples.len() - warm) / 2;
    let share = |a: &Sample, b: &Sample| {
        let (s, u) = (b.requests - a.requests, b.unstitched - a.unstitched);
        u / (s + u).max(1.0)
    };
    let (first, second) = (
        share(&samples[warm], &samples[mid]),
        share(&samples[mid], &samples[samples.len() - 1]),
    );
    let unstitched_flat = second <= first * 1.5 || second < 0.001;
    let yes = |b: bool| if b { "flat" } else { "NOT flat" };
    format!(
        "After the warm-up ({:.0} s): the agent's anonymous memory {} ({anon_base:.1} MiB, at most \
         {anon_peak:.1} MiB, +{growth:.1} MiB; RSS {rss_base:.1} to at most {rss_peak:.1} MiB); \
         unstitched share {} ({:.3}% in the first half, {:.3}% in the second).",
        samples[warm].at_s,
        yes(anon_flat),
        yes(unstitched_flat),
        100.0 * first,
        100.0 * second
    )
}
