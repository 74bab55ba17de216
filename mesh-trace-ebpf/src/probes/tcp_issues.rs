//! tp_btf `tcp_retransmit_skb`, `tcp_send_reset`, `tcp_receive_reset`:
//! retransmitted segments and resets on tracked sockets, and on sockets
//! still connecting (a lost SYN), which have no storage yet.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_probe_read_kernel},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use mesh_trace_common::{
    EventKind, TcpIssueEvent, ISSUE_RESET_RECEIVED, ISSUE_RESET_SENT, ISSUE_RETRANSMIT,
    RESET_REASON_UNKNOWN,
};

use crate::maps::{emit, header, noop, SOCKS};

/// 1 when `tcp_retransmit_skb` passes the retransmission's result as its
/// third argument (Linux 6.14+): failed attempts are not retransmissions
/// (the kernel's `TcpRetransSegs` does not count them). Set by the agent
/// from the kernel's BTF; read as a constant, so the verifier never sees
/// an argument the kernel does not have.
#[no_mangle]
static RETRANSMIT_HAS_ERR: u32 = 0;
/// 1 when `tcp_send_reset` passes an `enum sk_rst_reason` (Linux 6.10+).
#[no_mangle]
static SEND_RESET_HAS_REASON: u32 = 0;
/// Offsets set by the agent from the kernel's BTF: `sk_buff.cb` (where
/// `struct tcp_skb_cb` lives; its `tcp_gso_segs` is 8 bytes in) and
/// `sock_common.skc_state`.
#[no_mangle]
static OFF_SKB_CB: u32 = 0;
#[no_mangle]
static OFF_SK_STATE: u32 = 0;

const TCP_SYN_SENT: u8 = 2;
/// `tcp_gso_segs` inside `struct tcp_skb_cb`, after `seq` and `end_seq`.
const CB_GSO_SEGS: usize = 8;

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn mt_retransmit(ctx: BtfTracePointContext) -> i32 {
    if noop() {
        return 0;
    }
    if unsafe { core::ptr::read_volatile(&RETRANSMIT_HAS_ERR) } == 1 {
        let err: i32 = ctx.arg(2);
        if err != 0 {
            return 0;
        }
    }
    let skb: *const u8 = ctx.arg(1);
    let cb = unsafe { core::ptr::read_volatile(&OFF_SKB_CB) } as usize;
    let segs = read_kernel::<u16>(skb, cb + CB_GSO_SEGS);
    report(&ctx, ISSUE_RETRANSMIT, u32::from(segs.max(1)), true);
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn mt_send_reset(ctx: BtfTracePointContext) -> i32 {
    if noop() {
        return 0;
    }
    let reason = if unsafe { core::ptr::read_volatile(&SEND_RESET_HAS_REASON) } == 1 {
        ctx.arg::<u32>(2)
    } else {
        RESET_REASON_UNKNOWN
    };
    report(&ctx, ISSUE_RESET_SENT, reason, false);
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn mt_receive_reset(ctx: BtfTracePointContext) -> i32 {
    if noop() {
        return 0;
    }
    report(&ctx, ISSUE_RESET_RECEIVED, 0, false);
    0
}

#[inline(always)]
fn report(ctx: &BtfTracePointContext, issue: u32, detail: u32, connecting_too: bool) {
    // May be NULL (resets sent without a socket) or a time-wait socket; the
    // storage helper finds nothing on either.
    let sk: *mut c_void = ctx.arg(0);
    let cookie = match SOCKS.get(sk, None) {
        Some(tracked) => tracked.cookie,
        // A SYN retransmitted: the socket gets storage only once
        // established, so name it by its cookie and let the agent wait.
        None if connecting_too && !sk.is_null() && state(sk) == TCP_SYN_SENT => unsafe {
            bpf_get_socket_cookie(sk)
        },
        None => return,
    };
    emit(TcpIssueEvent {
        header: header(EventKind::TcpIssue),
        sock_cookie: cookie,
        issue,
        detail,
        min_rtt_us: 0,
        _pad: 0,
    });
}

#[inline(always)]
fn state(sk: *mut c_void) -> u8 {
    let off = unsafe { core::ptr::read_volatile(&OFF_SK_STATE) } as usize;
    read_kernel::<u8>(sk as *const u8, off)
}

/// A `T` at `base + off` in kernel memory; 0 when it cannot be read.
#[inline(always)]
fn read_kernel<T: Default>(base: *const u8, off: usize) -> T {
    let mut v = T::default();
    // SAFETY: a bounded probe read into a local; failure leaves the default.
    unsafe {
        bpf_probe_read_kernel(
            &mut v as *mut T as *mut c_void,
            core::mem::size_of::<T>() as u32,
            base.add(off) as *const c_void,
        );
    }
    v
}
