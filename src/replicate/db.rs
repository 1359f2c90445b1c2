//! The database side of replication: SQLite's WAL copied into the shadow WAL.
//!
//! SQLite overwrites its WAL after a checkpoint, so committed frames are first copied, whole
//! transactions only, into shadow segments under `.<db>-litestream/`; uploads send them at their
//! own pace. A long-running read transaction keeps SQLite from restarting the WAL behind our
//! back, and checkpoints are ours to run, so no frame is overwritten before it was copied.
//!
//! Litestream's shadow WAL is a raw copy of every frame, which its uploads read back and
//! compress. Here a copy compresses the frames straight from its read buffer into the segment
//! that will be uploaded as it is: with a writer running flat out, writing every WAL byte a
//! second time, reading it back and deleting it were a third of Walden's CPU time. The
//! metadata directory keeps Litestream's `generation` file and `generations/<gen>/` tree, but
//! the files under `wal/` are these segments, so a switch between the two tools starts a new
//! generation (see the README).
//!
//! Everything here is blocking (SQLite and file I/O); the async engine calls it on the blocking
//! pool.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use rusqlite::{Connection, OpenFlags};

use crate::config::DbConfig;
use crate::format::{self, Pos};
use crate::wal::{self, FrameHeader, WAL_HEADER_SIZE, WalHeader};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{path}: {op}: {source}")]
    Sqlite {
        path: PathBuf,
        op: &'static str,
        source: rusqlite::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not in WAL mode and cannot be converted (journal_mode is {mode}); \
         close other connections that hold it in another mode"
    )]
    NotWal { path: PathBuf, mode: String },
    #[error("{path}: wal header: {source}")]
    Wal {
        path: PathBuf,
        source: wal::WalError,
    },
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        source: format::FormatError,
    },
    /// The database was busy; the operation is retried on a later tick.
    #[error("{0}")]
    Busy(String),
}

/// Copies before a checkpoint takes the write lock: until one finds less than
/// `PRE_COPY_ENOUGH` new bytes, at most `PRE_COPY_PASSES` of them. A writer running flat out
/// commits tens of megabytes during the copy of one tick's frames, and each pass is shorter.
const PRE_COPY_PASSES: usize = 3;
const PRE_COPY_ENOUGH: u64 = 1 << 20;

/// Size of WAL above which a checkpoint backfills what is already copied before it takes the
/// write lock for the rest (see `Db::backfill_ahead`). Below it the backfill under the lock
/// is short anyway, and the extra lock and checkpoint would only cost time.
const BACKFILL_AHEAD_MIN: u64 = 16 << 20;
/// While a backfill ahead runs, a writer flat out commits more (12 MB during a 90 ms one
/// here), all of which the backfill under the lock would have to sync and write. Another round
/// runs when at least `BACKFILL_AHEAD_AGAIN` bytes came in, up to `BACKFILL_AHEAD_ROUNDS`
/// rounds; each is shorter than the one before, since it has less to write.
const BACKFILL_AHEAD_ROUNDS: usize = 3;
const BACKFILL_AHEAD_AGAIN: u64 = 4 << 20;

/// Pause between attempts to take the write lock.
const LOCK_POLL: Duration = Duration::from_micros(200);

/// Pause between backfill attempts while another connection checkpoints. The write lock is
/// held meanwhile, so the application waits for the end of that checkpoint plus this.
const CHECKPOINT_POLL: Duration = Duration::from_millis(1);

/// How far a drain of the WAL got.
enum Drained {
    /// Every frame is in the database; the WAL header as it was under the write lock.
    Full(Option<WalHeader>),
    /// Other readers held part of the WAL back.
    Partial,
}

/// Checkpoint modes, named as SQLite names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointMode {
    Passive,
    Restart,
    Truncate,
}

impl CheckpointMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointMode::Passive => "PASSIVE",
            CheckpointMode::Restart => "RESTART",
            CheckpointMode::Truncate => "TRUNCATE",
        }
    }
}

/// What the uploaders need to know after a sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    pub generation: String,
    /// Current shadow index and its committed, frame-aligned size.
    pub pos: Pos,
}

/// A snapshot compressed to a local file, waiting for every replica to upload it. The file is
/// removed when the last holder lets go of it.
#[derive(Debug)]
pub struct LocalSnapshot {
    pub generation: String,
    pub index: u32,
    pub path: PathBuf,
    pub size: u64,
}

impl Drop for LocalSnapshot {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// What one sync did, for logs and metrics.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub new_generation: Option<String>,
    pub reason: Option<&'static str>,
    pub bytes_copied: u64,
    pub checkpoint: Option<(CheckpointMode, Result<(), String>, std::time::Duration)>,
}

/// A sealed shadow segment: one complete LZ4 frame holding `[start, end)` of WAL index `index`,
/// uploaded byte for byte as the object `<index>_<start>.wal.lz4`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSegment {
    pub index: u32,
    pub start: u64,
    pub end: u64,
    pub path: PathBuf,
}

/// The segment being filled by copies; sealed (finished and renamed) when it is published,
/// when it reaches [`SEGMENT_SEAL`], or before the WAL index changes.
struct OpenSegment {
    index: u32,
    start: u64,
    /// The running checksum at `start`, where a failed segment is copied again from.
    start_checksum: (u32, u32),
    len: u64,
    tmp: PathBuf,
    enc: format::Lz4Encoder<BufWriter<File>>,
}

struct Shadow {
    generation: String,
    index: u32,
    /// Frame-aligned length of the WAL index copied so far, sealed or not: at a commit, except
    /// after a failed seal rolled it back to a segment that starts inside a transaction.
    size: u64,
    header: WalHeader,
    /// Running checksum at `size`, which the next frame must continue.
    checksum: (u32, u32),
}

pub struct Db {
    cfg: DbConfig,
    wal_path: PathBuf,
    conn: Option<Connection>,
    reader: Option<Connection>,
    /// Held open for the life of the process and used for every read of the database file:
    /// closing any descriptor on a file drops all POSIX locks the process holds on it,
    /// SQLite's included, after which another process's connection believes it is the last
    /// one and deletes the WAL.
    file: Option<File>,
    page_size: u32,
    shadow: Option<Shadow>,
    /// Frames copied since the last seal, compressed as they came.
    open_segment: Option<OpenSegment>,
    /// Set while a WAL restart forced by us is pending. Every frame of the old index was
    /// copied under the write lock before it, so the restart may overwrite them; only a
    /// restart nobody expected needs Litestream's check that the last copied frame survived.
    restart_expected: bool,
    /// Where the previous index ended, when the checkpoint this tick ran restarted the WAL;
    /// see [`Db::publishable`].
    restarted_after: Option<Pos>,
    /// The current boot's name while shadow writes go unflushed (see [`UNSYNCED_FILE`]); `None`
    /// where the kernel does not say, and then every segment is flushed as it is sealed.
    boot: Option<String>,
}

/// WAL indexes stop growing well before offsets reach the 4 GiB that v0.3.13's 8-digit names
/// can hold; a WAL that grows past this (checkpoints blocked for a long time) starts a new
/// generation instead of writing names v0.3.13 would silently skip.
const MAX_SHADOW_SIZE: u64 = 0xF000_0000;
/// Where the kernel names the current boot; the name changes whenever the machine starts.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Shadow segments are written without fsync. They live a few seconds, until every replica
/// has their frames, and while the machine stays up the page cache keeps them whatever happens
/// to the process (a crash, SIGKILL, the OOM killer). Only a restart of the machine can lose
/// writes that were not flushed, and then the shadow no longer proves what was uploaded. This
/// file in the metadata directory names the boot under which such writes were made: a start
/// under another boot trusts no shadow and begins a new generation, and a clean shutdown
/// flushes the shadow segments and removes the file. (An fdatasync of the raw shadow WAL after
/// every copy was a tenth of Walden's CPU at 500 tx/s.)
const UNSYNCED_FILE: &str = "unsynced";

/// Raw size at which a segment is sealed even before it is published, so that a backlog, a
/// writer flat out or the first copy of a large WAL is uploaded as objects of bounded size
/// (each is read into memory to be sent).
const SEGMENT_SEAL: u64 = 8 << 20;

impl Db {
    pub fn new(cfg: DbConfig) -> Db {
        let mut wal = cfg.path.clone().into_os_string();
        wal.push("-wal");
        Db {
            cfg,
            wal_path: PathBuf::from(wal),
            conn: None,
            reader: None,
            file: None,
            page_size: 0,
            shadow: None,
            open_segment: None,
            restart_expected: false,
            restarted_after: None,
            boot: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    pub fn config(&self) -> &DbConfig {
        &self.cfg
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    pub fn is_open(&self) -> bool {
        self.conn.is_some()
    }

    pub fn position(&self) -> Option<Position> {
        self.shadow.as_ref().map(|s| Position {
            generation: s.generation.clone(),
            pos: Pos {
                index: s.index,
                offset: s.size,
            },
        })
    }

    /// The position uploaders should work to now, with every segment up to it sealed. Right
    /// after a checkpoint restarted the WAL, the new index holds our `_litestream_seq` write
    /// and the few commits that waited for the checkpoint's write lock: shipping them in the
    /// same sync as the old index's last frames costs a second PUT (4,680 PUTs an hour instead
    /// of 3,840 in the benchmark's run at 500 transactions a second), so they wait, still open
    /// but parked (see [`format::Lz4Encoder::park`]: a thousand databases would otherwise each
    /// hold a compressor's 320 KiB), for the next tick's frames to join them, one tick later
    /// than the commits before them.
    /// A final sync (`everything`) ships them too, so the replica ends exactly where the
    /// database does.
    pub fn publish(&mut self, everything: bool) -> Result<Option<Position>, DbError> {
        let position = match (self.restarted_after, &self.shadow) {
            (Some(pos), Some(s)) if !everything => Some(Position {
                generation: s.generation.clone(),
                pos,
            }),
            _ => self.position(),
        };
        let covered = |o: &OpenSegment, p: &Position| {
            Pos {
                index: o.index,
                offset: o.start + o.len,
            } <= p.pos
        };
        if let (Some(open), Some(p)) = (&mut self.open_segment, &position) {
            if covered(open, p) {
                self.seal()?;
            } else {
                open.enc.park();
            }
        }
        Ok(position)
    }

    /// Size of the real WAL file, for metrics and health.
    pub fn wal_size(&self) -> u64 {
        fs::metadata(&self.wal_path).map(|m| m.len()).unwrap_or(0)
    }

    fn sqlite_err(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> DbError + '_ {
        move |source| DbError::Sqlite {
            path: self.cfg.path.clone(),
            op,
            source,
        }
    }

    fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DbError + '_ {
        move |source| DbError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn generation_file(&self) -> PathBuf {
        self.cfg.meta_path.join("generation")
    }

    fn unsynced_file(&self) -> PathBuf {
        self.cfg.meta_path.join(UNSYNCED_FILE)
    }

    fn generation_dir(&self, generation: &str) -> PathBuf {
        self.cfg.meta_path.join("generations").join(generation)
    }

    fn wal_dir(&self, generation: &str) -> PathBuf {
        self.generation_dir(generation).join("wal")
    }

    /// Compresses `data`, the checked bytes at `at` of the current index, into the open
    /// segment, opening one there if none is; `checksum` is the running checksum at `at`, where
    /// a segment opened now starts (at a commit, at the index's start, or inside a transaction
    /// longer than a segment).
    fn feed(
        &mut self,
        at: u64,
        data: &[u8],
        checksum: (u32, u32),
        expected: u64,
    ) -> Result<(), DbError> {
        let s = self.shadow.as_ref().expect("shadow exists");
        if self.open_segment.is_none() {
            let tmp = self
                .wal_dir(&s.generation)
                .join(format!("{:08x}_{at:08x}.wal.lz4.tmp", s.index));
            let file = File::create(&tmp).map_err(Self::io_err(&tmp))?;
            let enc = format::segment_encoder(BufWriter::new(file), expected as usize);
            self.open_segment = Some(OpenSegment {
                index: s.index,
                start: at,
                start_checksum: checksum,
                len: 0,
                tmp,
                enc,
            });
        }
        let open = self.open_segment.as_mut().expect("segment is open");
        debug_assert_eq!(open.start + open.len, at, "segments are contiguous");
        match open.enc.write_block(data) {
            Ok(()) => {
                open.len += data.len() as u64;
                Ok(())
            }
            Err(e) => {
                let tmp = open.tmp.clone();
                self.abandon_open_segment();
                Err(Self::io_err(&tmp)(e))
            }
        }
    }

    /// Finishes the open segment's frame and gives it its name, which is what makes it a
    /// segment: a file still named `.tmp` after a crash is removed at the next start, and its
    /// frames are copied again from the real WAL. Our own restarts of the WAL seal first; the
    /// one restart the application may make (see `backfill_ahead`) can leave frames only in
    /// the open segment, and a crash right then starts a new generation at the next start.
    fn seal(&mut self) -> Result<(), DbError> {
        let Some(open) = self.open_segment.take() else {
            return Ok(());
        };
        let (index, start, checksum) = (open.index, open.start, open.start_checksum);
        let path = open
            .tmp
            .with_file_name(segment_file_name(index, start, start + open.len));
        let tmp = open.tmp;
        let sealed = finish_segment(open.enc, &tmp, &path, self.boot.is_none());
        if sealed.is_err() {
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(&path);
            self.roll_back(index, start, checksum);
        }
        sealed
    }

    /// Drops the open segment after a failed write, or when its generation is replaced.
    fn abandon_open_segment(&mut self) {
        if let Some(open) = self.open_segment.take() {
            let _ = fs::remove_file(&open.tmp);
            self.roll_back(open.index, open.start, open.start_checksum);
        }
    }

    /// Moves the position back to where a lost segment started, so the next copy reads its
    /// frames from the real WAL again. A segment holding the index's header cannot be redone
    /// that way, so then the generation starts over.
    fn roll_back(&mut self, index: u32, start: u64, checksum: (u32, u32)) {
        match &mut self.shadow {
            Some(s) if s.index == index && start > 0 => {
                s.size = start;
                s.checksum = checksum;
            }
            _ => self.shadow = None,
        }
    }

    /// Opens the database on the first tick where it exists. Returns false while it does not.
    pub fn open(&mut self) -> Result<bool, DbError> {
        if self.conn.is_some() {
            return Ok(true);
        }
        if !self.cfg.path.exists() {
            return Ok(false);
        }
        self.file = Some(File::open(&self.cfg.path).map_err(Self::io_err(&self.cfg.path))?);
        let conn = self.connect()?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = wal", [], |r| r.get(0))
            .map_err(self.sqlite_err("pragma journal_mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DbError::NotWal {
                path: self.cfg.path.clone(),
                mode,
            });
        }
        conn.execute_batch(
            "PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE IF NOT EXISTS _litestream_seq (id INTEGER PRIMARY KEY, seq INTEGER);
             CREATE TABLE IF NOT EXISTS _litestream_lock (id INTEGER);",
        )
        .map_err(self.sqlite_err("create litestream tables"))?;
        self.page_size = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(self.sqlite_err("pragma page_size"))?;
        let reader = self.connect()?;
        self.conn = Some(conn);
        self.reader = Some(reader);
        self.begin_read()?;
        fs::create_dir_all(&self.cfg.meta_path).map_err(Self::io_err(&self.cfg.meta_path))?;
        remove_tmp_files(&self.cfg.meta_path);
        self.boot = fs::read_to_string(BOOT_ID)
            .ok()
            .map(|id| id.trim().to_owned())
            .filter(|id| !id.is_empty());
        self.load_shadow();
        self.remove_stale_generations();
        if let Some(boot) = &self.boot {
            let marked = write_atomic(&self.unsynced_file(), format!("{boot}\n").as_bytes())
                .and_then(|()| sync_dir(&self.cfg.meta_path));
            if let Err(e) = marked {
                tracing::warn!(db = %self.cfg.path.display(), error = %e, "cannot record the boot; flushing every shadow segment as it is sealed instead");
                self.boot = None;
            }
        }
        Ok(true)
    }

    fn connect(&self) -> Result<Connection, DbError> {
        let conn = Connection::open_with_flags(
            &self.cfg.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(self.sqlite_err("open"))?;
        disable_lookaside(&conn);
        conn.busy_timeout(self.cfg.busy_timeout)
            .map_err(self.sqlite_err("busy_timeout"))?;
        conn.execute_batch("PRAGMA cache_size = -256")
            .map_err(self.sqlite_err("cache_size"))?;
        persist_wal(&conn);
        Ok(conn)
    }

    fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("database is open")
    }

    fn reader(&self) -> &Connection {
        self.reader.as_ref().expect("database is open")
    }

    /// Holds a read transaction so no other connection can restart the WAL and overwrite
    /// frames that are not copied yet.
    fn begin_read(&self) -> Result<(), DbError> {
        self.reader()
            .execute_batch("BEGIN; SELECT COUNT(1) FROM _litestream_seq;")
            .map_err(self.sqlite_err("begin read transaction"))
    }

    /// Begins the reader's transaction anew, where the WAL is now. After a restart this moves
    /// it off read slot 0: with no reader holding a mark, every auto-checkpoint the
    /// application attempts after a commit first sorts all frames not yet backfilled, then
    /// finds slot 0 taken and gives up; that grew with the WAL and cut a writer running flat
    /// out to a third of its rate. A mark makes the attempt return at once once the frames
    /// below it are backfilled.
    fn reread(&self) -> Result<(), DbError> {
        self.end_read()?;
        self.begin_read()
    }

    fn end_read(&self) -> Result<(), DbError> {
        let r = self.reader();
        if !r.is_autocommit() {
            r.execute_batch("ROLLBACK")
                .map_err(self.sqlite_err("end read transaction"))?;
        }
        Ok(())
    }

    /// Writes a row so SQLite writes a WAL header (and restarts the WAL after a full
    /// checkpoint) now, rather than at the application's next write.
    fn bump_seq(&self) -> Result<(), DbError> {
        self.conn()
            .execute(
                "INSERT INTO _litestream_seq (id, seq) VALUES (1, 1)
                 ON CONFLICT (id) DO UPDATE SET seq = seq + 1",
                [],
            )
            .map(drop)
            .map_err(self.sqlite_err("write _litestream_seq"))
    }

    fn read_real_header(&self) -> Option<WalHeader> {
        let mut buf = [0u8; WAL_HEADER_SIZE];
        let f = File::open(&self.wal_path).ok()?;
        f.read_exact_at(&mut buf, 0).ok()?;
        WalHeader::parse(&buf).ok()
    }

    /// Restores the shadow position from disk after a restart, or leaves none (which starts a
    /// new generation) when the shadow no longer matches the real WAL.
    fn load_shadow(&mut self) {
        self.shadow = None;
        if let Ok(since) = fs::read_to_string(self.unsynced_file())
            && Some(since.trim()) != self.boot.as_deref()
        {
            tracing::warn!(db = %self.cfg.path.display(), "the machine restarted since shadow WAL writes that were never flushed; starting a new generation");
            return;
        }
        let Ok(text) = fs::read_to_string(self.generation_file()) else {
            return;
        };
        let generation = text.trim().to_string();
        if !format::is_generation(&generation) {
            return;
        }
        let segments = local_segments(&self.cfg.meta_path, &generation);
        let Some(last) = segments.last() else {
            return;
        };
        let index = last.index;
        let size = last.end;
        let Some(first) = segments.iter().find(|g| g.index == index && g.start == 0) else {
            return;
        };
        let mut hbuf = [0u8; WAL_HEADER_SIZE];
        let read =
            File::open(&first.path).and_then(|f| format::lz4_decoder(f).read_exact(&mut hbuf));
        if read.is_err() {
            return;
        }
        let Ok(header) = WalHeader::parse(&hbuf) else {
            return;
        };
        if self.read_real_header() != Some(header) {
            tracing::warn!(db = %self.cfg.path.display(), "wal header changed while not running; starting a new generation");
            return;
        }
        // The WAL has not restarted since (its header is the same), and SQLite never rewrites a
        // committed frame before a restart, so the last frame copied is still there to give
        // the running checksum.
        let checksum = if size > WAL_HEADER_SIZE as u64 {
            let Some(h) = self.real_frame_header(size - wal::frame_size(header.page_size)) else {
                return;
            };
            if (h.salt1, h.salt2) != (header.salt1, header.salt2) {
                return;
            }
            (h.checksum1, h.checksum2)
        } else {
            header.checksum()
        };
        self.shadow = Some(Shadow {
            generation,
            index,
            size,
            header,
            checksum,
        });
    }

    /// The header of the real WAL frame at `offset`.
    fn real_frame_header(&self, offset: u64) -> Option<FrameHeader> {
        let mut fh = [0u8; wal::FRAME_HEADER_SIZE];
        File::open(&self.wal_path)
            .and_then(|f| f.read_exact_at(&mut fh, offset))
            .ok()?;
        Some(FrameHeader::parse(&fh))
    }

    fn remove_stale_generations(&self) {
        let current = self.shadow.as_ref().map(|s| s.generation.as_str());
        let dir = self.cfg.meta_path.join("generations");
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if Some(e.file_name().to_string_lossy().as_ref()) != current {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// Removes shadow segments every replica has uploaded: those of indexes below `keep_from`,
    /// keeping one extra index as Litestream does.
    pub fn remove_shadow_before(&self, keep_from: u32) {
        let Some(s) = &self.shadow else { return };
        for g in local_segments(&self.cfg.meta_path, &s.generation) {
            if g.index.saturating_add(1) < keep_from && g.index < s.index {
                let _ = fs::remove_file(&g.path);
            }
        }
    }

    /// One tick: open if needed, copy new committed frames into the shadow (starting a new
    /// generation when the shadow cannot continue), then checkpoint if a threshold is reached.
    pub fn sync(&mut self) -> Result<SyncReport, DbError> {
        let mut report = SyncReport::default();
        self.restarted_after = None;
        let was_open = self.conn.is_some();
        if !self.open()? {
            return Ok(report);
        }
        let mut used_sqlite = !was_open;
        if self.wal_size() < WAL_HEADER_SIZE as u64 {
            self.bump_seq()?;
            used_sqlite = true;
        }
        let orig_wal = wal::align(self.wal_size(), self.page_size);
        report.bytes_copied = self.copy(&mut report)?;
        if let Some(mode) = self.checkpoint_due(orig_wal) {
            let started = std::time::Instant::now();
            let result = self.checkpoint(mode).map_err(|e| e.to_string());
            report.checkpoint = Some((mode, result, started.elapsed()));
            used_sqlite = true;
        }
        if used_sqlite {
            self.release_memory();
        }
        Ok(report)
    }

    /// Verifies the shadow against the real WAL and copies; the reason a new generation is
    /// needed, if any, goes into the report.
    fn copy(&mut self, report: &mut SyncReport) -> Result<u64, DbError> {
        let (reason, restart) = self.verify();
        if let Some(reason) = reason {
            let generation = self.new_generation()?;
            tracing::info!(db = %self.cfg.path.display(), generation = %generation, reason, "new generation");
            report.new_generation = Some(generation);
            report.reason = Some(reason);
            return Ok(self.shadow.as_ref().map_or(0, |s| s.size));
        }
        let mut copied = self.copy_frames()?;
        if restart {
            copied += self.start_next_index()?;
        }
        Ok(copied)
    }

    fn verify(&self) -> (Option<&'static str>, bool) {
        let Some(s) = &self.shadow else {
            return (Some("no generation exists"), false);
        };
        if s.index >= format::MAX_INDEX {
            return (Some("max index exceeded"), false);
        }
        if s.size >= MAX_SHADOW_SIZE {
            return (Some("wal index reached 4 GiB"), false);
        }
        if !self.wal_dir(&s.generation).is_dir() {
            return (Some("no shadow wal"), false);
        }
        // Our own checkpoint may have restarted the WAL and cut the file down (TRUNCATE).
        let restart = self.read_real_header() != Some(s.header);
        if restart && self.restart_expected {
            return (None, true);
        }
        let real_size = wal::align(self.wal_size(), self.page_size);
        if real_size < s.size {
            return (Some("wal truncated by another process"), false);
        }
        if s.size == WAL_HEADER_SIZE as u64 {
            if restart {
                return (Some("wal header only, mismatched"), false);
            }
            return (None, false);
        }
        // The last frame copied must still be in the real WAL: same salts, and the running
        // checksum (which covers every byte of every frame before it) as we computed it.
        let last = self.real_frame_header(s.size - wal::frame_size(self.page_size));
        let same = last.is_some_and(|h| {
            (h.salt1, h.salt2) == (s.header.salt1, s.header.salt2)
                && (h.checksum1, h.checksum2) == s.checksum
        });
        if !same {
            return (Some("wal overwritten by another process"), false);
        }
        (None, restart)
    }

    /// Starts a generation from the real WAL as it is now: index 0 holds its header and every
    /// valid committed frame. Its snapshot is taken separately, at the next index.
    fn new_generation(&mut self) -> Result<String, DbError> {
        let header = match self.read_real_header() {
            Some(h) => h,
            None => {
                self.bump_seq()?;
                self.read_real_header().ok_or_else(|| {
                    DbError::Busy(format!(
                        "{}: wal has no valid header yet",
                        self.cfg.path.display()
                    ))
                })?
            }
        };
        let generation = format::new_generation();
        self.abandon_open_segment();
        self.open_shadow_index(generation.clone(), 0, header)?;
        self.copy_frames()?;
        let gen_file = self.generation_file();
        write_atomic(&gen_file, format!("{generation}\n").as_bytes())?;
        self.remove_stale_generations();
        Ok(generation)
    }

    /// After the old index's remaining frames were copied: opens shadow index+1 from the real
    /// WAL's new header and copies its frames.
    fn start_next_index(&mut self) -> Result<u64, DbError> {
        let Some(header) = self.read_real_header() else {
            return Ok(0);
        };
        let s = self.shadow.as_ref().expect("shadow exists");
        let (generation, index) = (s.generation.clone(), s.index + 1);
        self.open_shadow_index(generation, index, header)?;
        self.copy_frames()
    }

    /// Makes a new index the current position, its first segment starting with the real WAL's
    /// current header (as bytes, exactly as SQLite wrote it). The previous index's last
    /// segment is sealed first.
    fn open_shadow_index(
        &mut self,
        generation: String,
        index: u32,
        header: WalHeader,
    ) -> Result<(), DbError> {
        self.seal()?;
        let dir = self.wal_dir(&generation);
        fs::create_dir_all(&dir).map_err(Self::io_err(&dir))?;
        let mut hbuf = [0u8; WAL_HEADER_SIZE];
        File::open(&self.wal_path)
            .and_then(|f| f.read_exact_at(&mut hbuf, 0))
            .map_err(Self::io_err(&self.wal_path))?;
        self.shadow = Some(Shadow {
            generation,
            index,
            size: 0,
            header,
            checksum: header.checksum(),
        });
        self.feed(0, &hbuf, header.checksum(), self.wal_size())?;
        let s = self.shadow.as_mut().expect("shadow exists");
        s.size = WAL_HEADER_SIZE as u64;
        Ok(())
    }

    /// Compresses every valid committed frame after the shadow's end into the open segment;
    /// frames of a transaction that has not committed yet are left for a later tick.
    ///
    /// Each chunk read is checked frame by frame, and the part up to its last commit is fed
    /// from the read buffer; the next read starts at that commit. Only a transaction longer
    /// than a chunk is read twice: once to find its commit, once to feed it.
    fn copy_frames(&mut self) -> Result<u64, DbError> {
        let s = self.shadow.as_ref().expect("shadow exists");
        let real = match File::open(&self.wal_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Self::io_err(&self.wal_path)(e)),
        };
        let real_len = real.metadata().map_err(Self::io_err(&self.wal_path))?.len();
        let page_size = s.header.page_size;
        let fsz = wal::frame_size(page_size);
        let end = wal::align(real_len, page_size).min(MAX_SHADOW_SIZE);
        if end <= s.size {
            return Ok(0);
        }
        let be = s.header.big_endian_checksums();
        let (salt1, salt2) = (s.header.salt1, s.header.salt2);
        let start = s.size;
        let expected = end - start;
        // Fed up to here: the last commit seen, and the running checksum there.
        let mut committed = (s.size, s.checksum);
        // Checked up to here, past `committed` only inside a transaction longer than a chunk.
        let mut scanned = committed;
        // Each piece fed is one LZ4 block, so pieces are read at the segment's block size; memory
        // stays bounded by it whatever the transaction size.
        let block = format::segment_block_size(expected as usize) as u64;
        let chunk = ((end - start) / fsz).min((block / fsz).max(1)) * fsz;
        with_scratch(chunk as usize, |scratch| {
            while scanned.0 < end {
                let at = scanned.0;
                let n = (end - at).min(chunk) as usize;
                let buf = &mut scratch[..n];
                real.read_exact_at(buf, at)
                    .map_err(Self::io_err(&self.wal_path))?;
                let mut ck = scanned.1;
                let mut valid = 0usize;
                let mut last_commit = None;
                for frame in buf.chunks_exact(fsz as usize) {
                    let h = FrameHeader::parse(frame);
                    if h.salt1 != salt1 || h.salt2 != salt2 {
                        break;
                    }
                    let c = wal::checksum(be, ck, &frame[..8]);
                    let c = wal::checksum(be, c, &frame[wal::FRAME_HEADER_SIZE..]);
                    if c != (h.checksum1, h.checksum2) {
                        break;
                    }
                    ck = c;
                    valid += frame.len();
                    if h.commit != 0 {
                        last_commit = Some((valid, ck));
                    }
                }
                scanned = (at + valid as u64, ck);
                if let Some((upto, ck)) = last_commit {
                    let mut fed_to = committed;
                    if committed.0 < at {
                        let ck_at =
                            self.feed_from_wal(&real, committed, at, (be, fsz, expected))?;
                        fed_to = (at, ck_at);
                    }
                    let from = (fed_to.0 - at) as usize;
                    self.feed(fed_to.0, &buf[from..upto], fed_to.1, expected)?;
                    committed = (at + upto as u64, ck);
                    scanned = committed;
                    let s = self.shadow.as_mut().expect("shadow exists");
                    (s.size, s.checksum) = committed;
                    self.seal_if_full()?;
                }
                if valid < n {
                    break;
                }
            }
            Ok::<_, DbError>(())
        })?;
        Ok(committed.0 - start)
    }

    /// Feeds `[from.0, to)` of the real WAL, already checked, in chunks of its own: the first
    /// part of a transaction longer than a chunk, whose commit the scan has just found. A
    /// segment may be sealed inside it, so that a huge transaction is still uploaded in objects
    /// of bounded size; the running checksum is kept at every piece for where the next
    /// segment starts, and returned as it is at `to`.
    fn feed_from_wal(
        &mut self,
        real: &File,
        from: (u64, (u32, u32)),
        to: u64,
        (be, fsz, expected): (bool, u64, u64),
    ) -> Result<(u32, u32), DbError> {
        let block = format::segment_block_size(expected as usize) as u64;
        let mut buf = vec![0u8; block as usize];
        let (mut at, mut ck) = from;
        while at < to {
            let n = (to - at).min(block) as usize;
            real.read_exact_at(&mut buf[..n], at)
                .map_err(Self::io_err(&self.wal_path))?;
            self.feed(at, &buf[..n], ck, expected)?;
            for frame in buf[..n].chunks_exact(fsz as usize) {
                ck = wal::checksum(be, ck, &frame[..8]);
                ck = wal::checksum(be, ck, &frame[wal::FRAME_HEADER_SIZE..]);
            }
            at += n as u64;
            self.seal_if_full()?;
        }
        Ok(ck)
    }

    /// Seals the open segment once it holds [`SEGMENT_SEAL`] bytes.
    fn seal_if_full(&mut self) -> Result<(), DbError> {
        if self
            .open_segment
            .as_ref()
            .is_some_and(|o| o.len >= SEGMENT_SEAL)
        {
            self.seal()?;
        }
        Ok(())
    }

    fn checkpoint_due(&self, orig_wal: u64) -> Option<CheckpointMode> {
        let s = self.shadow.as_ref()?;
        let calc = |pages: u32| {
            WAL_HEADER_SIZE as u64 + wal::frame_size(self.page_size) * u64::from(pages)
        };
        if orig_wal >= self.cfg.truncate_wal_bytes {
            return Some(CheckpointMode::Truncate);
        }
        if self.cfg.max_checkpoint_page_count > 0
            && s.size >= calc(self.cfg.max_checkpoint_page_count)
        {
            return Some(CheckpointMode::Restart);
        }
        if s.size >= calc(self.cfg.min_checkpoint_page_count) {
            return Some(CheckpointMode::Passive);
        }
        if !self.cfg.checkpoint_interval.is_zero() && s.size > calc(1) {
            let modified = fs::metadata(&self.cfg.path)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::now());
            if modified.elapsed().unwrap_or_default() > self.cfg.checkpoint_interval {
                return Some(CheckpointMode::Passive);
            }
        }
        None
    }

    /// Runs a checkpoint of ours and, when the WAL was fully backfilled, restarts it with a
    /// write of ours.
    ///
    /// Copy and backfill happen under one hold of the write lock (see `drain_wal`): a frame
    /// committed between a copy and a checkpoint is backfilled and can then be overwritten or
    /// cut off before any copy sees it, and the generation has to start over. With a writer
    /// committing 45,000 one-row transactions a second, SQLite's own RESTART lost the
    /// checkpoint lock to the writer's auto-checkpoint at every attempt, the WAL passed a
    /// gigabyte, and the TRUNCATE forced then cut off uncopied frames: a new generation and a
    /// full snapshot. The modes now differ only in whether a backfill that other readers cut
    /// short is retried, and in TRUNCATE shrinking the WAL file when the restarting write is
    /// ours.
    pub fn checkpoint(&mut self, mode: CheckpointMode) -> Result<(), DbError> {
        let drained = match self.drain_wal(mode != CheckpointMode::Passive) {
            Ok(drained) => drained,
            Err(e) => {
                self.restart_expected = false;
                return Err(e);
            }
        };
        // Every frame of the old index was copied under the write lock.
        let old_end = self.position().map(|p| p.pos);
        let restarted = match drained {
            Drained::Full(_) => self
                .restart_wal(mode == CheckpointMode::Truncate)
                .and_then(|()| self.reread()),
            Drained::Partial => Ok(()),
        };
        let mut report = SyncReport::default();
        let copied = self.copy(&mut report);
        self.restart_expected = false;
        restarted?;
        copied?;
        self.restarted_after = old_end.filter(|end| {
            self.shadow
                .as_ref()
                .is_some_and(|s| s.index == end.index + 1)
        });
        Ok(())
    }

    /// Copies every committed frame and backfills the WAL into the database while holding the
    /// write lock, so nothing commits in between. The application waits meanwhile, so most
    /// frames are copied before the lock is taken. When the backfill is complete, the reader
    /// begins again before the lock is released: nothing is left in the WAL, so SQLite gives it
    /// read slot 0, which allows one restart of the WAL and then forbids any backfill while it
    /// is held. No second restart can then overwrite frames before they are copied.
    fn drain_wal(&mut self, wait_for_readers: bool) -> Result<Drained, DbError> {
        let mut report = SyncReport::default();
        for _ in 0..PRE_COPY_PASSES {
            if self.copy(&mut report)? < PRE_COPY_ENOUGH {
                break;
            }
        }
        if self.wal_size() >= BACKFILL_AHEAD_MIN {
            for _ in 0..BACKFILL_AHEAD_ROUNDS {
                self.backfill_ahead()?;
                if self.copy(&mut report)? < BACKFILL_AHEAD_AGAIN {
                    break;
                }
            }
        }
        self.recopy_under_lock(|db| {
            Ok(if db.backfill(wait_for_readers)? {
                Drained::Full(db.read_real_header())
            } else {
                Drained::Partial
            })
        })
    }

    /// Under one hold of the write lock: copies the last frames, runs `between`, and begins the
    /// reader again, so that its new mark covers only copied frames. If anything fails the
    /// reader begins again all the same, so it is never left without a read transaction.
    fn recopy_under_lock<T>(
        &mut self,
        between: impl FnOnce(&mut Db) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let result = self.with_write_lock(|db| {
            let locked = Instant::now();
            db.end_read()?;
            db.copy(&mut SyncReport::default())?;
            let value = between(db)?;
            db.begin_read()?;
            tracing::debug!(
                db = %db.cfg.path.display(),
                held_ms = locked.elapsed().as_millis() as u64,
                "copied and began reading again under the write lock"
            );
            Ok(value)
        });
        if result.is_err() {
            self.reread()?;
        }
        result
    }

    /// Backfills, without holding the write lock, every frame already copied, so that the
    /// backfill under the lock in `drain_wal` has only the last few frames to write and fsync.
    ///
    /// Between checkpoints the reader's mark stays where the last one left it, so neither the
    /// application's auto-checkpoints nor ours could backfill past it: with a writer committing
    /// 50,000 transactions a second, a whole second of WAL (200 MB) was fsynced and written
    /// into the database while the application waited, 54–186 ms per checkpoint. Here the
    /// reader begins again under the write lock right after a last copy, so its new mark covers
    /// only copied frames; then a PASSIVE checkpoint runs while the application goes on
    /// writing (busy just means the application's own checkpoint is doing the same work).
    ///
    /// If everything happened to be backfilled already, the new read gets slot 0 and the
    /// application may restart the WAL before our own checkpoint: every frame was copied under
    /// the lock, so that restart is expected, as after a checkpoint of ours.
    fn backfill_ahead(&mut self) -> Result<(), DbError> {
        self.restart_expected = true;
        self.recopy_under_lock(|_| Ok(()))?;
        self.conn()
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(self.sqlite_err("passive checkpoint"))
    }

    /// A PASSIVE checkpoint on the reader connection, since the other one holds the write
    /// lock. While another connection checkpoints (the application's auto-checkpoint after a
    /// commit) SQLite answers busy at once, without calling the busy handler, so that is
    /// retried here until `busy-timeout`; with `wait_for_readers`, so is a backfill that other
    /// readers cut short, which is what RESTART would wait for. Returns whether every frame
    /// is in the database.
    fn backfill(&self, wait_for_readers: bool) -> Result<bool, DbError> {
        let deadline = Instant::now() + self.cfg.busy_timeout;
        loop {
            let (busy, log, done) = self
                .reader()
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(self.sqlite_err("passive checkpoint"))?;
            let full = busy == 0 && log == done;
            let retry = log < 0 || (wait_for_readers && !full);
            if full || !retry || Instant::now() >= deadline {
                if !full {
                    tracing::debug!(db = %self.cfg.path.display(), busy, log, done, "wal not fully backfilled");
                }
                return Ok(full);
            }
            std::thread::sleep(CHECKPOINT_POLL);
        }
    }

    /// Writes our row into a fully backfilled WAL, which restarts it unless the application
    /// wrote first (harmless: every old frame is copied). The write lock is polled for like
    /// every other (see `begin_immediate`). With `truncate` SQLite also cuts the WAL file down
    /// to that one frame, when the restarting write is ours.
    fn restart_wal(&mut self, truncate: bool) -> Result<(), DbError> {
        // After the restart the old index's last frames are only in the open segment.
        self.seal()?;
        self.restart_expected = true;
        if truncate {
            self.set_journal_size_limit(0)?;
        }
        let bumped = self.with_write_lock(|db| db.bump_seq());
        if truncate {
            self.set_journal_size_limit(-1)?;
        }
        bumped
    }

    fn set_journal_size_limit(&self, bytes: i64) -> Result<(), DbError> {
        self.conn()
            .query_row(&format!("PRAGMA journal_size_limit = {bytes}"), [], |_| {
                Ok(())
            })
            .map_err(self.sqlite_err("journal_size_limit"))
    }

    /// Frees the pages SQLite cached in both connections. Walden reads the WAL itself and uses
    /// SQLite only at open, checkpoints and snapshots, so a cache would only hold memory: about
    /// 12 KB per database, 12 MB of 186 with a thousand databases.
    fn release_memory(&self) {
        for conn in [&self.conn, &self.reader].into_iter().flatten() {
            if let Err(e) = conn.execute_batch("PRAGMA shrink_memory") {
                tracing::debug!(db = %self.cfg.path.display(), error = %e, "shrink_memory failed");
            }
        }
    }

    /// Runs `f` holding SQLite's write lock, so no application transaction commits meanwhile.
    fn with_write_lock<T>(
        &mut self,
        f: impl FnOnce(&mut Db) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        self.begin_immediate()?;
        let result = f(self);
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let finish = self
            .conn()
            .execute_batch(end)
            .map_err(self.sqlite_err("end write transaction"));
        let value = result?;
        finish?;
        Ok(value)
    }

    /// BEGIN IMMEDIATE, retried every `LOCK_POLL` until `busy-timeout`. SQLite's busy handler
    /// sleeps 1, 2, 5, 10 ... 100 ms between attempts; a writer committing every few
    /// microseconds takes the lock back during each sleep: under a writer running flat out, 4
    /// of 9 checkpoints gave up after a whole second.
    fn begin_immediate(&self) -> Result<(), DbError> {
        let conn = self.conn();
        conn.busy_timeout(Duration::ZERO)
            .map_err(self.sqlite_err("busy_timeout"))?;
        let deadline = Instant::now() + self.cfg.busy_timeout;
        let begun = loop {
            match conn.execute_batch("BEGIN IMMEDIATE") {
                Err(e)
                    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(LOCK_POLL);
                }
                other => break other,
            }
        };
        conn.busy_timeout(self.cfg.busy_timeout)
            .map_err(self.sqlite_err("busy_timeout"))?;
        begun.map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy) => DbError::Busy(format!(
                "{}: database busy, will retry",
                self.cfg.path.display()
            )),
            _ => self.sqlite_err("begin write transaction")(e),
        })
    }

    /// Takes a snapshot that is exactly the database state at the start of a new WAL index.
    ///
    /// Litestream copies the database file while application checkpoints may be writing into
    /// it, so its snapshots can hold page versions from later in the WAL, and a point-in-time
    /// restore that stops early mixes versions. Here the WAL is fully backfilled under the
    /// write lock, a reader is started while nothing is left in the WAL (SQLite then gives it
    /// read slot 0, which forbids any backfill while it is held, so the file cannot change),
    /// and a write forces the WAL to restart. The file read under that reader is the state at
    /// offset 0 of the new index, and any prefix of the WAL from there restores exactly.
    pub fn snapshot(&mut self) -> Result<LocalSnapshot, DbError> {
        if !self.open()? {
            return Err(DbError::Busy(format!(
                "{}: database does not exist yet",
                self.cfg.path.display()
            )));
        }
        let before = match self.freeze_for_snapshot() {
            Ok(h) => h,
            Err(e) => {
                self.reread()?;
                return Err(e);
            }
        };
        let outcome = self.snapshot_under_reader(before);
        self.restart_expected = false;
        self.reread()?;
        self.release_memory();
        outcome
    }

    /// Leaves the reader on read slot 0 over a fully backfilled WAL (see `drain_wal`) and
    /// forces the WAL to restart.
    fn freeze_for_snapshot(&mut self) -> Result<Option<WalHeader>, DbError> {
        let Drained::Full(before) = self.drain_wal(false)? else {
            return Err(DbError::Busy(format!(
                "{}: readers prevent a full checkpoint; snapshot retried later",
                self.cfg.path.display()
            )));
        };
        self.restart_wal(false)?;
        Ok(before)
    }

    fn snapshot_under_reader(
        &mut self,
        before: Option<WalHeader>,
    ) -> Result<LocalSnapshot, DbError> {
        if self.read_real_header() == before {
            return Err(DbError::Busy(format!(
                "{}: wal did not restart (other readers are open); snapshot retried later",
                self.cfg.path.display()
            )));
        }
        let mut report = SyncReport::default();
        self.copy(&mut report)?;
        let s = self.shadow.as_ref().expect("shadow exists");
        let generation = s.generation.clone();
        let index = s.index;
        let dir = self.generation_dir(&generation).join("snapshots");
        fs::create_dir_all(&dir).map_err(Self::io_err(&dir))?;
        let path = dir.join(format::snapshot_name(index));
        let tmp = path.with_extension("lz4.tmp");
        let file = self.file.as_ref().expect("database is open");
        let size = compress_file(file, &self.cfg.path, &tmp)?;
        fs::rename(&tmp, &path).map_err(Self::io_err(&path))?;
        Ok(LocalSnapshot {
            generation,
            index,
            path,
            size,
        })
    }

    /// Pins the replicated position and checksums the live database at exactly that position:
    /// under the write lock every committed frame is copied to the shadow, and a read
    /// transaction begun on a fresh connection then sees that state and no other while the
    /// application writes on.
    pub fn checksum_at_position(&mut self) -> Result<(Position, u64), DbError> {
        if !self.open()? {
            return Err(DbError::Busy(format!(
                "{}: database does not exist yet",
                self.cfg.path.display()
            )));
        }
        let conn = self.connect()?;
        let position = self.with_write_lock(|db| {
            let mut report = SyncReport::default();
            db.copy(&mut report)?;
            conn.execute_batch("BEGIN; SELECT COUNT(1) FROM _litestream_seq;")
                .map_err(db.sqlite_err("begin verification read"))?;
            Ok(db.position())
        })?;
        let position = position.ok_or_else(|| {
            DbError::Busy(format!("{}: no generation yet", self.cfg.path.display()))
        })?;
        if let Some(open) = &mut self.open_segment {
            open.enc.park();
        }
        let sum = crate::verify::checksum(&conn).map_err(self.sqlite_err("checksum"))?;
        Ok((position, sum))
    }

    /// Releases SQLite resources and flushes the shadow, which stays on disk for the next run.
    pub fn close(&mut self) {
        if let Err(e) = self.seal() {
            tracing::warn!(db = %self.cfg.path.display(), error = %e, "cannot seal the last shadow segment; its frames are copied again at the next start");
        }
        let opened = self.conn.is_some();
        if self.reader.is_some() {
            let _ = self.end_read();
        }
        self.reader = None;
        self.conn = None;
        self.file = None;
        if opened
            && self.boot.is_some()
            && let Err(e) = self.flush_shadow()
        {
            tracing::warn!(db = %self.cfg.path.display(), error = %e, "cannot flush the shadow segments; after a restart of the machine a new generation will start");
        }
    }

    /// Makes every shadow segment of the current generation durable, with the directories that
    /// name them, then removes [`UNSYNCED_FILE`]: from then on a restart of the machine loses
    /// nothing the next run needs to continue this generation.
    fn flush_shadow(&self) -> Result<(), DbError> {
        if let Some(s) = &self.shadow {
            let dir = self.generation_dir(&s.generation);
            let wal_dir = dir.join("wal");
            for g in local_segments(&self.cfg.meta_path, &s.generation) {
                File::open(&g.path)
                    .and_then(|f| f.sync_all())
                    .map_err(Self::io_err(&g.path))?;
            }
            for d in [
                wal_dir.as_path(),
                dir.as_path(),
                dir.parent().expect("generations"),
            ] {
                sync_dir(d)?;
            }
        }
        let marker = self.unsynced_file();
        match fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Self::io_err(&marker)(e)),
        }
        sync_dir(&self.cfg.meta_path)
    }
}

/// Every sealed shadow segment of `generation`, in WAL order; uploaders send these files as
/// they are.
pub fn local_segments(meta: &Path, generation: &str) -> Vec<LocalSegment> {
    let dir = meta.join("generations").join(generation).join("wal");
    let mut out: Vec<LocalSegment> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (index, start, end) = parse_segment_file_name(&name)?;
            Some(LocalSegment {
                index,
                start,
                end,
                path: e.path(),
            })
        })
        .collect();
    out.sort_unstable_by_key(|g| (g.index, g.start));
    out
}

/// `<index>_<start>-<end>.wal.lz4`: the object name's index and offset, plus where the segment
/// ends, so that listing the directory is enough to know what each file covers.
fn segment_file_name(index: u32, start: u64, end: u64) -> String {
    format!("{index:08x}_{start:08x}-{end:08x}.wal.lz4")
}

fn parse_segment_file_name(name: &str) -> Option<(u32, u64, u64)> {
    let (index, range) = name.strip_suffix(".wal.lz4")?.split_once('_')?;
    let (start, end) = range.split_once('-')?;
    let hex = |s: &str| (s.len() == 8).then(|| u64::from_str_radix(s, 16).ok())?;
    let (index, start, end) = (u32::try_from(hex(index)?).ok()?, hex(start)?, hex(end)?);
    (start < end).then_some((index, start, end))
}

/// Ends a segment's frame and renames it from `tmp` to `path`; flushed to disk only where the
/// boot cannot be told (see [`UNSYNCED_FILE`]).
fn finish_segment(
    enc: format::Lz4Encoder<BufWriter<File>>,
    tmp: &Path,
    path: &Path,
    sync: bool,
) -> Result<(), DbError> {
    let file = finish_file(enc, tmp)?;
    if sync {
        file.sync_data().map_err(Db::io_err(tmp))?;
    }
    fs::rename(tmp, path).map_err(Db::io_err(path))?;
    if sync {
        sync_dir(path.parent().expect("segment has a directory"))?;
    }
    Ok(())
}

/// Process-wide SQLite tuning for replicating many databases at once; must run before the
/// first connection is opened (the binary calls it first thing). Without it every connection
/// bulk-allocates room for twenty pages up front, which Walden's connections, reading a page
/// or two, never use.
pub fn configure_sqlite() {
    // SAFETY: called once before SQLite is initialised, as sqlite3_config requires; a null
    // buffer with zero size and count only turns the initial bulk allocation off.
    unsafe {
        rusqlite::ffi::sqlite3_config(
            rusqlite::ffi::SQLITE_CONFIG_PAGECACHE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            0 as std::ffi::c_int,
            0 as std::ffi::c_int,
        );
    }
}

/// Turns off SQLite's per-connection lookaside allocator (about 150 KB reserved at open).
/// Walden's connections run a handful of tiny statements, and with two connections per
/// database the reservation dominated memory when replicating hundreds of databases.
fn disable_lookaside(conn: &Connection) {
    // SAFETY: the handle is valid for the lifetime of `conn`; LOOKASIDE with a null buffer and
    // zero sizes is the documented way to disable it, before any statement has run.
    unsafe {
        rusqlite::ffi::sqlite3_db_config(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            0 as std::ffi::c_int,
            0 as std::ffi::c_int,
        );
    }
}

/// Sets `SQLITE_FCNTL_PERSIST_WAL` so SQLite never deletes the WAL when our connections close:
/// a deleted WAL breaks continuity and would force a new generation.
fn persist_wal(conn: &Connection) {
    let mut on: std::ffi::c_int = 1;
    // SAFETY: the handle is valid for the lifetime of `conn`, the database name is a valid C
    // string, and PERSIST_WAL takes a pointer to an int that outlives the call.
    unsafe {
        rusqlite::ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
            (&mut on as *mut std::ffi::c_int).cast(),
        );
    }
}

fn remove_tmp_files(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            remove_tmp_files(&p);
        } else if p.extension().is_some_and(|x| x == "tmp") {
            let _ = fs::remove_file(p);
        }
    }
}

fn write_new_file(path: &Path, data: &[u8], sync: bool) -> Result<(), DbError> {
    let mut f = File::create(path).map_err(Db::io_err(path))?;
    f.write_all(data).map_err(Db::io_err(path))?;
    if sync {
        f.sync_all().map_err(Db::io_err(path))?;
    }
    Ok(())
}

/// Makes the entries of `dir` (files created, renamed or removed in it) durable.
fn sync_dir(dir: &Path) -> Result<(), DbError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Db::io_err(dir))
}

/// Writes a file through a temporary name and a rename so readers never see half of it.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), DbError> {
    let tmp = path.with_extension("tmp");
    write_new_file(&tmp, data, true)?;
    fs::rename(&tmp, path).map_err(Db::io_err(path))
}

/// Streams the database file through the LZ4 frame encoder into `dest`, reading with
/// positioned reads on the long-lived descriptor; memory stays at one block.
fn compress_file(input: &File, src: &Path, dest: &Path) -> Result<u64, DbError> {
    let out = File::create(dest).map_err(Db::io_err(dest))?;
    let mut enc = format::lz4_encoder(std::io::BufWriter::new(out));
    let mut buf = vec![0u8; 256 << 10];
    let mut offset = 0u64;
    loop {
        let n = input.read_at(&mut buf, offset).map_err(Db::io_err(src))?;
        if n == 0 {
            break;
        }
        offset += n as u64;
        enc.write_all(&buf[..n]).map_err(Db::io_err(dest))?;
    }
    let f = finish_file(enc, dest)?;
    f.sync_all().map_err(Db::io_err(dest))?;
    Ok(f.metadata().map_err(Db::io_err(dest))?.len())
}

/// Ends an LZ4 frame written through a buffer into the file at `path`, and hands the file back.
fn finish_file(enc: format::Lz4Encoder<BufWriter<File>>, path: &Path) -> Result<File, DbError> {
    let writer = enc.finish().map_err(|source| DbError::Format {
        path: path.to_path_buf(),
        source,
    })?;
    writer
        .into_inner()
        .map_err(|e| Db::io_err(path)(e.into_error()))
}

/// The read buffer of copies, kept at its largest size: allocated anew each time, its page
/// faults and zeroing were a sixth of Walden's CPU time with a writer at 500 tx/s. One for the
/// process, not one per database or per blocking thread, so that memory does not grow with
/// either; a copy that finds it in use (another database's copy) allocates a buffer of its own.
static SCRATCH: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Runs `f` on the scratch buffer cut to `len` bytes, whose contents are whatever the last user
/// left there.
fn with_scratch<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    let slot = || {
        SCRATCH
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let mut buf = std::mem::take(&mut *slot());
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let out = f(&mut buf[..len]);
    let mut kept = slot();
    if kept.len() < buf.len() {
        *kept = buf;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(path: &Path) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=wal; CREATE TABLE IF NOT EXISTS t (v BLOB);
             INSERT INTO t VALUES (randomblob(100));",
        )
        .unwrap();
        conn
    }

    /// The WAL bytes the sealed segments of `index` hold, checked to follow on one another
    /// from offset 0 and to end at `end`.
    fn shadow_bytes(db: &Db, generation: &str, index: u32, end: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for g in local_segments(&db.cfg.meta_path, generation) {
            if g.index != index {
                continue;
            }
            assert_eq!(g.start, out.len() as u64, "segments follow on one another");
            let raw = format::decompress(&fs::read(&g.path).unwrap()).unwrap();
            assert_eq!(raw.len() as u64, g.end - g.start, "{}", g.path.display());
            out.extend_from_slice(&raw);
        }
        assert_eq!(out.len() as u64, end);
        out
    }

    fn real_wal(path: &Path, len: u64) -> Vec<u8> {
        let mut wal = fs::read(format!("{}-wal", path.display())).unwrap();
        wal.truncate(len as usize);
        wal
    }

    fn segment_count(db: &Db, generation: &str, index: u32) -> usize {
        local_segments(&db.cfg.meta_path, generation)
            .iter()
            .filter(|g| g.index == index)
            .count()
    }

    #[test]
    fn a_new_index_waits_open_for_the_next_tick_except_in_a_final_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let app = app(&path);
        let mut db = Db::new(crate::config::db_from_args(&path, Vec::new()));
        db.sync().unwrap();
        app.execute("INSERT INTO t VALUES (randomblob(100))", [])
            .unwrap();
        db.sync().unwrap();
        let old = db.position().unwrap();
        db.checkpoint(CheckpointMode::Passive).unwrap();
        let now = db.position().unwrap();
        assert_eq!(
            now.pos.index,
            old.pos.index + 1,
            "the checkpoint restarts the WAL"
        );
        assert_eq!(db.publish(false).unwrap().unwrap().pos, old.pos);
        let generation = &old.generation;
        assert_eq!(
            segment_count(&db, generation, now.pos.index),
            0,
            "still open"
        );

        app.execute("INSERT INTO t VALUES (randomblob(100))", [])
            .unwrap();
        db.sync().unwrap();
        let next = db.position().unwrap();
        assert!(next.pos > now.pos, "{next:?} after {now:?}");
        assert_eq!(db.publish(false).unwrap(), Some(next.clone()));
        assert_eq!(
            segment_count(&db, generation, next.pos.index),
            1,
            "the restart's frames and the next tick's go up as one segment"
        );
        let shadow = shadow_bytes(&db, generation, next.pos.index, next.pos.offset);
        assert_eq!(shadow, real_wal(&path, next.pos.offset));

        db.checkpoint(CheckpointMode::Passive).unwrap();
        let last = db.position().unwrap();
        assert_eq!(db.publish(true).unwrap(), Some(last.clone()));
        shadow_bytes(&db, generation, last.pos.index, last.pos.offset);
    }

    #[test]
    fn segments_hold_exactly_the_committed_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let app = app(&path);
        app.execute_batch("PRAGMA wal_autocheckpoint=0; PRAGMA cache_size=20")
            .unwrap();
        // No checkpoint, so the real WAL keeps every frame to compare with.
        let mut cfg = crate::config::db_from_args(&path, Vec::new());
        cfg.min_checkpoint_page_count = u32::MAX;
        cfg.max_checkpoint_page_count = 0;
        cfg.checkpoint_interval = Duration::ZERO;
        cfg.truncate_wal_bytes = u64::MAX;
        let mut db = Db::new(cfg);
        db.sync().unwrap();
        let generation = db.position().unwrap().generation;
        let check = |db: &mut Db| {
            db.sync().unwrap();
            let p = db.publish(false).unwrap().unwrap();
            assert_eq!(p.generation, generation);
            let shadow = shadow_bytes(db, &generation, p.pos.index, p.pos.offset);
            assert!(shadow == real_wal(&path, p.pos.offset), "at {p:?}");
            p.pos
        };
        for _ in 0..50 {
            app.execute("INSERT INTO t VALUES (randomblob(100))", [])
                .unwrap();
        }
        check(&mut db);
        // One transaction over four chunks: its frames are fed once its commit is found.
        app.execute("INSERT INTO t VALUES (randomblob(1100000))", [])
            .unwrap();
        check(&mut db);
        // A transaction spilling into the WAL before it commits: none of it is copied yet.
        app.execute_batch("BEGIN").unwrap();
        for _ in 0..200 {
            app.execute("INSERT INTO t VALUES (randomblob(3000))", [])
                .unwrap();
        }
        let before = db.position().unwrap().pos;
        assert!(
            db.wal_size() > before.offset + (256 << 10),
            "the transaction spilled"
        );
        assert_eq!(check(&mut db), before);
        app.execute_batch("COMMIT").unwrap();
        // More than a segment's worth in one tick is sealed in several segments, even inside
        // one transaction.
        for _ in 0..3 {
            app.execute("INSERT INTO t VALUES (randomblob(4000000))", [])
                .unwrap();
        }
        app.execute("INSERT INTO t VALUES (randomblob(20000000))", [])
            .unwrap();
        let end = check(&mut db);
        assert!(end.offset > 3 * SEGMENT_SEAL);
        let segments = local_segments(&db.cfg.meta_path, &generation);
        assert!(segments.len() > 4, "{segments:?}");
        let largest = segments.iter().map(|g| g.end - g.start).max().unwrap();
        assert!(largest < SEGMENT_SEAL + (1 << 20), "{largest}");
    }

    /// Reads the WAL-index header's `nBackfill` (the checkpoint info that follows the two
    /// 48-byte copies of the header in the `-shm` file).
    fn backfilled_frames(path: &Path) -> u32 {
        let shm = fs::read(format!("{}-shm", path.display())).unwrap();
        u32::from_ne_bytes(shm[96..100].try_into().unwrap())
    }

    #[test]
    fn a_checkpoint_of_a_large_wal_backfills_what_is_copied_before_taking_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let app = app(&path);
        app.execute_batch("PRAGMA wal_autocheckpoint=0").unwrap();
        let mut db = Db::new(crate::config::db_from_args(&path, Vec::new()));
        db.sync().unwrap();
        let insert = |n: usize| {
            for _ in 0..n {
                app.execute("INSERT INTO t VALUES (randomblob(3000))", [])
                    .unwrap();
            }
        };
        insert(6000);
        assert!(db.wal_size() >= BACKFILL_AHEAD_MIN);
        db.sync().unwrap();
        let generation = db.position().unwrap().generation;
        let copied = db.position().unwrap().pos;

        db.backfill_ahead().unwrap();
        let frames = (copied.offset - WAL_HEADER_SIZE as u64) / wal::frame_size(db.page_size());
        assert_eq!(
            u64::from(backfilled_frames(&path)),
            frames,
            "everything copied is in the database file before the write lock is taken"
        );

        insert(10);
        db.checkpoint(CheckpointMode::Passive).unwrap();
        insert(10);
        db.sync().unwrap();
        let after = db.position().unwrap();
        assert_eq!(after.generation, generation, "one generation throughout");
        assert_eq!(after.pos.index, copied.index + 1);
        let rows: i64 = app
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1 + 6000 + 20);
    }

    /// A first run's start: an application database, and a `Db` that has copied and published
    /// its first tick, as the replicator's loop does.
    struct FirstRun {
        _dir: tempfile::TempDir,
        path: PathBuf,
        app: Connection,
        cfg: DbConfig,
        db: Db,
        published: Position,
    }

    fn first_run() -> FirstRun {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let app = app(&path);
        let cfg = crate::config::db_from_args(&path, Vec::new());
        let mut db = Db::new(cfg.clone());
        db.sync().unwrap();
        let published = db.publish(false).unwrap().unwrap();
        FirstRun {
            _dir: dir,
            path,
            app,
            cfg,
            db,
            published,
        }
    }

    #[test]
    fn frames_copied_but_not_sealed_are_copied_again_after_a_crash() {
        let FirstRun {
            _dir,
            path,
            app,
            cfg,
            db: mut first,
            published: sealed,
        } = first_run();
        for _ in 0..10 {
            app.execute("INSERT INTO t VALUES (randomblob(100))", [])
                .unwrap();
        }
        first.sync().unwrap();
        let copied = first.position().unwrap();
        assert!(copied.pos > sealed.pos);
        drop(first);

        let mut second = Db::new(cfg);
        let report = second.sync().unwrap();
        assert_eq!(report.new_generation, None);
        assert_eq!(report.bytes_copied, copied.pos.offset - sealed.pos.offset);
        let p = second.publish(false).unwrap().unwrap();
        assert_eq!(p, copied);
        let shadow = shadow_bytes(&second, &p.generation, p.pos.index, p.pos.offset);
        assert!(shadow == real_wal(&path, p.pos.offset));
    }

    fn unsynced_marker(path: &Path) -> Option<String> {
        let cfg = crate::config::db_from_args(path, Vec::new());
        fs::read_to_string(cfg.meta_path.join(UNSYNCED_FILE)).ok()
    }

    #[test]
    fn the_shadow_is_marked_unflushed_while_running_and_flushed_at_a_clean_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _app = app(&path);
        let mut db = Db::new(crate::config::db_from_args(&path, Vec::new()));
        db.sync().unwrap();
        let boot = fs::read_to_string(BOOT_ID).unwrap();
        assert_eq!(unsynced_marker(&path).as_deref(), Some(boot.as_str()));
        let pos = db.position().unwrap();
        db.close();
        assert_eq!(unsynced_marker(&path), None);
        let shadow = shadow_bytes(&db, &pos.generation, pos.pos.index, pos.pos.offset);
        assert_eq!(shadow, real_wal(&path, pos.pos.offset));
    }

    /// A run that ended without a clean close (the process killed after a tick) left its
    /// shadow unflushed. Under the same boot the page cache still holds it and the generation
    /// goes on; under another boot (the machine restarted) a new generation starts.
    fn generation_after_an_unclean_stop(boot_in_marker: Option<&str>) -> (String, SyncReport) {
        let FirstRun {
            _dir,
            app,
            cfg,
            db: first,
            published,
            ..
        } = first_run();
        let generation = published.generation;
        drop(first);
        if let Some(boot) = boot_in_marker {
            fs::write(cfg.meta_path.join(UNSYNCED_FILE), boot).unwrap();
        }
        app.execute("INSERT INTO t VALUES (randomblob(100))", [])
            .unwrap();
        let mut second = Db::new(cfg);
        let report = second.sync().unwrap();
        (generation, report)
    }

    #[test]
    fn an_unflushed_shadow_from_the_same_boot_continues_its_generation() {
        let (_, report) = generation_after_an_unclean_stop(None);
        assert_eq!(report.new_generation, None);
    }

    #[test]
    fn an_unflushed_shadow_from_another_boot_starts_a_new_generation() {
        let (old, report) = generation_after_an_unclean_stop(Some("another-boot\n"));
        let new = report.new_generation.expect("a new generation");
        assert_ne!(new, old);
    }
}
