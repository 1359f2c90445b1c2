//! Counting requests as they are sent, for metrics, without the backends knowing about
//! metrics: [`Recorded`] wraps a backend and reports each attempt to an [`OpRecorder`].

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::{Body, Listing, ObjectStore, StorageError};

/// Receives one call per request attempt: backend kind, operation (`GET`, `PUT`, `LIST`,
/// `DELETE`) and payload bytes.
pub trait OpRecorder: Send + Sync {
    fn record(&self, kind: &'static str, operation: &'static str, bytes: u64);
}

/// A store whose every request is reported to a recorder. Wrapped inside [`super::Retrying`],
/// it counts attempts, which is what a provider bills.
pub struct Recorded<S> {
    inner: S,
    recorder: Arc<dyn OpRecorder>,
}

impl<S> Recorded<S> {
    pub fn new(inner: S, recorder: Arc<dyn OpRecorder>) -> Recorded<S> {
        Recorded { inner, recorder }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Recorded<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl<S: ObjectStore> Recorded<S> {
    fn note(&self, operation: &'static str, bytes: u64) {
        self.recorder.record(self.inner.kind(), operation, bytes);
    }
}

#[async_trait::async_trait]
impl<S: ObjectStore> ObjectStore for Recorded<S> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn list(&self, dir: &str) -> Result<Listing, StorageError> {
        self.note("LIST", 0);
        self.inner.list(dir).await
    }
    async fn put(&self, key: &str, body: Body) -> Result<(), StorageError> {
        let bytes = match &body {
            Body::Bytes(b) => b.len() as u64,
            Body::File(p) => std::fs::metadata(p).map_or(0, |m| m.len()),
        };
        self.note("PUT", bytes);
        self.inner.put(key, body).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let data = self.inner.get(key).await;
        self.note("GET", data.as_ref().map_or(0, |d| d.len() as u64));
        data
    }
    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<u64, StorageError> {
        let n = self.inner.get_to_file(key, dest).await;
        self.note("GET", *n.as_ref().unwrap_or(&0));
        n
    }
    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        self.note("DELETE", 0);
        self.inner.delete(keys).await
    }
    async fn check(&self) -> Result<(), StorageError> {
        self.note("LIST", 0);
        self.inner.check().await
    }
}
