//! The live view of an agent's per-hop statistics, in the terminal, or
//! printed once as text for scripts (`mesh-trace top`).
//!
//! - [`source`] fetches the statistics (an agent's `/api/v1/stats`, an
//!   agent in this process, or the whole cluster's from Prometheus through
//!   [`prometheus`]) on a tokio task, every interval;
//! - [`app`] is the view's state and what each key does;
//! - [`ui`] draws it; [`stats`] has the pure parts shared with `--once`.
//!
//! The terminal is driven from a blocking thread that reads keys and the
//! latest sample, so neither waits on the other.
pub mod app;
pub mod prometheus;
pub mod source;
pub mod stats;
pub mod ui;

use std::{
    io::IsTerminal as _,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicI32, Ordering},
        Arc, Once,
    },
    time::Duration,
};

use anyhow::Context as _;
use crossterm::{
    cursor,
    event::{self, Event, KeyEventKind},
    execute,
    terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
};
use ratatui::{backend::CrosstermBackend, Terminal};

use crate::agent::http::AgentState;
use app::App;
use source::Source;

/// The plain-text snapshot: a summary of the agent, then the table.
pub fn once_text(s: &stats::AgentStats, source: &str) -> String {
    let a = &s.agent;
    let mut out = match a.agents {
        // The cluster, through Prometheus: no one agent's programs.
        Some(agents) => format!(
            "mesh-trace {} at {source}: agents {agents} events {} lost {} flows {} in flight {} window {:.0}s\n",
            a.version,
            a.events_total,
            a.events_lost,
            a.flows_tracked,
            a.requests_in_flight,
            s.window_s
        ),
        None => format!(
            "mesh-trace {} at {source}: events {} lost {} flows {} in flight {} programs {} window {:.0}s\n",
            a.version,
            a.events_total,
            a.events_lost,
            a.flows_tracked,
            a.requests_in_flight,
            a.programs.len(),
            s.window_s
        ),
    };
    out.push_str(&match a.fallbacks.as_slice() {
        [] => "fallbacks: none\n".to_string(),
        list => format!("fallbacks: {}\n", list.join("; ")),
    });
    let rows = stats::visible_rows(&s.rows, "", stats::SortKey::Rate, false);
    if rows.is_empty() {
        out.push_str(&format!("no requests in the last {:.0} s\n", s.window_s));
    } else {
        out.push('\n');
        out.push_str(&stats::plain_table(&rows));
        out.push_str("(milliseconds; hops are medians; * marks the largest hop of each row)\n");
    }
    out
}

/// The interactive view, running: sampling on the runtime, the terminal on
/// a blocking thread.
pub struct View {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl View {
    /// Takes over the terminal and starts the view; call inside a tokio
    /// runtime. The terminal is restored when the view ends, however it
    /// ends.
    pub fn start(source: Source, interval: Duration) -> anyhow::Result<View> {
        let label = source.describe();
        let samples = source::spawn_sampler(source, interval);
        let guard = TerminalGuard::enter()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::task::spawn_blocking(move || {
            let result = draw_loop(&guard, samples, App::new(label, interval), &flag);
            drop(guard);
            result
        });
        Ok(View { stop, task })
    }

    /// Runs until the user quits (None) or `stop` resolves first (its
    /// output); either way the terminal is restored on return.
    pub async fn run_until<T>(
        mut self,
        stop: impl std::future::Future<Output = T>,
    ) -> anyhow::Result<Option<T>> {
        let stopped = tokio::select! {
            r = &mut self.task => {
                r.context("the view's thread")??;
                return Ok(None);
            }
            t = stop => t,
        };
        self.stop.store(true, Ordering::Release);
        (&mut self.task).await.context("the view's thread")??;
        Ok(Some(stopped))
    }
}

impl Drop for View {
    /// A view dropped without `run_until` (an error path) still ends its
    /// thread, which restores the terminal: a runtime waits for blocking
    /// tasks when it shuts down.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// The live view of an agent running in this process (the demo's), when
/// stdout is a terminal; None otherwise, so scripts keep their text.
pub fn view_if_terminal(state: &Arc<AgentState>) -> anyhow::Result<Option<View>> {
    if !std::io::stdout().is_terminal() {
        return Ok(None);
    }
    View::start(Source::Local(state.clone()), Duration::from_secs(1)).map(Some)
}

/// Longest wait for a key before looking at the samples and the stop flag
/// again: the view is at most this late, and never redraws faster than
/// keys and samples arrive.
const POLL: Duration = Duration::from_millis(100);

fn draw_loop(
    guard: &TerminalGuard,
    mut samples: source::Samples,
    mut app: App,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut terminal = guard.terminal()?;
    let mut dirty = true;
    let mut was_paused = false;
    // The header shows how old the data is when the agent is unreachable:
    // redraw once a second then, even without news.
    let mut last_draw = std::time::Instant::now();
    while !app.quit && !stop.load(Ordering::Acquire) {
        // Sender gone means the runtime is shutting down: keep the last view.
        let fresh = samples.has_changed().unwrap_or(false);
        let resumed = was_paused && !app.paused;
        if (fresh || resumed) && !app.paused {
            let latest = samples.borrow_and_update().clone();
            if let Some(sample) = latest {
                app.on_sample(&sample);
                dirty = true;
            }
        }
        was_paused = app.paused;
        if app.error.is_some() && last_draw.elapsed() >= Duration::from_secs(1) {
            dirty = true;
        }
        if dirty {
            terminal.draw(|f| ui::draw(f, &app))?;
            last_draw = std::time::Instant::now();
            dirty = false;
        }
        if event::poll(POLL)? {
            match event::read()? {
                Event::Key(key) if key.kind != KeyEventKind::Release => {
                    app.on_key(key);
                    dirty = true;
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
    }
    Ok(())
}

/// Whether the terminal is in the view's state (raw, alternate screen),
/// so the panic hook and the guard restore it exactly once.
static TERMINAL_TAKEN: AtomicBool = AtomicBool::new(false);
/// The real stderr while it points to a file, else -1.
static SAVED_STDERR: AtomicI32 = AtomicI32::new(-1);

/// Owns the terminal while the view is up: raw mode, alternate screen,
/// hidden cursor, stderr sent to a file (log lines written over the view
/// would garble it). Dropping it, or a panic anywhere, puts all of it back.
struct TerminalGuard {
    log: Option<PathBuf>,
}

impl TerminalGuard {
    fn enter() -> anyhow::Result<TerminalGuard> {
        install_panic_hook();
        let log = redirect_stderr();
        let guard = TerminalGuard { log };
        terminal::enable_raw_mode().context("switching the terminal to raw mode")?;
        TERMINAL_TAKEN.store(true, Ordering::Release);
        execute!(std::io::stdout(), EnterAlternateScreen, cursor::Hide)
            .context("entering the alternate screen")?;
        Ok(guard)
    }

    fn terminal(&self) -> anyhow::Result<Terminal<CrosstermBackend<std::io::Stdout>>> {
        let mut t = Terminal::new(CrosstermBackend::new(std::io::stdout()))
            .context("opening the terminal")?;
        t.clear()?;
        Ok(t)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
        // Say where the log went, unless nothing was written to it.
        if let Some(path) = self.log.take() {
            match std::fs::metadata(&path) {
                Ok(m) if m.len() > 0 => {
                    eprintln!(
                        "mesh-trace top: log while the view was open: {}",
                        path.display()
                    )
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

/// Idempotent: the panic hook and the guard both call it.
fn restore_terminal() {
    if TERMINAL_TAKEN.swap(false, Ordering::AcqRel) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
    }
    restore_stderr();
}

fn install_panic_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // First the terminal and stderr, so the message is readable.
            restore_terminal();
            previous(info);
        }));
    });
}

/// Points fd 2 at a file in the temporary directory and returns its path;
/// None (stderr untouched) if that cannot be done.
fn redirect_stderr() -> Option<PathBuf> {
    let path = std::env::temp_dir().join(format!("mesh-trace-top.{}.log", std::process::id()));
    let file = std::fs::File::create(&path).ok()?;
    let saved = nix::unistd::dup(2).ok()?;
    if nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&file), 2).is_err() {
        let _ = nix::unistd::close(saved);
        return None;
    }
    SAVED_STDERR.store(saved, Ordering::Release);
    Some(path)
}

fn restore_stderr() {
    let saved = SAVED_STDERR.swap(-1, Ordering::AcqRel);
    if saved >= 0 {
        let _ = nix::unistd::dup2(saved, 2);
        let _ = nix::unistd::close(saved);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        agent::http::AgentInfo,
        spans::live::{Percentiles, Row},
    };

    #[test]
    fn once_text_summarises_the_agent_and_prints_the_table() {
        let p = |v: f64| Percentiles {
            count: 3,
            p50_ms: v,
            p90_ms: v,
            p99_ms: v,
            max_ms: v,
        };
        let stats = stats::AgentStats {
            agent: AgentInfo {
                version: "0.1.0".into(),
                programs: vec!["a".into(), "b".into()],
                fallbacks: vec!["x: y".into()],
                events_total: 42,
                ..AgentInfo::default()
            },
            window_s: 60.0,
            rows: vec![Row {
                source_workload: "loadgen".into(),
                destination_service: "reviews".into(),
                requests: 10,
                rate: 5.0,
                errors: 0,
                error_rate: 0.0,
                retries: 0,
                total: p(30.0),
                hops: BTreeMap::from([("app".to_string(), p(20.0))]),
                sidecar_share: None,
                slowest: vec![],
                tcp: Default::default(),
            }],
        };
        let text = once_text(&stats, "http://x:1");
        assert!(
            text.starts_with("mesh-trace 0.1.0 at http://x:1: events 42 lost 0"),
            "{text}"
        );
        assert!(text.contains("programs 2"), "{text}");
        assert!(text.contains("fallbacks: x: y"), "{text}");
        assert!(text.contains("loadgen -> reviews"), "{text}");
        assert!(text.contains("20.0*"), "{text}");
        let empty = stats::AgentStats {
            rows: vec![],
            ..stats
        };
        assert!(once_text(&empty, "x").contains("no requests in the last 60 s"));
    }
}
