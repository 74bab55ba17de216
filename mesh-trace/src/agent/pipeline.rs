//! What the agent does with each kernel event: count it, feed the flow
//! table, and turn the legs it produces into metrics.
use std::sync::Arc;

use mesh_trace_common::EventKind;
use prometheus_client::metrics::counter::Counter;

use crate::{
    agent::metrics::{KindLabel, LegDirectionLabels, LegSideLabels, Metrics, ResetLabels},
    flows::{
        health::{Health, Side},
        legs::LegKind,
        socket::{INBOUND_PORT, OUTBOUND_PORT},
        table::{FlowTable, LegRecord, TableStats},
    },
    kernel::events::{kind_label, reset_reason_label, Event, ALL_KINDS},
    spans::{
        span::Span,
        stitch::{StitchConfig, Stitcher, Unstitched},
    },
};

/// Unknown sockets remembered between two looks at the kernel's lists.
pub const UNKNOWN_MAX: usize = 4096;

pub struct Pipeline {
    pub table: FlowTable,
    pub stitcher: Stitcher,
    /// Sockets that moved data while the flow table did not know them (their
    /// opening event was lost), at most [`UNKNOWN_MAX`]: the agent learns
    /// them again from the kernel's socket lists.
    pub unknown_sockets: std::collections::HashSet<u64>,
    spans: Vec<Span>,
    reported_unstitched: std::collections::HashMap<Unstitched, u64>,
    reported_tls: [u64; 2],
    reported_h2_blocks: [u64; 2],
    /// HTTP/2 header states lost, by why, as last reported.
    reported_h2_lost: std::collections::HashMap<crate::spans::h2::LostBecause, u64>,
    metrics: Arc<crate::agent::http::AgentState>,
    reported: TableStats,
    legs: Vec<LegRecord>,
    /// Count REDIRECTs from the netfilter programs rather than from accepts
    /// on 15001/15006.
    redirects_at_nat: bool,
    /// `mesh_trace_events_total` by kind, looked up once: the family's
    /// lookup (a lock and a hash) per event was a measurable part of the
    /// agent's time.
    events_by_kind: Vec<(EventKind, Counter)>,
}

impl Pipeline {
    pub fn new(table: FlowTable, state: Arc<crate::agent::http::AgentState>) -> Pipeline {
        let events_by_kind = ALL_KINDS
            .iter()
            .map(|&kind| {
                let label = KindLabel {
                    kind: kind_label(kind),
                };
                (kind, state.metrics.events.get_or_create(&label).clone())
            })
            .collect();
        Pipeline {
            events_by_kind,
            table,
            stitcher: Stitcher::new(StitchConfig::default()),
            unknown_sockets: std::collections::HashSet::new(),
            spans: Vec::new(),
            reported_unstitched: Default::default(),
            reported_tls: [0; 2],
            reported_h2_blocks: [0; 2],
            reported_h2_lost: std::collections::HashMap::new(),
            metrics: state,
            reported: TableStats::default(),
            legs: Vec::new(),
            redirects_at_nat: false,
        }
    }

    /// Whether REDIRECTs are counted where the nat table does them (netfilter
    /// programs) or, without them, from the sidecars' accepted sockets.
    pub fn count_redirects_at_nat(&mut self, yes: bool) {
        self.redirects_at_nat = yes;
    }

    fn m(&self) -> &Metrics {
        &self.metrics.metrics
    }

    /// Applies one event; legs it opened or closed are appended to `out`,
    /// spans it completed to `spans_out`.
    pub fn handle(&mut self, ev: &Event, out: &mut Vec<LegRecord>, spans_out: &mut Vec<Span>) {
        let m = &self.metrics.metrics;
        let kind = ev.kind();
        if let Some((_, counter)) = self.events_by_kind.iter().find(|(k, _)| *k == kind) {
            counter.inc();
        }
        let port_direction = |port: u16| match port {
            OUTBOUND_PORT => Some("outbound"),
            INBOUND_PORT => Some("inbound"),
            _ => None,
        };
        let redirected = match ev {
            Event::Redirect(r) if self.redirects_at_nat => {
                port_direction(u16::from_be(r.new_dport_be))
            }
            Event::Established(s) if s.active == 0 && !self.redirects_at_nat => {
                port_direction(s.local.port)
            }
            _ => None,
        };
        if let Some(direction) = redirected {
            m.redirects
                .get_or_create(&crate::agent::metrics::DirectionLabel { direction })
                .inc();
        }
        match ev {
            // Data first: the table forgets a socket at its close.
            Event::Data(_) | Event::H2Frame(_) => {
                match ev {
                    Event::Data(d) => {
                        if self.table.socket(d.sock_cookie).is_none()
                            && self.unknown_sockets.len() < UNKNOWN_MAX
                        {
                            self.unknown_sockets.insert(d.sock_cookie);
                        }
                        self.stitcher.data(&self.table, d, &mut self.spans);
                    }
                    Event::H2Frame(f) => self.stitcher.h2_frame(&self.table, f, &mut self.spans),
                    _ => {}
                }
                if !self.spans.is_empty() {
                    let now = crate::clock::mono_ns();
                    let mut live = self.metrics.live.lock().unwrap_or_else(|p| p.into_inner());
                    for span in &self.spans {
                        m.record_span(span);
                        live.record(span, now);
                    }
                }
                spans_out.append(&mut self.spans);
            }
            Event::Closed(s) => self.stitcher.closed(s.sock_cookie),
            _ => {}
        }
        let start = self.legs.len();
        self.table.apply(ev, &mut self.legs);
        self.forget_evicted();
        self.account(start);
        self.account_health();
        out.append(&mut self.legs);
    }

    /// Sockets the flow table evicted (full, or idle an hour: one whose
    /// close event was lost ends here) leave the stitcher too.
    fn forget_evicted(&mut self) {
        for cookie in self.table.take_evicted() {
            self.stitcher.closed(cookie);
        }
    }

    /// Periodic work: classify sockets whose peer never came, age out old ones.
    pub fn tick(&mut self, now_ns: u64, out: &mut Vec<LegRecord>) {
        let start = self.legs.len();
        self.table.tick(now_ns, &mut self.legs);
        self.forget_evicted();
        self.account(start);
        self.account_health();
        out.append(&mut self.legs);
        let stats = self.table.stats;
        let m = &self.metrics.metrics;
        m.flows_evicted
            .inc_by(stats.evicted - self.reported.evicted);
        m.unknown_socket_events
            .inc_by(stats.unknown_socket_events - self.reported.unknown_socket_events);
        m.flows_tracked.set(self.table.len() as i64);
        self.reported = stats;
        self.stitcher.expire(now_ns);
        m.requests_in_flight.set(self.stitcher.pending() as i64);
        m.stitch_sockets.set(self.stitcher.open_sockets() as i64);
        for (reason, &n) in &self.stitcher.unstitched {
            let before = self.reported_unstitched.insert(*reason, n).unwrap_or(0);
            m.requests_unstitched
                .get_or_create(&crate::agent::metrics::ReasonLabel {
                    reason: reason.label(),
                })
                .inc_by(n - before);
        }
        for (i, result) in ["joined", "unjoined"].into_iter().enumerate() {
            let n = self.stitcher.tls_plaintext[i];
            m.tls_plaintext
                .get_or_create(&crate::agent::metrics::ResultLabel { result })
                .inc_by(n - self.reported_tls[i]);
            self.reported_tls[i] = n;
        }
        for (why, &n) in &self.stitcher.h2.lost {
            let before = self.reported_h2_lost.insert(*why, n).unwrap_or(0);
            m.h2_header_state_lost
                .get_or_create(&crate::agent::metrics::ReasonLabel {
                    reason: why.label(),
                })
                .inc_by(n - before);
        }
        for (i, result) in ["decoded", "undecodable"].into_iter().enumerate() {
            let n = self.stitcher.h2.blocks[i];
            m.h2_header_blocks
                .get_or_create(&crate::agent::metrics::ResultLabel { result })
                .inc_by(n - self.reported_h2_blocks[i]);
            self.reported_h2_blocks[i] = n;
        }
        let mut info = self.metrics.info.lock().unwrap_or_else(|p| p.into_inner());
        info.flows_tracked = self.table.len();
        info.requests_in_flight = self.stitcher.pending();
    }

    /// Retransmits, resets and RTT samples, on the legs they happened on.
    fn account_health(&mut self) {
        let health = self.table.take_health();
        if health.is_empty() {
            return;
        }
        let m = &self.metrics.metrics;
        let now = crate::clock::mono_ns();
        let mut live = self.metrics.live.lock().unwrap_or_else(|p| p.into_inner());
        for h in &health {
            let leg = h.leg.as_ref().map_or("unknown", |l| l.kind.label());
            if let Some(l) = &h.leg {
                live.record_tcp(&l.destination_service, leg, h.health, now);
            }
            let side = h.side.map_or("unknown", Side::label);
            match h.health {
                Health::Retransmits(n) => {
                    m.retransmits
                        .get_or_create(&LegSideLabels { leg, side })
                        .inc_by(u64::from(n));
                }
                Health::ResetSent(reason) => {
                    m.resets
                        .get_or_create(&ResetLabels {
                            leg,
                            side,
                            direction: "sent",
                            reason: reset_reason_label(reason),
                        })
                        .inc();
                }
                Health::ResetReceived => {
                    m.resets
                        .get_or_create(&ResetLabels {
                            leg,
                            side,
                            direction: "received",
                            reason: "unknown",
                        })
                        .inc();
                }
                Health::Rtt { srtt_us, min_us } => {
                    let labels = LegSideLabels { leg, side };
                    m.rtt
                        .get_or_create(&labels)
                        .observe(f64::from(srtt_us) / 1e6);
                    if let Some(min) = min_us {
                        m.min_rtt
                            .get_or_create(&labels)
                            .observe(f64::from(min) / 1e6);
                    }
                }
            }
        }
    }

    fn account(&self, from: usize) {
        let m = self.m();
        for rec in &self.legs[from..] {
            let labels = m.connection_labels(
                rec.leg.label(),
                rec.direction,
                &rec.source_workload,
                &rec.destination_service,
            );
            if rec.event == "open" {
                m.connections_opened.get_or_create(&labels).inc();
                match rec.leg {
                    LegKind::Passthrough => m.passthrough.inc(),
                    LegKind::Bypass => m.bypass.inc(),
                    _ => 0,
                };
                if let Some(c) = rec.client.as_ref() {
                    if let Some(connect) = &c.connect {
                        let secs = c.established_ns.saturating_sub(connect.ts_ns) as f64 / 1e9;
                        m.connect_duration
                            .get_or_create(&LegDirectionLabels {
                                leg: rec.leg.label(),
                                direction: rec.direction,
                            })
                            .observe(secs);
                    }
                }
            } else {
                m.connections_closed.get_or_create(&labels).inc();
                if rec.leg == LegKind::Blackhole {
                    m.blackhole.inc();
                }
            }
        }
    }
}
