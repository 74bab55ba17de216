//! The one build driver: `cargo xtask setup | build | test | demo`.
//!
//! `setup` installs what a fresh Debian 12 machine lacks (idempotent, quick
//! when everything is present); the other commands run it first.
mod setup;

use std::process::{Command, ExitCode};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "mesh-trace's build driver")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain and the test tools when missing.
    Setup,
    /// Build mesh-trace (kernel programs embedded) in release mode.
    Build,
    /// Everything CI checks: fmt, clippy, unit tests and kernel tests (root).
    Test,
    /// Build and run `mesh-trace demo`: a local mesh traced live.
    Demo {
        /// Arguments passed to `mesh-trace demo`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Setup => setup::ensure(),
        Cmd::Build => {
            setup::ensure()?;
            cargo(&["build", "--release", "--package", "mesh-trace"])
        }
        Cmd::Test => test(),
        Cmd::Demo { args } => {
            setup::ensure()?;
            cargo(&["build", "--release", "--package", "mesh-trace"])?;
            step("running mesh-trace demo");
            let status = Command::new("target/release/mesh-trace")
                .arg("demo")
                .args(&args)
                .status()
                .context("starting target/release/mesh-trace")?;
            if !status.success() {
                bail!("mesh-trace demo exited with {status}");
            }
            Ok(())
        }
    }
}

fn test() -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("the tests load eBPF programs and create network namespaces: run them as root");
    }
    setup::ensure()?;
    step("cargo fmt --check");
    cargo(&["fmt", "--all", "--check"])?;
    step("cargo clippy (warnings denied)");
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    // One thread: kernel tests share the root cgroup, netfilter hooks and
    // iptables; running them in parallel would make them see each other.
    step("cargo test (unit and kernel tests)");
    cargo(&["test", "--", "--test-threads=1"])?;
    Ok(())
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Prints a progress line.
pub fn step(what: &str) {
    eprintln!("==> {what}");
}

/// Runs the cargo that runs us, in the workspace root.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}
