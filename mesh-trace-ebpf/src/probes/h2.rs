//! HTTP/2 frames, walked in the sends and receives of connections that
//! began with HTTP/2, for the agent to decode header blocks (HPACK needs
//! every byte of every block, in order) and see streams end.
//!
//! A connection is HTTP/2 from its first bytes in each direction: the
//! client's preface, or a SETTINGS frame (the server's preface, and the
//! first frame a client reads). From there each direction keeps where its
//! next frame header begins, by TCP sequence number; each send or receive
//! is walked frame by frame through its buffers (a vectored call's too).
//! Header frames (HEADERS, CONTINUATION, PUSH_PROMISE) go to the agent
//! with their payload, up to `H2_BLOCK_MAX` bytes, continued into the next
//! call when cut; DATA frames only when they end a stream; RST_STREAM and
//! GOAWAY. A direction whose boundaries are lost (bytes went by unwalked,
//! a call past the bounds, an event the ring could not take) says so once
//! and is walked no more: the agent then knows its header state is gone.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_loop, bpf_probe_read_user},
    },
    macros::map,
    maps::PerCpuArray,
};
use mesh_trace_common::{
    syscall_abi::{BufferArg, IOVEC_SIZE, MSGHDR_MSG_IOV},
    EventKind, H2Dir, H2FrameEvent, H2Sock, LossReason, H2_BLOCK_MAX, H2_DIR_LOST, H2_DIR_WALKING,
    H2_FIXED_LEN, H2_FRAMES_PER_IO, H2_PREFACE, H2_WHAT_CONTINUED, H2_WHAT_FRAME, H2_WHAT_LOST,
};

use crate::maps::{count_loss, header_at, wakeup_flags, EVENTS, H2_SOCKS};

/// [`H2Dir::state`] of a direction whose loss is still to be reported
/// (the ring buffer was full).
const LOST_UNREPORTED: u32 = 3;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const FRAME_HEADER: u32 = 9;

/// What the walk works in: far more than the 512-byte stack holds.
#[repr(C)]
pub struct Scratch {
    event: H2FrameEvent,
    bufs: Buffers,
    /// A frame header (or the call's first bytes), and the rest of one cut
    /// by the end of the last call.
    head: [u8; 64],
    rest: [u8; 64],
    /// The direction being walked (a copy of the socket's) and the call.
    dir: H2Dir,
    call: Call,
    /// 1 while a walk uses it (the TLS programs' scratch only).
    busy: u32,
}

/// This CPU's scratch for the socket programs (tracepoints run with
/// preemption off: they do not nest on a CPU).
#[map(name = "H2_SCRATCH")]
static H2_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch for the TLS programs: uprobes run preemptible, so
/// another task's may start on this CPU while one walks; it finds the
/// scratch busy and leaves (its direction is then lost, and said so).
#[map(name = "H2_TLS_SCRATCH")]
static H2_TLS_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch (the TLS programs' when `tls`) with the current
/// call's buffers, or None when they cannot be read or (TLS) another walk
/// holds it.
#[inline(always)]
pub fn scratch(kind: BufferArg, arg1: u64, arg2: u64, tls: bool) -> Option<&'static mut Scratch> {
    let s = if tls {
        H2_TLS_SCRATCH.get_ptr_mut(0)?
    } else {
        H2_SCRATCH.get_ptr_mut(0)?
    };
    // SAFETY: this CPU's value; see the maps.
    let s = unsafe { &mut *s };
    if tls && unsafe { core::ptr::read_volatile(&s.busy) } != 0 {
        return None;
    }
    s.bufs.fill(kind, arg1, arg2).then_some(s)
}

/// Direction `d` lost its frames outside a walk (its scratch was busy):
/// said at its next walk.
#[inline(always)]
pub fn lose_later(d: &mut H2Dir) {
    if d.state == H2_DIR_WALKING {
        d.state = LOST_UNREPORTED;
    }
}

/// The user buffers of the current send or receive: one buffer, or a
/// vectored call's iovec array, whose entries are read as the walk reaches
/// them (Envoy writes 16 at a time, hyper's HTTP/2 more: a fixed window
/// would lose the direction at its end).
pub struct Buffers {
    /// The iovec array, or 0 for one buffer (then `cur_*` describe it).
    iov: u64,
    count: u64,
    /// The buffer under the cursor: its index, where it starts in the
    /// call's bytes, its address and length.
    cur: u64,
    cur_start: u64,
    cur_base: u64,
    cur_len: u64,
    /// The copy under way: from offset `at`, `want` bytes into the
    /// scratch's array `into`, `done` so far.
    at: u64,
    want: u32,
    done: u32,
    into: u32,
}

/// [`Buffers::into`]: the frame header array, the rest of a cut header,
/// the event's payload.
const INTO_HEAD: u32 = 0;
const INTO_REST: u32 = 1;
const INTO_PAYLOAD: u32 = 2;

/// Steps of one copy: a step moves the cursor one buffer on or copies one
/// piece, so every buffer of a call (`UIO_MAXIOV`, 1024) and the pieces
/// of the largest copy fit.
const COPY_STEPS: u32 = 1024 + 2 * 16;

impl Buffers {
    /// From the syscall's arguments (see `socket_io::user_buffer`): `arg1`
    /// and `arg2` as that function reads them. False for anything else.
    #[inline(always)]
    fn fill(&mut self, kind: BufferArg, arg1: u64, arg2: u64) -> bool {
        let b = self;
        let (iov, count) = match kind {
            BufferArg::Direct => {
                b.iov = 0;
                b.count = 1;
                b.cur = 0;
                b.cur_start = 0;
                b.cur_base = arg1;
                b.cur_len = arg2;
                return true;
            }
            BufferArg::Iovec => (arg1, arg2),
            BufferArg::Msghdr => {
                // struct msghdr: msg_iov, then msg_iovlen.
                let mut pair = [0u64; 2];
                if unsafe {
                    bpf_probe_read_user(
                        pair.as_mut_ptr() as *mut c_void,
                        16,
                        (arg1 + MSGHDR_MSG_IOV as u64) as *const c_void,
                    )
                } != 0
                {
                    return false;
                }
                (pair[0], pair[1])
            }
            BufferArg::None => return false,
        };
        b.iov = iov;
        b.count = count;
        count > 0 && b.rewind()
    }

    /// The cursor back on the first buffer.
    #[inline(always)]
    fn rewind(&mut self) -> bool {
        if self.iov == 0 {
            // One buffer: the cursor never leaves it.
            return true;
        }
        self.cur = 0;
        self.cur_start = 0;
        self.load(self.iov)
    }

    /// The iovec at `entry` under the cursor (its index set by the caller).
    #[inline(always)]
    fn load(&mut self, entry: u64) -> bool {
        let mut pair = [0u64; 2];
        if unsafe {
            bpf_probe_read_user(
                pair.as_mut_ptr() as *mut c_void,
                IOVEC_SIZE as u32,
                entry as *const c_void,
            )
        } != 0
        {
            return false;
        }
        self.cur_base = pair[0];
        self.cur_len = pair[1];
        true
    }
}

/// A frame header.
struct Frame {
    length: u32,
    kind: u8,
    flags: u8,
    stream_id: u32,
}

impl Frame {
    /// No frame (continued bytes, a loss).
    #[inline(always)]
    fn none() -> Frame {
        Frame {
            length: 0,
            kind: 0,
            flags: 0,
            stream_id: 0,
        }
    }

    #[inline(always)]
    fn parse(h: &[u8; 64]) -> Frame {
        Frame {
            length: u32::from(h[0]) << 16 | u32::from(h[1]) << 8 | u32::from(h[2]),
            kind: h[3],
            flags: h[4],
            stream_id: (u32::from(h[5]) << 24
                | u32::from(h[6]) << 16
                | u32::from(h[7]) << 8
                | u32::from(h[8]))
                & 0x7fff_ffff,
        }
    }
}

/// Where the frames of a direction start, from its first bytes: after
/// the client's preface, or at a SETTINGS frame on stream 0.
#[inline(always)]
fn frames_start(head: &[u8; 64], n: u32) -> Option<u32> {
    if n >= 24 && head[..24] == H2_PREFACE[..] {
        return Some(24);
    }
    let f = Frame::parse(head);
    (n >= FRAME_HEADER
        && f.kind == SETTINGS
        && f.stream_id == 0
        && f.flags & !1 == 0
        && f.length % 6 == 0
        && f.length <= 6 * 16)
        .then_some(0)
}

/// As [`frames_start`], for a TLS session whose first call may have been
/// missed: only the preface or a first SETTINGS (not an acknowledgement).
#[inline(always)]
pub fn frames_start_strict(s: &mut Scratch) -> Option<u32> {
    let n = s.read::<true>(INTO_HEAD, 0, 24);
    let start = frames_start(&s.head, n)?;
    (start == 24 || s.head[4] == 0).then_some(start)
}

/// At the first bytes of a direction of socket `sk`: starts walking it if
/// they open HTTP/2; whether they did.
#[inline(always)]
pub fn first_bytes(sk: *mut c_void, direction: u32, seq: u32, s: &mut Scratch) -> bool {
    let n = s.read::<false>(INTO_HEAD, 0, 24);
    let Some(start) = frames_start(&s.head, n) else {
        return false;
    };
    let mut init = H2Sock::default();
    let Some(h2) = H2_SOCKS.get(sk, Some(&mut init)) else {
        count_loss(LossReason::MapFull);
        return false;
    };
    let d = &mut h2.dirs[direction as usize & 1];
    d.state = H2_DIR_WALKING;
    d.next_frame = seq.wrapping_add(start);
    d.capture_until = seq;
    d.hdr_have = 0;
    true
}

/// Walks the frames that a send or receive of `len` bytes at `seq` moved
/// on socket `sk` (a no-op unless its connection is HTTP/2).
#[inline(always)]
pub fn walk(
    sk: *mut c_void,
    cookie: u64,
    direction: u32,
    seq: u32,
    len: u32,
    ts_ns: u64,
    s: &mut Scratch,
) {
    let Some(h2) = H2_SOCKS.get(sk, None) else {
        return;
    };
    let d = &mut h2.dirs[direction as usize & 1];
    walk_dir(d, cookie, direction, seq, len, ts_ns, s, false);
}

/// Walks the frames of `len` bytes at position `seq` of direction `d`
/// (a socket's, or with `tls` a TLS session's plaintext, on the TLS
/// programs' scratch; `direction` as events carry it).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn walk_dir(
    d: &mut H2Dir,
    cookie: u64,
    direction: u32,
    seq: u32,
    len: u32,
    ts_ns: u64,
    s: &mut Scratch,
    tls: bool,
) {
    if !tls {
        walk_with::<false>(d, cookie, direction, seq, len, ts_ns, s);
        return;
    }
    // SAFETY: volatile, so the flag brackets the walk as a preempting
    // program sees it.
    unsafe { core::ptr::write_volatile(&mut s.busy, 1) };
    walk_with::<true>(d, cookie, direction, seq, len, ts_ns, s);
    unsafe { core::ptr::write_volatile(&mut s.busy, 0) };
}

#[inline(always)]
fn walk_with<const TLS: bool>(
    d: &mut H2Dir,
    cookie: u64,
    direction: u32,
    seq: u32,
    len: u32,
    ts_ns: u64,
    s: &mut Scratch,
) {
    if d.state != H2_DIR_WALKING && d.state != LOST_UNREPORTED {
        return;
    }
    // The walk works on a copy in the scratch, where the loop's callback
    // finds it; the socket's state is written back after.
    s.dir = *d;
    s.call = Call {
        cookie,
        direction,
        seq,
        len,
        ts_ns,
        off: 0,
        outcome: RUNNING,
        why: 0,
    };
    if s.dir.state == H2_DIR_WALKING && s.start::<TLS>().is_ok() && s.call.outcome == RUNNING {
        let step = if TLS {
            frame_step_tls as *mut c_void
        } else {
            frame_step as *mut c_void
        };
        // SAFETY: both steps are BPF callbacks of bpf_loop's type; each
        // finds what it needs in this CPU's scratch.
        unsafe {
            bpf_loop(H2_FRAMES_PER_IO as u32, step, core::ptr::null_mut(), 0);
        }
        if s.call.outcome == RUNNING {
            // More frames than the bound in one call.
            s.call.outcome = LOST;
            s.call.why = 8;
        }
    } else if s.dir.state == H2_DIR_WALKING && s.call.outcome == RUNNING {
        s.call.outcome = LOST;
        s.call.why = 9;
    }
    if s.dir.state == LOST_UNREPORTED || s.call.outcome == LOST {
        s.lose::<TLS>();
    }
    *d = s.dir;
}

/// [`Call::outcome`]: frames are being walked.
const RUNNING: u32 = 0;
/// The call's frames were all walked.
const DONE: u32 = 1;
/// The frame boundaries were lost.
const LOST: u32 = 2;

/// The send or receive being walked.
#[repr(C)]
struct Call {
    cookie: u64,
    direction: u32,
    seq: u32,
    len: u32,
    ts_ns: u64,
    /// Where the next frame header starts in the call's bytes (below 0
    /// while a header cut by the last call is completed).
    off: i64,
    outcome: u32,
    /// Where the walk lost the boundaries (said in the loss event's flags:
    /// 1-3 at the call's start, 4-5 at a frame header, 6-7 sending, 8 too
    /// many frames, 9 a start that failed).
    why: u32,
}

/// One frame of the call, as bpf_loop's callback (verified once, not once
/// per frame): 1 stops the loop.
#[inline(never)]
extern "C" fn frame_step(_index: u64, _ctx: *mut c_void) -> i64 {
    match H2_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's scratch, filled by the walk before the loop.
        Some(s) => step::<false>(unsafe { &mut *s }),
        None => 1,
    }
}

/// [`frame_step`] on the TLS programs' scratch.
#[inline(never)]
extern "C" fn frame_step_tls(_index: u64, _ctx: *mut c_void) -> i64 {
    match H2_TLS_SCRATCH.get_ptr_mut(0) {
        // SAFETY: as above.
        Some(s) => step::<true>(unsafe { &mut *s }),
        None => 1,
    }
}

/// One step of a copy, as bpf_loop's callback (a vectored call's buffers
/// are many: one verified step, not one per buffer): 1 stops the loop.
#[inline(never)]
extern "C" fn copy_step(_index: u64, _ctx: *mut c_void) -> i64 {
    match H2_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's scratch, the copy set up by `read`.
        Some(s) => unsafe { &mut *s }.copy_piece(),
        None => 1,
    }
}

/// [`copy_step`] on the TLS programs' scratch.
#[inline(never)]
extern "C" fn copy_step_tls(_index: u64, _ctx: *mut c_void) -> i64 {
    match H2_TLS_SCRATCH.get_ptr_mut(0) {
        // SAFETY: as above.
        Some(s) => unsafe { &mut *s }.copy_piece(),
        None => 1,
    }
}

#[inline(always)]
fn step<const TLS: bool>(s: &mut Scratch) -> i64 {
    match s.next_frame::<TLS>() {
        Ok(true) => 0,
        Ok(false) => {
            s.call.outcome = DONE;
            1
        }
        Err(Lost) => {
            s.call.outcome = LOST;
            1
        }
    }
}

/// The walk lost the frame boundaries.
struct Lost;

impl Scratch {
    /// Copies `n` bytes from offset `off` of the call's bytes into the
    /// array `into`; returns how many it could.
    #[inline(always)]
    fn read<const TLS: bool>(&mut self, into: u32, off: u32, n: u32) -> u32 {
        let b = &mut self.bufs;
        // Copies mostly move forward: the cursor stays where the last ended.
        if u64::from(off) < b.cur_start && !b.rewind() {
            return 0;
        }
        b.at = u64::from(off);
        b.want = n;
        b.into = into;
        // SAFETY (volatile): the count lives in the map value, where the
        // loop's steps update it.
        unsafe { core::ptr::write_volatile(&mut b.done, 0) };
        let step = if TLS {
            copy_step_tls as *mut c_void
        } else {
            copy_step as *mut c_void
        };
        // SAFETY: both steps are BPF callbacks of bpf_loop's type; each
        // finds the copy in this CPU's scratch.
        unsafe {
            bpf_loop(COPY_STEPS, step, core::ptr::null_mut(), 0);
        }
        unsafe { core::ptr::read_volatile(&self.bufs.done) }
    }

    /// One step of [`Scratch::read`]: a piece copied, or the cursor moved
    /// on to the next buffer; 1 when the copy is over.
    #[inline(always)]
    fn copy_piece(&mut self) -> i64 {
        let b = &mut self.bufs;
        // SAFETY (volatile): see `read`.
        let done = unsafe { core::ptr::read_volatile(&b.done) };
        if done >= b.want {
            return 1;
        }
        let at = b.at + u64::from(done);
        let end = b.cur_start + b.cur_len;
        if at < b.cur_start {
            return 1;
        }
        if at >= end {
            let next = b.cur + 1;
            if b.iov == 0 || next >= b.count || !b.load(b.iov + next * IOVEC_SIZE as u64) {
                return 1;
            }
            b.cur = next;
            b.cur_start = end;
            return 0;
        }
        let mut piece = end - at;
        if piece > u64::from(b.want - done) {
            piece = u64::from(b.want - done);
        }
        let src = (b.cur_base + (at - b.cur_start)) as *const c_void;
        // Each destination: an offset masked to half its array, a piece
        // bounded by that half (after a volatile copy: the compiler may
        // prove the bound redundant, the verifier cannot).
        let mut piece = unsafe { core::ptr::read_volatile(&piece) };
        let dst = match b.into {
            INTO_PAYLOAD => {
                if piece > H2_BLOCK_MAX as u64 {
                    piece = H2_BLOCK_MAX as u64;
                }
                // SAFETY: below H2_BLOCK_MAX into a 2 * H2_BLOCK_MAX array.
                unsafe {
                    self.event
                        .payload
                        .as_mut_ptr()
                        .add(done as usize & (H2_BLOCK_MAX - 1))
                }
            }
            INTO_REST => {
                if piece > 32 {
                    piece = 32;
                }
                // SAFETY: below 32 into a 64-byte array.
                unsafe { self.rest.as_mut_ptr().add(done as usize & 31) }
            }
            _ => {
                if piece > 32 {
                    piece = 32;
                }
                // SAFETY: as above.
                unsafe { self.head.as_mut_ptr().add(done as usize & 31) }
            }
        };
        // SAFETY: `dst` has room for `piece` bytes (above).
        if unsafe { bpf_probe_read_user(dst as *mut c_void, piece as u32, src) } != 0 {
            return 1;
        }
        unsafe { core::ptr::write_volatile(&mut self.bufs.done, done + piece as u32) };
        0
    }

    /// Before the frames: more of a header frame's payload begun in an
    /// earlier call, and a frame header that call cut.
    #[inline(always)]
    fn start<const TLS: bool>(&mut self) -> Result<(), Lost> {
        let (seq, len) = (self.call.seq, self.call.len);
        let cont = self.dir.capture_until.wrapping_sub(seq) as i32;
        if cont > 0 {
            let n = if cont as u32 > len { len } else { cont as u32 };
            self.send::<TLS>(H2_WHAT_CONTINUED, seq, &Frame::none(), 0, n)?;
            self.dir.capture_until = seq.wrapping_add(n);
        }
        let mut off = self.dir.next_frame.wrapping_sub(seq) as i32 as i64;
        if self.dir.hdr_have > 0 {
            // A frame header cut by the end of the last call: its rest
            // starts this one.
            let have = self.dir.hdr_have & 15;
            if off + i64::from(have) != 0 {
                self.call.why = 1;
                return Err(Lost);
            }
            let want = FRAME_HEADER - have;
            if self.read::<TLS>(INTO_REST, 0, want) != want {
                self.call.why = 2;
                return Err(Lost);
            }
            for i in 0..FRAME_HEADER as usize {
                self.head[i] = if (i as u32) < have {
                    self.dir.hdr[i & 15]
                } else {
                    self.rest[(i - have as usize) & 31]
                };
            }
            self.dir.hdr_have = 0;
            let f = Frame::parse(&self.head);
            off = self.frame::<TLS>(off, &f)?;
        } else if off < 0 {
            // Bytes went by that were never walked.
            self.call.why = 3;
            return Err(Lost);
        }
        self.call.off = off;
        self.done_if_walked();
        Ok(())
    }

    /// Ends the walk when the next frame starts past the call's bytes.
    #[inline(always)]
    fn done_if_walked(&mut self) {
        if self.call.off >= i64::from(self.call.len) {
            self.dir.next_frame = self.call.seq.wrapping_add(self.call.off as u32);
            self.call.outcome = DONE;
        }
    }

    /// The frame at the call's offset; false when there is none left.
    #[inline(always)]
    fn next_frame<const TLS: bool>(&mut self) -> Result<bool, Lost> {
        let (off, len) = (self.call.off, i64::from(self.call.len));
        if off >= len || off < 0 {
            self.dir.next_frame = self.call.seq.wrapping_add(off as u32);
            return Ok(false);
        }
        let got = self.read::<TLS>(INTO_HEAD, off as u32, FRAME_HEADER);
        if off + i64::from(FRAME_HEADER) > len {
            // The header goes on in the next call.
            if i64::from(got) != len - off {
                self.call.why = 4;
                return Err(Lost);
            }
            for i in 0..FRAME_HEADER as usize {
                self.dir.hdr[i & 15] = self.head[i];
            }
            self.dir.hdr_have = got;
            self.dir.next_frame = self.call.seq.wrapping_add(off as u32);
            return Ok(false);
        }
        if got != FRAME_HEADER {
            self.call.why = 5 | (got & 15) << 4;
            return Err(Lost);
        }
        let f = Frame::parse(&self.head);
        self.call.off = self.frame::<TLS>(off, &f)?;
        if self.call.off >= len {
            self.dir.next_frame = self.call.seq.wrapping_add(self.call.off as u32);
            return Ok(false);
        }
        Ok(true)
    }

    /// Reports frame `f`, whose header starts at `off` in this call (below
    /// 0 when the call began inside it); returns where the next starts.
    #[inline(always)]
    fn frame<const TLS: bool>(&mut self, off: i64, f: &Frame) -> Result<i64, Lost> {
        let payload = off + i64::from(FRAME_HEADER);
        let end = payload + i64::from(f.length);
        let len = i64::from(self.call.len);
        let in_call = if end > len {
            len - payload
        } else {
            end - payload
        };
        let in_call = if in_call < 0 { 0 } else { in_call as u32 };
        let seq = self.call.seq;
        let frame_seq = seq.wrapping_add(off as u32);
        // What of the frame goes to the agent: none, or its first `take`
        // payload bytes (of `want` in all).
        let (report, want) = match f.kind {
            HEADERS | CONTINUATION | PUSH_PROMISE => (
                true,
                if f.length > H2_BLOCK_MAX as u32 {
                    H2_BLOCK_MAX as u32
                } else {
                    f.length
                },
            ),
            DATA => (f.flags & END_STREAM != 0, 0),
            RST_STREAM | GOAWAY => (true, 8),
            _ => (false, 0),
        };
        if report {
            let take = if in_call > want { want } else { in_call };
            self.send::<TLS>(H2_WHAT_FRAME, frame_seq, f, payload as u32, take)?;
            if take < want && matches!(f.kind, HEADERS | CONTINUATION | PUSH_PROMISE) {
                self.dir.capture_until = seq.wrapping_add(payload as u32).wrapping_add(want);
            }
        }
        Ok(end)
    }

    /// Sends an event for frame `f` at `seq` with `take` payload bytes read
    /// from offset `from` of the call.
    #[inline(always)]
    fn send<const TLS: bool>(
        &mut self,
        what: u8,
        seq: u32,
        f: &Frame,
        from: u32,
        take: u32,
    ) -> Result<(), Lost> {
        let (ev, call) = (&mut self.event, &self.call);
        ev.header = header_at(EventKind::H2Frame, call.ts_ns);
        ev.sock_cookie = call.cookie;
        ev.pid_tgid = bpf_get_current_pid_tgid();
        ev.direction = call.direction;
        ev.seq = seq;
        ev.length = f.length;
        ev.stream_id = f.stream_id;
        ev.frame_type = f.kind;
        ev.flags = f.flags;
        ev.what = what;
        ev._pad = 0;
        let take = if take > H2_BLOCK_MAX as u32 {
            H2_BLOCK_MAX as u32
        } else {
            take
        };
        let got = if take > 0 {
            self.read::<TLS>(INTO_PAYLOAD, from, take)
        } else {
            0
        };
        if got != take {
            self.call.why = 6;
            return Err(Lost);
        }
        let ev = &mut self.event;
        ev.captured = got;
        let size = H2_FIXED_LEN + (got as usize & (2 * H2_BLOCK_MAX - 1));
        // SAFETY: `size` bytes of the scratch value's event, at most its
        // size.
        let bytes = unsafe { core::slice::from_raw_parts(&*ev as *const _ as *const u8, size) };
        if EVENTS.output::<[u8]>(bytes, wakeup_flags()).is_err() {
            count_loss(LossReason::RingBufFull);
            self.call.why = 7;
            return Err(Lost);
        }
        Ok(())
    }

    /// The direction's boundaries are lost: says so (or will, when the ring
    /// has room) and walks it no more.
    #[inline(always)]
    fn lose<const TLS: bool>(&mut self) {
        let seq = self.call.seq;
        let why = Frame {
            flags: self.call.why as u8,
            ..Frame::none()
        };
        self.dir.state = if self.send::<TLS>(H2_WHAT_LOST, seq, &why, 0, 0).is_ok() {
            H2_DIR_LOST
        } else {
            LOST_UNREPORTED
        };
    }
}
