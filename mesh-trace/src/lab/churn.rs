//! Pod churn, for the churn test and bench: pod-like network namespaces,
//! each redirecting its outbound port 9080 to a local 15001 listener as
//! istio-iptables does, created and deleted while short connections run
//! through their REDIRECTs. Each worker keeps a few namespaces alive at
//! once, so each lives for the connections of several others: some are
//! found by the agent's scan (once a second) and observed before they go,
//! some are not.
use std::{
    collections::VecDeque,
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::netns::NetNs;

#[derive(Clone, Copy, Debug)]
pub struct ChurnOptions {
    pub pods: usize,
    pub connections_per_pod: usize,
    pub workers: usize,
    /// Namespaces each worker keeps alive at once.
    pub alive_per_worker: usize,
    /// At most this many connections per second in all, if set.
    pub max_per_s: Option<u32>,
    /// Workers at the lowest CPU priority (nice 19): load from other pods
    /// that takes what the traced ones leave, instead of keeping them off
    /// the CPU for tens of ms.
    pub background: bool,
}

/// The churn under way.
pub struct Churn {
    connections: Arc<AtomicUsize>,
    workers: Vec<JoinHandle<anyhow::Result<()>>>,
    started: Instant,
}

impl Churn {
    /// Starts the workers; namespaces are named `{prefix}-{pod}`.
    pub fn start(prefix: &str, opts: ChurnOptions) -> Churn {
        let connections = Arc::new(AtomicUsize::new(0));
        let workers = (0..opts.workers)
            .map(|w| {
                let (c, prefix) = (connections.clone(), prefix.to_string());
                std::thread::spawn(move || worker(&prefix, w, opts, &c))
            })
            .collect();
        Churn {
            connections,
            workers,
            started: Instant::now(),
        }
    }

    /// Connections made so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn is_finished(&self) -> bool {
        self.workers.iter().all(|w| w.is_finished())
    }

    /// Waits for the workers; returns the connections made and the time.
    pub fn join(self) -> anyhow::Result<(usize, Duration)> {
        for w in self.workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a churn worker panicked"))??;
        }
        Ok((
            self.connections.load(Ordering::Relaxed),
            self.started.elapsed(),
        ))
    }
}

fn worker(
    prefix: &str,
    worker: usize,
    opts: ChurnOptions,
    connections: &AtomicUsize,
) -> anyhow::Result<()> {
    if opts.background {
        // This thread only (Linux's nice is per thread).
        // SAFETY: plain system calls on the calling thread.
        let failed =
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) } != 0;
        anyhow::ensure!(!failed, "nice 19: {}", std::io::Error::last_os_error());
    }
    let mut alive = VecDeque::new();
    let per_pod = opts.connections_per_pod;
    let started = Instant::now();
    let mut made = 0usize;
    for pod in (worker..opts.pods).step_by(opts.workers.max(1)) {
        let ns = NetNs::redirecting(&format!("{prefix}-{pod}"), 9080, 15001)?;
        ns.enter(move || -> anyhow::Result<()> {
            let listener = TcpListener::bind("127.0.0.1:15001")?;
            for _ in 0..per_pod {
                // Redirected to the listener by the nat table.
                let client = TcpStream::connect("127.0.0.1:9080")?;
                let (server, _) = listener.accept()?;
                drop(client);
                drop(server);
            }
            Ok(())
        })?
        .with_context(|| format!("connections in pod {pod}"))?;
        connections.fetch_add(per_pod, Ordering::Relaxed);
        made += per_pod;
        if let Some(max) = opts.max_per_s {
            // This worker's share of the rate: wait until it is due.
            let share = f64::from(max) / opts.workers.max(1) as f64;
            let due = Duration::from_secs_f64(made as f64 / share);
            std::thread::sleep(due.saturating_sub(started.elapsed()));
        }
        alive.push_back(ns);
        if alive.len() > opts.alive_per_worker {
            alive.pop_front();
        }
    }
    Ok(())
}
