#!/usr/bin/env python3
"""A repository older than streamed documents, in front of the real one.

Usage: old_repository.py PORT UPSTREAM_URL

Listens on 127.0.0.1:PORT and passes every request to UPSTREAM_URL (a real
`cloudpdi repository serve`) unchanged, except a create (`POST /v1/documents`) without
a `size`: that one is answered as repositories released before streamed documents
answered it (their create required the size), 400 `invalid_request` naming the missing
field.
"""
import http.client
import json
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, upstream = int(sys.argv[1]), urllib.parse.urlsplit(sys.argv[2])
HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


class Old(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def answer(self, status, headers, body):
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def relay(self):
        body = self.body()
        if self.command == "POST" and self.path == "/v1/documents":
            request = json.loads(body or b"{}")
            if "size" not in request:
                refusal = {
                    "error": "invalid_request",
                    "message": "the request body does not match the API: missing field "
                    "`size` at line 1 column %d" % len(body),
                }
                self.answer(400, [("Content-Type", "application/json")],
                            json.dumps(refusal).encode())
                return
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        self.answer(response.status, response.getheaders(), response.read())
        conn.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = relay


ThreadingHTTPServer(("127.0.0.1", port), Old).serve_forever()
