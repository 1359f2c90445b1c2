//! Counting requests as they are sent, for metrics, without the backends knowing about
//! metrics: [`Recorded`] wraps a backend and reports each attempt to an [`OpRecorder`].

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use super::{Body, ByteStream, Listing, ObjectStore, StorageError};

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

/// Reports one GET with the bytes its stream delivered when the stream is dropped, however it
/// ended.
struct Counted {
    recorder: Arc<dyn OpRecorder>,
    kind: &'static str,
    bytes: u64,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.recorder.record(self.kind, "GET", self.bytes);
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
    /// A failed open counts as a request with no bytes; an opened stream counts once, with
    /// the bytes it delivered, when it is dropped.
    async fn get_stream(&self, key: &str) -> Result<ByteStream, StorageError> {
        let stream = match self.inner.get_stream(key).await {
            Ok(stream) => stream,
            Err(e) => {
                self.note("GET", 0);
                return Err(e);
            }
        };
        let mut counted = Counted {
            recorder: self.recorder.clone(),
            kind: self.inner.kind(),
            bytes: 0,
        };
        Ok(Box::pin(stream.inspect(move |item| {
            // Through a reference, so the closure owns the whole counter (and its `Drop`),
            // not a copy of its byte field.
            let counted = &mut counted;
            if let Ok(chunk) = item {
                counted.bytes += chunk.len() as u64;
            }
        })))
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
