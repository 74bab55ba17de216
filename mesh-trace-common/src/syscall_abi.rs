//! Where a socket call's user buffer is, per architecture: the numbers of
//! the socket I/O syscalls, and where the kernel's saved user registers
//! (`struct pt_regs`, reached with `bpf_task_pt_regs`) hold the syscall
//! number and its arguments 1 and 2 (0-based: argument 0 is the fd).
//!
//! The data path runs inside the syscall (tp_btf `sock_send_length` /
//! `sock_recv_length`), so these registers still hold what the task passed.
//! On arm64 `regs[0]` is overwritten with the return value only when the
//! syscall returns, and the data path reads `regs[1]` and `regs[2]` anyway.
//!
//! Both tables are always compiled so that tests on any host check both;
//! [`current`] picks the one of the machine the programs run on: the target
//! architecture for host builds, the `bpf_target_arch` cfg (as aya names it)
//! for `bpfel-unknown-none` builds.
//!
//! Only 64-bit tasks are decoded. A 32-bit (compat) task's syscall numbers
//! come from another table, and where one equals a number here it names a
//! call that moves no socket data (i386: restart_syscall, exit, lseek,
//! getpid, prof, brk, setgid, getgid; arm EABI: dup2, getppid, getpgrp,
//! setsid, setgroups32, fchown32, getresgid32, chown32); x32 numbers carry
//! bit 30. Such calls yield no payload prefix rather than a wrong one.

/// How a syscall passes the buffer it reads into or writes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferArg {
    /// Argument 1 is the buffer and argument 2 its length (read, write,
    /// sendto, recvfrom).
    Direct,
    /// Argument 1 points at an array of `struct iovec` (readv, writev).
    Iovec,
    /// Argument 1 points at a `struct msghdr`, whose `msg_iov` points at
    /// an array of `struct iovec` (sendmsg, recvmsg).
    Msghdr,
    /// Any other syscall: no buffer known.
    None,
}

/// One architecture's syscall numbers and register layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallAbi {
    /// Offset of the current syscall's number in `struct pt_regs`.
    pub nr_offset: usize,
    /// Its width in bytes: 8 (a `long`) or 4 (an `s32`), signed; -1 outside
    /// a syscall.
    pub nr_size: usize,
    /// Offset of syscall argument 1 (a `u64` register) in `struct pt_regs`.
    pub arg1_offset: usize,
    /// Offset of syscall argument 2.
    pub arg2_offset: usize,
    pub read: i64,
    pub write: i64,
    pub readv: i64,
    pub writev: i64,
    pub sendto: i64,
    pub recvfrom: i64,
    pub sendmsg: i64,
    pub recvmsg: i64,
}

impl SyscallAbi {
    /// How syscall `nr` passes its buffer.
    #[inline(always)]
    pub const fn buffer_arg(&self, nr: i64) -> BufferArg {
        if nr == self.read || nr == self.write || nr == self.sendto || nr == self.recvfrom {
            BufferArg::Direct
        } else if nr == self.readv || nr == self.writev {
            BufferArg::Iovec
        } else if nr == self.sendmsg || nr == self.recvmsg {
            BufferArg::Msghdr
        } else {
            BufferArg::None
        }
    }

    /// The eight syscall numbers, in the order of the fields.
    pub const fn numbers(&self) -> [i64; 8] {
        [
            self.read,
            self.write,
            self.readv,
            self.writev,
            self.sendto,
            self.recvfrom,
            self.sendmsg,
            self.recvmsg,
        ]
    }
}

/// x86_64: `arch/x86/entry/syscalls/syscall_64.tbl`; `struct pt_regs` of
/// `arch/x86/include/asm/ptrace.h` (r15 first, 8 bytes a register): the
/// number in `orig_ax`, arguments in di, si, dx, r10, r8, r9.
pub const X86_64: SyscallAbi = SyscallAbi {
    nr_offset: 15 * 8,   // orig_ax
    nr_size: 8,          // unsigned long, -1 outside a syscall
    arg1_offset: 13 * 8, // si
    arg2_offset: 12 * 8, // dx
    read: 0,
    write: 1,
    readv: 19,
    writev: 20,
    sendto: 44,
    recvfrom: 45,
    sendmsg: 46,
    recvmsg: 47,
};

/// arm64: the generic table of `include/uapi/asm-generic/unistd.h`;
/// `struct pt_regs` of `arch/arm64/include/asm/ptrace.h`: `regs[31]`, sp,
/// pc, pstate (the `user_pt_regs` prefix), `orig_x0`, then `s32 syscallno`
/// at 280 (little-endian; kernels before 4.15 had a `u64` there, whose low
/// half is at the same place). Arguments in `regs[0..6]`.
pub const AARCH64: SyscallAbi = SyscallAbi {
    nr_offset: AARCH64_SYSCALLNO_OFFSET,
    nr_size: 4,
    arg1_offset: 8,  // regs[1]
    arg2_offset: 16, // regs[2]
    read: 63,
    write: 64,
    readv: 65,
    writev: 66,
    sendto: 206,
    recvfrom: 207,
    sendmsg: 211,
    recvmsg: 212,
};

/// `offsetof(struct pt_regs, syscallno)` on arm64: 31 registers, sp, pc,
/// pstate, orig_x0, 8 bytes each.
pub const AARCH64_SYSCALLNO_OFFSET: usize = 31 * 8 + 3 * 8 + 8;

/// Offset of `msg_iov` in `struct msghdr` (after `void *msg_name` and
/// `int msg_namelen`, padded): the same on both 64-bit ABIs.
pub const MSGHDR_MSG_IOV: usize = 16;

/// Size of `struct iovec` (`void *iov_base`, `size_t iov_len`) on both.
pub const IOVEC_SIZE: usize = 16;

/// The table of the architecture the programs are built for.
#[cfg(any(
    all(target_arch = "bpf", bpf_target_arch = "x86_64"),
    all(not(target_arch = "bpf"), target_arch = "x86_64")
))]
pub const fn current() -> SyscallAbi {
    X86_64
}

/// The table of the architecture the programs are built for.
#[cfg(any(
    all(target_arch = "bpf", bpf_target_arch = "aarch64"),
    all(not(target_arch = "bpf"), target_arch = "aarch64")
))]
pub const fn current() -> SyscallAbi {
    AARCH64
}

#[cfg(all(
    target_arch = "bpf",
    not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64"))
))]
compile_error!(
    "the payload locator knows x86_64 and aarch64: build the eBPF programs with \
     --cfg bpf_target_arch=\"x86_64\" or --cfg bpf_target_arch=\"aarch64\""
);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    /// arm64's `struct pt_regs` up to `syscallno`, as in
    /// arch/arm64/include/asm/ptrace.h (the union's anonymous struct view).
    #[repr(C)]
    #[allow(dead_code)]
    struct Arm64PtRegs {
        regs: [u64; 31],
        sp: u64,
        pc: u64,
        pstate: u64,
        orig_x0: u64,
        syscallno: i32,
        pmr: u32,
    }

    /// x86_64's `struct pt_regs`, as in arch/x86/include/asm/ptrace.h.
    #[repr(C)]
    #[allow(dead_code)]
    struct X86PtRegs {
        r15: u64,
        r14: u64,
        r13: u64,
        r12: u64,
        bp: u64,
        bx: u64,
        r11: u64,
        r10: u64,
        r9: u64,
        r8: u64,
        ax: u64,
        cx: u64,
        dx: u64,
        si: u64,
        di: u64,
        orig_ax: u64,
        ip: u64,
        cs: u64,
        flags: u64,
        sp: u64,
        ss: u64,
    }

    /// `struct msghdr` and `struct iovec` on an LP64 ABI, pointers as u64.
    #[repr(C)]
    #[allow(dead_code)]
    struct Msghdr {
        msg_name: u64,
        msg_namelen: i32,
        msg_iov: u64,
        msg_iovlen: u64,
        msg_control: u64,
        msg_controllen: u64,
        msg_flags: i32,
    }
    #[repr(C)]
    #[allow(dead_code)]
    struct Iovec {
        iov_base: u64,
        iov_len: u64,
    }

    #[test]
    fn x86_64_registers_match_pt_regs() {
        assert_eq!(X86_64.nr_offset, offset_of!(X86PtRegs, orig_ax));
        assert_eq!(X86_64.nr_offset, 120);
        assert_eq!(X86_64.nr_size, 8);
        assert_eq!(X86_64.arg1_offset, offset_of!(X86PtRegs, si));
        assert_eq!(X86_64.arg2_offset, offset_of!(X86PtRegs, dx));
    }

    #[test]
    fn aarch64_registers_match_pt_regs() {
        assert_eq!(AARCH64_SYSCALLNO_OFFSET, offset_of!(Arm64PtRegs, syscallno));
        assert_eq!(AARCH64.nr_offset, 280);
        assert_eq!(AARCH64.nr_size, size_of::<i32>());
        // user_pt_regs (regs, sp, pc, pstate) is a prefix of pt_regs.
        assert_eq!(offset_of!(Arm64PtRegs, orig_x0), 34 * 8);
        assert_eq!(AARCH64.arg1_offset, offset_of!(Arm64PtRegs, regs) + 8);
        assert_eq!(AARCH64.arg2_offset, offset_of!(Arm64PtRegs, regs) + 2 * 8);
        assert_eq!(AARCH64.nr_offset % AARCH64.nr_size, 0);
    }

    #[test]
    fn syscall_numbers_are_the_kernels() {
        // arch/x86/entry/syscalls/syscall_64.tbl
        assert_eq!(X86_64.numbers(), [0, 1, 19, 20, 44, 45, 46, 47]);
        // include/uapi/asm-generic/unistd.h
        assert_eq!(AARCH64.numbers(), [63, 64, 65, 66, 206, 207, 211, 212]);
    }

    #[test]
    fn numbers_are_distinct_and_classified() {
        for abi in [X86_64, AARCH64] {
            let n = abi.numbers();
            for i in 0..n.len() {
                assert!(n[i] >= 0);
                for j in i + 1..n.len() {
                    assert_ne!(n[i], n[j], "{abi:?}");
                }
            }
            for nr in [abi.read, abi.write, abi.sendto, abi.recvfrom] {
                assert_eq!(abi.buffer_arg(nr), BufferArg::Direct);
            }
            for nr in [abi.readv, abi.writev] {
                assert_eq!(abi.buffer_arg(nr), BufferArg::Iovec);
            }
            for nr in [abi.sendmsg, abi.recvmsg] {
                assert_eq!(abi.buffer_arg(nr), BufferArg::Msghdr);
            }
            // Outside a syscall the number is -1.
            assert_eq!(abi.buffer_arg(-1), BufferArg::None);
        }
        // Each table's numbers mean something else in the other.
        assert_eq!(X86_64.buffer_arg(63), BufferArg::None);
        assert_eq!(AARCH64.buffer_arg(0), BufferArg::None);
    }

    #[test]
    fn msghdr_and_iovec_layouts() {
        assert_eq!(MSGHDR_MSG_IOV, offset_of!(Msghdr, msg_iov));
        assert_eq!(IOVEC_SIZE, size_of::<Iovec>());
        assert_eq!(offset_of!(Iovec, iov_len), 8);
    }

    #[test]
    fn current_is_the_hosts_table() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(current(), X86_64);
        #[cfg(target_arch = "aarch64")]
        assert_eq!(current(), AARCH64);
    }
}
