//! cgroup/connect4 and connect6: the destination an application asked for,
//! before any iptables NAT rewrites it, with the process that asked.
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_netns_cookie, bpf_get_socket_cookie,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use mesh_trace_common::{ConnectEvent, Endpoint, EventKind, TaskInfo};

use crate::maps::{emit, header, noop};

const IPPROTO_TCP: u32 = 6;
/// cgroup/connect* programs must return 1 to let the connect() proceed.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn mt_connect4(ctx: SockAddrContext) -> i32 {
    if noop() {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    if field!(sa, protocol) == IPPROTO_TCP {
        let port = u16::from_be(field!(sa, user_port) as u16);
        record(&ctx, Endpoint::v4(field!(sa, user_ip4), port));
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mt_connect6(ctx: SockAddrContext) -> i32 {
    if noop() {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    if field!(sa, protocol) == IPPROTO_TCP {
        let port = u16::from_be(field!(sa, user_port) as u16);
        let ip = [
            field!(sa, user_ip6[0]),
            field!(sa, user_ip6[1]),
            field!(sa, user_ip6[2]),
            field!(sa, user_ip6[3]),
        ];
        record(&ctx, Endpoint::v6(ip, port));
    }
    ALLOW
}

#[inline(always)]
fn record(ctx: &SockAddrContext, dst: Endpoint) {
    let ptr = ctx.as_ptr();
    emit(ConnectEvent {
        header: header(EventKind::Connect),
        sock_cookie: unsafe { bpf_get_socket_cookie(ptr) },
        netns_cookie: unsafe { bpf_get_netns_cookie(ptr) },
        task: TaskInfo {
            pid_tgid: bpf_get_current_pid_tgid(),
            uid_gid: bpf_get_current_uid_gid(),
            comm: bpf_get_current_comm().unwrap_or_default(),
        },
        dst,
    });
}
