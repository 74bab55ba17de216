//! What the agent keeps in the kernel is bounded and cleaned: a network
//! namespace marked meshed (by a REDIRECT seen in it) leaves MESHED_NETNS
//! when it is gone, so pod churn never fills the map, and its NAT observer
//! is released. Needs root.
mod common;
mod redirecting;

use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
    time::Duration,
};

use common::{wait_for, Traced};
use redirecting::redirecting_namespace;

fn meshed(traced: &Traced) -> i64 {
    traced.state.metrics.meshed_netns.get()
}

fn nat_watched(traced: &Traced) -> i64 {
    traced.state.metrics.nat_watched_netns.get()
}

#[test]
fn a_namespace_that_is_gone_leaves_the_meshed_set() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "bounds tests load eBPF programs and create network namespaces: run them as root"
    );
    let traced = Traced::start_without_metadata();
    let before = meshed(&traced);
    let watched_before = nat_watched(&traced);
    // A pod-like namespace whose nat table redirects port 9080 to a local
    // listener on 15001, as istio-iptables does for outbound traffic.
    let ns = redirecting_namespace(&format!("mt-b-{}", std::process::id()));
    let listener = ns
        .enter(|| TcpListener::bind("127.0.0.1:15001").unwrap())
        .unwrap();
    // The agent finds the namespace within a scan (1 s); until it does, a
    // connection's REDIRECT is not seen, so connect until it is.
    wait_for(
        "the REDIRECT to mark the namespace",
        Duration::from_secs(10),
        || {
            let _client = ns
                .enter(|| TcpStream::connect("127.0.0.1:9080").unwrap())
                .unwrap();
            let (mut accepted, _) = listener.accept().unwrap();
            drop(_client);
            let _ = accepted.read(&mut [0u8; 1]);
            std::thread::sleep(Duration::from_millis(200));
            meshed(&traced) == before + 1
        },
    );
    assert_eq!(nat_watched(&traced), watched_before + 1);
    drop(listener);
    drop(ns);
    wait_for("the namespace to leave", Duration::from_secs(10), || {
        meshed(&traced) == before
    });
    // Its NAT observer (programs and links) is released with it.
    wait_for("its NAT observer to go", Duration::from_secs(10), || {
        nat_watched(&traced) == watched_before
    });
}
