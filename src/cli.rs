//! The command line: Litestream's commands and flags, parsed with clap.
//!
//! Litestream is a Go program and its users type single-dash long flags (`-config`); clap
//! only knows `--config`, so known long flags are rewritten before clap sees them. Commands
//! give their errors context here with `anyhow`; the library's errors stay typed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};

use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;
use walden::config::{self, Config, LoadOptions, ReplicaConfig};
use walden::observe::health::DbReport;
use walden::observe::{client, server};
use walden::replica::Replica;
use walden::replicate::Replicator;
use walden::restore::{self, IntegrityCheck, RestoreError, RestoreOptions, Startup, rfc3339};
use walden::storage::RetryPolicy;
use walden::supervise::{self, Child, ChildCommand, Event, Outcome, Signals};

#[derive(Parser, Debug)]
#[command(
    name = "walden",
    version,
    about = "Streams SQLite WAL to S3-compatible storage or a directory, and restores it",
    long_about = None,
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replicate databases continuously until interrupted
    Replicate(ReplicateArgs),
    /// Restore a database from its replica
    Restore(RestoreArgs),
    /// List the generations of a database's replicas
    Generations(ListArgs),
    /// List the snapshots of a database's replicas
    Snapshots(ListArgs),
    /// List the WAL segments of a database's replicas
    Wal(WalArgs),
    /// List the databases in the configuration
    Databases(ConfigArgs),
    /// Print the effective configuration (defaults filled in, secrets redacted), or every
    /// problem in it
    Config(ConfigArgs),
    /// Show replication health from the running replicator (or, if none runs, the bucket);
    /// exits 0 only when every replica is healthy
    Status(ConfigArgs),
    /// Restore drill: restore each replica into a scratch directory, check its integrity and
    /// compare its content with the live database at the same position; exits 0 when all match
    Verify(VerifyArgs),
    /// Print the version
    Version,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Database path from the config
    #[arg(value_name = "DB_PATH")]
    target: PathBuf,
}

#[derive(Args, Debug, Clone)]
struct ConfigArgs {
    /// Configuration file (default: $WALDEN_CONFIG, $LITESTREAM_CONFIG, ./walden.yml,
    /// /etc/walden.yml, /etc/litestream.yml)
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Do not expand $VAR references in the configuration file
    #[arg(long)]
    no_expand_env: bool,
}

#[derive(Args, Debug)]
struct ReplicateArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Run this command as a child: restore missing databases first, forward signals, run a
    /// final sync when it exits and exit with its code
    #[arg(long, value_name = "CMD", allow_hyphen_values = true)]
    exec: Option<String>,
    /// With -exec, do not restore missing databases before starting the child
    #[arg(long)]
    no_restore: bool,
    /// With -exec, how long the child gets after SIGTERM/SIGINT before SIGKILL (e.g. 30s)
    #[arg(long, value_name = "DURATION", value_parser = parse_go_duration)]
    shutdown_timeout: Option<Duration>,
    /// Serve /health and /metrics on this address (e.g. :9090), like the config key `addr`
    #[arg(long, value_name = "ADDR")]
    addr: Option<String>,
    /// Log format: text (default) or json, like the config key logging.type
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Database path followed by one or more replica URLs (instead of a config file)
    #[arg(value_name = "DB_PATH REPLICA_URL")]
    args: Vec<String>,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Output path (default: the database path from the config; required with a URL)
    #[arg(short = 'o', value_name = "PATH")]
    output: Option<PathBuf>,
    /// Restore only from the replica with this name
    #[arg(long, value_name = "NAME")]
    replica: Option<String>,
    /// Restore from this generation
    #[arg(long, value_name = "ID")]
    generation: Option<String>,
    /// Restore up to and including this WAL index (hexadecimal)
    #[arg(long, value_name = "HEX", value_parser = parse_hex_index, conflicts_with = "timestamp")]
    index: Option<u32>,
    /// Restore the state at this time (RFC 3339, e.g. 2026-01-02T15:04:05Z)
    #[arg(long, value_name = "TIME", value_parser = parse_timestamp)]
    timestamp: Option<SystemTime>,
    /// WAL segments downloaded at once
    #[arg(long, value_name = "N", default_value_t = 8)]
    parallelism: usize,
    /// Check the restored database before moving it into place: none, quick or full
    #[arg(long, value_name = "MODE", default_value = "full", value_parser = parse_integrity_check)]
    integrity_check: IntegrityCheck,
    /// Exit successfully without restoring if the output already exists
    #[arg(long)]
    if_db_not_exists: bool,
    /// Exit successfully without restoring if no backup exists
    #[arg(long)]
    if_replica_exists: bool,
    /// Database path from the config, or a replica URL
    #[arg(value_name = "DB_PATH|REPLICA_URL")]
    target: String,
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Only this replica
    #[arg(long, value_name = "NAME")]
    replica: Option<String>,
    /// Database path from the config, or a replica URL
    #[arg(value_name = "DB_PATH|REPLICA_URL")]
    target: String,
}

#[derive(Args, Debug)]
struct WalArgs {
    #[command(flatten)]
    list: ListArgs,
    /// Only this generation
    #[arg(long, value_name = "ID")]
    generation: Option<String>,
}

fn parse_go_duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_hex_index(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 16)
        .ok()
        .filter(|i| *i <= walden::format::MAX_INDEX)
        .ok_or_else(|| format!("invalid index {s:?}: expected hexadecimal, e.g. 0000001a or 1a"))
}

fn parse_integrity_check(s: &str) -> Result<IntegrityCheck, String> {
    match s {
        "none" => Ok(IntegrityCheck::None),
        "quick" => Ok(IntegrityCheck::Quick),
        "full" => Ok(IntegrityCheck::Full),
        _ => Err(format!(
            "invalid integrity check {s:?}: expected none, quick or full"
        )),
    }
}

fn parse_timestamp(s: &str) -> Result<SystemTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|_| {
            format!("invalid timestamp {s:?}: expected RFC 3339, e.g. 2026-01-02T15:04:05Z")
        })
}

/// Rewrites Litestream-style `-flag` into `--flag` for every long flag clap knows, leaving
/// values (the word after a flag that takes one) alone.
fn normalize_args(args: Vec<String>) -> Vec<String> {
    let mut takes_value = std::collections::HashMap::new();
    fn collect(cmd: &clap::Command, out: &mut std::collections::HashMap<String, bool>) {
        for a in cmd.get_arguments() {
            if let Some(l) = a.get_long() {
                out.insert(l.to_string(), a.get_action().takes_values());
            }
        }
        for sub in cmd.get_subcommands() {
            collect(sub, out);
        }
    }
    collect(&Cli::command(), &mut takes_value);
    let mut out = Vec::with_capacity(args.len());
    let mut skip_next = false;
    let mut rest = false;
    for arg in args {
        if rest || skip_next {
            skip_next = false;
            out.push(arg);
            continue;
        }
        if arg == "--" {
            rest = true;
            out.push(arg);
            continue;
        }
        let long = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-').filter(|s| s.len() > 1));
        match long {
            Some(body) => {
                let (name, inline) = match body.split_once('=') {
                    Some((n, _)) => (n, true),
                    None => (body, false),
                };
                match takes_value.get(name) {
                    Some(&value) => {
                        skip_next = value && !inline;
                        out.push(format!("--{body}"));
                    }
                    None => out.push(arg),
                }
            }
            None => out.push(arg),
        }
    }
    out
}

/// Runs the program and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let args = normalize_args(std::env::args().collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Blocking work (SQLite, file copies, compression) is short and CPU-bound: a few threads
    // keep two cores busy, while tokio's default pool of up to 512 grew one thread, with its
    // stack and arena, per database being synced at once.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: library errors often include their
/// cause's text in their own message and also expose it as `source()`.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Version => {
            println!("walden {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Replicate(a) => replicate(a).await,
        Command::Restore(a) => restore_cmd(a).await,
        Command::Generations(a) => generations(a).await,
        Command::Snapshots(a) => snapshots(a).await,
        Command::Wal(a) => wal(a).await,
        Command::Databases(a) => databases(a),
        Command::Status(a) => status(a).await,
        Command::Verify(a) => verify_cmd(a).await,
        Command::Config(a) => show_config(a),
    }
}

/// Logs the configuration's warnings; a no-op until logging is set up, so `replicate` calls
/// it again once it is.
fn report_warnings(cfg: &Config) {
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
}

fn load_config(args: &ConfigArgs) -> Result<Config> {
    let env: config::Env = &config::process_env;
    let path = config::locate(args.config.as_deref(), env).ok_or_else(|| {
        anyhow!(
            "no config file found (looked for $WALDEN_CONFIG, $LITESTREAM_CONFIG, ./walden.yml, \
             /etc/walden.yml, /etc/litestream.yml); pass -config PATH or give a replica URL"
        )
    })?;
    let cfg = config::load(
        &path,
        LoadOptions {
            no_expand_env: args.no_expand_env,
        },
        env,
    )?;
    tracing::debug!(path = %path.display(), "config loaded");
    report_warnings(&cfg);
    Ok(cfg)
}

/// The replicas a command works on: from a URL, or from the config entry of a database path.
fn target_replicas(
    config: &ConfigArgs,
    target: &str,
    only: Option<&str>,
) -> Result<(Option<PathBuf>, Vec<Replica>)> {
    let configs: Vec<ReplicaConfig>;
    let db_path;
    if config::is_url(target) {
        if config.config.is_some() {
            bail!("cannot use -config together with a replica URL");
        }
        configs = vec![config::replica_from_url(target, &config::process_env)?];
        db_path = None;
    } else {
        let cfg = load_config(config)?;
        let db = cfg.db(Path::new(target)).ok_or_else(|| {
            anyhow!(
                "database not found in config {}: {target}",
                cfg.source.as_deref().unwrap_or(Path::new("?")).display()
            )
        })?;
        db_path = Some(db.path.clone());
        configs = db
            .replicas
            .iter()
            .filter(|r| only.is_none_or(|n| r.name == n))
            .cloned()
            .collect();
        if configs.is_empty() {
            match only {
                Some(n) => bail!("replica {n:?} not found for database {target}"),
                None => bail!("database {target} has no replicas in its config"),
            }
        }
    }
    let replicas = configs
        .iter()
        .map(|c| {
            Replica::open(c, RetryPolicy::default()).with_context(|| format!("replica {}", c.name))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((db_path, replicas))
}

fn init_logging(to_stdout: bool, level: Option<&str>, json: bool) {
    walden::observe::init_logging(walden::observe::LogOptions {
        stdout: to_stdout,
        level: level.map(str::to_string),
        json,
    });
}

async fn replicate(args: ReplicateArgs) -> Result<ExitCode> {
    let mut cfg = if args.args.is_empty() {
        load_config(&args.config)?
    } else {
        if args.config.config.is_some() {
            bail!("cannot use -config together with DB_PATH and replica URLs");
        }
        if args.args.len() < 2 {
            bail!(
                "a database path needs at least one replica URL: walden replicate DB_PATH REPLICA_URL..."
            );
        }
        let replicas = args.args[1..]
            .iter()
            .map(|u| config::replica_from_url(u, &config::process_env))
            .collect::<Result<Vec<_>, _>>()?;
        Config {
            dbs: vec![config::db_from_args(Path::new(&args.args[0]), replicas)],
            ..Config::default()
        }
    };
    if let Some(t) = args.shutdown_timeout {
        cfg.shutdown_timeout = t;
    }
    if args.addr.is_some() {
        cfg.addr = args.addr.clone();
    }
    if let Some(format) = &args.log_format {
        cfg.logging.json = format == "json";
    }
    let exec = args.exec.clone().or(cfg.exec.clone());
    let command = exec.as_deref().map(ChildCommand::parse).transpose()?;
    init_logging(
        !cfg.logging.stderr,
        cfg.logging.level.as_deref(),
        cfg.logging.json,
    );
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "walden");
    if let Some(src) = &cfg.source {
        tracing::info!(path = %src.display(), "config loaded");
    }
    report_warnings(&cfg);
    if cfg.dbs.is_empty() {
        tracing::error!("no databases specified in configuration");
    }
    let outcome = match command {
        Some(command) => supervise_child(&cfg, command, !args.no_restore).await?,
        None => {
            check_replicas(&cfg).await?;
            let (replicator, server) = start_replicator(&cfg).await?;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            let signal = wait_for_shutdown_signal().await;
            tracing::info!(signal, "signal received, shutting down");
            let synced = final_sync(replicator, &cfg, None).await;
            server.cancel();
            Outcome::Stopped { synced }
        }
    };
    tracing::info!("walden shut down");
    Ok(ExitCode::from(supervise::exit_code(&outcome)))
}

/// Starts replication and the health endpoints (`addr`, and a status socket per database).
async fn start_replicator(cfg: &Config) -> Result<(Replicator, CancellationToken)> {
    for db in &cfg.dbs {
        tracing::info!(path = %db.path.display(), replicas = db.replicas.len(), "initialized db");
    }
    let replicator = Replicator::start(cfg)?;
    let stop = CancellationToken::new();
    let sockets: Vec<PathBuf> = cfg
        .dbs
        .iter()
        .map(|d| server::socket_path(&d.meta_path))
        .collect();
    server::serve(
        cfg.addr.as_deref(),
        &sockets,
        replicator.views(),
        stop.clone(),
    )
    .await?;
    Ok((replicator, stop))
}

/// The final sync, bounded by a timeout and, with `-exec`, abandoned when a second SIGINT or
/// SIGTERM arrives. Returns whether every committed transaction reached every replica.
async fn final_sync(
    replicator: Replicator,
    cfg: &Config,
    events: Option<&mut tokio::sync::mpsc::UnboundedReceiver<Event>>,
) -> bool {
    let timeout = cfg.final_sync_timeout();
    let sync = replicator.shutdown(timeout);
    let abandon = async {
        match events {
            Some(events) => loop {
                match events.recv().await {
                    Some(Event::Forward(Signal::SIGINT | Signal::SIGTERM)) => break,
                    Some(_) => {}
                    None => std::future::pending::<()>().await,
                }
            },
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        errors = sync => {
            for e in &errors {
                tracing::error!(error = %e, "final sync failed");
            }
            errors.is_empty()
        }
        _ = abandon => {
            tracing::warn!("second signal during the final sync; exiting without finishing it");
            false
        }
    }
}

/// `replicate -exec`: restore what is missing, replicate, run the child, final sync.
async fn supervise_child(cfg: &Config, command: ChildCommand, restore: bool) -> Result<Outcome> {
    supervise::become_subreaper();
    let (_signals, mut events) = Signals::start()?;
    if restore {
        for db in cfg.dbs.iter().filter(|d| d.restore_if_db_not_exists) {
            if !restore_before_start(db).await {
                return Ok(Outcome::RestoreFailed);
            }
        }
    }
    check_replicas(cfg).await?;
    let (replicator, server) = start_replicator(cfg).await?;
    for e in replicator.sync_all().await {
        tracing::warn!(error = %e, "initial sync incomplete; the child starts anyway and replication keeps retrying");
    }
    let child = match Child::spawn(&command) {
        Ok(child) => child,
        Err((exit, e)) => {
            tracing::error!(error = %e, "cannot start child");
            let synced = final_sync(replicator, cfg, None).await;
            server.cancel();
            return Ok(Outcome::Child { exit, synced });
        }
    };
    tracing::info!(pid = child.pid(), command = ?command, "child started");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let exit = child.wait(&mut events, cfg.shutdown_timeout).await;
    tracing::info!(?exit, "child exited, running final sync");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let synced = final_sync(replicator, cfg, Some(&mut events)).await;
    server.cancel();
    supervise::reap_orphans();
    Ok(Outcome::Child { exit, synced })
}

/// Restores one missing database before the child starts; false when the child must not
/// start because the store could not be read.
async fn restore_before_start(db: &walden::config::DbConfig) -> bool {
    let opened: Result<Vec<Replica>, _> = db
        .replicas
        .iter()
        .map(|r| Replica::open(r, RetryPolicy::default()))
        .collect();
    let result = match opened {
        Ok(replicas) => restore::restore_if_missing(db, &replicas, 8)
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(Startup::Exists) => true,
        Ok(Startup::NoBackup) => {
            tracing::info!(db = %db.path.display(), "database missing and no backup exists; starting fresh");
            true
        }
        Ok(Startup::Restored(r)) => {
            tracing::info!(db = %db.path.display(), replica = %r.replica, generation = %r.generation,
                index = r.position.index, offset = r.position.offset, "database restored before start");
            true
        }
        Err(e) => {
            tracing::error!(db = %db.path.display(), error = %one_line(&e),
                "database missing and its replica cannot be read; not starting the child, \
                 because starting fresh would fork its history");
            false
        }
    }
}

/// How many start-up checks run at once. One after another, a thousand databases on a store
/// 30 ms away would wait 30 s before replication started.
const CHECKS_IN_FLIGHT: usize = 32;

/// Checks every replica once before replicating: a permanent problem (credentials, a missing
/// bucket, a bad setting) stops the start with a one-line error, because running on would
/// only log failures forever; a transient one (the endpoint is down) is logged and replication
/// starts anyway, retrying until the store is back. Checks run concurrently; the first
/// permanent problem in config order is the one reported.
async fn check_replicas(cfg: &Config) -> Result<()> {
    use futures::stream::{self, StreamExt};
    let checks = cfg
        .dbs
        .iter()
        .flat_map(|db| db.replicas.iter().map(move |rc| (db, rc)))
        .map(|(db, rc)| async move {
            let replica = Replica::open(rc, RetryPolicy::probe())
                .with_context(|| format!("{}: replica {}", db.path.display(), rc.name))?;
            anyhow::Ok((db, rc, replica.check().await))
        });
    let outcomes: Vec<_> = stream::iter(checks)
        .buffered(CHECKS_IN_FLIGHT)
        .collect()
        .await;
    for outcome in outcomes {
        let (db, rc, checked) = outcome?;
        match checked {
            Ok(()) => {}
            Err(e) if e.is_permanent() => {
                bail!("{}: replica {}: {e}", db.path.display(), rc.name)
            }
            Err(e) => tracing::warn!(db = %db.path.display(), replica = %rc.name,
                error = %e, "replica not reachable yet; will keep retrying"),
        }
    }
    Ok(())
}

async fn wait_for_shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

async fn restore_cmd(args: RestoreArgs) -> Result<ExitCode> {
    init_logging(false, None, false);
    let (db_path, replicas) = target_replicas(&args.config, &args.target, args.replica.as_deref())?;
    let output = match (&args.output, &db_path) {
        (Some(o), _) => o.clone(),
        (None, Some(p)) => p.clone(),
        (None, None) => bail!("output path required: pass -o PATH when restoring from a URL"),
    };
    if output.exists() {
        if args.if_db_not_exists {
            tracing::info!(path = %output.display(), "database already exists, skipping");
            return Ok(ExitCode::SUCCESS);
        }
        return Err(RestoreError::OutputExists(output).into());
    }
    let opts = RestoreOptions {
        output: output.clone(),
        generation: args.generation,
        index: args.index,
        timestamp: args.timestamp,
        until: None,
        parallelism: args.parallelism,
        check: args.integrity_check,
    };
    let plan = match restore::plan(&replicas, &opts).await {
        Ok(plan) => plan,
        Err(e @ RestoreError::NoBackups { .. }) if args.if_replica_exists => {
            tracing::info!("{e}; nothing restored");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(replica = %replicas[plan.replica].name, generation = %plan.generation,
        snapshot = plan.snapshot.index, segments = plan.segments.len(), "restoring");
    let started = std::time::Instant::now();
    let done = restore::restore(&replicas, &plan, &opts).await?;
    tracing::info!(path = %output.display(), replica = %done.replica, generation = %done.generation,
        index = done.position.index, offset = done.position.offset,
        elapsed_ms = started.elapsed().as_millis() as u64, "restore complete");
    Ok(ExitCode::SUCCESS)
}

/// Prints rows aligned in columns two spaces apart, like Go's tabwriter in Litestream.
fn print_table(header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let mut out = std::io::stdout().lock();
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s += c;
            } else {
                s += &format!("{c:<w$}  ", w = widths[i]);
            }
        }
        s
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

fn go_lag(since: SystemTime) -> String {
    let d = since.elapsed().unwrap_or_default();
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        config::format_duration(Duration::from_secs(d.as_secs()))
    }
}

async fn generations(args: ListArgs) -> Result<ExitCode> {
    init_logging(false, None, false);
    let (_, replicas) = target_replicas(&args.config, &args.target, args.replica.as_deref())?;
    let mut rows = Vec::new();
    for r in &replicas {
        for g in r.generations().await.with_context(|| r.describe())? {
            let info = r.generation_info(&g).await.with_context(|| r.describe())?;
            let Some((start, end)) = info.bounds() else {
                continue;
            };
            rows.push(vec![
                r.name.clone(),
                g,
                go_lag(end),
                rfc3339(start),
                rfc3339(end),
            ]);
        }
    }
    print_table(&["name", "generation", "lag", "start", "end"], &rows)?;
    Ok(ExitCode::SUCCESS)
}

async fn snapshots(args: ListArgs) -> Result<ExitCode> {
    init_logging(false, None, false);
    let (_, replicas) = target_replicas(&args.config, &args.target, args.replica.as_deref())?;
    let mut rows = Vec::new();
    for r in &replicas {
        for g in r.generations().await.with_context(|| r.describe())? {
            for s in r.snapshots(&g).await.with_context(|| r.describe())? {
                rows.push(vec![
                    r.name.clone(),
                    g.clone(),
                    s.index.to_string(),
                    s.size.to_string(),
                    rfc3339(s.created),
                ]);
            }
        }
    }
    print_table(
        &["replica", "generation", "index", "size", "created"],
        &rows,
    )?;
    Ok(ExitCode::SUCCESS)
}

async fn wal(args: WalArgs) -> Result<ExitCode> {
    init_logging(false, None, false);
    let a = &args.list;
    let (_, replicas) = target_replicas(&a.config, &a.target, a.replica.as_deref())?;
    let mut rows = Vec::new();
    for r in &replicas {
        for g in r.generations().await.with_context(|| r.describe())? {
            if args.generation.as_ref().is_some_and(|x| *x != g) {
                continue;
            }
            for s in r.segments(&g).await.with_context(|| r.describe())? {
                rows.push(vec![
                    r.name.clone(),
                    g.clone(),
                    s.pos.index.to_string(),
                    s.pos.offset.to_string(),
                    s.size.to_string(),
                    rfc3339(s.created),
                ]);
            }
        }
    }
    print_table(
        &[
            "replica",
            "generation",
            "index",
            "offset",
            "size",
            "created",
        ],
        &rows,
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `walden config`: the effective configuration on stdout; if it is invalid, every problem
/// on stderr, one `error:` line each, and a failing exit code. Warnings (unset variables)
/// are logged to stderr.
fn show_config(args: ConfigArgs) -> Result<ExitCode> {
    init_logging(false, None, false);
    match load_config(&args) {
        Ok(cfg) => {
            print!("{}", cfg.to_yaml());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            for line in format!("{e:#}").lines() {
                eprintln!("error: {line}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn databases(args: ConfigArgs) -> Result<ExitCode> {
    init_logging(false, None, false);
    let cfg = load_config(&args)?;
    let rows: Vec<Vec<String>> = cfg
        .dbs
        .iter()
        .map(|d| {
            vec![
                d.path.display().to_string(),
                d.replicas
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    print_table(&["path", "replicas"], &rows)?;
    Ok(ExitCode::SUCCESS)
}

/// The running replicator's report for one database: its status socket first, then `addr`.
async fn running_report(db: &walden::config::DbConfig, cfg: &Config) -> Option<DbReport> {
    let socket = server::socket_path(&db.meta_path);
    let report = match client::health(&client::Endpoint::Socket(&socket)).await {
        Ok(r) => Some(r),
        Err(_) => match &cfg.addr {
            Some(addr) => client::health(&client::Endpoint::Addr(addr)).await.ok(),
            None => None,
        },
    }?;
    let want = db.path.display().to_string();
    report.databases.into_iter().find(|d| d.path == want)
}

async fn status(args: ConfigArgs) -> Result<ExitCode> {
    init_logging(false, None, false);
    let cfg = load_config(&args)?;
    let mut rows = Vec::new();
    let mut all_healthy = true;
    for db in &cfg.dbs {
        let path = db.path.display().to_string();
        if let Some(report) = running_report(db, &cfg).await {
            all_healthy &= report.healthy;
            if let Some(e) = &report.health_error {
                rows.push(vec![
                    path.clone(),
                    "-".into(),
                    "unhealthy".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    e.clone(),
                ]);
            }
            for r in &report.replicas {
                rows.push(vec![
                    path.clone(),
                    r.name.clone(),
                    if r.healthy { "healthy" } else { "unhealthy" }.into(),
                    r.last_synced_at.clone().unwrap_or_else(|| "-".into()),
                    format!("{:.1}s", r.lag_seconds),
                    r.pending_bytes.to_string(),
                    r.generation.clone().unwrap_or_else(|| "-".into()),
                    match (r.index, r.offset) {
                        (Some(i), Some(o)) => format!("{i:08x}/{o:08x}"),
                        _ => "-".into(),
                    },
                    r.health_error.clone().unwrap_or_default(),
                ]);
            }
            continue;
        }
        all_healthy = false;
        for rc in &db.replicas {
            let row = match bucket_summary(rc).await {
                Ok((generation, last, position)) => vec![
                    path.clone(),
                    rc.name.clone(),
                    "not running".into(),
                    last,
                    "-".into(),
                    "-".into(),
                    generation,
                    position,
                    "no replicator is running for this database".into(),
                ],
                Err(e) => vec![
                    path.clone(),
                    rc.name.clone(),
                    "not running".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    one_line(&e),
                ],
            };
            rows.push(row);
        }
    }
    print_table(
        &[
            "database",
            "replica",
            "status",
            "last_synced_at",
            "lag",
            "pending",
            "generation",
            "position",
            "error",
        ],
        &rows,
    )?;
    Ok(if all_healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What the bucket says when no replicator runs: the latest generation, the time of its last
/// object and its last position.
async fn bucket_summary(rc: &ReplicaConfig) -> Result<(String, String, String)> {
    let replica = Replica::open(rc, RetryPolicy::probe())?;
    let mut latest: Option<(walden::replica::GenerationInfo, SystemTime)> = None;
    for g in replica.generations().await? {
        let info = replica.generation_info(&g).await?;
        if let Some((_, end)) = info.bounds()
            && latest.as_ref().is_none_or(|(_, t)| end > *t)
        {
            latest = Some((info, end));
        }
    }
    let Some((info, end)) = latest else {
        return Ok(("-".into(), "-".into(), "no backup".into()));
    };
    let position = match (info.snapshots.last(), info.segments.last()) {
        (_, Some(seg)) => format!("{:08x}/{:08x}", seg.pos.index, seg.pos.offset),
        (Some(snap), None) => format!("{:08x}/00000000", snap.index),
        (None, None) => "-".into(),
    };
    Ok((info.generation, rfc3339(end), position))
}

async fn verify_cmd(args: VerifyArgs) -> Result<ExitCode> {
    init_logging(false, None, false);
    let cfg = load_config(&args.config)?;
    let db = cfg.db(&args.target).ok_or_else(|| {
        anyhow!(
            "database not found in config {}: {}",
            cfg.source.as_deref().unwrap_or(Path::new("?")).display(),
            args.target.display()
        )
    })?;
    let path = db.path.display().to_string();
    let socket = server::socket_path(&db.meta_path);
    let mut endpoints = vec![client::Endpoint::Socket(&socket)];
    if let Some(addr) = &cfg.addr {
        endpoints.push(client::Endpoint::Addr(addr));
    }
    let mut running = None;
    for endpoint in &endpoints {
        match client::verify(endpoint, &path).await {
            Ok(v) => {
                running = Some(v);
                break;
            }
            Err(client::ClientError::Connect(_)) => continue,
            Err(e) => bail!("the running replicator did not answer the drill: {e}"),
        }
    }
    let verdicts = match running {
        Some(v) => v,
        None => verify_standalone(db).await?,
    };
    let rows: Vec<Vec<String>> = verdicts
        .iter()
        .map(|v| {
            vec![
                v.replica.clone(),
                v.generation.clone().unwrap_or_else(|| "-".into()),
                match (v.index, v.offset) {
                    (Some(i), Some(o)) => format!("{i:08x}/{o:08x}"),
                    _ => "-".into(),
                },
                if v.ok { "OK".into() } else { "FAILED".into() },
                v.detail.clone(),
            ]
        })
        .collect();
    print_table(
        &["replica", "generation", "position", "result", "detail"],
        &rows,
    )?;
    Ok(if !verdicts.is_empty() && verdicts.iter().all(|v| v.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The drill when no replicator runs: each replica's latest state against the live file.
async fn verify_standalone(db: &walden::config::DbConfig) -> Result<Vec<walden::verify::Verdict>> {
    let live = rusqlite::Connection::open_with_flags(
        &db.path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {}", db.path.display()))?;
    let sum = walden::verify::checksum(&live)
        .with_context(|| format!("cannot read {}", db.path.display()))?;
    drop(live);
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let mut verdicts = Vec::new();
    for rc in &db.replicas {
        let replica = Replica::open(rc, RetryPolicy::default())?;
        let mut v = walden::verify::check_replica(&replica, None, None, sum, scratch.path()).await;
        if !v.ok && v.detail.contains("differs") {
            v.detail += " (no replicator is running: the live database may hold changes that were never replicated)";
        }
        verdicts.push(v);
    }
    Ok(verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(args: &[&str]) -> Vec<String> {
        normalize_args(args.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn single_dash_long_flags_are_rewritten() {
        assert_eq!(
            n(&[
                "walden",
                "restore",
                "-config",
                "x.yml",
                "-o",
                "out",
                "-if-db-not-exists",
                "db"
            ]),
            [
                "walden",
                "restore",
                "--config",
                "x.yml",
                "-o",
                "out",
                "--if-db-not-exists",
                "db"
            ]
        );
        assert_eq!(
            n(&[
                "walden",
                "restore",
                "-generation=abc",
                "-replica",
                "-config",
                "db"
            ]),
            [
                "walden",
                "restore",
                "--generation=abc",
                "--replica",
                "-config",
                "db"
            ]
        );
        assert_eq!(n(&["walden", "-unknown"]), ["walden", "-unknown"]);
    }

    #[test]
    fn restores_check_fully_unless_told_otherwise() {
        let check = |args: &[&str]| match Cli::try_parse_from(n(args)).map(|c| c.command) {
            Ok(Command::Restore(r)) => Ok(r.integrity_check),
            Ok(other) => panic!("parsed as {other:?}"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(
            check(&["walden", "restore", "db"]),
            Ok(IntegrityCheck::Full)
        );
        assert_eq!(
            check(&["walden", "restore", "-integrity-check", "quick", "db"]),
            Ok(IntegrityCheck::Quick)
        );
        assert_eq!(
            check(&["walden", "restore", "-integrity-check=none", "db"]),
            Ok(IntegrityCheck::None)
        );
        let err = check(&["walden", "restore", "-integrity-check", "all", "db"]).unwrap_err();
        assert!(err.contains("expected none, quick or full"), "{err}");
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
