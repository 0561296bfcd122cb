"""The offline checkpoint: a tiny CSM with random weights in the file layout of ``sesame/csm-1b``.

It is written with ``transformers``/``tokenizers`` classes only and loads through the same
``from_pretrained`` path as the real model, so tests and demos exercise the real loading,
prompting, generation and decoding code without the 6 GB of gated weights. Its audio is noise.

The architecture keeps everything the server depends on (32 codebooks of 2051 ids, a Mimi codec
at 24 kHz with 1920-sample frames, 2048 codec codes, the special token names) and shrinks the widths.
"""

from __future__ import annotations

import json
from pathlib import Path

# A marker in config.json so that /health and the start-up log can say the voice is not real.
OFFLINE_MARKER = "csmserve_offline_model"
SEED = 1234

# Byte-level vocabulary: 256 byte tokens, then the special tokens CSM's processor looks up by name.
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
AUDIO, AUDIO_EOS = "<|AUDIO|>", "<|audio_eos|>"
SPECIAL_TOKENS = [BOS, EOS, AUDIO, AUDIO_EOS]

# CSM's chat template (conversation of {"role": speaker id, "content": [text, audio]} turns).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if not (message['role'] | string).isdigit() %}"
    "{{- raise_exception(\"The role must be an integer or a convertible string to an integer.\") }}"
    "{%- endif %}"
    "{%- if not message['content'][0]['type'] == 'text' %}"
    "{{- raise_exception(\"The first content must be text.\") }}"
    "{%- endif %}"
    "{{- bos_token }}{{- '[' + message['role'] | string + ']' }}{{- message['content'][0]['text'] }}{{- eos_token }}"
    "{%- if message['content'] | length > 1 %}"
    "{{- '<|AUDIO|><|audio_eos|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def tiny_codec_config():
    """A small Mimi config with the real codec's frame rate, sample rate and codebooks."""
    from transformers import MimiConfig

    return MimiConfig(
        sampling_rate=24_000,
        frame_rate=12.5,
        audio_channels=1,
        hidden_size=32,
        num_filters=4,
        num_residual_layers=1,
        upsampling_ratios=[8, 6, 5, 4],
        codebook_size=2048,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        num_quantizers=32,
        num_semantic_quantizers=1,
        upsample_groups=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=250,
        max_position_embeddings=8000,
        use_cache=False,
    )


def randomize_codebooks(codec) -> None:
    """Give a freshly initialised Mimi codec random codebook vectors.

    ``transformers`` initialises every codebook to zeros, which makes a random codec's audio the
    same for every code: the offline model would then play one fixed sound and parity tests would
    not see the quantizer. Trained codebooks are what the real checkpoint carries instead.
    """
    import torch

    from csmserve.engine.loading import forget_cached_codebooks

    for module in codec.modules():
        if hasattr(module, "embed_sum") and hasattr(module, "cluster_usage"):
            with torch.no_grad():
                module.embed_sum.normal_(0.0, 1.0)
                module.cluster_usage.fill_(1.0)
    forget_cached_codebooks(codec)


def _quieten(codec, target_rms: float = 0.1) -> None:
    """Scale the codec's last convolution so random codes decode to noise at ``target_rms``, not clipping."""
    import torch

    with torch.no_grad():
        codes = torch.randint(0, codec.config.codebook_size, (1, codec.config.num_quantizers, 25))
        rms = codec.decode(codes).audio_values.pow(2).mean().sqrt().item()
        seanet = getattr(codec.decoder, "decoder_seanet", codec.decoder)  # transformers 5 nests it
        last = seanet.layers[-1].conv
        last.weight.mul_(target_rms / rms)
        if last.bias is not None:
            last.bias.mul_(target_rms / rms)


def tiny_config():
    """The tiny CSM config: 32 codebooks of 2051 ids, a 2048-token window, small widths."""
    from transformers import CsmConfig

    text_vocab = 256 + len(SPECIAL_TOKENS)
    bos_id, eos_id, audio_id, audio_eos_id = range(256, 256 + len(SPECIAL_TOKENS))
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    return CsmConfig(
        num_codebooks=32,
        vocab_size=2051,
        text_vocab_size=text_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=audio_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        audio_token_id=audio_id,
        audio_eos_token_id=audio_eos_id,
        codebook_pad_token_id=2050,
        codebook_eos_token_id=0,
        rope_parameters=rope,
        depth_decoder_config={
            "num_codebooks": 32,
            "backbone_hidden_size": 64,
            "vocab_size": 2051,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 33,
            "rope_parameters": rope,
        },
        codec_config=tiny_codec_config().to_dict(),
    )


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    bos_id, eos_id = core.token_to_id(BOS), core.token_to_id(EOS)
    # As the real CSM tokenizer does: BOS and EOS around every text segment.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0 {EOS}:0",
        pair=f"{BOS}:0 $A:0 {EOS}:0 {BOS}:1 $B:1 {EOS}:1",
        special_tokens=[(BOS, bos_id), (EOS, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=AUDIO,
        model_max_length=2048,
    )


def make_tiny_model(directory: str | Path) -> Path:
    """Write the offline checkpoint to ``directory`` (created if needed) and return its path.

    Deterministic: the same seed gives the same weights. Nothing is downloaded.
    """
    import torch
    from transformers import (
        CsmForConditionalGeneration,
        CsmProcessor,
        EncodecFeatureExtractor,
        GenerationConfig,
    )

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = CsmForConditionalGeneration(config).eval()
        randomize_codebooks(model.codec_model)
        _quieten(model.codec_model)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=True,
        temperature=0.9,
        top_k=50,
        max_length=1024,
    )
    model.depth_decoder.generation_config = GenerationConfig(do_sample=True, temperature=0.9, top_k=50)
    model.save_pretrained(out)

    processor = CsmProcessor(
        feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=24_000, padding_value=0.0),
        tokenizer=_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)

    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[OFFLINE_MARKER] = True
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def is_offline_model(config) -> bool:
    """True when a loaded config is the offline checkpoint (random weights, noise)."""
    return bool(getattr(config, OFFLINE_MARKER, False))
