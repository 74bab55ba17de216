//! Kernel programs, one file per hook family, and the helpers they share.

/// Reads one field of the context. The verifier refuses loads through a
/// context pointer with an offset added, which LLVM produces when it shares
/// address computations; a volatile load of each field keeps `ctx + off` in
/// the load instruction itself.
macro_rules! field {
    ($ops:expr, $($f:tt)+) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ops).$($f)+)) }
    };
}

pub mod adopt;
pub mod connect;
pub mod sock_ops;
pub mod socket_io;
pub mod tcp_issues;
