//! Health you can trust (issue #5), against the real SeaweedFS: `/health` turns red with the
//! cause within two sync intervals of an outage and green again after it, `last_synced_at`
//! never advances while uploads fail, `/metrics` is Prometheus text under Litestream's names
//! and its counters move, `walden verify` passes on a good replica and fails on a corrupted or
//! incomplete one, `walden status` exit codes, periodic restore drills, and JSON logs.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::{
    ChildGuard, S3Server, app_writer, dump, integrity_check, row_count, shared_s3, test_env,
    walden_bin,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A free port on 127.0.0.1 (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The environment for walden: the harness's, without `RUST_LOG` so the default log level
/// applies whatever the developer's shell says.
fn env(s3: &S3Server) -> Vec<(String, String)> {
    test_env(s3)
        .into_iter()
        .filter(|(k, _)| k != "RUST_LOG")
        .collect()
}

/// An HTTP answer: status code, headers (lowercase names) and body.
struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// One HTTP/1.0 request to 127.0.0.1:`port`; `None` when nothing listens there.
fn http(port: u16, method: &str, path: &str) -> Option<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let raw = String::from_utf8(raw).expect("the answer is utf-8");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no end of headers in {raw:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: bad status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

/// `GET /health`: the status code and the JSON report.
fn health(port: u16) -> (u16, Value) {
    let r = http(port, "GET", "/health").expect("walden answers /health");
    let json = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("/health is not JSON ({e}): {}", r.body));
    (r.status, json)
}

/// The first replica of the first database in a health report.
fn replica(report: &Value) -> &Value {
    &report["databases"][0]["replicas"][0]
}

fn parse_rfc3339(s: &str) -> SystemTime {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
        .into()
}

/// Calls `probe` every 100 ms until it returns `Some`, or `None` after `timeout`.
fn wait_for<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A database in WAL mode with a table `t` and a few rows.
fn create_db(db: &Path) {
    let conn = app_writer(db);
    for _ in 0..20 {
        conn.execute("INSERT INTO t (v) VALUES (randomblob(200))", [])
            .unwrap();
    }
}

/// A thread inserting one row every 50 ms, like an application, until `finish`.
struct Writer {
    stop: Arc<AtomicBool>,
    rows: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(db: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let rows = Arc::new(AtomicU64::new(0));
        let db = db.to_path_buf();
        let (stop2, rows2) = (stop.clone(), rows.clone());
        let handle = thread::spawn(move || {
            let conn = app_writer(&db);
            while !stop2.load(Ordering::SeqCst) {
                conn.execute("INSERT INTO t (v) VALUES (randomblob(200))", [])
                    .expect("insert a row");
                rows2.fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(50));
            }
        });
        Writer {
            stop,
            rows,
            handle: Some(handle),
        }
    }

    fn rows(&self) -> u64 {
        self.rows.load(Ordering::SeqCst)
    }

    /// Stops writing and returns how many rows were inserted.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("writer thread panicked");
        }
        self.rows()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// An S3 replica entry named `s3`.
fn s3_replica(s3: &S3Server, prefix: &str, sync_interval: &str) -> String {
    format!(
        "      - type: s3\n        name: s3\n        bucket: {}\n        path: {prefix}\n        \
         endpoint: {}\n        region: {}\n        sync-interval: {sync_interval}\n",
        s3.bucket, s3.endpoint, s3.region
    )
}

/// Writes `walden.yml` into `dir`: `addr` when given, one database with `db_extra` lines (each
/// indented by four spaces) and the replica entries.
fn write_config(
    dir: &Path,
    addr: Option<u16>,
    db: &Path,
    db_extra: &str,
    replicas: &str,
) -> PathBuf {
    let mut yaml = String::new();
    if let Some(port) = addr {
        yaml += &format!("addr: \"127.0.0.1:{port}\"\n");
    }
    yaml += &format!(
        "dbs:\n  - path: {}\n{db_extra}    replicas:\n{replicas}",
        db.display()
    );
    let path = dir.join("walden.yml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A running `walden replicate`, stdout and stderr captured in files.
struct Walden {
    child: ChildGuard,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Walden {
    fn start(config: &Path, s3: &S3Server, extra: &[&str], dir: &Path) -> Walden {
        let stdout = dir.join("walden.stdout");
        let stderr = dir.join("walden.stderr");
        let child = ChildGuard::spawn(
            Command::new(walden_bin())
                .args(["replicate", "-config"])
                .arg(config)
                .args(extra)
                .env_clear()
                .envs(env(s3))
                .stdout(std::fs::File::create(&stdout).unwrap())
                .stderr(std::fs::File::create(&stderr).unwrap()),
        );
        Walden {
            child,
            stdout,
            stderr,
        }
    }

    fn log(&self) -> String {
        format!(
            "--- walden stdout ---\n{}\n--- walden stderr ---\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.wait_timeout(Duration::ZERO) {
            panic!("walden exited with {status}\n{}", self.log());
        }
    }

    /// Waits until the HTTP server on `port` answers /health.
    fn wait_for_http(&mut self, port: u16) {
        let up = wait_for(Duration::from_secs(30), || {
            self.assert_running();
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        assert!(
            up.is_some(),
            "walden never listened on {port}\n{}",
            self.log()
        );
    }

    /// SIGTERM by PID; walden must finish its final sync and exit 0.
    fn stop(mut self) -> String {
        self.child.signal(Signal::SIGTERM);
        let status = self.child.wait_timeout(Duration::from_secs(60));
        let log = self.log();
        let status = status.unwrap_or_else(|| panic!("walden did not stop within 60 s\n{log}"));
        assert_eq!(status.code(), Some(0), "walden exit status\n{log}");
        log
    }
}

/// Runs `walden ARGS` to completion (60 s at most).
fn walden(s3: &S3Server, args: &[&str]) -> Output {
    let mut cmd = Command::new(walden_bin());
    cmd.args(args).env_clear().envs(env(s3));
    support::run(&mut cmd, Duration::from_secs(60))
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Restores `db` with `walden restore` into `out` and checks its integrity.
fn restore(config: &Path, s3: &S3Server, db: &Path, out: &Path) {
    let output = walden(
        s3,
        &[
            "restore",
            "-config",
            config.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            db.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "restore: {}", describe(&output));
    assert_eq!(integrity_check(out), "ok");
}

/// The cells of a `walden status` / `walden verify` table row (columns are separated by at
/// least two spaces), for every row that mentions `needle`.
fn table_rows(text: &str, needle: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(1)
        .filter(|l| l.contains(needle))
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Prometheus text format
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) => s.parse().ok(),
        _ => None,
    }
}

/// Parses `{a="x",b="y"}` (after the metric name); returns the labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = rest[..eq].trim();
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parses the Prometheus text exposition format strictly: `# HELP name text`,
/// `# TYPE name counter|gauge|histogram|summary|untyped`, and samples
/// `name{labels} value [timestamp]` or `name value [timestamp]` whose family has a TYPE line.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let fail = |why: &str| -> ! { panic!("/metrics line {}: {why}: {line:?}", n + 1) };
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            match words.first() {
                Some(&"HELP") if words.len() < 2 || !is_metric_name(words[1]) => {
                    fail("malformed HELP")
                }
                Some(&"TYPE") => {
                    if words.len() != 3 || !is_metric_name(words[1]) {
                        fail("malformed TYPE");
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&words[2])
                    {
                        fail("unknown type");
                    }
                    if typed
                        .insert(words[1].to_string(), words[2].to_string())
                        .is_some()
                    {
                        fail("TYPE given twice");
                    }
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| fail("no value"));
        let name = &line[..name_end];
        if !is_metric_name(name) {
            fail("bad metric name");
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).unwrap_or_else(|e| fail(&e))
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let value = match fields.as_slice() {
            [v] => parse_float(v),
            [v, ts] if ts.parse::<i64>().is_ok() => parse_float(v),
            _ => None,
        }
        .unwrap_or_else(|| fail("value is not a float"));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains_key(*f)))
            .unwrap_or(name);
        if !typed.contains_key(family) {
            fail("sample without a TYPE line");
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

/// The sum of the samples named `name` whose labels include `labels`; `None` when none match.
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// `GET /metrics`, checked to be Prometheus text, parsed.
fn scrape(port: u16) -> Vec<Sample> {
    let r = http(port, "GET", "/metrics").expect("walden answers /metrics");
    assert_eq!(r.status, 200, "/metrics: {}", r.body);
    let content_type = r.headers.get("content-type").cloned().unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain"),
        "/metrics content type {content_type:?}"
    );
    parse_prometheus(&r.body)
}

#[test]
fn the_prometheus_parser_rejects_what_prometheus_rejects() {
    let good = "# HELP a_total Things.\n# TYPE a_total counter\na_total{x=\"1\",y=\"a \\\"b\\\"\"} 3\n\
                # TYPE g gauge\ng 1.5e3\ng{z=\"\"} -Inf\n";
    let samples = parse_prometheus(good);
    assert_eq!(samples.len(), 3);
    assert_eq!(metric(&samples, "a_total", &[("y", "a \"b\"")]), Some(3.0));
    assert_eq!(metric(&samples, "g", &[]), Some(f64::NEG_INFINITY));
    for bad in [
        "# TYPE a counter\na{x=1} 3\n",
        "# TYPE a counter\na{x=\"1\"} three\n",
        "# TYPE a counter\na{x=\"1\"}\n",
        "a 1\n",
        "# TYPE a wibble\na 1\n",
        "# TYPE 1a counter\n",
        "# TYPE a counter\na{x=\"1\" 3\n",
    ] {
        let parsed = std::panic::catch_unwind(|| parse_prometheus(bad));
        assert!(parsed.is_err(), "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Issue #5 item 5, first two points and `status` while the store is down: the S3 server is
/// stopped while an application writes; `/health` answers 503 with the cause within two sync
/// intervals, `last_synced_at` stays where it was, `walden status` fails, errors are counted
/// by kind; after the restart `/health` is 200 again, `last_synced_at` moves, and a restore
/// holds every row written.
#[test]
fn an_outage_turns_health_red_with_its_cause_and_green_again_without_losing_a_row() {
    let mut s3 = S3Server::start();
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("app.db");
    create_db(&db);
    let port = free_port();
    let cfg = write_config(
        work.path(),
        Some(port),
        &db,
        "",
        &s3_replica(&s3, &s3.prefix("outage"), "500ms"),
    );
    let cfg_arg = cfg.to_str().unwrap();
    let mut w = Walden::start(&cfg, &s3, &[], work.path());
    w.wait_for_http(port);
    let writer = Writer::start(&db);

    let healthy = wait_for(Duration::from_secs(30), || {
        let (code, report) = health(port);
        (code == 200 && replica(&report)["last_synced_at"].is_string()).then_some(report)
    });
    let healthy =
        healthy.unwrap_or_else(|| panic!("never healthy: {:?}\n{}", health(port), w.log()));
    assert_eq!(healthy["healthy"], true);
    assert!(replica(&healthy)["health_error"].is_null(), "{healthy:#}");
    thread::sleep(Duration::from_secs(1));

    s3.stop();
    let stopped = Instant::now();
    let stopped_wall = SystemTime::now();
    let (_, at_stop) = health(port);
    let baseline = replica(&at_stop)["last_synced_at"]
        .as_str()
        .expect("last_synced_at set before the outage")
        .to_string();
    assert!(
        parse_rfc3339(&baseline) <= stopped_wall,
        "last_synced_at {baseline} is after the server died"
    );

    // Red within two sync intervals (1 s; 3 s allowed on a loaded machine), which is far below
    // health-lag (11.5 s): the failing upload decides, not the age of the pending data.
    let mut samples = Vec::new();
    let red = wait_for(Duration::from_secs(6), || {
        let (code, report) = health(port);
        samples.push(replica(&report)["last_synced_at"].clone());
        (code == 503).then_some(report)
    });
    let took = stopped.elapsed();
    let red = red.unwrap_or_else(|| {
        panic!(
            "/health still not 503 {took:?} after the S3 server stopped: {:#}\n{}",
            health(port).1,
            w.log()
        )
    });
    assert!(
        took <= Duration::from_secs(3),
        "/health turned 503 only {took:?} after the outage began"
    );
    assert_eq!(red["healthy"], false);
    assert_eq!(red["databases"][0]["healthy"], false);
    assert_eq!(replica(&red)["healthy"], false);
    let error = replica(&red)["health_error"]
        .as_str()
        .unwrap_or_else(|| panic!("unhealthy without health_error: {red:#}"))
        .to_string();
    assert!(
        error.contains(&format!("127.0.0.1:{}", s3.port())) && error.contains("reach"),
        "health_error does not name the unreachable store: {error:?}"
    );
    eprintln!("/health turned 503 after {took:?}: {error}");
    assert!(
        !error.contains("health-lag"),
        "the lag rule fired, not the error rule: {error:?}"
    );
    assert!(
        !error.contains(support::SECRET_KEY),
        "health_error leaks the secret: {error:?}"
    );

    // The outage goes on: last_synced_at does not move, the metric neither, status fails.
    let last_sync_metric = |samples: &[Sample]| {
        metric(
            samples,
            "walden_replica_last_sync_timestamp_seconds",
            &[("name", "s3")],
        )
        .expect("walden_replica_last_sync_timestamp_seconds exported")
    };
    let metric_at_start = last_sync_metric(&scrape(port));
    let outage_end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < outage_end {
        let (code, report) = health(port);
        assert_eq!(code, 503, "healthy again during the outage: {report:#}");
        samples.push(replica(&report)["last_synced_at"].clone());
        thread::sleep(Duration::from_millis(200));
    }
    for s in &samples {
        assert_eq!(
            s.as_str(),
            Some(baseline.as_str()),
            "last_synced_at moved while uploads failed: {samples:?}"
        );
    }
    let during = scrape(port);
    assert_eq!(
        last_sync_metric(&during),
        metric_at_start,
        "last-sync metric moved during the outage"
    );
    assert!(
        metric_at_start
            <= parse_rfc3339(&baseline)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
                + 1.0,
        "last-sync metric {metric_at_start} is after last_synced_at {baseline}"
    );
    let unreachable = metric(
        &during,
        "walden_errors_total",
        &[("name", "s3"), ("kind", "unreachable")],
    );
    assert!(
        unreachable.is_some_and(|n| n >= 1.0),
        "walden_errors_total{{kind=\"unreachable\"}} after the outage: {unreachable:?}\n{:#?}",
        during
            .iter()
            .filter(|s| s.name == "walden_errors_total")
            .collect::<Vec<_>>()
    );
    assert!(
        metric(&during, "walden_replica_pending_bytes", &[("name", "s3")]).is_some_and(|b| b > 0.0),
        "no pending bytes while rows are written during an outage"
    );
    let status = walden(&s3, &["status", "-config", cfg_arg]);
    assert_ne!(
        status.status.code(),
        Some(0),
        "status while the store is down: {}",
        describe(&status)
    );
    let rows = table_rows(&stdout(&status), db.to_str().unwrap());
    assert!(
        rows.iter()
            .any(|r| r.get(1).map(String::as_str) == Some("s3")
                && r.get(2).map(String::as_str) == Some("unhealthy")),
        "status does not show the replica unhealthy: {}",
        describe(&status)
    );

    s3.restart();
    let restarted = Instant::now();
    let green = wait_for(Duration::from_secs(20), || {
        let (code, report) = health(port);
        (code == 200).then_some(report)
    });
    let green = green.unwrap_or_else(|| {
        panic!(
            "not healthy {:?} after the restart: {:#}\n{}",
            restarted.elapsed(),
            health(port).1,
            w.log()
        )
    });
    assert_eq!(green["healthy"], true);
    assert!(replica(&green)["health_error"].is_null(), "{green:#}");
    let after = replica(&green)["last_synced_at"].as_str().unwrap();
    assert!(
        parse_rfc3339(after) > parse_rfc3339(&baseline),
        "last_synced_at did not advance after the restart: {baseline} -> {after}"
    );

    thread::sleep(Duration::from_millis(500));
    let written = writer.finish();
    assert!(written > 50, "the writer wrote only {written} rows");
    w.assert_running();
    w.stop();
    let out = work.path().join("restored.db");
    restore(&cfg, &s3, &db, &out);
    assert_eq!(row_count(&out) as u64, 20 + written);
    assert_eq!(
        dump(&out),
        dump(&db),
        "restored copy differs from the source"
    );
}

/// Litestream's metric names, which dashboards built for Litestream query.
const LITESTREAM_METRICS: &[&str] = &[
    "litestream_db_size",
    "litestream_wal_size",
    "litestream_total_wal_bytes",
    "litestream_shadow_wal_index",
    "litestream_shadow_wal_size",
    "litestream_sync_count",
    // Regression: Litestream 0.3.13 exports this at 0 from start-up (checked against the
    // reference binary: `litestream_sync_error_count{db="..."} 0`), so dashboards show 0 rather
    // than no data and `increase()` alerts see the first error; Walden once created the series
    // only on the first sync error.
    "litestream_sync_error_count",
    "litestream_sync_seconds",
    "litestream_checkpoint_count",
    "litestream_replica_wal_bytes",
    "litestream_replica_wal_index",
    "litestream_replica_wal_offset",
    "litestream_replica_operation_total",
    "litestream_replica_operation_bytes",
];

/// Walden's own: last success, lag and pending bytes per replica.
const WALDEN_METRICS: &[&str] = &[
    "walden_replica_last_sync_timestamp_seconds",
    "walden_replica_lag_seconds",
    "walden_replica_pending_bytes",
];

/// `/metrics` is well-formed Prometheus text, carries Litestream's names, and its counters
/// move while an application writes.
#[test]
fn metrics_are_prometheus_text_under_litestream_names_and_counters_move() {
    let s3 = shared_s3();
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("app.db");
    create_db(&db);
    let port = free_port();
    let cfg = write_config(
        work.path(),
        Some(port),
        &db,
        "    min-checkpoint-page-count: 10\n",
        &s3_replica(s3, &s3.prefix("metrics"), "500ms"),
    );
    let mut w = Walden::start(&cfg, s3, &[], work.path());
    w.wait_for_http(port);
    let writer = Writer::start(&db);
    let synced = wait_for(Duration::from_secs(30), || {
        replica(&health(port).1)["last_synced_at"]
            .is_string()
            .then_some(())
    });
    assert!(synced.is_some(), "never synced\n{}", w.log());

    let label = db.to_str().unwrap();
    let counters = |s: &[Sample]| {
        [
            metric(s, "litestream_sync_count", &[("db", label)]),
            metric(
                s,
                "litestream_replica_operation_total",
                &[("operation", "PUT"), ("replica_type", "s3")],
            ),
            metric(
                s,
                "litestream_replica_wal_bytes",
                &[("db", label), ("name", "s3")],
            ),
        ]
    };
    // last_synced_at is set by the snapshot upload already; wait for the first WAL segment too.
    let first = wait_for(Duration::from_secs(20), || {
        let c = counters(&scrape(port));
        c.iter().all(Option::is_some).then_some(c)
    })
    .unwrap_or_else(|| panic!("counters never all exported: {:?}", counters(&scrape(port))));
    thread::sleep(Duration::from_secs(2));
    let second = counters(&scrape(port));
    for (i, name) in [
        "litestream_sync_count",
        "litestream_replica_operation_total{PUT,s3}",
        "litestream_replica_wal_bytes",
    ]
    .iter()
    .enumerate()
    {
        let (a, b) = (first[i], second[i]);
        assert!(
            a.is_some() && b > a,
            "{name} did not increase while writing: {a:?} -> {b:?}"
        );
    }

    // A checkpoint happens once the WAL passes 10 pages; then every name is there.
    let samples = wait_for(Duration::from_secs(20), || {
        let s = scrape(port);
        metric(&s, "litestream_checkpoint_count", &[("db", label)])
            .is_some_and(|n| n >= 1.0)
            .then_some(s)
    });
    let samples = samples.unwrap_or_else(|| {
        panic!(
            "litestream_checkpoint_count never reached 1 with min-checkpoint-page-count 10\n{:#?}",
            scrape(port)
                .iter()
                .filter(|s| s.name.contains("checkpoint"))
                .collect::<Vec<_>>()
        )
    });
    let written = writer.finish();
    assert!(written > 0);
    let missing: Vec<&&str> = LITESTREAM_METRICS
        .iter()
        .chain(WALDEN_METRICS)
        .filter(|name| !samples.iter().any(|s| s.name == **name))
        .collect();
    let names: std::collections::BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
    assert!(
        missing.is_empty(),
        "metrics missing from /metrics: {missing:?}\nexported: {names:?}"
    );
    assert!(metric(&samples, "litestream_db_size", &[("db", label)]).is_some_and(|v| v > 0.0));
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = metric(
        &samples,
        "walden_replica_last_sync_timestamp_seconds",
        &[("db", label), ("name", "s3")],
    )
    .unwrap();
    assert!(
        (now - 60.0..=now + 1.0).contains(&last),
        "last sync timestamp {last} is not recent (now {now})"
    );
    w.stop();
}

/// `walden verify` passes on a good replica, asking the running replicator when there is one
/// and restoring on its own when there is none, and fails when the newest segment is garbage
/// or a segment the restore needs is gone.
#[test]
fn verify_passes_on_a_good_replica_and_fails_on_a_corrupted_or_missing_segment() {
    let s3 = shared_s3();
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("app.db");
    create_db(&db);
    let prefix = s3.prefix("verify");
    let cfg = write_config(
        work.path(),
        None,
        &db,
        "",
        &s3_replica(s3, &prefix, "200ms"),
    );
    let (cfg_arg, db_arg) = (cfg.to_str().unwrap(), db.to_str().unwrap());
    let verify = || walden(s3, &["verify", "-config", cfg_arg, db_arg]);
    let assert_ok = |out: &Output, what: &str| {
        assert_eq!(out.status.code(), Some(0), "{what}: {}", describe(out));
        let rows = table_rows(&stdout(out), "s3");
        assert!(
            rows.iter()
                .any(|r| r.get(3).map(String::as_str) == Some("OK")),
            "{what}: no OK row: {}",
            describe(out)
        );
    };
    let assert_failed = |out: &Output, what: &str| {
        eprintln!("{what}: {}", describe(out));
        assert!(
            out.status.code().is_some_and(|c| c != 0),
            "{what}: {}",
            describe(out)
        );
        assert!(
            stdout(out).contains("FAILED"),
            "{what}: no FAILED row: {}",
            describe(out)
        );
    };

    let mut w = Walden::start(&cfg, s3, &[], work.path());
    let writer = Writer::start(&db);
    thread::sleep(Duration::from_secs(2));
    w.assert_running();
    // While the application writes: the running replicator pins a position and restores it.
    let out = verify();
    assert_ok(&out, "verify with a running replicator");
    assert!(
        w.log().contains("restore drill ok"),
        "the running replicator did not run the drill\n{}",
        w.log()
    );
    thread::sleep(Duration::from_secs(1));
    writer.finish();
    w.stop();
    assert_ok(&verify(), "verify with no replicator running");

    // Segments of the one generation, by (index, offset).
    let keys = s3.list_keys(&format!("{prefix}/"));
    let mut segments: Vec<(u32, u32, String)> = keys
        .iter()
        .filter_map(|k| {
            let (_, name) = k.rsplit_once("/wal/")?;
            let (index, offset) = name.strip_suffix(".wal.lz4")?.split_once('_')?;
            Some((
                u32::from_str_radix(index, 16).ok()?,
                u32::from_str_radix(offset, 16).ok()?,
                k.clone(),
            ))
        })
        .collect();
    segments.sort();
    let generations: std::collections::BTreeSet<&str> = keys
        .iter()
        .filter_map(|k| k.split("/generations/").nth(1)?.split('/').next())
        .collect();
    assert_eq!(generations.len(), 1, "one generation expected: {keys:#?}");
    let latest = segments.last().expect("WAL segments in the bucket").0;
    let in_latest: Vec<&String> = segments
        .iter()
        .filter(|s| s.0 == latest)
        .map(|s| &s.2)
        .collect();
    assert!(
        in_latest.len() >= 3,
        "want several segments in the latest index to delete a middle one: {keys:#?}"
    );

    let newest = in_latest[in_latest.len() - 1];
    let original = s3.get(newest);
    s3.put(
        newest,
        b"this is not an lz4 frame, just garbage where a segment was",
    );
    assert_failed(&verify(), "verify with a corrupted newest segment");
    s3.put(newest, &original);
    assert_ok(&verify(), "verify once the segment is put back");

    let middle = in_latest[in_latest.len() / 2];
    support::block_on(s3.s3_bucket().delete_object(middle.as_str()))
        .unwrap_or_else(|e| panic!("delete {middle}: {e}"));
    assert_failed(&verify(), &format!("verify with {middle} deleted"));
}

/// `walden status` exits 0 while a healthy replicator runs (found over its unix socket, no
/// `addr` configured) and non-zero when none runs, then showing what the bucket holds.
#[test]
fn status_exit_code_says_whether_a_healthy_replicator_runs() {
    let s3 = shared_s3();
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("app.db");
    create_db(&db);
    let cfg = write_config(
        work.path(),
        None,
        &db,
        "",
        &s3_replica(s3, &s3.prefix("status"), "200ms"),
    );
    let (cfg_arg, db_arg) = (cfg.to_str().unwrap(), db.to_str().unwrap());
    let status = || walden(s3, &["status", "-config", cfg_arg]);

    let mut w = Walden::start(&cfg, s3, &[], work.path());
    // Right after start-up the replicator reports healthy before its first upload (nothing
    // has failed yet), and the snapshot upload sets last_synced_at a moment before the
    // replica's position; wait until both are there.
    let healthy = wait_for(Duration::from_secs(30), || {
        w.assert_running();
        let out = status();
        let synced = table_rows(&stdout(&out), db_arg)
            .iter()
            .any(|r| r.get(3).is_some_and(|t| t != "-") && r.get(6).is_some_and(|g| g != "-"));
        (out.status.success() && synced).then_some(out)
    });
    let healthy = healthy.unwrap_or_else(|| {
        panic!(
            "status never exited 0 with walden running: {}\n{}",
            describe(&status()),
            w.log()
        )
    });
    assert!(
        work.path().join(".app.db-litestream/walden.sock").exists(),
        "no status socket in the meta directory"
    );
    let rows = table_rows(&stdout(&healthy), db_arg);
    let row = rows
        .iter()
        .find(|r| r.get(1).map(String::as_str) == Some("s3"))
        .unwrap_or_else(|| panic!("no row for replica s3: {}", describe(&healthy)));
    assert_eq!(row[2], "healthy", "{}", describe(&healthy));
    let generation = row[6].clone();
    assert!(
        generation.len() == 16 && generation.chars().all(|c| c.is_ascii_hexdigit()),
        "generation column {generation:?}: {}",
        describe(&healthy)
    );
    w.stop();

    let out = status();
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "status with no replicator: {}",
        describe(&out)
    );
    let rows = table_rows(&stdout(&out), db_arg);
    assert!(
        rows.iter()
            .any(|r| r.get(2).map(String::as_str) == Some("not running")
                && r.get(6) == Some(&generation)),
        "status does not show the bucket's generation {generation} as not running: {}",
        describe(&out)
    );
}

/// With `verify-interval`, replicate runs restore drills while the application writes and
/// reports them in `/health` and `litestream_replica_validation_total`.
#[test]
fn verify_interval_runs_drills_reported_in_health_and_metrics() {
    let s3 = shared_s3();
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("app.db");
    create_db(&db);
    let port = free_port();
    let cfg = write_config(
        work.path(),
        Some(port),
        &db,
        "    verify-interval: 2s\n",
        &s3_replica(s3, &s3.prefix("drill"), "500ms"),
    );
    let mut w = Walden::start(&cfg, s3, &[], work.path());
    w.wait_for_http(port);
    let writer = Writer::start(&db);
    thread::sleep(Duration::from_secs(5));
    let mut seen = Vec::new();
    let verified = wait_for(Duration::from_secs(20), || {
        let (code, report) = health(port);
        let r = replica(&report).clone();
        seen.push(report.clone());
        assert_ne!(
            r["verify_ok"],
            Value::Bool(false),
            "a drill failed: {report:#}\n{}",
            w.log()
        );
        (code == 200 && r["verified_at"].is_string() && r["verify_ok"] == true).then_some(r)
    });
    let verified = verified.unwrap_or_else(|| {
        panic!(
            "no passed drill in /health: {:#}\n{}",
            seen.last().unwrap(),
            w.log()
        )
    });
    parse_rfc3339(verified["verified_at"].as_str().unwrap());
    let samples = scrape(port);
    let label = db.to_str().unwrap();
    let ok = metric(
        &samples,
        "litestream_replica_validation_total",
        &[("db", label), ("name", "s3"), ("status", "ok")],
    );
    assert!(
        ok.is_some_and(|n| n >= 1.0),
        "litestream_replica_validation_total{{status=\"ok\"}}: {ok:?}"
    );
    let failed = metric(
        &samples,
        "litestream_replica_validation_total",
        &[("status", "error")],
    );
    assert!(failed.unwrap_or(0.0) == 0.0, "failed drills: {failed:?}");
    writer.finish();
    w.stop();
}

/// `-log-format json` makes every line replicate logs a JSON object, and the snapshot and the
/// new generation are logged at info.
#[test]
fn log_format_json_logs_snapshot_and_generation_at_info() {
    let s3 = shared_s3();
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("app.db");
    create_db(&db);
    let cfg = write_config(
        work.path(),
        None,
        &db,
        "",
        &s3_replica(s3, &s3.prefix("jsonlog"), "200ms"),
    );
    let mut w = Walden::start(&cfg, s3, &["-log-format", "json"], work.path());
    let uploaded = wait_for(Duration::from_secs(30), || {
        w.assert_running();
        std::fs::read_to_string(&w.stdout)
            .unwrap()
            .contains("snapshot uploaded")
            .then_some(())
    });
    assert!(uploaded.is_some(), "no snapshot upload logged\n{}", w.log());
    let stdout = std::fs::read_to_string(&w.stdout).unwrap();
    w.stop();
    let mut messages = Vec::new();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line:?}"));
        let level = v["level"]
            .as_str()
            .unwrap_or_else(|| panic!("log line without level: {line}"));
        let message = v["fields"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("log line without fields.message: {line}"));
        messages.push((level.to_string(), message.to_string(), v));
    }
    let info = |needle: &str| {
        messages
            .iter()
            .any(|(level, message, _)| level == "INFO" && message.contains(needle))
    };
    let all: Vec<String> = messages
        .iter()
        .map(|(l, m, _)| format!("{l} {m}"))
        .collect();
    assert!(info("snapshot"), "no snapshot line at info: {all:#?}");
    assert!(info("generation"), "no generation change at info: {all:#?}");
}
