"""Sampling for a batch of rows without per-row work: a table per slot and counter-based noise.

Sampling is the Gumbel-max trick: ``argmax(logits / T + g)`` with ``g`` Gumbel noise is a draw from
``softmax(logits / T)``, and top-k masks the rest first (masked ranks are ``-inf``). Greedy rows add no
noise and divide by 1.

The noise is a pure function of ``(seed, frame, codebook, token)``: a 32-bit counter hash (murmur3's
finaliser over a Weyl sequence) computed with int64 tensor arithmetic, so CPU and CUDA give the same
bits, a row's noise never depends on which other rows share its step, and nothing is drawn from a
generator (no per-row launches, no random state to bake into a captured graph). A seeded request
therefore samples the same codes alone or in any batch wherever its logits are the same (float32 on a
CPU: exactly; bfloat16 on a GPU: a bucket's GEMM kernels may round its logits differently, so codes can
occasionally diverge between batch sizes).

Per-slot settings (temperature, top-k, sampling on/off per stage, seed) live in device tensors written
once when a piece starts (:meth:`SamplingTable.write`), never rebuilt per step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
#: Uniforms are the top 23 bits of the hash, centred: ``(k + 0.5) / 2**23`` is exact in float32 and
#: never 0 or 1 (24 bits would round the largest to 1, whose Gumbel noise is infinite).
_UNIFORM_BITS = 23


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


@dataclass(frozen=True)
class RowSampling:
    """One row's sampling: the backbone's (codebook 0) and the depth decoder's settings, and its seed."""

    backbone: Sampling
    depth: Sampling
    seed: int = 0

    @classmethod
    def create(cls, defaults: tuple[Sampling, Sampling], *, temperature=None, top_k=None, seed=None, greedy=False) -> RowSampling:
        """``defaults``: the model's (backbone, depth) settings; a request's temperature and top-k
        override both stages. No seed: a random one."""
        if greedy:
            return cls(GREEDY, GREEDY, 0)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        backbone, depth = (s.override(temperature, top_k) for s in defaults)
        return cls(backbone, depth, int(seed))


# -- counter-based noise ----------------------------------------------------------------------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow (16-bit halves)."""
    low = (x & 0xFFFF) * c
    high = (((x >> 16) * c) & 0xFFFF) << 16
    return (low + high) & _MASK


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser: a bijection of ``[0, 2**32)`` with full avalanche (int64 in and out)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def row_keys(seed: torch.Tensor, frame: torch.Tensor, codebooks: int) -> torch.Tensor:
    """One 32-bit key per (row, codebook): ``(B, codebooks)`` int64 from seeds ``(B,)`` (any int64) and
    frame counters ``(B,)``."""
    key = fmix32((seed & _MASK) ^ _GOLDEN)
    key = fmix32(key ^ ((seed >> 32) & _MASK))
    key = fmix32(key ^ (frame & _MASK))
    book = torch.arange(1, codebooks + 1, device=seed.device, dtype=torch.long)
    return fmix32(key[:, None] ^ _mul32(book, _GOLDEN)[None, :])


def token_steps(n: int, device) -> torch.Tensor:
    """The Weyl sequence ``token * golden mod 2**32`` for tokens ``0 .. n-1`` (a static buffer)."""
    return _mul32(torch.arange(n, device=device, dtype=torch.long), _GOLDEN)


def uniform_bits(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash ``(B, C, n)`` of each (row, codebook) key ``(B, C)`` and token ``(n,)``."""
    return fmix32((keys[..., None] + steps) & _MASK)


def gumbel_noise(seed: torch.Tensor, frame: torch.Tensor, codebooks: int, steps: torch.Tensor) -> torch.Tensor:
    """Gumbel noise ``(B, codebooks, n)`` float32 for seeds and frame counters ``(B,)`` (int64)."""
    bits = uniform_bits(row_keys(seed, frame, codebooks), steps)
    uniform = ((bits >> (32 - _UNIFORM_BITS)).to(torch.float32) + 0.5) * 2.0**-_UNIFORM_BITS
    return -torch.log(-torch.log(uniform))


# -- the per-slot table -------------------------------------------------------------------------------
class SamplingTable:
    """Each slot's sampling settings on the device, for both stages (0: backbone, 1: depth decoder).

    ``temperature`` ``(slots, 2)`` float32 (1 for greedy), ``top_k`` ``(slots, 2)`` int64 (``valid`` for
    no top-k), ``do_sample`` ``(slots, 2)`` float32 (1: add the noise, 0: greedy), ``seed`` ``(slots,)``
    int64. Allocated once; :meth:`write` changes one slot's rows in place.
    """

    def __init__(self, slots: int, valid: int, device):
        self.valid = valid
        self.temperature = torch.ones(slots, 2, device=device)
        self.top_k = torch.full((slots, 2), valid, dtype=torch.long, device=device)
        self.do_sample = torch.zeros(slots, 2, device=device)
        self.seed = torch.zeros(slots, dtype=torch.long, device=device)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"temperature": self.temperature, "top_k": self.top_k, "do_sample": self.do_sample, "seed": self.seed}

    def write(self, slot: int, row: RowSampling) -> None:
        """Set ``slot``'s settings (once per piece, between steps)."""
        stages = (row.backbone, row.depth)
        values = [
            (s.temperature if s.do_sample else 1.0,
             min(s.top_k, self.valid) if s.do_sample and s.top_k else self.valid,
             1.0 if s.do_sample else 0.0)
            for s in stages
        ]
        device = self.seed.device
        self.temperature[slot] = torch.tensor([v[0] for v in values], device=device)
        self.top_k[slot] = torch.tensor([v[1] for v in values], device=device)
        self.do_sample[slot] = torch.tensor([v[2] for v in values], device=device)
        self.seed[slot] = row.seed & 0x7FFFFFFFFFFFFFFF

    def copy(self, src: int, dst: int) -> None:
        for buffer in self.buffers().values():
            buffer[dst] = buffer[src]


def pick(logits: torch.Tensor, table: SamplingTable, rows: int, stage: int, noise: torch.Tensor) -> torch.Tensor:
    """Ids ``(B,)`` from logits ``(B, vocab)`` for slots ``0 .. B-1`` (``B = rows``), stage ``stage``, with
    Gumbel noise ``(B, valid)``: float32 like ``generate()``; ids the codec cannot decode (>= ``valid``)
    are never chosen. Static shapes, no host sync: top-k is the k-th of a full sort."""
    valid = table.valid
    scores = logits[:, :valid].float() / table.temperature[:rows, stage : stage + 1]
    kth = torch.topk(scores, valid, dim=-1).values.gather(1, table.top_k[:rows, stage : stage + 1] - 1)
    scores = scores.masked_fill(scores < kth, float("-inf"))
    sampled = table.do_sample[:rows, stage : stage + 1] > 0
    return torch.where(sampled, scores + noise, scores).argmax(dim=-1)
