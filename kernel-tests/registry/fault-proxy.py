#!/usr/bin/env python3
"""A fault-injecting HTTP proxy in front of a registry, for fetch tests.

Standard library only; plain HTTP; listens on 127.0.0.1 only.

    fault-proxy.py --upstream 127.0.0.1:PORT --port-file F

Picks a free port, writes it to F once it listens, and forwards every request to the
upstream registry (Host header kept, so the registry's Location headers point back at
the proxy). Faults are switched at run time through a control endpoint on the same port:

    GET /__fault__/set?mode=MODE[&match=SUBSTRING][&count=N][&ms=MS]

MODE is one of
    pass          forward unchanged
    flip          flip one byte in the middle of each matching 2xx body
    ignore-range  drop the Range header: the registry answers 200 with the whole blob
    short         answer a well-formed body of half the bytes (Content-Length and
                  Content-Range say so): a server that sends less than asked
    truncate      announce the full Content-Length, send half the body, reset
    reset         reset the connection without answering
    503           answer 503 Service Unavailable
    delay         wait MS milliseconds, then forward
`match` (default `/blobs/`) selects the requests by a substring of their path, and body
faults apply to GET only; `count` (default: no limit) faults only the next N matching
requests, then reverts to pass, for retry tests.

    GET /__fault__/log      the requests seen, oldest first: a JSON list of
                            {"method", "path", "range", "status", "fault"}
    GET /__fault__/clear    forget the log
"""

import argparse
import http.client
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
FAULT = {"mode": "pass", "match": "/blobs/", "count": -1, "ms": 0}
LOG = []
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
              "te", "trailer", "transfer-encoding", "upgrade"}
BODY_FAULTS = {"flip", "ignore-range", "short", "truncate"}


def take_fault(method, path):
    """The fault for this request, consuming one of `count`."""
    with LOCK:
        mode = FAULT["mode"]
        if mode == "pass" or FAULT["match"] not in path:
            return "pass", 0
        if mode in BODY_FAULTS and method != "GET":
            return "pass", 0
        if FAULT["count"] == 0:
            return "pass", 0
        if FAULT["count"] > 0:
            FAULT["count"] -= 1
            if FAULT["count"] == 0:
                FAULT["mode"] = "pass"
        return mode, FAULT["ms"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("fault-proxy: " + (fmt % args) + "\n")

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length", "0") or 0)
        return self.rfile.read(n) if n else b""

    def reset(self):
        # SO_LINGER with a zero timeout makes close() send RST.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def control(self, url):
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/__fault__/set":
            with LOCK:
                FAULT["mode"] = query.get("mode", ["pass"])[0]
                FAULT["match"] = query.get("match", ["/blobs/"])[0]
                FAULT["count"] = int(query.get("count", ["-1"])[0])
                FAULT["ms"] = int(query.get("ms", ["0"])[0])
                body = json.dumps(FAULT).encode()
        elif url.path == "/__fault__/log":
            with LOCK:
                body = json.dumps(LOG).encode()
        elif url.path == "/__fault__/clear":
            with LOCK:
                LOG.clear()
            body = b"{}"
        else:
            body = b'{"error": "unknown control path"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith("/__fault__/"):
            return self.control(url)
        body = self.read_body()
        fault, ms = take_fault(self.command, url.path)
        entry = {"method": self.command, "path": self.path,
                 "range": self.headers.get("Range"), "status": None, "fault": fault}
        with LOCK:
            LOG.append(entry)
        if fault == "reset":
            return self.reset()
        if fault == "503":
            entry["status"] = 503
            msg = b'{"errors":[{"code":"UNAVAILABLE","message":"injected 503"}]}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        if fault == "delay":
            time.sleep(ms / 1000.0)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if fault == "ignore-range":
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(ARGS.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body if body else None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        finally:
            conn.close()
        entry["status"] = status
        ok = 200 <= status < 300 and self.command == "GET" and data
        if fault == "flip" and ok:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        if fault == "short" and ok and len(data) > 1:
            data = data[: len(data) // 2]
            fixed = []
            for k, v in out_headers:
                if k.lower() == "content-range" and v.startswith("bytes "):
                    span, total = v[6:].split("/")
                    start = int(span.split("-")[0])
                    v = "bytes %d-%d/%s" % (start, start + len(data) - 1, total)
                fixed.append((k, v))
            out_headers = fixed
        self.send_response(status)
        for k, v in out_headers:
            if k.lower() == "content-length" and self.command != "HEAD":
                continue
            self.send_header(k, v)
        if self.command == "HEAD":
            self.end_headers()
            return
        if fault == "truncate" and ok:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self.reset()
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = handle_any


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--port-file", required=True)
    ARGS = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = ARGS.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(tmp, ARGS.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
