//! `mesh-trace check`: the preflight, as a table or JSON.
use clap::Args;

use crate::{
    error::Failure,
    kernel::{preflight::Report, sysfs::Mounts},
};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Do not mount tracefs or bpffs when they are missing.
    #[arg(long)]
    pub no_mount: bool,
}

pub fn main(args: CheckArgs) -> Result<(), Failure> {
    let mut mounts = Mounts::default();
    let report = Report::gather(&mut mounts, !args.no_mount);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_table());
    }
    if report.blockers.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("cannot run: {}", report.blockers.join("; ")).into())
    }
}
