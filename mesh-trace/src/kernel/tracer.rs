//! Loading the tracer's programs, attaching them, and reading their events.
use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context as _};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        uprobe::UProbeScope, BtfTracePoint, CgroupAttachMode, CgroupSockAddr, Iter, SockOps, UProbe,
    },
    Btf, Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use mesh_trace_common::{names, LossReason};
use tokio::io::unix::AsyncFd;

use super::{
    batch,
    caps::Caps,
    events::{decode_record, DecodeError, Event},
    nat, objects, summarize,
};

/// Ring buffer size used when the configuration does not say.
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 1 << 20;

#[derive(Clone, Debug)]
pub struct TracerOptions {
    /// Size of the events ring buffer: a power of two, at least one page.
    pub ring_buffer_bytes: u32,
    /// cgroup v2 directory the cgroup programs attach to (the root sees all pods).
    pub cgroup: PathBuf,
    /// Payload bytes copied per send/receive in meshed namespaces.
    pub prefix_len: u32,
    /// Payload bytes copied of a send/receive that begins an HTTP/1.x
    /// request (at most `prefix_len` turns it off).
    pub head_len: u32,
    /// Attach every program but make each return at once: the cost of the
    /// hooks alone, for benchmarks.
    pub noop: bool,
    /// Bytes waiting in the ring buffer past which the kernel wakes the
    /// agent; the rest is read every [`RING_POLL`]. 0 wakes it for every
    /// event (the kernel's default).
    pub wakeup_bytes: u64,
    /// Data events go to the ring buffer in per-CPU batches of an eighth of
    /// it (see [`super::batch`]); off, one record each.
    pub batch_events: bool,
    /// Data events each network namespace may send per CPU per second;
    /// past it they are counted (`netns_budget`) and dropped. 0: no limit.
    pub netns_events_per_s: u32,
    /// Load the TLS plaintext probes (uprobes on `SSL_write`/`SSL_read`,
    /// attached to the libraries of traced processes as they are found).
    pub tls_plaintext: bool,
}

/// Default per-namespace budget: far above what one pod's sidecar traffic
/// makes (about six data events per request on a side), far below what
/// fills the ring.
pub const DEFAULT_NETNS_EVENTS_PER_S: u32 = 100_000;

/// How often the agent reads the ring buffer when the kernel has not woken
/// it: the longest an event waits at low rates.
pub const RING_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Default payload prefix: a request line, Host and x-request-id fit.
pub const DEFAULT_PREFIX_LEN: u32 = 192;

/// Default capture of request heads: a sidecar's between sidecars, with
/// Istio's peer metadata (a kilobyte and more), fits.
pub const DEFAULT_HEAD_LEN: u32 = mesh_trace_common::DATA_PREFIX_MAX as u32;

impl TracerOptions {
    /// Defaults for everything but the cgroup.
    pub fn new(cgroup: PathBuf) -> TracerOptions {
        TracerOptions {
            ring_buffer_bytes: DEFAULT_RING_BUFFER_BYTES,
            cgroup,
            prefix_len: DEFAULT_PREFIX_LEN,
            head_len: DEFAULT_HEAD_LEN,
            noop: false,
            wakeup_bytes: u64::from(DEFAULT_RING_BUFFER_BYTES / 8),
            batch_events: true,
            netns_events_per_s: DEFAULT_NETNS_EVENTS_PER_S,
            tls_plaintext: true,
        }
    }
}

/// A program the tracer attached, for `/readyz`, logs and `top`'s header.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attached {
    pub program: &'static str,
    pub hook: String,
}

/// An optional program the tracer could not attach, and what is lost.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Skipped {
    pub program: &'static str,
    pub reason: String,
    pub consequence: &'static str,
}

/// The loaded and attached tracer. Dropping it detaches every program: aya
/// owns the links, and nothing is pinned.
pub struct Tracer {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Namespaces whose sockets' payload is captured.
    meshed: aya::maps::HashMap<MapData, u64, u32>,
    /// Each namespace's data-event budget spent (LRU, per CPU): an entry
    /// goes with its namespace rather than wait to be the oldest.
    spent: aya::maps::PerCpuHashMap<MapData, u64, mesh_trace_common::BudgetWindow>,
    /// What the generated netfilter programs need; None if BTF lacks sk_buff.
    nat_shared: Option<Arc<nat::Shared>>,
    lost: PerCpuArray<MapData, u64>,
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
    pub attached: Vec<Attached>,
    pub skipped: Vec<Skipped>,
    /// Whether the `iter/tcp` program that adopts open sockets loaded.
    can_adopt: bool,
    /// Whether the TLS plaintext probes loaded (attached per file later).
    tls_probes: bool,
    /// Per-CPU batches of data events, when on.
    batching: Option<batch::Batching>,
    // Last: dropped after the maps so the links go last.
    _ebpf: Ebpf,
}

impl Tracer {
    pub fn load(opts: &TracerOptions) -> anyhow::Result<Tracer> {
        let missing = Caps::current().missing_for_tracing();
        if !missing.is_empty() {
            let names: Vec<_> = missing.iter().map(|c| c.name()).collect();
            bail!(
                "missing capability {} (run as root, or grant CAP_NET_ADMIN and CAP_SYS_ADMIN; \
                 CAP_BPF and CAP_PERFMON stand in for CAP_SYS_ADMIN when no pod network \
                 namespace is watched)",
                names.join(", ")
            );
        }
        let obj = objects::require(objects::TRACER)?;
        anyhow::ensure!(
            opts.head_len as usize <= mesh_trace_common::DATA_PREFIX_MAX,
            "request heads of {} bytes: at most {} are captured",
            opts.head_len,
            mesh_trace_common::DATA_PREFIX_MAX
        );
        anyhow::ensure!(
            opts.prefix_len as usize <= mesh_trace_common::DATA_PREFIX_MAX,
            "payload prefix of {} bytes: at most {} are supported",
            opts.prefix_len,
            mesh_trace_common::DATA_PREFIX_MAX
        );
        let kernel_btf = super::btf::KernelBtf::from_sys_fs()
            .context("reading the kernel's BTF for the layout of its TCP structs")?;
        let tcp = TcpSockOffsets::from_btf(&kernel_btf)?;
        super::events::learn_reset_reasons(&kernel_btf);
        let mut ebpf = EbpfLoader::new()
            .override_global(names::PREFIX_LEN, &opts.prefix_len, true)
            .override_global(names::HEAD_LEN, &opts.head_len, true)
            .override_global("OFF_WRITE_SEQ", &tcp.write_seq, true)
            .override_global("OFF_COPIED_SEQ", &tcp.copied_seq, true)
            .override_global("OFF_RCV_NXT", &tcp.rcv_nxt, true)
            .override_global("OFF_SRTT_US", &tcp.srtt_us, true)
            .override_global("OFF_RTT_MIN", &tcp.rtt_min, true)
            .override_global("OFF_SKB_CB", &tcp.skb_cb, true)
            .override_global("OFF_SKB_SK", &tcp.skb_sk, true)
            .override_global("OFF_SKB_HEAD", &tcp.skb_head, true)
            .override_global("OFF_SKB_DATA", &tcp.skb_data, true)
            .override_global("OFF_SKB_LEN", &tcp.skb_len, true)
            .override_global("OFF_SKB_TRANSPORT_HEADER", &tcp.skb_transport_header, true)
            .override_global("OFF_SK_STATE", &tcp.sk_state, true)
            .override_global("OFF_SKC_FAMILY", &tcp.skc_family, true)
            .override_global("OFF_SKC_DADDR", &tcp.skc_daddr, true)
            .override_global("OFF_SKC_RCV_SADDR", &tcp.skc_rcv_saddr, true)
            .override_global("OFF_SKC_DPORT", &tcp.skc_dport, true)
            .override_global("OFF_SKC_NUM", &tcp.skc_num, true)
            .override_global("OFF_SKC_V6_DADDR", &tcp.skc_v6_daddr, true)
            .override_global("OFF_SKC_V6_RCV_SADDR", &tcp.skc_v6_rcv_saddr, true)
            .override_global("OFF_SKC_NET", &tcp.skc_net, true)
            .override_global("OFF_NET_COOKIE", &tcp.net_cookie, true)
            .override_global("RETRANSMIT_HAS_ERR", &tcp.retransmit_has_err, true)
            .override_global("SEND_RESET_HAS_REASON", &tcp.send_reset_has_reason, true)
            .override_global("NOOP", &u32::from(opts.noop), true)
            .override_global("WAKEUP_BYTES", &opts.wakeup_bytes, true)
            .override_global(
                "NETNS_BUDGET",
                &netns_budget_per_window(opts.netns_events_per_s),
                true,
            )
            .override_global("HOST_NETNS", &host_netns_cookie(), true)
            .override_global(
                names::TLS_PROBES,
                &u32::from(opts.tls_plaintext && !opts.noop),
                true,
            )
            .map_max_entries(names::EVENTS, opts.ring_buffer_bytes)
            .load(obj)
            .context("loading the tracer's eBPF object")?;
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!("no kernel log records: {e}");
                None
            }
        };

        let cgroup = fs::File::open(&opts.cgroup)
            .with_context(|| format!("opening cgroup {}", opts.cgroup.display()))?;
        let cg = opts.cgroup.display().to_string();
        let mut attached = Vec::new();
        for name in [names::CONNECT4, names::CONNECT6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into()?;
            prog.load()
                .with_context(|| format!("loading {name}"))
                .map_err(summarize)?;
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {cg}"))?;
            attached.push(Attached {
                program: name,
                hook: format!("cgroup_sock_addr {cg}"),
            });
        }
        let prog: &mut SockOps = program(&mut ebpf, names::SOCK_OPS)?.try_into()?;
        prog.load().context("loading sock_ops").map_err(summarize)?;
        prog.attach(&cgroup, CgroupAttachMode::Single)
            .with_context(|| format!("attaching sock_ops to cgroup {cg}"))?;
        attached.push(Attached {
            program: names::SOCK_OPS,
            hook: format!("sock_ops {cg}"),
        });

        // Before the socket programs: they read the batch size.
        let batching = if opts.batch_events && !opts.noop {
            batch::Batching::start(&mut ebpf, batch::cap_for(opts.ring_buffer_bytes))
        } else {
            None
        };
        let mut skipped = Vec::new();
        // Optional: without them sockets lose their owner process, or
        // retransmits and resets are not counted; the rest still works.
        let optional: [(&'static str, &'static str, &'static str); 7] = [
            (
                names::SEND_LENGTH,
                "sock_send_length",
                "no spans (sends are not seen) and accepted sockets have no process",
            ),
            (
                names::DEV_QUEUE,
                "net_dev_queue",
                "sends are stamped when their call returns, not when their bytes leave",
            ),
            (
                names::RECV_LENGTH,
                "sock_recv_length",
                "no spans (receives are not seen) and accepted sockets have no process",
            ),
            (
                names::RETRANSMIT,
                "tcp_retransmit_skb",
                "retransmits not counted",
            ),
            (
                names::RETRANSMIT_SYNACK,
                "tcp_retransmit_synack",
                "resent SYN-ACKs not counted",
            ),
            (names::SEND_RESET, "tcp_send_reset", "resets not counted"),
            (
                names::RECEIVE_RESET,
                "tcp_receive_reset",
                "resets not counted",
            ),
        ];
        let btf = Btf::from_sys_fs();
        for (name, tracepoint, consequence) in optional {
            let result = match &btf {
                Ok(btf) => attach_tp_btf(&mut ebpf, name, tracepoint, btf),
                Err(e) => Err(anyhow::anyhow!("no kernel BTF: {e}")),
            };
            match result {
                Ok(()) => attached.push(Attached {
                    program: name,
                    hook: format!("tp_btf {tracepoint}"),
                }),
                Err(e) => {
                    let reason = format!("{:#}", summarize(e));
                    tracing::warn!("{name} not attached ({consequence}): {reason}");
                    skipped.push(Skipped {
                        program: name,
                        reason,
                        consequence,
                    });
                }
            }
        }

        let can_adopt = match &btf {
            Ok(btf) => load_adopt(&mut ebpf, btf),
            Err(e) => Err(anyhow::anyhow!("no kernel BTF: {e}")),
        }
        .map_err(|e| {
            let reason = format!("{:#}", summarize(e));
            tracing::warn!("{} not loaded: {reason}", names::ADOPT_PROG);
            skipped.push(Skipped {
                program: names::ADOPT_PROG,
                reason,
                consequence: "connections opened before the agent started are not traced",
            });
        })
        .is_ok();

        let tls_probes = opts.tls_plaintext && !opts.noop && {
            match load_tls_probes(&mut ebpf) {
                Ok(()) => true,
                Err(e) => {
                    let reason = format!("{:#}", summarize(e));
                    tracing::warn!("TLS plaintext probes not loaded: {reason}");
                    skipped.push(Skipped {
                        program: names::SSL_WRITE,
                        reason,
                        consequence: "requests behind mutual TLS are matched inside sidecars \
                                      without their plaintext (more of them ambiguous)",
                    });
                    false
                }
            }
        };

        let nat_shared = nat_shared(&ebpf, opts.noop, &kernel_btf)
            .map_err(|e| tracing::warn!("REDIRECTs will not be observed at the NAT step: {e:#}"))
            .ok()
            .map(Arc::new);
        let ring = RingBuf::try_from(ebpf.take_map(names::EVENTS).context("EVENTS map")?)?;
        let lost = PerCpuArray::try_from(ebpf.take_map(names::LOST).context("LOST map")?)?;
        let meshed = aya::maps::HashMap::try_from(
            ebpf.take_map(names::MESHED_NETNS)
                .context("MESHED_NETNS map")?,
        )?;
        let spent = aya::maps::PerCpuHashMap::try_from(
            ebpf.take_map(names::NETNS_SPENT)
                .context("NETNS_SPENT map")?,
        )?;
        Ok(Tracer {
            ring: readable(ring)?,
            meshed,
            spent,
            nat_shared,
            lost,
            logger,
            attached,
            skipped,
            tls_probes,
            can_adopt,
            batching,
            _ebpf: ebpf,
        })
    }

    /// Forwards the programs' aya-log records to this process's logger from a
    /// background task. Call once, inside a tokio runtime.
    pub fn spawn_kernel_log_forwarder(&mut self) -> anyhow::Result<()> {
        let Some(logger) = self.logger.take() else {
            return Ok(());
        };
        let mut fd = readable(logger)?;
        tokio::spawn(async move {
            while let Ok(mut guard) = fd.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Ok(())
    }

    /// Waits for events and appends everything available to `out`: in
    /// ring-buffer order, or with batching on, in time order up to the
    /// moment the batches were sent (later ones come with the next call).
    /// Undecodable records are returned as errors in place.
    pub async fn next_batch(
        &mut self,
        out: &mut Vec<Result<Event, DecodeError>>,
    ) -> anyhow::Result<()> {
        // Woken by the kernel once enough is waiting, else on the poll.
        let woken = tokio::time::timeout(RING_POLL, self.ring.readable_mut()).await;
        // Everything stamped before the batches were last sent is in the
        // ring.
        let now = batch::now_ns();
        let flushed_at = match &mut self.batching {
            Some(b) => b.flush_if_due(now, batch::FLUSH_EVERY.as_nanos() as u64),
            None => now,
        };
        let mut read = Vec::new();
        let drain = |ring: &mut RingBuf<MapData>, read: &mut Vec<_>| {
            while let Some(item) = ring.next() {
                decode_record(&item, read);
            }
        };
        match woken {
            Ok(guard) => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut read);
                guard.clear_ready();
            }
            Err(_) => drain(self.ring.get_mut(), &mut read),
        }
        match &mut self.batching {
            Some(b) => b.order.release(flushed_at, read, out),
            None => out.append(&mut read),
        }
        Ok(())
    }

    /// A watch that observes the NAT step of network namespaces with this
    /// tracer's maps; None when the netfilter programs cannot be generated.
    /// Whether TLS plaintext probes can be attached.
    pub fn tls_probes(&self) -> bool {
        self.tls_probes
    }

    /// Attaches the TLS plaintext probes to the functions `file` defines;
    /// the names attached, or why none could be.
    pub fn attach_tls(&mut self, file: &super::tls::TlsFile) -> anyhow::Result<Vec<&'static str>> {
        anyhow::ensure!(self.tls_probes, "the TLS plaintext probes are not loaded");
        let mut attached = Vec::new();
        let mut first_error = None;
        for (symbol, name) in super::tls::SYMBOLS {
            let entry: &mut UProbe = program(&mut self._ebpf, name)?.try_into()?;
            if let Err(e) = entry.attach(symbol, &file.path, UProbeScope::AllProcesses) {
                first_error.get_or_insert(e);
                continue;
            }
            // The entry alone would leave calls in TLS_CALLS until they age
            // out: a missing return probe is an error for the file.
            let ret: &mut UProbe = program(&mut self._ebpf, names::SSL_RETURN)?.try_into()?;
            ret.attach(symbol, &file.path, UProbeScope::AllProcesses)
                .with_context(|| format!("return probe on {symbol} in {}", file.shown))?;
            attached.push(symbol);
        }
        match first_error {
            Some(e) if attached.is_empty() => {
                Err(anyhow::Error::new(e).context(format!("no TLS functions in {}", file.shown)))
            }
            _ => Ok(attached),
        }
    }

    pub fn nat_watch(&self) -> Option<nat::NatWatch> {
        self.nat_shared.clone().map(nat::NatWatch::new)
    }

    /// Starts tracking sockets that existed before the programs were
    /// attached (found through sock_diag in the namespace at `netns`, as
    /// (cookie, namespace cookie)): the `iter/tcp` program, run inside that
    /// namespace, gives each its socket storage. Returns how many it found;
    /// the others closed in the meantime.
    pub fn adopt_existing(
        &mut self,
        netns: &Path,
        sockets: &[(u64, u64)],
    ) -> anyhow::Result<usize> {
        if sockets.is_empty() {
            return Ok(0);
        }
        anyhow::ensure!(
            self.can_adopt,
            "connections opened before the agent started are not traced: {} is not loaded",
            names::ADOPT_PROG
        );
        let mut adopted = 0;
        // ADOPT is bounded: a namespace with more open sockets takes turns.
        for batch in sockets.chunks(mesh_trace_common::ADOPT_MAX as usize) {
            let mut adopt = self.adopt_map()?;
            for &(cookie, netns_cookie) in batch {
                let value = mesh_trace_common::TrackedSock {
                    cookie,
                    netns_cookie,
                    // Its first bytes went by before: never taken for them.
                    flags: mesh_trace_common::TRACKED_SEEN_SEND
                        | mesh_trace_common::TRACKED_SEEN_RECV,
                    ..Default::default()
                };
                adopt.insert(cookie, value, 0).context("writing ADOPT")?;
            }
            let walked = self.run_adopt_iterator(netns);
            // What the program did not take (it removes what it adopts)
            // closed meanwhile; ADOPT is left empty whatever happened.
            let mut adopt = self.adopt_map()?;
            let left: Vec<u64> = adopt.keys().filter_map(Result::ok).collect();
            for cookie in &left {
                let _ = adopt.remove(cookie);
            }
            walked?;
            adopted += batch.len() - left.len();
        }
        Ok(adopted)
    }

    fn adopt_map(
        &mut self,
    ) -> anyhow::Result<aya::maps::HashMap<&mut MapData, u64, mesh_trace_common::TrackedSock>> {
        let map = self._ebpf.map_mut(names::ADOPT).context("ADOPT map")?;
        Ok(aya::maps::HashMap::try_from(map)?)
    }

    /// Walks the TCP sockets of the namespace at `netns` with the adopt
    /// program: an iterator walks the namespace it is created in.
    fn run_adopt_iterator(&mut self, netns: &Path) -> anyhow::Result<()> {
        let iter: &mut Iter = program(&mut self._ebpf, names::ADOPT_PROG)?.try_into()?;
        let link = iter.attach().context("attaching the adopt iterator")?;
        let link = iter.take_link(link)?;
        crate::netns::in_namespace(netns, move || {
            let mut out = link.into_file().context("creating the adopt iterator")?;
            std::io::copy(&mut out, &mut std::io::sink()).context("running the adopt iterator")?;
            Ok(())
        })
    }

    /// Captures the data path of sockets in this namespace from now on.
    pub fn mark_meshed(&mut self, netns_cookie: u64) -> anyhow::Result<()> {
        self.meshed
            .insert(netns_cookie, 1, 0)
            .context("updating MESHED_NETNS (map full?)")
    }

    /// Forgets a namespace that is gone (its entry would otherwise hold a
    /// place in MESHED_NETNS for ever, and one in NETNS_SPENT until it is
    /// the least recently used).
    pub fn unmark_meshed(&mut self, netns_cookie: u64) -> anyhow::Result<()> {
        // Absent unless a budget is set (and then the LRU bounds it): a
        // failure here is no reason to keep the namespace meshed.
        if let Err(e) = self.spent.remove(&netns_cookie) {
            tracing::trace!("NETNS_SPENT: {e}");
        }
        match self.meshed.remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing from MESHED_NETNS"),
        }
    }

    /// The namespaces marked meshed in the kernel: by the agent, or by the
    /// NAT programs at a REDIRECT.
    pub fn meshed_netns(&self) -> Vec<u64> {
        self.meshed.keys().filter_map(Result::ok).collect()
    }

    pub fn nat_available(&self) -> bool {
        self.nat_shared.is_some()
    }

    /// Events the kernel could not deliver since load, by reason.
    pub fn lost(&self) -> anyhow::Result<Vec<(LossReason, u64)>> {
        LossReason::ALL
            .into_iter()
            .map(|r| {
                let per_cpu = self.lost.get(&(r as u32), 0)?;
                Ok((r, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// How many mesh-trace agents have their programs loaded in this kernel,
/// this one included: each loads one socket-send program. Two during a
/// rolling update (both trace: cgroup programs run side by side and the
/// NAT programs take neighbouring netfilter priorities). Listing programs
/// needs CAP_SYS_ADMIN.
pub fn agents_loaded() -> anyhow::Result<usize> {
    let mut n = 0;
    for p in aya::programs::loaded_programs() {
        if p.context("listing loaded BPF programs")?.name_as_str() == Some(names::SEND_LENGTH) {
            n += 1;
        }
    }
    Ok(n)
}

/// The kernel's budget per window (`BUDGET_WINDOW_NS`) for a rate per
/// second; at least one event when there is a limit.
fn netns_budget_per_window(per_s: u32) -> u32 {
    if per_s == 0 {
        return 0;
    }
    let windows = 1_000_000_000 / mesh_trace_common::BUDGET_WINDOW_NS;
    (u64::from(per_s) / windows).max(1) as u32
}

/// Registers a map's fd with tokio for readability.
fn readable<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: the fd belongs to `inner`, which the AsyncFd owns, so it stays
    // open for as long as it is registered.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// What the programs read of the kernel's TCP structs without CO-RE, from
/// its BTF: where `struct tcp_sock` keeps the two sequence numbers the data
/// events carry and the smoothed RTT (`probes/socket_io.rs`), where a
/// segment's count and a socket's state are, and which arguments the TCP
/// tracepoints pass on this kernel (`probes/tcp_issues.rs`).
struct TcpSockOffsets {
    write_seq: u32,
    copied_seq: u32,
    rcv_nxt: u32,
    srtt_us: u32,
    rtt_min: u32,
    skb_cb: u32,
    skb_sk: u32,
    skb_head: u32,
    skb_data: u32,
    skb_len: u32,
    skb_transport_header: u32,
    sk_state: u32,
    skc_family: u32,
    skc_daddr: u32,
    skc_rcv_saddr: u32,
    skc_dport: u32,
    skc_num: u32,
    skc_v6_daddr: u32,
    skc_v6_rcv_saddr: u32,
    skc_net: u32,
    net_cookie: u32,
    retransmit_has_err: u32,
    send_reset_has_reason: u32,
}

/// Whether the kernel's BTF has every struct member the programs read
/// without CO-RE (for `mesh-trace check`): the error names the first one
/// missing; without it the tracer does not load.
pub fn kernel_layout_known() -> anyhow::Result<()> {
    let btf = super::btf::KernelBtf::from_sys_fs()?;
    TcpSockOffsets::from_btf(&btf)?;
    nat::KernelOffsets::from_btf(&btf)?;
    Ok(())
}

impl TcpSockOffsets {
    fn from_btf(btf: &super::btf::KernelBtf) -> anyhow::Result<TcpSockOffsets> {
        // A kernel without these tracepoints loads without their programs
        // (see `optional`); their arguments then do not matter.
        let args = |tp: &str| btf.tracepoint_args(tp).unwrap_or(0);
        Ok(TcpSockOffsets {
            write_seq: btf.member_offset("tcp_sock", "write_seq")?,
            copied_seq: btf.member_offset("tcp_sock", "copied_seq")?,
            rcv_nxt: btf.member_offset("tcp_sock", "rcv_nxt")?,
            srtt_us: btf.member_offset("tcp_sock", "srtt_us")?,
            // struct minmax { struct minmax_sample { u32 t; u32 v; } s[3]; }:
            // s[0].v is the current minimum.
            rtt_min: btf.member_offset("tcp_sock", "rtt_min")? + 4,
            skb_cb: btf.member_offset("sk_buff", "cb")?,
            skb_sk: btf.member_offset("sk_buff", "sk")?,
            skb_head: btf.member_offset("sk_buff", "head")?,
            skb_data: btf.member_offset("sk_buff", "data")?,
            skb_len: btf.member_offset("sk_buff", "len")?,
            skb_transport_header: btf.member_offset("sk_buff", "transport_header")?,
            sk_state: btf.member_offset("sock_common", "skc_state")?,
            skc_family: btf.member_offset("sock_common", "skc_family")?,
            skc_daddr: btf.member_offset("sock_common", "skc_daddr")?,
            skc_rcv_saddr: btf.member_offset("sock_common", "skc_rcv_saddr")?,
            skc_dport: btf.member_offset("sock_common", "skc_dport")?,
            skc_num: btf.member_offset("sock_common", "skc_num")?,
            // Absent without IPv6, and then so are IPv6 sockets.
            skc_v6_daddr: btf
                .member_offset("sock_common", "skc_v6_daddr")
                .unwrap_or(0),
            // Absent without IPv6, and then so are IPv6 sockets.
            skc_v6_rcv_saddr: btf
                .member_offset("sock_common", "skc_v6_rcv_saddr")
                .unwrap_or(0),
            // possible_net_t holds the one pointer.
            skc_net: btf.member_offset("sock_common", "skc_net")?,
            net_cookie: btf.member_offset("net", "net_cookie")?,
            retransmit_has_err: u32::from(args("tcp_retransmit_skb") >= 3),
            send_reset_has_reason: u32::from(args("tcp_send_reset") >= 3),
        })
    }
}

/// Duplicates the descriptors of the maps the NAT programs write to, and
/// finds the struct members they read in the kernel's BTF.
fn nat_shared(ebpf: &Ebpf, noop: bool, btf: &super::btf::KernelBtf) -> anyhow::Result<nat::Shared> {
    let fd = |name: &str| -> anyhow::Result<std::os::fd::OwnedFd> {
        let map = ebpf.map(name).with_context(|| format!("{name} map"))?;
        let data = match map {
            aya::maps::Map::RingBuf(d)
            | aya::maps::Map::PerCpuArray(d)
            | aya::maps::Map::HashMap(d) => d,
            _ => anyhow::bail!("{name} has an unexpected map type"),
        };
        Ok(data.fd().as_fd().try_clone_to_owned()?)
    };
    Ok(nat::Shared {
        events: fd(names::EVENTS)?,
        lost: fd(names::LOST)?,
        meshed: fd(names::MESHED_NETNS)?,
        offsets: nat::KernelOffsets::from_btf(btf)?,
        noop,
    })
}

fn attach_tp_btf(ebpf: &mut Ebpf, name: &str, tracepoint: &str, btf: &Btf) -> anyhow::Result<()> {
    let prog: &mut BtfTracePoint = program(ebpf, name)?.try_into()?;
    prog.load(tracepoint, btf)
        .with_context(|| format!("loading {name}"))?;
    prog.attach().with_context(|| format!("attaching {name}"))?;
    Ok(())
}

/// The cookie of the host's network namespace, whose sockets are not
/// traced: pid 1's (the agent runs with the host's PID namespace), else the
/// agent's own (it runs with the host's network); 0 when neither can be
/// read, and then every socket is.
fn host_netns_cookie() -> u64 {
    let metadata = crate::flows::metadata::netns_cookie_at;
    metadata(Path::new("/proc/1/ns/net"))
        .or_else(|e| {
            tracing::debug!("pid 1's network namespace: {e:#}; taking the agent's own");
            metadata(Path::new("/proc/self/ns/net"))
        })
        .unwrap_or_else(|e| {
            tracing::warn!("host network namespace unknown, its sockets are tracked too: {e:#}");
            0
        })
}

/// Loads the TLS plaintext programs; they attach per file
/// ([`Tracer::attach_tls`]).
fn load_tls_probes(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for (_, name) in super::tls::SYMBOLS {
        let prog: &mut UProbe = program(ebpf, name)?.try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    let prog: &mut UProbe = program(ebpf, names::SSL_RETURN)?.try_into()?;
    prog.load()
        .with_context(|| format!("loading {}", names::SSL_RETURN))?;
    Ok(())
}

fn load_adopt(ebpf: &mut Ebpf, btf: &Btf) -> anyhow::Result<()> {
    let prog: &mut Iter = program(ebpf, names::ADOPT_PROG)?.try_into()?;
    prog.load("tcp", btf)
        .with_context(|| format!("loading {}", names::ADOPT_PROG))?;
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))
}
