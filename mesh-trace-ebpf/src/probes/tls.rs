//! uprobes on a TLS library's `SSL_write`/`SSL_read` (and their `_ex`
//! forms): the plaintext a process hands to TLS or gets back from it,
//! joined to the socket whose bytes the call moved.
//!
//! Behind mutual TLS a sidecar's network bytes show nothing of the request;
//! its plaintext does. Entry saves the call (buffer, `SSL *`) per thread;
//! the socket programs note in it the last send or receive that the call
//! made on a meshed socket (`note_io`); the return emits the plaintext's
//! first bytes as a data event flagged `DIR_TLS_PLAINTEXT`, carrying the
//! TCP sequence number of that I/O, so the agent knows which record (and so
//! which request) it was. A call that moved nothing on the network (a read
//! served from bytes the library had already read) names its socket from
//! the `SSL *` seen before, flagged `DIR_TLS_NO_SEQ`.
//!
//! Straight to the ring buffer, never into the per-CPU batch: uprobe
//! programs run with preemption on, so another task's socket call could
//! interleave with the append. The agent orders events by time, and the
//! return comes after the I/O the call did.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use mesh_trace_common::{
    syscall_abi::BufferArg, DataEvent, EventKind, LossReason, TlsCall, TlsH2, DIR_RECV, DIR_SEND,
    DIR_TLS_NO_SEQ, DIR_TLS_PLAINTEXT, H2_DIR_WALKING, H2_IN_TLS, TLS_CALLS_MAX, TLS_H2_MAX,
    TLS_SESSIONS_MAX,
};

use super::socket_io::read_prefix;
use crate::maps::{count_loss, header_at, wakeup_flags, EVENTS};

/// The TLS call each thread is in, by `pid_tgid` (LRU: a thread that died
/// inside a call leaves an entry that ages out).
#[map(name = "TLS_CALLS")]
pub static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(TLS_CALLS_MAX, 0);

/// HTTP/2 inside TLS sessions, by `SSL *` (see [`TlsH2`]).
#[map(name = "TLS_H2")]
static TLS_H2: LruHashMap<u64, TlsH2> = LruHashMap::with_max_entries(TLS_H2_MAX, 0);

/// The socket a TLS session (`SSL *`) last moved bytes on.
#[map(name = "TLS_SESSIONS")]
pub static TLS_SESSIONS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(TLS_SESSIONS_MAX, 0);

#[uprobe]
pub fn mt_ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_SEND, false);
    0
}

#[uprobe]
pub fn mt_ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_SEND, true);
    0
}

#[uprobe]
pub fn mt_ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_RECV, false);
    0
}

#[uprobe]
pub fn mt_ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_RECV, true);
    0
}

#[uretprobe]
pub fn mt_ssl_return(ctx: RetProbeContext) -> u32 {
    leave(&ctx);
    0
}

/// `SSL_write(ssl, buf, num)`, `SSL_read(ssl, buf, num)`; the `_ex` forms
/// add `size_t *written` / `*readbytes` and return 1 on success.
#[inline(always)]
fn enter(ctx: &ProbeContext, direction: u32, ex: bool) {
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return;
    };
    let count_ptr = if ex {
        ctx.arg::<u64>(3).unwrap_or(0)
    } else {
        0
    };
    let call = TlsCall {
        ssl,
        buf,
        count_ptr,
        cookie: 0,
        seq: 0,
        direction,
        seen_io: 0,
        ex: u32::from(ex),
        first_seq: 0,
        _pad: 0,
        first_ts: 0,
        last_ts: 0,
    };
    if TLS_CALLS
        .insert(&bpf_get_current_pid_tgid(), &call, 0)
        .is_err()
    {
        count_loss(LossReason::MapFull);
    }
}

/// Called by the socket programs for I/O on a meshed socket: inside a TLS
/// call in the same direction, it names the call's socket and where on the
/// wire its record went. The last such I/O: a call that also finishes the
/// handshake moves the handshake's records first, the plaintext's after.
/// `now`: the I/O's moment as its data event has it (a send's, when its
/// last byte left).
#[inline(always)]
pub fn note_io(pid_tgid: u64, cookie: u64, direction: u32, seq: u32, now: u64) {
    let Some(call) = TLS_CALLS.get_ptr_mut(&pid_tgid) else {
        return;
    };
    // SAFETY: this thread's entry; only this thread writes it.
    let call = unsafe { &mut *call };
    if call.direction == direction {
        if call.seen_io == 0 {
            call.first_seq = seq;
            call.first_ts = now;
        }
        call.last_ts = now;
        call.seen_io = 1;
        call.cookie = cookie;
        call.seq = seq;
    }
}

#[inline(always)]
fn leave(ctx: &RetProbeContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a copy of this thread's entry, removed right after.
    let Some(call) = (unsafe { TLS_CALLS.get(&pid_tgid) }).copied() else {
        return;
    };
    let _ = TLS_CALLS.remove(&pid_tgid);
    let ret: i64 = ctx.ret();
    let moved = if call.ex != 0 {
        if ret != 1 || call.count_ptr == 0 {
            return;
        }
        let mut n: u64 = 0;
        // SAFETY: a bounded read of the caller's size_t.
        if unsafe {
            bpf_probe_read_user(
                &mut n as *mut u64 as *mut c_void,
                8,
                call.count_ptr as *const c_void,
            )
        } != 0
        {
            return;
        }
        n
    } else if ret as i32 > 0 {
        // `int SSL_read`/`SSL_write`: the register's upper half is not
        // the sign (-1 comes back as 0xffffffff).
        ret as i32 as u64
    } else {
        return;
    };
    if moved == 0 {
        return;
    }
    let (cookie, flags) = if call.seen_io != 0 {
        let _ = TLS_SESSIONS.insert(&call.ssl, &call.cookie, 0);
        (call.cookie, DIR_TLS_PLAINTEXT)
    } else {
        // SAFETY: a copy of a plain u64 value.
        match unsafe { TLS_SESSIONS.get(&call.ssl) } {
            Some(&cookie) => (cookie, DIR_TLS_PLAINTEXT | DIR_TLS_NO_SEQ),
            // A session never seen on a meshed socket: not ours to report.
            None => return,
        }
    };
    h2_in_tls(&call, cookie, moved as u32);
    let Some(mut slot) = EVENTS.reserve::<DataEvent>(0) else {
        count_loss(LossReason::RingBufFull);
        return;
    };
    let ev = slot.as_mut_ptr();
    // SAFETY: reserved ring buffer memory of DataEvent's size.
    unsafe {
        (*ev).header = header_at(EventKind::Data, bpf_ktime_get_ns());
        (*ev).sock_cookie = cookie;
        (*ev).pid_tgid = pid_tgid;
        (*ev).offset = u64::from(call.seq);
        (*ev).len = moved as u32;
        (*ev).direction = call.direction | flags;
        (*ev).opposite_seq = call.first_seq;
        read_prefix(ev, call.buf, moved);
    }
    slot.submit(wakeup_flags());
}

/// The plaintext of a TLS call on a session that began with HTTP/2 (ALPN
/// h2 between sidecars): its frames are walked as the socket programs walk
/// cleartext HTTP/2, numbered by their position in the session's plaintext
/// (the same at both ends), timed at the call's I/O (a write's last, a
/// read's first; a read served from the library's buffer at the session's
/// last read on the network, which brought its bytes).
#[inline(always)]
fn h2_in_tls(call: &TlsCall, cookie: u64, moved: u32) {
    let d = (call.direction & 1) as usize;
    let session = match TLS_H2.get_ptr_mut(&call.ssl) {
        Some(p) => p,
        None => {
            if TLS_H2.insert(&call.ssl, &TlsH2::default(), 0).is_err() {
                count_loss(LossReason::MapFull);
                return;
            }
            match TLS_H2.get_ptr_mut(&call.ssl) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: this session's entry; a session's calls do not run at once
    // in one direction (the library forbids it).
    let session = unsafe { &mut *session };
    if session.cookie != cookie {
        // The address of a freed session, taken by a new one.
        *session = TlsH2 {
            cookie,
            ..TlsH2::default()
        };
    }
    let seq = session.pos[d];
    session.pos[d] = seq.wrapping_add(moved);
    if call.seen_io != 0 {
        session.last_io_ts[d] = call.last_ts;
    }
    let first = session.seen[d] == 0;
    session.seen[d] = 1;
    if !first && session.dirs[d].state == 0 {
        return;
    }
    let Some(s) = super::h2::scratch(BufferArg::Direct, call.buf, u64::from(moved), true) else {
        super::h2::lose_later(&mut session.dirs[d]);
        return;
    };
    if first {
        // Mid-session (probes attached late) a call may start with a
        // SETTINGS acknowledgement: only a first SETTINGS (flags 0) or the
        // preface opens HTTP/2 here.
        match super::h2::frames_start_strict(s) {
            Some(start) => {
                let dir = &mut session.dirs[d];
                dir.state = H2_DIR_WALKING;
                dir.next_frame = seq.wrapping_add(start);
                dir.capture_until = seq;
                dir.hdr_have = 0;
            }
            None => return,
        }
    }
    let ts = if call.direction == DIR_SEND && call.seen_io != 0 {
        call.last_ts
    } else if call.seen_io != 0 {
        call.first_ts
    } else if session.last_io_ts[d] != 0 {
        session.last_io_ts[d]
    } else {
        unsafe { bpf_ktime_get_ns() }
    };
    let direction = call.direction | H2_IN_TLS;
    let dir = &mut session.dirs[d];
    super::h2::walk_dir(dir, cookie, direction, seq, moved, ts, s, true);
}
