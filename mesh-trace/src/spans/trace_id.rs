//! The trace id a request's two halves share when they are reported by
//! different nodes, derived by each with no coordination from what both
//! ends of its mesh leg see alike: the client's address (REDIRECT rewrites
//! only the destination), the server pod's address, and the TCP sequence
//! number where the request starts on that connection (the same at both
//! ends, encrypted or not). The destination port is left out: the
//! server's node sees 15006 where the client's sees the service port. The
//! sequence number starts at a random value per connection, so two
//! requests share an id only if they share the client port, the server and
//! 32 random bits.
use std::net::{IpAddr, SocketAddr};

/// What both ends of a request's mesh leg see alike; the trace id is
/// derived from it only when the span is exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshLeg {
    pub client: SocketAddr,
    pub server: IpAddr,
    /// TCP sequence number where the request starts.
    pub seq: u32,
}

impl MeshLeg {
    pub fn trace_id(&self) -> String {
        from_mesh_leg(self.client, self.server, self.seq)
    }
}

/// 32 lowercase hex digits, as W3C `traceparent` writes a trace id.
pub fn from_mesh_leg(client: SocketAddr, server: IpAddr, seq: u32) -> String {
    let mut input = Vec::with_capacity(48);
    input.extend_from_slice(b"mesh-trace/1");
    push_ip(&mut input, client.ip());
    input.extend_from_slice(&client.port().to_be_bytes());
    push_ip(&mut input, server);
    input.extend_from_slice(&seq.to_be_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An IPv4 address as its IPv4-mapped IPv6 form, so that a dual-stack
/// socket and an IPv4 one name the same client alike.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&v6.octets());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_derive_the_same_id_and_other_requests_another() {
        let client: SocketAddr = "10.244.0.5:50000".parse().unwrap();
        let server: IpAddr = "10.244.1.9".parse().unwrap();
        let id = from_mesh_leg(client, server, 7);
        assert_eq!(id.len(), 32);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(id, from_mesh_leg(client, server, 7));
        // An IPv4 client seen through a dual-stack socket.
        let mapped: SocketAddr = "[::ffff:10.244.0.5]:50000".parse().unwrap();
        assert_eq!(id, from_mesh_leg(mapped, server, 7));
        assert_ne!(id, from_mesh_leg(client, server, 8));
        assert_ne!(
            id,
            from_mesh_leg("10.244.0.5:50001".parse().unwrap(), server, 7)
        );
        assert_ne!(id, from_mesh_leg(client, "10.244.1.10".parse().unwrap(), 7));
    }
}
