//! Observing iptables REDIRECT at the NAT step itself: netfilter programs
//! in each pod's network namespace, one just before the nat table's DNAT
//! priority and one just after, on LOCAL_OUT (outbound REDIRECT to 15001)
//! and PRE_ROUTING (inbound REDIRECT to 15006). For each connection's SYN
//! the first remembers the destination, the second compares: a change is a
//! REDIRECT, written to the events ring buffer with a timestamp (or counted
//! as lost), and the namespace marked meshed in MESHED_NETNS at once, so
//! that the data path captures that very connection's first request.
//!
//! The programs are generated here (aya 0.14 cannot load netfilter
//! programs), with the namespace's cookie and the map descriptors as
//! immediates; the one kernel struct offset they need, `sk_buff.data`,
//! comes from the kernel's BTF.
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use anyhow::Context as _;
use mesh_trace_common::{EventKind, RedirectEvent, HOOK_LOCAL_OUT, HOOK_PRE_ROUTING};

use super::{
    asm::{helper, Alu, Asm, Cond, Size, FP, R0, R1, R2, R3, R4, R6, R7, R8, R9},
    netfilter::{
        self, Insn, NFPROTO_IPV4, NF_INET_LOCAL_OUT, NF_INET_PRE_ROUTING, NF_IP_PRI_NAT_DST,
    },
};

/// SYNs between the two programs at once, per namespace.
const PENDING_SYNS: u32 = 4096;

// Stack layout of the generated programs (offsets from the frame pointer).
const PKT: i16 = -96; // 40 bytes: IPv4 header without options + TCP header start
const KEY: i16 = -104; // saddr | sport << 32
const VAL: i16 = -112; // daddr | dport << 32
const EV: i16 = -48; // a RedirectEvent

#[derive(Clone, Copy)]
enum Stage {
    /// Before NAT: remember where the SYN was going.
    Before,
    /// After NAT: compare, report a change.
    After { hook: u16 },
}

/// Maps the programs write to, shared by every namespace.
pub struct Shared {
    pub events: OwnedFd,
    pub lost: OwnedFd,
    /// MESHED_NETNS, which the data path reads.
    pub meshed: OwnedFd,
    /// Byte offset of `data` in `struct sk_buff`.
    pub skb_data_offset: i16,
    /// Benchmark floor: link programs that only accept.
    pub noop: bool,
}

/// The four programs and links of one namespace; dropping it detaches them.
pub struct NatProbe {
    _links: Vec<OwnedFd>,
    _progs: Vec<OwnedFd>,
    _pending: OwnedFd,
}

impl NatProbe {
    /// Loads the programs and links them in the network namespace at
    /// `netns_path` (e.g. /var/run/netns/NAME) whose cookie is `netns_cookie`.
    pub fn attach(
        shared: &Shared,
        netns_path: &std::path::Path,
        netns_cookie: u64,
    ) -> anyhow::Result<NatProbe> {
        let pending = create_map(BPF_MAP_TYPE_LRU_HASH, 8, 8, PENDING_SYNS)
            .context("creating the pending-SYN map")?;
        let mut progs = Vec::new();
        let mut plan = Vec::new();
        for (hooknum, hook) in [
            (NF_INET_LOCAL_OUT, HOOK_LOCAL_OUT),
            (NF_INET_PRE_ROUTING, HOOK_PRE_ROUTING),
        ] {
            // Next to the nat table on either side, moving away from it
            // when another agent (a rolling update's other pod) holds a
            // place: netfilter takes one BPF program per priority.
            for (stage, priority) in [(Stage::Before, -1), (Stage::After { hook }, 1)] {
                let insns = program(shared, pending.as_fd(), stage, netns_cookie);
                let name = match stage {
                    Stage::Before => "mt_nat_before",
                    Stage::After { .. } => "mt_nat_after",
                };
                let prog = netfilter::load_program(&insns, name)
                    .with_context(|| format!("loading {name}"))?;
                plan.push((prog.as_raw_fd(), hooknum, priority));
                progs.push(prog);
            }
        }
        // Links are created in the namespace of the calling thread.
        let links = crate::netns::in_namespace(netns_path, || {
            plan.iter()
                .map(|&(fd, hooknum, priority)| {
                    // SAFETY: fd belongs to a program in `progs`, alive here.
                    let prog = unsafe { BorrowedFd::borrow_raw(fd) };
                    attach_next_to_nat(&prog, hooknum, priority)
                })
                .collect::<anyhow::Result<Vec<OwnedFd>>>()
        })?;
        Ok(NatProbe {
            _links: links,
            _progs: progs,
            _pending: pending,
        })
    }
}

use std::os::fd::AsFd;

/// How far from the nat table's priority a program may sit: the next
/// hooks on either side (mangle at -150, filter at 0) are further.
const NAT_NEIGHBOURS: i32 = 8;

/// Links `prog` at the first free priority `direction` (-1 before, +1
/// after) of the nat table's.
fn attach_next_to_nat(
    prog: &BorrowedFd<'_>,
    hooknum: u32,
    direction: i32,
) -> anyhow::Result<OwnedFd> {
    for k in 1..=NAT_NEIGHBOURS {
        let priority = NF_IP_PRI_NAT_DST + direction * k;
        match netfilter::attach(prog, NFPROTO_IPV4, hooknum, priority) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
            other => {
                return other
                    .with_context(|| format!("BPF_LINK_CREATE (netfilter, priority {priority})"))
            }
        }
    }
    anyhow::bail!(
        "BPF_LINK_CREATE (netfilter): all {NAT_NEIGHBOURS} priorities next to the nat table are taken by other programs"
    )
}

/// Generates one stage's program.
fn program(shared: &Shared, pending: BorrowedFd<'_>, stage: Stage, netns_cookie: u64) -> Vec<Insn> {
    if shared.noop {
        return netfilter::ACCEPT_ALL.to_vec();
    }
    let mut a = Asm::default();
    // ctx is struct bpf_nf_ctx { state; skb; }: read the skb's data pointer
    // and copy the IPv4 and TCP headers to the stack.
    a.mov(R6, 1)
        .load(Size::DW, R7, R6, 8)
        .load(Size::DW, R3, R7, shared.skb_data_offset)
        .stack_ptr(R1, PKT as i32)
        .mov_imm(R2, 40)
        .call(helper::PROBE_READ_KERNEL)
        .jump_imm(Cond::Ne, R0, 0, "accept")
        // IPv4 without options, TCP, SYN without ACK: a new connection.
        .load(Size::B, R1, FP, PKT)
        .jump_imm(Cond::Ne, R1, 0x45, "accept")
        .load(Size::B, R1, FP, PKT + 9)
        .jump_imm(Cond::Ne, R1, 6, "accept")
        .load(Size::B, R1, FP, PKT + 33)
        .alu_imm(Alu::And, R1, 0x12)
        .jump_imm(Cond::Ne, R1, 0x02, "accept")
        // key = saddr | sport << 32; val = daddr | dport << 32
        .load(Size::W, R8, FP, PKT + 12)
        .load(Size::H, R1, FP, PKT + 20)
        .alu_imm(Alu::Lsh, R1, 32)
        .alu_reg(Alu::Or, R1, R8)
        .store(Size::DW, FP, KEY, R1)
        .load(Size::W, R9, FP, PKT + 16)
        .load(Size::H, R1, FP, PKT + 22)
        .alu_imm(Alu::Lsh, R1, 32)
        .alu_reg(Alu::Or, R1, R9)
        .store(Size::DW, FP, VAL, R1);
    match stage {
        Stage::Before => {
            a.ld_map_fd(R1, pending.as_raw_fd())
                .stack_ptr(R2, KEY as i32)
                .stack_ptr(R3, VAL as i32)
                .mov_imm(R4, 0)
                .call(helper::MAP_UPDATE_ELEM)
                .goto("accept");
        }
        Stage::After { hook } => after(&mut a, shared, pending, hook, netns_cookie),
    }
    // Netfilter programs return a verdict: always NF_ACCEPT, never disturb.
    a.label("accept").mov_imm(R0, 1).exit();
    a.finish()
}

fn after(a: &mut Asm, shared: &Shared, pending: BorrowedFd<'_>, hook: u16, netns_cookie: u64) {
    a.ld_map_fd(R1, pending.as_raw_fd())
        .stack_ptr(R2, KEY as i32)
        .call(helper::MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, R0, 0, "accept")
        .load(Size::DW, R9, R0, 0)
        .ld_map_fd(R1, pending.as_raw_fd())
        .stack_ptr(R2, KEY as i32)
        .call(helper::MAP_DELETE_ELEM)
        .load(Size::DW, R1, FP, VAL)
        .jump_reg(Cond::Eq, R1, R9, "accept")
        // The destination changed: fill a RedirectEvent on the stack.
        .store_imm(Size::W, FP, EV, EventKind::Redirect as i32)
        .call(helper::GET_SMP_PROCESSOR_ID)
        .store(Size::W, FP, EV + 4, R0)
        .call(helper::KTIME_GET_NS)
        .store(Size::DW, FP, EV + 8, R0)
        .ld_imm64(R1, netns_cookie)
        .store(Size::DW, FP, EV + 16, R1)
        .load(Size::W, R1, FP, PKT + 12)
        .store(Size::W, FP, EV + 24, R1)
        .store(Size::W, FP, EV + 28, R9)
        .load(Size::W, R1, FP, PKT + 16)
        .store(Size::W, FP, EV + 32, R1)
        .load(Size::H, R1, FP, PKT + 20)
        .store(Size::H, FP, EV + 36, R1)
        .mov(R1, R9)
        .alu_imm(Alu::Rsh, R1, 32)
        .store(Size::H, FP, EV + 38, R1)
        .load(Size::H, R1, FP, PKT + 22)
        .store(Size::H, FP, EV + 40, R1)
        .store_imm(Size::H, FP, EV + 42, i32::from(hook))
        .store_imm(Size::W, FP, EV + 44, 0)
        .ld_map_fd(R1, shared.events.as_raw_fd())
        .stack_ptr(R2, EV as i32)
        .mov_imm(R3, size_of::<RedirectEvent>() as i32)
        .mov_imm(R4, 0)
        .call(helper::RINGBUF_OUTPUT)
        // Keep the result; R8 (the source address) is not needed now.
        .mov(R8, R0)
        // Mark the namespace meshed before this connection's first byte:
        // MESHED_NETNS[cookie] = 1.
        .ld_imm64(R1, netns_cookie)
        .store(Size::DW, FP, KEY, R1)
        .store_imm(Size::W, FP, VAL, 1)
        .ld_map_fd(R1, shared.meshed.as_raw_fd())
        .stack_ptr(R2, KEY as i32)
        .stack_ptr(R3, VAL as i32)
        .mov_imm(R4, 0)
        .call(helper::MAP_UPDATE_ELEM)
        .jump_imm(Cond::Eq, R8, 0, "accept")
        // Not delivered: count it in LOST[ringbuf_full] like every program.
        .store_imm(
            Size::W,
            FP,
            KEY,
            mesh_trace_common::LossReason::RingBufFull as i32,
        )
        .ld_map_fd(R1, shared.lost.as_raw_fd())
        .stack_ptr(R2, KEY as i32)
        .call(helper::MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, R0, 0, "accept")
        .mov_imm(R1, 1)
        .atomic_add(R0, 0, R1);
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> std::io::Result<OwnedFd> {
    // union bpf_attr, BPF_MAP_CREATE part up to map_flags.
    let mut attr = [0u32; 5];
    attr[0] = map_type;
    attr[1] = key_size;
    attr[2] = value_size;
    attr[3] = max_entries;
    // SAFETY: attr is a valid, zero-padded bpf_attr prefix.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
