//! `walden replicate -exec` as a supervisor (issue #3, item 9), checked against the README
//! ("walden replicate" and "Exit codes"): every forwarded signal reaches the child, exit codes
//! come through, rows the child writes just before it exits are replicated, a missing database
//! is restored before the child starts (and the child is not started when the store cannot be
//! read), a child that ignores SIGTERM is killed after the shutdown timeout, and orphaned
//! grandchildren are reaped by Walden as a subreaper.
//!
//! Walden runs as a child of the test with its log in the test's temp dir. The programs it
//! supervises are small `/bin/sh` or python3 scripts written into that dir; they report what
//! they saw through files there (python3's stdlib `sqlite3` does their database writes, so the
//! sqlite3 CLI is not needed). Every loop in a script is bounded, so nothing outlives a failed
//! test for long.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use rusqlite::Connection;
use support::*;
use tempfile::TempDir;

/// How long a Walden run may take to exit once its child is done or told to stop.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child may take to start and report something.
const REPORT_TIMEOUT: Duration = Duration::from_secs(20);
/// `shutdown-timeout` in every config here.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Where a test's replica lives.
enum Replica<'a> {
    /// A key prefix on an S3 server, with the replica's `sync-interval`.
    S3 {
        s3: &'a S3Server,
        prefix: String,
        sync_interval: &'static str,
    },
    /// A directory inside the test's temp dir.
    File,
}

/// A temp dir with a database path, a config for it and the environment to run Walden in.
struct Setup {
    dir: TempDir,
    db: PathBuf,
    config: PathBuf,
    replica_yaml: String,
    env: Vec<(String, String)>,
}

impl Setup {
    fn new(replica: Replica<'_>) -> Setup {
        let dir = tempfile::tempdir().expect("create temp dir");
        let db = dir.path().join("app.db");
        let (replica_yaml, env) = match replica {
            Replica::S3 {
                s3,
                prefix,
                sync_interval,
            } => (
                format!(
                    "      - type: s3\n        bucket: {}\n        path: {prefix}\n        \
                     endpoint: {}\n        region: {}\n        sync-interval: {sync_interval}\n",
                    s3.bucket, s3.endpoint, s3.region
                ),
                test_env(s3),
            ),
            Replica::File => (
                format!(
                    "      - type: file\n        path: {}\n",
                    dir.path().join("replica").display()
                ),
                // No S3 here: the test process's environment without credentials.
                std::env::vars()
                    .filter(|(k, _)| !k.starts_with("AWS_") && !k.starts_with("LITESTREAM_"))
                    .collect(),
            ),
        };
        let setup = Setup {
            config: dir.path().join("walden.yml"),
            dir,
            db,
            replica_yaml,
            env,
        };
        setup.write_config("");
        setup
    }

    /// (Re)writes the config with `top` (YAML lines) added at the top level.
    fn write_config(&self, top: &str) {
        let yaml = format!(
            "{top}shutdown-timeout: {}s\ndbs:\n  - path: {}\n    restore-if-db-not-exists: true\n    \
             replicas:\n{}",
            SHUTDOWN_TIMEOUT.as_secs(),
            self.db.display(),
            self.replica_yaml
        );
        fs::write(&self.config, yaml).expect("write walden.yml");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes an executable script into the temp dir.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, body).unwrap_or_else(|e| panic!("write {name}: {e}"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod script");
        path
    }

    /// The `-exec` command of a python3 child that opens the database (creating it in WAL
    /// mode with table `t` if needed), writes the row count it sees into the file `seen`,
    /// inserts `rows` rows one transaction each, closes the database and exits at once with
    /// `code`.
    fn writer(&self, rows: u32, seen: &str, code: i32) -> String {
        let script = self.script(
            "writer.py",
            r#"import os, sqlite3, sys
db, rows, seen, code = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
con = sqlite3.connect(db, isolation_level=None, timeout=30)
con.execute("PRAGMA journal_mode=WAL")
con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, note TEXT NOT NULL, pad BLOB)")
count = con.execute("SELECT count(*) FROM t").fetchone()[0]
with open(seen + ".tmp", "w") as f:
    f.write(str(count))
os.rename(seen + ".tmp", seen)
for i in range(rows):
    con.execute("INSERT INTO t (note, pad) VALUES (?, randomblob(300))", ("pid %d row %d" % (os.getpid(), i),))
con.close()
sys.exit(code)
"#,
        );
        format!(
            "python3 {} {} {rows} {} {code}",
            script.display(),
            self.db.display(),
            self.path(seen).display()
        )
    }

    /// Starts `walden replicate -config … [-exec exec]`.
    fn start(&self, exec: Option<&str>) -> Walden {
        let log_path = self.path(&format!("walden-{}.log", rand::random::<u32>()));
        let log = fs::File::create(&log_path).expect("create walden log");
        let mut cmd = Command::new(walden_bin());
        cmd.arg("replicate").arg("-config").arg(&self.config);
        if let Some(exec) = exec {
            cmd.arg("-exec").arg(exec);
        }
        cmd.env_clear()
            .envs(self.env.iter().cloned())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup walden log"))
            .stderr(log);
        die_with_parent(&mut cmd);
        Walden {
            guard: ChildGuard::spawn(&mut cmd),
            log: log_path,
        }
    }

    /// Runs Walden until it exits by itself and returns its exit code and log.
    fn run(&self, exec: Option<&str>) -> (i32, String) {
        let mut walden = self.start(exec);
        let code = walden.wait(EXIT_TIMEOUT);
        (code, walden.log())
    }

    /// Restores the replica to a new file with `walden restore` and returns its path.
    fn restore(&self, name: &str) -> PathBuf {
        let out = self.path(name);
        let mut cmd = Command::new(walden_bin());
        cmd.arg("restore")
            .arg("-config")
            .arg(&self.config)
            .arg("-o")
            .arg(&out)
            .arg(&self.db)
            .env_clear()
            .envs(self.env.iter().cloned());
        expect_success("walden restore", &run(&mut cmd, Duration::from_secs(60)));
        out
    }

    /// Output of `walden generations` for the database, for failure messages.
    fn generations(&self) -> String {
        let mut cmd = Command::new(walden_bin());
        cmd.arg("generations")
            .arg("-config")
            .arg(&self.config)
            .arg(&self.db)
            .env_clear()
            .envs(self.env.iter().cloned());
        let out = run(&mut cmd, Duration::from_secs(60));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The number the child wrote into the file `name`, if it did.
    fn reported(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.path(name)).ok()
    }

    /// Removes the database, its -wal and -shm, and optionally Walden's `.app.db-litestream`.
    fn delete_db(&self, keep_meta: bool) {
        for suffix in ["", "-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{suffix}", self.db.display()));
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("remove {}: {e}", p.display()),
            }
        }
        if !keep_meta {
            let meta = self.path(".app.db-litestream");
            assert!(
                meta.is_dir(),
                "expected Walden's metadata dir {}",
                meta.display()
            );
            fs::remove_dir_all(&meta).expect("remove metadata dir");
        }
    }
}

/// A running `walden replicate`, killed by PID if the test ends early.
struct Walden {
    guard: ChildGuard,
    log: PathBuf,
}

impl Walden {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.guard.pid() as i32)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap_or_else(|e| panic!("kill walden with {sig}: {e}"));
    }

    /// Panics with the log if Walden has already exited.
    fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.guard.wait_timeout(Duration::ZERO) {
            panic!(
                "walden exited {when} with {status}\n--- log ---\n{}",
                self.log()
            );
        }
    }

    /// Waits for Walden to exit and returns its exit code; panics with the log if it does not
    /// exit within `timeout` or dies from a signal itself.
    fn wait(&mut self, timeout: Duration) -> i32 {
        let Some(status) = self.guard.wait_timeout(timeout) else {
            panic!(
                "walden still running after {timeout:?}\n--- log ---\n{}",
                self.log()
            );
        };
        match status.code() {
            Some(code) => code,
            None => panic!(
                "walden died from signal {:?} instead of exiting\n--- log ---\n{}",
                status.signal(),
                self.log()
            ),
        }
    }

    /// Polls `check` until it gives a value, for at most `timeout`; panics with `what` and the
    /// log if it does not, or if Walden exits meanwhile.
    fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check() {
                return value;
            }
            self.assert_running(&format!("while waiting for {what}"));
            if Instant::now() >= deadline {
                panic!("timed out waiting for {what}\n--- log ---\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Asserts that Walden exited with `expected`, showing its log otherwise.
fn assert_exit(what: &str, (code, log): &(i32, String), expected: i32) {
    assert_eq!(
        *code, expected,
        "{what}: walden exited {code}, expected {expected}\n--- log ---\n{log}"
    );
}

/// Reads a PID the child wrote into a file.
fn read_pid(path: &Path) -> Option<Pid> {
    let text = fs::read_to_string(path).ok()?;
    text.trim().parse().ok().map(Pid::from_raw)
}

/// Whether a process with `pid` exists at all (a zombie counts).
fn exists(pid: Pid) -> bool {
    kill(pid, None) != Err(Errno::ESRCH)
}

/// State and parent of a process from `/proc/<pid>/stat`, `None` once it is gone.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// PIDs of `parent`'s children that are zombies.
fn zombie_children(parent: Pid) -> Vec<i32> {
    let mut zombies = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Some(('Z', ppid)) = proc_stat(pid)
            && ppid == parent.as_raw()
        {
            zombies.push(pid);
        }
    }
    zombies
}

/// Polls `check` for at most `timeout`.
fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn row_count(db: &Path) -> i64 {
    let conn = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .expect("count rows")
}

/// Restores the replica and asserts that it matches the source database row for row.
/// `log` is the last run's log, shown when they differ.
fn assert_replica_matches(setup: &Setup, name: &str, rows: i64, log: &str) {
    let restored = setup.restore(name);
    assert_eq!(integrity_check(&restored), "ok", "restored database");
    assert_eq!(row_count(&setup.db), rows, "rows in the source database");
    let (source, copy) = (dump(&setup.db), dump(&restored));
    if source != copy {
        panic!(
            "the restored database ({} rows) differs from the source ({rows} rows)\n\
             only in the source:\n{}\nonly in the restored copy:\n{}\n\
             --- walden generations ---\n{}--- last run's log ---\n{log}",
            row_count(&restored),
            lines_not_in(&source, &copy),
            lines_not_in(&copy, &source),
            setup.generations()
        );
    }
}

/// The lines of dump `a` that `b` lacks (at most 10, shortened), for failure messages.
fn lines_not_in(a: &str, b: &str) -> String {
    let b: std::collections::HashSet<&str> = b.lines().collect();
    let missing: Vec<&str> = a.lines().filter(|l| !b.contains(l)).collect();
    let mut out: Vec<String> = missing
        .iter()
        .take(10)
        .map(|l| format!("  {}", l.chars().take(100).collect::<String>()))
        .collect();
    if missing.len() > 10 {
        out.push(format!("  … {} more", missing.len() - 10));
    }
    out.join("\n")
}

// ---------------------------------------------------------------------------------------------
// 1. Signals
// ---------------------------------------------------------------------------------------------

/// A python3 child that records the name of every forwarded signal it gets in `signals` and
/// exits 0 after SIGINT or SIGTERM. It writes its PID to `child.pid` once its handlers are in.
const SIGNAL_CHILD: &str = r#"import os, signal, sys, time
out, ready = sys.argv[1], sys.argv[2]
done = False
def record(num, frame):
    global done
    name = signal.Signals(num).name
    with open(out, "a") as f:
        f.write(name + "\n")
    if name in ("SIGINT", "SIGTERM"):
        done = True
for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH"):
    signal.signal(getattr(signal, name), record)
with open(ready + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(ready + ".tmp", ready)
deadline = time.time() + 60
while not done and time.time() < deadline:
    time.sleep(0.02)
sys.exit(0 if done else 9)
"#;

/// Sends every non-terminating forwarded signal to Walden, one at a time, checking that the
/// child records each and keeps running, then `last` (SIGINT or SIGTERM), after which the
/// child exits 0 and so must Walden.
fn signals_reach_the_child(last: Signal) {
    let setup = Setup::new(Replica::File);
    let script = setup.script("signals.py", SIGNAL_CHILD);
    let signals = setup.path("signals");
    let ready = setup.path("child.pid");
    let exec = format!(
        "python3 {} {} {}",
        script.display(),
        signals.display(),
        ready.display()
    );
    let mut walden = setup.start(Some(&exec));
    let child = walden.wait_for("the child's handlers", REPORT_TIMEOUT, || read_pid(&ready));

    let mut expected = String::new();
    let staying = [
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
    ];
    for sig in staying.into_iter().chain([last]) {
        walden.signal(sig);
        expected.push_str(&format!("{sig}\n"));
        walden.wait_for(
            &format!("the child to record {sig}"),
            REPORT_TIMEOUT,
            || {
                let got = fs::read_to_string(&signals).unwrap_or_default();
                assert!(
                    expected.starts_with(&got),
                    "the child recorded {got:?}, expected {expected:?} so far"
                );
                (got == expected).then_some(())
            },
        );
        if sig != last {
            // The signal was only passed on: Walden and the child both keep running.
            thread::sleep(Duration::from_millis(100));
            walden.assert_running(&format!("after {sig}"));
            assert!(exists(child), "the child died after {sig}");
        }
    }
    let code = walden.wait(EXIT_TIMEOUT);
    assert_exit(
        "child exits 0 after the last signal",
        &(code, walden.log()),
        0,
    );
    assert_eq!(fs::read_to_string(&signals).unwrap(), expected);
}

#[test]
fn every_forwarded_signal_reaches_the_child_then_sigterm_stops_it() {
    signals_reach_the_child(Signal::SIGTERM);
}

#[test]
fn every_forwarded_signal_reaches_the_child_then_sigint_stops_it() {
    signals_reach_the_child(Signal::SIGINT);
}

// ---------------------------------------------------------------------------------------------
// 2. and 9. Exit codes
// ---------------------------------------------------------------------------------------------

#[test]
fn the_childs_exit_code_comes_through_from_the_config_exec_key() {
    let setup = Setup::new(Replica::File);
    let script = setup.script("exit.sh", "#!/bin/sh\nexit \"$1\"\n");
    for code in [0, 3] {
        setup.write_config(&format!("exec: '/bin/sh {} {code}'\n", script.display()));
        assert_exit(&format!("exec: exit {code}"), &setup.run(None), code);
    }
}

#[test]
fn exec_commands_run_like_a_shell_would_and_their_codes_come_through() {
    let setup = Setup::new(Replica::File);
    let not_executable = setup.path("not-executable.sh");
    fs::write(&not_executable, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&not_executable, fs::Permissions::from_mode(0o644)).unwrap();
    let cases = [
        ("sh -c 'exit 7'".to_string(), 7),
        // Shell operators: runs through /bin/sh -c, not cut at `&&`.
        ("true && exit 5".to_string(), 5),
        ("exit 0; exit 9".to_string(), 0),
        ("/nonexistent/prog".to_string(), 127),
        (not_executable.display().to_string(), 126),
    ];
    for (exec, expected) in cases {
        assert_exit(
            &format!("-exec {exec:?}"),
            &setup.run(Some(&exec)),
            expected,
        );
    }
}

#[test]
fn a_child_killed_by_sigterm_gives_143() {
    let setup = Setup::new(Replica::File);
    let pid_file = setup.path("child.pid");
    let script = setup.script(
        "sleeper.sh",
        &format!(
            "#!/bin/sh\necho $$ > {0}.tmp && mv {0}.tmp {0}\nexec sleep 60\n",
            pid_file.display()
        ),
    );
    let mut walden = setup.start(Some(&script.display().to_string()));
    let child = walden.wait_for("the child to start", REPORT_TIMEOUT, || read_pid(&pid_file));
    // Once `sleep` runs, nothing in the child handles SIGTERM.
    walden.wait_for("the child to exec sleep", REPORT_TIMEOUT, || {
        let comm = fs::read_to_string(format!("/proc/{child}/comm")).ok()?;
        (comm.trim() == "sleep").then_some(())
    });
    // Had it been killed by the shutdown timeout instead, the code would be 137.
    walden.signal(Signal::SIGTERM);
    let code = walden.wait(EXIT_TIMEOUT);
    assert_exit("child killed by SIGTERM", &(code, walden.log()), 143);
    assert!(!exists(child), "the child {child} is still there");
}

// ---------------------------------------------------------------------------------------------
// 3. The child's last writes are replicated
// ---------------------------------------------------------------------------------------------

/// The child inserts 100 rows and exits at once; the final sync must have them in S3. With
/// `sync-interval: 1m` no periodic sync can happen during the run, so only the final sync
/// after the child's exit (and the initial sync before it) can have uploaded anything.
#[test]
fn rows_written_just_before_the_child_exits_are_in_the_replica() {
    let s3 = shared_s3();
    for sync_interval in ["200ms", "1m"] {
        let setup = Setup::new(Replica::S3 {
            s3,
            prefix: s3.prefix("supervise-last-writes"),
            sync_interval,
        });
        // An existing database, so the replicator has it open before the child starts.
        let conn = Connection::open(&setup.db).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT NOT NULL, pad BLOB);
             INSERT INTO t (note) VALUES ('before the child');",
        )
        .unwrap();
        drop(conn);
        let exec = setup.writer(100, "seen", 0);
        let result = setup.run(Some(&exec));
        assert_exit(&format!("sync-interval {sync_interval}"), &result, 0);
        assert_eq!(setup.reported("seen").as_deref(), Some("1"));
        assert_replica_matches(&setup, "restored.db", 101, &result.1);
    }
}

// ---------------------------------------------------------------------------------------------
// 4., 5. and 6. Restore before the child starts
// ---------------------------------------------------------------------------------------------

/// First run: no database, no backup; the child creates the database and writes 50 rows.
/// Then the database is deleted, and the second run's child must see those 50 rows at start;
/// it adds 10 more, which must be replicated too.
///
/// This once failed about half the time: generations A and B ending in the same second tied in
/// restore's choice; `regression_a_new_generation_is_dated_after_the_one_it_was_restored_from`
/// pins the fix.
fn missing_database_is_restored_before_the_child_starts(keep_meta: bool) {
    let s3 = shared_s3();
    let setup = Setup::new(Replica::S3 {
        s3,
        prefix: s3.prefix("supervise-restore"),
        sync_interval: "200ms",
    });
    let first = setup.writer(50, "seen-1", 0);
    assert_exit("first run", &setup.run(Some(&first)), 0);
    assert_eq!(setup.reported("seen-1").as_deref(), Some("0"));
    assert_eq!(row_count(&setup.db), 50);

    setup.delete_db(keep_meta);
    let second = setup.writer(10, "seen-2", 0);
    let result = setup.run(Some(&second));
    assert_exit("second run", &result, 0);
    assert_eq!(
        setup.reported("seen-2").as_deref(),
        Some("50"),
        "rows the second child saw at start\n--- log ---\n{}",
        result.1
    );
    assert_replica_matches(&setup, "restored.db", 60, &result.1);
}

#[test]
fn missing_database_is_restored_before_the_child_starts_with_metadata_kept() {
    missing_database_is_restored_before_the_child_starts(true);
}

#[test]
fn missing_database_is_restored_before_the_child_starts_with_metadata_deleted() {
    missing_database_is_restored_before_the_child_starts(false);
}

/// `(generation, end)` per line of `walden generations`, `end` as printed (1 s resolution).
fn generation_ends(setup: &Setup) -> Vec<(String, String)> {
    let out = setup.generations();
    out.lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(
                fields.len(),
                5,
                "unexpected `walden generations` line {line:?}\n{out}"
            );
            (fields[1].to_string(), fields[4].to_string())
        })
        .collect()
}

/// Regression for the bug once marked at `missing_database_is_restored_before_the_child_starts`:
/// after restore-before-start the run replicates into a new generation, and when it ended in
/// the same second as the generation it was restored from, `walden restore` could pick the old
/// one (storage timestamps have 1 s resolution; generation IDs are random). Walden now dates a
/// new generation strictly after every other one, so each cycle (write, delete the database,
/// restore and write more) must leave the new generation ending later, and a restore must
/// bring back every row. Several quick cycles make a same-second start likely.
#[test]
fn regression_a_new_generation_is_dated_after_the_one_it_was_restored_from() {
    let s3 = shared_s3();
    for cycle in 0..4 {
        let setup = Setup::new(Replica::S3 {
            s3,
            prefix: s3.prefix("supervise-same-second"),
            sync_interval: "200ms",
        });
        let first = setup.writer(5, "seen-1", 0);
        assert_exit("first run", &setup.run(Some(&first)), 0);
        let old = generation_ends(&setup);
        assert_eq!(old.len(), 1, "generations after the first run: {old:?}");
        setup.delete_db(false);
        let second = setup.writer(5, "seen-2", 0);
        let result = setup.run(Some(&second));
        assert_exit("second run", &result, 0);
        assert_eq!(setup.reported("seen-2").as_deref(), Some("5"));

        let both = generation_ends(&setup);
        let Some((new_id, new_end)) = both.iter().find(|(g, _)| *g != old[0].0).cloned() else {
            panic!(
                "the second run made no new generation: {both:?}\n{}",
                result.1
            );
        };
        let old_end = &both.iter().find(|(g, _)| *g == old[0].0).unwrap().1;
        assert!(
            new_end > *old_end,
            "cycle {cycle}: new generation {new_id} ends at {new_end}, not after {} at {old_end}",
            old[0].0
        );
        assert_replica_matches(&setup, "restored.db", 10, &result.1);
    }
}

/// With the store down, a missing database that has a backup cannot be restored: Walden exits
/// 71 without starting the child and without creating a database. Once the store is back, the
/// same command restores the database and runs the child.
#[test]
fn storage_down_and_database_missing_does_not_start_the_child() {
    // Its own server, because this test stops it.
    let mut s3 = S3Server::start();
    let prefix = s3.prefix("supervise-store-down");
    let setup = Setup::new(Replica::S3 {
        s3: &s3,
        prefix,
        sync_interval: "200ms",
    });
    let first = setup.writer(20, "seen-1", 0);
    assert_exit("first run, store up", &setup.run(Some(&first)), 0);
    setup.delete_db(false);

    s3.stop();
    let second = setup.writer(5, "seen-2", 0);
    let started = Instant::now();
    let mut walden = setup.start(Some(&second));
    let code = walden.wait(Duration::from_secs(120));
    let result = (code, walden.log());
    assert_exit("second run, store down", &result, 71);
    assert!(
        setup.reported("seen-2").is_none(),
        "the child ran although the database could not be restored\n--- log ---\n{}",
        result.1
    );
    assert!(
        !setup.db.exists(),
        "a database was created: {}",
        setup.db.display()
    );
    eprintln!(
        "walden gave up on the stopped store after {:?}",
        started.elapsed()
    );

    s3.restart();
    let result = setup.run(Some(&second));
    assert_exit("third run, store up again", &result, 0);
    assert_eq!(
        setup.reported("seen-2").as_deref(),
        Some("20"),
        "rows the child saw at start\n--- log ---\n{}",
        result.1
    );
}

#[test]
fn empty_replica_and_missing_database_start_the_child_fresh() {
    let s3 = shared_s3();
    let prefix = s3.prefix("supervise-fresh");
    let setup = Setup::new(Replica::S3 {
        s3,
        prefix: prefix.clone(),
        sync_interval: "200ms",
    });
    assert!(s3.list_keys(&prefix).is_empty());
    let exec = setup.writer(7, "seen", 0);
    let result = setup.run(Some(&exec));
    assert_exit("fresh start", &result, 0);
    assert_eq!(
        setup.reported("seen").as_deref(),
        Some("0"),
        "rows the child saw at start\n--- log ---\n{}",
        result.1
    );
    // The database the child created is replicated like any other.
    assert!(!s3.list_keys(&prefix).is_empty(), "nothing was uploaded");
    assert_replica_matches(&setup, "restored.db", 7, &result.1);
}

// ---------------------------------------------------------------------------------------------
// 7. Shutdown timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn a_child_ignoring_sigterm_is_killed_after_the_shutdown_timeout() {
    let setup = Setup::new(Replica::File);
    let pid_file = setup.path("child.pid");
    // `sleep` inherits the ignored SIGTERM, so nothing in the child's group reacts to it.
    let script = setup.script(
        "stubborn.sh",
        &format!(
            "#!/bin/sh\ntrap '' TERM\necho $$ > {0}.tmp && mv {0}.tmp {0}\n\
             i=0\nwhile [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\nexit 0\n",
            pid_file.display()
        ),
    );
    let mut walden = setup.start(Some(&script.display().to_string()));
    let child = walden.wait_for("the child to start", REPORT_TIMEOUT, || read_pid(&pid_file));
    let sent = Instant::now();
    walden.signal(Signal::SIGTERM);
    let code = walden.wait(Duration::from_secs(20));
    let took = sent.elapsed();
    assert_exit("child ignoring SIGTERM", &(code, walden.log()), 137);
    assert!(
        took >= SHUTDOWN_TIMEOUT - Duration::from_millis(200) && took < Duration::from_secs(10),
        "walden exited {took:?} after SIGTERM with shutdown-timeout {SHUTDOWN_TIMEOUT:?}"
    );
    // The child and everything in its process group are gone, not left running or unreaped.
    assert!(
        eventually(Duration::from_secs(2), || !exists(child)),
        "the child {child} still exists: {:?}",
        proc_stat(child.as_raw())
    );
    assert!(
        eventually(Duration::from_secs(2), || killpg(child, None)
            == Err(Errno::ESRCH)),
        "processes are left in the child's process group {child}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Orphans are reaped
// ---------------------------------------------------------------------------------------------

/// The child starts a grandchild through an intermediate shell that exits at once, so the
/// grandchild is orphaned and, Walden being a subreaper, adopted by Walden. When the
/// grandchild exits while Walden still runs, Walden must reap it: no zombie is left.
#[test]
fn an_orphaned_grandchild_is_adopted_and_reaped() {
    let setup = Setup::new(Replica::File);
    let d = setup.dir.path().display().to_string();
    // Each waits for a file from the test (bounded, in case the test dies).
    let grandchild = setup.script(
        "grandchild.sh",
        &format!(
            "#!/bin/sh\ni=0\nwhile [ ! -e {d}/release-grandchild ] && [ $i -lt 600 ]; do \
             sleep 0.05; i=$((i+1)); done\nexit 0\n"
        ),
    );
    let child = setup.script(
        "child.sh",
        &format!(
            "#!/bin/sh\nsh -c '{gc} & echo $! > {d}/gpid.tmp && mv {d}/gpid.tmp {d}/gpid'\n\
             i=0\nwhile [ ! -e {d}/release-child ] && [ $i -lt 600 ]; do \
             sleep 0.05; i=$((i+1)); done\nexit 0\n",
            gc = grandchild.display()
        ),
    );
    let mut walden = setup.start(Some(&child.display().to_string()));
    let walden_pid = walden.pid();
    let gpid = walden.wait_for("the grandchild's PID", REPORT_TIMEOUT, || {
        read_pid(&setup.path("gpid"))
    });
    // The intermediate shell has exited or is about to; the orphan goes to Walden.
    walden.wait_for("walden to adopt the grandchild", REPORT_TIMEOUT, || {
        let (state, ppid) = proc_stat(gpid.as_raw()).expect("the grandchild exited early");
        assert_ne!(state, 'Z', "the grandchild exited early");
        (ppid == walden_pid.as_raw()).then_some(())
    });

    fs::write(setup.path("release-grandchild"), "").unwrap();
    let reaped = eventually(Duration::from_secs(5), || {
        proc_stat(gpid.as_raw()).is_none()
    });
    walden.assert_running("before the child was released");
    assert!(
        reaped,
        "the orphaned grandchild {gpid} was not reaped: {:?}\n--- log ---\n{}",
        proc_stat(gpid.as_raw()),
        walden.log()
    );
    let zombies = zombie_children(walden_pid);
    assert!(zombies.is_empty(), "zombie children of walden: {zombies:?}");

    fs::write(setup.path("release-child"), "").unwrap();
    let code = walden.wait(EXIT_TIMEOUT);
    assert_exit("child exits 0", &(code, walden.log()), 0);
}

/// Under systemd (`Type=notify`), READY=1 reaches the notify socket once the child runs, and
/// STOPPING=1 when it has exited; a unit that waits for readiness starts on time.
#[test]
fn readiness_is_sent_to_the_notify_socket_once_the_child_runs() {
    let mut setup = Setup::new(Replica::File);
    let socket_path = setup.path("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(REPORT_TIMEOUT))
        .expect("socket timeout");
    setup.env.push((
        "NOTIFY_SOCKET".into(),
        socket_path.to_string_lossy().into_owned(),
    ));
    let marker = setup.path("child-started");
    let child = setup.script(
        "child.sh",
        &format!("#!/bin/sh\ntouch {}\nsleep 1\nexit 0\n", marker.display()),
    );
    let mut walden = setup.start(Some(&child.display().to_string()));
    let mut buf = [0u8; 256];
    let n = socket
        .recv(&mut buf)
        .expect("no READY=1 on the notify socket");
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.contains("READY=1"), "first notification: {first:?}");
    assert!(
        eventually(REPORT_TIMEOUT, || marker.exists()),
        "the child never ran"
    );
    let n = socket
        .recv(&mut buf)
        .expect("no STOPPING=1 on the notify socket");
    let second = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        second.contains("STOPPING=1"),
        "second notification: {second:?}"
    );
    assert_eq!(walden.wait(EXIT_TIMEOUT), 0, "{}", walden.log());
}
