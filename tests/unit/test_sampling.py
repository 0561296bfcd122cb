"""Sampling without per-row work: counter-based noise that is a pure function of (seed, frame, codebook,
token), computed in int64 without overflow (so a CPU and a GPU produce the same bits), and a per-slot
table whose draws follow softmax(logits / T) under top-k."""

from __future__ import annotations

import math

import numpy as np
import torch

from csmserve.engine.sampling import (
    GREEDY,
    RowSampling,
    Sampling,
    SamplingTable,
    candidates,
    fmix32,
    gumbel,
    mix32,
    pick,
    row_keys,
    token_bits,
)

MASK = 0xFFFFFFFF


def fmix32_reference(x: int) -> int:
    """murmur3's finaliser in Python integers (arbitrary precision: no overflow to worry about)."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & MASK
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & MASK
    return x ^ (x >> 16)


def mix32_reference(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK
    x ^= x >> 15
    x = (x * 0x1B873593) & MASK
    return x ^ (x >> 16)


EXTREMES = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, MASK - 1, MASK]


def test_the_int64_hashes_equal_the_exact_32_bit_arithmetic_for_every_kind_of_input():
    """The tensor hashes are the 32-bit mixers exactly, at the extremes too (no int64 overflow anywhere:
    so a CPU and a GPU compute the same bits)."""
    values = EXTREMES + np.random.default_rng(0).integers(0, 2**32, 200).tolist()
    tensor = torch.tensor(values, dtype=torch.long)
    assert fmix32(tensor).tolist() == [fmix32_reference(v) for v in values]
    assert mix32(tensor).tolist() == [mix32_reference(v) for v in values]


def test_noise_is_a_function_of_seed_frame_codebook_and_token_only():
    """The same (seed, frame, codebook, token) gives the same noise in any row order, batch or candidate
    order; another frame, codebook, seed (its high bits too) or token gives other noise."""
    seeds = torch.tensor([7, 2**40 + 7, 7, 123], dtype=torch.long)
    frames = torch.tensor([3, 3, 4, 3], dtype=torch.long)
    keys = row_keys(seeds, frames, 32)
    assert keys.shape == (4, 32) and len(set(keys.flatten().tolist())) == keys.numel()
    tokens = torch.arange(2048).expand(4, 2048)
    noise = gumbel(keys[:, :1], tokens)
    assert torch.isfinite(noise).all()
    assert torch.equal(gumbel(row_keys(seeds[:1], frames[:1], 32)[:, :1], tokens[:1]), noise[:1])
    shuffled = torch.randperm(2048)[None]
    assert torch.equal(gumbel(keys[:1, :1], shuffled), noise[:1, shuffled[0]])
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert not torch.equal(noise[0], gumbel(keys[:1, 1:2], tokens[:1])[0])


def test_uniforms_never_reach_zero_or_one_so_the_noise_is_always_finite():
    """The largest and smallest hash values map strictly inside (0, 1): Gumbel noise stays finite."""
    bits = torch.tensor([0, MASK], dtype=torch.long)
    uniform = ((bits >> 9).to(torch.float32) + 0.5) * 2.0**-23
    assert 0 < float(uniform[0]) and float(uniform[1]) < 1
    keys = row_keys(torch.arange(64), torch.zeros(64, dtype=torch.long), 1)
    assert torch.isfinite(gumbel(keys, torch.arange(2048).expand(64, 2048))).all()


def test_the_hash_bits_are_uniform_enough_for_sampling():
    """Over many (row, token) pairs each of 16 slices of the 32-bit range holds its share (within 2%)."""
    keys = row_keys(torch.arange(512), torch.zeros(512, dtype=torch.long), 1)
    bits = token_bits(keys, torch.arange(2048).expand(512, 2048))
    counts = torch.bincount((bits >> 28).flatten(), minlength=16).float()
    share = counts / counts.sum()
    assert ((share - 1 / 16).abs() * 16).max() < 0.02


def draws(logits: torch.Tensor, sampling: Sampling, n: int, k: int | None = None) -> np.ndarray:
    """``n`` draws from one row of ``logits`` ``(vocab,)`` with ``k`` candidates (default: every id):
    frame counters 0..n-1 of one seed."""
    valid = logits.shape[0]
    table = SamplingTable(1, valid, "cpu")
    table.write(0, RowSampling(sampling, sampling, seed=5))
    out = []
    for frame in range(n):
        keys = row_keys(table.seed, torch.tensor([frame]), 1)
        out.append(int(pick(logits[None], table, 1, 0, keys, k or valid)[0]))
    return np.array(out)


def test_draws_follow_softmax_of_the_logits_over_the_temperature():
    """Sampled ids are distributed as softmax(logits / T) (4,000 draws, each share within 0.03)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    temperature = 0.7
    got = np.bincount(draws(logits, Sampling(True, temperature, None), 4000), minlength=5) / 4000
    expected = torch.softmax(logits / temperature, dim=0).numpy()
    assert np.abs(got - expected).max() < 0.03


def test_top_k_never_draws_outside_the_k_best_and_fewer_candidates_draw_the_same():
    """Top-k 2 draws only the two best ids (both of them); drawing from 4 candidates instead of every id
    gives the very same draws (the noise belongs to the token, not to its rank); greedy takes the best."""
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9, 0.0, 0.3])
    top2 = draws(logits, Sampling(True, 1.0, 2), 400)
    assert set(top2.tolist()) == {1, 3}
    assert np.array_equal(draws(logits, Sampling(True, 1.0, 2), 400, k=4), top2)
    assert set(draws(logits, GREEDY, 50).tolist()) == {1}


def test_greedy_takes_the_first_of_equal_best_ids_like_generate():
    """With every logit equal, greedy picks id 0 (argmax's first), as generate() does."""
    assert set(draws(torch.zeros(2048), GREEDY, 5, k=64).tolist()) == {0}


def test_a_greedy_row_next_to_sampled_rows_is_still_greedy():
    """The table holds each slot's own settings: slot 0 greedy, slot 1 sampling at a high temperature."""
    table = SamplingTable(2, 6, "cpu")
    table.write(0, RowSampling(GREEDY, GREEDY, 0))
    table.write(1, RowSampling(Sampling(True, 5.0, None), Sampling(True, 5.0, None), seed=9))
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]] * 2)
    picked = []
    for frame in range(60):
        keys = row_keys(table.seed, torch.tensor([frame, frame]), 1)
        picked.append(pick(logits, table, 2, 0, keys, 6).tolist())
    assert {p[0] for p in picked} == {1}
    assert len({p[1] for p in picked}) > 3
    assert math.isclose(float(table.temperature[0, 0]), 1.0) and int(table.top_k[0, 0]) == 1


def test_a_step_uses_few_candidates_only_when_every_rows_top_k_fits():
    """64 candidates while every decoding row's top-k is at most 64 (greedy counts as 1); all ids otherwise."""
    assert candidates([(50, 50), (1, 1)], 64, 2048) == 64
    assert candidates([(50, 50), (2048, 50)], 64, 2048) == 2048


def test_the_tables_host_copy_of_top_k_follows_every_write_and_copy():
    """The step picks its candidate count from the host copy: it must say what the device table holds."""
    table = SamplingTable(3, 2048, "cpu")
    table.write(0, RowSampling(Sampling(True, 0.9, None), Sampling(True, 0.9, 50), seed=1))
    table.write(1, RowSampling(GREEDY, GREEDY, 0))
    table.copy(0, 2)
    assert table.host_top_k == [(2048, 50), (1, 1), (2048, 50)]
    assert [tuple(row) for row in table.top_k.tolist()] == table.host_top_k
