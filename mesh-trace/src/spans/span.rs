//! One request's span: the twelve moments the kernel observes as it goes
//! client app -> outbound sidecar -> network -> inbound sidecar -> server
//! app and back, and the hops they add up to.
use serde::Serialize;

/// The hops of a span, as metric label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Hop {
    /// (t1 - t0) + (t11 - t10): the app's socket to its sidecar and back.
    ClientToOutbound,
    /// (t2 - t1) + (t10 - t9): inside the outbound sidecar.
    OutboundProxy,
    /// (t3 - t2) + (t9 - t8): between the two sidecars.
    Network,
    /// (t4 - t3) + (t8 - t7): inside the inbound sidecar.
    InboundProxy,
    /// (t5 - t4) + (t7 - t6): the inbound sidecar to the app and back.
    InboundToApp,
    /// t6 - t5: the server app.
    App,
    /// t9 - t2: everything past the outbound sidecar, as the client's side
    /// sees it (the server side may run on another node).
    Upstream,
    /// t8 - t3: everything from the inbound sidecar's read to its response,
    /// as the server's side sees it (the client may run on another node).
    ServerSide,
}

impl Hop {
    pub const ALL: [Hop; 8] = [
        Hop::ClientToOutbound,
        Hop::OutboundProxy,
        Hop::Network,
        Hop::InboundProxy,
        Hop::InboundToApp,
        Hop::App,
        Hop::Upstream,
        Hop::ServerSide,
    ];

    /// The six hops a request through both sidecars adds up to.
    pub const PATH: [Hop; 6] = [
        Hop::ClientToOutbound,
        Hop::OutboundProxy,
        Hop::Network,
        Hop::InboundProxy,
        Hop::InboundToApp,
        Hop::App,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Hop::ClientToOutbound => "client_to_outbound",
            Hop::OutboundProxy => "outbound_proxy",
            Hop::Network => "network",
            Hop::InboundProxy => "inbound_proxy",
            Hop::InboundToApp => "inbound_to_app",
            Hop::App => "app",
            Hop::Upstream => "upstream",
            Hop::ServerSide => "server_side",
        }
    }

    /// The half of the request whose node measures this hop; the network
    /// hop needs both and goes with the client's.
    pub fn reporter(self) -> Reporter {
        match self {
            Hop::InboundProxy | Hop::InboundToApp | Hop::App | Hop::ServerSide => {
                Reporter::Destination
            }
            _ => Reporter::Source,
        }
    }
}

/// Which side of a request a measure comes from, as Istio's `reporter`
/// label says: the client's (`source`) or the server's (`destination`).
/// A request whose two sides run on one node is reported by both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn label(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Which sidecar answered a request itself (a local reply: no route, no
/// healthy upstream, denied, rate limited, upstream timeout) instead of
/// forwarding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalReply {
    /// The outbound sidecar: moments t0, t1, t10, t11 only.
    Outbound,
    /// The inbound sidecar: t4 to t7 are missing.
    Inbound,
}

impl LocalReply {
    pub fn label(self) -> &'static str {
        match self {
            LocalReply::Outbound => "outbound",
            LocalReply::Inbound => "inbound",
        }
    }
}

/// The gRPC status codes counted as errors, as a PromQL regex on
/// `grpc_response_status` (the rules, dashboards and `top --prometheus` use
/// it too): those gRPC maps to HTTP 5xx.
pub const GRPC_ERRORS: &str = "2|4|12|13|14|15";

/// The request's protocol, as the `request_protocol` label says it (the
/// values Istio's metrics use).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1, or HTTP/2 that is not gRPC.
    #[default]
    Http,
    /// A gRPC call: its request's `content-type` is `application/grpc`.
    Grpc,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

/// How far a leg's receiving moment may precede its sending one and still
/// be the same instant (see [`Span::settle_leg_skew`]).
pub const LEG_SKEW_NS: u64 = 1_000_000;

/// The twelve moments, CLOCK_MONOTONIC nanoseconds; None where not observed.
pub type Moments = [Option<u64>; 12];

/// One request, stitched.
#[derive(Clone, Debug, Serialize)]
pub struct Span {
    pub request_id: Option<String>,
    pub method: String,
    /// Templated path (ids replaced), bounded for labels.
    pub path: String,
    pub status: u16,
    pub source_workload: String,
    /// The source workload's Kubernetes namespace, when the metadata says.
    pub source_namespace: Option<String>,
    pub destination_service: String,
    /// The destination service's Kubernetes namespace, when the metadata
    /// says.
    pub destination_namespace: Option<String>,
    /// The pod that served the request, when on this node.
    pub destination_pod: Option<String>,
    /// t0..t11.
    pub moments: Moments,
    /// Upstream attempts beyond the first (retries) seen in the outbound sidecar.
    pub retries: u32,
    /// Set when a sidecar answered the request itself.
    pub local_reply: Option<LocalReply>,
    /// The trace id: the caller's own, from the trace context its request
    /// carried, else the one derived from its mesh leg.
    pub trace_id: Option<String>,
    /// The id both nodes derive alike from the request's mesh leg
    /// ([`crate::spans::trace_id`]), when it crossed one: it names the
    /// request's segments, so that the two halves join in one trace.
    pub mesh_leg_id: Option<String>,
    /// The client app's own span, from the trace context of the request it
    /// wrote (the client's half only).
    pub parent_span_id: Option<String>,
    /// The gRPC status its response's trailers carried (HTTP/2 only).
    pub grpc_status: Option<u32>,
    pub protocol: Protocol,
}

impl Span {
    /// Duration of a hop, when its moments were all observed.
    pub fn hop_ns(&self, hop: Hop) -> Option<u64> {
        let t = |i: usize| self.moments[i];
        let d = |a: usize, b: usize| t(b)?.checked_sub(t(a)?);
        match hop {
            Hop::ClientToOutbound => Some(d(0, 1)? + d(10, 11)?),
            // A local reply never left the sidecar that wrote it.
            Hop::OutboundProxy if self.local_reply == Some(LocalReply::Outbound) => d(1, 10),
            Hop::OutboundProxy => Some(d(1, 2)? + d(9, 10)?),
            Hop::Network => Some(d(2, 3)? + d(8, 9)?),
            Hop::InboundProxy if self.local_reply == Some(LocalReply::Inbound) => d(3, 8),
            Hop::InboundProxy => Some(d(3, 4)? + d(7, 8)?),
            Hop::InboundToApp => Some(d(4, 5)? + d(6, 7)?),
            Hop::App => d(5, 6),
            Hop::Upstream => d(2, 9),
            Hop::ServerSide => d(3, 8),
        }
    }

    /// The sides this node saw of the request: the client's (from the app's
    /// request, t0), the server's (from the inbound sidecar's read, t3), or
    /// both. Each reports the request's duration as its side measures it.
    pub fn reporters(&self) -> impl Iterator<Item = Reporter> + '_ {
        [(Reporter::Source, 0), (Reporter::Destination, 3)]
            .into_iter()
            .filter(|&(_, t)| self.moments[t].is_some())
            .map(|(r, _)| r)
    }

    /// The request's duration as `reporter`'s side saw it: t11 - t0 at the
    /// client's app, t8 - t3 at the server's inbound sidecar.
    pub fn duration_ns(&self, reporter: Reporter) -> Option<u64> {
        match reporter {
            Reporter::Source => self.total_ns(),
            Reporter::Destination => self.moments[8]?.checked_sub(self.moments[3]?),
        }
    }

    /// `whole` when this node saw both sides, else `client` or `server`.
    pub fn half(&self) -> &'static str {
        match (self.moments[0].is_some(), self.moments[3].is_some()) {
            (true, true) => "whole",
            (true, false) => "client",
            _ => "server",
        }
    }

    /// Across a leg on loopback the reader can return (and its moment be
    /// taken) before the writer's send does, since the bytes reach the peer
    /// inside the send: a receiver's moment up to [`LEG_SKEW_NS`] before
    /// its sender's is the same instant. The bytes were sent by the time
    /// they were read, so the sender's moment moves back to the read; only
    /// when that would put it before the moment ahead of it does the read
    /// move forward instead (the reader's next moment, a sidecar's forward,
    /// may come before the sender's late one). Larger inversions are left
    /// for [`Span::is_consistent`] to refuse.
    pub fn settle_leg_skew(&mut self) {
        // (sender, receiver) moments of each leg, both ways.
        for (a, b) in [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)] {
            if let (Some(sent), Some(read)) = (self.moments[a], self.moments[b]) {
                if read < sent && sent - read <= LEG_SKEW_NS {
                    let before = self.moments[..a].iter().flatten().next_back();
                    if before.is_none_or(|&t| t <= read) {
                        self.moments[a] = Some(read);
                    } else {
                        self.moments[b] = Some(sent);
                    }
                }
            }
        }
    }

    /// Whether the moments observed follow the request's path in time
    /// (each no earlier than the one before it) and so the hops, none
    /// negative, add up to the total. A span that fails this holds another
    /// request's moments or a clock step and must not be exported.
    pub fn is_consistent(&self) -> bool {
        let mut last = None;
        for t in self.moments.iter().flatten() {
            if last.is_some_and(|l| *t < l) {
                return false;
            }
            last = Some(*t);
        }
        true
    }

    /// t11 - t0.
    pub fn total_ns(&self) -> Option<u64> {
        self.moments[11]?.checked_sub(self.moments[0]?)
    }

    /// Time the sidecars add on the client side: outbound proxy plus the
    /// redirect leg; on the server side: inbound proxy plus delivery leg.
    pub fn sidecar_overhead_ns(&self, direction: &str) -> Option<u64> {
        match direction {
            "outbound" => {
                Some(self.hop_ns(Hop::OutboundProxy)? + self.hop_ns(Hop::ClientToOutbound)?)
            }
            _ => Some(self.hop_ns(Hop::InboundProxy)? + self.hop_ns(Hop::InboundToApp)?),
        }
    }

    /// The JSON shape `mesh-trace spans` prints: every moment and every hop.
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |ns: Option<u64>| ns.map(|n| n as f64 / 1e6);
        let hops: serde_json::Map<String, serde_json::Value> = Hop::ALL
            .iter()
            .filter_map(|&h| Some((h.label().to_string(), ms(self.hop_ns(h))?.into())))
            .collect();
        serde_json::json!({
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "source_workload": self.source_workload,
            "source_namespace": self.source_namespace,
            "destination_service": self.destination_service,
            "destination_namespace": self.destination_namespace,
            "destination_pod": self.destination_pod,
            "retries": self.retries,
            "local_reply": self.local_reply,
            "half": self.half(),
            "trace_id": self.trace_id,
            "parent_span_id": self.parent_span_id,
            "grpc_status": self.grpc_status,
            "protocol": self.protocol,
            "total_ms": ms(self.total_ns()),
            "hops_ms": hops,
            "moments_ns": self.moments,
        })
    }

    /// Whether the request failed as its caller saw it: no response, a 5xx,
    /// or a gRPC status that gRPC maps to a server error (UNKNOWN,
    /// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS),
    /// as the dashboards and rules count errors ([`GRPC_ERRORS`]).
    pub fn is_error(&self) -> bool {
        self.status == 0
            || self.status >= 500
            || self
                .grpc_status
                .is_some_and(|c| GRPC_ERRORS.split('|').any(|e| e == c.to_string()))
    }

    pub fn status_class(&self) -> &'static str {
        match self.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(ms: [u64; 12]) -> Span {
        Span {
            request_id: None,
            method: "GET".into(),
            path: "/".into(),
            status: 200,
            source_workload: "a".into(),
            source_namespace: None,
            destination_service: "b".into(),
            destination_namespace: None,
            destination_pod: None,
            moments: ms.map(|m| Some(m * 1_000_000)),
            retries: 0,
            local_reply: None,
            trace_id: None,
            mesh_leg_id: None,
            parent_span_id: None,
            grpc_status: None,
            protocol: Default::default(),
        }
    }

    #[test]
    fn hops_add_up_to_the_total() {
        let s = span([0, 1, 3, 4, 7, 8, 28, 29, 32, 33, 35, 36]);
        let ms = |h| s.hop_ns(h).unwrap() / 1_000_000;
        assert_eq!(ms(Hop::ClientToOutbound), 2);
        assert_eq!(ms(Hop::OutboundProxy), 4);
        assert_eq!(ms(Hop::Network), 2);
        assert_eq!(ms(Hop::InboundProxy), 6);
        assert_eq!(ms(Hop::InboundToApp), 2);
        assert_eq!(ms(Hop::App), 20);
        let sum: u64 = Hop::PATH.iter().map(|&h| ms(h)).sum();
        assert_eq!(sum, s.total_ns().unwrap() / 1_000_000);
        assert_eq!(ms(Hop::Upstream), 30);
    }

    #[test]
    fn local_replies_keep_the_time_inside_the_sidecar_that_answered() {
        let mut s = span([0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 5, 7]);
        s.moments[2..10].fill(None);
        assert_eq!(s.hop_ns(Hop::OutboundProxy), None);
        s.local_reply = Some(LocalReply::Outbound);
        assert_eq!(s.hop_ns(Hop::OutboundProxy), Some(4_000_000));
        assert_eq!(s.hop_ns(Hop::ClientToOutbound), Some(3_000_000));
        assert_eq!(s.total_ns(), Some(7_000_000));
        assert!(s.is_consistent());
    }

    #[test]
    fn a_read_reported_just_before_its_write_is_the_same_instant() {
        let mut s = span([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        // The app's read (t5) 30 us before the sidecar's write (t4) ended:
        // the write had happened by then.
        s.moments[5] = Some(4_000_000 - 30_000);
        assert!(!s.is_consistent());
        s.settle_leg_skew();
        assert_eq!(s.moments[4], Some(3_970_000));
        assert_eq!(s.moments[5], Some(3_970_000));
        assert_eq!(s.hop_ns(Hop::InboundToApp), Some(1_000_000));
        assert!(s.is_consistent());
        // The sidecar's read (t1) and even its forward (t2) reported before
        // the app's late send (t0): the send moves back to the read.
        let mut late = span([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        late.moments[2] = Some(1_200_000);
        late.moments[0] = Some(1_500_000);
        late.settle_leg_skew();
        assert_eq!(late.moments[0], Some(1_000_000));
        assert!(late.is_consistent());
        // Where moving the send back would cross the moment before it, the
        // read moves forward.
        let mut forward = span([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        forward.moments[1] = Some(1_800_000);
        forward.moments[3] = Some(1_500_000);
        forward.settle_leg_skew();
        assert_eq!(forward.moments[2], Some(2_000_000));
        assert_eq!(forward.moments[3], Some(2_000_000));
        // Two and a half milliseconds is not skew: another request's moment.
        let mut far = span([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        far.moments[9] = Some(5_500_000);
        far.settle_leg_skew();
        assert_eq!(far.moments[9], Some(5_500_000));
        assert!(!far.is_consistent());
    }

    #[test]
    fn moments_out_of_order_are_inconsistent() {
        let s = span([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert!(s.is_consistent());
        let mut late = s.clone();
        // Another request's t9 after this one's t10: a negative hop.
        late.moments[9] = Some(10_500_000);
        assert!(!late.is_consistent());
        let mut gaps = s;
        gaps.moments[3..9].fill(None);
        assert!(gaps.is_consistent());
    }

    #[test]
    fn missing_moments_leave_hops_unknown() {
        let mut s = span([0; 12]);
        s.moments[5] = None;
        assert_eq!(s.hop_ns(Hop::App), None);
        assert_eq!(s.hop_ns(Hop::InboundToApp), None);
        assert!(s.hop_ns(Hop::Network).is_some());
    }

    #[test]
    fn errors_are_5xx_none_or_grpc_server_errors() {
        let mut s = span([0; 12]);
        s.status = 200;
        assert!(!s.is_error());
        s.status = 0;
        assert!(s.is_error());
        s.status = 503;
        assert!(s.is_error());
        s.status = 200;
        s.protocol = Protocol::Grpc;
        s.grpc_status = Some(0);
        assert!(!s.is_error());
        for code in [2, 4, 12, 13, 14, 15] {
            s.grpc_status = Some(code);
            assert!(s.is_error(), "{code}");
        }
        // The caller's own mistakes, as a 4xx is not counted.
        for code in [1, 3, 5, 16] {
            s.grpc_status = Some(code);
            assert!(!s.is_error(), "{code}");
        }
    }
}
