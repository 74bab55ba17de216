//! Maps shared by every program, and the helpers that write to them.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SK_STORAGE_GET_F_CREATE,
    },
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, generated::bpf_sk_storage_get},
    macros::{btf_map, map},
    maps::{HashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use mesh_trace_common::{
    BudgetWindow, DataBatch, EventHeader, EventKind, H2Sock, LossReason, TrackedSock, ADOPT_MAX,
    BUDGET_WINDOW_NS, MESHED_NETNS_MAX,
};

/// Default ring buffer size; the agent overrides it (`ring_buffer_bytes`).
const DEFAULT_RING_BYTES: u32 = 1 << 20;

/// Every event for the agent goes through this one ring buffer: on its own,
/// or (data events) in a per-CPU batch; the agent puts them in time order.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Events that could not be delivered, per CPU, indexed by [`LossReason`].
#[map(name = "LOST")]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LossReason::COUNT, 0);

#[inline(always)]
pub fn count_loss(reason: LossReason) {
    count_losses(reason, 1);
}

#[inline(always)]
pub fn count_losses(reason: LossReason, n: u64) {
    if let Some(slot) = LOST.get_ptr_mut(reason as u32) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *slot += n };
    }
}

/// This CPU's data events on their way to [`EVENTS`] (see [`DataBatch`]).
#[map(name = "BATCH")]
pub static BATCH: PerCpuArray<DataBatch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn header(kind: EventKind) -> EventHeader {
    header_at(kind, unsafe { bpf_ktime_get_ns() })
}

/// A header with a time the caller already read.
#[inline(always)]
pub fn header_at(kind: EventKind, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns,
    }
}

/// Bytes waiting in the ring buffer past which a commit wakes the agent,
/// set by the agent; below it the agent finds them at its next poll. Waking
/// the reader on every event (the kernel's default when the reader has
/// caught up) costs an interrupt per event. 0: the kernel's default.
#[no_mangle]
static WAKEUP_BYTES: u64 = 0;

/// Submit flags for a record just reserved: wake the agent only when enough
/// is waiting.
#[inline(always)]
pub fn wakeup_flags() -> u64 {
    // SAFETY: a frozen global; volatile so the compiler keeps the load.
    let threshold = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    if threshold == 0 {
        0
    } else if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= threshold {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Writes `event` to the ring buffer, or counts it as lost.
#[inline(always)]
pub fn emit<T: 'static>(event: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(wakeup_flags());
        }
        None => count_loss(LossReason::RingBufFull),
    }
}

/// Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`) declared the BTF way,
/// which that map type requires. The kernel keeps the value on the socket
/// itself: looking it up is a pointer walk, not a hash, so sockets without
/// it (everything outside the mesh's TCP connections) cost almost nothing,
/// and it is freed with the socket, so it needs no size limit of its own.
#[repr(C)]
pub struct SockStorage<V> {
    r#type: *const [i32; 24], // BPF_MAP_TYPE_SK_STORAGE
    key: *const i32,
    value: *const V,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; 1], // BPF_F_NO_PREALLOC, required
}

// SAFETY: the fields only describe the map to the loader; nothing reads them.
unsafe impl<V> Sync for SockStorage<V> {}

impl<V> SockStorage<V> {
    const fn new() -> Self {
        SockStorage {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    /// The value stored on `sk` (any pointer the verifier knows as a socket),
    /// created from `init` when given and absent.
    #[inline(always)]
    pub fn get(&self, sk: *mut c_void, init: Option<&mut V>) -> Option<&mut V> {
        let (value, flags) = match init {
            Some(v) => (
                v as *mut V as *mut c_void,
                BPF_SK_STORAGE_GET_F_CREATE as u64,
            ),
            None => (core::ptr::null_mut(), 0),
        };
        let map = self as *const Self as *mut c_void;
        // SAFETY: the helper returns null or a pointer to this map's value on
        // the socket, valid for this program run.
        unsafe { (bpf_sk_storage_get(map, sk, value, flags) as *mut V).as_mut() }
    }
}

/// TCP sockets between ESTABLISHED and close: the sockets the data-path
/// programs care about, with their stream offsets.
#[btf_map(name = "SOCKS")]
pub static SOCKS: SockStorage<TrackedSock> = SockStorage::new();

/// HTTP/2 framing state of sockets whose connection began with HTTP/2
/// (created at its first bytes; other sockets have none).
#[btf_map(name = "H2_SOCKS")]
pub static H2_SOCKS: SockStorage<H2Sock> = SockStorage::new();

/// Sockets that were established before the programs were attached, by
/// cookie, written by the agent from sock_diag; the `iter/tcp` program moves
/// them into [`SOCKS`].
#[map(name = "ADOPT")]
pub static ADOPT: HashMap<u64, TrackedSock> =
    HashMap::with_max_entries(ADOPT_MAX, BPF_F_NO_PREALLOC);

/// Network namespaces whose sockets carry mesh traffic (pods with a sidecar),
/// by namespace cookie: the only ones whose payload is captured. Written by
/// the agent.
#[map(name = "MESHED_NETNS")]
pub static MESHED_NETNS: HashMap<u64, u32> = HashMap::with_max_entries(MESHED_NETNS_MAX, 0);

/// Data events each namespace may send per CPU per window
/// (`BUDGET_WINDOW_NS`), set by the agent; 0: no limit.
#[no_mangle]
static NETNS_BUDGET: u32 = 0;

/// What each namespace spent of its budget, per CPU (no atomics needed:
/// the socket tracepoints run with preemption off). LRU: a namespace gone
/// quiet leaves room.
#[map(name = "NETNS_SPENT")]
pub static NETNS_SPENT: LruPerCpuHashMap<u64, BudgetWindow> =
    LruPerCpuHashMap::with_max_entries(MESHED_NETNS_MAX, 0);

/// Whether namespace `netns` may send one more data event now; counts it.
#[inline(always)]
pub fn within_budget(netns: u64) -> bool {
    // SAFETY: a frozen global; volatile so the compiler keeps the load.
    let budget = unsafe { core::ptr::read_volatile(&NETNS_BUDGET) };
    if budget == 0 {
        return true;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    match NETNS_SPENT.get_ptr_mut(netns) {
        Some(w) => {
            // SAFETY: a value of this CPU's copy, valid during the program.
            let w = unsafe { &mut *w };
            if now.wrapping_sub(w.start_ns) >= BUDGET_WINDOW_NS {
                w.start_ns = now;
                w.events = 1;
                true
            } else if w.events < budget {
                w.events += 1;
                true
            } else {
                false
            }
        }
        None => {
            let w = BudgetWindow {
                start_ns: now,
                events: 1,
                _pad: 0,
            };
            let _ = NETNS_SPENT.insert(netns, w, 0);
            true
        }
    }
}

/// Set by the agent's `--noop` mode: every program returns at once, so
/// benchmarks can measure the cost of the hooks themselves (the floor).
#[no_mangle]
static NOOP: u32 = 0;

#[inline(always)]
pub fn noop() -> bool {
    // SAFETY: a frozen global; volatile so the compiler keeps the load.
    unsafe { core::ptr::read_volatile(&NOOP) != 0 }
}
