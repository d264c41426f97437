//! meshctl: shows what the kernel is doing, read straight from the pinned maps.

use std::process::ExitCode;

use clap::Parser;
use mesh_agent::ctl::{Args, CtlError, execute};

fn main() -> ExitCode {
    match execute(&Args::parse()) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(CtlError::Disagree(out)) => {
            println!("{out}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::FAILURE
        }
    }
}
