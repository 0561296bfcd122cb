"""The approach the platform started from, kept only to measure against: generate the whole
utterance with ``model.generate``, decode it in one go, then cut it into chunks."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import torch

from csmserve.engine import SynthesisRequest
from csmserve.engine.csm import CsmEngine


class GenerateThenChunkEngine(CsmEngine):
    """Same worker, same prompt, same sampling settings; no streaming."""

    def _generate(self, request: SynthesisRequest, cancelled: threading.Event) -> Iterator[np.ndarray]:
        model = self._loaded.model
        ids = self.prompt_ids(request).to(model.device)
        with torch.inference_mode():
            codes = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_frames(request),
                suppress_tokens=[2048, 2049, 2050],
                depth_decoder_suppress_tokens=[2048, 2049, 2050],
            )[0]
            audio = model.codec_model.decode(codes.T[None]).audio_values[0, 0]
        yield audio.float().cpu().numpy()
