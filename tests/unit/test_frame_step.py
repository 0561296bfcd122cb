"""The frame step's structure, checked on the CPU: what makes it capturable as one CUDA graph per bucket.

The same operations at every row count, no host sync inside a step, writes only into buffers allocated
at start-up, no recompilation once every bucket is prepared, rows independent of their neighbours, and
the joining prompts prefilled together as they would be one by one (offline checkpoint, float32).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoProcessor, CsmForConditionalGeneration

from csmserve.engine.runner import BatchRunner, RowSampling

HOST_SYNCS = {"aten::item", "aten::_local_scalar_dense"}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = CsmForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return processor, model


def prompt(processor, text: str) -> torch.Tensor:
    return processor(text, add_special_tokens=True, return_tensors="pt")["input_ids"]


TEXTS = ["[0]One.", "[1]Two, a little longer.", "[2]Three, three.", "[3]Four is the longest prompt of them all, by far.",
         "[4]Five.", "[5]Six six.", "[6]Seven.", "[7]Eight, last."]


def ready(runner: BatchRunner, processor, slots: list[int], *, seed: int | None = None, greedy: bool = False) -> dict[int, int]:
    """Start and prefill ``slots`` (slot i gets TEXTS[i]); returns each slot's prompt length."""
    lengths = {}
    chunks = []
    for slot in slots:
        ids = prompt(processor, TEXTS[slot])
        runner.start(slot, RowSampling.create(runner.defaults, seed=seed if seed is not None else 100 + slot, greedy=greedy))
        chunks.append((slot, 0, runner.embed_text(ids)[0]))
        lengths[slot] = ids.shape[1]
    runner.prefill(chunks)
    return lengths


def frames(runner: BatchRunner, lengths: dict[int, int], count: int) -> dict[int, list[list[int]]]:
    """``count`` steps of every slot in ``lengths``; each slot's codes per step."""
    out: dict[int, list[list[int]]] = {slot: [] for slot in lengths}
    for step in range(count):
        result = runner.decode([(slot, length + step, step) for slot, length in lengths.items()])
        for slot in lengths:
            out[slot].append(result.codes[slot].tolist())
    return out


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched, and records which storages they write (in place or ``out=``)
    and which storages their results live in."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.written: set[int] = set()
        self.produced: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[func._schema.name] += 1
        for argument, value in zip(func._schema.arguments, [*args, *kwargs.values()]):
            if isinstance(value, torch.Tensor) and argument.alias_info is not None and argument.alias_info.is_write:
                self.written.add(value.untyped_storage().data_ptr())
        result = func(*args, **kwargs)
        for value in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(value, torch.Tensor):
                self.produced.add(value.untyped_storage().data_ptr())
        return result


def counted_step(runner, rows) -> OpCounter:
    counter = OpCounter()
    with counter:
        runner.decode(rows)
    return counter


def test_a_step_dispatches_the_same_operations_at_1_and_8_rows_and_never_syncs(tiny):
    """One step is the same sequence of operations whatever the number of rows (a graph per bucket can
    replay it), and nothing inside it reads a device value on the host."""
    processor, model = tiny
    # 16 slots: buckets 1 and 8 are both views of the buffers (the full-size bucket skips the slicing).
    runner = BatchRunner(model, slots=16)
    lengths = ready(runner, processor, list(range(8)))
    one = counted_step(runner, [(0, lengths[0], 0)])
    eight = counted_step(runner, [(slot, lengths[slot] + 1, 1) for slot in range(8)])
    assert one.ops == eight.ops
    assert sum(one.ops.values()) > 1000  # the whole frame: 32 codebooks, the backbone, the codec
    assert not HOST_SYNCS & set(one.ops) and not HOST_SYNCS & set(eight.ops)


def test_a_step_writes_only_into_buffers_allocated_at_start_and_they_never_move(tiny):
    """Every storage a step writes is one of the runner's buffers or the step's own temporaries, and the
    buffers keep their addresses across steps and buckets."""
    processor, model = tiny
    runner = BatchRunner(model, slots=8)
    buffers = {name: t.untyped_storage().data_ptr() for name, t in runner.buffers().items()}
    lengths = ready(runner, processor, list(range(8)))
    static = set(buffers.values())
    seen_written = set()
    for step, rows in enumerate(([0], [0, 1], [0, 1, 2, 3, 4], list(range(8)), [3])):
        counter = counted_step(runner, [(slot, lengths[slot] + step, step) for slot in rows])
        assert counter.written <= static | counter.produced
        seen_written |= counter.written & static
        assert {name: t.untyped_storage().data_ptr() for name, t in runner.buffers().items()} == buffers
    # The step really writes the caches, the hidden states, the codec state and its outputs in place.
    for name in ("hidden", "outputs", "outputs_host", "backbone.keys.0", "depth.values.1", "codec.0"):
        assert buffers[name] in seen_written, name


def test_the_compiled_step_runs_any_rows_at_any_positions_without_recompiling(tiny):
    """Compiled with full graphs (no graph breaks: no .item(), no data-dependent branch) for every bucket at
    start-up, the step then runs at new positions and row counts with recompilation forbidden, and makes
    the eager step's codes."""
    processor, model = tiny
    compiled = BatchRunner(model, slots=3, compile=True, backend="eager")
    reports = compiled.prepare()  # buckets 1, 2 and 3, each with both candidate counts
    assert [report.size for report in reports] == [1, 2, 3]
    eager = BatchRunner(model, slots=3)
    plans = [[0], [0, 1, 2], [1], [0, 2], [2]]
    results = []
    for runner in (compiled, eager):
        lengths = ready(runner, processor, [0, 1, 2], greedy=True)
        codes = []
        for step, slots in enumerate(plans):  # set_stance("fail_on_recompile") raises on any new graph
            out = runner.decode([(slot, lengths[slot] + step, step) for slot in slots])
            codes.append(out.codes[slots].tolist())
        results.append(codes)
    assert results[0] == results[1]


def test_a_seeded_row_samples_the_same_codes_alone_and_among_five_others(tiny):
    """Counter-based noise: a seeded row's frames are the same alone in bucket 1 and at slot 3 of a bucket
    of 8 beside five rows with other seeds (float32)."""
    processor, model = tiny
    alone = BatchRunner(model, slots=8)
    ids = prompt(processor, TEXTS[3])
    alone.start(0, RowSampling.create(alone.defaults, seed=42))
    alone.prefill([(0, 0, alone.embed_text(ids)[0])])
    solo = frames(alone, {0: ids.shape[1]}, 12)[0]

    batch = BatchRunner(model, slots=8)
    lengths = ready(batch, processor, [0, 1, 2, 4, 5])  # other texts, other seeds
    batch.start(3, RowSampling.create(batch.defaults, seed=42))
    batch.prefill([(3, 0, batch.embed_text(ids)[0])])
    lengths[3] = ids.shape[1]
    together = frames(batch, lengths, 12)
    assert together[3] == solo
    assert together[4] != solo and together[0] != together[1]
    other_seed = BatchRunner(model, slots=1)
    other_seed.start(0, RowSampling.create(other_seed.defaults, seed=43))
    other_seed.prefill([(0, 0, other_seed.embed_text(ids)[0])])
    assert frames(other_seed, {0: ids.shape[1]}, 12)[0] != solo


def test_prompts_of_different_lengths_prefilled_together_generate_their_one_by_one_codes(tiny):
    """Batched prefill (one padded forward, each row at its own start) gives each slot the hidden state and
    cache of a prefill of its own: the greedy codes that follow are the same."""
    processor, model = tiny
    together = BatchRunner(model, slots=4)
    lengths = ready(together, processor, [0, 1, 2, 3], greedy=True)
    one_by_one = BatchRunner(model, slots=4)
    for slot in range(4):
        ids = prompt(processor, TEXTS[slot])
        one_by_one.start(slot, RowSampling.create(one_by_one.defaults, greedy=True))
        half = ids.shape[1] // 2  # and in two chunks, the second from a start inside the prompt
        embeds = one_by_one.embed_text(ids)[0]
        one_by_one.prefill([(slot, 0, embeds[:half])])
        one_by_one.prefill([(slot, half, embeds[half:])])
    assert len({n for n in lengths.values()}) == 4  # four different lengths
    torch.testing.assert_close(together.hidden, one_by_one.hidden, rtol=1e-5, atol=1e-5)
    assert frames(together, lengths, 8) == frames(one_by_one, lengths, 8)


def test_the_codec_step_decodes_going_rows_and_leaves_the_others_state_untouched(tiny):
    """Mimi inside the step: rows that go get the frame's audio of an indexed decode; a row that does not
    go keeps its codec state exactly (its next frame decodes as if the skipped one never happened)."""
    from csmserve.engine.mimi_stream import BatchedMimiDecoder

    _, model = tiny
    codec = model.codec_model
    rng = np.random.default_rng(3)
    codes = torch.tensor(rng.integers(0, 2048, size=(3, 32, 4)))
    gated = BatchedMimiDecoder(codec, 3)
    indexed = BatchedMimiDecoder(codec, 3)
    with torch.inference_mode():
        for frame in range(4):
            go = torch.tensor([True, frame != 1, True])  # row 1 sits frame 1 out
            out = gated.step(codes[:, :, frame], go).float()
            rows = [r for r in range(3) if go[r]]
            if frame == 1:
                expect = indexed.decode(codes[rows, :, frame : frame + 1], rows)
            else:
                expect = indexed.decode(codes[:, :, frame : frame + 1], [0, 1, 2])
            torch.testing.assert_close(out[go], expect, rtol=0, atol=1e-5)
