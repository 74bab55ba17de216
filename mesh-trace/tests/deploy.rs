//! What ships in deploy/: manifests and overlays valid for the Kubernetes
//! versions supported, dashboards valid for Grafana, rules that pass their
//! own unit tests, and a DaemonSet whose capabilities are enough for the
//! agent to trace a lab and each of which is needed, on a read-only root
//! filesystem as the DaemonSet runs it.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

mod common;

use common::agent::{free_port, get, metric, metric_sum, BIN};
use mesh_trace::lab::topology::{Lab, LabOptions};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a checking script or tool from the repository root, with the tools
/// `cargo xtask setup` installs on PATH; its output is shown, and it must
/// succeed.
fn passes(cmd: &mut Command) {
    let tools = repo().join("target/tools/python/bin");
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = cmd
        .env("PATH", path)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run `cargo xtask setup`)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
}

#[test]
fn manifests_and_overlays_validate_against_kubernetes_schemas() {
    passes(Command::new("bash").arg("deploy/validate.sh"));
}

#[test]
fn dashboards_validate_against_grafanas_schema() {
    passes(Command::new("bash").arg("deploy/grafana/validate/validate.sh"));
}

#[test]
fn alerting_rules_pass_their_unit_tests() {
    passes(Command::new("promtool").args(["test", "rules", "deploy/prometheus/rules.test.yaml"]));
}

/// The capabilities the DaemonSet adds, from its manifest.
fn daemonset_capabilities() -> Vec<String> {
    let path = repo().join("deploy/kustomize/base/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text.lines().skip_while(|l| l.trim() != "add:").skip(1);
    let mut caps = Vec::new();
    for line in lines.by_ref() {
        let t = line.trim();
        if t.starts_with('#') {
            continue;
        }
        match t.strip_prefix("- ") {
            Some(cap) => caps.push(cap.trim().to_string()),
            None => break,
        }
    }
    assert!(
        !caps.is_empty(),
        "no capabilities added in {}",
        path.display()
    );
    caps
}

struct Outcome {
    ready: bool,
    redirects: f64,
    requests: f64,
    log: String,
}

/// Who the agent runs as.
#[derive(Clone, Copy)]
enum User {
    /// Root with only the given capabilities, as the container runtime
    /// runs the DaemonSet's container.
    Root,
    /// nobody (65534), holding the given capabilities as ambient ones.
    Nobody,
}

/// The filesystem the agent sees.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Root {
    Writable,
    /// Every mount read-only, in a mount namespace of the agent's own: the
    /// DaemonSet's `readOnlyRootFilesystem` and its read-only host mounts.
    ReadOnly,
}

/// Runs the agent as `user` with only `caps`, drives requests through the
/// lab, and says what it saw.
fn trace_with(lab: &Lab, caps: &[String]) -> Outcome {
    trace_as(lab, User::Root, caps, Root::Writable)
}

/// Remounts every mount read-only (a private mount namespace keeps the
/// host's as they are), checks that `/` refuses a write, then runs the
/// command given after it.
const READ_ONLY_ROOT: &str = r#"findmnt -rno TARGET | while read -r m; do
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
if touch /.mesh-trace-rw-check 2>/dev/null; then
  rm -f /.mesh-trace-rw-check; echo "/ is still writable" >&2; exit 97
fi
exec "$@""#;

fn trace_as(lab: &Lab, user: User, caps: &[String], root: Root) -> Outcome {
    let set = |base: &str| -> String {
        std::iter::once(base.to_string())
            .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",")
    };
    let addr = free_port();
    let log = lab.dir.join(format!("agent-{}.log", addr.port()));
    let mut setpriv = match root {
        Root::Writable => Command::new("setpriv"),
        Root::ReadOnly => {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(READ_ONLY_ROOT)
                .args(["sh", "setpriv"]);
            c
        }
    };
    setpriv.arg(format!("--bounding-set={}", set("-all")));
    match user {
        User::Root => setpriv.arg("--inh-caps=-all"),
        User::Nobody => setpriv
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps={}", set("-all")))
            .arg(format!("--ambient-caps={}", set("-all"))),
    };
    let mut child = setpriv
        .args([BIN, "run", "--metrics-addr"])
        .arg(addr.to_string())
        .arg("--lab")
        .arg(&lab.dir)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("setpriv (util-linux)");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        if let Ok((200, _)) = get(addr, "/readyz", "*/*") {
            break true;
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut redirects, mut requests) = (0.0, 0.0);
    if ready {
        lab.load_with(
            BIN.as_ref(),
            "loadgen-v1",
            &[
                "--url",
                "http://productpage:9080/productpage",
                "--requests",
                "50",
                "--new-connections",
            ],
            &lab.dir.join("client.jsonl"),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let (_, text) = get(addr, "/metrics", "*/*").unwrap();
        redirects =
            metric(&text, "mesh_trace_redirects_total{direction=\"outbound\"}").unwrap_or(0.0);
        requests = metric_sum(&text, "mesh_trace_requests_total{reporter=\"source\"");
    }
    let _ = child.kill();
    let _ = child.wait();
    Outcome {
        ready,
        redirects,
        requests,
        log: std::fs::read_to_string(&log).unwrap_or_default(),
    }
}

#[test]
fn the_daemonsets_capabilities_are_enough_and_each_is_needed() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test builds a lab and loads eBPF programs: run it as root"
    );
    let caps = daemonset_capabilities();
    let mut opts = LabOptions::bookinfo().unwrap();
    opts.exe = BIN.into();
    let lab = Lab::up(&opts).unwrap();

    let all = trace_with(&lab, &caps);
    assert!(all.ready, "not ready with {caps:?}:\n{}", all.log);
    assert!(
        all.redirects >= 50.0 && all.requests >= 100.0,
        "with {caps:?}: {} redirects at the NAT step, {} requests:\n{}",
        all.redirects,
        all.requests,
        all.log
    );
    for cap in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        let o = trace_with(&lab, &fewer);
        let degraded = !o.ready || o.redirects == 0.0 || o.requests == 0.0;
        assert!(
            degraded,
            "{cap} is not needed: without it the agent was ready and saw {} redirects and {} requests",
            o.redirects,
            o.requests
        );
    }
    // On a read-only root filesystem, every mount read-only, as the
    // DaemonSet runs it: the agent writes nothing to disk.
    let manifest =
        std::fs::read_to_string(repo().join("deploy/kustomize/base/daemonset.yaml")).unwrap();
    assert!(manifest.contains("readOnlyRootFilesystem: true"));
    let read_only = trace_as(&lab, User::Root, &caps, Root::ReadOnly);
    assert!(
        read_only.ready && read_only.redirects >= 50.0 && read_only.requests >= 100.0,
        "on a read-only root with {caps:?}: ready {}, {} redirects, {} requests:\n{}",
        read_only.ready,
        read_only.redirects,
        read_only.requests,
        read_only.log
    );
    // Not root: the same capabilities held by nobody do as well.
    let nobody = trace_as(&lab, User::Nobody, &caps, Root::Writable);
    assert!(
        nobody.ready && nobody.redirects >= 50.0 && nobody.requests >= 100.0,
        "as nobody with {caps:?}: ready {}, {} redirects, {} requests:\n{}",
        nobody.ready,
        nobody.redirects,
        nobody.requests,
        nobody.log
    );
    // The narrower set often suggested instead of SYS_ADMIN does not do:
    // entering pod network namespaces (setns) takes SYS_ADMIN.
    let narrow: Vec<String> = ["NET_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"]
        .map(String::from)
        .to_vec();
    let o = trace_with(&lab, &narrow);
    assert!(
        !o.ready || o.redirects == 0.0 || o.requests == 0.0,
        "{narrow:?} was enough: ready, {} redirects and {} requests",
        o.redirects,
        o.requests
    );
}
