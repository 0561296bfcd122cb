"""ElevenLabs' text-to-speech WebSockets: ``multi-stream-input`` (contexts) and ``stream-input`` (one).

A receive loop feeds frames to :class:`~csmserve.elevenlabs.session.ContextSession`; each context
has a :class:`ContextRunner` task that speaks its sentences in order as one continuous stream (the
previous sentence as context, the codec state carried: ``SynthesisRequest.continuation``), so
contexts on one socket generate concurrently. Barge-in cancels a runner's current generation,
which stops the engine before its next frame.

The rules of ``/ws/generate`` apply, from the same code (:mod:`csmserve.server.ws`): Origin and key
checks (``admit``; the key may also come as the ``xi-api-key`` header, the ``authorization`` query
parameter or the first message's ``xi_api_key``); a socket without one must send it within
``auth_timeout_s``, and at most ``max_unauthenticated`` wait; one admission slot per generating
sentence (``ServerState.enter``/``leave``; refused: an error and close 1013); the lag-limited send (a
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

import anyio
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from csmserve.elevenlabs.formats import ChunkedAudio
from csmserve.elevenlabs.messages import (
    StreamSettings,
    audio_message,
    error_message,
    final_message,
    key_of,
    key_of_authorization,
    parse_query,
)
from csmserve.elevenlabs.session import Context, ContextSession
from csmserve.elevenlabs.text import ws_alignment
from csmserve.engine import Continuation
from csmserve.errors import CsmServeError, GenerationFailed, InvalidRequest, NotReady, Overloaded
from csmserve.logs import clean_id
from csmserve.logs import request_id as current_request_id
from csmserve.pipeline import deadline, stream_audio, synthesis_request
from csmserve.protocol import parse_options
from csmserve.server.streaming import outcome_of
from csmserve.server.ws import (
    NORMAL,
    POLICY_VIOLATION,
    TRY_AGAIN_LATER,
    WAITING_ROOM_FULL,
    CloseConnection,
    Connection,
    admit,
    wait_for_child,
    wait_for_key,
)

log = logging.getLogger(__name__)
router = APIRouter()
ENDPOINT = "elevenlabs"


def voice_fields(voice_id: str, state) -> dict | None:
    """Protocol fields for an ElevenLabs ``voice_id``: a speaker id "0".."9" or a registered voice
    (id or name); None when there is no such voice."""
    settings = state.settings
    if voice_id.isascii() and voice_id.isdigit() and len(voice_id) <= 4:
        speaker = int(voice_id)
        return {"speaker_id": speaker} if settings.min_speaker_id <= speaker <= settings.max_speaker_id else None
    if state.voices.get(voice_id) is not None:
        return {"voice": voice_id}
    return None


def voice_not_found(voice_id: str) -> str:
    return (
        f"A voice with voice_id {voice_id[:64]!r} was not found: use a speaker id \"0\"-\"9\" "
        "or a registered voice (GET /v1/voices)"
    )


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
        self.speaking: asyncio.Task | None = None
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
            self.connection.fail(exc)
        finally:
            self.connection.runners.discard(self)

    async def _run(self) -> None:
        conn = self.connection
        audio = ChunkedAudio(conn.query.output, conn.settings.default_chunk_ms)
        continuation = Continuation()
        first = True
        while not self.stopped:
            if not self.pending:
                if self.ending:
                    break
                self.wake.clear()
                await self.wake.wait()
                continue
            sentence = self.pending.popleft()
            task = self.speaking = asyncio.create_task(self.speak(sentence, audio, continuation, first))
            try:
                await wait_for_child(task)
            finally:
                self.speaking = None
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
            first = False
        if not self.stopped:
            tail = audio.finish()
            if tail:
                await conn.send_json(audio_message(tail, self.context_id))
        self.count("cancelled" if self.stopped else "ok")
        await conn.send_json(final_message(self.context_id))
        conn.session.ended(self.context)

    async def speak(self, sentence: str, audio: ChunkedAudio, continuation: Continuation, first: bool) -> None:
        """Generate one sentence and send its audio; the last chunk carries the sentence's alignment.
        A failure (the deadline too) is counted, then said to the client with the slot already free."""
        conn, state = self.connection, self.connection.state
        current_request_id.set(self.context.id)  # the log filter strips its control characters
        try:
            state.enter(ENDPOINT)
        except Overloaded as exc:
            self.count("rejected")
            await conn.send_json(error_message("too_many_concurrent_requests", exc.message, TRY_AGAIN_LATER))
            raise CloseConnection(TRY_AGAIN_LATER, "overloaded") from None
        start = audio.samples
        failure: CsmServeError | None = None
        try:
            if not state.engine.info.ready:
                raise NotReady()
            options = {**conn.voice, "seed": conn.query.seed, "request_id": self.context.id}
            request = parse_options(options, state.limits, sentence)
            synth = synthesis_request(request, conn.settings, state.voices, continuation)
            with deadline(conn.settings.request_timeout_s):
                async with contextlib.aclosing(stream_audio(state.engine, synth, audio, finish=False)) as chunks:
                    async for chunk in chunks:  # closed on any exit: the engine stops generating
                        await conn.send_json(audio_message(chunk, self.context_id))
        except CsmServeError as exc:
            failure = exc
        except (CloseConnection, WebSocketDisconnect, OSError):
            raise  # the client is gone or cut: the runner counts it
        except Exception:  # noqa: BLE001 - one context's failure must not end the connection
            log.exception("context %s failed", clean_id(self.context.id))
            failure = GenerationFailed("generation failed")
        finally:
            state.leave()
        if failure is not None:
            self.count(outcome_of(failure))
            log.warning("context %s failed: %s", clean_id(self.context.id), failure.message)
            await conn.send_json(error_message(failure.code, failure.to_dict()["message"], 1011, self.context_id))
            return
        duration_ms = 1000 * (audio.samples - start) / state.engine.sample_rate
        spoken = sentence if first else " " + sentence
        await conn.send_json(audio_message(audio.cut(), self.context_id, ws_alignment(spoken, duration_ms)))


class ElevenLabsConnection(Connection):
    """One ElevenLabs WebSocket. Reuses :class:`Connection`'s lag-limited send and frame size check;
    its ``session`` is a :class:`ContextSession` (contexts), not ``/ws/generate``'s."""

    def __init__(self, websocket: WebSocket, state, authenticated: bool, query: StreamSettings, voice: dict, multi: bool):
        super().__init__(websocket, state, authenticated)
        self.query = query
        self.voice = voice
        settings = state.settings
        self.session = ContextSession(
            multi=multi, auto_mode=query.auto_mode, max_text_chars=settings.max_text_chars,
            max_stream_chars=settings.max_stream_chars, max_contexts=settings.max_contexts_per_connection,
        )
        self.runners: set[ContextRunner] = set()
        self.receiver: asyncio.Task | None = None
        self.failure: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        """A context's runner failed (a slow client, an overload): end the connection with ``exc``."""
        if self.failure is None:
            self.failure = exc
        if self.receiver is not None:
            self.receiver.cancel()

    def busy(self) -> bool:
        return any(r.busy() for r in self.runners)

    async def receive_message(self) -> dict:
        """The next frame; after ``inactivity_timeout`` s without one while nothing is being spoken,
        ElevenLabs' input_timeout_exceeded error and close 1008. A socket still without its key has
        ``auth_timeout_s`` for its first frame (as on ``/ws/generate``), not the inactivity timeout."""
        if not self.authenticated:
            try:
                with anyio.fail_after(self.settings.auth_timeout_s):
                    return await self.ws.receive()
            except TimeoutError:
                await self.send_json(error_message("invalid_api_key", "no API key in time: the xi-api-key header or xi_api_key"))
                raise CloseConnection(POLICY_VIOLATION, "no API key in time") from None
        while True:
            try:
                with anyio.fail_after(self.query.inactivity_timeout_s):
                    return await self.ws.receive()
            except TimeoutError:
                if self.busy():
                    continue
            timeout = self.query.inactivity_timeout_s
            await self.send_json(
                error_message(
                    "input_timeout_exceeded",
                    f"Have not received a new text input within the timeout of {timeout:g} seconds. "
                    'Send text, or an empty-text keep-alive ({"text": ""}), in time; close_socket when done.',
                )
            )
            raise CloseConnection(POLICY_VIOLATION, "input timeout exceeded")

    async def authenticate_first(self, raw) -> None:
        if self.state.keys.valid(key_of(raw)):
            self.key_presented()
            return
        await self.send_json(error_message("invalid_api_key", "an API key is required: the xi-api-key header or xi_api_key"))
        raise CloseConnection(POLICY_VIOLATION, "unauthorized")

    async def receive_loop(self) -> None:
        def too_large(limit: int) -> dict:
            return error_message("message_too_large", f"messages are limited to {limit} bytes")

        while True:
            message = await self.receive_message()
            raw = await self.next_frame(message, too_large)
            if message["type"] == "websocket.disconnect":
                return  # serve() cancels the contexts and counts those still speaking
            if raw is None:
                continue
            if not self.authenticated:
                await self.authenticate_first(raw)
            if self.state.draining:
                await self.send_json(error_message("overloaded", "the server is shutting down; reconnect to another instance", TRY_AGAIN_LATER))
                raise CloseConnection(TRY_AGAIN_LATER, "draining")
            if await self.apply(self.session.handle(raw)):
                return

    async def apply(self, actions) -> bool:
        """Carry out ``actions``; True once the socket is to close (after every context ended)."""
        for event in actions.events:
            await self.send_json(event)
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


async def serve(websocket: WebSocket, voice_id: str, multi: bool) -> None:
    state = websocket.app.state.csm
    authenticated = await admit(websocket, state)
    if authenticated is None:
        return
    await websocket.accept()

    async def refuse(error: str, message: str, code: int) -> None:
        await websocket.send_text(json.dumps(error_message(error, message, code)))
        await websocket.close(code, message[:120])

    if state.draining:
        return await refuse("overloaded", "the server is shutting down", TRY_AGAIN_LATER)
    if authenticated is False and "authorization" in websocket.query_params:
        # ElevenLabs' documented query parameter (a browser cannot set headers): "Bearer <key>" or the key.
        if not state.keys.valid(key_of_authorization(websocket.query_params["authorization"])):
            return await refuse("invalid_api_key", "the API key is not valid", POLICY_VIOLATION)
        authenticated = True
    try:
        query = parse_query(websocket.query_params)
    except InvalidRequest as exc:
        return await refuse("invalid_request", exc.message, POLICY_VIOLATION)
    voice = voice_fields(voice_id, state)
    if voice is None:
        return await refuse("voice_not_found", voice_not_found(voice_id), POLICY_VIOLATION)
    if not authenticated and not wait_for_key(state):
        return await refuse("overloaded", WAITING_ROOM_FULL, TRY_AGAIN_LATER)
    connection = ElevenLabsConnection(websocket, state, authenticated, query, voice, multi)
    receiver = connection.receiver = asyncio.create_task(connection.receive_loop())
    close = None
    try:
        await asyncio.wait({receiver})
        exc = connection.failure
        if exc is None and not receiver.cancelled():
            exc = receiver.exception()
        if isinstance(exc, CloseConnection):
            close = exc
        elif exc is not None and not isinstance(exc, WebSocketDisconnect):
            log.warning("connection ended: %r", exc)
    finally:
        connection.release()
        runners = list(connection.runners)
        for runner in runners:  # still speaking when the socket ended: the client went away or was cut
            if runner.busy():
                runner.count("disconnected")
        tasks = [receiver, *(r.task for r in runners)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if close is not None:
            with contextlib.suppress(Exception):
                await websocket.close(close.code, close.reason)


@router.websocket("/v1/text-to-speech/{voice_id}/multi-stream-input")
async def multi_stream_input(websocket: WebSocket, voice_id: str) -> None:
    await serve(websocket, voice_id, multi=True)


@router.websocket("/v1/text-to-speech/{voice_id}/stream-input")
async def stream_input(websocket: WebSocket, voice_id: str) -> None:
    await serve(websocket, voice_id, multi=False)
