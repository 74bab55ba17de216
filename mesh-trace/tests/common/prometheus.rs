//! A real Prometheus (Debian's package) scraping agents, and the shipped
//! dashboards' queries as PromQL it can run.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use super::agent::{free_port, get};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn dashboards() -> Vec<(String, Value)> {
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
pub fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
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
pub fn variable_queries(dashboard: &Value) -> Vec<(String, String)> {
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
pub fn substitute(expr: &str) -> String {
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

pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    _dir: PathBuf,
}

impl Prometheus {
    pub fn start(target: SocketAddr, rules: &Path, dir: &Path) -> Prometheus {
        Self::start_scraping(&[target], rules, dir)
    }

    /// A Prometheus scraping every one of `targets` each second (one job).
    pub fn start_scraping(targets: &[SocketAddr], rules: &Path, dir: &Path) -> Prometheus {
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let targets = targets.join(", ");
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: mesh-trace\n    static_configs:\n      - targets: [{targets}]\n",
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

    pub fn api(&self, path: &str) -> Value {
        let (status, body) = get(self.addr, path, "application/json").expect("prometheus API");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"].clone()
    }

    /// An instant query's result vector.
    pub fn query(&self, expr: &str) -> Vec<Value> {
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
