#!/usr/bin/env python3
"""A token server for registry tests: the Bearer half of distribution's token auth.

Standard library only; signs with the `openssl` CLI. Listens on 127.0.0.1 only.

    token-issuer.py --port-file F --key K.pem --cert C.pem --issuer ISS --service SVC \
                    --users USERS [--ttl SECONDS]

- Picks a free port and writes it to F once it listens.
- GET /token?service=SVC&scope=repository:NAME:pull,push[&scope=...]: with HTTP Basic
  credentials listed in USERS (one `user:password` a line) it grants every action asked
  for; without credentials it issues a token that grants nothing (as Docker Hub does for
  anonymous users); with wrong credentials it answers 401. The answer is
  {"token", "access_token", "expires_in", "issued_at"}.
- The token is a JWT signed RS256 with K, its header carrying `x5c` = [C in DER]:
  distribution 2.8 (`auth.token` with `rootcertbundle` holding C, `issuer` ISS and
  `service` SVC) checks the certificate chain, `iss`, `aud` (= SVC), `exp` and `nbf`
  (with 60 s of leeway), the signature, and the `access` claims against each request.
- GET /control/rotate?key=K2&cert=C2 switches the signing key, so that a registry
  restarted with only C2 in its bundle rejects tokens issued before (key rotation).
- GET /control/stats answers {"issued": N, "refused": M}.
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"issued": 0, "refused": 0}
LOCK = threading.Lock()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cert_der_b64(path: str) -> str:
    # The base64 body of a PEM certificate is its DER, base64-encoded.
    lines = open(path).read().strip().splitlines()
    body = []
    inside = False
    for line in lines:
        if line.startswith("-----BEGIN CERTIFICATE"):
            inside = True
        elif line.startswith("-----END CERTIFICATE"):
            break
        elif inside:
            body.append(line.strip())
    return "".join(body)


def sign(key: str, data: bytes) -> bytes:
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", key],
        input=data,
        capture_output=True,
        check=True,
        timeout=10,
    )
    return out.stdout


def parse_scope(scope: str):
    # repository:name:pull,push (the name holds no ':' in our tests; ports are not in it).
    kind, rest = scope.split(":", 1)
    name, actions = rest.rsplit(":", 1)
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("token-issuer: " + (fmt % args) + "\n")

    def reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="token-issuer"')
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/control/rotate":
            with LOCK:
                ARGS.key = query["key"][0]
                ARGS.cert = query["cert"][0]
            return self.reply(200, {"rotated": True})
        if url.path == "/control/stats":
            with LOCK:
                return self.reply(200, dict(STATE))
        if url.path != "/token":
            return self.reply(404, {"error": "no such path"})
        service = query.get("service", [""])[0]
        if service != ARGS.service:
            return self.reply(400, {"error": "unknown service %r" % service})
        user = ""
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                user, password = base64.b64decode(header[6:]).decode().split(":", 1)
            except Exception:
                user, password = "", None
            if USERS.get(user) != password or not user:
                with LOCK:
                    STATE["refused"] += 1
                return self.reply(401, {"errors": [{"code": "UNAUTHORIZED",
                                                    "message": "invalid username or password"}]})
        access = []
        if user:
            for scope in query.get("scope", []):
                for s in scope.split(" "):
                    if s:
                        access.append(parse_scope(s))
        now = int(time.time())
        with LOCK:
            key, cert = ARGS.key, ARGS.cert
            STATE["issued"] += 1
            jti = "t%d-%d" % (now, STATE["issued"])
        header = {"typ": "JWT", "alg": "RS256", "x5c": [cert_der_b64(cert)]}
        claims = {
            "iss": ARGS.issuer,
            "sub": user,
            "aud": ARGS.service,
            "exp": now + ARGS.ttl,
            "nbf": now - 10,
            "iat": now,
            "jti": jti,
            "access": access,
        }
        signing_input = (b64url(json.dumps(header).encode()) + "." +
                         b64url(json.dumps(claims).encode())).encode()
        token = signing_input.decode() + "." + b64url(sign(key, signing_input))
        self.reply(200, {
            "token": token,
            "access_token": token,
            "expires_in": ARGS.ttl,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        })


def main():
    global ARGS, USERS
    p = argparse.ArgumentParser()
    p.add_argument("--port-file", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--issuer", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--users", required=True)
    p.add_argument("--ttl", type=int, default=300)
    ARGS = p.parse_args()
    USERS = {}
    for line in open(ARGS.users):
        line = line.rstrip("\n")
        if ":" in line:
            u, pw = line.split(":", 1)
            USERS[u] = pw
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = ARGS.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(tmp, ARGS.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
