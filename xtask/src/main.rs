//! The one build driver: `cargo xtask setup | build | test | demo`.
//!
//! `setup` installs what a fresh Debian 12 machine lacks (idempotent, quick
//! when everything is present); the other commands run it first.
mod modules;
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
    /// Measure overhead and capacity in the lab; writes BENCHMARKS.md
    /// (`--only kernel|agent|pipeline` prints one section instead).
    Bench {
        /// Arguments passed to `mesh-trace lab bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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
        Cmd::Bench { args } => {
            setup::ensure()?;
            setup::ensure_bench_tools()?;
            cargo(&["build", "--release", "--package", "mesh-trace"])?;
            step("mesh-trace lab bench (a few minutes)");
            let status = Command::new(workspace_root().join("target/release/mesh-trace"))
                .args(["lab", "bench", "--out"])
                .arg(workspace_root().join("BENCHMARKS.md"))
                .args(&args)
                .status()
                .context("starting target/release/mesh-trace")?;
            if !status.success() {
                bail!("mesh-trace lab bench exited with {status}");
            }
            Ok(())
        }
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
    step("the agent image's build: no lab, no import circles");
    image_build()?;
    // One thread: kernel tests share the root cgroup, netfilter hooks and
    // iptables; running them in parallel would make them see each other.
    step("cargo test (unit, kernel and lab tests)");
    let (passed, failed) = cargo_test(&["test", "--", "--test-threads=1"])?;
    // One closing line for the whole run, whatever binary ran last.
    println!("tests: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} test(s) failed");
    }
    Ok(())
}

/// The DaemonSet image builds mesh-trace without the `lab` feature: that
/// build must pass clippy and carry neither the feature nor the crates only
/// the lab uses (its CA's rcgen, its sidecars' OpenSSL, its proxy's request
/// ids); and the crate's
/// modules must not import each other in a circle.
fn image_build() -> anyhow::Result<()> {
    let no_lab = ["--package", "mesh-trace", "--no-default-features"];
    cargo(
        &[
            &["clippy", "--all-targets"][..],
            &no_lab,
            &["--", "-D", "warnings"],
        ]
        .concat(),
    )?;
    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tree = Command::new(&cargo_bin)
        .args([&["tree", "-e", "features,no-dev"][..], &no_lab].concat())
        .current_dir(workspace_root())
        .output()
        .context("running cargo tree")?;
    if !tree.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&tree.stderr)
        );
    }
    let text = String::from_utf8_lossy(&tree.stdout);
    let lab_only = [
        "rcgen",
        "uuid",
        "openssl-sys",
        "mesh-trace feature \"lab\"",
        "mesh-trace feature \"default\"",
    ];
    let found: Vec<&str> = lab_only
        .iter()
        .copied()
        .filter(|c| text.contains(c))
        .collect();
    if !found.is_empty() {
        bail!("the image build (--no-default-features) still pulls in {found:?}");
    }
    println!("image build: none of {lab_only:?} in `cargo tree -e features --no-default-features`");
    let g = modules::graph(&modules::read_crate(
        &workspace_root().join("mesh-trace/src"),
    )?);
    let circles = modules::circles(&g);
    if !circles.is_empty() {
        bail!("modules that import each other: {circles:?}");
    }
    println!("modules: {} in mesh-trace/src, no import circles", g.len());
    Ok(())
}

/// Runs cargo test, passing its output through, and adds up the results of
/// every test binary.
fn cargo_test(args: &[&str]) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo}"))?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok((passed, failed))
}

/// In "ok. 26 passed; 0 failed; ...", the number before `word`.
fn count_before(text: &str, word: &str) -> u64 {
    text.split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(word.trim_start())
                .map(str::trim)
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn reads_cargo_test_summaries() {
        let ok =
            "ok. 26 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.35s";
        assert_eq!(count_before(ok, " passed"), 26);
        assert_eq!(count_before(ok, " failed"), 0);
        let bad = "FAILED. 5 passed; 1 failed; 0 ignored; 0 measured";
        assert_eq!(count_before(bad, " passed"), 5);
        assert_eq!(count_before(bad, " failed"), 1);
    }
}
