//! The agent killed (SIGKILL) and stopped (SIGTERM) again and again while
//! traffic runs through the lab's sidecars: no request fails, a stopped
//! agent exits cleanly, every agent exports spans again within seconds of
//! starting, each judged against its own request's truth, and
//! nothing stays behind in the kernel (BPF links, programs, maps and pins)
//! or the mount table. Needs root.
mod common;

use std::time::{Duration, Instant};

use common::{
    agent::{AgentProcess, BIN},
    bpf_links,
    truth::{judge, killed_client_records, span_from_json, truths},
};
use mesh_trace::lab::{
    records::ClientRecord,
    topology::{Lab, LabOptions},
};
use nix::sys::signal::{kill, Signal};

const RESTARTS: usize = 100;

/// BPF programs and maps loaded in the kernel, and pinned objects.
fn kernel_objects() -> (usize, usize, usize) {
    fn pins(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => 1 + pins(&e.path()),
                        _ => 1,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    (
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .count(),
        aya::maps::loaded_maps().filter_map(Result::ok).count(),
        pins(std::path::Path::new("/sys/fs/bpf")),
    )
}

/// Spans of the client's requests a just-started agent exports, read
/// from its feed (`mesh-trace spans --agent`).
fn spans_from(agent: &AgentProcess, n: usize) -> Vec<mesh_trace::spans::span::Span> {
    let out = std::process::Command::new(BIN)
        .args(["spans", "--agent", &format!("http://{}", agent.addr)])
        .args(["--service", "reviews", "--workload", "loadgen"])
        .args(["--count", &n.to_string(), "--duration", "10"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "spans --agent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| span_from_json(&serde_json::from_str(l).unwrap()))
        .collect()
}

fn mounts() -> usize {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .count()
}

#[test]
fn a_hundred_restarts_under_load_fail_no_request_and_leave_nothing_behind() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "restart tests load eBPF programs and build a lab: run them as root"
    );
    let mut opts = LabOptions::bookinfo().unwrap();
    opts.exe = BIN.into();
    let lab = Lab::up(&opts).unwrap();
    let (links_before, mounts_before) = (bpf_links(), mounts());
    let objects_before = kernel_objects();
    let records = lab.dir.join("client.jsonl");
    let mut load = lab
        .spawn_load(
            "loadgen-v1",
            &[
                "--url",
                "http://reviews:9080/reviews/0",
                "--rate",
                "100",
                // Until the restarts are done (killed then): however long
                // they take, every agent sees traffic.
                "--duration-s",
                "3600",
            ],
            &records,
        )
        .unwrap();
    let lab_dir = lab.dir.to_string_lossy().into_owned();
    let started = Instant::now();
    let mut up = Duration::ZERO;
    let mut after_restarts = Vec::new();
    for i in 0..RESTARTS {
        let t = Instant::now();
        let mut agent = AgentProcess::start(&["--lab", &lab_dir], &[]);
        up += t.elapsed();
        // Tracing again: the spans of requests that start after it,
        // judged once the load is over (more of them every tenth time).
        let n = if i % 10 == 9 { 30 } else { 10 };
        let spans = spans_from(&agent, n);
        assert_eq!(
            spans.len(),
            n,
            "restart {i}: {} spans in 10 s\n{}",
            spans.len(),
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        );
        after_restarts.push((i, spans));
        if i % 10 == 9 {
            // The counts below see this agent's programs and maps.
            let (programs, maps, _) = kernel_objects();
            assert!(
                programs > objects_before.0 && maps > objects_before.1,
                "an agent's programs and maps are not seen: {:?}",
                kernel_objects()
            );
        } else {
            // Up a while longer, capturing: 0 to 200 ms more.
            std::thread::sleep(Duration::from_millis((i as u64 * 37) % 200));
        }
        let pid = nix::unistd::Pid::from_raw(agent.child.id() as i32);
        if i % 2 == 0 {
            kill(pid, Signal::SIGKILL).unwrap();
            agent.child.wait().unwrap();
        } else {
            kill(pid, Signal::SIGTERM).unwrap();
            let status = agent.child.wait().unwrap();
            assert!(
                status.success(),
                "restart {i}: SIGTERM exit status {status}"
            );
        }
    }
    let restarting = started.elapsed();
    let _ = load.kill();
    let _ = load.wait();
    let client: Vec<ClientRecord> = killed_client_records(&records);
    let failed: Vec<&ClientRecord> = client.iter().filter(|c| c.status != 200).collect();
    eprintln!(
        "{RESTARTS} restarts in {:.1} s (ready in {:.0} ms on average; each exporting spans again) during {} requests; {} failed",
        restarting.as_secs_f64(),
        up.as_secs_f64() * 1e3 / RESTARTS as f64,
        client.len(),
        failed.len()
    );
    // Each agent's spans, request by request: exact again.
    let truth = truths(&lab, &client);
    let (mut total, mut exact) = (0, 0);
    for (i, spans) in &after_restarts {
        let judged = judge(spans, &truth);
        total += judged.compared;
        exact += judged.exact;
        assert!(
            judged.wrong.is_empty(),
            "after restart {i}: spans off their truth: {:?}",
            &judged.wrong[..judged.wrong.len().min(3)]
        );
        assert!(
            judged.compared + 1 >= spans.len(),
            "after restart {i}: {} of {} joined",
            judged.compared,
            spans.len()
        );
        assert!(
            judged.exact as f64 >= 0.7 * judged.compared as f64,
            "after restart {i}: {} of {} exact",
            judged.exact,
            judged.compared
        );
    }
    eprintln!(
        "after {} restarts: {total} spans joined to their truth, {exact} exact to 0.5 ms, none wrong",
        after_restarts.len()
    );
    assert!(
        exact as f64 >= 0.99 * total as f64,
        "after the restarts: {exact} of {total} spans exact"
    );
    assert!(client.len() >= 5_000, "{} requests", client.len());
    assert!(
        failed.is_empty(),
        "failed requests: {:?}",
        &failed[..failed.len().min(5)]
    );
    // A killed agent's links go with its descriptors.
    let deadline = Instant::now() + Duration::from_secs(5);
    while bpf_links() != links_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(bpf_links(), links_before, "BPF links left behind");
    // Programs and maps are freed once nothing holds them (after an RCU
    // grace period).
    let deadline = Instant::now() + Duration::from_secs(5);
    while kernel_objects() != objects_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let objects = kernel_objects();
    eprintln!("kernel objects (programs, maps, pins) before {objects_before:?}, after {objects:?}");
    assert_eq!(
        objects, objects_before,
        "BPF programs, maps or pins left behind"
    );
    assert_eq!(mounts(), mounts_before, "mounts left behind");
}
