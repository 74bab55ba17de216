//! The proxy's own bookkeeping, beside the data path: the access record of
//! each request or TCP connection (an HTTP one is written once its response
//! has gone downstream), and the signal that starts the drain.
use std::{future::Future, sync::Arc};

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};

use super::{clusters::UpstreamStream, listeners::Conn, Proxy};
use crate::lab::{
    ioclock::{IoClock, WRITE_WAIT},
    records::{mono_ns, ProxyRecord},
};

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed before
/// this returns, so a signal that arrives early is not lost.
pub(super) fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
    })
}

/// Where a request's response goes: its connection's clock and, over
/// HTTP/2, its stream.
pub(super) struct Downstream {
    pub(super) clock: Arc<IoClock>,
    pub(super) stream: Option<u32>,
}

impl Proxy {
    /// A record with what the connection already tells; the handler fills in the rest.
    pub(super) fn record(&self, conn: &Conn, kind: &str) -> ProxyRecord {
        ProxyRecord {
            pod: self.pod.clone(),
            direction: conn.direction,
            kind: kind.to_owned(),
            original_dst: conn.original_dst,
            downstream_peer: conn.peer,
            route: String::new(),
            cluster: String::new(),
            upstream_host: None,
            upstream_local: None,
            attempts: 0,
            status: 0,
            request_id: None,
            method: None,
            path: None,
            host: None,
            t_downstream_read_ns: 0,
            t_upstream_write_ns: 0,
            t_upstream_read_ns: 0,
            t_downstream_write_ns: 0,
            t_upstream_read_end_ns: None,
            t_downstream_write_end_ns: None,
            upstream_tls: false,
            downstream_tls: conn.tls,
        }
    }

    /// Writes `rec` once its response, returned to hyper now, is written
    /// downstream. Over HTTP/1.1 responses on a connection go out in order
    /// and the next request is not read before, so the first write from now
    /// on is this response's head; over HTTP/2 the write that carried its
    /// stream's last frame.
    pub(super) fn record_when_written(
        self: &Arc<Self>,
        mut rec: ProxyRecord,
        downstream: Downstream,
        upstream: Option<UpstreamStream>,
    ) {
        let answered = mono_ns();
        let proxy = Arc::clone(self);
        let mut pending = self
            .pending_records
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while pending.try_join_next().is_some() {}
        pending.spawn(async move {
            let clock = &downstream.clock;
            let written = match downstream.stream {
                Some(stream) => {
                    let end = clock.wait_h2_end(stream, WRITE_WAIT).await;
                    rec.t_downstream_write_end_ns = end;
                    clock.h2_response_head(stream).or(end)
                }
                None => clock.wait_write_from(answered, WRITE_WAIT).await,
            };
            rec.t_downstream_write_ns = written.unwrap_or(answered);
            // The response went out after its last byte came in: the
            // upstream stream's frames are all there.
            if let Some(upstream) = upstream {
                upstream.refine(&mut rec);
            }
            proxy.records.write(&rec);
        });
    }

    /// Waits for the records of answered requests (at most `WRITE_WAIT`,
    /// less once their connections are closed).
    pub(super) async fn flush_records(&self) {
        let mut pending = std::mem::take(
            &mut *self
                .pending_records
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        while pending.join_next().await.is_some() {}
    }
}
