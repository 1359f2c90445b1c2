//! The `walden` binary: command-line glue over the `walden` library.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    limit_malloc_retention();
    walden::replicate::db::configure_sqlite();
    // SAFETY: called first, before the async runtime or any other thread exists, which is
    // what changing the process environment requires.
    if let Err(e) = unsafe { walden::storage::s3::trust_aws_ca_bundle() } {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    cli::main()
}

/// glibc gives every thread that allocates its own malloc arena and keeps what is freed there;
/// Walden's blocking pool allocates megabyte buffers on whichever thread runs a sync, so
/// without a cap the same buffers end up resident once per arena. Two arenas serve the two
/// worker threads.
fn limit_malloc_retention() {
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread
    // exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
    }
}
