//! The NAT observers of pod network namespaces, attached and released on a
//! thread of their own as namespaces come and go. Each new namespace costs
//! two program loads, a `setns` and two links (milliseconds); on the event
//! loop, a burst of new pods would hold up the ring buffer's drain.
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{mpsc, Arc},
    thread::JoinHandle,
    time::Duration,
};

use tokio::sync::watch;

use crate::kernel::nat::NatWatch;

/// The namespaces observed after the latest scan.
#[derive(Debug, Default)]
pub struct Watched {
    pub cookies: HashSet<u64>,
}

/// The scanning thread; dropping it stops the thread and releases every
/// observer (programs and links).
pub struct NetnsWatcher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    watched: watch::Receiver<Arc<Watched>>,
}

impl NetnsWatcher {
    /// Scans `dir` once before returning (so that the namespaces there now
    /// are observed when the agent says it is ready), then every `every`
    /// on a thread.
    pub fn start(nat: NatWatch, dir: PathBuf, every: Duration) -> std::io::Result<NetnsWatcher> {
        let mut scanner = Scanner {
            nat,
            failed: HashSet::new(),
        };
        let (tx, watched) = watch::channel(Arc::new(scanner.scan(&dir)));
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("netns-watch".into())
            .spawn(move || {
                // Any message, or the agent's end of the channel dropped, stops it.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    let _ = tx.send(Arc::new(scanner.scan(&dir)));
                }
            })?;
        Ok(NetnsWatcher {
            stop: Some(stop),
            thread: Some(thread),
            watched,
        })
    }

    /// What the latest scan observed.
    pub fn watched(&self) -> Arc<Watched> {
        self.watched.borrow().clone()
    }
}

impl Drop for NetnsWatcher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Attaches observers to the namespaces in a directory as they come and
/// go; a namespace that fails is reported once, not at every scan.
struct Scanner {
    nat: NatWatch,
    failed: HashSet<String>,
}

impl Scanner {
    fn scan(&mut self, dir: &Path) -> Watched {
        let names: HashSet<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for name in &names {
            if self.failed.contains(name) {
                continue;
            }
            match self.nat.watch(dir, name) {
                Ok(true) => tracing::debug!("watching NAT in network namespace {name}"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!("{:#}", crate::kernel::summarize(e));
                    self.failed.insert(name.clone());
                }
            }
        }
        self.failed.retain(|n| names.contains(n));
        self.nat.retain(&names);
        Watched {
            cookies: self.nat.cookies().collect(),
        }
    }
}
