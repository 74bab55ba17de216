//! What the agent's HTTP endpoints give to whom, from real network
//! namespaces: the per-request detail of `/api/v1/stats` and the feeds of
//! `/api/v1/spans` and `/api/v1/flows` (paths and x-request-ids) only to
//! loopback clients unless asked, `/metrics` to anyone. Needs root (namespaces and a veth pair).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use mesh_trace::{
    agent::http::{serve, AgentState, StatsAccess},
    netns::{cmd, NetNs},
};

/// An agent's HTTP server in namespace `ns` on 0.0.0.0, its port.
fn agent_in(ns: &NetNs, access: StatsAccess) -> (u16, tokio::sync::watch::Sender<bool>) {
    let listener = ns
        .enter(|| std::net::TcpListener::bind("0.0.0.0:0").unwrap())
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            serve(listener, Arc::new(AgentState::new()), access, stopped).await;
        });
    });
    (port, stop)
}

/// The status line of `GET path` sent from namespace `from` to `to`.
fn get(from: &NetNs, to: SocketAddr, path: &str) -> String {
    let path = path.to_string();
    from.enter(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply.lines().next().unwrap_or_default().to_string()
    })
    .unwrap()
}

#[test]
fn per_request_detail_is_served_to_loopback_clients_only_unless_asked() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "exposure tests build network namespaces: run them as root"
    );
    let tag = std::process::id();
    let node = NetNs::create(&format!("mt-x-node-{tag}")).unwrap();
    let other = NetNs::create(&format!("mt-x-pod-{tag}")).unwrap();
    cmd(
        "ip",
        &[
            "link",
            "add",
            "mtx0",
            "netns",
            node.name(),
            "type",
            "veth",
            "peer",
            "name",
            "mtx1",
            "netns",
            other.name(),
        ],
    )
    .unwrap();
    for (ns, dev, addr) in [
        (&node, "mtx0", "10.232.0.1/24"),
        (&other, "mtx1", "10.232.0.2/24"),
    ] {
        ns.exec("ip", &["addr", "add", addr, "dev", dev]).unwrap();
        ns.exec("ip", &["link", "set", dev, "up"]).unwrap();
        ns.exec("ip", &["link", "set", "lo", "up"]).unwrap();
    }
    let (port, _stop) = agent_in(&node, StatsAccess::default());
    let remote: SocketAddr = format!("10.232.0.1:{port}").parse().unwrap();
    let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // From another namespace: metrics yes, per-request detail no.
    assert!(get(&other, remote, "/metrics").contains(" 200 "));
    for detail in ["/api/v1/stats", "/api/v1/spans", "/api/v1/flows"] {
        let refused = get(&other, remote, detail);
        assert!(refused.contains(" 403 "), "{detail}: {refused}");
    }
    // On the node's own loopback (`mesh-trace top`, kubectl port-forward).
    assert!(get(&node, local, "/api/v1/stats").contains(" 200 "));
    // Asked for: anyone.
    let (open_port, _stop_open) = agent_in(&node, StatsAccess::Anyone);
    let open: SocketAddr = format!("10.232.0.1:{open_port}").parse().unwrap();
    assert!(get(&other, open, "/api/v1/stats").contains(" 200 "));
}
