"""StreamingMimiDecoder: streamed audio equals HF's one-shot ``MimiModel.decode``, sample for sample.

float32 tests use a fixed 1e-4: float32 kernels round alike on every CPU this suite targets. Half-precision
tests derive their bound from the dtype's own rounding on the machine that runs them; see tests/README.md
for how to check a tolerance on more than one kind of CPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MimiConfig, MimiModel

from csmserve.engine.loading import forget_cached_codebooks
from csmserve.engine.mimi_stream import StreamingMimiDecoder
from csmserve.engine.tiny import tiny_codec_config

TOLERANCE = 1e-4  # max abs difference, float32
UNEVEN_GROUPS = [1, 3, 2, 5, 7, 4, 1, 6]


def audible_codec(config: MimiConfig) -> MimiModel:
    """A random float32 Mimi in which every decoder stage shows in the audio.

    HF initialises codebooks to zeros (so all codes decode to the same latents) and layer scales to 0.01
    (so an attention bug moves the audio by ~1e-4 only): random codebooks and unit scales fix both.
    """
    torch.manual_seed(0)
    codec = MimiModel(config).eval()
    with torch.no_grad():
        split = codec.quantizer
        for rvq in (split.semantic_residual_vector_quantizer, split.acoustic_residual_vector_quantizer):
            for layer in rvq.layers:
                layer.codebook.embed_sum.normal_()
        forget_cached_codebooks(codec)
        for name, parameter in codec.named_parameters():
            if name.endswith("layer_scale.scale"):
                parameter.fill_(1.0)
    return codec


def random_codes(n_frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 2048, (32, n_frames), generator=torch.Generator().manual_seed(seed))


def one_shot(codec: MimiModel, codes: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return codec.decode(codes[None]).audio_values[0, 0].clone()


def stream(decoder: StreamingMimiDecoder, codes: torch.Tensor, groups: list[int] | None = None):
    """Decode ``codes`` in calls of ``groups`` frames (cycled; one frame per call by default)."""
    groups = groups or [1]
    chunks, start, call = [], 0, 0
    while start < codes.shape[-1]:
        size = groups[call % len(groups)]
        chunks.append(decoder.decode(codes[:, start : start + size]))
        start, call = start + size, call + 1
    return torch.cat(chunks)


def assert_same_audio(streamed: torch.Tensor, reference: torch.Tensor) -> None:
    assert streamed.shape == reference.shape
    assert (streamed - reference).abs().max().item() < TOLERANCE


@pytest.fixture(scope="module")
def tiny_codec() -> MimiModel:
    return audible_codec(tiny_codec_config())


@pytest.fixture(scope="module")
def narrow_window_codec() -> MimiModel:
    config = tiny_codec_config()
    config.sliding_window = 8
    return audible_codec(config)


def test_one_frame_per_call_matches_one_shot_decode(tiny_codec):
    """120 frames streamed one per call concatenate to the one-shot decode."""
    codes = random_codes(120)
    assert_same_audio(stream(StreamingMimiDecoder(tiny_codec), codes), one_shot(tiny_codec, codes))


def test_uneven_frame_groups_match_one_shot_decode(tiny_codec):
    """Calls of 1, 3, 2, 5, ... frames concatenate to the one-shot decode."""
    codes = random_codes(120)
    streamed = stream(StreamingMimiDecoder(tiny_codec), codes, UNEVEN_GROUPS)
    assert_same_audio(streamed, one_shot(tiny_codec, codes))


def test_each_call_returns_frame_size_float32_cpu_samples_per_frame(tiny_codec):
    """A call with n frames returns exactly n * 1920 float32 CPU samples at 24 kHz, zero frames none."""
    decoder = StreamingMimiDecoder(tiny_codec)
    assert (decoder.sample_rate, decoder.frame_size) == (24_000, 1920)
    codes = random_codes(6)
    for start, stop in [(0, 1), (1, 1), (1, 4), (4, 6)]:
        audio = decoder.decode(codes[:, start:stop])
        assert audio.shape == ((stop - start) * 1920,)
        assert audio.dtype == torch.float32 and audio.device.type == "cpu"


def test_batched_and_unbatched_codes_decode_alike(tiny_codec):
    """Codes shaped (1, K, n) decode exactly like the same codes shaped (K, n)."""
    codes = random_codes(5)
    unbatched = stream(StreamingMimiDecoder(tiny_codec), codes)
    batched = StreamingMimiDecoder(tiny_codec).decode(codes[None])
    assert torch.equal(batched, StreamingMimiDecoder(tiny_codec).decode(codes))
    assert_same_audio(unbatched, batched)


def test_codes_for_several_utterances_are_rejected(tiny_codec):
    """A batch of more than one utterance is a ValueError, not a silent mix-up."""
    with pytest.raises(ValueError, match="num_codebooks"):
        StreamingMimiDecoder(tiny_codec).decode(random_codes(3).expand(2, 32, 3))


def test_reset_decodes_the_next_utterance_like_a_fresh_decoder(tiny_codec):
    """After reset(), a second utterance decodes exactly as it would on a fresh decoder."""
    first, second = random_codes(30, seed=2), random_codes(40, seed=3)
    reused = StreamingMimiDecoder(tiny_codec)
    stream(reused, first)
    reused.reset()
    assert torch.equal(stream(reused, second), stream(StreamingMimiDecoder(tiny_codec), second))


def test_returned_samples_are_ordinary_tensors_the_caller_may_edit(tiny_codec):
    """The samples can be scaled in place outside inference mode (they are not inference tensors)."""
    audio = StreamingMimiDecoder(tiny_codec).decode(random_codes(1))
    audio.mul_(2.0)
    assert not audio.is_inference()


def test_streaming_far_beyond_a_narrow_sliding_window_matches_one_shot(narrow_window_codec):
    """With an 8-position attention window, 40 frames (80 positions) stream like the one-shot decode."""
    codes = random_codes(40)
    reference = one_shot(narrow_window_codec, codes)
    assert_same_audio(stream(StreamingMimiDecoder(narrow_window_codec), codes), reference)
    assert_same_audio(stream(StreamingMimiDecoder(narrow_window_codec), codes, UNEVEN_GROUPS), reference)


def test_streaming_more_than_250_frames_matches_one_shot(tiny_codec):
    """300 frames (600 positions, over twice the 250-position window) stream like the one-shot decode."""
    codes = random_codes(300)
    assert_same_audio(stream(StreamingMimiDecoder(tiny_codec), codes), one_shot(tiny_codec, codes))


def relative_error(audio: torch.Tensor, reference: torch.Tensor) -> float:
    return ((audio - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_codec_streams_float32_samples_within_its_own_rounding(dtype):
    """A bfloat16/float16 codec streams float32 samples of the right length, as close to the float32 decode
    as the same codec's one-shot decode is, and close to that one-shot decode.

    The bound is measured, not guessed: ``rounding`` is how far this dtype's one-shot decode lands from the
    float32 decode of the same weights and codes, on this machine's kernels (about 2% for bfloat16 on both
    AVX2's emulated and AVX-512 BF16's native kernels, which round differently per chunk shape). Streaming
    may round differently but no worse: twice ``rounding``, floored at the dtype's machine epsilon. A bug
    (state lost between calls) costs ~100%; the float32 tests above hold streaming itself to 1e-4.
    """
    float32_codec = audible_codec(tiny_codec_config())
    codec = audible_codec(tiny_codec_config()).to(dtype)
    codes = random_codes(20)
    exact = one_shot(float32_codec, codes)
    own = one_shot(codec, codes).float()
    streamed = stream(StreamingMimiDecoder(codec), codes)
    assert streamed.dtype == torch.float32 and streamed.shape == exact.shape
    bound = 2 * max(relative_error(own, exact), torch.finfo(dtype).eps)
    assert relative_error(streamed, exact) <= bound
    assert relative_error(streamed, own) <= bound
    assert bound < 0.1  # the dtype's rounding stays a rounding, not a different signal


def test_full_size_mimi_streaming_matches_one_shot_decode():
    """The real codec's architecture (random weights): 100 frames, one per call, equal the one-shot decode."""
    codec = audible_codec(MimiConfig())
    codes = random_codes(100)
    decoder = StreamingMimiDecoder(codec)
    assert decoder.frame_size == 1920
    assert_same_audio(stream(decoder, codes), one_shot(codec, codes))
