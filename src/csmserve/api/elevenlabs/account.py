"""What ElevenLabs' SDK and dashboards ask about the account: ``GET /v1/models`` (for ElevenLabs
clients: OpenAI's clients get OpenAI's list at the same path, :mod:`csmserve.server.clients`),
``GET /v1/user`` and ``GET /v1/user/subscription``.

A csmserve has no account, tiers or quotas: the answers are the minimal ones the SDK's response
models parse, saying so (tier ``csmserve``, nothing used or owed, limits reported as
:data:`NO_LIMIT`), with the figures that are real: the longest text a request may carry and how many
voices are registered.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from csmserve.config import Settings
from csmserve.server.clients import ElevenLabsRoute
from csmserve.server.state import state_of

router = APIRouter(prefix="/v1")
MODEL_ID = "csm-1b"
#: What a limit csmserve does not have is reported as (the SDK's models want integers).
NO_LIMIT = 1_000_000_000
#: When this process started: the "account's" creation time.
STARTED = int(time.time())


def model(settings: Settings) -> dict:
    """CSM-1B as ElevenLabs describes a model (the SDK's ``Model``)."""
    return {
        "model_id": MODEL_ID,
        "name": "Sesame CSM-1B (csmserve)",
        "description": "Sesame's conversational speech model, served by csmserve; model_id values are accepted and ignored",
        "can_do_text_to_speech": True,
        "can_do_voice_conversion": False,
        "can_be_finetuned": False,
        "can_use_style": False,
        "can_use_speaker_boost": False,
        "serves_pro_voices": False,
        "requires_alpha_access": False,
        "token_cost_factor": 1.0,
        "max_characters_request_free_user": settings.max_text_chars,
        "max_characters_request_subscribed_user": settings.max_text_chars,
        "maximum_text_length_per_request": settings.max_text_chars,
        "languages": [{"language_id": "en", "name": "English"}],
    }


def subscription(voices: int) -> dict:
    """The SDK's ``Subscription``: no tier, nothing used or owed; ``voices`` registered."""
    return {
        "tier": "csmserve",
        "character_count": 0,
        "character_limit": NO_LIMIT,
        "max_character_limit_extension": 0,
        "max_credit_limit_extension": 0,
        "can_extend_character_limit": False,
        "allowed_to_extend_character_limit": False,
        "next_character_count_reset_unix": None,
        "voice_slots_used": voices,
        "professional_voice_slots_used": 0,
        "professional_voice_slots_used_in_workspace": 0,
        "voice_limit": NO_LIMIT,
        "voice_add_edit_counter": 0,
        "professional_voice_limit": 0,
        "can_extend_voice_limit": False,
        "can_use_instant_voice_cloning": True,
        "can_use_professional_voice_cloning": False,
        "currency": "usd",
        "current_overage": {"amount": "0", "currency": "usd"},
        "status": "active",
        "open_invoices": [],
        "has_open_invoices": False,
    }


async def elevenlabs_models(request: Request) -> list[dict]:
    """ElevenLabs' model list (the SDK's ``models.list``): CSM-1B."""
    return [model(state_of(request).settings)]


@router.get("/user/subscription")
async def user_subscription(request: Request) -> dict:
    return subscription(len(state_of(request).voices.store.list()))


@router.get("/user")
async def user(request: Request) -> dict:
    """The SDK's ``User``: the server itself, with its subscription."""
    return {
        "user_id": "csmserve",
        "workspace_id": "csmserve",
        "subscription": subscription(len(state_of(request).voices.store.list())),
        "is_new_user": False,
        "can_use_delayed_payment_methods": False,
        "is_onboarding_completed": True,
        "is_onboarding_checklist_completed": True,
        "created_at": STARTED,
        "seat_type": "workspace_admin",
    }


router.add_api_route("/models", elevenlabs_models, methods=["GET"], route_class_override=ElevenLabsRoute)
