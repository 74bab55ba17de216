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
//!
//! A request that carries the application's own trace context (W3C
//! `traceparent`, or B3 as Zipkin and Envoy write it) is exported under
//! that trace id instead, so its spans land in the application's traces.
//! Both nodes read it from the request head they capture; the mesh leg
//! still names the request's segments, so they join across nodes whatever
//! the trace id.
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

/// The trace context a request carries in its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span, when the header names one.
    pub parent_id: Option<[u8; 8]>,
}

impl TraceContext {
    /// The trace id as 32 lowercase hex digits.
    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn parent_hex(&self) -> Option<String> {
        self.parent_id.as_ref().map(|p| hex(p))
    }

    /// W3C `traceparent`: `version-traceid-parentid-flags`, lowercase hex;
    /// an all-zero id or version `ff` is invalid. Later versions may append
    /// fields after the flags.
    pub fn from_traceparent(value: &[u8]) -> Option<TraceContext> {
        let value = value.trim_ascii();
        let mut parts = value.split(|&b| b == b'-');
        let version = parts.next()?;
        let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2
            || version == b"ff"
            || flags.len() != 2
            || value.iter().any(u8::is_ascii_uppercase)
        {
            return None;
        }
        if version == b"00" && parts.next().is_some() {
            return None;
        }
        let _: [u8; 1] = hex_bytes(version)?;
        let _: [u8; 1] = hex_bytes(flags)?;
        Some(TraceContext {
            trace_id: nonzero(hex_bytes(trace)?)?,
            parent_id: Some(nonzero(hex_bytes(parent)?)?),
        })
    }

    /// B3 single header: `traceid-spanid[-sampled[-parentspanid]]`, or a
    /// bare sampling decision (`0`, `1`, `d`) that carries no trace.
    pub fn from_b3(value: &[u8]) -> Option<TraceContext> {
        let mut parts = value.trim_ascii().split(|&b| b == b'-');
        let trace = parts.next()?;
        let span = parts.next()?;
        TraceContext::from_b3_ids(trace, Some(span))
    }

    /// B3 multiple headers: `x-b3-traceid` (16 or 32 hex digits; a 64-bit
    /// id is zero-padded on the left, as B3-to-W3C propagators do) and
    /// `x-b3-spanid`.
    pub fn from_b3_ids(trace: &[u8], span: Option<&[u8]>) -> Option<TraceContext> {
        let trace = trace.trim_ascii();
        let trace_id = match trace.len() {
            32 => hex_bytes(trace)?,
            16 => {
                let low: [u8; 8] = hex_bytes(trace)?;
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&low);
                id
            }
            _ => return None,
        };
        Some(TraceContext {
            trace_id: nonzero(trace_id)?,
            parent_id: span
                .map(<[u8]>::trim_ascii)
                .and_then(hex_bytes)
                .and_then(nonzero),
        })
    }
}

/// `N` bytes from exactly `2N` hex digits, either case (B3 takes both;
/// `traceparent`, only lowercase, is checked by its parser).
fn hex_bytes<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        let digit = |b: u8| char::from(b).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

fn nonzero<const N: usize>(id: [u8; N]) -> Option<[u8; N]> {
    id.iter().any(|&b| b != 0).then_some(id)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
    hex(&digest.as_ref()[..16])
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

    #[test]
    fn traceparent_and_b3_headers_name_the_trace() {
        let w3c = TraceContext::from_traceparent(
            b" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .unwrap();
        assert_eq!(w3c.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(w3c.parent_hex().as_deref(), Some("00f067aa0ba902b7"));
        // Invalid: all-zero ids, version ff, short fields, extra fields on
        // version 00, not hex.
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(
                TraceContext::from_traceparent(bad.as_bytes()),
                None,
                "{bad}"
            );
        }
        // A later version may add fields.
        assert!(TraceContext::from_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        )
        .is_some());
        let b3 =
            TraceContext::from_b3(b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1").unwrap();
        assert_eq!(b3.trace_hex(), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(b3.parent_hex().as_deref(), Some("e457b5a2e4d86bd1"));
        assert_eq!(
            TraceContext::from_b3(b"1"),
            None,
            "a sampling decision only"
        );
        let short =
            TraceContext::from_b3_ids(b"a3ce929d0e0e4736", Some(b"00f067aa0ba902b7")).unwrap();
        assert_eq!(short.trace_hex(), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(TraceContext::from_b3_ids(b"abc", None), None);
        assert_eq!(
            TraceContext::from_b3_ids(b"A3CE929D0E0E4736", None)
                .unwrap()
                .parent_id,
            None
        );
    }
}
