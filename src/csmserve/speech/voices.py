"""Voice resolution, once for every API: what a client's voice string names, and the context turn
a request's voice becomes.

A voice string is, first match wins: a CSM speaker id (digits); ``default``, the server's default
voice; a name the operator mapped to a registered voice (``CSM_VOICE_MAP``: OpenAI's ``alloy``, an
ElevenLabs ``voice_id``); a registered voice (its reference clip's codes and transcript, kept by
:class:`~csmserve.voices.VoiceStore`), by id or name; or, where an API accepts them, one of OpenAI's
voice names that stand for a speaker id (:data:`SPEAKER_NAMES`). :class:`VoiceBook` holds the store,
the map and the default; registration refuses names that would be read as something else
(:meth:`VoiceBook.check_new`).

A speaker id alone is not a voice: without a reference clip the base model picks a different voice for
each request. :class:`VaryingVoiceWarning` says so in the log, once per client connection.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass

from csmserve.config import Settings
from csmserve.engine import ContextTurn
from csmserve.errors import Conflict, InvalidRequest, VoiceUnavailable
from csmserve.voices import ID_PATTERN, Voice, VoiceStore

log = logging.getLogger(__name__)

#: OpenAI's voice names -> CSM speaker ids (alphabetical order of OpenAI's list). Only the OpenAI API
#: accepts them, but no registered voice may take one, so that a name means one thing everywhere.
SPEAKER_NAMES = {
    "alloy": 0, "ash": 1, "ballad": 2, "coral": 3, "echo": 4,
    "fable": 5, "nova": 6, "onyx": 7, "sage": 8, "shimmer": 9, "verse": 0,
}  # fmt: skip
#: The voice string that names the server's default voice (``CSM_DEFAULT_VOICE``) on every API.
DEFAULT = "default"
MAX_NAME_CHARS = 64
#: The connection a request came in on (its client address), set by the server for each connection:
#: what "once per connection" means to :class:`VaryingVoiceWarning`.
client_connection: ContextVar[object | None] = ContextVar("client_connection", default=None)


@dataclass(frozen=True)
class VoiceChoice:
    """What a voice string named: a ``speaker_id`` (range not checked), a ``voice`` string (resolved
    again when spoken: a registered voice, a mapped name or ``default``), or neither: no voice named,
    the server's default voice applies."""

    speaker_id: int | None = None
    voice: str | None = None


class VoiceBook:
    """The voices a request may name: the registered ones (``store``), the operator's ``mapped`` names
    (name -> registered voice, matched in any case) and the ``default`` voice (a registered voice's
    name or id)."""

    def __init__(self, store: VoiceStore, mapped: Mapping[str, str] | None = None, default: str | None = None):
        self.store = store
        self.mapped = dict(mapped or {})
        self.aliases = {name.casefold(): voice for name, voice in self.mapped.items()}
        self.default = default

    @classmethod
    def from_settings(cls, settings: Settings, store: VoiceStore | None = None) -> VoiceBook:
        """The book of ``settings``' voices directory, map and default voice."""
        return cls(store or VoiceStore(settings.voices_dir), settings.voice_aliases(), settings.default_voice)

    def configured(self, name: str) -> str | None:
        """The registered voice the configuration says ``name`` means (``default``, a mapped name); None
        when ``name`` is neither."""
        if name.casefold() == DEFAULT and self.default is not None:
            return self.default
        return self.aliases.get(name.casefold())

    def names(self, name: str) -> bool:
        """Whether ``name`` names a voice: a configured name, or a registered voice (id or name)."""
        return self.configured(name) is not None or self.store.get(name) is not None

    def get(self, name: str) -> Voice | None:
        """The registered voice ``name`` means (through the map and ``default``), or None."""
        target = self.configured(name)
        return self.store.get(target if target is not None else name)

    def resolve(self, name: str) -> Voice:
        """The registered voice ``name`` means. Raises :class:`VoiceUnavailable` when the configuration
        names a voice that is not registered, :class:`InvalidRequest` for any other unknown name."""
        target = self.configured(name)
        voice = self.store.get(target if target is not None else name)
        if voice is not None:
            return voice
        if target is None:
            raise InvalidRequest(f"unknown voice {name[:64]!r}; list voices with GET /v1/voices", "voice")
        setting = "CSM_DEFAULT_VOICE" if name.casefold() == DEFAULT else "CSM_VOICE_MAP"
        raise VoiceUnavailable(
            f"voice {name[:64]!r} means {target!r} ({setting}), which is not registered: register it "
            f"(csmserve voices add {target} CLIP --text ...) or change {setting}"
        )

    def problems(self) -> list[str]:
        """What the configuration names that is not registered, in words for the start-up log."""
        found = []
        if self.default is not None and self.store.get(self.default) is None:
            found.append(
                f"CSM_DEFAULT_VOICE={self.default!r} is not a registered voice: requests that name no voice "
                f"will fail until it is (csmserve voices add {self.default} CLIP --text ...)"
            )
        for name, target in sorted(self.mapped.items()):
            if self.store.get(target) is None:
                found.append(f"CSM_VOICE_MAP maps {name!r} to {target!r}, which is not a registered voice")
        return found

    def reserved(self, name: str) -> str | None:
        """Why a new voice may not be called ``name`` (None: it may): a speaker id or name, a voice id,
        ``default`` or a mapped name would be read as something else."""
        if name.isdigit() or name.casefold() in SPEAKER_NAMES:
            return "an OpenAI voice name or a speaker id"
        if ID_PATTERN.match(name) is not None:
            return "a voice id"
        if name.casefold() == DEFAULT:
            return "the name of the server's default voice"
        if name.casefold() in self.aliases:
            return "a name mapped by CSM_VOICE_MAP"
        return None

    def check_new(self, name: str, transcript: str, speaker_id: int, settings: Settings) -> tuple[str, str]:
        """A new voice's name and transcript, stripped, checked as every way of adding one checks them.
        Raises :class:`InvalidRequest` (a bad field) or :class:`Conflict` (the name is reserved or taken).
        The transcript may be empty (no words known: the voice follows its clip less closely)."""
        name, transcript = name.strip(), transcript.strip()
        if not name or len(name) > MAX_NAME_CHARS:
            raise InvalidRequest(f"name must be 1 to {MAX_NAME_CHARS} characters", "name")
        if len(transcript) > settings.max_text_chars:
            raise InvalidRequest(f"transcript must be at most {settings.max_text_chars} characters: what the clip says", "transcript")
        if not settings.min_speaker_id <= speaker_id <= settings.max_speaker_id:
            raise InvalidRequest(
                f"speaker_id must be an integer from {settings.min_speaker_id} to {settings.max_speaker_id}", "speaker_id"
            )
        why = self.reserved(name)
        if why is not None:
            raise Conflict(f"{name!r} is reserved ({why}); pick another name")
        if any(voice.name.casefold() == name.casefold() for voice in self.store.list()):
            raise Conflict(f"a voice named {name!r} exists already; pick another name or delete it first")
        return name, transcript


def choose_voice(name: str, voices: VoiceBook, *, speaker_names: bool = False) -> VoiceChoice | None:
    """What ``name`` names, first match wins: ASCII digits (at most 4) a speaker id; ``default``, a
    mapped name or a registered voice (id or name); with ``speaker_names``, one of
    :data:`SPEAKER_NAMES` (any case). None: nothing."""
    if name.isascii() and name.isdigit() and len(name) <= 4:
        return VoiceChoice(speaker_id=int(name))
    if voices.names(name):
        return VoiceChoice(voice=name)
    if speaker_names and name.lower() in SPEAKER_NAMES:
        return VoiceChoice(speaker_id=SPEAKER_NAMES[name.lower()])
    return None


def speaker_of(choice: VoiceChoice, voices: VoiceBook) -> int:
    """The speaker id a choice speaks with (a voice's own; 0 if it is not registered, when the
    request fails anyway)."""
    if choice.speaker_id is not None:
        return choice.speaker_id
    voice = voices.get(choice.voice if choice.voice is not None else DEFAULT)
    return voice.speaker_id if voice is not None else 0


def voice_turn(voice: Voice, voices: VoiceBook) -> ContextTurn:
    """An encoded voice's context turn: its transcript and its clip's codes."""
    codes = voices.store.codes(voice.id)
    if codes is None:  # pending or deleted meanwhile: the caller encodes first
        raise VoiceUnavailable(f"voice {voice.name!r} is not encoded yet")
    return ContextTurn(voice.speaker_id, voice.transcript, codes=codes)


class VaryingVoiceWarning:
    """Logs that a request speaks without a voice (a bare speaker id: its voice changes from request
    to request), once per client connection (:data:`client_connection`); remembers the last
    ``remember`` connections."""

    def __init__(self, remember: int = 4096):
        self._warned: collections.OrderedDict[object, None] = collections.OrderedDict()
        self._remember = remember

    def __call__(self, speaker_id: int, request_id: str | None) -> None:
        connection = client_connection.get()
        if connection is not None:
            if connection in self._warned:
                return
            self._warned[connection] = None
            if len(self._warned) > self._remember:
                self._warned.popitem(last=False)
        log.warning(
            "request %s names no voice: it speaks as bare speaker %d, and the model picks a different voice "
            "for each request; name a registered voice, or set CSM_DEFAULT_VOICE (docs/voices.md). "
            "Said once per connection.",
            request_id or "-", speaker_id,
        )
