//! Walden keeps SQLite databases safe by streaming their write-ahead log to object storage in
//! Litestream v0.3.13's layout, and restoring them from it.
//!
//! The binary in `main.rs` is only glue; every concern lives in one module here so that it can
//! be tested on its own.

pub mod config;
pub mod format;
pub mod observe;
pub mod replica;
pub mod replicate;
pub mod restore;
pub mod storage;
pub mod supervise;
pub mod verify;
pub mod wal;
