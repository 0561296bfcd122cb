"""Protocol parsing and per-connection session logic, without sockets or torch."""

from __future__ import annotations

import json

import pytest

from csmserve.api.seed.messages import (
    CancelMessage,
    FlushMessage,
    GenerateRequest,
    Limits,
    TextMessage,
    parse_client_message,
)
from csmserve.api.seed.session import Session
from csmserve.errors import InvalidRequest

LIMITS = Limits()


def parse(obj) -> object:
    return parse_client_message(json.dumps(obj), LIMITS)


def test_seed_message_is_a_generate_request_with_defaults():
    """{"text", "speaker_id"} is a generation request with the server's default chunk size."""
    request = parse({"text": "Hello world", "speaker_id": 0})
    assert isinstance(request, GenerateRequest)
    assert (request.text, request.speaker_id, request.chunk_ms) == ("Hello world", 0, 200)


def test_optional_fields_are_parsed():
    """All optional request fields are accepted within their ranges."""
    request = parse(
        {"text": "Hi", "speaker_id": 9, "chunk_ms": 20, "first_chunk_ms": 40, "max_audio_ms": 1000,
         "temperature": 0.7, "top_k": 30, "seed": 5, "request_id": "abc"}
    )
    assert (request.chunk_ms, request.first_chunk_ms, request.max_audio_ms) == (20, 40, 1000)
    assert (request.temperature, request.top_k, request.seed, request.request_id) == (0.7, 30, 5, "abc")


def test_speaker_range_is_configurable():
    """The allowed speaker ids come from the server's limits."""
    limits = Limits(min_speaker_id=0, max_speaker_id=3)
    with pytest.raises(InvalidRequest, match="from 0 to 3"):
        parse_client_message(json.dumps({"text": "Hi", "speaker_id": 4}), limits)


def test_text_limit_is_configurable():
    """max_text_chars bounds the text; the message gives both lengths."""
    limits = Limits(max_text_chars=5)
    with pytest.raises(InvalidRequest, match="text is 6 characters; the limit is 5"):
        parse_client_message(json.dumps({"text": "abcdef"}), limits)


def test_cancel_message_is_parsed():
    """{"type": "cancel"} with or without a request id."""
    assert parse({"type": "cancel"}) == CancelMessage()
    assert parse({"type": "cancel", "request_id": "x"}).request_id == "x"


def test_fields_that_depend_on_others_default_from_them():
    """framing brings mulaw at 8000 Hz; a G.711 format brings 8000 Hz; twilio framing needs its stream_sid."""
    framed = parse({"text": "Hi", "framing": "telnyx"})
    assert (framed.format, framed.sample_rate) == ("mulaw", 8000)
    assert parse({"text": "Hi", "format": "alaw"}).sample_rate == 8000
    with pytest.raises(InvalidRequest, match="twilio framing needs stream_sid"):
        parse({"text": "Hi", "framing": "twilio"})
    with pytest.raises(InvalidRequest, match="mulaw is only available at 8000 Hz"):
        parse({"text": "Hi", "format": "mulaw", "sample_rate": 16000})


def test_messages_are_told_apart_by_type_and_validated_as_their_kind():
    """Each type tag gives its own message; a text message's other fields are its stream's options."""
    text = parse({"type": "text", "context_id": "c", "text": "", "speaker_id": 3, "colour": "red"})
    assert isinstance(text, TextMessage) and text.options.speaker_id == 3
    assert text.options.ignored_fields == ("colour",)
    assert parse({"type": "end"}) == FlushMessage(type="end", context_id="default")
    with pytest.raises(InvalidRequest, match="speaker_id must be an integer from 0 to 9"):
        parse({"type": "text", "text": "Hi", "speaker_id": 10})
    with pytest.raises(InvalidRequest, match="unknown message type 'speak'"):
        parse({"type": "speak", "text": "Hi"})


def test_deeply_nested_json_is_an_error_not_a_crash():
    """Pathological JSON is refused with InvalidRequest."""
    with pytest.raises(InvalidRequest):
        parse_client_message("[" * 100_000 + "]" * 100_000, LIMITS)


def test_session_queues_requests_in_order():
    """Requests are streamed in the order they arrived."""
    session = Session(LIMITS)
    for rid in ("a", "b", "c"):
        assert session.handle(json.dumps({"text": "x", "request_id": rid}), 0.0).events == []
    assert [session.next_job().request.request_id for _ in range(3)] == ["a", "b", "c"]
    assert session.next_job() is None


def test_session_refuses_requests_beyond_the_pending_bound():
    """A connection cannot queue more than max_pending requests."""
    session = Session(LIMITS, max_pending=2)
    session.handle('{"text": "1"}', 0)
    session.handle('{"text": "2"}', 0)
    events = session.handle('{"text": "3", "request_id": "three"}', 0).events
    assert events[0]["error"]["code"] == "too_many_pending"
    assert events[0]["request_id"] == "three"


def test_cancel_without_id_targets_the_current_request():
    """A bare cancel stops what is streaming now."""
    session = Session(LIMITS)
    session.handle('{"text": "1", "request_id": "now"}', 0)
    session.next_job()
    outcome = session.handle('{"type": "cancel"}', 0)
    assert outcome.cancel_current and session.current.cancelled


def test_cancel_of_a_queued_request_removes_it_and_answers_done():
    """Cancelling a queued request answers at once and it never starts."""
    session = Session(LIMITS)
    session.handle('{"text": "1", "request_id": "a"}', 0)
    session.handle('{"text": "2", "request_id": "b"}', 0)
    session.next_job()
    outcome = session.handle('{"type": "cancel", "request_id": "b"}', 0)
    assert outcome.events == [{"done": True, "cancelled": True, "request_id": "b", "audio_ms": 0}]
    assert not outcome.cancel_current
    assert session.next_job() is None


def test_cancel_of_nothing_is_silently_ignored():
    """Barge-in races (cancel after done) are not errors."""
    session = Session(LIMITS)
    assert session.handle('{"type": "cancel", "request_id": "late"}', 0).events == []
