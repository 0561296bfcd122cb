"""From a :class:`~csmserve.speech.request.SpeechRequest` to what the client receives.

:class:`Speech` is the only caller of ``Engine.synthesize``: it resolves the request's voice and
context into the engine's request, derives the audio budget from the text, and feeds the engine's
audio into the stream's :class:`~csmserve.speech.sink.AudioSink`. Text that arrives sentence by
sentence (an LLM's output) is spoken through a :class:`SentenceStream`, one continuous voice.
Admission, deadlines and sockets are the caller's (``csmserve.server``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from csmserve.config import Settings
from csmserve.engine import ContextTurn, Continuation, Engine, SynthesisRequest
from csmserve.speech.request import SpeechRequest
from csmserve.speech.sink import AudioSink, Outgoing, StreamStats
from csmserve.speech.voices import voice_turns
from csmserve.voices import VoiceStore


class Speech:
    """Speaks requests on ``engine``, with the registered ``voices``, within ``settings``' budgets."""

    def __init__(self, engine: Engine, settings: Settings, voices: VoiceStore):
        self.engine = engine
        self.settings = settings
        self.voices = voices

    @property
    def sample_rate(self) -> int:
        """The rate of the engine's audio, in Hz (what sinks are fed)."""
        return self.engine.sample_rate

    def stats(self, started: float | None = None) -> StreamStats:
        """Figures for a new stream (``started``: when its request arrived; default now)."""
        if started is None:
            return StreamStats(self.sample_rate)
        return StreamStats(self.sample_rate, started=started)

    def engine_request(self, request: SpeechRequest, continuation: Continuation | None = None) -> SynthesisRequest:
        """The engine's view of ``request``: audio budget derived from the text, voice and context
        resolved. Raises :class:`~csmserve.errors.InvalidRequest` for a voice that is not registered."""
        budget = self.settings.audio_budget_ms(request.text)
        if request.max_audio_ms is not None:
            budget = min(request.max_audio_ms, self.settings.max_audio_ms)
        voice_speaker, voice = voice_turns(request.voice, self.voices)
        speaker_id = request.speaker_id
        if speaker_id is None:
            speaker_id = voice_speaker if voice_speaker is not None else 0
        context = tuple(
            ContextTurn(
                turn.speaker_id,
                turn.text,
                audio=None if turn.audio is None else np.frombuffer(turn.audio, dtype="<i2").astype(np.float32) / 32768.0,
            )
            for turn in request.context
        )
        return SynthesisRequest(
            text=request.text,
            speaker_id=speaker_id,
            max_audio_ms=budget,
            temperature=request.temperature,
            top_k=request.top_k,
            seed=request.seed,
            request_id=request.request_id,
            voice=voice,
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
        audio = self.engine.synthesize(self.engine_request(request, continuation))
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
        """The end of the stream: what the sink still holds."""
        return self.sink.finish()
