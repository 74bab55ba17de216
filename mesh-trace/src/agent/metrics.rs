//! The agent's Prometheus metrics. Names are a contract (see README,
//! "Metrics"); every label has a small, closed set of values.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};

use mesh_trace_common::LossReason;

use crate::kernel::events::kind_label;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

/// Reason label for ring buffer records the agent could not decode.
pub const UNDECODABLE: &str = "undecodable";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

/// A leg and the end of it a socket is (`client` connected, `server`
/// accepted); `unknown` when the socket's leg was not known.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LegSideLabels {
    pub leg: &'static str,
    pub side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResetLabels {
    pub leg: &'static str,
    pub side: &'static str,
    /// `sent` or `received` by that end.
    pub direction: &'static str,
    /// The kernel's reason for a reset sent (`enum sk_rst_reason`), else `unknown`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LegDirectionLabels {
    pub leg: &'static str,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub leg: &'static str,
    pub direction: &'static str,
    pub source_workload: String,
    pub destination_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Which side measured it: `source` (t11 - t0 at the client app) or
    /// `destination` (t8 - t3 at the server's inbound sidecar).
    pub reporter: &'static str,
    pub source_workload: String,
    pub destination_service: String,
    pub method: &'static str,
    pub status_class: &'static str,
    /// `http` or `grpc` (Istio's `request_protocol`).
    pub request_protocol: &'static str,
    /// Kubernetes namespaces, as Istio names them ("unknown" when the
    /// metadata does not say).
    pub source_workload_namespace: String,
    pub destination_service_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HopLabels {
    pub hop: &'static str,
    /// The side whose node measures the hop (`Hop::reporter`).
    pub reporter: &'static str,
    pub source_workload: String,
    pub destination_service: String,
    pub source_workload_namespace: String,
    pub destination_service_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverheadLabels {
    pub direction: &'static str,
    pub workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub destination_service: String,
    pub status_code: String,
    /// `http` or `grpc` (Istio's `request_protocol`).
    pub request_protocol: &'static str,
    /// The gRPC status code from the call's trailers, as Istio's
    /// `grpc_response_status` (empty for HTTP, bounded to the 17 codes).
    pub grpc_response_status: &'static str,
    pub source_workload_namespace: String,
    pub destination_service_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalReplyLabels {
    /// Which sidecar answered: `outbound` (the client's) or `inbound`.
    pub direction: &'static str,
    pub source_workload: String,
    pub destination_service: String,
    pub status_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub destination_service: String,
}

/// Latency buckets: 50 us .. ~26 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// Bucket bounds of `mesh_trace_tcp_rtt_seconds`.
pub const RTT_BUCKETS: [f64; 17] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// HTTP methods kept as label values; anything else is "OTHER".
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    }
}

/// The `status_code` label: the code for 100 to 599, `0` for no response,
/// `other` for the rest (a server may write any three digits), so that the
/// label has at most 502 values.
pub fn status_code_label(status: u16) -> String {
    match status {
        0 | 100..=599 => status.to_string(),
        _ => "other".into(),
    }
}

/// A gRPC status code as a label value: the 17 codes gRPC defines, "other"
/// for any beyond them, empty when the call carried none (HTTP).
pub fn grpc_status_label(code: Option<u32>) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    match code {
        None => "",
        Some(c) => CODES.get(c as usize).copied().unwrap_or("other"),
    }
}

/// Most distinct (source_workload, destination_service) pairs exported;
/// beyond it they are folded into "other", so a misbehaving metadata source
/// cannot blow up the series count.
pub const MAX_WORKLOAD_PAIRS: usize = 2_000;

pub struct Metrics {
    pub registry: Registry,
    pub events: Family<KindLabel, Counter>,
    pub events_lost: Family<ReasonLabel, Counter>,
    pub programs_attached: Gauge,
    pub redirects: Family<DirectionLabel, Counter>,
    pub connections_opened: Family<ConnectionLabels, Counter>,
    pub connections_closed: Family<ConnectionLabels, Counter>,
    pub connect_duration: Family<LegDirectionLabels, Histogram>,
    pub passthrough: Counter,
    pub otlp_exported: Counter,
    pub otlp_dropped: Family<ReasonLabel, Counter>,
    pub blackhole: Counter,
    pub bypass: Counter,
    pub retransmits: Family<LegSideLabels, Counter>,
    pub resets: Family<ResetLabels, Counter>,
    pub rtt: Family<LegSideLabels, Histogram>,
    pub min_rtt: Family<LegSideLabels, Histogram>,
    pub flows_evicted: Counter,
    pub flows_relearned: Counter,
    pub tls_files_probed: Counter,
    pub tls_plaintext: Family<ResultLabel, Counter>,
    pub h2_header_state_lost: Family<ReasonLabel, Counter>,
    pub h2_header_blocks: Family<ResultLabel, Counter>,
    pub flows_tracked: Gauge,
    pub meshed_netns: Gauge,
    pub nat_watched_netns: Gauge,
    pub agents_on_node: Gauge,
    pub requests_in_flight: Gauge,
    pub stitch_sockets: Gauge,
    pub unknown_socket_events: Counter,
    pub request_duration: Family<RequestLabels, Histogram>,
    pub hop_duration: Family<HopLabels, Histogram>,
    pub sidecar_overhead: Family<OverheadLabels, Histogram>,
    pub requests: Family<StatusLabels, Counter>,
    pub proxy_retries: Family<ServiceLabel, Counter>,
    pub local_replies: Family<LocalReplyLabels, Counter>,
    pub requests_unstitched: Family<ReasonLabel, Counter>,
    /// Objects the Kubernetes metadata source holds (`pods`, `services`).
    pub metadata_objects: Family<ResourceLabel, Gauge>,
    /// Watch events the Kubernetes metadata source applied.
    pub metadata_events: Family<ResourceLabel, Counter>,
    pub metadata_relists: Counter,
    pub metadata_errors: Counter,
    pub process: super::process::ProcessMetrics,
    workload_pairs: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mesh_trace");
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "mesh-trace build; the value is always 1",
            build_info,
        );

        let events = Family::<KindLabel, Counter>::default();
        for kind in crate::kernel::events::ALL_KINDS {
            let _ = events.get_or_create(&KindLabel {
                kind: kind_label(kind),
            });
        }
        registry.register(
            "events",
            "Kernel events received by the agent",
            events.clone(),
        );

        let events_lost = Family::<ReasonLabel, Counter>::default();
        for r in LossReason::ALL {
            let _ = events_lost.get_or_create(&ReasonLabel { reason: r.label() });
        }
        let _ = events_lost.get_or_create(&ReasonLabel {
            reason: UNDECODABLE,
        });
        registry.register(
            "events_lost",
            "Kernel events that were not delivered (ringbuf_full, map_full) or not decoded",
            events_lost.clone(),
        );

        let programs_attached = Gauge::default();
        registry.register(
            "programs_attached",
            "eBPF programs currently attached by this agent",
            programs_attached.clone(),
        );
        let redirects = Family::<DirectionLabel, Counter>::default();
        for direction in ["outbound", "inbound"] {
            let _ = redirects.get_or_create(&DirectionLabel { direction });
        }
        registry.register(
            "redirects",
            "Connections redirected to a sidecar by the iptables nat rules (15001 outbound, 15006 inbound)",
            redirects.clone(),
        );
        let connections_opened = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "connections_opened",
            "TCP connections opened, by leg of the sidecar data path",
            connections_opened.clone(),
        );
        let connections_closed = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "TCP connections closed, by leg of the sidecar data path",
            connections_closed.clone(),
        );
        let connect_duration =
            Family::<LegDirectionLabels, Histogram>::new_with_constructor(|| {
                // 10 us .. ~10 s
                Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
            });
        registry.register_with_unit(
            "connect_duration",
            "TCP handshake time seen by the connecting side, connect() to ESTABLISHED",
            Unit::Seconds,
            connect_duration.clone(),
        );
        let passthrough = Counter::default();
        registry.register(
            "passthrough_connections",
            "Connections a sidecar sent to their original destination outside the mesh (PassthroughCluster)",
            passthrough.clone(),
        );
        let otlp_exported = Counter::default();
        registry.register(
            "otlp_exported_requests",
            "Requests whose spans were sent to the OTLP collector",
            otlp_exported.clone(),
        );
        let otlp_dropped = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "otlp_dropped_requests",
            "Requests whose spans were not sent: queue_full (the collector is slower than the traffic, or down) or export_failed (every attempt failed)",
            otlp_dropped.clone(),
        );
        let blackhole = Counter::default();
        registry.register(
            "blackhole_connections",
            "Connections a sidecar accepted and closed without any upstream (BlackHoleCluster)",
            blackhole.clone(),
        );
        let bypass = Counter::default();
        registry.register(
            "bypass_connections",
            "App connections no sidecar intercepted",
            bypass.clone(),
        );
        let retransmits = Family::<LegSideLabels, Counter>::default();
        registry.register(
            "tcp_retransmits",
            "TCP segments retransmitted on traced connections, by leg and the end that resent them",
            retransmits.clone(),
        );
        let resets = Family::<ResetLabels, Counter>::default();
        registry.register(
            "tcp_resets",
            "TCP resets on traced connections, by leg, end, direction and the kernel's reason",
            resets.clone(),
        );
        // 10 us .. 2.5 s in steps of 1, 2.5, 5: 1 ms and 5 ms are bounds.
        let rtt = Family::<LegSideLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(RTT_BUCKETS.iter().copied())
        });
        registry.register_with_unit(
            "tcp_rtt",
            "Smoothed TCP round-trip time of traced connections, sampled at open, about once a second while busy, and at close; a peer's delayed ACK counts in it",
            Unit::Seconds,
            rtt.clone(),
        );
        let min_rtt = Family::<LegSideLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(RTT_BUCKETS.iter().copied())
        });
        registry.register_with_unit(
            "tcp_min_rtt",
            "The kernel's windowed minimum TCP round-trip time of traced connections (the path, without delayed ACKs), sampled at open and about once a second while busy",
            Unit::Seconds,
            min_rtt.clone(),
        );
        let tls_files_probed = Counter::default();
        registry.register(
            "tls_files_probed",
            "Files (TLS libraries, executables with TLS linked in) of traced processes whose SSL_write/SSL_read carry the TLS plaintext probes",
            tls_files_probed.clone(),
        );
        let tls_plaintext = Family::<ResultLabel, Counter>::default();
        for result in ["joined", "unjoined"] {
            let _ = tls_plaintext.get_or_create(&ResultLabel { result });
        }
        registry.register(
            "tls_plaintext_requests",
            "Request heads read from TLS calls' plaintext: joined to the encrypted request on the wire, or not (its request unknown here)",
            tls_plaintext.clone(),
        );
        let h2_header_state_lost = Family::<ReasonLabel, Counter>::default();
        for why in crate::spans::h2::LostBecause::ALL {
            let _ = h2_header_state_lost.get_or_create(&ReasonLabel {
                reason: why.label(),
            });
        }
        registry.register(
            "h2_header_state_lost",
            "Directions of HTTP/2 connections whose header compression (HPACK) state was lost, by why: walk (the kernel lost the frame boundaries, or events were lost), too_long (a header block past the capture), gap (header bytes missing), refused (a block that would not decode). Their later requests count as unstitched hpack_lost",
            h2_header_state_lost.clone(),
        );
        let h2_header_blocks = Family::<ResultLabel, Counter>::default();
        for result in ["decoded", "undecodable"] {
            let _ = h2_header_blocks.get_or_create(&ResultLabel { result });
        }
        registry.register(
            "h2_header_blocks",
            "HTTP/2 header blocks (request and response heads, trailers) from the frames the kernel walks: decoded, or undecodable (their connection direction's header state was lost)",
            h2_header_blocks.clone(),
        );
        let flows_evicted = Counter::default();
        let flows_relearned = Counter::default();
        registry.register(
            "flows_relearned",
            "Open sockets whose opening event was lost (a full ring buffer), learnt again from the kernel's socket lists",
            flows_relearned.clone(),
        );
        registry.register(
            "flows_evicted",
            "Sockets dropped from the flow table because it was full or they were idle too long",
            flows_evicted.clone(),
        );
        let meshed_netns = Gauge::default();
        registry.register(
            "meshed_netns",
            "Network namespaces whose socket data is captured (pods with a sidecar, or where a REDIRECT was seen); at most 16,384, and a namespace that is gone leaves",
            meshed_netns.clone(),
        );
        let nat_watched_netns = Gauge::default();
        registry.register(
            "nat_watched_netns",
            "Network namespaces whose iptables NAT step is observed (two netfilter programs each); a namespace that is gone is released",
            nat_watched_netns.clone(),
        );
        let agents_on_node = Gauge::default();
        registry.register(
            "agents_on_node",
            "mesh-trace agents with programs loaded in this node's kernel, this one included (2 while a rolling update runs both; each traces everything)",
            agents_on_node.clone(),
        );
        let requests_in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests the stitcher holds until their span completes; at most 65,536 (the oldest evicted) and each for at most 60 s",
            requests_in_flight.clone(),
        );
        let stitch_sockets = Gauge::default();
        registry.register(
            "stitch_sockets",
            "Sockets whose byte stream the stitcher frames; only sockets in the flow table, so bounded by it",
            stitch_sockets.clone(),
        );
        let flows_tracked = Gauge::default();
        registry.register(
            "flows_tracked",
            "Sockets in the flow table",
            flows_tracked.clone(),
        );
        let unknown_socket_events = Counter::default();
        registry.register(
            "unknown_socket_events",
            "Kernel events about sockets the flow table did not know (opened before the agent, or evicted)",
            unknown_socket_events.clone(),
        );
        let request_duration =
            Family::<RequestLabels, Histogram>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Request latency as each side saw it: reporter=source at the client app's socket (t11 - t0), reporter=destination at the inbound sidecar's (t8 - t3)",
            Unit::Seconds,
            request_duration.clone(),
        );
        let hop_duration = Family::<HopLabels, Histogram>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "hop_duration",
            "Time each hop of the sidecar data path adds to a request",
            Unit::Seconds,
            hop_duration.clone(),
        );
        let sidecar_overhead =
            Family::<OverheadLabels, Histogram>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "sidecar_overhead",
            "Time the sidecars add on one side: proxy hop plus redirect or delivery leg",
            Unit::Seconds,
            sidecar_overhead.clone(),
        );
        let requests = Family::<StatusLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests stitched into spans, by the side that reported them (both when one node saw both)",
            requests.clone(),
        );
        let proxy_retries = Family::<ServiceLabel, Counter>::default();
        registry.register(
            "proxy_retries",
            "Upstream attempts beyond the first a sidecar made for one request",
            proxy_retries.clone(),
        );
        let local_replies = Family::<LocalReplyLabels, Counter>::default();
        registry.register(
            "local_replies",
            "Requests a sidecar answered itself (no route, no healthy upstream, denied, rate limited, timeout), by status",
            local_replies.clone(),
        );
        let requests_unstitched = Family::<ReasonLabel, Counter>::default();
        for reason in crate::spans::stitch::Unstitched::ALL {
            let _ = requests_unstitched.get_or_create(&ReasonLabel {
                reason: reason.label(),
            });
        }
        registry.register(
            "requests_unstitched",
            "Requests or messages that could not be stitched into a span, by reason",
            requests_unstitched.clone(),
        );
        let metadata_objects = Family::<ResourceLabel, Gauge>::default();
        let metadata_events = Family::<ResourceLabel, Counter>::default();
        for resource in ["pods", "services"] {
            let _ = metadata_objects.get_or_create(&ResourceLabel { resource });
            let _ = metadata_events.get_or_create(&ResourceLabel { resource });
        }
        registry.register(
            "metadata_objects",
            "Pods and services the metadata source holds (the lab's, or this node's pods and every service from the API server)",
            metadata_objects.clone(),
        );
        registry.register(
            "metadata_events",
            "List and watch events the Kubernetes metadata source applied",
            metadata_events.clone(),
        );
        let metadata_relists = Counter::default();
        registry.register(
            "metadata_relists",
            "Complete lists of pods or services (at start, and after a watch expired with 410 Gone)",
            metadata_relists.clone(),
        );
        let metadata_errors = Counter::default();
        registry.register(
            "metadata_errors",
            "Errors from the Kubernetes API server; the watch is retried with backoff",
            metadata_errors.clone(),
        );
        Metrics {
            metadata_objects,
            metadata_events,
            metadata_relists,
            metadata_errors,
            process: super::process::ProcessMetrics::new(),
            request_duration,
            hop_duration,
            sidecar_overhead,
            requests,
            proxy_retries,
            local_replies,
            requests_unstitched,
            registry,
            events,
            events_lost,
            programs_attached,
            redirects,
            connections_opened,
            connections_closed,
            connect_duration,
            passthrough,
            otlp_exported,
            otlp_dropped,
            blackhole,
            bypass,
            retransmits,
            resets,
            rtt,
            min_rtt,
            flows_evicted,
            flows_relearned,
            tls_files_probed,
            tls_plaintext,
            h2_header_state_lost,
            h2_header_blocks,
            flows_tracked,
            meshed_netns,
            nat_watched_netns,
            agents_on_node,
            requests_in_flight,
            stitch_sockets,
            unknown_socket_events,
            workload_pairs: Default::default(),
        }
    }

    /// Requests whose spans went to the OTLP collector.
    pub fn otlp_exported(&self, n: u64) {
        self.otlp_exported.inc_by(n);
    }

    /// Requests whose spans were not sent, and why.
    pub fn otlp_dropped(&self, reason: &'static str, n: u64) {
        self.otlp_dropped
            .get_or_create(&ReasonLabel { reason })
            .inc_by(n);
    }

    /// (source, destination) as label values, folded into "other" past the cap.
    pub fn bounded_pair(&self, source: &str, destination: &str) -> (String, String) {
        let l = self.connection_labels("", "", source, destination);
        (l.source_workload, l.destination_service)
    }

    /// A span's (source workload, its namespace, destination service, its
    /// namespace) as label values; each namespaced pair counts against the
    /// cap, and past it all four are "other".
    fn span_labels(&self, span: &crate::spans::span::Span) -> [String; 4] {
        let ns = |n: &Option<String>| n.clone().unwrap_or_else(|| "unknown".into());
        let (src_ns, dst_ns) = (ns(&span.source_namespace), ns(&span.destination_namespace));
        let (s, d) = self.bounded_pair(
            &format!("{}\u{0}{src_ns}", span.source_workload),
            &format!("{}\u{0}{dst_ns}", span.destination_service),
        );
        let split = |v: String| match v.split_once('\u{0}') {
            Some((name, ns)) => (name.to_string(), ns.to_string()),
            None => (v.clone(), v),
        };
        let ((source, src_ns), (destination, dst_ns)) = (split(s), split(d));
        [source, src_ns, destination, dst_ns]
    }

    /// Records one stitched span.
    pub fn record_span(&self, span: &crate::spans::span::Span) {
        use crate::spans::span::Hop;
        let [source, source_ns, destination, destination_ns] = self.span_labels(span);
        // Each side this node saw reports the request, as Istio's sidecars
        // do: metrics from the client's and the server's nodes add up.
        for reporter in span.reporters() {
            if let Some(ns) = span.duration_ns(reporter) {
                self.request_duration
                    .get_or_create(&RequestLabels {
                        reporter: reporter.label(),
                        source_workload: source.clone(),
                        destination_service: destination.clone(),
                        method: method_label(&span.method),
                        status_class: span.status_class(),
                        request_protocol: span.protocol.label(),
                        source_workload_namespace: source_ns.clone(),
                        destination_service_namespace: destination_ns.clone(),
                    })
                    .observe(ns as f64 / 1e9);
            }
            self.requests
                .get_or_create(&StatusLabels {
                    reporter: reporter.label(),
                    source_workload: source.clone(),
                    destination_service: destination.clone(),
                    status_code: status_code_label(span.status),
                    request_protocol: span.protocol.label(),
                    grpc_response_status: grpc_status_label(span.grpc_status),
                    source_workload_namespace: source_ns.clone(),
                    destination_service_namespace: destination_ns.clone(),
                })
                .inc();
        }
        // One label set for all hops: the lookups take it by reference.
        let mut hop_labels = HopLabels {
            hop: "",
            reporter: "",
            source_workload: source.clone(),
            destination_service: destination.clone(),
            source_workload_namespace: source_ns,
            destination_service_namespace: destination_ns,
        };
        for hop in Hop::ALL {
            if let Some(ns) = span.hop_ns(hop) {
                hop_labels.hop = hop.label();
                hop_labels.reporter = hop.reporter().label();
                self.hop_duration
                    .get_or_create(&hop_labels)
                    .observe(ns as f64 / 1e9);
            }
        }
        for (direction, workload) in [("outbound", &source), ("inbound", &destination)] {
            if let Some(ns) = span.sidecar_overhead_ns(direction) {
                self.sidecar_overhead
                    .get_or_create(&OverheadLabels {
                        direction,
                        workload: workload.clone(),
                    })
                    .observe(ns as f64 / 1e9);
            }
        }
        if let Some(by) = span.local_reply {
            self.local_replies
                .get_or_create(&LocalReplyLabels {
                    direction: by.label(),
                    source_workload: source.clone(),
                    destination_service: destination.clone(),
                    status_code: status_code_label(span.status),
                })
                .inc();
        }
        if span.retries > 0 {
            self.proxy_retries
                .get_or_create(&ServiceLabel {
                    destination_service: destination,
                })
                .inc_by(u64::from(span.retries));
        }
    }

    /// Connection labels, with workload pairs beyond the cap folded into "other".
    pub fn connection_labels(
        &self,
        leg: &'static str,
        direction: &'static str,
        source: &str,
        destination: &str,
    ) -> ConnectionLabels {
        let mut pairs = self
            .workload_pairs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = (source.to_string(), destination.to_string());
        let known = pairs.contains(&key);
        let (source_workload, destination_service) = if known || pairs.len() < MAX_WORKLOAD_PAIRS {
            if !known {
                pairs.insert(key.clone());
            }
            key
        } else {
            ("other".to_string(), "other".to_string())
        };
        ConnectionLabels {
            leg,
            direction,
            source_workload,
            destination_service,
        }
    }

    /// The exposition in the Prometheus text format 0.0.4, for clients that
    /// do not ask for OpenMetrics (curl, promtool, older scrapers).
    pub fn encode_prometheus_text(&self) -> String {
        openmetrics_to_prometheus_text(&self.encode())
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        self.process.refresh();
        let mut out = String::new();
        encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &self.process.registry))
            .and_then(|()| encode_registry(&mut out, &self.process.heap_registry))
            .and_then(|()| encode_eof(&mut out))
            .expect("writing to a String cannot fail");
        out
    }

    /// Copies what the metadata source holds.
    pub fn record_metadata(&self, meta: &dyn crate::flows::metadata::Metadata) {
        let (pods, services) = meta.counts();
        for (resource, objects) in [("pods", pods), ("services", services)] {
            self.metadata_objects
                .get_or_create(&ResourceLabel { resource })
                .set(objects as i64);
        }
    }

    /// Copies the Kubernetes metadata source's counters.
    pub fn record_kubernetes(&self, kube: &crate::flows::kubernetes::KubeMetadata) {
        use std::sync::atomic::Ordering::Relaxed;
        for (resource, events) in [
            ("pods", &kube.stats.pod_events),
            ("services", &kube.stats.service_events),
        ] {
            self.metadata_events
                .get_or_create(&ResourceLabel { resource })
                .inner()
                .store(events.load(Relaxed), Relaxed);
        }
        self.metadata_relists
            .inner()
            .store(kube.stats.relists.load(Relaxed), Relaxed);
        self.metadata_errors
            .inner()
            .store(kube.stats.errors.load(Relaxed), Relaxed);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Converts prometheus-client's OpenMetrics output to the classic text format:
/// counter families are named with their `_total` suffix there, and there is
/// no `# EOF` or `# UNIT`. Histograms and gauges are written the same way.
pub fn openmetrics_to_prometheus_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Turns the kernel's cumulative loss counts into counter increments.
#[derive(Debug, Default)]
pub struct LossTracker {
    seen: [u64; LossReason::COUNT as usize],
}

impl LossTracker {
    /// Everything lost so far.
    pub fn total(&self) -> u64 {
        self.seen.iter().sum()
    }

    /// Records the kernel's current totals and returns how much each grew.
    pub fn update(&mut self, totals: &[(LossReason, u64)]) -> Vec<(LossReason, u64)> {
        totals
            .iter()
            .map(|&(r, total)| {
                let slot = &mut self.seen[r as usize];
                let delta = total.saturating_sub(*slot);
                *slot = (*slot).max(total);
                (r, delta)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_a_bounded_label() {
        assert_eq!(status_code_label(200), "200");
        assert_eq!(status_code_label(0), "0");
        assert_eq!(status_code_label(599), "599");
        assert_eq!(status_code_label(600), "other");
        assert_eq!(status_code_label(999), "other");
        let values: std::collections::HashSet<String> =
            (0..=u16::MAX).map(status_code_label).collect();
        assert_eq!(values.len(), 502);
    }

    #[test]
    fn grpc_status_labels_are_the_seventeen_codes() {
        assert_eq!(grpc_status_label(None), "");
        assert_eq!(grpc_status_label(Some(0)), "0");
        assert_eq!(grpc_status_label(Some(16)), "16");
        assert_eq!(grpc_status_label(Some(17)), "other");
        assert_eq!(grpc_status_label(Some(u32::MAX)), "other");
    }

    #[test]
    fn exposition_has_the_contract_names() {
        let m = Metrics::new();
        let text = m.encode();
        assert!(text.contains("mesh_trace_build_info{version="), "{text}");
        assert!(text.contains("mesh_trace_events_lost_total{reason=\"ringbuf_full\"} 0"));
        assert!(text.contains("mesh_trace_events_lost_total{reason=\"map_full\"} 0"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn classic_text_names_counters_with_total() {
        let m = Metrics::new();
        let text = m.encode_prometheus_text();
        assert!(
            text.contains("# HELP mesh_trace_events_lost_total Kernel events"),
            "{text}"
        );
        assert!(text.contains("# TYPE mesh_trace_events_lost_total counter"));
        assert!(text.contains("# TYPE mesh_trace_build_info gauge"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn loss_tracker_reports_growth_only() {
        let mut t = LossTracker::default();
        let d = t.update(&[(LossReason::RingBufFull, 5), (LossReason::MapFull, 0)]);
        assert_eq!(
            d,
            vec![(LossReason::RingBufFull, 5), (LossReason::MapFull, 0)]
        );
        let d = t.update(&[(LossReason::RingBufFull, 7), (LossReason::MapFull, 1)]);
        assert_eq!(
            d,
            vec![(LossReason::RingBufFull, 2), (LossReason::MapFull, 1)]
        );
    }
}
