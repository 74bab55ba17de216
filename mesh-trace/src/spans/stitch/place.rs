//! Where a socket sits on a request's path: which of the twelve moments
//! its messages are, and whether it sends the requests of its leg.
use crate::flows::{
    legs::LegKind,
    socket::{Role, Socket, INBOUND_PORT, OUTBOUND_PORT},
};

/// Where a socket sits on a request's path, which says which moment its
/// messages are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Place {
    /// App socket to its outbound sidecar: t0 send request, t11 recv response.
    AppClient,
    /// Outbound sidecar's 15001 socket: t1, t10.
    OutboundDown,
    /// Outbound sidecar's upstream socket: t2, t9.
    OutboundUp,
    /// Inbound sidecar's 15006 socket: t3, t8.
    InboundDown,
    /// Inbound sidecar's socket to the app from 127.0.0.6: t4, t7.
    InboundUp,
    /// The server app's socket: t5, t6.
    AppServer,
}

impl Place {
    pub(super) fn of(sock: &Socket, leg: Option<LegKind>) -> Option<Place> {
        let passthrough_ip = std::net::IpAddr::from(crate::flows::socket::INBOUND_PASSTHROUGH_IP);
        Some(match sock.role {
            // Data can be reported before the leg is joined (the server's
            // ESTABLISHED may come later); in a meshed pod every outgoing
            // app connection but loopback is redirected.
            Role::AppClient
                if leg == Some(LegKind::Redirect)
                    || (leg.is_none() && !sock.remote.ip().is_loopback()) =>
            {
                Place::AppClient
            }
            Role::ProxyDownstream if sock.local.port() == OUTBOUND_PORT => Place::OutboundDown,
            Role::ProxyDownstream if sock.local.port() == INBOUND_PORT => Place::InboundDown,
            Role::ProxyUpstream if sock.local.ip() == passthrough_ip => Place::InboundUp,
            Role::ProxyUpstream => Place::OutboundUp,
            Role::AppServer if sock.remote.ip() == passthrough_ip => Place::AppServer,
            _ => return None,
        })
    }

    /// Indexes of (request moment, response moment).
    pub(super) fn moments(self) -> (usize, usize) {
        match self {
            Place::AppClient => (0, 11),
            Place::OutboundDown => (1, 10),
            Place::OutboundUp => (2, 9),
            Place::InboundDown => (3, 8),
            Place::InboundUp => (4, 7),
            Place::AppServer => (5, 6),
        }
    }

    /// Whether this socket sends the requests (client end of its leg).
    pub(super) fn sends_requests(self) -> bool {
        matches!(
            self,
            Place::AppClient | Place::OutboundUp | Place::InboundUp
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(role: Role, local: &str, remote: &str) -> Socket {
        Socket {
            cookie: 1,
            netns: 1,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            active: matches!(role, Role::AppClient | Role::ProxyUpstream),
            role,
            connect: None,
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
    fn app_client_on_a_redirect_or_not_yet_joined_off_loopback() {
        let app = sock(Role::AppClient, "10.244.0.5:40000", "10.96.0.12:9080");
        assert_eq!(
            Place::of(&app, Some(LegKind::Redirect)),
            Some(Place::AppClient)
        );
        assert_eq!(Place::of(&app, None), Some(Place::AppClient));
        // Joined, but no sidecar took it.
        assert_eq!(Place::of(&app, Some(LegKind::Bypass)), None);
        let local = sock(Role::AppClient, "127.0.0.1:40000", "127.0.0.1:9080");
        assert_eq!(Place::of(&local, None), None);
        assert_eq!(
            Place::of(&local, Some(LegKind::Redirect)),
            Some(Place::AppClient)
        );
    }

    #[test]
    fn sidecar_downstream_by_listener_port() {
        let outbound = sock(Role::ProxyDownstream, "127.0.0.1:15001", "10.244.0.5:40000");
        let inbound = sock(
            Role::ProxyDownstream,
            "10.244.0.9:15006",
            "10.244.0.5:50000",
        );
        let other = sock(
            Role::ProxyDownstream,
            "10.244.0.9:15090",
            "10.244.0.5:50000",
        );
        assert_eq!(
            Place::of(&outbound, Some(LegKind::Redirect)),
            Some(Place::OutboundDown)
        );
        assert_eq!(
            Place::of(&inbound, Some(LegKind::Mesh)),
            Some(Place::InboundDown)
        );
        assert_eq!(Place::of(&other, None), None);
    }

    #[test]
    fn sidecar_upstream_by_source_address() {
        let delivery = sock(Role::ProxyUpstream, "127.0.0.6:41000", "10.244.0.9:9080");
        let mesh = sock(Role::ProxyUpstream, "10.244.0.5:50000", "10.244.0.9:9080");
        assert_eq!(
            Place::of(&delivery, Some(LegKind::Delivery)),
            Some(Place::InboundUp)
        );
        assert_eq!(
            Place::of(&mesh, Some(LegKind::Mesh)),
            Some(Place::OutboundUp)
        );
        // Passthrough upstreams sit where mesh upstreams do.
        assert_eq!(
            Place::of(&mesh, Some(LegKind::Passthrough)),
            Some(Place::OutboundUp)
        );
    }

    #[test]
    fn app_server_only_when_delivered_from_the_inbound_sidecar() {
        let delivered = sock(Role::AppServer, "10.244.0.9:9080", "127.0.0.6:41000");
        let direct = sock(Role::AppServer, "10.244.0.9:9080", "10.244.0.5:40000");
        assert_eq!(
            Place::of(&delivered, Some(LegKind::Delivery)),
            Some(Place::AppServer)
        );
        assert_eq!(Place::of(&direct, Some(LegKind::Bypass)), None);
    }

    #[test]
    fn each_place_has_its_request_and_response_moments() {
        let all = [
            (Place::AppClient, (0, 11), true),
            (Place::OutboundDown, (1, 10), false),
            (Place::OutboundUp, (2, 9), true),
            (Place::InboundDown, (3, 8), false),
            (Place::InboundUp, (4, 7), true),
            (Place::AppServer, (5, 6), false),
        ];
        for (place, moments, sends) in all {
            assert_eq!(place.moments(), moments, "{place:?}");
            assert_eq!(place.sends_requests(), sends, "{place:?}");
        }
        // Every moment belongs to exactly one place.
        let mut seen: Vec<usize> = all
            .iter()
            .flat_map(|(p, _, _)| [p.moments().0, p.moments().1])
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
    }
}
