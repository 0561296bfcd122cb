"""Per-connection logic of ``/ws/generate``, without sockets: messages in, jobs and events out.

A connection carries requests one after another, in order. While one streams, the client may send
more (they queue, up to a bound) or cancel one (the current one, or a queued one before it starts).
Text streamed in from an LLM (``text``/``flush``/``end`` on a ``context_id``) becomes one job per
sentence, all feeding one continuous audio stream that ends with a single ``done``.

The WebSocket adapter feeds every frame to :meth:`Session.handle`, sends back what it returns, and
asks :meth:`Session.next_job` what to stream next.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from csmserve.api.seed.messages import (
    CancelMessage,
    FlushMessage,
    GenerateRequest,
    Limits,
    TextMessage,
    done_event,
    error_event,
    parse_client_message,
    request_id_of,
)
from csmserve.errors import CsmServeError, InvalidRequest
from csmserve.speech import SentenceStream
from csmserve.text.sentences import SentenceBuffer


@dataclass
class TextStream:
    """One ``context_id``'s stream: its options (from the first message), pending text, and the audio
    stream its sentences are spoken into (set by the adapter when the first sentence is spoken)."""

    context_id: str
    options: GenerateRequest
    started_at: float
    buffer: SentenceBuffer = field(default_factory=SentenceBuffer)
    audio: SentenceStream | None = None
    ended: bool = False
    #: Characters of text received on this context so far (bounded by ``max_stream_chars``).
    chars: int = 0
    #: The stream's access line (the adapter's: a :class:`~csmserve.server.access.AccessLine`).
    access: Any = None


@dataclass
class Job:
    """One unit of streaming: a request, or one sentence (or the end) of a text stream."""

    request: GenerateRequest
    received_at: float
    cancelled: bool = False
    stream: TextStream | None = None
    #: The end of a text stream: flush its output and send its ``done``.
    final: bool = False
    #: The request's access line (the adapter's; a text stream's is on the stream).
    access: Any = None

    @property
    def request_id(self) -> str | None:
        return self.request.request_id


@dataclass
class Outcome:
    """What :meth:`Session.handle` asks the adapter to do: send ``events``; stop the current job?
    ``dropped``: queued requests and text streams a cancel ended before they streamed (the current
    one ends in the adapter)."""

    events: list[dict] = field(default_factory=list)
    cancel_current: bool = False
    dropped: list[Job | TextStream] = field(default_factory=list)


class Session:
    """``max_stream_chars``: text one context_id may carry; ``max_contexts``: context_ids one
    connection may open in its life (a client spends only its own share)."""

    def __init__(self, limits: Limits, max_pending: int = 8, max_stream_chars: int = 100_000, max_contexts: int = 16):
        self.limits = limits
        self.max_pending = max_pending
        self.max_stream_chars = max_stream_chars
        self.max_contexts = max_contexts
        self.contexts_opened = 0
        self.pending: deque[Job] = deque()
        self.current: Job | None = None
        self.streams: dict[str, TextStream] = {}

    def handle(self, raw: str | bytes | None, now: float) -> Outcome:
        """Process one client frame. Never raises: a bad frame becomes an error event."""
        try:
            message = parse_client_message(raw, self.limits)
        except InvalidRequest as exc:
            return Outcome([error_event(exc.code, exc.message, request_id_of(raw))])
        if isinstance(message, CancelMessage):
            return self._cancel(message)
        if isinstance(message, TextMessage):
            return self._text(message, now)
        if isinstance(message, FlushMessage):
            return self._flush(message, now)
        return self._enqueue([Job(message, now)])

    def _enqueue(self, jobs: list[Job]) -> Outcome:
        if not jobs:
            return Outcome()
        speaking = [j for j in jobs if not j.final]
        if len(self.pending) + len(speaking) > self.max_pending:
            rid = jobs[0].request_id
            return Outcome(
                [
                    error_event(
                        "too_many_pending",
                        f"{self.max_pending} requests are already queued on this connection; "
                        "wait for one to finish or cancel one",
                        rid,
                    )
                ]
            )
        self.pending.extend(jobs)
        return Outcome()

    # -- streamed text ------------------------------------------------------------------------
    def _stream_for(self, context_id: str, options: GenerateRequest | None, now: float) -> TextStream:
        stream = self.streams.get(context_id)
        if stream is None:
            if options is None:
                raise InvalidRequest(f"no text was sent on context {context_id!r}")
            if self.contexts_opened >= self.max_contexts:
                raise InvalidRequest(
                    f"this connection has opened {self.max_contexts} text contexts, the limit; open a new connection"
                )
            self.contexts_opened += 1
            if options.request_id is None:
                options = options.model_copy(update={"request_id": context_id})
            stream = self.streams[context_id] = TextStream(context_id, options, now)
        return stream

    def _sentence_jobs(self, stream: TextStream, sentences: list[str], now: float) -> list[Job]:
        return [
            Job(stream.options.model_copy(update={"text": s}), now, stream=stream) for s in sentences if s.strip()
        ]

    def _text(self, message: TextMessage, now: float) -> Outcome:
        try:
            stream = self._stream_for(message.context_id, message.options, now)
        except InvalidRequest as exc:
            return Outcome([error_event(exc.code, exc.message, message.context_id)])
        if stream.chars + len(message.text) > self.max_stream_chars:
            return Outcome([error_event(
                "stream_too_long",
                f"a text context carries at most {self.max_stream_chars} characters; end it and start another",
                stream.options.request_id, context_id=message.context_id,
            )])
        stream.chars += len(message.text)
        sentences = stream.buffer.push(message.text)
        if stream.buffer.pending_chars > self.limits.max_text_chars:
            # No sentence end in sight: speak what there is, so that re-reading the pending text
            # (on every fragment) stays bounded.
            sentences += stream.buffer.flush()
        return self._enqueue(self._sentence_jobs(stream, sentences, now))

    def _flush(self, message: FlushMessage, now: float) -> Outcome:
        try:
            stream = self._stream_for(message.context_id, None, now)
        except InvalidRequest as exc:
            return Outcome([error_event(exc.code, exc.message, message.context_id)])
        jobs = self._sentence_jobs(stream, stream.buffer.flush(), now)
        if message.type == "end":
            stream.ended = True
            del self.streams[message.context_id]
            jobs.append(Job(stream.options, now, stream=stream, final=True))
        return self._enqueue(jobs)

    # -- cancel -------------------------------------------------------------------------------
    def _cancel(self, message: CancelMessage) -> Outcome:
        if message.context_id is not None:
            return self._cancel_stream(message.context_id)
        current = self.current
        rid = message.request_id
        if current is not None and not current.cancelled and rid in (None, current.request_id):
            if current.stream is not None:
                return self._cancel_stream(current.stream.context_id)
            current.cancelled = True
            return Outcome(cancel_current=True)
        for job in self.pending:
            if rid is not None and job.request_id == rid and job.stream is None:
                self.pending.remove(job)
                return Outcome([done_event(rid, cancelled=True, audio_ms=0)], dropped=[job])
        # Nothing to cancel (it may have just finished): barge-in races are normal, so no error.
        return Outcome()

    def _cancel_stream(self, context_id: str) -> Outcome:
        stream = self.streams.pop(context_id, None)
        queued = [j for j in self.pending if j.stream is not None and j.stream.context_id == context_id]
        for job in queued:
            self.pending.remove(job)
        if stream is None and queued:
            stream = queued[0].stream
        current = self.current
        outcome = Outcome()
        if current is not None and current.stream is not None and current.stream.context_id == context_id:
            current.cancelled = True
            stream = current.stream
            outcome.cancel_current = True
        if stream is not None:
            outcome.events.append(done_event(stream.options.request_id, context_id=context_id, cancelled=True))
            if not outcome.cancel_current:
                outcome.dropped.append(stream)
        return outcome

    def next_job(self) -> Job | None:
        """The next job to stream, which becomes :attr:`current`."""
        self.current = self.pending.popleft() if self.pending else None
        return self.current

    def finish(self) -> None:
        self.current = None


def failure_event(error: CsmServeError, request_id: str | None) -> dict:
    public = error.to_dict()
    return error_event(public["code"], public["message"], request_id)
