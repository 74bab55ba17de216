//! Installs what mesh-trace needs on a fresh Debian 12 machine, skipping
//! whatever is already there. Everything here must be safe to run twice.
use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

use crate::step;

/// Debian's rustc 1.96 (LLVM 22) with a precompiled `core` for bpfel, and
/// what bpf-linker needs to build against LLVM 22.
const EBPF_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];

/// Tools the lab, the tests and the demo use.
const TOOL_PACKAGES: &[&str] = &[
    "iptables",
    "iproute2",
    "conntrack",
    "prometheus",
    "tmux",
    "curl",
    "bpftool",
    // A third-party sidecar for the span tests (lab::haproxy).
    "haproxy",
    // The lab's sidecars speak mutual TLS through OpenSSL (lab::mtls).
    "libssl-dev",
    "pkg-config",
    // HTTP/2 peers no one here wrote, for the HTTP/2 tests: nghttpd
    // (server), nghttp and h2load (clients).
    "nghttp2-client",
    "nghttp2-server",
];

/// What only the benchmarks use: a peer tracer that no one here wrote.
const BENCH_PACKAGES: &[&str] = &["bpftrace"];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// What deploy/validate.sh checks the manifests with, installed into a
/// virtual environment of the project's (target/tools/python), not into
/// the machine's Python.
const PYTHON_TOOLS: &[&str] = &["kubernetes-validate==1.37.0", "check-jsonschema==0.39.0"];

pub fn ensure() -> anyhow::Result<()> {
    let mut wanted: Vec<&str> = TOOL_PACKAGES.to_vec();
    if nightly_with_rust_src() && bpf_linker_version().is_some() {
        step("eBPF toolchain: rustup nightly with rust-src and bpf-linker");
    } else {
        wanted.extend_from_slice(EBPF_PACKAGES);
    }
    let missing: Vec<&str> = wanted.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step("Debian packages: all present");
    } else {
        apt_install(&missing)?;
    }
    match bpf_linker_version() {
        Some(v) => step(&format!("bpf-linker: {v}")),
        None => install_bpf_linker()?,
    }
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        apt_install(&["kubernetes-client"])?;
    }
    ensure_python_tools()?;
    ensure_dashboard_validator()
}

/// The benchmarks' own tools, beside what [`ensure`] installs.
pub fn ensure_bench_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = BENCH_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        step("benchmark tools: all present");
        Ok(())
    } else {
        apt_install(&missing)
    }
}

/// `@grafana/schema` and TypeScript, pinned by the lock file, for
/// deploy/grafana/validate.
fn ensure_dashboard_validator() -> anyhow::Result<()> {
    let dir = crate::workspace_root().join("deploy/grafana/validate");
    if dir.join("node_modules/.package-lock.json").exists() {
        step("npm packages for the dashboard validator: present");
        return Ok(());
    }
    if Command::new("npm").arg("--version").output().is_err() {
        apt_install(&["nodejs", "npm"])?;
    }
    step("npm ci (deploy/grafana/validate: @grafana/schema, typescript)");
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir))
}

fn ensure_python_tools() -> anyhow::Result<()> {
    let venv = crate::workspace_root().join("target/tools/python");
    let bin = venv.join("bin");
    let present = ["kubernetes-validate", "check-jsonschema"]
        .iter()
        .all(|t| bin.join(t).exists());
    if present {
        step("Python tools: kubernetes-validate, check-jsonschema");
        return Ok(());
    }
    step(&format!(
        "pip install {} (into {})",
        PYTHON_TOOLS.join(" "),
        venv.display()
    ));
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(bin.join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PYTHON_TOOLS))
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "missing {} and no apt-get to install them: install a nightly Rust with rust-src \
             and bpf-linker (see README, Building), plus iptables, iproute2 and prometheus",
            packages.join(", ")
        );
    }
    step(&format!("apt-get install {}", packages.join(" ")));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages))
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn install_bpf_linker() -> anyhow::Result<()> {
    step(&format!(
        "cargo install bpf-linker {BPF_LINKER_VERSION} on LLVM 22 (a few minutes, once)"
    ));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        // /usr/bin/llvm-config is LLVM 14; point the build at LLVM 22.
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22"]))?;
    if bpf_linker_version().is_none() {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

fn nightly_with_rust_src() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|s| s.join("lib/rustlib/src/rust/library/core").exists())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
