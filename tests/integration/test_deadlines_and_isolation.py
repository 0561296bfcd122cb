"""Deadlines for every phase of a connection, and what a stranger may learn (issue #18): trickled
bodies are cut while probes answer, the pre-login waiting room cannot be held, ElevenLabs sockets
ask for the key before they look at the voice, live load and keys stay out of strangers' sight,
look-alike voice names (on every way of adding a voice) and foreign Host names are refused."""

from __future__ import annotations

import io
import json
import os
import select
import socket
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from test_voices_cli import voices_cli
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from csmserve.engine.fake import FakeEngine
from support.processes import server_process
from support.routes import STREAMING_ROUTES
from support.servers import running_server

KEY = "sk-phase-key-31"
WEBSOCKETS = [r for r in STREAMING_ROUTES if r.websocket]


def trickle(socks: list[socket.socket], rounds: int = 400) -> list[bytes]:
    """Send one body byte on each socket every 20 ms until each has an answer; the answers."""
    answers = {s: b"" for s in socks}
    for _ in range(rounds):
        waiting = [s for s in socks if not answers[s]]
        if not waiting:
            break
        for sock in waiting:
            try:
                sock.sendall(b" ")
            except OSError:
                pass  # the server closed it: its answer is in the receive buffer
        for sock in select.select(waiting, [], [], 0.02)[0]:
            answers[sock] = sock.recv(65536) or b"(closed without an answer)"
    return [answers[s] for s in socks]


def open_body(port: int, path: str = "/generate", length: int = 1_000_000) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n{{".encode()
    )
    return sock


def test_trickled_bodies_are_cut_at_their_deadline_while_probes_answer(settings_factory):
    """Bodies trickled a byte at a time fill the connection cap (uvicorn counts the new connection
    too): other requests get 503, /health and /ready still answer 200, and each trickler gets a 408
    once it falls below min_body_rate."""
    settings = settings_factory(engine="fake", max_connections=3, min_body_rate=1000, body_timeout_s=60)
    with running_server(settings, FakeEngine()) as server:
        server.wait_ready()
        socks = [open_body(server.port) for _ in range(2)]
        try:
            refused = httpx.get(server.http + "/v1/models", timeout=10).status_code
            probes = [httpx.get(server.http + path, timeout=10).status_code for path in ("/health", "/ready")]
            answers = trickle(socks)
        finally:
            for sock in socks:
                sock.close()
        after = httpx.get(server.http + "/v1/models", timeout=10).status_code
    assert (refused, probes) == (503, [200, 200])
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 408 Request Timeout"] * 2, answers
    assert b'"body_timeout"' in answers[0] and after == 200


def test_a_body_that_keeps_its_rate_is_still_cut_at_the_total_deadline(settings_factory):
    """A body that arrives fast enough but never ends is a 408 at body_timeout_s."""
    settings = settings_factory(engine="fake", min_body_rate=0, body_timeout_s=0.5)
    with running_server(settings, FakeEngine()) as server:
        sock = open_body(server.port, "/v1/audio/speech")
        try:
            [answer] = trickle([sock])
        finally:
            sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_a_body_abandoned_midway_logs_one_line_not_a_traceback(tmp_path):
    """A client that goes away halfway through its body is one log line, at most, not a traceback."""
    with server_process(tmp_path, "--engine", "fake", "--log-level", "info") as server:
        for path in ("/generate", "/v1/audio/speech", "/v1/text-to-speech/0/stream"):
            sock = open_body(server.port, path, length=1000)
            sock.sendall(b'"text": "half')
            sock.close()
        for _ in range(200):  # the server has seen the three go (one line each)
            if server.log().count("went away during its request body") >= 3:
                break
            time.sleep(0.02)
        log = server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert log.count("went away during its request body") == 3


def squat(url: str, rounds: int = 20):
    """Open a WebSocket without a key and send an oversize frame (which the server answers, not
    closes, once a socket is authenticated) every 50 ms: the socket, how many frames went before the
    close, and its code (0: still open after ``rounds``)."""
    ws = connect(url, open_timeout=10, max_size=None)
    sent = 0
    try:
        for _ in range(rounds):
            ws.send("x" * 70_000)
            sent += 1
            try:
                while True:
                    ws.recv(timeout=0.05)
            except TimeoutError:
                continue
    except ConnectionClosed as closed:
        return ws, sent, closed.rcvd.code if closed.rcvd else 1006
    return ws, sent, 0


@pytest.mark.parametrize("route", WEBSOCKETS, ids=lambda r: r.name)
def test_the_waiting_room_cannot_be_held_and_honest_clients_get_in(settings_factory, route):
    """Squatters without a key that keep sending oversize frames are closed (1008) on their first
    one, not kept while they send; so a client whose first message carries its key gets a place in
    the waiting room (two places, both taken by squatters a moment before) and is served."""
    settings = settings_factory(engine="fake", api_keys=KEY, max_unauthenticated=2, auth_timeout_s=5)
    url = f"ws://127.0.0.1:{{port}}{route.path}"
    with running_server(settings, FakeEngine()) as server:
        squatters = [squat(url.format(port=server.port)) for _ in range(2)]
        try:
            with connect(url.format(port=server.port), open_timeout=10) as late:
                messages = route.messages("Hi.", "late")
                key_field = "token" if route.endpoint == "ws" else "xi_api_key"  # each protocol's own
                late.send(json.dumps({**messages[0], key_field: KEY}))
                for message in messages[1:]:
                    late.send(json.dumps(message))
                answer = late.recv(timeout=10)
        finally:
            for ws, _, _ in squatters:
                ws.close()
    assert [(sent, code) for _, sent, code in squatters] == [(1, 1008)] * 2
    assert isinstance(answer, bytes) or "audio" in json.loads(answer), answer


def test_a_squatter_is_closed_at_the_deadline_from_accept_on_the_elevenlabs_socket(settings_factory):
    """An ElevenLabs socket without a key that says nothing is closed 1008 at auth_timeout_s."""
    settings = settings_factory(engine="fake", api_keys=KEY, auth_timeout_s=0.3)
    with running_server(settings, FakeEngine()) as server:
        with connect(f"ws://127.0.0.1:{server.port}/v1/text-to-speech/0/stream-input", open_timeout=10) as ws:
            error = json.loads(ws.recv(timeout=10))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
    assert error["error"] == "invalid_api_key" and closed.value.rcvd.code == 1008


@pytest.mark.parametrize("endpoint", ["stream-input", "multi-stream-input"])
def test_an_elevenlabs_socket_asks_for_the_key_before_it_looks_at_the_voice(settings_factory, endpoint):
    """Without a key, an unknown voice gets the auth answer (invalid_api_key, 1008), as a known one
    does: voice names cannot be enumerated. With the key in the first message, the unknown voice is
    voice_not_found."""
    settings = settings_factory(engine="fake", api_keys=KEY)
    with running_server(settings, FakeEngine()) as server:
        answers = []
        for voice, first in (("nobody", {"text": " "}), ("0", {"text": " "}), ("nobody", {"text": " ", "xi_api_key": KEY})):
            with connect(f"ws://127.0.0.1:{server.port}/v1/text-to-speech/{voice}/{endpoint}", open_timeout=10) as ws:
                ws.send(json.dumps(first))
                error = json.loads(ws.recv(timeout=10))
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=10)
                answers.append((error["error"], closed.value.rcvd.code))
    assert answers == [("invalid_api_key", 1008), ("invalid_api_key", 1008), ("voice_not_found", 1008)]


def test_voice_misses_do_not_scan_the_directory_each_time(settings_factory, tmp_path):
    """Requests for voices that do not exist cost no directory scan while the directory is
    unchanged; a voice another process (replica) registers is still found."""
    from csmserve.voices import VoiceStore

    voices_dir = tmp_path / "voices"
    voices_dir.mkdir()
    old = time.time() - 60
    os.utime(voices_dir, (old, old))  # not changed within the racy window
    with running_server(settings_factory(engine="fake", voices_dir=voices_dir), FakeEngine()) as server:
        store = server.app.state.csm.voices.store
        scans = store.scans
        for i in range(20):
            response = httpx.post(server.http + f"/v1/text-to-speech/nobody-{i}/stream", json={"text": "Hi."})
            assert response.status_code == 404
        unchanged = store.scans - scans
        other = VoiceStore(voices_dir).add("elsewhere", 2, "hello there", np.zeros((3, 32), dtype=np.int16))
        found = httpx.post(server.http + "/v1/text-to-speech/elsewhere?output_format=pcm_24000", json={"text": "Hi."})
    assert unchanged == 0
    assert found.status_code == 200 and found.content and other.name == "elsewhere"


def test_health_without_a_key_shows_no_live_load(settings_factory):
    """With keys configured, /health without a key keeps its status and the seed's fields but not the
    capacity figures; with a key they are there."""
    with running_server(settings_factory(engine="fake", api_keys=KEY), FakeEngine()) as server:
        server.wait_ready()
        anonymous = httpx.get(server.http + "/health")
        operator = httpx.get(server.http + "/health", headers={"X-API-Key": KEY}).json()
    assert anonymous.status_code == 200 and anonymous.json()["status"] == "healthy"
    assert {"device", "model_loaded", "endpoints"} <= set(anonymous.json())
    assert "capacity" not in anonymous.json()
    assert {"queue_depth", "last_step_ms", "free_slots"} <= set(operator["capacity"])


AUTHORIZATIONS = [KEY, f"Bearer%20{KEY}", f"Bearer+{KEY}", f"bearer%20{KEY}"]


@pytest.mark.parametrize("keep", [False, True], ids=["default", "query-strings-kept"])
def test_authorization_in_the_query_string_never_reaches_the_log(tmp_path, keep):
    """ElevenLabs' ?authorization= (plain, Bearer%20, Bearer+, a percent-encoded name) authenticates
    the socket and never appears in the log: query strings are dropped from access lines by default,
    and redacted when CSM_LOG_QUERY_STRINGS keeps them."""
    env = {"CSM_API_KEYS": KEY, "CSM_LOG_QUERY_STRINGS": "true" if keep else "false"}
    with server_process(tmp_path, "--engine", "fake", "--log-level", "info", env=env) as server:
        names = ["authorization", "authorization", "%61uthorization", "authorization"]
        for name, value in zip(names, AUTHORIZATIONS):
            url = f"ws://127.0.0.1:{server.port}/v1/text-to-speech/0/stream-input?{name}={value}&output_format=pcm_16000"
            with connect(url, open_timeout=10) as ws:
                ws.send(json.dumps({"text": "Hi. ", "flush": True}))
                assert "audio" in json.loads(ws.recv(timeout=10))
            for spelling in (name, "Authorization", "XI_API_KEY", "xi-api-key"):
                httpx.get(server.http + f"/v1/models?{spelling}={value}&output_format=pcm_16000", timeout=10)
        log = server.log()
    assert KEY not in log
    assert log.count("stream-input") >= 4  # the lines are there, without the key
    assert ("output_format=pcm_16000" in log) == keep


@pytest.mark.parametrize("name,status", [("ａｌｌｏｙ", 409), ("３", 409), ("alloy\u200b", 422), ("\u0430lloy", 422)])
def test_look_alikes_of_reserved_voice_names_are_refused(fake_server, name, status):
    """Full-width forms read as the name they look like (409, reserved); a zero-width character or a
    Cyrillic letter among Latin ones is refused outright (422, invalid); nothing is stored."""
    response = httpx.post(
        fake_server.http + "/v1/voices",
        files={"audio": ("ref.wav", wav_clip(), "audio/wav")},
        data={"name": name, "transcript": "This is how I sound."},
        timeout=30,
    )
    assert response.status_code == status, response.text
    assert httpx.get(fake_server.http + "/v1/voices").json()["data"] == []


#: Look-alikes of reserved names (the server's map names 21m00Tcm4TlvDq8ikWAM) and malformed names.
LOOK_ALIKES = [
    ("ｄｅｆａｕｌｔ", "reserved"), ("２１ｍ００Ｔｃｍ４ＴｌｖＤｑ８ｉｋＷＡＭ", "reserved"), ("ａｌｌｏｙ", "reserved"),
    ("\u0430nna", "may not mix scripts"), ("anna\u200b", "invisible"),
]


def test_elevenlabs_voice_cloning_refuses_look_alikes_of_reserved_names(settings_factory):
    """POST /v1/voices/add (the elevenlabs SDK's ivc.create) checks names as POST /v1/voices does: a
    look-alike of default, of a mapped voice id or of a speaker name is reserved (400 in ElevenLabs'
    shape), a mixed-script or invisible name invalid (422); nothing is stored."""
    settings = settings_factory(engine="fake", voice_map="21m00Tcm4TlvDq8ikWAM=anna")
    with running_server(settings, FakeEngine()) as server:
        server.wait_ready()
        answers = []
        for name, _ in LOOK_ALIKES:
            response = httpx.post(
                server.http + "/v1/voices/add", files={"files": ("ref.wav", wav_clip(), "audio/wav")},
                data={"name": name}, timeout=30,
            )
            answers.append((response.status_code, response.json()["detail"]["message"]))
        stored = httpx.get(server.http + "/v1/voices").json()["data"]
    assert [status for status, _ in answers] == [400, 400, 400, 422, 422]
    assert all(why in message for (_, why), (_, message) in zip(LOOK_ALIKES, answers)), answers
    assert stored == []


def test_the_voices_cli_refuses_look_alikes_of_reserved_names(tmp_path):
    """`csmserve voices add` runs the same check: exit 1 with the reason, nothing stored."""
    voices_dir, reference = tmp_path / "voices", tmp_path / "anna.wav"
    reference.write_bytes(wav_clip())
    results = [
        voices_cli(voices_dir, "add", name, str(reference), CSM_VOICE_MAP="21m00Tcm4TlvDq8ikWAM=anna")
        for name, _ in LOOK_ALIKES
    ]
    assert [r.returncode for r in results] == [1] * len(LOOK_ALIKES)
    assert all(why in r.stderr for (_, why), r in zip(LOOK_ALIKES, results)), [r.stderr for r in results]
    assert not list(voices_dir.glob("voice_*.json"))


def wav_clip() -> bytes:
    """A second of a tone, as a WAV file."""
    buffer = io.BytesIO()
    sf.write(buffer, (0.2 * np.sin(np.arange(24_000) / 10)).astype(np.float32), 24_000, format="WAV")
    return buffer.getvalue()


def handshake(port: int, host: str) -> bytes:
    """The status line a WebSocket handshake for /ws/generate with ``Host: host`` gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"GET /ws/generate HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        return sock.recv(65536).split(b"\r\n", 1)[0]


def test_a_foreign_host_is_refused_with_keys_off(settings_factory):
    """Keys off, bound to loopback: a request whose Host is another name (DNS rebinding: Origin and
    Host both the attacker's) is refused, HTTP 421 and WebSocket 403; addresses, localhost and names in
    CSM_ALLOWED_HOSTS are served."""
    rebound = {"Host": "evil.example:8000", "Origin": "http://evil.example:8000"}
    with running_server(settings_factory(engine="fake"), FakeEngine()) as server:
        http = httpx.post(server.http + "/generate", json={"text": "Hi."}, headers=rebound)
        ws = handshake(server.port, "evil.example:8000")
        local = httpx.get(server.http + "/v1/models", headers={"Host": f"localhost:{server.port}"}).status_code
        address = httpx.get(server.http + "/v1/models").status_code
        ws_local = handshake(server.port, f"127.0.0.1:{server.port}")
    with running_server(settings_factory(engine="fake", allowed_hosts="evil.example"), FakeEngine()) as server:
        listed = httpx.get(server.http + "/v1/models", headers=rebound).status_code
    assert http.status_code == 421 and http.json()["error"]["code"] == "host_not_allowed"
    assert ws == b"HTTP/1.1 403 Forbidden" and ws_local == b"HTTP/1.1 101 Switching Protocols"
    assert (local, address, listed) == (200, 200, 200)
