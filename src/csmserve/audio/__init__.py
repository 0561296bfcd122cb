"""Audio on its way out: float to PCM, chunking at exact sizes, containers."""
