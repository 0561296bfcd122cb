"""ElevenLabs' text-to-speech WebSockets: ``multi-stream-input`` (contexts) and ``stream-input`` (one).

A receive loop feeds frames to :class:`~csmserve.api.elevenlabs.session.ContextSession`; each context
has a :class:`ContextRunner` task that speaks its sentences in order as one continuous stream (a
:class:`~csmserve.speech.SentenceStream`: the previous sentence as context, the codec state carried),
so contexts on one socket generate concurrently. Each sentence is normalised on its own (numbers,
dates, symbols as words) unless ``apply_text_normalization=off``, and every audio message carries the
characters it speaks (:mod:`.alignment`). Barge-in cancels a runner's current generation, which stops
the engine before its next frame.

The rules of ``/ws/generate`` apply, from the same code (:mod:`csmserve.server.ws`): Origin and key
checks (``admit``; the key may also come as the ``xi-api-key`` header, the ``authorization`` query
parameter or the first message's ``xi_api_key``); a socket without one must send it in its first
frame, by ``auth_timeout_s`` after accept, before the voice is looked up, and at most
``max_unauthenticated`` wait; one admission slot per generating
sentence (``Admission.enter``/``leave``; refused: an error and close 1013); the lag-limited send (a
client that stops reading is cut and its generation cancelled); the message size limit in bytes; the
request deadline; ``max_stream_chars`` per context and at most ``max_contexts_per_connection``
contexts open at once (and never more than ElevenLabs' 5). Disconnecting cancels every context; each
one that was still speaking counts as ``disconnected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from typing import NoReturn

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from csmserve.api.elevenlabs.alignment import Aligned, StreamAligner
from csmserve.api.elevenlabs.formats import output_sink
from csmserve.api.elevenlabs.messages import (
    StreamSettings,
    audio_message,
    error_message,
    final_message,
    key_of,
    key_of_authorization,
    parse_query,
    speech_request,
)
from csmserve.api.elevenlabs.session import Actions, Context, ContextSession
from csmserve.api.elevenlabs.text import ws_alignment
from csmserve.api.elevenlabs.voices import voice_not_found, voice_of
from csmserve.errors import CsmServeError, GenerationFailed, InvalidRequest, MessageTooLarge, Overloaded, Unauthorized
from csmserve.logs import clean_id
from csmserve.logs import request_id as current_request_id
from csmserve.server.access import AccessLine
from csmserve.server.deadline import deadline
from csmserve.server.state import ServerState, state_of
from csmserve.server.streaming import outcome_of
from csmserve.server.ws import NORMAL, POLICY_VIOLATION, CloseConnection, Socket, accept, wait_for_child
from csmserve.speech import SentenceStream
from csmserve.speech.voices import VoiceChoice
from csmserve.text.normalize import Normalized, normalize_for_speech

log = logging.getLogger(__name__)
router = APIRouter()
ENDPOINT = "elevenlabs"
#: ElevenLabs' code in an error about one context's generation (the socket stays open).
GENERATION_ERROR = 1011


class ContextRunner:
    """Speaks one context: its sentences in order, then its ``isFinal``. Not thread-safe."""

    def __init__(self, connection: ElevenLabsConnection, context: Context):
        self.connection = connection
        self.context = context
        self.pending: deque[str] = deque()
        self.wake = asyncio.Event()
        self.ending = False
        self.stopped = False
        #: The context's outcome once counted in the requests metric (once per context).
        self.counted: str | None = None
        #: The characters each audio message speaks (set when the context starts speaking).
        self.aligner: StreamAligner | None = None
        self.speaking: asyncio.Task | None = None
        voice = connection.voice.voice or str(connection.voice.speaker_id)
        self.access = AccessLine(
            connection.route, connection.client, connection.socket.key_id, voice, request_id=context.id
        )
        self.task = asyncio.create_task(self.run())

    @property
    def context_id(self) -> str | None:
        return self.context.id if self.connection.session.multi else None

    def say(self, sentence: str) -> None:
        """Queue a sentence (the session bounds a context's text by ``max_stream_chars``)."""
        self.pending.append(sentence)
        self.wake.set()

    def busy(self) -> bool:
        return self.speaking is not None or bool(self.pending)

    def count(self, outcome: str) -> None:
        """Count the context's outcome in the requests metric, once (the first outcome wins)."""
        if self.counted is None:
            self.counted = outcome
            metrics = self.connection.state.metrics
            if outcome == "disconnected":
                metrics.disconnects.inc()
            metrics.finished(ENDPOINT, outcome)
            self.end_access(outcome)

    def end_access(self, outcome: str) -> None:
        """Write the context's access line (once: the first outcome wins)."""
        self.access.chars = self.context.chars
        self.access.end(outcome)

    def finish(self) -> None:
        """Speak what is queued, then end with ``isFinal``."""
        self.ending = True
        self.wake.set()

    def stop(self) -> None:
        """Barge-in: stop the current generation before its next frame, drop the queue, end."""
        self.stopped = self.ending = True
        self.pending.clear()
        if self.speaking is not None:
            self.speaking.cancel()
        self.wake.set()

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - a slow client or an overload ends the connection
            self.count("disconnected")  # cut for reading too slowly, or gone (an overload counted already)
            self.connection.socket.fail(exc)
        finally:
            self.connection.runners.discard(self)

    def message(self, audio: bytes, chars: Aligned | None = None) -> dict:
        """An audio message with the characters it speaks (ms from the start of its own audio)."""
        if chars is None:
            return audio_message(audio, self.context_id)
        written, spoken = ws_alignment(chars.written, chars.start_ms), ws_alignment(chars.spoken, chars.start_ms)
        return audio_message(audio, self.context_id, written, spoken)

    async def _run(self) -> None:
        conn = self.connection
        speech = conn.state.speech
        audio = speech.sentences(output_sink(conn.query.output, speech.stats(), conn.settings.default_chunk_ms))
        self.access.stats = audio.stats
        self.aligner = StreamAligner(conn.query.output)
        first = True
        while not self.stopped:
            if not self.pending:
                if self.ending:
                    break
                self.wake.clear()
                await self.wake.wait()
                continue
            sentence = self.pending.popleft()
            task = self.speaking = asyncio.create_task(self.speak(sentence, audio, first))
            try:
                await wait_for_child(task)
            finally:
                self.speaking = None
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
            first = False
        if not self.stopped:
            tail = b"".join(audio.finish())
            if tail:
                await conn.socket.send_json(self.message(tail, self.aligner.chunk(tail)), audio.stats)
        self.count("cancelled" if self.stopped else "ok")
        conn.session.ended(self.context)  # its audio has ended: it no longer counts toward the socket's limit
        await conn.socket.send_json(final_message(self.context_id))

    async def speak(self, sentence: str, audio: SentenceStream, first: bool) -> None:
        """Generate one sentence and send its audio, each chunk with the characters it speaks.
        A failure (the deadline too) is counted, then said to the client with the slot already free."""
        conn, state = self.connection, self.connection.state
        current_request_id.set(self.context.id)  # the log filter strips its control characters
        spoken = normalize_for_speech(sentence, conn.query.normalize)
        self.aligner.start(spoken if first else Normalized.unchanged(" ") + spoken)
        tenant = conn.socket.tenant
        try:
            state.admission.enter(ENDPOINT, tenant)
        except Overloaded as exc:
            self.count("rejected")
            await conn.refuse(exc, "overloaded", "too_many_concurrent_requests")
        failure: CsmServeError | None = None
        try:
            request = speech_request(
                conn.voice, spoken.text, seed=conn.query.seed, request_id=self.context.id, tenant=tenant
            )
            with deadline(conn.settings.request_timeout_s):
                async with contextlib.aclosing(audio.speak(request)) as chunks:
                    async for chunk in chunks:  # closed on any exit: the engine stops generating
                        await conn.socket.send_json(self.message(chunk, self.aligner.chunk(chunk)), audio.stats)
        except CsmServeError as exc:
            failure = exc
        except (CloseConnection, WebSocketDisconnect, OSError):
            raise  # the client is gone or cut: the runner counts it
        except Exception:  # noqa: BLE001 - one context's failure must not end the connection
            log.exception("context %s failed", clean_id(self.context.id))
            failure = GenerationFailed("generation failed")
        finally:
            state.admission.leave(tenant)
        if failure is not None:
            self.count(outcome_of(failure))
            log.warning("context %s failed: %s", clean_id(self.context.id), failure.message)
            message = error_message(failure.code, failure.to_dict()["message"], GENERATION_ERROR, self.context_id)
            await conn.socket.send_json(message)
            return
        cut = b"".join(audio.cut())
        await conn.socket.send_json(self.message(cut, self.aligner.chunk(cut, last=True)), audio.stats)


class ElevenLabsConnection:
    """One ElevenLabs WebSocket: its :class:`ContextSession` (contexts) and a runner per context, over
    the shared :class:`Socket` (lag-limited send, frame size check, the waiting room)."""

    def __init__(self, socket: Socket, query: StreamSettings, voice: VoiceChoice, multi: bool):
        self.socket = socket
        self.route = f"/v1/text-to-speech/{{voice_id}}/{'multi-stream-input' if multi else 'stream-input'}"
        client = socket.ws.client
        self.client = f"{client.host}:{client.port}" if client else None
        self.state: ServerState = socket.state
        self.settings = settings = socket.settings
        self.query = query
        self.voice = voice
        self.session = ContextSession(
            multi=multi, auto_mode=query.auto_mode, max_text_chars=settings.max_text_chars,
            max_stream_chars=settings.max_stream_chars, max_contexts=settings.max_contexts_per_connection,
        )
        self.runners: set[ContextRunner] = set()

    async def refuse(self, error: CsmServeError, reason: str, code: str | None = None) -> NoReturn:
        """Say why in ElevenLabs' shape (``code``: its error name, default the error's), then close
        with the code the error carries."""
        await self.socket.send_json(error_message(code or error.code, error.message, error.ws_close_code))
        raise CloseConnection.because(error, reason)

    def busy(self) -> bool:
        return any(r.busy() for r in self.runners)

    async def receive_message(self) -> dict:
        """The next frame; after ``inactivity_timeout`` s without one while nothing is being spoken,
        ElevenLabs' input_timeout_exceeded error and close 1008."""
        while True:
            message = await self.socket.receive(self.query.inactivity_timeout_s)
            if message is not None:
                return message
            if self.busy():
                continue
            timeout = self.query.inactivity_timeout_s
            await self.socket.send_json(
                error_message(
                    "input_timeout_exceeded",
                    f"Have not received a new text input within the timeout of {timeout:g} seconds. "
                    'Send text, or an empty-text keep-alive ({"text": ""}), in time; close_socket when done.',
                )
            )
            raise CloseConnection(POLICY_VIOLATION, "input timeout exceeded")

    async def receive_loop(self, first: str | bytes | None = None) -> None:
        """Handle ``first`` (the frame that carried the key, if the key came in one), then every frame."""
        if first is not None and await self.handle(first):
            return
        while True:
            message = await self.receive_message()
            if message["type"] == "websocket.disconnect":
                return  # serve() cancels the contexts and counts those still speaking
            try:
                raw = self.socket.payload(message)
            except MessageTooLarge as exc:
                await self.socket.send_json(error_message(exc.code, exc.message))
                continue
            if await self.handle(raw):
                return

    async def handle(self, raw: str | bytes) -> bool:
        """One frame; True once the socket is to close."""
        refusal = self.socket.refusal()
        if refusal is not None:
            await self.refuse(refusal, "draining")
        return await self.apply(self.session.handle(raw))

    async def apply(self, actions: Actions) -> bool:
        """Carry out ``actions``; True once the socket is to close (after every context ended)."""
        for event in actions.events:
            await self.socket.send_json(event)
        for context in actions.opened:
            context.runner = ContextRunner(self, context)
            self.runners.add(context.runner)
        for context, sentence in actions.speak:
            context.runner.say(sentence)
        for context in actions.finish:
            context.runner.finish()
        for context in actions.cancel:
            self.state.metrics.cancellations.inc()
            context.runner.stop()
        if not actions.close_socket:
            return False
        for runner in list(self.runners):
            if not runner.task.done():
                runner.finish()
        await asyncio.gather(*(r.task for r in list(self.runners)))
        raise CloseConnection(NORMAL, "close_socket")

    def still_speaking(self) -> list[asyncio.Task]:
        """The socket ended: the contexts still speaking count as ``disconnected`` (the client went
        away or was cut); every runner's task, to cancel."""
        runners = list(self.runners)
        for runner in runners:
            if runner.busy():
                runner.count("disconnected")
            runner.end_access("disconnected")  # an idle context ends with its socket too
        return [r.task for r in runners]


async def first_frame(socket: Socket) -> str | bytes | CsmServeError | None:
    """The first frame of a socket without a key, which must carry it (``xi_api_key``, ``xi-api-key``
    or ``authorization``) by ``auth_timeout_s`` after accept: the frame once its key is valid, the
    error to refuse the socket with, or None when the client went away."""
    message = await socket.receive(socket.auth_remaining())
    if message is None:
        return Unauthorized("no API key in time: the xi-api-key header or xi_api_key")
    if message["type"] == "websocket.disconnect":
        return None
    try:
        raw = socket.payload(message)
    except MessageTooLarge as exc:
        return Unauthorized(f"the first message must carry the API key; {exc.message}")
    if not socket.accept_key(key_of(raw)):
        return Unauthorized("an API key is required: the xi-api-key header or xi_api_key")
    return raw


async def serve(websocket: WebSocket, voice_id: str, multi: bool) -> None:
    """Admit, authenticate (before the voice is looked up: a stranger learns nothing about voices),
    resolve the voice, then run the connection."""
    state = state_of(websocket)
    socket = await accept(websocket, state)
    if socket is None:
        return

    async def refuse(error: str, message: str, code: int) -> None:
        await websocket.send_text(json.dumps(error_message(error, message, code)))
        await websocket.close(code, message[:120])

    draining = socket.refusal("the server is shutting down")
    if draining is not None:
        return await refuse("overloaded", draining.message, draining.ws_close_code)
    if not socket.authenticated and "authorization" in websocket.query_params:
        # ElevenLabs' documented query parameter (a browser cannot set headers): "Bearer <key>" or the key.
        if not socket.accept_key(key_of_authorization(websocket.query_params["authorization"])):
            return await refuse("invalid_api_key", "the API key is not valid", Unauthorized.ws_close_code)
    full = socket.wait_for_key()
    if full is not None:
        return await refuse("overloaded", full.message, full.ws_close_code)
    try:
        first = None
        if not socket.authenticated:
            first = await first_frame(socket)
            if first is None:
                return
            if isinstance(first, CsmServeError):
                return await refuse("invalid_api_key", first.message, first.ws_close_code)
        try:
            query = parse_query(websocket.query_params)
        except InvalidRequest as exc:
            return await refuse("invalid_request", exc.message, POLICY_VIOLATION)
        voice = voice_of(voice_id, state.voices, state.settings)
        if voice is None:
            return await refuse("voice_not_found", voice_not_found(voice_id), POLICY_VIOLATION)
        connection = ElevenLabsConnection(socket, query, voice, multi)
        await socket.serve([connection.receive_loop(first)], children=connection.still_speaking)
    finally:
        socket.release()


@router.websocket("/v1/text-to-speech/{voice_id}/multi-stream-input")
async def multi_stream_input(websocket: WebSocket, voice_id: str) -> None:
    await serve(websocket, voice_id, multi=True)


@router.websocket("/v1/text-to-speech/{voice_id}/stream-input")
async def stream_input(websocket: WebSocket, voice_id: str) -> None:
    await serve(websocket, voice_id, multi=False)
