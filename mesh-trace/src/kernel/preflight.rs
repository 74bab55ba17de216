//! The preflight report: kernel, BTF, pseudo-filesystems, cgroup layout,
//! capabilities and every hook type tried for real (`mesh-trace check`).
use serde::Serialize;

use super::{
    caps::{Cap, Caps},
    features::{Features, Need},
    sysfs::{self, MountState, Mounts, PseudoFs},
};

#[derive(Debug, Serialize)]
pub struct CapReport {
    pub name: &'static str,
    pub present: bool,
    pub used_for: &'static str,
    /// What stops working without it.
    pub without: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub btf: bool,
    pub tracefs: MountState,
    pub bpffs: MountState,
    pub cgroup2: Option<String>,
    pub cgroup_layout: &'static str,
    /// The first struct member the programs read (TCP sequence numbers and
    /// RTT, segment counts, socket addresses) that the kernel's BTF lacks;
    /// None when all are there.
    pub btf_field_missing: Option<String>,
    pub capabilities: Vec<CapReport>,
    pub features: Features,
    /// Empty when the tracer can run; otherwise what stops it.
    pub blockers: Vec<String>,
}

impl Report {
    /// Gathers the report. Mounts made for it live as long as `mounts`.
    pub fn gather(mounts: &mut Mounts, allow_mount: bool) -> Report {
        let tracefs = mounts.ensure(PseudoFs::Tracefs, allow_mount);
        let bpffs = mounts.ensure(PseudoFs::Bpffs, allow_mount);
        let cgroup2 = sysfs::cgroup2_root();
        let caps = Caps::current();
        let features = Features::detect(cgroup2.as_deref());

        let mut blockers: Vec<String> = caps
            .missing_for_tracing()
            .iter()
            .map(|c| format!("missing capability {}", c.name()))
            .collect();
        if cgroup2.is_none() {
            blockers.push("no cgroup v2 hierarchy mounted".into());
        }
        for r in features.missing_required() {
            blockers.push(format!("hook {} unavailable: {}", r.hook.name(), r.detail));
        }
        let btf_field_missing = super::tracer::kernel_layout_known()
            .err()
            .map(|e| format!("{e:#}"));
        if let Some(why) = &btf_field_missing {
            blockers.push(format!(
                "kernel BTF lacks a field the programs read ({why}): the tracer cannot load"
            ));
        }
        let cgroup_layout = match cgroup2.as_deref().and_then(|p| p.to_str()) {
            Some("/sys/fs/cgroup") => "unified (cgroup v2 only)",
            Some("/sys/fs/cgroup/unified") => "hybrid (v1 controllers, v2 at unified/)",
            Some(_) => "cgroup v2 at a custom path",
            None => "none",
        };
        Report {
            kernel: sysfs::kernel_release(),
            btf: sysfs::btf_available(),
            tracefs,
            bpffs,
            cgroup2: cgroup2.map(|p| p.display().to_string()),
            cgroup_layout,
            btf_field_missing,
            capabilities: Cap::ALL
                .into_iter()
                .map(|c| CapReport {
                    name: c.name(),
                    present: caps.has(c),
                    used_for: c.purpose(),
                    without: c.without(),
                })
                .collect(),
            features,
            blockers,
        }
    }

    pub fn render_table(&self) -> String {
        use std::fmt::Write;
        let yes = |b: bool| if b { "yes" } else { "no" };
        let mount = |m: &MountState| match m {
            MountState::Present => "mounted".to_string(),
            MountState::MountedByUs => "mounted by check (unmounted again on exit)".to_string(),
            MountState::Missing(why) => format!("MISSING: {why}"),
        };
        let mut o = String::new();
        let _ = writeln!(o, "SYSTEM");
        let _ = writeln!(o, "  {:<14} {}", "kernel", self.kernel);
        let _ = writeln!(
            o,
            "  {:<14} {}",
            "BTF",
            if self.btf {
                sysfs::VMLINUX_BTF
            } else {
                "MISSING"
            }
        );
        let _ = writeln!(
            o,
            "  {:<14} {}",
            "BTF fields",
            match &self.btf_field_missing {
                None => "all found (tcp_sock, sk_buff, sock_common, net)".to_string(),
                Some(why) => format!("MISSING: {why}"),
            }
        );
        let _ = writeln!(o, "  {:<14} {}", "tracefs", mount(&self.tracefs));
        let _ = writeln!(o, "  {:<14} {}", "bpffs", mount(&self.bpffs));
        let _ = writeln!(
            o,
            "  {:<14} {} [{}]",
            "cgroup v2",
            self.cgroup2.as_deref().unwrap_or("MISSING"),
            self.cgroup_layout
        );
        let _ = writeln!(o, "\nCAPABILITIES");
        for c in &self.capabilities {
            let _ = writeln!(o, "  {:<17} {:<4} {}", c.name, yes(c.present), c.used_for);
            if !c.present {
                let _ = writeln!(o, "  {:<22} without it: {}", "", c.without);
            }
        }
        let _ = writeln!(
            o,
            "\n{:<17} {:<10} {:<9} {:<38} DETAIL",
            "HOOK", "AVAILABLE", "NEED", "USED FOR"
        );
        for h in &self.features.hooks {
            let need = match h.need {
                Need::Required => "required",
                Need::Optional => "optional",
            };
            let _ = writeln!(
                o,
                "{:<17} {:<10} {:<9} {:<38} {}",
                h.hook.name(),
                yes(h.available),
                need,
                h.used_for,
                h.detail
            );
            if !h.available {
                let _ = writeln!(o, "{:<17} without it: {}", "", h.without);
            }
        }
        let _ = writeln!(o);
        if self.blockers.is_empty() {
            let _ = writeln!(o, "RESULT: ok, mesh-trace can run on this node");
        } else {
            let _ = writeln!(o, "RESULT: mesh-trace cannot run here:");
            for b in &self.blockers {
                let _ = writeln!(o, "  - {b}");
            }
        }
        o
    }
}
