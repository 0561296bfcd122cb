"""The CSM engine: the loaded model behind the batching worker, and what a request means to it.

A request is one or more pieces (sentence groups of its text). For each piece :class:`CsmSteps` builds
the prompt (voice and context turns, then ``"[{speaker_id}]{text}"`` with the processor's special
tokens, as the model card does); the worker prefills it into the request's slot and then decodes one
frame per step together with every other active stream (:class:`~csmserve.engine.runner.BatchRunner`),
each frame decoded at once by the batched streaming Mimi decoder, so the first audio leaves one step
after the prefill, whatever the length of the text and however many streams are talking.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np

from csmserve.config import DEFAULT_MODEL, OFFLINE_MODEL, Settings
from csmserve.engine import Capacity, EngineInfo, SynthesisRequest
from csmserve.engine.scheduler import Piece, Row, is_end_of_audio
from csmserve.engine.worker import Frame, ModelWorker, Stream, synthesize_on

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


def choose_model(settings: Settings) -> tuple[str, str]:
    """The model to load, and why (for the log, and for a load failure's message).

    The offline model (random weights: noise) only when nothing was asked for (no ``--model``, no
    Hugging Face token, no cached copy of sesame/csm-1b) or when it is named (``--model offline``).
    Anything else loads or stops start-up: it never turns into the offline model.
    """
    if settings.model == OFFLINE_MODEL:
        return str(ensure_offline_model(settings.offline_model_dir)), "asked for by name (--model offline)"
    if settings.model:
        return settings.model, "named by --model / CSM_MODEL"
    from csmserve.engine.loading import hub_token, is_cached

    if hub_token():
        return DEFAULT_MODEL, "a Hugging Face token is set (HF_TOKEN or `hf auth login`)"
    if is_cached(DEFAULT_MODEL):
        return DEFAULT_MODEL, "it is in the Hugging Face cache"
    reason = "no model was named and there is neither a Hugging Face token nor a cached copy of " + DEFAULT_MODEL
    return str(ensure_offline_model(settings.offline_model_dir)), reason


OFFLINE_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! csmserve is running the OFFLINE MODEL: random weights, its audio is NOISE.\n"
    "!! For the real voice: accept the licence at https://huggingface.co/sesame/csm-1b,\n"
    "!! export HF_TOKEN=<read token>, and restart (or pass --model).\n" + "!" * 78
)


@dataclass
class _Utterance:
    """One request's progress through its pieces (worker thread only)."""

    builder: Any
    voice: list
    context: list
    pieces: list[str]
    remaining: int
    index: int = -1
    generated: list = field(default_factory=list)  # codes of the current piece's frames
    sampling: Any = None
    embeds: Any = None


class CsmSteps:
    """The CSM model as the worker's :class:`~csmserve.engine.worker.StepModel`: pieces, prompts, the
    batched frame step and the batched streaming codec. Worker thread only."""

    def __init__(self, loaded, settings: Settings, max_batch: int, compile: bool):
        from csmserve.engine.mimi_stream import BatchedMimiDecoder
        from csmserve.engine.runner import BatchRunner

        self.loaded = loaded
        self.settings = settings
        self.runner = BatchRunner(loaded.model, slots=max_batch, compile=compile)
        self.decoder = BatchedMimiDecoder(loaded.model.codec_model, max_batch)
        self.frame_size = self.decoder.frame_size

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """Mimi codes ``(frames, 32)`` int16 for mono float32 audio at 24 kHz."""
        import torch

        codec = self.loaded.model.codec_model
        with torch.inference_mode():
            values = torch.as_tensor(np.asarray(audio, dtype=np.float32), device=self.runner.device)[None, None]
            codes = codec.encode(values.to(codec.dtype)).audio_codes[0]  # (32, frames)
        return codes.T.cpu().numpy().astype(np.int16)

    def _turns(self, turns) -> list:
        from csmserve.engine.prompt import Turn

        out = []
        for turn in turns:
            codes = turn.codes
            if codes is None and turn.audio is not None and len(turn.audio):
                codes = self.encode_audio(turn.audio)
            out.append(Turn(turn.speaker_id, turn.text, codes))
        return out

    def _start(self, request: SynthesisRequest) -> _Utterance:
        from csmserve.engine.prompt import PromptBuilder
        from csmserve.text.sentences import chunk_for_window, split_sentences

        carry = request.continuation
        context = self._turns(request.context) + ([carry.previous] if carry and carry.previous else [])
        return _Utterance(
            builder=PromptBuilder(self.loaded.processor.tokenizer, self.runner),
            voice=self._turns(request.voice),
            context=context,
            pieces=chunk_for_window(split_sentences(request.text), self.settings.max_chars_per_generation),
            remaining=max(1, request.max_audio_ms // FRAME_MS),
        )

    # -- StepModel ----------------------------------------------------------------------------------
    def next_piece(self, stream: Stream) -> Piece | None:
        import torch

        from csmserve.engine.prompt import Turn
        from csmserve.engine.runner import RowSampling

        request = stream.request
        if stream.state is None:
            stream.state = self._start(request)
        u: _Utterance = stream.state
        if u.generated:  # the piece that just ended: the next one hears it (same voice, continuous prosody)
            last = Turn(request.speaker_id, u.pieces[u.index], torch.stack(u.generated).numpy())
            u.context.append(last)
            u.remaining -= len(u.generated)
            if request.continuation is not None:
                request.continuation.previous = last
            u.generated = []
        u.index += 1
        if u.index >= len(u.pieces) or u.remaining <= 0:
            return None
        piece = u.pieces[u.index]
        # The piece's own share of the audio budget, so one sentence cannot starve the rest.
        share = self.settings.audio_budget_ms(piece) // FRAME_MS if len(u.pieces) > 1 else u.remaining
        budget = min(u.remaining, max(1, share))
        builder, window = u.builder, self.runner.max_positions
        target = builder.token_ids(request.speaker_id, piece).shape[1]
        kept_voice = builder.fit(u.voice, target, budget, window)
        used = sum(builder.positions(t) for t in kept_voice)
        kept = kept_voice + builder.fit(u.context, target + used, budget, window)
        u.embeds = builder.embeddings(kept, request.speaker_id, piece)
        length = u.embeds.shape[1]
        if length >= window:
            from csmserve.errors import InvalidRequest

            raise InvalidRequest(f"the prompt takes {length} positions and leaves no room in the model's {window}")
        seed = None if request.seed is None else request.seed + u.index
        u.sampling = RowSampling.create(self.runner, temperature=request.temperature, top_k=request.top_k, seed=seed)
        key = builder.key(kept, request.speaker_id, piece) if self.settings.prefix_cache else None
        return Piece(length=length, max_frames=min(budget, window - length), key=key)

    def enter(self, stream: Stream, slot: int) -> None:
        carry = stream.request.continuation
        if carry is not None and carry.engine_state is not None:  # the stream's codec state: no seam
            self.decoder.load(slot, carry.engine_state)
        else:
            self.decoder.reset([slot])

    def prefill(self, row: Row, start: int, length: int) -> None:
        self.runner.prefill(row.slot, row.stream.state.embeds[:, start : start + length], start)

    def decode(self, rows: list[Row]) -> list[Frame | None]:
        slots = [row.slot for row in rows]
        codes = self.runner.frame(slots, [row.stream.state.sampling for row in rows])
        eos = self.runner.eos_id
        going = [i for i in range(len(rows)) if not is_end_of_audio(codes[i].tolist(), eos)]
        out: list[Frame | None] = [None] * len(rows)
        if not going:
            return out
        kept = codes[going]
        kept_slots = [slots[i] for i in going]
        audio = self.decoder.decode(kept[:, :, None], kept_slots).numpy()
        positions = [rows[i].piece.length + rows[i].frames for i in going]
        self.runner.advance(kept_slots, positions, kept)
        for j, i in enumerate(going):
            rows[i].stream.state.generated.append(kept[j])
            out[i] = Frame(kept[j].tolist(), audio[j])
        return out

    def leave(self, stream: Stream, slot: int) -> None:
        carry = stream.request.continuation
        if carry is not None:
            carry.engine_state = self.decoder.save(slot)


class CsmEngine:
    """Serves ``CsmForConditionalGeneration`` from one batching worker thread. See :class:`csmserve.engine.Engine`."""

    sample_rate = 24_000

    def __init__(self, settings: Settings, *, from_pretrained=None, loaded=None):
        """``loaded``: an already loaded :class:`~csmserve.engine.loading.LoadedModel` to serve
        (benchmarks build the full-size architecture in memory); otherwise ``start()`` loads."""
        self.settings = settings
        self.info = EngineInfo(name="csm", model=settings.model or DEFAULT_MODEL)
        self._from_pretrained = from_pretrained
        self._preloaded = loaded
        self._worker = ModelWorker(
            setup=self._thread_setup,
            max_batch=1,  # until the model is loaded and the device known
            max_queued=settings.max_queue,
            prefill_chunk=settings.prefill_chunk,
            prefix_reuse=settings.prefix_cache,
            max_lag_s=settings.max_lag_s,
        )
        self._loaded = None
        self._steps: CsmSteps | None = None
        self.frame_size = 1920

    def _thread_setup(self) -> None:
        import torch

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)

    async def start(self) -> None:
        self._worker.start()
        await self._worker.call(self._load)
        if self.settings.warmup:
            started = time.monotonic()
            warm = SynthesisRequest(text="Hello.", max_audio_ms=2 * FRAME_MS, seed=0)
            async for _ in self._worker.stream(warm):
                pass
            log.info("warm-up done in %.1f s", time.monotonic() - started)
        self.info.ready = True

    async def close(self) -> None:
        self._worker.stop()

    def capacity(self) -> Capacity:
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
        model_ref, why = choose_model(self.settings)
        self.info.model = model_ref
        log.info("model: %s (%s)", model_ref, why)
        started = time.monotonic()
        try:
            loaded = load_csm(
                model_ref, self.settings.device, self.settings.dtype, from_pretrained=self._from_pretrained
            )
        except ModelLoadError as exc:
            if self.settings.model or model_ref != DEFAULT_MODEL:  # the message says it all
                raise
            # Chosen for the operator (a token, a cache): say why, and that no noise will be served instead.
            raise type(exc)(
                f"{exc.message} ({model_ref} was chosen because {why}; csmserve does not fall back to the "
                f"offline model, whose audio is noise: fix the above, or start it by name with --model {OFFLINE_MODEL})"
            ) from None
        self._attach(loaded, started)

    def _attach(self, loaded, started: float) -> None:
        from csmserve.engine.tiny import is_offline_model

        self._loaded = loaded
        self.info.device, self.info.dtype = loaded.device, loaded.dtype
        self.info.offline_model = is_offline_model(loaded.model.config)
        self.sample_rate = int(loaded.model.config.codec_config.sampling_rate)
        use_compile = self.settings.compile == "on" or (self.settings.compile == "auto" and loaded.device == "cuda")
        max_batch = self.settings.resolved_max_batch(loaded.device)
        self._steps = CsmSteps(loaded, self.settings, max_batch, use_compile)
        self._worker.attach(self._steps, max_batch)
        self.info.extra["compiled"] = use_compile
        self.info.extra["max_batch"] = max_batch
        self.frame_size = self._steps.frame_size
        log.info(
            "model loaded in %.1f s (%s, %s, %s), %d streams per step",
            time.monotonic() - started, self.info.model, loaded.device, loaded.dtype, max_batch,
        )
        if self.info.offline_model:
            log.warning(OFFLINE_WARNING)

    @property
    def prefill_positions(self) -> dict[str, int]:
        """Prompt positions prefilled so far: ``computed``, and ``reused`` from the backbone cache."""
        return dict(self._worker.scheduler.prefill_positions)

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """Mimi codes ``(frames, 32)`` int16 for mono float32 audio at 24 kHz. Worker thread only."""
        return self._steps.encode_audio(audio)

    async def encode(self, audio: np.ndarray) -> np.ndarray:
        """:meth:`encode_audio` on the worker thread (between two steps)."""
        return await self._worker.call(lambda: self.encode_audio(audio))

    def synthesize(self, request: SynthesisRequest) -> AsyncIterator[np.ndarray]:
        return synthesize_on(self._worker, self.info, request)
