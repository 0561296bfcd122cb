"""Connections, secrets and health under hostile clients (issue #14): strangers get a short
deadline and a cap, keys never reach the log or argv, /health tells the truth without paths."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from csmserve.engine.fake import FakeEngine
from support.processes import server_process
from support.routes import counter
from support.servers import running_server

KEY = "sk-percent-encoded-7"


def closed_with(ws) -> int:
    """Read until the server closes the WebSocket; its close code (fails if it stays open 10 s)."""
    with pytest.raises(ConnectionClosed) as caught:
        while True:
            ws.recv(timeout=10)
    return caught.value.rcvd.code


def test_a_websocket_that_never_sends_its_key_is_closed_at_the_auth_deadline(settings_factory):
    """Without a key in the URL or headers, a silent WebSocket is closed 1008 after auth_timeout_s,
    not after the (here 300 s) idle timeout."""
    settings = settings_factory(engine="fake", api_keys=KEY, auth_timeout_s=0.2, idle_timeout_s=300)
    with running_server(settings, FakeEngine()) as server:
        with connect(server.ws) as ws:
            assert closed_with(ws) == 1008


def test_unauthenticated_websockets_are_capped(settings_factory):
    """Beyond max_unauthenticated key-less WebSockets, the next is closed 1013; one that sends its key
    frees its place."""
    settings = settings_factory(engine="fake", api_keys=KEY, max_unauthenticated=1, auth_timeout_s=30)
    with running_server(settings, FakeEngine()) as server:
        with connect(server.ws) as first:
            with connect(server.ws) as second:
                assert json.loads(second.recv(timeout=10))["error"]["code"] == "overloaded"
                assert closed_with(second) == 1013
            first.send(json.dumps({"type": "auth", "token": KEY}))
            first.send(json.dumps({"text": "Hi.", "max_audio_ms": 80}))
            assert isinstance(first.recv(timeout=10), bytes)
            with connect(server.ws) as third:
                third.send(json.dumps({"token": KEY, "text": "Hi.", "max_audio_ms": 80}))
                assert isinstance(third.recv(timeout=10), bytes)


def test_an_http_request_whose_headers_never_end_is_closed_at_the_header_deadline(settings_factory):
    """Unfinished headers (slowloris) are cut after header_timeout_s: the server closes the socket."""
    with running_server(settings_factory(engine="fake", header_timeout_s=0.2), FakeEngine()) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.settimeout(10)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        assert sock.recv(1024) == b""
        sock.close()


def test_connections_beyond_max_connections_get_a_503_but_probes_answer(settings_factory):
    """With max_connections open, one more request is a 503 (uvicorn's concurrency limit); /health
    and /ready still answer from the probes' own reserve (an orchestrator must not restart a busy pod)."""
    with running_server(settings_factory(engine="fake", max_connections=2), FakeEngine()) as server:
        server.wait_ready()
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        try:
            response = httpx.get(server.http + "/v1/models", timeout=10)
            probes = [httpx.get(server.http + path, timeout=10).status_code for path in ("/health", "/ready")]
        finally:
            for sock in held:
                sock.close()
    assert response.status_code == 503
    assert probes == [200, 200]


def test_an_empty_bearer_header_does_not_hide_a_valid_x_api_key(settings_factory):
    """`Authorization: Bearer` with nothing after it, plus a valid X-API-Key: accepted."""
    with running_server(settings_factory(engine="fake", api_keys=KEY), FakeEngine()) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.settimeout(10)
        # Raw: HTTP clients refuse to send the trailing space some libraries do send.
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\nX-API-Key: {KEY}\r\n\r\n".encode())
        answer = sock.recv(65536)
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_health_without_a_key_shows_no_local_path(settings_factory, tmp_path):
    """A model loaded from a directory shows only its name to callers without a key, in the model
    field and in an error; with a key, the path."""
    engine = FakeEngine()
    engine.info.model = str(tmp_path / "private" / "checkpoints" / "csm")
    with running_server(settings_factory(engine="fake", api_keys=KEY), engine) as server:
        server.wait_ready()
        anonymous = httpx.get(server.http + "/health").text
        operator = httpx.get(server.http + "/health", headers={"X-API-Key": KEY}).json()
        engine.info.failed = f"the GPU failed reading {tmp_path}/private/weights.safetensors"
        failed = httpx.get(server.http + "/health").json()
    assert str(tmp_path) not in anonymous and json.loads(anonymous)["model"] == "csm"
    assert operator["model"] == engine.info.model
    assert failed["error"]["message"] == "the GPU failed reading weights.safetensors"


def test_an_engine_that_stops_making_progress_fails_ready_and_health_says_why(settings_factory):
    """Work active and no engine step for stall_timeout_s: /ready is 503 (stalled), /health names the stall."""
    engine = FakeEngine(frame_delay_s=3.0)
    with running_server(settings_factory(engine="fake", stall_timeout_s=0.2), engine) as server:
        server.wait_ready()
        with connect(server.ws) as ws:
            ws.send(json.dumps({"text": "Slow.", "max_audio_ms": 80}))
            for _ in range(200):
                ready = httpx.get(server.http + "/ready")
                if ready.status_code == 503:
                    break
            health = httpx.get(server.http + "/health")
    assert ready.json() == {"ready": False, "reason": "stalled"}
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_stalled"


def test_api_keys_have_no_command_line_flag():
    """`csmserve serve --help` offers no --api-keys (argv is visible to every user); the key file is offered."""
    result = subprocess.run([sys.executable, "-m", "csmserve", "serve", "--help"], capture_output=True, text=True, check=True)
    assert "--api-keys " not in result.stdout and "--api-keys-file" in result.stdout
    refused = subprocess.run([sys.executable, "-m", "csmserve", "serve", "--api-keys", "k"], capture_output=True, text=True)
    assert refused.returncode == 2 and "CSM_API_KEYS" in refused.stderr


def test_keys_from_a_key_file_are_enforced(tmp_path, settings_factory):
    """CSM_API_KEYS_FILE: one key per line, comments skipped; requests without a listed key are refused."""
    key_file = tmp_path / "keys"
    key_file.write_text("# operators\nsk-from-file-1\n\nsk-from-file-2\n")
    with running_server(settings_factory(engine="fake", api_keys_file=key_file), FakeEngine()) as server:
        assert httpx.get(server.http + "/v1/models").status_code == 401
        assert httpx.get(server.http + "/v1/models", headers={"X-API-Key": "sk-from-file-2"}).status_code == 200


def test_percent_encoded_keys_and_forged_ids_never_reach_the_log(tmp_path):
    """?%74oken=KEY (HTTP) and ?tok%65n=KEY (WebSocket) authenticate but never appear in the log; a
    request id with a newline cannot start a log line; an 8 KB X-Request-Id writes at most 128 characters."""
    env = {"CSM_API_KEYS": KEY}
    with server_process(tmp_path, "--engine", "fake", "--log-level", "info", env=env) as server:
        assert httpx.get(server.http + f"/v1/models?%74oken={KEY}").status_code == 200
        with connect(f"{server.ws}?tok%65n={KEY}") as ws:
            # An unknown voice: the failure is logged, with the request id in the line.
            ws.send(json.dumps({"text": "Hi.", "voice": "nobody", "request_id": "x\nFORGED line"}))
            assert json.loads(ws.recv(timeout=10))["error"]["code"] == "invalid_request"
            ws.send(json.dumps({"text": "Hi.", "max_audio_ms": 80}))
            while isinstance(ws.recv(timeout=10), bytes):
                pass
        httpx.get(server.http + "/v1/models", headers={"X-Request-Id": "R" * 8192})
        metrics = httpx.get(server.http + "/metrics", headers={"X-API-Key": KEY}).text
        log = server.log()
    assert KEY not in log
    assert not any(line.startswith("FORGED") for line in log.splitlines())
    assert "R" * 129 not in log
    assert counter(metrics, "csm_requests_total", endpoint="ws", outcome="ok") == 1


def test_a_flood_of_bad_connections_writes_a_bounded_log(tmp_path):
    """200 connections sending garbage: uvicorn's per-connection warning is logged at most 10 times
    per 10 s (plus, later, one line counting the rest), not 200 times."""
    with server_process(tmp_path, "--engine", "fake") as server:
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
                sock.settimeout(10)
                while sock.recv(4096):
                    pass
        assert httpx.get(server.http + "/health").status_code == 200
        log = server.log()
    assert 1 <= log.count("Invalid HTTP request received") <= 10
