//! A rolling update on one node: the new agent starts while the old one
//! still runs, both trace (cgroup programs run side by side, the NAT
//! programs take neighbouring netfilter priorities), the metrics say two
//! agents are loaded, and once the old one stops the new one has a span
//! of every request that started after it was ready (read from its feed,
//! `mesh-trace spans --agent`, joined by request id and judged against
//! that request's truth). Nothing is left behind when both are gone.
//! Needs root.
mod common;

use std::time::{Duration, Instant};

use common::{
    agent::{metric, metric_sum, AgentProcess, BIN},
    bpf_links,
    truth::{judge, span_from_json, truths},
    wait_for,
};
use mesh_trace::lab::{
    records::{read_records, ClientRecord},
    topology::{Lab, LabOptions},
};
use nix::sys::signal::{kill, Signal};

/// The load generator's requests the agent stitched into spans (the
/// reviews apps' own calls to ratings left out), and the requests it
/// counted as not stitched.
fn requests(agent: &AgentProcess) -> (f64, f64) {
    let text = agent.scrape();
    (
        metric_sum(
            &text,
            "mesh_trace_requests_total{reporter=\"source\",source_workload=\"loadgen\",destination_service=\"reviews\"",
        ),
        metric_sum(&text, "mesh_trace_requests_unstitched_total{"),
    )
}

#[test]
fn a_new_agent_beside_the_old_one_takes_over_without_a_gap() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "handover tests load eBPF programs and build a lab: run them as root"
    );
    let mut opts = LabOptions::bookinfo().unwrap();
    opts.exe = BIN.into();
    let lab = Lab::up(&opts).unwrap();
    let links_before = bpf_links();
    let lab_dir = lab.dir.to_string_lossy().into_owned();
    let old = AgentProcess::start(&["--lab", &lab_dir], &[]);
    let records = lab.dir.join("client.jsonl");
    let mut load = lab
        .spawn_load(
            "loadgen-v1",
            &[
                "--url",
                "http://reviews:9080/reviews/0",
                "--rate",
                "50",
                "--duration-s",
                "12",
            ],
            &records,
        )
        .unwrap();
    wait_for("the old agent's spans", Duration::from_secs(10), || {
        requests(&old).0 > 0.0
    });
    // The new pod of the rolling update, its spans followed from now on.
    let new = AgentProcess::start(&["--lab", &lab_dir], &[]);
    let new_ready = mesh_trace::clock::mono_ns();
    let mut follower = std::process::Command::new(BIN)
        .args(["spans", "--agent", &format!("http://{}", new.addr)])
        .args(["--service", "reviews", "--workload", "loadgen"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read as it goes: a pipe left full would stop the follower.
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        use std::io::BufRead as _;
        let out = std::io::BufReader::new(follower.stdout.take().unwrap());
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };
    // The feed has no history: requests from the moment the follower is
    // surely connected are the ones to find in it.
    std::thread::sleep(Duration::from_millis(500));
    let followed_from = mesh_trace::clock::mono_ns();
    for (who, agent) in [("old", &old), ("new", &new)] {
        wait_for(
            &format!("the {who} agent to count two agents"),
            Duration::from_secs(5),
            || metric(&agent.scrape(), "mesh_trace_agents_on_node") == Some(2.0),
        );
    }
    // Both trace for a while; then the old one is told to stop.
    std::thread::sleep(Duration::from_secs(3));
    let old_spans = requests(&old).0;
    let pid = nix::unistd::Pid::from_raw(old.child.id() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    let mut old = old;
    let status = old.child.wait().unwrap();
    assert!(status.success(), "old agent: {status}");
    wait_for(
        "the new agent to count itself alone",
        Duration::from_secs(5),
        || metric(&new.scrape(), "mesh_trace_agents_on_node") == Some(1.0),
    );
    let load_status = load.wait().unwrap();
    assert!(load_status.success(), "load generator: {load_status}");
    let client: Vec<ClientRecord> = read_records(&records).unwrap();
    assert!(client.iter().all(|c| c.status == 200), "failed requests");
    // Every request that started after the new agent was ready, through
    // the handover, is a span of the new agent's (or counted by reason).
    let after: usize = client.iter().filter(|c| c.t_start_ns > new_ready).count();
    // A request's span is exported shortly after its response; this agent
    // is an unoptimized build sharing two cores with the lab, which can
    // leave it seconds behind: the feed is read until every followed
    // request is in it, or 30 s.
    let followed: std::collections::HashSet<&str> = client
        .iter()
        .filter(|c| c.t_start_ns > followed_from)
        .map(|c| c.request_id.as_str())
        .collect();
    let fed = || -> usize {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["request_id"]
                    .as_str()
                    .is_some_and(|id| followed.contains(id))
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while fed() < followed.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (counted, unstitched) = requests(&new);
    kill(
        nix::unistd::Pid::from_raw(follower.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let exited = follower.wait_with_output().unwrap();
    assert!(
        exited.status.success(),
        "spans --agent: {}",
        String::from_utf8_lossy(&exited.stderr)
    );
    reader.join().unwrap();
    let spans: Vec<_> = lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| span_from_json(&serde_json::from_str(l).unwrap()))
        .collect();
    let mine: std::collections::HashSet<&str> = spans
        .iter()
        .filter_map(|s| s.request_id.as_deref())
        .collect();
    let missing: Vec<&str> = followed
        .iter()
        .filter(|id| !mine.contains(*id))
        .copied()
        .collect();
    let truth = truths(&lab, &client);
    let judged = judge(&spans, &truth);
    eprintln!(
        "old agent: {old_spans} spans; new agent: {counted} spans, {unstitched} counted unstitched; \
         {after} of {} requests started after the new agent was ready, {} of them without a span \
         of the new agent's; its spans: {} joined to their truth, {} exact to 0.5 ms, {} wrong",
        client.len(),
        missing.len(),
        judged.compared,
        judged.exact,
        judged.wrong.len()
    );
    assert!(after >= 300, "{after} requests after the handover began");
    assert!(
        missing.is_empty(),
        "requests after the new agent was ready without its span: {:?}",
        &missing[..missing.len().min(5)]
    );
    assert!(
        judged.wrong.is_empty(),
        "spans off their truth: {:?}",
        &judged.wrong[..judged.wrong.len().min(3)]
    );
    // The followed requests' spans: of some 500, each is 0.2%, and two
    // may miss 0.5 ms.
    let followed_spans: Vec<_> = spans
        .iter()
        .filter(|s| {
            s.request_id
                .as_deref()
                .is_some_and(|id| followed.contains(id))
        })
        .cloned()
        .collect();
    let followed_judged = judge(&followed_spans, &truth);
    assert!(
        followed_judged.exact as f64 >= 0.995 * followed.len() as f64,
        "{} of {} followed requests exact",
        followed_judged.exact,
        followed.len()
    );
    drop(new);
    let deadline = Instant::now() + Duration::from_secs(5);
    let links = || bpf_links();
    while links() != links_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(links(), links_before, "BPF links left behind");
}
