"""What the voices look like to each client, and ElevenLabs' voice search over them. No I/O.

ElevenLabs' clients see three kinds of voice (the SDK's ``Voice``): CSM's speaker ids ``"0"``..``"9"``
as ``premade`` voices (a bare speaker: its voice varies from request to request), the names the
operator mapped to registered voices (``CSM_VOICE_MAP``: an ElevenLabs id a client has hard-coded) as
``premade`` voices too, and the registered voices as ``cloned`` ones. csmserve's own shape
(``Voice.public``) covers registered voices; one voice's answer carries both shapes' fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from csmserve.config import Settings
from csmserve.speech.voices import VoiceBook
from csmserve.voices import Voice

#: Query parameters of ``/v2/voices`` that may come more than once.
LIST_PARAMETERS = ("language", "use_cases", "voice_ids")


def speaker_voice(speaker_id: int) -> dict:
    """A bare CSM speaker id, as an ElevenLabs premade voice."""
    return {
        "voice_id": str(speaker_id),
        "name": f"CSM speaker {speaker_id}",
        "category": "premade",
        "description": "a bare CSM speaker id: without a reference clip its voice changes from request to request",
        "labels": {"speaker_id": str(speaker_id)},
        "created_at_unix": None,
        "is_owner": False,
    }


def registered_voice(voice: Voice) -> dict:
    """A registered voice, as an ElevenLabs cloned voice."""
    return {
        "voice_id": voice.id,
        "name": voice.name,
        "category": "cloned",
        "description": voice.description or None,
        "labels": {**voice.labels, "speaker_id": str(voice.speaker_id)},
        "created_at_unix": int(voice.created),
        "is_owner": True,
    }


def mapped_voice(name: str, voice: Voice) -> dict:
    """A name the operator mapped to ``voice``, as an ElevenLabs premade voice of that name's id."""
    return {
        **registered_voice(voice),
        "voice_id": name,
        "category": "premade",
        "description": f"mapped to the registered voice {voice.name!r} ({voice.id}) by CSM_VOICE_MAP",
        "is_owner": False,
    }


def elevenlabs_voices(book: VoiceBook, settings: Settings) -> list[dict]:
    """Every voice an ElevenLabs client may name, in ElevenLabs' shape: the speaker ids, the mapped
    names whose voice is registered, then the registered voices (oldest first)."""
    registered = book.store.list()
    mapped = [(name, book.get(name)) for name in book.mapped]
    return (
        [speaker_voice(i) for i in range(settings.min_speaker_id, settings.max_speaker_id + 1)]
        + [mapped_voice(name, voice) for name, voice in mapped if voice is not None]
        + [registered_voice(v) for v in registered]
    )


def one_voice(voice_id: str, book: VoiceBook, settings: Settings) -> dict | None:
    """One voice in both shapes (ElevenLabs' fields and, for a registered voice, csmserve's): a speaker
    id in the server's range, a mapped name or ``default`` (its registered voice), or a registered
    voice by id or name. None: no such voice."""
    if voice_id.isascii() and voice_id.isdigit() and len(voice_id) <= 4:
        speaker = int(voice_id)
        if not settings.min_speaker_id <= speaker <= settings.max_speaker_id:
            return None
        return {"id": voice_id, "object": "voice", "speaker_id": speaker, **speaker_voice(speaker)}
    voice = book.get(voice_id)
    if voice is None:
        return None
    elevenlabs = mapped_voice(voice_id, voice) if book.configured(voice_id) is not None else registered_voice(voice)
    return {**elevenlabs, **voice.public()}  # where both name a field (labels, description), csmserve's own


class VoiceSearch(BaseModel):
    """The query of ElevenLabs' ``GET /v2/voices``, as its SDK's ``voices.search`` sends it.

    Filters on what csmserve knows of a voice (name, description, category, labels, id); sharing,
    fine-tuning, collection and quality filters have no meaning here and are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    next_page_token: int = Field(default=None, validate_default=True)
    page_size: int = Field(10, ge=1, le=100)
    search: str | None = None
    sort: Literal["created_at_unix", "name"] | None = None
    sort_direction: Literal["asc", "desc"] = "asc"
    voice_type: Literal["personal", "community", "default", "workspace", "non-default", "non-community", "saved"] | None = None
    category: Literal["premade", "cloned", "generated", "professional", "famous", "high_quality"] | None = None
    gender: str | None = None
    age: str | None = None
    accent: str | None = None
    language: list[str] = []
    use_cases: list[str] = []
    voice_ids: list[str] = Field([], max_length=100)

    @field_validator("next_page_token", mode="before")
    @classmethod
    def _next_page_token(cls, value: Any) -> int:
        """A token this server gave (the offset of the next page); none: the first page."""
        if value is None:
            return 0
        if not isinstance(value, str) or not value.isascii() or not value.isdigit():
            raise ValueError("next_page_token must be a token from a previous response")
        return int(value)

    @classmethod
    def parse(cls, params: Any) -> VoiceSearch:
        """From a request's query parameters (a starlette ``QueryParams``); raises ``ValidationError``."""
        data = {key: params.getlist(key) if key in LIST_PARAMETERS else params[key] for key in params}
        return cls.model_validate(data)

    def admits(self, voice: dict) -> bool:
        """Whether ``voice`` (ElevenLabs' shape) passes every filter."""
        labels = {key: value.casefold() for key, value in voice["labels"].items()}
        premade = voice["category"] == "premade"
        checks = [
            self.voice_type is None or (premade if self.voice_type == "default" else self.voice_type != "community" and not premade),
            self.category is None or voice["category"] == self.category,
            not self.voice_ids or voice["voice_id"] in self.voice_ids,
            not self.search or self._found(voice, self.search.casefold()),
            all(labels.get(key) == value.casefold() for key, value in self._label_filters().items()),
            not self.language or labels.get("language") in {v.casefold() for v in self.language},
            not self.use_cases or labels.get("use_case") in {v.casefold() for v in self.use_cases},
        ]
        return all(checks)

    def _label_filters(self) -> dict[str, str]:
        return {key: value for key, value in (("gender", self.gender), ("age", self.age), ("accent", self.accent)) if value}

    @staticmethod
    def _found(voice: dict, term: str) -> bool:
        """Whether ``term`` is in the voice's name, description, category or labels, as ElevenLabs searches
        (not in its id: a random id would match short terms by chance; ``voice_ids`` selects by id)."""
        fields = [voice["name"], voice["category"], voice["description"] or "", *voice["labels"].values()]
        return any(term in text.casefold() for text in fields)

    def page(self, voices: list[dict]) -> dict:
        """The page of ``voices`` this query asks for, in ElevenLabs' ``GetVoicesV2Response`` shape."""
        found = [voice for voice in voices if self.admits(voice)]
        if self.sort == "name":
            found.sort(key=lambda v: v["name"].casefold())
        elif self.sort == "created_at_unix":
            found.sort(key=lambda v: v["created_at_unix"] or 0)
        if self.sort_direction == "desc":
            found.reverse()
        start, end = self.next_page_token, self.next_page_token + self.page_size
        more = end < len(found)
        return {
            "voices": found[start:end],
            "has_more": more,
            "total_count": len(found),
            "next_page_token": str(end) if more else None,
        }


def validation_detail(exc: ValidationError, where: str) -> list[dict]:
    """pydantic's errors in FastAPI's ``detail`` shape (ElevenLabs' 422s): ``loc``, ``msg``, ``type``."""
    return [
        {"loc": [where, *map(str, err["loc"])], "msg": err["msg"].removeprefix("Value error, "), "type": err["type"]}
        for err in exc.errors()
    ]
