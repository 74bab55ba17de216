//! An agent inside another command's process, started and waited for until
//! ready, then stopped and awaited.
use std::{
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::Context as _;

use super::{agent_with_spans, http::AgentState, settings::Settings};
use crate::error::Failure;

/// An agent run in this process, for a command that reads its state
/// directly (`top --standalone`).
pub struct LocalAgent {
    pub state: Arc<AgentState>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), Failure>>,
}

impl LocalAgent {
    /// Starts the agent and waits until it is ready (or failed).
    pub async fn start(lab: Option<PathBuf>) -> Result<LocalAgent, Failure> {
        // The view reads the state directly: nothing to serve.
        let settings = Settings::in_process(lab)?;
        let state = Arc::new(AgentState::new());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(agent_with_spans(
            settings,
            state.clone(),
            async {
                let _ = stopped.await;
            },
            |_| {},
            |_| {},
        ));
        while !state.ready.load(Ordering::Acquire) {
            if task.is_finished() {
                // It failed to load or attach: that error is the answer.
                task.await.context("agent task")??;
                return Err(anyhow::anyhow!("the agent stopped before it was ready").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(LocalAgent { state, stop, task })
    }

    /// Stops it and waits until everything is detached.
    pub async fn stop(self) -> Result<(), Failure> {
        let _ = self.stop.send(());
        self.task.await.context("agent task")?
    }
}
