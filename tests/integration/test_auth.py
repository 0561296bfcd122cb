"""API keys and the Origin allow-list, on every path a client can present them."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from csmserve.engine.fake import FakeEngine
from support.servers import running_server

KEY = "sk-test-0123456789"


@pytest.fixture
def secured(settings_factory):
    settings = settings_factory(engine="fake", api_keys=f"other-key,{KEY}", allowed_origins="https://app.example")
    with running_server(settings, FakeEngine()) as server:
        server.wait_ready()
        yield server


def post(server, **kw):
    return httpx.post(server.http + "/generate", json={"text": "Hi."}, headers={"Accept": "audio/wav", **kw.pop("headers", {})}, **kw)


def test_rest_without_a_key_is_401(secured):
    """No key: 401 with WWW-Authenticate and a message naming the ways to send one."""
    response = post(secured)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json()["error"]["message"]


def test_rest_with_a_wrong_key_is_403(secured):
    """A key that is not configured: 403."""
    assert post(secured, headers={"Authorization": "Bearer nope"}).status_code == 403


@pytest.mark.parametrize("how", ["bearer", "x-api-key", "query"])
def test_rest_accepts_each_way_of_presenting_the_key(secured, how):
    """Bearer header, X-API-Key header, or ?token= all work."""
    headers = {"bearer": {"Authorization": f"Bearer {KEY}"}, "x-api-key": {"X-API-Key": KEY}}.get(how, {})
    params = {"token": KEY} if how == "query" else None
    response = post(secured, headers=headers, params=params)
    assert response.status_code == 200 and response.content[:4] == b"RIFF"


def test_probes_and_demo_page_stay_open_and_reveal_no_secret(secured):
    """/health, /ready and / need no key; /health says nothing about keys."""
    for path in ("/health", "/ready", "/"):
        assert httpx.get(secured.http + path).status_code == 200
    body = httpx.get(secured.http + "/health").text
    assert KEY not in body and "other-key" not in body and "api_key" not in body


def test_metrics_need_a_key_when_protected(secured):
    """/metrics is 401 without a key and 200 with one."""
    assert httpx.get(secured.http + "/metrics").status_code == 401
    assert httpx.get(secured.http + "/metrics", headers={"X-API-Key": KEY}).status_code == 200


def test_metrics_can_be_left_open(settings_factory):
    """protect_metrics=false leaves /metrics open for a scraper on a private network."""
    settings = settings_factory(engine="fake", api_keys=KEY, protect_metrics=False)
    with running_server(settings, FakeEngine()) as server:
        assert httpx.get(server.http + "/metrics").status_code == 200
        assert httpx.post(server.http + "/generate", json={"text": "Hi."}).status_code == 401


def test_openai_client_key_is_the_bearer_key(secured):
    """The openai package's api_key is accepted (it sends Authorization: Bearer)."""
    import openai

    good = openai.OpenAI(base_url=secured.http + "/v1", api_key=KEY, max_retries=0)
    assert good.audio.speech.create(model="tts-1", voice="0", input="Hi.", response_format="pcm").content
    bad = openai.OpenAI(base_url=secured.http + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        bad.audio.speech.create(model="tts-1", voice="0", input="Hi.")


async def speak(ws) -> dict:
    await ws.send(json.dumps({"text": "Hi."}))
    while True:
        message = await asyncio.wait_for(ws.recv(), 5)
        if isinstance(message, str):
            return json.loads(message)


@pytest.mark.parametrize("how", ["header", "query", "first-message"])
async def test_websocket_accepts_each_way_of_presenting_the_key(secured, how):
    """Header, ?token= (browsers, bridges) or a token field in the first message."""
    url, headers = secured.ws, {"Origin": "https://app.example"}
    if how == "header":
        headers["Authorization"] = f"Bearer {KEY}"
    elif how == "query":
        url += f"?token={KEY}"
    async with websockets.connect(url, additional_headers=headers) as ws:
        if how == "first-message":
            await ws.send(json.dumps({"token": KEY}))
        done = await speak(ws)
    assert done["done"] is True and "error" not in done


async def test_websocket_with_a_wrong_key_is_refused_before_accept(secured):
    """A wrong header/query key is a 403 at the handshake."""
    with pytest.raises(InvalidStatus) as caught:
        await websockets.connect(secured.ws + "?token=wrong", additional_headers={"Origin": "https://app.example"})
    assert caught.value.response.status_code == 403


async def test_websocket_without_a_key_is_closed_1008_after_a_keyless_first_message(secured):
    """No key anywhere: the first message gets an unauthorized error frame, then close 1008."""
    async with websockets.connect(secured.ws, additional_headers={"Origin": "https://app.example"}) as ws:
        await ws.send(json.dumps({"text": "Hi."}))
        event = json.loads(await ws.recv())
        assert event["error"]["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as caught:
            await ws.recv()
    assert caught.value.rcvd.code == 1008


async def test_websocket_from_a_foreign_origin_is_refused(secured):
    """Origins outside the allow-list cannot open a WebSocket, even with a valid key."""
    with pytest.raises(InvalidStatus) as caught:
        await websockets.connect(secured.ws + f"?token={KEY}", additional_headers={"Origin": "https://evil.example"})
    assert caught.value.response.status_code == 403
