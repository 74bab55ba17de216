//! sock_ops: every TCP socket that reaches ESTABLISHED (both ends) and its
//! close, with 4-tuple, RTT and byte counts. Passive opens run in softirq, so
//! nothing here reads the current task.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext,
};
use aya_log_ebpf::warn;
use mesh_trace_common::{Endpoint, EventKind, LossReason, SockEvent, TrackedSock, AF_INET};

use crate::maps::{count_loss, emit, header, noop, SOCKS};

/// Cookie of the host's network namespace, set by the agent (0: unknown,
/// every socket is tracked).
#[no_mangle]
pub static HOST_NETNS: u64 = 0;

/// sock_ops programs return 1; the value is otherwise ignored for these ops.
const OK: u32 = 1;

#[sock_ops]
pub fn mt_sock_ops(ctx: SockOpsContext) -> u32 {
    if noop() {
        return OK;
    }
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx, 1),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => established(&ctx, 0),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // The socket's storage goes with the socket.
            emit(event(&ctx, EventKind::Closed, 0));
        }
        _ => {}
    }
    OK
}

#[inline(always)]
fn established(ctx: &SockOpsContext, active: u32) {
    // Ask for state callbacks so the close is seen too. Failing leaves the
    // socket traced without its close, so say so.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if let Err(err) = ctx.set_cb_flags(flags as i32) {
        warn!(ctx, "sock_ops: cannot enable state callbacks: {}", err);
    }
    let ev = event(ctx, EventKind::Established, active);
    // The node's own sockets (host network) never carry sidecar traffic:
    // without storage, their sends and receives cost one pointer walk.
    if ev.netns_cookie == unsafe { core::ptr::read_volatile(&HOST_NETNS) } {
        emit(ev);
        return;
    }
    let mut tracked = TrackedSock {
        cookie: ev.sock_cookie,
        netns_cookie: ev.netns_cookie,
        flags: 0,
        // The open reports the handshake's RTT; the data path's next sample
        // comes a second later.
        rtt_sampled: (ev.header.ts_ns >> 30) as u32,
        ..TrackedSock::default()
    };
    let sk = field!(ctx.ops, __bindgen_anon_2.sk) as *mut c_void;
    // Null sk or no memory for the storage: the data path misses this socket.
    if sk.is_null() || SOCKS.get(sk, Some(&mut tracked)).is_none() {
        count_loss(LossReason::MapFull);
    }
    emit(ev);
}

#[inline(always)]
fn event(ctx: &SockOpsContext, kind: EventKind, active: u32) -> SockEvent {
    let ops = ctx.ops;
    // local_port is host order; remote_port holds the network-order port
    // shifted into the upper half on little-endian (sock_ops_convert_ctx_access).
    let lport = field!(ops, local_port) as u16;
    let rport = u16::from_be((field!(ops, remote_port) >> 16) as u16);
    let (local, remote) = if field!(ops, family) == AF_INET as u32 {
        (
            Endpoint::v4(field!(ops, local_ip4), lport),
            Endpoint::v4(field!(ops, remote_ip4), rport),
        )
    } else {
        let local = [
            field!(ops, local_ip6[0]),
            field!(ops, local_ip6[1]),
            field!(ops, local_ip6[2]),
            field!(ops, local_ip6[3]),
        ];
        let remote = [
            field!(ops, remote_ip6[0]),
            field!(ops, remote_ip6[1]),
            field!(ops, remote_ip6[2]),
            field!(ops, remote_ip6[3]),
        ];
        (Endpoint::v6(local, lport), Endpoint::v6(remote, rport))
    };
    let ptr = ctx.as_ptr();
    SockEvent {
        header: header(kind),
        sock_cookie: unsafe { bpf_get_socket_cookie(ptr) },
        netns_cookie: unsafe { bpf_get_netns_cookie(ptr) },
        local,
        remote,
        active,
        srtt_us: field!(ops, srtt_us) >> 3,
        bytes_acked: field!(ops, bytes_acked),
        bytes_received: field!(ops, bytes_received),
    }
}
