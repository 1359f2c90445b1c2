#!/usr/bin/env python3
"""SQLite writers for the benchmark (Python stdlib only).

  writer.py init DB                       WAL mode, table t(id, at, data)
  writer.py run DB SECONDS RATE MARK OUT  one row (~100-byte random blob) per transaction,
                                          synchronous=NORMAL; RATE 0 = as fast as possible;
                                          every MARK seconds (0 = never) the row is a marker
                                          whose commit time and first 16 blob bytes are recorded
  writer.py bulk DB MIB                   fast bulk insert (1 KiB rows, journal off) to MIB,
                                          then switches the file to WAL mode
  writer.py wal DB MIB MIB_PER_S          ~MIB of new rows through the WAL, 256 KiB per
                                          transaction, paced
  writer.py many DIR N                    creates DIR/db0000.db ... (init each)
  writer.py scale DIR N SECONDS RATE      RATE transactions/s in total, round-robin over N dbs
  writer.py count DB                      prints "rows max_id" (also checks integrity: quick)
Results are JSON on stdout (run writes OUT as well).
"""
import json
import os
import sqlite3
import sys
import time


def connect(path):
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.execute("PRAGMA busy_timeout=30000")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def init(path):
    db = connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, at REAL, data BLOB)")
    db.close()


def run(path, seconds, rate, mark_every, out):
    db = connect(path)
    ins = "INSERT INTO t (at, data) VALUES (?, ?)"
    urandom, now, sleep = os.urandom, time.time, time.sleep
    markers = []
    n = 0
    t0 = now()
    end = t0 + seconds
    next_mark = t0 + mark_every if mark_every > 0 else float("inf")
    while True:
        t = now()
        if t >= end:
            break
        if rate > 0:
            due = t0 + n / rate
            if due > t:
                sleep(due - t)
                continue
        blob = urandom(100)
        db.execute("BEGIN")
        db.execute(ins, (t, blob))
        db.execute("COMMIT")
        n += 1
        if t >= next_mark:
            markers.append([now(), blob[:16].hex()])
            next_mark += mark_every
    elapsed = now() - t0
    db.close()
    res = {"tx": n, "seconds": elapsed, "tps": n / elapsed, "t_start": t0, "t_end": t0 + elapsed,
           "markers": markers}
    with open(out, "w") as f:
        json.dump(res, f)
    print(json.dumps({k: v for k, v in res.items() if k != "markers"}))


def bulk(path, mib):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-65536")
    db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, at REAL, data BLOB)")
    rows = mib * 1024 * 1024 * 3 // 4096  # 1 KiB rows: three fit in a 4 KiB page
    step = 100_000
    done = 0
    while done < rows:
        k = min(step, rows - done)
        db.execute("BEGIN")
        db.execute(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT ?) "
            "INSERT INTO t (at, data) SELECT 0, randomblob(512) || zeroblob(512) FROM c", (k,))
        db.execute("COMMIT")
        done += k
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    print(json.dumps({"rows": rows, "bytes": os.path.getsize(path)}))


def wal(path, mib, mib_per_s):
    db = connect(path)
    total = mib * 1024 * 1024
    per_tx = 256  # rows of 1 KiB
    written = 0
    t0 = time.time()
    while written < total:
        due = t0 + written / (mib_per_s * 1024 * 1024)
        t = time.time()
        if due > t:
            time.sleep(due - t)
        db.execute("BEGIN")
        db.executemany("INSERT INTO t (at, data) VALUES (?, ?)",
                       ((t, os.urandom(512) + bytes(512)) for _ in range(per_tx)))
        db.execute("COMMIT")
        written += per_tx * 1024
    db.close()
    print(json.dumps({"bytes": written, "seconds": time.time() - t0}))


def many(d, n):
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        init(os.path.join(d, f"db{i:04d}.db"))


def scale(d, n, seconds, rate):
    dbs = [connect(os.path.join(d, f"db{i:04d}.db")) for i in range(n)]
    t0 = time.time()
    k = 0
    while True:
        t = time.time()
        if t - t0 >= seconds:
            break
        due = t0 + k / rate
        if due > t:
            time.sleep(due - t)
            continue
        db = dbs[k % n]
        db.execute("INSERT INTO t (at, data) VALUES (?, ?)", (t, os.urandom(100)))
        k += 1
    for db in dbs:
        db.close()
    print(json.dumps({"tx": k, "seconds": time.time() - t0}))


def count(path):
    db = sqlite3.connect(path)
    ok = db.execute("PRAGMA quick_check").fetchone()[0]
    n, m = db.execute("SELECT count(*), coalesce(max(id), 0) FROM t").fetchone()
    print(json.dumps({"rows": n, "max_id": m, "check": ok}))


def main():
    a = sys.argv[1:]
    cmd = a[0]
    if cmd == "init":
        init(a[1])
    elif cmd == "run":
        run(a[1], float(a[2]), float(a[3]), float(a[4]), a[5])
    elif cmd == "bulk":
        bulk(a[1], int(a[2]))
    elif cmd == "wal":
        wal(a[1], float(a[2]), float(a[3]))
    elif cmd == "many":
        many(a[1], int(a[2]))
    elif cmd == "scale":
        scale(a[1], int(a[2]), float(a[3]), float(a[4]))
    elif cmd == "count":
        count(a[1])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
