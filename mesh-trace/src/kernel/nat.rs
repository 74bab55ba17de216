//! Observing iptables REDIRECT at the NAT step itself: one netfilter
//! program in each pod's network namespace, just after the nat table's DNAT
//! priority, on LOCAL_OUT (outbound REDIRECT to 15001) and PRE_ROUTING
//! (inbound REDIRECT to 15006). It runs for every packet, so it decides
//! from the packet's conntrack entry alone, with no helper call, whether
//! the packet can matter: only a connection's first packet (`IP_CT_NEW`)
//! goes on. For a TCP SYN of a connection not yet confirmed (the packet the
//! nat table's rules really saw; a resent SYN finds its entry confirmed),
//! the entry's original destination is compared with the packet's: a
//! change is a REDIRECT, written to the events ring buffer with a timestamp
//! (or counted as lost), and the namespace marked meshed in MESHED_NETNS at
//! once, so that the data path captures that very connection's first
//! request.
//!
//! The program is generated here (aya 0.14 cannot load netfilter
//! programs), with the namespace's cookie and the map descriptors as
//! immediates; the kernel struct offsets it needs (`sk_buff.data`,
//! `sk_buff._nfct`, `nf_conn.status`, the original tuple's destination)
//! come from the kernel's BTF.
use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::Arc,
};

use anyhow::Context as _;
use mesh_trace_common::{EventKind, RedirectEvent, HOOK_LOCAL_OUT, HOOK_PRE_ROUTING};

use super::{
    asm::{helper, Alu, Asm, Cond, Size, FP, R0, R1, R2, R3, R4, R6, R7, R8, R9},
    netfilter::{
        self, Insn, NFPROTO_IPV4, NF_INET_LOCAL_OUT, NF_INET_PRE_ROUTING, NF_IP_PRI_NAT_DST,
    },
};

// Stack layout of the generated program (offsets from the frame pointer).
const PKT: i16 = -96; // 40 bytes: IPv4 header without options + TCP header start
const KEY: i16 = -104; // 8 bytes of scratch: a map key, the conntrack status
const VAL: i16 = -112; // a map value
const ORIG: i16 = -136; // 24 bytes: the original tuple's destination
const EV: i16 = -48; // a RedirectEvent

/// `enum ip_conntrack_info` of a connection's first packet, in the low bits
/// of `sk_buff._nfct` (the rest is the `nf_conn` pointer).
const IP_CT_NEW: i32 = 2;
const NFCT_INFO_MASK: i32 = 7;
/// `IPS_CONFIRMED` in `nf_conn.status`: set once the first packet left the
/// stack; every later packet, a resent SYN too, finds it set.
const IPS_CONFIRMED: i32 = 1 << 3;

/// Maps the program writes to, shared by every namespace, and the kernel
/// struct offsets it reads.
pub struct Shared {
    pub events: OwnedFd,
    pub lost: OwnedFd,
    /// MESHED_NETNS, which the data path reads.
    pub meshed: OwnedFd,
    pub offsets: KernelOffsets,
    /// Benchmark floor: link programs that only accept.
    pub noop: bool,
}

/// Byte offsets in kernel structs, from BTF.
#[derive(Clone, Copy, Debug)]
pub struct KernelOffsets {
    /// `sk_buff.data`.
    pub skb_data: i16,
    /// `sk_buff._nfct`.
    pub skb_nfct: i16,
    /// `nf_conn.status`.
    pub ct_status: i32,
    /// `nf_conn.tuplehash[IP_CT_DIR_ORIGINAL].tuple.dst.u3` (the address).
    pub ct_orig_dst_addr: i32,
    /// `nf_conn.tuplehash[IP_CT_DIR_ORIGINAL].tuple.dst.u` (the port).
    pub ct_orig_dst_port: i32,
}

impl KernelOffsets {
    pub fn from_btf(btf: &super::btf::KernelBtf) -> anyhow::Result<KernelOffsets> {
        let small = |v: u32, what: &str| i16::try_from(v).with_context(|| format!("{what} offset"));
        let addr = btf.member_path_offset("nf_conn", "tuplehash.tuple.dst.u3")?;
        let port = btf.member_path_offset("nf_conn", "tuplehash.tuple.dst.u")?;
        if port < addr || port - addr > 20 {
            anyhow::bail!("nf_conntrack_tuple's destination has an unexpected layout");
        }
        Ok(KernelOffsets {
            skb_data: small(btf.member_offset("sk_buff", "data")?, "sk_buff.data")?,
            skb_nfct: small(btf.member_offset("sk_buff", "_nfct")?, "sk_buff._nfct")?,
            ct_status: btf.member_offset("nf_conn", "status")? as i32,
            ct_orig_dst_addr: addr as i32,
            ct_orig_dst_port: port as i32,
        })
    }
}

/// The programs and links of one namespace; dropping it detaches them.
pub struct NatProbe {
    _links: Vec<OwnedFd>,
    _progs: Vec<OwnedFd>,
}

impl NatProbe {
    /// Loads the programs and links them in the network namespace at
    /// `netns_path` (e.g. /var/run/netns/NAME) whose cookie is `netns_cookie`.
    pub fn attach(
        shared: &Shared,
        netns_path: &std::path::Path,
        netns_cookie: u64,
    ) -> anyhow::Result<NatProbe> {
        let mut progs = Vec::new();
        let mut plan = Vec::new();
        for (hooknum, hook) in [
            (NF_INET_LOCAL_OUT, HOOK_LOCAL_OUT),
            (NF_INET_PRE_ROUTING, HOOK_PRE_ROUTING),
        ] {
            let insns = program(shared, hook, netns_cookie);
            let prog = netfilter::load_program(&insns, NAT_PROGRAM)
                .with_context(|| format!("loading {NAT_PROGRAM}"))?;
            plan.push((prog.as_raw_fd(), hooknum));
            progs.push(prog);
        }
        // Links are created in the namespace of the calling thread.
        let links = crate::netns::in_namespace(netns_path, || {
            plan.iter()
                .map(|&(fd, hooknum)| {
                    // SAFETY: fd belongs to a program in `progs`, alive here.
                    let prog = unsafe { BorrowedFd::borrow_raw(fd) };
                    attach_after_nat(&prog, hooknum)
                })
                .collect::<anyhow::Result<Vec<OwnedFd>>>()
        })?;
        Ok(NatProbe {
            _links: links,
            _progs: progs,
        })
    }
}

/// NAT observers by network namespace name, all writing to the maps of
/// one tracer. Whoever scans for namespaces owns it: the agent keeps it on
/// a thread of its own, since each new namespace costs two program loads
/// and a `setns`.
pub struct NatWatch {
    shared: Arc<Shared>,
    /// By namespace name: its observer and its cookie.
    probes: HashMap<String, (NatProbe, u64)>,
}

impl NatWatch {
    pub fn new(shared: Arc<Shared>) -> NatWatch {
        NatWatch {
            shared,
            probes: HashMap::new(),
        }
    }

    /// Observes the nat table of the named network namespace (under
    /// `netns_dir`), if not already done; true if it is new.
    pub fn watch(&mut self, netns_dir: &Path, name: &str) -> anyhow::Result<bool> {
        if self.probes.contains_key(name) {
            return Ok(false);
        }
        let path = netns_dir.join(name);
        let cookie = crate::flows::metadata::netns_cookie_at(&path)?;
        let probe = NatProbe::attach(&self.shared, &path, cookie)
            .with_context(|| format!("observing NAT in network namespace {name}"))?;
        self.probes.insert(name.to_string(), (probe, cookie));
        Ok(true)
    }

    /// Stops observing namespaces not in `alive` (their programs and links
    /// are released); returns how many remain.
    pub fn retain(&mut self, alive: &HashSet<String>) -> usize {
        self.probes.retain(|name, _| alive.contains(name));
        self.probes.len()
    }

    /// Cookies of the namespaces observed now.
    pub fn cookies(&self) -> impl Iterator<Item = u64> + '_ {
        self.probes.values().map(|(_, cookie)| *cookie)
    }
}

/// The program's name, as `bpftool prog` and the benchmarks show it.
pub const NAT_PROGRAM: &str = "mt_nat";

/// How far after the nat table's priority the program may sit: the next
/// hook (filter at 0) is further.
const NAT_NEIGHBOURS: i32 = 8;

/// Links `prog` at the first free priority after the nat table's, moving
/// away from it when another agent (a rolling update's other pod) holds a
/// place: netfilter takes one BPF program per priority.
fn attach_after_nat(prog: &BorrowedFd<'_>, hooknum: u32) -> anyhow::Result<OwnedFd> {
    for k in 1..=NAT_NEIGHBOURS {
        let priority = NF_IP_PRI_NAT_DST + k;
        match netfilter::attach(prog, NFPROTO_IPV4, hooknum, priority) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
            other => {
                return other
                    .with_context(|| format!("BPF_LINK_CREATE (netfilter, priority {priority})"))
            }
        }
    }
    anyhow::bail!(
        "BPF_LINK_CREATE (netfilter): all {NAT_NEIGHBOURS} priorities after the nat table are taken by other programs"
    )
}

/// Generates the program for one hook.
fn program(shared: &Shared, hook: u16, netns_cookie: u64) -> Vec<Insn> {
    if shared.noop {
        return netfilter::ACCEPT_ALL.to_vec();
    }
    let off = shared.offsets;
    let mut a = Asm::default();
    // ctx is struct bpf_nf_ctx { state; skb; }. Every packet that is not a
    // connection's first leaves after two loads and a compare.
    a.mov(R6, 1)
        .load(Size::DW, R7, R6, 8)
        .load(Size::DW, R8, R7, off.skb_nfct)
        .mov(R1, R8)
        .alu_imm(Alu::And, R1, NFCT_INFO_MASK)
        .jump_imm(Cond::Ne, R1, IP_CT_NEW, "accept")
        .alu_imm(Alu::And, R8, !NFCT_INFO_MASK)
        .jump_imm(Cond::Eq, R8, 0, "accept")
        // Copy the IPv4 and TCP headers to the stack.
        .load(Size::DW, R3, R7, off.skb_data)
        .stack_ptr(R1, PKT as i32)
        .mov_imm(R2, 40)
        .call(helper::PROBE_READ_KERNEL)
        .jump_imm(Cond::Ne, R0, 0, "accept")
        // IPv4 without options, TCP, SYN without ACK.
        .load(Size::B, R1, FP, PKT)
        .jump_imm(Cond::Ne, R1, 0x45, "accept")
        .load(Size::B, R1, FP, PKT + 9)
        .jump_imm(Cond::Ne, R1, 6, "accept")
        .load(Size::B, R1, FP, PKT + 33)
        .alu_imm(Alu::And, R1, 0x12)
        .jump_imm(Cond::Ne, R1, 0x02, "accept")
        // The entry not confirmed yet: this is the packet the nat rules saw.
        .store_imm(Size::DW, FP, KEY, 0)
        .stack_ptr(R1, KEY as i32)
        .mov_imm(R2, 4)
        .mov(R3, R8)
        .alu_imm(Alu::Add, R3, off.ct_status)
        .call(helper::PROBE_READ_KERNEL)
        .jump_imm(Cond::Ne, R0, 0, "accept")
        .load(Size::W, R1, FP, KEY)
        .alu_imm(Alu::And, R1, IPS_CONFIRMED)
        .jump_imm(Cond::Ne, R1, 0, "accept")
        // Where the connection was going before NAT: its original tuple.
        .stack_ptr(R1, ORIG as i32)
        .mov_imm(R2, off.ct_orig_dst_port - off.ct_orig_dst_addr + 2)
        .mov(R3, R8)
        .alu_imm(Alu::Add, R3, off.ct_orig_dst_addr)
        .call(helper::PROBE_READ_KERNEL)
        .jump_imm(Cond::Ne, R0, 0, "accept");
    let orig_port = ORIG + (off.ct_orig_dst_port - off.ct_orig_dst_addr) as i16;
    // Unchanged address and port: no REDIRECT.
    a.load(Size::W, R9, FP, ORIG)
        .load(Size::H, R8, FP, orig_port)
        .load(Size::W, R1, FP, PKT + 16)
        .jump_reg(Cond::Ne, R1, R9, "changed")
        .load(Size::H, R1, FP, PKT + 22)
        .jump_reg(Cond::Eq, R1, R8, "accept")
        .label("changed");
    report(&mut a, shared, hook, netns_cookie);
    // Netfilter programs return a verdict: always NF_ACCEPT, never disturb.
    a.label("accept").mov_imm(R0, 1).exit();
    a.finish()
}

/// Writes a RedirectEvent (original destination in R9 and R8) and marks
/// the namespace meshed.
fn report(a: &mut Asm, shared: &Shared, hook: u16, netns_cookie: u64) {
    a.store(Size::W, FP, EV + 28, R9)
        .store(Size::H, FP, EV + 38, R8)
        .store_imm(Size::W, FP, EV, EventKind::Redirect as i32)
        .call(helper::GET_SMP_PROCESSOR_ID)
        .store(Size::W, FP, EV + 4, R0)
        .call(helper::KTIME_GET_NS)
        .store(Size::DW, FP, EV + 8, R0)
        .ld_imm64(R1, netns_cookie)
        .store(Size::DW, FP, EV + 16, R1)
        .load(Size::W, R1, FP, PKT + 12)
        .store(Size::W, FP, EV + 24, R1)
        .load(Size::W, R1, FP, PKT + 16)
        .store(Size::W, FP, EV + 32, R1)
        .load(Size::H, R1, FP, PKT + 20)
        .store(Size::H, FP, EV + 36, R1)
        .load(Size::H, R1, FP, PKT + 22)
        .store(Size::H, FP, EV + 40, R1)
        .store_imm(Size::H, FP, EV + 42, i32::from(hook))
        .store_imm(Size::W, FP, EV + 44, 0)
        .ld_map_fd(R1, shared.events.as_raw_fd())
        .stack_ptr(R2, EV as i32)
        .mov_imm(R3, size_of::<RedirectEvent>() as i32)
        .mov_imm(R4, 0)
        .call(helper::RINGBUF_OUTPUT)
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
        .jump_imm(Cond::Eq, R0, 0, "marked");
    // MESHED_NETNS full: this namespace's data path is not captured.
    count_loss(a, shared, mesh_trace_common::LossReason::MapFull, "marked");
    a.label("marked").jump_imm(Cond::Eq, R8, 0, "accept");
    // Not delivered: count it in LOST[ringbuf_full] like every program.
    count_loss(
        a,
        shared,
        mesh_trace_common::LossReason::RingBufFull,
        "accept",
    );
}

/// LOST[reason] += 1, then on to `done` (also when the lookup fails).
fn count_loss(
    a: &mut Asm,
    shared: &Shared,
    reason: mesh_trace_common::LossReason,
    done: &'static str,
) {
    a.store_imm(Size::W, FP, KEY, reason as i32)
        .ld_map_fd(R1, shared.lost.as_raw_fd())
        .stack_ptr(R2, KEY as i32)
        .call(helper::MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, R0, 0, done)
        .mov_imm(R1, 1)
        .atomic_add(R0, 0, R1)
        .goto(done);
}
