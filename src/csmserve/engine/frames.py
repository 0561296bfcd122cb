"""CSM's frame loop: one 80 ms frame of 32 codebook ids at a time, yielded as soon as it exists.

Per frame: the 1B backbone reads the previous frame and predicts codebook 0; the depth decoder,
seeded with the backbone's last hidden state, predicts codebooks 1..31 one after another. Both run
over :class:`~csmserve.engine.kv_stack.KVCachedStack` (pre-allocated caches, no per-frame
``generate()`` set-up); the only host sync per frame is copying its 32 ids to the CPU, which the
end-of-audio check and the codec need anyway.

Matches ``CsmForConditionalGeneration.generate``: greedy codes are equal token for token (tests),
sampling applies temperature then top-k to float32 logits, and generation ends on a frame whose
codebooks 0..30 are all ``codebook_eos_token_id`` (that frame is not yielded). Ids the codec cannot
decode (>= its codebook size, e.g. the padding id 2050) are never sampled, whatever the weights.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from csmserve.engine.kv_stack import KVCachedStack


@dataclass(frozen=True)
class Sampling:
    """Sampling settings for one stage; ``temperature=None`` (or ``do_sample=False``) is greedy."""

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


class FrameGenerator:
    """Generates audio frames for one request at a time over a loaded ``CsmForConditionalGeneration``.

    Owns two KV caches (backbone: ``max_position_embeddings`` positions; depth decoder: one frame),
    allocated once. Not thread-safe: the model worker thread is its only user.
    """

    def __init__(self, model, compile: bool = False):
        """``compile``: run the per-token steps through ``torch.compile`` with static shapes (on CUDA
        with CUDA graphs, ``mode="reduce-overhead"``): one graph replay per step instead of dozens
        of kernel launches. The first frames after start-up pay the compilation."""
        config = model.config
        self.model = model
        self.config = config
        self.num_codebooks = config.num_codebooks
        self.vocab_size = config.vocab_size
        self.valid_ids = min(config.vocab_size, config.codec_config.codebook_size)
        self.eos_id = config.codebook_eos_token_id
        self.max_positions = config.max_position_embeddings
        backbone = model.backbone_model
        depth = model.depth_decoder.model
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.backbone = KVCachedStack(backbone.layers, backbone.norm, backbone.rotary_emb, self.max_positions)
        self.depth = KVCachedStack(depth.layers, depth.norm, depth.rotary_emb, self.num_codebooks)
        self.audio_embed = backbone.embed_tokens.embed_audio_tokens
        self.depth_embed = depth.embed_tokens
        self.depth_projector = depth.inputs_embeds_projector
        # (num_codebooks - 1, vocab, depth_hidden): head p-1 predicts codebook p. The model stores them
        # (hidden, vocab); a batch-1 product with that layout runs at a fraction of memory bandwidth on
        # CPU (8 ms per head in bfloat16, a fifth of the frame), so we keep a copy in nn.Linear's layout.
        self.depth_heads = model.depth_decoder.codebooks_head.weight.detach().transpose(1, 2).contiguous()
        self.audio_offsets = torch.arange(self.num_codebooks, device=self.device) * self.vocab_size
        self.backbone_sampling = Sampling.from_generation_config(model.generation_config)
        self.depth_sampling = Sampling.from_generation_config(model.depth_decoder.generation_config)
        self.compiled = compile
        self._depth_step = self._depth_step_eager
        self._backbone_step = self._backbone_step_eager
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self._depth_step = torch.compile(self._depth_step_static, mode=mode, fullgraph=True, dynamic=False)
            self._backbone_step = torch.compile(self._backbone_step_static, mode=mode, fullgraph=True, dynamic=False)
        self._position = torch.zeros((), dtype=torch.long, device=self.device)
        # What the backbone cache holds: one identity per position, from position 0 (see `frames`).
        self._cached: list[Hashable] = []
        self.reused_positions = 0  # of the last prompt, taken from the cache instead of recomputed
        self.prefill_positions = {"computed": 0, "reused": 0}  # running totals, for metrics

    # -- one token of each transformer; eager (dynamic shapes) or static (compiled) ------------------
    def _depth_step_eager(self, ids: torch.Tensor, p: int) -> torch.Tensor:
        """The depth decoder's hidden state ``(1, hidden)`` after reading codebook p's ids ``(1,)``."""
        x = self.depth_projector(self.depth_embed(ids + p * self.vocab_size)[None])
        return self.depth.forward(x, p + 1)[:, -1]

    def _depth_step_static(self, ids: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        x = self.depth_projector(self.depth_embed(ids + p * self.vocab_size)[None])
        return self.depth.step(x, p + 1)[:, -1]

    def _depth_logits(self, hidden: torch.Tensor, p: int) -> torch.Tensor:
        """Logits ``(1, vocab)`` for codebook p+1 (outside any compiled graph: ``p`` stays a Python int,
        so the head is a view, not a gathered copy)."""
        return F.linear(hidden, self.depth_heads[p])

    def _backbone_step_eager(self, codes: torch.Tensor, position: int) -> torch.Tensor:
        """The backbone's last hidden state ``(1, 1, H)`` after reading one frame of codes ``(1, N)``."""
        return self.backbone.forward(self.embed_frames(codes), position)

    def _backbone_step_static(self, codes: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.backbone.step(self.embed_frames(codes), position)

    def _index(self, value: int):
        # Static steps take positions as device tensors (fresh each call: CUDA graphs own their inputs).
        if not self.compiled:
            return value
        return torch.full((), value, dtype=torch.long, device=self.device)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings ``(1, T, hidden)`` for text token ids ``(1, T)``."""
        return self.model.embed_text_tokens(input_ids.to(self.device))

    def embed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """Backbone embeddings ``(1, F, hidden)`` for audio frames ``(F, num_codebooks)``: the sum over codebooks."""
        return self.audio_embed(codes.to(self.device) + self.audio_offsets).sum(dim=1)[None]

    def _sample(self, logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
        # logits: (1, vocab) -> ids (1,). Float32 like generate(); invalid codec ids are never chosen.
        logits = logits.float()
        logits[..., self.valid_ids :] = float("-inf")
        if not sampling.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / sampling.temperature
        if sampling.top_k is not None and sampling.top_k < self.valid_ids:
            kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def _depth_frame(self, hidden: torch.Tensor, c0: torch.Tensor, sampling: Sampling, generator) -> torch.Tensor:
        """Codebooks 0..N-1 ``(N,)`` on the device, from the backbone's last hidden ``(1, 1, H)`` and codebook 0."""
        codes = [c0]
        first = torch.cat([hidden, self.depth_embed(c0)[None]], dim=1)
        out = self.depth.forward(self.depth_projector(first), 0)[:, -1]
        logits = self._depth_logits(out, 0)
        for p in range(1, self.num_codebooks):
            ids = self._sample(logits, sampling, generator)
            codes.append(ids)
            if p == self.num_codebooks - 1:
                break
            logits = self._depth_logits(self._depth_step(ids, self._index(p)), p)
        return torch.cat(codes)

    @torch.inference_mode()
    def frames(
        self,
        prompt_embeds: torch.Tensor,
        max_frames: int,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        greedy: bool = False,
        prompt_key: Sequence[Hashable] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield each frame's codes as a CPU ``LongTensor`` of shape ``(num_codebooks,)``.

        ``prompt_embeds``: ``(1, T, hidden)`` from :meth:`embed_text` (and, for context, frames).
        Stops at end-of-audio, after ``max_frames`` frames, or when the context window is full.
        Closing the iterator between two frames stops the work there.

        ``prompt_key``: one identity per prompt position (:func:`text_key`, :func:`frame_key`), which
        turns on prefix reuse: positions whose identities match what the backbone cache already holds
        from position 0 (the last prompt and the frames generated after it) are not computed again. A
        voice's context, or the sentences a text stream has spoken so far, is then prefilled once.
        """
        length = prompt_embeds.shape[1]
        if length >= self.max_positions:
            raise ValueError(f"prompt of {length} positions leaves no room in the {self.max_positions} window")
        if prompt_key is not None and len(prompt_key) != length:
            raise ValueError(f"prompt_key has {len(prompt_key)} identities for {length} positions")
        max_frames = min(max_frames, self.max_positions - length)
        backbone = GREEDY if greedy else self.backbone_sampling.override(temperature, top_k)
        depth = GREEDY if greedy else self.depth_sampling.override(temperature, top_k)
        generator = None
        if not greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        # The last position is always computed: its hidden state predicts the first frame.
        reuse = 0 if prompt_key is None else min(_common_prefix(self._cached, prompt_key), length - 1)
        del self._cached[reuse:]  # positions from `reuse` on are about to be overwritten
        self.reused_positions = reuse
        self.prefill_positions["reused"] += reuse
        self.prefill_positions["computed"] += length - reuse
        hidden = self.backbone.forward(prompt_embeds[:, reuse:].to(self.dtype), reuse)[:, -1:]
        if prompt_key is not None:
            self._cached.extend(prompt_key[reuse:])
        position = length
        for _ in range(max_frames):
            c0 = self._sample(self.model.lm_head(hidden[:, -1]), backbone, generator)
            codes = self._depth_frame(hidden, c0, depth, generator).cpu()
            if bool((codes[:-1] == self.eos_id).all()):
                return
            yield codes
            if position >= self.max_positions:
                return
            hidden = self._backbone_step(codes[None].to(self.device), self._index(position))
            if self.compiled:  # a CUDA graph reuses its output buffer on the next replay
                hidden = hidden.clone()
            if len(self._cached) == position:  # the cache holds an unbroken prefix: extend it
                self._cached.append(frame_key(codes.tolist()))
            position += 1


def text_key(token_id: int) -> Hashable:
    """The identity of a backbone position holding a text token."""
    return ("text", int(token_id))


def frame_key(codes) -> Hashable:
    """The identity of a backbone position holding an audio frame (its codebook ids)."""
    return ("audio", tuple(int(c) for c in codes))


def _common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
