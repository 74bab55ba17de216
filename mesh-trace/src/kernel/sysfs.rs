//! The kernel's pseudo file systems mesh-trace relies on: tracefs (tracepoint
//! ids), bpffs, cgroup v2 (where cgroup programs attach) and BTF.
use std::{
    fs,
    path::{Path, PathBuf},
};

use nix::mount::{mount, umount, MsFlags};

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const BPFFS: &str = "/sys/fs/bpf";
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// A pseudo file system mesh-trace may mount when it is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PseudoFs {
    Tracefs,
    Bpffs,
}

impl PseudoFs {
    pub fn fstype(self) -> &'static str {
        match self {
            PseudoFs::Tracefs => "tracefs",
            PseudoFs::Bpffs => "bpf",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            PseudoFs::Tracefs => TRACEFS,
            PseudoFs::Bpffs => BPFFS,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum MountState {
    /// Mounted before mesh-trace started.
    Present,
    /// mesh-trace mounted it; the [`Mounts`] guard unmounts it again.
    MountedByUs,
    /// Not mounted and not mounted by us (not allowed, or the mount failed).
    Missing(String),
}

/// Mounts that mesh-trace created; dropping it unmounts them, so a stopped
/// agent leaves the node as it found it.
#[derive(Debug, Default)]
pub struct Mounts {
    created: Vec<PathBuf>,
}

impl Mounts {
    /// Makes sure `fs` is mounted at its usual place, mounting it when `allow`.
    pub fn ensure(&mut self, fs: PseudoFs, allow: bool) -> MountState {
        if is_mounted(fs.path(), fs.fstype()) {
            return MountState::Present;
        }
        if !allow {
            return MountState::Missing(format!("{} is not mounted at {}", fs.fstype(), fs.path()));
        }
        match mount(
            Some(fs.fstype()),
            fs.path(),
            Some(fs.fstype()),
            MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) => {
                self.created.push(fs.path().into());
                MountState::MountedByUs
            }
            Err(e) => MountState::Missing(format!(
                "mount -t {} {} {}: {e}",
                fs.fstype(),
                fs.fstype(),
                fs.path()
            )),
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for path in self.created.drain(..).rev() {
            if let Err(e) = umount(&path) {
                tracing::warn!("could not unmount {}: {e}", path.display());
            }
        }
    }
}

/// Mount points and types from /proc/self/mounts.
fn mounts() -> Vec<(String, String)> {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _dev = f.next()?;
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

pub fn is_mounted(path: &str, fstype: &str) -> bool {
    mounts().iter().any(|(p, t)| p == path && t == fstype)
}

/// The cgroup v2 hierarchy: `/sys/fs/cgroup` on pure v2 hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_root() -> Option<PathBuf> {
    let all = mounts();
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|want| all.iter().any(|(p, t)| p == want && t == "cgroup2"))
        .map(PathBuf::from)
        .or_else(|| {
            all.into_iter()
                .find(|(_, t)| t == "cgroup2")
                .map(|(p, _)| p.into())
        })
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn btf_available() -> bool {
    Path::new(VMLINUX_BTF).exists()
}
