//! Named network namespaces (`ip netns`), for the lab and the tests.
//!
//! A [`NetNs`] deletes its namespace when dropped. [`NetNs::enter`] runs a
//! closure on a thread that has joined the namespace, so sockets created
//! there live in it while the rest of the process stays where it was.
use std::{
    fs::File,
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{bail, Context as _};
use nix::sched::{setns, CloneFlags};

/// Runs a command and fails with its stderr when it fails.
pub fn cmd(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// Whether dropping this value deletes the namespace.
    owned: bool,
}

impl NetNs {
    /// Creates the namespace `name` with its loopback up.
    pub fn create(name: &str) -> anyhow::Result<NetNs> {
        cmd("ip", &["netns", "add", name])?;
        let ns = NetNs {
            name: name.into(),
            owned: true,
        };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace someone else created and will delete.
    pub fn existing(name: &str) -> NetNs {
        NetNs {
            name: name.into(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace.
    /// Creates the namespace `name` with its loopback up and, as
    /// istio-iptables does for outbound traffic, a nat OUTPUT rule that
    /// redirects TCP to `port` to the local `to` (the lab's churn and the
    /// tests' pod-like namespaces).
    pub fn redirecting(name: &str, port: u16, to: u16) -> anyhow::Result<NetNs> {
        let ns = NetNs::create(name)?;
        let (port, to) = (port.to_string(), to.to_string());
        let rule = [
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            &port,
            "-j",
            "REDIRECT",
            "--to-ports",
            &to,
        ];
        ns.exec("iptables", &rule)?;
        Ok(ns)
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        cmd("ip", &full)
    }

    /// Runs `f` on a new thread inside the namespace and returns its result.
    pub fn enter<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> anyhow::Result<R> {
        in_namespace(&self.path(), || Ok(f()))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(e) = cmd("ip", &["netns", "del", &self.name]) {
            tracing::warn!("{e:#}");
        }
    }
}

/// Runs `f` on a thread that has joined the network namespace at `path` (a
/// bind mount under /var/run/netns or /proc/PID/ns/net), so that sockets,
/// links and iterators it creates belong to that namespace; the calling
/// thread stays where it is. Needs CAP_SYS_ADMIN.
pub fn in_namespace<R: Send>(
    path: &std::path::Path,
    f: impl FnOnce() -> anyhow::Result<R> + Send,
) -> anyhow::Result<R> {
    let ns = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .context("entering the namespace (needs CAP_SYS_ADMIN)")?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", path.display()))?
    })
}

/// The namespace cookie of the socket `fd` (SO_NETNS_COOKIE, Linux 5.14+):
/// the value `bpf_get_netns_cookie` returns for sockets of that namespace.
pub fn netns_cookie(fd: &impl std::os::fd::AsRawFd) -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
