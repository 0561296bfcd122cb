"""One Wyoming connection's logic, without sockets: events in, replies and jobs out.

* ``describe``: ``info`` at once (and ``ping``: ``pong``); other events a server does not handle are
  dropped, as Wyoming servers do (``select-program``, audio a client should not send).
* ``synthesize``: one :class:`Utterance`, answered ``audio-start``, ``audio-chunk``s, ``audio-stop``.
* ``synthesize-start`` opens a :class:`TextStream`; each ``synthesize-chunk`` adds text, and every sentence
  it completes becomes a :class:`Sentence` job (spoken as one continuous voice); ``synthesize-stop``
  speaks the rest and ends the stream (:class:`StreamEnd`: ``audio-stop``, then ``synthesize-stopped``).
  Home Assistant also sends the whole text as a ``synthesize`` inside the stream, for servers that do not
  stream: that one is ignored.
* A bad event becomes a :class:`Failure` job, answered in order with Wyoming's ``error``, after which the
  connection closes (a Wyoming client that gets an error stops waiting for audio when the socket ends).

Jobs run one after another, in order (the adapter's send loop). :meth:`WyomingSession.handle` never raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wyoming.event import Event
from wyoming.info import Describe
from wyoming.ping import Ping, Pong
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from csmserve.api.wyoming.messages import (
    AudioOut,
    ChunkData,
    StartData,
    SynthesizeData,
    check_text,
    info_event,
    parse,
    speech_request,
    voice_label,
    voice_of,
)
from csmserve.config import Settings
from csmserve.errors import CsmServeError, InvalidRequest
from csmserve.speech import SentenceStream, SpeechRequest
from csmserve.speech.voices import VoiceBook, VoiceChoice
from csmserve.text.sentences import SentenceBuffer


@dataclass(eq=False)
class Utterance:
    """A ``synthesize``: one request, one audio stream."""

    request: SpeechRequest
    voice: str
    out: AudioOut = field(default_factory=AudioOut)
    #: The adapter's: the access line, whether the request's outcome was counted.
    access: Any = None
    ended: bool = False


@dataclass(eq=False)
class TextStream:
    """``synthesize-start`` ... ``synthesize-stop``: sentences spoken as one audio stream."""

    choice: VoiceChoice
    voice: str
    request_id: str
    buffer: SentenceBuffer = field(default_factory=SentenceBuffer)
    #: Characters received (bounded by ``max_stream_chars``).
    chars: int = 0
    out: AudioOut = field(default_factory=AudioOut)
    #: The adapter's: the engine side of the stream (set when its first sentence is spoken), the
    #: access line, whether the outcome was counted.
    speech: SentenceStream | None = None
    access: Any = None
    ended: bool = False

    def request(self, text: str) -> SpeechRequest:
        return speech_request(self.choice, text, self.request_id)


@dataclass(eq=False)
class Sentence:
    stream: TextStream
    text: str


@dataclass(eq=False)
class StreamEnd:
    stream: TextStream


@dataclass(eq=False)
class Failure:
    """A bad event: answered with ``error``, then the connection closes. ``stream``: the text stream it
    ends (one was open)."""

    error: CsmServeError
    stream: TextStream | None = None


Job = Utterance | Sentence | StreamEnd | Failure


@dataclass
class Actions:
    """What to do with one event: send ``replies`` now; queue ``jobs`` behind those queued already."""

    replies: list[Event] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)


class WyomingSession:
    """The events of one connection. ``new_id()`` names each request (the log's request id)."""

    def __init__(self, voices: VoiceBook, settings: Settings, new_id: Callable[[], str]):
        self.voices = voices
        self.settings = settings
        self.new_id = new_id
        #: The text stream open now (between synthesize-start and synthesize-stop).
        self.stream: TextStream | None = None
        #: A failure was queued: the connection is closing, later events are not read.
        self.failed = False

    def handle(self, event: Event) -> Actions:
        """Process one event. Never raises: a bad one becomes a :class:`Failure` job."""
        if self.failed:
            return Actions()
        kind = event.type
        if Describe.is_type(kind):
            return Actions(replies=[info_event(self.voices, self.settings)])
        if Ping.is_type(kind):
            text = (event.data or {}).get("text")
            return Actions(replies=[Pong(text=text if isinstance(text, str) else None).event()])
        try:
            if Synthesize.is_type(kind):
                return self._synthesize(event)
            if SynthesizeStart.is_type(kind):
                return self._start(event)
            if SynthesizeChunk.is_type(kind):
                return self._chunk(event)
            if SynthesizeStop.is_type(kind):
                return self._stop()
        except CsmServeError as exc:
            self.failed = True
            stream, self.stream = self.stream, None
            return Actions(jobs=[Failure(exc, stream)])
        return Actions()

    def _synthesize(self, event: Event) -> Actions:
        if self.stream is not None:
            return Actions()  # Home Assistant's copy of the streamed text, for servers that do not stream
        data = parse(SynthesizeData, event)
        choice = voice_of(data.voice, self.voices, self.settings)
        text = check_text(data.text, self.settings)
        return Actions(jobs=[Utterance(speech_request(choice, text, self.new_id()), voice_label(choice))])

    def _start(self, event: Event) -> Actions:
        if self.stream is not None:
            raise InvalidRequest("synthesize-start while a stream is open: end it with synthesize-stop first")
        choice = voice_of(parse(StartData, event).voice, self.voices, self.settings)
        self.stream = TextStream(choice, voice_label(choice), self.new_id())
        return Actions()

    def _chunk(self, event: Event) -> Actions:
        stream = self.stream
        if stream is None:
            raise InvalidRequest("synthesize-chunk outside a stream: send synthesize-start first")
        text = parse(ChunkData, event).text
        if stream.chars + len(text) > self.settings.max_stream_chars:
            raise InvalidRequest(
                f"a stream carries at most {self.settings.max_stream_chars} characters; stop it and start another"
            )
        stream.chars += len(text)
        sentences = stream.buffer.push(text)
        if stream.buffer.pending_chars > self.settings.max_text_chars:
            # No sentence end in sight: speak what there is, so the buffer (re-read per chunk) stays bounded.
            sentences += stream.buffer.flush()
        return Actions(jobs=[Sentence(stream, s) for s in sentences])

    def _stop(self) -> Actions:
        stream = self.stream
        if stream is None:
            raise InvalidRequest("synthesize-stop outside a stream: send synthesize-start first")
        self.stream = None
        return Actions(jobs=[*(Sentence(stream, s) for s in stream.buffer.flush()), StreamEnd(stream)])
