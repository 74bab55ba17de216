//! The long-running agent, all in one place:
//! - [`settings`] and [`config`]: what it runs with (flags, file, defaults);
//! - [`run`]: its event loop, from attaching the programs to detaching them;
//! - [`pipeline`]: what each kernel event goes through (flows, spans);
//! - [`metrics`] and [`http`]: what it exports and serves;
//! - [`feed`]: its spans and legs as they happen, to `spans` and `flows`
//!   run next to it, and [`client`], their end of it (and `top`'s);
//! - [`otlp`]: request traces sent to an OpenTelemetry collector;
//! - [`netns_watch`]: NAT observers of pod namespaces, on a thread of their own;
//! - [`local`]: an agent inside another command's process;
//! - [`process`]: its own CPU and memory.
pub mod client;
pub mod config;
pub mod feed;
pub mod http;
pub mod local;
pub mod metrics;
pub mod netns_watch;
pub mod otlp;
pub mod pipeline;
pub mod process;
pub mod run;
pub mod settings;

pub use run::{agent, agent_with_spans};
pub use settings::Settings;
