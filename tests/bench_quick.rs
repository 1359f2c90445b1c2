//! Smoke test of the benchmark: `scripts/bench.sh --quick` runs every workload for a few seconds
//! against this build of Walden and both Litestream versions, exits 0 and prints the whole table.
//! No timing is asserted.

use std::net::TcpListener;
use std::process::Command;

/// Rows of the table printed by `scripts/bench/bench.py` (label prefixes), in --quick mode.
const ROWS: &[&str] = &[
    "1 max-rate writer, tx/s",
    "1 max-rate writer, x none",
    "1 steady 500 tx/s writer, tx/s",
    "1 steady writer, x none",
    "2 CPU s / 10k tx, max-rate",
    "2 CPU s / 10k tx, steady",
    "2 peak RSS MB, max-rate",
    "2 peak RSS MB, steady",
    "3 PUT requests / h",
    "3 GET requests / h",
    "3 LIST requests / h",
    "3 DELETE requests / h",
    "3 other requests",
    "3 MB uploaded / h",
    "4 lag p50 ms",
    "4 lag p99 ms",
    "4 markers found",
    "4 steady replica restores every row",
    "5 restore wall s",
    "5 restore peak RSS MB",
    "5 MiB uploaded building the replica",
    "5 restored db correct",
];

/// The --quick database counts of workload 6.
const SCALE_N: &[u32] = &[5, 20];
const SCALE_ROWS: &[&str] = &[
    "dbs: start-up",
    "dbs idle: RSS MB",
    "dbs idle: CPU",
    "dbs idle: requests",
    "dbs written",
    "dbs written: CPU",
    "dbs: peak RSS MB",
];

/// A port P for seaweedfs.sh with P..P+8 and P+10004 free on 127.0.0.1.
fn free_base_port() -> u16 {
    let start = 24_000 + (std::process::id() % 300) as u16 * 50;
    for i in 0..300u16 {
        let p = 24_000 + (start - 24_000 + i * 50) % 15_000;
        let mut ports = (p..=p + 8).chain([p + 10_004]);
        if ports.all(|q| TcpListener::bind(("127.0.0.1", q)).is_ok()) {
            return p;
        }
    }
    panic!("no free port range for SeaweedFS");
}

#[test]
fn bench_quick_prints_every_row() {
    let root = env!("CARGO_MANIFEST_DIR");
    let port = free_base_port();
    let out = Command::new(format!("{root}/scripts/bench.sh"))
        .arg("--quick")
        .current_dir(root)
        .env("WALDEN_BENCH_BIN", env!("CARGO_BIN_EXE_walden"))
        .env("WALDEN_BENCH_PORT", port.to_string())
        .output()
        .expect("run scripts/bench.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench.sh --quick exited {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let mut rows: Vec<String> = ROWS.iter().map(|r| r.to_string()).collect();
    for n in SCALE_N {
        rows.extend(SCALE_ROWS.iter().map(|r| format!("6 {n} {r}")));
    }
    for row in &rows {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {row}")))
            .unwrap_or_else(|| panic!("row {row:?} missing from the table:\n{stdout}"));
        // | figure | none | Walden | LS 0.3.13 | LS 0.5.17 | ratio | target |
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(
            cells.len(),
            9,
            "row {row:?} has the wrong number of cells: {line}"
        );
        assert_ne!(cells[3], "-", "row {row:?} has no Walden figure: {line}");
        assert_ne!(
            cells[3], "FAILED",
            "row {row:?}: Walden failed: {line}\n{stdout}"
        );
    }
}
