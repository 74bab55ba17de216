//! The agent's event loop: load and attach the programs, serve the
//! endpoints, feed every kernel event through the pipeline, and detach
//! everything when told to stop.
use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};

use super::{
    http::{self, AgentState},
    metrics::{LossTracker, ReasonLabel, UNDECODABLE},
    netns_watch::NetnsWatcher,
    pipeline::Pipeline,
    settings::Settings,
};
use crate::{
    error::Failure,
    flows::table::{FlowTable, FlowTableConfig, LegRecord},
    kernel::{
        events,
        tracer::{Tracer, TracerOptions},
    },
    spans::span::Span,
};

/// How often the kernel's loss counters are read.
const LOSS_POLL: Duration = Duration::from_secs(1);

/// How often freed heap memory is given back to the kernel.
const HEAP_TRIM: Duration = Duration::from_secs(60);

/// The TCP sockets of one namespace of the namespace directory.
struct NetnsSockets {
    path: std::path::PathBuf,
    netns: u64,
    sockets: Vec<crate::kernel::sockdiag::DiagSocket>,
}

/// Lists the TCP sockets of every namespace in `netns_dir` with sock_diag
/// (it enters each namespace: blocking work).
fn list_sockets(netns_dir: &std::path::Path) -> Vec<NetnsSockets> {
    let Ok(entries) = std::fs::read_dir(netns_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let path = entry.path();
            match (
                crate::flows::metadata::netns_cookie_at(&path),
                crate::kernel::sockdiag::tcp_sockets(&path),
            ) {
                (Ok(netns), Ok(sockets)) => Some(NetnsSockets {
                    path,
                    netns,
                    sockets,
                }),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::debug!("sockets of {}: {e:#}", path.display());
                    None
                }
            }
        })
        .collect()
}

/// Feeds the sockets already established in every watched namespace to the
/// flow table as if just opened, and tracks them in the kernel, so that
/// connections opened before the agent started are traced. Returns how many.
fn recover_existing(
    tracer: &mut Tracer,
    pipeline: &mut Pipeline,
    netns_dir: &std::path::Path,
) -> usize {
    let mut count = 0;
    for ns in list_sockets(netns_dir) {
        let established: Vec<_> = ns
            .sockets
            .iter()
            .filter(|s| !s.listening)
            .map(|s| (s.cookie, ns.netns))
            .collect();
        match tracer.adopt_existing(&ns.path, &established) {
            Ok(n) => tracing::debug!(
                "{}: {n} of {} open connections adopted",
                ns.path.display(),
                established.len()
            ),
            Err(e) => tracing::warn!("{e:#}"),
        }
        count += feed_sockets(pipeline, &ns, |_| true);
    }
    count
}

/// Feeds the established sockets of `ns` that `wanted` picks to the flow
/// table as if just opened (a connect for the active ends); returns how
/// many.
fn feed_sockets(pipeline: &mut Pipeline, ns: &NetnsSockets, wanted: impl Fn(u64) -> bool) -> usize {
    use mesh_trace_common::{ConnectEvent, Endpoint, EventHeader, EventKind, SockEvent, TaskInfo};
    let endpoint = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V4(ip) => Endpoint::v4(u32::from_ne_bytes(ip.octets()), a.port()),
        std::net::IpAddr::V6(ip) => {
            let o = ip.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            Endpoint::v6([w(0), w(4), w(8), w(12)], a.port())
        }
    };
    let listening: std::collections::HashSet<u16> = ns
        .sockets
        .iter()
        .filter(|s| s.listening)
        .map(|s| s.local.port())
        .collect();
    let (mut legs, mut spans, mut count) = (Vec::new(), Vec::new(), 0);
    let now = crate::clock::mono_ns();
    let netns = ns.netns;
    for s in ns
        .sockets
        .iter()
        .filter(|s| !s.listening && wanted(s.cookie))
    {
        let active = !listening.contains(&s.local.port());
        let header = |kind: EventKind| EventHeader {
            kind: kind as u32,
            cpu: 0,
            ts_ns: now,
        };
        if active {
            let mut comm = [0u8; 16];
            comm[..10].copy_from_slice(b"(existing)");
            let connect = ConnectEvent {
                header: header(EventKind::Connect),
                sock_cookie: s.cookie,
                netns_cookie: netns,
                task: TaskInfo {
                    pid_tgid: 0,
                    uid_gid: u64::from(s.uid) | (u64::from(s.uid) << 32),
                    comm,
                },
                dst: endpoint(s.remote),
            };
            pipeline.handle(&events::Event::Connect(connect), &mut legs, &mut spans);
        }
        let established = SockEvent {
            header: header(EventKind::Established),
            sock_cookie: s.cookie,
            netns_cookie: netns,
            local: endpoint(s.local),
            remote: endpoint(s.remote),
            active: u32::from(active),
            ..SockEvent::default()
        };
        pipeline.handle(
            &events::Event::Established(established),
            &mut legs,
            &mut spans,
        );
        count += 1;
    }
    count
}

/// Feeds the listed sockets that moved data while unknown to the flow
/// table (their opening was lost) as if just opened; forgets the unknown
/// ones not listed (gone). Returns how many were learnt again.
fn relearn(pipeline: &mut Pipeline, listed: Vec<NetnsSockets>) -> usize {
    let seen = std::mem::take(&mut pipeline.unknown_sockets);
    let mut relearned = 0;
    for ns in listed {
        let unknown: std::collections::HashSet<u64> = ns
            .sockets
            .iter()
            .filter(|s| {
                !s.listening
                    && seen.contains(&s.cookie)
                    && pipeline.table.socket(s.cookie).is_none()
            })
            .map(|s| s.cookie)
            .collect();
        if !unknown.is_empty() {
            relearned += feed_sockets(pipeline, &ns, |c| unknown.contains(&c));
        }
    }
    relearned
}

/// Events dropped so far because the ring buffer was full.
fn ring_full_total(tracer: &Tracer) -> u64 {
    tracer
        .lost()
        .map(|l| {
            l.iter()
                .filter(|(r, _)| *r == mesh_trace_common::LossReason::RingBufFull)
                .map(|(_, n)| n)
                .sum()
        })
        .unwrap_or(0)
}

/// How often new network namespaces are looked for.
const NETNS_SCAN: Duration = Duration::from_secs(1);

/// How often the flow table classifies lonely sockets and ages out old ones.
const FLOW_TICK: Duration = Duration::from_millis(250);

/// Counts the agents loaded on the node once a second, on a blocking
/// thread: it lists every BPF program in the kernel (thousands, with a
/// pair of NAT programs per pod), which the event loop should not wait for.
fn count_agents(state: Arc<AgentState>) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match tokio::task::spawn_blocking(crate::kernel::tracer::agents_loaded).await {
                Ok(Ok(n)) => {
                    state.metrics.agents_on_node.set(n as i64);
                }
                Ok(Err(e)) => tracing::debug!("{e:#}"),
                Err(_) => return,
            }
        }
    }))
}

/// A background task that ends with the agent, however the agent ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the agent until `stop` resolves, then detaches everything. Every leg
/// the flow table opens or closes is passed to `on_leg`.
pub async fn agent(
    settings: Settings,
    state: Arc<AgentState>,
    stop: impl std::future::Future<Output = ()>,
    mut on_leg: impl FnMut(&LegRecord),
) -> Result<(), Failure> {
    agent_with_spans(settings, state, stop, on_leg_adapter(&mut on_leg), |_| {}).await
}

fn on_leg_adapter<'a>(f: &'a mut impl FnMut(&LegRecord)) -> impl FnMut(&LegRecord) + 'a {
    move |l| f(l)
}

/// [`agent`], also passing every stitched span to `on_span`.
pub async fn agent_with_spans(
    settings: Settings,
    state: Arc<AgentState>,
    stop: impl std::future::Future<Output = ()>,
    mut on_leg: impl FnMut(&LegRecord),
    mut on_span: impl FnMut(&Span),
) -> Result<(), Failure> {
    // What `spans` and `flows` next to the agent follow.
    let feeds = state.clone();
    let mut on_leg = move |l: &LegRecord| {
        feeds.feeds.publish_leg(l);
        on_leg(l);
    };
    let feeds = state.clone();
    let mut on_span = move |s: &Span| {
        feeds.feeds.publish_span(s);
        on_span(s);
    };
    let (metadata, kube) = settings.metadata().await?;
    let table = FlowTable::new(
        FlowTableConfig {
            max_sockets: settings.max_flows,
            ..FlowTableConfig::default()
        },
        metadata.clone(),
    );
    let mut pipeline = Pipeline::new(table, state.clone());
    let otlp = settings.otlp_endpoint.clone().map(|endpoint| {
        tracing::info!("sending request traces to {endpoint}");
        super::otlp::Exporter::start(endpoint, settings.node_label(), state.clone())
    });
    let mut legs = Vec::new();
    let mut spans = Vec::new();
    let (stop_http, stop_rx) = watch::channel(false);
    let server = match settings.metrics_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics address {addr}"))?;
            Some(tokio::spawn(http::serve(
                listener,
                state.clone(),
                settings.stats_access,
                stop_rx,
            )))
        }
        None => None,
    };

    let agents = count_agents(state.clone());
    let mut tracer = Tracer::load(&TracerOptions {
        ring_buffer_bytes: settings.ring_buffer_bytes,
        // An eighth of the ring: the agent is woken long before it fills.
        wakeup_bytes: u64::from(settings.ring_buffer_bytes / 8),
        noop: settings.noop,
        batch_events: settings.batch_events,
        netns_events_per_s: settings.netns_events_per_s,
        head_len: settings.request_head_bytes,
        tls_plaintext: settings.tls_plaintext,
        ..TracerOptions::new(settings.cgroup.clone())
    })?;
    tracer.spawn_kernel_log_forwarder()?;
    // Capture the data path of pods known to have a sidecar now, and of any
    // namespace where a REDIRECT is seen later.
    let mut meshed = std::collections::HashSet::new();
    metadata.refresh(&settings.netns_dir);
    state
        .metadata_synced
        .store(metadata.synced(), Ordering::Release);
    for cookie in metadata.meshed_netns() {
        tracer.mark_meshed(cookie)?;
        meshed.insert(cookie);
    }
    {
        let mut info = state.info.lock().unwrap_or_else(|p| p.into_inner());
        info.programs = tracer
            .attached
            .iter()
            .map(|a| format!("{} ({})", a.program, a.hook))
            .collect();
        info.fallbacks = tracer
            .skipped
            .iter()
            .map(|s| format!("{}: {}", s.program, s.consequence))
            .collect();
        if !tracer.nat_available() {
            info.fallbacks
                .push("netfilter: REDIRECTs counted from accepted sockets".into());
        }
    }
    pipeline.count_redirects_at_nat(tracer.nat_available());
    let netns = match tracer.nat_watch() {
        Some(nat) => Some(
            NetnsWatcher::start(nat, settings.netns_dir.clone(), NETNS_SCAN)
                .context("starting the network namespace watch")?,
        ),
        None => None,
    };
    // Connections opened before the agent (pooled, long-lived) join in too.
    let recovered = recover_existing(&mut tracer, &mut pipeline, &settings.netns_dir);
    tracing::info!("picked up {recovered} TCP connections that were already open");
    state
        .metrics
        .programs_attached
        .set(tracer.attached.len() as i64);
    state.ready.store(true, Ordering::Release);
    for a in &tracer.attached {
        tracing::info!(program = a.program, hook = %a.hook, "attached");
    }
    match settings.metrics_addr {
        Some(addr) => tracing::info!("ready: serving /metrics, /healthz and /readyz on {addr}"),
        None => tracing::info!("ready"),
    }

    let mut stop = std::pin::pin!(stop);
    let mut loss_poll = tokio::time::interval(LOSS_POLL);
    let mut flow_tick = tokio::time::interval(FLOW_TICK);
    let mut netns_tick = tokio::time::interval(NETNS_SCAN);
    netns_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refreshing: Option<tokio::task::JoinHandle<()>> = None;
    // The first tick is now: what start-up freed goes back at once.
    let mut heap_trim = tokio::time::interval(HEAP_TRIM);
    let mut loss = LossTracker::default();
    let mut ring_full_seen = ring_full_total(&tracer);
    // Sockets whose opening event was lost to a full ring are unknown to the
    // flow table, so every request on them would be too: once such a socket
    // moves data, the kernel's socket lists name it again (listed on a
    // blocking thread, at most once a second). Only those: a socket listed
    // whose opening is still on its way is left to its own event.
    let mut relist: Option<tokio::task::JoinHandle<Vec<NetnsSockets>>> = None;
    let mut batch = Vec::with_capacity(1024);
    // Processes that did I/O on a meshed socket: their TLS libraries get
    // the plaintext probes. Looked at on a blocking thread (it reads
    // /proc and ELF symbol tables), attached here (the programs are the
    // tracer's).
    let tls_on = tracer.tls_probes();
    let mut tls_seen = Some(crate::kernel::tls::Seen::default());
    let mut tls_new: Vec<u32> = Vec::new();
    let mut tls_last_tgid = 0u32;
    let mut tls_scan: Option<
        tokio::task::JoinHandle<(crate::kernel::tls::Seen, Vec<crate::kernel::tls::TlsFile>)>,
    > = None;
    if tls_on {
        // The pods' processes now, before they open the connections this
        // agent will trace: their libraries are probed from the start.
        let dir = settings.netns_dir.clone();
        let pids =
            tokio::task::spawn_blocking(move || crate::kernel::tls::pids_in_namespaces(&dir, 4096))
                .await
                .unwrap_or_default();
        if let Some(seen) = tls_seen.as_mut() {
            tls_new.extend(pids.into_iter().filter(|&pid| seen.new_process(pid)));
        }
    }
    let stdout = std::io::stdout();
    let result: anyhow::Result<()> = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = heap_trim.tick() => super::process::release_free_heap(),
            _ = loss_poll.tick() => {
                for (reason, delta) in loss.update(&tracer.lost()?) {
                    state.metrics.events_lost.get_or_create(&ReasonLabel { reason: reason.label() }).inc_by(delta);
                }
                let mut info = state.info.lock().unwrap_or_else(|p| p.into_inner());
                info.events_total = crate::kernel::events::ALL_KINDS
                    .iter()
                    .map(|&k| state.metrics.events.get_or_create(&crate::agent::metrics::KindLabel { kind: events::kind_label(k) }).get())
                    .sum();
                info.events_lost = loss.total();
                drop(info);
                state.metrics.record_metadata(metadata.as_ref());
                if let Some(kube) = &kube {
                    state.metrics.record_kubernetes(kube);
                }
                state.metadata_synced.store(metadata.synced(), Ordering::Release);
                if !pipeline.unknown_sockets.is_empty() && relist.is_none() {
                    let dir = settings.netns_dir.clone();
                    relist = Some(tokio::task::spawn_blocking(move || list_sockets(&dir)));
                }
            }
            scanned = async { tls_scan.as_mut().expect("guarded by the condition").await }, if tls_scan.is_some() => {
                tls_scan = None;
                match scanned {
                    Ok((seen, files)) => {
                        tls_seen = Some(seen);
                        for file in files {
                            match tracer.attach_tls(&file) {
                                Ok(symbols) => {
                                    tracing::info!("TLS plaintext probes on {} ({})", file.shown, symbols.join(", "));
                                    state.metrics.tls_files_probed.inc();
                                }
                                Err(e) => tracing::warn!("{e:#}"),
                            }
                        }
                    }
                    // Which files it had probed is lost with it: probing
                    // one again would report each of its calls twice.
                    Err(e) => tracing::warn!("TLS library scan failed ({e}): no further files are probed"),
                }
            }
            listed = async { relist.as_mut().expect("guarded by the condition").await }, if relist.is_some() => {
                relist = None;
                let relearned = relearn(&mut pipeline, listed.unwrap_or_default());
                if relearned > 0 {
                    tracing::debug!("{relearned} open sockets learnt again after lost events");
                    state.metrics.flows_relearned.inc_by(relearned as u64);
                }
            }
            _ = netns_tick.tick(), if refreshing.is_none() => {
                // Pods that appeared since: their namespaces, and whether
                // they have a sidecar, come from the metadata source, which
                // enters new namespaces and may read /proc: on a blocking
                // thread.
                let (source, dir) = (metadata.clone(), settings.netns_dir.clone());
                refreshing = Some(tokio::task::spawn_blocking(move || source.refresh(&dir)));
            }
            _ = async { refreshing.as_mut().expect("guarded by the condition").await }, if refreshing.is_some() => {
                refreshing = None;
                let watched = netns.as_ref().map(|w| w.watched()).unwrap_or_default();
                let sidecars = metadata.meshed_netns();
                for &cookie in &sidecars {
                    if meshed.insert(cookie) {
                        if let Err(e) = tracer.mark_meshed(cookie) {
                            tracing::warn!("{e:#}");
                        }
                    }
                }
                // Namespaces that are gone leave MESHED_NETNS: those the
                // metadata no longer names and whose NAT is no longer
                // observed (the only ways a namespace gets marked).
                let alive: std::collections::HashSet<u64> =
                    watched.cookies.iter().copied().chain(sidecars).collect();
                // The kernel's own set: the NAT programs mark namespaces too.
                let in_kernel = tracer.meshed_netns();
                let mut held = in_kernel.len();
                for cookie in in_kernel.into_iter().filter(|c| !alive.contains(c)) {
                    match tracer.unmark_meshed(cookie) {
                        Ok(()) => {
                            meshed.remove(&cookie);
                            held -= 1;
                        }
                        Err(e) => tracing::warn!("{e:#}"),
                    }
                }
                state.metrics.meshed_netns.set(held as i64);
                state.metrics.nat_watched_netns.set(watched.cookies.len() as i64);
                state.info.lock().unwrap_or_else(|p| p.into_inner()).netns_watched = watched.cookies.len();
            }
            _ = flow_tick.tick() => {
                pipeline.tick(crate::clock::mono_ns(), &mut legs);
                legs.drain(..).for_each(|l| on_leg(&l));
            }
            r = tracer.next_batch(&mut batch) => {
                if let Err(e) = r {
                    break Err(e);
                }
                // Events the ring could not take, stamped before now: any
                // request in flight by then may have lost one of its own,
                // so none of them is exported.
                let ring_full = ring_full_total(&tracer);
                if ring_full > ring_full_seen {
                    ring_full_seen = ring_full;
                    pipeline.stitcher.events_lost(crate::clock::mono_ns());
                }
                let mut out = stdout.lock();
                for ev in batch.drain(..) {
                    match ev {
                        Ok(ev) => {
                            if let events::Event::Redirect(r) = &ev {
                                if meshed.insert(r.netns_cookie) {
                                    if let Err(e) = tracer.mark_meshed(r.netns_cookie) {
                                        tracing::warn!("{e:#}");
                                    }
                                }
                            }
                            if let events::Event::Data(d) = &ev {
                                let tgid = (d.pid_tgid >> 32) as u32;
                                if tls_on && tgid != tls_last_tgid && tls_new.len() < 4096 {
                                    tls_last_tgid = tgid;
                                    if let Some(seen) = tls_seen.as_mut() {
                                        if seen.new_process(tgid) {
                                            tls_new.push(tgid);
                                        }
                                    }
                                }
                            }
                            pipeline.handle(&ev, &mut legs, &mut spans);
                            legs.drain(..).for_each(|l| on_leg(&l));
                            for s in spans.drain(..) {
                                if let Some(otlp) = &otlp {
                                    otlp.offer(&s);
                                }
                                on_span(&s);
                            }
                            if settings.print_events {
                                let _ = writeln!(out, "{}", events::to_json(&ev));
                            }
                            events::recycle(ev);
                        }
                        Err(e) => {
                            tracing::debug!("undecodable event: {e}");
                            state.metrics.events_lost.get_or_create(&ReasonLabel { reason: UNDECODABLE }).inc();
                        }
                    }
                }
                let _ = out.flush();
                let tls_pending = tls_seen.as_ref().is_some_and(|s| s.pending());
                if (!tls_new.is_empty() || tls_pending) && tls_scan.is_none() {
                    if let Some(mut seen) = tls_seen.take() {
                        let pids = std::mem::take(&mut tls_new);
                        tls_scan = Some(tokio::task::spawn_blocking(move || {
                            let files = crate::kernel::tls::scan(&mut seen, &pids);
                            (seen, files)
                        }));
                    }
                }
            }
        }
    };
    tracing::info!("stopping: detaching programs");
    drop(agents);
    state.ready.store(false, Ordering::Release);
    drop(netns);
    drop(tracer);
    let _ = stop_http.send(true);
    if let Some(server) = server {
        let _ = server.await;
    }
    tracing::info!("stopped");
    result.map_err(Failure::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        flows::{
            metadata::NoMetadata,
            test_events::{ep, established},
        },
        kernel::sockdiag::DiagSocket,
    };

    fn data(cookie: u64) -> events::Event {
        let mut d = mesh_trace_common::DataEvent::default();
        d.header.kind = mesh_trace_common::EventKind::Data as u32;
        d.sock_cookie = cookie;
        events::Event::Data(Box::new(d))
    }

    fn diag(cookie: u64, local: &str, remote: &str, listening: bool) -> DiagSocket {
        DiagSocket {
            cookie,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            listening,
            uid: 0,
        }
    }

    /// A socket whose opening was lost moves data: it is learnt again from
    /// the namespace's socket list; one still on its way, listed but never
    /// seen moving data, is left to its own event; unknown ones no longer
    /// listed are forgotten.
    #[test]
    fn sockets_whose_opening_was_lost_are_learnt_again_and_only_they() {
        let table = FlowTable::new(FlowTableConfig::default(), Arc::new(NoMetadata));
        let mut p = Pipeline::new(table, Arc::new(AgentState::new()));
        let (mut legs, mut spans) = (Vec::new(), Vec::new());
        let known = established(
            1,
            7,
            ep([10, 0, 0, 1], 40000),
            ep([10, 0, 0, 2], 9080),
            true,
        );
        p.handle(&known, &mut legs, &mut spans);
        for cookie in [1, 2, 3] {
            p.handle(&data(cookie), &mut legs, &mut spans);
        }
        assert_eq!(p.unknown_sockets.len(), 2, "{:?}", p.unknown_sockets);
        let listed = vec![NetnsSockets {
            path: "/run/netns/pod".into(),
            netns: 7,
            sockets: vec![
                diag(1, "10.0.0.1:40000", "10.0.0.2:9080", false),
                diag(2, "10.0.0.1:40001", "10.0.0.3:9080", false),
                // Opened after the data above: its own event will come.
                diag(4, "10.0.0.1:40002", "10.0.0.3:9080", false),
                diag(5, "0.0.0.0:9080", "0.0.0.0:0", true),
            ],
        }];
        assert_eq!(relearn(&mut p, listed), 1);
        assert!(p.table.socket(2).is_some(), "learnt again");
        assert!(p.table.socket(4).is_none(), "left to its own event");
        // Cookie 3 was not listed: gone, and forgotten.
        assert!(p.unknown_sockets.is_empty());
    }
}
