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
    H2_FIXED_LEN, H2_FRAMES_PER_IO, H2_IOVECS_MAX, H2_PREFACE, H2_WHAT_CONTINUED, H2_WHAT_FRAME,
    H2_WHAT_LOST,
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

/// The user buffers of the current send or receive, in order.
pub struct Buffers {
    base: [u64; H2_IOVECS_MAX],
    len: [u64; H2_IOVECS_MAX],
    count: usize,
    /// Bytes copied so far by [`Buffers::read`].
    done: u32,
}

impl Buffers {
    /// From the syscall's arguments (see `socket_io::user_buffer`): `arg1`
    /// and `arg2` as that function reads them. False for anything else.
    #[inline(always)]
    fn fill(&mut self, kind: BufferArg, arg1: u64, arg2: u64) -> bool {
        let b = self;
        b.count = 0;
        let (iov, count) = match kind {
            BufferArg::Direct => {
                b.base[0] = arg1;
                b.len[0] = arg2;
                b.count = 1;
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
        for i in 0..H2_IOVECS_MAX {
            if i as u64 >= count {
                break;
            }
            let mut pair = [0u64; 2];
            if unsafe {
                bpf_probe_read_user(
                    pair.as_mut_ptr() as *mut c_void,
                    IOVEC_SIZE as u32,
                    (iov + (i * IOVEC_SIZE) as u64) as *const c_void,
                )
            } != 0
            {
                return false;
            }
            b.base[i] = pair[0];
            b.len[i] = pair[1];
            b.count = i + 1;
        }
        true
    }

    /// Copies up to `n` bytes from offset `off` of the call's bytes to
    /// `dst`, whose room is twice `MASK + 1` (so the verifier sees every
    /// piece land inside it); returns how many.
    #[inline(always)]
    /// `N`: the buffers looked at (1 for a TLS call's one buffer: fewer
    /// paths for the verifier).
    fn read<const MASK: usize, const N: usize>(&mut self, off: u32, dst: *mut u8, n: u32) -> u32 {
        // The count lives in the map value, not a register: the verifier
        // then knows nothing of it at each piece but its bounds, and the
        // pieces' many outcomes converge instead of multiplying.
        // SAFETY (all volatile accesses): fields of this CPU's scratch.
        unsafe { core::ptr::write_volatile(&mut self.done, 0) };
        let mut start: u64 = 0;
        for i in 0..N {
            let done = unsafe { core::ptr::read_volatile(&self.done) };
            if i >= self.count || done >= n {
                break;
            }
            let end = start + self.len[i];
            let at = u64::from(off) + u64::from(done);
            if at < end {
                let mut piece = end - at;
                if piece > u64::from(n - done) {
                    piece = u64::from(n - done);
                }
                // Bounded after a volatile copy: the compiler may prove
                // the bound redundant, the verifier cannot.
                let mut piece = unsafe { core::ptr::read_volatile(&piece) };
                if piece > MASK as u64 + 1 {
                    piece = MASK as u64 + 1;
                }
                let into = done as usize & MASK;
                // SAFETY: `into` <= MASK and `piece` <= MASK + 1: inside
                // the destination's 2 * (MASK + 1) bytes.
                if unsafe {
                    bpf_probe_read_user(
                        dst.add(into) as *mut c_void,
                        piece as u32,
                        (self.base[i] + (at - start)) as *const c_void,
                    )
                } != 0
                {
                    break;
                }
                unsafe { core::ptr::write_volatile(&mut self.done, done + piece as u32) };
            }
            start = end;
        }
        unsafe { core::ptr::read_volatile(&self.done) }
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
    let n = s.bufs.read::<31, 1>(0, s.head.as_mut_ptr(), 24);
    let start = frames_start(&s.head, n)?;
    (start == 24 || s.head[4] == 0).then_some(start)
}

/// At the first bytes of a direction of socket `sk`: starts walking it if
/// they open HTTP/2; whether they did.
#[inline(always)]
pub fn first_bytes(sk: *mut c_void, direction: u32, seq: u32, s: &mut Scratch) -> bool {
    let n = s.bufs.read::<31, H2_IOVECS_MAX>(0, s.head.as_mut_ptr(), 24);
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
        walk_with::<H2_IOVECS_MAX>(d, cookie, direction, seq, len, ts_ns, s, false);
        return;
    }
    // SAFETY: volatile, so the flag brackets the walk as a preempting
    // program sees it.
    unsafe { core::ptr::write_volatile(&mut s.busy, 1) };
    walk_with::<1>(d, cookie, direction, seq, len, ts_ns, s, true);
    unsafe { core::ptr::write_volatile(&mut s.busy, 0) };
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn walk_with<const N: usize>(
    d: &mut H2Dir,
    cookie: u64,
    direction: u32,
    seq: u32,
    len: u32,
    ts_ns: u64,
    s: &mut Scratch,
    tls: bool,
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
    if s.dir.state == H2_DIR_WALKING && s.start::<N>().is_ok() && s.call.outcome == RUNNING {
        let step = if tls {
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
        s.lose::<N>();
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
        Some(s) => step::<H2_IOVECS_MAX>(unsafe { &mut *s }),
        None => 1,
    }
}

/// [`frame_step`] on the TLS programs' scratch.
#[inline(never)]
extern "C" fn frame_step_tls(_index: u64, _ctx: *mut c_void) -> i64 {
    match H2_TLS_SCRATCH.get_ptr_mut(0) {
        // SAFETY: as above.
        Some(s) => step::<1>(unsafe { &mut *s }),
        None => 1,
    }
}

#[inline(always)]
fn step<const N: usize>(s: &mut Scratch) -> i64 {
    match s.next_frame::<N>() {
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
    /// Before the frames: more of a header frame's payload begun in an
    /// earlier call, and a frame header that call cut.
    #[inline(always)]
    fn start<const N: usize>(&mut self) -> Result<(), Lost> {
        let (seq, len) = (self.call.seq, self.call.len);
        let cont = self.dir.capture_until.wrapping_sub(seq) as i32;
        if cont > 0 {
            let n = if cont as u32 > len { len } else { cont as u32 };
            self.send::<N>(H2_WHAT_CONTINUED, seq, &Frame::none(), 0, n)?;
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
            if self.bufs.read::<31, N>(0, self.rest.as_mut_ptr(), want) != want {
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
            off = self.frame::<N>(off, &f)?;
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
    fn next_frame<const N: usize>(&mut self) -> Result<bool, Lost> {
        let (off, len) = (self.call.off, i64::from(self.call.len));
        if off >= len || off < 0 {
            self.dir.next_frame = self.call.seq.wrapping_add(off as u32);
            return Ok(false);
        }
        let got = self
            .bufs
            .read::<31, N>(off as u32, self.head.as_mut_ptr(), FRAME_HEADER);
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
        self.call.off = self.frame::<N>(off, &f)?;
        if self.call.off >= len {
            self.dir.next_frame = self.call.seq.wrapping_add(self.call.off as u32);
            return Ok(false);
        }
        Ok(true)
    }

    /// Reports frame `f`, whose header starts at `off` in this call (below
    /// 0 when the call began inside it); returns where the next starts.
    #[inline(always)]
    fn frame<const N: usize>(&mut self, off: i64, f: &Frame) -> Result<i64, Lost> {
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
            self.send::<N>(H2_WHAT_FRAME, frame_seq, f, payload as u32, take)?;
            if take < want && matches!(f.kind, HEADERS | CONTINUATION | PUSH_PROMISE) {
                self.dir.capture_until = seq.wrapping_add(payload as u32).wrapping_add(want);
            }
        }
        Ok(end)
    }

    /// Sends an event for frame `f` at `seq` with `take` payload bytes read
    /// from offset `from` of the call.
    #[inline(always)]
    fn send<const N: usize>(
        &mut self,
        what: u8,
        seq: u32,
        f: &Frame,
        from: u32,
        take: u32,
    ) -> Result<(), Lost> {
        let Scratch {
            event: ev,
            bufs,
            call,
            ..
        } = self;
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
            bufs.read::<{ H2_BLOCK_MAX - 1 }, N>(from, ev.payload.as_mut_ptr(), take)
        } else {
            0
        };
        if got != take {
            self.call.why = 6;
            return Err(Lost);
        }
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
    fn lose<const N: usize>(&mut self) {
        let seq = self.call.seq;
        let why = Frame {
            flags: self.call.why as u8,
            ..Frame::none()
        };
        self.dir.state = if self.send::<N>(H2_WHAT_LOST, seq, &why, 0, 0).is_ok() {
            H2_DIR_LOST
        } else {
            LOST_UNREPORTED
        };
    }
}
