//! One module per subcommand, each a thin layer over the library: parse
//! its flags, call into [`crate::agent`], [`crate::top`] or the lab, print.
//! `demo`, `lab` and `bench` drive the lab and exist only with the `lab`
//! feature (the DaemonSet image is built without it).
#[cfg(feature = "lab")]
pub mod bench;
pub mod check;
#[cfg(feature = "lab")]
pub mod demo;
pub mod flows;
#[cfg(feature = "lab")]
pub mod lab;
pub mod run;
pub mod spans;
pub mod top;

/// JSON lines to stdout, each flushed, up to an optional count; reaching it
/// sets `done`, which ends the command.
struct LinePrinter {
    limit: Option<u64>,
    printed: u64,
    done: tokio::sync::watch::Sender<bool>,
}

impl LinePrinter {
    fn new(limit: Option<u64>, done: tokio::sync::watch::Sender<bool>) -> LinePrinter {
        LinePrinter {
            limit,
            printed: 0,
            done,
        }
    }

    /// Prints `line` unless the count was reached; false once it is.
    fn print(&mut self, line: impl std::fmt::Display) -> bool {
        use std::io::Write as _;
        let full = |p: &LinePrinter| p.limit.is_some_and(|c| p.printed >= c);
        if full(self) {
            return false;
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        self.printed += 1;
        if full(self) {
            let _ = self.done.send(true);
            return false;
        }
        true
    }
}

/// `spans --agent` and `flows --agent`: prints the lines of an agent's
/// feed at `api` (filtered by `query`) until `count` lines, `duration`, a
/// signal, or the agent ends it. Lines the reader fell behind on are said
/// on stderr, not mixed into the output.
fn follow_agent_feed(
    agent: &str,
    api: &str,
    query: &str,
    count: Option<u64>,
    duration: Option<std::time::Duration>,
) -> Result<(), crate::error::Failure> {
    use anyhow::Context as _;

    use crate::{agent::client, agent::feed::skipped, error::Failure};
    let url = client::AgentUrl::parse(agent).map_err(Failure::usage)?;
    let path = match query {
        "" => url.path(api),
        q => format!("{}?{q}", url.path(api)),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let stop = crate::shutdown::stop_on(duration, done_rx)?;
        let mut printer = LinePrinter::new(count, done_tx);
        let follow = client::follow_lines(&url, &path, |line| {
            if let Some(n) = skipped(line) {
                tracing::warn!("{n} items skipped: this reader fell behind the agent's feed");
                return true;
            }
            printer.print(line)
        });
        tokio::select! {
            r = follow => r.with_context(|| format!("following {url}{api}")).map_err(Failure::from),
            _ = stop => Ok(()),
        }
    })
}
