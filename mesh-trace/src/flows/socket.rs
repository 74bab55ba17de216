//! One TCP socket as the flow table knows it, and its role in the mesh.
use std::{net::SocketAddr, sync::Arc};

use serde::Serialize;

use super::metadata::Pod;

/// Istio's proxy user and group: its connections are not redirected.
pub const PROXY_UID: u32 = 1337;
/// The VirtualOutbound and VirtualInbound listener ports.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
/// Source address of the inbound sidecar's connections to the app.
pub const INBOUND_PASSTHROUGH_IP: [u8; 4] = [127, 0, 0, 6];

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
}

impl Task {
    pub fn from_kernel(t: &mesh_trace_common::TaskInfo) -> Task {
        Task {
            pid: (t.pid_tgid >> 32) as u32,
            tid: t.pid_tgid as u32,
            uid: t.uid_gid as u32,
            gid: (t.uid_gid >> 32) as u32,
            comm: crate::kernel::events::comm(&t.comm),
        }
    }

    pub fn is_proxy(&self) -> bool {
        self.uid == PROXY_UID || self.gid == PROXY_UID
    }
}

/// What connect() was asked for, before NAT, and by whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConnectInfo {
    pub dst: SocketAddr,
    pub task: Task,
    pub ts_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// An app's outgoing socket.
    AppClient,
    /// A sidecar's accepted socket on 15001 or 15006.
    ProxyDownstream,
    /// A sidecar's outgoing socket (uid 1337).
    ProxyUpstream,
    /// An app's accepted socket.
    AppServer,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::AppClient => "app-client",
            Role::ProxyDownstream => "proxy-downstream",
            Role::ProxyUpstream => "proxy-upstream",
            Role::AppServer => "app-server",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Socket {
    pub cookie: u64,
    pub netns: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// true when this socket called connect().
    pub active: bool,
    pub role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<ConnectInfo>,
    /// The process that first did I/O on it (accepted sockets learn their
    /// process this way).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<Task>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<Arc<Pod>>,
    pub established_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_ns: Option<u64>,
    pub srtt_us: u32,
    /// Bytes this socket sent that the peer acknowledged, and bytes it
    /// received (sequence space: the SYN and FIN count one each).
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub retransmits: u32,
    pub resets: u32,
}

impl Socket {
    /// The role from what is known at ESTABLISHED: the listener port for
    /// accepted sockets, the connecting process's user for outgoing ones.
    pub fn infer_role(active: bool, local: SocketAddr, connect: Option<&ConnectInfo>) -> Role {
        if !active {
            return if matches!(local.port(), OUTBOUND_PORT | INBOUND_PORT) {
                Role::ProxyDownstream
            } else {
                Role::AppServer
            };
        }
        let from_passthrough_ip = local.ip() == std::net::IpAddr::from(INBOUND_PASSTHROUGH_IP);
        match connect {
            Some(c) if c.task.is_proxy() => Role::ProxyUpstream,
            _ if from_passthrough_ip => Role::ProxyUpstream,
            _ => Role::AppClient,
        }
    }

    /// The process behind this socket, if known.
    pub fn task(&self) -> Option<&Task> {
        self.connect
            .as_ref()
            .map(|c| &c.task)
            .or(self.owner.as_ref())
    }

    /// Whether this socket's own side sent payload (more than SYN and FIN).
    pub fn sent_payload(&self) -> bool {
        self.bytes_acked > 2
    }

    pub fn received_payload(&self) -> bool {
        self.bytes_received > 2
    }
}
