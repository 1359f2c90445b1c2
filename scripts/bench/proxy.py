#!/usr/bin/env python3
"""A counting reverse proxy for S3 on loopback (plain HTTP), for the benchmark.

Usage: proxy.py LISTEN_PORT UPSTREAM_PORT LOG_JSONL [BODY_DIR]

Forwards every request unchanged (method, path, query, headers including Host, body) to
127.0.0.1:UPSTREAM_PORT so SigV4 signatures still verify, and appends one JSON line per
request to LOG_JSONL once the upstream response has been received in full:
  {"t0": arrival, "t1": upstream response complete, "m": method, "p": path, "q": query,
   "s": status, "in": request body bytes, "out": response body bytes, "kind": ..., "body": file}
kind is PUT, GET, HEAD, LIST, DELETE or OTHER (see classify). With BODY_DIR, the body of every
PUT that succeeded is saved there (BODY_DIR/<n>.bin) so the lag analysis can look for markers.
Prints "ready" on stdout once it listens.
"""
import http.client
import json
import os
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urlsplit, parse_qs

LISTEN, UPSTREAM, LOG = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
BODY_DIR = sys.argv[4] if len(sys.argv) > 4 else None
HOP = {"expect", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
       "upgrade"}

log_lock = threading.Lock()
log_file = open(LOG, "a", buffering=1)
seq = [0]


def classify(method, path, query):
    """Request type as billed by S3: LIST = bucket listing, DELETE includes multi-delete."""
    q = parse_qs(query, keep_blank_values=True)
    parts = [p for p in path.split("/") if p]
    is_bucket = len(parts) <= 1
    if method == "PUT":
        return "PUT"  # object PUT, multipart part, or bucket creation
    if method == "DELETE":
        return "DELETE"
    if method == "POST" and "delete" in q:
        return "DELETE"
    if method == "GET":
        if is_bucket:
            return "LIST" if ("list-type" in q or "prefix" in q or "delimiter" in q
                              or "marker" in q or not q) else "OTHER"
        return "GET"
    if method == "HEAD":
        return "HEAD"
    if method == "POST":
        return "PUT" if ("uploads" in q or "uploadId" in q) else "OTHER"
    return "OTHER"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm the body waited for the
    # client's delayed ACK of the headers, adding 40 ms to every response that had a body.
    disable_nagle_algorithm = True

    def log_message(self, *a):
        pass

    def _read_body(self):
        te = self.headers.get("Transfer-Encoding", "").lower()
        if "chunked" in te:
            # Keep the chunk framing (aws-chunked payloads sign it) and forward it as is.
            raw = bytearray()
            data = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers until the empty line
                        t = self.rfile.readline()
                        raw += t
                        if t in (b"\r\n", b"\n", b""):
                            break
                    break
                chunk = self.rfile.read(size)
                data += chunk
                raw += chunk
                raw += self.rfile.readline()
            return bytes(raw), bytes(data), True
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        return body, body, False

    def _proxy(self):
        t0 = time.time()
        raw, data, chunked = self._read_body()
        conn = getattr(self, "_up", None)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", UPSTREAM, timeout=600)
            self._up = conn
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() in HOP and not (chunked and k.lower() == "transfer-encoding"):
                    continue
                conn.putheader(k, v)
            conn.endheaders()
            if raw:
                conn.send(raw)
            resp = conn.getresponse()
            body = resp.read()
        except Exception as e:  # upstream gone: report 502
            conn.close()
            self._up = None
            msg = str(e).encode()
            self.send_response(502)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        t1 = time.time()
        u = urlsplit(self.path)
        kind = classify(self.command, u.path, u.query)
        rec = {"t0": round(t0, 6), "t1": round(t1, 6), "m": self.command, "p": u.path,
               "q": u.query, "s": resp.status, "in": len(data), "out": len(body), "kind": kind}
        if BODY_DIR and kind == "PUT" and 200 <= resp.status < 300 and data:
            with log_lock:
                seq[0] += 1
                n = seq[0]
            name = os.path.join(BODY_DIR, f"{n}.bin")
            with open(name, "wb") as f:
                f.write(data)
            rec["body"] = name
        with log_lock:
            log_file.write(json.dumps(rec) + "\n")
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() in HOP or k.lower() == "content-length":
                continue
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(body)))
        else:
            cl = resp.getheader("Content-Length")
            if cl is not None:
                self.send_header("Content-Length", cl)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        if resp.getheader("Connection", "").lower() == "close":
            conn.close()
            self._up = None

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy


class Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def main():
    if BODY_DIR:
        os.makedirs(BODY_DIR, exist_ok=True)
    srv = Server(("127.0.0.1", LISTEN), Handler)
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
