//! When a long-running command stops: on SIGINT or SIGTERM, after a time
//! limit, or when it says it is done. A leaf module.
use std::time::Duration;

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

/// Resolves on SIGINT or SIGTERM, after `limit`, or once `done` is true.
pub fn stop_on(
    limit: Option<Duration>,
    mut done: watch::Receiver<bool>,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let signal = stop_signal()?;
    Ok(async move {
        let timeout = async {
            match limit {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signal => {}
            _ = timeout => {}
            _ = done.wait_for(|d| *d) => {}
        }
    })
}

/// Resolves on the first SIGINT or SIGTERM.
pub fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    })
}
