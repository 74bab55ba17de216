//! Legs: the two sockets of one TCP connection, joined exactly, and what
//! the connection is in the mesh.
use std::net::SocketAddr;

use serde::Serialize;

use super::socket::{Role, Socket, INBOUND_PORT, OUTBOUND_PORT};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LegKind {
    /// App -> its outbound sidecar on 15001 (iptables REDIRECT in OUTPUT).
    Redirect,
    /// Outbound sidecar -> the destination pod's inbound sidecar on 15006.
    Mesh,
    /// Inbound sidecar (from 127.0.0.6) -> the app.
    Delivery,
    /// Sidecar -> the original destination, outside the mesh (PassthroughCluster).
    Passthrough,
    /// Accepted on 15001 and closed without an upstream (BlackHoleCluster).
    Blackhole,
    /// An app connection no sidecar intercepted (excluded port, loopback,
    /// uid 1337, or a pod without a sidecar).
    Bypass,
    /// A client without a sidecar -> a sidecar's inbound listener.
    InboundRedirect,
}

impl LegKind {
    pub const ALL: [LegKind; 7] = [
        LegKind::Redirect,
        LegKind::Mesh,
        LegKind::Delivery,
        LegKind::Passthrough,
        LegKind::Blackhole,
        LegKind::Bypass,
        LegKind::InboundRedirect,
    ];

    pub fn label(self) -> &'static str {
        match self {
            LegKind::Redirect => "redirect",
            LegKind::Mesh => "mesh",
            LegKind::Delivery => "delivery",
            LegKind::Passthrough => "passthrough",
            LegKind::Blackhole => "blackhole",
            LegKind::Bypass => "bypass",
            LegKind::InboundRedirect => "inbound_redirect",
        }
    }

    /// Direction relative to the sidecar that handles the leg.
    pub fn direction(self) -> &'static str {
        match self {
            LegKind::Delivery | LegKind::InboundRedirect => "inbound",
            _ => "outbound",
        }
    }
}

/// Classifies a joined connection from its client (active) and server
/// (passive) sockets.
pub fn classify(client: &Socket, server: &Socket) -> LegKind {
    match (client.role, server.local.port()) {
        (Role::AppClient, OUTBOUND_PORT) => LegKind::Redirect,
        (Role::ProxyUpstream, INBOUND_PORT) => LegKind::Mesh,
        (_, INBOUND_PORT) => LegKind::InboundRedirect,
        (Role::ProxyUpstream, _) if server.role == Role::AppServer && is_delivery(client) => {
            LegKind::Delivery
        }
        (Role::ProxyUpstream, _) => LegKind::Passthrough,
        _ => LegKind::Bypass,
    }
}

/// Classifies a socket whose peer was not seen on this node.
pub fn classify_alone(sock: &Socket, dst_is_meshed: bool) -> LegKind {
    match (sock.active, sock.role) {
        (true, Role::ProxyUpstream) if is_delivery(sock) => LegKind::Delivery,
        (true, Role::ProxyUpstream) if dst_is_meshed => LegKind::Mesh,
        (true, Role::ProxyUpstream) => LegKind::Passthrough,
        (true, _) => LegKind::Bypass,
        (false, Role::ProxyDownstream) if sock.local.port() == INBOUND_PORT => LegKind::Mesh,
        (false, Role::ProxyDownstream) => LegKind::Redirect,
        (false, _) => LegKind::Bypass,
    }
}

fn is_delivery(client: &Socket) -> bool {
    client.local.ip() == std::net::IpAddr::from(super::socket::INBOUND_PASSTHROUGH_IP)
}

/// The key that joins the two ends of a connection: the client's local
/// address, which the server sees as its peer (REDIRECT rewrites only the
/// destination). Loopback addresses are only unique inside a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct JoinKey {
    pub scope: u64,
    pub client: SocketAddr,
}

impl JoinKey {
    pub fn new(netns: u64, client: SocketAddr) -> JoinKey {
        let scope = if client.ip().is_loopback() { netns } else { 0 };
        JoinKey { scope, client }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::socket::{ConnectInfo, Task};

    fn sock(active: bool, local: &str, remote: &str, uid: Option<u32>) -> Socket {
        let local: SocketAddr = local.parse().unwrap();
        let connect = uid.map(|uid| ConnectInfo {
            dst: remote.parse().unwrap(),
            task: Task {
                pid: 1,
                tid: 1,
                uid,
                gid: uid,
                comm: "x".into(),
            },
            ts_ns: 0,
        });
        Socket {
            cookie: 1,
            netns: 1,
            local,
            remote: remote.parse().unwrap(),
            active,
            role: Socket::infer_role(active, local, connect.as_ref()),
            connect,
            owner: None,
            pod: None,
            established_ns: 0,
            closed_ns: None,
            srtt_us: 0,
            bytes_acked: 0,
            bytes_received: 0,
            retransmits: 0,
            resets: 0,
        }
    }

    #[test]
    fn the_three_legs_of_a_request() {
        let app = sock(true, "10.244.0.10:40000", "10.96.0.12:9080", Some(1000));
        let outbound = sock(false, "127.0.0.1:15001", "10.244.0.10:40000", None);
        assert_eq!(classify(&app, &outbound), LegKind::Redirect);

        let upstream = sock(true, "10.244.0.10:41000", "10.244.0.22:9080", Some(1337));
        let inbound = sock(false, "10.244.0.22:15006", "10.244.0.10:41000", None);
        assert_eq!(classify(&upstream, &inbound), LegKind::Mesh);

        let to_app = sock(true, "127.0.0.6:42000", "10.244.0.22:9080", Some(1337));
        let app_server = sock(false, "10.244.0.22:9080", "127.0.0.6:42000", None);
        assert_eq!(classify(&to_app, &app_server), LegKind::Delivery);
    }

    #[test]
    fn outliers() {
        let upstream = sock(true, "10.244.0.10:41000", "10.244.0.200:8080", Some(1337));
        let external = sock(false, "10.244.0.200:8080", "10.244.0.10:41000", None);
        assert_eq!(classify(&upstream, &external), LegKind::Passthrough);

        let app = sock(true, "127.0.0.1:43000", "127.0.0.1:9080", Some(1000));
        let local = sock(false, "127.0.0.1:9080", "127.0.0.1:43000", None);
        assert_eq!(classify(&app, &local), LegKind::Bypass);

        let outside = sock(true, "10.244.0.200:44000", "10.244.0.22:9080", Some(0));
        let inbound = sock(false, "10.244.0.22:15006", "10.244.0.200:44000", None);
        assert_eq!(classify(&outside, &inbound), LegKind::InboundRedirect);

        assert_eq!(classify_alone(&upstream, false), LegKind::Passthrough);
        assert_eq!(classify_alone(&upstream, true), LegKind::Mesh);
        assert_eq!(classify_alone(&app, false), LegKind::Bypass);
    }

    #[test]
    fn loopback_keys_are_scoped_by_namespace() {
        let a = JoinKey::new(7, "127.0.0.6:1".parse().unwrap());
        let b = JoinKey::new(8, "127.0.0.6:1".parse().unwrap());
        assert_ne!(a, b);
        let c = JoinKey::new(7, "10.0.0.1:1".parse().unwrap());
        let d = JoinKey::new(8, "10.0.0.1:1".parse().unwrap());
        assert_eq!(c, d);
    }
}
