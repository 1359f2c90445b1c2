//! Replication behaviour that is Walden's own rather than a format question: several databases
//! with several replicas in one process, a writer that never pauses, surviving an S3 outage
//! without losing a transaction, and retention that keeps every point inside its window
//! restorable.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use rusqlite::Connection;
use support::{
    ChildGuard, S3Server, app_writer, dump, integrity_check, row_count, shared_s3, test_env,
    walden_bin,
};

fn insert(conn: &Connection, n: usize) {
    for _ in 0..n {
        conn.execute("INSERT INTO t (v) VALUES (randomblob(200))", [])
            .unwrap();
    }
}

/// The environment for walden, with `AWS_CA_BUNDLE` back when the machine sets it: Walden must
/// start with it (Litestream 0.5.17 refuses to).
fn walden_env(s3: &S3Server) -> Vec<(String, String)> {
    let mut env = test_env(s3);
    if let Ok(bundle) = std::env::var("AWS_CA_BUNDLE") {
        env.push(("AWS_CA_BUNDLE".into(), bundle));
    }
    env
}

fn start(config: &Path, s3: &S3Server, log: &Path) -> ChildGuard {
    let log = std::fs::File::create(log).unwrap();
    ChildGuard::spawn(
        Command::new(walden_bin())
            .args(["replicate", "-config"])
            .arg(config)
            .env_clear()
            .envs(walden_env(s3))
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    )
}

fn stop(mut walden: ChildGuard, log: &Path) {
    walden.signal(Signal::SIGTERM);
    let status = walden
        .wait_timeout(Duration::from_secs(60))
        .expect("walden did not stop within 60 s");
    assert_eq!(
        status.code(),
        Some(0),
        "walden exit status\n--- log ---\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn restore(config: &Path, s3: &S3Server, db: &Path, out: &Path, extra: &[&str]) {
    let output = support::run(
        Command::new(walden_bin())
            .args(["restore", "-config"])
            .arg(config)
            .args(extra)
            .arg("-o")
            .arg(out)
            .arg(db)
            .env_clear()
            .envs(walden_env(s3)),
        Duration::from_secs(120),
    );
    support::expect_success("walden restore", &output);
    assert_eq!(integrity_check(out), "ok");
}

fn s3_replica(s3: &S3Server, name: &str, prefix: &str, extra: &str) -> String {
    format!(
        "      - type: s3\n        name: {name}\n        bucket: {}\n        path: {prefix}\n        \
         endpoint: {}\n        region: {}\n        sync-interval: 200ms\n{extra}",
        s3.bucket, s3.endpoint, s3.region
    )
}

fn file_replica(name: &str, dir: &Path, extra: &str) -> String {
    format!(
        "      - type: file\n        name: {name}\n        path: {}\n        sync-interval: 200ms\n{extra}",
        dir.display()
    )
}

/// Writes the config of one database, `app.db` in `work`, with `settings` (lines of its entry)
/// and `replicas`; returns the database's and the config's paths.
fn one_db_config(work: &Path, settings: &str, replicas: &str) -> (PathBuf, PathBuf) {
    let db = work.join("app.db");
    let cfg = work.join("walden.yml");
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - path: {}\n{settings}    replicas:\n{replicas}",
            db.display()
        ),
    )
    .unwrap();
    (db, cfg)
}

#[test]
fn several_databases_with_several_replicas_replicate_concurrently() {
    let s3 = shared_s3();
    let work = tempfile::tempdir().unwrap();
    let dbs: Vec<PathBuf> = (0..2)
        .map(|i| work.path().join(format!("db{i}.db")))
        .collect();
    let mut config = String::from("dbs:\n");
    for (i, db) in dbs.iter().enumerate() {
        config += &format!("  - path: {}\n    replicas:\n", db.display());
        config += &s3_replica(s3, "s3", &s3.prefix(&format!("multi-{i}")), "");
        config += &file_replica("backup", &work.path().join(format!("files-{i}")), "");
    }
    let cfg = work.path().join("walden.yml");
    std::fs::write(&cfg, config).unwrap();
    let conns: Vec<Connection> = dbs.iter().map(|db| app_writer(db)).collect();
    let log = work.path().join("walden.log");
    let walden = start(&cfg, s3, &log);
    for round in 0..5 {
        for (i, conn) in conns.iter().enumerate() {
            insert(conn, 40 + i * 10 + round);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop(walden, &log);
    for db in &dbs {
        for replica in ["s3", "backup"] {
            let out = work.path().join(format!(
                "restored-{replica}-{}",
                db.file_name().unwrap().to_string_lossy()
            ));
            restore(&cfg, s3, db, &out, &["-replica", replica]);
            assert_eq!(dump(&out), dump(db), "{} from {replica}", db.display());
        }
    }
}

/// The start-up checks of many replicas run at once, but a permanent problem still stops the
/// start with one line, and with several such problems it is the first in config order: here
/// two databases name buckets that do not exist, after and between ones that are fine.
#[test]
fn a_start_with_several_missing_buckets_names_the_first_in_config_order() {
    let s3 = shared_s3();
    let work = tempfile::tempdir().unwrap();
    let tag = rand::random::<u32>();
    let first = format!("walden-missing-a-{tag:08x}");
    let second = format!("walden-missing-b-{tag:08x}");
    let mut config = String::from("dbs:\n");
    for i in 0..6 {
        let db = work.path().join(format!("db{i}.db"));
        app_writer(&db);
        config += &format!("  - path: {}\n    replicas:\n", db.display());
        let replica = s3_replica(s3, "s3", &s3.prefix(&format!("check-{i}")), "");
        config += &match i {
            3 => replica.replace(
                &format!("bucket: {}\n", s3.bucket),
                &format!("bucket: {first}\n"),
            ),
            5 => replica.replace(
                &format!("bucket: {}\n", s3.bucket),
                &format!("bucket: {second}\n"),
            ),
            _ => replica,
        };
    }
    let cfg = work.path().join("walden.yml");
    std::fs::write(&cfg, config).unwrap();
    let output = support::run(
        Command::new(walden_bin())
            .args(["replicate", "-config"])
            .arg(&cfg)
            .env_clear()
            .envs(walden_env(s3)),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let db3 = work.path().join("db3.db");
    assert!(
        errors[0].contains(&first) && errors[0].contains(&*db3.to_string_lossy()),
        "{stderr}"
    );
    assert!(!stderr.contains(&second), "{stderr}");
}

/// A snapshot requested by the final sync itself (snapshot-interval elapsed) must not run after
/// that sync: its checkpoint changes the database (Litestream's `_litestream_seq` row) and the
/// change would never be uploaded. Each round leaves several megabytes for the final upload,
/// long enough for the database task (ticking every 20 ms) to take that snapshot, and compares
/// the whole restored database, internal tables included, with the source.
#[test]
fn final_sync_leaves_nothing_behind_when_a_snapshot_is_due() {
    let work = tempfile::tempdir().unwrap();
    let (db, cfg) = one_db_config(
        work.path(),
        "    monitor-interval: 20ms\n",
        &file_replica(
            "backup",
            &work.path().join("replica"),
            "        snapshot-interval: 10ms\n",
        ),
    );
    let s3 = shared_s3();
    let conn = app_writer(&db);
    for round in 0..3 {
        let log = work.path().join(format!("walden-{round}.log"));
        let walden = start(&cfg, s3, &log);
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..40 {
            conn.execute("INSERT INTO t (v) VALUES (randomblob(100000))", [])
                .unwrap();
        }
        stop(walden, &log);
        let out = work.path().join(format!("restored-{round}.db"));
        restore(&cfg, s3, &db, &out, &[]);
        assert_eq!(dump(&out), dump(&db), "round {round}");
    }
}

/// A writer committing one-row transactions without pause for a few seconds, with a WAL limit
/// low enough that TRUNCATE checkpoints happen. Frames committed between the replicator's last
/// copy and its checkpoint used to be backfilled and then lost from the WAL, which started a
/// new generation (a full snapshot) at such checkpoints, and Walden's own TRUNCATE was taken
/// for another process's. Now the replica keeps one generation and restores every row, and
/// the WAL file is cut back below the limit.
#[test]
fn a_busy_writer_keeps_one_generation() {
    let work = tempfile::tempdir().unwrap();
    let limit: u64 = 8 << 20;
    let replica = work.path().join("replica");
    let (db, cfg) = one_db_config(
        work.path(),
        &format!("    monitor-interval: 200ms\n    truncate-wal-bytes: {limit}\n"),
        &file_replica("backup", &replica, ""),
    );
    let wal_size = || {
        std::fs::metadata(db.with_extension("db-wal"))
            .unwrap()
            .len()
    };
    let s3 = shared_s3();
    let conn = app_writer(&db);
    let log = work.path().join("walden.log");
    let walden = start(&cfg, s3, &log);
    std::thread::sleep(Duration::from_millis(500));
    let end = Instant::now() + Duration::from_secs(4);
    let mut rows = 0;
    let mut wal_peak = 0;
    while Instant::now() < end {
        conn.execute("INSERT INTO t (v) VALUES (randomblob(16))", [])
            .unwrap();
        rows += 1;
        if rows % 10 == 0 {
            // At most 10,000 transactions a second: the test binary is a debug build, and a
            // WAL growing faster than it can copy would only test its speed.
            std::thread::sleep(Duration::from_millis(1));
        }
        if rows % 1000 == 0 {
            wal_peak = wal_peak.max(wal_size());
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let wal_after = wal_size();
    stop(walden, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    let generations = std::fs::read_dir(replica.join("generations"))
        .unwrap()
        .count();
    assert_eq!(generations, 1, "{rows} rows written\n--- log ---\n{text}");
    assert!(
        wal_peak > limit,
        "the writer never filled the WAL past the limit ({wal_peak} bytes, {rows} rows)"
    );
    // Only Walden's TRUNCATE cuts the file: the application sets no journal_size_limit.
    assert!(
        wal_after < limit,
        "WAL still {wal_after} bytes after the writer stopped\n--- log ---\n{text}"
    );
    let out = work.path().join("restored.db");
    restore(&cfg, s3, &db, &out, &[]);
    assert_eq!(row_count(&out), rows);
    assert_eq!(dump(&out), dump(&db));
}

/// Uploads fail while the server is down; the replicator keeps running, keeps the frames, and
/// ships them once the server is back: nothing committed is lost.
#[test]
fn an_s3_outage_loses_no_transaction() {
    let mut s3 = S3Server::start();
    let work = tempfile::tempdir().unwrap();
    let (db, cfg) = one_db_config(
        work.path(),
        "",
        &s3_replica(&s3, "s3", &s3.prefix("outage"), ""),
    );
    let conn = app_writer(&db);
    insert(&conn, 50);
    let log = work.path().join("walden.log");
    let mut walden = start(&cfg, &s3, &log);
    std::thread::sleep(Duration::from_millis(1500));
    s3.stop();
    insert(&conn, 100);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        walden.wait_timeout(Duration::ZERO).is_none(),
        "walden exited during the outage\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let failures = std::fs::read_to_string(&log).unwrap();
    assert!(
        failures.contains("replica sync failed"),
        "the outage was not reported:\n{failures}"
    );
    s3.restart();
    insert(&conn, 25);
    std::thread::sleep(Duration::from_secs(2));
    stop(walden, &log);
    let out = work.path().join("restored.db");
    restore(&cfg, &s3, &db, &out, &[]);
    assert_eq!(row_count(&out), 175);
    assert_eq!(dump(&out), dump(&db));
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// With a short retention, old snapshots and WAL go, but every point in time inside the window
/// can still be restored, and the latest state is complete.
#[test]
fn retention_deletes_old_objects_but_keeps_the_window_restorable() {
    let s3 = shared_s3();
    let work = tempfile::tempdir().unwrap();
    let files = work.path().join("replica");
    let (db, cfg) = one_db_config(
        work.path(),
        "    min-checkpoint-page-count: 20\n",
        &file_replica(
            "backup",
            &files,
            "        snapshot-interval: 1s\n        retention: 4s\n        retention-check-interval: 1s\n",
        ),
    );
    let conn = app_writer(&db);
    let log = work.path().join("walden.log");
    let walden = start(&cfg, s3, &log);
    let started = Instant::now();
    let mut history: Vec<(SystemTime, i64)> = Vec::new();
    while started.elapsed() < Duration::from_secs(12) {
        insert(&conn, 10);
        history.push((SystemTime::now(), row_count(&db)));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let end = SystemTime::now();
    stop(walden, &log);

    let log_text = std::fs::read_to_string(&log).unwrap();
    let uploaded = log_text.matches("snapshot uploaded").count();
    let mut kept = 0;
    for generation in std::fs::read_dir(files.join("generations")).unwrap() {
        let snapshots = generation.unwrap().path().join("snapshots");
        kept += std::fs::read_dir(snapshots).map_or(0, |d| d.count());
    }
    assert!(
        uploaded >= 6,
        "expected several snapshots, log:\n{log_text}"
    );
    assert!(
        kept < uploaded,
        "retention deleted nothing: {kept} of {uploaded} snapshots kept"
    );
    assert!(log_text.contains("retention enforced"));

    // Points inside the window: the restored state is between what was committed two seconds
    // before (a commit waits up to one monitor tick, 1 s, to be copied, then up to the 200 ms
    // sync interval and the upload itself) and what was committed at that time.
    for back in [3.0, 2.0, 1.0] {
        let t = end - Duration::from_secs_f64(back);
        let out = work.path().join(format!("at-{back}.db"));
        restore(&cfg, s3, &db, &out, &["-timestamp", &rfc3339(t)]);
        let at = |when: SystemTime| {
            history
                .iter()
                .rfind(|(w, _)| *w <= when)
                .map_or(0, |(_, c)| *c)
        };
        let got = row_count(&out);
        let (low, high) = (at(t - Duration::from_secs(2)), at(t));
        assert!(
            low <= got && got <= high,
            "restore at now-{back}s has {got} rows, expected {low}..={high}"
        );
    }
    let out = work.path().join("latest.db");
    restore(&cfg, s3, &db, &out, &[]);
    assert_eq!(dump(&out), dump(&db));
}
