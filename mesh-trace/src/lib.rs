//! mesh-trace: an eBPF datapath tracer for Istio sidecar traffic.
//!
//! - [`kernel`]: the embedded eBPF objects, feature detection, loading and
//!   attaching, and decoding what the programs report.
//! - [`agent`]: the long-running agent: metrics, HTTP endpoints, event loop.
//! - [`cli`] and one module per subcommand ([`check`], [`run`]).
pub mod agent;
pub mod bench;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod flows;
pub mod flows_cmd;
pub mod kernel;
pub mod lab;
pub mod netns;
pub mod run;
pub mod spans;
pub mod spans_cmd;
pub mod top;
