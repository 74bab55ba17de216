//! Kernel cost: BPF time per program from the kernel's own accounting
//! (`kernel.bpf_stats_enabled`, run_time_ns / run_cnt), measured in
//! alternation with the agent in full mode, in floor mode (every program
//! attached, returning at once) and beside a peer no one here wrote: a
//! bpftrace script that only counts the same socket calls.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::BufRead as _,
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::Agent;
use crate::lab::{loadgen::Summary, topology::Lab};

/// Per program: (runs, total ns) over the measured work.
pub type Costs = BTreeMap<String, (u64, u64)>;

/// Average ns per run of `name`, 0 when it did not run.
pub fn ns_per_run(c: &Costs, name: &str) -> f64 {
    c.get(name)
        .map_or(0.0, |&(runs, ns)| ns as f64 / runs.max(1) as f64)
}

fn runs(c: &Costs, name: &str) -> u64 {
    c.get(name).map_or(0, |&(runs, _)| runs)
}

/// Program costs while the lab served `requests` requests.
#[derive(Default)]
pub struct Measured {
    pub costs: Costs,
    pub requests: u64,
}

impl Measured {
    /// BPF time of every program together, per request.
    pub fn ns_per_request(&self) -> f64 {
        let total: u64 = self.costs.values().map(|&(_, ns)| ns).sum();
        total as f64 / self.requests.max(1) as f64
    }

    fn add(&mut self, costs: Costs, requests: u64) {
        for (name, (r, ns)) in costs {
            let e = self.costs.entry(name).or_default();
            e.0 += r;
            e.1 += ns;
        }
        self.requests += requests;
    }
}

/// Every configuration, pooled over the rounds.
#[derive(Default)]
pub struct KernelCosts {
    pub full: Measured,
    /// mesh-trace with one ring buffer record per event (`--no-batch`).
    pub unbatched: Measured,
    /// mesh-trace capturing request heads like other bytes
    /// (`--request-head-bytes 0`).
    pub short_heads: Measured,
    pub floor: Measured,
    pub bpftrace: Measured,
    pub bpftrace_version: String,
    pub unrelated: Costs,
    pub unrelated_floor: Costs,
}

/// The mesh-trace programs that handle socket sends and receives.
const SOCKET_IO: [&str; 2] = ["mt_send_length", "mt_recv_length"];
/// bpftrace's programs on the same tracepoints, as named here.
const BPFTRACE_IO: [&str; 2] = ["bpftrace sock_send_length", "bpftrace sock_recv_length"];
/// The NAT observer (one per hook in each pod namespace).
const NAT: &str = crate::kernel::nat::NAT_PROGRAM;

/// The peer: count the socket calls mesh-trace traces, nothing else.
const BPFTRACE_SCRIPT: &str = "tracepoint:sock:sock_send_length { @send = count(); } \
                               tracepoint:sock:sock_recv_length { @recv = count(); }";

/// BPF time per socket send or receive: the costlier of the two programs
/// (one of them runs per call).
pub fn per_io(c: &Costs, names: [&str; 2]) -> f64 {
    names.iter().map(|n| ns_per_run(c, n)).fold(0.0, f64::max)
}

impl KernelCosts {
    pub fn per_io(&self) -> f64 {
        per_io(&self.full.costs, SOCKET_IO)
    }
    pub fn per_io_floor(&self) -> f64 {
        per_io(&self.floor.costs, SOCKET_IO)
    }
    /// BPF time per request above the floor's, every program together.
    pub fn added_per_request(&self) -> f64 {
        self.full.ns_per_request() - self.floor.ns_per_request()
    }
    /// The NAT program's time per packet above the empty program's.
    pub fn nat_added_per_packet(&self) -> f64 {
        ns_per_run(&self.full.costs, NAT) - ns_per_run(&self.floor.costs, NAT)
    }
    pub fn unrelated_added(&self) -> f64 {
        (per_io(&self.unrelated, SOCKET_IO) - per_io(&self.unrelated_floor, SOCKET_IO)).max(0.0)
    }
}

/// Meshed traffic (the closed-loop `load`) with mesh-trace in full, in
/// floor mode and with the bpftrace peer, in alternation for `rounds`
/// rounds; then unrelated I/O with mesh-trace in full and floor mode.
pub fn measure(
    exe: &Path,
    lab: &Lab,
    load: &dyn Fn(&str, &[&str]) -> anyhow::Result<Summary>,
    conns: &str,
    rounds: u32,
) -> anyhow::Result<KernelCosts> {
    let mut k = KernelCosts {
        bpftrace_version: bpftrace_version()?,
        ..KernelCosts::default()
    };
    let meshed = || load("stats", &["--connections", conns]);
    for round in 0..rounds {
        eprintln!(
            "    round {}: mesh-trace, without batches, request heads like other bytes, floor, bpftrace",
            round + 1
        );
        for (noop, extra, m) in [
            (false, &[][..], &mut k.full),
            (false, &["--no-batch"][..], &mut k.unbatched),
            (
                false,
                &["--request-head-bytes", "0"][..],
                &mut k.short_heads,
            ),
            (true, &[][..], &mut k.floor),
        ] {
            let _agent = Agent::start_with(exe, lab, noop, extra)?;
            let (costs, summary) = accounted(mt_programs, meshed)?;
            m.add(costs, summary.sent);
        }
        let bpftrace = Bpftrace::start()?;
        let ids = bpftrace.ids.clone();
        let (costs, summary) = accounted(|p| bpftrace_program(p, &ids), meshed)?;
        drop(bpftrace);
        k.bpftrace.add(costs, summary.sent);
    }
    for noop in [false, true] {
        let _agent = Agent::start(exe, lab, noop)?;
        let (costs, ()) = accounted(mt_programs, || unrelated_io(Duration::from_secs(3)))?;
        if noop {
            k.unrelated_floor = costs;
        } else {
            k.unrelated = costs;
        }
    }
    Ok(k)
}

/// Runs `work` with the kernel's BPF accounting on, and returns the run
/// counts and times of the programs `pick` names during it.
fn accounted<T>(
    pick: impl Fn(&serde_json::Value) -> Option<String>,
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(Costs, T)> {
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").context("enabling bpf stats")?;
    let before = prog_stats(&pick)?;
    let result = work();
    let after = prog_stats(&pick)?;
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0")?;
    let result = result?;
    let costs = after
        .into_iter()
        .filter_map(|(name, (cnt, ns))| {
            let (c0, n0) = before.get(&name).copied().unwrap_or_default();
            let runs = cnt.saturating_sub(c0);
            (runs > 0).then(|| (name, (runs, ns.saturating_sub(n0))))
        })
        .collect();
    Ok((costs, result))
}

fn mt_programs(p: &serde_json::Value) -> Option<String> {
    let name = p["name"].as_str()?;
    name.starts_with("mt_").then(|| name.to_string())
}

fn bpftrace_program(p: &serde_json::Value, ids: &BTreeSet<u64>) -> Option<String> {
    if !ids.contains(&p["id"].as_u64()?) {
        return None;
    }
    // Program names are cut at 15 characters.
    let name = p["name"].as_str()?;
    BPFTRACE_IO
        .iter()
        .find(|n| name.starts_with(&n["bpftrace ".len()..][..9]))
        .map(|n| n.to_string())
}

/// Run count and run time of the programs `pick` names, summed per name.
fn prog_stats(
    pick: &impl Fn(&serde_json::Value) -> Option<String>,
) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let mut m: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for p in programs()? {
        if let Some(name) = pick(&p) {
            let e = m.entry(name).or_default();
            e.0 += p["run_cnt"].as_u64().unwrap_or(0);
            e.1 += p["run_time_ns"].as_u64().unwrap_or(0);
        }
    }
    Ok(m)
}

fn programs() -> anyhow::Result<Vec<serde_json::Value>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool (Debian package bpftool)")?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(progs.as_array().cloned().unwrap_or_default())
}

/// bpftrace running [`BPFTRACE_SCRIPT`]; stopped when dropped.
struct Bpftrace {
    child: Child,
    /// Its programs' ids.
    ids: BTreeSet<u64>,
}

impl Bpftrace {
    fn start() -> anyhow::Result<Bpftrace> {
        mount_tracing()?;
        let ids_before: BTreeSet<u64> = programs()?
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .collect();
        let mut child = Command::new("bpftrace")
            .args(["-e", BPFTRACE_SCRIPT])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "starting bpftrace (Debian package bpftrace; `cargo xtask bench` installs it)",
            )?;
        // bpftrace prints "Attaching 2 probes..." before it attaches them.
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("bpftrace stdout")?)
            .read_line(&mut line)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ids: BTreeSet<u64> = programs()?
                .iter()
                .filter(|p| p["type"] == "tracepoint")
                .filter_map(|p| p["id"].as_u64())
                .filter(|id| !ids_before.contains(id))
                .collect();
            if ids.len() >= 2 {
                return Ok(Bpftrace { child, ids });
            }
            if Instant::now() > deadline || child.try_wait()?.is_some() {
                let _ = child.kill();
                bail!("bpftrace did not attach its two programs in 30 s (said {line:?})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        super::stop(&mut self.child, nix::sys::signal::Signal::SIGINT);
    }
}

/// bpftrace 0.17 reads tracepoint formats through debugfs.
fn mount_tracing() -> anyhow::Result<()> {
    for (fs, dir, probe) in [
        (
            "tracefs",
            "/sys/kernel/tracing",
            "/sys/kernel/tracing/events",
        ),
        ("debugfs", "/sys/kernel/debug", "/sys/kernel/debug/tracing"),
    ] {
        if Path::new(probe).exists() {
            continue;
        }
        let status = Command::new("mount").args(["-t", fs, fs, dir]).status()?;
        if !status.success() {
            bail!("mounting {fs} on {dir} (bpftrace needs it) failed: {status}");
        }
    }
    Ok(())
}

fn bpftrace_version() -> anyhow::Result<String> {
    let out = Command::new("bpftrace")
        .arg("--version")
        .output()
        .context("running bpftrace (Debian package bpftrace; `cargo xtask bench` installs it)")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// File reads and writes and loopback socket I/O outside the mesh.
fn unrelated_io(d: Duration) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("mt-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept()?;
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&buf[..n])?;
        }
    });
    use std::io::{Read, Write};
    let mut sock = TcpStream::connect(addr)?;
    let mut file = std::fs::File::create(dir.join("f"))?;
    let started = Instant::now();
    let mut buf = [0u8; 64];
    while started.elapsed() < d {
        file.write_all(&buf[..16])?;
        sock.write_all(&buf[..16])?;
        sock.read_exact(&mut buf[..16])?;
    }
    drop(sock);
    let _ = echo.join();
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The kernel sections of BENCHMARKS.md: cost per program, NAT per packet,
/// and the bpftrace peer.
pub fn render(k: &KernelCosts, rounds: u32, peer_metadata_bytes: usize) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "## Kernel cost per program\n");
    let _ = writeln!(
        o,
        "From `kernel.bpf_stats_enabled` (run_time_ns / run_cnt) under the closed-loop load, with the agent in full \
         mode and in floor mode (`--noop`: every program attached, returning at once; what the accounting and the \
         hook's entry cost by themselves), in alternation, {rounds} rounds pooled.\n"
    );
    let _ = writeln!(o, "| program | meshed traffic: runs | ns/run | without batches | floor ns/run | unrelated I/O: runs | ns/run | floor ns/run |\n|---|---|---|---|---|---|---|---|");
    let names: BTreeSet<&String> = k.full.costs.keys().chain(k.unrelated.keys()).collect();
    for n in names {
        let _ = writeln!(
            o,
            "| {n} | {} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} |",
            runs(&k.full.costs, n),
            ns_per_run(&k.full.costs, n),
            ns_per_run(&k.unbatched.costs, n),
            ns_per_run(&k.floor.costs, n),
            runs(&k.unrelated, n),
            ns_per_run(&k.unrelated, n),
            ns_per_run(&k.unrelated_floor, n)
        );
    }
    let _ = writeln!(
        o,
        "\nPer traced socket send or receive: {:.0} ns ({:.0} ns without batches; one of the two socket I/O programs runs per call; floor {:.0} ns). \
         Unrelated socket I/O (loopback in the host network namespace): {:.0} ns per call (floor {:.0} ns). \
         File I/O runs none of the programs: 0 ns.\n",
        k.per_io(),
        per_io(&k.unbatched.costs, SOCKET_IO),
        k.per_io_floor(),
        per_io(&k.unrelated, SOCKET_IO),
        per_io(&k.unrelated_floor, SOCKET_IO)
    );
    let _ = writeln!(
        o,
        "Per request through both sidecars, every program together: **{:.0} ns** of BPF time ({:.0} ns without \
         batches), the floor {:.0} ns: **{:.0} ns above the floor** ({} and {} requests).\n",
        k.full.ns_per_request(),
        k.unbatched.ns_per_request(),
        k.floor.ns_per_request(),
        k.added_per_request(),
        k.full.requests,
        k.floor.requests
    );
    let _ = writeln!(
        o,
        "Request heads captured whole (up to 2 KiB) against like other bytes (`--request-head-bytes 0`, 192 \
         bytes), in the same alternation{}: {:.0} against {:.0} ns per traced send or receive, {:.0} against {:.0} \
         ns per request.\n",
        if peer_metadata_bytes > 0 {
            format!(
                ", the lab's sidecars putting {peer_metadata_bytes} bytes of peer metadata in each request head \
                 between them (`--peer-metadata-bytes`)"
            )
        } else {
            String::new()
        },
        k.per_io(),
        per_io(&k.short_heads.costs, SOCKET_IO),
        k.full.ns_per_request(),
        k.short_heads.ns_per_request(),
    );
    let _ = writeln!(o, "## NAT observation per packet\n");
    let _ = writeln!(
        o,
        "`{NAT}` runs for every packet in a pod's namespace, once on LOCAL_OUT and once on PRE_ROUTING, just after the \
         nat table. Every packet that is not a connection's first leaves after reading its conntrack state from \
         the `sk_buff` (no helper call, no map).\n"
    );
    let per_request = |m: &Measured| runs(&m.costs, NAT) as f64 / m.requests.max(1) as f64;
    let _ = writeln!(
        o,
        "| | packets | per request | ns/packet | floor ns/packet | above the floor |\n|---|---|---|---|---|---|\n\
         | {NAT} | {} | {:.1} | {:.0} | {:.0} | {:.0} |\n",
        runs(&k.full.costs, NAT),
        per_request(&k.full),
        ns_per_run(&k.full.costs, NAT),
        ns_per_run(&k.floor.costs, NAT),
        k.nat_added_per_packet()
    );
    let _ = writeln!(o, "## A peer for the floor: bpftrace\n");
    let _ = writeln!(
        o,
        "{} from Debian's packages, counting the same socket calls (`{BPFTRACE_SCRIPT}`) under the same load, \
         in alternation with mesh-trace and the floor. bpftrace 0.17 attaches through perf tracepoints (it has \
         no raw tracepoints, and fentry is refused on this kernel), which cost more to enter than mesh-trace's \
         `tp_btf`.\n",
        k.bpftrace_version
    );
    let _ = writeln!(
        o,
        "| tracer | ns per socket call | BPF ns per request | requests |\n|---|---|---|---|"
    );
    for (label, m, names) in [
        ("floor (mesh-trace's programs, empty)", &k.floor, SOCKET_IO),
        ("bpftrace, counting calls", &k.bpftrace, BPFTRACE_IO),
        (
            "mesh-trace, one ring buffer record per event (`--no-batch`)",
            &k.unbatched,
            SOCKET_IO,
        ),
        ("mesh-trace", &k.full, SOCKET_IO),
    ] {
        let _ = writeln!(
            o,
            "| {label} | {:.0} | {:.0} | {} |",
            per_io(&m.costs, names),
            m.ns_per_request(),
            m.requests
        );
    }
    let _ = writeln!(
        o,
        "\nThe floor and mesh-trace rows include the NAT programs ({:.0} packets per request); bpftrace's do not. \
         `mt_flush` (mesh-trace's row) is the agent sending every CPU's batch before it reads: its time is the \
         batches' copy into the ring buffer.\n",
        runs(&k.full.costs, NAT) as f64 / k.full.requests.max(1) as f64
    );
    o
}
