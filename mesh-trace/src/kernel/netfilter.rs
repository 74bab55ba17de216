//! Netfilter BPF programs and links (BPF_PROG_TYPE_NETFILTER, kernel >= 6.4).
//!
//! aya 0.14 has no loader for this program type, so this module issues the
//! two bpf(2) commands itself. A netfilter link is created in the network
//! namespace of the calling thread and lives as long as its file descriptor.
use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_NETFILTER: u32 = 32;
const BPF_NETFILTER: u32 = 45;

pub const NFPROTO_IPV4: u32 = 2;
/// Netfilter hooks (enum nf_inet_hooks).
pub const NF_INET_PRE_ROUTING: u32 = 0;
pub const NF_INET_LOCAL_OUT: u32 = 3;
/// The nat table's priority for DNAT/REDIRECT (NF_IP_PRI_NAT_DST).
pub const NF_IP_PRI_NAT_DST: i32 = -100;

/// One eBPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Insn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// `r0 = 1 (NF_ACCEPT); exit`: the smallest valid netfilter program.
pub const ACCEPT_ALL: [Insn; 2] = [
    Insn {
        code: 0xb7, // BPF_ALU64 | BPF_MOV | BPF_K
        regs: 0,
        off: 0,
        imm: 1,
    },
    Insn {
        code: 0x95, // BPF_JMP | BPF_EXIT
        regs: 0,
        off: 0,
        imm: 0,
    },
];

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded bpf_attr of the given size.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success both commands return a new file descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// Loads a netfilter program from raw instructions.
pub fn load_program(insns: &[Insn], name: &str) -> io::Result<OwnedFd> {
    let license = c"GPL";
    // union bpf_attr, BPF_PROG_LOAD part, up to expected_attach_type.
    let mut attr = [0u8; 72];
    put_u32(&mut attr, 0, BPF_PROG_TYPE_NETFILTER);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    let name = name.as_bytes();
    let n = name.len().min(15);
    attr[48..48 + n].copy_from_slice(&name[..n]);
    put_u32(&mut attr, 68, BPF_NETFILTER);
    sys_bpf(BPF_PROG_LOAD, &mut attr)
}

/// Attaches `prog` to a netfilter hook of the calling thread's network namespace.
pub fn attach(
    prog: &impl std::os::fd::AsRawFd,
    pf: u32,
    hooknum: u32,
    priority: i32,
) -> io::Result<OwnedFd> {
    // union bpf_attr, BPF_LINK_CREATE part with the netfilter options.
    let mut attr = [0u8; 32];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 8, BPF_NETFILTER);
    put_u32(&mut attr, 16, pf);
    put_u32(&mut attr, 20, hooknum);
    put_u32(&mut attr, 24, priority as u32);
    sys_bpf(BPF_LINK_CREATE, &mut attr)
}
