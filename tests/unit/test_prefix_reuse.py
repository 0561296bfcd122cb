"""Prefix reuse: a prompt's positions already in the backbone cache are not prefilled again, and the
frames generated are the ones a cold prefill gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, CsmForConditionalGeneration

from csmserve.engine.frames import FrameGenerator, frame_key, text_key
from csmserve.engine.prompt import PromptBuilder, Turn


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = CsmForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return processor, model


@pytest.fixture
def loop(tiny):
    """A fresh frame loop (empty cache), its prompt builder, and a voice turn with 12 frames of audio."""
    processor, model = tiny
    frames = FrameGenerator(model)
    return frames, PromptBuilder(processor.tokenizer, frames), [Turn(1, "This is how I sound.", voice_codes())]


def voice_codes(frames: int = 12) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 2048, size=(frames, 32)).astype(np.int16)


def run(frames: FrameGenerator, builder: PromptBuilder, context, text, n=20, *, keyed=True, **kw):
    embeds = builder.embeddings(context, 0, text)
    key = builder.key(context, 0, text) if keyed else None
    return torch.stack(list(frames.frames(embeds, n, prompt_key=key, **kw)))


def cold(model, processor, context, text, n=20, **kw):
    """What a fresh generator (empty cache, no reuse) produces."""
    frames = FrameGenerator(model)
    return run(frames, PromptBuilder(processor.tokenizer, frames), context, text, n, keyed=False, **kw)


def test_key_has_one_identity_per_prompt_position(tiny):
    processor, model = tiny
    frames = FrameGenerator(model)
    builder = PromptBuilder(processor.tokenizer, frames)
    codes = voice_codes()
    context = [Turn(1, "A voice to copy.", codes), Turn(0, "No audio here.")]
    key = builder.key(context, 0, "Hello.")
    assert len(key) == builder.embeddings(context, 0, "Hello.").shape[1]
    text = builder.token_ids(1, "A voice to copy.")[0].tolist()
    assert key[: len(text)] == [text_key(i) for i in text]
    audio = key[len(text) : len(text) + len(codes) + 1]
    assert audio == [*(frame_key(row) for row in codes), frame_key([model.config.codebook_eos_token_id] * 32)]


def test_key_names_the_tenant_except_for_the_shared_voice_turns(tiny):
    """With ``owner`` and ``shared``: the first ``shared`` turns (a registered voice) belong to nobody,
    every later position (context, the target text) to the owner; the same prompt for another owner
    shares exactly the voice's positions."""
    processor, model = tiny
    builder = PromptBuilder(processor.tokenizer, FrameGenerator(model))
    codes = voice_codes()
    context = [Turn(1, "A voice to copy.", codes), Turn(0, "What they said before.", codes[:3])]
    mine = builder.key(context, 0, "My secret.", owner="key-1", shared=1)
    theirs = builder.key(context, 0, "My secret.", owner="key-2", shared=1)
    voice_positions = builder.positions(context[0])
    assert mine[:voice_positions] == theirs[:voice_positions] == builder.key(context[:1], 0, "")[:voice_positions]
    assert all(a != b for a, b in zip(mine[voice_positions:], theirs[voice_positions:]))
    assert len(mine) == builder.embeddings(context, 0, "My secret.").shape[1]


def test_same_voice_new_text_reuses_the_voice_and_generates_the_cold_frames(tiny, loop):
    """Two requests with one voice context: the second prefills only its own text, same frames as cold."""
    processor, model = tiny
    frames, builder, voice = loop
    run(frames, builder, voice, "First sentence.", greedy=True)
    assert frames.reused_positions == 0  # nothing cached yet

    second = run(frames, builder, voice, "Something else entirely.", greedy=True)
    voice_positions = builder.positions(voice[0])
    assert frames.reused_positions >= voice_positions
    assert frames.reused_positions < builder.key(voice, 0, "Something else entirely.").__len__()
    assert torch.equal(second, cold(model, processor, voice, "Something else entirely.", greedy=True))


def test_sampled_frames_with_reuse_equal_the_cold_ones_for_a_seed(tiny, loop):
    processor, model = tiny
    frames, builder, voice = loop
    run(frames, builder, voice, "Warm the cache.", seed=1)
    got = run(frames, builder, voice, "Sampled with a seed.", seed=7)
    assert frames.reused_positions >= builder.positions(voice[0])
    assert torch.equal(got, cold(model, processor, voice, "Sampled with a seed.", seed=7))


def test_a_text_streams_next_sentence_reuses_the_previous_one_and_its_audio(tiny, loop):
    """The next sentence's context is the previous prompt plus the frames generated for it: all cached."""
    processor, model = tiny
    frames, builder, voice = loop
    first = run(frames, builder, voice, "The first sentence.", n=15, greedy=True)
    prompt_positions = len(builder.key(voice, 0, "The first sentence."))

    context = [*voice, Turn(0, "The first sentence.", first.numpy())]
    second = run(frames, builder, context, "The second one.", greedy=True)
    # Everything but the first sentence's audio_eos frame (never fed back) and the new text.
    assert frames.reused_positions == prompt_positions + len(first)
    assert torch.equal(second, cold(model, processor, context, "The second one.", greedy=True))


def test_an_iterator_closed_early_never_claims_a_frame_it_did_not_feed_back(tiny, loop):
    """Closed after its third frame, the loop fed back the three frames it made (the step reads each
    frame back as it makes it): a follow-up reuses exactly those, and generates the cold frames."""
    processor, model = tiny
    frames, builder, voice = loop
    text = "Cut short."
    iterator = frames.frames(builder.embeddings(voice, 0, text), 20, greedy=True, prompt_key=builder.key(voice, 0, text))
    taken = [next(iterator) for _ in range(3)]
    iterator.close()
    prompt_positions = len(builder.key(voice, 0, text))

    context = [*voice, Turn(0, text, torch.stack(taken).numpy())]
    got = run(frames, builder, context, "After the cut.", greedy=True)
    assert frames.reused_positions == prompt_positions + 3
    assert torch.equal(got, cold(model, processor, context, "After the cut.", greedy=True))


def test_a_different_context_is_prefilled_again(tiny):
    """A changed first turn shares at most its leading tokens; the rest is recomputed, frames as cold."""
    processor, model = tiny
    frames = FrameGenerator(model)
    builder = PromptBuilder(processor.tokenizer, frames)
    run(frames, builder, [Turn(1, "One voice.", voice_codes())], "Hello.", greedy=True)
    other = [Turn(1, "Another voice.", voice_codes(9))]
    got = run(frames, builder, other, "Hello.", greedy=True)
    assert frames.reused_positions < builder.token_ids(1, "Another voice.").shape[1]
    assert torch.equal(got, cold(model, processor, other, "Hello.", greedy=True))


def test_a_request_without_a_key_invalidates_the_cache(tiny, loop):
    """An unkeyed prompt overwrites the cache, so the next keyed one must not reuse stale positions."""
    processor, model = tiny
    frames, builder, voice = loop
    run(frames, builder, voice, "Cached.", greedy=True)
    run(frames, builder, [Turn(1, "Something unrelated.", voice_codes(7))], "Unkeyed.", keyed=False, greedy=True)
    got = run(frames, builder, voice, "Cached again?", greedy=True)
    assert frames.reused_positions == 0
    assert torch.equal(got, cold(model, processor, voice, "Cached again?", greedy=True))


def test_a_whole_prompt_already_cached_still_computes_its_last_position(tiny, loop):
    processor, model = tiny
    frames, builder, voice = loop
    first = run(frames, builder, voice, "Say it twice.", greedy=True)
    again = run(frames, builder, voice, "Say it twice.", greedy=True)
    assert frames.reused_positions == len(builder.key(voice, 0, "Say it twice.")) - 1
    assert torch.equal(first, again)


def test_a_key_of_the_wrong_length_is_refused(tiny):
    processor, model = tiny
    frames = FrameGenerator(model)
    embeds = frames.embed_text(processor("[0]Hi.", add_special_tokens=True)["input_ids"])
    with pytest.raises(ValueError, match="identities"):
        next(frames.frames(embeds, 5, prompt_key=[("text", 1)]))
