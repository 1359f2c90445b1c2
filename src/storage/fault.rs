//! A test-only store wrapper that fails (or hangs) the first attempts of each kind of operation,
//! or cuts off the first downloads midway, so that [`super::Retrying`] and the readers of
//! streams can be exercised deterministically without a flaky server.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use futures::TryStreamExt;

use super::{Body, ByteStream, Listing, ObjectStore, StorageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    List,
    Put,
    Get,
    Delete,
    Check,
}

#[derive(Debug)]
pub struct FailFirst<S> {
    inner: S,
    fail_first: u32,
    hang_first: u32,
    cut_first: u32,
    error: fn() -> StorageError,
    calls: Mutex<HashMap<Op, u32>>,
}

impl<S: ObjectStore> FailFirst<S> {
    /// Fails the first `fail_first` attempts of each operation with `error()`.
    pub fn new(inner: S, fail_first: u32, error: fn() -> StorageError) -> FailFirst<S> {
        FailFirst {
            inner,
            fail_first,
            hang_first: 0,
            cut_first: 0,
            error,
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// Makes the first `n` attempts of each operation never finish, to test timeouts.
    pub fn hang_first(self, n: u32) -> FailFirst<S> {
        FailFirst {
            hang_first: n,
            ..self
        }
    }

    /// Makes the first `n` streams that open deliver their first kilobyte and then end with
    /// `error()`, as a dropped connection does.
    pub fn cut_first(self, n: u32) -> FailFirst<S> {
        FailFirst {
            cut_first: n,
            ..self
        }
    }

    /// How many attempts of `op` were made.
    pub fn calls(&self, op: Op) -> u32 {
        self.calls.lock().unwrap().get(&op).copied().unwrap_or(0)
    }

    /// Counts an attempt of `op` and fails or hangs it as configured; returns its number.
    async fn inject(&self, op: Op) -> Result<u32, StorageError> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(op).or_insert(0);
            *n += 1;
            *n
        };
        if n <= self.hang_first {
            std::future::pending::<()>().await;
        }
        if n <= self.fail_first {
            return Err((self.error)());
        }
        Ok(n)
    }
}

#[async_trait::async_trait]
impl<S: ObjectStore> ObjectStore for FailFirst<S> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }

    async fn list(&self, dir: &str) -> Result<Listing, StorageError> {
        self.inject(Op::List).await?;
        self.inner.list(dir).await
    }

    async fn put(&self, key: &str, body: Body) -> Result<(), StorageError> {
        self.inject(Op::Put).await?;
        self.inner.put(key, body).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        self.inject(Op::Get).await?;
        self.inner.get(key).await
    }

    async fn get_stream(&self, key: &str) -> Result<ByteStream, StorageError> {
        let attempt = self.inject(Op::Get).await?;
        let stream = self.inner.get_stream(key).await?;
        if attempt > self.cut_first {
            return Ok(stream);
        }
        let chunks: Vec<Bytes> = stream.try_collect().await?;
        let whole = Bytes::from(chunks.concat());
        let first = whole.slice(..whole.len().min(1024));
        Ok(Box::pin(futures::stream::iter([
            Ok(first),
            Err((self.error)()),
        ])))
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        self.inject(Op::Delete).await?;
        self.inner.delete(keys).await
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.inject(Op::Check).await?;
        self.inner.check().await
    }
}
