"""Executes the scheduler's steps on the model: prefill chunks into a slot, and one frame for many rows at once.

Per decode step, for ``B`` rows at their own backbone positions: codebook 0 from each row's last backbone
hidden state; the depth decoder for all rows together (its 31 codebook steps batched: every row is at
the same depth position); per-row sampling; one host sync for the ``(B, 32)`` codes; then one batched
backbone step reading the new frames (:meth:`BatchRunner.advance`). Rows are independent: a row's codes
never depend on which other rows share its step (float32: exactly; the tests compare with solo runs).

Sampling is the Gumbel-max trick: ``argmax(logits / T + g)`` with ``g`` Gumbel noise is a draw from
``softmax(logits / T)``, and top-k masks the rest first. Each sampled row draws its noise for a whole
frame from its own generator, so a seeded request gets the same audio alone or in any batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from csmserve.engine.kv_stack import KVCachedStack

#: Batch sizes the compiled steps are captured for; a row count in between runs in the next one up.
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings for one stage; ``do_sample=False`` is greedy."""

    do_sample: bool = True
    temperature: float = 0.9
    top_k: int | None = 50

    @classmethod
    def from_generation_config(cls, config) -> Sampling:
        temperature = getattr(config, "temperature", None)
        return cls(
            do_sample=bool(getattr(config, "do_sample", False)),
            temperature=1.0 if temperature is None else float(temperature),
            top_k=getattr(config, "top_k", None),
        )

    def override(self, temperature: float | None = None, top_k: int | None = None) -> Sampling:
        return Sampling(
            do_sample=self.do_sample,
            temperature=self.temperature if temperature is None else temperature,
            top_k=self.top_k if top_k is None else top_k,
        )


GREEDY = Sampling(do_sample=False)


@dataclass
class RowSampling:
    """One row's sampling: the backbone's (codebook 0) and the depth decoder's settings, and the row's
    own random stream (``None`` when both are greedy)."""

    backbone: Sampling
    depth: Sampling
    generator: torch.Generator | None

    @classmethod
    def create(cls, runner: BatchRunner, *, temperature=None, top_k=None, seed=None, greedy=False) -> RowSampling:
        if greedy:
            return cls(GREEDY, GREEDY, None)
        backbone = runner.backbone_sampling.override(temperature, top_k)
        depth = runner.depth_sampling.override(temperature, top_k)
        generator = None
        if backbone.do_sample or depth.do_sample:
            generator = torch.Generator(device=runner.device)
            generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return cls(backbone, depth, generator)


def bucket(rows: int) -> int:
    """The smallest compiled batch size that holds ``rows`` rows."""
    for size in BUCKETS:
        if size >= rows:
            return size
    return rows


class BatchRunner:
    """The model side of batching over a loaded ``CsmForConditionalGeneration``.

    Owns the backbone cache (``slots`` rows of ``max_position_embeddings`` positions), the depth
    decoder's one-frame cache, and each slot's last backbone hidden state. Not thread-safe: the model
    thread is its only user.
    """

    def __init__(self, model, slots: int = 1, compile: bool = False):
        """``compile``: run the one-token steps through ``torch.compile`` with static shapes per batch-size
        bucket (on CUDA with CUDA graphs, ``mode="reduce-overhead"``): one graph replay per step instead
        of dozens of kernel launches. The first steps at each bucket pay the compilation."""
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
        self.backbone = KVCachedStack(backbone.layers, backbone.norm, backbone.rotary_emb, self.max_positions, slots)
        self.depth = KVCachedStack(depth.layers, depth.norm, depth.rotary_emb, self.num_codebooks, slots)
        self.audio_embed = backbone.embed_tokens.embed_audio_tokens
        self.depth_embed = depth.embed_tokens
        self.depth_projector = depth.inputs_embeds_projector
        # (num_codebooks - 1, vocab, depth_hidden): head p-1 predicts codebook p. The model stores them
        # (hidden, vocab); a small-batch product with that layout runs at a fraction of memory bandwidth
        # on CPU (8 ms per head in bfloat16, a fifth of the frame), so we keep a copy in nn.Linear's layout.
        self.depth_heads = model.depth_decoder.codebooks_head.weight.detach().transpose(1, 2).contiguous()
        self.audio_offsets = torch.arange(self.num_codebooks, device=self.device) * self.vocab_size
        self.backbone_sampling = Sampling.from_generation_config(model.generation_config)
        self.depth_sampling = Sampling.from_generation_config(model.depth_decoder.generation_config)
        #: Each slot's last backbone hidden state ``(slots, hidden)``: it predicts the slot's next frame.
        self.hidden = torch.zeros(slots, self.hidden_size, device=self.device, dtype=self.dtype)
        self.compiled = compile
        self._backbone_step = self._backbone_step_eager
        self._depth_step = self._depth_step_eager
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self._backbone_step = torch.compile(self._backbone_step_static, mode=mode, fullgraph=True, dynamic=False)
            self._depth_step = torch.compile(self._depth_step_static, mode=mode, fullgraph=True, dynamic=False)

    # -- embeddings ---------------------------------------------------------------------------------
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings ``(1, T, hidden)`` for text token ids ``(1, T)``."""
        return self.model.embed_text_tokens(input_ids.to(self.device))

    def embed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """Backbone embeddings ``(1, F, hidden)`` for audio frames ``(F, num_codebooks)``: the sum over codebooks."""
        return self.audio_embed(codes.to(self.device) + self.audio_offsets).sum(dim=1)[None]

    # -- prefill --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, embeds: torch.Tensor, start: int) -> None:
        """Compute prompt positions ``start .. start+L-1`` of ``slot`` from ``embeds`` ``(1, L, hidden)``;
        the last one's hidden state becomes the slot's (it predicts the first frame once the prompt is done)."""
        out = self.backbone.forward(embeds.to(self.dtype), start, slice(slot, slot + 1))
        self.hidden[slot] = out[0, -1]

    # -- one frame for many rows ----------------------------------------------------------------------
    @torch.inference_mode()
    def frame(self, slots: list[int], samplings: list[RowSampling]) -> torch.Tensor:
        """Codebooks ``(B, num_codebooks)`` (CPU long) of the next frame of each of ``slots``."""
        batch = len(slots)
        index = torch.tensor(slots, device=self.device)
        hidden = self.hidden[index]  # (B, hidden)
        noise, temperature, top_k = self._sampling_tensors(samplings)
        c0 = self._pick(self.model.lm_head(hidden), noise[0], temperature[0], top_k[0])
        codes = [c0]
        first = torch.cat([hidden[:, None], self.depth_embed(c0)[:, None]], dim=1)
        out = self.depth.forward(self.depth_projector(first), 0)[:, -1]
        for p in range(1, self.num_codebooks):
            ids = self._pick(F.linear(out, self.depth_heads[p - 1]), noise[p], temperature[1], top_k[1])
            codes.append(ids)
            if p < self.num_codebooks - 1:
                out = self._depth(ids, p, batch)
        return torch.stack(codes, dim=1).cpu()

    @torch.inference_mode()
    def advance(self, slots: list[int], positions: list[int], codes: torch.Tensor) -> None:
        """Feed each row's frame ``codes[b]`` to the backbone at ``positions[b]`` of slot ``slots[b]``; the
        result becomes the slot's hidden state."""
        embeds = self.embed_frames(codes)[0][:, None]  # one frame per row: (B, 1, H)
        index = torch.tensor(slots, device=self.device)
        where = torch.tensor(positions, device=self.device)
        if self.compiled:
            size = bucket(max(slots) + 1)
            full = torch.zeros(size, 1, self.hidden_size, device=self.device, dtype=embeds.dtype)
            padded = torch.full((size,), self.backbone.scratch, dtype=torch.long, device=self.device)
            full[index] = embeds
            padded[index] = where
            self.hidden[index] = self._backbone_step(full, padded)[index, 0]
            return
        lo, hi = min(slots), max(slots) + 1
        rows = slice(lo, hi) if slots == list(range(lo, hi)) else index  # a slice reads the cache without a copy
        self.hidden[index] = self._backbone_step(embeds, rows, where, max(positions) + 1)[:, 0]

    def _backbone_step_eager(self, embeds, rows, positions, span):
        return self.backbone.decode(embeds, rows, positions, span)

    def _backbone_step_static(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.backbone.step(embeds, positions)

    def _depth(self, ids: torch.Tensor, p: int, batch: int) -> torch.Tensor:
        """The depth decoder's hidden state ``(B, hidden)`` after reading codebook p's ids ``(B,)``."""
        if not self.compiled:
            return self._depth_step(ids, p)
        size = bucket(batch)
        padded = torch.zeros(size, dtype=torch.long, device=self.device)
        padded[:batch] = ids
        # Fresh position tensors each call: CUDA graphs own their inputs.
        out = self._depth_step(padded, torch.full((size,), p + 1, dtype=torch.long, device=self.device))
        return out[:batch].clone()

    def _depth_step_eager(self, ids: torch.Tensor, p: int) -> torch.Tensor:
        x = self.depth_projector(self.depth_embed(ids + p * self.vocab_size)[:, None])
        return self.depth.forward(x, p + 1)[:, -1]

    def _depth_step_static(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Codebook p sits at depth position p + 1; p stays a tensor so one graph serves every codebook.
        x = self.depth_projector(self.depth_embed(ids + (positions - 1) * self.vocab_size)[:, None])
        return self.depth.step(x, positions)[:, -1]

    # -- sampling ---------------------------------------------------------------------------------------
    def _sampling_tensors(self, samplings: list[RowSampling]):
        """Per-row noise ``(num_codebooks, B, valid)`` (zero for greedy rows) and, per stage (backbone,
        depth), temperatures ``(B, 1)`` and top-k ``(B,)`` (``valid_ids``: no top-k)."""
        batch, valid = len(samplings), self.valid_ids
        noise = torch.zeros(self.num_codebooks, batch, valid, device=self.device)
        temperature = torch.ones(2, batch, 1, device=self.device)
        top_k = torch.full((2, batch), valid, dtype=torch.long, device=self.device)
        for b, row in enumerate(samplings):
            if row.generator is not None:
                uniform = torch.rand(self.num_codebooks, valid, generator=row.generator, device=self.device)
                gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
                if row.backbone.do_sample:
                    noise[0, b] = gumbel[0]
                if row.depth.do_sample:
                    noise[1:, b] = gumbel[1:]
            for stage, sampling in enumerate((row.backbone, row.depth)):
                if sampling.do_sample:
                    temperature[stage, b] = sampling.temperature
                    if sampling.top_k is not None:
                        top_k[stage, b] = min(sampling.top_k, valid)
        return noise, temperature, top_k

    def _pick(self, logits: torch.Tensor, noise: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor):
        """Ids ``(B,)`` from logits ``(B, vocab)``: float32 like ``generate()``; ids the codec cannot decode
        (>= its codebook size) are never chosen. Greedy rows have zero noise and temperature 1."""
        scores = logits[:, : self.valid_ids].float() / temperature
        smallest = int(top_k.min())
        if smallest < self.valid_ids:
            largest = int(top_k.max())
            kth = torch.topk(scores, largest, dim=-1).values.gather(1, (top_k - 1)[:, None])
            scores = scores.masked_fill(scores < kth, float("-inf"))
        return (scores + noise).argmax(dim=-1)
