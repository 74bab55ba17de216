//! `mesh-trace top` against a real agent watching the lab: the one-shot text
//! table, and the interactive view driven through tmux (keys in, screen
//! captured), including losing and regaining the agent; and `spans` and
//! `flows` following that agent. Needs root.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mesh_trace::lab::topology::{Lab, LabOptions};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-trace");
const CLIENT: &str = "loadgen-v1";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "top tests load eBPF programs and build a lab: run them as root"
    );
}

/// Outbound sidecar 2 ms each way, inbound 3 ms each way, reviews 20 ms:
/// the delays the spans tests check the kernel's hops against.
fn delayed_lab() -> LabOptions {
    let mut o = LabOptions::bookinfo().unwrap();
    o.exe = BIN.into();
    o.delay_outbound_ms = 2.0;
    o.delay_inbound_ms = 3.0;
    for pod in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        o.service_time_ms.insert(pod.into(), 20.0);
    }
    o
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.1 GET; None when nothing answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The agent binary (`mesh-trace run`), stopped with SIGTERM on drop so it
/// detaches its programs.
struct Agent {
    child: Option<Child>,
}

impl Agent {
    fn start(lab: &Lab, port: u16, log: &Path) -> Agent {
        let child = Command::new(BIN)
            .args(["run", "--log-level", "warn", "--lab"])
            .arg(&lab.dir)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("starting the agent");
        let mut agent = Agent { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_get(port, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
                return agent;
            }
            let exited = agent.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none(),
                "agent exited ({exited:?}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            assert!(Instant::now() < deadline, "agent not ready in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tmux server of its own (its socket named after this process), so
/// nothing else's sessions are touched; killed on drop, pass or fail.
struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    fn start(width: u16, height: u16, command: &str) -> Tmux {
        let t = Tmux {
            socket: format!("mesh-trace-top-{}", std::process::id()),
            session: "top".into(),
        };
        let status = t
            .cmd()
            .args(["-f", "/dev/null", "new-session", "-d"])
            .args(["-x", &width.to_string(), "-y", &height.to_string()])
            .args(["-s", &t.session, command])
            .status()
            .expect("running tmux");
        assert!(status.success(), "tmux new-session failed");
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        // UTF-8, so the box drawing and arrows come back as they are.
        c.env("LANG", "C.UTF-8").args(["-L", &self.socket]);
        c
    }

    fn capture(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", &self.session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Named keys ("Enter", "Escape") or single characters.
    fn keys(&self, keys: &[&str]) {
        let status = self
            .cmd()
            .args(["send-keys", "-t", &self.session])
            .args(keys)
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Text typed as is.
    fn type_text(&self, text: &str) {
        let status = self
            .cmd()
            .args(["send-keys", "-l", "-t", &self.session, text])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The screen once `pred` holds, or a failure showing the last screen.
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture();
            if pred(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

/// The table of `top --once`: the header's fields and the row of a pair,
/// both split on whitespace (the pair is three fields on both lines).
fn once_row(text: &str, pair: &str) -> Option<(Vec<String>, Vec<String>)> {
    let header = text.lines().find(|l| l.starts_with("SOURCE -> SERVICE"))?;
    let row = text.lines().find(|l| l.starts_with(&format!("{pair} ")))?;
    let split = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    Some((split(header), split(row)))
}

fn field(header: &[String], row: &[String], name: &str) -> f64 {
    let at = header
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no column {name} in {header:?}"));
    let text = row[at].trim_end_matches('*');
    text.parse()
        .unwrap_or_else(|_| panic!("{name} = {text:?} in {row:?}"))
}

fn top_once(port: u16, json: bool) -> std::process::Output {
    let mut c = Command::new(BIN);
    c.args([
        "top",
        "--once",
        "--agent",
        &format!("http://127.0.0.1:{port}"),
    ]);
    if json {
        c.arg("--json");
    }
    c.stdin(Stdio::null()).output().expect("running top --once")
}

/// Rows of the interactive table: the lines with a pair in them.
fn table_rows(screen: &str) -> Vec<&str> {
    screen
        .lines()
        .filter(|l| l.starts_with('│') && l.contains(" -> ") && !l.contains("SOURCE"))
        .collect()
}

fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

/// Saves a capture for the README when MESH_TRACE_UPDATE_DOCS=1, so that a
/// test run leaves the checkout unchanged by default.
fn save_capture(name: &str, screen: &str) {
    if std::env::var_os("MESH_TRACE_UPDATE_DOCS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(docs_dir()).unwrap();
        std::fs::write(docs_dir().join(name), screen).unwrap();
    }
}

/// `spans --agent` and `flows --agent` next to a running agent print that
/// agent's spans and legs (a second set of probes would contend for its
/// hooks), filtered by the agent: each follower gets only what it asked
/// for, and the spans are the client's own requests with their hops.
#[test]
fn spans_and_flows_follow_a_running_agent_with_filters() {
    require_root();
    let lab = Lab::up(&delayed_lab()).unwrap();
    let port = free_port();
    let _agent = Agent::start(&lab, port, &lab.dir.join("agent.log"));
    let url = format!("http://127.0.0.1:{port}");
    let follow = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .args(["--agent", &url, "--duration", "60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let to_reviews = follow(&["spans", "--service", "reviews", "--count", "40"]);
    let to_ratings = follow(&[
        "spans",
        "--service",
        "ratings",
        "--workload",
        "reviews",
        "--count",
        "10",
    ]);
    let mesh_legs = follow(&["flows", "--leg", "mesh", "--count", "3"]);
    // Each follower is listening once the agent counts it; a feed has no
    // history, so the load starts after.
    std::thread::sleep(Duration::from_secs(2));
    let records = lab.dir.join("client.jsonl");
    let summary = lab
        .load_with(
            BIN.as_ref(),
            CLIENT,
            &[
                "--url",
                "http://reviews:9080/reviews/0",
                "--rate",
                "50",
                "--requests",
                "100",
            ],
            &records,
        )
        .unwrap();
    assert_eq!(summary.ok, 100, "{summary:?}");
    let client: Vec<mesh_trace::lab::records::ClientRecord> =
        mesh_trace::lab::records::read_records(&records).unwrap();
    let ids: std::collections::HashSet<&str> =
        client.iter().map(|c| c.request_id.as_str()).collect();
    let lines = |child: Child, what: &str| -> Vec<serde_json::Value> {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let reviews = lines(to_reviews, "spans --service reviews");
    assert_eq!(reviews.len(), 40);
    for s in &reviews {
        assert_eq!(s["destination_service"], "reviews", "{s}");
        assert_eq!(s["source_workload"], "loadgen", "{s}");
        let id = s["request_id"].as_str().unwrap_or_default();
        assert!(ids.contains(id), "not one of the client's requests: {s}");
        assert!(
            s["hops_ms"]["app"].as_f64().is_some_and(|ms| ms >= 20.0),
            "{s}"
        );
    }
    let ratings = lines(to_ratings, "spans --service ratings --workload reviews");
    assert_eq!(ratings.len(), 10);
    assert!(ratings
        .iter()
        .all(|s| s["destination_service"] == "ratings" && s["source_workload"] == "reviews"));
    let legs = lines(mesh_legs, "flows --leg mesh");
    assert_eq!(legs.len(), 3);
    assert!(legs.iter().all(|l| l["leg"] == "mesh"), "{legs:?}");
    println!(
        "followed the agent: {} reviews spans, {} ratings spans, {} mesh legs",
        reviews.len(),
        ratings.len(),
        legs.len()
    );
}

#[test]
fn top_shows_the_hops_and_survives_the_agent() {
    require_root();
    let lab = Lab::up(&delayed_lab()).unwrap();
    let port = free_port();
    let mut agent = Agent::start(&lab, port, &lab.dir.join("agent-1.log"));
    let records = lab.dir.join("client.jsonl");
    let mut load = lab
        .spawn_load(
            CLIENT,
            &[
                "--url",
                "http://reviews:9080/reviews/0",
                "--rate",
                "50",
                "--duration-s",
                "20",
            ],
            &records,
        )
        .unwrap();

    let load_started = Instant::now();

    // 1. The one-shot table: once a few seconds of requests are in, the
    //    hops match the delays the lab adds.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (header, row) = loop {
        let out = top_once(port, false);
        assert!(
            out.status.success(),
            "top --once failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(!text.contains('\x1b'), "control codes in --once:\n{text}");
        if let Some((header, row)) = once_row(&text, "loadgen -> reviews") {
            if load_started.elapsed() >= Duration::from_secs(4) {
                println!("{text}");
                break (header, row);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no loadgen -> reviews row:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // The lab's sidecars sleep their delay once per request, before
    // forwarding it (`lab::proxy`), so each proxy hop is its delay plus the
    // proxy's own work (about 1-2 ms in a debug build): the same in both
    // sidecars, so the two differ by the 1 ms between their delays.
    let outbound = field(&header, &row, "out-sc");
    let inbound = field(&header, &row, "in-sc");
    let app = field(&header, &row, "app");
    assert!(
        (2.0..=6.0).contains(&outbound),
        "outbound proxy p50 {outbound} ms: {row:?}"
    );
    assert!(
        (3.0..=7.0).contains(&inbound),
        "inbound proxy p50 {inbound} ms: {row:?}"
    );
    let difference = inbound - outbound;
    assert!(
        (0.3..=2.0).contains(&difference),
        "inbound - outbound proxy {difference} ms: {row:?}"
    );
    assert!(app >= 20.0, "app p50 {app} ms: {row:?}");
    // Where the time goes in this lab: the app, marked as the largest hop.
    let app_at = header.iter().position(|h| h == "app").unwrap();
    assert!(row[app_at].ends_with('*'), "{row:?}");

    let out = top_once(port, true);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    assert!(
        json["rows"].as_array().is_some_and(|r| !r.is_empty()),
        "{json}"
    );
    assert!(json["agent"]["version"].is_string(), "{json}");

    // 2. The interactive view, in a terminal of 120 x 30. After it quits,
    //    the shell prints its status and the terminal's modes.
    let command = format!(
        "{BIN} top --agent http://127.0.0.1:{port}; echo EXITED rc=$?; \
         stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo; sleep 600"
    );
    let tmux = Tmux::start(120, 30, &command);
    let table = tmux.wait_for("the reviews row", Duration::from_secs(10), |s| {
        table_rows(s)
            .iter()
            .any(|r| r.contains("loadgen -> reviews"))
            && s.contains("sort: req/s")
            // A second sample is in: the event rate is known.
            && !s.contains("events -/s")
    });
    println!("{table}");
    save_capture("top.txt", &trim_screen(&table));

    // Sorting: the indicator moves to the next column.
    tmux.keys(&["s"]);
    tmux.wait_for("sorting by err%", Duration::from_secs(5), |s| {
        s.contains("sort: err%") && !s.contains("sort: req/s")
    });

    // Filtering: nothing matches, then Esc clears, then only reviews rows.
    tmux.keys(&["/"]);
    tmux.type_text("zzz");
    tmux.keys(&["Enter"]);
    tmux.wait_for("an empty filter result", Duration::from_secs(5), |s| {
        s.contains("no row matches \"zzz\"") && table_rows(s).is_empty()
    });
    tmux.keys(&["Escape"]);
    tmux.wait_for("the filter cleared", Duration::from_secs(5), |s| {
        !s.contains("filter:") && !table_rows(s).is_empty()
    });
    tmux.keys(&["/"]);
    tmux.type_text("reviews");
    tmux.keys(&["Enter"]);
    let filtered = tmux.wait_for("the reviews filter", Duration::from_secs(5), |s| {
        s.contains("filter: reviews") && !table_rows(s).is_empty()
    });
    for row in table_rows(&filtered) {
        assert!(
            row.contains("reviews"),
            "{row} passed the filter:\n{filtered}"
        );
    }

    // The detail of the selected row: its slowest requests, with their ids.
    tmux.keys(&["Home", "Enter"]);
    let detail = tmux.wait_for("the detail view", Duration::from_secs(5), |s| {
        s.contains("slowest requests") && s.contains("outbound_proxy")
    });
    println!("{detail}");
    let has_request_id = detail
        .split(|c: char| c.is_whitespace() || c == '│')
        .any(|t| t.len() == 36 && t.chars().filter(|&c| c == '-').count() == 4);
    assert!(
        has_request_id,
        "no request id in the detail view:\n{detail}"
    );
    save_capture("top-detail.txt", &trim_screen(&detail));
    tmux.keys(&["Escape"]);
    tmux.wait_for("the table again", Duration::from_secs(5), |s| {
        s.contains("sort: err%") && !s.contains("slowest requests")
    });

    // The agent goes away: the view says so and keeps retrying.
    agent.stop();
    tmux.wait_for("the unreachable state", Duration::from_secs(10), |s| {
        s.contains("agent unreachable") && s.contains("retrying")
    });
    // It comes back on the same port: the view recovers by itself.
    let _agent = Agent::start(&lab, port, &lab.dir.join("agent-2.log"));
    tmux.wait_for("the view to recover", Duration::from_secs(10), |s| {
        !s.contains("unreachable") && s.contains("events")
    });

    // q quits and the terminal is as it was: main screen, cooked mode.
    tmux.keys(&["q"]);
    let after = tmux.wait_for("top to exit", Duration::from_secs(10), |s| {
        s.contains("EXITED") && s.lines().any(|l| l.trim().ends_with("icanon"))
    });
    assert!(after.contains("EXITED rc=0"), "{after}");
    assert!(
        !after.contains("sort:") && !after.contains("q quit"),
        "the view is still on screen:\n{after}"
    );
    let modes: Vec<&str> = after.lines().map(str::trim).collect();
    assert!(
        modes.contains(&"icanon") && modes.contains(&"echo"),
        "raw mode left on:\n{after}"
    );
    let cursor = tmux
        .cmd()
        .args([
            "display-message",
            "-p",
            "-t",
            &tmux.session,
            "#{cursor_flag}",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cursor.stdout).trim(),
        "1",
        "cursor hidden"
    );

    let _ = load.kill();
    let _ = load.wait();
}

/// A captured screen for the docs: trailing blanks cut, and runs of empty
/// table lines (a 30-line terminal showing two rows) down to one.
fn trim_screen(screen: &str) -> String {
    let blank_row = |l: &str| {
        l.len() > 2
            && l.starts_with('│')
            && l.ends_with('│')
            && l.trim_matches('│').trim().is_empty()
    };
    let mut lines: Vec<&str> = Vec::new();
    for line in screen.lines().map(str::trim_end) {
        if blank_row(line) && lines.last().is_some_and(|l| blank_row(l)) {
            continue;
        }
        lines.push(line);
    }
    let last = lines
        .iter()
        .rposition(|l| !l.is_empty())
        .map_or(0, |i| i + 1);
    let mut out = lines[..last].join("\n");
    out.push('\n');
    out
}
