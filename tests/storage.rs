//! The storage backends against real storage: a local directory and a real SeaweedFS with SigV4
//! enforced (from the shared harness), each test under its own random prefix.

mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use walden::storage::file::FileStore;
use walden::storage::s3::{S3Config, S3Store};
use walden::storage::{Body, ObjectStore, StorageError};

fn s3_config(s3: &support::S3Server, prefix: &str) -> S3Config {
    S3Config {
        bucket: s3.bucket.clone(),
        prefix: prefix.to_owned(),
        endpoint: Some(s3.endpoint.clone()),
        region: s3.region.clone(),
        access_key_id: s3.access_key.clone(),
        secret_access_key: s3.secret_key.clone(),
        session_token: None,
        force_path_style: true,
        skip_verify: false,
    }
}

fn s3_store(name: &str) -> (S3Store, String) {
    let s3 = support::shared_s3();
    let prefix = s3.prefix(name);
    (S3Store::new(s3_config(s3, &prefix)).unwrap(), prefix)
}

fn bytes(s: &'static str) -> Body {
    Body::Bytes(Bytes::from_static(s.as_bytes()))
}

fn names(store_listing: &walden::storage::Listing) -> Vec<&str> {
    store_listing
        .objects
        .iter()
        .map(|e| e.name.as_str())
        .collect()
}

/// An object read through `get_stream`, whole.
async fn streamed(store: &dyn ObjectStore, key: &str) -> Vec<u8> {
    let chunks: Vec<Bytes> = store
        .get_stream(key)
        .await
        .unwrap()
        .map(|chunk| chunk.unwrap())
        .collect()
        .await;
    chunks.concat()
}

/// The behaviour every backend must share: one scenario, run against each of them.
async fn round_trip(store: &dyn ObjectStore) {
    store.check().await.unwrap();
    let empty = store
        .list("generations/0123456789abcdef/wal")
        .await
        .unwrap();
    assert!(empty.dirs.is_empty() && empty.objects.is_empty());

    // Written out of order: listings must come back sorted whatever the server does.
    for key in [
        "generations/bbbbbbbbbbbbbbbb/wal/00000001_00000000.wal.lz4",
        "generations/bbbbbbbbbbbbbbbb/wal/00000000_00001038.wal.lz4",
        "generations/bbbbbbbbbbbbbbbb/wal/00000000_00000000.wal.lz4",
        "generations/aaaaaaaaaaaaaaaa/snapshots/00000000.snapshot.lz4",
        "generations/README",
    ] {
        store.put(key, bytes("payload")).await.unwrap();
    }

    let root = store.list("").await.unwrap();
    assert_eq!(root.dirs, ["generations"]);
    assert!(root.objects.is_empty());

    let gens = store.list("generations/").await.unwrap();
    assert_eq!(gens.dirs, ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]);
    assert_eq!(names(&gens), ["README"]);

    let wal = store
        .list("generations/bbbbbbbbbbbbbbbb/wal")
        .await
        .unwrap();
    assert!(wal.dirs.is_empty());
    assert_eq!(
        names(&wal),
        [
            "00000000_00000000.wal.lz4",
            "00000000_00001038.wal.lz4",
            "00000001_00000000.wal.lz4"
        ]
    );
    let entry = &wal.objects[0];
    assert_eq!(entry.size, 7);
    let age = std::time::SystemTime::now()
        .duration_since(entry.modified)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(300), "modified {age:?} ago");

    let key = "generations/aaaaaaaaaaaaaaaa/snapshots/00000000.snapshot.lz4";
    assert_eq!(store.get(key).await.unwrap(), "payload");
    assert_eq!(streamed(store, key).await, b"payload");

    let missing = store.get("generations/nope").await.unwrap_err();
    assert!(
        matches!(&missing, StorageError::NotFound { key } if key == "generations/nope"),
        "{missing:?}"
    );
    assert!(missing.is_permanent());

    store
        .put(key, Body::Bytes(Bytes::from_static(b"replaced")))
        .await
        .unwrap();
    assert_eq!(store.get(key).await.unwrap(), "replaced");

    store
        .delete(&[key.to_owned(), "generations/never-written".to_owned()])
        .await
        .unwrap();
    assert!(matches!(
        store.get(key).await,
        Err(StorageError::NotFound { .. })
    ));
    let snapshots = store
        .list("generations/aaaaaaaaaaaaaaaa/snapshots")
        .await
        .unwrap();
    assert!(snapshots.objects.is_empty());
}

#[tokio::test]
async fn s3_round_trip() {
    let (store, prefix) = s3_store("round-trip");
    round_trip(&store).await;
    let keys = support::shared_s3().list_keys(&format!("{prefix}/"));
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert!(
        keys.iter()
            .all(|k| k.starts_with(&format!("{prefix}/generations/")))
    );
}

#[tokio::test]
async fn s3_multipart_upload_streams_a_large_file() {
    let (store, prefix) = s3_store("multipart");
    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().join("snapshot");
    // 2.5 parts of 8 MiB, with content that differs per position so a misordered part shows.
    let len = 20 * 1024 * 1024 + 12_345;
    let content: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&src, &content).unwrap();

    store
        .put("snapshots/big", Body::File(src.clone()))
        .await
        .unwrap();
    let listing = store.list("snapshots").await.unwrap();
    assert_eq!(listing.objects[0].size, len as u64);

    assert!(
        streamed(&store, "snapshots/big").await == content,
        "content differs"
    );

    // Just below the threshold: a single PUT from the file.
    std::fs::write(&src, &content[..1024 * 1024]).unwrap();
    store.put("snapshots/small", Body::File(src)).await.unwrap();
    assert_eq!(
        store.get("snapshots/small").await.unwrap(),
        content[..1024 * 1024]
    );
    assert_eq!(
        support::shared_s3()
            .list_keys(&format!("{prefix}/snapshots/"))
            .len(),
        2
    );
}

/// More than one page of listing (1000 keys) and more than one DeleteObjects batch.
#[tokio::test]
async fn s3_listing_paginates_and_delete_batches() {
    let (store, _prefix) = s3_store("paginate");
    let keys: Vec<String> = (0..1003).map(|i| format!("wal/{i:08x}")).collect();
    futures::stream::iter(keys.iter())
        .for_each_concurrent(16, |key| {
            let store = &store;
            async move { store.put(key, bytes("x")).await.unwrap() }
        })
        .await;
    let listing = store.list("wal").await.unwrap();
    let listed: Vec<String> = listing
        .objects
        .into_iter()
        .map(|e| format!("wal/{}", e.name))
        .collect();
    assert_eq!(listed, keys);

    store.delete(&keys).await.unwrap();
    assert!(store.list("wal").await.unwrap().objects.is_empty());
}

#[tokio::test]
async fn s3_wrong_secret_is_unauthorized_without_leaking_it() {
    let s3 = support::shared_s3();
    let secret = "wrong-secret-do-not-print-0123456789";
    let store = S3Store::new(S3Config {
        secret_access_key: secret.to_owned(),
        ..s3_config(s3, &s3.prefix("bad-secret"))
    })
    .unwrap();
    for err in [
        store.check().await.unwrap_err(),
        store.put("k", bytes("x")).await.unwrap_err(),
        store.get("k").await.unwrap_err(),
    ] {
        assert!(
            matches!(&err, StorageError::Unauthorized { code, .. } if code == "SignatureDoesNotMatch"),
            "{err:?}"
        );
        assert!(err.is_permanent());
        let shown = format!("{err} {err:?} {store:?} {}", store.describe());
        assert!(!shown.contains(secret), "{shown}");
        assert!(!shown.contains(&s3.secret_key), "{shown}");
    }
}

#[tokio::test]
async fn s3_unknown_access_key_is_unauthorized() {
    let s3 = support::shared_s3();
    let store = S3Store::new(S3Config {
        access_key_id: "NOSUCHKEY".to_owned(),
        ..s3_config(s3, "x")
    })
    .unwrap();
    let err = store.check().await.unwrap_err();
    assert!(matches!(err, StorageError::Unauthorized { .. }), "{err:?}");
}

#[tokio::test]
async fn s3_missing_bucket_is_no_such_bucket() {
    let s3 = support::shared_s3();
    let store = S3Store::new(S3Config {
        bucket: "walden-no-such-bucket".to_owned(),
        ..s3_config(s3, "x")
    })
    .unwrap();
    for err in [
        store.check().await.unwrap_err(),
        store.list("generations").await.unwrap_err(),
    ] {
        assert!(
            matches!(&err, StorageError::NoSuchBucket { bucket } if bucket == "walden-no-such-bucket"),
            "{err:?}"
        );
        assert!(err.is_permanent());
    }
}

#[tokio::test]
async fn s3_closed_port_is_unreachable_quickly() {
    let port = {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap().port()
    };
    let store = S3Store::new(S3Config {
        bucket: "walden".to_owned(),
        prefix: "x".to_owned(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: String::new(),
        access_key_id: "AKID".to_owned(),
        secret_access_key: "closed-port-secret".to_owned(),
        session_token: None,
        force_path_style: true,
        skip_verify: false,
    })
    .unwrap();
    let started = Instant::now();
    let err = store.check().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(&err, StorageError::Unreachable { endpoint, .. } if endpoint.contains(&port.to_string())),
        "{err:?}"
    );
    assert!(!err.is_permanent());
    assert!(!err.to_string().contains("closed-port-secret"));
}

#[tokio::test]
async fn file_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("replica"));
    round_trip(&store).await;
    // Unlike SeaweedFS, the file backend removes directories that became empty.
    assert_eq!(
        store.list("generations").await.unwrap().dirs,
        ["bbbbbbbbbbbbbbbb"]
    );
}

#[tokio::test]
async fn file_put_is_atomic_and_leaves_no_tmp() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("replica");
    let store = FileStore::new(root.clone());
    let src = dir.path().join("src");
    std::fs::write(&src, vec![1u8; 3 * 1024 * 1024]).unwrap();

    store.put("gen/snap", bytes("first")).await.unwrap();
    store.put("gen/snap", Body::File(src)).await.unwrap();
    store.put("gen/wal", bytes("w")).await.unwrap();

    let mut files: Vec<String> = std::fs::read_dir(root.join("gen"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["snap", "wal"]);
    assert_eq!(store.get("gen/snap").await.unwrap().len(), 3 * 1024 * 1024);

    // A failed write (the source vanished) leaves neither the object nor a .tmp behind.
    let err = store
        .put("gen/other", Body::File(dir.path().join("missing")))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Io { .. }), "{err:?}");
    assert_eq!(std::fs::read_dir(root.join("gen")).unwrap().count(), 2);
}
