//! The flow table: kernel socket events in, legs out. Bounded: at most
//! `max_sockets` sockets (least recently used evicted first, counted), and
//! sockets idle longer than `max_age` are dropped.
use std::{collections::VecDeque, net::SocketAddr, num::NonZeroUsize, sync::Arc};

use foldhash::{HashMap, HashMapExt as _};
use lru::LruCache;
use serde::Serialize;

use super::{
    health::{Health, HealthRecord, LegRef, Side, PENDING_MAX},
    legs::{classify, classify_alone, JoinKey, LegKind},
    metadata::Metadata,
    socket::{ConnectInfo, Role, Socket, Task},
};
use crate::kernel::events::{socket_addr, Event};

#[derive(Clone, Debug)]
pub struct FlowTableConfig {
    /// Sockets tracked at once.
    pub max_sockets: usize,
    /// How long a socket may go without events before it is dropped.
    pub max_age_ns: u64,
    /// How long a socket waits for its peer before it is classified alone.
    pub join_wait_ns: u64,
}

impl Default for FlowTableConfig {
    fn default() -> Self {
        FlowTableConfig {
            max_sockets: 65_536,
            max_age_ns: 3_600 * 1_000_000_000,
            join_wait_ns: 500_000_000,
        }
    }
}

/// Opened or closed leg, as `mesh-trace flows` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct LegRecord {
    /// "open" or "close".
    pub event: &'static str,
    pub leg: LegKind,
    pub direction: &'static str,
    pub source_workload: String,
    pub destination_service: String,
    /// What the client asked connect() for (e.g. a service VIP), when known.
    pub original_dst: Option<SocketAddr>,
    pub client: Option<Socket>,
    pub server: Option<Socket>,
    pub opened_ns: u64,
    pub closed_ns: Option<u64>,
}

/// Counters of what the table dropped or could not use.
#[derive(Clone, Copy, Debug, Default)]
pub struct TableStats {
    /// Sockets evicted because the table was full or they were too old.
    pub evicted: u64,
    /// Events about sockets the table does not know (e.g. opened before the
    /// agent started, or evicted).
    pub unknown_socket_events: u64,
}

struct Leg {
    kind: LegKind,
    client: Option<u64>,
    server: Option<u64>,
    original_dst: Option<SocketAddr>,
    source_workload: String,
    destination_service: String,
    opened_ns: u64,
}

impl Leg {
    fn leg_ref(&self) -> LegRef {
        LegRef {
            kind: self.kind,
            destination_service: self.destination_service.clone(),
        }
    }
}

type LegId = u64;

struct Entry {
    sock: Socket,
    leg: Option<LegId>,
    waiting: Option<JoinKey>,
    last_event_ns: u64,
    /// Health observed before the socket's leg was known.
    pending: Vec<Health>,
}

/// Recent sidecar upstream connections per namespace, to tell a blackholed
/// connection (no upstream at all) from a proxied one.
const RECENT_UPSTREAMS: usize = 256;
/// Original destinations of app connections remembered per namespace.
const RECENT_ORIGINALS: usize = 64;
/// Sockets remembered after they left the table, for the resets that come
/// after a close (an abortive close changes the state first).
const CLOSED_REMEMBERED: usize = 4_096;
/// Connecting sockets whose SYN was retransmitted, held until established.
const CONNECTING_HELD: usize = 4_096;
/// How long a connecting socket's retransmits wait to be established.
const CONNECTING_WAIT_NS: u64 = 60_000_000_000;

pub struct FlowTable {
    cfg: FlowTableConfig,
    meta: Arc<dyn Metadata>,
    entries: LruCache<u64, Entry>,
    connects: LruCache<u64, ConnectInfo>,
    waiting: HashMap<JoinKey, u64>,
    legs: HashMap<LegId, Leg>,
    next_leg: LegId,
    upstreams: LruCache<u64, VecDeque<(SocketAddr, u64)>>,
    /// Recent original destinations of app connections per namespace: a
    /// sidecar upstream connection to one of them went where the app asked
    /// (passthrough), one elsewhere to an endpoint the sidecar chose.
    originals: LruCache<u64, VecDeque<SocketAddr>>,
    /// Leg and side of sockets that left the table.
    closed_sockets: LruCache<u64, (LegRef, Side)>,
    /// Connecting sockets' retransmits: first seen, segments.
    connecting: LruCache<u64, (u64, u32)>,
    /// SYN-ACKs resent for connections being accepted, by (netns, local,
    /// remote) as their server sockets will have: first seen, segments.
    accepting: LruCache<(u64, SocketAddr, SocketAddr), (u64, u32)>,
    /// TCP health put on its legs, for the caller to take.
    health: Vec<HealthRecord>,
    /// Sockets evicted (table full, or idle too long) since the caller last
    /// took them: whoever keeps state per socket forgets them too.
    evicted: Vec<u64>,
    pub stats: TableStats,
}

impl FlowTable {
    pub fn new(cfg: FlowTableConfig, meta: Arc<dyn Metadata>) -> FlowTable {
        let cap = NonZeroUsize::new(cfg.max_sockets.max(1)).expect("max(1)");
        FlowTable {
            entries: LruCache::new(cap),
            connects: LruCache::new(cap),
            waiting: HashMap::new(),
            legs: HashMap::new(),
            next_leg: 1,
            upstreams: LruCache::new(NonZeroUsize::new(4096).expect("non-zero")),
            originals: LruCache::new(NonZeroUsize::new(4096).expect("non-zero")),
            closed_sockets: LruCache::new(NonZeroUsize::new(CLOSED_REMEMBERED).expect("non-zero")),
            connecting: LruCache::new(NonZeroUsize::new(CONNECTING_HELD).expect("non-zero")),
            accepting: LruCache::new(NonZeroUsize::new(CONNECTING_HELD).expect("non-zero")),
            health: Vec::new(),
            evicted: Vec::new(),
            stats: TableStats::default(),
            cfg,
            meta,
        }
    }

    /// Sockets evicted since the last call (full, or idle too long).
    pub fn take_evicted(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.evicted)
    }

    /// Sockets tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Applies one kernel event; legs opened or closed by it go to `out`.
    pub fn apply(&mut self, ev: &Event, out: &mut Vec<LegRecord>) {
        match ev {
            Event::Connect(c) => {
                let info = ConnectInfo {
                    dst: socket_addr(&c.dst),
                    task: Task::from_kernel(&c.task),
                    ts_ns: c.header.ts_ns,
                };
                if info.task.is_proxy() {
                    self.note_upstream(c.netns_cookie, info.dst, info.ts_ns);
                }
                self.connects.put(c.sock_cookie, info);
            }
            Event::Established(s) => self.established(s, out),
            Event::Owner(o) => match self.entries.get_mut(&o.sock_cookie) {
                Some(e) => {
                    e.last_event_ns = o.header.ts_ns;
                    e.sock
                        .owner
                        .get_or_insert_with(|| Task::from_kernel(&o.task));
                }
                None => self.stats.unknown_socket_events += 1,
            },
            Event::TcpIssue(t) => {
                if let Some(h) = Health::from_kernel(t) {
                    let connecting = t.sk_state == mesh_trace_common::TCP_SYN_SENT;
                    self.observe(t.sock_cookie, t.header.ts_ns, h, connecting);
                }
            }
            Event::Closed(s) => self.closed(s, out),
            Event::SynAckRetransmit(s) => {
                let key = (
                    s.netns_cookie,
                    socket_addr(&s.local),
                    socket_addr(&s.remote),
                );
                let (held, ts) = (&mut self.accepting, s.header.ts_ns);
                hold_handshake(held, key, ts, 1, Side::Server, &mut self.health);
            }
            // Counted by the pipeline; the joins use the sockets themselves.
            Event::Redirect(_) => {}
            // Decoded by the stitcher; a data event for the same call
            // keeps the socket young.
            Event::H2Frame(_) => {}
            // Keeps busy sockets at the young end of the LRU.
            Event::Data(d) => {
                if let Some(e) = self.entries.get_mut(&d.sock_cookie) {
                    e.last_event_ns = d.header.ts_ns;
                }
            }
        }
    }

    /// A tracked socket.
    pub fn socket(&self, cookie: u64) -> Option<&Socket> {
        self.entries.peek(&cookie).map(|e| &e.sock)
    }

    /// The other end of a socket's connection, when seen on this node.
    pub fn peer(&self, cookie: u64) -> Option<u64> {
        let leg = self.legs.get(&self.entries.peek(&cookie)?.leg?)?;
        match (leg.client, leg.server) {
            (Some(c), Some(s)) if c == cookie => Some(s),
            (Some(c), Some(s)) if s == cookie => Some(c),
            _ => None,
        }
    }

    /// The leg of a socket and its labels.
    pub fn leg_info(&self, cookie: u64) -> Option<(LegKind, &str, &str)> {
        let leg = self.legs.get(&self.entries.peek(&cookie)?.leg?)?;
        Some((leg.kind, &leg.source_workload, &leg.destination_service))
    }

    /// (source workload, destination service) of a request read by the
    /// server socket `cookie` from a client this node does not trace: the
    /// leg's, else the client's workload from its address and the service
    /// of the pod it reached.
    pub fn server_side_labels(&self, cookie: u64) -> (String, String) {
        if let Some((_, s, d)) = self.leg_info(cookie) {
            return (s.to_string(), d.to_string());
        }
        let sock = self.entries.peek(&cookie).map(|e| &e.sock);
        self.labels(LegKind::Mesh, None, sock)
    }

    /// The Kubernetes namespaces of (the source workload, the destination
    /// service) of a request that started on socket `cookie`: the app's
    /// socket to its sidecar, or (`server_side`) an inbound sidecar's
    /// socket from a client this node does not trace.
    pub fn namespaces(&self, cookie: u64, server_side: bool) -> (Option<String>, Option<String>) {
        let Some(sock) = self.entries.peek(&cookie).map(|e| &e.sock) else {
            return (None, None);
        };
        let own = sock.pod.as_ref().map(|p| p.namespace.clone());
        if server_side {
            let client = self
                .meta
                .pod_by_ip(sock.remote.ip())
                .map(|p| p.namespace.clone());
            return (client, own);
        }
        let service = self
            .leg_info(cookie)
            .and_then(|(_, _, d)| self.meta.service_namespace(d));
        (own, service)
    }

    /// TCP health put on its legs since the last call.
    pub fn take_health(&mut self) -> Vec<HealthRecord> {
        std::mem::take(&mut self.health)
    }

    /// Puts one health observation on its socket's leg: now when the leg
    /// is known (or was, for a socket already closed), later when the
    /// socket is still waiting for its peer or still connecting.
    fn observe(&mut self, cookie: u64, ts_ns: u64, h: Health, connecting: bool) {
        if let Some(e) = self.entries.get_mut(&cookie) {
            e.last_event_ns = ts_ns;
            match h {
                Health::Retransmits(n) => e.sock.retransmits += n,
                Health::ResetSent(_) | Health::ResetReceived => e.sock.resets += 1,
                Health::Rtt { .. } => {}
            }
            let side = Side::of(e.sock.active);
            let leg = e.leg;
            match leg.and_then(|id| self.legs.get(&id)) {
                Some(l) => self.health.push(HealthRecord {
                    leg: Some(l.leg_ref()),
                    side: Some(side),
                    health: h,
                }),
                None if e.pending.len() < PENDING_MAX => e.pending.push(h),
                None => self.health.push(HealthRecord {
                    leg: None,
                    side: Some(side),
                    health: h,
                }),
            }
            return;
        }
        if let Some((leg, side)) = self.closed_sockets.peek(&cookie) {
            self.health.push(HealthRecord {
                leg: Some(leg.clone()),
                side: Some(*side),
                health: h,
            });
            return;
        }
        match h {
            // A socket still connecting has no entry until established.
            Health::Retransmits(n) if connecting => {
                let held = &mut self.connecting;
                hold_handshake(held, cookie, ts_ns, n, Side::Client, &mut self.health);
            }
            _ => {
                self.stats.unknown_socket_events += 1;
                self.health.push(HealthRecord {
                    leg: None,
                    side: None,
                    health: h,
                });
            }
        }
    }

    /// Reports what a socket held while its leg was unknown.
    fn flush_pending(&mut self, cookie: u64) {
        let Some(e) = self.entries.peek_mut(&cookie) else {
            return;
        };
        let pending = std::mem::take(&mut e.pending);
        let side = Side::of(e.sock.active);
        let leg = e.leg.and_then(|id| self.legs.get(&id)).map(Leg::leg_ref);
        self.health
            .extend(pending.into_iter().map(|health| HealthRecord {
                leg: leg.clone(),
                side: Some(side),
                health,
            }));
    }

    fn note_upstream(&mut self, netns: u64, dst: SocketAddr, ts: u64) {
        let recent = self.upstreams.get_or_insert_mut(netns, VecDeque::new);
        if recent.len() == RECENT_UPSTREAMS {
            recent.pop_front();
        }
        recent.push_back((dst, ts));
    }

    fn note_original(&mut self, netns: u64, dst: SocketAddr) {
        let recent = self.originals.get_or_insert_mut(netns, VecDeque::new);
        if !recent.contains(&dst) {
            if recent.len() == RECENT_ORIGINALS {
                recent.pop_front();
            }
            recent.push_back(dst);
        }
    }

    fn established(&mut self, s: &mesh_trace_common::SockEvent, out: &mut Vec<LegRecord>) {
        let active = s.active == 1;
        let local = socket_addr(&s.local);
        let connect = self.connects.pop(&s.sock_cookie);
        let sock = Socket {
            cookie: s.sock_cookie,
            netns: s.netns_cookie,
            local,
            remote: socket_addr(&s.remote),
            active,
            role: Socket::infer_role(active, local, connect.as_ref()),
            connect,
            owner: None,
            pod: self.meta.pod_by_netns(s.netns_cookie),
            established_ns: s.header.ts_ns,
            closed_ns: None,
            srtt_us: s.srtt_us,
            bytes_acked: s.bytes_acked,
            bytes_received: s.bytes_received,
            retransmits: 0,
            resets: 0,
        };
        if let (Role::AppClient, Some(c)) = (sock.role, &sock.connect) {
            self.note_original(sock.netns, c.dst);
        }
        let key = JoinKey::new(sock.netns, if active { sock.local } else { sock.remote });
        let cookie = sock.cookie;
        // Only an opposite end joins: two outgoing sockets with one key
        // means the older one is stale (its peer was never seen).
        let peer = self.waiting.remove(&key).filter(|p| {
            self.entries
                .peek(p)
                .is_some_and(|e| e.sock.active != active)
        });
        let mut pending = Vec::new();
        let held = if active {
            self.connecting.pop(&cookie)
        } else {
            self.accepting.pop(&(sock.netns, sock.local, sock.remote))
        };
        if let Some((_, segs)) = held {
            pending.push(Health::Retransmits(segs));
        }
        if s.srtt_us > 0 {
            // The handshake's one sample: the minimum so far too.
            pending.push(Health::Rtt {
                srtt_us: s.srtt_us,
                min_us: Some(s.srtt_us),
            });
        }
        self.insert(
            cookie,
            Entry {
                sock,
                leg: None,
                waiting: None,
                last_event_ns: s.header.ts_ns,
                pending,
            },
        );
        match peer.filter(|p| self.entries.contains(p)) {
            Some(peer) => {
                if let Some(e) = self.entries.peek_mut(&peer) {
                    e.waiting = None;
                }
                let (client, server) = if active {
                    (cookie, peer)
                } else {
                    (peer, cookie)
                };
                self.open_joined(client, server, out);
            }
            None => {
                self.waiting.insert(key, cookie);
                if let Some(e) = self.entries.peek_mut(&cookie) {
                    e.waiting = Some(key);
                }
            }
        }
    }

    fn insert(&mut self, cookie: u64, entry: Entry) {
        if let Some((old, evicted)) = self.entries.push(cookie, entry) {
            if old != cookie {
                self.evicted.push(old);
                self.forget(evicted);
                self.stats.evicted += 1;
            }
        }
    }

    /// Drops every reference to an entry that left the table; what it
    /// held of TCP health is reported on its leg, if it had one.
    fn forget(&mut self, e: Entry) {
        if let Some(k) = e.waiting {
            self.waiting.remove(&k);
        }
        let side = Side::of(e.sock.active);
        let leg = e.leg.and_then(|id| self.legs.get(&id)).map(Leg::leg_ref);
        if let Some(leg) = &leg {
            self.closed_sockets.put(e.sock.cookie, (leg.clone(), side));
        }
        self.health
            .extend(e.pending.iter().map(|&health| HealthRecord {
                leg: leg.clone(),
                side: Some(side),
                health,
            }));
        if let Some(id) = e.leg {
            if let Some(leg) = self.legs.get_mut(&id) {
                if leg.client == Some(e.sock.cookie) {
                    leg.client = None;
                }
                if leg.server == Some(e.sock.cookie) {
                    leg.server = None;
                }
                if leg.client.is_none() && leg.server.is_none() {
                    self.legs.remove(&id);
                }
            }
        }
    }

    fn open_joined(&mut self, client: u64, server: u64, out: &mut Vec<LegRecord>) {
        let (Some(c), Some(s)) = (self.entries.peek(&client), self.entries.peek(&server)) else {
            return;
        };
        let kind = classify(&c.sock, &s.sock);
        let (src, dst) = self.labels(kind, Some(&c.sock), Some(&s.sock));
        let leg = Leg {
            kind,
            client: Some(client),
            server: Some(server),
            original_dst: c.sock.connect.as_ref().map(|i| i.dst),
            source_workload: src,
            destination_service: dst,
            opened_ns: c.sock.established_ns.min(s.sock.established_ns),
        };
        self.open(leg, out);
    }

    fn open_alone(&mut self, cookie: u64, out: &mut Vec<LegRecord>) {
        let Some(e) = self.entries.peek(&cookie) else {
            return;
        };
        // A meshed pod known from metadata; else, without metadata, an
        // endpoint the sidecar chose rather than where an app asked to go
        // (a service address resolved to a pod).
        let dst_is_meshed = match self.meta.pod_by_ip(e.sock.remote.ip()) {
            Some(pod) => pod.sidecar,
            None => !self
                .originals
                .peek(&e.sock.netns)
                .is_some_and(|r| r.contains(&e.sock.remote)),
        };
        let kind = classify_alone(&e.sock, dst_is_meshed);
        let (client, server) = if e.sock.active {
            (Some(&e.sock), None)
        } else {
            (None, Some(&e.sock))
        };
        let (src, dst) = self.labels(kind, client, server);
        let leg = Leg {
            kind,
            client: e.sock.active.then_some(cookie),
            server: (!e.sock.active).then_some(cookie),
            original_dst: e.sock.connect.as_ref().map(|i| i.dst),
            source_workload: src,
            destination_service: dst,
            opened_ns: e.sock.established_ns,
        };
        self.open(leg, out);
    }

    fn open(&mut self, leg: Leg, out: &mut Vec<LegRecord>) {
        let id = self.next_leg;
        self.next_leg += 1;
        for cookie in [leg.client, leg.server].into_iter().flatten() {
            if let Some(e) = self.entries.peek_mut(&cookie) {
                e.leg = Some(id);
            }
        }
        out.push(self.record("open", &leg));
        let ends = [leg.client, leg.server];
        self.legs.insert(id, leg);
        for cookie in ends.into_iter().flatten() {
            self.flush_pending(cookie);
        }
    }

    fn record(&self, event: &'static str, leg: &Leg) -> LegRecord {
        let sock = |c: Option<u64>| {
            c.and_then(|c| self.entries.peek(&c))
                .map(|e| e.sock.clone())
        };
        let client = sock(leg.client);
        let server = sock(leg.server);
        let closed_ns = [&client, &server]
            .iter()
            .filter_map(|s| s.as_ref().and_then(|s| s.closed_ns))
            .max();
        LegRecord {
            event,
            leg: leg.kind,
            direction: leg.kind.direction(),
            source_workload: leg.source_workload.clone(),
            destination_service: leg.destination_service.clone(),
            original_dst: leg.original_dst,
            client,
            server,
            opened_ns: leg.opened_ns,
            closed_ns: if event == "close" { closed_ns } else { None },
        }
    }

    /// source_workload and destination_service for a leg; bounded by the
    /// metadata: names of workloads and services, or "unknown"/"external".
    fn labels(
        &self,
        kind: LegKind,
        client: Option<&Socket>,
        server: Option<&Socket>,
    ) -> (String, String) {
        let workload =
            |s: Option<&Socket>| s.and_then(|s| s.pod.as_ref()).map(|p| p.workload.clone());
        let source = workload(client)
            .or_else(|| {
                // The server saw the client's address: a pod IP names it.
                server
                    .and_then(|s| self.meta.pod_by_ip(s.remote.ip()))
                    .map(|p| p.workload.clone())
            })
            .or_else(|| {
                if kind == LegKind::Delivery {
                    workload(server)
                } else {
                    None
                }
            })
            .unwrap_or_else(|| "unknown".into());
        let original = client.and_then(|c| c.connect.as_ref()).map(|i| i.dst);
        let destination = original
            .and_then(|d| self.meta.service_by_vip(d))
            .or_else(|| {
                server
                    .and_then(|s| s.pod.as_ref())
                    .and_then(|p| p.service.clone())
            })
            .or_else(|| {
                let ip = original.map(|d| d.ip()).or(client.map(|c| c.remote.ip()))?;
                self.meta.pod_by_ip(ip).and_then(|p| p.service.clone())
            })
            .unwrap_or_else(|| match (kind, original) {
                // A destination that is no service or meshed pod.
                (LegKind::Passthrough | LegKind::Blackhole, _) | (LegKind::Redirect, Some(_)) => {
                    "external".into()
                }
                _ => "unknown".into(),
            });
        (source, destination)
    }

    fn closed(&mut self, s: &mesh_trace_common::SockEvent, out: &mut Vec<LegRecord>) {
        let cookie = s.sock_cookie;
        let Some(e) = self.entries.get_mut(&cookie) else {
            self.stats.unknown_socket_events += 1;
            return;
        };
        e.sock.closed_ns = Some(s.header.ts_ns);
        e.sock.bytes_acked = s.bytes_acked;
        e.sock.bytes_received = s.bytes_received;
        e.sock.srtt_us = s.srtt_us;
        e.last_event_ns = s.header.ts_ns;
        if s.srtt_us > 0 {
            let h = Health::Rtt {
                srtt_us: s.srtt_us,
                min_us: None,
            };
            self.observe(cookie, s.header.ts_ns, h, false);
        }
        let Some(e) = self.entries.peek_mut(&cookie) else {
            return;
        };
        if e.waiting.is_some() {
            // Closed before its peer showed up: classify it now.
            if let Some(k) = e.waiting.take() {
                self.waiting.remove(&k);
            }
            self.open_alone(cookie, out);
        }
        let Some(id) = self.entries.peek(&cookie).and_then(|e| e.leg) else {
            if let Some(e) = self.entries.pop(&cookie) {
                self.forget(e);
            }
            return;
        };
        let all_closed = self.legs.get(&id).is_some_and(|leg| {
            [leg.client, leg.server].into_iter().flatten().all(|c| {
                self.entries
                    .peek(&c)
                    .is_some_and(|e| e.sock.closed_ns.is_some())
            })
        });
        if all_closed {
            self.close_leg(id, out);
        }
    }

    fn close_leg(&mut self, id: LegId, out: &mut Vec<LegRecord>) {
        let Some(mut leg) = self.legs.remove(&id) else {
            return;
        };
        if leg.kind == LegKind::Redirect && self.blackholed(&leg) {
            leg.kind = LegKind::Blackhole;
        }
        out.push(self.record("close", &leg));
        for cookie in [leg.client, leg.server].into_iter().flatten() {
            if let Some(e) = self.entries.pop(&cookie) {
                self.closed_sockets
                    .put(cookie, (leg.leg_ref(), Side::of(e.sock.active)));
            }
        }
    }

    /// A redirect whose sidecar sent nothing back and opened no upstream
    /// connection to the original destination while it was open: what
    /// BlackHoleCluster does to TCP. (An HTTP 502 from BlackHoleCluster is
    /// visible in request spans, not here.)
    fn blackholed(&mut self, leg: &Leg) -> bool {
        let sock = |c: Option<u64>| c.and_then(|c| self.entries.peek(&c)).map(|e| &e.sock);
        let (Some(app), Some(proxy)) = (sock(leg.client), sock(leg.server)) else {
            return false;
        };
        if proxy.sent_payload() {
            return false;
        }
        let (Some(dst), netns) = (leg.original_dst, proxy.netns) else {
            return false;
        };
        let (from, to) = (
            app.established_ns.min(proxy.established_ns),
            proxy.closed_ns.unwrap_or(u64::MAX),
        );
        let upstream = self
            .upstreams
            .peek(&netns)
            .is_some_and(|r| r.iter().any(|&(d, ts)| d == dst && ts >= from && ts <= to));
        !upstream
    }

    /// Classifies sockets that waited too long for a peer, and drops
    /// sockets idle for longer than `max_age`. Call periodically.
    pub fn tick(&mut self, now_ns: u64, out: &mut Vec<LegRecord>) {
        let overdue: Vec<u64> = self
            .waiting
            .values()
            .copied()
            .filter(|c| {
                self.entries.peek(c).is_some_and(|e| {
                    now_ns.saturating_sub(e.sock.established_ns) >= self.cfg.join_wait_ns
                })
            })
            .collect();
        for cookie in overdue {
            if let Some(k) = self
                .entries
                .peek_mut(&cookie)
                .and_then(|e| e.waiting.take())
            {
                self.waiting.remove(&k);
            }
            self.open_alone(cookie, out);
        }
        crate::shrink::shrink_sparse(&mut self.waiting);
        crate::shrink::shrink_sparse(&mut self.legs);
        // SYNs and SYN-ACKs retransmitted for connections that never came up.
        expire_held(&mut self.connecting, now_ns, Side::Client, &mut self.health);
        expire_held(&mut self.accepting, now_ns, Side::Server, &mut self.health);
        // The LRU's tail holds the least recently touched entries.
        while let Some((_, e)) = self.entries.peek_lru() {
            if now_ns.saturating_sub(e.last_event_ns) < self.cfg.max_age_ns {
                break;
            }
            if let Some((cookie, e)) = self.entries.pop_lru() {
                self.evicted.push(cookie);
                self.forget(e);
                self.stats.evicted += 1;
            }
        }
    }

    /// Roles of the sockets currently tracked, for tests and `top`.
    pub fn roles(&self) -> HashMap<Role, usize> {
        let mut m = HashMap::new();
        for (_, e) in self.entries.iter() {
            *m.entry(e.sock.role).or_default() += 1;
        }
        m
    }
}

/// Holds `segs` handshake retransmits of the connection `key` until its
/// socket is established; when too many are held, the oldest is reported
/// without a leg.
fn hold_handshake<K: std::hash::Hash + Eq>(
    held: &mut LruCache<K, (u64, u32)>,
    key: K,
    ts_ns: u64,
    segs: u32,
    side: Side,
    out: &mut Vec<HealthRecord>,
) {
    if let Some(h) = held.get_mut(&key) {
        h.1 += segs;
    } else if let Some((_, (_, oldest))) = held.push(key, (ts_ns, segs)) {
        out.push(HealthRecord {
            leg: None,
            side: Some(side),
            health: Health::Retransmits(oldest),
        });
    }
}

/// Reports, without a leg, the handshake retransmits of connections that
/// were not established within `CONNECTING_WAIT_NS`.
fn expire_held<K: std::hash::Hash + Eq>(
    held: &mut LruCache<K, (u64, u32)>,
    now_ns: u64,
    side: Side,
    out: &mut Vec<HealthRecord>,
) {
    while let Some((_, &(first_ns, _))) = held.peek_lru() {
        if now_ns.saturating_sub(first_ns) < CONNECTING_WAIT_NS {
            break;
        }
        if let Some((_, (_, segs))) = held.pop_lru() {
            out.push(HealthRecord {
                leg: None,
                side: Some(side),
                health: Health::Retransmits(segs),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mesh_trace_common::{
        Endpoint, EventKind, SockEvent, TcpIssueEvent, ISSUE_RESET_SENT, ISSUE_RETRANSMIT,
    };

    use super::*;
    use crate::flows::{
        metadata::NoMetadata,
        test_events::{connect, ep, established},
    };

    fn issue(cookie: u64, issue: u32, detail: u32) -> Event {
        let mut t = TcpIssueEvent::default();
        // Retransmits before the socket is known are its SYN's.
        if issue == ISSUE_RETRANSMIT {
            t.sk_state = mesh_trace_common::TCP_SYN_SENT;
        }
        t.header.kind = EventKind::TcpIssue as u32;
        t.sock_cookie = cookie;
        t.issue = issue;
        t.detail = detail;
        Event::TcpIssue(t)
    }

    fn sock_event(
        kind: EventKind,
        cookie: u64,
        netns: u64,
        local: Endpoint,
        remote: Endpoint,
    ) -> SockEvent {
        let mut s = SockEvent::default();
        s.header.kind = kind as u32;
        s.sock_cookie = cookie;
        s.netns_cookie = netns;
        s.local = local;
        s.remote = remote;
        s
    }

    #[test]
    fn evicted_sockets_are_reported_once_for_others_to_forget() {
        let cfg = FlowTableConfig {
            max_sockets: 2,
            ..FlowTableConfig::default()
        };
        let mut table = FlowTable::new(cfg, Arc::new(NoMetadata));
        let mut out = Vec::new();
        for cookie in 1..=3 {
            let local = ep([10, 0, 0, 1], 40_000 + cookie as u16);
            table.apply(
                &established(cookie, 1, local, ep([10, 0, 0, 2], 80), true),
                &mut out,
            );
        }
        // Full at two: the least recently used went.
        assert_eq!(table.take_evicted(), vec![1]);
        assert!(table.take_evicted().is_empty());
        // Idle past max_age: the rest go at the next tick.
        table.tick(u64::MAX, &mut out);
        let mut aged = table.take_evicted();
        aged.sort_unstable();
        assert_eq!(aged, vec![2, 3]);
    }

    /// A sidecar's upstream connection whose peer is on another node,
    /// without metadata: to an endpoint it chose for the service address
    /// the app asked for, a mesh leg; to the address the app asked for
    /// itself, passthrough.
    #[test]
    fn an_upstream_alone_is_mesh_when_the_sidecar_chose_its_endpoint() {
        let mut table = FlowTable::new(FlowTableConfig::default(), Arc::new(NoMetadata));
        let mut out = Vec::new();
        let (vip, external) = (ep([10, 96, 0, 12], 9080), ep([93, 184, 216, 34], 80));
        let app = ep([10, 244, 0, 5], 40000);
        for (cookie, dst, local) in [(1, vip, app), (2, external, ep([10, 244, 0, 5], 40001))] {
            table.apply(&connect(cookie, 1, 1000, 10, dst), &mut out);
            table.apply(&established(cookie, 1, local, dst, true), &mut out);
        }
        // The sidecar's connections: to a pod of the service, and to the
        // external address itself.
        let endpoint = ep([10, 244, 1, 9], 9080);
        for (cookie, dst, port) in [(3, endpoint, 50000), (4, external, 50001)] {
            table.apply(&connect(cookie, 1, 1337, 20, dst), &mut out);
            table.apply(
                &established(cookie, 1, ep([10, 244, 0, 5], port), dst, true),
                &mut out,
            );
        }
        out.clear();
        table.tick(FlowTableConfig::default().join_wait_ns, &mut out);
        let kind = |cookie: u64| {
            out.iter()
                .find(|l| l.client.as_ref().is_some_and(|c| c.cookie == cookie))
                .map(|l| l.leg)
        };
        assert_eq!(kind(3), Some(LegKind::Mesh));
        assert_eq!(kind(4), Some(LegKind::Passthrough));
    }

    fn on(table: &mut FlowTable) -> Vec<(Option<LegKind>, Option<Side>, Health)> {
        table
            .take_health()
            .into_iter()
            .map(|r| (r.leg.map(|l| l.kind), r.side, r.health))
            .collect()
    }

    /// An outbound sidecar's (netns 1, uid 1337) connection to the server
    /// pod's inbound sidecar (netns 2, 15006): a mesh leg whose two ends
    /// are cookies 3 and 4. Before either is established, its SYN and its
    /// SYN-ACK are each resent once; after it closes, a reset goes out.
    #[test]
    fn handshake_retransmits_and_late_resets_land_on_their_leg() {
        let mut table = FlowTable::new(FlowTableConfig::default(), Arc::new(NoMetadata));
        let mut legs = Vec::new();
        let (client, server) = (ep([10, 244, 0, 5], 50000), ep([10, 244, 0, 9], 15006));
        let synack = sock_event(EventKind::SynAckRetransmit, 0, 2, server, client);
        for ev in [
            connect(3, 1, 1337, 20, ep([10, 244, 0, 9], 9080)),
            issue(3, ISSUE_RETRANSMIT, 1),
            Event::SynAckRetransmit(synack),
            established(3, 1, client, ep([10, 244, 0, 9], 9080), true),
        ] {
            table.apply(&ev, &mut legs);
        }
        // Nothing is reported before the leg is known.
        assert!(on(&mut table).is_empty());
        table.apply(&established(4, 2, server, client, false), &mut legs);
        assert_eq!(legs.last().map(|l| l.leg), Some(LegKind::Mesh));
        let mut got = on(&mut table);
        got.sort_by_key(|(_, side, _)| *side == Some(Side::Server));
        let mesh = Some(LegKind::Mesh);
        assert_eq!(
            got,
            [
                (mesh, Some(Side::Client), Health::Retransmits(1)),
                (mesh, Some(Side::Server), Health::Retransmits(1)),
            ]
        );
        table.apply(&issue(4, ISSUE_RETRANSMIT, 3), &mut legs);
        assert_eq!(
            on(&mut table),
            [(mesh, Some(Side::Server), Health::Retransmits(3))]
        );
        // Both ends close; the client's reset comes after its close.
        for (cookie, netns, local, remote) in [(3, 1, client, server), (4, 2, server, client)] {
            let closed = sock_event(EventKind::Closed, cookie, netns, local, remote);
            table.apply(&Event::Closed(closed), &mut legs);
        }
        assert_eq!(table.len(), 0);
        table.apply(&issue(3, ISSUE_RESET_SENT, 0), &mut legs);
        assert_eq!(
            on(&mut table),
            [(mesh, Some(Side::Client), Health::ResetSent(0))]
        );
        // A socket never seen: counted without a leg.
        table.apply(&issue(99, ISSUE_RESET_SENT, 0), &mut legs);
        assert_eq!(on(&mut table), [(None, None, Health::ResetSent(0))]);
    }

    #[test]
    fn a_handshake_that_never_completes_is_reported_without_a_leg() {
        let mut table = FlowTable::new(FlowTableConfig::default(), Arc::new(NoMetadata));
        let mut legs = Vec::new();
        table.apply(&issue(7, ISSUE_RETRANSMIT, 1), &mut legs);
        table.apply(&issue(7, ISSUE_RETRANSMIT, 1), &mut legs);
        table.tick(CONNECTING_WAIT_NS - 1, &mut legs);
        assert!(on(&mut table).is_empty());
        table.tick(CONNECTING_WAIT_NS, &mut legs);
        assert_eq!(
            on(&mut table),
            [(None, Some(Side::Client), Health::Retransmits(2))]
        );
    }
}
