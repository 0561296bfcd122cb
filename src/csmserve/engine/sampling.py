"""Sampling for a batch of rows without per-row work: a table per slot and counter-based noise.

Sampling is the Gumbel-max trick: ``argmax(logits / T + g)`` with ``g`` Gumbel noise is a draw from
``softmax(logits / T)``, and top-k masks the rest first (masked ranks are ``-inf``). Greedy rows add no
noise and divide by 1.

The noise is a pure function of ``(seed, frame, codebook, token)``: 32-bit counter hashes (murmur3's
finaliser for the per-row keys, a cheaper xorshift-multiply mixer per token) computed with int64 tensor
arithmetic that never overflows, so CPU and CUDA give the same bits, a row's noise never depends on
which other rows share its step, and nothing is drawn from a generator (no per-row launches, no random
state to bake into a captured graph). Because the noise belongs to the token id, drawing among the
top-k candidates only is the same draw as drawing over every id with the rest masked. A seeded request
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


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A cheaper 32-bit mixer for the per-token hash (xorshift-multiply rounds): its multipliers are
    below ``2**31``, so ``x * c`` stays below ``2**63`` and needs no splitting."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _MASK
    return x ^ (x >> 16)


def row_keys(seed: torch.Tensor, frame: torch.Tensor, codebooks: int) -> torch.Tensor:
    """One 32-bit key per (row, codebook): ``(B, codebooks)`` int64 from seeds ``(B,)`` (any int64) and
    frame counters ``(B,)``."""
    key = fmix32((seed & _MASK) ^ _GOLDEN)
    key = fmix32(key ^ ((seed >> 32) & _MASK))
    key = fmix32(key ^ (frame & _MASK))
    book = torch.arange(1, codebooks + 1, device=seed.device, dtype=torch.long)
    return fmix32(key[:, None] ^ _mul32(book, _GOLDEN)[None, :])


def token_bits(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash of each row's key ``(B, 1)`` and token id ``tokens`` ``(B, n)`` (int64)."""
    return mix32((keys + _mul32(tokens, _GOLDEN)) & _MASK)


def gumbel(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Gumbel noise ``(B, n)`` float32 for each row's key ``(B, 1)`` and token ids ``(B, n)``."""
    bits = token_bits(keys, tokens)
    uniform = ((bits >> (32 - _UNIFORM_BITS)).to(torch.float32) + 0.5) * 2.0**-_UNIFORM_BITS
    return -torch.log(-torch.log(uniform))


# -- the per-slot table -------------------------------------------------------------------------------
class SamplingTable:
    """Each slot's sampling settings on the device, for both stages (0: backbone, 1: depth decoder).

    ``temperature`` ``(slots, 2)`` float32 (1 for greedy), ``top_k`` ``(slots, 2)`` int64 (``valid`` for
    no top-k, 1 for greedy), ``do_sample`` ``(slots, 2)`` float32 (1: add the noise, 0: greedy), ``seed`` ``(slots,)``
    int64. Allocated once; :meth:`write` changes one slot's rows in place. ``host_top_k``: each slot's
    (backbone, depth) top-k again on the host, kept by :meth:`write` and :meth:`copy`, so a step can pick
    its candidate count without reading the device.
    """

    def __init__(self, slots: int, valid: int, device):
        self.valid = valid
        self.temperature = torch.ones(slots, 2, device=device)
        self.top_k = torch.full((slots, 2), valid, dtype=torch.long, device=device)
        self.do_sample = torch.zeros(slots, 2, device=device)
        self.seed = torch.zeros(slots, dtype=torch.long, device=device)
        self.host_top_k: list[tuple[int, int]] = [(valid, valid)] * slots

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"temperature": self.temperature, "top_k": self.top_k, "do_sample": self.do_sample, "seed": self.seed}

    def write(self, slot: int, row: RowSampling) -> None:
        """Set ``slot``'s settings (once per piece, between steps)."""
        values = [(s.temperature if s.do_sample else 1.0, self.top_k_of(s), 1.0 if s.do_sample else 0.0)
                  for s in (row.backbone, row.depth)]
        device = self.seed.device
        self.temperature[slot] = torch.tensor([v[0] for v in values], device=device)
        self.top_k[slot] = torch.tensor([v[1] for v in values], device=device)
        self.do_sample[slot] = torch.tensor([v[2] for v in values], device=device)
        self.seed[slot] = row.seed & 0x7FFFFFFFFFFFFFFF
        self.host_top_k[slot] = (values[0][1], values[1][1])

    def copy(self, src: int, dst: int) -> None:
        for buffer in self.buffers().values():
            buffer[dst] = buffer[src]
        self.host_top_k[dst] = self.host_top_k[src]

    def top_k_of(self, sampling: Sampling) -> int:
        """The top-k a stage uses: 1 for greedy (its argmax needs no candidates), ``valid`` for none."""
        if not sampling.do_sample:
            return 1
        return min(sampling.top_k, self.valid) if sampling.top_k else self.valid


def pick(logits: torch.Tensor, table: SamplingTable, rows: int, stage: int, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Ids ``(B,)`` from logits ``(B, vocab)`` for slots ``0 .. B-1`` (``B = rows``) at stage ``stage``;
    ``keys`` ``(B, 1)``: each row's noise key for this codebook. Float32 like ``generate()``; ids the
    codec cannot decode (>= ``valid``) are never chosen. Static shapes, no host sync.

    Greedy rows take the argmax. Sampled rows draw among their top-k by Gumbel-max, computed over the
    ``k`` best candidates only (``k``: a constant of the step, at least every sampled row's top-k; the
    host picks a small one when it can, ``valid`` otherwise), with noise hashed from the candidates' token
    ids: the same draw as noise over every id, masked."""
    valid = table.valid
    scores = logits[:, :valid].float() / table.temperature[:rows, stage : stage + 1]
    best = scores.argmax(dim=-1)
    values, ids = torch.topk(scores, k, dim=-1)
    top_k = table.top_k[:rows, stage : stage + 1].clamp(max=k)  # a row not decoding may ask for more
    kth = values.gather(1, top_k - 1)
    noisy = torch.where(values >= kth, values + gumbel(keys, ids), float("-inf"))
    drawn = ids.gather(1, noisy.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(table.do_sample[:rows, stage] > 0, drawn, best)


def candidates(table_top_k: list[tuple[int, int]], small: int, valid: int) -> int:
    """The step's candidate count: ``small`` when every decoding row's top-k (both stages; ``valid`` for
    none) fits in it, else ``valid``."""
    return small if all(k <= small for pair in table_top_k for k in pair) else valid
