//! Writing the restored database file: the snapshot decoded straight into it, then each WAL
//! index's committed frames written over it.
//!
//! Letting SQLite apply the WAL meant, for every index, writing the index out as a `-wal` file,
//! opening the database, letting SQLite's recovery rebuild its wal-index and checkpointing:
//! about 0.8 s for 200 MiB of WAL in 22 indexes, most of it spent copying pages SQLite had just
//! read. [`WalApplier`] applies exactly what that checkpoint would, with the same rules
//! ([`wal::scan_frames`]' salt and checksum chain, whole transactions only, the file cut to the
//! last commit's database size), in one pass over the downloaded bytes.
//!
//! Both writers ask the kernel to start writing finished ranges back as they go
//! (`start_writeback`), so the final fsync waits for the last few megabytes instead of the whole
//! database: flushing a gigabyte took from 0.3 s to over 5 s on this machine's disk, all of
//! which would otherwise come after the last byte was decoded.
//!
//! Invariant: nothing here decides what to restore or where the file lives; `restore` owns the
//! plan, the temporary file and its clean-up.

use std::fs::File;
use std::io::{IoSlice, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

use crate::format::{self, FormatError};
use crate::wal::{self, FRAME_HEADER_SIZE, WAL_HEADER_SIZE, WalHeader};

/// Why the downloaded bytes could not be written as a database.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("not a valid lz4 object ({0})")]
    Format(#[from] FormatError),
    #[error("snapshot is not a SQLite database (its first bytes are not \"SQLite format 3\")")]
    NotSqlite,
    #[error("wal index {index:08x}: {message}")]
    Wal { index: u32, message: String },
    #[error("writing the restored database: {0}")]
    Io(#[from] std::io::Error),
}

/// How much of the snapshot may be written before the kernel is asked to start writing it back.
const WRITEBACK_CHUNK: u64 = 16 << 20;

/// Starts write-back of `len` bytes from `offset` (0 for the rest of the file) without waiting
/// for it (`sync_file_range` with `SYNC_FILE_RANGE_WRITE` only); durability still comes from
/// the fsync at the end.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: a plain system call on a descriptor `file` keeps open; no memory is shared.
    // Its result is only advice to the kernel: a failure leaves the work to the final fsync.
    unsafe {
        nix::libc::sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            nix::libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Decoded blocks that may wait for the writer thread.
const BLOCKS_IN_FLIGHT: usize = 3;

/// Decodes an LZ4 snapshot from `input` into `file` (empty, just created) and returns the
/// database's page size, or `None` for an empty database.
///
/// Decoding and writing run on two threads: copying a gigabyte into the page cache costs the
/// kernel about as much as decoding it, and on a fresh virtual machine, whose memory the host
/// has not backed yet, several times more. Buffers travel back to the decoder to be reused.
pub fn write_snapshot(input: impl Read, file: &File) -> Result<Option<u32>, ApplyError> {
    let mut decoder = format::lz4_decoder(input);
    let (blocks, to_write) = mpsc::sync_channel::<(Vec<u8>, usize)>(BLOCKS_IN_FLIGHT);
    let (give_back, returned) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> std::io::Result<()> {
            let (mut written, mut flushed) = (0u64, 0u64);
            for (block, len) in to_write {
                file.write_all_at(&block[..len], written)?;
                written += len as u64;
                if written - flushed >= WRITEBACK_CHUNK {
                    start_writeback(file, flushed, written - flushed);
                    flushed = written;
                }
                // The decoder may have finished and gone; then the buffer is simply freed.
                let _ = give_back.send(block);
            }
            Ok(())
        });
        let mut page_size = None;
        let mut decoded = || -> Result<(), ApplyError> {
            loop {
                let spare = returned.try_recv().unwrap_or_default();
                let Some((block, len)) = decoder.next_block_owned(spare)? else {
                    return Ok(());
                };
                if page_size.is_none() {
                    page_size = Some(db_page_size(&block[..len])?);
                }
                if blocks.send((block, len)).is_err() {
                    // The writer stopped on an error, which it returns below.
                    return Ok(());
                }
            }
        };
        let decoded = decoded();
        drop(blocks);
        writer.join().expect("snapshot writer panicked")?;
        decoded.map(|()| page_size)
    })
}

/// The page size from a database header (bytes 16-17, big-endian, 1 meaning 65536).
fn db_page_size(first: &[u8]) -> Result<u32, ApplyError> {
    if first.len() < 100 || &first[..16] != b"SQLite format 3\0" {
        return Err(ApplyError::NotSqlite);
    }
    Ok(match u16::from_be_bytes([first[16], first[17]]) {
        1 => 65536,
        n => u32::from(n),
    })
}

/// Applies the WAL indexes of a restore, in order, to the database file, as SQLite's
/// recovery followed by a checkpoint would: per index, frames are taken while their salts
/// match the header and their checksums continue the chain, only up to the last commit
/// frame, and the file ends up the size that commit recorded. Bytes arrive in pieces of any
/// size (segments), so an open transaction and a partial frame are carried over.
pub struct WalApplier<'f> {
    file: &'f File,
    /// The snapshot's page size; every index must use it (SQLite refuses a WAL whose page size
    /// differs from the database's). `None` for an empty snapshot: the first header decides.
    page_size: Option<u32>,
    current: Option<IndexState>,
}

struct IndexState {
    index: u32,
    header: Option<WalHeader>,
    /// Bytes of the header or of a frame cut by the end of a piece.
    partial: Vec<u8>,
    /// Checksum after the last valid frame.
    running: (u32, u32),
    /// Valid frames of the transaction still open at the end of the last piece.
    open: Vec<u8>,
    /// Database size in pages recorded by the last commit applied.
    db_size: Option<u32>,
    /// An invalid frame ended the log: SQLite ignores everything after it.
    ended: bool,
}

impl<'f> WalApplier<'f> {
    pub fn new(file: &'f File, page_size: Option<u32>) -> WalApplier<'f> {
        WalApplier {
            file,
            page_size,
            current: None,
        }
    }

    /// Finishes the index being applied, if any, and starts `index`.
    pub fn start_index(&mut self, index: u32) -> Result<(), ApplyError> {
        self.finish_index()?;
        self.current = Some(IndexState {
            index,
            header: None,
            partial: Vec::new(),
            running: (0, 0),
            open: Vec::new(),
            db_size: None,
            ended: false,
        });
        Ok(())
    }

    /// Applies the next bytes of the current index.
    ///
    /// # Panics
    ///
    /// If no index was started.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), ApplyError> {
        let file = self.file;
        let st = self.current.as_mut().expect("start_index before feed");
        if st.ended {
            return Ok(());
        }
        let index = st.index;
        let wal_err = |message: String| ApplyError::Wal { index, message };
        let header = match st.header {
            Some(h) => h,
            None => {
                let need = WAL_HEADER_SIZE - st.partial.len();
                let take = need.min(data.len());
                st.partial.extend_from_slice(&data[..take]);
                data = &data[take..];
                if st.partial.len() < WAL_HEADER_SIZE {
                    return Ok(());
                }
                let h = WalHeader::parse(&st.partial)
                    .map_err(|e| wal_err(format!("invalid wal header: {e}")))?;
                match self.page_size {
                    Some(p) if p != h.page_size => {
                        return Err(wal_err(format!(
                            "page size {} differs from the snapshot's {p}",
                            h.page_size
                        )));
                    }
                    _ => self.page_size = Some(h.page_size),
                }
                st.partial.clear();
                st.running = h.checksum();
                st.header = Some(h);
                h
            }
        };
        let frame_len = FRAME_HEADER_SIZE + header.page_size as usize;
        if !st.partial.is_empty() {
            let take = (frame_len - st.partial.len()).min(data.len());
            st.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if st.partial.len() < frame_len {
                return Ok(());
            }
            let frame = std::mem::take(&mut st.partial);
            st.take_frames(file, &header, &frame)?;
            if st.ended {
                return Ok(());
            }
        }
        let whole = data.len() / frame_len * frame_len;
        st.take_frames(file, &header, &data[..whole])?;
        if !st.ended {
            st.partial.extend_from_slice(&data[whole..]);
        }
        Ok(())
    }

    /// Finishes the last index. The file is left unsynced: the caller fsyncs once at the end.
    pub fn finish(mut self) -> Result<(), ApplyError> {
        self.finish_index()
    }

    /// Cuts the file to the size the index's last commit recorded, as SQLite's checkpoint
    /// does, and starts write-back of the pages written. An index without a commit changes
    /// nothing.
    fn finish_index(&mut self) -> Result<(), ApplyError> {
        let Some(st) = self.current.take() else {
            return Ok(());
        };
        if let (Some(pages), Some(header)) = (st.db_size, st.header) {
            self.file
                .set_len(u64::from(pages) * u64::from(header.page_size))?;
            start_writeback(self.file, 0, 0);
        }
        Ok(())
    }
}

impl IndexState {
    /// Validates whole frames that follow the last valid one and writes every transaction
    /// that commits; frames of a transaction still open are kept for the next piece.
    fn take_frames(
        &mut self,
        file: &File,
        header: &WalHeader,
        frames: &[u8],
    ) -> Result<(), ApplyError> {
        let frame_len = FRAME_HEADER_SIZE + header.page_size as usize;
        let scan = wal::scan_frames(header, self.running, frames);
        let valid = scan.committed_len + scan.uncommitted_frames * frame_len;
        if valid < frames.len() {
            self.ended = true;
        }
        if scan.committed_len > 0 {
            let open = std::mem::take(&mut self.open);
            write_pages(file, header.page_size, &open)?;
            write_pages(file, header.page_size, &frames[..scan.committed_len])?;
            self.db_size = scan.last_commit_db_size;
        }
        self.open
            .extend_from_slice(&frames[scan.committed_len..valid]);
        self.running = if valid == 0 {
            self.running
        } else {
            let last = wal::FrameHeader::parse(&frames[valid - frame_len..]);
            (last.checksum1, last.checksum2)
        };
        Ok(())
    }
}

/// Most pages one `pwritev` takes (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Writes each frame's page where it belongs in the database file, in WAL order, so that the
/// latest version of a page is the one left. Pages with consecutive numbers go in one
/// `pwritev`: a transaction that appends rows writes runs of new pages, and a system call per
/// 4 KiB page was most of the time spent applying the WAL.
fn write_pages(file: &File, page_size: u32, frames: &[u8]) -> Result<(), ApplyError> {
    let frame_len = FRAME_HEADER_SIZE + page_size as usize;
    let mut run: Vec<IoSlice<'_>> = Vec::new();
    let mut first = 0u32;
    for frame in frames.chunks_exact(frame_len) {
        let pgno = wal::FrameHeader::parse(frame).pgno;
        let follows = pgno.checked_sub(first) == Some(run.len() as u32);
        if !run.is_empty() && (!follows || run.len() == MAX_IOVECS) {
            write_run(file, page_size, first, &run)?;
            run.clear();
        }
        if run.is_empty() {
            first = pgno;
        }
        run.push(IoSlice::new(&frame[FRAME_HEADER_SIZE..]));
    }
    if !run.is_empty() {
        write_run(file, page_size, first, &run)?;
    }
    Ok(())
}

/// Writes pages `first`, `first + 1`, … from `pages`, finishing a short write page by page.
fn write_run(
    file: &File,
    page_size: u32,
    first: u32,
    pages: &[IoSlice<'_>],
) -> Result<(), ApplyError> {
    let page = page_size as usize;
    let at = u64::from(first - 1) * u64::from(page_size);
    let mut done = nix::sys::uio::pwritev(file, pages, at as i64).map_err(std::io::Error::from)?;
    for (i, slice) in pages.iter().enumerate() {
        let end = (i + 1) * page;
        if end > done {
            let from = done - i * page;
            file.write_all_at(&slice[from..], at + done as u64)?;
            done = end;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;
    use std::path::Path;

    /// A database at the start of its WAL (the snapshot) and the WAL written after it, taken
    /// while the writer's connection was still open (closing it would checkpoint).
    struct Fixture {
        _dir: tempfile::TempDir,
        snapshot: Vec<u8>,
        wal: Vec<u8>,
        page_size: u32,
    }

    fn fixture(page_size: u32) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA page_size={page_size}; PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
             CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400)
             INSERT INTO t (v) SELECT randomblob(300) FROM n;
             PRAGMA wal_checkpoint(TRUNCATE);"
        ))
        .unwrap();
        let snapshot = std::fs::read(&path).unwrap();
        // Small and large transactions, then a VACUUM whose commit shrinks the database, so
        // that the file must end up cut to the last commit's size.
        for i in 0..20 {
            conn.execute("INSERT INTO t (v) VALUES (randomblob(?1))", [i * 50])
                .unwrap();
        }
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200)
             INSERT INTO t (v) SELECT randomblob(2000) FROM n;
             DELETE FROM t WHERE id % 3 = 0;
             UPDATE t SET v = zeroblob(10) WHERE id % 5 = 0;
             VACUUM;
             INSERT INTO t (v) VALUES (x'01');",
        )
        .unwrap();
        let wal = std::fs::read(dir.path().join("src.db-wal")).unwrap();
        drop(conn);
        Fixture {
            _dir: dir,
            snapshot,
            wal,
            page_size,
        }
    }

    /// What SQLite itself makes of `snapshot` plus `wal`: recovery, then a checkpoint.
    fn sqlite_result(dir: &Path, snapshot: &[u8], wal: &[u8]) -> Vec<u8> {
        let path = dir.join("expected.db");
        std::fs::write(&path, snapshot).unwrap();
        std::fs::write(dir.join("expected.db-wal"), wal).unwrap();
        let conn = Connection::open(&path).unwrap();
        let busy: i64 = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 0);
        drop(conn);
        std::fs::read(&path).unwrap()
    }

    /// Applies `wal` over `snapshot` with [`WalApplier`], fed in pieces of `piece` bytes.
    fn applied(dir: &Path, snapshot: &[u8], wal: &[u8], piece: usize) -> Vec<u8> {
        let path = dir.join(format!("applied-{piece}.db"));
        std::fs::write(&path, snapshot).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut applier = WalApplier::new(&file, Some(db_page_size(snapshot).unwrap()));
        applier.start_index(0).unwrap();
        for chunk in wal.chunks(piece) {
            applier.feed(chunk).unwrap();
        }
        applier.finish().unwrap();
        std::fs::read(&path).unwrap()
    }

    fn assert_same_as_sqlite(what: &str, snapshot: &[u8], wal: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let expected = sqlite_result(dir.path(), snapshot, wal);
        for piece in [1, 7, 4096 + 24, 1 << 20] {
            let got = applied(dir.path(), snapshot, wal, piece);
            assert!(
                got == expected,
                "{what}, pieces of {piece}: {} bytes, SQLite made {}",
                got.len(),
                expected.len()
            );
        }
    }

    #[test]
    fn applies_a_wal_exactly_as_sqlite_checkpoints_it() {
        for page_size in [1024, 4096, 65536] {
            let f = fixture(page_size);
            assert!(f.wal.len() > 20 * (FRAME_HEADER_SIZE + page_size as usize));
            let snapshot_pages = f.snapshot.len() / page_size as usize;
            let applied_size = {
                let dir = tempfile::tempdir().unwrap();
                sqlite_result(dir.path(), &f.snapshot, &f.wal).len()
            };
            assert_ne!(applied_size / page_size as usize, snapshot_pages);
            assert_same_as_sqlite(&format!("page size {page_size}"), &f.snapshot, &f.wal);
        }
    }

    #[test]
    fn an_open_transaction_or_a_damaged_frame_ends_the_log_where_sqlite_ends_it() {
        let f = fixture(4096);
        let frame = FRAME_HEADER_SIZE + f.page_size as usize;
        let frames = (f.wal.len() - WAL_HEADER_SIZE) / frame;
        // Cut inside the VACUUM's transaction (it has many frames), then mid-frame.
        let cut = WAL_HEADER_SIZE + (frames - 3) * frame;
        assert_same_as_sqlite("cut between frames", &f.snapshot, &f.wal[..cut]);
        assert_same_as_sqlite("cut inside a frame", &f.snapshot, &f.wal[..cut + 100]);
        // A damaged page halfway: SQLite ignores that frame and everything after it.
        let mut damaged = f.wal.clone();
        damaged[WAL_HEADER_SIZE + frames / 2 * frame + FRAME_HEADER_SIZE + 10] ^= 0xFF;
        assert_same_as_sqlite("damaged frame", &f.snapshot, &damaged);
        // Only a header: nothing changes.
        assert_same_as_sqlite("header only", &f.snapshot, &f.wal[..WAL_HEADER_SIZE]);
    }

    #[test]
    fn a_wal_sqlite_would_refuse_is_an_error() {
        let f = fixture(4096);
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("db")).unwrap();
        let mut applier = WalApplier::new(&file, Some(1024));
        applier.start_index(3).unwrap();
        let err = applier.feed(&f.wal).unwrap_err().to_string();
        assert_eq!(
            err,
            "wal index 00000003: page size 4096 differs from the snapshot's 1024"
        );
        let mut bad = f.wal.clone();
        bad[0] ^= 1;
        let mut applier = WalApplier::new(&file, Some(4096));
        applier.start_index(4).unwrap();
        let err = applier.feed(&bad).unwrap_err().to_string();
        assert!(
            err.starts_with("wal index 00000004: invalid wal header"),
            "{err}"
        );
    }

    #[test]
    fn a_snapshot_is_written_whole_with_its_page_size() {
        let f = fixture(8192);
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("db")).unwrap();
        let compressed = format::compress(&f.snapshot);
        let page_size = write_snapshot(&compressed[..], &file).unwrap();
        assert_eq!(page_size, Some(8192));
        assert!(std::fs::read(dir.path().join("db")).unwrap() == f.snapshot);

        let other = std::fs::File::create(dir.path().join("other")).unwrap();
        let foreign = format::compress(&[7u8; 5000]);
        assert!(matches!(
            write_snapshot(&foreign[..], &other),
            Err(ApplyError::NotSqlite)
        ));
        let cut = &compressed[..compressed.len() - 9];
        assert!(matches!(
            write_snapshot(cut, &other),
            Err(ApplyError::Format(FormatError::Truncated))
        ));
    }
}
