//! The binary as a user meets it: exit codes, one-line errors, the preflight,
//! and the agent's endpoints and clean stop.
use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    process::{Command, Output, Stdio},
};

mod common;

use common::agent::{get, AgentProcess, BIN};

fn mesh_trace(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run mesh-trace")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests load eBPF programs: run them as root"
    );
}

#[test]
fn bad_flag_is_one_line_and_exit_2() {
    let out = mesh_trace(&["run", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--no-such-flag"), "{err}");
}

#[test]
fn kubernetes_metadata_needs_the_node_name_and_excludes_the_lab() {
    let out = Command::new(BIN)
        .args(["run", "--kubernetes"])
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("--node-name") && err.contains("NODE_NAME"),
        "{err}"
    );

    let out = mesh_trace(&["run", "--kubernetes", "--node-name", "n1", "--lab", "/tmp"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--lab"), "{}", stderr(&out));
}

#[test]
fn unreadable_config_is_one_line_and_exit_2() {
    let out = mesh_trace(&["run", "--config", "/nonexistent/mesh-trace.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/mesh-trace.toml"), "{err}");
}

#[test]
fn invalid_config_names_the_key() {
    let dir = std::env::temp_dir().join(format!("mt-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "metrics_adress = \"0.0.0.0:1\"\n").unwrap();
    let out = mesh_trace(&["run", "--config", path.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("metrics_adress"), "{err}");
}

#[test]
fn without_privileges_the_missing_capability_is_named() {
    require_root();
    // Drop to nobody with no capabilities at all.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args([BIN, "run", "--metrics-addr", "127.0.0.1:0"])
        .output()
        .expect("setpriv (util-linux) must be installed");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("missing capability CAP_BPF"), "{err}");
    assert!(err.contains("CAP_PERFMON"), "{err}");
    // `check` says, for each capability that is missing, what stops working.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args([BIN, "check"])
        .output()
        .expect("setpriv (util-linux) must be installed");
    let report = String::from_utf8_lossy(&out.stdout);
    for cap in mesh_trace::kernel::caps::Cap::ALL {
        assert!(
            report.contains(&format!("without it: {}", cap.without())),
            "{cap:?}: {report}"
        );
    }
}

#[test]
fn check_reports_this_kernel() {
    require_root();
    let out = mesh_trace(&["check", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hook = |name: &str| {
        report["features"]["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["hook"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {report}"))["available"]
            .as_bool()
            .unwrap()
    };
    // What this machine kind allows (see README, Requirements).
    for available in [
        "tracepoint",
        "tp_btf",
        "raw_tracepoint",
        "sock_ops",
        "cgroup_sock_addr",
        "cgroup_sockopt",
        "netfilter_link",
        "uprobe",
    ] {
        assert!(hook(available), "{available} should load here: {report}");
    }
    for refused in ["kprobe", "fentry"] {
        assert!(!hook(refused), "{refused} should be refused here: {report}");
    }
    assert_eq!(report["blockers"].as_array().unwrap().len(), 0);
    // Every kernel struct member the programs read is in this kernel's BTF.
    assert!(report["btf_field_missing"].is_null(), "{report}");
    assert!(report["cgroup2"]
        .as_str()
        .unwrap()
        .starts_with("/sys/fs/cgroup"));

    let table = mesh_trace(&["check"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("RESULT: ok"), "{text}");
    assert!(text.contains("BTF fields     all found"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("fentry ") && l.contains(" no ")),
        "{text}"
    );
    // Each hook says what stops working without it; a missing one says so
    // in the table too.
    for h in report["features"]["hooks"].as_array().unwrap() {
        assert!(!h["without"].as_str().unwrap_or("").is_empty(), "{h}");
    }
    let tp_btf = report["features"]["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hook"] == "tp_btf")
        .unwrap();
    assert!(tp_btf["without"].as_str().unwrap().contains("no spans"));
    assert!(
        text.contains("without it: nothing: not used"),
        "the refused fentry hook says what it costs: {text}"
    );
}

fn link_count() -> usize {
    aya::programs::loaded_links().filter_map(Result::ok).count()
}

#[test]
fn agent_serves_valid_metrics_and_stops_cleanly() {
    require_root();
    let links_before = link_count();
    let mut agent = AgentProcess::start(&[], &[]);
    let addr = agent.addr;
    assert!(link_count() >= links_before + 3, "programs attached");
    assert_eq!(get(addr, "/healthz", "*/*").unwrap().0, 200);

    // Traffic so the counters move.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();

    let (status, text) = get(addr, "/metrics", "*/*").unwrap();
    assert_eq!(status, 200);
    for name in [
        "mesh_trace_build_info{",
        "mesh_trace_events_lost_total{reason=\"ringbuf_full\"}",
        "mesh_trace_events_total{kind=\"connect\"}",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let (_, om) = get(
        addr,
        "/metrics",
        "application/openmetrics-text; version=1.0.0",
    )
    .unwrap();
    assert!(om.ends_with("# EOF\n"), "OpenMetrics when asked for:\n{om}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "agent exit status {status}");
    assert_eq!(link_count(), links_before, "links left after SIGTERM");
}
