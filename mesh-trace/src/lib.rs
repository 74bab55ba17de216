//! mesh-trace: an eBPF datapath tracer for Istio sidecar traffic.
//!
//! The layout follows the data: [`kernel`] (the embedded eBPF objects,
//! feature detection, loading and attaching, decoding what the programs
//! report) feeds [`flows`] (sockets joined into legs, pod metadata) and
//! [`spans`] (HTTP framing, stitching, live percentiles), which the
//! [`agent`] runs and exports; [`top`] is the live view of an agent.
//! [`commands`] holds one thin module per subcommand and [`cli`] the clap
//! tree over them. [`error`], [`logging`], [`shutdown`], [`clock`],
//! [`shrink`] and [`netns`] are leaves every layer may use. [`fuzzing`]
//! holds the entry points of the fuzz targets and their regression tests.
//!
//! With the `lab` feature (on by default, off in the DaemonSet image):
//! [`lab`], a local mesh of network namespaces, sidecars and apps for the
//! demo, the tests and [`bench`], the benchmarks.
pub mod agent;
#[cfg(feature = "lab")]
pub mod bench;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod error;
pub mod flows;
pub mod fuzzing;
pub mod kernel;
#[cfg(feature = "lab")]
pub mod lab;
pub mod logging;
pub mod netns;
pub mod shrink;
pub mod shutdown;
pub mod spans;
pub mod top;
