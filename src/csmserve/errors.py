"""One exception tree. Each error knows its wire code, HTTP status, WebSocket close code and how
soon a client may retry (``Retry-After``): every API renders these in its own shape (one renderer
each), none restates them.

Messages are written for the person who must act on them.
"""

from __future__ import annotations


class CsmServeError(Exception):
    """Base of every error csmserve raises on purpose."""

    code = "internal_error"
    http_status = 500
    #: WebSocket close code when the error ends the connection (most errors do not).
    ws_close_code = 1011
    #: Seconds after which a retry may succeed (HTTP ``Retry-After``); None: retrying will not help.
    retry_after_s: int | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}

    def headers(self) -> dict[str, str]:
        """The HTTP headers an answer with this error carries (``Retry-After`` when a retry may help)."""
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class InvalidRequest(CsmServeError):
    """The client sent something we cannot act on; the connection stays usable."""

    code = "invalid_request"
    http_status = 422
    ws_close_code = 1007

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        #: The request field at fault, when one is (OpenAI's ``param``, ElevenLabs' ``loc``).
        self.field = field


class MessageTooLarge(InvalidRequest):
    code = "message_too_large"
    http_status = 413
    ws_close_code = 1009


class NotFound(CsmServeError):
    code = "not_found"
    http_status = 404


class VoiceUnavailable(NotFound):
    """A voice the server's configuration names (``CSM_DEFAULT_VOICE``, ``CSM_VOICE_MAP``) is not
    registered, or a registered voice cannot be used (its clip cannot be encoded)."""

    code = "voice_unavailable"


class Unauthorized(CsmServeError):
    """No valid API key: the connection is closed (WebSocket 1008, policy violation)."""

    code = "unauthorized"
    http_status = 401
    ws_close_code = 1008


class Conflict(CsmServeError):
    """The request clashes with what exists (a voice name already taken or reserved)."""

    code = "conflict"
    http_status = 409


class NotReady(CsmServeError):
    """The model is still loading (or failed to load)."""

    code = "not_ready"
    http_status = 503
    ws_close_code = 1013
    retry_after_s = 5  # a model loads in seconds to minutes: /health says when
    LOADING = "the model is still loading; retry when /health says healthy"

    def __init__(self, message: str = LOADING):
        super().__init__(message)


class Overloaded(CsmServeError):
    code = "overloaded"
    http_status = 429
    ws_close_code = 1013
    retry_after_s = 1  # a stream slot frees as soon as one request ends


class OutOfMemory(CsmServeError):
    """One request ran out of (GPU) memory; it failed alone, memory was freed, the server goes on."""

    code = "out_of_memory"
    http_status = 503
    retry_after_s = 1


class ModelFailed(CsmServeError):
    """The device failed in a way that a retry will not fix (a CUDA error): the server is not ready."""

    code = "model_failed"
    http_status = 503
    retry_after_s = 1  # behind a load balancer, another replica answers the retry


class DeadlineExceeded(CsmServeError):
    code = "deadline_exceeded"
    http_status = 504


class ClientTooSlow(CsmServeError):
    """The stream's reader took none of its audio for ``CSM_MAX_LAG_S``: the engine freed its row."""

    code = "slow_client"
    http_status = 408
    ws_close_code = 1008


class GenerationFailed(CsmServeError):
    """The model raised while generating one request; the server keeps serving."""

    code = "generation_failed"
    http_status = 500

    def to_dict(self) -> dict:
        # The message carries the model's exception text: it goes to the log, never to a client.
        return {"code": self.code, "message": "generation failed; the server log has the details"}


class ModelLoadError(CsmServeError):
    """The model could not be loaded. The server does not start serving."""

    code = "model_load_failed"
    http_status = 503
    retry_after_s = 1


class GatedModelError(ModelLoadError):
    code = "model_gated"


class ModelUnavailableOffline(ModelLoadError):
    code = "model_unreachable"


class ModelNotFound(ModelLoadError):
    code = "model_not_found"


class NotACsmCheckpoint(ModelLoadError):
    code = "not_a_csm_checkpoint"


class LoadOutOfMemory(ModelLoadError):
    code = "out_of_memory"


class UnsupportedTransformers(ModelLoadError):
    code = "transformers_without_csm"
