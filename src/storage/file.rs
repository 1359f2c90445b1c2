//! A replica in a local directory (Litestream's `type: file`): keys become paths under the root.
//!
//! Writes are atomic and durable: the object is written to `<final>.tmp`, fsynced, renamed into
//! place and the directory fsynced, so a crash leaves either the old state or the whole object
//! (plus at worst a stray `.tmp`, which readers ignore because it matches no object name).
//! Deleting the last object of a directory removes the directory, so that listings look the same
//! as on S3, where directories exist only while something is in them.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use futures::StreamExt;

use super::{Body, ByteStream, Entry, Listing, ObjectStore, StorageError, key_parts};

/// Size of the chunks an object is streamed in.
const READ_CHUNK: usize = 1 << 20;

/// An [`ObjectStore`] rooted at a local directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// `root` is the replica directory; it is created on the first write if missing.
    pub fn new(root: PathBuf) -> FileStore {
        FileStore { root }
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        let mut path = self.root.clone();
        path.extend(key_parts(key)?);
        Ok(path)
    }

    fn object_path(&self, key: &str) -> Result<PathBuf, StorageError> {
        if key_parts(key)?.is_empty() {
            return Err(StorageError::InvalidKey {
                key: key.to_owned(),
                reason: "an object key needs a name".to_owned(),
            });
        }
        self.path(key)
    }
}

/// Runs blocking file-system work off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StorageError::io("file storage task failed", io::Error::other(e)))?
}

fn io_err(action: &str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let context = format!("{action} {}", path.display());
    move |source| StorageError::Io { context, source }
}

fn list_dir(dir: &Path) -> Result<Listing, StorageError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(Listing::default());
        }
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut listing = Listing::default();
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        // Object names are ASCII in practice; a name that is not UTF-8 cannot be a key.
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let meta = match fs::metadata(entry.path()) {
            Ok(meta) => meta,
            // Deleted between read_dir and stat, e.g. by retention running concurrently.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("stat", &entry.path())(e)),
        };
        if meta.is_dir() {
            listing.dirs.push(name);
        } else if meta.is_file() {
            listing.objects.push(Entry {
                name,
                size: meta.len(),
                modified: meta.modified().map_err(io_err("stat", &entry.path()))?,
            });
        }
    }
    listing.dirs.sort();
    listing.objects.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(listing)
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Creates `dir` and any missing ancestors, then fsyncs the parent of each directory it created
/// so that the new entries survive a crash.
fn create_dirs_durably(dir: &Path) -> Result<(), StorageError> {
    let mut missing = Vec::new();
    let mut cursor = dir;
    while !cursor.is_dir() {
        missing.push(cursor);
        match cursor.parent() {
            Some(parent) => cursor = parent,
            None => break,
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    for created in missing.iter().rev() {
        if let Some(parent) = created.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

fn write_atomically(path: &Path, body: &Body) -> Result<(), StorageError> {
    let dir = path.parent().expect("object paths are below the root");
    create_dirs_durably(dir)?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let written = (|| {
        let mut file = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        match body {
            Body::Bytes(bytes) => file.write_all(bytes).map_err(io_err("write", &tmp))?,
            Body::File(src) => {
                let mut input = fs::File::open(src).map_err(io_err("open upload source", src))?;
                io::copy(&mut input, &mut file).map_err(io_err("copy into", &tmp))?;
            }
        }
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))
    })();
    if written.is_err() {
        // Best effort: the original error is what matters, and a stray .tmp is harmless.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

fn open_object(path: &Path, key: &str) -> Result<fs::File, StorageError> {
    match fs::File::open(path) {
        Ok(file) if file.metadata().is_ok_and(|m| m.is_dir()) => Err(StorageError::NotFound {
            key: key.to_owned(),
        }),
        Ok(file) => Ok(file),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Err(StorageError::NotFound {
                key: key.to_owned(),
            })
        }
        Err(e) => Err(io_err("open", path)(e)),
    }
}

/// Removes `path`, then its parent directories up to (not including) `root` while they are
/// empty.
fn delete_and_prune(root: &Path, path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(());
        }
        Err(e) => return Err(io_err("delete", path)(e)),
    }
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == root || !d.starts_with(root) {
            break;
        }
        // Fails when the directory still holds something (or was just removed by a concurrent
        // delete); either way the pruning is done.
        if fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

#[async_trait::async_trait]
impl ObjectStore for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn list(&self, dir: &str) -> Result<Listing, StorageError> {
        let path = self.path(dir)?;
        blocking(move || list_dir(&path)).await
    }

    async fn put(&self, key: &str, body: Body) -> Result<(), StorageError> {
        let path = self.object_path(key)?;
        blocking(move || write_atomically(&path, &body)).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = self.object_path(key)?;
        let key = key.to_owned();
        blocking(move || {
            let mut file = open_object(&path, &key)?;
            let mut buf = Vec::new();
            io::Read::read_to_end(&mut file, &mut buf).map_err(io_err("read", &path))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn get_stream(&self, key: &str) -> Result<ByteStream, StorageError> {
        let path = self.object_path(key)?;
        let key = key.to_owned();
        let file = {
            let path = path.clone();
            blocking(move || open_object(&path, &key)).await?
        };
        let chunks = tokio_util::io::ReaderStream::with_capacity(
            tokio::fs::File::from_std(file),
            READ_CHUNK,
        );
        Ok(Box::pin(chunks.map(move |chunk| {
            chunk.map_err(|e| StorageError::io(format!("read {}", path.display()), e))
        })))
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        let paths = keys
            .iter()
            .map(|k| self.object_path(k))
            .collect::<Result<Vec<_>, _>>()?;
        let root = self.root.clone();
        blocking(move || {
            paths
                .iter()
                .try_for_each(|path| delete_and_prune(&root, path))
        })
        .await
    }

    async fn check(&self) -> Result<(), StorageError> {
        let root = self.root.clone();
        blocking(move || {
            create_dirs_durably(&root)?;
            if fs::metadata(&root).is_ok_and(|m| m.is_dir()) {
                Ok(())
            } else {
                Err(StorageError::Config {
                    message: format!("replica path {} is not a directory", root.display()),
                })
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &'static str) -> Body {
        Body::Bytes(Bytes::from_static(s.as_bytes()))
    }

    #[tokio::test]
    async fn round_trip_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("replica"));
        assert_eq!(store.list("generations").await.unwrap(), Listing::default());
        store
            .put("generations/b/wal/2", bytes("two"))
            .await
            .unwrap();
        store
            .put("generations/b/wal/1", bytes("one"))
            .await
            .unwrap();
        store.put("generations/a/x", bytes("a")).await.unwrap();

        let gens = store.list("generations/").await.unwrap();
        assert_eq!(gens.dirs, ["a", "b"]);
        assert!(gens.objects.is_empty());
        let wal = store.list("generations/b/wal").await.unwrap();
        let names: Vec<_> = wal.objects.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["1", "2"]);
        assert_eq!(wal.objects[1].size, 3);
        assert_eq!(store.get("generations/b/wal/1").await.unwrap(), "one");

        let streamed: Vec<Bytes> = store
            .get_stream("generations/b/wal/2")
            .await
            .unwrap()
            .map(|chunk| chunk.unwrap())
            .collect()
            .await;
        assert_eq!(streamed.concat(), b"two");

        store
            .delete(&["generations/a/x".to_owned(), "missing/key".to_owned()])
            .await
            .unwrap();
        assert_eq!(store.list("generations").await.unwrap().dirs, ["b"]);
        assert!(matches!(
            store.get("generations/a/x").await,
            Err(StorageError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn put_from_file_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::write(&src, vec![7u8; 100_000]).unwrap();
        let store = FileStore::new(dir.path().join("replica"));
        store.put("k", bytes("old")).await.unwrap();
        store.put("k", Body::File(src)).await.unwrap();
        assert_eq!(store.get("k").await.unwrap().len(), 100_000);
        let names: Vec<_> = fs::read_dir(dir.path().join("replica"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["k"]);
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let store = FileStore::new(PathBuf::from("/nonexistent"));
        assert!(matches!(
            store.put("../x", bytes("x")).await,
            Err(StorageError::InvalidKey { .. })
        ));
        assert!(matches!(
            store.get("").await,
            Err(StorageError::InvalidKey { .. })
        ));
    }
}
