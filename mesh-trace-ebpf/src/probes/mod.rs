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

/// An offset the agent set before load (a `#[no_mangle]` static from the
/// kernel's BTF), read as the constant the verifier sees.
#[inline(always)]
pub(crate) fn offset(v: &'static u32) -> usize {
    // SAFETY: a read of a static the loader filled in.
    unsafe { core::ptr::read_volatile(v) as usize }
}

/// A `T` at `base + off` in kernel memory; its default when it cannot be
/// read.
#[inline(always)]
pub(crate) fn read_kernel<T: Default>(base: *const u8, off: usize) -> T {
    let mut v = T::default();
    // SAFETY: a bounded probe read into a local; failure leaves the default.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            &mut v as *mut T as *mut core::ffi::c_void,
            core::mem::size_of::<T>() as u32,
            base.add(off) as *const core::ffi::c_void,
        );
    }
    v
}

pub mod adopt;
pub mod connect;
pub mod h2;
pub mod sock_ops;
pub mod socket_io;
pub mod tcp_issues;
pub mod tls;
pub mod transmit;
