//! A pod-like network namespace whose nat table redirects outbound port
//! 9080 to 15001, as istio-iptables does, for tests without the lab.
use mesh_trace::netns::NetNs;

/// Creates namespace `name` (under /var/run/netns, removed on drop) with
/// loopback up and the REDIRECT of 9080 to 15001 in its nat OUTPUT chain.
pub fn redirecting_namespace(name: &str) -> NetNs {
    NetNs::redirecting(name, 9080, 15001).unwrap()
}
