//! A rolling update on one node: the new agent starts while the old one
//! still runs, both trace (cgroup programs run side by side, the NAT
//! programs take neighbouring netfilter priorities), the metrics say two
//! agents are loaded, and once the old one stops the new one has at
//! least as many spans as requests that started after it was ready (a
//! count: the agent's spans are seen only through its metrics). Nothing is left
//! behind when both are gone. Needs root.
mod common;

use std::time::{Duration, Instant};

use common::{
    agent::{metric, metric_sum, AgentProcess, BIN},
    bpf_links, wait_for,
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
    // The new pod of the rolling update.
    let new = AgentProcess::start(&["--lab", &lab_dir], &[]);
    let new_ready = mesh_trace::clock::mono_ns();
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
    // A request's span is exported shortly after its response.
    std::thread::sleep(Duration::from_secs(2));
    let (spans, unstitched) = requests(&new);
    eprintln!(
        "old agent: {old_spans} spans; new agent: {spans} spans, {unstitched} counted unstitched; \
         {after} of {} requests started after the new agent was ready",
        client.len()
    );
    assert!(after >= 300, "{after} requests after the handover began");
    assert!(
        spans >= after as f64,
        "the new agent has {spans} spans for {after} requests that started after it was ready"
    );
    drop(new);
    let deadline = Instant::now() + Duration::from_secs(5);
    let links = || bpf_links();
    while links() != links_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(links(), links_before, "BPF links left behind");
}
