//! Everything that talks to the kernel.
pub mod asm;
pub mod batch;
pub mod btf;
pub mod caps;
pub mod events;
pub mod features;
pub mod nat;
pub mod netfilter;
pub mod objects;
pub mod preflight;
pub mod sockdiag;
pub mod sysfs;
pub mod tls;
pub mod tracer;

/// Shortens an error that carries a verifier log to its first line and the
/// log's last lines (where the verifier says why), logging the whole log at
/// debug level, so errors stay readable on a terminal.
pub fn summarize(err: anyhow::Error) -> anyhow::Error {
    let full = format!("{err:#}");
    let lines: Vec<&str> = full.lines().collect();
    if lines.len() <= 6 {
        return err;
    }
    tracing::debug!("full error:\n{full}");
    let tail = lines[lines.len() - 4..].join(" | ");
    anyhow::anyhow!(
        "{} ... {} (verifier log of {} lines; --log-level debug prints it)",
        lines[0],
        tail,
        lines.len()
    )
}
