"""The frame generator is still the model: greedy codes equal ``model.generate`` token for token."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoProcessor, CsmForConditionalGeneration

from csmserve.engine.frames import FrameGenerator

UNDECODABLE = [2048, 2049, 2050]  # codec codebook size is 2048; 2050 is CSM's codebook padding id


def reference_codes(model, inputs, frames: int) -> torch.Tensor:
    """``model.generate`` greedy on both stages, kept off the ids the codec cannot decode."""
    out = model.generate(
        **inputs,
        max_new_tokens=frames,
        do_sample=False,
        depth_decoder_do_sample=False,
        suppress_tokens=UNDECODABLE,
        depth_decoder_suppress_tokens=UNDECODABLE,
    )
    return out[0]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = CsmForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return processor, model


@pytest.mark.parametrize(
    "prompt, frames",
    [("[0]Hello world, this is a parity check.", 120), ("[3]Short.", 40)],
    ids=["120-frames", "another-speaker-and-text"],
)
def test_greedy_codes_equal_generate(tiny, prompt, frames):
    """Offline checkpoint, float32: greedy frames identical to model.generate(do_sample=False), whatever the prompt."""
    processor, model = tiny
    inputs = processor(prompt, add_special_tokens=True)
    reference = reference_codes(copy.deepcopy(model), inputs, frames)
    generator = FrameGenerator(model)
    ours = torch.stack(list(generator.frames(generator.embed_text(inputs["input_ids"]), frames, greedy=True)))
    assert ours.shape == (frames, 32)
    assert torch.equal(ours, reference[:frames])


def test_all_zero_frame_ends_generation(tiny):
    """A frame whose codebooks 0..30 are the end-of-audio id ends the utterance and is not yielded."""
    processor, model = tiny
    silent = copy.deepcopy(model)
    with torch.no_grad():  # all logits equal: greedy picks id 0 everywhere, the end-of-audio frame
        silent.lm_head.weight.zero_()
        silent.depth_decoder.codebooks_head.weight.zero_()
    generator = FrameGenerator(silent)
    inputs = processor("[0]Nothing to say.", add_special_tokens=True)
    assert list(generator.frames(generator.embed_text(inputs["input_ids"]), 50, greedy=True)) == []
    reference = reference_codes(silent, inputs, 5)
    assert (reference[0, :-1] == 0).all()  # generate() agrees that the first frame is end-of-audio


def test_sampling_never_emits_ids_the_codec_cannot_decode(tiny):
    """With every id equally likely (2051 per codebook), sampled codes stay below 2048 and decode."""
    processor, model = tiny
    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.lm_head.weight.zero_()
        flat.depth_decoder.codebooks_head.weight.zero_()
    generator = FrameGenerator(flat)
    inputs = processor("[0]Uniform.", add_special_tokens=True)
    codes = torch.stack(
        list(generator.frames(generator.embed_text(inputs["input_ids"]), 100, seed=3, temperature=1.0, top_k=2051))
    )
    assert codes.shape == (100, 32)
    assert int(codes.max()) < 2048
    audio = flat.codec_model.decode(codes.T[None]).audio_values
    assert audio.shape[-1] == 100 * 1920


def test_seed_makes_sampling_reproducible(tiny):
    """Same seed, same codes; another seed, other codes."""
    processor, model = tiny
    generator = FrameGenerator(model)
    embeds = generator.embed_text(processor("[0]Seeded.", add_special_tokens=True)["input_ids"])
    a = torch.stack(list(generator.frames(embeds, 10, seed=1)))
    b = torch.stack(list(generator.frames(embeds, 10, seed=1)))
    c = torch.stack(list(generator.frames(embeds, 10, seed=2)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generation_stops_at_the_context_window(tiny):
    """A request never runs past the model's 2048-position window."""
    processor, model = tiny
    generator = FrameGenerator(model)
    # " a" is one Llama 3 token each ("a" * 2030 would be ~260): a prompt of 2035 positions.
    embeds = generator.embed_text(processor("[0]" + " a" * 2030, add_special_tokens=True)["input_ids"])
    assert embeds.shape[1] > 2000
    codes = list(generator.frames(embeds, 500, greedy=True))
    assert embeds.shape[1] + len(codes) <= 2048 + 1
    assert len(codes) <= 2048 - embeds.shape[1] + 1


@pytest.mark.slow
def test_the_step_compiled_with_functionalised_mutations_gives_the_same_codes_as_eager(tiny):
    """The torch.compile path (full graph, its in-place buffer writes functionalised as inductor sees them;
    aot_eager keeps the kernels eager) generates the same greedy and seeded codes as the eager step."""
    processor, model = tiny
    embeds_ids = processor("[0]Hello world, compiled.", add_special_tokens=True)["input_ids"]
    eager = FrameGenerator(model)
    compiled = FrameGenerator(model, compile=True, backend="aot_eager")
    expected = torch.stack(list(eager.frames(eager.embed_text(embeds_ids), 30, greedy=True)))
    got = torch.stack(list(compiled.frames(compiled.embed_text(embeds_ids), 30, greedy=True)))
    assert torch.equal(got, expected)
    sampled = [torch.stack(list(g.frames(g.embed_text(embeds_ids), 10, seed=4))) for g in (eager, compiled)]
    assert torch.equal(sampled[0], sampled[1])


def run_rows(runner, prompts, frames: int) -> torch.Tensor:
    """Greedy codes ``(rows, frames, 32)`` of ``prompts`` (token id tensors) stepped together on ``runner``."""
    from csmserve.engine.runner import RowSampling

    greedy = RowSampling.create(runner.defaults, greedy=True)
    for slot, ids in enumerate(prompts):
        runner.start(slot, greedy)
    runner.prefill([(slot, 0, runner.embed_text(ids)[0]) for slot, ids in enumerate(prompts)])
    out = []
    for step in range(frames):
        result = runner.decode([(slot, ids.shape[1] + step, step) for slot, ids in enumerate(prompts)])
        out.append(torch.from_numpy(result.codes[: len(prompts)].copy()))
    return torch.stack(out, dim=1)


@pytest.fixture(scope="module")
def full_size():
    """csm-1b's architecture (CsmConfig() defaults) with random weights, float32."""
    from transformers import CsmConfig

    from csmserve.engine.tiny import randomize_codebooks

    torch.manual_seed(0)
    model = CsmForConditionalGeneration(CsmConfig()).eval()
    randomize_codebooks(model.codec_model)
    return model


FULL_SIZE_PROMPT = [128000, 58, 15, 60, 9906, 1917, 11, 420, 374, 264, 1296, 13, 128001]


@pytest.mark.slow
def test_greedy_codes_equal_generate_for_the_full_size_architecture(full_size):
    """csm-1b's architecture (CsmConfig() defaults, random weights), float32: 8 frames identical."""
    input_ids = torch.tensor([FULL_SIZE_PROMPT])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    generator = FrameGenerator(full_size)
    ours = torch.stack(list(generator.frames(generator.embed_text(input_ids), 8, greedy=True)))
    reference = reference_codes(full_size, inputs, 8)
    assert ours.shape == (8, 32)
    assert torch.equal(ours, reference[:8])


@pytest.mark.slow
def test_two_full_size_rows_in_one_batch_equal_their_solo_greedy_codes(full_size):
    """csm-1b's architecture, float32: two prompts of different lengths stepped together give each one's solo codes."""
    from csmserve.engine.runner import BatchRunner

    prompts = [torch.tensor([FULL_SIZE_PROMPT]), torch.tensor([FULL_SIZE_PROMPT[:4] + [40, 1097, 13, 128001]])]
    frames = 3
    solo = []
    for ids in prompts:
        generator = FrameGenerator(full_size)
        solo.append(torch.stack(list(generator.frames(generator.embed_text(ids), frames, greedy=True))))
    batched = run_rows(BatchRunner(full_size, slots=2), prompts, frames)
    assert torch.equal(batched[0], solo[0]) and torch.equal(batched[1], solo[1])
