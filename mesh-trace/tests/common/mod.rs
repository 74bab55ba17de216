//! Shared by the kernel tests: the agent run in-process, collecting legs
//! and spans.
#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod agent;
pub mod kubeapi;
pub mod otlp;
pub mod prometheus;
pub mod truth;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_trace::{
    agent::http::AgentState,
    agent::{agent_with_spans, Settings},
    flows::table::LegRecord,
    lab::topology::Lab,
    spans::span::Span,
};

/// Waits until `done` holds, looking every 100 ms; fails after `limit`.
/// Waits until the agent has probed the sidecars' TLS library: HTTP/2
/// inside TLS is decoded only from a session's first bytes, so the tests
/// open the sidecars' sessions after it.
pub fn wait_for_libssl_probed(traced: &Traced) {
    let m = &traced.state.metrics;
    wait_for(
        "the sidecars' libssl probed",
        Duration::from_secs(30),
        || m.tls_files_probed.get() >= 1,
    );
}

pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// BPF links in the kernel now, whoever holds them.
pub fn bpf_links() -> usize {
    aya::programs::loaded_links().filter_map(Result::ok).count()
}

/// This process's peak resident memory, in MiB.
pub fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        / 1024
}

/// The agent, in this process, collecting every leg.
pub struct Traced {
    pub state: Arc<AgentState>,
    pub legs: Arc<Mutex<Vec<LegRecord>>>,
    pub spans: Arc<Mutex<Vec<Span>>>,
    keep_legs: Arc<std::sync::atomic::AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traced {
    /// Kernel events lost so far for `reason` (`ringbuf_full`, ...).
    pub fn events_lost(&self, reason: &'static str) -> u64 {
        self.state
            .metrics
            .events_lost
            .get_or_create(&mesh_trace::agent::metrics::ReasonLabel { reason })
            .get()
    }

    /// The requests that yielded no span so far, by reason (non-zero only).
    pub fn unstitched(&self) -> std::collections::BTreeMap<&'static str, u64> {
        mesh_trace::spans::stitch::Unstitched::ALL
            .iter()
            .map(|u| {
                let n = self
                    .state
                    .metrics
                    .requests_unstitched
                    .get_or_create(&mesh_trace::agent::metrics::ReasonLabel { reason: u.label() })
                    .get();
                (u.label(), n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn start(lab: &Lab) -> Traced {
        Self::start_with(Some(lab.dir.clone()), |_| {})
    }

    /// [`Traced::start`] with settings of the test's own.
    pub fn start_with_settings(lab: &Lab, tweak: impl FnOnce(&mut Settings)) -> Traced {
        Self::start_with(Some(lab.dir.clone()), tweak)
    }

    /// [`Traced::start`] with settings of the test's own, keeping spans but
    /// not legs (a test with millions of connections would hold them all).
    pub fn start_spans_only(lab: &Lab, tweak: impl FnOnce(&mut Settings)) -> Traced {
        let traced = Self::start_with(Some(lab.dir.clone()), tweak);
        traced
            .keep_legs
            .store(false, std::sync::atomic::Ordering::Relaxed);
        traced
    }

    /// The agent of one node of a lab of several: that node's pods'
    /// processes (cgroup), network namespaces and NAT steps only.
    pub fn start_on_node(lab: &Lab, node: &str, tweak: impl FnOnce(&mut Settings)) -> Traced {
        Self::start_with(Some(lab.dir.clone()), |s| {
            s.on_lab_node(node).expect("a node of the lab");
            tweak(s);
        })
    }

    /// The agent without any metadata source: namespaces are meshed only
    /// by the REDIRECTs seen in them.
    pub fn start_without_metadata() -> Traced {
        Self::start_with(None, |_| {})
    }

    fn start_with(
        lab_dir: Option<std::path::PathBuf>,
        tweak: impl FnOnce(&mut Settings),
    ) -> Traced {
        let state = Arc::new(AgentState::new());
        let legs = Arc::new(Mutex::new(Vec::new()));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut settings = Settings {
            ring_buffer_bytes: 1 << 22,
            max_flows: 65_536,
            ..Settings::in_process(lab_dir).expect("cgroup v2")
        };
        tweak(&mut settings);
        let keep_legs = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (st, lg, sp, keep) = (
            state.clone(),
            legs.clone(),
            spans.clone(),
            keep_legs.clone(),
        );
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(agent_with_spans(
                settings,
                st,
                async {
                    let _ = stopped.await;
                },
                move |l| {
                    if keep.load(std::sync::atomic::Ordering::Relaxed) {
                        lg.lock().unwrap().push(l.clone())
                    }
                },
                move |s| sp.lock().unwrap().push(s.clone()),
            ))
            .expect("agent");
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !state.ready.load(std::sync::atomic::Ordering::Acquire) {
            assert!(Instant::now() < deadline, "agent not ready");
            assert!(!thread.is_finished(), "agent stopped early");
            std::thread::sleep(Duration::from_millis(20));
        }
        Traced {
            state,
            legs,
            spans,
            keep_legs,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Waits until `pred` holds for the legs seen so far (or 10 s pass).
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[LegRecord]) -> bool) -> Vec<LegRecord> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let legs = self.legs.lock().unwrap().clone();
            if pred(&legs) {
                return legs;
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = legs
                    .iter()
                    .map(|l| format!("{} {:?} {:?}", l.event, l.leg, l.original_dst))
                    .collect();
                panic!(
                    "timed out waiting for {what}; legs seen:\n{}",
                    seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
