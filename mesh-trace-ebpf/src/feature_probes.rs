//! The smallest program of each hook type mesh-trace may use. `mesh-trace
//! check` loads and attaches each one to learn what this kernel really allows,
//! rather than trusting its config. None of them does anything.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{
        btf_tracepoint, cgroup_sock_addr, cgroup_sockopt, fentry, kprobe, raw_tracepoint, sock_ops,
        tracepoint, uprobe,
    },
    programs::{
        BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext, SockAddrContext,
        SockOpsContext, SockoptContext, TracePointContext,
    },
};

#[kprobe]
pub fn feature_kprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[fentry(function = "tcp_v4_connect")]
pub fn feature_fentry(_ctx: FEntryContext) -> u32 {
    0
}

#[tracepoint]
pub fn feature_tracepoint(_ctx: TracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn feature_tp_btf(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn feature_raw_tracepoint(_ctx: RawTracePointContext) -> i32 {
    0
}

#[sock_ops]
pub fn feature_sock_ops(_ctx: SockOpsContext) -> u32 {
    1
}

#[cgroup_sock_addr(connect4)]
pub fn feature_cgroup_sock_addr(_ctx: SockAddrContext) -> i32 {
    1
}

#[cgroup_sockopt(getsockopt)]
pub fn feature_cgroup_sockopt(_ctx: SockoptContext) -> i32 {
    1
}

#[uprobe]
pub fn feature_uprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
