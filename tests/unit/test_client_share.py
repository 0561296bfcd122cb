"""A client spends only its own share: per-connection caps, log hygiene, the progress watchdog.

Plain logic, no sockets (the integration tests drive the same rules through real servers).
"""

from __future__ import annotations

import json
import logging

from csmserve.api.seed.messages import Limits
from csmserve.api.seed.session import Session
from csmserve.engine import Capacity
from csmserve.logs import ContextFilter, RateLimit, clean_id, redact, request_id
from csmserve.engine.watchdog import Watchdog


def text(context_id: str, fragment: str) -> str:
    return json.dumps({"type": "text", "context_id": context_id, "text": fragment})


def test_a_text_context_carries_at_most_max_stream_chars():
    """Text past max_stream_chars on one context is a stream_too_long error; nothing more is queued."""
    session = Session(Limits(), max_pending=100, max_stream_chars=30)
    assert session.handle(text("c", "Twenty characters.. "), 0).events == []
    refused = session.handle(text("c", "and eleven more"), 0).events
    assert refused[0]["error"]["code"] == "stream_too_long" and refused[0]["context_id"] == "c"
    assert session.streams["c"].chars == 20


def test_a_connection_opens_at_most_max_contexts_text_contexts():
    """Context ids beyond max_contexts (ended ones count) are refused with an error naming the limit."""
    session = Session(Limits(), max_pending=100, max_contexts=2)
    for cid in ("a", "b"):
        session.handle(text(cid, "Hi"), 0)
        session.handle(json.dumps({"type": "end", "context_id": cid}), 0)
    refused = session.handle(text("c", "Hi"), 0).events
    assert refused and "2 text contexts" in refused[0]["error"]["message"]
    assert "c" not in session.streams


def test_text_without_a_sentence_end_is_spoken_once_it_passes_the_text_limit():
    """Pending text never grows past max_text_chars (re-reading it per fragment stays bounded)."""
    session = Session(Limits(max_text_chars=100), max_pending=100)
    for _ in range(30):
        session.handle(text("c", "word "), 0)
    assert session.streams["c"].buffer.pending_chars <= 100
    assert [job.request.text for job in session.pending] == [("word " * 21).strip()]


def test_redaction_reads_percent_encoded_parameter_names():
    """?%74oken= and ?tok%65n= are the token parameter: their values never reach a log line."""
    line = 'GET /v1/models?%74oken=SECRET1&x=1 and /ws/generate?tok%65n=SECRET2 and Bearer SECRET3'
    cleaned = redact(line)
    assert "SECRET" not in cleaned and "x=1" in cleaned


def test_ids_are_bounded_and_stripped_of_control_characters():
    """A client id cannot start a log line or fill the log: controls replaced, 128 characters at most."""
    assert clean_id("a\nforged\r\x1b[31m") == "a?forged??[31m"
    assert len(clean_id("x" * 8_000_000)) == 128


def test_the_log_filter_cleans_the_request_id_of_every_record():
    """Whatever the context variable holds, the record carries the cleaned id."""
    token = request_id.set("id\nINFO forged")
    try:
        record = logging.LogRecord("csmserve", logging.INFO, __file__, 1, "hello", (), None)
        ContextFilter().filter(record)
    finally:
        request_id.reset(token)
    assert record.request_id == "id?INFO forged"


def test_repeated_plumbing_warnings_are_rate_limited():
    """1,000 identical accept errors in one window log `burst` lines; the next window says how many were dropped."""
    clock = [0.0]
    limiter = RateLimit(burst=5, window_s=10, clock=lambda: clock[0])

    def emit() -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource", (), None)

    passed = sum(limiter.filter(emit()) for _ in range(1000))
    clock[0] = 11.0
    record = emit()
    assert limiter.filter(record)
    assert passed == 5
    assert "995 more like this were not logged" in record.getMessage()


class Engine:
    """Plain capacity snapshots the test sets (a fake, read by the watchdog)."""

    def __init__(self):
        self.snapshot = Capacity(max_batch=1)

    def capacity(self) -> Capacity:
        return self.snapshot


def test_the_watchdog_reports_work_without_progress_and_clears_on_progress():
    """Waiting work and no new step for stall_timeout_s: stalled, with the reason; a step clears it;
    an idle engine never stalls."""
    engine, clock = Engine(), [0.0]
    watchdog = Watchdog(engine.capacity, timeout_s=5, clock=lambda: clock[0])
    clock[0] = 100.0
    assert watchdog.stalled() is None  # idle, however long
    engine.snapshot = Capacity(max_batch=1, active=1, waiting=3, steps=7)
    assert watchdog.stalled() is None
    clock[0] = 106.0
    reason = watchdog.stalled()
    assert reason is not None and "3 waiting" in reason
    engine.snapshot = Capacity(max_batch=1, active=1, waiting=3, steps=8)
    assert watchdog.stalled() is None


def test_the_watchdog_is_armed_only_once_the_engine_is_ready():
    """Start-up (loading, capturing or compiling every step) holds work without steps: not a stall until
    the engine says it is ready; from then on the same wait is one."""
    engine, clock, ready = Engine(), [0.0], [False]
    watchdog = Watchdog(engine.capacity, timeout_s=5, clock=lambda: clock[0], armed=lambda: ready[0])
    engine.snapshot = Capacity(max_batch=1, active=1, waiting=2, steps=0)
    for now in (1.0, 30.0, 300.0):
        clock[0] = now
        assert watchdog.stalled() is None
    ready[0] = True
    assert watchdog.stalled() is None  # the wait starts when it is armed
    clock[0] = 306.0
    assert watchdog.stalled() is not None
