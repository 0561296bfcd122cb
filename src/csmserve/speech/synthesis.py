"""From a :class:`~csmserve.speech.request.SpeechRequest` to what the client receives.

:class:`Speech` is the only caller of ``Engine.synthesize``: it resolves the request's voice (the
server's default voice when the request names none; a voice added without a model is encoded here,
once, the first time it is needed) and context into the engine's request, derives the audio budget
from the text, and feeds the engine's audio into the stream's :class:`~csmserve.speech.sink.AudioSink`.
Text that arrives sentence by sentence (an LLM's output) is spoken through a :class:`SentenceStream`,
one continuous voice. Admission, deadlines and sockets are the caller's (``csmserve.server``).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator

import anyio.to_thread
import numpy as np

from csmserve.audio.decode import decode_clip
from csmserve.config import Settings
from csmserve.engine import ContextTurn, Continuation, Engine, SynthesisRequest
from csmserve.errors import InvalidRequest, NotReady, VoiceUnavailable
from csmserve.speech.request import SpeechRequest
from csmserve.speech.sink import AudioSink, Outgoing, StreamStats
from csmserve.speech.voices import DEFAULT, VaryingVoiceWarning, VoiceBook, voice_turn
from csmserve.voices import CLIP_RATE, Voice

log = logging.getLogger(__name__)


class Speech:
    """Speaks requests on ``engine``, in the ``voices`` of the book, within ``settings``' budgets."""

    def __init__(self, engine: Engine, settings: Settings, voices: VoiceBook):
        self.engine = engine
        self.settings = settings
        self.voices = voices
        self.warn_varying = VaryingVoiceWarning()
        self._encoding = asyncio.Lock()  # voices are encoded one at a time (rarely: once per voice)

    @property
    def sample_rate(self) -> int:
        """The rate of the engine's audio, in Hz (what sinks are fed)."""
        return self.engine.sample_rate

    def stats(self, started: float | None = None) -> StreamStats:
        """Figures for a new stream (``started``: when its request arrived; default now)."""
        if started is None:
            return StreamStats(self.sample_rate)
        return StreamStats(self.sample_rate, started=started)

    async def voice_of(self, request: SpeechRequest) -> Voice | None:
        """The registered voice ``request`` speaks in, encoded: the one it names, or the default voice
        when it names neither a voice nor a speaker id; None: a bare speaker id. Raises
        :class:`~csmserve.errors.InvalidRequest` (an unknown voice) or
        :class:`~csmserve.errors.VoiceUnavailable` (the configuration names one that is not registered)."""
        if request.voice is not None:
            voice = self.voices.resolve(request.voice)
        elif request.speaker_id is None and self.voices.default is not None:
            voice = self.voices.resolve(DEFAULT)
        else:
            return None
        return await self.encoded(voice) if voice.pending else voice

    async def encoded(self, voice: Voice) -> Voice:
        """``voice`` with its codes: a pending voice's clip is encoded with the engine's codec, once, and
        the codes stored for every process that shares the voices. Safe to cancel (the codes are
        stored only whole)."""
        async with self._encoding:
            current = self.voices.store.current(voice)
            if current is None:
                raise InvalidRequest(f"voice {voice.name!r} was deleted; list voices with GET /v1/voices", "voice")
            if not current.pending:
                return current
            if not self.engine.info.ready:
                raise NotReady()
            clip = await anyio.to_thread.run_sync(self._read_clip, current)
            codes = await self.engine.encode(clip)
            stored = self.voices.store.set_codes(current.id, codes)
            if stored is None:
                raise InvalidRequest(f"voice {voice.name!r} was deleted; list voices with GET /v1/voices", "voice")
            log.info("encoded voice %r (%s): %d frames", stored.name, stored.id, stored.frames)
            return stored

    def _read_clip(self, voice: Voice) -> np.ndarray:
        path = self.voices.store.clip_path(voice.id)
        try:
            data = path.read_bytes()
            return decode_clip(data, self.sample_rate, self.settings.max_voice_seconds, max_rate=CLIP_RATE)
        except (OSError, InvalidRequest) as exc:
            message = exc.message if isinstance(exc, InvalidRequest) else str(exc)
            raise VoiceUnavailable(f"voice {voice.name!r}: its clip {path.name} cannot be read: {message}") from None

    def engine_request(
        self, request: SpeechRequest, voice: Voice | None = None, continuation: Continuation | None = None
    ) -> SynthesisRequest:
        """The engine's view of ``request`` in ``voice`` (encoded; :meth:`voice_of`): audio budget
        derived from the text, voice and context resolved. Without a voice, on a real model, the log
        says once per connection that the voice will vary."""
        budget = self.settings.audio_budget_ms(request.text)
        if request.max_audio_ms is not None:
            budget = min(request.max_audio_ms, self.settings.max_audio_ms)
        speaker_id = request.speaker_id
        if speaker_id is None:
            speaker_id = voice.speaker_id if voice is not None else 0
        turns = (voice_turn(voice, self.voices),) if voice is not None else ()
        context = tuple(
            ContextTurn(
                turn.speaker_id,
                turn.text,
                audio=None if turn.audio is None else np.frombuffer(turn.audio, dtype="<i2").astype(np.float32) / 32768.0,
            )
            for turn in request.context
        )
        if not turns and not any(turn.audio is not None for turn in context) and not self.engine.info.offline_model:
            self.warn_varying(speaker_id, request.request_id)
        return SynthesisRequest(
            text=request.text,
            speaker_id=speaker_id,
            max_audio_ms=budget,
            temperature=request.temperature,
            top_k=request.top_k,
            seed=request.seed,
            request_id=request.request_id,
            voice=turns,
            context=context,
            continuation=continuation,
            tenant=request.tenant,
        )

    async def stream(
        self, request: SpeechRequest, sink: AudioSink, *, finish: bool = True, continuation: Continuation | None = None
    ) -> AsyncIterator[Outgoing]:
        """What ``sink`` makes of the engine's audio for ``request``, as it is generated; ``finish``
        flushes the sink at the end (a sentence of a stream leaves it open for the next). Raises
        :class:`~csmserve.errors.CsmServeError` (unknown voice, not ready, overloaded, failed). Safe
        to cancel: closing the iterator (or cancelling its consumer) stops generation between two frames."""
        voice = await self.voice_of(request)
        audio = self.engine.synthesize(self.engine_request(request, voice, continuation))
        try:
            async for piece in audio:
                for item in sink.feed(piece):
                    yield item
            if finish:
                for item in sink.finish():
                    yield item
        finally:
            await audio.aclose()

    def sentences(self, sink: AudioSink) -> SentenceStream:
        """A new stream of sentences into ``sink``."""
        return SentenceStream(self, sink)


class SentenceStream:
    """One audio stream spoken sentence by sentence, as one continuous voice.

    Each sentence is a request of its own; between them the engine's :class:`Continuation` carries the
    previous sentence (as context) and the codec's state, and the sink carries the encoder's, so the
    sentences join without a seam. Owns both; one per stream; not thread-safe.
    """

    def __init__(self, speech: Speech, sink: AudioSink):
        self.speech = speech
        self.sink = sink
        self.continuation = Continuation()
        # The engine keeps what the stream carries until told it ended (or, at the latest, until it
        # forgets the least recently used): tell it when this stream goes, however it goes.
        self._release = weakref.finalize(self, speech.engine.release, self.continuation)

    @property
    def stats(self) -> StreamStats:
        return self.sink.stats

    def speak(self, request: SpeechRequest) -> AsyncIterator[Outgoing]:
        """The outgoing items of one sentence (the stream stays open); see :meth:`Speech.stream`."""
        return self.speech.stream(request, self.sink, finish=False, continuation=self.continuation)

    def cut(self) -> list[Outgoing]:
        """What the sink holds back, released at a sentence end."""
        return self.sink.cut()

    def finish(self) -> list[Outgoing]:
        """The end of the stream: what the sink still holds. The engine forgets the stream's state."""
        self._release()
        return self.sink.finish()
