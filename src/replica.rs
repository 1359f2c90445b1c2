//! A replica: one object store seen through Litestream v0.3.13's layout.
//!
//! The storage backends know only keys and bytes; replication, restore and the listing commands
//! all need the same questions answered ("which generations exist", "what is the last segment
//! of this generation"), so they are answered once here. Listings are always sorted here,
//! because v0.3.13 trusts the server's order and some S3-compatible stores do not keep it.

use std::sync::Arc;
use std::time::SystemTime;

use crate::config::{ReplicaConfig, Target};
use crate::format::{self, Pos};
use crate::observe::metrics::StoreMetrics;
use crate::storage::file::FileStore;
use crate::storage::s3::S3Store;
use crate::storage::{
    Body, ByteStream, ObjectStore, OpRecorder, Recorded, RetryPolicy, Retrying, StorageError,
};

/// A snapshot object as listed.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub generation: String,
    pub index: u32,
    pub size: u64,
    pub created: SystemTime,
}

/// A WAL segment object as listed.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    pub generation: String,
    pub pos: Pos,
    pub size: u64,
    pub created: SystemTime,
}

/// What a generation holds, for choosing one to restore and for the listing commands.
#[derive(Debug, Clone)]
pub struct GenerationInfo {
    pub generation: String,
    pub snapshots: Vec<SnapshotInfo>,
    pub segments: Vec<SegmentInfo>,
}

impl GenerationInfo {
    /// The earliest and latest storage timestamps in the generation, which is how Litestream
    /// dates a generation; `None` for an empty one (SeaweedFS lists emptied directories).
    pub fn bounds(&self) -> Option<(SystemTime, SystemTime)> {
        let times = self
            .snapshots
            .iter()
            .map(|s| s.created)
            .chain(self.segments.iter().map(|s| s.created));
        let (mut lo, mut hi) = (None::<SystemTime>, None::<SystemTime>);
        for t in times {
            lo = Some(lo.map_or(t, |l| l.min(t)));
            hi = Some(hi.map_or(t, |h| h.max(t)));
        }
        Some((lo?, hi?))
    }
}

#[derive(Debug, Clone)]
pub struct Replica {
    pub name: String,
    store: Arc<dyn ObjectStore>,
}

impl Replica {
    /// Opens the store a replica config points at, retrying transient errors per `policy`
    /// (permanent ones return at once).
    pub fn open(cfg: &ReplicaConfig, policy: RetryPolicy) -> Result<Replica, StorageError> {
        let recorder: Arc<dyn OpRecorder> = Arc::new(StoreMetrics);
        let store: Arc<dyn ObjectStore> = match &cfg.target {
            Target::File { dir } => Arc::new(Retrying::new(
                Recorded::new(FileStore::new(dir.clone()), recorder),
                policy,
            )),
            Target::S3(s3) => Arc::new(Retrying::new(
                Recorded::new(S3Store::shared(s3.clone())?, recorder),
                policy,
            )),
        };
        Ok(Replica::with_store(cfg.name.clone(), store))
    }

    pub fn with_store(name: String, store: Arc<dyn ObjectStore>) -> Replica {
        Replica { name, store }
    }

    pub fn kind(&self) -> &'static str {
        self.store.kind()
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }

    pub async fn check(&self) -> Result<(), StorageError> {
        self.store.check().await
    }

    pub async fn generations(&self) -> Result<Vec<String>, StorageError> {
        let listing = self.store.list(&format::generations_dir("")).await?;
        let mut gens: Vec<String> = listing
            .dirs
            .into_iter()
            .filter(|d| format::is_generation(d))
            .collect();
        gens.sort();
        Ok(gens)
    }

    pub async fn snapshots(&self, generation: &str) -> Result<Vec<SnapshotInfo>, StorageError> {
        let listing = self
            .store
            .list(&format::snapshots_dir("", generation))
            .await?;
        let mut out: Vec<SnapshotInfo> = listing
            .objects
            .into_iter()
            .filter_map(|e| {
                Some(SnapshotInfo {
                    generation: generation.to_string(),
                    index: format::parse_snapshot_name(&e.name)?,
                    size: e.size,
                    created: e.modified,
                })
            })
            .collect();
        out.sort_by_key(|s| s.index);
        Ok(out)
    }

    pub async fn segments(&self, generation: &str) -> Result<Vec<SegmentInfo>, StorageError> {
        let listing = self.store.list(&format::wal_dir("", generation)).await?;
        let mut out: Vec<SegmentInfo> = listing
            .objects
            .into_iter()
            .filter_map(|e| {
                Some(SegmentInfo {
                    generation: generation.to_string(),
                    pos: format::parse_wal_segment_name(&e.name)?,
                    size: e.size,
                    created: e.modified,
                })
            })
            .collect();
        out.sort_by_key(|s| s.pos);
        Ok(out)
    }

    pub async fn generation_info(&self, generation: &str) -> Result<GenerationInfo, StorageError> {
        let (snapshots, segments) =
            tokio::try_join!(self.snapshots(generation), self.segments(generation))?;
        Ok(GenerationInfo {
            generation: generation.to_string(),
            snapshots,
            segments,
        })
    }

    pub async fn put_snapshot(
        &self,
        generation: &str,
        index: u32,
        body: Body,
    ) -> Result<(), StorageError> {
        self.store
            .put(&format::snapshot_key("", generation, index), body)
            .await
    }

    pub async fn put_segment(
        &self,
        generation: &str,
        pos: Pos,
        body: Body,
    ) -> Result<(), StorageError> {
        self.store
            .put(&format::wal_segment_key("", generation, pos), body)
            .await
    }

    pub async fn get_segment(
        &self,
        generation: &str,
        pos: Pos,
    ) -> Result<bytes::Bytes, StorageError> {
        self.store
            .get(&format::wal_segment_key("", generation, pos))
            .await
    }

    pub async fn get_snapshot_stream(
        &self,
        generation: &str,
        index: u32,
    ) -> Result<ByteStream, StorageError> {
        self.store
            .get_stream(&format::snapshot_key("", generation, index))
            .await
    }

    /// Deletes the named snapshots and segments of one generation.
    pub async fn delete(
        &self,
        generation: &str,
        snapshots: &[u32],
        segments: &[Pos],
    ) -> Result<(), StorageError> {
        let keys: Vec<String> = snapshots
            .iter()
            .map(|&i| format::snapshot_key("", generation, i))
            .chain(
                segments
                    .iter()
                    .map(|&p| format::wal_segment_key("", generation, p)),
            )
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        self.store.delete(&keys).await
    }
}
