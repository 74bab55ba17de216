//! Effective capabilities of this process, read from /proc/self/status.
use std::fs;

/// Capabilities mesh-trace cares about, with their bit numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Cap {
    NetAdmin = 12,
    SysAdmin = 21,
    SysResource = 24,
    Perfmon = 38,
    Bpf = 39,
}

impl Cap {
    pub const ALL: [Cap; 5] = [
        Cap::Bpf,
        Cap::Perfmon,
        Cap::NetAdmin,
        Cap::SysResource,
        Cap::SysAdmin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cap::NetAdmin => "CAP_NET_ADMIN",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::SysResource => "CAP_SYS_RESOURCE",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }

    /// What mesh-trace needs it for.
    pub fn purpose(self) -> &'static str {
        match self {
            Cap::Bpf => "load programs and create maps",
            Cap::Perfmon => "attach tracepoints and read kernel memory",
            Cap::NetAdmin => "attach cgroup and netfilter programs",
            Cap::SysResource => "raise RLIMIT_MEMLOCK on kernels before 5.11",
            Cap::SysAdmin => "mount bpffs/tracefs and enter network namespaces",
        }
    }

    /// What stops working without it.
    pub fn without(self) -> &'static str {
        match self {
            Cap::Bpf => "no program loads, so nothing is traced (unless CAP_SYS_ADMIN)",
            Cap::Perfmon => {
                "the socket tracepoints cannot attach: no spans, no legs (unless CAP_SYS_ADMIN)"
            }
            Cap::NetAdmin => {
                "the cgroup and netfilter programs cannot attach: no connections are seen"
            }
            Cap::SysResource => {
                "before Linux 5.11, maps count against RLIMIT_MEMLOCK and may fail to load; \
                 nothing on later kernels"
            }
            Cap::SysAdmin => {
                "no NAT step observed in pod namespaces (REDIRECTs counted from accepted \
                 sockets, without original destinations), connections opened before the \
                 agent not adopted, bpffs and tracefs not mounted"
            }
        }
    }
}

/// The effective capability set.
#[derive(Clone, Copy, Debug)]
pub struct Caps(u64);

impl Caps {
    pub fn current() -> Caps {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        Caps(parse_cap_eff(&status).unwrap_or(0))
    }

    pub fn has(self, cap: Cap) -> bool {
        self.0 & (1u64 << cap as u32) != 0
    }

    /// Capabilities the tracer cannot run without. CAP_SYS_ADMIN stands in
    /// for CAP_BPF and CAP_PERFMON, as the kernel allows.
    pub fn missing_for_tracing(self) -> Vec<Cap> {
        let admin = self.has(Cap::SysAdmin);
        [Cap::Bpf, Cap::Perfmon, Cap::NetAdmin]
            .into_iter()
            .filter(|&c| !(self.has(c) || (admin && c != Cap::NetAdmin)))
            .collect()
    }
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let s = "Name:\tx\nCapPrm:\t0\nCapEff:\t000001ffffffffff\n";
        let caps = Caps(parse_cap_eff(s).unwrap());
        assert!(caps.has(Cap::Bpf) && caps.has(Cap::NetAdmin));
        assert!(caps.missing_for_tracing().is_empty());
    }

    #[test]
    fn says_what_stops_working_without_each() {
        let texts: std::collections::HashSet<&str> = Cap::ALL.map(Cap::without).into();
        assert_eq!(texts.len(), Cap::ALL.len());
        assert!(Cap::SysAdmin.without().contains("NAT"));
    }

    #[test]
    fn names_what_is_missing() {
        // Only CAP_NET_ADMIN.
        let caps = Caps(1 << 12);
        assert_eq!(caps.missing_for_tracing(), vec![Cap::Bpf, Cap::Perfmon]);
        assert_eq!(Caps(0).missing_for_tracing().len(), 3);
    }
}
