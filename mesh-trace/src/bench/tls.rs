//! What the TLS plaintext probes cost the traffic (`--only tls`): the lab
//! with mutual TLS between its sidecars (OpenSSL, every `SSL_write` and
//! `SSL_read` probed), closed-loop load without an agent, with the agent
//! and `--no-tls-plaintext`, and with the agent as it runs by default, in
//! alternation.
use std::fmt::Write as _;

use super::{Agent, Summary};
use crate::lab::topology::Lab;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probes {
    NoAgent,
    Without,
    With,
}

impl Probes {
    fn label(self) -> &'static str {
        match self {
            Probes::NoAgent => "no agent",
            Probes::Without => "agent, --no-tls-plaintext",
            Probes::With => "agent with the TLS probes (default)",
        }
    }
}

struct Run {
    probes: Probes,
    summary: Summary,
    agent_cpu_s: f64,
    spans: f64,
    files_probed: f64,
}

pub(super) fn measure(
    exe: &std::path::Path,
    lab: &Lab,
    load: &dyn Fn(&str, &[&str]) -> anyhow::Result<Summary>,
    conns: &str,
    rounds: u32,
) -> anyhow::Result<String> {
    let mut runs = Vec::new();
    for round in 0..rounds {
        for probes in [Probes::NoAgent, Probes::Without, Probes::With] {
            eprintln!("==> round {} {}", round + 1, probes.label());
            let agent = match probes {
                Probes::NoAgent => None,
                Probes::Without => {
                    Some(Agent::start_with(exe, lab, false, &["--no-tls-plaintext"])?)
                }
                Probes::With => Some(Agent::start(exe, lab, false)?),
            };
            let before = agent.as_ref().map(Agent::usage).unwrap_or_default();
            let summary = load(
                &format!("tls-{round}-{probes:?}"),
                &["--connections", conns],
            )?;
            std::thread::sleep(std::time::Duration::from_millis(500));
            let (cpu, _) = agent.as_ref().map(Agent::usage).unwrap_or_default();
            let metric = |series: &str| agent.as_ref().map(|a| a.metric(series)).unwrap_or(0.0);
            runs.push(Run {
                probes,
                agent_cpu_s: cpu - before.0,
                spans: metric("mesh_trace_requests_total{reporter=\"source\""),
                files_probed: metric("mesh_trace_tls_files_probed_total"),
                summary,
            });
        }
    }
    Ok(render(&runs))
}

fn render(runs: &[Run]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| run | configuration | requests/s | p50 ms | p99 ms | agent CPU s | spans (source) | files probed |\n|---|---|---|---|---|---|---|---|"
    );
    for (i, r) in runs.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |",
            i / 3 + 1,
            r.probes.label(),
            r.summary.rate,
            r.summary.p50_ms,
            r.summary.p99_ms,
            r.agent_cpu_s,
            r.spans,
            r.files_probed
        );
    }
    let median = |p: Probes, f: &dyn Fn(&Run) -> f64| {
        super::median(runs.iter().filter(|r| r.probes == p).map(f).collect())
    };
    let rate = |p| median(p, &|r| r.summary.rate);
    let p50 = |p| median(p, &|r| r.summary.p50_ms);
    let _ = writeln!(
        o,
        "\nMedians: requests/s with the probes / without them {:.3}, / no agent {:.3}; p50 with the probes / without them {:.3}.",
        rate(Probes::With) / rate(Probes::Without),
        rate(Probes::With) / rate(Probes::NoAgent),
        p50(Probes::With) / p50(Probes::Without),
    );
    o
}
