"""The demo page in a real browser: Debian's headless Chromium, driven by Playwright, on a real server.

`make test` installs Debian's ``chromium`` package; nothing here downloads a browser. The page exposes
its live state as ``window.csmDemo``; these tests read it and the page's metric elements.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from csmserve.engine import SynthesisRequest
from csmserve.engine.fake import FakeEngine
from support.servers import running_server

CHROMIUM = os.environ.get("CSM_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TEXT = "Hello world, this is the demo page speaking."
LONG_TEXT = "This sentence goes on and on so that there is time to press Stop. " * 8
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module, with a fresh profile directory (--user-data-dir)."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"Debian's chromium is needed for the demo page tests and {CHROMIUM} is not there: "
            "run `make test` (it installs it) or `apt-get install chromium` as root",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1280, "height": 960},
        )
        yield context
        context.close()


@pytest.fixture
def page(browser):
    """A fresh tab; a JavaScript exception anywhere on the page fails the test."""
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    tab.close()
    assert errors == []


@pytest.fixture
def slow_server(settings_factory):
    """A fake-engine server that makes one 80 ms frame every 50 ms, like a fast GPU."""
    engine = FakeEngine(frame_delay_s=0.05)
    with running_server(settings_factory(engine="fake"), engine) as server:
        yield server


def open_demo(page, server, query: str = ""):
    page.goto(f"{server.http}/{query}")
    page.wait_for_function("window.csmDemo && window.csmDemo.health !== null", timeout=WAIT_MS)
    return page


def speak(page, text: str = TEXT) -> None:
    page.fill("#text", text)
    page.click("#speak")


def demo_state(page) -> dict:
    return page.evaluate("() => JSON.parse(JSON.stringify(window.csmDemo))")


def wait_for_state(page, state: str) -> dict:
    page.wait_for_function(f"window.csmDemo.state === {json.dumps(state)}", timeout=WAIT_MS)
    return demo_state(page)


def test_speak_schedules_every_received_sample_for_playback(fake_server, page):
    """Speak streams PCM chunks, and every sample received is handed to the player."""
    open_demo(page, fake_server)
    speak(page)
    page.wait_for_function("window.csmDemo.lastDone !== null", timeout=WAIT_MS)
    demo = demo_state(page)
    done = demo["lastDone"]
    assert "error" not in done and not done.get("cancelled")
    assert demo["chunksReceived"] == done["chunks"] >= 2
    assert demo["samplesReceived"] == done["samples"] == demo["bytesReceived"] // 2
    assert demo["samplesScheduled"] == demo["samplesReceived"]


def test_worklet_player_plays_every_sample_without_a_gap(fake_server, page):
    """The AudioWorklet player at 24 kHz plays out all scheduled audio with no underrun, then finishes."""
    open_demo(page, fake_server)
    speak(page)
    demo = wait_for_state(page, "finished")
    assert demo["player"] == "worklet"
    assert demo["contextRate"] == 24000
    assert demo["samplesPlayed"] == demo["samplesScheduled"] == demo["lastDone"]["samples"]
    assert demo["underruns"] == 0


def test_scheduled_source_fallback_plays_every_sample(fake_server, page):
    """With ?player=scheduled, back-to-back AudioBufferSourceNodes play every received sample."""
    open_demo(page, fake_server, "?player=scheduled")
    speak(page)
    demo = wait_for_state(page, "finished")
    assert demo["player"] == "scheduled"
    assert demo["samplesPlayed"] == demo["samplesScheduled"] == demo["samplesReceived"] > 0
    assert demo["underruns"] == 0


def test_worklet_player_resamples_for_a_48_khz_audio_context(fake_server, page):
    """Where the AudioContext runs at 48 kHz the page resamples, and all the audio still plays, gaplessly."""
    open_demo(page, fake_server, "?context_rate=48000")
    speak(page)
    demo = wait_for_state(page, "finished")
    assert (demo["player"], demo["contextRate"]) == ("worklet", 48000)
    assert demo["samplesScheduled"] == demo["samplesReceived"] > 0
    assert abs(demo["samplesPlayed"] - demo["samplesScheduled"]) <= 1
    assert demo["underruns"] == 0


def test_page_shows_time_to_first_audio_duration_and_rtf(fake_server, page):
    """After a request the page shows browser and server TTFA, audio duration and RTF from done."""
    open_demo(page, fake_server)
    speak(page)
    demo = wait_for_state(page, "finished")
    done = demo["lastDone"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

    client_ttfa = re.fullmatch(r"(\d+) ms", page.text_content("#ttfa-client"))
    server_ttfa = re.fullmatch(r"(\d+) ms", page.text_content("#ttfa-server"))
    duration = re.fullmatch(r"(\d+\.\d\d) s", page.text_content("#audio-duration"))
    # The page rounds as JavaScript does (Math.round: halves up), not as Python's round (halves to even).
    assert client_ttfa and int(client_ttfa[1]) == math.floor(demo["ttfaMs"] + 0.5)
    assert server_ttfa and int(server_ttfa[1]) == math.floor(done["ttfa_ms"] + 0.5)
    assert duration and float(duration[1]) == pytest.approx(done["audio_ms"] / 1000, abs=0.006)
    assert float(page.text_content("#rtf")) == pytest.approx(done["rtf"], rel=0.05, abs=0.001)
    assert page.text_content("#chunks") == str(done["chunks"])


def test_stop_cancels_the_request_mid_stream(slow_server, page):
    """Stop sends {"type": "cancel"}: the server answers cancelled and stops generating early."""
    open_demo(page, slow_server)
    speak(page, LONG_TEXT)
    page.wait_for_function("window.csmDemo.chunksReceived >= 1", timeout=WAIT_MS)
    page.click("#stop")
    demo = wait_for_state(page, "cancelled")
    assert demo["lastDone"] == {"done": True, "cancelled": True, "request_id": demo["requestId"]}
    assert page.text_content("#state") == "cancelled"
    made = slow_server.engine.frames_made[demo["requestId"]]
    assert made < slow_server.engine.num_frames(SynthesisRequest(LONG_TEXT, max_audio_ms=90_000)) // 2


def test_stop_silences_playback_at_once(slow_server, page):
    """After Stop nothing is left buffered and the level meter falls to silence within 300 ms."""
    open_demo(page, slow_server)
    speak(page, LONG_TEXT)
    page.wait_for_function("window.csmDemo.levelDb !== null", timeout=WAIT_MS)
    page.click("#stop")
    wait_for_state(page, "cancelled")
    page.wait_for_function("window.csmDemo.levelDb === null", timeout=300)
    assert page.text_content("#buffered") == "0 ms"


def test_speak_after_stop_plays_the_next_request(slow_server, page):
    """After a Stop, Speak is enabled again and the next request plays to the end."""
    open_demo(page, slow_server)
    speak(page, LONG_TEXT)
    page.wait_for_function("window.csmDemo.chunksReceived >= 1", timeout=WAIT_MS)
    page.click("#stop")
    wait_for_state(page, "cancelled")
    assert page.is_enabled("#speak")
    speak(page, "Short one.")
    demo = wait_for_state(page, "finished")
    assert demo["lastDone"]["request_id"] == demo["requestId"]
    assert demo["samplesPlayed"] == demo["samplesReceived"] == demo["lastDone"]["samples"]


def test_chosen_speaker_and_text_are_sent(fake_server, page):
    """The request on the socket carries the typed text and the chosen speaker."""
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(payload)))
    open_demo(page, fake_server)
    page.select_option("#speaker", "7")
    speak(page, "Speaker seven here.")
    page.wait_for_function("window.csmDemo.lastDone !== null", timeout=WAIT_MS)
    request = json.loads(sent[0])
    assert request["text"] == "Speaker seven here."
    assert request["speaker_id"] == 7


def test_api_key_goes_as_token_on_the_socket_and_bearer_on_fetches(fake_server, page):
    """A typed API key is sent as ?token= on the WebSocket URL and as Authorization: Bearer on /health."""
    sockets: list[str] = []
    health_auth: list[str | None] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.on(
        "request", lambda r: r.url.endswith("/health") and health_auth.append(r.headers.get("authorization"))
    )
    open_demo(page, fake_server)
    page.fill("#api-key", "s3cret key&1")
    page.press("#api-key", "Tab")
    page.wait_for_function("window.csmDemo.health !== null")
    speak(page)
    page.wait_for_function("window.csmDemo.lastDone !== null", timeout=WAIT_MS)
    url = urlsplit(sockets[-1])
    assert (url.scheme, url.netloc, url.path) == ("ws", f"127.0.0.1:{fake_server.port}", "/ws/generate")
    assert parse_qs(url.query) == {"token": ["s3cret key&1"]}
    assert health_auth[0] is None
    assert health_auth[-1] == "Bearer s3cret key&1"


def test_server_error_is_shown_on_the_page(settings_factory, page):
    """An error frame from the server ends the request with its code and message on the page."""
    engine = FakeEngine()
    with running_server(settings_factory(engine="fake", max_text_chars=20), engine) as server:
        open_demo(page, server)
        speak(page, "This text is longer than twenty characters.")
        demo = wait_for_state(page, "error")
    assert demo["lastError"]["code"] == "invalid_request"
    assert page.is_visible("#error")
    assert page.text_content("#error").startswith("invalid_request: ")


def test_real_voice_shows_no_offline_banner(settings_factory, page):
    """When /health says offline_model is false the warning banner stays hidden."""
    engine = FakeEngine()
    engine.info.offline_model = False
    with running_server(settings_factory(engine="fake"), engine) as server:
        open_demo(page, server)
        assert page.is_hidden("#offline-banner")


def test_offline_model_shows_the_noise_banner(csm_server, page):
    """Against the offline CSM checkpoint the page warns that the audio is noise."""
    open_demo(page, csm_server)
    assert page.is_visible("#offline-banner")
    assert "offline model: random weights, the audio is noise" in page.text_content("#offline-banner").lower()


def test_offline_csm_model_streams_through_the_page(csm_server, page):
    """The offline CSM checkpoint's streamed audio reaches the player sample for sample."""
    open_demo(page, csm_server)
    speak(page, "Hi there.")
    demo = wait_for_state(page, "finished")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-offline-model.png"), full_page=True)
    assert "error" not in demo["lastDone"]
    assert demo["samplesPlayed"] == demo["samplesScheduled"] == demo["lastDone"]["samples"] > 0


def test_docs_browser_example_plays_a_whole_utterance(fake_server, page):
    """The browser client on the seed API's Clients page, run in Chromium as written, receives every chunk
    and the done frame."""
    import re

    page_text = (Path(__file__).resolve().parents[2] / "docs" / "api" / "seed" / "clients.md").read_text()
    block = re.search(r"```javascript\n(.*?)```", page_text, flags=re.S).group(1)
    page.goto(fake_server.http + "/")
    result = page.evaluate(f"async () => {{ {block}\n return await speak('Hello from the README.'); }}")
    assert result["done"]["done"] is True
    assert result["bytes"] == 2 * result["done"]["samples"] > 0
