//! The shipped dashboards and rules against a real Prometheus: the lab runs
//! with errors, slow sidecars, blackholed calls and a burst that overflows
//! the ring buffer; the agent is scraped every second; then every query of
//! every dashboard panel and variable, and every rule, must return data, and
//! every alert must fire. Needs root and Debian's `prometheus` package.
use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

mod common;

use common::{
    agent::{free_port, AgentProcess, BIN},
    prometheus::{dashboards, panel_queries, repo, substitute, variable_queries, Prometheus},
};
use mesh_trace::lab::{
    config::OutboundTrafficPolicy,
    topology::{Lab, LabOptions},
};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test builds a lab and loads eBPF programs: run it as root"
    );
}

/// A burst of loopback connections far larger than the agent's ring.
fn overflow_the_ring_buffer() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = std::thread::spawn(move || {
        for c in listener.incoming().take(3000) {
            drop(c);
        }
    });
    let open: Vec<_> = (0..3000)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    drop(open);
    acceptor.join().unwrap();
}

/// Scrapes of the agent Prometheus has made so far.
fn scrapes(prometheus: &Prometheus) -> f64 {
    prometheus
        .query("count_over_time(up{job=\"mesh-trace\"}[10m])")
        .first()
        .and_then(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()))
        .unwrap_or(0.0)
}

fn wait_for_two_scrapes(prometheus: &Prometheus) {
    let before = scrapes(prometheus);
    let deadline = Instant::now() + Duration::from_secs(20);
    while scrapes(prometheus) < before + 2.0 {
        assert!(
            Instant::now() < deadline,
            "prometheus did not scrape twice in 20 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The lab with these options, the agent serving on `addr`, and `traffic`
/// run against them; the agent keeps running until the result is dropped.
fn phase(opts: LabOptions, addr: SocketAddr, traffic: impl FnOnce(&Lab)) -> (Lab, AgentProcess) {
    let lab = Lab::up(&opts).unwrap();
    let agent = AgentProcess::start_on(addr, &["--lab", lab.dir.to_str().unwrap()], &[]);
    traffic(&lab);
    (lab, agent)
}

/// Closed-loop requests to the product page for a while, as background.
fn steady_load(lab: &Lab, seconds: u32) {
    let mut load = lab
        .spawn_load(
            "loadgen-v1",
            &[
                "--url",
                "http://productpage:9080/productpage",
                "--rate",
                "40",
                "--duration-s",
                &seconds.to_string(),
            ],
            &lab.dir.join("client.jsonl"),
        )
        .unwrap();
    assert!(load.wait().unwrap().success(), "load generator");
}

/// New connections from a meshed pod to a destination outside the mesh.
fn leave_the_mesh(lab: &Lab) {
    lab.load_with(
        BIN.as_ref(),
        "loadgen-v1",
        &[
            "--url",
            "http://10.244.0.200:8080/",
            "--requests",
            "3",
            "--new-connections",
        ],
        &lab.dir.join("external.jsonl"),
    )
    .unwrap();
}

/// Every rule `select`ed by group and name, as Prometheus loaded and
/// evaluated them: it is healthy, its query returns data, and an alert is
/// pending or firing. Returns how many were checked, and what was wrong.
fn check_rules(
    prometheus: &Prometheus,
    select: impl Fn(&str, &str) -> bool,
) -> (BTreeSet<String>, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut problems = Vec::new();
        let mut seen = BTreeSet::new();
        let all = prometheus.api("/api/v1/rules")["groups"].clone();
        for group in all.as_array().unwrap() {
            let group_name = group["name"].as_str().unwrap();
            for rule in group["rules"].as_array().unwrap() {
                let name = rule["name"].as_str().unwrap();
                if !select(group_name, name) {
                    continue;
                }
                seen.insert(format!("{group_name}/{name}"));
                let query = rule["query"].as_str().unwrap();
                if rule["health"] != "ok" {
                    problems.push(format!(
                        "{name}: health {} {}",
                        rule["health"], rule["lastError"]
                    ));
                }
                if prometheus.query(query).is_empty() {
                    problems.push(format!("{name}: no data from {query}"));
                }
                if rule["type"] == "alerting" && rule["state"] == "inactive" {
                    problems.push(format!("alert {name} did not fire"));
                }
            }
        }
        if problems.is_empty() || Instant::now() > deadline {
            return (seen, problems);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn every_dashboard_query_and_rule_returns_data_from_a_real_prometheus() {
    require_root();
    let rules = repo().join("deploy/prometheus/rules.yaml");
    let checked = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool (Debian package prometheus) must be installed");
    assert!(
        checked.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let scratch = std::env::temp_dir().join(format!("mt-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let agent_addr = free_port();
    let prometheus = Prometheus::start(agent_addr, &rules, &scratch);

    let mut all_rules = BTreeSet::new();
    let mut check = |what: &str, select: &dyn Fn(&str, &str) -> bool| {
        let (seen, problems) = check_rules(&prometheus, select);
        assert!(problems.is_empty(), "{what}:\n{}", problems.join("\n"));
        assert!(!seen.is_empty(), "{what}: no rules");
        all_rules.extend(seen);
    };
    const PASSTHROUGH: &str = "MeshTracePassthroughTraffic";
    const LOST: &str = "MeshTraceEventsLost";

    // Phase 1, outboundTrafficPolicy ALLOW_ANY: calls that leave the mesh
    // pass through.
    let mut opts = LabOptions::bookinfo().unwrap();
    opts.exe = BIN.into();
    let first = phase(opts.clone(), agent_addr, |lab| {
        steady_load(lab, 3);
        leave_the_mesh(lab);
    });
    wait_for_two_scrapes(&prometheus);
    check("phase 1 (ALLOW_ANY)", &|_, name| name == PASSTHROUGH);
    drop(first);

    // Phase 2, REGISTRY_ONLY: the same calls are blackholed; reviews fails
    // often (more than the sidecars' two retries hide), and the outbound
    // sidecars take longer than the alert's 10 ms.
    opts.policy = Some(OutboundTrafficPolicy::RegistryOnly);
    opts.delay_outbound_ms = 15.0;
    for pod in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        opts.error_rate.insert(pod.into(), 0.6);
    }
    let (lab, agent) = phase(opts, agent_addr, |lab| {
        std::thread::scope(|s| {
            s.spawn(|| steady_load(lab, 10));
            leave_the_mesh(lab);
        });
    });
    wait_for_two_scrapes(&prometheus);
    assert_eq!(
        prometheus.query("up{job=\"mesh-trace\"} == 1").len(),
        1,
        "the agent is scraped"
    );

    // Every panel and variable query of every dashboard.
    let mut empty = Vec::new();
    let mut checked = 0;
    for (file, dashboard) in dashboards() {
        let queries: Vec<_> = panel_queries(&dashboard)
            .into_iter()
            .chain(variable_queries(&dashboard))
            .collect();
        assert!(!queries.is_empty(), "{file} has queries");
        for (what, expr) in queries {
            let expr = substitute(&expr);
            checked += 1;
            if prometheus.query(&expr).is_empty() {
                empty.push(format!("{file} {what}: {expr}"));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "queries with no data:\n{}",
        empty.join("\n")
    );
    assert!(checked >= 20, "only {checked} dashboard queries");
    check(
        "phase 2 (REGISTRY_ONLY, errors, slow sidecars)",
        &|group, name| group != "mesh-trace.availability" && name != PASSTHROUGH && name != LOST,
    );

    // Phase 3: an agent with a 4 KiB ring buffer, scraped before and after
    // a burst of connections far larger than it.
    drop(agent);
    let small = AgentProcess::start_on(
        agent_addr,
        &[
            "--lab",
            lab.dir.to_str().unwrap(),
            "--ring-buffer-bytes",
            "4096",
        ],
        &[],
    );
    wait_for_two_scrapes(&prometheus);
    overflow_the_ring_buffer();
    wait_for_two_scrapes(&prometheus);
    check("phase 3 (a small ring buffer)", &|_, name| name == LOST);

    // The availability alerts: the agent stops while Prometheus scrapes on.
    drop(small);
    wait_for_two_scrapes(&prometheus);
    check("agent stopped", &|group, _| {
        group == "mesh-trace.availability"
    });

    // Every rule Prometheus loaded was checked in one of the phases.
    let (loaded, _) = check_rules(&prometheus, |_, _| true);
    let missed: Vec<_> = loaded.difference(&all_rules).collect();
    assert!(missed.is_empty(), "rules never checked: {missed:?}");
    assert!(all_rules.len() >= 10, "only {} rules", all_rules.len());
    let _ = std::fs::remove_dir_all(&scratch);
}
