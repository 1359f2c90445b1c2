//! The one retry loop for every backend.
//!
//! Backends make exactly one attempt per call (rust-s3's own retries are switched off) and
//! classify their failures; [`Retrying`] asks the error whether another attempt can help, bounds
//! each attempt with a timeout and spaces attempts with exponential backoff and jitter, so that
//! several replicas recovering from the same outage do not retry in lockstep.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::{Body, ByteStream, Listing, ObjectStore, StorageError};

/// How [`Retrying`] retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first one included; 0 behaves like 1.
    pub attempts: u32,
    /// Delay before the second attempt; it doubles for each further attempt.
    pub base_delay: Duration,
    /// Upper bound of any one delay.
    pub max_delay: Duration,
    /// Upper bound of one attempt, so that a hung connection becomes a retryable failure.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    /// Rides out a server restart of about half a minute; the per-attempt timeout leaves room
    /// for a large snapshot over a slow link.
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 6,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(15),
            timeout: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// For the replication loop, which is itself the outer retry (every sync-interval): a
    /// short burst here keeps a failed sync visible in health within seconds instead of
    /// hiding it behind half a minute of backoff.
    pub fn replication() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        }
    }

    /// One attempt with a short timeout, for start-up checks that should report a
    /// misconfiguration at once.
    pub fn probe() -> RetryPolicy {
        RetryPolicy {
            attempts: 1,
            timeout: Duration::from_secs(15),
            ..RetryPolicy::default()
        }
    }

    /// The delay after failed attempt number `attempt` (1-based): half of it fixed, half random
    /// ("equal jitter"), so retries spread out but still back off.
    fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        let capped = exp.min(self.max_delay);
        let half = capped / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Wraps any store; retries transient errors with exponential backoff and jitter and a
/// per-attempt timeout; permanent errors return at once.
#[derive(Debug)]
pub struct Retrying<S> {
    inner: S,
    policy: RetryPolicy,
}

impl<S: ObjectStore> Retrying<S> {
    pub fn new(inner: S, policy: RetryPolicy) -> Retrying<S> {
        Retrying { inner, policy }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn run<T, F, Fut>(
        &self,
        operation: &str,
        target: &str,
        mut attempt_once: F,
    ) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StorageError>>,
    {
        let attempts = self.policy.attempts.max(1);
        let mut attempt = 1;
        loop {
            let result = match tokio::time::timeout(self.policy.timeout, attempt_once()).await {
                Ok(result) => result,
                Err(_) => Err(StorageError::Timeout {
                    operation: format!("{operation} {target}"),
                    after: self.policy.timeout,
                }),
            };
            match result {
                Ok(value) => return Ok(value),
                Err(err) if err.is_permanent() || attempt >= attempts => return Err(err),
                Err(err) => {
                    let delay = self.policy.delay(attempt);
                    tracing::warn!(
                        store = %self.inner.describe(),
                        operation,
                        target,
                        attempt,
                        attempts,
                        retry_in = ?delay,
                        error = %err,
                        "storage operation failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl<S: ObjectStore> ObjectStore for Retrying<S> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn list(&self, dir: &str) -> Result<Listing, StorageError> {
        self.run("list", dir, || self.inner.list(dir)).await
    }

    async fn put(&self, key: &str, body: Body) -> Result<(), StorageError> {
        self.run("put", key, || self.inner.put(key, body.clone()))
            .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        self.run("get", key, || self.inner.get(key)).await
    }

    /// Each chunk must arrive within the per-attempt timeout, so a stalled download ends with
    /// an error instead of hanging the restore.
    async fn get_stream(&self, key: &str) -> Result<ByteStream, StorageError> {
        let stream = self.run("get", key, || self.inner.get_stream(key)).await?;
        let (after, operation) = (self.policy.timeout, format!("get {key}"));
        let stalled = move || StorageError::Timeout {
            operation: operation.clone(),
            after,
        };
        Ok(Box::pin(futures::stream::unfold(
            Some(stream),
            move |stream| {
                let stalled = stalled.clone();
                async move {
                    let mut stream = stream?;
                    match tokio::time::timeout(after, stream.next()).await {
                        Ok(Some(item)) => Some((item, Some(stream))),
                        Ok(None) => None,
                        Err(_) => Some((Err(stalled()), None)),
                    }
                }
            },
        )))
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        let target = format!("{} keys", keys.len());
        self.run("delete", &target, || self.inner.delete(keys))
            .await
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.run("check", "", || self.inner.check()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fault::{FailFirst, Op};
    use crate::storage::file::FileStore;

    fn policy(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
        }
    }

    fn transient() -> StorageError {
        StorageError::Server {
            status: 503,
            code: "SlowDown".to_owned(),
            message: "try later".to_owned(),
        }
    }

    fn store(fail: u32, error: fn() -> StorageError) -> (tempfile::TempDir, FailFirst<FileStore>) {
        let dir = tempfile::tempdir().unwrap();
        let inner = FileStore::new(dir.path().to_path_buf());
        (dir, FailFirst::new(inner, fail, error))
    }

    #[test]
    fn delays_grow_and_stay_capped() {
        let p = policy(10);
        for attempt in 1..=40 {
            let exp = Duration::from_millis(100)
                .saturating_mul(1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX))
                .min(Duration::from_secs(1));
            let d = p.delay(attempt);
            assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success() {
        let (_dir, faulty) = store(2, transient);
        let retrying = Retrying::new(faulty, policy(3));
        let started = tokio::time::Instant::now();
        retrying
            .put("a/b", Body::Bytes(Bytes::from_static(b"x")))
            .await
            .unwrap();
        assert_eq!(retrying.get("a/b").await.unwrap(), Bytes::from_static(b"x"));
        assert_eq!(retrying.inner().calls(Op::Put), 3);
        assert_eq!(retrying.inner().calls(Op::Get), 3);
        // Two backoffs per operation: at least 50 ms + 100 ms each, with jitter.
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_last_attempt() {
        let (_dir, faulty) = store(5, transient);
        let retrying = Retrying::new(faulty, policy(3));
        let err = retrying.list("x").await.unwrap_err();
        assert!(matches!(err, StorageError::Server { status: 503, .. }));
        assert_eq!(retrying.inner().calls(Op::List), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_return_at_once() {
        let (_dir, faulty) = store(5, || StorageError::Unauthorized {
            code: "InvalidAccessKeyId".to_owned(),
            message: "unknown key".to_owned(),
        });
        let retrying = Retrying::new(faulty, policy(5));
        let started = tokio::time::Instant::now();
        let err = retrying.check().await.unwrap_err();
        assert!(matches!(err, StorageError::Unauthorized { .. }));
        assert_eq!(retrying.inner().calls(Op::Check), 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_attempt_times_out_and_is_retried() {
        let (_dir, faulty) = store(0, transient);
        let faulty = faulty.hang_first(1);
        let retrying = Retrying::new(faulty, policy(2));
        retrying.delete(&["gone".to_owned()]).await.unwrap();
        assert_eq!(retrying.inner().calls(Op::Delete), 2);

        let (_dir, faulty) = store(0, transient);
        let retrying = Retrying::new(faulty.hang_first(5), policy(2));
        let err = retrying.delete(&["gone".to_owned()]).await.unwrap_err();
        assert!(matches!(err, StorageError::Timeout { .. }), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_attempts_still_tries_once() {
        let (_dir, faulty) = store(1, transient);
        let retrying = Retrying::new(faulty, policy(0));
        assert!(retrying.list("").await.is_err());
        assert_eq!(retrying.inner().calls(Op::List), 1);
    }
}
