#!/usr/bin/env python3
"""Benchmark driver: Walden vs Litestream 0.3.13 and 0.5.17 (issue #6). Run through scripts/bench.sh.

  bench.py --walden BIN --ls03 BIN --ls05 BIN --s3-port P --bucket B --work DIR [--quick]
           [--md FILE] [--command "..."]

Each workload runs with every tool in turn (order rotated every repetition). Replicators run as
daemons (`replicate -config CFG`, no -exec) so their own CPU and RSS can be read: CPU from
/proc/PID/stat (utime+stime) sampled at the start and end of the measured window, peak RSS from
the process's own VmHWM, polled until it exits (see wait_peak). All S3 traffic of a replicator
goes through a counting proxy (proxy.py) on loopback. The table goes to stdout; --md writes it to BENCHMARKS.md form.
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WRITER = [sys.executable, os.path.join(HERE, "writer.py")]
PROXY = os.path.join(HERE, "proxy.py")
TICK = os.sysconf("SC_CLK_TCK")
TOOLS = ["none", "walden", "ls03", "ls05"]
REPLICATORS = ["walden", "ls03", "ls05"]
NAMES = {"none": "none", "walden": "Walden", "ls03": "Litestream 0.3.13",
         "ls05": "Litestream 0.5.17"}
ACCESS, SECRET = "WALDENTESTKEY", "waldentestsecret123"

problems = []  # (tool, text) for the report


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def tool_env(tool):
    env = dict(os.environ)
    env["LITESTREAM_ACCESS_KEY_ID"] = ACCESS
    env["LITESTREAM_SECRET_ACCESS_KEY"] = SECRET
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    if tool == "ls05":
        env.pop("AWS_CA_BUNDLE", None)  # 0.5.17 refuses s3 replicas with it set (notes §9)
    return env


def write_config(path, dbs, endpoint, bucket):
    """dbs: list of (db_path, replica_path)."""
    lines = ["dbs:"]
    for db, rpath in dbs:
        lines += [f"  - path: {db}", "    replicas:", "      - type: s3",
                  f"        bucket: {bucket}", f"        path: {rpath}",
                  f"        endpoint: {endpoint}", "        region: us-east-1",
                  "        force-path-style: true", "        sync-interval: 1s"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


class Proxy:
    def __init__(self, d, upstream, bodies=False):
        self.port = free_port()
        self.log = os.path.join(d, "proxy.jsonl")
        args = [sys.executable, PROXY, str(self.port), str(upstream), self.log]
        if bodies:
            args.append(os.path.join(d, "bodies"))
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(
            os.path.join(d, "proxy.err"), "w"))
        line = self.p.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError("proxy did not start")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def records(self):
        out = []
        try:
            with open(self.log) as f:
                for line in f:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
        except FileNotFoundError:
            pass
        return out

    def last_put(self):
        puts = [r["t1"] for r in self.records() if r["kind"] == "PUT" and r["s"] < 300]
        return (max(puts) if puts else None), len(puts)

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


class Replicator:
    def __init__(self, tool, binary, cfg, d):
        self.tool = tool
        self.out = open(os.path.join(d, f"{tool}.log"), "w")
        self.p = subprocess.Popen([binary, "replicate", "-config", cfg], stdout=self.out,
                                  stderr=subprocess.STDOUT, env=tool_env(tool),
                                  stdin=subprocess.DEVNULL)
        self.logpath = os.path.join(d, f"{tool}.log")

    def cpu(self):
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime

    def status(self):
        r = {}
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    r[k] = int(v.split()[0]) / 1024.0
        return r

    def alive(self):
        return self.p.poll() is None

    def stop(self, timeout=120):
        """SIGTERM, wait; returns (rc, user+sys total, peak RSS MB)."""
        if self.p.returncode is None:
            self.p.send_signal(signal.SIGTERM)

        def kill():
            problems.append((self.tool, f"did not exit {timeout} s after SIGTERM: killed"))
            os.kill(self.p.pid, signal.SIGKILL)

        status, ru, peak, _ = wait_peak(self.p.pid, timeout, kill)
        self.p.returncode = os.waitstatus_to_exitcode(status)
        self.out.close()
        return self.p.returncode, ru.ru_utime + ru.ru_stime, peak


def wait_peak(pid, timeout=None, on_timeout=None, interval=0.005):
    """Waits for PID to exit; returns (status, rusage, peak RSS MB, peak anonymous RSS MB).

    The peak is the process's own VmHWM, read every `interval` s until it exits (it is a
    high-water mark, so only growth in the last interval can be missed). wait4()'s ru_maxrss
    is not used: the kernel carries the high-water mark across exec, so for a child of this
    script it is at least the RSS this Python process had when it started the child, which
    hid any replicator smaller than that.

    The anonymous peak is the largest RssAnon seen (the kernel keeps no high-water mark for
    it): memory the process itself allocated, without file pages it has mapped."""
    t_end = None if timeout is None else time.time() + timeout
    peak = anon = 0.0
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024.0)
                    elif line.startswith("RssAnon:"):
                        anon = max(anon, int(line.split()[1]) / 1024.0)
        except OSError:
            pass
        wpid, status, ru = os.wait4(pid, os.WNOHANG)
        if wpid:
            return status, ru, peak, anon
        if t_end is not None and time.time() > t_end:
            on_timeout()
            _, status, ru = os.wait4(pid, 0)
            return status, ru, peak, anon
        time.sleep(interval)


def settle(proxy, rep, quiet=2.5, min_wait=1.5, max_wait=120, need_put=True):
    """Waits until the replicator has uploaded something and then nothing for `quiet` s."""
    t0 = time.time()
    time.sleep(min_wait)
    while time.time() - t0 < max_wait:
        if rep is not None and not rep.alive():
            return False
        last, n = proxy.last_put()
        now = time.time()
        if (n or not need_put) and (last is None or now - last >= quiet):
            return True
        time.sleep(0.25)
    return False


def writer(*args, capture=True):
    r = subprocess.run(WRITER + [str(a) for a in args], check=True,
                       stdout=subprocess.PIPE if capture else None)
    lines = r.stdout.decode().strip().splitlines() if capture else []
    return json.loads(lines[-1]) if lines else None


def restore(tool, binary, cfg, out, db, extra=()):
    """Runs `BIN restore [EXTRA] -config CFG -o OUT DB`; returns (rc, wall s, peak RSS MB, peak
    anonymous RSS MB)."""
    for suffix in ("", "-wal", "-shm", ".tmp-wal", ".tmp-shm"):
        if os.path.exists(out + suffix):
            os.remove(out + suffix)
    logf = open(out + ".log", "w")
    t0 = time.time()
    p = subprocess.Popen([binary, "restore", *extra, "-config", cfg, "-o", out, db], stdout=logf,
                         stderr=subprocess.STDOUT, env=tool_env(tool), stdin=subprocess.DEVNULL)
    status, _, peak, anon = wait_peak(p.pid)
    wall = time.time() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    logf.close()
    return p.returncode, wall, peak, anon


def check_restored(out, expect_rows, tool, what):
    if not os.path.exists(out):
        problems.append((tool, f"{what}: restore produced no file"))
        return False
    try:
        got = writer("count", out)
    except Exception as e:  # noqa: BLE001
        problems.append((tool, f"{what}: restored db unreadable: {e}"))
        return False
    if got["rows"] != expect_rows or got["check"] != "ok":
        problems.append((tool, f"{what}: restored {got['rows']} rows (check {got['check']}), "
                               f"source has {expect_rows}"))
        return False
    return True


def window_counts(records, t0, t1):
    c = {"PUT": 0, "GET": 0, "LIST": 0, "DELETE": 0, "HEAD": 0, "OTHER": 0, "bytes": 0}
    for r in records:
        if t0 <= r["t1"] <= t1:
            c[r["kind"]] += 1
            if r["kind"] == "PUT":
                c["bytes"] += r["in"]
    return c


def marker_lags(records, markers):
    """Lag of each marker = completion time of the earliest successful PUT whose body contains
    the marker's 16 random bytes, minus the marker's commit time. None if never uploaded."""
    puts = sorted((r for r in records if r.get("body")), key=lambda r: r["t1"])
    pending = [(t, bytes.fromhex(h)) for t, h in markers]
    lags = {}
    i = 0
    for r in puts:
        live = [(t, tok) for t, tok in pending if t <= r["t1"] and (t, tok) not in lags]
        if not live:
            continue
        with open(r["body"], "rb") as f:
            body = f.read()
        for t, tok in live:
            if tok in body:
                lags[(t, tok)] = r["t1"] - t
        i += 1
    return [lags.get((t, tok)) for t, tok in pending]


# ---------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, a):
        self.a = a
        self.bins = {"walden": a.walden, "ls03": a.ls03, "ls05": a.ls05}
        self.upstream = a.s3_port
        self.endpoint = f"http://127.0.0.1:{a.s3_port}"
        self.work = a.work
        self.results = {}  # key -> tool -> list of values
        self.rc = {t: [] for t in REPLICATORS}
        self.run_id = f"{int(time.time())}"
        self.n = 0
        q = a.quick
        self.reps = 1 if q else 2
        self.max_s = 3 if q else 30
        self.steady_s = 5 if q else 45
        self.steady_rate = 500
        self.mark_every = 0.25
        self.base_mib = 8 if q else 1024
        self.wal_mib = 4 if q else 200
        self.wal_rate = 4 if q else 10
        self.restore_reps = 1 if q else 5
        self.scale_n = (5, 20) if q else (100, 1000)
        self.scale_idle = 3 if q else 20
        self.scale_write = 3 if q else 20
        self.lags = {t: [] for t in REPLICATORS}
        self.lag_missing = {t: 0 for t in REPLICATORS}

    def add(self, key, tool, value):
        self.results.setdefault(key, {}).setdefault(tool, []).append(value)

    def new_dir(self, name):
        self.n += 1
        d = os.path.join(self.work, f"{self.n:03d}-{name}")
        os.makedirs(d)
        return d

    def rpath(self, d):
        return f"bench-{self.run_id}/{os.path.basename(d)}"

    def order(self, rep, tools):
        k = rep % len(tools)
        return tools[k:] + tools[:k]

    # -- workloads 1-4 -------------------------------------------------------------------------
    def writer_run(self, tool, kind, rep):
        d = self.new_dir(f"{kind}-{tool}")
        db = os.path.join(d, "app.db")
        writer("init", db)
        rate = 0 if kind == "max" else self.steady_rate
        secs = self.max_s if kind == "max" else self.steady_s
        mark = 0 if kind == "max" else self.mark_every
        rep_p = proxy = None
        if tool != "none":
            proxy = Proxy(d, self.upstream, bodies=(kind == "steady"))
            cfg = os.path.join(d, "replicate.yml")
            write_config(cfg, [(db, self.rpath(d))], proxy.endpoint, self.a.bucket)
            rep_p = Replicator(tool, self.bins[tool], cfg, d)
            if not settle(proxy, rep_p, quiet=1.0, max_wait=30):
                problems.append((tool, f"{kind}: no snapshot uploaded within 30 s "
                                       f"(alive={rep_p.alive()})"))
            cpu0 = rep_p.cpu() if rep_p.alive() else 0.0
        res_file = os.path.join(d, "writer.json")
        wr = writer("run", db, secs, rate, mark, res_file)
        with open(res_file) as f:
            wres = json.load(f)
        self.add(f"{kind}.tps", tool, wr["tps"])
        log(f"{kind} rep {rep} {tool}: {wr['tps']:.0f} tx/s ({wr['tx']} tx)")
        if tool == "none":
            return
        settle(proxy, rep_p, quiet=2.0, min_wait=1.5, max_wait=60)
        cpu1 = rep_p.cpu() if rep_p.alive() else None
        alive = rep_p.alive()
        rc, _, maxrss = rep_p.stop()
        self.rc[tool].append(rc)
        if not alive:
            problems.append((tool, f"{kind}: replicator exited early with {rc} "
                                   f"(log {rep_p.logpath})"))
        elif rc != 0 and tool != "ls03":
            problems.append((tool, f"{kind}: replicator exited {rc} after SIGTERM "
                                   f"(log {rep_p.logpath})"))
        if cpu1 is not None:
            self.add(f"{kind}.cpu10k", tool, (cpu1 - cpu0) / wr["tx"] * 10000)
        self.add(f"{kind}.rss", tool, maxrss)
        proxy.stop()
        recs = proxy.records()
        if kind == "steady":
            span = wres["t_end"] - wres["t_start"]
            c = window_counts(recs, wres["t_start"], wres["t_end"])
            for k in ("PUT", "GET", "LIST", "DELETE"):
                self.add(f"s3.{k}", tool, c[k] * 3600 / span)
            self.add("s3.other", tool, (c["HEAD"] + c["OTHER"]) * 3600 / span)
            self.add("s3.mb", tool, c["bytes"] * 3600 / span / 1e6)
            lags = marker_lags(recs, wres["markers"])
            self.lags[tool] += [x for x in lags if x is not None]
            self.lag_missing[tool] += sum(1 for x in lags if x is None)
            shutil.rmtree(os.path.join(d, "bodies"), ignore_errors=True)
            if rep == 0:  # the replica must hold every committed row
                rcfg = os.path.join(d, "restore.yml")
                write_config(rcfg, [(db, self.rpath(d))], self.endpoint, self.a.bucket)
                out = os.path.join(d, "restored.db")
                rrc, _, _, _ = restore(tool, self.bins[tool], rcfg, out, db)
                expect = writer("count", db)["rows"]
                ok = rrc == 0 and check_restored(out, expect, tool, "steady replica")
                if rrc != 0:
                    problems.append((tool, f"steady replica: restore exited {rrc} "
                                           f"(log {out}.log)"))
                self.add("steady.check", tool, "ok" if ok else "FAILED")

    # -- workload 5 ----------------------------------------------------------------------------
    def restore_workload(self):
        base_dir = self.new_dir("restore-base")
        base = os.path.join(base_dir, "base.db")
        t0 = time.time()
        b = writer("bulk", base, self.base_mib)
        self.base_actual = b["bytes"] / 2**20
        log(f"restore: built {b['bytes'] / 2**20:.0f} MiB base db in {time.time() - t0:.1f} s")
        made = {}
        for tool in REPLICATORS:
            d = self.new_dir(f"restore-{tool}")
            db = os.path.join(d, "app.db")
            shutil.copyfile(base, db)
            proxy = Proxy(d, self.upstream)
            cfg = os.path.join(d, "replicate.yml")
            write_config(cfg, [(db, self.rpath(d))], proxy.endpoint, self.a.bucket)
            t0 = time.time()
            rep_p = Replicator(tool, self.bins[tool], cfg, d)
            settle(proxy, rep_p, quiet=3.0, max_wait=300)
            t_snap = time.time() - t0
            w = writer("wal", db, self.wal_mib, self.wal_rate)
            settle(proxy, rep_p, quiet=3.0, max_wait=300)
            alive = rep_p.alive()
            rc, _, _ = rep_p.stop(timeout=300)
            if not alive:
                problems.append((tool, f"restore: replicator exited early with {rc}"))
            proxy.stop()
            recs = proxy.records()
            up = sum(r["in"] for r in recs if r["kind"] == "PUT")
            expect = writer("count", db)["rows"]
            log(f"restore: {tool} replicated (snapshot {t_snap:.1f} s, WAL writer "
                f"{w['seconds']:.1f} s, {up / 2**20:.0f} MiB uploaded)")
            self.add("restore.up", tool, up / 2**20)
            rcfg = os.path.join(d, "restore.yml")
            write_config(rcfg, [(db, self.rpath(d))], self.endpoint, self.a.bucket)
            made[tool] = (d, db, rcfg, expect)
        # One untimed restore per tool first. On this VM the first restore of a series was the
        # slowest in each of three series by hand (Walden 7.3 s, then 4.3 and 3.0; Walden 6.3,
        # then 3.4 and 4.1; 0.3.13 4.8, then 3.3 and 3.4), and writing 1 GiB into a new file
        # took 0.3 to 1.5 s. The tool that went first took that cost alone.
        for tool in REPLICATORS:
            d, db, rcfg, _ = made[tool]
            out = os.path.join(d, "warmup.db")
            rc, wall, _, _ = restore(tool, self.bins[tool], rcfg, out, db)
            log(f"restore warm-up {tool}: rc {rc}, {wall:.2f} s (not counted)")
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(out + suffix):
                    os.remove(out + suffix)
        # "nocheck" is Walden with `-integrity-check none`, Litestream's own default: it shows
        # what Walden's default check costs. It is not the target figure.
        for rep in range(self.restore_reps):
            for run in self.order(rep, REPLICATORS + ["nocheck"]):
                tool, extra, key = run, (), "restore.wall"
                if run == "nocheck":
                    tool, extra, key = "walden", ("-integrity-check", "none"), "restore.nocheck"
                d, db, rcfg, expect = made[tool]
                out = os.path.join(d, "restored.db")
                subprocess.run(["sync"])
                rc, wall, rss, anon = restore(tool, self.bins[tool], rcfg, out, db, extra)
                ok = rc == 0 and check_restored(out, expect, tool, "restore of 1 GiB + WAL")
                if rc != 0:
                    problems.append((tool, f"restore exited {rc} (log {out}.log)"))
                log(f"restore rep {rep} {run}: {wall:.2f} s, {rss:.0f} MB ({anon:.0f} MB anon), "
                    f"{'ok' if ok else 'FAILED'}")
                if ok:
                    self.add(key, tool, wall)
                    if run != "nocheck":
                        self.add("restore.rss", tool, rss)
                        self.add("restore.anon", tool, anon)
                self.add("restore.check", tool, "ok" if ok else "FAILED")
                os.remove(out) if os.path.exists(out) else None
        for tool in REPLICATORS:  # free the disk
            d, db, _, _ = made[tool]
            os.remove(db)
        os.remove(base)

    # -- workload 6 ----------------------------------------------------------------------------
    def scale_workload(self):
        for n in self.scale_n:
            for tool in REPLICATORS:
                d = self.new_dir(f"scale{n}-{tool}")
                dbdir = os.path.join(d, "dbs")
                writer("many", dbdir, n)
                proxy = Proxy(d, self.upstream)
                cfg = os.path.join(d, "replicate.yml")
                dbs = [(os.path.join(dbdir, f"db{i:04d}.db"), f"{self.rpath(d)}/db{i:04d}")
                       for i in range(n)]
                write_config(cfg, dbs, proxy.endpoint, self.a.bucket)
                t0 = time.time()
                rep_p = Replicator(tool, self.bins[tool], cfg, d)
                settle(proxy, rep_p, quiet=3.0, min_wait=3.0, max_wait=300)
                t_start = time.time() - t0
                if not rep_p.alive():
                    rc, _, _ = rep_p.stop()
                    problems.append((tool, f"scale {n}: exited {rc} at start (log "
                                           f"{rep_p.logpath})"))
                    proxy.stop()
                    continue
                ta, c0 = time.time(), rep_p.cpu()
                time.sleep(self.scale_idle)
                tb, c1 = time.time(), rep_p.cpu()
                st = rep_p.status()
                writer("scale", dbdir, n, self.scale_write, n / 10.0)
                tc, c2 = time.time(), rep_p.cpu()
                st2 = rep_p.status()
                settle(proxy, rep_p, quiet=2.0, max_wait=60)
                rc, _, maxrss = rep_p.stop(timeout=300)
                proxy.stop()
                idle = window_counts(proxy.records(), ta, tb)
                reqs = sum(idle[k] for k in ("PUT", "GET", "LIST", "DELETE", "HEAD", "OTHER"))
                self.add(f"scale{n}.start", tool, t_start)
                self.add(f"scale{n}.idle_rss", tool, st.get("VmRSS", 0))
                self.add(f"scale{n}.write_rss", tool, st2.get("VmRSS", 0))
                self.add(f"scale{n}.peak_rss", tool, maxrss)
                self.add(f"scale{n}.idle_cpu", tool, (c1 - c0) / (tb - ta) * 100)
                self.add(f"scale{n}.write_cpu", tool, (c2 - c1) / (tc - tb) * 100)
                self.add(f"scale{n}.idle_req", tool, reqs * 3600 / (tb - ta))
                if rc != 0 and tool != "ls03":
                    problems.append((tool, f"scale {n}: exited {rc} after SIGTERM"))
                log(f"scale {n} {tool}: start {t_start:.1f} s, idle RSS "
                    f"{st.get('VmRSS', 0):.0f} MB, peak {maxrss:.0f} MB, idle CPU "
                    f"{(c1 - c0) / (tb - ta) * 100:.1f} %")
                shutil.rmtree(dbdir, ignore_errors=True)

    # -- table ---------------------------------------------------------------------------------
    def rows(self):
        """(label, key or callable, higher_is_better, fmt, target, tools)."""
        n1, n2 = self.scale_n
        R = []

        def agg(key):
            vals = self.results.get(key, {})
            out = {}
            for t, v in vals.items():
                if v and isinstance(v[0], str):
                    out[t] = "ok" if all(x == "ok" for x in v) else "FAILED"
                elif v:
                    out[t] = statistics.median(v)
            return out

        def rel(kind):
            base = agg(f"{kind}.tps").get("none")
            vals = agg(f"{kind}.tps")
            return {t: v / base for t, v in vals.items() if base}

        def lagp(p):
            out = {}
            for t in REPLICATORS:
                xs = sorted(self.lags[t])
                if xs:
                    out[t] = xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000
            return out

        ms, ss = self.max_s, self.steady_s
        R.append((f"1 max-rate writer, tx/s ({ms} s)", agg("max.tps"), True, "{:.0f}", "", TOOLS))
        R.append(("1 max-rate writer, x none", rel("max"), True, "{:.3f}", ">= 0.97", TOOLS))
        R.append((f"1 steady {self.steady_rate} tx/s writer, tx/s ({ss} s)", agg("steady.tps"),
                  True, "{:.1f}", "", TOOLS))
        R.append(("1 steady writer, x none", rel("steady"), True, "{:.3f}", ">= 0.97", TOOLS))
        R.append(("2 CPU s / 10k tx, max-rate", agg("max.cpu10k"), False, "{:.3f}", "<= 0.5",
                  REPLICATORS))
        R.append(("2 CPU s / 10k tx, steady", agg("steady.cpu10k"), False, "{:.3f}", "<= 0.5",
                  REPLICATORS))
        R.append(("2 peak RSS MB, max-rate", agg("max.rss"), False, "{:.1f}", "<= 0.33",
                  REPLICATORS))
        R.append(("2 peak RSS MB, steady", agg("steady.rss"), False, "{:.1f}", "<= 0.33",
                  REPLICATORS))
        R.append(("3 PUT requests / h, steady", agg("s3.PUT"), False, "{:.0f}", "<= 1",
                  REPLICATORS))
        R.append(("3 GET requests / h, steady", agg("s3.GET"), False, "{:.0f}", "",
                  REPLICATORS))
        R.append(("3 LIST requests / h, steady", agg("s3.LIST"), False, "{:.0f}", "",
                  REPLICATORS))
        R.append(("3 DELETE requests / h, steady", agg("s3.DELETE"), False, "{:.0f}", "",
                  REPLICATORS))
        R.append(("3 other requests (HEAD, POST) / h", agg("s3.other"), False, "{:.0f}", "",
                  REPLICATORS))
        R.append(("3 MB uploaded / h, steady", agg("s3.mb"), False, "{:.1f}",
                  "<= 0.3.13's", REPLICATORS))
        R.append(("4 lag p50 ms (sync-interval 1s)", lagp(50), False, "{:.0f}", "",
                  REPLICATORS))
        R.append(("4 lag p99 ms (sync-interval 1s)", lagp(99), False, "{:.0f}", "<= 1100 ms",
                  REPLICATORS))
        found = {t: f"{len(self.lags[t])}/{len(self.lags[t]) + self.lag_missing[t]}"
                 for t in REPLICATORS}
        R.append(("4 markers found in an upload", found, None, "{}", "", REPLICATORS))
        R.append(("4 steady replica restores every row", agg("steady.check"), None, "{}", "",
                  REPLICATORS))
        R.append((f"5 restore wall s ({getattr(self, 'base_actual', 0):.0f} MiB db + "
                   f"{self.wal_mib} MiB WAL)",
                  agg("restore.wall"), False, "{:.2f}", "<= 0.5", REPLICATORS))
        R.append(("5 restore wall s, Walden -integrity-check none (Litestream's default, not "
                  "the target)", agg("restore.nocheck"), False, "{:.2f}", "", REPLICATORS))
        R.append(("5 restore peak RSS MB", agg("restore.rss"), False, "{:.1f}", "",
                  REPLICATORS))
        R.append(("5 restore peak anonymous RSS MB (no mapped file pages)", agg("restore.anon"),
                  False, "{:.1f}", "", REPLICATORS))
        R.append(("5 MiB uploaded building the replica", agg("restore.up"), False, "{:.0f}",
                  "", REPLICATORS))
        R.append(("5 restored db correct", agg("restore.check"), None, "{}", "", REPLICATORS))
        for n in (n1, n2):
            R.append((f"6 {n} dbs: start-up to quiet, s", agg(f"scale{n}.start"), False,
                      "{:.1f}", "", REPLICATORS))
            R.append((f"6 {n} dbs idle: RSS MB", agg(f"scale{n}.idle_rss"), False, "{:.1f}",
                      "", REPLICATORS))
            R.append((f"6 {n} dbs idle: CPU % of a core", agg(f"scale{n}.idle_cpu"), False,
                      "{:.2f}", "", REPLICATORS))
            R.append((f"6 {n} dbs idle: requests / h", agg(f"scale{n}.idle_req"), False,
                      "{:.0f}", "", REPLICATORS))
            R.append((f"6 {n} dbs written ({n / 10:g} tx/s): RSS MB", agg(f"scale{n}.write_rss"),
                      False, "{:.1f}", "", REPLICATORS))
            R.append((f"6 {n} dbs written: CPU % of a core", agg(f"scale{n}.write_cpu"), False,
                      "{:.2f}", "", REPLICATORS))
            R.append((f"6 {n} dbs: peak RSS MB", agg(f"scale{n}.peak_rss"), False, "{:.1f}",
                      "< 200 MB" if n == n2 else "", REPLICATORS))
        return R

    def table(self):
        head = ["figure", "none", "Walden", "LS 0.3.13", "LS 0.5.17", "Walden / best LS",
                "target"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, vals, higher, fmt, target, tools in self.rows():
            cells = [label]
            for t in TOOLS:
                v = vals.get(t)
                cells.append("-" if v is None or t not in tools else
                             (fmt.format(v) if not isinstance(v, str) else v))
            ratio = "-"
            w = vals.get("walden")
            ls = [vals[t] for t in ("ls03", "ls05") if isinstance(vals.get(t), (int, float))]
            if higher is not None and isinstance(w, (int, float)) and ls:
                best = max(ls) if higher else min(ls)
                if best:
                    ratio = f"{w / best:.2f}"
                elif w == 0:
                    ratio = "1.00 (all 0)"
                else:
                    ratio = "inf (best is 0)"
            cells += [ratio, target or ""]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def machine():
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True).stdout.strip()
        except Exception:  # noqa: BLE001
            return "?"
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 2**20
    return cpu, mem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--walden", required=True)
    ap.add_argument("--ls03", required=True)
    ap.add_argument("--ls05", required=True)
    ap.add_argument("--s3-port", type=int, required=True)
    ap.add_argument("--bucket", default="walden")
    ap.add_argument("--work", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--md")
    ap.add_argument("--command", default="scripts/bench.sh")
    ap.add_argument("--versions", default="")
    a = ap.parse_args()
    b = Bench(a)
    started = time.time()
    for rep in range(b.reps):
        for tool in b.order(rep, TOOLS):
            b.writer_run(tool, "max", rep)
        for tool in b.order(rep + 1, TOOLS):
            b.writer_run(tool, "steady", rep)
    b.restore_workload()
    b.scale_workload()
    elapsed = time.time() - started
    table = b.table()
    print(table)
    if problems:
        print("\nProblems:")
        for tool, text in problems:
            print(f"- {NAMES[tool]}: {text}")
    walls = dict(b.results.get("restore.wall", {}))
    walls["nocheck"] = b.results.get("restore.nocheck", {}).get("walden", [])
    names = dict(NAMES, nocheck="Walden -integrity-check none")
    spread = "Restore wall times, every timed run in order (s): " + "; ".join(
        f"{names[t]} " + ", ".join(f"{w:.2f}" for w in walls[t])
        for t in REPLICATORS + ["nocheck"] if walls.get(t))
    print("\n" + spread)
    rcs = {NAMES[t]: b.rc[t] for t in REPLICATORS}
    print(f"\nreplicator exit codes after SIGTERM (workloads 1-4): {rcs}")
    print(f"benchmark time: {elapsed / 60:.1f} min")
    if a.md:
        cpu, mem = machine()
        info = (f"- command: `{a.command}`\n"
                f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, benchmark time "
                f"{elapsed / 60:.1f} min\n"
                f"- machine: {os.cpu_count()} CPUs ({cpu}), {mem:.1f} GiB RAM, kernel "
                f"{platform.release()}, Python {platform.python_version()}, SQLite "
                f"{__import__('sqlite3').sqlite_version}\n")
        for v in a.versions.split(";"):
            if v.strip():
                info += f"- {v.strip()}\n"
        extra = ""
        if problems:
            extra = "\nProblems seen in this run:\n\n" + "\n".join(
                f"- {NAMES[t]}: {x}" for t, x in problems) + "\n"
        extra += f"\n{spread}\n"
        extra += f"\nReplicator exit codes after SIGTERM (workloads 1-4): {rcs}\n"
        with open(a.md, "w") as f:
            f.write(info + "\n" + table + "\n" + extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
