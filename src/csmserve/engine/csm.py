"""The CSM engine: the loaded model behind the batching worker, and what a request means to it.

A request is one or more pieces (sentence groups of its text). For each piece :class:`CsmSteps` builds
the prompt (voice and context turns, then ``"[{speaker_id}]{text}"`` with the processor's special
tokens, as the model card does); the worker prefills it into the request's slot, together with every
other prompt joining in that step, and then decodes one frame per step together with every other
active stream (:class:`~csmserve.engine.runner.BatchRunner`: the frame and its Mimi decode in one step,
one captured CUDA graph per batch-size bucket on a GPU), so the first audio leaves in the step that
completes the prefill, whatever the length of the text and however many streams are talking.

Before it says it is ready, the engine prepares (captures or compiles) the step of every bucket up to
``max_batch`` and times each, so no stream ever waits on a compilation and ``/health`` can say how many
streams the device holds in real time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from csmserve.config import DEFAULT_MODEL, OFFLINE_MODEL, Settings
from csmserve.engine import FRAME_MS, Capacity, ContextTurn, Continuation, EngineInfo, SynthesisRequest
from csmserve.engine.encoder import Encoder
from csmserve.engine.scheduler import Piece, Row, SlotCopy
from csmserve.engine.worker import Frame, ModelWorker, Stream, synthesize_on
from csmserve.errors import NotReady

log = logging.getLogger(__name__)

#: A step counts as real time when it takes at most this share of a frame (the rest: prefill, the server).
REALTIME_SHARE = 0.8
#: Streams a GPU takes by default, when memory allows.
GPU_MAX_BATCH = 256
#: Share of the free device memory the slots' caches and the step's work may take by default.
GPU_MEMORY_SHARE = 0.8


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


def realtime_streams(step_ms: dict[int, float]) -> int:
    """The largest step size whose step takes at most :data:`REALTIME_SHARE` of a frame (0: none does)."""
    fast = [size for size, ms in step_ms.items() if ms <= REALTIME_SHARE * FRAME_MS]
    return max(fast, default=0)


def slot_bytes(config, dtype_bytes: int) -> int:
    """Device memory one slot takes: its backbone and depth caches, and its share of a step's work."""
    backbone = config.num_hidden_layers * 2 * config.num_key_value_heads * (config.max_position_embeddings + 1)
    backbone *= config.hidden_size // config.num_attention_heads
    depth = config.depth_decoder_config
    depth_kv = depth.num_hidden_layers * 2 * depth.num_key_value_heads * (config.num_codebooks + 1)
    depth_kv *= depth.hidden_size // depth.num_attention_heads
    # The step's noise and scores: int64 hashes and float32 values for every codebook and id, a few times.
    work = config.num_codebooks * config.vocab_size * 8 * 4
    return (backbone + depth_kv) * dtype_bytes + work


def fit_max_batch(free_bytes: int, per_slot: int, limit: int = GPU_MAX_BATCH) -> int:
    """Slots that fit in :data:`GPU_MEMORY_SHARE` of ``free_bytes`` (at least 1, at most ``limit``)."""
    return max(1, min(limit, int(GPU_MEMORY_SHARE * free_bytes) // per_slot))


class CsmSteps:
    """The CSM model as the worker's :class:`~csmserve.engine.worker.StepModel`: pieces, prompts, the
    batched frame step and the batched streaming codec. Worker thread only."""

    def __init__(self, loaded, settings: Settings, max_batch: int, compile: bool, graphs: bool = False):
        from csmserve.engine.runner import BatchRunner

        self.loaded = loaded
        self.settings = settings
        self.runner = BatchRunner(loaded.model, slots=max_batch, compile=compile, graphs=graphs)
        self.decoder = self.runner.decoder
        self.frame_size = self.runner.frame_size
        #: The last decode step's device time (a GPU's), for the worker's timings.
        self.last_device_ms: float | None = None
        #: On a GPU, the CUDA stream the encoder thread queues its work on (made on first use).
        self._encode_stream = None

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """Mimi codes ``(frames, 32)`` int16 for mono float32 audio at 24 kHz. Runs on the encoder thread
        (:mod:`csmserve.engine.encoder`), beside the steps: it only reads the codec's weights, and on a
        GPU it queues its kernels on a CUDA stream of its own, so the steps never wait behind them."""
        import torch

        codec = self.loaded.model.codec_model
        side = contextlib.nullcontext()
        if self.runner.device.type == "cuda":
            if self._encode_stream is None:
                self._encode_stream = torch.cuda.Stream(self.runner.device)
            side = torch.cuda.stream(self._encode_stream)
        with torch.inference_mode(), side:
            values = torch.as_tensor(np.asarray(audio, dtype=np.float32), device=self.runner.device)[None, None]
            codes = codec.encode(values.to(codec.dtype)).audio_codes[0]  # (32, frames)
            return codes.T.cpu().numpy().astype(np.int16)  # waits for the side stream's work

    @staticmethod
    def _turns(turns) -> list:
        """The engine's turns for a request's (their audio already encoded: :meth:`CsmEngine.synthesize`)."""
        from csmserve.engine.prompt import Turn

        return [Turn(turn.speaker_id, turn.text, turn.codes) for turn in turns]

    def _start(self, request: SynthesisRequest, carry: dict) -> _Utterance:
        from csmserve.engine.prompt import PromptBuilder
        from csmserve.text.sentences import chunk_for_window, split_sentences

        previous = carry.get("previous")
        context = self._turns(request.context) + ([previous] if previous is not None else [])
        return _Utterance(
            builder=PromptBuilder(self.loaded.processor.tokenizer, self.runner),
            voice=self._turns(request.voice),
            context=context,
            pieces=chunk_for_window(split_sentences(request.text), self.settings.max_chars_per_generation),
            remaining=max(1, request.max_audio_ms // FRAME_MS),
        )

    # -- StepModel ----------------------------------------------------------------------------------
    def next_piece(self, stream: Stream) -> Piece | None:
        from csmserve.engine.prompt import Turn
        from csmserve.engine.runner import RowSampling

        request = stream.request
        if stream.state is None:
            stream.state = self._start(request, stream.carry)
        u: _Utterance = stream.state
        if u.generated:  # the piece that just ended: the next one hears it (same voice, continuous prosody)
            last = Turn(request.speaker_id, u.pieces[u.index], np.stack(u.generated))
            u.context.append(last)
            u.remaining -= len(u.generated)
            if request.continuation is not None:
                stream.carry["previous"] = last
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
        u.sampling = RowSampling.create(self.runner.defaults, temperature=request.temperature, top_k=request.top_k, seed=seed)
        key = None
        if self.settings.prefix_cache:  # the voice's positions are everyone's; the rest the tenant's own
            key = builder.key(kept, request.speaker_id, piece, owner=request.tenant, shared=len(kept_voice))
        return Piece(length=length, max_frames=min(budget, window - length), key=key, owner=request.tenant)

    def enter(self, stream: Stream, slot: int) -> None:
        codec = stream.carry.get("codec")
        if codec is not None:  # the text stream's codec state: no seam
            self.decoder.load(slot, codec)
        else:
            self.decoder.reset([slot])

    def start_piece(self, row: Row) -> None:
        self.runner.start(row.slot, row.stream.state.sampling, reset_codec=False)  # the codec is enter()'s

    def copy(self, copies: list[SlotCopy]) -> None:
        for copy in copies:
            if copy.row is not None:
                self.runner.move(copy.src, copy.dst, copy.positions)
            else:
                self.runner.copy_prefix(copy.src, copy.dst, copy.positions)

    def prefill(self, chunks: list[tuple[Row, int, int]]) -> None:
        self.runner.prefill([(row.slot, start, row.stream.state.embeds[0, start : start + length]) for row, start, length in chunks])

    def decode(self, rows: list[Row]) -> list[Frame | None]:
        out = self.runner.decode([(row.slot, row.piece.length + row.frames, row.frames) for row in rows])
        self.last_device_ms = out.device_ms
        frames: list[Frame | None] = []
        for row in rows:
            if out.eos[row.slot]:
                frames.append(None)
                continue
            codes = out.codes[row.slot]
            row.stream.state.generated.append(codes)
            frames.append(Frame(codes.tolist(), out.audio[row.slot].copy()))
        return frames

    def leave(self, stream: Stream, slot: int) -> None:
        if stream.request.continuation is not None:
            stream.carry["codec"] = self.decoder.save(slot)


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
            max_queued=settings.resolved_max_queue(1),
            prefill_chunk=settings.resolved_prefill_chunk("cpu"),
            prefix_reuse=settings.prefix_cache,
            max_lag_s=settings.max_lag_s,
        )
        #: Voice clips and context turns are encoded here, beside the model thread (never between its steps).
        self._encoder = Encoder(name="csm-encoder")
        self._loaded = None
        self._steps: CsmSteps | None = None
        self.frame_size = 1920

    def _thread_setup(self) -> None:
        import torch

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        if self.settings.compile_cache_dir is not None:  # read by inductor when it first compiles
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.settings.compile_cache_dir)

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
        self._encoder.stop()

    def capacity(self) -> Capacity:
        return self._worker.capacity()

    @property
    def worker(self) -> ModelWorker:
        """The model thread (an engine process bridges to it)."""
        return self._worker

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
        settings = self.settings
        self.info.device, self.info.dtype = loaded.device, loaded.dtype
        self.info.offline_model = is_offline_model(loaded.model.config)
        self.sample_rate = int(loaded.model.config.codec_config.sampling_rate)
        cuda = loaded.device.startswith("cuda")
        use_compile = settings.compile == "on"
        graphs = cuda and settings.cuda_graphs
        max_batch = self._max_batch(loaded)
        self._steps = CsmSteps(loaded, settings, max_batch, use_compile, graphs)
        self._worker.attach(self._steps, max_batch, settings.resolved_prefill_chunk(loaded.device))
        self._worker.resize_queue(settings.resolved_max_queue(max_batch))
        self.info.extra.update(compiled=use_compile, cuda_graphs=graphs, max_batch=max_batch)
        self.frame_size = self._steps.frame_size
        log.info(
            "model loaded in %.1f s (%s, %s, %s), %d streams per step",
            time.monotonic() - started, self.info.model, loaded.device, loaded.dtype, max_batch,
        )
        if settings.warmup or graphs or use_compile:
            self._prepare()
        if self.info.offline_model:
            log.warning(OFFLINE_WARNING)

    def _max_batch(self, loaded) -> int:
        """``max_batch``, or its default: on a GPU as many slots as fit in the free memory (up to 256)."""
        if self.settings.max_batch is not None or not loaded.device.startswith("cuda"):
            return self.settings.resolved_max_batch(loaded.device)
        import torch

        free, _ = torch.cuda.mem_get_info(loaded.model.device)
        per_slot = slot_bytes(loaded.model.config, loaded.model.lm_head.weight.element_size())
        return fit_max_batch(free, per_slot)

    def _prepare(self) -> None:
        """Capture (or compile, or just time) the step of every bucket before any stream runs."""
        started = time.monotonic()
        reports = self._steps.runner.prepare()
        step_ms = {report.size: report.step_ms for report in reports}
        self._worker.realtime_streams = realtime_streams(step_ms)
        self.info.extra["step_ms"] = {str(size): round(ms, 2) for size, ms in step_ms.items()}
        log.info(
            "%d step sizes prepared in %.1f s; %d streams in real time on this device",
            len(reports), time.monotonic() - started, self._worker.realtime_streams,
        )

    @property
    def prefill_positions(self) -> dict[str, int]:
        """Prompt positions prefilled so far: ``computed``, and ``reused`` from the backbone cache."""
        return dict(self._worker.scheduler.prefill_positions)

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """Mimi codes ``(frames, 32)`` int16 for mono float32 audio at 24 kHz (on the calling thread)."""
        return self._steps.encode_audio(audio)

    async def encode(self, audio: np.ndarray) -> np.ndarray:
        """:meth:`encode_audio` on the encoder thread: the talking streams go on stepping meanwhile."""
        if self._steps is None:
            raise NotReady()
        return await self._encoder.run(lambda: self.encode_audio(audio))

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[np.ndarray]:
        """See :class:`csmserve.engine.Engine`; context turns given as audio are encoded first, on the
        encoder thread (never between the model's steps)."""
        if not self.info.ready:
            raise NotReady()
        request = await self.prepared(request)
        async with contextlib.aclosing(synthesize_on(self._worker, self.info, request)) as audio:
            async for piece in audio:
                yield piece

    async def prepared(self, request: SynthesisRequest) -> SynthesisRequest:
        """``request`` with the audio of its turns replaced by their codes (encoded on the encoder thread,
        never between the model's steps; an engine process does this before it queues a request)."""

        async def encoded(turns: tuple[ContextTurn, ...]) -> tuple[ContextTurn, ...]:
            out = []
            for turn in turns:
                if turn.codes is None and turn.audio is not None and len(turn.audio):
                    turn = replace(turn, codes=await self.encode(turn.audio), audio=None)
                out.append(turn)
            return tuple(out)

        return replace(request, voice=await encoded(request.voice), context=await encoded(request.context))

    def release(self, continuation: Continuation) -> None:
        self._worker.release(continuation.id)
