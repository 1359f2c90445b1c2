//! Shared harness for the integration tests; every test file includes it with `mod support;`.
//!
//! It gives tests a real S3 server (SeaweedFS `weed mini` on 127.0.0.1 with SigV4 enforced),
//! the reference Litestream binaries, the `walden` binary, a clean child environment, a
//! logical dump of SQLite databases, and process helpers that never leak children.
//!
//! The binaries come from `scripts/deps.sh` (project-local virtualenvs under `.venv/`);
//! `scripts/test.sh` exports their paths as `WALDEN_WEED`, `WALDEN_LITESTREAM_03` and
//! `WALDEN_LITESTREAM_05`, and the defaults below point at the same places.
//!
//! Invariant: every process the harness starts dies with the test binary. SeaweedFS is
//! started with `PR_SET_PDEATHSIG` from a thread that lives as long as the process (the
//! signal fires when the *thread* that forked the child exits, and test threads are short),
//! and an `atexit` hook kills the servers still registered and removes their data.
//!
//! Invariant: only 127.0.0.1 is ever used; SeaweedFS binds and advertises 127.0.0.1 only and
//! its telemetry is off.

// Each test binary uses a different subset of this module.
#![allow(dead_code)]

use std::collections::HashSet;
use std::ffi::OsStr;
use std::future::Future;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::{Bucket, BucketConfiguration, Region};

/// Access key configured in the server's identities file.
pub const ACCESS_KEY: &str = "WALDENTESTKEY";
/// Secret key configured in the server's identities file.
pub const SECRET_KEY: &str = "waldentestsecret123";
/// Region used by every test client; SeaweedFS accepts any region in signatures.
pub const REGION: &str = "us-east-1";
/// Bucket created on every server.
pub const BUCKET: &str = "walden";

/// How long a server may take to come up on a busy 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `stop` waits after SIGTERM before it sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The repository root (the crate's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path to a reference binary: the environment variable if set, else the venv default.
fn tool(var: &str, venv_path: &str, what: &str) -> PathBuf {
    let path = match std::env::var_os(var) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join(venv_path),
    };
    if !path.is_file() {
        panic!(
            "{what} not found at {} (set {var} or run scripts/deps.sh)",
            path.display()
        );
    }
    path
}

/// The SeaweedFS `weed` binary (env `WALDEN_WEED`, else `.venv/weed/bin/weed`).
pub fn weed_bin() -> PathBuf {
    tool("WALDEN_WEED", ".venv/weed/bin/weed", "seaweedfs binary")
}

/// Litestream v0.3.13 (env `WALDEN_LITESTREAM_03`, else `.venv/ls03/bin/litestream`).
pub fn litestream_03() -> PathBuf {
    tool(
        "WALDEN_LITESTREAM_03",
        ".venv/ls03/bin/litestream",
        "litestream 0.3.13 binary",
    )
}

/// Litestream 0.5.17 (env `WALDEN_LITESTREAM_05`, else `.venv/ls05/bin/litestream`).
///
/// It refuses to start an S3 replica when `AWS_CA_BUNDLE` is set; `test_env` strips it.
pub fn litestream_05() -> PathBuf {
    tool(
        "WALDEN_LITESTREAM_05",
        ".venv/ls05/bin/litestream",
        "litestream 0.5.17 binary",
    )
}

/// The `walden` binary built by cargo for this test run.
pub fn walden_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walden"))
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Makes the child get SIGKILL when the thread that spawns it exits (`PR_SET_PDEATHSIG`).
///
/// Only use it when the spawning thread outlives the child (as in `run`); a child that must
/// outlive the current test thread should be spawned with `spawn_tied_to_process`.
pub fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then nobody would kill us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a thread that lives until the process exits, with `die_with_parent`, so
/// the child dies with the test binary but not with the test thread that asked for it.
pub fn spawn_tied_to_process(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("harness-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the harness spawner thread");
        tx
    });
    die_with_parent(&mut cmd);
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .send((cmd, reply_tx))
        .expect("harness spawner thread is gone");
    reply_rx.recv().expect("harness spawner thread is gone")
}

fn signal_pid(pid: u32, signal: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), signal);
}

/// Waits for `child` for at most `timeout`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("cannot wait for child {}: {e}", child.id()),
        }
    }
}

/// A child process that is killed (SIGKILL by PID) and reaped when the guard is dropped,
/// including when a test panics.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawns `cmd`, panicking with the program name if that fails.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        match cmd.spawn() {
            Ok(child) => ChildGuard(child),
            Err(e) => panic!("cannot start {:?}: {e}", cmd.get_program()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends `signal` to the child by PID (not to its group).
    pub fn signal(&self, signal: Signal) {
        signal_pid(self.0.id(), signal);
    }

    /// Waits for the child for at most `timeout`; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_timeout(&mut self.0, timeout)
    }
}

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // A child that was not reaped yet still owns its PID, so killing by PID is safe.
        if let Ok(None) = self.0.try_wait() {
            signal_pid(self.0.id(), Signal::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to completion with stdin from /dev/null and stdout/stderr captured.
///
/// If it is still running after `timeout` it is killed by PID (SIGKILL), the status then
/// reports signal 9 and stderr ends with a `[harness] killed after …` line. Output that
/// orphaned grandchildren keep writing after the child exits is not waited for long.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(cmd);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => panic!("cannot start {:?}: {e}", cmd.get_program()),
    };
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let stdout = capture(child.stdout.take().unwrap(), done_tx.clone());
    let stderr = capture(child.stderr.take().unwrap(), done_tx);

    let status = match wait_timeout(&mut child, timeout) {
        Some(status) => status,
        None => {
            signal_pid(child.id(), Signal::SIGKILL);
            let status = child.wait().expect("reap killed child");
            stderr
                .lock()
                .unwrap()
                .extend_from_slice(format!("\n[harness] killed after {timeout:?}\n").as_bytes());
            status
        }
    };
    // Both readers finish at EOF, which comes once every holder of the pipes is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    let stdout = std::mem::take(&mut *stdout.lock().unwrap());
    let stderr = std::mem::take(&mut *stderr.lock().unwrap());
    Output {
        status,
        stdout,
        stderr,
    }
}

fn capture(mut source: impl Read + Send + 'static, done: mpsc::Sender<()>) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match source.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => sink.lock().unwrap().extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = done.send(());
    });
    buf
}

/// Base environment for child processes in tests, meant for `cmd.env_clear().envs(test_env(&s3))`.
///
/// It is the test process's environment without any `AWS_*` or `LITESTREAM_*` variable
/// (so no host credentials or profiles leak in, and `AWS_CA_BUNDLE`, which litestream 0.5.17
/// cannot start with, is gone), plus explicit credentials for `s3`, its region,
/// `AWS_EC2_METADATA_DISABLED=true`, and AWS config/credentials files pointing at /dev/null.
/// A test that wants `AWS_CA_BUNDLE` (Walden must work with it) adds it back itself.
pub fn test_env(s3: &S3Server) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| !k.starts_with("AWS_") && !k.starts_with("LITESTREAM_"))
        .collect();
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", s3.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.as_str()),
        ("AWS_REGION", s3.region.as_str()),
        ("AWS_DEFAULT_REGION", s3.region.as_str()),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ] {
        env.push((k.to_string(), v.to_string()));
    }
    env
}

// ---------------------------------------------------------------------------------------------
// SQLite
// ---------------------------------------------------------------------------------------------

fn open_read_only(db: &Path) -> Connection {
    // Read-only: never checkpoints or deletes the WAL on close, never creates a database.
    Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("cannot open {} read-only: {e}", db.display()))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn render(value: ValueRef<'_>) -> String {
    match value {
        ValueRef::Null => "NULL".to_string(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => format!("{f:?}"),
        ValueRef::Text(t) => format!("'{}'", String::from_utf8_lossy(t).replace('\'', "''")),
        ValueRef::Blob(b) => {
            let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
            format!("X'{hex}'")
        }
    }
}

/// Logical dump of a SQLite database, for comparing a database with its restored copy.
///
/// One line per schema object (`schema <type> <name>: <sql>`, sorted by type and name), then
/// for every table sorted by name one line per row (`<table>: v1|v2|…`, ordered by rowid, or by
/// all columns for WITHOUT ROWID tables). Values are rendered like SQL literals. Litestream's
/// own `_litestream_*` tables are included. The database is opened read-only.
pub fn dump(db: &Path) -> String {
    let conn = open_read_only(db);
    let mut out = String::new();
    let mut schema = conn
        .prepare(
            "SELECT type, name, coalesce(sql, '') FROM sqlite_schema \
             ORDER BY type, name",
        )
        .expect("read schema");
    let objects: Vec<(String, String, String)> = schema
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("read schema")
        .collect::<Result<_, _>>()
        .expect("read schema");
    let mut tables = Vec::new();
    for (kind, name, sql) in &objects {
        out.push_str(&format!("schema {kind} {name}: {sql}\n"));
        if kind == "table" {
            tables.push(name.clone());
        }
    }
    tables.sort();
    for table in tables {
        let ident = quote_ident(&table);
        let has_rowid = conn
            .prepare(&format!("SELECT rowid FROM {ident} LIMIT 0"))
            .is_ok();
        let columns = conn
            .prepare(&format!("SELECT * FROM {ident} LIMIT 0"))
            .expect("read columns")
            .column_count();
        let order = if has_rowid {
            "rowid".to_string()
        } else {
            (1..=columns)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM {ident} ORDER BY {order}"))
            .unwrap_or_else(|e| panic!("read table {table}: {e}"));
        let mut rows = stmt.query([]).expect("read rows");
        while let Some(row) = rows.next().expect("read row") {
            let values: Vec<String> = (0..columns)
                .map(|i| render(row.get_ref(i).expect("read value")))
                .collect();
            out.push_str(&format!("{table}: {}\n", values.join("|")));
        }
    }
    out
}

/// The result of `PRAGMA integrity_check` (lines joined by newlines): `"ok"` when fine.
///
/// A database too damaged for the check to run gives `error: <sqlite message>`, never "ok".
pub fn integrity_check(db: &Path) -> String {
    let conn = open_read_only(db);
    let lines: rusqlite::Result<Vec<String>> = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect());
    match lines {
        Ok(lines) => lines.join("\n"),
        Err(e) => format!("error: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// S3 server
// ---------------------------------------------------------------------------------------------

/// Runs `fut` to completion on a fresh single-threaded runtime in a separate thread, so the
/// harness works from plain and from `#[tokio::test]` tests alike. Tests may use it for
/// rust-s3 calls of their own.
pub fn block_on<F: Future + Send>(fut: F) -> F::Output
where
    F::Output: Send,
{
    thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build tokio runtime")
                    .block_on(fut)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The ports of one `weed mini`: S3 on `base`, then master, volume, filer, admin and the gRPC
/// ports of S3, master, volume and filer on `base+1 ..= base+8`. The admin gRPC port is
/// `admin + 10000` because weed's built-in worker dials that regardless of `-admin.port.grpc`.
#[derive(Clone, Copy, Debug)]
struct Ports {
    base: u16,
}

impl Ports {
    fn s3(self) -> u16 {
        self.base
    }

    fn all(self) -> Vec<u16> {
        let mut ports: Vec<u16> = (0..=8).map(|i| self.base + i).collect();
        ports.push(self.base + 4 + 10000);
        ports
    }

    /// Picks a base whose ports are all free on 127.0.0.1. Bases lie in 10000..22000 so every
    /// port stays below Linux's ephemeral range (32768..).
    fn pick() -> Ports {
        for _ in 0..500 {
            let base = 10000 + (rand::random::<u32>() % 12000) as u16;
            let ports = Ports { base };
            let free = ports
                .all()
                .into_iter()
                .all(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok());
            if free {
                return ports;
            }
        }
        panic!("no free block of ports on 127.0.0.1 for seaweedfs");
    }
}

/// Servers still running, killed by the `atexit` hook: (pid, data dir, ports).
static LIVE_SERVERS: Mutex<Vec<(u32, PathBuf, Vec<u16>)>> = Mutex::new(Vec::new());

extern "C" fn kill_live_servers() {
    let Ok(mut live) = LIVE_SERVERS.try_lock() else {
        return;
    };
    for (pid, dir, ports) in live.drain(..) {
        signal_pid(pid, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
        remove_server_files(&dir, &ports);
    }
}

fn register_live(pid: u32, dir: &Path, ports: &[u16]) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(kill_live_servers);
        }
    });
    LIVE_SERVERS
        .lock()
        .unwrap()
        .push((pid, dir.to_path_buf(), ports.to_vec()));
}

fn unregister_live(pid: u32) {
    LIVE_SERVERS.lock().unwrap().retain(|(p, _, _)| *p != pid);
}

/// Removes a server's data dir and the unix sockets weed leaves in /tmp for its ports.
fn remove_server_files(dir: &Path, ports: &[u16]) {
    let _ = std::fs::remove_dir_all(dir);
    remove_sockets(ports);
}

fn remove_sockets(ports: &[u16]) {
    let suffixes: HashSet<String> = ports.iter().map(|p| format!("-{p}.sock")).collect();
    if let Ok(entries) = std::fs::read_dir("/tmp") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("seaweedfs-") && suffixes.iter().any(|s| name.ends_with(s)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Where server data dirs live: `<tmp>/walden-s3/<test pid>-<base port>`.
fn servers_root() -> PathBuf {
    let root = std::env::temp_dir().join("walden-s3");
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| sweep_stale(&root));
    root
}

/// Removes data dirs and sockets left by test processes that no longer exist (e.g. killed by
/// SIGKILL, when weed died from `PR_SET_PDEATHSIG` and the `atexit` hook never ran).
fn sweep_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, base)) = name.split_once('-') else {
            continue;
        };
        let (Ok(pid), Ok(base)) = (pid.parse::<u32>(), base.parse::<u16>()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_server_files(&entry.path(), &Ports { base }.all());
        }
    }
}

/// A SeaweedFS `weed mini` on 127.0.0.1 with SigV4 enforced and one bucket, owned by a test.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// `us-east-1`
    pub region: String,
    ports: Ports,
    /// Holds `s3.json`, `weed.log` and the server's data under `data/`.
    dir: PathBuf,
    child: Option<Child>,
}

impl S3Server {
    /// Starts a fresh SeaweedFS on free 127.0.0.1 ports, with SigV4 enforced and the bucket
    /// created, and waits until it serves signed requests.
    pub fn start() -> S3Server {
        let weed = weed_bin();
        let mut last_failure = String::new();
        for _attempt in 0..3 {
            let ports = Ports::pick();
            let dir = servers_root().join(format!("{}-{}", std::process::id(), ports.base));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("data"))
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
            std::fs::write(dir.join("s3.json"), identities_json())
                .unwrap_or_else(|e| panic!("cannot write s3.json: {e}"));
            let mut server = S3Server {
                endpoint: format!("http://127.0.0.1:{}", ports.s3()),
                bucket: BUCKET.to_string(),
                access_key: ACCESS_KEY.to_string(),
                secret_key: SECRET_KEY.to_string(),
                region: REGION.to_string(),
                ports,
                dir,
                child: None,
            };
            server.spawn(&weed);
            match server.wait_ready() {
                Ok(()) => return server,
                // Most likely a port was taken between the check and weed's bind: try others.
                Err(failure) => last_failure = failure,
            }
            drop(server);
        }
        panic!("seaweedfs did not start: {last_failure}");
    }

    fn spawn(&mut self, weed: &Path) {
        let p = self.ports.base;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("weed.log"))
            .expect("open weed.log");
        let mut cmd = Command::new(weed);
        cmd.arg("mini")
            .args(weed_args(
                &self.dir.join("data"),
                &self.dir.join("s3.json"),
                &self.bucket,
                p,
            ))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup weed.log"))
            .stderr(log);
        let child = spawn_tied_to_process(cmd)
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", weed.display()));
        register_live(child.id(), &self.dir, &self.ports.all());
        self.child = Some(child);
    }

    /// Waits until the server really serves the bucket: a signed list succeeds (creating the
    /// bucket if weed's `-bucket` flag did not), the master knows every volume already on disk
    /// (after a restart S3 answers before that, and reads fail with 500 meanwhile), and a probe
    /// object can be written, read back and deleted. Err (with the log tail) if weed exits or
    /// does not get there in time.
    fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.s3()));
        let bucket = self.s3_bucket();
        let mut last_error = String::from("port never answered");
        let mut tried_create = false;
        while started.elapsed() < READY_TIMEOUT {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("weed exited with {status}\n{}", self.log_tail()));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                match self.probe(&bucket) {
                    Ok(()) => return Ok(()),
                    Err(ProbeError::S3(S3Error::HttpFailWithBody(404, body)))
                        if !tried_create && started.elapsed() > Duration::from_secs(10) =>
                    {
                        last_error = format!("404 {body}");
                        tried_create = true;
                        let _ = block_on(Bucket::create_with_path_style(
                            &self.bucket,
                            self.s3_region(),
                            self.credentials(&self.secret_key),
                            BucketConfiguration::default(),
                        ));
                    }
                    Err(e) => last_error = e.to_string(),
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "not ready after {READY_TIMEOUT:?} (last error: {last_error})\n{}",
            self.log_tail()
        ))
    }

    fn probe(&self, bucket: &Bucket) -> Result<(), ProbeError> {
        block_on(bucket.list_page(String::new(), None, None, None, Some(1)))?;
        for id in self.volume_ids_on_disk() {
            let path = format!("/dir/lookup?volumeId={id}");
            match http_get(self.ports.base + 1, &path) {
                Some((200, _)) => {}
                other => return Err(ProbeError::Volume(id, format!("{other:?}"))),
            }
        }
        // A key at the top level: deleting it leaves no empty "directory" behind in listings.
        let key = "walden-harness-ready-probe";
        block_on(bucket.put_object(key, b"ready"))?;
        let got = block_on(bucket.get_object(key))?;
        if got.as_slice() != b"ready" {
            return Err(ProbeError::Volume(0, "probe read back wrong bytes".into()));
        }
        block_on(bucket.delete_object(key))?;
        Ok(())
    }

    /// Ids of the volumes weed keeps in the data dir (`<id>.dat` or `<collection>_<id>.dat`).
    fn volume_ids_on_disk(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("data")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let stem = name.strip_suffix(".dat")?;
                stem.rsplit('_').next()?.parse().ok()
            })
            .collect()
    }

    /// The last lines of weed's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("weed.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!("--- weed.log (tail) ---\n{}", lines[from..].join("\n"))
    }

    /// The PID of the running weed process, `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The S3 port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.ports.s3()
    }

    /// Stops the server (SIGTERM by PID, SIGKILL after 10 s) and keeps its data, for
    /// "storage down" tests. Does nothing if it is already stopped.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        signal_pid(pid, Signal::SIGTERM);
        if wait_timeout(&mut child, STOP_GRACE).is_none() {
            signal_pid(pid, Signal::SIGKILL);
            let _ = child.wait();
        }
        unregister_live(pid);
        remove_sockets(&self.ports.all());
    }

    /// Starts the server again on the same ports with the same data, for "storage back up"
    /// tests, and waits until it is ready. Stops it first if it is running.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn(&weed_bin());
        if let Err(failure) = self.wait_ready() {
            panic!("seaweedfs did not restart: {failure}");
        }
    }

    /// A unique key prefix for one test, so tests can share a server: `t-<name>-<random>`.
    pub fn prefix(&self, name: &str) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let clean: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        format!("t-{clean}-{:08x}{n:x}", rand::random::<u32>())
    }

    fn s3_region(&self) -> Region {
        Region::Custom {
            region: self.region.clone(),
            endpoint: self.endpoint.clone(),
        }
    }

    fn credentials(&self, secret: &str) -> Credentials {
        Credentials::new(Some(&self.access_key), Some(secret), None, None, None)
            .expect("static credentials")
    }

    /// A path-style rust-s3 client for the bucket with the right credentials.
    pub fn s3_bucket(&self) -> Box<Bucket> {
        self.s3_bucket_with_secret(&self.secret_key)
    }

    /// Like `s3_bucket` but signing with `secret`, e.g. a wrong one.
    pub fn s3_bucket_with_secret(&self, secret: &str) -> Box<Bucket> {
        Bucket::new(&self.bucket, self.s3_region(), self.credentials(secret))
            .expect("s3 client")
            .with_path_style()
            .with_request_timeout(Duration::from_secs(10))
            .expect("s3 client timeout")
    }

    /// Keys (relative to the bucket) under `prefix`, sorted, from a signed ListObjectsV2.
    pub fn list_keys(&self, prefix: &str) -> Vec<String> {
        let bucket = self.s3_bucket();
        let pages = block_on(bucket.list(prefix.to_string(), None))
            .unwrap_or_else(|e| panic!("list {prefix:?} on {}: {e}", self.endpoint));
        let mut keys: Vec<String> = pages
            .into_iter()
            .flat_map(|page| page.contents.into_iter().map(|o| o.key))
            .collect();
        keys.sort();
        keys
    }

    /// Reads one object (signed GET); panics if it fails.
    pub fn get(&self, key: &str) -> Vec<u8> {
        let bucket = self.s3_bucket();
        block_on(bucket.get_object(key))
            .unwrap_or_else(|e| panic!("get {key:?} on {}: {e}", self.endpoint))
            .to_vec()
    }

    /// Writes one object (signed PUT); panics if it fails.
    pub fn put(&self, key: &str, body: &[u8]) {
        let bucket = self.s3_bucket();
        block_on(bucket.put_object(key, body))
            .unwrap_or_else(|e| panic!("put {key:?} on {}: {e}", self.endpoint));
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_pid(child.id(), Signal::SIGKILL);
            let _ = child.wait();
            unregister_live(child.id());
        }
        remove_server_files(&self.dir, &self.ports.all());
    }
}

#[derive(Debug)]
enum ProbeError {
    S3(S3Error),
    Volume(u32, String),
}

impl From<S3Error> for ProbeError {
    fn from(e: S3Error) -> Self {
        ProbeError::S3(e)
    }
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::S3(e) => write!(f, "{e}"),
            ProbeError::Volume(id, got) => write!(f, "master does not know volume {id} yet: {got}"),
        }
    }
}

/// A plain HTTP/1.0 GET to 127.0.0.1:`port`, for weed's unauthenticated master API.
/// Returns the status code and body, `None` if the server cannot be reached.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    Some((status, body.unwrap_or_default()))
}

/// The identities file: one identity with every action on every bucket.
fn identities_json() -> String {
    format!(
        r#"{{
  "identities": [
    {{
      "name": "walden-test",
      "credentials": [{{ "accessKey": "{ACCESS_KEY}", "secretKey": "{SECRET_KEY}" }}],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    }}
  ]
}}
"#
    )
}

/// The `weed mini` flags, kept in step with `scripts/seaweedfs.sh`.
fn weed_args(data: &Path, s3_json: &Path, bucket: &str, p: u16) -> Vec<String> {
    let mut args: Vec<String> = [
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-volume.preStopSeconds=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("-dir={}", data.display()));
    args.push(format!("-s3.config={}", s3_json.display()));
    args.push(format!("-bucket={bucket}"));
    for (flag, port) in [
        ("s3.port", p),
        ("master.port", p + 1),
        ("volume.port", p + 2),
        ("filer.port", p + 3),
        ("admin.port", p + 4),
        ("s3.port.grpc", p + 5),
        ("master.port.grpc", p + 6),
        ("volume.port.grpc", p + 7),
        ("filer.port.grpc", p + 8),
        ("admin.port.grpc", p + 4 + 10000),
    ] {
        args.push(format!("-{flag}={port}"));
    }
    args
}

static SHARED: OnceLock<S3Server> = OnceLock::new();

/// One server per test binary, started on first use and shared by all its tests (give each
/// test its own `prefix`). It is killed when the test binary exits, also after a panic.
/// Never stop or restart it; tests that need that start their own `S3Server`.
pub fn shared_s3() -> &'static S3Server {
    SHARED.get_or_init(S3Server::start)
}

/// Runs `program` with `args` in the test environment of `s3` and a timeout of 60 s.
pub fn run_with_env<I, S>(program: &Path, args: I, s3: &S3Server) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().envs(test_env(s3));
    run(&mut cmd, Duration::from_secs(60))
}

/// Panics with both output streams unless `out` succeeded; returns stdout as a string.
pub fn expect_success(what: &str, out: &Output) -> String {
    if !out.status.success() {
        panic!(
            "{what} failed with {:?} (signal {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status.code(),
            out.status.signal(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An application's connection to `db`: WAL, `synchronous=NORMAL`, and the table `t (id, v)`
/// the replication tests write rows into.
pub fn app_writer(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).expect("open application db");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=wal; PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB);",
    )
    .expect("set up application db");
    conn
}

/// Rows in the table `t` of `db`.
pub fn row_count(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .and_then(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
        .unwrap_or_else(|e| panic!("count rows of {}: {e}", db.display()))
}
