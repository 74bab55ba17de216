//! iter/tcp: adopts the TCP sockets that were established before the
//! programs were attached. The agent lists them with sock_diag, writes their
//! cookies to `ADOPT` and runs this iterator inside their network namespace;
//! each socket found there gets its storage in `SOCKS`, so the data path
//! traces it from then on, and leaves `ADOPT`.
use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_get_socket_cookie, generated::bpf_skc_to_tcp_sock};
use mesh_trace_common::LossReason;

use crate::maps::{count_loss, ADOPT, SOCKS};

/// `struct bpf_iter__tcp`, the context of iter/tcp programs.
#[repr(C)]
pub struct IterTcp {
    meta: *mut c_void,
    sk_common: *mut c_void,
    uid: u32,
}

#[no_mangle]
#[link_section = "iter/tcp"]
pub extern "C" fn mt_adopt(ctx: *mut IterTcp) -> i32 {
    // SAFETY: the context pointer the kernel passes; one aligned load.
    let skc = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx).sk_common)) };
    if skc.is_null() {
        return 0; // the end of the walk
    }
    let cookie = unsafe { bpf_get_socket_cookie(skc) };
    let Some(init) = (unsafe { ADOPT.get(&cookie) }) else {
        return 0;
    };
    let mut value = *init;
    // Storage hangs off a full socket: listening and time-wait ones are not.
    let tcp = unsafe { bpf_skc_to_tcp_sock(skc) } as *mut c_void;
    if tcp.is_null() {
        return 0;
    }
    if SOCKS.get(tcp, Some(&mut value)).is_none() {
        count_loss(LossReason::MapFull);
    }
    let _ = ADOPT.remove(&cookie);
    0
}
