//! The shipped dashboards and rules against a real Prometheus: the lab runs
//! with errors, slow sidecars, blackholed calls and a burst that overflows
//! the ring buffer; the agent is scraped every second; then every query of
//! every dashboard panel and variable, and every rule, must return data, and
//! every alert must fire. Needs root and Debian's `prometheus` package.
use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::agent::{free_port, get, AgentProcess, BIN};
use mesh_trace::lab::{
    config::OutboundTrafficPolicy,
    topology::{Lab, LabOptions},
};
use serde_json::Value;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test builds a lab and loads eBPF programs: run it as root"
    );
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = repo().join("deploy/grafana");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 4, "four dashboards in {}", dir.display());
    out
}

/// Every PromQL expression of a dashboard, panels nested in rows included,
/// with where it came from.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((format!("panel {title:?} {}", t["refId"]), expr.into()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Template variables as PromQL: `label_values(metric, label)` asks for
/// the label's values, which `count by (label) (metric)` returns.
fn variable_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let query = match &v["query"] {
            Value::String(s) => s.clone(),
            q => q["query"].as_str().unwrap_or_default().to_string(),
        };
        let Some(args) = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
        else {
            panic!(
                "variable {}: only label_values() queries are checked: {query}",
                v["name"]
            );
        };
        let (metric, label) = args.rsplit_once(',').unwrap_or(("", args));
        let metric = if metric.trim().is_empty() {
            "{__name__=~\".+\"}"
        } else {
            metric.trim()
        };
        out.push((
            format!("variable {}", v["name"]),
            format!("count by ({}) ({metric})", label.trim()),
        ));
    }
    out
}

/// Grafana's variables as the test sets them: every value.
fn substitute(expr: &str) -> String {
    let mut s = expr.to_string();
    for (from, to) in [
        ("$__rate_interval", "1m"),
        ("${__rate_interval}", "1m"),
        ("$__interval", "15s"),
        ("${__interval}", "15s"),
        ("$__range", "5m"),
        ("${__range}", "5m"),
    ] {
        s = s.replace(from, to);
    }
    for var in ["namespace", "workload", "service"] {
        s = s.replace(&format!("${{{var}:regex}}"), ".*");
        s = s.replace(&format!("${{{var}}}"), ".*");
        s = s.replace(&format!("${var}"), ".*");
    }
    assert!(!s.contains('$'), "a variable left unsubstituted: {s}");
    s
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr, rules: &Path, dir: &Path) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: mesh-trace\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let addr = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package prometheus) must be installed");
        let mut p = Prometheus {
            child,
            addr,
            _dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(get(addr, "/-/ready", "*/*"), Ok((200, _))) {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!(
                    "prometheus exited: {status}\n{}",
                    std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "prometheus not ready in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn api(&self, path: &str) -> Value {
        let (status, body) = get(self.addr, path, "application/json").expect("prometheus API");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"].clone()
    }

    /// An instant query's result vector.
    fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", urlencode(expr)));
        match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => data["result"].as_array().unwrap().clone(),
            Some("scalar") => vec![data["result"].clone()],
            other => panic!("{expr}: result type {other:?}"),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
