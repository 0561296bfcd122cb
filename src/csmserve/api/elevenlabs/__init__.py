"""ElevenLabs-compatible text-to-speech API, so agent frameworks switch to CSM by changing a URL.

pipecat's ``ElevenLabsTTSService``, LiveKit Agents' ``elevenlabs.TTS`` and the official
``elevenlabs`` SDK speak these endpoints (https://elevenlabs.io/docs/api-reference):

* ``WS /v1/text-to-speech/{voice_id}/multi-stream-input`` (several contexts on one socket) and
  ``WS /v1/text-to-speech/{voice_id}/stream-input`` (one context);
* ``POST /v1/text-to-speech/{voice_id}`` (+ ``/stream``, ``/with-timestamps``, ``/stream/with-timestamps``);
* ``GET /v1/models`` (to ElevenLabs clients), ``/v1/user`` and ``/v1/user/subscription`` (:mod:`.account`).
The voice paths (``/v1/voices``, ``/v2/voices``, ``/v1/voices/add``) are the voice library's
(:mod:`csmserve.api.voices`), in ElevenLabs' shapes as well as csmserve's.

Socket-free: output formats (:mod:`.formats`), query parameters, client messages and their
translation into speech (:mod:`.messages`), one socket's contexts (:mod:`.session`), text buffering
and character timings (:mod:`.text`), what a ``voice_id`` names (:mod:`.voices`). The routes:
:mod:`.websocket`, :mod:`.rest` and :mod:`.account`, together in :mod:`.routes`. Never imports torch.
"""
