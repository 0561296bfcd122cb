"""The voice library: ``/v1/voices`` and ElevenLabs' ``/v2/voices`` and ``/v1/voices/add``: register a
voice from a reference clip, list, search, show, delete.

Its own API rather than a part of one: every API speaks in these voices, and ElevenLabs' clients
manage them at the same paths as csmserve's (:mod:`.routes` answers in both shapes; :mod:`.listing`
is what each client sees, without I/O). Never imports torch.
"""
