//! SQLite's write-ahead-log format, read from byte slices.
//!
//! Replication copies WAL bytes verbatim, so the only thing Walden must understand about them is
//! where the committed data ends: a frame belongs to the log only if its salts match the header
//! and its checksum continues the chain, and only whole transactions (up to a commit frame) may be
//! shipped. [`WalHeader::parse`] and [`scan_frames`] apply exactly the rules SQLite uses when it
//! recovers a WAL, so what Walden ships is what SQLite itself would replay.
//!
//! Invariant: this module does no I/O; callers read the bytes and decide what to do with them.

/// Size of the header at the start of every WAL file.
pub const WAL_HEADER_SIZE: usize = 32;

/// Size of the header in front of every page in the WAL.
pub const FRAME_HEADER_SIZE: usize = 24;

/// Magic number of a WAL whose checksums read words little-endian.
const MAGIC_LITTLE_ENDIAN: u32 = 0x377f_0682;

/// Magic number of a WAL whose checksums read words big-endian.
const MAGIC_BIG_ENDIAN: u32 = 0x377f_0683;

/// The only WAL format version SQLite has ever written.
const FORMAT_VERSION: u32 = 3_007_000;

const MIN_PAGE_SIZE: u32 = 512;
const MAX_PAGE_SIZE: u32 = 65_536;

/// Why a WAL header was rejected; SQLite would ignore such a WAL entirely.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal header is {0} bytes long, need {WAL_HEADER_SIZE}")]
    ShortHeader(usize),
    #[error("bad wal magic {0:#010x}: not a sqlite wal file")]
    BadMagic(u32),
    #[error("unsupported wal format version {0}, expected {FORMAT_VERSION}")]
    BadVersion(u32),
    #[error("invalid wal page size {0}: must be a power of two from 512 to 65536")]
    BadPageSize(u32),
    #[error(
        "wal header checksum mismatch: stored {stored:08x?}, computed {computed:08x?}; the wal is \
         being rewritten or is corrupt"
    )]
    HeaderChecksum {
        stored: (u32, u32),
        computed: (u32, u32),
    },
}

/// The 32-byte header that starts a WAL; its salts identify one incarnation of the WAL, so a
/// change of header is how Walden notices that SQLite restarted the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    pub magic: u32,
    pub version: u32,
    pub page_size: u32,
    pub checkpoint_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub checksum1: u32,
    pub checksum2: u32,
}

impl WalHeader {
    /// Parses and verifies a WAL header the way SQLite's recovery does, so that a header SQLite
    /// would ignore is never treated as the start of a log.
    ///
    /// The page size is stored as is, 65536 included (unlike the database header, which stores
    /// 65536 as 1); a stored 1 is rejected, as SQLite does.
    pub fn parse(bytes: &[u8]) -> Result<WalHeader, WalError> {
        let bytes = bytes
            .get(..WAL_HEADER_SIZE)
            .ok_or(WalError::ShortHeader(bytes.len()))?;
        let header = WalHeader {
            magic: be32(bytes, 0),
            version: be32(bytes, 4),
            page_size: be32(bytes, 8),
            checkpoint_seq: be32(bytes, 12),
            salt1: be32(bytes, 16),
            salt2: be32(bytes, 20),
            checksum1: be32(bytes, 24),
            checksum2: be32(bytes, 28),
        };
        if header.magic != MAGIC_LITTLE_ENDIAN && header.magic != MAGIC_BIG_ENDIAN {
            return Err(WalError::BadMagic(header.magic));
        }
        if header.version != FORMAT_VERSION {
            return Err(WalError::BadVersion(header.version));
        }
        if !header.page_size.is_power_of_two()
            || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&header.page_size)
        {
            return Err(WalError::BadPageSize(header.page_size));
        }
        let computed = checksum(header.big_endian_checksums(), (0, 0), &bytes[..24]);
        if computed != header.checksum() {
            return Err(WalError::HeaderChecksum {
                stored: header.checksum(),
                computed,
            });
        }
        Ok(header)
    }

    /// Whether checksums read the data as big-endian words; the magic number records the byte
    /// order of the machine that created the WAL, and every frame must be checked the same way.
    pub fn big_endian_checksums(&self) -> bool {
        self.magic == MAGIC_BIG_ENDIAN
    }

    /// The stored header checksum, which is where the first frame's checksum chain starts.
    pub fn checksum(&self) -> (u32, u32) {
        (self.checksum1, self.checksum2)
    }
}

/// SQLite's WAL checksum, continuing from `init`, so that a chain can be verified frame by frame
/// without holding the whole log.
///
/// # Panics
///
/// If `data.len()` is not a multiple of 8: SQLite only ever checksums whole 8-byte words, and
/// silently ignoring a tail would hide a caller bug.
pub fn checksum(big_endian: bool, init: (u32, u32), data: &[u8]) -> (u32, u32) {
    assert!(
        data.len().is_multiple_of(8),
        "wal checksum input must be a multiple of 8 bytes, got {}",
        data.len()
    );
    let word = |bytes: &[u8]| {
        let bytes: [u8; 4] = bytes.try_into().expect("chunks are 4 bytes");
        if big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        }
    };
    let (mut s0, mut s1) = init;
    for chunk in data.chunks_exact(8) {
        s0 = s0.wrapping_add(word(&chunk[..4])).wrapping_add(s1);
        s1 = s1.wrapping_add(word(&chunk[4..])).wrapping_add(s0);
    }
    (s0, s1)
}

/// The 24-byte header in front of each page of the WAL; `commit` is non-zero only on the last
/// frame of a transaction, which is what makes whole transactions recognisable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub pgno: u32,
    pub commit: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub checksum1: u32,
    pub checksum2: u32,
}

impl FrameHeader {
    /// Reads the fields without judging them: whether a frame is valid depends on the frames
    /// before it, which is [`scan_frames`]'s business.
    ///
    /// # Panics
    ///
    /// If `bytes` is shorter than [`FRAME_HEADER_SIZE`].
    pub fn parse(bytes: &[u8]) -> FrameHeader {
        assert!(
            bytes.len() >= FRAME_HEADER_SIZE,
            "frame header needs {FRAME_HEADER_SIZE} bytes, got {}",
            bytes.len()
        );
        FrameHeader {
            pgno: be32(bytes, 0),
            commit: be32(bytes, 4),
            salt1: be32(bytes, 8),
            salt2: be32(bytes, 12),
            checksum1: be32(bytes, 16),
            checksum2: be32(bytes, 20),
        }
    }
}

/// Size of one frame in the WAL, header included.
pub fn frame_size(page_size: u32) -> u64 {
    FRAME_HEADER_SIZE as u64 + u64::from(page_size)
}

/// Litestream's frame-aligned size (spec §0): the largest prefix of a `size`-byte WAL that holds
/// the header and only whole frames, so a WAL being appended to is never read mid-frame.
pub fn align(size: u64, page_size: u32) -> u64 {
    let header = WAL_HEADER_SIZE as u64;
    if size < header {
        return 0;
    }
    let frame = frame_size(page_size);
    header + (size - header) / frame * frame
}

/// Result of validating frames that follow a known position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Bytes (from the start of `frames`) up to and including the last valid commit frame: only
    /// whole transactions.
    pub committed_len: usize,
    /// Running checksum after the last valid commit frame (what the next frame must continue
    /// from).
    pub checksum: (u32, u32),
    /// Frames validated past the last commit (an open transaction); informational.
    pub uncommitted_frames: usize,
    /// DB size in pages from the last commit frame, if any commit frame was found.
    pub last_commit_db_size: Option<u32>,
}

/// Validates `frames` (a run of whole-or-partial frames starting at a frame boundary) against
/// `header`'s salts and the checksum chain continuing from `init` (the header checksum for the
/// first frame of a WAL, else the previous frame's stored checksum), stopping at the first partial
/// frame, salt mismatch or checksum mismatch — exactly SQLite's recovery rules.
///
/// Bytes after the stopping point are not part of the log even if later frames look valid:
/// SQLite overwrites a restarted WAL from the start and leaves stale frames of the previous
/// incarnation behind, and only the salts and the checksum chain tell them apart.
pub fn scan_frames(header: &WalHeader, init: (u32, u32), frames: &[u8]) -> Scan {
    let big_endian = header.big_endian_checksums();
    let frame_len = FRAME_HEADER_SIZE + header.page_size as usize;
    let mut scan = Scan {
        committed_len: 0,
        checksum: init,
        uncommitted_frames: 0,
        last_commit_db_size: None,
    };
    let mut running = init;
    for (i, frame) in frames.chunks_exact(frame_len).enumerate() {
        let frame_header = FrameHeader::parse(frame);
        // SQLite never writes page 0, so a zero page number marks a frame that was never written.
        if frame_header.pgno == 0
            || frame_header.salt1 != header.salt1
            || frame_header.salt2 != header.salt2
        {
            break;
        }
        let sum = checksum(big_endian, running, &frame[..8]);
        let sum = checksum(big_endian, sum, &frame[FRAME_HEADER_SIZE..]);
        if sum != (frame_header.checksum1, frame_header.checksum2) {
            break;
        }
        running = sum;
        scan.uncommitted_frames += 1;
        if frame_header.commit != 0 {
            scan.committed_len = (i + 1) * frame_len;
            scan.checksum = sum;
            scan.uncommitted_frames = 0;
            scan.last_commit_db_size = Some(frame_header.commit);
        }
    }
    scan
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("slice is 4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds WAL bytes by hand so that every rule can be exercised, including big-endian
    /// checksums that no little-endian machine's SQLite would write.
    struct WalBuilder {
        big_endian: bool,
        page_size: u32,
        salts: (u32, u32),
        bytes: Vec<u8>,
        running: (u32, u32),
    }

    impl WalBuilder {
        fn new(big_endian: bool, page_size: u32, salts: (u32, u32)) -> WalBuilder {
            let magic = if big_endian {
                MAGIC_BIG_ENDIAN
            } else {
                MAGIC_LITTLE_ENDIAN
            };
            let mut bytes = Vec::new();
            for word in [magic, FORMAT_VERSION, page_size, 7, salts.0, salts.1] {
                bytes.extend_from_slice(&word.to_be_bytes());
            }
            let running = checksum(big_endian, (0, 0), &bytes);
            bytes.extend_from_slice(&running.0.to_be_bytes());
            bytes.extend_from_slice(&running.1.to_be_bytes());
            WalBuilder {
                big_endian,
                page_size,
                salts,
                bytes,
                running,
            }
        }

        /// Appends a frame whose page is filled with `fill`, with a correct checksum chain.
        fn frame(mut self, pgno: u32, commit: u32, fill: u8) -> WalBuilder {
            let mut frame = Vec::new();
            for word in [pgno, commit, self.salts.0, self.salts.1] {
                frame.extend_from_slice(&word.to_be_bytes());
            }
            let page = vec![fill; self.page_size as usize];
            let sum = checksum(self.big_endian, self.running, &frame[..8]);
            let sum = checksum(self.big_endian, sum, &page);
            frame.extend_from_slice(&sum.0.to_be_bytes());
            frame.extend_from_slice(&sum.1.to_be_bytes());
            frame.extend_from_slice(&page);
            self.bytes.extend_from_slice(&frame);
            self.running = sum;
            self
        }

        fn build(self) -> Vec<u8> {
            self.bytes
        }
    }

    fn frame_len(page_size: u32) -> usize {
        frame_size(page_size) as usize
    }

    fn scan_whole(wal: &[u8]) -> Scan {
        let header = WalHeader::parse(wal).unwrap();
        scan_frames(&header, header.checksum(), &wal[WAL_HEADER_SIZE..])
    }

    #[test]
    fn big_endian_header_test_vector() {
        let wal = WalBuilder::new(true, 4096, (0x0102_0304, 0x0506_0708)).build();
        assert_eq!(
            wal,
            [
                0x37, 0x7f, 0x06, 0x83, 0x00, 0x2d, 0xe2, 0x18, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00,
                0x00, 0x07, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x17, 0x06, 0xe9, 0xe2,
                0xc2, 0xe5, 0xd8, 0xaa,
            ]
        );
        let header = WalHeader::parse(&wal).unwrap();
        assert!(header.big_endian_checksums());
        assert_eq!(header.checksum(), (0x1706_e9e2, 0xc2e5_d8aa));
    }

    #[test]
    fn little_endian_header_test_vector() {
        let wal = WalBuilder::new(false, 4096, (0x0102_0304, 0x0506_0708)).build();
        let header = WalHeader::parse(&wal).unwrap();
        assert!(!header.big_endian_checksums());
        assert_eq!(header.checksum(), (0xdfea_0514, 0xa6d8_e2be));
    }

    #[test]
    fn checksum_byte_order_is_a_word_swap() {
        let data: Vec<u8> = (0..64u8).map(|b| b.wrapping_mul(37)).collect();
        let swapped: Vec<u8> = data
            .chunks_exact(4)
            .flat_map(|w| [w[3], w[2], w[1], w[0]])
            .collect();
        assert_eq!(
            checksum(true, (5, 9), &data),
            checksum(false, (5, 9), &swapped)
        );
    }

    #[test]
    fn checksum_continues_from_init() {
        let data = [7u8; 48];
        let first = checksum(false, (0, 0), &data[..16]);
        assert_eq!(
            checksum(false, first, &data[16..]),
            checksum(false, (0, 0), &data)
        );
    }

    #[test]
    fn header_rejections() {
        let good = WalBuilder::new(false, 4096, (1, 2)).build();
        let with_word = |at: usize, value: u32| {
            let mut bytes = good.clone();
            bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
            bytes
        };
        assert!(matches!(
            WalHeader::parse(&good[..31]),
            Err(WalError::ShortHeader(31))
        ));
        assert!(matches!(
            WalHeader::parse(&with_word(0, 0x377f_0681)),
            Err(WalError::BadMagic(0x377f_0681))
        ));
        assert!(matches!(
            WalHeader::parse(&with_word(4, 3_007_001)),
            Err(WalError::BadVersion(3_007_001))
        ));
        for page_size in [0, 1, 256, 513, 131_072] {
            assert!(
                matches!(
                    WalHeader::parse(&with_word(8, page_size)),
                    Err(WalError::BadPageSize(p)) if p == page_size
                ),
                "page size {page_size}"
            );
        }
        assert!(matches!(
            WalHeader::parse(&with_word(16, 99)),
            Err(WalError::HeaderChecksum { .. })
        ));
        assert!(matches!(
            WalHeader::parse(&with_word(28, 0)),
            Err(WalError::HeaderChecksum { .. })
        ));
    }

    #[test]
    fn every_valid_page_size_parses() {
        for shift in 9..=16 {
            let page_size = 1u32 << shift;
            let wal = WalBuilder::new(true, page_size, (3, 4)).build();
            assert_eq!(WalHeader::parse(&wal).unwrap().page_size, page_size);
        }
    }

    #[test]
    fn frame_header_fields() {
        let wal = WalBuilder::new(false, 512, (0xaabb_ccdd, 0x1122_3344))
            .frame(3, 9, 0)
            .build();
        let frame = FrameHeader::parse(&wal[WAL_HEADER_SIZE..]);
        assert_eq!(
            (frame.pgno, frame.commit, frame.salt1, frame.salt2),
            (3, 9, 0xaabb_ccdd, 0x1122_3344)
        );
    }

    #[test]
    fn align_matches_the_spec() {
        let frame = frame_size(4096);
        assert_eq!(frame, 4120);
        for (size, aligned) in [
            (0, 0),
            (31, 0),
            (32, 32),
            (33, 32),
            (32 + frame - 1, 32),
            (32 + frame, 32 + frame),
            (32 + 3 * frame + 17, 32 + 3 * frame),
        ] {
            assert_eq!(align(size, 4096), aligned, "size {size}");
        }
    }

    #[test]
    fn scan_stops_at_each_kind_of_invalid_frame() {
        let page_size = 512;
        let f = frame_len(page_size);
        // Two transactions: frames 1-2 (commit on 2), then frame 3 alone (commit).
        let wal = WalBuilder::new(true, page_size, (10, 20))
            .frame(1, 0, 0xa1)
            .frame(2, 2, 0xa2)
            .frame(2, 2, 0xa3)
            .build();
        let all = 3 * f;
        let corrupt = |at: usize| {
            let mut bytes = wal.clone();
            bytes[WAL_HEADER_SIZE + at] ^= 0x01;
            bytes
        };
        let cases: Vec<(&str, Vec<u8>, usize, usize)> = vec![
            ("intact", wal.clone(), all, 0),
            (
                "partial last frame",
                wal[..wal.len() - 1].to_vec(),
                f * 2,
                0,
            ),
            (
                "only a frame header",
                wal[..32 + 2 * f + 24].to_vec(),
                f * 2,
                0,
            ),
            ("first frame cut", wal[..32 + f - 1].to_vec(), 0, 0),
            ("page byte of frame 3", corrupt(2 * f + 100), 2 * f, 0),
            ("checksum of frame 3", corrupt(2 * f + 23), 2 * f, 0),
            ("salt1 of frame 3", corrupt(2 * f + 11), 2 * f, 0),
            ("salt2 of frame 2", corrupt(f + 15), 0, 1),
            ("page byte of frame 1", corrupt(100), 0, 0),
            ("commit field of frame 2", corrupt(f + 7), 0, 1),
        ];
        for (name, bytes, committed_len, uncommitted) in cases {
            let scan = scan_whole(&bytes);
            assert_eq!(scan.committed_len, committed_len, "{name}");
            assert_eq!(scan.uncommitted_frames, uncommitted, "{name}");
        }
    }

    #[test]
    fn scan_rejects_page_number_zero() {
        let wal = WalBuilder::new(false, 512, (1, 1))
            .frame(1, 1, 0)
            .frame(0, 1, 0)
            .build();
        assert_eq!(scan_whole(&wal).committed_len, frame_len(512));
    }

    #[test]
    fn scan_reports_open_transaction_and_commit_state() {
        let page_size = 1024;
        let f = frame_len(page_size);
        let builder = WalBuilder::new(false, page_size, (5, 6))
            .frame(1, 0, 1)
            .frame(2, 4, 2);
        let after_commit = builder.running;
        let wal = builder.frame(3, 0, 3).frame(4, 0, 4).build();
        let scan = scan_whole(&wal);
        assert_eq!(
            scan,
            Scan {
                committed_len: 2 * f,
                checksum: after_commit,
                uncommitted_frames: 2,
                last_commit_db_size: Some(4),
            }
        );
    }

    #[test]
    fn scan_without_commit_keeps_init() {
        let wal = WalBuilder::new(false, 512, (5, 6)).frame(1, 0, 1).build();
        let header = WalHeader::parse(&wal).unwrap();
        let scan = scan_frames(&header, header.checksum(), &wal[WAL_HEADER_SIZE..]);
        assert_eq!(
            scan,
            Scan {
                committed_len: 0,
                checksum: header.checksum(),
                uncommitted_frames: 1,
                last_commit_db_size: None,
            }
        );
    }

    #[test]
    fn scan_continues_from_a_known_position() {
        let f = frame_len(512);
        let wal = WalBuilder::new(true, 512, (8, 9))
            .frame(1, 1, 1)
            .frame(2, 2, 2)
            .frame(3, 3, 3)
            .build();
        let header = WalHeader::parse(&wal).unwrap();
        let first = scan_frames(&header, header.checksum(), &wal[32..32 + f]);
        assert_eq!(first.committed_len, f);
        let stored = FrameHeader::parse(&wal[32..]);
        assert_eq!(first.checksum, (stored.checksum1, stored.checksum2));
        let rest = scan_frames(&header, first.checksum, &wal[32 + f..]);
        assert_eq!(rest.committed_len, 2 * f);
        assert_eq!(rest.last_commit_db_size, Some(3));
        // A wrong starting point breaks the chain at once.
        assert_eq!(
            scan_frames(&header, header.checksum(), &wal[32 + f..]).committed_len,
            0
        );
    }

    /// A database in WAL mode whose log is never checkpointed behind the test's back.
    struct RealWal {
        _dir: tempfile::TempDir,
        wal_path: std::path::PathBuf,
        conn: rusqlite::Connection,
    }

    impl RealWal {
        fn open(page_size: u32) -> RealWal {
            let dir = tempfile::tempdir().unwrap();
            let db_path = dir.path().join("test.db");
            let conn = rusqlite::Connection::open(&db_path).unwrap();
            conn.execute_batch(&format!(
                "PRAGMA page_size = {page_size};
                 PRAGMA journal_mode = wal;
                 PRAGMA wal_autocheckpoint = 0;
                 CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB);"
            ))
            .unwrap();
            RealWal {
                wal_path: dir.path().join("test.db-wal"),
                _dir: dir,
                conn,
            }
        }

        fn insert(&self, len: usize) {
            self.conn
                .execute("INSERT INTO t (v) VALUES (randomblob(?1))", [len as i64])
                .unwrap();
        }

        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.wal_path).unwrap()
        }

        /// Frames in the log according to SQLite itself (a passive checkpoint reports them).
        fn sqlite_frame_count(&self) -> usize {
            self.conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                    row.get::<_, i64>(1)
                })
                .map(|n| usize::try_from(n).unwrap())
                .unwrap()
        }
    }

    #[test]
    fn real_wal_commit_boundaries() {
        for page_size in [4096, 65_536] {
            let f = frame_len(page_size);
            let wal = RealWal::open(page_size);
            // WAL file size after each commit: the ground truth for where transactions end.
            // The schema was created in one transaction when the database was opened.
            let mut commit_ends = vec![WAL_HEADER_SIZE, wal.bytes().len()];
            for len in [10, 3 * page_size as usize, 100, 2 * page_size as usize + 7] {
                wal.insert(len);
                commit_ends.push(wal.bytes().len());
            }
            let bytes = wal.bytes();
            let header = WalHeader::parse(&bytes).unwrap();
            assert_eq!(header.page_size, page_size);
            // SQLite's native magic records the byte order of the machine that wrote the WAL.
            let native = if cfg!(target_endian = "big") {
                MAGIC_BIG_ENDIAN
            } else {
                MAGIC_LITTLE_ENDIAN
            };
            assert_eq!(header.magic, native);
            let full = scan_whole(&bytes);
            assert_eq!(full.committed_len + WAL_HEADER_SIZE, bytes.len());
            assert_eq!(full.uncommitted_frames, 0);
            let db_pages = wal
                .conn
                .query_row("PRAGMA page_count", [], |row| row.get::<_, u32>(0))
                .unwrap();
            assert_eq!(full.last_commit_db_size, Some(db_pages));

            // Cutting the file anywhere leaves exactly the transactions that fit.
            let mut cuts: Vec<usize> = commit_ends
                .iter()
                .flat_map(|&end| [end - 1, end, end + 1, end + f - 1])
                .filter(|&cut| cut >= WAL_HEADER_SIZE && cut <= bytes.len())
                .collect();
            cuts.push(bytes.len() - f);
            for cut in cuts {
                let expected = commit_ends.iter().copied().filter(|&e| e <= cut).max();
                let scan = scan_whole(&bytes[..cut]);
                assert_eq!(
                    scan.committed_len + WAL_HEADER_SIZE,
                    expected.unwrap(),
                    "page size {page_size}, cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn real_wal_restart_leaves_stale_frames_that_scan_ignores() {
        let wal = RealWal::open(4096);
        for _ in 0..20 {
            wal.insert(1000);
        }
        let before = WalHeader::parse(&wal.bytes()).unwrap();
        assert_eq!(
            scan_whole(&wal.bytes()).committed_len,
            wal.sqlite_frame_count() * frame_len(4096)
        );

        // The checkpoint above backfilled everything, so the next write restarts the log from
        // the top with new salts, leaving the old frames after the new ones.
        wal.insert(10);
        let bytes = wal.bytes();
        let after = WalHeader::parse(&bytes).unwrap();
        assert_ne!((before.salt1, before.salt2), (after.salt1, after.salt2));
        let frames = wal.sqlite_frame_count();
        let scan = scan_whole(&bytes);
        assert_eq!(scan.committed_len, frames * frame_len(4096));
        assert!(scan.committed_len + WAL_HEADER_SIZE < bytes.len());
    }
}
