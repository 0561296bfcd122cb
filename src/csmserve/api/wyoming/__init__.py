"""Wyoming, the protocol of Home Assistant's voice pipeline: a text-to-speech server on a TCP port.

Its events and their translation into speech (:mod:`.messages`), their framing read with bounds
(:mod:`.wire`), one connection's logic without sockets (:mod:`.session`), and the server that runs it
on the app's event loop and engine (:mod:`.connection`). Never imports torch.
"""
