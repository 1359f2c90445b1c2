//! Litestream v0.3.13's replica layout: object names, keys and LZ4 framing.
//!
//! Walden's replicas must be readable by `litestream restore` and Walden must read replicas that
//! Litestream wrote, so every name and every byte of framing here follows the v0.3.13 format
//! (spec §1 and §2) rather than anything more convenient.
//!
//! Snapshots are written as LZ4 frames with v0.3.13's exact header by `lz4_flex`. WAL segments
//! are frames with linked blocks, compressed by liblz4's level-2 compressor (through `lzzzz`)
//! when small: they are most of what a replica uploads, and this made them 2 % smaller than
//! v0.3.13's. Every frame is read by a small decoder of our own ([`lz4_decoder`]), which hands
//! each block to liblz4's bounds-checked decoder: a snapshot is mostly long runs that refer one
//! byte back, which `lz4_flex` copies a byte at a time (a 1 GiB restore spent 1.0 to 1.24 CPU-s
//! in user space instead of 1.25 to 1.44). `lz4_flex`'s `FrameDecoder` reports end of stream at
//! the zero-length stored block that v0.3.13 emits for snapshots that are a multiple of 4 MiB
//! (dropping everything after it unchecked), stops after the first of several concatenated
//! frames, and treats a stream cut off between blocks as complete. A replica that restores
//! silently short is worse than one that fails, so the reader here checks every frame to its
//! end.
//!
//! Invariant: this module does no I/O of its own; it only wraps `std::io::Read` and `Write`.

use std::hash::Hasher;
use std::io::{self, Read, Write};
use std::sync::Mutex;

use twox_hash::XxHash32;

/// Why an object could not be decoded; anything but `Io` means the object itself is unusable.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("object is empty; expected an lz4 frame")]
    Empty,
    #[error(
        "object is age-encrypted; age-encrypted replicas are not supported yet, restore it with \
         litestream v0.3"
    )]
    Encrypted,
    #[error("bad lz4 frame magic {0:#010x}: not a litestream object")]
    BadMagic(u32),
    #[error("unsupported lz4 frame version {0}")]
    UnsupportedVersion(u8),
    #[error("lz4 frame descriptor has reserved bits set")]
    ReservedBits,
    #[error("unsupported lz4 block size code {0}")]
    UnsupportedBlockSize(u8),
    #[error("lz4 frames with a dictionary are not supported")]
    DictionaryNotSupported,
    #[error("lz4 frame header checksum mismatch: the object is corrupt")]
    HeaderChecksum,
    #[error("lz4 block of {len} bytes exceeds the frame's {max}-byte block size")]
    BlockTooBig { len: usize, max: usize },
    #[error("lz4 block checksum mismatch: the object is corrupt")]
    BlockChecksum,
    #[error("lz4 block does not decode: the object is corrupt")]
    CorruptBlock,
    #[error("lz4 frame declares {expected} bytes of content but holds {actual}")]
    ContentSize { expected: u64, actual: u64 },
    #[error(
        "lz4 content checksum mismatch: stored {stored:#010x}, computed {computed:#010x}; the \
         object is corrupt"
    )]
    ContentChecksum { stored: u32, computed: u32 },
    #[error("lz4 stream is truncated: the object is incomplete")]
    Truncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<FormatError> for io::Error {
    fn from(err: FormatError) -> io::Error {
        match err {
            FormatError::Io(err) => err,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

impl FormatError {
    /// Recovers the `FormatError` that a reader had to smuggle through `io::Error`.
    fn from_io(err: io::Error) -> FormatError {
        if err.get_ref().is_some_and(|inner| inner.is::<FormatError>()) {
            let inner = err.into_inner().expect("checked above");
            *inner.downcast::<FormatError>().expect("checked above")
        } else {
            FormatError::Io(err)
        }
    }
}

/// A position in a generation: shadow WAL index and byte offset within it.
///
/// Ordered by index, then offset, which is also the order of their object names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub index: u32,
    pub offset: u64,
}

/// Highest shadow WAL index: v0.3.13 reads names with exactly 8 hex digits and treats indexes as
/// signed, so reaching this forces a new generation.
pub const MAX_INDEX: u32 = 0x7FFF_FFFF;

/// A fresh generation name; random so that two writers (or one writer before and after losing
/// its local state) never mix their histories in one directory.
pub fn new_generation() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Whether `name` is a generation directory name; anything else under `generations/` is ignored,
/// as v0.3.13 does.
pub fn is_generation(name: &str) -> bool {
    name.len() == 16 && is_lower_hex(name)
}

const SNAPSHOT_SUFFIX: &str = ".snapshot.lz4";
const WAL_SEGMENT_SUFFIX: &str = ".wal.lz4";

/// Object name of the snapshot taken at shadow WAL `index`.
pub fn snapshot_name(index: u32) -> String {
    format!("{index:08x}{SNAPSHOT_SUFFIX}")
}

/// The index of a snapshot object name; exactly v0.3.13's pattern, so that Walden sees the same
/// snapshots Litestream would.
pub fn parse_snapshot_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(SNAPSHOT_SUFFIX)?;
    parse_hex(digits, 8..=8).and_then(|index| u32::try_from(index).ok())
}

/// Object name of the WAL segment starting at `offset` in shadow WAL `index`.
///
/// The offset must stay below 4 GiB: v0.3.13 ignores names whose offset has more than 8 digits,
/// so writing one would make the segment invisible to Litestream's restore.
pub fn wal_segment_name(index: u32, offset: u64) -> String {
    debug_assert!(
        offset < 1 << 32,
        "wal segment offset {offset:#x} does not fit in 8 hex digits"
    );
    format!("{index:08x}_{offset:08x}{WAL_SEGMENT_SUFFIX}")
}

/// The position of a WAL segment object name.
///
/// Tolerant of offsets of 9 to 16 digits (as Litestream v0.5.8+ is), so that objects another
/// writer produced past 4 GiB are seen rather than silently skipped during a restore.
pub fn parse_wal_segment_name(name: &str) -> Option<Pos> {
    let (index, offset) = name.strip_suffix(WAL_SEGMENT_SUFFIX)?.split_once('_')?;
    Some(Pos {
        index: u32::try_from(parse_hex(index, 8..=8)?).ok()?,
        offset: parse_hex(offset, 8..=16)?,
    })
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn parse_hex(digits: &str, len: std::ops::RangeInclusive<usize>) -> Option<u64> {
    if !len.contains(&digits.len()) || !is_lower_hex(digits) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// Keys relative to a replica prefix, joined with POSIX path.Join semantics (spec §1.3): empty
/// parts are ignored, then the result is cleaned (`//` collapsed, `.` dropped, `..` resolved,
/// trailing `/` stripped). A leading `/` is kept, because Litestream keeps it for a config
/// `path: /db` and existing replicas have keys that start with it.
///
/// For example `join_key(&["", "generations", g]) == "generations/<g>"`.
pub fn join_key(parts: &[&str]) -> String {
    let joined = parts
        .iter()
        .filter(|part| !part.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/");
    if joined.is_empty() {
        return joined;
    }
    clean_path(&joined)
}

/// Go's `path.Clean` on a slash-separated path: `//` collapsed, `.` dropped, `..` resolved,
/// trailing `/` stripped, `"."` for an empty result. Litestream cleans keys and URL paths this
/// way, so Walden must too to land on the same keys.
pub fn clean_path(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut elements: Vec<&str> = Vec::new();
    for element in path.split('/') {
        match element {
            "" | "." => {}
            ".." => match elements.last() {
                Some(&last) if last != ".." => {
                    elements.pop();
                }
                _ if !rooted => elements.push(".."),
                _ => {}
            },
            _ => elements.push(element),
        }
    }
    let cleaned = elements.join("/");
    match (rooted, cleaned.is_empty()) {
        (true, _) => format!("/{cleaned}"),
        (false, true) => ".".to_owned(),
        (false, false) => cleaned,
    }
}

/// `<prefix>/generations`, the directory listed to find generations.
pub fn generations_dir(prefix: &str) -> String {
    join_key(&[prefix, "generations"])
}

/// `<prefix>/generations/<generation>`.
pub fn generation_dir(prefix: &str, generation: &str) -> String {
    join_key(&[prefix, "generations", generation])
}

/// `<prefix>/generations/<generation>/snapshots`.
pub fn snapshots_dir(prefix: &str, generation: &str) -> String {
    join_key(&[prefix, "generations", generation, "snapshots"])
}

/// `<prefix>/generations/<generation>/wal`; segments are stored flat in it, as in every released
/// v0.3.
pub fn wal_dir(prefix: &str, generation: &str) -> String {
    join_key(&[prefix, "generations", generation, "wal"])
}

/// Full key of the snapshot taken at shadow WAL `index`.
pub fn snapshot_key(prefix: &str, generation: &str, index: u32) -> String {
    join_key(&[&snapshots_dir(prefix, generation), &snapshot_name(index)])
}

/// Full key of the WAL segment starting at `pos`.
pub fn wal_segment_key(prefix: &str, generation: &str, pos: Pos) -> String {
    join_key(&[
        &wal_dir(prefix, generation),
        &wal_segment_name(pos.index, pos.offset),
    ])
}

/// The frame header v0.3.13 writes: magic, FLG 0x64 (version 1, independent blocks, content
/// checksum, no block checksums, no content size), BD 0x70 (blocks of up to 4 MiB) and the
/// header checksum.
const FRAME_HEADER: [u8; 7] = [0x04, 0x22, 0x4D, 0x18, 0x64, 0x70, 0xB9];

/// The same header with the block-independence flag clear (FLG 0x44): blocks may refer to the
/// 64 KiB of data before them. v0.3.13's reader (pierrec/lz4) accepts it, as spec §2.3 notes,
/// and the interop tests restore such frames with 0.3.13; Litestream 0.5.17's restore and
/// `lz4 -d` read them too.
const LINKED_FRAME_HEADER: [u8; 7] = [0x04, 0x22, 0x4D, 0x18, 0x44, 0x70, 0x1D];

/// The block size streams are encoded with when their length is unknown (snapshots). The header
/// still announces blocks of up to 4 MiB, exactly as v0.3.13's does (readers size their buffers
/// from it and accept any smaller block), but 256 KiB blocks keep the encoder at half a megabyte
/// instead of eight.
const ENCODE_BLOCK: usize = 256 << 10;

/// The largest block the header allows.
pub const MAX_BLOCK: usize = 4 << 20;

/// The largest WAL segment [`segment_encoder`] hands to liblz4's level-2 compressor (LZ4MID).
/// On the segments of one-row transactions at 500 tx/s it wrote 3.6 % fewer bytes than
/// `lz4_flex`'s fast compressor (both with linked 1 MiB blocks), at 1.6 GB/s against 2.3 to
/// 2.5 GB/s. Segments past this size only come from a backlog or a writer running flat out,
/// where the CPU is worth more than the bytes, so they take the fast compressor.
const HIGH_COMPRESSION_MAX: usize = 4 << 20;

/// liblz4's lowest high-compression level, LZ4MID in liblz4 1.10.
const HIGH_LEVEL: i32 = 2;

/// Block size of segments that take the level-2 compressor. Linked, 256 KiB blocks wrote 0.7 %
/// more bytes than 1 MiB blocks, and keep the caller's read buffer, which stays allocated, at a
/// quarter of the size.
const HIGH_BLOCK: usize = 256 << 10;

/// Block size of larger segments: `lz4_flex` indexes the 64 KiB before every linked block
/// again, which made 256 KiB blocks a third slower than 1 MiB ones.
const FAST_BLOCK: usize = 1 << 20;

/// LZ4 frame writer producing exactly v0.3.13's header bytes, `04 22 4D 18 64 70 B9`, with
/// independent blocks and a content checksum; streaming, with memory bounded by one block.
///
/// Snapshots use it: matching the header byte for byte is the safest way to stay readable by
/// every Litestream version, whatever LZ4 features their readers happen to support.
pub fn lz4_encoder<W: Write>(w: W) -> Lz4Encoder<W> {
    Lz4Encoder {
        w,
        header: FRAME_HEADER,
        header_written: false,
        block_size: ENCODE_BLOCK,
        block: Vec::new(),
        hasher: XxHash32::with_seed(0),
        packer: Packer::Independent,
    }
}

/// LZ4 frame writer for a WAL segment of about `len` bytes, with linked blocks.
///
/// Each object starts cold, and linking lets every block after the first match against the one
/// before it: with 1 MiB blocks that saved 3 % of the bytes, as much as 4 MiB blocks did, without
/// holding 4 MiB of input at once. Segments up to 4 MiB (`HIGH_COMPRESSION_MAX`) also go
/// through liblz4's level-2 compressor. Hand it the input with
/// [`write_block`](Lz4Encoder::write_block) in pieces of up to [`segment_block_size`].
pub fn segment_encoder<W: Write>(w: W, len: usize) -> Lz4Encoder<W> {
    let packer = if len <= HIGH_COMPRESSION_MAX {
        Packer::LinkedHigh(SpareHigh(None))
    } else {
        Packer::LinkedFast { tail: Vec::new() }
    };
    Lz4Encoder {
        header: LINKED_FRAME_HEADER,
        packer,
        block_size: segment_block_size(len),
        ..lz4_encoder(w)
    }
}

/// The block size [`segment_encoder`] picks for a segment of about `len` bytes.
pub fn segment_block_size(len: usize) -> usize {
    if len <= HIGH_COMPRESSION_MAX {
        HIGH_BLOCK
    } else {
        FAST_BLOCK
    }
}

/// Level-2 compressor states (256 KiB each) that segments gave back, for the next ones. One
/// allocated and freed per segment, between other long-lived allocations of the databases,
/// left holes glibc's heap could not reuse: with 1,000 databases that held 150 MB, half of
/// Walden's memory. At most `SPARE_HIGH_MAX` are kept, as many as segments were ever encoded at
/// once, which the blocking pool bounds.
static SPARE_HIGH: Mutex<Vec<lzzzz::lz4_hc::Compressor<'static>>> = Mutex::new(Vec::new());
const SPARE_HIGH_MAX: usize = 8;

/// A level-2 compressor borrowed from [`SPARE_HIGH`] when first used and given back when
/// parked or dropped.
struct SpareHigh(Option<lzzzz::lz4_hc::Compressor<'static>>);

impl SpareHigh {
    /// The compressor, taken with no history (reset if it was used before) if none is held.
    fn get(&mut self) -> io::Result<&mut lzzzz::lz4_hc::Compressor<'static>> {
        if self.0.is_none() {
            let spare = SPARE_HIGH
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            self.0 = Some(match spare {
                Some(mut high) => {
                    high.attach_dict(None, HIGH_LEVEL);
                    high
                }
                None => {
                    let mut high = lzzzz::lz4_hc::Compressor::new()?;
                    high.set_compression_level(HIGH_LEVEL);
                    high
                }
            });
        }
        Ok(self.0.as_mut().expect("just taken"))
    }

    fn release(&mut self) {
        let mut spares = SPARE_HIGH
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if spares.len() < SPARE_HIGH_MAX
            && let Some(high) = self.0.take()
        {
            spares.push(high);
        }
        self.0 = None;
    }
}

impl Drop for SpareHigh {
    fn drop(&mut self) {
        self.release();
    }
}

/// How an encoder compresses its blocks.
enum Packer {
    /// `lz4_flex`'s fast compressor, every block on its own.
    Independent,
    /// `lz4_flex`'s fast compressor with the last 64 KiB of input before the block as its
    /// dictionary, which is what the decoder of a linked frame has at hand.
    LinkedFast { tail: Vec<u8> },
    /// liblz4's streaming high-compression compressor, which keeps that history itself.
    LinkedHigh(SpareHigh),
}

impl Packer {
    fn pack(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        Ok(match self {
            Packer::Independent => lz4_flex::block::compress(data),
            Packer::LinkedFast { tail } => {
                let packed = lz4_flex::block::compress_with_dict(data, tail);
                slide_window(tail, data);
                packed
            }
            Packer::LinkedHigh(high) => {
                let mut packed = Vec::new();
                high.get()?.next_to_vec(data, &mut packed)?;
                packed
            }
        })
    }
}

/// An LZ4 frame being written; see [`lz4_encoder`] and [`segment_encoder`]. Nothing is complete
/// until [`finish`](Lz4Encoder::finish) writes the end mark and content checksum.
pub struct Lz4Encoder<W: Write> {
    w: W,
    header: [u8; 7],
    header_written: bool,
    block_size: usize,
    block: Vec<u8>,
    hasher: XxHash32,
    packer: Packer,
}

impl<W: Write> Lz4Encoder<W> {
    /// The block size this encoder was made for: a caller reading its input in pieces of this
    /// size can hand each to [`write_block`](Lz4Encoder::write_block).
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    fn write_header(&mut self) -> io::Result<()> {
        if !self.header_written {
            self.w.write_all(&self.header)?;
            self.header_written = true;
        }
        Ok(())
    }

    /// Compresses the pending block; see [`Lz4Encoder::emit`].
    fn emit_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let block = std::mem::take(&mut self.block);
        self.emit(&block)?;
        self.block = block;
        self.block.clear();
        Ok(())
    }

    /// Writes `data` as one block; one that does not shrink is stored as it is (the high bit
    /// of its size says so), as LZ4 writers do. A linked frame's next block may still refer to
    /// a stored one: the decoder's window is the decoded data, however it was stored.
    fn emit(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_header()?;
        // The compressors fill a fresh buffer without zeroing it first; a reused, zero-filled
        // output buffer of the block's worst-case size showed up as memset in profiles.
        let packed = self.packer.pack(data)?;
        if packed.len() < data.len() {
            self.w.write_all(&(packed.len() as u32).to_le_bytes())?;
            self.w.write_all(&packed)
        } else {
            let raw = data.len() as u32 | 0x8000_0000;
            self.w.write_all(&raw.to_le_bytes())?;
            self.w.write_all(data)
        }
    }

    /// Compresses `data` as blocks of its own (one, unless it exceeds [`MAX_BLOCK`]) after any
    /// pending partial block, straight from the caller's buffer: a caller that reads whole
    /// blocks, such as a segment read a block at a time, no longer copies its short last block
    /// into the encoder's block buffer.
    pub fn write_block(&mut self, data: &[u8]) -> io::Result<()> {
        self.emit_block()?;
        for block in data.chunks(MAX_BLOCK) {
            self.hasher.write(block);
            self.emit(block)?;
        }
        Ok(())
    }

    /// Lets go of the compressor's history (liblz4's level-2 state goes back for other
    /// segments), for an encoder that waits across ticks: the next block starts cold, which a
    /// linked frame allows, at the cost of its first matches.
    pub fn park(&mut self) {
        match &mut self.packer {
            Packer::Independent => {}
            Packer::LinkedFast { tail } => *tail = Vec::new(),
            Packer::LinkedHigh(high) => high.release(),
        }
    }

    /// Writes the last block, the end mark and the content checksum, and hands back the writer.
    pub fn finish(mut self) -> Result<W, FormatError> {
        let done = (|| {
            self.write_header()?;
            self.emit_block()?;
            self.w.write_all(&0u32.to_le_bytes())?;
            self.w.write_all(&self.hasher.finish_32().to_le_bytes())
        })();
        done.map_err(FormatError::from_io)?;
        Ok(self.w)
    }
}

impl<W: Write> Write for Lz4Encoder<W> {
    /// A write of at least a whole block while none is pending is compressed straight from
    /// `buf`, without copying it into the block buffer first.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.block.is_empty() && buf.len() >= self.block_size {
            let whole = &buf[..self.block_size];
            self.hasher.write(whole);
            self.emit(whole)?;
            return Ok(whole.len());
        }
        let n = buf.len().min(self.block_size - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        self.hasher.write(&buf[..n]);
        if self.block.len() == self.block_size {
            self.emit_block()?;
        }
        Ok(n)
    }

    /// Flushes the underlying writer only: ending the pending block early gains nothing,
    /// since nothing can read a frame before its end mark.
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// Compresses `data` into one LZ4 frame with v0.3.13's header.
pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut encoder = lz4_encoder(Vec::new());
    encoder
        .write_all(data)
        .expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

/// Reader over one or more concatenated LZ4 frames (and skippable frames), verifying header,
/// block and content checksums. It accepts the zero-length stored block (bytes 00 00 00 80) that
/// v0.3.13 emits when a snapshot is an exact multiple of 4 MiB, and every frame option the
/// reference `lz4` tool can write except dictionaries, so that any replica Litestream or a user's
/// tooling produced can be restored.
///
/// A stream that ends anywhere but after a complete frame is an error, as is an empty stream:
/// an object cut short must never restore as a shorter database. Errors are `io::Error`s wrapping
/// a [`FormatError`] (kind `InvalidData`), except errors of the underlying reader, which pass
/// through unchanged.
pub fn lz4_decoder<R: Read>(r: R) -> Lz4Decoder<R> {
    Lz4Decoder {
        r,
        frame: None,
        frames_seen: 0,
        src: Vec::new(),
        out: Vec::new(),
        out_len: 0,
        out_pos: 0,
    }
}

/// Decompresses a whole object held in memory; see [`lz4_decoder`].
pub fn decompress(data: &[u8]) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    lz4_decoder(data)
        .read_to_end(&mut out)
        .map_err(FormatError::from_io)?;
    Ok(out)
}

const LZ4_FRAME_MAGIC: u32 = 0x184D_2204;
const LZ4_SKIPPABLE_MAGIC: std::ops::RangeInclusive<u32> = 0x184D_2A50..=0x184D_2A5F;
const AGE_HEADER: &[u8] = b"age-encryption.org/v1\n";

const FLG_VERSION_SHIFT: u8 = 6;
const FLG_INDEPENDENT_BLOCKS: u8 = 0x20;
const FLG_BLOCK_CHECKSUMS: u8 = 0x10;
const FLG_CONTENT_SIZE: u8 = 0x08;
const FLG_CONTENT_CHECKSUM: u8 = 0x04;
const FLG_RESERVED: u8 = 0x02;
const FLG_DICTIONARY_ID: u8 = 0x01;
const BD_RESERVED: u8 = 0x8F;
const BLOCK_STORED: u32 = 0x8000_0000;

/// How far back a linked LZ4 block may refer into earlier output.
const LZ4_WINDOW: usize = 64 * 1024;

/// Keeps `window` at the last `LZ4_WINDOW` bytes of all the data passed through it, the
/// history a linked block may refer to, copying no more of `data` than it keeps.
fn slide_window(window: &mut Vec<u8>, data: &[u8]) {
    let keep = LZ4_WINDOW.saturating_sub(data.len()).min(window.len());
    window.drain(..window.len() - keep);
    window.extend_from_slice(&data[data.len().saturating_sub(LZ4_WINDOW)..]);
}

/// A reader of LZ4 frames; see [`lz4_decoder`].
pub struct Lz4Decoder<R> {
    r: R,
    frame: Option<FrameState>,
    frames_seen: u64,
    /// One block as stored, reused between blocks.
    src: Vec<u8>,
    /// Room for one decoded block, kept at the largest block size seen: resizing it for every
    /// block zero-filled up to 4 MiB per block, which for a snapshot written in 256 KiB blocks
    /// meant sixteen times its size in memset.
    out: Vec<u8>,
    /// Length of the current block in `out`; `Read` hands it out from `out_pos`.
    out_len: usize,
    out_pos: usize,
}

/// What the decoder must remember between blocks of the frame it is inside.
struct FrameState {
    max_block: usize,
    linked: bool,
    block_checksums: bool,
    content_checksum: bool,
    content_size: Option<u64>,
    hasher: XxHash32,
    produced: u64,
    /// The last `LZ4_WINDOW` bytes of output, which linked blocks may refer to.
    window: Vec<u8>,
}

impl<R: Read> Read for Lz4Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.out_pos < self.out_len {
                let n = buf.len().min(self.out_len - self.out_pos);
                buf[..n].copy_from_slice(&self.out[self.out_pos..self.out_pos + n]);
                self.out_pos += n;
                return Ok(n);
            }
            if self.frame.is_some() {
                self.read_block()?;
            } else if !self.start_frame()? {
                return Ok(0);
            }
        }
    }
}

impl<R: Read> Lz4Decoder<R> {
    /// The next non-empty decoded block, or `None` once the last frame ended cleanly (checked
    /// like [`Read`] does). A caller that writes whole blocks takes them from the decoder's own
    /// buffer instead of copying them through `Read` first.
    pub fn next_block(&mut self) -> Result<Option<&[u8]>, FormatError> {
        loop {
            if self.frame.is_some() {
                self.read_block()?;
                if self.out_len > 0 {
                    break;
                }
            } else if !self.start_frame()? {
                return Ok(None);
            }
        }
        self.out_pos = self.out_len;
        Ok(Some(&self.out[..self.out_len]))
    }

    /// Goes on to a new stream with the buffers this one grew, so that decoding many small
    /// objects in turn allocates and zero-fills them once.
    pub fn restart(&mut self, r: R) {
        self.r = r;
        self.frame = None;
        self.frames_seen = 0;
        self.out_len = 0;
        self.out_pos = 0;
    }

    /// Like [`next_block`](Lz4Decoder::next_block), but hands over the buffer holding the block
    /// (with the block's length) and keeps `spare` to decode the next one into, so that a block
    /// can go to another thread without being copied. A spare that has held a block before is
    /// not zero-filled again.
    pub fn next_block_owned(
        &mut self,
        spare: Vec<u8>,
    ) -> Result<Option<(Vec<u8>, usize)>, FormatError> {
        if self.next_block()?.is_none() {
            return Ok(None);
        }
        let len = self.out_len;
        let block = std::mem::replace(&mut self.out, spare);
        self.out_len = 0;
        self.out_pos = 0;
        Ok(Some((block, len)))
    }

    /// Reads up to the start of the next data frame's first block, skipping skippable frames;
    /// false at a clean end of stream.
    fn start_frame(&mut self) -> Result<bool, FormatError> {
        let mut magic = [0u8; 4];
        let got = read_up_to(&mut self.r, &mut magic)?;
        match (got, self.frames_seen) {
            (0, 0) => return Err(FormatError::Empty),
            (0, _) => return Ok(false),
            (4, _) => {}
            _ => return Err(FormatError::Truncated),
        }
        self.frames_seen += 1;
        let magic_value = u32::from_le_bytes(magic);
        if LZ4_SKIPPABLE_MAGIC.contains(&magic_value) {
            let len = u64::from(read_u32(&mut self.r)?);
            let skipped = io::copy(&mut (&mut self.r).take(len), &mut io::sink())?;
            if skipped != len {
                return Err(FormatError::Truncated);
            }
            return Ok(true);
        }
        if magic_value != LZ4_FRAME_MAGIC {
            if self.frames_seen == 1 && magic == AGE_HEADER[..4] {
                let mut rest = [0u8; AGE_HEADER.len() - 4];
                if read_up_to(&mut self.r, &mut rest)? == rest.len() && rest == AGE_HEADER[4..] {
                    return Err(FormatError::Encrypted);
                }
            }
            return Err(FormatError::BadMagic(magic_value));
        }
        self.frame = Some(self.read_descriptor()?);
        Ok(true)
    }

    fn read_descriptor(&mut self) -> Result<FrameState, FormatError> {
        // FLG, BD, up to 8 bytes of content size, then the header checksum byte.
        let mut descriptor = [0u8; 11];
        read_exact(&mut self.r, &mut descriptor[..2])?;
        let (flg, bd) = (descriptor[0], descriptor[1]);
        let version = flg >> FLG_VERSION_SHIFT;
        if version != 1 {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if flg & FLG_RESERVED != 0 || bd & BD_RESERVED != 0 {
            return Err(FormatError::ReservedBits);
        }
        if flg & FLG_DICTIONARY_ID != 0 {
            return Err(FormatError::DictionaryNotSupported);
        }
        let max_block = match bd >> 4 {
            4 => 64 * 1024,
            5 => 256 * 1024,
            6 => 1024 * 1024,
            7 => 4 * 1024 * 1024,
            code => return Err(FormatError::UnsupportedBlockSize(code)),
        };
        let mut len = 2;
        let content_size = if flg & FLG_CONTENT_SIZE != 0 {
            read_exact(&mut self.r, &mut descriptor[2..10])?;
            len = 10;
            Some(u64::from_le_bytes(
                descriptor[2..10].try_into().expect("8 bytes"),
            ))
        } else {
            None
        };
        let mut stored = [0u8; 1];
        read_exact(&mut self.r, &mut stored)?;
        if stored[0] != (xxh32(&descriptor[..len]) >> 8) as u8 {
            return Err(FormatError::HeaderChecksum);
        }
        Ok(FrameState {
            max_block,
            linked: flg & FLG_INDEPENDENT_BLOCKS == 0,
            block_checksums: flg & FLG_BLOCK_CHECKSUMS != 0,
            content_checksum: flg & FLG_CONTENT_CHECKSUM != 0,
            content_size,
            hasher: XxHash32::with_seed(0),
            produced: 0,
            window: Vec::new(),
        })
    }

    /// Decodes the next block into `out`, or finishes the frame at its end mark. A block may
    /// decode to nothing (a zero-length stored block); the caller simply reads on.
    fn read_block(&mut self) -> Result<(), FormatError> {
        let frame = self.frame.as_mut().expect("called inside a frame");
        self.out_len = 0;
        self.out_pos = 0;
        let block = read_u32(&mut self.r)?;
        if block == 0 {
            return self.end_frame();
        }
        let len = (block & !BLOCK_STORED) as usize;
        if len > frame.max_block {
            return Err(FormatError::BlockTooBig {
                len,
                max: frame.max_block,
            });
        }
        self.src.resize(len, 0);
        read_exact(&mut self.r, &mut self.src)?;
        if frame.block_checksums && read_u32(&mut self.r)? != xxh32(&self.src) {
            return Err(FormatError::BlockChecksum);
        }
        if self.out.len() < frame.max_block {
            self.out.resize(frame.max_block, 0);
        }
        if block & BLOCK_STORED != 0 {
            self.out[..len].copy_from_slice(&self.src);
            self.out_len = len;
        } else {
            let room = &mut self.out[..frame.max_block];
            self.out_len = if frame.linked {
                lzzzz::lz4::decompress_with_dict(&self.src, room, &frame.window)
            } else {
                lzzzz::lz4::decompress(&self.src, room)
            }
            .map_err(|_| FormatError::CorruptBlock)?;
        }
        let decoded = &self.out[..self.out_len];
        frame.hasher.write(decoded);
        frame.produced += decoded.len() as u64;
        if frame.linked {
            slide_window(&mut frame.window, decoded);
        }
        Ok(())
    }

    fn end_frame(&mut self) -> Result<(), FormatError> {
        let frame = self.frame.take().expect("called inside a frame");
        if let Some(expected) = frame.content_size
            && expected != frame.produced
        {
            return Err(FormatError::ContentSize {
                expected,
                actual: frame.produced,
            });
        }
        if frame.content_checksum {
            let stored = read_u32(&mut self.r)?;
            let computed = frame.hasher.finish() as u32;
            if stored != computed {
                return Err(FormatError::ContentChecksum { stored, computed });
            }
        }
        Ok(())
    }
}

fn xxh32(data: &[u8]) -> u32 {
    XxHash32::oneshot(0, data)
}

/// Fills as much of `buf` as the reader has before its end; tells a clean end of stream (0)
/// from a cut-off one.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, FormatError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(FormatError::Io(err)),
        }
    }
    Ok(filled)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), FormatError> {
    if read_up_to(r, buf)? == buf.len() {
        Ok(())
    } else {
        Err(FormatError::Truncated)
    }
}

fn read_u32(r: &mut impl Read) -> Result<u32, FormatError> {
    let mut bytes = [0u8; 4];
    read_exact(r, &mut bytes)?;
    Ok(u32::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;
    const HEADER: [u8; 7] = [0x04, 0x22, 0x4D, 0x18, 0x64, 0x70, 0xB9];

    #[test]
    fn whole_block_writes_encode_exactly_like_small_writes() {
        let mut input = data(3 * MIB + 12345, true);
        input.extend(data(MIB, false));
        let encode = |piece: usize| {
            let mut e = lz4_encoder(Vec::new());
            for chunk in input.chunks(piece) {
                e.write_all(chunk).unwrap();
            }
            e.finish().unwrap()
        };
        let whole = encode(input.len());
        assert_eq!(whole, encode(1000));
        assert_eq!(whole, encode(ENCODE_BLOCK));
        assert_eq!(decompress(&whole).unwrap(), input);
        let mut e = lz4_encoder(Vec::new());
        for block in input.chunks(ENCODE_BLOCK) {
            e.write_block(block).unwrap();
        }
        assert_eq!(e.finish().unwrap(), whole);
    }

    #[test]
    fn write_block_keeps_its_blocks_whole() {
        let input = data(5 * MIB + 10, true);
        let mut e = lz4_encoder(Vec::new());
        e.write_all(&input[..100]).unwrap();
        e.write_block(&input[100..MIB]).unwrap();
        e.write_block(&[]).unwrap();
        e.write_block(&input[MIB..]).unwrap();
        let frame = e.finish().unwrap();
        // The pending 100 bytes, the first call's block, the second's split at MAX_BLOCK.
        assert_eq!(block_words(&frame).len(), 4);
        assert_eq!(decompress(&frame).unwrap(), input);
    }

    fn segment(input: &[u8], blocks: usize) -> Vec<u8> {
        let mut e = segment_encoder(Vec::new(), input.len());
        for block in input.chunks(blocks) {
            e.write_block(block).unwrap();
        }
        e.finish().unwrap()
    }

    /// 60 KiB of noise twice over (LZ4 reaches back at most 64 KiB - 1), in two blocks: only a
    /// second block that refers back to the first can shrink, and only a decoder that keeps the
    /// first as its window gets it back.
    #[test]
    fn segment_blocks_refer_to_the_block_before() {
        let noise = data(60 << 10, false);
        for len_hint in [HIGH_COMPRESSION_MAX, HIGH_COMPRESSION_MAX + 1] {
            let mut e = segment_encoder(Vec::new(), len_hint);
            e.write_block(&noise).unwrap();
            e.write_block(&noise).unwrap();
            let frame = e.finish().unwrap();
            assert_eq!(frame[..7], LINKED_FRAME_HEADER);
            let words = block_words(&frame);
            assert_eq!(words.len(), 2);
            assert_ne!(words[0] & BLOCK_STORED, 0, "noise alone does not shrink");
            assert!(words[1] < 1024, "second block took {} bytes", words[1]);
            let mut both = noise.clone();
            both.extend_from_slice(&noise);
            assert_eq!(decompress(&frame).unwrap(), both);
        }
    }

    /// A level-2 compressor handed back and reused starts the next segment with no history:
    /// the second segment repeats the first, so anything it referred to there would not decode
    /// in a frame of its own. Many at once exercise the cap on kept compressors.
    #[test]
    fn reused_level_two_compressors_start_cold() {
        let noise = data(60 << 10, false);
        let encode = || {
            let mut e = segment_encoder(Vec::new(), noise.len());
            e.write_block(&noise).unwrap();
            e
        };
        let many: Vec<_> = (0..SPARE_HIGH_MAX + 3).map(|_| encode()).collect();
        for e in many {
            assert_eq!(decompress(&e.finish().unwrap()).unwrap(), noise);
        }
        for _ in 0..3 {
            let frame = encode().finish().unwrap();
            let words = block_words(&frame);
            assert_ne!(
                words[0] & BLOCK_STORED,
                0,
                "noise with no history does not shrink"
            );
            assert_eq!(decompress(&frame).unwrap(), noise);
        }
        assert!(SPARE_HIGH.lock().unwrap().len() <= SPARE_HIGH_MAX);
    }

    /// A parked encoder's next block starts cold, and the frame still decodes.
    #[test]
    fn a_parked_segment_goes_on_without_history() {
        let noise = data(60 << 10, false);
        for len_hint in [HIGH_COMPRESSION_MAX, HIGH_COMPRESSION_MAX + 1] {
            let mut e = segment_encoder(Vec::new(), len_hint);
            e.write_block(&noise).unwrap();
            e.park();
            e.write_block(&noise).unwrap();
            let frame = e.finish().unwrap();
            let words = block_words(&frame);
            assert_ne!(words[1] & BLOCK_STORED, 0, "nothing before it to refer to");
            assert_eq!(decompress(&frame).unwrap(), noise.repeat(2));
        }
    }

    /// Blocks much smaller than the 64 KiB window, and some larger, so the encoder's history
    /// must span several blocks exactly as the decoder's does; both compressors.
    #[test]
    fn segments_in_blocks_of_any_size_round_trip() {
        let mut input = Vec::new();
        for i in 0..100 {
            input.extend(data(3000 + i * 37, i % 5 == 0));
            let again = input[input.len() - 3000..input.len() - 1000].to_vec();
            input.extend(again);
        }
        // Repeats at a distance no block size here divides: history from the wrong place
        // would decode to the wrong bytes, not merely compress worse.
        input.extend(data(9_973, false).repeat(30));
        for blocks in [1000, 4096, 70_000, MIB] {
            assert_eq!(decompress(&segment(&input, blocks)).unwrap(), input);
        }
        let big = [data(HIGH_COMPRESSION_MAX, false), input].concat();
        for blocks in [5000, 70_000, MIB] {
            assert_eq!(decompress(&segment(&big, blocks)).unwrap(), big);
        }
    }

    /// Deterministic data: `compressible` repeats short text, otherwise xorshift noise that LZ4
    /// cannot shrink.
    fn data(len: usize, compressible: bool) -> Vec<u8> {
        if compressible {
            return b"walden keeps sqlite safe; "
                .iter()
                .copied()
                .cycle()
                .take(len)
                .collect();
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ len as u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect()
    }

    /// The block-size words of a frame with our header (no block checksums).
    fn block_words(frame: &[u8]) -> Vec<u32> {
        let mut words = Vec::new();
        let mut at = HEADER.len();
        loop {
            let word = u32::from_le_bytes(frame[at..at + 4].try_into().unwrap());
            if word == 0 {
                return words;
            }
            words.push(word);
            at += 4 + (word & !BLOCK_STORED) as usize;
        }
    }

    fn stored_block(data: &[u8]) -> Vec<u8> {
        let mut block = (data.len() as u32 | BLOCK_STORED).to_le_bytes().to_vec();
        block.extend_from_slice(data);
        block
    }

    /// A frame with our header around hand-made blocks, as another writer could produce it.
    fn hand_frame(blocks: &[Vec<u8>], content: &[u8]) -> Vec<u8> {
        let mut frame = HEADER.to_vec();
        for block in blocks {
            frame.extend_from_slice(block);
        }
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(&xxh32(content).to_le_bytes());
        frame
    }

    #[test]
    fn header_is_exactly_v0_3_13s() {
        assert_eq!(
            compress(b""),
            [HEADER.as_slice(), &[0, 0, 0, 0], &[0x05, 0x5D, 0xCC, 0x02]].concat()
        );
        let hello = compress(b"hello");
        assert_eq!(hello[..7], HEADER);
        assert_eq!(hello[hello.len() - 4..], [0xF9, 0x77, 0x00, 0xFB]);
        assert_eq!(decompress(&hello).unwrap(), b"hello");
    }

    #[test]
    fn round_trips_in_blocks_of_at_most_256_kib() {
        for len in [0, 1, 4 * MIB - 1, 4 * MIB, 8 * MIB, 9 * MIB] {
            for compressible in [false, true] {
                let input = data(len, compressible);
                let frame = compress(&input);
                let words = block_words(&frame);
                assert_eq!(words.len(), len.div_ceil(ENCODE_BLOCK), "len {len}");
                assert!(
                    words.iter().all(|&w| w & !BLOCK_STORED != 0),
                    "len {len}: the writer must not emit empty blocks"
                );
                if len > 1 {
                    assert_eq!(
                        words.iter().all(|&w| w & BLOCK_STORED != 0),
                        !compressible,
                        "len {len}: incompressible blocks are stored raw"
                    );
                }
                assert!(decompress(&frame).unwrap() == input, "len {len}");
            }
        }
    }

    #[test]
    fn streams_through_small_reads_and_writes() {
        let input = data(5 * MIB + 3, true);
        let mut encoder = lz4_encoder(Vec::new());
        for chunk in input.chunks(4099) {
            encoder.write_all(chunk).unwrap();
            encoder.flush().unwrap();
        }
        let frame = encoder.finish().unwrap();
        assert_eq!(
            block_words(&frame).len(),
            input.len().div_ceil(ENCODE_BLOCK),
            "flush must not end a block early"
        );
        let mut decoder = lz4_decoder(frame.as_slice());
        let mut output = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            let n = decoder.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            output.extend_from_slice(&buf[..n]);
        }
        assert!(output == input);
    }

    #[test]
    fn zero_length_stored_block_is_accepted() {
        let snapshot = data(4 * MIB, false);
        let cases = [
            ("only block", vec![stored_block(b"")], Vec::new()),
            (
                "after data",
                vec![stored_block(b"abc"), stored_block(b"")],
                b"abc".to_vec(),
            ),
            (
                "v0.3.13 snapshot of exactly 4 MiB",
                vec![stored_block(&snapshot), stored_block(b"")],
                snapshot.clone(),
            ),
        ];
        for (name, blocks, content) in cases {
            let frame = hand_frame(&blocks, &content);
            assert!(decompress(&frame).unwrap() == content, "{name}");
        }
    }

    #[test]
    fn concatenated_and_skippable_frames_are_read_in_order() {
        let skippable = [0x5A, 0x2A, 0x4D, 0x18, 3, 0, 0, 0, 9, 9, 9];
        let stream = [
            compress(b"first "),
            skippable.to_vec(),
            compress(b""),
            compress(b"second"),
        ]
        .concat();
        assert_eq!(decompress(&stream).unwrap(), b"first second");
    }

    #[test]
    fn a_restarted_decoder_reads_each_stream_on_its_own() {
        let big = data(3 * MIB, true);
        let small = data(1000, false);
        let mut cut_short = compress(&big);
        cut_short.truncate(cut_short.len() / 2);
        let mut decoder = lz4_decoder(io::Cursor::new(compress(&big)));
        let blocks = |decoder: &mut Lz4Decoder<io::Cursor<Vec<u8>>>| {
            let mut out = Vec::new();
            while let Some(block) = decoder.next_block()? {
                out.extend_from_slice(block);
            }
            Ok::<_, FormatError>(out)
        };
        assert!(blocks(&mut decoder).unwrap() == big);
        decoder.restart(io::Cursor::new(cut_short));
        assert!(matches!(blocks(&mut decoder), Err(FormatError::Truncated)));
        // Neither the frame the failure left open nor the frames counted before carry over.
        decoder.restart(io::Cursor::new(compress(&small)));
        assert!(blocks(&mut decoder).unwrap() == small);
        decoder.restart(io::Cursor::new(Vec::new()));
        assert!(matches!(blocks(&mut decoder), Err(FormatError::Empty)));
    }

    #[test]
    fn damaged_objects_are_rejected() {
        let good = compress(&data(100_000, true));
        let with = |at: usize, byte: u8| {
            let mut bytes = good.clone();
            bytes[at] = byte;
            bytes
        };
        let last = good.len() - 1;
        let too_big = hand_frame(&[stored_block(&vec![0; 4 * MIB + 1])], b"");
        let age = b"age-encryption.org/v1\n-> X25519 abc\n".to_vec();
        type Check = fn(&FormatError) -> bool;
        let cases: Vec<(&str, Vec<u8>, Check)> = vec![
            ("empty", Vec::new(), |e| matches!(e, FormatError::Empty)),
            ("age", age, |e| matches!(e, FormatError::Encrypted)),
            ("magic", with(0, 0x05), |e| {
                matches!(e, FormatError::BadMagic(0x184D_2205))
            }),
            ("header checksum", with(6, 0xB8), |e| {
                matches!(e, FormatError::HeaderChecksum)
            }),
            ("version", with(4, 0xA4), |e| {
                matches!(e, FormatError::UnsupportedVersion(2))
            }),
            ("block size", with(5, 0x30), |e| {
                matches!(e, FormatError::UnsupportedBlockSize(3))
            }),
            ("content checksum", with(last, good[last] ^ 1), |e| {
                matches!(e, FormatError::ContentChecksum { .. })
            }),
            ("block too big", too_big, |e| {
                matches!(e, FormatError::BlockTooBig { .. })
            }),
            (
                // A match 256 bytes back at the very start of the output.
                "corrupt block",
                hand_frame(&[vec![3, 0, 0, 0, 0x0F, 0x00, 0x01]], b""),
                |e| matches!(e, FormatError::CorruptBlock),
            ),
            (
                "trailing garbage",
                [good.clone(), vec![1, 2]].concat(),
                |e| matches!(e, FormatError::Truncated),
            ),
        ];
        for (name, bytes, expected) in cases {
            let err = decompress(&bytes).unwrap_err();
            assert!(expected(&err), "{name}: got {err:?}");
        }
        let err = decompress(b"age-encryption.org/v1\n").unwrap_err();
        assert!(err.to_string().contains("not supported yet"), "{err}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let frame = [compress(&data(300, false)), compress(b"more")].concat();
        let first_end = frame.len() - compress(b"more").len();
        for cut in 1..frame.len() {
            if cut == first_end {
                continue;
            }
            let err = decompress(&frame[..cut]).unwrap_err();
            assert!(
                matches!(err, FormatError::Truncated),
                "cut at {cut}: got {err:?}"
            );
        }
    }

    #[test]
    fn reader_errors_pass_through() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone"))
            }
        }
        let mut out = Vec::new();
        let err = lz4_decoder(Failing).read_to_end(&mut out).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    /// Pins why `lz4_decoder` does not simply wrap `lz4_flex::frame::FrameDecoder`. If one of
    /// these starts failing, `lz4_flex` changed and the wrapper may be worth revisiting.
    #[test]
    fn lz4_flex_frame_decoder_limits() {
        let flex = |bytes: &[u8]| {
            let mut out = Vec::new();
            lz4_flex::frame::FrameDecoder::new(bytes)
                .read_to_end(&mut out)
                .map(|_| out)
        };
        // It stops after the first of two concatenated frames.
        let two = [compress(b"one"), compress(b"two")].concat();
        assert_eq!(flex(&two).unwrap(), b"one");
        // It ends the stream at a zero-length stored block, unchecked.
        let empty_block = hand_frame(
            &[stored_block(b"ab"), stored_block(b""), stored_block(b"c")],
            b"abc",
        );
        assert_eq!(flex(&empty_block).unwrap(), b"ab");
        // A stream cut off between blocks reads as complete.
        let whole = compress(b"hello");
        assert_eq!(flex(&whole[..whole.len() - 8]).unwrap(), b"hello");
        // It does verify the content checksum.
        let mut bad = whole.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(flex(&bad).is_err());
    }

    /// Runs the reference `lz4` tool on `input` through files (pipes could deadlock on large
    /// inputs). The tool is required: interoperability is the point of this module.
    fn lz4_cli(args: &[&str], input: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("in"), dir.path().join("out"));
        std::fs::write(&src, input).unwrap();
        let status = std::process::Command::new("lz4")
            .args(["-q", "-f"])
            .args(args)
            .arg(&src)
            .arg(&dst)
            .status()
            .unwrap_or_else(|err| {
                panic!(
                    "the lz4 command line tool is required by this test \
                     (apt-get install lz4): {err}"
                )
            });
        assert!(status.success(), "lz4 {args:?} failed: {status}");
        std::fs::read(&dst).unwrap()
    }

    #[test]
    fn lz4_cli_decodes_our_output() {
        let input = [data(5 * MIB, false), data(4 * MIB + 17, true)].concat();
        assert!(lz4_cli(&["-d"], &compress(&input)) == input);
        // Segments, with linked blocks from either compressor.
        assert!(lz4_cli(&["-d"], &segment(&input, FAST_BLOCK)) == input);
        let small = [data(MIB, false), data(2 * MIB, true)].concat();
        assert!(lz4_cli(&["-d"], &segment(&small, HIGH_BLOCK)) == small);
    }

    #[test]
    fn we_decode_lz4_cli_output() {
        let input = [data(5 * MIB, false), data(4 * MIB + 17, true)].concat();
        for args in [
            &["-B7", "--content-size"][..],
            &["-B4", "-BD"],
            &["-B5", "-BX", "--no-frame-crc"],
            &["-B6", "--content-size", "-BX", "-BD", "-9"],
        ] {
            assert!(
                decompress(&lz4_cli(args, &input)).unwrap() == input,
                "lz4 {args:?}"
            );
        }
    }

    #[test]
    fn generations() {
        let (a, b) = (new_generation(), new_generation());
        assert!(is_generation(&a) && is_generation(&b), "{a} {b}");
        assert_ne!(a, b);
        for bad in [
            "",
            "0123456789abcde",
            "0123456789abcdef0",
            "0123456789ABCDEF",
            "0123456789abcdeg",
        ] {
            assert!(!is_generation(bad), "{bad}");
        }
    }

    #[test]
    fn snapshot_names() {
        assert_eq!(snapshot_name(10), "0000000a.snapshot.lz4");
        assert_eq!(snapshot_name(MAX_INDEX), "7fffffff.snapshot.lz4");
        for index in [0, 10, MAX_INDEX, u32::MAX] {
            assert_eq!(parse_snapshot_name(&snapshot_name(index)), Some(index));
        }
        for bad in [
            "0000000A.snapshot.lz4",
            "000000a.snapshot.lz4",
            "00000000a.snapshot.lz4",
            "0000000a.snapshot",
            "0000000a.snapshot.lz4.tmp",
            "0000000a.wal.lz4",
            "0000000x.snapshot.lz4",
            "+000000a.snapshot.lz4",
        ] {
            assert_eq!(parse_snapshot_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn wal_segment_names() {
        assert_eq!(wal_segment_name(1, 0x1038), "00000001_00001038.wal.lz4");
        for (index, offset) in [(0, 0), (1, 0x1038), (MAX_INDEX, 0xffff_ffff)] {
            assert_eq!(
                parse_wal_segment_name(&wal_segment_name(index, offset)),
                Some(Pos { index, offset })
            );
        }
        for (name, offset) in [
            ("00000002_100000000.wal.lz4", 0x1_0000_0000),
            ("00000002_ffffffffffffffff.wal.lz4", u64::MAX),
        ] {
            assert_eq!(
                parse_wal_segment_name(name),
                Some(Pos { index: 2, offset }),
                "{name}"
            );
        }
        for bad in [
            "0000000A_00000000.wal.lz4",
            "00000001_0000000A.wal.lz4",
            "0000001_00000000.wal.lz4",
            "00000001_0000000.wal.lz4",
            "000000001_00000000.wal.lz4",
            "00000001_10000000000000000.wal.lz4",
            "00000001_00000000.wal",
            "00000001_00000000.snapshot.lz4",
            "00000001_00000000.wal.lz4.tmp",
            "00000001-00000000.wal.lz4",
            "00000001_00000000_00000000.wal.lz4",
        ] {
            assert_eq!(parse_wal_segment_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn positions_order_like_their_names() {
        let mut positions = [
            Pos {
                index: 2,
                offset: 0,
            },
            Pos {
                index: 1,
                offset: 0x1038,
            },
            Pos {
                index: 1,
                offset: 0,
            },
        ];
        positions.sort();
        let names: Vec<String> = positions
            .iter()
            .map(|p| wal_segment_name(p.index, p.offset))
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(
            positions[0],
            Pos {
                index: 1,
                offset: 0
            }
        );
    }

    #[test]
    fn join_key_follows_path_join() {
        for (parts, expected) in [
            (&["", "generations", "g"][..], "generations/g"),
            (&[".", "generations"], "generations"),
            (&["/", "generations"], "/generations"),
            (&["/db", "generations"], "/db/generations"),
            (&["a/b/", "generations/"], "a/b/generations"),
            (&["a//b", "./c"], "a/b/c"),
            (&["a/../b", "c"], "b/c"),
            (&["../a", "b"], "../a/b"),
            (&["/..", "x"], "/x"),
            (&["a", ".."], "."),
            (&[""], ""),
            (&[], ""),
            (&["."], "."),
            (&["/"], "/"),
        ] {
            assert_eq!(join_key(parts), expected, "{parts:?}");
        }
    }

    #[test]
    fn keys() {
        let g = "0123456789abcdef";
        assert_eq!(generations_dir(""), "generations");
        assert_eq!(
            generation_dir("a/b/", g),
            "a/b/generations/0123456789abcdef"
        );
        assert_eq!(
            snapshots_dir("/db", g),
            "/db/generations/0123456789abcdef/snapshots"
        );
        assert_eq!(wal_dir(".", g), "generations/0123456789abcdef/wal");
        assert_eq!(
            snapshot_key("", g, 10),
            "generations/0123456789abcdef/snapshots/0000000a.snapshot.lz4"
        );
        assert_eq!(
            wal_segment_key(
                "/db",
                g,
                Pos {
                    index: 1,
                    offset: 0x1038
                }
            ),
            "/db/generations/0123456789abcdef/wal/00000001_00001038.wal.lz4"
        );
    }
}
