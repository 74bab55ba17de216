//! tp_btf `tcp_retransmit_skb`, `tcp_send_reset`, `tcp_receive_reset`:
//! retransmitted segments and resets on tracked sockets, and on sockets
//! still connecting (a lost SYN), which have no storage yet; and
//! `tcp_retransmit_synack`, a SYN-ACK resent for a connection that has no
//! server socket yet, named by its addresses.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use mesh_trace_common::{
    Endpoint, EventKind, SockEvent, TcpIssueEvent, AF_INET, ISSUE_RESET_RECEIVED, ISSUE_RESET_SENT,
    ISSUE_RETRANSMIT, RESET_REASON_UNKNOWN, TCP_SYN_SENT,
};

use super::{offset, read_kernel, sock_ops::HOST_NETNS};
use crate::maps::{emit, header, noop, SOCKS};

/// 1 when `tcp_retransmit_skb` passes the retransmission's result as its
/// third argument (Linux 6.14+), and then fires for attempts given up too
/// (see `gave_up_before_sending`). Set by the agent
/// from the kernel's BTF; read as a constant, so the verifier never sees
/// an argument the kernel does not have.
#[no_mangle]
static RETRANSMIT_HAS_ERR: u32 = 0;
/// Whether `__tcp_retransmit_skb` returned before it sent anything (still
/// in the host's queue, nothing left to resend, no memory, no route, no
/// window): the kernel counts those in neither `TcpRetransSegs` nor the
/// socket's `total_retrans`. Any other error came from sending the segment
/// out (a netfilter DROP is -EPERM, a full queue -ENOBUFS), after the kernel
/// had counted it, so it counts here too.
#[inline(always)]
fn gave_up_before_sending(err: i32) -> bool {
    const EAGAIN: i32 = 11;
    const ENOMEM: i32 = 12;
    const EBUSY: i32 = 16;
    const EINVAL: i32 = 22;
    const EHOSTUNREACH: i32 = 113;
    matches!(-err, EAGAIN | ENOMEM | EBUSY | EINVAL | EHOSTUNREACH)
}

/// 1 when `tcp_send_reset` passes an `enum sk_rst_reason` (Linux 6.10+).
#[no_mangle]
static SEND_RESET_HAS_REASON: u32 = 0;
/// Offsets set by the agent from the kernel's BTF: `sk_buff.cb` (where
/// `struct tcp_skb_cb` lives; its `tcp_gso_segs` is 8 bytes in) and
/// `sock_common.skc_state`.
#[no_mangle]
static OFF_SKB_CB: u32 = 0;
#[no_mangle]
pub(crate) static OFF_SK_STATE: u32 = 0;
/// Offsets in `struct sock_common` (a request socket starts with one too)
/// and of `net.net_cookie`, set by the agent from the kernel's BTF.
#[no_mangle]
static OFF_SKC_FAMILY: u32 = 0;
#[no_mangle]
static OFF_SKC_DADDR: u32 = 0;
#[no_mangle]
static OFF_SKC_RCV_SADDR: u32 = 0;
#[no_mangle]
static OFF_SKC_DPORT: u32 = 0;
#[no_mangle]
static OFF_SKC_NUM: u32 = 0;
#[no_mangle]
static OFF_SKC_V6_DADDR: u32 = 0;
#[no_mangle]
static OFF_SKC_V6_RCV_SADDR: u32 = 0;
#[no_mangle]
static OFF_SKC_NET: u32 = 0;
#[no_mangle]
static OFF_NET_COOKIE: u32 = 0;

/// `tcp_gso_segs` inside `struct tcp_skb_cb`, after `seq` and `end_seq`.
const CB_GSO_SEGS: usize = 8;

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn mt_retransmit(ctx: BtfTracePointContext) -> i32 {
    if noop() {
        return 0;
    }
    if unsafe { core::ptr::read_volatile(&RETRANSMIT_HAS_ERR) } == 1 {
        let err: i32 = ctx.arg(2);
        if gave_up_before_sending(err) {
            return 0;
        }
    }
    let skb: *const u8 = ctx.arg(1);
    let segs = read_kernel::<u16>(skb, offset(&OFF_SKB_CB) + CB_GSO_SEGS);
    report(&ctx, ISSUE_RETRANSMIT, u32::from(segs.max(1)), true);
    0
}

/// The kernel counts a resent SYN-ACK in `TcpRetransSegs` too. Its
/// connection has only a request socket: the agent puts it on the leg of
/// the server socket that later has the same namespace and addresses.
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn mt_retransmit_synack(ctx: BtfTracePointContext) -> i32 {
    if noop() {
        return 0;
    }
    let listener: *const u8 = ctx.arg(0);
    let req: *const u8 = ctx.arg(1);
    let net: u64 = read_kernel(listener, offset(&OFF_SKC_NET));
    let netns_cookie: u64 = read_kernel(net as *const u8, offset(&OFF_NET_COOKIE));
    if netns_cookie == unsafe { core::ptr::read_volatile(&HOST_NETNS) } {
        return 0;
    }
    let lport: u16 = read_kernel(req, offset(&OFF_SKC_NUM));
    let rport = u16::from_be(read_kernel(req, offset(&OFF_SKC_DPORT)));
    let (local, remote) = if read_kernel::<u16>(req, offset(&OFF_SKC_FAMILY)) == AF_INET {
        (
            Endpoint::v4(read_kernel(req, offset(&OFF_SKC_RCV_SADDR)), lport),
            Endpoint::v4(read_kernel(req, offset(&OFF_SKC_DADDR)), rport),
        )
    } else {
        (
            Endpoint::v6(read_kernel(req, offset(&OFF_SKC_V6_RCV_SADDR)), lport),
            Endpoint::v6(read_kernel(req, offset(&OFF_SKC_V6_DADDR)), rport),
        )
    };
    emit(SockEvent {
        header: header(EventKind::SynAckRetransmit),
        sock_cookie: 0,
        netns_cookie,
        local,
        remote,
        active: 0,
        srtt_us: 0,
        bytes_acked: 0,
        bytes_received: 0,
    });
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
    let sk_state = if connecting_too && !sk.is_null() {
        u32::from(state(sk))
    } else {
        0
    };
    let cookie = match SOCKS.get(sk, None) {
        Some(tracked) => tracked.cookie,
        // A SYN retransmitted: the socket gets storage only once
        // established, so name it by its cookie and let the agent wait.
        None if sk_state == TCP_SYN_SENT => unsafe { bpf_get_socket_cookie(sk) },
        None => return,
    };
    emit(TcpIssueEvent {
        header: header(EventKind::TcpIssue),
        sock_cookie: cookie,
        issue,
        detail,
        min_rtt_us: 0,
        sk_state,
    });
}

#[inline(always)]
fn state(sk: *mut c_void) -> u8 {
    read_kernel::<u8>(sk as *const u8, offset(&OFF_SK_STATE))
}
