//! Prometheus metrics under Litestream's names, plus Walden's own.
//!
//! Dashboards built for Litestream keep working because every metric Litestream exports is
//! exported here with the same name, type and labels. The `prometheus` crate is used rather
//! than `prometheus-client` because the latter appends `_total` to counters, which would
//! rename `litestream_sync_count`. The registry is process-wide, like Go's default registry,
//! so that every layer (database task, uploader, store) records without plumbing.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{CounterVec, Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::storage::OpRecorder;

pub struct Metrics {
    registry: Registry,
    pub db_size: IntGaugeVec,
    pub wal_size: IntGaugeVec,
    pub total_wal_bytes: IntCounterVec,
    pub shadow_wal_index: IntGaugeVec,
    pub shadow_wal_size: IntGaugeVec,
    pub sync_count: IntCounterVec,
    pub sync_error_count: IntCounterVec,
    pub sync_seconds: CounterVec,
    pub checkpoint_count: IntCounterVec,
    pub checkpoint_error_count: IntCounterVec,
    pub checkpoint_seconds: CounterVec,
    pub replica_wal_bytes: IntCounterVec,
    pub replica_wal_index: IntGaugeVec,
    pub replica_wal_offset: IntGaugeVec,
    pub replica_validation_total: IntCounterVec,
    pub replica_operation_total: IntCounterVec,
    pub replica_operation_bytes: IntCounterVec,
    pub replica_last_sync: GaugeVec,
    pub replica_lag: GaugeVec,
    pub replica_pending_bytes: IntGaugeVec,
    pub replica_healthy: IntGaugeVec,
    pub errors: IntCounterVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        macro_rules! reg {
            ($kind:ident, $name:expr, $help:expr, $labels:expr) => {{
                let m = $kind::new(opts($name, $help), $labels).expect("valid metric");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric registered once");
                m
            }};
        }
        let db = &["db"];
        let mode = &["db", "mode"];
        let replica = &["db", "name"];
        let op = &["replica_type", "operation"];
        Metrics {
            db_size: reg!(
                IntGaugeVec,
                "litestream_db_size",
                "The current size of the real DB",
                db
            ),
            wal_size: reg!(
                IntGaugeVec,
                "litestream_wal_size",
                "The current size of the real WAL",
                db
            ),
            total_wal_bytes: reg!(
                IntCounterVec,
                "litestream_total_wal_bytes",
                "Total number of bytes written to shadow WAL",
                db
            ),
            shadow_wal_index: reg!(
                IntGaugeVec,
                "litestream_shadow_wal_index",
                "The current index of the shadow WAL",
                db
            ),
            shadow_wal_size: reg!(
                IntGaugeVec,
                "litestream_shadow_wal_size",
                "Current size of shadow WAL, in bytes",
                db
            ),
            sync_count: reg!(
                IntCounterVec,
                "litestream_sync_count",
                "Number of sync operations",
                db
            ),
            sync_error_count: reg!(
                IntCounterVec,
                "litestream_sync_error_count",
                "Number of sync errors",
                db
            ),
            sync_seconds: reg!(
                CounterVec,
                "litestream_sync_seconds",
                "Time spent syncing shadow WAL, in seconds",
                db
            ),
            checkpoint_count: reg!(
                IntCounterVec,
                "litestream_checkpoint_count",
                "Number of checkpoint operations",
                mode
            ),
            checkpoint_error_count: reg!(
                IntCounterVec,
                "litestream_checkpoint_error_count",
                "Number of checkpoint errors",
                mode
            ),
            checkpoint_seconds: reg!(
                CounterVec,
                "litestream_checkpoint_seconds",
                "Time spent checkpointing WAL, in seconds",
                mode
            ),
            replica_wal_bytes: reg!(
                IntCounterVec,
                "litestream_replica_wal_bytes",
                "The number of WAL bytes written",
                replica
            ),
            replica_wal_index: reg!(
                IntGaugeVec,
                "litestream_replica_wal_index",
                "The current WAL index",
                replica
            ),
            replica_wal_offset: reg!(
                IntGaugeVec,
                "litestream_replica_wal_offset",
                "The current WAL offset",
                replica
            ),
            replica_validation_total: reg!(
                IntCounterVec,
                "litestream_replica_validation_total",
                "The number of validations performed",
                &["db", "name", "status"]
            ),
            replica_operation_total: reg!(
                IntCounterVec,
                "litestream_replica_operation_total",
                "The number of replica operations performed",
                op
            ),
            replica_operation_bytes: reg!(
                IntCounterVec,
                "litestream_replica_operation_bytes",
                "The number of bytes used by replica operations",
                op
            ),
            replica_last_sync: reg!(
                GaugeVec,
                "walden_replica_last_sync_timestamp_seconds",
                "When the store last confirmed an upload, as a Unix timestamp",
                replica
            ),
            replica_lag: reg!(
                GaugeVec,
                "walden_replica_lag_seconds",
                "Age of the oldest committed data not yet uploaded (0 when caught up)",
                replica
            ),
            replica_pending_bytes: reg!(
                IntGaugeVec,
                "walden_replica_pending_bytes",
                "WAL bytes committed locally but not yet uploaded",
                replica
            ),
            replica_healthy: reg!(
                IntGaugeVec,
                "walden_replica_healthy",
                "1 when the replica is healthy, 0 otherwise",
                replica
            ),
            errors: reg!(
                IntCounterVec,
                "walden_errors_total",
                "Errors by kind",
                &["db", "name", "kind"]
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("text encoding is utf-8")
    }

    /// Creates a database's series at zero, as Litestream does, so dashboards show 0 rather
    /// than "no data" and `increase()` sees the first error.
    pub fn start_db<'a>(&self, db: &str, replicas: impl Iterator<Item = &'a str>) {
        for counter in [
            &self.sync_count,
            &self.sync_error_count,
            &self.total_wal_bytes,
        ] {
            counter.with_label_values(&[db]);
        }
        self.sync_seconds.with_label_values(&[db]);
        for name in replicas {
            self.replica_wal_bytes.with_label_values(&[db, name]);
            for status in ["ok", "error"] {
                self.replica_validation_total
                    .with_label_values(&[db, name, status]);
            }
        }
    }

    pub fn record_checkpoint(&self, db: &str, mode: &str, elapsed: Duration, ok: bool) {
        self.checkpoint_count.with_label_values(&[db, mode]).inc();
        self.checkpoint_seconds
            .with_label_values(&[db, mode])
            .inc_by(elapsed.as_secs_f64());
        if !ok {
            self.checkpoint_error_count
                .with_label_values(&[db, mode])
                .inc();
        }
    }
}

/// Seconds since the Unix epoch, as Prometheus timestamps are.
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Counts object-store requests (every attempt, failed ones too: they are billed) by backend
/// and operation, as Litestream's `litestream_replica_operation_*` do.
pub struct StoreMetrics;

impl OpRecorder for StoreMetrics {
    fn record(&self, kind: &'static str, operation: &'static str, bytes: u64) {
        let m = metrics();
        m.replica_operation_total
            .with_label_values(&[kind, operation])
            .inc();
        if bytes > 0 {
            m.replica_operation_bytes
                .with_label_values(&[kind, operation])
                .inc_by(bytes);
        }
    }
}
