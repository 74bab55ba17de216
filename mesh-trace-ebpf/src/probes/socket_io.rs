//! tp_btf `sock_send_length` / `sock_recv_length`: they run in the context
//! of the thread doing socket I/O, after the bytes moved, on every socket of
//! the node (never for files). They exit at once for sockets that are not
//! tracked. For tracked sockets they report the owner process once, and in
//! meshed namespaces every send and receive: time, thread, TCP sequence
//! number of the first byte moved and a bounded prefix of the payload, read
//! from the syscall's user buffer; and about once a second, the socket's
//! smoothed RTT.
//!
//! Sequence numbers, not counters: the two ends of a connection number its
//! bytes alike whenever each was first tracked (adopted sockets, a restarted
//! agent), and a lost event leaves no lasting shift.
//!
//! Data events go into this CPU's batch (`BATCH`), which reaches the ring
//! buffer in one record when full or when the agent runs `mt_flush` here:
//! a ring buffer reservation per call cost more than the rest of the path.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        generated::{bpf_get_current_task_btf, bpf_probe_read_user, bpf_task_pt_regs},
    },
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use mesh_trace_common::{
    syscall_abi::{self, BufferArg, SyscallAbi, IOVEC_SIZE, MSGHDR_MSG_IOV},
    BatchEntry, DataBatch, DataEvent, EventHeader, EventKind, LossReason, OwnerEvent, TaskInfo,
    TcpIssueEvent, BATCH_BUF, BATCH_ENTRY_MAX, BATCH_MAX, DATA_FIXED_LEN, DATA_PREFIX_MAX,
    DIR_RECV, DIR_SEND, ISSUE_RTT_SAMPLE, TRACKED_H2, TRACKED_MESHED, TRACKED_OWNER_SEEN,
    TRACKED_SEEN_RECV, TRACKED_SEEN_SEND,
};

use super::{h2, offset, read_kernel, tcp_issues::OFF_SK_STATE};
use crate::maps::{
    count_loss, count_losses, emit, header, header_at, noop, wakeup_flags, within_budget, BATCH,
    EVENTS, MESHED_NETNS, SOCKS,
};

/// Payload bytes to copy per event, set by the agent (at most DATA_PREFIX_MAX).
#[no_mangle]
pub(crate) static PREFIX_LEN: u32 = 128;

/// Payload bytes to copy when they begin an HTTP/1.x request (its head's
/// lines identify it inside a sidecar; sidecars write a kilobyte and more
/// of their own), set by the agent (at most DATA_PREFIX_MAX; at most
/// PREFIX_LEN turns it off).
#[no_mangle]
pub(crate) static HEAD_LEN: u32 = 0;

/// Copies into `ev` the first bytes of the `len` at user address `buf`:
/// [`PREFIX_LEN`] of them, or [`HEAD_LEN`] when they begin a request.
///
/// # Safety
/// `ev` points at writable memory of `DataEvent`'s size.
#[inline(always)]
pub(crate) unsafe fn read_prefix(ev: *mut DataEvent, buf: u64, len: u64) {
    (*ev).prefix_len = 0;
    if buf == 0 {
        return;
    }
    let want = core::ptr::read_volatile(&PREFIX_LEN) as u64;
    let mut n = if len < want { len } else { want };
    // The verifier needs the bound spelled out.
    if n > DATA_PREFIX_MAX as u64 {
        n = DATA_PREFIX_MAX as u64;
    }
    if n == 0
        || bpf_probe_read_user(
            (*ev).prefix.as_mut_ptr() as *mut c_void,
            n as u32,
            buf as *const c_void,
        ) != 0
    {
        return;
    }
    (*ev).prefix_len = n as u32;
    let head = core::ptr::read_volatile(&HEAD_LEN) as u64;
    if head <= n || len <= n || n < 4 || !begins_request(&(*ev).prefix) {
        return;
    }
    let mut m = if len < head { len } else { head };
    if m > DATA_PREFIX_MAX as u64 {
        m = DATA_PREFIX_MAX as u64;
    }
    // A failed read leaves the destination zeroed, the first read's bytes
    // with it.
    (*ev).prefix_len = if bpf_probe_read_user(
        (*ev).prefix.as_mut_ptr() as *mut c_void,
        m as u32,
        buf as *const c_void,
    ) == 0
    {
        m as u32
    } else {
        0
    };
}

/// Whether `prefix` (4 bytes at least) begins an HTTP/1.x request line.
#[inline(always)]
fn begins_request(prefix: &[u8; DATA_PREFIX_MAX]) -> bool {
    let first = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    const METHODS: [&[u8; 4]; 9] = [
        b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"PATC", b"OPTI", b"CONN", b"TRAC",
    ];
    let mut i = 0;
    while i < METHODS.len() {
        if first == u32::from_le_bytes(*METHODS[i]) {
            return true;
        }
        i += 1;
    }
    false
}

/// 1 when the agent loaded the TLS plaintext probes: I/O inside a TLS
/// call is then noted for them (a hash lookup per call).
#[no_mangle]
static TLS_PROBES: u32 = 0;

/// Offsets of `tcp_sock.write_seq` (the sequence number after the last byte
/// queued for sending) and `tcp_sock.copied_seq` (after the last byte read
/// by the application), set by the agent from the kernel's BTF.
#[no_mangle]
static OFF_WRITE_SEQ: u32 = 0;
#[no_mangle]
static OFF_COPIED_SEQ: u32 = 0;
/// Offset of `tcp_sock.rcv_nxt` (after the last byte received, and the
/// peer's FIN once it came).
#[no_mangle]
static OFF_RCV_NXT: u32 = 0;

/// TCP states after the peer's FIN came (`sock_common.skc_state`).
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;
/// Offsets of `tcp_sock.srtt_us` (smoothed RTT in 1/8 microseconds) and of
/// the current value of `tcp_sock.rtt_min` (its first sample's `v`).
#[no_mangle]
static OFF_SRTT_US: u32 = 0;
#[no_mangle]
static OFF_RTT_MIN: u32 = 0;

const MSG_PEEK: i32 = 2;

/// Syscall numbers and register offsets of the architecture the programs
/// are built for (`bpf_target_arch`, set by mesh-trace/build.rs).
const ABI: SyscallAbi = syscall_abi::current();

#[btf_tracepoint(function = "sock_send_length")]
pub fn mt_send_length(ctx: BtfTracePointContext) -> i32 {
    if noop() {
        return 0;
    }
    on_io(&ctx, DIR_SEND);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn mt_recv_length(ctx: BtfTracePointContext) -> i32 {
    if noop() {
        return 0;
    }
    on_io(&ctx, DIR_RECV);
    0
}

#[inline(always)]
fn on_io(ctx: &BtfTracePointContext, direction: u32) {
    let sk: *mut c_void = ctx.arg(0);
    // Sockets outside the tracked set leave here, after one pointer walk.
    let Some(tracked) = SOCKS.get(sk, None) else {
        return;
    };
    let cookie = tracked.cookie;
    if tracked.flags & TRACKED_OWNER_SEEN == 0 {
        // Two CPUs may both get here for one socket; the agent keeps the first.
        tracked.flags |= TRACKED_OWNER_SEEN;
        emit(OwnerEvent {
            header: header(EventKind::Owner),
            sock_cookie: cookie,
            task: TaskInfo {
                pid_tgid: bpf_get_current_pid_tgid(),
                uid_gid: bpf_get_current_uid_gid(),
                comm: bpf_get_current_comm().unwrap_or_default(),
            },
        });
    }
    let ret: i32 = ctx.arg(1);
    if ret <= 0 {
        return;
    }
    // A peek (e.g. a sidecar sniffing for TLS) moves no bytes off the stream.
    let flags: i32 = ctx.arg(2);
    if direction == DIR_RECV && flags & MSG_PEEK != 0 {
        return;
    }
    let len = ret as u64;
    // Whether these are the first bytes in this direction (HTTP/2 is told
    // from them), noted before anything can return.
    let seen = if direction == DIR_SEND {
        TRACKED_SEEN_SEND
    } else {
        TRACKED_SEEN_RECV
    };
    let first_bytes = tracked.flags & seen == 0;
    tracked.flags |= seen;
    // The namespace lookup is a hash; a socket found meshed once keeps a
    // flag instead.
    if tracked.flags & TRACKED_MESHED == 0 {
        if unsafe { MESHED_NETNS.get(tracked.netns_cookie) }.is_none() {
            return;
        }
        tracked.flags |= TRACKED_MESHED;
    }
    // One pod flooding cannot fill the ring for the others: past its
    // budget its events are counted, and its own requests see the gap.
    if !within_budget(tracked.netns_cookie) {
        count_loss(LossReason::NetnsBudget);
        return;
    }
    let (seq, opposite) = sequence_numbers(sk, direction, ret as u32);
    // A send's moment: when its last byte left, if it left inside the call
    // (`transmit`); else, as a receive's, now, as the call returns.
    let now = unsafe { bpf_ktime_get_ns() };
    let end = seq.wrapping_add(ret as u32);
    let at = if direction == DIR_SEND && tracked.sent_ns != 0 && tracked.sent_end_seq == end {
        tracked.sent_ns
    } else {
        now
    };
    if unsafe { core::ptr::read_volatile(&TLS_PROBES) } != 0 {
        super::tls::note_io(bpf_get_current_pid_tgid(), cookie, direction, seq, at);
    }
    // The data event first, as soon as the call returned: a peer's event
    // for the same bytes should not be reserved before it.
    let ts_ns = capture(at, cookie, direction, u64::from(seq), len, opposite);
    if first_bytes || tracked.flags & TRACKED_H2 != 0 {
        if let Some(s) = syscall_args().and_then(|(kind, a1, a2)| h2::scratch(kind, a1, a2, false))
        {
            if first_bytes && h2::first_bytes(sk, direction, seq, s) {
                tracked.flags |= TRACKED_H2;
            }
            if tracked.flags & TRACKED_H2 != 0 {
                h2::walk(sk, cookie, direction, seq, ret as u32, at, s);
            }
        }
    }
    // Long-lived connections (a sidecar's pool) report their RTT about once
    // a second while they carry traffic, not only at open and close; the
    // data event's clock serves both.
    let second = (now >> 30) as u32;
    if ts_ns != 0 && tracked.rtt_sampled != second {
        tracked.rtt_sampled = second;
        let srtt = read_kernel::<u32>(sk as *const u8, offset(&OFF_SRTT_US)) >> 3;
        if srtt != 0 {
            emit(TcpIssueEvent {
                header: header_at(EventKind::TcpIssue, now),
                sock_cookie: cookie,
                issue: ISSUE_RTT_SAMPLE,
                detail: srtt,
                min_rtt_us: read_kernel(sk as *const u8, offset(&OFF_RTT_MIN)),
                sk_state: 0,
            });
        }
    }
}

/// Sequence number of the first of the `len` bytes this call moved (the
/// call has just advanced `write_seq` (send) or `copied_seq` (receive) past
/// them, under the socket lock), and the other direction's number now.
#[inline(always)]
fn sequence_numbers(sk: *mut c_void, direction: u32, len: u32) -> (u32, u32) {
    let (write, copied) = unsafe {
        (
            core::ptr::read_volatile(&OFF_WRITE_SEQ),
            core::ptr::read_volatile(&OFF_COPIED_SEQ),
        )
    };
    let (this, other) = if direction == DIR_SEND {
        (write, copied)
    } else {
        (copied, write)
    };
    let after = read_kernel::<u32>(sk as *const u8, this as usize);
    let mut first = after.wrapping_sub(len);
    if direction == DIR_RECV {
        // A receive that read up to the peer's FIN moved `copied_seq` past
        // it too (the FIN takes a sequence number): the bytes began one
        // earlier. Only a call that returned data and left nothing unread
        // before a FIN that came can have.
        let state = read_kernel::<u8>(sk as *const u8, offset(&OFF_SK_STATE));
        if matches!(state, TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING)
            && read_kernel::<u32>(sk as *const u8, offset(&OFF_RCV_NXT)) == after
        {
            first = first.wrapping_sub(1);
        }
    }
    (first, read_kernel::<u32>(sk as *const u8, other as usize))
}

/// Writes the data event stamped `ts_ns`, into this CPU's batch when the
/// agent turned batching on, else straight to the ring; returns `ts_ns`, or
/// 0 when it was lost.
#[inline(always)]
fn capture(ts_ns: u64, cookie: u64, direction: u32, offset: u64, len: u64, opposite: u32) -> u64 {
    if let Some(batch) = BATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's value. Socket calls do not nest on a CPU (the
        // tracepoints run with preemption off, in task context); only the
        // agent's flush may interrupt, and it leaves a busy batch alone.
        let b = unsafe { &mut *batch };
        if b.cap != 0 {
            return append(b, ts_ns, cookie, direction, offset, len, opposite);
        }
    }
    let Some(mut slot) = EVENTS.reserve::<DataEvent>(0) else {
        count_loss(LossReason::RingBufFull);
        return 0;
    };
    // SAFETY: reserved ring buffer memory of DataEvent's size.
    unsafe {
        fill(
            slot.as_mut_ptr(),
            ts_ns,
            cookie,
            direction,
            offset,
            len,
            opposite,
        )
    };
    slot.submit(wakeup_flags());
    ts_ns
}

/// Appends a data event to `b`, sending the batch first when the entry
/// might not fit under its cap.
#[inline(always)]
fn append(
    b: &mut DataBatch,
    ts_ns: u64,
    cookie: u64,
    direction: u32,
    offset: u64,
    len: u64,
    opposite: u32,
) -> u64 {
    // SAFETY: plain stores to this CPU's value; volatile so that the flag
    // brackets the writes below as an interrupting flush sees them.
    unsafe { core::ptr::write_volatile(&mut b.busy, 1) };
    let cap = if b.cap as usize > BATCH_MAX {
        BATCH_MAX
    } else {
        b.cap as usize
    };
    if b.len as usize + BATCH_ENTRY_MAX > cap {
        flush(b);
    }
    if b.len == 0 {
        let header = b.buf.as_mut_ptr() as *mut EventHeader;
        // SAFETY: the buffer starts with room for a header.
        unsafe { *header = header_at(EventKind::Batch, 0) };
        b.len = size_of::<EventHeader>() as u32;
    }
    let at = b.len as usize & (BATCH_MAX - 1);
    // SAFETY: `at` < BATCH_MAX and an entry takes at most BATCH_ENTRY_MAX
    // bytes, inside BATCH_BUF; 8-aligned like every entry.
    let entry = unsafe { b.buf.as_mut_ptr().add(at) } as *mut BatchEntry;
    let prefix = unsafe {
        let ev = entry.add(1) as *mut DataEvent;
        fill(ev, ts_ns, cookie, direction, offset, len, opposite);
        (*ev).prefix_len as usize
    };
    let bytes = DATA_FIXED_LEN
        + if prefix > DATA_PREFIX_MAX {
            DATA_PREFIX_MAX
        } else {
            prefix
        };
    unsafe {
        (*entry).len = bytes as u32;
        (*entry)._pad = 0;
    }
    b.len = (at + ((size_of::<BatchEntry>() + bytes + 7) & !7)) as u32;
    b.count += 1;
    unsafe { core::ptr::write_volatile(&mut b.busy, 0) };
    ts_ns
}

/// Sends the batch to the ring buffer (or counts its events lost) and
/// empties it.
#[inline(always)]
fn flush(b: &mut DataBatch) {
    // Masked rather than compared: the verifier tracks the bound through
    // the mask whatever the compiler makes of a comparison.
    let len = b.len as usize & (BATCH_BUF - 1);
    if len > size_of::<EventHeader>() {
        // SAFETY: `len` bytes of the buffer were written.
        let bytes = unsafe { core::slice::from_raw_parts(b.buf.as_ptr(), len) };
        if EVENTS.output::<[u8]>(bytes, wakeup_flags()).is_err() {
            count_losses(LossReason::RingBufFull, u64::from(b.count));
        }
    }
    b.len = 0;
    b.count = 0;
}

/// Sends this CPU's batch. Never attached: the agent runs it on every CPU
/// (`BPF_PROG_TEST_RUN` on a CPU) before it reads the ring buffer.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn mt_flush(_ctx: RawTracePointContext) -> i32 {
    if let Some(batch) = BATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's value; see `capture`.
        let b = unsafe { &mut *batch };
        if unsafe { core::ptr::read_volatile(&b.busy) } == 0 {
            flush(b);
        }
    }
    0
}

/// Fills a data event at `ev` (ring buffer or batch memory), its payload
/// prefix read from the syscall's user buffer.
///
/// # Safety
/// `ev` points at writable memory of `DataEvent`'s size.
#[inline(always)]
unsafe fn fill(
    ev: *mut DataEvent,
    ts_ns: u64,
    cookie: u64,
    direction: u32,
    offset: u64,
    len: u64,
    opposite: u32,
) {
    (*ev).header = header_at(EventKind::Data, ts_ns);
    (*ev).sock_cookie = cookie;
    (*ev).pid_tgid = bpf_get_current_pid_tgid();
    (*ev).offset = offset;
    (*ev).len = len as u32;
    (*ev).direction = direction;
    (*ev).opposite_seq = opposite;
    let (buf, room) = user_buffer();
    read_prefix(ev, buf, if len < room { len } else { room });
}

/// The current syscall's user buffer and its size, from the task's saved
/// registers: the second argument of read/write/sendto/recvfrom, the first
/// iovec of readv/writev/sendmsg/recvmsg. (0, 0) for anything else.
#[inline(always)]
fn user_buffer() -> (u64, u64) {
    let Some((kind, arg1, arg2)) = syscall_args() else {
        return (0, 0);
    };
    match kind {
        BufferArg::Direct => (arg1, arg2),
        BufferArg::Iovec => first_iovec(arg1),
        BufferArg::Msghdr => {
            let mut iov: u64 = 0;
            let ok = unsafe {
                bpf_probe_read_user(
                    &mut iov as *mut u64 as *mut c_void,
                    8,
                    (arg1 + MSGHDR_MSG_IOV as u64) as *const c_void,
                )
            } == 0;
            if ok {
                first_iovec(iov)
            } else {
                (0, 0)
            }
        }
        BufferArg::None => (0, 0),
    }
}

/// How the current syscall passes its buffer, and its arguments 1 and 2.
#[inline(always)]
fn syscall_args() -> Option<(BufferArg, u64, u64)> {
    // SAFETY: helpers valid in tp_btf programs; the result is a trusted
    // pointer to the task's `struct pt_regs`.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    if regs.is_null() {
        return None;
    }
    // SAFETY: fields of pt_regs at the offsets of this architecture's
    // table, each read with its own width; volatile keeps `regs + off` in
    // the load instruction, as the verifier wants for a BTF pointer.
    let (nr, arg1, arg2) = unsafe {
        let nr = if ABI.nr_size == 4 {
            i64::from(core::ptr::read_volatile(
                regs.add(ABI.nr_offset) as *const i32
            ))
        } else {
            core::ptr::read_volatile(regs.add(ABI.nr_offset) as *const i64)
        };
        (
            nr,
            core::ptr::read_volatile(regs.add(ABI.arg1_offset) as *const u64),
            core::ptr::read_volatile(regs.add(ABI.arg2_offset) as *const u64),
        )
    };
    Some((ABI.buffer_arg(nr), arg1, arg2))
}

#[inline(always)]
fn first_iovec(iov: u64) -> (u64, u64) {
    let mut pair = [0u64; 2];
    let ok = unsafe {
        bpf_probe_read_user(
            pair.as_mut_ptr() as *mut c_void,
            IOVEC_SIZE as u32,
            iov as *const c_void,
        )
    } == 0;
    if ok {
        (pair[0], pair[1])
    } else {
        (0, 0)
    }
}
