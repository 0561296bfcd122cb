"""One ElevenLabs WebSocket's contexts, without sockets: client frames in, what to do out.

Each context has its own text buffer (:class:`~csmserve.api.elevenlabs.text.ContextText`) and speaks
its sentences in order as one continuous voice; contexts are independent and may speak at once.

Closing a context (``close_context``) has two meanings in practice, told apart by what came last:

* after a ``flush`` (pipecat's and LiveKit's end of turn: flush, then close), the flushed text is
  still spoken, then the context ends with ``isFinal`` (ElevenLabs: "if it has already been set
  to flush it will continue flushing");
* otherwise (barge-in), generation stops within one frame, queued text is dropped, ``isFinal`` follows.

``close_socket`` ends every context the same way, then the connection. On ``stream-input`` (one
context, no ids) ``{"text": ""}`` ends the input: the rest is spoken, ``isFinal`` sent, the socket closed.

A closed context still counts toward the connection's limit on contexts until its audio has ended (its
``isFinal``: :meth:`ContextSession.ended`), whether it finishes or stops: open, flush, close in a loop
never has more contexts speaking than the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from csmserve.api.elevenlabs.messages import (
    DEFAULT_CONTEXT,
    CloseContext,
    CloseSocket,
    TextInput,
    error_message,
    parse_message,
)
from csmserve.api.elevenlabs.text import DEFAULT_SCHEDULE, ContextText
from csmserve.errors import InvalidRequest

#: Contexts one connection may hold open at once: ElevenLabs' limit for multi-stream-input
#: ("Maximum simultaneous contexts per WebSocket connection exceeded (5)"); the server's
#: ``max_contexts_per_connection`` applies when smaller.
MAX_CONTEXTS = 5


@dataclass(eq=False)
class Context:
    """One context. ``runner`` belongs to the socket adapter (the task that speaks it)."""

    id: str
    text: ContextText
    #: The last input was a flush: closing lets the flushed text finish.
    flushed: bool = False
    #: Told to stop (barge-in): its generation ends within a frame, then its isFinal.
    stopped: bool = False
    runner: Any = None
    #: Characters of text received on this context so far (bounded by ``max_stream_chars``).
    chars: int = 0


@dataclass
class Actions:
    """What :meth:`ContextSession.handle` asks the adapter to do, in this order: send ``events``;
    start ``opened`` contexts; queue ``speak`` sentences; ``finish`` contexts (speak what is queued,
    then ``isFinal``); ``cancel`` contexts (stop now, drop the queue, ``isFinal``); then close the
    socket once every context has ended if ``close_socket``."""

    events: list[dict] = field(default_factory=list)
    opened: list[Context] = field(default_factory=list)
    speak: list[tuple[Context, str]] = field(default_factory=list)
    finish: list[Context] = field(default_factory=list)
    cancel: list[Context] = field(default_factory=list)
    close_socket: bool = False


class ContextSession:
    """The contexts of one connection; ``multi`` for multi-stream-input, else stream-input.

    A client spends only its own share: a context carries at most ``max_stream_chars`` characters of
    text, and at most ``min(max_contexts, MAX_CONTEXTS)`` contexts are open or still speaking at once."""

    def __init__(
        self, *, multi: bool, auto_mode: bool, max_text_chars: int, max_stream_chars: int = 100_000,
        max_contexts: int = MAX_CONTEXTS,
    ):
        self.multi = multi
        self.max_stream_chars = max_stream_chars
        self.max_contexts = min(max_contexts, MAX_CONTEXTS)
        self.auto_mode = auto_mode
        self.max_text_chars = max_text_chars
        self.contexts: dict[str, Context] = {}
        #: Closed and not yet ended (finishing after a flush, or stopping): they still count toward
        #: ``max_contexts``; a second close_context (barge-in) stops the finishing ones.
        self.closing: list[Context] = []
        #: stream-input's generation_config of the first message applies to the whole connection.
        self._schedule: tuple[int, ...] | None = None
        self.closed = False

    def handle(self, raw: str | bytes | None) -> Actions:
        """Process one client frame. Never raises: a bad frame becomes an error message."""
        if self.closed:
            return Actions()
        try:
            message = parse_message(raw, self.max_text_chars)
            if isinstance(message, CloseSocket):
                return self._close_socket()
            if isinstance(message, CloseContext):
                return self._close_context(message.context_id)
            return self._text(message)
        except InvalidRequest as exc:
            return Actions([error_message("invalid_input_message", exc.message)])

    # -- text ---------------------------------------------------------------------------------
    def _text(self, message: TextInput) -> Actions:
        actions = Actions()
        if not self.multi:
            if message.context_id is not None:
                raise InvalidRequest("stream-input has one context: use multi-stream-input for context_id")
            if message.text == "" and not message.flush:
                return self._end_input()
        elif message.text == "" and not message.flush:
            return actions  # a keep-alive: receiving it reset the inactivity timer
        cid = message.context_id or DEFAULT_CONTEXT
        context = self.contexts.get(cid)
        if context is None:
            if len(self.contexts) + len(self.closing) >= self.max_contexts:
                raise InvalidRequest(
                    f"{self.max_contexts} contexts are open or still speaking on this connection; "
                    "close one and wait for its isFinal"
                )
            schedule = message.schedule or self._schedule or DEFAULT_SCHEDULE
            if not self.multi:
                self._schedule = schedule
            context = self.contexts[cid] = Context(cid, ContextText(schedule, self.auto_mode, self.max_text_chars))
            actions.opened.append(context)
        if context.chars + len(message.text) > self.max_stream_chars:
            actions.events.append(error_message(
                "max_character_limit_exceeded",
                f"a context carries at most {self.max_stream_chars} characters; close it and open another",
                context_id=context.id if self.multi else None,
            ))
            return actions
        context.chars += len(message.text)
        sentences = context.text.push(message.text) if message.text else []
        if message.try_trigger:
            sentences += context.text.try_trigger()
        if message.flush:
            sentences += context.text.flush()
        if message.text or message.flush:
            context.flushed = message.flush
        actions.speak += [(context, s) for s in sentences]
        return actions

    def _end_input(self) -> Actions:
        actions = Actions(close_socket=True)
        context = self.contexts.pop(DEFAULT_CONTEXT, None)
        if context is not None:
            actions.speak += [(context, s) for s in context.text.flush()]
            actions.finish.append(context)
        self.closed = True
        return actions

    # -- closing ------------------------------------------------------------------------------
    def _close(self, context: Context, actions: Actions) -> None:
        self.closing.append(context)
        if context.flushed:
            actions.finish.append(context)
        else:
            context.stopped = True
            actions.cancel.append(context)

    def _close_context(self, context_id: str) -> Actions:
        actions = Actions()
        context = self.contexts.pop(context_id, None)
        if context is not None:
            self._close(context, actions)
            return actions
        for closing in self.closing:  # a finishing context of that id: barge-in stops it
            if closing.id == context_id and not closing.stopped:
                closing.stopped = True
                actions.cancel.append(closing)
        # Else already ended (barge-in races with the end of a turn): nothing to do, no error.
        return actions

    def _close_socket(self) -> Actions:
        actions = Actions(close_socket=True)
        for context in self.contexts.values():
            self._close(context, actions)
        self.contexts.clear()
        self.closed = True
        return actions

    def ended(self, context: Context) -> None:
        """The adapter says ``context`` has sent its ``isFinal``: it no longer counts."""
        if context in self.closing:
            self.closing.remove(context)
