//! Restore drills: proof that a replica restores to what the live database held.
//!
//! A backup nobody has restored is a hope. A drill restores a replica into a scratch
//! directory, runs `PRAGMA integrity_check`, and compares a checksum of its logical content
//! with the live database's at the same replicated position. Inside `replicate` the position
//! is pinned exactly (see `replicate::db::Db::checksum_at_position`); from the command line
//! with no replicator running, the replica's latest state is compared with the live file.

use std::hash::Hasher;
use std::path::Path;

use rusqlite::Connection;
use rusqlite::types::ValueRef;
use serde::{Deserialize, Serialize};

use crate::format::Pos;
use crate::replica::Replica;
use crate::restore::{self, IntegrityCheck, RestoreOptions};

/// The outcome of one drill against one replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub replica: String,
    pub generation: Option<String>,
    /// Index and offset the restored copy reached.
    pub index: Option<u32>,
    pub offset: Option<u64>,
    pub ok: bool,
    /// "ok", or what differs or failed, in words.
    pub detail: String,
}

/// A checksum of a database's logical content: the schema and every row of every table, in
/// storage order. Two databases with the same content have the same checksum whatever their
/// page layout, so a restored copy can be compared with a live one.
pub fn checksum(conn: &Connection) -> rusqlite::Result<u64> {
    let mut h = twox_hash::XxHash64::with_seed(0);
    let mut schema = conn
        .prepare("SELECT type, name, coalesce(sql, '') FROM sqlite_schema ORDER BY type, name")?;
    let mut tables = Vec::new();
    let mut rows = schema.query([])?;
    while let Some(row) = rows.next()? {
        let (kind, name, sql): (String, String, String) = (row.get(0)?, row.get(1)?, row.get(2)?);
        for part in [&kind, &name, &sql] {
            h.write(part.as_bytes());
            h.write_u8(0);
        }
        if kind == "table" && !name.starts_with("sqlite_") {
            tables.push(name);
        }
    }
    for table in tables {
        let mut stmt =
            conn.prepare(&format!("SELECT * FROM \"{}\"", table.replace('"', "\"\"")))?;
        let columns = stmt.column_count();
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            for i in 0..columns {
                match row.get_ref(i)? {
                    ValueRef::Null => h.write_u8(0),
                    ValueRef::Integer(v) => {
                        h.write_u8(1);
                        h.write_i64(v);
                    }
                    ValueRef::Real(v) => {
                        h.write_u8(2);
                        h.write_u64(v.to_bits());
                    }
                    ValueRef::Text(v) => {
                        h.write_u8(3);
                        h.write_usize(v.len());
                        h.write(v);
                    }
                    ValueRef::Blob(v) => {
                        h.write_u8(4);
                        h.write_usize(v.len());
                        h.write(v);
                    }
                }
            }
        }
    }
    Ok(h.finish())
}

/// Restores `replica` (the latest state, or exactly `until` in `generation`) into `scratch`,
/// checks its integrity and compares its checksum with `expected`.
pub async fn check_replica(
    replica: &Replica,
    generation: Option<&str>,
    until: Option<Pos>,
    expected: u64,
    scratch: &Path,
) -> Verdict {
    let mut verdict = Verdict {
        replica: replica.name.clone(),
        generation: generation.map(str::to_string),
        index: None,
        offset: None,
        ok: false,
        detail: String::new(),
    };
    let opts = RestoreOptions {
        output: scratch.join(format!("{}.db", replica.name)),
        generation: generation.map(str::to_string),
        index: None,
        timestamp: None,
        until,
        parallelism: 8,
        check: IntegrityCheck::Full,
    };
    let replicas = std::slice::from_ref(replica);
    let restored = match restore::plan(replicas, &opts).await {
        Ok(plan) => restore::restore(replicas, &plan, &opts).await,
        Err(e) => Err(e),
    };
    let restored = match restored {
        Ok(r) => r,
        Err(e) => {
            verdict.detail = format!("restore failed: {e}");
            return verdict;
        }
    };
    verdict.generation = Some(restored.generation.clone());
    verdict.index = Some(restored.position.index);
    verdict.offset = Some(restored.position.offset);
    if let Some(u) = until
        && restored.position != u
    {
        verdict.detail = format!(
            "the replica reaches {:08x}/{:08x}, not the live position {:08x}/{:08x}",
            restored.position.index, restored.position.offset, u.index, u.offset
        );
        return verdict;
    }
    let sum = Connection::open(&opts.output).and_then(|c| checksum(&c));
    let _ = std::fs::remove_file(&opts.output);
    match sum {
        Ok(sum) if sum == expected => {
            verdict.ok = true;
            verdict.detail = "ok".into();
        }
        Ok(_) => {
            verdict.detail =
                "restored content differs from the live database at the same position".into();
        }
        Err(e) => verdict.detail = format!("cannot read the restored copy: {e}"),
    }
    verdict
}
