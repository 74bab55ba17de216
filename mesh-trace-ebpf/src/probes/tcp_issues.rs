//! tp_btf `tcp_retransmit_skb`, `tcp_send_reset`, `tcp_receive_reset`:
//! retransmissions and resets on tracked sockets.
use core::ffi::c_void;

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use mesh_trace_common::{
    EventKind, TcpIssueEvent, ISSUE_RESET_RECEIVED, ISSUE_RESET_SENT, ISSUE_RETRANSMIT,
};

use crate::maps::{emit, header, noop, SOCKS};

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn mt_retransmit(ctx: BtfTracePointContext) -> i32 {
    if noop() {
        return 0;
    }
    report(&ctx, ISSUE_RETRANSMIT);
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn mt_send_reset(ctx: BtfTracePointContext) -> i32 {
    if noop() {
        return 0;
    }
    report(&ctx, ISSUE_RESET_SENT);
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn mt_receive_reset(ctx: BtfTracePointContext) -> i32 {
    if noop() {
        return 0;
    }
    report(&ctx, ISSUE_RESET_RECEIVED);
    0
}

#[inline(always)]
fn report(ctx: &BtfTracePointContext, issue: u32) {
    // May be NULL (resets sent without a socket) or a time-wait socket; the
    // storage helper finds nothing on either.
    let sk: *mut c_void = ctx.arg(0);
    let Some(tracked) = SOCKS.get(sk, None) else {
        return;
    };
    emit(TcpIssueEvent {
        header: header(EventKind::TcpIssue),
        sock_cookie: tracked.cookie,
        issue,
        _pad: 0,
    });
}
