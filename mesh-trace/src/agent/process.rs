//! The standard `process_*` metrics of Prometheus' client libraries, read
//! from /proc/self at every scrape: the agent's own memory and CPU; and
//! what its allocator holds (`mesh_trace_heap_*`), which tells a table that
//! grows from memory the allocator keeps after a peak.
use std::sync::atomic::Ordering;

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::{Registry, Unit},
};

pub struct ProcessMetrics {
    pub registry: Registry,
    /// `mesh_trace_heap_*`.
    pub heap_registry: Registry,
    heap_in_use: Gauge,
    heap_free: Gauge,
    resident_memory: Gauge,
    virtual_memory: Gauge,
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    open_fds: Gauge,
    start_time: Gauge,
}

impl ProcessMetrics {
    pub fn new() -> ProcessMetrics {
        let mut registry = Registry::with_prefix("process");
        let resident_memory = Gauge::default();
        registry.register_with_unit(
            "resident_memory",
            "Resident memory size",
            Unit::Bytes,
            resident_memory.clone(),
        );
        let virtual_memory = Gauge::default();
        registry.register_with_unit(
            "virtual_memory",
            "Virtual memory size",
            Unit::Bytes,
            virtual_memory.clone(),
        );
        let cpu_seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "cpu",
            "User and system CPU time spent",
            Unit::Seconds,
            cpu_seconds.clone(),
        );
        let open_fds = Gauge::default();
        registry.register("open_fds", "Open file descriptors", open_fds.clone());
        let start_time = Gauge::default();
        registry.register_with_unit(
            "start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            start_time.clone(),
        );
        let mut heap_registry = Registry::with_prefix("mesh_trace_heap");
        let heap_in_use = Gauge::default();
        heap_registry.register_with_unit(
            "in_use",
            "Heap memory the agent's allocator has handed out and not had back (glibc mallinfo2)",
            Unit::Bytes,
            heap_in_use.clone(),
        );
        let heap_free = Gauge::default();
        heap_registry.register_with_unit(
            "free",
            "Heap memory freed but still held by the agent's allocator, resident or not (glibc mallinfo2)",
            Unit::Bytes,
            heap_free.clone(),
        );
        let me = ProcessMetrics {
            registry,
            heap_registry,
            heap_in_use,
            heap_free,
            resident_memory,
            virtual_memory,
            cpu_seconds,
            open_fds,
            start_time,
        };
        me.refresh();
        me
    }

    /// Reads /proc/self again; a field that cannot be read keeps its value.
    pub fn refresh(&self) {
        // SAFETY: sysconf has no preconditions.
        let (page, ticks) = unsafe {
            (
                libc::sysconf(libc::_SC_PAGESIZE),
                libc::sysconf(libc::_SC_CLK_TCK),
            )
        };
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name, which may hold spaces: state is
            // field 3, utime 14, stime 15, starttime 22, vsize 23, rss 24.
            let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
            if let (Some(utime), Some(stime)) = (field(14), field(15)) {
                let secs = (utime + stime) as f64 / ticks.max(1) as f64;
                self.cpu_seconds
                    .inner()
                    .store(secs.to_bits(), Ordering::Relaxed);
            }
            if let Some(v) = field(23) {
                self.virtual_memory.set(v as i64);
            }
            if let Some(rss) = field(24) {
                self.resident_memory.set(rss as i64 * page);
            }
            if let (Some(start), Some(boot)) = (field(22), boot_time()) {
                self.start_time
                    .set(boot + (start / ticks.max(1) as u64) as i64);
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
        if let Some(heap) = heap_usage() {
            self.heap_in_use.set(heap.in_use as i64);
            self.heap_free.set(heap.free as i64);
        }
    }
}

/// What the allocator holds, in bytes.
pub struct HeapUsage {
    /// Handed out and not freed (small blocks and mmapped ones).
    pub in_use: u64,
    /// Freed, kept by the allocator for reuse.
    pub free: u64,
}

/// The allocator's own account (glibc's `mallinfo2`, summed over arenas).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn heap_usage() -> Option<HeapUsage> {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct.
    let m = unsafe { libc::mallinfo2() };
    Some(HeapUsage {
        in_use: (m.uordblks + m.hblkhd) as u64,
        free: m.fordblks as u64,
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn heap_usage() -> Option<HeapUsage> {
    None
}

/// Gives the pages of freed heap memory back to the kernel (glibc's
/// `malloc_trim`). Without it the allocator keeps whatever start-up (BTF,
/// program loading) and each peak of sockets freed, spread over its
/// threads' arenas, and resident memory only steps up.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_heap() {
    // SAFETY: malloc_trim only returns free pages of the allocator's own.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_heap() {}

impl Default for ProcessMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Boot time in seconds since the epoch (`btime` in /proc/stat).
fn boot_time() -> Option<i64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}
