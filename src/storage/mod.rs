//! Object storage behind one trait, so replication and restore never care whether the replica is
//! an S3 bucket or a local directory.
//!
//! The principal types are [`ObjectStore`] (the operations every backend offers),
//! [`file::FileStore`] and [`s3::S3Store`] (the two backends) and [`Retrying`] (a wrapper that
//! owns the retry policy for every backend).
//!
//! Invariant: this module knows nothing about Litestream's layout. A store is rooted at a prefix
//! (a bucket prefix or a directory) and deals in keys relative to it; the `format` module decides
//! what the keys are called.
//!
//! Invariant: no error message, `Debug` or `Display` output here contains a credential.

pub mod file;
mod recorded;
mod retry;
pub mod s3;

#[cfg(test)]
pub(crate) mod fault;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

pub use recorded::{OpRecorder, Recorded};
pub use retry::{RetryPolicy, Retrying};

/// One object found by [`ObjectStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Base name within the listed directory.
    pub name: String,
    pub size: u64,
    /// S3 `LastModified` or the file's mtime; Litestream derives snapshot and segment creation
    /// times from it, as nothing inside the objects records a time.
    pub modified: SystemTime,
}

/// What one directory level holds. Backends sort both lists by name themselves: some
/// S3-compatible servers do not return keys in lexicographic order, and Litestream's readers
/// depend on that order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Base names of sub-directories (S3 common prefixes), without a trailing `/`. On S3 a
    /// directory disappears with its last object, but filer-backed servers such as SeaweedFS
    /// keep listing it empty, so callers must not take a listed directory to hold anything.
    pub dirs: Vec<String>,
    pub objects: Vec<Entry>,
}

/// An object's content as it arrives; see [`ObjectStore::get_stream`].
pub type ByteStream = futures::stream::BoxStream<'static, Result<Bytes, StorageError>>;

/// The content of an object to upload.
#[derive(Clone)]
pub enum Body {
    Bytes(Bytes),
    /// Streamed from disk so that uploading a large snapshot keeps memory bounded; S3 uses a
    /// multipart upload above [`s3::MULTIPART_THRESHOLD`].
    File(PathBuf),
}

/// Object contents are never useful in logs and may be large, so only their size or path shows.
impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Body::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// Why a storage operation failed. Each variant says whether a retry can help
/// ([`StorageError::is_permanent`]), so the retry loop decides from the error alone.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {key} not found")]
    NotFound { key: String },
    #[error(
        "storage rejected the credentials ({code}: {message}); check the access key id and secret access key"
    )]
    Unauthorized { code: String, message: String },
    #[error("bucket {bucket} does not exist; create it or fix the bucket name")]
    NoSuchBucket { bucket: String },
    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("{operation} timed out after {after:?}")]
    Timeout { operation: String, after: Duration },
    #[error("storage server answered {status} {code}: {message}")]
    Server {
        status: u16,
        code: String,
        message: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid storage configuration: {message}")]
    Config { message: String },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    /// The server answered something this client cannot interpret (malformed XML, a transfer
    /// cut short); a proxy or an overloaded server produces these, so they are retried.
    #[error("unexpected answer from storage: {message}")]
    Protocol { message: String },
}

impl StorageError {
    /// A short, stable name for metrics and health: what kind of trouble this is.
    pub fn kind(&self) -> &'static str {
        match self {
            StorageError::NotFound { .. } => "not_found",
            StorageError::Unauthorized { .. } => "unauthorized",
            StorageError::NoSuchBucket { .. } => "no_such_bucket",
            StorageError::Unreachable { .. } => "unreachable",
            StorageError::Timeout { .. } => "timeout",
            StorageError::Server { .. } => "server",
            StorageError::Io { .. } => "io",
            StorageError::Config { .. } => "config",
            StorageError::InvalidKey { .. } => "invalid_key",
            StorageError::Protocol { .. } => "protocol",
        }
    }

    /// True when repeating the same request cannot succeed, so the retry loop gives up at once.
    pub fn is_permanent(&self) -> bool {
        match self {
            StorageError::NotFound { .. }
            | StorageError::Unauthorized { .. }
            | StorageError::NoSuchBucket { .. }
            | StorageError::Config { .. }
            | StorageError::InvalidKey { .. } => true,
            StorageError::Unreachable { .. }
            | StorageError::Timeout { .. }
            | StorageError::Protocol { .. } => false,
            // 4xx means the request itself is wrong; 5xx, throttling and anything unexpected
            // (such as an error document inside a 200 answer) may pass on the next attempt.
            StorageError::Server { status, .. } => {
                (400..500).contains(status) && *status != 408 && *status != 429
            }
            StorageError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::InvalidInput
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::IsADirectory
                    | std::io::ErrorKind::NotADirectory
            ),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> StorageError {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The operations replication and restore need from a replica, whatever holds it.
///
/// Keys and directories are relative to the store's root and use `/` as separator.
#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// `"s3"` or `"file"`.
    fn kind(&self) -> &'static str;

    /// Where the store points, for logs and messages; never contains a credential.
    fn describe(&self) -> String;

    /// Lists one directory level. A directory that does not exist is an empty listing, because
    /// object stores have no directories to be missing.
    async fn list(&self, dir: &str) -> Result<Listing, StorageError>;

    /// Writes the whole object so that readers see either nothing or all of it.
    async fn put(&self, key: &str, body: Body) -> Result<(), StorageError>;

    async fn get(&self, key: &str) -> Result<Bytes, StorageError>;

    /// Opens the object as a stream of chunks, so that a snapshot of gigabytes is decoded while
    /// it downloads instead of first landing in a scratch file (writing and reading that file
    /// back cost a restore more than the decoding). Only opening is retried ([`Retrying`]); an
    /// error in the middle ends the stream, and the reader decides whether to start over.
    async fn get_stream(&self, key: &str) -> Result<ByteStream, StorageError>;

    /// Deletes the keys; keys that do not exist are not an error.
    async fn delete(&self, keys: &[String]) -> Result<(), StorageError>;

    /// A cheap request that proves, at startup, that the store is reachable, the credentials are
    /// accepted and the bucket exists, with a distinct error for each failure.
    async fn check(&self) -> Result<(), StorageError>;
}

#[async_trait::async_trait]
impl<T: ObjectStore + ?Sized> ObjectStore for Box<T> {
    fn kind(&self) -> &'static str {
        (**self).kind()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    async fn list(&self, dir: &str) -> Result<Listing, StorageError> {
        (**self).list(dir).await
    }
    async fn put(&self, key: &str, body: Body) -> Result<(), StorageError> {
        (**self).put(key, body).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        (**self).get(key).await
    }
    async fn get_stream(&self, key: &str) -> Result<ByteStream, StorageError> {
        (**self).get_stream(key).await
    }
    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        (**self).delete(keys).await
    }
    async fn check(&self) -> Result<(), StorageError> {
        (**self).check().await
    }
}

/// Splits a relative key into its non-empty `/`-separated parts, collapsing `//` and `.` the way
/// Go's `path.Join` does, and refuses `..` so that no key can leave the store's root.
pub(crate) fn key_parts(key: &str) -> Result<Vec<&str>, StorageError> {
    let mut parts = Vec::new();
    for part in key.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(StorageError::InvalidKey {
                    key: key.to_owned(),
                    reason: "\"..\" is not allowed in object keys".to_owned(),
                });
            }
            part => parts.push(part),
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parts_cleans_like_path_join() {
        assert_eq!(
            key_parts("generations//0123/./wal/").unwrap(),
            ["generations", "0123", "wal"]
        );
        assert!(key_parts("").unwrap().is_empty());
        assert!(matches!(
            key_parts("a/../b"),
            Err(StorageError::InvalidKey { .. })
        ));
    }

    #[test]
    fn permanence_follows_the_cause() {
        let server = |status| StorageError::Server {
            status,
            code: String::new(),
            message: String::new(),
        };
        assert!(!server(503).is_permanent());
        assert!(!server(429).is_permanent());
        assert!(server(400).is_permanent());
        assert!(
            StorageError::NotFound {
                key: "k".to_owned()
            }
            .is_permanent()
        );
        assert!(
            !StorageError::Unreachable {
                endpoint: "e".to_owned(),
                reason: "r".to_owned()
            }
            .is_permanent()
        );
        assert!(!StorageError::io("write", std::io::Error::other("disk hiccup")).is_permanent());
    }

    #[test]
    fn body_debug_hides_contents() {
        let body = Body::Bytes(Bytes::from_static(b"secret page"));
        assert_eq!(format!("{body:?}"), "Bytes(11 bytes)");
    }
}
