"""Every route that streams generated audio, and raw-socket clients that misbehave on them.

Hostile-client tests (tests/integration/test_fuzz.py) and the load script (bench/load.py) iterate
over :data:`STREAMING_ROUTES`: a new streaming route is added here once and inherits every
slow/abandoned/hostile client case.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class StreamingRoute:
    """``endpoint`` is the route's label in ``csm_requests_total``."""

    name: str
    path: str
    endpoint: str
    #: Whether audio goes out as it is generated (False: the whole file at the end).
    streams: bool = True
    #: A WebSocket route (else HTTP POST).
    websocket: bool = False
    #: Fields added to the request (HTTP body, or the WebSocket message that asks for audio).
    fields: tuple[tuple[str, object], ...] = ()

    def smallest(self) -> StreamingRoute:
        """The same route asking for its fewest bytes per second of audio: 8 kHz mu-law (1 byte a sample),
        or, on OpenAI's route that has no G.711, Opus. The fewer the bytes, the more audio fits in the
        sockets' buffers, so pacing has to measure in audio, not bytes."""
        if self.endpoint == "openai":
            return replace(self, name=self.name + "-opus", fields=(("response_format", "opus"),))
        if self.endpoint == "elevenlabs":
            return replace(self, name=self.name + "-ulaw", path=self.path.replace("pcm_24000", "ulaw_8000"))
        return replace(self, name=self.name + "-mulaw", fields=(("format", "mulaw"), ("sample_rate", 8000)))

    def body(self, text: str, request_id: str) -> dict:
        """The request (HTTP) or the message that asks for ``text`` (WebSocket; ElevenLabs: the flushed text)."""
        if self.endpoint == "openai":
            # "stream" chooses a stream or a whole file (a client that says nothing gets the file).
            body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "pcm", "stream": self.streams}
        elif self.endpoint == "elevenlabs":
            # HTTP: the request id comes as X-Request-Id; WebSocket: the context id is the request id.
            body = {"text": text, "context_id": request_id, "flush": True} if self.websocket else {"text": text}
        else:
            body = {"text": text, "request_id": request_id}
        return {**body, **dict(self.fields)}

    def messages(self, text: str, request_id: str) -> list[dict]:
        """What a WebSocket client sends: ElevenLabs' multi-stream-input opens its context first."""
        if self.endpoint == "elevenlabs":
            return [{"text": " ", "context_id": request_id}, self.body(text, request_id)]
        return [self.body(text, request_id)]

    def overloaded_code(self, answer: dict) -> str | None:
        """The error code of a 429's JSON body, in the route's own error shape."""
        if self.endpoint == "elevenlabs":
            return "overloaded" if answer["detail"]["status"] == "too_many_concurrent_requests" else None
        return answer["error"]["code"]

    def open(
        self, port: int, text: str, request_id: str, rcvbuf: int = 4096, api_key: str | None = None
    ) -> socket.socket:
        """Send one request over a raw socket with a small receive buffer (``api_key``: as a Bearer token),
        and read nothing."""
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)  # a test fails, never hangs, on a server that does not answer
        sock.connect(("127.0.0.1", port))
        if self.websocket:
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(
                f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Upgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            answer = b""
            while b"\r\n\r\n" not in answer:  # the handshake's answer, as any client reads it
                data = sock.recv(1)
                if not data:
                    raise ConnectionError(f"handshake refused: {answer!r}")
                answer += data
            for message in self.messages(text, request_id):
                sock.sendall(masked_text_frame(json.dumps(message).encode()))
        else:
            payload = json.dumps(self.body(text, request_id)).encode()
            sock.sendall(
                f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Content-Type: application/json\r\n"
                f"X-Request-Id: {request_id}\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
            )
        return sock


def masked_text_frame(payload: bytes) -> bytes:
    """One client-to-server WebSocket text frame (clients must mask)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes([0x81, 0x80 | length])
    elif length < 1 << 16:
        header = bytes([0x81, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([0x81, 0x80 | 127]) + length.to_bytes(8, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


ELEVENLABS_TTS = "/v1/text-to-speech/0"  # speaker 0; raw PCM keeps the byte counts plain

STREAMING_ROUTES = (
    StreamingRoute("websocket", "/ws/generate", "ws", websocket=True),
    StreamingRoute("rest", "/generate", "rest", streams=False),
    StreamingRoute("openai", "/v1/audio/speech", "openai"),
    StreamingRoute("openai-file", "/v1/audio/speech", "openai", streams=False),
    StreamingRoute("elevenlabs-stream", ELEVENLABS_TTS + "/stream?output_format=pcm_24000", "elevenlabs"),
    StreamingRoute("elevenlabs-file", ELEVENLABS_TTS + "?output_format=pcm_24000", "elevenlabs", streams=False),
    StreamingRoute(
        "elevenlabs-multi-stream-input", ELEVENLABS_TTS + "/multi-stream-input?output_format=pcm_24000",
        "elevenlabs", websocket=True,
    ),
)


def counter(metrics_text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in ``/metrics`` text (0 when absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in metrics_text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
