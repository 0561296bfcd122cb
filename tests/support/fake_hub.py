"""A stand-in for the Hugging Face hub on a loopback port, answering the way the hub answers.

Only the model-info endpoint is needed: ``snapshot_download`` asks it first, and the hub's error
headers (``X-Error-Code``, ``X-Error-Message``) decide which exception ``huggingface_hub`` raises.
"""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# repo id -> (status, X-Error-Code, X-Error-Message)
ANSWERS = {
    "sesame/csm-1b": (401, "GatedRepo", "Access to model sesame/csm-1b is restricted. You must have access to it and be authenticated to access it. Please log in."),
    "org/gated-with-token": (403, "GatedRepo", "Access to model org/gated-with-token is restricted and you are not in the authorized list."),
    "org/missing": (404, "RepoNotFound", "Repository not found"),
    "org/bad-token": (401, None, "Invalid credentials in Authorization header"),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.requests.append((self.path, self.headers.get("authorization")))
        parts = self.path.split("?")[0].strip("/").split("/")
        repo = "/".join(parts[2:4]) if len(parts) >= 4 and parts[:2] == ["api", "models"] else None
        status, code, message = ANSWERS.get(repo, (404, "RepoNotFound", "Repository not found"))
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
