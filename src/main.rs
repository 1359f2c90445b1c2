//! The `walden` binary: command-line glue over the `walden` library.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // SAFETY: called first, before the async runtime or any other thread exists, which is
    // what changing the process environment requires.
    if let Err(e) = unsafe { walden::storage::s3::trust_aws_ca_bundle() } {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    cli::main()
}
