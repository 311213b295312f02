#!/usr/bin/env python3
"""A small HTTP front over chdb (ClickHouse's engine, embedded), for Routy's tests.

It speaks the part of ClickHouse's HTTP interface the ClickHouse sink uses and hands every
query to the engine unchanged:

  GET /ping                      -> "Ok."
  POST / with the statement in the body
  POST /?query=STATEMENT with the statement's input (INSERT ... FORMAT F) in the body:
                                    the engine runs STATEMENT followed by the body, as
                                    ClickHouse's HTTP interface does
  X-ClickHouse-User / X-ClickHouse-Key (or ?user=&password=): checked against --user and
                                    --password-file when given

Answers: 200 with the result (TabSeparated unless the statement says FORMAT), or 500 (401
for a wrong password) with ClickHouse's exception text "Code: N. DB::Exception: ..." and
the X-ClickHouse-Exception-Code header.

  clickhouse-front.py --dir DATA --port PORT [--user U --password-file F]

Prints "listening on PORT" once it answers. The data lives in DATA: a front started again
on the same directory finds its tables.
"""

import argparse
import http.server
import re
import sys
import threading
import urllib.parse

from chdb import session


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--user", default="default")
    ap.add_argument("--password-file")
    args = ap.parse_args()
    password = None
    if args.password_file:
        with open(args.password_file) as f:
            password = f.read().rstrip("\r\n")
    sess = session.Session(args.dir)
    lock = threading.Lock()
    stats = {"queries": 0, "inserts": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            pass

        def answer(self, status, body, code=None):
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            if code is not None:
                self.send_header("X-ClickHouse-Exception-Code", str(code))
            self.end_headers()
            self.wfile.write(body)

        def fail(self, status, code, text):
            self.answer(status, ("Code: %d. DB::Exception: %s\n" % (code, text)).encode(), code)

        def handle_query(self, body):
            url = urllib.parse.urlsplit(self.path)
            params = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            if url.path == "/ping":
                return self.answer(200, b"Ok.\n")
            if url.path != "/":
                return self.fail(404, 0, "no handler for %s" % url.path)
            user = self.headers.get("X-ClickHouse-User") or params.get("user", ["default"])[0]
            key = self.headers.get("X-ClickHouse-Key") or params.get("password", [""])[0]
            if user != args.user or (password is not None and key != password):
                return self.fail(401, 516, "%s: Authentication failed: password is incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)" % user)
            query = params.get("query", [None])[0]
            if query is not None:
                sql = query.encode() + b"\n" + body
            else:
                sql = body
            if not sql.strip():
                return self.fail(400, 62, "Empty query. (SYNTAX_ERROR)")
            with lock:
                stats["queries"] += 1
                if sql.lstrip()[:6].upper() == b"INSERT":
                    stats["inserts"] += 1
                try:
                    out = sess.query(sql, "TabSeparated").bytes()
                except Exception as e:  # the engine's exception: ClickHouse's text
                    text = str(e)
                    m = re.search(r"Code: (\d+)\. ", text)
                    code = int(m.group(1)) if m else 1000
                    body = text.encode("utf-8", "replace")
                    if not body.startswith(b"Code:"):
                        body = ("Code: %d. DB::Exception: " % code).encode() + body
                    return self.answer(500, body + b"\n", code)
            self.answer(200, out)

        def do_GET(self):
            self.handle_query(b"")

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            self.handle_query(body)

    srv = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    srv.daemon_threads = True
    print("listening on %d" % srv.server_address[1], flush=True)
    try:
        srv.serve_forever()
    finally:
        sess.close()


if __name__ == "__main__":
    sys.exit(main())
