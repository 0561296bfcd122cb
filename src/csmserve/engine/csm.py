"""The CSM engine: the loaded model, its frame loop and streaming codec, behind one worker thread.

For each request the worker builds the prompt ``"[{speaker_id}]{text}"`` with the processor (with
special tokens, as the model card does), runs :class:`FrameGenerator` and decodes each frame with
:class:`StreamingMimiDecoder` as soon as it exists, so the first audio leaves after one frame,
whatever the length of the text.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np

from csmserve.config import DEFAULT_MODEL, Settings
from csmserve.engine import EngineInfo, SynthesisRequest
from csmserve.engine.worker import ModelWorker, synthesize_on

log = logging.getLogger(__name__)

FRAME_MS = 80


def ensure_offline_model(directory: Path) -> Path:
    """The offline checkpoint in ``directory``, written there on first use."""
    from csmserve.engine.tiny import OFFLINE_MARKER, make_tiny_model

    config = directory / "config.json"
    if config.is_file() and OFFLINE_MARKER in config.read_text():
        return directory
    log.info("writing the offline model to %s", directory)
    return make_tiny_model(directory)


def choose_model(settings: Settings) -> tuple[str, bool]:
    """The model to load and whether it was chosen implicitly (``settings.model`` unset)."""
    if settings.model:
        return settings.model, False
    from csmserve.engine.loading import default_model_available

    if default_model_available():
        return DEFAULT_MODEL, True
    return str(ensure_offline_model(settings.offline_model_dir)), True


OFFLINE_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! csmserve is running the OFFLINE MODEL: random weights, its audio is NOISE.\n"
    "!! For the real voice: accept the licence at https://huggingface.co/sesame/csm-1b,\n"
    "!! export HF_TOKEN=<read token>, and restart (or pass --model).\n" + "!" * 78
)


class CsmEngine:
    """Serves ``CsmForConditionalGeneration`` from one worker thread. See :class:`csmserve.engine.Engine`."""

    sample_rate = 24_000

    def __init__(self, settings: Settings, *, from_pretrained=None, loaded=None):
        """``loaded``: an already loaded :class:`~csmserve.engine.loading.LoadedModel` to serve
        (benchmarks build the full-size architecture in memory); otherwise ``start()`` loads."""
        self.settings = settings
        self.info = EngineInfo(name="csm", model=settings.model or DEFAULT_MODEL)
        self._from_pretrained = from_pretrained
        self._preloaded = loaded
        self._worker = ModelWorker(setup=self._thread_setup, max_queued=settings.max_queue)
        self._loaded = None
        self._frames = None
        self._decoder = None
        self.frame_size = 1920

    def _thread_setup(self) -> None:
        import torch

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)

    async def start(self) -> None:
        self._worker.start()
        await self._worker.call(self._load)

    async def close(self) -> None:
        self._worker.stop()

    def capacity(self):
        return self._worker.capacity()

    # -- worker thread ------------------------------------------------------------------------
    def _load(self) -> None:
        from csmserve.engine.loading import require_csm
        from csmserve.errors import CsmServeError, ModelLoadError

        require_csm()  # before anything imports transformers' model code
        try:
            self._load_model()
        except CsmServeError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever breaks here is a load failure
            log.exception("model load failed")
            raise ModelLoadError(f"model load failed: {type(exc).__name__}: {exc}") from exc

    def _load_model(self) -> None:
        from csmserve.engine.loading import load_csm
        from csmserve.errors import ModelLoadError

        if self._preloaded is not None:
            self.info.model = str(self._preloaded.path)
            self._attach(self._preloaded, time.monotonic())
            return
        model_ref, implicit = choose_model(self.settings)
        self.info.model = model_ref
        started = time.monotonic()
        try:
            loaded = load_csm(
                model_ref, self.settings.device, self.settings.dtype, from_pretrained=self._from_pretrained
            )
        except ModelLoadError as exc:
            if not implicit or model_ref != DEFAULT_MODEL:
                raise
            log.error("%s", exc.message)
            log.warning("falling back to the offline model because no model was configured")
            model_ref = str(ensure_offline_model(self.settings.offline_model_dir))
            self.info.model = model_ref
            loaded = load_csm(model_ref, self.settings.device, self.settings.dtype)
        self._attach(loaded, started)

    def _attach(self, loaded, started: float) -> None:
        from csmserve.engine.frames import FrameGenerator
        from csmserve.engine.mimi_stream import StreamingMimiDecoder
        from csmserve.engine.tiny import is_offline_model

        self._loaded = loaded
        self.info.device, self.info.dtype = loaded.device, loaded.dtype
        self.info.offline_model = is_offline_model(loaded.model.config)
        self.sample_rate = int(loaded.model.config.codec_config.sampling_rate)
        use_compile = self.settings.compile == "on" or (self.settings.compile == "auto" and loaded.device == "cuda")
        self._frames = FrameGenerator(loaded.model, compile=use_compile)
        self.info.extra["compiled"] = use_compile
        self._decoder = StreamingMimiDecoder(loaded.model.codec_model)
        self.frame_size = self._decoder.frame_size
        log.info("model loaded in %.1f s (%s, %s, %s)", time.monotonic() - started, self.info.model, loaded.device, loaded.dtype)
        if self.info.offline_model:
            log.warning(OFFLINE_WARNING)
        if self.settings.warmup:
            started = time.monotonic()
            for _ in self._generate(SynthesisRequest(text="Hello.", max_audio_ms=2 * FRAME_MS, seed=0), threading.Event()):
                pass
            log.info("warm-up done in %.1f s", time.monotonic() - started)
        self.info.ready = True

    @property
    def prefill_positions(self) -> dict[str, int]:
        """Prompt positions prefilled so far: ``computed``, and ``reused`` from the backbone cache."""
        if self._frames is None:  # not loaded yet
            return {"computed": 0, "reused": 0}
        return dict(self._frames.prefill_positions)

    def prompt_ids(self, request: SynthesisRequest):
        """Token ids ``(1, T)`` for ``"[speaker]text"`` with BOS/EOS, exactly as the model card builds them."""
        inputs = self._loaded.processor(f"[{request.speaker_id}]{request.text}", add_special_tokens=True)
        return inputs["input_ids"]

    def max_frames(self, request: SynthesisRequest) -> int:
        return max(1, request.max_audio_ms // FRAME_MS)

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """Mimi codes ``(frames, 32)`` int16 for mono float32 audio at 24 kHz. Worker thread only."""
        import torch

        codec = self._loaded.model.codec_model
        device = self._frames.device
        with torch.inference_mode():
            values = torch.as_tensor(np.asarray(audio, dtype=np.float32), device=device)[None, None]
            codes = codec.encode(values.to(codec.dtype)).audio_codes[0]  # (32, frames)
        return codes.T.cpu().numpy().astype(np.int16)

    async def encode(self, audio: np.ndarray) -> np.ndarray:
        """:meth:`encode_audio` on the worker thread (after queued requests)."""
        return await self._worker.call(lambda: self.encode_audio(audio))

    def _turns(self, turns) -> list:
        from csmserve.engine.prompt import Turn

        out = []
        for turn in turns:
            if isinstance(turn, Turn):
                out.append(turn)
                continue
            codes = turn.codes
            if codes is None and turn.audio is not None and len(turn.audio):
                codes = self.encode_audio(turn.audio)
            out.append(Turn(turn.speaker_id, turn.text, codes))
        return out

    def _generate(self, request: SynthesisRequest, cancelled: threading.Event) -> Iterator[np.ndarray]:
        """Frames of ``request`` decoded one by one, sentence group after sentence group, into one
        continuous stream (the codec state carries across groups, so there is no seam)."""
        import torch

        from csmserve.engine.prompt import PromptBuilder, Turn
        from csmserve.text.sentences import chunk_for_window, split_sentences

        frames, decoder = self._frames, self._decoder
        builder = PromptBuilder(self._loaded.processor.tokenizer, frames)
        carry = request.continuation
        if carry is None:
            decoder.reset()
        else:  # a stream's own codec state, so its sentences join without a seam
            if carry.engine_state is None:
                from csmserve.engine.mimi_stream import StreamingMimiDecoder

                carry.engine_state = StreamingMimiDecoder(self._loaded.model.codec_model)
            decoder = carry.engine_state
        voice = self._turns(request.voice)
        context = self._turns(request.context) + ([carry.previous] if carry and carry.previous else [])
        pieces = chunk_for_window(split_sentences(request.text), self.settings.max_chars_per_generation)
        remaining = self.max_frames(request)
        window = frames.max_positions
        for index, piece in enumerate(pieces):
            if remaining <= 0 or cancelled.is_set():
                return
            # The piece's own share of the audio budget, so one sentence cannot starve the rest.
            share = self.settings.audio_budget_ms(piece) // FRAME_MS if len(pieces) > 1 else remaining
            budget = min(remaining, max(1, share))
            target = builder.token_ids(request.speaker_id, piece).shape[1]
            kept_voice = builder.fit(voice, target, budget, window)
            used = sum(builder.positions(t) for t in kept_voice)
            kept = kept_voice + builder.fit(context, target + used, budget, window)
            embeds = builder.embeddings(kept, request.speaker_id, piece)
            seed = None if request.seed is None else request.seed + index
            generated = []
            key = builder.key(kept, request.speaker_id, piece) if self.settings.prefix_cache else None
            codes_iter = frames.frames(
                embeds, budget, temperature=request.temperature, top_k=request.top_k, seed=seed, prompt_key=key
            )
            try:
                for codes in codes_iter:
                    if cancelled.is_set():
                        return
                    generated.append(codes)
                    with torch.inference_mode():
                        audio = decoder.decode(codes[:, None].to(frames.device))
                    yield audio.float().cpu().numpy()
            finally:
                codes_iter.close()
            remaining -= len(generated)
            if generated:
                # The next piece hears this one: same voice, continuous prosody.
                last = Turn(request.speaker_id, piece, torch.stack(generated).numpy())
                context = context + [last]
                if carry is not None:
                    carry.previous = last

    def synthesize(self, request: SynthesisRequest) -> AsyncIterator[np.ndarray]:
        return synthesize_on(self._worker, self.info, lambda cancelled: self._generate(request, cancelled))
