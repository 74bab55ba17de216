//! A pod-like network namespace whose nat table redirects outbound port
//! 9080 to 15001, as istio-iptables does, for tests without the lab.
use mesh_trace::netns::NetNs;

/// Creates namespace `name` (under /var/run/netns, removed on drop) with
/// loopback up and the REDIRECT of 9080 to 15001 in its nat OUTPUT chain.
pub fn redirecting_namespace(name: &str) -> NetNs {
    let ns = NetNs::create(name).unwrap();
    ns.exec("ip", &["link", "set", "lo", "up"]).unwrap();
    let rule = [
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--dport",
        "9080",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ];
    ns.exec("iptables", &rule).unwrap();
    ns
}
