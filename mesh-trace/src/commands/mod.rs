//! One module per subcommand, each a thin layer over the library: parse
//! its flags, call into [`crate::agent`], [`crate::top`] or the lab, print.
//! `demo`, `lab` and `bench` drive the lab and exist only with the `lab`
//! feature (the DaemonSet image is built without it).
#[cfg(feature = "lab")]
pub mod bench;
pub mod check;
#[cfg(feature = "lab")]
pub mod demo;
pub mod flows;
#[cfg(feature = "lab")]
pub mod lab;
pub mod run;
pub mod spans;
pub mod top;
