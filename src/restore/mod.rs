//! Restore: rebuild a database from a snapshot and the WAL segments after it.
//!
//! Litestream v0.3.13's restore trusts the server's listing order, never checks that segments
//! are contiguous, and leaves a half-written `.tmp` behind on failure. Here listings are sorted,
//! every index is checked to start at offset 0 and every segment to start where the previous
//! one ended, segments are fetched in parallel but applied in order, and the result is built in
//! a temporary file next to the output, checked with `PRAGMA integrity_check`, fsynced and
//! renamed into place without replacing anything. On any failure nothing is left behind and an
//! existing file is never touched.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use futures::stream::{self, StreamExt};
use rusqlite::Connection;

use crate::config::DbConfig;
use crate::format::{self, Pos};
use crate::replica::{GenerationInfo, Replica, SegmentInfo, SnapshotInfo};
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("output path already exists: {0}")]
    OutputExists(PathBuf),
    #[error("{}", no_backups_message(.searched, .timestamp, .ranges))]
    NoBackups {
        searched: Vec<String>,
        timestamp: Option<SystemTime>,
        ranges: Vec<(String, SystemTime, SystemTime)>,
    },
    #[error("{replica}: {source}")]
    Storage {
        replica: String,
        source: StorageError,
    },
    #[error(
        "{key}: not a valid lz4 object ({source}); the replica is damaged or was not written by walden/litestream"
    )]
    Corrupt {
        key: String,
        source: format::FormatError,
    },
    #[error("generation {generation}: {message}")]
    Gap { generation: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("applying wal index {index:08x}: {source}")]
    Apply { index: u32, source: rusqlite::Error },
    #[error("restored database failed integrity_check: {0}")]
    Integrity(String),
}

fn no_backups_message(
    searched: &[String],
    timestamp: &Option<SystemTime>,
    ranges: &[(String, SystemTime, SystemTime)],
) -> String {
    let mut m = format!("no backups found in {}", searched.join(", "));
    if let Some(t) = timestamp {
        m += &format!(" at or before {}", rfc3339(*t));
        if !ranges.is_empty() {
            let r: Vec<String> = ranges
                .iter()
                .map(|(g, a, b)| format!("{g} {}..{}", rfc3339(*a), rfc3339(*b)))
                .collect();
            m += &format!("; existing generations cover {}", r.join(", "));
        }
    }
    m
}

/// Formats a time as RFC 3339 UTC with second precision, as the listing commands print it.
pub fn rfc3339(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    dt.format(&time::format_description::well_known::Rfc3339)
        .map(|s| match s.find('.') {
            Some(dot) => format!("{}Z", &s[..dot]),
            None => s,
        })
        .unwrap_or_default()
}

/// What to restore and where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub output: PathBuf,
    pub generation: Option<String>,
    /// Restore up to and including this WAL index.
    pub index: Option<u32>,
    /// Restore the state at this time (storage timestamps, as Litestream does).
    pub timestamp: Option<SystemTime>,
    /// Restore exactly up to this position of the generation (`generation` must be set): the
    /// state a verification compares against the live database at the same position.
    pub until: Option<Pos>,
    pub parallelism: usize,
}

/// The chosen source of a restore.
#[derive(Debug, Clone)]
pub struct Plan {
    pub replica: usize,
    pub generation: String,
    pub snapshot: SnapshotInfo,
    pub segments: Vec<SegmentInfo>,
}

impl Plan {
    /// The position the restored database will be at.
    pub fn end(&self) -> Pos {
        self.segments.last().map_or(
            Pos {
                index: self.snapshot.index,
                offset: 0,
            },
            |s| s.pos,
        )
    }
}

/// What a successful restore produced.
#[derive(Debug, Clone)]
pub struct Restored {
    pub replica: String,
    pub generation: String,
    pub snapshot_index: u32,
    pub segments: usize,
    /// Index and end offset of the last WAL data applied.
    pub position: Pos,
}

/// Chooses replica, generation, snapshot and segments. `None` when there is nothing to
/// restore.
pub async fn plan(replicas: &[Replica], opts: &RestoreOptions) -> Result<Plan, RestoreError> {
    let mut best: Option<(Plan, (SystemTime, SystemTime))> = None;
    let mut ranges = Vec::new();
    for (ri, replica) in replicas.iter().enumerate() {
        let storage = |source| RestoreError::Storage {
            replica: replica.name.clone(),
            source,
        };
        let generations = replica.generations().await.map_err(storage)?;
        for generation in generations {
            if opts.generation.as_ref().is_some_and(|g| *g != generation) {
                continue;
            }
            let info = replica
                .generation_info(&generation)
                .await
                .map_err(storage)?;
            let Some((start, updated)) = info.bounds() else {
                continue;
            };
            ranges.push((generation.clone(), start, updated));
            let Some(plan) = plan_generation(ri, &info, opts) else {
                continue;
            };
            let score = match opts.timestamp {
                Some(t) => (updated.min(t), start),
                None => (updated, start),
            };
            if best.as_ref().is_none_or(|(_, s)| score > *s) {
                best = Some((plan, score));
            }
        }
    }
    best.map(|(p, _)| p).ok_or_else(|| RestoreError::NoBackups {
        searched: replicas.iter().map(|r| r.describe()).collect(),
        timestamp: opts.timestamp,
        ranges,
    })
}

fn plan_generation(replica: usize, info: &GenerationInfo, opts: &RestoreOptions) -> Option<Plan> {
    let snapshot = info
        .snapshots
        .iter()
        .filter(|s| opts.index.is_none_or(|i| s.index <= i))
        .filter(|s| opts.until.is_none_or(|u| s.index <= u.index))
        .filter(|s| opts.timestamp.is_none_or(|t| s.created <= t))
        .max_by_key(|s| (s.index, s.created))?
        .clone();
    let mut segments = Vec::new();
    for s in info
        .segments
        .iter()
        .filter(|s| s.pos.index >= snapshot.index)
    {
        if opts.index.is_some_and(|i| s.pos.index > i) {
            break;
        }
        if opts.timestamp.is_some_and(|t| s.created > t) {
            break;
        }
        if opts.until.is_some_and(|u| s.pos >= u) {
            break;
        }
        segments.push(s.clone());
    }
    Some(Plan {
        replica,
        generation: info.generation.clone(),
        snapshot,
        segments,
    })
}

/// Checks that the planned segments can be applied: every index from the snapshot's on is
/// present and starts at offset 0. Contiguity within an index is checked while downloading,
/// once decompressed lengths are known.
fn check_plan(plan: &Plan) -> Result<(), RestoreError> {
    let gap = |message: String| RestoreError::Gap {
        generation: plan.generation.clone(),
        message,
    };
    let mut expected = plan.snapshot.index;
    let mut prev: Option<Pos> = None;
    for s in &plan.segments {
        match prev {
            Some(p) if p.index == s.pos.index => {}
            _ => {
                if s.pos.index != expected {
                    return Err(gap(format!(
                        "wal index {expected:08x} is missing (next segment is {:08x}_{:08x})",
                        s.pos.index, s.pos.offset
                    )));
                }
                if s.pos.offset != 0 {
                    return Err(gap(format!(
                        "wal index {:08x} does not start at offset 0 (first segment at {:08x})",
                        s.pos.index, s.pos.offset
                    )));
                }
                expected = s.pos.index + 1;
            }
        }
        prev = Some(s.pos);
    }
    Ok(())
}

/// Removes the temporary database and its SQLite side files unless the restore completed.
struct TempFiles {
    db: PathBuf,
    keep: bool,
}

impl TempFiles {
    fn side(&self, suffix: &str) -> PathBuf {
        let mut p = self.db.clone().into_os_string();
        p.push(suffix);
        PathBuf::from(p)
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        for suffix in ["-wal", "-shm", "-journal", ".lz4"] {
            let _ = fs::remove_file(self.side(suffix));
        }
        if !self.keep {
            let _ = fs::remove_file(&self.db);
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Restores `plan` into `opts.output`.
pub async fn restore(
    replicas: &[Replica],
    plan: &Plan,
    opts: &RestoreOptions,
) -> Result<Restored, RestoreError> {
    check_plan(plan)?;
    let output = &opts.output;
    if output.exists() {
        return Err(RestoreError::OutputExists(output.clone()));
    }
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "db".into());
    let mut temp = TempFiles {
        db: dir.join(format!(".{name}.walden-restore-{}", std::process::id())),
        keep: false,
    };
    let replica = &replicas[plan.replica];
    let storage = |source| RestoreError::Storage {
        replica: replica.name.clone(),
        source,
    };

    let parallelism = opts.parallelism.max(1);
    let generation = plan.generation.clone();
    let fetched = stream::iter(plan.segments.iter().cloned())
        .map(|s| {
            let generation = generation.clone();
            async move {
                let data = replica
                    .get_segment(&generation, s.pos)
                    .await
                    .map_err(storage)?;
                let key = format::wal_segment_key("", &generation, s.pos);
                let raw = tokio::task::spawn_blocking(move || format::decompress(&data))
                    .await
                    .expect("decompress task panicked")
                    .map_err(|source| RestoreError::Corrupt { key, source })?;
                Ok::<_, RestoreError>((s.pos, raw))
            }
        })
        .buffered(parallelism);
    // Segments are fetched while the snapshot is downloaded and decompressed: one item waits
    // in the channel beyond the `parallelism` in flight, so memory stays bounded.
    let (ready, mut segments) = tokio::sync::mpsc::channel(1);
    let fetch = async move {
        let mut fetched = std::pin::pin!(fetched);
        while let Some(item) = fetched.next().await {
            let failed = item.is_err();
            if ready.send(item).await.is_err() || failed {
                break;
            }
        }
    };
    let apply = async {
        let started = std::time::Instant::now();
        let compressed = temp.side(".lz4");
        replica
            .get_snapshot_to_file(&plan.generation, plan.snapshot.index, &compressed)
            .await
            .map_err(storage)?;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot downloaded"
        );
        let snapshot_key = format::snapshot_key("", &plan.generation, plan.snapshot.index);
        {
            let (src, dst) = (compressed.clone(), temp.db.clone());
            tokio::task::spawn_blocking(move || decompress_file(&src, &dst, &snapshot_key))
                .await
                .expect("decompress task panicked")?;
        }
        fs::remove_file(&compressed).map_err(io_err(&compressed))?;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot decompressed"
        );

        let wal_path = temp.side("-wal");
        let mut current: Option<(u32, File, u64)> = None;
        let mut applied = 0usize;
        while let Some(item) = segments.recv().await {
            let (pos, raw) = item?;
            if current.as_ref().is_some_and(|(i, _, _)| *i != pos.index) {
                let (index, file, _) = current.take().expect("checked above");
                drop(file);
                apply_wal(&temp.db, index).await?;
            }
            if current.is_none() {
                let f = File::create(&wal_path).map_err(io_err(&wal_path))?;
                current = Some((pos.index, f, 0));
            }
            let (_, file, end) = current.as_mut().expect("set above");
            if pos.offset != *end {
                return Err(RestoreError::Gap {
                    generation: plan.generation.clone(),
                    message: format!(
                        "segment {:08x}_{:08x} does not follow the previous one, which ends at {:08x}",
                        pos.index, pos.offset, end
                    ),
                });
            }
            let raw = match opts.until {
                Some(u) if u.index == pos.index && pos.offset + raw.len() as u64 > u.offset => {
                    &raw[..(u.offset - pos.offset) as usize]
                }
                _ => &raw[..],
            };
            file.write_all(raw).map_err(io_err(&wal_path))?;
            *end += raw.len() as u64;
            applied += 1;
        }
        let mut position = Pos {
            index: plan.snapshot.index,
            offset: 0,
        };
        if let Some((index, file, end)) = current.take() {
            drop(file);
            apply_wal(&temp.db, index).await?;
            position = Pos { index, offset: end };
        }
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "wal applied"
        );
        Ok::<_, RestoreError>((applied, position))
    };
    let (applied, ()) = futures::join!(apply, fetch);
    let (applied, position) = applied?;

    let db = temp.db.clone();
    let out = output.clone();
    tokio::task::spawn_blocking(move || finish(&db, &out))
        .await
        .expect("finish task panicked")?;
    temp.keep = true;
    Ok(Restored {
        replica: replica.name.clone(),
        generation: plan.generation.clone(),
        snapshot_index: plan.snapshot.index,
        segments: applied,
        position,
    })
}

/// Buffer size for reading the compressed snapshot and writing the database.
const COPY_BUF: usize = 1 << 20;

fn decompress_file(src: &Path, dst: &Path, key: &str) -> Result<(), RestoreError> {
    let input = File::open(src).map_err(io_err(src))?;
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(io_err(dst))?;
    let mut reader = format::lz4_decoder(std::io::BufReader::with_capacity(COPY_BUF, input));
    // Through a large buffer: `io::copy`'s 8 KiB one meant a write call per 8 KiB of a
    // database that can be gigabytes.
    let mut out = std::io::BufWriter::with_capacity(COPY_BUF, out);
    std::io::copy(&mut reader, &mut out).map_err(|e| {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<format::FormatError>())
        {
            Some(_) => {
                let source = e
                    .into_inner()
                    .and_then(|b| b.downcast::<format::FormatError>().ok())
                    .map(|b| *b)
                    .expect("checked above");
                RestoreError::Corrupt {
                    key: key.to_string(),
                    source,
                }
            }
            None => io_err(dst)(e),
        }
    })?;
    out.flush().map_err(io_err(dst))?;
    Ok(())
}

/// Lets SQLite apply one WAL index: it validates the header, salts and checksum chain and
/// takes frames up to the last commit, exactly as after a crash.
async fn apply_wal(db: &Path, index: u32) -> Result<(), RestoreError> {
    let db = db.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let err = |source| RestoreError::Apply { index, source };
        let conn = Connection::open(&db).map_err(err)?;
        // The file is a temporary that `finish` fsyncs once before it is renamed into place;
        // SQLite's own syncs at each checkpoint only cost time.
        conn.execute_batch("PRAGMA synchronous=OFF").map_err(err)?;
        let busy: i64 = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(err)?;
        if busy != 0 {
            return Err(RestoreError::Apply {
                index,
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                    Some("checkpoint could not complete".into()),
                ),
            });
        }
        conn.close().map_err(|(_, e)| err(e))
    })
    .await
    .expect("apply task panicked")
}

/// Checks, syncs and moves the result into place without replacing an existing file. The fsync
/// runs while `integrity_check` reads: the check reads from the page cache and the flush
/// writes it back, so neither waits for the other.
fn finish(db: &Path, output: &Path) -> Result<(), RestoreError> {
    let synced = {
        let file = File::open(db).map_err(io_err(db))?;
        std::thread::spawn(move || file.sync_all())
    };
    let checked = (|| {
        let conn =
            Connection::open(db).map_err(|source| RestoreError::Apply { index: 0, source })?;
        let result: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|source| RestoreError::Apply { index: 0, source })?;
        if result != "ok" {
            return Err(RestoreError::Integrity(result));
        }
        tracing::debug!("integrity_check ok");
        Ok(())
    })();
    let synced = synced.join().expect("fsync thread panicked");
    checked?;
    synced.map_err(io_err(db))?;
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        db,
        nix::fcntl::AT_FDCWD,
        output,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|e| match e {
        nix::errno::Errno::EEXIST => RestoreError::OutputExists(output.to_path_buf()),
        e => io_err(output)(e.into()),
    })?;
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// What the start-up restore in `replicate -exec` found.
#[derive(Debug, Clone)]
pub enum Startup {
    /// The database file exists; it is never replaced.
    Exists,
    Restored(Restored),
    /// No replica holds a backup: the application starts with a new database.
    NoBackup,
}

/// Restores a configured database from its replicas if its file is missing. An unreachable
/// or unreadable store is an error, not "no backup": starting fresh then would fork the
/// history.
pub async fn restore_if_missing(
    db: &DbConfig,
    replicas: &[Replica],
    parallelism: usize,
) -> Result<Startup, RestoreError> {
    if db.path.exists() {
        return Ok(Startup::Exists);
    }
    let opts = RestoreOptions {
        output: db.path.clone(),
        generation: None,
        index: None,
        timestamp: None,
        until: None,
        parallelism,
    };
    let plan = match plan(replicas, &opts).await {
        Ok(p) => p,
        Err(RestoreError::NoBackups { .. }) => return Ok(Startup::NoBackup),
        Err(e) => return Err(e),
    };
    restore(replicas, &plan, &opts).await.map(Startup::Restored)
}
