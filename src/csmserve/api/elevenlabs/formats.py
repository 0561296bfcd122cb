"""ElevenLabs ``output_format`` names: ``codec_samplerate[_bitrate]`` to a streaming encoder.

``pcm_<rate>`` is raw signed 16-bit little-endian mono PCM (8000, 16000, 22050, 24000, 44100, 48000 Hz),
``ulaw_8000``/``alaw_8000`` G.711 at 8 kHz, ``mp3_<rate>_<kbps>`` a bare MPEG audio stream (libmp3lame).
Every encoder takes float32 at 24 kHz (what the engine makes) and resamples as it streams.
"""

from __future__ import annotations

from dataclasses import dataclass

from csmserve.audio.containers import CODEC_FORMATS, CodecStreamEncoder
from csmserve.audio.formats import PCM_RATES, AudioEncoder, make_encoder
from csmserve.errors import InvalidRequest
from csmserve.speech import AudioSink, StreamStats
from csmserve.speech.sink import InChunks

#: ElevenLabs' own default (its documentation's default for every endpoint).
DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"
MP3_FORMATS = ("mp3_22050_32", "mp3_24000_48", "mp3_44100_32", "mp3_44100_64", "mp3_44100_96", "mp3_44100_128", "mp3_44100_192")
OUTPUT_FORMATS = (*(f"pcm_{rate}" for rate in PCM_RATES), "ulaw_8000", "alaw_8000", *MP3_FORMATS)


@dataclass(frozen=True)
class OutputFormat:
    """One parsed ``output_format``: ``codec`` is pcm, mulaw, alaw or mp3; ``bit_rate`` in bit/s (mp3)."""

    name: str
    codec: str
    sample_rate: int
    bit_rate: int | None = None

    @property
    def bytes_per_sample(self) -> int | None:
        """2 for PCM, 1 for G.711; None for mp3 (compressed)."""
        return {"pcm": 2, "mulaw": 1, "alaw": 1}.get(self.codec)

    def ms_of(self, size: int) -> float:
        """Milliseconds of audio in ``size`` bytes of this format (mp3: at its constant bit rate)."""
        if self.bytes_per_sample is not None:
            return 1000 * size / (self.bytes_per_sample * self.sample_rate)
        return 8000 * size / (self.bit_rate or 128_000)

    def encoder(self) -> AudioEncoder:
        """A new streaming encoder for one audio stream in this format."""
        if self.codec == "mp3":
            return CodecStreamEncoder(CODEC_FORMATS["mp3"], self.sample_rate, self.bit_rate)
        return make_encoder("pcm_s16le" if self.codec == "pcm" else self.codec, self.sample_rate)

    @property
    def media_type(self) -> str:
        return {"pcm": "audio/pcm", "mulaw": "audio/basic", "alaw": "audio/basic"}.get(self.codec, "audio/mpeg")


def parse_output_format(name: str | None) -> OutputFormat:
    """The format ``name`` stands for (None: the default); :class:`InvalidRequest` lists the valid ones."""
    name = DEFAULT_OUTPUT_FORMAT if name is None else name
    if name not in OUTPUT_FORMATS:
        raise InvalidRequest(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {name[:40]!r}")
    codec, rate, *rest = name.split("_")
    codec = {"ulaw": "mulaw"}.get(codec, codec)
    return OutputFormat(name, codec, int(rate), int(rest[0]) * 1000 if rest else None)


def output_sink(output: OutputFormat, stats: StreamStats, chunk_ms: int = 200) -> AudioSink:
    """One stream's encoded audio, cut into chunks of ``chunk_ms`` (whole samples for PCM and G.711).

    :meth:`AudioSink.cut` releases the partial chunk held back (at a sentence end, so that the
    sentence's last audio goes out with its alignment); the encoder's state carries on, so the bytes
    of all chunks together are the same whatever the cuts.
    """
    width = output.bytes_per_sample
    per_second = output.sample_rate * width if width else (output.bit_rate or 128_000) // 8
    size = max(1, per_second * chunk_ms // 1000)
    return AudioSink(output.encoder(), stats, InChunks(size - size % width if width else size))
