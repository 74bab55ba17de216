//! tp_btf `net_dev_queue`: a packet handed to a device, in the context that
//! sends it (the writing thread, when the packet leaves inside its call).
//! For a tracked socket, the moment its newest data first left is kept in
//! its storage: a send whose last byte left inside the call is stamped with
//! it (`socket_io`), not with the call's return, which comes late when the
//! thread is kept off the CPU on its way out (tens of milliseconds on a
//! starved node, time a span would put in the hop before the send).
//!
//! Runs for every packet on the node; for one of an untracked socket it
//! costs a pointer load and the storage lookup that misses.
use core::ffi::c_void;

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};

use super::{offset, read_kernel};
use crate::maps::{noop, SOCKS};

/// Offsets of `sk_buff.sk`, `.head`, `.data`, `.len` and
/// `.transport_header`, set by the agent from the kernel's BTF.
#[no_mangle]
static OFF_SKB_SK: u32 = 0;
#[no_mangle]
static OFF_SKB_HEAD: u32 = 0;
#[no_mangle]
static OFF_SKB_DATA: u32 = 0;
#[no_mangle]
static OFF_SKB_LEN: u32 = 0;
#[no_mangle]
static OFF_SKB_TRANSPORT_HEADER: u32 = 0;

/// `transport_header` of a packet without one.
const NO_HEADER: u16 = 0xffff;

#[btf_tracepoint(function = "net_dev_queue")]
pub fn mt_dev_queue(ctx: BtfTracePointContext) -> i32 {
    if noop() {
        return 0;
    }
    let skb: *const u8 = ctx.arg(0);
    // A load through the BTF pointer (not a probe read): the verifier types
    // the result `struct sock *`, as the storage lookup wants.
    // SAFETY: the member at the offset the kernel's BTF gives.
    let sk: *mut c_void =
        unsafe { core::ptr::read_volatile(skb.add(offset(&OFF_SKB_SK)) as *const *mut c_void) };
    if sk.is_null() {
        return 0;
    }
    let Some(tracked) = SOCKS.get(sk, None) else {
        return 0;
    };
    let transport: u16 = read_kernel(skb, offset(&OFF_SKB_TRANSPORT_HEADER));
    if transport == NO_HEADER {
        return 0;
    }
    let head: u64 = read_kernel(skb, offset(&OFF_SKB_HEAD));
    let data: u64 = read_kernel(skb, offset(&OFF_SKB_DATA));
    let len: u32 = read_kernel(skb, offset(&OFF_SKB_LEN));
    let tcp = head + u64::from(transport);
    let seq = u32::from_be(read_kernel::<u32>(tcp as *const u8, 4));
    let header_len = u64::from(read_kernel::<u8>(tcp as *const u8, 12) >> 4) * 4;
    // From the packet's first byte (its link-layer header) to its data.
    let Some(before) = (tcp + header_len).checked_sub(data) else {
        return 0;
    };
    // A bare ACK or FIN carries no data (and stamps no send).
    if u64::from(len) <= before {
        return 0;
    }
    let end = seq.wrapping_add((u64::from(len) - before) as u32);
    // The same data again (a retransmit, or the packet on the next device
    // of its path) keeps its first moment.
    if tracked.sent_ns != 0 && (end.wrapping_sub(tracked.sent_end_seq) as i32) <= 0 {
        return 0;
    }
    tracked.sent_ns = unsafe { bpf_ktime_get_ns() };
    tracked.sent_end_seq = end;
    0
}
