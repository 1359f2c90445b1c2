//! The replication engine: one task per database copying its WAL into shadow segments, one
//! task per replica uploading them.
//!
//! The two sides are decoupled on purpose: the database task never waits for the network, so
//! a slow or unreachable store never holds SQLite's locks, and an upload that fails leaves its
//! position where it was, so the same bytes are sent again on the next tick and nothing
//! committed is ever skipped. Shadow segments are removed only once every replica has moved
//! past them.

pub mod db;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DbConfig, ReplicaConfig};
use crate::format::{self, Pos};
use crate::observe::metrics::metrics;
use crate::replica::Replica;
use crate::storage::{Body, RetryPolicy, StorageError};
use crate::verify::{self, Verdict};
use db::{Db, DbError, LocalSegment, LocalSnapshot, Position};

impl ReplicateError {
    /// A short, stable name for the `walden_errors_total` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            ReplicateError::Db(_) => "database",
            ReplicateError::Storage { source, .. } => source.kind(),
            ReplicateError::Corrupt { .. } => "corrupt_object",
            ReplicateError::Internal(_) => "internal",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{replica}: {source}")]
    Storage {
        replica: String,
        source: StorageError,
    },
    #[error("{replica}: object {key} is not a valid lz4 frame: {source}")]
    Corrupt {
        replica: String,
        key: String,
        source: format::FormatError,
    },
    #[error("{0}")]
    Internal(String),
}

/// The state the database task publishes for its uploaders.
#[derive(Debug, Clone, Default)]
pub struct DbStatus {
    pub position: Option<Position>,
    pub page_size: u32,
    pub snapshot: Option<Arc<LocalSnapshot>>,
    pub last_error: Option<String>,
    pub wal_size: u64,
}

/// What operators and health checks see of one replica.
#[derive(Debug, Clone, Default)]
pub struct ReplicaHealth {
    /// When the store last confirmed an upload; never set by a sync that sent nothing.
    pub last_synced_at: Option<SystemTime>,
    /// When a sync last completed, whether or not it had anything to send.
    pub last_ok_at: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
    pub position: Option<(String, Pos)>,
    /// Since when committed data has been waiting for upload; `None` when caught up.
    pub pending_since: Option<SystemTime>,
    pub pending_bytes: u64,
    /// Pending data older than this makes the replica unhealthy.
    pub health_lag: Duration,
    /// The last restore drill: when, and what it found.
    pub last_verify: Option<(SystemTime, Result<(), String>)>,
}

impl ReplicaHealth {
    /// The one rule for "healthy": the last sync did not fail after the last success, and no
    /// committed data has waited longer than `health_lag`. Returns the reason when unhealthy.
    pub fn verdict(&self, now: SystemTime) -> Result<(), String> {
        if let Some((_, Err(e))) = &self.last_verify {
            return Err(format!("restore drill failed: {e}"));
        }
        if let Some((at, error)) = &self.last_error
            && self.last_ok_at.is_none_or(|ok| *at >= ok)
        {
            return Err(error.clone());
        }
        if let Some(lag) = self.lag(now)
            && lag > self.health_lag
        {
            return Err(format!(
                "{} bytes committed {:.0}s ago are not uploaded yet (health-lag {})",
                self.pending_bytes,
                lag.as_secs_f64(),
                crate::config::format_duration(self.health_lag)
            ));
        }
        Ok(())
    }

    /// How long the oldest data not yet uploaded has waited.
    pub fn lag(&self, now: SystemTime) -> Option<Duration> {
        self.pending_since
            .map(|since| now.duration_since(since).unwrap_or_default())
    }
}

enum DbCommand {
    Snapshot,
    Verify(oneshot::Sender<Vec<Verdict>>),
    SnapshotUploaded {
        replica: usize,
        index: u32,
    },
    /// Copies and publishes; with `last` set the task stops working on its own afterwards.
    Sync {
        reply: oneshot::Sender<Result<(), String>>,
        last: bool,
    },
}

type Positions = Arc<Mutex<Vec<Option<(String, Pos)>>>>;

/// A running database with its replicas.
pub struct DbHandle {
    pub path: std::path::PathBuf,
    pub status: watch::Receiver<DbStatus>,
    pub replicas: Vec<ReplicaHandle>,
    commands: mpsc::UnboundedSender<DbCommand>,
    task: JoinHandle<()>,
}

pub struct ReplicaHandle {
    pub name: String,
    pub health: Arc<Mutex<ReplicaHealth>>,
    flush: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
    task: JoinHandle<()>,
}

/// Every configured database replicating in this process.
pub struct Replicator {
    pub dbs: Vec<DbHandle>,
    shutdown: CancellationToken,
}

/// What the health report reads of one database: cheap clones of the task's published state.
#[derive(Clone)]
pub struct DbView {
    pub path: std::path::PathBuf,
    pub status: watch::Receiver<DbStatus>,
    pub replicas: Vec<(String, Arc<Mutex<ReplicaHealth>>)>,
    commands: mpsc::UnboundedSender<DbCommand>,
}

impl DbView {
    /// Runs a restore drill against every replica of this database (see [`crate::verify`]).
    pub async fn verify(&self) -> Vec<Verdict> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(DbCommand::Verify(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

impl Replicator {
    /// Views of every database for health reports, which outlive no task they read from.
    pub fn views(&self) -> Vec<DbView> {
        self.dbs
            .iter()
            .map(|d| DbView {
                path: d.path.clone(),
                status: d.status.clone(),
                replicas: d
                    .replicas
                    .iter()
                    .map(|r| (r.name.clone(), r.health.clone()))
                    .collect(),
                commands: d.commands.clone(),
            })
            .collect()
    }

    /// Opens the stores and starts every task. Databases that do not exist yet are picked up
    /// on the first tick where they do.
    pub fn start(config: &Config) -> Result<Replicator, ReplicateError> {
        let shutdown = CancellationToken::new();
        let mut dbs = Vec::new();
        for db in &config.dbs {
            dbs.push(start_db(db, shutdown.clone())?);
        }
        Ok(Replicator { dbs, shutdown })
    }

    /// Copies what SQLite has committed and uploads it to every replica, returning the
    /// problems met; used before a child starts.
    pub async fn sync_all(&self) -> Vec<String> {
        self.sync_every_db(false).await
    }

    /// With `last`, each database task stops checkpointing and snapshotting by itself: a
    /// snapshot the final uploads request (snapshot-interval elapsed) would otherwise run after
    /// them and write Litestream's `_litestream_seq` row where no upload follows.
    async fn sync_every_db(&self, last: bool) -> Vec<String> {
        let mut errors = Vec::new();
        for db in &self.dbs {
            let (reply, rx) = oneshot::channel();
            if db.commands.send(DbCommand::Sync { reply, last }).is_err() {
                errors.push(format!("{}: replication task stopped", db.path.display()));
                continue;
            }
            if let Ok(Err(e)) = rx.await {
                errors.push(e);
            }
            let flushes: Vec<_> = db
                .replicas
                .iter()
                .map(|r| {
                    let (tx, rx) = oneshot::channel();
                    let sent = r.flush.send(tx).is_ok();
                    (r.name.clone(), sent, rx)
                })
                .collect();
            for (name, sent, rx) in flushes {
                let result = if sent {
                    rx.await.unwrap_or(Err("replica task stopped".into()))
                } else {
                    Err("replica task stopped".into())
                };
                if let Err(e) = result {
                    errors.push(format!("{} replica {name}: {e}", db.path.display()));
                }
            }
        }
        errors
    }

    /// Final sync bounded by `timeout`, then stops every task. Returns the problems met; an
    /// empty list means every committed transaction reached every replica.
    pub async fn shutdown(self, timeout: Duration) -> Vec<String> {
        let errors = match tokio::time::timeout(timeout, self.sync_every_db(true)).await {
            Ok(errors) => errors,
            Err(_) => vec![format!("final sync did not finish within {timeout:?}")],
        };
        self.shutdown.cancel();
        for db in self.dbs {
            for r in db.replicas {
                let _ = r.task.await;
            }
            let _ = db.task.await;
        }
        errors
    }
}

fn start_db(cfg: &DbConfig, shutdown: CancellationToken) -> Result<DbHandle, ReplicateError> {
    let (status_tx, status_rx) = watch::channel(DbStatus::default());
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let positions: Positions = Arc::new(Mutex::new(vec![None; cfg.replicas.len()]));
    let mut replicas = Vec::new();
    for (i, rc) in cfg.replicas.iter().enumerate() {
        let replica = Replica::open(rc, RetryPolicy::replication()).map_err(|source| {
            ReplicateError::Storage {
                replica: rc.name.clone(),
                source,
            }
        })?;
        tracing::info!(db = %cfg.path.display(), name = %rc.name, target = %replica.describe(),
            sync_interval = %crate::config::format_duration(rc.sync_interval), "replicating to");
        let health = Arc::new(Mutex::new(ReplicaHealth {
            health_lag: rc.health_lag,
            ..ReplicaHealth::default()
        }));
        let (flush_tx, flush_rx) = mpsc::unbounded_channel();
        let task = Uploader {
            idx: i,
            cfg: rc.clone(),
            replica,
            meta_path: cfg.meta_path.clone(),
            db_path: cfg.path.clone(),
            status: status_rx.clone(),
            commands: cmd_tx.clone(),
            positions: positions.clone(),
            health: health.clone(),
            pos: None,
            last_snapshot_at: None,
            snapshot_requested: false,
            uploaded_snapshot: None,
        };
        let task = tokio::spawn(task.run(flush_rx, shutdown.clone()));
        replicas.push(ReplicaHandle {
            name: rc.name.clone(),
            health,
            flush: flush_tx,
            task,
        });
    }
    let drills = cfg
        .replicas
        .iter()
        .cloned()
        .zip(replicas.iter().map(|r| r.health.clone()))
        .collect();
    let db = Db::new(cfg.clone());
    let task = tokio::spawn(run_db(
        db,
        cfg.monitor_interval,
        status_tx,
        cmd_rx,
        positions,
        drills,
        shutdown,
    ));
    Ok(DbHandle {
        path: cfg.path.clone(),
        status: status_rx,
        replicas,
        commands: cmd_tx,
        task,
    })
}

async fn blocking<T: Send + 'static>(
    db: &Arc<Mutex<Db>>,
    f: impl FnOnce(&mut Db) -> T + Send + 'static,
) -> T {
    let db = db.clone();
    tokio::task::spawn_blocking(move || f(&mut db.lock().expect("db lock poisoned")))
        .await
        .expect("blocking task panicked")
}

async fn run_db(
    db: Db,
    interval: Duration,
    status: watch::Sender<DbStatus>,
    mut commands: mpsc::UnboundedReceiver<DbCommand>,
    positions: Positions,
    drills: Vec<(ReplicaConfig, Arc<Mutex<ReplicaHealth>>)>,
    shutdown: CancellationToken,
) {
    let verify_every = db.config().verify_interval;
    metrics().start_db(
        &db.path().display().to_string(),
        db.config().replicas.iter().map(|r| r.name.as_str()),
    );
    let meta = db.config().meta_path.clone();
    let path = db.path().to_path_buf();
    let label = path.display().to_string();
    let replica_count = db.config().replicas.len();
    let db = Arc::new(Mutex::new(db));
    let mut ticker = tokio::time::interval(if interval.is_zero() {
        Duration::from_secs(3600 * 24 * 365)
    } else {
        interval
    });
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut snapshot_wanted = false;
    let mut closing = false;
    let mut acks: Vec<bool> = vec![false; replica_count];
    let mut last_logged_error: Option<String> = None;
    let mut verify_ticker = tokio::time::interval(verify_every.unwrap_or(Duration::MAX / 4));
    verify_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    verify_ticker.tick().await;
    let drill = |reply: Option<oneshot::Sender<Vec<Verdict>>>| {
        let (db, drills, positions) = (db.clone(), drills.clone(), positions.clone());
        let (label, meta) = (label.clone(), meta.clone());
        tokio::spawn(async move {
            let verdicts = run_drill(db, drills, positions, label, meta).await;
            if let Some(tx) = reply {
                let _ = tx.send(verdicts);
            }
        });
    };
    loop {
        let mut reply = None;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick(), if !closing => {}
            _ = verify_ticker.tick(), if verify_every.is_some() && !closing => { drill(None); continue; }
            cmd = commands.recv() => match cmd {
                None => break,
                Some(DbCommand::Verify(tx)) => { drill(Some(tx)); continue; }
                Some(DbCommand::Snapshot) if closing => continue,
                Some(DbCommand::Snapshot) => {
                    // A request that crossed a snapshot just published for this generation
                    // is answered by it: the requester uploads that one.
                    let s = status.borrow();
                    let pending = s.snapshot.as_ref().zip(s.position.as_ref())
                        .is_some_and(|(snap, p)| snap.generation == p.generation);
                    drop(s);
                    if !pending {
                        snapshot_wanted = true;
                    }
                    continue;
                }
                Some(DbCommand::SnapshotUploaded { replica, index }) => {
                    let current = status.borrow().snapshot.as_ref().map(|s| s.index);
                    if current == Some(index) {
                        acks[replica] = true;
                        if acks.iter().all(|a| *a) {
                            status.send_modify(|s| s.snapshot = None);
                        }
                    }
                    continue;
                }
                Some(DbCommand::Sync { reply: tx, last }) => {
                    closing |= last;
                    reply = Some(tx);
                }
            },
        }
        let started = std::time::Instant::now();
        let result = blocking(&db, move |db| {
            let report = db.sync()?;
            Ok::<_, DbError>((report, db.publish(closing)?, db.page_size(), db.wal_size()))
        })
        .await;
        let m = metrics();
        m.sync_count.with_label_values(&[&label]).inc();
        m.sync_seconds
            .with_label_values(&[&label])
            .inc_by(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok((report, position, page_size, wal_size)) => {
                m.wal_size.with_label_values(&[&label]).set(wal_size as i64);
                m.db_size
                    .with_label_values(&[&label])
                    .set(std::fs::metadata(&path).map_or(0, |f| f.len() as i64));
                m.total_wal_bytes
                    .with_label_values(&[&label])
                    .inc_by(report.bytes_copied);
                if let Some(p) = &position {
                    m.shadow_wal_index
                        .with_label_values(&[&label])
                        .set(i64::from(p.pos.index));
                    m.shadow_wal_size
                        .with_label_values(&[&label])
                        .set(p.pos.offset as i64);
                }
                if let Some((mode, result, elapsed)) = &report.checkpoint {
                    m.record_checkpoint(&label, mode.as_str(), *elapsed, result.is_ok());
                    if let Err(e) = result {
                        tracing::info!(db = %path.display(), mode = mode.as_str(), error = %e, "checkpoint failed");
                    }
                }
                if report.new_generation.is_some() {
                    snapshot_wanted = true;
                }
                status.send_if_modified(|s| {
                    let changed = s.position != position
                        || s.page_size != page_size
                        || s.last_error.is_some();
                    s.position = position;
                    s.page_size = page_size;
                    s.wal_size = wal_size;
                    s.last_error = None;
                    changed
                });
                last_logged_error = None;
                Ok(())
            }
            Err(e) => {
                m.sync_error_count.with_label_values(&[&label]).inc();
                m.errors.with_label_values(&[&label, "", "database"]).inc();
                let msg = e.to_string();
                if last_logged_error.as_deref() != Some(&msg) {
                    tracing::error!(db = %path.display(), error = %msg, "sync failed");
                    last_logged_error = Some(msg.clone());
                }
                status.send_modify(|s| s.last_error = Some(msg.clone()));
                Err(msg)
            }
        };
        if snapshot_wanted && status.borrow().position.is_some() {
            // Published in the same call, so the new index's segment is sealed before the
            // blocking thread moves on to another database.
            let taken = blocking(&db, |db| {
                let snap = db.snapshot()?;
                Ok::<_, DbError>((snap, db.publish(true)))
            })
            .await;
            match taken {
                Ok((snap, position)) => {
                    snapshot_wanted = false;
                    tracing::info!(db = %path.display(), generation = %snap.generation,
                        index = snap.index, size = snap.size, "snapshot taken");
                    acks = vec![false; replica_count];
                    if let Err(e) = &position {
                        tracing::warn!(db = %path.display(), error = %e, "cannot seal the shadow segment after the snapshot; the next sync retries");
                    }
                    status.send_modify(|s| {
                        s.snapshot = Some(Arc::new(snap));
                        if let Ok(position) = position {
                            s.position = position;
                        }
                    });
                }
                Err(DbError::Busy(msg)) => tracing::debug!(db = %path.display(), "{msg}"),
                Err(e) => tracing::warn!(db = %path.display(), error = %e, "snapshot failed"),
            }
        }
        cleanup_shadow(&db, &status, &positions).await;
        if let Some(tx) = reply {
            let _ = tx.send(outcome);
        }
    }
    blocking(&db, |db| db.close()).await;
}

/// A restore drill for every replica at one pinned position: the live checksum at the
/// position, a wait until the uploads pass it, then a restore of exactly that position.
async fn run_drill(
    db: Arc<Mutex<Db>>,
    drills: Vec<(ReplicaConfig, Arc<Mutex<ReplicaHealth>>)>,
    positions: Positions,
    label: String,
    meta: std::path::PathBuf,
) -> Vec<Verdict> {
    let failed = |detail: String| {
        drills
            .iter()
            .map(|(rc, _)| Verdict {
                replica: rc.name.clone(),
                generation: None,
                index: None,
                offset: None,
                ok: false,
                detail: detail.clone(),
            })
            .collect::<Vec<_>>()
    };
    let (position, sum) = match blocking(&db, |db| db.checksum_at_position()).await {
        Ok(pinned) => pinned,
        Err(e) => return failed(format!("cannot read the live database: {e}")),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let caught_up = positions.lock().expect("positions lock").iter().all(
            |p| matches!(p, Some((g, pos)) if *g == position.generation && *pos >= position.pos),
        );
        if caught_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let scratch = match tempfile::Builder::new().prefix("verify-").tempdir_in(&meta) {
        Ok(dir) => dir,
        Err(e) => return failed(format!("cannot create a scratch directory: {e}")),
    };
    let mut verdicts = Vec::new();
    for (rc, health) in &drills {
        let verdict = match Replica::open(rc, RetryPolicy::default()) {
            Ok(replica) => {
                verify::check_replica(
                    &replica,
                    Some(&position.generation),
                    Some(position.pos),
                    sum,
                    scratch.path(),
                )
                .await
            }
            Err(e) => Verdict {
                replica: rc.name.clone(),
                generation: Some(position.generation.clone()),
                index: None,
                offset: None,
                ok: false,
                detail: e.to_string(),
            },
        };
        let status = if verdict.ok { "ok" } else { "error" };
        metrics()
            .replica_validation_total
            .with_label_values(&[&label, &rc.name, status])
            .inc();
        if verdict.ok {
            tracing::info!(db = %label, replica = %rc.name, generation = %position.generation,
                index = position.pos.index, offset = position.pos.offset, "restore drill ok");
        } else {
            tracing::warn!(db = %label, replica = %rc.name, detail = %verdict.detail, "restore drill failed");
        }
        health.lock().expect("health lock").last_verify = Some((
            SystemTime::now(),
            if verdict.ok {
                Ok(())
            } else {
                Err(verdict.detail.clone())
            },
        ));
        verdicts.push(verdict);
    }
    verdicts
}

/// Deletes shadow segments that every replica has uploaded and no pending snapshot needs.
async fn cleanup_shadow(
    db: &Arc<Mutex<Db>>,
    status: &watch::Sender<DbStatus>,
    positions: &Positions,
) {
    let (generation, snapshot_index) = {
        let s = status.borrow();
        let Some(p) = &s.position else { return };
        (p.generation.clone(), s.snapshot.as_ref().map(|s| s.index))
    };
    let min = {
        let positions = positions.lock().expect("positions lock poisoned");
        let mut min = u32::MAX;
        for p in positions.iter() {
            match p {
                Some((g, pos)) if *g == generation => min = min.min(pos.index),
                _ => return,
            }
        }
        min
    };
    let keep_from = snapshot_index.map_or(min, |i| i.min(min));
    blocking(db, move |db| db.remove_shadow_before(keep_from)).await;
}

/// One replica's upload loop.
struct Uploader {
    idx: usize,
    cfg: ReplicaConfig,
    replica: Replica,
    meta_path: std::path::PathBuf,
    db_path: std::path::PathBuf,
    status: watch::Receiver<DbStatus>,
    commands: mpsc::UnboundedSender<DbCommand>,
    positions: Positions,
    health: Arc<Mutex<ReplicaHealth>>,
    pos: Option<(String, Pos)>,
    last_snapshot_at: Option<SystemTime>,
    snapshot_requested: bool,
    uploaded_snapshot: Option<(String, u32)>,
}

impl Uploader {
    async fn run(
        mut self,
        mut flushes: mpsc::UnboundedReceiver<oneshot::Sender<Result<(), String>>>,
        shutdown: CancellationToken,
    ) {
        let interval = self.cfg.sync_interval;
        let retention_every = match self.cfg.retention {
            Some(r) => r.min(self.cfg.retention_check_interval),
            None => Duration::ZERO,
        };
        let mut next_retention = tokio::time::Instant::now() + retention_every;
        let mut failures = 0u32;
        // Woken by the database task's publications rather than a free-running timer, so new
        // data goes up right after it is copied: two timers out of phase would let data wait
        // nearly two intervals. The rate limit is three quarters of sync-interval, not all of
        // it: with a full interval every wake was due one interval after the previous wake, so
        // wakes drifted later than the publications (about 1 ms a second here) and a sync
        // that ran late (a slow PUT) delayed every later one as much, for the rest of the run;
        // with the slack, the next wake falls back onto a publication.
        let mut published = self.status.clone();
        let pause = interval * 3 / 4;
        let mut last = tokio::time::Instant::now() - interval;
        loop {
            let mut reply = None;
            let due = last + pause;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                tx = flushes.recv() => match tx {
                    Some(tx) => reply = Some(tx),
                    None => break,
                },
                _ = async {
                    tokio::time::sleep_until(due).await;
                    let _ = tokio::time::timeout(interval, published.changed()).await;
                } => {}
            }
            last = tokio::time::Instant::now();
            let result = self.sync().await;
            self.note_pending();
            match &result {
                Ok(()) => {
                    self.health.lock().expect("health lock").last_ok_at = Some(SystemTime::now());
                    if failures > 0 {
                        tracing::info!(db = %self.db_path.display(), replica = %self.cfg.name, "replica recovered");
                    }
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(db = %self.db_path.display(), replica = %self.cfg.name,
                            failures, error = %e, "replica sync failed; will retry");
                    }
                    self.health.lock().expect("health lock").last_error =
                        Some((SystemTime::now(), e.to_string()));
                    metrics()
                        .errors
                        .with_label_values(&[&self.label(), &self.cfg.name, e.kind()])
                        .inc();
                }
            }
            self.export_health();
            if let Some(tx) = reply {
                let _ = tx.send(result.map_err(|e| e.to_string()));
            }
            if !retention_every.is_zero() && tokio::time::Instant::now() >= next_retention {
                next_retention = tokio::time::Instant::now() + retention_every;
                if let Err(e) = self.enforce_retention().await {
                    tracing::warn!(replica = %self.cfg.name, error = %e, "retention failed");
                }
            }
        }
    }

    fn storage_err(&self, source: StorageError) -> ReplicateError {
        ReplicateError::Storage {
            replica: self.cfg.name.clone(),
            source,
        }
    }

    fn label(&self) -> String {
        self.db_path.display().to_string()
    }

    /// Records how much committed data waits for upload and since when.
    fn note_pending(&self) {
        let status = self.status.borrow();
        let bytes = match (&status.position, &self.pos) {
            (None, _) => 0,
            (Some(current), Some((generation, pos))) if *generation == current.generation => {
                pending_between(&self.meta_path, current, *pos)
            }
            (Some(current), _) => current.pos.offset,
        };
        let mut h = self.health.lock().expect("health lock");
        h.pending_bytes = bytes;
        if bytes == 0 {
            h.pending_since = None;
        } else if h.pending_since.is_none() {
            h.pending_since = Some(SystemTime::now());
        }
    }

    /// Mirrors the health state into the Prometheus gauges.
    fn export_health(&self) {
        let h = self.health.lock().expect("health lock").clone();
        let now = SystemTime::now();
        let labels = [self.label(), self.cfg.name.clone()];
        let labels = [labels[0].as_str(), labels[1].as_str()];
        let m = metrics();
        m.replica_pending_bytes
            .with_label_values(&labels)
            .set(h.pending_bytes as i64);
        m.replica_lag
            .with_label_values(&labels)
            .set(h.lag(now).unwrap_or_default().as_secs_f64());
        m.replica_healthy
            .with_label_values(&labels)
            .set(i64::from(h.verdict(now).is_ok()));
        if let Some(t) = h.last_synced_at {
            m.replica_last_sync
                .with_label_values(&labels)
                .set(crate::observe::metrics::unix_seconds(t));
        }
    }

    /// Called once the store confirmed an upload.
    fn confirmed(&self) {
        self.health.lock().expect("health lock").last_synced_at = Some(SystemTime::now());
    }

    fn set_pos(&mut self, generation: &str, pos: Pos) {
        self.pos = Some((generation.to_string(), pos));
        self.positions.lock().expect("positions lock")[self.idx] =
            Some((generation.to_string(), pos));
        self.health.lock().expect("health lock").position = Some((generation.to_string(), pos));
        let m = metrics();
        let labels = [self.label(), self.cfg.name.clone()];
        let labels = [labels[0].as_str(), labels[1].as_str()];
        m.replica_wal_index
            .with_label_values(&labels)
            .set(i64::from(pos.index));
        m.replica_wal_offset
            .with_label_values(&labels)
            .set(pos.offset as i64);
    }

    fn request_snapshot(&mut self) {
        if !self.snapshot_requested {
            self.snapshot_requested = true;
            let _ = self.commands.send(DbCommand::Snapshot);
        }
    }

    /// Uploads everything the database task has published; on success the store has
    /// confirmed every byte up to the published position.
    async fn sync(&mut self) -> Result<(), ReplicateError> {
        let status = self.status.borrow().clone();
        let Some(current) = status.position.clone() else {
            return Ok(());
        };
        if self.pos.as_ref().map(|p| &p.0) != Some(&current.generation) {
            self.pos = None;
            self.last_snapshot_at = None;
        }
        if self.pos.is_none() && !self.resume(&current, &status).await? {
            return Ok(());
        }
        if let Some(snap) = &status.snapshot
            && snap.generation == current.generation
            && self.uploaded_snapshot.as_ref() != Some(&(snap.generation.clone(), snap.index))
        {
            self.upload_snapshot(snap).await?;
        }
        if let (Some(every), Some(last)) = (self.cfg.snapshot_interval, self.last_snapshot_at)
            && last.elapsed().unwrap_or_default() >= every
        {
            self.request_snapshot();
        }
        self.upload_segments(&current).await?;
        Ok(())
    }

    /// Finds where this replica stands in the current generation from the store (the only
    /// LISTs outside retention). Returns false while a snapshot is still needed.
    async fn resume(
        &mut self,
        current: &Position,
        status: &DbStatus,
    ) -> Result<bool, ReplicateError> {
        let generation = &current.generation;
        let snapshots = self
            .replica
            .snapshots(generation)
            .await
            .map_err(|e| self.storage_err(e))?;
        let Some(latest) = snapshots.last() else {
            return self.start_from_local_snapshot(current, status).await;
        };
        self.last_snapshot_at = Some(latest.created);
        let segments = self
            .replica
            .segments(generation)
            .await
            .map_err(|e| self.storage_err(e))?;
        let pos = match segments.iter().rev().find(|s| s.pos.index >= latest.index) {
            Some(last) => {
                let data = self
                    .replica
                    .get_segment(generation, last.pos)
                    .await
                    .map_err(|e| self.storage_err(e))?;
                let raw = format::decompress(&data).map_err(|source| ReplicateError::Corrupt {
                    replica: self.cfg.name.clone(),
                    key: format::wal_segment_key("", generation, last.pos),
                    source,
                })?;
                Pos {
                    index: last.pos.index,
                    offset: last.pos.offset + raw.len() as u64,
                }
            }
            None => Pos {
                index: latest.index,
                offset: 0,
            },
        };
        if pos > current.pos {
            return Err(ReplicateError::Internal(format!(
                "replica {} holds generation {generation} up to {pos:?}, beyond the local \
                 database ({:?}); is another process replicating to the same path?",
                self.cfg.name, current.pos
            )));
        }
        if pos < current.pos && segment_at(&self.meta_path, generation, pos, current.pos).is_none()
        {
            return self.start_from_local_snapshot(current, status).await;
        }
        self.set_pos(generation, pos);
        tracing::debug!(replica = %self.cfg.name, generation = %generation, ?pos, "resumed");
        Ok(true)
    }

    async fn start_from_local_snapshot(
        &mut self,
        current: &Position,
        status: &DbStatus,
    ) -> Result<bool, ReplicateError> {
        match &status.snapshot {
            Some(snap) if snap.generation == current.generation => {
                self.upload_snapshot(snap).await?;
                self.set_pos(
                    &current.generation,
                    Pos {
                        index: snap.index,
                        offset: 0,
                    },
                );
                if let Err(e) = self.make_generation_newest(snap).await {
                    tracing::warn!(replica = %self.cfg.name, error = %e,
                        "cannot check that the new generation is the newest in the store");
                }
                Ok(true)
            }
            _ => {
                self.request_snapshot();
                Ok(false)
            }
        }
    }

    /// Restore picks the generation with the newest object, and stores date objects to the
    /// second: a generation started within the same second as the previous one ended (a restore
    /// followed by a quick restart) would tie with it, and restore could bring back the old
    /// history. The snapshot that starts a generation is uploaded again until the store dates
    /// it strictly after every other generation's last object.
    async fn make_generation_newest(&self, snap: &LocalSnapshot) -> Result<(), ReplicateError> {
        let err = |e| self.storage_err(e);
        let mut others = None;
        for g in self.replica.generations().await.map_err(err)? {
            if g == snap.generation {
                continue;
            }
            let info = self.replica.generation_info(&g).await.map_err(err)?;
            if let Some((_, updated)) = info.bounds() {
                others = Some(others.map_or(updated, |o: SystemTime| o.max(updated)));
            }
        }
        let Some(others) = others else { return Ok(()) };
        for _ in 0..5 {
            let mine = self
                .replica
                .snapshots(&snap.generation)
                .await
                .map_err(err)?
                .into_iter()
                .find(|s| s.index == snap.index)
                .map(|s| s.created);
            if mine.is_some_and(|m| m > others) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(1100)).await;
            self.replica
                .put_snapshot(&snap.generation, snap.index, Body::File(snap.path.clone()))
                .await
                .map_err(err)?;
        }
        Err(ReplicateError::Internal(format!(
            "generation {} is still not dated after the previous one",
            snap.generation
        )))
    }

    async fn upload_snapshot(&mut self, snap: &Arc<LocalSnapshot>) -> Result<(), ReplicateError> {
        let started = std::time::Instant::now();
        self.replica
            .put_snapshot(&snap.generation, snap.index, Body::File(snap.path.clone()))
            .await
            .map_err(|e| self.storage_err(e))?;
        self.confirmed();
        tracing::info!(db = %self.db_path.display(), replica = %self.cfg.name,
            generation = %snap.generation, index = snap.index, size = snap.size,
            elapsed_ms = started.elapsed().as_millis() as u64, "snapshot uploaded");
        self.uploaded_snapshot = Some((snap.generation.clone(), snap.index));
        self.last_snapshot_at = Some(SystemTime::now());
        self.snapshot_requested = false;
        let _ = self.commands.send(DbCommand::SnapshotUploaded {
            replica: self.idx,
            index: snap.index,
        });
        Ok(())
    }

    async fn upload_segments(&mut self, current: &Position) -> Result<(), ReplicateError> {
        loop {
            let Some((generation, pos)) = self.pos.clone() else {
                return Ok(());
            };
            if pos >= current.pos {
                return Ok(());
            }
            let Some(next) = segment_at(&self.meta_path, &generation, pos, current.pos) else {
                return Err(ReplicateError::Db(DbError::Io {
                    path: self.meta_path.join("generations").join(&generation),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("no shadow segment at {pos:?}"),
                    ),
                }));
            };
            let Some(seg) = next else {
                self.set_pos(
                    &generation,
                    Pos {
                        index: pos.index + 1,
                        offset: 0,
                    },
                );
                continue;
            };
            let data = tokio::fs::read(&seg.path).await.map_err(|source| {
                ReplicateError::Db(DbError::Io {
                    path: seg.path.clone(),
                    source,
                })
            })?;
            let size = data.len();
            self.replica
                .put_segment(&generation, pos, Body::Bytes(data.into()))
                .await
                .map_err(|e| self.storage_err(e))?;
            self.confirmed();
            metrics()
                .replica_wal_bytes
                .with_label_values(&[&self.label(), &self.cfg.name])
                .inc_by(seg.end - seg.start);
            tracing::debug!(replica = %self.cfg.name, generation = %generation,
                index = pos.index, offset = pos.offset, raw = seg.end - seg.start, size, "wal segment uploaded");
            self.set_pos(
                &generation,
                Pos {
                    index: pos.index,
                    offset: seg.end,
                },
            );
        }
    }

    /// Deletes what no restore inside the retention window can need: for each generation the
    /// newest snapshot at or before the window's start is kept with everything after it, and
    /// a generation is dropped only when its last object is older than the window and it is
    /// not the one being written. (Litestream deletes a generation as soon as it has no
    /// snapshot inside the window, losing the points in time its WAL still covered.)
    async fn enforce_retention(&mut self) -> Result<(), ReplicateError> {
        let Some(retention) = self.cfg.retention else {
            return Ok(());
        };
        let current = self
            .status
            .borrow()
            .position
            .as_ref()
            .map(|p| p.generation.clone());
        let cutoff = SystemTime::now() - retention;
        let generations = self
            .replica
            .generations()
            .await
            .map_err(|e| self.storage_err(e))?;
        let mut deleted = 0usize;
        for generation in generations {
            let info = self
                .replica
                .generation_info(&generation)
                .await
                .map_err(|e| self.storage_err(e))?;
            let is_current = current.as_deref() == Some(generation.as_str());
            let (snaps, segs): (Vec<u32>, Vec<Pos>) = match info.bounds() {
                Some((_, updated)) if updated < cutoff && !is_current => (
                    info.snapshots.iter().map(|s| s.index).collect(),
                    info.segments.iter().map(|s| s.pos).collect(),
                ),
                _ => {
                    let base = info.snapshots.iter().rfind(|s| s.created <= cutoff);
                    let Some(base) = base else { continue };
                    (
                        info.snapshots
                            .iter()
                            .filter(|s| s.index < base.index)
                            .map(|s| s.index)
                            .collect(),
                        info.segments
                            .iter()
                            .filter(|s| s.pos.index < base.index)
                            .map(|s| s.pos)
                            .collect(),
                    )
                }
            };
            if is_current && info.snapshots.last().is_some_and(|s| s.created <= cutoff) {
                self.request_snapshot();
            }
            deleted += snaps.len() + segs.len();
            self.replica
                .delete(&generation, &snaps, &segs)
                .await
                .map_err(|e| self.storage_err(e))?;
        }
        tracing::info!(replica = %self.cfg.name, deleted, "retention enforced");
        Ok(())
    }
}

/// The shadow segment a replica at `pos` uploads next: `Some(Some(_))` for the one starting
/// there, `Some(None)` when `pos` is past every segment of an index before `current` (the
/// replica moves on to the next index), `None` when no segment starts there: a shadow lost
/// under a running replica, or a replica written by another tool or version, whose segments
/// end elsewhere.
fn segment_at(
    meta: &std::path::Path,
    generation: &str,
    pos: Pos,
    current: Pos,
) -> Option<Option<LocalSegment>> {
    let segments = db::local_segments(meta, generation);
    let mut of_index = segments
        .into_iter()
        .filter(|g| g.index == pos.index)
        .peekable();
    of_index.peek()?;
    let mut last_end = 0;
    for g in of_index {
        if g.start == pos.offset {
            return Some(Some(g));
        }
        last_end = last_end.max(g.end);
    }
    (pos.offset >= last_end && pos.index < current.index).then_some(None)
}

/// Committed bytes between a replica's position and the database's, counting the shadow
/// segments of the indexes in between.
fn pending_between(meta: &std::path::Path, current: &Position, pos: Pos) -> u64 {
    if pos >= current.pos {
        return 0;
    }
    if pos.index == current.pos.index {
        return current.pos.offset - pos.offset;
    }
    let earlier: u64 = db::local_segments(meta, &current.generation)
        .iter()
        .filter(|g| g.index >= pos.index && g.index < current.pos.index)
        .map(|g| {
            let from = if g.index == pos.index { pos.offset } else { 0 };
            g.end.saturating_sub(g.start.max(from))
        })
        .sum();
    earlier + current.pos.offset
}
