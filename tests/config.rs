//! Configuration compatibility (issue #4): the providers' guide configs parse into the expected
//! replica settings, every mistake is an error with its file, line and a useful message,
//! `walden config` shows the effective settings without secrets, the README's reference
//! matches the keys the parser knows, and a replicator driven only by `LITESTREAM_*`
//! variables round-trips through SeaweedFS.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rusqlite::Connection;
use tempfile::TempDir;
use walden::config::{self, Config, ConfigError, LoadOptions, Target};
use walden::storage::s3::S3Config;

/// A fake environment.
fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

fn fixture(name: &str) -> PathBuf {
    support::repo_root()
        .join("tests/fixtures/config")
        .join(name)
}

/// Loads a fixture the way `walden` does, with a fake environment.
fn load(name: &str, env: &[(&str, &str)]) -> Config {
    let env = env_of(env);
    config::load(&fixture(name), LoadOptions::default(), &env)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The S3 settings of replica `r` of database `d`.
fn s3(cfg: &Config, d: usize, r: usize) -> &S3Config {
    match &cfg.dbs[d].replicas[r].target {
        Target::S3(s3) => s3,
        other => panic!("dbs[{d}].replicas[{r}] is {other}, not s3"),
    }
}

/// The settings a test expects of an S3 replica; credentials by value.
#[derive(Debug, PartialEq)]
struct Expect<'a> {
    bucket: &'a str,
    prefix: &'a str,
    endpoint: Option<&'a str>,
    region: &'a str,
    path_style: bool,
    key: &'a str,
    secret: &'a str,
}

fn actual(s: &S3Config) -> Expect<'_> {
    Expect {
        bucket: &s.bucket,
        prefix: &s.prefix,
        endpoint: s.endpoint.as_deref(),
        region: &s.region,
        path_style: s.force_path_style,
        key: &s.access_key_id,
        secret: &s.secret_access_key,
    }
}

// ---------------------------------------------------------------------------------------------
// The providers' guides
// ---------------------------------------------------------------------------------------------

#[test]
fn aws_guide() {
    let cfg = load("aws.yml", &[]);
    assert_eq!(cfg.dbs[0].path, Path::new("/var/lib/app/db.sqlite"));
    assert_eq!(
        actual(s3(&cfg, 0, 0)),
        Expect {
            bucket: "mybkt.litestream.io",
            prefix: "db",
            endpoint: None,
            region: "us-west-2",
            path_style: false,
            key: "AKIAIOSFODNN7EXAMPLE",
            secret: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        }
    );
}

#[test]
fn r2_guide_with_region_auto_and_path_style() {
    let cfg = load("r2.yml", &[]);
    assert_eq!(
        actual(s3(&cfg, 0, 0)),
        Expect {
            bucket: "mybkt",
            prefix: "db",
            endpoint: Some("https://0123456789abcdef.r2.cloudflarestorage.com"),
            region: "auto",
            path_style: true,
            key: "r2keyid",
            secret: "r2secretvalue",
        }
    );
}

#[test]
fn r2_bucket_host_url() {
    let cfg = load(
        "r2-url.yml",
        &[
            ("LITESTREAM_ACCESS_KEY_ID", "K"),
            ("LITESTREAM_SECRET_ACCESS_KEY", "S"),
        ],
    );
    assert_eq!(
        actual(s3(&cfg, 0, 0)),
        Expect {
            bucket: "mybkt",
            prefix: "db",
            endpoint: Some("https://0123456789abcdef.r2.cloudflarestorage.com"),
            region: "auto",
            path_style: true,
            key: "K",
            secret: "S",
        }
    );
}

#[test]
fn b2_guide() {
    let cfg = load("b2.yml", &[]);
    assert_eq!(
        actual(s3(&cfg, 0, 0)),
        Expect {
            bucket: "mybkt",
            prefix: "db",
            endpoint: Some("s3.us-west-000.backblazeb2.com"),
            region: "us-east-1",
            path_style: true,
            key: "000abcdef0000000001",
            secret: "K000b2secretvalue",
        }
    );
}

#[test]
fn digitalocean_guide() {
    let cfg = load("digitalocean.yml", &[]);
    assert_eq!(
        actual(s3(&cfg, 0, 0)),
        Expect {
            bucket: "mybkt",
            prefix: "db",
            endpoint: Some("https://nyc3.digitaloceanspaces.com"),
            region: "nyc3",
            path_style: true,
            key: "DOSPACESKEY",
            secret: "dospacessecret",
        }
    );
}

#[test]
fn linode_guide() {
    let cfg = load("linode.yml", &[]);
    assert_eq!(
        actual(s3(&cfg, 0, 0)),
        Expect {
            bucket: "mybkt",
            prefix: "db",
            endpoint: Some("https://us-east-1.linodeobjects.com"),
            region: "us-east-1",
            path_style: true,
            key: "LINODEKEY",
            secret: "linodesecret",
        }
    );
}

#[test]
fn minio_guide_with_keys_from_litestream_variables() {
    let cfg = load(
        "minio.yml",
        &[
            ("LITESTREAM_ACCESS_KEY_ID", "minioadmin"),
            ("LITESTREAM_SECRET_ACCESS_KEY", "miniosecret"),
            ("AWS_ACCESS_KEY_ID", "ignored"),
        ],
    );
    assert_eq!(
        actual(s3(&cfg, 0, 0)),
        Expect {
            bucket: "mybkt",
            prefix: "db",
            endpoint: Some("http://localhost:9000"),
            region: "us-east-1",
            path_style: true,
            key: "minioadmin",
            secret: "miniosecret",
        }
    );
}

#[test]
fn environment_driven_config_with_defaults() {
    let creds = [
        ("LITESTREAM_ACCESS_KEY_ID", "K"),
        ("LITESTREAM_SECRET_ACCESS_KEY", "S"),
    ];
    let cfg = load("env.yml", &creds);
    assert_eq!(cfg.dbs[0].path, Path::new("/data/app.db"));
    assert_eq!(
        cfg.dbs[0].replicas[0].sync_interval,
        Duration::from_secs(10)
    );
    assert_eq!(
        actual(s3(&cfg, 0, 0)),
        Expect {
            bucket: "app-backups",
            prefix: "app",
            endpoint: None,
            region: "us-east-1",
            path_style: false,
            key: "K",
            secret: "S",
        }
    );

    let mut set = creds.to_vec();
    set.extend([
        ("APP_DB_PATH", "/srv/x.db"),
        ("REPLICA_BUCKET", "prod"),
        ("REPLICA_PREFIX", ""),
        ("S3_ENDPOINT", "127.0.0.1:8333"),
        ("S3_REGION", "eu-west-1"),
    ]);
    let cfg = load("env.yml", &set);
    assert_eq!(cfg.dbs[0].path, Path::new("/srv/x.db"));
    assert_eq!(
        actual(s3(&cfg, 0, 0)),
        Expect {
            bucket: "prod",
            prefix: "",
            endpoint: Some("http://127.0.0.1:8333"),
            region: "eu-west-1",
            path_style: true,
            key: "K",
            secret: "S",
        }
    );
}

#[test]
fn multi_db_config_one_prefix_per_db() {
    let cfg = load("multi-db.yml", &[]);
    let prefixes: Vec<&str> = (0..3).map(|d| s3(&cfg, d, 0).prefix.as_str()).collect();
    assert_eq!(prefixes, ["users", "orders", "events"]);
    assert_eq!(
        cfg.dbs[1].replicas[0].retention,
        Some(Duration::from_secs(72 * 3600))
    );
    assert_eq!(
        cfg.dbs[0].replicas[0].retention,
        Some(config::DEFAULT_RETENTION)
    );
    match &cfg.dbs[2].replicas[1].target {
        Target::File { dir } => assert_eq!(dir, Path::new("/backups/events")),
        other => panic!("expected a directory, got {other}"),
    }
    assert!((0..3).all(|d| s3(&cfg, d, 0).access_key_id == "AKIAIOSFODNN7EXAMPLE"));
}

#[test]
fn litestream_05_top_level_defaults_and_singular_replica() {
    let env = [("AWS_ACCESS_KEY_ID", "K"), ("AWS_SECRET_ACCESS_KEY", "S")];
    let cfg = load("v05.yml", &env);
    for (d, prefix) in [(0, "one"), (1, "two")] {
        assert_eq!(
            actual(s3(&cfg, d, 0)),
            Expect {
                bucket: "mybkt",
                prefix,
                endpoint: Some("https://s3.eu-central-003.backblazeb2.com"),
                region: "eu-central-003",
                path_style: true,
                key: "K",
                secret: "S",
            }
        );
        let r = &cfg.dbs[d].replicas[0];
        assert_eq!(r.snapshot_interval, Some(Duration::from_secs(12 * 3600)));
        assert_eq!(r.retention, Some(Duration::from_secs(168 * 3600)));
    }
    assert_eq!(cfg.dbs[0].replicas[0].sync_interval, Duration::from_secs(5));
    assert_eq!(cfg.dbs[1].replicas[0].sync_interval, Duration::from_secs(1));
    assert_eq!(cfg.dbs[0].busy_timeout, Duration::from_secs(3));
    assert_eq!(cfg.dbs[1].busy_timeout, config::DEFAULT_BUSY_TIMEOUT);
    assert_eq!(cfg.final_sync_timeout(), Duration::from_secs(45));
}

#[test]
fn v0313_defaults() {
    let cfg = config::parse(
        "dbs:\n  - path: /tmp/a.db\n    replicas:\n      - path: /tmp/r\n",
        "w.yml",
        &env_of(&[]),
    )
    .unwrap();
    let db = &cfg.dbs[0];
    assert_eq!(db.monitor_interval, Duration::from_secs(1));
    assert_eq!(db.checkpoint_interval, Duration::from_secs(60));
    assert_eq!(db.busy_timeout, Duration::from_secs(1));
    assert_eq!(
        (db.min_checkpoint_page_count, db.max_checkpoint_page_count),
        (1000, 10_000)
    );
    let r = &db.replicas[0];
    assert_eq!(r.name, "file");
    assert_eq!(r.sync_interval, Duration::from_secs(1));
    assert_eq!(r.snapshot_interval, None);
    assert_eq!(r.retention, Some(Duration::from_secs(24 * 3600)));
    assert_eq!(r.retention_check_interval, Duration::from_secs(3600));
    assert_eq!(cfg.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(cfg.final_sync_timeout(), Duration::from_secs(30));
}

// ---------------------------------------------------------------------------------------------
// Replica URLs and credentials
// ---------------------------------------------------------------------------------------------

/// A URL and the bucket, prefix, endpoint, region and path style it must give.
type UrlCase<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, &'a str, bool);

/// Top-level keys, a replica entry and an environment, and the key, secret and session token
/// they must give.
type CredentialCase<'a> = (
    &'a str,
    &'a str,
    Vec<(&'a str, &'a str)>,
    (&'a str, &'a str, Option<&'a str>),
);

#[test]
fn replica_url_forms() {
    let env = env_of(&[("AWS_ACCESS_KEY_ID", "K"), ("AWS_SECRET_ACCESS_KEY", "S")]);
    let s3_of = |url: &str| match config::replica_from_url(url, &env).unwrap().target {
        Target::S3(s3) => s3,
        other => panic!("{url} gave {other}"),
    };
    let cases: &[UrlCase] = &[
        ("s3://b/p", "b", "p", None, "us-east-1", false),
        (
            "s3://b/p?endpoint=https://s3.example.com&region=r1&force-path-style=false",
            "b",
            "p",
            Some("https://s3.example.com"),
            "r1",
            false,
        ),
        (
            "s3://b/p?endpoint=http://10.0.0.5:9000",
            "b",
            "p",
            Some("http://10.0.0.5:9000"),
            "us-east-1",
            true,
        ),
        (
            "s3://b/p?endpoint=localhost:9000",
            "b",
            "p",
            Some("http://localhost:9000"),
            "us-east-1",
            true,
        ),
        (
            "s3://b.localhost:9000/p",
            "b",
            "p",
            Some("http://localhost:9000"),
            "us-east-1",
            true,
        ),
        (
            "s3://b.s3.fr-par.scw.cloud/p",
            "b",
            "p",
            Some("https://s3.fr-par.scw.cloud"),
            "fr-par",
            true,
        ),
        (
            "s3://b.s3.filebase.com/p",
            "b",
            "p",
            Some("https://s3.filebase.com"),
            "us-east-1",
            true,
        ),
        (
            "s3://b.acct.r2.cloudflarestorage.com/a/b",
            "b",
            "a/b",
            Some("https://acct.r2.cloudflarestorage.com"),
            "auto",
            true,
        ),
    ];
    for &(url, bucket, prefix, endpoint, region, path_style) in cases {
        let s = s3_of(url);
        assert_eq!(
            (
                s.bucket.as_str(),
                s.prefix.as_str(),
                s.endpoint.as_deref(),
                s.region.as_str(),
                s.force_path_style
            ),
            (bucket, prefix, endpoint, region, path_style),
            "{url}"
        );
    }
    for url in ["file:///backups/app", "/backups/app", "/backups/x/../app/"] {
        match config::replica_from_url(url, &env).unwrap().target {
            Target::File { dir } => assert_eq!(dir, Path::new("/backups/app"), "{url}"),
            other => panic!("{url} gave {other}"),
        }
    }
}

#[test]
fn credentials_order() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("credentials");
    fs::write(
        &file,
        "[default]\naws_access_key_id = FILE_K\naws_secret_access_key = FILE_S\n\
         [other]\naws_access_key_id = OTHER_K\naws_secret_access_key = OTHER_S\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let replica_keys =
        "      - url: s3://b/p\n        access-key-id: R_K\n        secret-access-key: R_S\n";
    let no_keys = "      - url: s3://b/p\n";
    let top = "access-key-id: T_K\nsecret-access-key: T_S\n";
    let litestream = [
        ("LITESTREAM_ACCESS_KEY_ID", "L_K"),
        ("LITESTREAM_SECRET_ACCESS_KEY", "L_S"),
    ];
    let aws = [
        ("AWS_ACCESS_KEY_ID", "A_K"),
        ("AWS_SECRET_ACCESS_KEY", "A_S"),
        ("AWS_SESSION_TOKEN", "A_T"),
    ];
    let shared = [("AWS_SHARED_CREDENTIALS_FILE", file)];
    let all: Vec<_> = litestream
        .iter()
        .chain(&aws)
        .chain(&shared)
        .copied()
        .collect();
    let cases: Vec<CredentialCase> = vec![
        (top, replica_keys, all.clone(), ("R_K", "R_S", None)),
        (top, no_keys, all.clone(), ("T_K", "T_S", None)),
        ("", no_keys, all.clone(), ("L_K", "L_S", None)),
        (
            "",
            no_keys,
            aws.iter().chain(&shared).copied().collect(),
            ("A_K", "A_S", Some("A_T")),
        ),
        ("", no_keys, shared.to_vec(), ("FILE_K", "FILE_S", None)),
        (
            "",
            no_keys,
            vec![shared[0], ("AWS_PROFILE", "other")],
            ("OTHER_K", "OTHER_S", None),
        ),
        (
            "",
            no_keys,
            vec![shared[0], ("AWS_PROFILE", "absent")],
            ("", "", None),
        ),
    ];
    let home = dir.path().to_str().unwrap();
    for (i, (top, replica, env, want)) in cases.into_iter().enumerate() {
        let text = format!("{top}dbs:\n  - path: /tmp/a.db\n    replicas:\n{replica}");
        let mut env = env;
        env.push(("HOME", home));
        let cfg = config::parse(&text, "w.yml", &env_of(&env)).unwrap();
        let s = s3(&cfg, 0, 0);
        assert_eq!(
            (
                s.access_key_id.as_str(),
                s.secret_access_key.as_str(),
                s.session_token.as_deref()
            ),
            want,
            "case {i}"
        );
    }
    // Without AWS_SHARED_CREDENTIALS_FILE the profile is read from $HOME/.aws/credentials.
    fs::create_dir(dir.path().join(".aws")).unwrap();
    fs::write(
        dir.path().join(".aws/credentials"),
        "[default]\naws_access_key_id=H_K\naws_secret_access_key=H_S\n",
    )
    .unwrap();
    let cfg = config::parse(
        &format!("dbs:\n  - path: /tmp/a.db\n    replicas:\n{no_keys}"),
        "w.yml",
        &env_of(&[("HOME", home)]),
    )
    .unwrap();
    assert_eq!(s3(&cfg, 0, 0).access_key_id, "H_K");
}

#[test]
fn config_file_lookup_order() {
    let env = env_of(&[("WALDEN_CONFIG", "/w.yml"), ("LITESTREAM_CONFIG", "/l.yml")]);
    assert_eq!(
        config::locate(Some(Path::new("/flag.yml")), &env),
        Some(PathBuf::from("/flag.yml"))
    );
    assert_eq!(config::locate(None, &env), Some(PathBuf::from("/w.yml")));
    let env = env_of(&[("WALDEN_CONFIG", ""), ("LITESTREAM_CONFIG", "/l.yml")]);
    assert_eq!(config::locate(None, &env), Some(PathBuf::from("/l.yml")));
}

// ---------------------------------------------------------------------------------------------
// Mistakes
// ---------------------------------------------------------------------------------------------

/// Parses `yaml` as `w.yml` and returns its error, one problem per line.
fn error_of(yaml: &str) -> String {
    match config::parse(yaml, "w.yml", &env_of(&[])) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

const DB: &str = "dbs:\n  - path: /tmp/a.db\n";

/// A config whose only replica is `lines` (each indented as a replica key).
fn with_replica(lines: &str) -> String {
    let body: String = lines
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let lead = if i == 0 { "      - " } else { "        " };
            format!("{lead}{l}\n")
        })
        .collect();
    format!("{DB}    replicas:\n{body}")
}

#[test]
fn every_mistake_is_an_error_with_its_line() {
    let cases: Vec<(String, &str)> = vec![
        // Unknown and misspelt keys at every level.
        (
            "adr: :9090\n".into(),
            "w.yml:1: `adr` is not a key; did you mean `addr`?",
        ),
        (
            "logging:\n  levle: debug\n".into(),
            "w.yml:2: `levle` is not a key; did you mean `level`?",
        ),
        (
            "snapshot:\n  intervals: 1h\n".into(),
            "w.yml:2: `intervals` is not a key; did you mean `interval`?",
        ),
        (
            format!("{DB}    monitor-intervals: 1s\n"),
            "w.yml:3: `monitor-intervals` is not a key; did you mean `monitor-interval`?",
        ),
        (
            with_replica("type: s3\nbucket: b\nretension: 1h"),
            "w.yml:6: `retension` is not a key; did you mean `retention`?",
        ),
        (
            with_replica("type: s3\nbukket: b"),
            "w.yml:5: `bukket` is not a key; did you mean `bucket`?",
        ),
        // Litestream keys walden does not implement.
        (
            with_replica("type: s3\nbucket: b\nage:\n  recipients: [age1x]"),
            "w.yml:6: `age` is a Litestream key walden does not support yet (age encryption)",
        ),
        (
            with_replica("path: /r\nvalidation-interval: 1h"),
            "w.yml:5: `validation-interval` is a Litestream key walden does not support yet (replica validation)",
        ),
        (
            with_replica("type: sftp\nhost: h:22"),
            "w.yml:5: `host` is a Litestream key walden does not support yet (SFTP replicas)",
        ),
        (
            with_replica("type: abs\naccount-name: a"),
            "w.yml:5: `account-name` is a Litestream key walden does not support yet (Azure Blob Storage replicas)",
        ),
        (
            with_replica("type: s3\nbucket: b\npart-size: 5MB"),
            "w.yml:6: `part-size` is a Litestream 0.5 key walden does not support",
        ),
        (
            "levels:\n  - interval: 5m\n".into(),
            "w.yml:1: `levels` is a Litestream 0.5 key walden does not support",
        ),
        (
            "l0-retention: 5m\n".into(),
            "w.yml:1: `l0-retention` is a Litestream 0.5 key walden does not support",
        ),
        (
            "mcp-addr: :3001\n".into(),
            "w.yml:1: `mcp-addr` is a Litestream 0.5 key walden does not support",
        ),
        (
            "socket:\n  enabled: true\n".into(),
            "w.yml:1: `socket` is a Litestream 0.5 key walden does not support",
        ),
        (
            "heartbeat-url: https://hc.example\n".into(),
            "w.yml:1: `heartbeat-url` is a Litestream 0.5 key walden does not support",
        ),
        (
            "age:\n  identities: [x]\n".into(),
            "w.yml:1: `age` is a Litestream 0.5 key walden does not support",
        ),
        (
            "dbs:\n  - dir: /data\n    pattern: '*.db'\n".into(),
            "w.yml:2: `dir` is a Litestream 0.5 key walden does not support",
        ),
        (
            format!("{DB}    watch: true\n"),
            "w.yml:3: `watch` is a Litestream 0.5 key walden does not support",
        ),
        (
            format!("{DB}    truncate-page-n: 500000\n"),
            "w.yml:3: `truncate-page-n` is a Litestream 0.5 key walden does not support; use truncate-wal-bytes, a size in bytes",
        ),
        // Types and durations.
        (
            with_replica("path: /r\nsync-interval: 10"),
            "w.yml:5: invalid duration \"10\": add a unit, e.g. \"10s\", \"500ms\" or \"1h\"",
        ),
        (
            with_replica("path: /r\nretention: 7d"),
            "w.yml:5: invalid duration \"7d\": unknown unit; use ns, us, ms, s, m or h",
        ),
        (
            format!("{DB}    checkpoint-interval: -1m\n"),
            "w.yml:3: invalid duration \"-1m\": negative durations are not allowed",
        ),
        (
            with_replica("type: s3\nbucket: b\nforce-path-style: maybe"),
            "w.yml:6: invalid boolean; expected true or false",
        ),
        (
            format!("{DB}    min-checkpoint-page-count: lots\n"),
            "w.yml:3: invalid u32; expected a whole number",
        ),
        // Meaning.
        (
            with_replica("type: gcs\nbucket: b"),
            "w.yml:4: dbs[0].replicas[0]: replica type \"gcs\" is not supported by walden yet; only s3 and file are",
        ),
        (
            with_replica("url: gcs://b/p"),
            "w.yml:4: dbs[0].replicas[0]: invalid replica url \"gcs://b/p\": gcs:// replicas are not supported by walden yet; use s3:// or file://",
        ),
        (
            with_replica("url: s3:b/p"),
            "w.yml:4: dbs[0].replicas[0]: invalid replica url \"s3:b/p\": expected scheme://, e.g. s3://bucket/path or file:///dir",
        ),
        (
            with_replica("url: s3://b/p\nbucket: c"),
            "w.yml:4: dbs[0].replicas[0]: `url` and `bucket` cannot both be set",
        ),
        (
            with_replica("type: file\nbucket: b\npath: /r"),
            "w.yml:4: dbs[0].replicas[0]: `bucket` is set on a file replica; use `type: s3` or remove `bucket`",
        ),
        (
            format!("{DB}    replica:\n      path: /r\n    replicas:\n      - path: /s\n"),
            "w.yml:2: dbs[0]: `replica` and `replicas` cannot both be set; use one",
        ),
        (
            format!("bucket: b\n{DB}    replica:\n      path: r\n"),
            "w.yml:5: dbs[0].replica: no `type`, and a top-level `bucket` is set: say `type: s3` to use that bucket or `type: file` for a directory",
        ),
        (
            "logging:\n  type: xml\n".into(),
            "w.yml: logging.type \"xml\" must be text or json",
        ),
        (
            "snapshot:\n  interval: 0s\n".into(),
            "w.yml: snapshot.interval must be greater than 0",
        ),
        (
            "dbs:\n  - monitor-interval: 1s\n".into(),
            "w.yml:2: dbs[0]: `path` is required",
        ),
    ];
    for (yaml, want) in &cases {
        assert_eq!(&error_of(yaml), want, "for:\n{yaml}");
    }
}

#[test]
fn all_problems_are_listed_at_once() {
    let yaml = "logging:\n  level: loud\ndbs:\n  - path: /tmp/a.db\n    replicas:\n      - url: s3://b/same\n      - url: s3://b/same\n  - replicas:\n      - path: /r\n        sync-interval: 0s\n  - path: /tmp/c.db\n    replicas:\n      - url: s3://b/same\n  - path: /tmp/a.db\n";
    let err = error_of(yaml);
    let want = [
        "w.yml: logging.level \"loud\" must be one of trace, debug, info, warn, warning, error",
        "w.yml: replica \"s3\" of /tmp/a.db and replica \"s3\" of /tmp/c.db both write to s3://b/same at AWS; give each database its own `path`",
        "w.yml:7: dbs[0].replicas[1]: two replicas are named \"s3\"; give each a distinct `name`",
        "w.yml:8: dbs[1]: `path` is required",
        "w.yml:9: dbs[1].replicas[0]: sync-interval must be greater than 0",
        "w.yml:14: dbs[3]: /tmp/a.db is listed twice; merge its replicas into one entry",
    ];
    for w in want {
        assert!(err.lines().any(|l| l == w), "missing {w:?} in:\n{err}");
    }
    // The second replica of dbs[0] also writes where the first does.
    assert_eq!(err.lines().count(), want.len() + 1, "{err}");
}

#[test]
fn unset_variables_warn_but_fail_credentials_and_bucket() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("w.yml");
    fs::write(
        &path,
        "access-key-id: ${KEY_UNSET}\nsecret-access-key: $SECRET_UNSET\ndbs:\n  - path: /tmp/${DIR_UNSET}a.db\n    replicas:\n      - type: s3\n        bucket: ${BUCKET_UNSET}\n",
    )
    .unwrap();
    let err = config::load(&path, LoadOptions::default(), &env_of(&[])).unwrap_err();
    let ConfigError::Invalid { problems } = &err else {
        panic!("{err}")
    };
    let got: Vec<(Option<u64>, &str)> = problems
        .iter()
        .map(|p| (p.line, p.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                Some(1),
                "`access-key-id` uses the environment variable KEY_UNSET which is not set; set it, or run with -no-expand-env to read the file literally"
            ),
            (
                Some(2),
                "`secret-access-key` uses the environment variable SECRET_UNSET which is not set; set it, or run with -no-expand-env to read the file literally"
            ),
            (
                Some(6),
                "dbs[0].replicas[0]: an s3 replica needs `bucket` or `url`"
            ),
            (
                Some(7),
                "`bucket` uses the environment variable BUCKET_UNSET which is not set; set it, or run with -no-expand-env to read the file literally"
            ),
        ]
    );
    // With the credentials set, only the path variable is unset: a warning, and it loads.
    let cfg = config::load(
        &path,
        LoadOptions::default(),
        &env_of(&[
            ("KEY_UNSET", "k"),
            ("SECRET_UNSET", "s"),
            ("BUCKET_UNSET", "b"),
        ]),
    )
    .unwrap();
    assert_eq!(cfg.dbs[0].path, Path::new("/tmp/a.db"));
    // -no-expand-env reads the text literally.
    let cfg = config::load(
        &path,
        LoadOptions {
            no_expand_env: true,
        },
        &env_of(&[]),
    )
    .unwrap();
    assert_eq!(s3(&cfg, 0, 0).bucket, "${BUCKET_UNSET}");
}

// ---------------------------------------------------------------------------------------------
// `walden config`
// ---------------------------------------------------------------------------------------------

/// Runs `walden config ARGS` with a clean environment plus `env`.
fn walden_config(args: &[&str], env: &[(&str, &str)]) -> Output {
    let home = TempDir::new().unwrap();
    let mut cmd = Command::new(support::walden_bin());
    cmd.arg("config")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .envs(env.iter().copied());
    support::run(&mut cmd, Duration::from_secs(30))
}

#[test]
fn walden_config_prints_effective_settings_without_secrets() {
    let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    let out = walden_config(
        &["-config", fixture("v05.yml").to_str().unwrap()],
        &[
            ("LITESTREAM_ACCESS_KEY_ID", "AKIAEXAMPLE"),
            ("LITESTREAM_SECRET_ACCESS_KEY", secret),
        ],
    );
    let stdout = support::expect_success("walden config", &out);
    let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !all.contains(secret) && !all.contains("AKIAEXAMPLE"),
        "{all}"
    );
    for want in [
        "shutdown-sync-timeout: 45s",
        "  busy-timeout: 3s",
        "  monitor-interval: 1s",
        "    bucket: mybkt",
        "    path: one",
        "    region: eu-central-003",
        "    force-path-style: true",
        "    access-key-id: <redacted>",
        "    secret-access-key: <redacted>",
        "    sync-interval: 5s",
        "    snapshot-interval: 12h",
        "    retention: 168h",
        "    retention-check-interval: 1h",
    ] {
        assert!(
            stdout.lines().any(|l| l == want),
            "missing {want:?} in:\n{stdout}"
        );
    }
    // The output is itself a valid configuration with the same settings.
    let again = config::parse(&stdout, "out.yml", &env_of(&[])).unwrap();
    assert_eq!(again.dbs.len(), 2);
    assert_eq!(s3(&again, 0, 0).bucket, "mybkt");
    assert_eq!(
        again.dbs[0].replicas[0].sync_interval,
        Duration::from_secs(5)
    );
}

#[test]
fn walden_config_lists_every_problem_and_fails() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("bad.yml");
    fs::write(
        &path,
        "secret-access-key: ${SECRET_NOT_SET}\ndbs:\n  - path: /tmp/a.db\n    replicas:\n      - type: ftp\n  - replicas: []\n",
    )
    .unwrap();
    let out = walden_config(&["-config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display();
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        errors,
        [
            format!(
                "error: {file}:1: `secret-access-key` uses the environment variable SECRET_NOT_SET which is not set; set it, or run with -no-expand-env to read the file literally"
            ),
            format!(
                "error: {file}:5: dbs[0].replicas[0]: unknown replica type \"ftp\"; expected s3 or file"
            ),
            format!("error: {file}:6: dbs[1]: `path` is required"),
        ],
        "{stderr}"
    );
    // A YAML syntax error is one problem.
    fs::write(&path, "dbs: [\n").unwrap();
    let out = walden_config(&["-config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error: ")).count(),
        1,
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// The README's reference
// ---------------------------------------------------------------------------------------------

/// Every `key:` in the YAML blocks of the README's Configuration section must be a key the
/// parser implements, every implemented key must appear there, and every refused Litestream
/// key must be named in the section.
#[test]
fn readme_reference_matches_the_parser() {
    let readme = fs::read_to_string(support::repo_root().join("README.md")).unwrap();
    let start = readme
        .find("## Configuration\n")
        .expect("Configuration section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let mut documented = BTreeSet::new();
    let mut in_yaml = false;
    for line in section.lines() {
        if line.starts_with("```") {
            in_yaml = line == "```yaml";
            continue;
        }
        if !in_yaml {
            continue;
        }
        let l = line.trim_start().trim_start_matches("- ");
        if l.starts_with('#') {
            continue;
        }
        if let Some((key, _)) = l.split_once(':')
            && !key.is_empty()
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        {
            documented.insert(key.to_string());
        }
    }
    let keys = config::known_keys();
    let supported: BTreeSet<String> = keys
        .iter()
        .filter(|k| k.supported)
        .map(|k| k.key.to_string())
        .collect();
    let not_accepted: Vec<_> = documented.difference(&supported).collect();
    assert!(
        not_accepted.is_empty(),
        "README documents keys the parser rejects: {not_accepted:?}"
    );
    let undocumented: Vec<_> = supported.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "keys missing from the README's YAML: {undocumented:?}"
    );
    let unnamed: BTreeSet<&str> = keys
        .iter()
        .filter(|k| !k.supported && !section.contains(&format!("`{}`", k.key)))
        .map(|k| k.key)
        .collect();
    assert!(
        unnamed.is_empty(),
        "refused keys the README does not name: {unnamed:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------------------------

/// `walden replicate` with a config that holds no keys and credentials only in
/// `LITESTREAM_ACCESS_KEY_ID`/`LITESTREAM_SECRET_ACCESS_KEY`, then `walden restore` the same
/// way: the restored database equals the source.
#[test]
fn replicate_and_restore_with_only_litestream_variables() {
    let s3 = support::shared_s3();
    let work = TempDir::new().unwrap();
    let db = work.path().join("app.db");
    let prefix = s3.prefix("config-litestream-env");
    let cfg_path = work.path().join("walden.yml");
    fs::write(
        &cfg_path,
        format!(
            "dbs:\n  - path: {}\n    replicas:\n      - type: s3\n        bucket: {}\n        path: {prefix}\n        endpoint: {}\n        region: {}\n",
            db.display(),
            s3.bucket,
            s3.endpoint,
            s3.region
        ),
    )
    .unwrap();
    let env: Vec<(String, String)> = support::test_env(s3)
        .into_iter()
        .filter(|(k, _)| k != "AWS_ACCESS_KEY_ID" && k != "AWS_SECRET_ACCESS_KEY")
        .chain([
            (
                "LITESTREAM_ACCESS_KEY_ID".to_string(),
                s3.access_key.clone(),
            ),
            (
                "LITESTREAM_SECRET_ACCESS_KEY".to_string(),
                s3.secret_key.clone(),
            ),
        ])
        .collect();

    let conn = Connection::open(&db).unwrap();
    conn.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);")
        .unwrap();

    let log = work.path().join("replicate.log");
    let log_file = fs::File::create(&log).unwrap();
    let mut cmd = Command::new(support::walden_bin());
    cmd.arg("replicate")
        .arg("-config")
        .arg(&cfg_path)
        .env_clear()
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file);
    let mut replicator = support::ChildGuard(support::spawn_tied_to_process(cmd).unwrap());
    let read_log = || fs::read_to_string(&log).unwrap_or_default();

    for i in 0..50 {
        conn.execute("INSERT INTO t (v) VALUES (?1)", [format!("row {i}")])
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while s3.list_keys(&prefix).iter().all(|k| !k.contains("/wal/")) {
        if let Ok(Some(status)) = replicator.try_wait() {
            panic!("walden replicate exited with {status}:\n{}", read_log());
        }
        assert!(
            Instant::now() < deadline,
            "nothing uploaded:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    replicator.signal(Signal::SIGTERM);
    let status = replicator
        .wait_timeout(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("walden did not stop:\n{}", read_log()));
    assert!(
        status.success(),
        "walden replicate: {status}\n{}",
        read_log()
    );
    assert!(
        read_log().contains(&cfg_path.display().to_string()),
        "the chosen config file is logged:\n{}",
        read_log()
    );
    drop(conn);

    let out = work.path().join("restored.db");
    let mut cmd = Command::new(support::walden_bin());
    cmd.arg("restore")
        .arg("-config")
        .arg(&cfg_path)
        .arg("-o")
        .arg(&out)
        .arg(&db)
        .env_clear()
        .envs(env.iter().cloned());
    support::expect_success(
        "walden restore",
        &support::run(&mut cmd, Duration::from_secs(60)),
    );
    assert_eq!(support::integrity_check(&out), "ok");
    assert_eq!(support::dump(&out), support::dump(&db));
}
