"""The approach the platform started from, kept only to measure against: generate the whole
utterance with ``model.generate``, decode it in one go, then cut it into chunks."""

from __future__ import annotations

import numpy as np
import torch

from csmserve.engine.csm import FRAME_MS, CsmEngine
from csmserve.engine.scheduler import Piece


class GenerateThenChunk:
    """A step model whose one "frame" per request is the whole utterance from ``model.generate``."""

    def __init__(self, loaded):
        self.loaded = loaded

    def next_piece(self, stream):
        if stream.state is not None:
            return None
        stream.state = True
        return Piece(length=0, max_frames=1)

    def enter(self, stream, slot):
        pass

    def start_piece(self, row):
        pass

    def copy(self, copies):
        pass

    def leave(self, stream, slot):
        pass

    def prefill(self, chunks):
        pass

    def decode(self, rows):
        from csmserve.engine.worker import Frame

        return [Frame([0], self._whole(row.stream.request)) for row in rows]

    def _whole(self, request) -> np.ndarray:
        model, processor = self.loaded.model, self.loaded.processor
        ids = processor(f"[{request.speaker_id}]{request.text}", add_special_tokens=True, return_tensors="pt")["input_ids"]
        ids = ids.to(model.device)
        with torch.inference_mode():
            codes = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max(1, request.max_audio_ms // FRAME_MS),
                suppress_tokens=[2048, 2049, 2050],
                depth_decoder_suppress_tokens=[2048, 2049, 2050],
            )[0]
            audio = model.codec_model.decode(codes.T[None]).audio_values[0, 0]
        return audio.float().cpu().numpy()


class GenerateThenChunkEngine(CsmEngine):
    """Same worker, same prompt, same sampling settings; no streaming."""

    def _attach(self, loaded, started: float) -> None:
        super()._attach(loaded, started)
        self._worker.attach(GenerateThenChunk(loaded), self._worker.scheduler.max_batch)
