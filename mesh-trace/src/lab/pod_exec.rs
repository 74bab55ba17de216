//! Starting a process inside a pod: in the pod's network namespace, as the
//! pod's user, killed by the kernel if the lab's process dies.
use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::Command,
};

use anyhow::Context as _;

/// Makes `cmd` start in the network namespace at `netns_path` (and in the
/// cgroup v2 directory `cgroup`, if given) as `uid`/`gid` with no
/// supplementary groups, with SIGKILL as its parent-death signal. The
/// returned files must stay open until the command has been spawned.
pub fn in_pod(
    cmd: &mut Command,
    netns_path: &Path,
    cgroup: Option<&Path>,
    uid: u32,
    gid: u32,
) -> anyhow::Result<(File, Option<File>)> {
    let ns = File::open(netns_path).with_context(|| format!("opening {}", netns_path.display()))?;
    let fd = ns.as_raw_fd();
    let procs = cgroup
        .map(|dir| {
            let path = dir.join("cgroup.procs");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))
        })
        .transpose()?;
    let procs_fd = procs.as_ref().map(AsRawFd::as_raw_fd);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(libc::setns(fd, libc::CLONE_NEWNET))?;
            if let Some(procs) = procs_fd {
                // "0" moves the writer: this process, before it drops root.
                if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(gid, gid, gid))?;
            check(libc::setresuid(uid, uid, uid))?;
            // Set after the uid change, which clears it.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
            if libc::getppid() != parent {
                // The lab died before the signal was armed.
                libc::_exit(1);
            }
            Ok(())
        });
    }
    Ok((ns, procs))
}

/// Names the calling thread (and so what `comm` shows for it), as the lab's
/// processes do so that the tracer sees "envoy", "reviews-v2", ...
pub fn set_comm(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, buf.as_ptr());
    }
}
