//! What this kernel really allows: each hook type is tested by loading and
//! attaching a tiny program (the feature-probes object), never by reading
//! the kernel config. `mesh-trace check` prints the result and the agent uses
//! it to pick its probes.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    programs::{
        uprobe::UProbeScope, BtfTracePoint, CgroupAttachMode, CgroupSockAddr, CgroupSockopt,
        FEntry, KProbe, RawTracePoint, SockOps, TracePoint, UProbe,
    },
    Btf, Ebpf,
};
use serde::Serialize;

use super::{netfilter, objects};

/// Hook types mesh-trace may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    Kprobe,
    Fentry,
    Tracepoint,
    TpBtf,
    RawTracepoint,
    SockOps,
    CgroupSockAddr,
    CgroupSockopt,
    NetfilterLink,
    Uprobe,
}

impl Hook {
    pub const ALL: [Hook; 10] = [
        Hook::Kprobe,
        Hook::Fentry,
        Hook::Tracepoint,
        Hook::TpBtf,
        Hook::RawTracepoint,
        Hook::SockOps,
        Hook::CgroupSockAddr,
        Hook::CgroupSockopt,
        Hook::NetfilterLink,
        Hook::Uprobe,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hook::Kprobe => "kprobe",
            Hook::Fentry => "fentry",
            Hook::Tracepoint => "tracepoint",
            Hook::TpBtf => "tp_btf",
            Hook::RawTracepoint => "raw_tracepoint",
            Hook::SockOps => "sock_ops",
            Hook::CgroupSockAddr => "cgroup_sock_addr",
            Hook::CgroupSockopt => "cgroup_sockopt",
            Hook::NetfilterLink => "netfilter_link",
            Hook::Uprobe => "uprobe",
        }
    }

    /// What mesh-trace uses the hook for, and whether it can do without it.
    pub fn usage(self) -> (&'static str, Need) {
        match self {
            Hook::CgroupSockAddr => ("original destination at connect()", Need::Required),
            Hook::SockOps => ("established/closed sockets, 4-tuples", Need::Required),
            Hook::Kprobe => ("not needed (tracepoint path used)", Need::Optional),
            Hook::Fentry => ("not needed (tp_btf path used)", Need::Optional),
            Hook::Tracepoint => ("not needed (tp_btf path used)", Need::Optional),
            Hook::TpBtf => ("socket I/O: every span's data, process", Need::Optional),
            Hook::RawTracepoint => ("flushing per-CPU event batches", Need::Optional),
            Hook::CgroupSockopt => ("not needed (the NAT step is observed)", Need::Optional),
            Hook::NetfilterLink => ("counting NAT REDIRECTs", Need::Optional),
            Hook::Uprobe => ("TLS plaintext behind mutual TLS", Need::Optional),
        }
    }
}

impl Hook {
    /// What stops working on a kernel without the hook.
    pub fn without(self) -> &'static str {
        match self {
            Hook::CgroupSockAddr | Hook::SockOps => "nothing is traced: the agent does not start",
            Hook::TpBtf => {
                "no spans, no request metrics, no process of accepted sockets (the \
                 sock_send_length/sock_recv_length tracepoints, Linux 6.3+), and no retransmit \
                 or reset counts: only legs and connection counts"
            }
            Hook::RawTracepoint => {
                "data events go to the ring buffer one by one (no batching): more CPU per request"
            }
            Hook::NetfilterLink => {
                "REDIRECTs are counted from the sidecars' accepted sockets instead of at the NAT \
                 step"
            }
            Hook::Uprobe => {
                "requests behind mutual TLS are matched without their plaintext: requests a \
                 sidecar held together are counted ambiguous, and a client's node cannot tell \
                 TLS session tickets from responses"
            }
            Hook::Kprobe | Hook::Fentry | Hook::Tracepoint | Hook::CgroupSockopt => {
                "nothing: not used"
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Need {
    /// The tracer cannot run without it.
    Required,
    /// Used when present; its absence reduces what is observed.
    Optional,
}

#[derive(Clone, Debug, Serialize)]
pub struct HookReport {
    pub hook: Hook,
    pub available: bool,
    pub need: Need,
    pub used_for: &'static str,
    /// What stops working without it.
    pub without: &'static str,
    /// Why it is unavailable (the kernel's error), or where it was attached.
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Features {
    pub hooks: Vec<HookReport>,
}

impl Features {
    pub fn available(&self, hook: Hook) -> bool {
        self.hooks.iter().any(|r| r.hook == hook && r.available)
    }

    /// Required hooks that are missing.
    pub fn missing_required(&self) -> Vec<&HookReport> {
        self.hooks
            .iter()
            .filter(|r| r.need == Need::Required && !r.available)
            .collect()
    }

    /// Probes every hook type. `cgroup_root` is the cgroup v2 root (cgroup
    /// hooks are tested on a temporary child cgroup, never on live ones).
    pub fn detect(cgroup_root: Option<&Path>) -> Features {
        let loaded = objects::require(objects::FEATURE_PROBES)
            .map_err(anyhow::Error::from)
            .and_then(|obj| Ebpf::load(obj).context("loading the feature-probes object"));
        let btf = Btf::from_sys_fs().context("reading /sys/kernel/btf/vmlinux");
        let scratch = cgroup_root.map(ScratchCgroup::create);
        let hooks = Hook::ALL
            .into_iter()
            .map(|hook| {
                let result = match (&loaded, hook) {
                    (_, Hook::NetfilterLink) => probe_netfilter(),
                    (Err(e), _) => Err(anyhow::anyhow!("{e:#}")),
                    (Ok(_), _) => {
                        let mut ebpf =
                            Ebpf::load(objects::FEATURE_PROBES).expect("loaded once already");
                        probe(&mut ebpf, hook, btf.as_ref().ok(), scratch.as_ref())
                    }
                };
                let (used_for, need) = hook.usage();
                let (available, detail) = match result {
                    Ok(detail) => (true, detail),
                    Err(e) => (false, format!("{:#}", super::summarize(e))),
                };
                HookReport {
                    hook,
                    available,
                    need,
                    used_for,
                    without: hook.without(),
                    detail,
                }
            })
            .collect();
        Features { hooks }
    }
}

/// Loads and attaches the hook's tiny program; dropping `ebpf` detaches it.
fn probe(
    ebpf: &mut Ebpf,
    hook: Hook,
    btf: Option<&Btf>,
    cgroup: Option<&anyhow::Result<ScratchCgroup>>,
) -> anyhow::Result<String> {
    let btf = || btf.context("kernel BTF is not available");
    let cgroup = || -> anyhow::Result<&fs::File> {
        match cgroup {
            Some(Ok(c)) => Ok(&c.file),
            Some(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            None => anyhow::bail!("no cgroup v2 hierarchy is mounted"),
        }
    };
    let name = format!("feature_{}", hook.name());
    let prog = ebpf
        .program_mut(&name)
        .with_context(|| format!("program {name} missing from the object"))?;
    match hook {
        Hook::Kprobe => {
            let p: &mut KProbe = prog.try_into()?;
            p.load().context("load")?;
            p.attach("tcp_v4_connect", 0)
                .context("attach to tcp_v4_connect")?;
            Ok("attached to tcp_v4_connect".into())
        }
        Hook::Fentry => {
            let p: &mut FEntry = prog.try_into()?;
            p.load("tcp_v4_connect", btf()?).context("load")?;
            p.attach().context("attach")?;
            Ok("attached to tcp_v4_connect".into())
        }
        Hook::Tracepoint => {
            let p: &mut TracePoint = prog.try_into()?;
            p.load().context("load")?;
            p.attach("sock", "inet_sock_set_state")
                .context("attach to sock:inet_sock_set_state")?;
            Ok("attached to sock:inet_sock_set_state".into())
        }
        Hook::TpBtf => {
            // The tracepoints every span depends on (Linux 6.3+), not just
            // any: the receive side is checked in the kernel's BTF, the
            // send side loaded and attached.
            super::btf::KernelBtf::from_sys_fs()?
                .tracepoint_args("sock_recv_length")
                .context("sock_recv_length")?;
            let p: &mut BtfTracePoint = prog.try_into()?;
            p.load("sock_send_length", btf()?)
                .context("load on sock_send_length")?;
            p.attach().context("attach")?;
            Ok("attached to sock_send_length; sock_recv_length present".into())
        }
        Hook::RawTracepoint => {
            let p: &mut RawTracePoint = prog.try_into()?;
            p.load().context("load")?;
            p.attach("inet_sock_set_state").context("attach")?;
            Ok("attached to inet_sock_set_state".into())
        }
        Hook::SockOps => {
            let p: &mut SockOps = prog.try_into()?;
            p.load().context("load")?;
            p.attach(cgroup()?, CgroupAttachMode::Single)
                .context("attach to a cgroup")?;
            Ok("attached to a scratch cgroup".into())
        }
        Hook::CgroupSockAddr => {
            let p: &mut CgroupSockAddr = prog.try_into()?;
            p.load().context("load")?;
            p.attach(cgroup()?, CgroupAttachMode::Single)
                .context("attach to a cgroup")?;
            Ok("connect4 attached to a scratch cgroup".into())
        }
        Hook::CgroupSockopt => {
            let p: &mut CgroupSockopt = prog.try_into()?;
            p.load().context("load")?;
            p.attach(cgroup()?, CgroupAttachMode::Single)
                .context("attach to a cgroup")?;
            Ok("getsockopt attached to a scratch cgroup".into())
        }
        Hook::Uprobe => {
            // Any function of a file will do: this program's own `main`.
            let p: &mut UProbe = prog.try_into()?;
            p.load().context("load")?;
            p.attach("main", "/proc/self/exe", UProbeScope::CallingProcess)
                .context("attach to this program's main")?;
            Ok("attached to this program's main".into())
        }
        Hook::NetfilterLink => unreachable!("probed without aya"),
    }
}

fn probe_netfilter() -> anyhow::Result<String> {
    let prog = netfilter::load_program(&netfilter::ACCEPT_ALL, "feature_nf")
        .context("BPF_PROG_LOAD of a netfilter program")?;
    let _link = netfilter::attach(
        &prog,
        netfilter::NFPROTO_IPV4,
        netfilter::NF_INET_LOCAL_OUT,
        netfilter::NF_IP_PRI_NAT_DST - 1,
    )
    .context("BPF_LINK_CREATE on ipv4 LOCAL_OUT")?;
    Ok("linked on ipv4 LOCAL_OUT before NAT".into())
}

/// An empty child cgroup that cgroup programs are test-attached to, removed on drop.
struct ScratchCgroup {
    path: PathBuf,
    file: fs::File,
}

impl ScratchCgroup {
    fn create(root: &Path) -> anyhow::Result<ScratchCgroup> {
        let path = root.join(format!("mesh-trace-check-{}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let file = fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
        Ok(ScratchCgroup { path, file })
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.path);
    }
}
