"""Property-based fuzzing of /ws/generate, POST /generate and POST /v1/audio/speech on a real server.

Hypothesis generates valid requests (random optional fields), near-valid ones (exactly one field wrong),
arbitrary JSON, non-JSON text and binary frames, and streamed text. Whatever arrives, the server answers
each message with exactly one ``done`` (audio first, or an error with a code and a message), keeps the
WebSocket open, and never answers an HTTP request with a 5xx. Examples are derandomized and no database is
kept: every run sends the same ~1,700 requests. One fake-engine server and one WebSocket serve the module.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import logging
import string
import time
import wave
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from csmserve.config import Settings
from csmserve.engine.fake import FakeEngine
from support.routes import STREAMING_ROUTES, counter
from support.servers import running_server

RECV_TIMEOUT_S = 10.0
MAX_MESSAGE_BYTES = 65_536
VOICE_NAME = "fuzz-voice"
MODEL_IDS = ("csm-1b", "sesame/csm-1b", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")
RESPONSE_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


def fuzz_settings(max_examples: int):
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# -- the server, one WebSocket, one HTTP client ---------------------------------------------------


def wav_clip(seconds: float = 1.0, rate: int = 24_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (8000 * np.sin(2 * np.pi * 220 * t)).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A fake-engine server for the whole module, with one registered voice (``VOICE_NAME``).

    Up to 32 requests may queue on a connection, so that a streamed text's sentences never hit the
    limit whatever the scheduling (the limit itself is tested in test_voice_agent_ws.py)."""
    settings_ = Settings(
        engine="fake",
        host="127.0.0.1",
        port=0,
        audio_dir=tmp_path_factory.mktemp("audio"),
        voices_dir=tmp_path_factory.mktemp("voices"),
        max_pending_per_connection=32,
        max_message_bytes=MAX_MESSAGE_BYTES,
        # Every streamed-text example opens a context on the one kept connection (the cap itself is
        # tested in tests/unit/test_client_share.py).
        max_contexts_per_connection=100_000,
    )
    with running_server(settings_, FakeEngine()) as running:
        response = httpx.post(
            running.http + "/v1/voices",
            files={"audio": ("ref.wav", wav_clip(), "audio/wav")},
            data={"name": VOICE_NAME, "transcript": "This is how I sound.", "speaker_id": "3"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        yield running


class Connection:
    """One WebSocket kept open across examples. If the server closes it (a bug: the example fails),
    the next example reconnects, so that one failure does not fail every later example too."""

    def __init__(self, url: str):
        self.url = url
        self.ws = None

    def get(self):
        if self.ws is None:
            self.ws = connect(self.url, max_size=None, compression=None, open_timeout=10, close_timeout=1)
        return self.ws

    def drop(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None


@pytest.fixture(scope="module")
def connection(server):
    conn = Connection(server.ws)
    yield conn
    conn.drop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http, timeout=RECV_TIMEOUT_S) as client:
        yield client


# -- strategies -----------------------------------------------------------------------------------

WEIRD_STRINGS = st.sampled_from(
    ["", " ", "NaN", "-NaN", "Infinity", "-Infinity", "1e309", "0x10", "null", "true", "0", "-1", "9" * 40,
     "\u0000", "\ud800", "²", "١٢", "𝟘", "\u202e", "日本語のテキスト", "🙂" * 3, "a" * 129]
)
BIG_INTS = st.one_of(
    st.integers(min_value=2**31, max_value=2**70),
    st.integers(max_value=-1),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**100, 10**400, -(10**400)]),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**16), max_value=2**16),
    BIG_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    WEIRD_STRINGS,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
NOT_STRINGS = st.one_of(
    st.booleans(), st.integers(min_value=-5, max_value=5).map(float), st.floats(allow_nan=True),
    st.lists(JSON_SCALARS, max_size=2), st.dictionaries(st.text(max_size=3), JSON_SCALARS, max_size=2),
)
#: Not an integer at all (None excluded: for most fields null means "absent", which is valid).
NOT_INTS = st.one_of(
    st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), WEIRD_STRINGS,
    st.lists(JSON_SCALARS, max_size=2), st.dictionaries(st.text(max_size=3), JSON_SCALARS, max_size=2),
)

TEXTS = st.text(min_size=1, max_size=24).filter(lambda s: s.strip())
IDS = st.one_of(st.text(min_size=1, max_size=128), st.integers(min_value=0, max_value=10**20))
PCM_AUDIO = st.binary(max_size=96).map(lambda b: base64.b64encode(b[: len(b) // 2 * 2]).decode())
TURNS = st.fixed_dictionaries(
    {"speaker_id": st.integers(0, 9), "text": TEXTS}, optional={"audio": PCM_AUDIO}
)
#: A stream_sid is an id: a string of 1 to 128 characters (an integer is taken as its digits).
STREAM_SIDS = st.text(min_size=1, max_size=40)
def encodable(value) -> bool:
    """No lone surrogate anywhere: a message carrying one is refused whole, even in a field it ignores."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


UNKNOWN_FIELDS = st.dictionaries(
    st.sampled_from(["voice_style", "x", "emotion", "language"]), JSON_VALUES.filter(encodable), max_size=2
)

VALID_OPTIONS = {
    "speaker_id": st.integers(0, 9),
    "chunk_ms": st.integers(20, 1000),
    "first_chunk_ms": st.integers(20, 1000),
    "max_audio_ms": st.integers(80, 400),
    "temperature": st.one_of(st.floats(min_value=0.01, max_value=5), st.integers(1, 5)),
    "top_k": st.integers(1, 2048),
    "seed": st.integers(0, 2**63 - 1),
    "request_id": IDS,
    "voice": st.just(VOICE_NAME),
    "context": st.lists(TURNS, max_size=3),
}

BAD_VALUES = {
    "text": st.one_of(st.sampled_from(["", "   ", "\n\t"]), NOT_STRINGS, st.just("a" * 4097), st.none()),
    "speaker_id": st.one_of(st.integers().filter(lambda n: not 0 <= n <= 9), NOT_INTS, st.none(), BIG_INTS),
    "chunk_ms": st.one_of(st.integers().filter(lambda n: not 20 <= n <= 1000), NOT_INTS, BIG_INTS),
    "first_chunk_ms": st.one_of(st.integers().filter(lambda n: not 20 <= n <= 1000), NOT_INTS),
    "max_audio_ms": st.one_of(st.integers().filter(lambda n: not 80 <= n <= 90_000), NOT_INTS, BIG_INTS),
    "temperature": st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0 < x <= 5),
        st.integers().filter(lambda n: not 0 < n <= 5),
        st.booleans(), st.text(max_size=5), WEIRD_STRINGS, BIG_INTS.filter(lambda n: n > 5 or n <= 0),
        st.lists(st.integers(), max_size=2),
    ),
    "top_k": st.one_of(st.integers().filter(lambda n: not 1 <= n <= 2048), NOT_INTS),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63), NOT_INTS),
    "request_id": st.one_of(
        st.just(""), st.text(min_size=129, max_size=140), st.integers(min_value=10**128),
        st.integers(max_value=-(10**127)), NOT_STRINGS,
    ),
    "format": st.one_of(st.text(max_size=10).filter(lambda s: s not in ("pcm_s16le", "mulaw", "alaw")),
                        st.none(), NOT_STRINGS),
    "sample_rate": st.one_of(st.integers().filter(lambda n: n not in (8000, 16000, 22050, 24000, 44100, 48000)),
                             st.sampled_from([8000.0, 24000.0, "24000"]), st.none(), st.booleans()),
    "framing": st.one_of(st.text(max_size=10).filter(lambda s: s not in ("twilio", "telnyx")), NOT_STRINGS),
    "stream_sid": st.one_of(st.just(""), st.text(min_size=129, max_size=140), NOT_STRINGS),
    "voice": st.one_of(st.just(""), st.text(min_size=129, max_size=140), NOT_STRINGS,
                       st.text(alphabet=string.ascii_letters, min_size=1, max_size=10).map(lambda s: "nobody-" + s)),
    "context": st.one_of(
        NOT_STRINGS.filter(lambda v: not isinstance(v, list)),
        st.text(max_size=5),
        st.lists(TURNS, min_size=33, max_size=34),
        st.lists(NOT_STRINGS | st.text(max_size=3) | st.none(), min_size=1, max_size=2),
        TURNS.map(lambda t: [{**t, "speaker_id": 12}]),
        TURNS.map(lambda t: [{**t, "text": "  "}]),
        TURNS.map(lambda t: [{**t, "audio": "not base64!"}]),
        TURNS.map(lambda t: [{**t, "audio": base64.b64encode(b"odd").decode()}]),
        TURNS.map(lambda t: [{**t, "audio": 12}]),
    ),
    "type": st.one_of(
        st.text(max_size=10).filter(lambda s: s not in ("generate", "text", "flush", "end", "cancel")),
        st.none(), NOT_STRINGS,
    ),
    "context_id": st.one_of(st.just(""), st.text(min_size=129, max_size=140), NOT_STRINGS),
}


@st.composite
def valid_requests(draw, *, framing: bool = True) -> dict:
    """A generation request the server must answer with audio then a successful ``done``."""
    message = {"text": draw(TEXTS)}
    for name, values in VALID_OPTIONS.items():
        if draw(st.booleans()):
            message[name] = draw(values)
    output = draw(st.sampled_from(["pcm", "g711", "twilio", "telnyx"] if framing else ["pcm", "g711"]))
    if output == "pcm":
        if draw(st.booleans()):
            message["format"] = "pcm_s16le"
        if draw(st.booleans()):
            message["sample_rate"] = draw(st.sampled_from([8000, 16000, 22050, 24000, 44100, 48000]))
    elif output == "g711":
        message["format"] = draw(st.sampled_from(["mulaw", "alaw"]))
        if draw(st.booleans()):
            message["sample_rate"] = 8000
    else:
        message["framing"] = output
        if output == "twilio" or draw(st.booleans()):
            message["stream_sid"] = draw(STREAM_SIDS)
        if draw(st.booleans()):
            message["format"] = "mulaw"
    message.update(draw(UNKNOWN_FIELDS))
    return message


@st.composite
def near_valid(draw, base: st.SearchStrategy, fields: list[str], bad: dict | None = None) -> tuple[dict, str]:
    """A valid message with exactly one field replaced by a wrong value, and that field. Each field is
    its own branch, so that every field gets its share (sampled_from favours the first); the composite
    keeps the branches from being flattened into an enclosing one_of."""
    bad = bad or BAD_VALUES
    branches = [st.tuples(st.just(name), bad[name]) for name in fields]
    name, value = draw(st.one_of(branches))
    return {**draw(base), name: value}, name


@dataclass
class Probe:
    """Frames to send over the WebSocket and what must come back before the next request's answer.

    ``expect``: ``audio`` (audio, then a successful done), ``error`` (one error done, no audio),
    ``either`` (one of the two), ``stream`` (streamed text: one done for the context), ``cancel``
    (a request then a cancel: one done, complete or cancelled, never an error)."""

    frames: list
    expect: str
    request_id: str | None = None
    error_code: str = "invalid_request"
    ignored: list[str] = field(default_factory=list)
    speech: bool = True
    label: str = ""


def rid_of(message: dict) -> str | None:
    rid = message.get("request_id")
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int):
        return str(rid)
    return rid if isinstance(rid, str) and len(rid) <= 128 else None


KNOWN_FIELDS = {"type", "text", "context_id", "token", *VALID_OPTIONS, "format", "sample_rate", "framing", "stream_sid"}


def valid_probe(message: dict) -> Probe:
    return Probe(
        [message], "audio", rid_of(message), ignored=sorted(k for k in message if k not in KNOWN_FIELDS),
        label="valid",
    )


GENERATE_FIELDS = [f for f in BAD_VALUES if f != "context_id"]
TEXT_FIELDS = [f for f in BAD_VALUES if f not in ("type", "voice")]
#: A streamed fragment may be blank (only the stream's first text needs no words); the rest is the same.
TEXT_BAD_VALUES = {**BAD_VALUES, "text": st.one_of(NOT_STRINGS, st.just("a" * 4097), st.none())}


def near_valid_probe(pair: tuple[dict, str]) -> Probe:
    message, name = pair
    rid = None if name == "request_id" else rid_of(message)
    return Probe([message], "error", rid, label=f"bad {name}")


def near_valid_text_probe(pair: tuple[dict, str]) -> Probe:
    message, name = pair
    return Probe([{**message, "type": "text"}], "error", label=f"bad {name} in a text message")


FLUSH_PROBES = st.builds(
    lambda kind, cid: Probe([{"type": kind, "context_id": cid}], "error", label=f"{kind} of a bad context"),
    st.sampled_from(["flush", "end"]),
    BAD_VALUES["context_id"],
)

ARBITRARY_DICTS = st.one_of(
    st.fixed_dictionaries({"text": st.one_of(TEXTS, JSON_VALUES)}, optional={k: JSON_VALUES for k in BAD_VALUES if k != "text"}),
    st.dictionaries(st.sampled_from(sorted(BAD_VALUES)), JSON_VALUES, max_size=5),
    st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4),
).filter(lambda d: d.get("type") not in ("text", "cancel"))  # those may rightly answer nothing

ARBITRARY_PROBES = st.one_of(
    ARBITRARY_DICTS.map(lambda d: Probe([d], "either", rid_of(d), label="arbitrary object")),
    JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(lambda v: Probe([v], "error", label="not an object")),
)

def with_number(body: str, name: str, literal: str) -> str:
    """``body``, a JSON object's text, with ``"name": literal`` added: numbers json.dumps cannot write."""
    return body[:-1] + f', "{name}": {literal}}}'


HUGE_NUMBER_PROBES = st.builds(
    # An integer request_id is taken as its digits: valid up to 128 characters.
    lambda field_, digits, sign: Probe(
        [with_number('{"text": "Hi."}', field_, sign + "9" * digits)],
        "either" if field_ == "request_id" else "error",
        request_id=sign + "9" * digits if field_ == "request_id" and digits + len(sign) <= 128 else None,
        label=f"{digits}-digit {field_}",
    ),
    st.sampled_from(["speaker_id", "seed", "max_audio_ms", "temperature", "top_k", "request_id", "chunk_ms"]),
    st.integers(min_value=20, max_value=5000),
    st.sampled_from(["", "-"]),
)

RAW_PROBES = st.one_of(
    st.text(max_size=40).map(lambda s: Probe([s], "either", label="raw text")),
    st.sampled_from(['{"text": "Hi",', "{", "}", "[", '{"text": NaN}', "\ufeff{}", '{"text": "a" "b"}', "\u0000",
                     "[" * 5000 + "]" * 5000, '{"text": "x", "text": 3}'])
    .map(lambda s: Probe([s], "error", label="malformed JSON")),
    st.binary(max_size=64).map(lambda b: Probe([b], "error", label="binary frame")),
    st.integers(MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 64).map(
        lambda n: Probe([json.dumps({"text": "a" * n})], "error", error_code="message_too_large", label="oversized")
    ),
    st.integers(MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 64).map(
        lambda n: Probe([b"\x00" * n], "error", error_code="message_too_large", label="oversized binary")
    ),
)

WORDS = st.sampled_from(
    ["Hello", "world", "sure", "let", "me", "check", "that", "Dr.", "Smith", "3.5", "lbs", "U.S.", "e.g.",
     "www.example.com", "naïve", "日本語", "OK", "1.", "\"Quote", "it", "(and", "so)", "well"]
)
ENDS = st.sampled_from(["", "", ".", "!", "?", "...", ",", ";", ":"])


@st.composite
def streamed_text(draw) -> Probe:
    """text, text, (flush), text, end on one context: one done for the context, audio iff any words."""
    sentences = draw(st.lists(st.tuples(st.lists(WORDS, min_size=1, max_size=4), ENDS), min_size=0, max_size=3))
    whole = " ".join(" ".join(words) + end for words, end in sentences) + draw(st.sampled_from(["", " ", "  "]))
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=3)))
    fragments = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
    options = draw(valid_requests())
    options.pop("text")
    options.pop("request_id", None)
    options.pop("max_audio_ms", None)
    frames = []
    for i, fragment in enumerate(fragments):
        frames.append({**(options if i == 0 else {}), "type": "text", "text": fragment})
        if draw(st.integers(0, 3)) == 0:
            frames.append({"type": "flush"})
    frames.append({"type": "end"})
    return Probe(frames, "stream", speech=bool(whole.strip()), label="streamed text")


@st.composite
def request_then_cancel(draw) -> Probe:
    """A request, then a cancel of it (or of whatever is current): one done, complete or cancelled."""
    message = draw(valid_requests())
    message["request_id"] = draw(st.text(alphabet=string.ascii_letters, min_size=1, max_size=8))
    cancel = {"type": "cancel"}
    if draw(st.booleans()):
        cancel["request_id"] = message["request_id"]
    return Probe([message, cancel], "cancel", message["request_id"], label="cancel")


WS_PROBES = st.one_of(
    valid_requests().map(valid_probe),
    near_valid(valid_requests(), GENERATE_FIELDS).map(near_valid_probe),
    near_valid(valid_requests(), TEXT_FIELDS, TEXT_BAD_VALUES).map(near_valid_text_probe),
    FLUSH_PROBES,
    ARBITRARY_PROBES,
    HUGE_NUMBER_PROBES,
    RAW_PROBES,
    streamed_text(),
    request_then_cancel(),
)


# -- the WebSocket property -----------------------------------------------------------------------

COUNTER = itertools.count()


def encode(frame) -> str | bytes:
    if isinstance(frame, (str, bytes)):
        return frame
    return json.dumps(frame)  # NaN and Infinity go out as the literals Python's json accepts


def exchange(connection: Connection, frames: list[str | bytes]) -> tuple[list, dict]:
    """Send ``frames``, then a sentinel request; return everything that arrived before the sentinel's
    answer, and that answer. Fails (and reconnects for the next example) on a close or a timeout."""
    sentinel = f"sentinel-{next(COUNTER)}"
    ws = connection.get()
    received = []
    try:
        for frame in frames:
            ws.send(frame)
        ws.send(json.dumps({"text": "Still here.", "request_id": sentinel, "max_audio_ms": 80}))
        while True:
            message = ws.recv(timeout=RECV_TIMEOUT_S)
            if isinstance(message, str):
                answer = json.loads(message)
                if answer.get("done") is True and answer.get("request_id") == sentinel:
                    return received, answer
            received.append(message)
    except TimeoutError:
        connection.drop()
        raise AssertionError(f"no answer within {RECV_TIMEOUT_S} s; received so far: {received!r}") from None
    except ConnectionClosed as exc:
        connection.drop()
        raise AssertionError(f"the server closed the connection ({exc!r}); received: {received!r}") from None


def check_error(done: dict, code: str | None = None) -> None:
    error = done["error"]
    assert isinstance(error, dict), done
    assert isinstance(error.get("code"), str) and error["code"], done
    assert isinstance(error.get("message"), str) and error["message"].strip(), done
    if code is not None:
        assert error["code"] == code, done


def split(received: list) -> tuple[list[int], list[dict]]:
    """Audio frames (binary, or telephony media) counted between the JSON done events, and the dones;
    ``counts[i]`` is the audio before ``dones[i]``, ``counts[-1]`` the audio after the last one."""
    counts, dones = [0], []
    for message in received:
        if isinstance(message, bytes):
            assert message, "an empty binary frame"
            counts[-1] += 1
            continue
        frame = json.loads(message)
        if frame.get("event") == "media":
            assert frame["media"]["payload"], frame
            counts[-1] += 1
        elif frame.get("event") == "mark":
            continue
        else:
            assert frame.get("done") is True, f"unexpected text frame {frame!r}"
            dones.append(frame)
            counts.append(0)
    return counts, dones


def check_probe(probe: Probe, received: list, context_id: str | None, sentinel: dict) -> None:
    """Exactly one done answers the probe; what follows it is the sentinel's audio."""
    counts, dones = split(received)
    assert len(dones) == 1, f"expected exactly one done, got {dones!r}"
    done = dones[0]
    audio, sentinel_audio = counts
    assert "error" not in sentinel and sentinel["samples"] > 0, sentinel
    assert sentinel["chunks"] == sentinel_audio, (sentinel_audio, sentinel)
    if "error" in done:
        check_error(done)
        assert audio == 0, f"audio before an error: {done!r}"
    expect = probe.expect
    if expect == "either":
        expect = "error" if "error" in done else "audio"
    if expect == "error":
        assert "error" in done, f"{probe.label}: expected an error, got {done!r}"
        assert done["error"]["code"] == probe.error_code, done
        if probe.request_id is not None:
            assert done.get("request_id") == probe.request_id, done
    elif expect == "audio":
        assert "error" not in done, f"{probe.label}: {done!r}"
        assert audio > 0 and done["samples"] > 0 and done["chunks"] == audio, (audio, done)
        assert done.get("request_id") == probe.request_id, done
        if probe.label == "valid":
            assert done.get("ignored_fields", []) == probe.ignored, done
    elif expect == "stream":
        assert "error" not in done and "cancelled" not in done, done
        assert done["context_id"] == context_id, done
        assert (audio > 0) == probe.speech, (audio, done)
    elif expect == "cancel":
        assert "error" not in done, done
        assert done.get("request_id") == probe.request_id, done
        assert done.get("cancelled") is True or (audio > 0 and done["chunks"] == audio), (audio, done)


def run_probe(connection: Connection, probe: Probe) -> None:
    context_id = f"ctx-{next(COUNTER)}"
    frames = [
        encode({**f, "context_id": context_id} if probe.expect == "stream" else f) for f in probe.frames
    ]
    event(probe.label)
    received, sentinel = exchange(connection, frames)
    check_probe(probe, received, context_id, sentinel)


@fuzz_settings(max_examples=700)
@given(probe=WS_PROBES)
def test_every_websocket_message_gets_exactly_one_done_on_one_open_connection(connection, probe):
    """Any frame (valid, one field wrong, arbitrary JSON, not JSON, binary, streamed text, cancel) gets
    exactly one done (audio first, or an error with a code and a message), promptly, and the connection
    stays open for the next request."""
    run_probe(connection, probe)


WRONG_FIELDS = [("generate", name) for name in GENERATE_FIELDS] + [("text", name) for name in TEXT_FIELDS]


@pytest.mark.parametrize(("kind", "name"), WRONG_FIELDS, ids=[f"{k}-{n}" for k, n in WRONG_FIELDS])
@fuzz_settings(max_examples=10)
@given(data=st.data())
def test_one_wrong_field_is_an_invalid_request_error_on_the_open_connection(connection, kind, name, data):
    """A valid request (or first streamed text) with this one field wrong gets one invalid_request error
    frame, with its request_id, and nothing else; every field gets its share of examples."""
    bad = TEXT_BAD_VALUES if kind == "text" else BAD_VALUES
    message = {**data.draw(valid_requests()), name: data.draw(bad[name])}
    probe = near_valid_text_probe((message, name)) if kind == "text" else near_valid_probe((message, name))
    run_probe(connection, probe)


# -- the REST properties --------------------------------------------------------------------------

REST_FIELDS = [f for f in BAD_VALUES if f not in ("type", "context_id")]

REST_BODIES = st.one_of(
    valid_requests(framing=False).map(lambda m: (encode(m), "ok")),
    near_valid(valid_requests(framing=False), REST_FIELDS).map(lambda p: (encode(p[0]), "error")),
    valid_requests(framing=True).filter(lambda m: "framing" in m).map(lambda m: (encode(m), "error")),
    ARBITRARY_DICTS.map(lambda d: (encode(d), "either")),
    JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(lambda v: (encode(v), "error")),
    HUGE_NUMBER_PROBES.map(lambda p: (p.frames[0], p.expect)),
    st.text(max_size=40).map(lambda s: (s, "either")),
    st.binary(max_size=64).map(lambda b: (b, "either")),
)


def check_http_error(response: httpx.Response, openai: bool = False) -> None:
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"].strip(), error
    if openai:
        assert isinstance(error["type"], str) and error["type"], error
    else:
        assert isinstance(error["code"], str) and error["code"], error


@fuzz_settings(max_examples=400)
@given(case=REST_BODIES, wants_wav=st.booleans())
def test_generate_answers_any_body_with_audio_or_a_4xx_error(http, case, wants_wav):
    """POST /generate with any body: 200 with a WAV or a JSON download, or a 4xx JSON error; never a 5xx."""
    body, expect = case
    headers = {"content-type": "application/json"} | ({"accept": "audio/wav"} if wants_wav else {})
    response = http.post("/generate", content=body, headers=headers)
    assert response.status_code < 500, f"{response.status_code} for {body!r}: {response.text[:500]}"
    if expect == "either":
        expect = "ok" if response.status_code == 200 else "error"
    if expect == "error":
        check_http_error(response)
        return
    assert response.status_code == 200, f"{response.status_code} for {body!r}: {response.text[:500]}"
    if wants_wav:
        assert response.headers["content-type"] == "audio/wav"
        assert response.content[:4] == b"RIFF" and len(response.content) > 44
    else:
        result = response.json()
        assert result["url"] == f"/audio/{result['id']}.wav" and result["samples"] > 0, result


@st.composite
def valid_speech(draw) -> dict:
    voice = draw(st.one_of(
        st.sampled_from(OPENAI_VOICES), st.sampled_from(OPENAI_VOICES).map(str.upper),
        st.integers(0, 9).map(str), st.just(VOICE_NAME), st.sampled_from(OPENAI_VOICES).map(lambda v: {"id": v}),
    ))
    body = {"model": draw(st.sampled_from(MODEL_IDS)), "input": draw(TEXTS), "voice": voice}
    optional = {
        "response_format": st.sampled_from(RESPONSE_FORMATS),
        "speed": st.sampled_from([1, 1.0]),
        "stream_format": st.sampled_from(["audio", "sse"]),
        "seed": st.integers(0, 2**63 - 1),
        "instructions": st.text(max_size=10),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            body[name] = draw(values)
    return body


SPEECH_BAD = {
    "model": st.one_of(st.text(max_size=10).filter(lambda s: s not in MODEL_IDS), NOT_STRINGS, st.none()),
    "input": st.one_of(st.sampled_from(["", "  "]), NOT_STRINGS, st.none(), st.just("a" * 4097)),
    "voice": st.one_of(
        st.just(""), st.none(), NOT_STRINGS.filter(lambda v: not isinstance(v, dict)), st.integers(10, 10**6).map(str),
        st.text(alphabet=string.ascii_letters, min_size=1, max_size=10).map(lambda s: "nobody-" + s),
    ),
    "response_format": st.one_of(st.text(max_size=6).filter(lambda s: s not in RESPONSE_FORMATS), NOT_STRINGS),
    "speed": st.one_of(st.floats(allow_nan=True).filter(lambda x: x != 1), st.text(max_size=3), st.booleans()),
    "stream_format": st.one_of(st.text(max_size=6).filter(lambda s: s not in ("audio", "sse")), NOT_STRINGS),
    "seed": BAD_VALUES["seed"],
}

SPEECH_BODIES = st.one_of(
    valid_speech().map(lambda b: (encode(b), "ok")),
    st.tuples(valid_speech(), st.sampled_from(sorted(SPEECH_BAD))).flatmap(
        lambda pair: SPEECH_BAD[pair[1]].map(lambda bad: (encode({**pair[0], pair[1]: bad}), "error"))
    ),
    # Digits that str.isdigit() accepts: superscripts, other scripts' digits, more than 4300 of them.
    # Only ASCII digits name a speaker.
    st.tuples(valid_speech(), st.sampled_from(["²", "³⁴", "٣", "٣٣", "१", "𝟘", "00", "09", "1" * 4301])).map(
        lambda pair: (encode({**pair[0], "voice": pair[1]}), "ok" if pair[1] in ("00", "09") else "error")
    ),
    st.builds(
        lambda field_, digits, sign: (
            with_number('{"model": "tts-1", "input": "Hi.", "voice": "alloy"}', field_, sign + "9" * digits), "error"
        ),
        st.sampled_from(["seed", "speed", "input", "model"]), st.integers(20, 5000), st.sampled_from(["", "-"]),
    ),
    st.fixed_dictionaries({}, optional={k: JSON_VALUES for k in SPEECH_BAD}).map(lambda d: (encode(d), "either")),
    JSON_VALUES.map(lambda v: (encode(v), "either")),
    st.binary(max_size=64).map(lambda b: (b, "either")),
)


@fuzz_settings(max_examples=300)
@given(case=SPEECH_BODIES)
def test_speech_answers_any_body_with_audio_or_an_openai_style_4xx(http, case):
    """POST /v1/audio/speech with any body: 200 with audio, or a 4xx OpenAI-style error; never a 5xx."""
    body, expect = case
    response = http.post("/v1/audio/speech", content=body, headers={"content-type": "application/json"})
    assert response.status_code < 500, f"{response.status_code} for {body!r}: {response.text[:500]}"
    if expect == "either":
        expect = "ok" if response.status_code == 200 else "error"
    if expect == "error":
        check_http_error(response, openai=True)
        return
    assert response.status_code == 200, f"{response.status_code} for {body!r}: {response.text[:500]}"
    assert response.content, "an empty audio body"
    if json.loads(body).get("stream_format") == "sse":
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] == "speech.audio.done", events[-1]


# -- after the storm ------------------------------------------------------------------------------


def test_server_is_still_usable_after_fuzzing(server, connection):
    """After every property above, the kept connection, a new one and /health all still work."""
    received, done = exchange(connection, [json.dumps({"text": "One more, please.", "request_id": "after"})])
    counts, dones = split(received)
    assert len(dones) == 1 and "error" not in dones[0] and counts[0] == dones[0]["chunks"] > 0, dones
    assert "error" not in done and done["chunks"] == counts[1] > 0, done
    with connect(server.ws, open_timeout=10) as ws:
        ws.send(json.dumps({"text": "And on a new connection.", "speaker_id": 1, "max_audio_ms": 400}))
        messages = []
        while not isinstance(message := ws.recv(timeout=RECV_TIMEOUT_S), str):
            messages.append(message)
    assert messages and json.loads(message)["done"] is True and "error" not in json.loads(message)
    health = httpx.get(server.http + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "healthy"


# -- regressions: inputs the fuzzer found that once crashed a connection or gave a 500 ---------------


@pytest.fixture
def quiet_server_errors():
    """Keep uvicorn from logging a 500's traceback should one of these regress: on CPython 3.11 the
    traceback module's ast.parse in the server thread can race pytest's own ast.parse of this file
    (SystemError: AST constructor recursion depth mismatch)."""
    logger = logging.getLogger("uvicorn.error")
    disabled, logger.disabled = logger.disabled, True
    yield
    logger.disabled = disabled


def first_answer(server, raw: str) -> dict:
    with connect(server.ws, open_timeout=10) as ws:
        ws.send(raw)
        return json.loads(ws.recv(timeout=RECV_TIMEOUT_S))


HUGE_INT = "9" * 4301


def test_an_integer_temperature_beyond_float_range_is_an_error_frame(server):
    """temperature 10**400 is out of range: an invalid_request frame, not a dropped connection."""
    event = first_answer(server, with_number('{"text": "Hi."}', "temperature", "1" + "0" * 400))
    check_error(event, "invalid_request")


def test_an_integer_of_more_than_4300_digits_is_an_error_frame(server):
    """A JSON number too long for Python's int conversion is bad JSON: an error frame, not a dropped connection."""
    event = first_answer(server, with_number('{"text": "Hi."}', "seed", HUGE_INT))
    check_error(event, "invalid_request")


@pytest.mark.parametrize(
    "body",
    [with_number('{"text": "Hi."}', "temperature", "1" + "0" * 400), with_number('{"text": "Hi."}', "seed", HUGE_INT)],
    ids=["temperature-10**400", "4301-digit-seed"],
)
def test_generate_refuses_out_of_range_numbers_with_a_4xx(http, quiet_server_errors, body):
    """POST /generate answers a 4xx JSON error for numbers Python cannot convert, not a 500."""
    check_http_error(http.post("/generate", content=body))


@pytest.mark.parametrize(
    "body",
    [
        {"model": "tts-1", "input": "Hi.", "voice": "²"},
        {"model": "tts-1", "input": "Hi.", "voice": "1" * 4301},
        with_number('{"model": "tts-1", "input": "Hi.", "voice": "alloy"}', "seed", HUGE_INT),
    ],
    ids=["superscript-digit-voice", "4301-digit-voice", "4301-digit-seed"],
)
def test_speech_refuses_unparseable_voices_and_numbers_with_a_400(http, quiet_server_errors, body):
    """A voice that str.isdigit() accepts but int() cannot parse, or a too-long number, is a 400, not a 500."""
    content = body if isinstance(body, str) else json.dumps(body)
    check_http_error(http.post("/v1/audio/speech", content=content), openai=True)


# -- slow, abandoned and hostile clients, on every streaming route --------------------------------
# One rule for every route (csmserve.server.streaming, and ws.py on the WebSocket): a client spends
# only its own share. Each case runs on every route in support.routes.STREAMING_ROUTES.

LONG_TEXT = "This sentence keeps the engine busy for a long while. " * 700  # ~38 MB of PCM from the fake
SHORT_WS = {"text": "Short.", "max_audio_ms": 160, "request_id": "after"}


def hostile_settings(tmp_path, **overrides) -> Settings:
    values = dict(
        engine="fake", host="127.0.0.1", port=0, audio_dir=tmp_path / "audio", voices_dir=tmp_path / "voices",
        max_text_chars=40_000, max_audio_ms=900_000,
    )
    values.update(overrides)
    return Settings(**values)


def metrics_of(server) -> str:
    return httpx.get(server.http + "/metrics", timeout=5).text


def wait_for_metric(server, name: str, at_least: float = 1, **labels) -> str:
    """Poll /metrics until the sample reaches ``at_least``; the metrics text then (fails if it never does)."""
    for _ in range(600):
        text = metrics_of(server)
        if counter(text, name, **labels) >= at_least:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{name}{labels} never reached {at_least}:\n{text}")


def normal_client_gets_audio(server) -> bytes:
    """A well-behaved WebSocket client asks for 160 ms of audio: the PCM it received."""
    with connect(server.ws, open_timeout=10) as ws:
        ws.send(json.dumps(SHORT_WS))
        audio = b""
        while isinstance(message := ws.recv(timeout=RECV_TIMEOUT_S), bytes):
            audio += message
    done = json.loads(message)
    assert "error" not in done, done
    return audio


@pytest.mark.parametrize("route", STREAMING_ROUTES, ids=lambda r: r.name)
def test_a_client_that_never_reads_is_stopped_at_the_deadline_and_others_get_audio(tmp_path, route):
    """A non-reading client is stopped by the request deadline (engine freed, counted as timeout or
    cut); the next client gets its 160 ms of audio and the server reports no stream in flight."""
    settings_ = hostile_settings(tmp_path, request_timeout_s=1.0, max_lag_s=60)
    # Streamed routes: the fake outruns the reader and blocks on it; /generate: generation outlasts the deadline.
    with running_server(settings_, FakeEngine(frame_delay_s=0 if route.streams else 0.01)) as server:
        sock = route.open(server.port, LONG_TEXT, "stuck")
        try:
            wait_for_metric(server, "csm_requests_total", endpoint=route.endpoint, outcome="timeout")
            assert len(normal_client_gets_audio(server)) == 2 * 24_000 * 160 // 1000
        finally:
            sock.close()
        for _ in range(600):  # the slot is free once the client is gone (a WebSocket holds it to send its error)
            if counter(metrics_of(server), "csm_active_streams") == 0:
                break
            time.sleep(0.05)
        assert counter(metrics_of(server), "csm_active_streams") == 0


@pytest.mark.parametrize("route", [r for r in STREAMING_ROUTES if r.streams], ids=lambda r: r.name)
def test_a_client_that_stops_reading_is_cut_after_max_lag(tmp_path, route):
    """A reader that falls max_lag_s behind is cut, counted as a slow client and as disconnected;
    its generation stops, and a normal client is served."""
    engine = FakeEngine()
    with running_server(hostile_settings(tmp_path, max_lag_s=0.3), engine) as server:
        sock = route.open(server.port, LONG_TEXT, "slow")
        try:
            text = wait_for_metric(server, "csm_slow_clients_total")
            assert counter(text, "csm_requests_total", endpoint=route.endpoint, outcome="disconnected") == 1
            assert normal_client_gets_audio(server)
        finally:
            sock.close()
    assert engine.frames_made["slow"] < 10_002


@pytest.mark.parametrize("route", STREAMING_ROUTES, ids=lambda r: r.name)
def test_an_abandoned_request_is_cancelled_and_counted_as_disconnected(tmp_path, route):
    """A client that goes away mid-generation cancels its generation (frames stop short of the
    utterance) and the request counts as disconnected, not ok."""
    engine = FakeEngine(frame_delay_s=0.02)
    text = "Abandon me. " * 40  # 122 frames of 20 ms in the fake engine
    with running_server(hostile_settings(tmp_path), engine) as server:
        sock = route.open(server.port, text, "gone", rcvbuf=1 << 20)
        for _ in range(600):
            if engine.frames_made.get("gone", 0) >= 2:
                break
            time.sleep(0.02)
        sock.close()
        metrics = wait_for_metric(server, "csm_requests_total", endpoint=route.endpoint, outcome="disconnected")
        made = engine.frames_made["gone"]
        assert normal_client_gets_audio(server)
    assert counter(metrics, "csm_requests_total", endpoint=route.endpoint, outcome="ok") == 0
    assert made < 122


@pytest.mark.parametrize("route", [r for r in STREAMING_ROUTES if not r.websocket], ids=lambda r: r.name)
def test_with_the_worker_queue_full_every_http_route_answers_429(tmp_path, route):
    """One request in the engine's only row, one queued (max_batch 1, max_queue 1): the next is a 429
    with Retry-After and a JSON error, never a 200 with an empty body; it counts as rejected."""
    engine = FakeEngine(frame_delay_s=0.05, max_queue=1, max_batch=1)
    with running_server(hostile_settings(tmp_path), engine) as server:
        held = []
        try:
            for i, wanted in enumerate(("active", "waiting")):  # one generating, then one queued
                held.append(route.open(server.port, "Keep the worker busy for a while. " * 20, f"held-{i}", 1 << 20))
                for _ in range(600):
                    if getattr(engine.capacity(), wanted) == 1:
                        break
                    time.sleep(0.02)
            response = httpx.post(server.http + route.path, json=route.body("Hi.", "late"), timeout=30)
            metrics = metrics_of(server)
        finally:
            for sock in held:
                sock.close()
    assert response.status_code == 429, (response.status_code, response.content[:200])
    assert response.headers["Retry-After"] == "1" and route.overloaded_code(response.json()) == "overloaded"
    assert counter(metrics, "csm_requests_total", endpoint=route.endpoint, outcome="rejected") == 1


def test_a_cut_non_reader_gives_back_its_connection_slot(tmp_path):
    """Once cut, a client that still reads nothing loses its connection (max_lag_s later) instead of
    holding its socket, its buffered audio and a connection slot for ever. With max_connections 2,
    a probe is refused (503) while the non-reader holds a slot, and served once it is gone."""
    route = next(r for r in STREAMING_ROUTES if r.endpoint == "openai")
    with running_server(hostile_settings(tmp_path, max_lag_s=0.3, max_connections=2), FakeEngine()) as server:
        sock = route.open(server.port, LONG_TEXT, "cut")
        try:
            statuses = []
            for _ in range(600):
                statuses.append(httpx.get(server.http + "/v1/models", timeout=10).status_code)  # not a probe
                if statuses[-1] == 200:
                    break
                time.sleep(0.05)
        finally:
            sock.close()
    assert statuses[0] == 503 and statuses[-1] == 200
