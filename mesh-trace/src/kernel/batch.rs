//! Per-CPU batches of data events (see `mesh_trace_common::DataBatch`):
//! turning them on, sending them to the ring buffer before each read, and
//! putting what was read back in time order.
//!
//! A ring buffer reservation per socket call was most of the data path's
//! cost, so the socket programs append to a per-CPU batch that goes out in
//! one record. Batches leave the events of different CPUs out of order with
//! each other and with the events sent on their own (connects, state
//! changes, NAT), so before it reads (at most once per poll) the agent runs
//! the flush program on every CPU, and releases what it read in timestamp
//! order up to the flush before the last one; later events wait for a
//! later read, when every batch that could hold something older has been
//! sent and read.
use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::Context as _;
use aya::{
    maps::{PerCpuArray, PerCpuValues},
    programs::{ProgramFd, RawTracePoint},
    Ebpf,
};
use mesh_trace_common::{names, DataBatch, BATCH_BUF, BATCH_ENTRY_MAX, BATCH_MAX};

use super::events::{DecodeError, Event};

/// Batching in use: the flush program, the CPUs it runs on, and the events
/// read but not yet released.
pub struct Batching {
    flush: ProgramFd,
    cpus: Vec<u32>,
    /// When the batches were last sent (kernel clock).
    flushed_at: u64,
    /// When they were sent the time before: what is released.
    released_upto: u64,
    pub order: TimeOrder,
}

/// Events read from the ring buffer, released in time order.
#[derive(Default)]
pub struct TimeOrder {
    held: Vec<Event>,
}

/// How often the agent asks every CPU for its batch: once per poll (the
/// tracer's `RING_POLL`, 20 ms), so that events reach it about as promptly
/// as without batches (under load batches fill and go out sooner; a wakeup
/// before the poll is due does not ask again). Asking another CPU is an
/// interrupt there and a wait here, most of an idle agent's CPU time; asking
/// every 100 ms instead left the agent's rules that compare event times
/// with its own clock short of events (more requests unstitched in the span
/// tests), so it stays at the poll.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// Batch size for a ring buffer of `ring_bytes`: an eighth of it, so that a
/// full ring holds several batches, at most [`BATCH_MAX`]; at least one
/// entry of the largest kind (a 2 KiB request head), within half the ring.
pub fn cap_for(ring_bytes: u32) -> u32 {
    let one_entry = (BATCH_ENTRY_MAX + 16) as u32;
    (ring_bytes / 8)
        .max(one_entry)
        .min(BATCH_MAX as u32)
        .min(ring_bytes / 2)
}

impl Batching {
    /// Loads the flush program, checks that this kernel runs it on a chosen
    /// CPU, and sets every CPU's batch cap to `cap` bytes. Call before the
    /// socket programs are attached. `None` (events go to the ring one by
    /// one, as the map starts zeroed) when any step fails.
    pub fn start(ebpf: &mut Ebpf, cap: u32) -> Option<Batching> {
        match Self::try_start(ebpf, cap) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(
                    "data events go to the ring buffer one by one (batching off, each socket call costs more): {e:#}"
                );
                None
            }
        }
    }

    fn try_start(ebpf: &mut Ebpf, cap: u32) -> anyhow::Result<Batching> {
        anyhow::ensure!(
            cap as usize >= BATCH_ENTRY_MAX,
            "a batch of {cap} bytes holds no event"
        );
        let prog: &mut RawTracePoint = ebpf
            .program_mut(names::FLUSH)
            .context("the flush program is missing from the object")?
            .try_into()?;
        prog.load().context("loading the flush program")?;
        let flush = prog.fd()?.try_clone()?;
        let cpus =
            aya::util::online_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
        let batching = Batching {
            flush,
            cpus,
            flushed_at: 0,
            released_upto: 0,
            order: TimeOrder::default(),
        };
        // The kernel must run it on a CPU of our choosing, or batches on
        // idle CPUs would wait for their next event.
        for &cpu in &batching.cpus {
            run_on_cpu(&batching.flush, cpu)
                .with_context(|| format!("running the flush program on CPU {cpu}"))?;
        }
        let possible =
            aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
        let mut map: PerCpuArray<_, DataBatch> =
            PerCpuArray::try_from(ebpf.map_mut(names::BATCH).context("BATCH map")?)?;
        let value = DataBatch {
            len: 0,
            count: 0,
            cap,
            busy: 0,
            buf: [0; BATCH_BUF],
        };
        map.set(0, PerCpuValues::try_from(vec![value; possible])?, 0)
            .context("setting the batch size")?;
        Ok(batching)
    }

    /// Sends every CPU's batch to the ring buffer at most once every
    /// `every_ns` (see [`FLUSH_EVERY`]), and returns up to when events may
    /// be released: the flush before the last one. A flush can miss a batch
    /// (busy when asked) and a read can stop at a record still being written
    /// while later ones wait; a poll of slack lets those arrive before
    /// anything newer than them is released.
    pub fn flush_if_due(&mut self, now_ns: u64, every_ns: u64) -> u64 {
        if now_ns.saturating_sub(self.flushed_at) >= every_ns {
            self.flush_all();
            self.released_upto = self.flushed_at;
            self.flushed_at = now_ns;
        }
        self.released_upto
    }

    /// Sends every CPU's batch to the ring buffer. A CPU that refuses is
    /// skipped: its batch goes out when it fills, and its events are
    /// released late rather than lost.
    fn flush_all(&self) {
        for &cpu in &self.cpus {
            if let Err(e) = run_on_cpu(&self.flush, cpu) {
                tracing::debug!("flushing CPU {cpu}'s batch: {e}");
            }
        }
    }
}

impl TimeOrder {
    /// Appends to `out`, in time order, the events of `read` and those held
    /// from earlier reads that happened before `flushed_at_ns` (when the
    /// flush began, on the kernel's clock); holds the rest.
    pub fn release(
        &mut self,
        flushed_at_ns: u64,
        read: Vec<Result<Event, DecodeError>>,
        out: &mut Vec<Result<Event, DecodeError>>,
    ) {
        for r in read {
            match r {
                Ok(ev) => self.held.push(ev),
                // Nothing to order an undecodable record by.
                Err(e) => out.push(Err(e)),
            }
        }
        // Stable: events with one timestamp keep the order they were read
        // in; mostly sorted already, which the sort is fast on.
        self.held.sort_by_key(Event::ts_ns);
        let ready = self.held.partition_point(|e| e.ts_ns() < flushed_at_ns);
        out.extend(self.held.drain(..ready).map(Ok));
    }
}

/// Runs the flush program once on `cpu` (`BPF_PROG_TEST_RUN` with
/// `BPF_F_TEST_RUN_ON_CPU`; raw tracepoint programs allow it).
fn run_on_cpu(prog: &ProgramFd, cpu: u32) -> std::io::Result<()> {
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_F_TEST_RUN_ON_CPU: u32 = 1;
    // union bpf_attr, the `test` part: prog_fd at 0, flags at 64, cpu at 68.
    let mut attr = [0u32; 20];
    attr[0] = prog.as_fd().as_raw_fd() as u32;
    attr[16] = BPF_F_TEST_RUN_ON_CPU;
    attr[17] = cpu;
    // SAFETY: attr is a zeroed bpf_attr prefix of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's clock for events (`bpf_ktime_get_ns`: CLOCK_MONOTONIC).
pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_trace_common::{EventKind, OwnerEvent};

    fn owner(ts: u64, cookie: u64) -> Event {
        let mut e = OwnerEvent::default();
        e.header.kind = EventKind::Owner as u32;
        e.header.ts_ns = ts;
        e.sock_cookie = cookie;
        Event::Owner(e)
    }

    fn order(b: &mut TimeOrder, at: u64, read: Vec<Event>) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        b.release(at, read.into_iter().map(Ok).collect(), &mut out);
        out.into_iter()
            .map(|e| {
                let e = e.unwrap();
                (e.ts_ns(), e.sock_cookie())
            })
            .collect()
    }

    #[test]
    fn events_come_out_in_time_order_and_later_ones_wait() {
        let mut b = TimeOrder::default();
        // A batch from one CPU after single events of another.
        let read = vec![owner(30, 1), owner(10, 2), owner(20, 3), owner(50, 4)];
        assert_eq!(order(&mut b, 40, read), [(10, 2), (20, 3), (30, 1)]);
        // Held until the next read's flush is past it; ties keep read order.
        assert_eq!(
            order(&mut b, 100, vec![owner(45, 5), owner(50, 6)]),
            [(45, 5), (50, 4), (50, 6)]
        );
        assert!(b.held.is_empty());
    }

    #[test]
    fn batch_size_is_an_eighth_of_the_ring_at_most_the_maximum() {
        assert_eq!(cap_for(1 << 20), BATCH_MAX as u32);
        // Room for one whole request head, within half the ring: a ring of
        // 4 KiB has none (batching off).
        assert_eq!(cap_for(16384), (BATCH_ENTRY_MAX + 16) as u32);
        assert_eq!(cap_for(4096), 2048);
        assert!((cap_for(4096) as usize) < BATCH_ENTRY_MAX);
    }
}
