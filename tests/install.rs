//! scripts/install.sh: files, permissions, and that the secret is never printed, both without
//! a terminal (flags and environment) and on one (answers typed at its prompts).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const SECRET: &str = "s3cr3t-Value-9f8e7d";

fn script() -> std::path::PathBuf {
    support::repo_root().join("scripts/install.sh")
}

fn assert_installed(root: &Path, bucket: &str, unit: &str) {
    let env_file = root.join("etc/walden/walden.env");
    let mode = std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "walden.env mode");
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(
        env.contains(&format!("LITESTREAM_SECRET_ACCESS_KEY={SECRET}")),
        "{env}"
    );
    assert!(env.contains("LITESTREAM_ACCESS_KEY_ID=AKTEST"), "{env}");
    let config = std::fs::read_to_string(root.join("etc/walden.yml")).unwrap();
    assert!(!config.contains(SECRET), "config must not hold the secret");
    assert!(
        config.contains(&format!("bucket: \"{bucket}\"")),
        "{config}"
    );
    assert!(root.join("usr/local/bin/walden").exists());
    let unit_text = std::fs::read_to_string(root.join("etc/systemd/system").join(unit)).unwrap();
    assert!(unit_text.contains("EnvironmentFile=/etc/walden/walden.env"));
    assert!(unit_text.contains("Type=notify"));
    let out = support::run(
        Command::new(support::walden_bin())
            .args(["databases", "-config"])
            .arg(root.join("etc/walden.yml")),
        Duration::from_secs(30),
    );
    let stdout = support::expect_success("walden databases", &out);
    assert!(stdout.contains("/data/app.db"), "{stdout}");
}

#[test]
fn installs_without_a_terminal_from_flags_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = support::run(
        Command::new("bash")
            .arg(script())
            .args(["--root"])
            .arg(dir.path())
            .args([
                "--db",
                "/data/app.db",
                "--bucket",
                "bkt",
                "--access-key-id",
                "AKTEST",
            ])
            .args([
                "--endpoint",
                "http://127.0.0.1:9",
                "--exec",
                "/usr/bin/app --flag",
            ])
            .arg("--binary")
            .arg(support::walden_bin())
            .arg("--no-systemctl")
            .env("LITESTREAM_SECRET_ACCESS_KEY", SECRET),
        Duration::from_secs(60),
    );
    let stdout = support::expect_success("install.sh", &out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
    assert_installed(dir.path(), "bkt", "walden-app.service");
    let config = std::fs::read_to_string(dir.path().join("etc/walden.yml")).unwrap();
    assert!(config.contains("exec: \"/usr/bin/app --flag\""), "{config}");
}

#[test]
fn refuses_without_a_secret_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = support::run(
        Command::new("bash")
            .arg(script())
            .arg("--root")
            .arg(dir.path())
            .args([
                "--db",
                "/data/app.db",
                "--bucket",
                "bkt",
                "--access-key-id",
                "AKTEST",
            ])
            .arg("--binary")
            .arg(support::walden_bin())
            .env_remove("LITESTREAM_SECRET_ACCESS_KEY")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("WALDEN_SECRET_ACCESS_KEY"),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing the secret"), "{stderr}");
    assert!(!dir.path().join("etc/walden/walden.env").exists());
}

/// Runs install.sh on a pseudo-terminal (Python's pty module), typing answers at its prompts,
/// and returns everything the terminal showed.
#[test]
fn asks_on_a_terminal_without_echoing_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let driver = r#"
import os, pty, sys, time
answers = [("Database path", "/data/app.db"), ("S3 bucket", "tty-bucket"),
           ("S3 endpoint", "http://127.0.0.1:9"), ("Region", ""), ("Access key id", "AKTEST"),
           ("Secret access key", sys.argv[1])]
pid, fd = pty.fork()
if pid == 0:
    os.execvp("bash", ["bash"] + sys.argv[2:])
seen = b""
deadline = time.time() + 60
while time.time() < deadline:
    try:
        chunk = os.read(fd, 1024)
    except OSError:
        break
    if not chunk:
        break
    seen += chunk
    while answers and answers[0][0].encode() in seen.split(b"\n")[-1]:
        prompt, answer = answers.pop(0)
        os.write(fd, (answer + "\r").encode())
        seen += b"\n"
_, status = os.waitpid(pid, 0)
sys.stdout.write(seen.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;
    let out = support::run(
        Command::new("python3")
            .args(["-c", driver, SECRET])
            .arg(script())
            .arg("--root")
            .arg(dir.path())
            .arg("--binary")
            .arg(support::walden_bin())
            .arg("--no-systemctl")
            .env_remove("LITESTREAM_SECRET_ACCESS_KEY")
            .env_remove("LITESTREAM_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("WALDEN_SECRET_ACCESS_KEY")
            .env_remove("WALDEN_ACCESS_KEY_ID"),
        Duration::from_secs(90),
    );
    let shown = support::expect_success("install.sh on a terminal", &out);
    assert!(shown.contains("Secret access key (not echoed)"), "{shown}");
    assert!(
        shown.contains("tty-bucket"),
        "typed answers are echoed: {shown}"
    );
    assert!(!shown.contains(SECRET), "the secret was echoed: {shown}");
    assert_installed(dir.path(), "tty-bucket", "walden.service");
}
