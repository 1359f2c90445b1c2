//! Observability: how Walden tells operators what it is doing and whether it is working.
//!
//! Logging is set up once, here, so every command logs the same way: readable lines by
//! default, JSON on request, the level from `RUST_LOG` or the config. [`metrics`] holds the
//! Prometheus metrics, [`health`] turns the engine's state into a verdict an operator can
//! trust, and [`server`] serves both over HTTP and a unix socket.

pub mod client;
pub mod health;
pub mod metrics;
pub mod server;

use tracing_subscriber::EnvFilter;

/// Where and how to log.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// Litestream logs `replicate` to stdout; other commands keep stdout for their output.
    pub stdout: bool,
    /// `logging.level` from the config; `RUST_LOG` wins when set.
    pub level: Option<String>,
    pub json: bool,
}

/// Installs the global subscriber; later calls are ignored.
pub fn init_logging(opts: LogOptions) {
    let level = match opts
        .level
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("warning") => "warn".to_string(),
        Some(l) => l.to_string(),
        None => "info".to_string(),
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},s3=warn,reqwest=warn,hyper=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let result = match (opts.json, opts.stdout) {
        (true, true) => builder.json().with_writer(std::io::stdout).try_init(),
        (true, false) => builder.json().with_writer(std::io::stderr).try_init(),
        (false, true) => builder.with_writer(std::io::stdout).try_init(),
        (false, false) => builder.with_writer(std::io::stderr).try_init(),
    };
    drop(result);
}
