//! tp_btf `sock_send_length` / `sock_recv_length`: they run in the context
//! of the process doing the I/O, on every socket of the node, so they exit
//! at once for sockets that are not tracked. For a tracked socket's first
//! I/O they report its owner, which sock_ops cannot see for accepted sockets.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_socket_cookie,
    },
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use mesh_trace_common::{EventKind, OwnerEvent, TaskInfo, TRACKED_OWNER_SEEN};

use crate::maps::{emit, header, TRACKED};

#[btf_tracepoint(function = "sock_send_length")]
pub fn mt_send_length(ctx: BtfTracePointContext) -> i32 {
    on_io(&ctx);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn mt_recv_length(ctx: BtfTracePointContext) -> i32 {
    on_io(&ctx);
    0
}

#[inline(always)]
fn on_io(ctx: &BtfTracePointContext) {
    let sk: *mut c_void = ctx.arg(0);
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    let Some(tracked) = TRACKED.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let tracked = unsafe { &mut *tracked };
    if tracked.flags & TRACKED_OWNER_SEEN != 0 {
        return;
    }
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
