"""The Wyoming TCP server: one :class:`Connection` per client, a receive loop and a send loop over a
:class:`~csmserve.api.wyoming.session.WyomingSession`.

It runs on the event loop of the HTTP app and speaks through the same :class:`~csmserve.speech.Speech`,
so its requests share the engine's batch with every other route, under the same rule:

* admission: one stream slot per generation (``Admission.enter``/``leave``: a full or draining server
  answers Wyoming's ``error`` with code ``overloaded``), at most ``max_connections`` connections;
* the request deadline (``request_timeout_s``) around each generation;
* a client that reads nothing for ``max_lag_s`` is cut (``csm_slow_clients_total``), one that goes away
  (end of stream) cancels its generation before the engine's next frame;
* events bounded by ``max_message_bytes``, text by ``max_text_chars`` (one ``synthesize``) and
  ``max_stream_chars`` (one stream), requests queued per connection by ``max_pending_per_connection``;
  a connection with nothing to do for ``idle_timeout_s`` is closed;
* metrics under the endpoint ``wyoming``, and one access line per request.

Wyoming has no authentication: the port is for a trusted network (loopback by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator

import anyio
from wyoming.event import Event, async_write_event
from wyoming.tts import SynthesizeStopped

from csmserve.api.wyoming.messages import RATE, AudioOut, error_event
from csmserve.api.wyoming.session import Failure, Job, Sentence, StreamEnd, TextStream, Utterance, WyomingSession
from csmserve.api.wyoming.wire import read_event
from csmserve.audio.formats import make_encoder
from csmserve.errors import CsmServeError, GenerationFailed, InvalidRequest, Overloaded
from csmserve.logs import request_id as current_request_id
from csmserve.server.access import AccessLine
from csmserve.server.deadline import deadline
from csmserve.server.state import ServerState
from csmserve.server.streaming import ClientGone, outcome_of
from csmserve.speech import AudioSink, StreamStats

log = logging.getLogger(__name__)
ENDPOINT = "wyoming"
#: Wyoming's usual text-to-speech port (wyoming-piper's): ``csmserve wyoming`` listens there by default.
DEFAULT_PORT = 10200


class Closing(Exception):
    """End the connection (after what was sent): an error was answered, or the client was cut."""


class Connection:
    """One client: its session, the jobs it queued, the one running now."""

    def __init__(self, state: ServerState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.state = state
        self.settings = state.settings
        self.reader, self.writer = reader, writer
        peer = writer.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None
        self.session = WyomingSession(state.voices, state.settings, lambda: "wy-" + secrets.token_hex(4))
        self.jobs: deque[Job] = deque()
        self.current: Job | None = None
        self.wake = asyncio.Event()
        self.write_lock = asyncio.Lock()
        #: When the client last sent an event or a job ended (loop time): idleness counts from there.
        self.active_at = asyncio.get_running_loop().time()

    # -- running ------------------------------------------------------------------------------------
    async def serve(self) -> None:
        """Run both loops until one ends (the client left, an error was answered, the connection idled),
        then cancel the other (which stops generation) and close the socket."""
        loops = [asyncio.create_task(self.receive_loop()), asyncio.create_task(self.send_loop())]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = None if task.cancelled() else task.exception()
                if exc is not None and not isinstance(exc, (Closing, ClientGone, ConnectionError)):
                    log.error("wyoming connection failed", exc_info=exc)
        finally:
            self.abandon()
            for task in loops:
                task.cancel()
            for task in loops:
                with contextlib.suppress(BaseException):
                    await task
            await self.close()

    async def close(self) -> None:
        """Close the socket; output a client does not take within ``max_lag_s`` is dropped."""
        self.writer.close()
        with anyio.move_on_after(self.settings.max_lag_s) as waited:
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        if waited.cancelled_caught:
            self.writer.transport.abort()

    # -- receiving ----------------------------------------------------------------------------------
    def busy(self) -> bool:
        """Generating, or work queued (an open stream waiting for text is idle: the timeout applies)."""
        return self.current is not None or bool(self.jobs)

    async def receive_loop(self) -> None:
        """Read events until the client leaves (returns) or has nothing to do for ``idle_timeout_s``;
        replies go out at once, jobs queue. A read is never cancelled halfway (the framing would be lost)."""
        read: asyncio.Future | None = None
        loop = asyncio.get_running_loop()
        try:
            while True:
                if read is None:
                    read = asyncio.ensure_future(read_event(self.reader, self.settings.max_message_bytes))
                idle_left = self.active_at + self.settings.idle_timeout_s - loop.time()
                # While busy, look again after a whole timeout: the idle time counts from the last job's end.
                done, _ = await asyncio.wait({read}, timeout=self.settings.idle_timeout_s if self.busy() else idle_left)
                if not done:
                    if not self.busy() and self.active_at + self.settings.idle_timeout_s <= loop.time():
                        return  # idle: close
                    continue
                try:
                    event = read.result()
                except CsmServeError as exc:  # the framing is broken: say why and close
                    log.warning("wyoming: %s", exc.message)
                    await self.send([error_event(exc)])
                    raise Closing(exc.message) from None
                read = None
                if event is None:
                    return  # the client went away: serve() cancels its generation
                self.active_at = loop.time()
                actions = self.session.handle(event)
                if actions.replies:
                    await self.send(actions.replies)
                for job in actions.jobs:
                    self.queue(job)
                self.wake.set()
        finally:
            if read is not None:
                read.cancel()

    def queue(self, job: Job) -> None:
        """Queue ``job``, its request's access line opened; a request past ``max_pending_per_connection``
        is refused (an error, then the connection closes)."""
        owner = self.owner(job)
        self.open_access(owner)
        if isinstance(job, (Utterance, StreamEnd)):
            queued = sum(isinstance(j, (Utterance, StreamEnd)) for j in self.jobs)
            if queued >= self.settings.max_pending_per_connection:
                self.session.failed = True
                self.finish(owner, "rejected")
                limit = self.settings.max_pending_per_connection
                job = Failure(InvalidRequest(f"{limit} requests are already queued on this connection; wait for one"))
        self.jobs.append(job)

    def open_access(self, owner: Utterance | TextStream | None) -> None:
        """Give a request its access line, when it has none yet."""
        if owner is None or owner.access is not None:
            return
        if isinstance(owner, TextStream):
            route, request_id = "wyoming synthesize-start", owner.request_id
        else:
            route, request_id = "wyoming synthesize", owner.request.request_id
        owner.access = AccessLine(route, self.client, None, owner.voice, request_id=request_id)

    @staticmethod
    def owner(job: Job | None) -> Utterance | TextStream | None:
        """The request ``job`` is part of (a sentence's is its stream)."""
        if isinstance(job, (Sentence, StreamEnd)):
            return job.stream
        return job if isinstance(job, Utterance) else None

    # -- sending ------------------------------------------------------------------------------------
    async def send(self, events: list[Event]) -> None:
        """Write ``events`` in order; a client that takes none of them for ``max_lag_s`` is cut
        (:class:`ClientGone`, which ends the connection and its generation)."""
        async with self.write_lock:
            try:
                with anyio.fail_after(self.settings.max_lag_s):
                    for event in events:
                        await async_write_event(event, self.writer)
            except TimeoutError:
                self.state.metrics.slow_clients.inc()
                log.warning("wyoming: cut a client that read nothing for %g s", self.settings.max_lag_s)
                self.writer.transport.abort()
                raise ClientGone("client reads too slowly") from None
            except ConnectionError as exc:
                raise ClientGone("the client went away") from exc

    async def send_loop(self) -> None:
        while True:
            if not self.jobs:
                self.wake.clear()
                await self.wake.wait()
                continue
            job = self.current = self.jobs.popleft()
            try:
                await self.run(job)
            finally:
                self.current = None
                self.active_at = asyncio.get_running_loop().time()

    async def run(self, job: Job) -> None:
        """Answer one job. A failure is counted, answered with ``error`` and ends the connection."""
        if isinstance(job, Failure):
            log.warning("wyoming request refused: %s", job.error.message)
            if job.stream is not None:
                self.open_access(job.stream)
                self.finish(job.stream, outcome_of(job.error))
            await self.send([error_event(job.error)])
            raise Closing(job.error.message)
        owner = self.owner(job)
        current_request_id.set(owner.access.request_id)
        try:
            if isinstance(job, Utterance):
                await self.utterance(job)
            elif isinstance(job, Sentence):
                await self.sentence(job)
            else:
                await self.end_stream(job.stream)
        except (ClientGone, ConnectionError):
            self.finish(owner, "disconnected")
            raise
        except CsmServeError as exc:
            log.warning("wyoming request failed: %s", exc.message)
            self.finish(owner, outcome_of(exc))
            await self.send([error_event(exc)])
            raise Closing(exc.message) from None
        except Exception:  # noqa: BLE001 - reported to the client, logged with its traceback
            log.exception("wyoming request failed")
            self.finish(owner, "error")
            await self.send([error_event(GenerationFailed("generation failed"))])
            raise Closing("generation failed") from None

    def finish(self, owner: Utterance | TextStream, outcome: str, *, counted: bool = False) -> None:
        """Count a request's outcome (unless ``counted`` already) and write its access line, once."""
        if owner.ended:
            return
        owner.ended = True
        stats = owner.access.stats
        if not counted:
            if outcome == "disconnected" and stats is not None:  # it had started: gone mid-stream
                self.state.metrics.disconnects.inc()
            self.state.metrics.finished(ENDPOINT, outcome, stats)
        owner.access.end(outcome)

    def abandon(self) -> None:
        """The connection ends: requests still unanswered (running, queued, a stream still open) end
        ``disconnected``."""
        for owner in [*map(self.owner, [self.current, *self.jobs]), self.session.stream]:
            if owner is not None:
                self.open_access(owner)
                self.finish(owner, "disconnected")

    # -- speaking -----------------------------------------------------------------------------------
    def sink(self) -> AudioSink:
        return AudioSink(make_encoder("pcm_s16le", RATE), self.state.speech.stats())

    async def speak(self, owner: Utterance | TextStream, items: AsyncIterator[bytes | str], out: AudioOut) -> None:
        """Send one generation's audio as it comes, in a stream slot and under the request deadline."""
        try:
            self.state.admission.enter(ENDPOINT)
        except Overloaded:  # full or draining; counted by Admission
            self.finish(owner, "rejected", counted=True)
            raise
        try:
            with deadline(self.settings.request_timeout_s):
                async with contextlib.aclosing(items) as pieces:  # closed on any exit: the engine stops
                    async for pcm in pieces:
                        await self.send(out.chunk(pcm))
        finally:
            self.state.admission.leave()

    async def utterance(self, job: Utterance) -> None:
        sink = self.sink()
        job.access.chars = len(job.request.text)
        job.access.stats = sink.stats
        if job.request.text.strip():  # blank text: an empty stream, as other Wyoming servers answer it
            await self.speak(job, self.state.speech.stream(job.request, sink), job.out)
        await self.send(job.out.stop())
        self.finish(job, "ok")

    async def sentence(self, job: Sentence) -> None:
        stream = job.stream
        if stream.speech is None:
            stream.speech = self.state.speech.sentences(self.sink())
            stream.access.stats = stream.speech.stats
        stream.access.chars = stream.chars
        await self.speak(stream, stream.speech.speak(stream.request(job.text)), stream.out)

    async def end_stream(self, stream: TextStream) -> None:
        """The rest of the stream's audio, ``audio-stop`` (if any audio started) and ``synthesize-stopped``."""
        stream.access.chars = stream.chars
        events: list[Event] = []
        if stream.speech is not None:
            for pcm in stream.speech.finish():
                events += stream.out.chunk(pcm)
        if stream.out.started:
            events += stream.out.stop()
        await self.send([*events, SynthesizeStopped().event()])
        self.finish(stream, "ok")


def loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


class WyomingServer:
    """The Wyoming port of one app (``state``), on the running event loop: :meth:`start`, :meth:`close`."""

    def __init__(self, state: ServerState, host: str, port: int):
        self.state = state
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Listen (``port`` 0: any free port, then :attr:`port` is the one chosen)."""
        self._server = await asyncio.start_server(
            self._connected, self.host, self.port, limit=self.state.settings.max_message_bytes
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("wyoming: listening on tcp://%s:%d", self.host, self.port)
        if not loopback(self.host):
            log.warning(
                "wyoming listens on %s, beyond this machine, without authentication: anyone who can reach "
                "port %d can use the model (keep it on a trusted network)", self.host, self.port,
            )

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.state.settings.max_connections:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await Connection(self.state, reader, writer).serve()
        finally:
            self._connections.discard(task)

    async def close(self) -> None:
        """Stop listening, end every connection (cancelling its generation), wait for them."""
        if self._server is None:
            return
        self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await self._server.wait_closed()
