//! The long-running agent: metrics and the HTTP endpoints that serve them.
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod process;
