"""Prompts with context are the ones transformers builds from a conversation with audio."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, CsmForConditionalGeneration

from csmserve.engine.frames import FrameGenerator
from csmserve.engine.prompt import PromptBuilder, Turn

UNDECODABLE = [2048, 2049, 2050]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = CsmForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return processor, model


def conversation(clip_a: np.ndarray, clip_b: np.ndarray) -> list[dict]:
    return [
        {"role": "0", "content": [{"type": "text", "text": "Hi there."}, {"type": "audio", "path": clip_a}]},
        {"role": "1", "content": [{"type": "text", "text": "Hello, how are you?"}, {"type": "audio", "path": clip_b}]},
        {"role": "0", "content": [{"type": "text", "text": "Fine, thanks."}]},
    ]


def clips():
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal(24000 * 2 // 5 * 2)).astype(np.float32), (
        0.1 * rng.standard_normal(24000)
    ).astype(np.float32)


def test_context_embeddings_equal_the_processor_and_model_merge(tiny):
    """Turns with audio codes give the same backbone inputs as apply_chat_template + the model's merge."""
    processor, model = tiny
    a, b = clips()
    inputs = processor.apply_chat_template(conversation(a, b), tokenize=True, return_dict=True)
    with torch.no_grad():
        reference = model._merge_input_ids_with_input_values(
            inputs["input_ids"], inputs["input_values"], inputs["input_values_cutoffs"]
        )["inputs_embeds"]
        codes_a = model.codec_model.encode(torch.tensor(a)[None, None]).audio_codes[0].T.numpy()
        codes_b = model.codec_model.encode(torch.tensor(b)[None, None]).audio_codes[0].T.numpy()
    frames = FrameGenerator(model)
    builder = PromptBuilder(processor.tokenizer, frames)
    ours = builder.embeddings([Turn(0, "Hi there.", codes_a), Turn(1, "Hello, how are you?", codes_b)], 0, "Fine, thanks.")
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-6)


def test_greedy_codes_with_context_equal_generate(tiny):
    """With a conversation as context, greedy frames equal model.generate token for token."""
    processor, model = tiny
    a, b = clips()
    inputs = processor.apply_chat_template(conversation(a, b), tokenize=True, return_dict=True)
    reference = copy.deepcopy(model).generate(
        **inputs, max_new_tokens=30, do_sample=False, depth_decoder_do_sample=False,
        suppress_tokens=UNDECODABLE, depth_decoder_suppress_tokens=UNDECODABLE,
    )[0]
    with torch.no_grad():
        codes_a = model.codec_model.encode(torch.tensor(a)[None, None]).audio_codes[0].T.numpy()
        codes_b = model.codec_model.encode(torch.tensor(b)[None, None]).audio_codes[0].T.numpy()
    frames = FrameGenerator(model)
    embeds = PromptBuilder(processor.tokenizer, frames).embeddings(
        [Turn(0, "Hi there.", codes_a), Turn(1, "Hello, how are you?", codes_b)], 0, "Fine, thanks."
    )
    ours = torch.stack(list(frames.frames(embeds, 30, greedy=True)))
    assert torch.equal(ours, reference[:30])


def test_context_is_trimmed_oldest_first_to_fit_the_window(tiny):
    """When the window is short, the oldest turns go first; the newest stay."""
    processor, model = tiny
    builder = PromptBuilder(processor.tokenizer, FrameGenerator(model))
    turns = [Turn(i % 2, f"Turn number {i}.", np.zeros((50, 32), dtype=np.int16)) for i in range(6)]
    need = builder.positions(turns[0])
    kept = builder.fit(turns, target_positions=20, reserve=100, window=20 + 100 + 2 * need)
    assert [t.text for t in kept] == ["Turn number 4.", "Turn number 5."]
    assert builder.fit(turns, 20, 100, 2048) == turns
