//! Checks that the shared test harness (`tests/support`) works: a real S3 server that enforces
//! SigV4, the reference binaries, the SQLite helpers and the process helpers.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use s3::Bucket;
use s3::error::S3Error;
use support::*;

fn status_of<T>(result: Result<T, S3Error>) -> Option<u16> {
    match result {
        Ok(_) => None,
        Err(S3Error::HttpFailWithBody(code, _)) => Some(code),
        Err(e) => panic!("expected an HTTP error, got: {e}"),
    }
}

#[test]
fn s3_server_accepts_the_right_secret_and_refuses_a_wrong_one() {
    let s3 = shared_s3();
    assert!(
        s3.endpoint.starts_with("http://127.0.0.1:"),
        "{}",
        s3.endpoint
    );
    let prefix = s3.prefix("sigv4");

    s3.put(&format!("{prefix}/good"), b"hello");
    assert_eq!(s3.get(&format!("{prefix}/good")), b"hello");
    assert_eq!(s3.list_keys(&prefix), vec![format!("{prefix}/good")]);

    let wrong = s3.s3_bucket_with_secret("not-the-secret");
    assert_eq!(
        status_of(block_on(wrong.put_object(format!("{prefix}/bad"), b"x"))),
        Some(403)
    );
    assert_eq!(
        status_of(block_on(wrong.list(prefix.clone(), None))),
        Some(403)
    );
    assert_eq!(
        status_of(block_on(wrong.get_object(format!("{prefix}/good")))),
        Some(403)
    );

    let anonymous = Bucket::new_public(
        &s3.bucket,
        s3::Region::Custom {
            region: s3.region.clone(),
            endpoint: s3.endpoint.clone(),
        },
    )
    .unwrap()
    .with_path_style();
    assert_eq!(
        status_of(block_on(anonymous.get_object(format!("{prefix}/good")))),
        Some(403)
    );

    // Nothing the refused requests sent was stored.
    assert_eq!(s3.list_keys(&prefix), vec![format!("{prefix}/good")]);
}

#[test]
fn prefixes_are_unique_and_key_safe() {
    let s3 = shared_s3();
    let a = s3.prefix("same name");
    let b = s3.prefix("same name");
    assert_ne!(a, b);
    assert!(a.starts_with("t-same-name-"), "{a}");
    assert!(
        a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
        "{a}"
    );
}

#[test]
fn litestream_0_3_13_reports_its_version() {
    let s3 = shared_s3();
    let out = run_with_env(&litestream_03(), ["version"], s3);
    assert_eq!(
        expect_success("litestream 0.3.13 version", &out).trim(),
        "v0.3.13"
    );
}

#[test]
fn litestream_0_5_17_reports_its_version() {
    let s3 = shared_s3();
    let out = run_with_env(&litestream_05(), ["version"], s3);
    assert_eq!(
        expect_success("litestream 0.5.17 version", &out).trim(),
        "0.5.17"
    );
}

#[test]
fn test_env_has_explicit_credentials_and_nothing_inherited() {
    let s3 = shared_s3();
    let env = test_env(s3);
    let get = |k: &str| {
        env.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("AWS_ACCESS_KEY_ID"), vec![s3.access_key.as_str()]);
    assert_eq!(get("AWS_SECRET_ACCESS_KEY"), vec![s3.secret_key.as_str()]);
    assert_eq!(get("AWS_EC2_METADATA_DISABLED"), vec!["true"]);
    assert!(get("AWS_CA_BUNDLE").is_empty());
    assert!(env.iter().all(|(k, _)| !k.starts_with("LITESTREAM_")));
}

fn make_db(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE b (id INTEGER PRIMARY KEY, name TEXT, score REAL, data BLOB);
         CREATE TABLE a (k TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID;
         CREATE INDEX b_name ON b (name);
         INSERT INTO b VALUES (2, 'it''s', 1.5, x'00ff');
         INSERT INTO b VALUES (1, NULL, 2.0, NULL);
         INSERT INTO a VALUES ('z', 26), ('y', 25);",
    )
    .unwrap();
    conn
}

#[test]
fn dump_lists_schema_and_rows_in_a_stable_order() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let writer = make_db(&db);

    // The writer is still open and the rows are only in the WAL: dump must see them.
    let expected = "\
schema index b_name: CREATE INDEX b_name ON b (name)
schema table a: CREATE TABLE a (k TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID
schema table b: CREATE TABLE b (id INTEGER PRIMARY KEY, name TEXT, score REAL, data BLOB)
a: 'y'|25
a: 'z'|26
b: 1|NULL|2.0|NULL
b: 2|'it''s'|1.5|X'00ff'
";
    assert_eq!(dump(&db), expected);
    assert_eq!(integrity_check(&db), "ok");

    // Same content written in another order gives the same dump.
    let other = dir.path().join("other.db");
    let conn = Connection::open(&other).unwrap();
    conn.execute_batch(
        "CREATE TABLE a (k TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID;
         INSERT INTO a VALUES ('y', 25), ('z', 26);
         CREATE TABLE b (id INTEGER PRIMARY KEY, name TEXT, score REAL, data BLOB);
         INSERT INTO b VALUES (1, NULL, 2.0, NULL), (2, 'it''s', 1.5, x'00ff');
         CREATE INDEX b_name ON b (name);",
    )
    .unwrap();
    drop(conn);
    assert_eq!(dump(&other), expected);

    writer.execute("DELETE FROM b WHERE id = 2", []).unwrap();
    assert_ne!(dump(&db), expected);
}

#[test]
fn integrity_check_reports_a_corrupt_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bad.db");
    let conn = Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE t (x TEXT); CREATE INDEX t_x ON t (x);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
         INSERT INTO t SELECT printf('row %d', i) FROM n;",
    )
    .unwrap();
    drop(conn);
    assert_eq!(integrity_check(&db), "ok");
    // Overwrite the tail of the file (index and table leaf pages) with garbage.
    let mut bytes = std::fs::read(&db).unwrap();
    let len = bytes.len();
    for b in &mut bytes[len - 3 * 4096..len - 4096] {
        *b = 0x5a;
    }
    std::fs::write(&db, bytes).unwrap();
    assert_ne!(integrity_check(&db), "ok");
}

#[test]
fn run_kills_a_command_that_outlives_its_timeout() {
    let started = Instant::now();
    let out = run(
        Command::new("sh").args(["-c", "echo before; sleep 30"]),
        Duration::from_millis(300),
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(9)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "before\n");

    let out = run(
        Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn child_guard_kills_its_child_on_drop() {
    let guard = ChildGuard::spawn(Command::new("sleep").arg("30"));
    let pid = guard.pid();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(guard);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn own_server_stops_restarts_with_its_data_and_cleans_up() {
    let mut s3 = S3Server::start();
    let prefix = s3.prefix("restart");
    let key = format!("{prefix}/kept");
    s3.put(&key, b"survives a restart");
    let pid = s3.pid().unwrap();

    s3.stop();
    assert_eq!(s3.pid(), None);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    let down = s3.s3_bucket();
    let refused = block_on(down.list(prefix.clone(), None));
    assert!(refused.is_err(), "a stopped server answered");

    s3.restart();
    assert_eq!(s3.get(&key), b"survives a restart");
    assert_eq!(s3.list_keys(&prefix), vec![key]);

    let pid = s3.pid().unwrap();
    drop(s3);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}
