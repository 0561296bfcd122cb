"""Speech: the layer every API speaks through, below the APIs and above the engine.

One neutral request (:mod:`.request`) that each API translates its messages into; voice resolution
(:mod:`.voices`); the stream's sink and figures (:mod:`.sink`); and :class:`~.synthesis.Speech`, the
only caller of ``Engine.synthesize``, with the sentence-stream helper. Never imports torch.
"""

from csmserve.speech.request import SpeechRequest, Turn
from csmserve.speech.sink import AudioSink, Outgoing, StreamStats
from csmserve.speech.synthesis import SentenceStream, Speech

__all__ = ["AudioSink", "Outgoing", "SentenceStream", "Speech", "SpeechRequest", "StreamStats", "Turn"]
