#!/usr/bin/env python3
"""A sample application for the demo: writes rows to a SQLite database, one per transaction.

Usage: sample_app.py DB_PATH ROWS
Prints how many rows the database held when it started and when it finished.
"""
import sqlite3
import sys
import time


def main() -> int:
    path, rows = sys.argv[1], int(sys.argv[2])
    db = sqlite3.connect(path, timeout=5, isolation_level=None)
    db.execute("PRAGMA journal_mode=wal")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, at REAL, payload TEXT)"
    )
    start = db.execute("SELECT count(*) FROM events").fetchone()[0]
    print(f"sample app: {start} rows at start", flush=True)
    for i in range(rows):
        db.execute(
            "INSERT INTO events (at, payload) VALUES (?, ?)", (time.time(), f"event {i} " * 8)
        )
        time.sleep(0.005)
    end = db.execute("SELECT count(*) FROM events").fetchone()[0]
    print(f"sample app: wrote {rows} rows, {end} rows now", flush=True)
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
