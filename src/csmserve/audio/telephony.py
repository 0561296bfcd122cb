"""Telephony framing: µ-law 8 kHz bytes to whole 20 ms frames, wrapped as Twilio or Telnyx messages.

No sockets here: a framer takes the bytes of :class:`csmserve.audio.formats.G711Encoder` (any
sizes) and returns the JSON text messages to send, in order, on the provider's WebSocket.

Messages sent for playback into a call (bidirectional streams only):

Twilio Media Streams, https://www.twilio.com/docs/voice/media-streams/websocket-messages
("WebSocket messages to Twilio"); payload is base64 of raw audio/x-mulaw at 8000 Hz, no header::

    {"event": "media", "streamSid": "MZ...", "media": {"payload": "<base64>"}}
    {"event": "mark", "streamSid": "MZ...", "mark": {"name": "<name>"}}
    {"event": "clear", "streamSid": "MZ..."}

Telnyx media streaming, https://developers.telnyx.com/api-reference/websockets/stream-call-media-over-websocket
and https://developers.telnyx.com/docs/voice/programmable-voice/media-streaming; the call must
have been started with ``stream_bidirectional_mode: "rtp"`` and ``stream_bidirectional_codec:
"PCMU"`` (the default codec). The payload is a base64 RTP *payload* (codec bytes, no RTP header)
of 20 ms to 30 s of audio. Outbound frames carry no ``stream_id`` (only Telnyx's own frames do,
and pipecat's Telnyx serializer sends none either)::

    {"event": "media", "media": {"payload": "<base64>"}}
    {"event": "mark", "mark": {"name": "<name>"}}
    {"event": "clear"}

Both providers echo a mark back once the audio sent before it has played, and answer ``clear`` by
dropping queued audio (barge-in); Telnyx also returns the queued marks then.

Frames per message: one 20 ms frame (160 bytes) per message by default, the lowest latency and
what both providers send themselves; ``frames_per_message`` allows up to N frames in a message,
but a framer never waits for more bytes to fill one: it sends the whole frames it has.
"""

from __future__ import annotations

import base64
import json

from csmserve.audio.g711 import ULAW_SILENCE

FRAME_MS = 20
FRAME_BYTES = 160  # 20 ms of 8 kHz G.711, one byte per sample


class FrameAligner:
    """Cuts a byte stream into whole frames of ``frame_bytes``, carrying the remainder over.

    Nothing is lost or reordered; :meth:`flush` pads the last partial frame with ``silence``.
    """

    def __init__(self, frame_bytes: int = FRAME_BYTES, silence: int = ULAW_SILENCE):
        self.frame_bytes = frame_bytes
        self._silence = bytes([silence])
        self._pending = bytearray()

    def push(self, data: bytes) -> list[bytes]:
        """Whole frames completed by ``data`` (possibly none)."""
        self._pending += data
        whole = len(self._pending) - len(self._pending) % self.frame_bytes
        frames = [bytes(self._pending[i : i + self.frame_bytes]) for i in range(0, whole, self.frame_bytes)]
        del self._pending[:whole]
        return frames

    def flush(self) -> list[bytes]:
        """The remainder as one frame padded with silence at its end, or no frame if none is left."""
        if not self._pending:
            return []
        frame = bytes(self._pending) + self._silence * (self.frame_bytes - len(self._pending))
        self._pending.clear()
        return [frame]

    def discard(self) -> None:
        """Drop the remainder (barge-in: the rest of the utterance will not be played)."""
        self._pending.clear()


class CallFramer:
    """µ-law 8 kHz bytes in, provider JSON messages out; subclasses say how a message looks.

    Use one per call stream: :meth:`media` while audio streams, :meth:`end` after each utterance
    (pads its last frame and marks it), :meth:`clear` to interrupt.
    """

    def __init__(self, frames_per_message: int = 1):
        if frames_per_message < 1:
            raise ValueError("frames_per_message must be at least 1")
        self.frames_per_message = frames_per_message
        self._aligner = FrameAligner()

    def media(self, mulaw: bytes) -> list[str]:
        """Media messages for every whole 20 ms frame available, each of at most frames_per_message."""
        return self._media_messages(self._aligner.push(mulaw))

    def end(self, mark_name: str | None = None) -> list[str]:
        """The last (silence-padded) frame, then a mark named ``mark_name`` if one is given."""
        messages = self._media_messages(self._aligner.flush())
        if mark_name is not None:
            messages.append(_dumps(self._mark(mark_name)))
        return messages

    def clear(self) -> str:
        """The message that stops playback and drops queued audio; the held-back remainder goes too."""
        self._aligner.discard()
        return _dumps(self._clear())

    def _media_messages(self, frames: list[bytes]) -> list[str]:
        n = self.frames_per_message
        payloads = (b"".join(frames[i : i + n]) for i in range(0, len(frames), n))
        return [_dumps(self._media(base64.b64encode(p).decode("ascii"))) for p in payloads]

    def _media(self, payload: str) -> dict:
        raise NotImplementedError

    def _mark(self, name: str) -> dict:
        raise NotImplementedError

    def _clear(self) -> dict:
        raise NotImplementedError


class TwilioFramer(CallFramer):
    """Twilio Media Streams messages for the stream ``stream_sid`` (the start message's streamSid)."""

    def __init__(self, stream_sid: str, frames_per_message: int = 1):
        super().__init__(frames_per_message)
        self.stream_sid = stream_sid

    def _media(self, payload: str) -> dict:
        return {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}

    def _mark(self, name: str) -> dict:
        return {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}

    def _clear(self) -> dict:
        return {"event": "clear", "streamSid": self.stream_sid}


class TelnyxFramer(CallFramer):
    """Telnyx bidirectional (RTP mode, PCMU) media streaming messages."""

    def _media(self, payload: str) -> dict:
        return {"event": "media", "media": {"payload": payload}}

    def _mark(self, name: str) -> dict:
        return {"event": "mark", "mark": {"name": name}}

    def _clear(self) -> dict:
        return {"event": "clear"}


def _dumps(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"))
