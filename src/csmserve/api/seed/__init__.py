"""csmserve's own API: the ``/ws/generate`` WebSocket protocol (:mod:`.messages`, :mod:`.session`,
:mod:`.websocket`) and its REST fallback ``POST /generate`` (:mod:`.rest`). Never imports torch."""
