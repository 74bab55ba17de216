//! `mesh-trace lab bench`: overhead and capacity, written to BENCHMARKS.md
//! (see [`crate::bench`]); and the helper that holds sockets open for it.
use crate::{
    bench::{self, BenchArgs},
    error::Failure,
    logging::{init_logging, LogLevel},
};

pub fn main(args: BenchArgs) -> Result<(), Failure> {
    init_logging(LogLevel::Warn);
    bench::main(args)?;
    Ok(())
}

/// `lab hold`: holds loopback connections open until stdin closes.
pub fn hold(connections: usize) -> Result<(), Failure> {
    Ok(bench::hold(connections)?)
}
