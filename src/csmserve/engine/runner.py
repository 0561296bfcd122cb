"""Executes the scheduler's steps on the model: the prompts joining in a step in one prefill, and one frame
for every decoding row in one step, captured as one CUDA graph per batch-size bucket on a GPU.

A frame step runs over the first ``S`` slots (``S``: the bucket holding the highest decoding slot; the
scheduler keeps busy rows packed at the bottom) and reads only buffers allocated here, once:

1. one host-to-device copy of each slot's ``(position, active, frame)`` from a pinned buffer;
2. the step itself (a graph replay on a GPU): codebook 0 from each row's last backbone hidden state, the
   depth decoder's 31 codebook steps (unrolled), each sampled from the slot's settings with noise keyed
   by its seed and frame counter (:mod:`~csmserve.engine.sampling`), the end-of-audio flag, the backbone
   reading the new frame at each row's position, and the streaming Mimi decode of the frame. Rows that are not
   decoding (no credit, still prefilling, an empty slot) and rows that reached end-of-audio are masked:
   their keys/values go to the scratch position and their hidden and codec state stay as they were;
3. one device-to-host copy of codes, end-of-audio flags and audio (packed in one float32 buffer: code
   ids are exact in float32), then one wait on an event, which releases the interpreter lock.

Nothing in a step syncs with the host, allocates from host data or depends on how many rows are real,
so a step is the same sequence of operations at 1 row and at 256, and a row's codes never depend on
its neighbours (float32: exactly; the tests compare with solo runs). Each bucket has two variants: 64
sampling candidates per codebook when every decoding row's top-k fits (the default top-k is 50), and
every id otherwise; the host picks one per step. The graphs are captured before the engine says it is
ready (:meth:`BatchRunner.prepare`); on a CPU the same step runs eagerly (or through ``torch.compile``
without graphs).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from csmserve.engine.kv_stack import KVCachedStack
from csmserve.engine.mimi_stream import BatchedMimiDecoder
from csmserve.engine.sampling import GREEDY, RowSampling, Sampling, SamplingTable, candidates, pick, row_keys
from csmserve.engine.scheduler import BUCKETS, bucket, buckets_for

log = logging.getLogger(__name__)

__all__ = ["BUCKETS", "GREEDY", "BatchRunner", "BucketReport", "RowSampling", "Sampling", "StepOutput", "bucket"]

#: Eager runs of a bucket before its capture (cuDNN and cuBLAS pick their algorithms on first use).
_WARMUPS = 3
#: Sampling candidates of a step when every decoding row's top-k fits (CSM's default top-k is 50): a
#: step variant that sorts 64 ids instead of all 2048 per codebook. Rows without top-k use the full one.
SMALL_TOP_K = 64


@dataclass
class StepOutput:
    """One step's results for slots ``0 .. S-1``, read back on the host: ``codes`` ``(S, num_codebooks)``
    int64, ``eos`` ``(S,)`` bool (the frame is the end-of-audio frame), ``audio`` ``(S, frame_size)`` float32
    views of the runner's host buffer (copy what you keep: the next step overwrites them). Rows that were
    not decoding hold meaningless values. ``device_ms``: the step's time on the GPU (``None`` on a CPU)."""

    codes: np.ndarray
    eos: np.ndarray
    audio: np.ndarray
    device_ms: float | None = None


@dataclass(frozen=True)
class BucketReport:
    """What preparing one bucket cost and what a step at that size takes (median of a few)."""

    size: int
    prepare_s: float
    step_ms: float
    memory_mb: float | None = None


class BatchRunner:
    """The model side of batching over a loaded ``CsmForConditionalGeneration``.

    Owns every buffer a step touches, allocated here once for ``slots`` rows: the backbone cache
    (``max_position_embeddings`` positions per slot plus a scratch position), the depth decoder's
    one-frame cache, each slot's last backbone hidden state, the sampling table, the streaming codec's
    state, and the step's input and output buffers (pinned on the host). Not thread-safe: the model
    thread is its only user.
    """

    def __init__(self, model, slots: int = 1, *, compile: bool = False, graphs: bool | None = None, backend: str = "inductor"):
        """``compile``: run the step through ``torch.compile`` (``backend``; fused kernels, full graph, one
        specialisation per bucket, compiled by :meth:`prepare`). ``graphs``: capture each bucket's step in
        a CUDA graph (default: on a CUDA device)."""
        config = model.config
        self.model = model
        self.slots = slots
        self.num_codebooks = config.num_codebooks
        self.vocab_size = config.vocab_size
        self.valid_ids = min(config.vocab_size, config.codec_config.codebook_size)
        self.eos_id = config.codebook_eos_token_id
        self.max_positions = config.max_position_embeddings
        backbone = model.backbone_model
        depth = model.depth_decoder.model
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.hidden_size = model.lm_head.weight.shape[1]
        # One spare cache row (index ``slots``): the scheduler swaps a prefix through it when it packs rows.
        self.backbone = KVCachedStack(backbone.layers, backbone.norm, backbone.rotary_emb, self.max_positions, slots + 1)
        self.depth = KVCachedStack(depth.layers, depth.norm, depth.rotary_emb, self.num_codebooks, slots)
        self.decoder = BatchedMimiDecoder(model.codec_model, slots)
        self.frame_size = self.decoder.frame_size
        self.audio_embed = backbone.embed_tokens.embed_audio_tokens
        self.depth_embed = depth.embed_tokens
        self.depth_projector = depth.inputs_embeds_projector
        # (num_codebooks - 1, vocab, depth_hidden): head p-1 predicts codebook p. The model stores them
        # (hidden, vocab); a small-batch product with that layout runs at a fraction of memory bandwidth
        # on CPU (8 ms per head in bfloat16, a fifth of the frame), so we keep a copy in nn.Linear's layout.
        self.depth_heads = model.depth_decoder.codebooks_head.weight.detach().transpose(1, 2).contiguous()
        self.audio_offsets = torch.arange(self.num_codebooks, device=self.device) * self.vocab_size
        self.defaults = (
            Sampling.from_generation_config(model.generation_config),
            Sampling.from_generation_config(model.depth_decoder.generation_config),
        )
        cuda = self.device.type == "cuda"
        #: Each slot's last backbone hidden state ``(slots, hidden)``: it predicts the slot's next frame.
        self.hidden = torch.zeros(slots, self.hidden_size, device=self.device, dtype=self.dtype)
        self.sampling = SamplingTable(slots, self.valid_ids, self.device)
        #: The step variants: candidate counts (a small one, and every id).
        self.candidate_counts = sorted({min(SMALL_TOP_K, self.valid_ids), self.valid_ids})
        #: Per slot: the backbone position the new frame is read at, 1 if decoding this step, the frame counter.
        self.inputs = torch.zeros(slots, 3, dtype=torch.long, device=self.device)
        self.inputs_host = torch.zeros(slots, 3, dtype=torch.long, pin_memory=cuda)
        #: Per slot: codes, the end-of-audio flag, then the frame's audio.
        width = self.num_codebooks + 1 + self.frame_size
        self.outputs = torch.zeros(slots, width, dtype=torch.float32, device=self.device)
        self.outputs_host = torch.zeros(slots, width, dtype=torch.float32, pin_memory=cuda)
        self._inputs_np = self.inputs_host.numpy()
        self._outputs_np = self.outputs_host.numpy()
        self.sizes = buckets_for(slots)
        self.graphs = cuda if graphs is None else graphs
        if self.graphs and not cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self.compiled = compile
        self._body = self._step_body
        if compile:
            import torch._dynamo.config as dynamo_config

            # One specialisation per bucket and candidate count (Python ints): allow them all.
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 8 * len(BUCKETS))
            self._body = torch.compile(self._step_body, fullgraph=True, dynamic=False, backend=backend)
        self._captured: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._prepared = False
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        #: Per bucket, the step time measured by :meth:`prepare` (milliseconds; the small-candidate variant).
        self.step_ms: dict[int, float] = {}

    # -- embeddings ---------------------------------------------------------------------------------
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings ``(1, T, hidden)`` for text token ids ``(1, T)``."""
        return self.model.embed_text_tokens(input_ids.to(self.device))

    def embed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """Backbone embeddings ``(1, F, hidden)`` for audio frames ``(F, num_codebooks)``."""
        return self._summed_frames(codes.to(self.device))[None]

    def _summed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """``(F, hidden)``: each frame's codebook embeddings summed (how the backbone reads a frame)."""
        return self.audio_embed(codes + self.audio_offsets).sum(dim=1)

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every buffer a step reads or writes, by name (allocated once; tests check their addresses)."""
        named = {
            "hidden": self.hidden, "inputs": self.inputs, "outputs": self.outputs,
            "inputs_host": self.inputs_host, "outputs_host": self.outputs_host,
        }
        named |= {f"sampling.{name}": t for name, t in self.sampling.buffers().items()}
        for stack_name, stack in (("backbone", self.backbone), ("depth", self.depth)):
            for i, (k, v) in enumerate(zip(stack.keys, stack.values)):
                named[f"{stack_name}.keys.{i}"], named[f"{stack_name}.values.{i}"] = k, v
        named |= {f"codec.{i}": t for i, t in enumerate(self.decoder.buffers())}
        return named

    # -- per-slot state between steps -------------------------------------------------------------------
    def start(self, slot: int, sampling: RowSampling, *, reset_codec: bool = True) -> None:
        """A piece starts on ``slot``: its sampling settings, and (a new utterance) a fresh codec state."""
        self.sampling.write(slot, sampling)
        if reset_codec:
            self.decoder.reset([slot])

    def copy_prefix(self, src: int, dst: int, positions: int) -> None:
        """Slot ``dst`` gets the first ``positions`` keys/values of slot ``src`` (a shared prompt prefix)."""
        with torch.inference_mode():
            self.backbone.copy(src, dst, positions)

    def move(self, src: int, dst: int, positions: int) -> None:
        """The stream on ``src`` continues on ``dst``: its ``positions`` keys/values, hidden state, sampling
        settings and codec state (packing busy rows at the bottom keeps the step's bucket small)."""
        with torch.inference_mode():
            self.backbone.copy(src, dst, positions)
            self.hidden[dst] = self.hidden[src]
            self.sampling.copy(src, dst)
        self.decoder.copy(src, dst)

    # -- prefill ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: Sequence[tuple[int, int, torch.Tensor]]) -> None:
        """Compute prompt chunks ``(slot, start, embeds (L, hidden))`` (distinct slots) in as few forwards
        as padding allows; each chunk's last hidden state becomes its slot's (it predicts the first frame
        once the prompt is done)."""
        for group in _groups(chunks):
            lengths = [embeds.shape[0] for _, _, embeds in group]
            hidden = torch.nn.utils.rnn.pad_sequence([embeds.to(self.dtype) for _, _, embeds in group], batch_first=True)
            slots = torch.tensor([slot for slot, _, _ in group], device=self.device)
            starts = torch.tensor([start for _, start, _ in group], device=self.device)
            last = torch.tensor(lengths, device=self.device)
            end = max(start + n for (_, start, _), n in zip(group, lengths))
            out = self.backbone.prefill_rows(hidden, slots, starts, last, end)
            self.hidden[slots] = out[torch.arange(len(group), device=self.device), last - 1]

    # -- one frame for many rows ----------------------------------------------------------------------
    def decode(self, rows: Sequence[tuple[int, int, int]]) -> StepOutput:
        """One frame for each decoding row ``(slot, position, frame)``: the slot's backbone reads the new
        frame at ``position``; ``frame`` counts the piece's frames (it keys the row's noise). One step over
        the bucket holding the highest slot; one readback."""
        size = bucket(max(slot for slot, _, _ in rows) + 1, self.slots)
        inputs = self._inputs_np[:size]
        inputs[:] = (self.backbone.scratch, 0, 0)
        for slot, position, frame in rows:
            inputs[slot] = (position, 1, frame)
        top_k = candidates([self.sampling.host_top_k[slot] for slot, _, _ in rows], self.candidate_counts[0], self.valid_ids)
        return self._run(size, top_k)

    @torch.inference_mode()
    def _run(self, size: int, top_k: int) -> StepOutput:
        events = self._events
        if events is not None:
            events[0].record()
        self.inputs[:size].copy_(self.inputs_host[:size], non_blocking=True)
        graph = self._captured.get((size, top_k))
        if graph is not None:
            graph.replay()
        elif self.compiled and self._prepared:
            with torch.compiler.set_stance("fail_on_recompile"):  # a new shape is a bug, never a silent stall
                self._body(size, top_k)
        else:
            self._body(size, top_k)
        return self._readback(size)

    def _readback(self, size: int) -> StepOutput:
        """The step's one device-to-host copy, and one wait (which releases the interpreter lock)."""
        host = self.outputs_host[:size]
        host.copy_(self.outputs[:size], non_blocking=True)
        device_ms = None
        if self._events is not None:
            self._events[1].record()
            self._events[1].synchronize()
            device_ms = self._events[0].elapsed_time(self._events[1])
        out = self._outputs_np[:size]
        k = self.num_codebooks
        return StepOutput(out[:, :k].astype(np.int64), out[:, k] > 0.5, out[:, k + 1 :], device_ms)

    def _step_body(self, size: int, top_k: int) -> None:
        """The frame step over slots ``0 .. size-1``, from and into the static buffers only (captured);
        ``top_k``: the sampling candidates per codebook (a constant of the variant)."""
        k = self.num_codebooks
        inputs = self.inputs[:size]
        positions, active, frame = inputs[:, 0], inputs[:, 1], inputs[:, 2]
        hidden = self.hidden[:size]
        table = self.sampling
        keys = row_keys(table.seed[:size], frame, k)  # (size, k): each row's noise key per codebook
        c0 = pick(self.model.lm_head(hidden), table, size, 0, keys[:, :1], top_k)
        codes = [c0]
        first = torch.cat([hidden[:, None], self.depth_embed(c0)[:, None]], dim=1)
        out = self.depth.forward(self.depth_projector(first), 0)[:, -1]
        for p in range(1, k):
            ids = pick(F.linear(out, self.depth_heads[p - 1]), table, size, 1, keys[:, p : p + 1], top_k)
            codes.append(ids)
            if p < k - 1:  # codebook p sits at depth position p + 1
                x = self.depth_projector(self.depth_embed(ids + p * self.vocab_size)[:, None])
                out = self.depth.forward(x, p + 1)[:, -1]
        frame_codes = torch.stack(codes, dim=1)  # (size, k)
        eos = (frame_codes[:, :-1] == self.eos_id).all(dim=1)
        go = (active > 0) & ~eos
        embeds = self._summed_frames(frame_codes)[:, None]
        where = torch.where(go, positions, self.backbone.scratch)
        new = self.backbone.step(embeds, where)[:, 0]
        self.hidden[:size] = torch.where(go[:, None], new, hidden)
        audio = self.decoder.step(frame_codes, go)
        outputs = self.outputs[:size]
        outputs[:, :k] = frame_codes
        outputs[:, k] = eos
        outputs[:, k + 1 :] = audio

    # -- start-up ---------------------------------------------------------------------------------------
    def prepare(self) -> list[BucketReport]:
        """Compile (``compile``) and capture (``graphs``) the step of every bucket, largest first, and time
        a step at each size; before any stream runs (the steps here decode no row and change no state)."""
        reports = []
        gc.collect()
        gc.freeze()  # no collection may run (and free a tensor) during a capture
        try:
            pool = torch.cuda.graph_pool_handle() if self.graphs else None
            for size in sorted(self.sizes, reverse=True):
                reports.append(self._prepare_bucket(size, pool))
        finally:
            gc.unfreeze()
        self._prepared = True
        return sorted(reports, key=lambda r: r.size)

    @torch.inference_mode()
    def _prepare_bucket(self, size: int, pool) -> BucketReport:
        """Every candidate-count variant of one bucket; the report times the small one (the default)."""
        started = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0] if self.graphs else None
        self._inputs_np[:size] = (self.backbone.scratch, 0, 0)
        self.inputs[:size].copy_(self.inputs_host[:size])
        for top_k in self.candidate_counts:
            if self.graphs:
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(_WARMUPS):
                        self._body(size, top_k)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._body(size, top_k)
                self._captured[size, top_k] = graph
            else:
                self._body(size, top_k)  # compiles, when compiled
        prepare_s = time.perf_counter() - started
        times = []
        for _ in range(3):
            begun = time.perf_counter()
            out = self._run(size, self.candidate_counts[0])
            times.append(out.device_ms if out.device_ms is not None else 1000 * (time.perf_counter() - begun))
        self.step_ms[size] = float(np.median(times))
        memory = None
        if free_before is not None:
            memory = (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**20
        log.info(
            "step for %d rows %s in %.1f s: %.1f ms per step%s", size,
            "captured" if self.graphs else ("compiled" if self.compiled else "warmed up"),
            prepare_s, self.step_ms[size], "" if memory is None else f", {memory:.0f} MiB",
        )
        return BucketReport(size, prepare_s, self.step_ms[size], memory)


def _groups(chunks: Sequence[tuple[int, int, torch.Tensor]]) -> list[list[tuple[int, int, torch.Tensor]]]:
    """Chunks in forwards whose padding at most doubles the work: longest first, a chunk joins the current
    forward while (rows x longest) stays within twice the real positions."""
    ordered = sorted(chunks, key=lambda chunk: -chunk[2].shape[0])
    groups: list[list] = []
    for chunk in ordered:
        if groups:
            group = groups[-1]
            longest = group[0][2].shape[0]
            real = sum(c[2].shape[0] for c in group) + chunk[2].shape[0]
            if (len(group) + 1) * longest <= 2 * real:
                group.append(chunk)
                continue
        groups.append([chunk])
    return groups
