//! Builds the kernel programs (mesh-trace-ebpf) for bpfel-unknown-none and
//! hands the objects to `src/kernel/objects.rs` through OUT_DIR.
//!
//! Two toolchains can build them (see README, "Building"):
//! - the standard aya one: a nightly with rust-src (`-Z build-std=core`);
//! - Debian's rustc-web, whose libstd-rust-web-dev-bpf ships a precompiled
//!   `core` for bpfel (RUSTC_BOOTSTRAP lets aya-ebpf use its one unstable feature).
//!
//! Both need bpf-linker. `cargo xtask setup` installs the Debian route. When
//! neither is present the build still succeeds (so `cargo check`/`clippy` work
//! anywhere) and the binary refuses to load programs with a clear message.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

const OBJECTS: [&str; 2] = ["mesh-trace", "mesh-trace-feature-probes"];
const TARGET: &str = "bpfel-unknown-none";

enum Toolchain {
    /// A rustup nightly with rust-src.
    Nightly,
    /// Debian's rustc-web at /usr/bin with the precompiled bpfel core.
    Debian,
}

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    for p in [
        "mesh-trace-ebpf/src",
        "mesh-trace-ebpf/Cargo.toml",
        "mesh-trace-common/src",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=MESH_TRACE_BPF_TOOLCHAIN");

    let built = match pick_toolchain() {
        Some(tc) => build(&root, tc),
        None => Err(
            "no eBPF toolchain: need bpf-linker and either a nightly with rust-src or \
             Debian's rustc-web with libstd-rust-web-dev-bpf; run `cargo xtask setup`"
                .to_string(),
        ),
    };
    match built {
        Ok(dir) => {
            for obj in OBJECTS {
                fs::copy(dir.join(obj), out_dir.join(format!("{obj}.bpf.o")))
                    .unwrap_or_else(|e| panic!("copy {obj}: {e}"));
            }
        }
        Err(why) => {
            // Only a release or test build for real use needs the programs;
            // analysis builds must not depend on the toolchain.
            println!("cargo:warning=eBPF programs not built: {why}");
            for obj in OBJECTS {
                fs::write(out_dir.join(format!("{obj}.bpf.o")), []).unwrap();
            }
        }
    }
}

fn has_bpf_linker() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn pick_toolchain() -> Option<Toolchain> {
    match env::var("MESH_TRACE_BPF_TOOLCHAIN").as_deref() {
        Ok("nightly") => return Some(Toolchain::Nightly),
        Ok("debian") => return Some(Toolchain::Debian),
        _ => {}
    }
    if !has_bpf_linker() {
        return None;
    }
    let nightly_src = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|sysroot| sysroot.join("lib/rustlib/src/rust/library/core").exists());
    if nightly_src {
        return Some(Toolchain::Nightly);
    }
    let debian_core = Path::new("/usr/lib/rustlib").join(TARGET).exists()
        && Path::new("/usr/bin/rustc").exists()
        && Path::new("/usr/bin/cargo").exists();
    debian_core.then_some(Toolchain::Debian)
}

fn build(root: &Path, tc: Toolchain) -> Result<PathBuf, String> {
    let target_dir = root.join("target/bpf");
    // The programs run on the kernel the agent runs on: aya-ebpf's bindings
    // and mesh-trace-common's syscall table follow `bpf_target_arch`, which
    // is the agent's target architecture (aya would otherwise take the
    // build host's).
    let arch =
        env::var("CARGO_CFG_TARGET_ARCH").map_err(|e| format!("CARGO_CFG_TARGET_ARCH: {e}"))?;
    let mut cmd = match tc {
        Toolchain::Nightly => {
            let mut c = Command::new("rustup");
            c.args(["run", "nightly", "cargo", "build", "-Z", "build-std=core"]);
            c
        }
        Toolchain::Debian => {
            let mut c = Command::new("/usr/bin/cargo");
            c.arg("build")
                .env("RUSTC", "/usr/bin/rustc")
                .env("RUSTC_BOOTSTRAP", "aya_ebpf");
            c
        }
    };
    // The outer cargo's environment describes the host build: drop it.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME") || k.starts_with("RUSTC_WRAPPER") {
            cmd.env_remove(k.as_ref());
        }
    }
    for k in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
    ] {
        cmd.env_remove(k);
    }
    if matches!(tc, Toolchain::Nightly) {
        cmd.env_remove("RUSTC");
    }
    cmd.current_dir(root)
        .args(["--package", "mesh-trace-ebpf", "--release", "--locked"])
        .args(["--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "RUSTFLAGS",
            format!("-C debuginfo=2 -C link-arg=--btf --cfg bpf_target_arch=\"{arch}\""),
        );
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    // Surface the kernel crate's warnings in the host build's output.
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        if line.starts_with("warning") && !line.contains("generated") {
            println!("cargo:warning=mesh-trace-ebpf: {line}");
        }
    }
    if !out.status.success() {
        // A broken kernel program is a hard error, not a warning.
        panic!(
            "building mesh-trace-ebpf failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(target_dir.join(TARGET).join("release"))
}
