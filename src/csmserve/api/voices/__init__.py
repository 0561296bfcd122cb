"""The voice library, ``/v1/voices``: register a voice from a reference clip, list, show, delete.

Its own API rather than a part of one: every API speaks in these voices, and ElevenLabs' clients
list them at the same path as csmserve's (:mod:`.routes` answers in both shapes). Never imports torch.
"""
