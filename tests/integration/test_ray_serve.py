"""csmserve on Ray Serve: two CPU replicas of the offline model behind Ray's proxy, on loopback.

One local Ray cluster serves the whole session (deploy/ray/local.yaml with the test's settings): only
this module uses it, so its fixture is module-scoped and the cluster stops as soon as these tests end. The
single server (``csm_server``) runs the same checkpoint and settings, so audio can be compared byte
for byte. The downscaling test leaves one replica and the shutdown test deletes the application; a test
that needs two replicas deploys them again (the ``proxy`` fixture).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading

import httpx
import pytest
import websockets

from csmserve.client import CsmClient
from support.ray_cluster import ray_serve

TEXT = "Hello from a replica behind the proxy."
NODE_MAX_TEXT_CHARS = 1000
LONG_TEXT = "This sentence is long enough to keep a replica busy for a while. " * 4


@pytest.fixture(scope="module")
def ray_cluster(tiny_model_dir, tmp_path_factory):
    """Ray's proxy in front of two replicas that share one voices folder (as on a shared volume)."""
    shared = tmp_path_factory.mktemp("ray-shared")
    settings = {
        "model": str(tiny_model_dir),
        "device": "cpu",
        "dtype": "float32",
        "torch_threads": 1,
        "max_audio_ms": 30_000,
        "voices_dir": str(shared / "voices"),
        "audio_dir": str(shared / "audio"),
        "drain_timeout_s": 60,
    }
    # Set on the nodes, as an operator would, rather than in the Serve config.
    with ray_serve(settings, node_env={"CSM_MAX_TEXT_CHARS": str(NODE_MAX_TEXT_CHARS)}) as cluster:
        yield cluster


@pytest.fixture
def proxy(ray_cluster):
    """The cluster with the application deployed and two replicas running (again, after the
    downscaling and shutdown tests)."""
    if not ray_cluster.deployed() or ray_cluster.replica_states() != {"RUNNING": 2}:
        ray_cluster.deploy()  # the config's own replica count again
    return ray_cluster


async def connect(url: str):
    """A WebSocket through the proxy, and the replica that accepted it (its handshake header)."""
    ws = await websockets.connect(url, max_size=None)
    return ws, ws.response.headers["x-csm-replica"]


async def connect_after_a_failure(url: str, attempts: int = 10):
    """Connect as a client does right after a replica died: a refused handshake (the proxy's router
    may not know of the death yet) is retried, as a client reconnecting would."""
    for attempt in range(attempts):
        try:
            return await connect(url)
        except (websockets.InvalidStatus, websockets.ConnectionClosed, OSError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.5)


async def one_per_replica(url: str, count: int = 2):
    """One open connection on each of ``count`` replicas. Ray's router sends a new connection to the
    less busy of two replicas; a connection that lands where one is already open is closed again."""
    sockets, replicas, spare = [], [], []
    for _ in range(4 * count):
        ws, name = await connect(url)
        if name in replicas:
            spare.append(ws)
        else:
            sockets.append(ws)
            replicas.append(name)
        if len(replicas) == count:
            break
    for ws in spare:
        await ws.close()
    return sockets, replicas


async def request(ws, **fields) -> tuple[bytes, dict]:
    """Send one request; the audio, and the frame that ended it."""
    await ws.send(json.dumps({"speaker_id": 0, **fields}))
    pcm = bytearray()
    while True:
        message = await ws.recv()
        if isinstance(message, bytes):
            pcm += message
        else:
            return bytes(pcm), json.loads(message)


async def reference(server, **fields) -> bytes:
    async with CsmClient(server.ws) as client:
        result = await client.synthesize(**fields)
    return result.pcm


async def test_streams_through_the_proxy_reach_both_replicas_and_equal_the_single_server(proxy, csm_server):
    """Two connections land on two replicas; each stream's audio equals the single server's."""
    sockets, replicas = await one_per_replica(proxy.ws)
    try:
        assert len(set(replicas)) == 2
        results = await asyncio.gather(
            *(request(ws, text=TEXT, seed=7 + i, max_audio_ms=2000) for i, ws in enumerate(sockets))
        )
    finally:
        for ws in sockets:
            await ws.close()
    for i, ((pcm, done), replica) in enumerate(zip(results, replicas)):
        assert "error" not in done and done["replica"] == replica
        assert len(pcm) == 2 * done["samples"] > 0
        assert pcm == await reference(csm_server, text=TEXT, seed=7 + i, max_audio_ms=2000)


async def test_the_seed_clients_protocol_works_unchanged_through_the_proxy(proxy):
    """{"text", "speaker_id"} in; binary PCM frames, then {"done": true} out, as from one server."""
    async with websockets.connect(proxy.ws) as ws:
        await ws.send(json.dumps({"text": "Hello world, this is a test", "speaker_id": 0}))
        frames, pcm = 0, 0
        while isinstance(message := await ws.recv(), bytes):
            frames += 1
            pcm += len(message)
    done = json.loads(message)
    assert done["done"] is True and "error" not in done
    assert frames == done["chunks"] and pcm == 2 * done["samples"] > 0


async def test_csm_variables_on_the_nodes_reach_every_replica(proxy):
    """A CSM_* variable set on the Ray nodes is each replica's setting, as for the single server."""
    sockets, replicas = await one_per_replica(proxy.ws)
    try:
        results = await asyncio.gather(*(request(ws, text="x" * (NODE_MAX_TEXT_CHARS + 1)) for ws in sockets))
    finally:
        for ws in sockets:
            await ws.close()
    for (pcm, done), replica in zip(results, replicas):
        assert pcm == b"" and done["replica"] == replica
        assert done["error"]["code"] == "invalid_request" and str(NODE_MAX_TEXT_CHARS) in done["error"]["message"]


def test_every_http_route_answers_through_the_proxy_and_downloads_work_from_any_replica(proxy):
    """Demo, health, voices, metrics, REST, OpenAI and ElevenLabs answer through Ray's proxy; a
    /generate download URL works whichever replica the GET reaches (the audio folder is shared)."""
    with httpx.Client(base_url=proxy.http, timeout=60) as http:
        assert "text/html" in http.get("/").headers["content-type"]
        assert http.get("/health").json()["status"] == "healthy"
        assert http.get("/v1/voices").json()["object"] == "list"
        assert "csm_requests_total" in http.get("/metrics").text
        speech = http.post("/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": "0", "response_format": "pcm"})
        assert speech.status_code == 200 and len(speech.content) > 0
        eleven = http.post("/v1/text-to-speech/0?output_format=pcm_24000", json={"text": TEXT})
        assert eleven.status_code == 200 and len(eleven.content) > 0
        generated = http.post("/generate", json={"text": TEXT, "max_audio_ms": 400}).json()
        downloads = [http.get(generated["url"]) for _ in range(6)]
    assert all(d.status_code == 200 and d.content[:4] == b"RIFF" for d in downloads)
    assert len({d.content for d in downloads}) == 1 and len(downloads[0].content) == generated["bytes"]


async def test_a_voice_registered_through_one_replica_is_used_by_streams_on_the_other(proxy, csm_server):
    """A voice registered through the proxy serves streams on both replicas, with the single
    server's audio for the same clip, text and seed."""
    from test_voices_and_context import clip, register

    data = clip("WAV")
    created = register(proxy.http, data, name="ray-narrator")
    assert created.status_code == 201, created.text
    assert created.headers["x-csm-replica"]
    assert register(csm_server.http, data, name="ray-narrator").status_code == 201
    expected = await reference(csm_server, text=TEXT, voice="ray-narrator", seed=3, max_audio_ms=1500)

    sockets, replicas = await one_per_replica(proxy.ws)
    try:
        results = await asyncio.gather(
            *(request(ws, text=TEXT, voice="ray-narrator", seed=3, max_audio_ms=1500) for ws in sockets)
        )
    finally:
        for ws in sockets:
            await ws.close()
    assert created.headers["x-csm-replica"] in replicas and len(set(replicas)) == 2
    for (pcm, done), replica in zip(results, replicas):
        assert "error" not in done and done["replica"] == replica
        assert pcm == expected


async def test_each_replica_exports_its_own_metrics_with_a_replica_label(proxy):
    """Each replica's metrics port reports the streams it served under its own ``replica`` label."""
    sockets, replicas = await one_per_replica(proxy.ws)
    try:
        await asyncio.gather(*(request(ws, text=TEXT, max_audio_ms=400) for ws in sockets))
    finally:
        for ws in sockets:
            await ws.close()
    served = {}
    for port in proxy.metrics_ports:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        for name, count in re.findall(r'csm_requests_total\{endpoint="ws",outcome="ok",replica="([^"]+)"\} (\S+)', text):
            served[name] = float(count)
        assert re.search(r'csm_time_to_first_audio_seconds_count\{replica="[^"]+"\} [1-9]', text)
    assert set(replicas) <= set(served)
    assert all(served[name] >= 1 for name in replicas)


async def test_killing_a_replica_ends_its_streams_and_ray_replaces_it(proxy):
    """A killed replica's stream ends with an error frame or a close (never a hang), new streams go
    to the other replica, and Ray starts a replacement that serves streams."""
    (victim_ws, other_ws), (victim, other) = await one_per_replica(proxy.ws)
    try:
        await victim_ws.send(json.dumps({"text": LONG_TEXT, "speaker_id": 0, "max_audio_ms": 20_000}))
        first = await victim_ws.recv()
        assert isinstance(first, bytes)
        proxy.kill(victim)

        async def rest() -> str:
            received = len(first)
            try:
                while isinstance(message := await victim_ws.recv(), bytes):
                    received += len(message)
            except websockets.ConnectionClosed:
                return "closed"
            assert received < 20_000 * 48  # it did not run to its end
            return "error" if "error" in json.loads(message) else "done"

        assert await asyncio.wait_for(rest(), timeout=60) in ("closed", "error")

        ws, name = await connect_after_a_failure(proxy.ws)
        async with ws:
            assert name == other
            pcm, done = await request(ws, text=TEXT, max_audio_ms=400)
            assert "error" not in done and done["replica"] == other and len(pcm) == 2 * done["samples"]
    finally:
        await other_ws.close()
        await victim_ws.close()

    async def replacement() -> tuple[str, bytes, dict]:
        while True:
            sockets, replicas = await one_per_replica(proxy.ws)
            try:
                new = [ws for ws, name in zip(sockets, replicas) if name not in (victim, other)]
                if new:
                    pcm, done = await request(new[0], text=TEXT, max_audio_ms=400)
                    return new[0].response.headers["x-csm-replica"], pcm, done
            finally:
                for ws in sockets:
                    await ws.close()
            await asyncio.sleep(0.5)

    name, pcm, done = await asyncio.wait_for(replacement(), timeout=180)
    assert done["replica"] == name and "error" not in done and len(pcm) == 2 * done["samples"] > 0
    assert proxy.replica_states().get("RUNNING") == 2


async def test_downscaling_drains_the_stopped_replicas_stream_then_closes_its_connection(proxy):
    """Going from two replicas to one: both running streams end complete; the stopped replica's
    connection is then closed with 1013, and the other replica's keeps serving."""
    sockets, replicas = await one_per_replica(proxy.ws)
    try:
        for ws in sockets:
            await ws.send(json.dumps({"text": LONG_TEXT, "speaker_id": 0, "max_audio_ms": 4000}))
        firsts = [await ws.recv() for ws in sockets]
        assert all(isinstance(first, bytes) for first in firsts)
        downscaling = asyncio.create_task(asyncio.to_thread(proxy.deploy, num_replicas=1))  # as an operator would

        async def rest(ws, first: bytes) -> tuple[int, dict]:
            received = len(first)
            while isinstance(message := await ws.recv(), bytes):
                received += len(message)
            return received, json.loads(message)

        streams = await asyncio.wait_for(asyncio.gather(*(rest(ws, f) for ws, f in zip(sockets, firsts))), 120)
        for received, done in streams:
            assert "error" not in done and received == 2 * done["samples"] > 0
        await asyncio.wait_for(downscaling, 300)  # until one replica runs and none is stopping
        outcomes = []
        for ws in sockets:
            try:
                _, done = await request(ws, text=TEXT, max_audio_ms=400)
                outcomes.append(("served", done["replica"]))
            except websockets.ConnectionClosed as closed:
                outcomes.append(("closed", closed.rcvd.code if closed.rcvd else None))
    finally:
        for ws in sockets:
            await ws.close()
    assert sorted(kind for kind, _ in outcomes) == ["closed", "served"]
    assert ("closed", 1013) in outcomes
    (kept,) = [name for kind, name in outcomes if kind == "served"]
    assert kept in replicas and proxy.replica_states() == {"RUNNING": 1}


async def test_shutdown_drains_a_running_stream_to_its_end(ray_cluster):
    """``serve shutdown`` (deleting the application) lets a running stream finish, then closes its
    connection with 1013 so the client reconnects elsewhere."""
    from ray import serve

    proxy = ray_cluster  # one replica is enough here, however many run
    if not proxy.deployed():
        proxy.deploy()

    async with websockets.connect(proxy.ws) as ws:
        await ws.send(json.dumps({"text": LONG_TEXT, "speaker_id": 0, "max_audio_ms": 3000}))
        pcm = bytearray(await ws.recv())
        deleting = threading.Thread(target=serve.delete, args=("csmserve",))
        deleting.start()
        while isinstance(message := await ws.recv(), bytes):
            pcm += message
        done = json.loads(message)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), timeout=60)
    await asyncio.to_thread(deleting.join, 60)
    assert "error" not in done and "cancelled" not in done
    assert len(pcm) == 2 * done["samples"] > 0
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    assert not deleting.is_alive() and not proxy.deployed()
