"""Wyoming without sockets: the session's jobs and replies, the bounded framing, the audio events."""

from __future__ import annotations

import asyncio
import json

import pytest
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.ping import Ping, Pong
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from csmserve.api.wyoming.connection import loopback
from csmserve.api.wyoming.messages import AudioOut
from csmserve.api.wyoming.session import Failure, Sentence, StreamEnd, Utterance, WyomingSession
from csmserve.api.wyoming.wire import read_event
from csmserve.config import Settings
from csmserve.errors import InvalidRequest, MessageTooLarge
from csmserve.speech.voices import VoiceBook
from csmserve.voices import VoiceStore


@pytest.fixture
def session(tmp_path):
    ids = iter(range(1000))
    settings = Settings(voices_dir=tmp_path, max_text_chars=100, max_stream_chars=60)
    return WyomingSession(VoiceBook(VoiceStore(tmp_path)), settings, lambda: f"r{next(ids)}")


def test_describe_is_answered_at_once_with_info(session):
    """describe: an info reply, no job."""
    actions = session.handle(Describe().event())
    assert actions.jobs == [] and Info.is_type(actions.replies[0].type)


def test_ping_is_answered_with_pong_carrying_its_text(session):
    actions = session.handle(Ping(text="hi").event())
    assert Pong.from_event(actions.replies[0]).text == "hi"


def test_synthesize_is_one_utterance_in_the_voice_it_names(session):
    """A speaker id voice becomes the request's speaker; no voice: the default speaker."""
    [named] = session.handle(Synthesize(text="Hello.", voice=SynthesizeVoice(name="4")).event()).jobs
    [plain] = session.handle(Synthesize(text="Hello.").event()).jobs
    assert isinstance(named, Utterance) and named.request.speaker_id == 4 and named.voice == "4"
    assert plain.request.speaker_id is None and plain.voice == "0"
    assert named.request.request_id != plain.request.request_id


@pytest.mark.parametrize(
    "event, message",
    [
        (Synthesize(text="Hi", voice=SynthesizeVoice(name="12")).event(), "unknown voice '12'"),
        (Synthesize(text="Hi", voice=SynthesizeVoice(language="de")).event(), "speaks English"),
        (Synthesize(text="Hi", voice=SynthesizeVoice(name="1", speaker="2")).event(), "no speakers"),
        (Synthesize(text="x" * 101).event(), "the limit is 100"),
        (Event("synthesize", {"text": 5}), "text"),
        (Event("synthesize", {}), "text"),
        (SynthesizeChunk(text="Hi").event(), "send synthesize-start first"),
        (SynthesizeStop().event(), "send synthesize-start first"),
    ],
)
def test_a_bad_event_becomes_a_failure_and_nothing_after_it_is_read(session, event, message):
    """Each bad event: one Failure job with a message naming the fault; later events are ignored."""
    [job] = session.handle(event).jobs
    assert isinstance(job, Failure) and isinstance(job.error, InvalidRequest) and message in job.error.message
    assert session.handle(Synthesize(text="Hello.").event()).jobs == []


def test_an_english_language_alone_picks_the_default_voice(session):
    [job] = session.handle(Synthesize(text="Hi", voice=SynthesizeVoice(language="en_US")).event()).jobs
    assert isinstance(job, Utterance) and job.request.speaker_id is None


def test_streamed_text_becomes_sentences_then_the_end(session):
    """Chunks release complete sentences; Home Assistant's synthesize copy is ignored; stop speaks the rest."""
    assert session.handle(SynthesizeStart(voice=SynthesizeVoice(name="1")).event()).jobs == []
    assert session.handle(SynthesizeChunk(text="Sure, let me").event()).jobs == []
    jobs = session.handle(SynthesizeChunk(text=" check. It will").event()).jobs
    assert [j.text for j in jobs] == ["Sure, let me check."]
    assert session.handle(Synthesize(text="Sure, let me check. It will").event()).jobs == []
    *rest, end = session.handle(SynthesizeStop().event()).jobs
    assert [j.text for j in rest] == ["It will"] and isinstance(end, StreamEnd)
    assert all(isinstance(j, Sentence) and j.stream is end.stream for j in [*jobs, *rest])
    assert end.stream.request("x").speaker_id == 1 and end.stream.chars == len("Sure, let me check. It will")
    assert session.stream is None


def test_a_stream_is_bounded_in_characters(session):
    """Past max_stream_chars a stream fails, and the failure names the stream it ends."""
    session.handle(SynthesizeStart().event())
    session.handle(SynthesizeChunk(text="a" * 50).event())
    [failure] = session.handle(SynthesizeChunk(text="b" * 11).event()).jobs
    assert isinstance(failure, Failure) and "at most 60 characters" in failure.error.message
    assert failure.stream is not None and session.stream is None


def test_audio_events_start_once_stamp_chunks_and_stop():
    """audio-start before the first chunk only, chunks stamped with the milliseconds before them, audio-stop."""
    out = AudioOut()
    first = out.chunk(b"\0\0" * 2400)
    second = out.chunk(b"\0\0" * 2400)
    assert [e.type for e in first] == ["audio-start", "audio-chunk"] and [e.type for e in second] == ["audio-chunk"]
    assert AudioStart.from_event(first[0]).rate == 24000
    assert [AudioChunk.from_event(e).timestamp for e in (first[1], second[0])] == [0, 100]
    assert out.chunk(b"") == []
    assert AudioStop.from_event(out.stop()[0]).timestamp == 200
    assert [e.type for e in AudioOut().stop()] == ["audio-start", "audio-stop"]


def framed(header: dict, data: bytes = b"", payload: bytes = b"") -> bytes:
    return json.dumps(header).encode() + b"\n" + data + payload


async def read(raw: bytes, max_bytes: int = 1000, limit: int = 1000):
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(raw)
    reader.feed_eof()
    return await read_event(reader, max_bytes)


async def test_an_event_is_read_with_its_data_and_payload():
    data = json.dumps({"text": "Hi"}).encode()
    event = await read(framed({"type": "synthesize", "data_length": len(data), "payload_length": 3}, data, b"abc"))
    assert event == Event("synthesize", {"text": "Hi"}, b"abc")


@pytest.mark.parametrize(
    "raw, error",
    [
        (framed({"type": "x", "payload_length": 1001}), MessageTooLarge),
        (framed({"type": "x", "data_length": 5000}), MessageTooLarge),
        (b'{"type": "x", "pad": "' + b"a" * 2000 + b'"}\n', MessageTooLarge),
        (framed({"type": "x", "data_length": -1}), InvalidRequest),
        (b"not json\n", InvalidRequest),
        (framed({"data": {}}), InvalidRequest),
        (framed({"type": "x", "data_length": 2}, b"[]"), InvalidRequest),
    ],
)
async def test_an_event_too_large_or_not_wyomings_is_refused_before_it_is_read(raw, error):
    """Lengths past max_bytes, a header line past the reader's limit and bad framing raise, without reading on."""
    with pytest.raises(error):
        await read(raw)


@pytest.mark.parametrize("raw", [b"", b'{"type": "x"', framed({"type": "x", "payload_length": 10}, payload=b"abc")])
async def test_a_client_gone_mid_event_reads_as_the_end(raw):
    assert await read(raw) is None


@pytest.mark.parametrize("host, expected", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("0.0.0.0", False), ("192.168.1.5", False), ("homeassistant.local", False)])
def test_only_loopback_addresses_count_as_this_machine(host, expected):
    """A port beyond loopback gets the no-authentication warning at start-up."""
    assert loopback(host) is expected
