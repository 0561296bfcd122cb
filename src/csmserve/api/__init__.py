"""One package per API a client speaks: its messages (pydantic), its session logic without sockets,
its routes, and its translation into the one :class:`~csmserve.speech.SpeechRequest`.

* :mod:`.seed`: csmserve's own, ``/ws/generate`` and ``POST /generate``;
* :mod:`.openai`: OpenAI's ``/v1/audio/speech``;
* :mod:`.elevenlabs`: ElevenLabs' text-to-speech WebSockets and HTTP endpoints;
* :mod:`.voices`: the voice library, ``/v1/voices`` (listed in csmserve's and ElevenLabs' shapes).

Only :mod:`csmserve.app` imports these (each package's ``routes.router``), and no package imports
another (import-linter contracts in pyproject.toml). What every route shares is in :mod:`csmserve.server`.
"""
