//! The health report: per database and replica, whether replication works right now and why
//! not, in the fields platforms that embed Litestream already show (`last_synced_at`,
//! `healthy`, `health_error`).
//!
//! `last_synced_at` is set only when the object store confirmed an upload, and the verdict
//! comes from one rule ([`ReplicaHealth::verdict`]), so a replicator that runs but cannot
//! upload is reported as unhealthy within a sync interval or two.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::replicate::{DbView, ReplicaHealth};
use crate::restore::rfc3339;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub healthy: bool,
    pub databases: Vec<DbReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbReport {
    pub path: String,
    pub healthy: bool,
    pub generation: Option<String>,
    pub index: Option<u32>,
    pub offset: Option<u64>,
    pub wal_size: u64,
    pub health_error: Option<String>,
    pub replicas: Vec<ReplicaReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub name: String,
    pub healthy: bool,
    /// RFC 3339; when the store last confirmed an upload.
    pub last_synced_at: Option<String>,
    pub health_error: Option<String>,
    pub generation: Option<String>,
    pub index: Option<u32>,
    pub offset: Option<u64>,
    /// Age of the oldest committed data not yet uploaded.
    pub lag_seconds: f64,
    pub pending_bytes: u64,
    /// RFC 3339; when the last restore drill ran, and whether it passed.
    pub verified_at: Option<String>,
    pub verify_ok: Option<bool>,
}

fn replica_report(name: &str, h: &ReplicaHealth, now: SystemTime) -> ReplicaReport {
    let verdict = h.verdict(now);
    ReplicaReport {
        name: name.to_string(),
        healthy: verdict.is_ok(),
        last_synced_at: h.last_synced_at.map(rfc3339),
        health_error: verdict.err(),
        generation: h.position.as_ref().map(|(g, _)| g.clone()),
        index: h.position.as_ref().map(|(_, p)| p.index),
        offset: h.position.as_ref().map(|(_, p)| p.offset),
        lag_seconds: h.lag(now).unwrap_or_default().as_secs_f64(),
        pending_bytes: h.pending_bytes,
        verified_at: h.last_verify.as_ref().map(|(t, _)| rfc3339(*t)),
        verify_ok: h.last_verify.as_ref().map(|(_, r)| r.is_ok()),
    }
}

/// Builds the report for every database as it stands at `now`.
pub fn report(views: &[DbView], now: SystemTime) -> Report {
    let databases: Vec<DbReport> = views
        .iter()
        .map(|v| {
            let status = v.status.borrow().clone();
            let replicas: Vec<ReplicaReport> = v
                .replicas
                .iter()
                .map(|(name, h)| replica_report(name, &h.lock().expect("health lock"), now))
                .collect();
            let position = status.position.as_ref();
            DbReport {
                path: v.path.display().to_string(),
                healthy: status.last_error.is_none() && replicas.iter().all(|r| r.healthy),
                generation: position.map(|p| p.generation.clone()),
                index: position.map(|p| p.pos.index),
                offset: position.map(|p| p.pos.offset),
                wal_size: status.wal_size,
                health_error: status.last_error.clone(),
                replicas,
            }
        })
        .collect();
    Report {
        healthy: databases.iter().all(|d| d.healthy),
        databases,
    }
}
